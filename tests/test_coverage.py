"""apical.coverage: every parameterised module, wrapped or not, with the reason; perforate's summary."""

import logging

import pytest
import torch
from torch import nn

import apical
from apical.cli import main


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)  # 80: not a layer
        self.norm = nn.LayerNorm(8)  # 16: not a layer
        self.fc = nn.Linear(8, 8)  # 72
        self.bil = nn.Bilinear(4, 5, 8)  # unsupported: 8 * 4 * 5 + 8 = 168
        self.skip = nn.Linear(8, 3)  # 27
        self.head = nn.Linear(8, 10, bias=False)  # tied to emb: 80, counted once, for the wrapped holder
        self.head.weight = self.emb.weight


def test_reasons_and_fraction_against_hand_counts():
    net = Mixed()
    apical.perforate(net, apical.DendriteConfig(exclude=["skip"]))
    rep = apical.coverage(net, apical.DendriteConfig(exclude=["skip"]))
    got = {e.name: (e.parameters, e.layer, e.wrapped, e.reason) for e in rep}
    assert got == {
        "emb": (0, False, False, "embedding: a lookup table, no neurons"),  # its table counts for head
        "norm": (16, False, False, "no weight matrix (a norm's scale, a bias or a scalar)"),
        "fc.base": (72, True, True, "wrapped (DendriticLinear)"),
        "bil": (168, True, False, "unsupported type Bilinear"),
        "skip": (27, True, False, "excluded by config.exclude"),
        "head.base": (80, True, True, "wrapped (DendriticLinear)"),
    }
    assert rep.layer_parameters == 72 + 168 + 27 + 80 and rep.wrapped_parameters == 152
    assert rep.fraction == pytest.approx(152 / 347)
    assert rep.unreachable_parameters == 168
    assert [e.name for e in rep.left_out] == ["bil", "skip"]
    assert "43.8% of the layer parameters" in rep.summary()
    assert apical.Coverage.from_rows(rep.to_rows()) == rep


def test_unperforated_lazy_and_opaque_modules():
    class MyAttention(nn.MultiheadAttention):
        pass

    net = nn.Sequential(nn.LazyLinear(4), MyAttention(4, 2), nn.Conv1d(2, 2, 1))
    rep = {e.name: e.reason for e in apical.coverage(net)}
    assert rep["0"] == "lazy layer not initialised: run one forward pass first"
    assert "register a layer class" in rep["1"]
    assert rep["1.out_proj"] == "inside MyAttention, which reads its weights directly"
    assert rep["2"] == "supported, not wrapped (perforate has not run)"
    assert apical.coverage(net).fraction == 0.0


def test_perforate_logs_a_summary_and_warns_only_when_most_parameters_are_unreachable(caplog, recwarn):
    big = nn.Sequential(nn.Linear(2, 2), nn.Bilinear(2, 2, 32))
    with caplog.at_level(logging.INFO, logger="apical"):
        with pytest.warns(UserWarning, match="unsupported type Bilinear"):
            apical.perforate(big)
    lines = [r.getMessage() for r in caplog.records if r.name == "apical"]
    assert len(lines) == 1 and lines[0].startswith("perforate: dendrites on 1 module(s)")
    # just under half unreachable: no warning (a Bilinear(2, 2, 5) holds 25 of 25 + 30 parameters; 25/55 < 1/2)
    n = len(recwarn)
    apical.perforate(nn.Sequential(nn.Linear(2, 10), nn.Bilinear(2, 2, 5)))
    assert len(recwarn) == n
    # exactly half (Bilinear(2, 2, 6): 30 of 60): not most, no warning
    apical.perforate(nn.Sequential(nn.Linear(2, 10), nn.Bilinear(2, 2, 6)))
    assert len(recwarn) == n
    # just over half (Bilinear(2, 2, 8): 40 of 70): it warns, word for word, at the caller's line
    with pytest.warns(UserWarning) as caught:
        apical.perforate(nn.Sequential(nn.Linear(2, 10), nn.Bilinear(2, 2, 8)))
    (w,) = caught
    assert str(w.message) == (
        "apical.perforate: dendrites on 1 module(s) holding 42.9% of the layer parameters (30 of 70); left out "
        "1 layer module(s): unsupported type Bilinear (40). Most layer parameters sit in modules left out; "
        "apical.coverage(model) says why for each")
    assert w.filename == __file__
    # a big layer the user excluded on purpose is not a reason to warn
    chosen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 64))
    n = len(recwarn)
    apical.perforate(chosen, apical.DendriteConfig(exclude=["1"]))
    assert len(recwarn) == n


def test_inspect_shows_the_coverage_of_a_checkpoint(tmp_path, capsys):
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Bilinear(3, 5, 10))  # 20 wrapped, 160 not
    with pytest.warns(UserWarning):
        apical.perforate(net)
    apical.save(tmp_path / "c.safetensors", net)
    assert main(["inspect", str(tmp_path / "c.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "coverage: dendrites on 1 module(s) holding 11.1% of the layer parameters (20 of 180)" in out
    assert "unsupported type Bilinear" in out


def test_table_and_text_against_a_hand_written_report():
    net = Mixed()
    apical.perforate(net, apical.DendriteConfig(exclude=["skip"]))
    rep = apical.coverage(net, apical.DendriteConfig(exclude=["skip"]))
    want_rows = [
        ("name", "type", "parameters", "layer", "wrapped", "reason"),
        ("emb", "Embedding", "0", "-", "no", "embedding: a lookup table, no neurons"),
        ("norm", "LayerNorm", "16", "-", "no", "no weight matrix (a norm's scale, a bias or a scalar)"),
        ("fc.base", "Linear", "72", "yes", "yes", "wrapped (DendriticLinear)"),
        ("bil", "Bilinear", "168", "yes", "no", "unsupported type Bilinear"),
        ("skip", "Linear", "27", "yes", "no", "excluded by config.exclude"),
        ("head.base", "Linear", "80", "yes", "yes", "wrapped (DendriticLinear)"),
    ]
    widths = [9, 9, 10, 5, 7]  # the longest cell of each of the first five columns
    want = "\n".join("  ".join([*(c + " " * (w - len(c)) for c, w in zip(r[:5], widths, strict=True)), r[5]])
                     for r in want_rows)
    assert rep.table() == want
    assert str(rep) == rep.summary() + "\n" + want
    assert rep.summary() == ("dendrites on 2 module(s) holding 43.8% of the layer parameters (152 of 347); left out "
                             "2 layer module(s): unsupported type Bilinear (168); excluded by config.exclude (27)")
    big = apical.Coverage.from_rows([["big", "Linear", 1234567, True, True, "wrapped (DendriticLinear)"]])
    assert big.table().splitlines()[1].split()[2] == "1,234,567"
    with pytest.raises(ValueError):  # a row of the wrong length is refused, not silently cut
        apical.Coverage.from_rows([["fc", "Linear", 72, True, True]])


def test_the_summary_adds_up_each_reasons_parameters_and_names_the_three_largest():
    rows = [["fc", "Linear", 100, True, True, "wrapped (DendriticLinear)"],
            ["a1", "Bilinear", 10, True, False, "reason A"], ["b", "Linear", 12, True, False, "reason B"],
            ["a2", "Bilinear", 5, True, False, "reason A"], ["c", "Linear", 3, True, False, "reason C"],
            ["d", "Linear", 1, True, False, "reason D"]]
    rep = apical.Coverage.from_rows(rows)
    assert rep.summary() == ("dendrites on 1 module(s) holding 76.3% of the layer parameters (100 of 131); "
                             "left out 5 layer module(s): reason A (15); reason B (12); reason C (3)")


def test_attention_recurrent_and_a_users_own_child_named_base():
    """Hand-written rows: attention and GRU say wrapped with their own words; a user's child that happens
    to be called ``base`` (not a dendritic layer's) is reported by its own status, here excluded."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.gru = nn.GRU(8, 8)
            self.base = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

    cfg = apical.DendriteConfig(exclude=["base"])
    net = apical.perforate(Net(), cfg)
    rows = [r[:1] + r[2:] for r in apical.coverage(net, cfg).to_rows()]  # without the type column
    assert rows == [
        ["attn", 216, True, True, "wrapped (q, k, v projections)"],  # in_proj 3 * 8 * 8 + 24
        ["attn.out_proj.base", 72, True, True, "wrapped (DendriticLinear)"],
        ["gru", 432, True, True, "wrapped (a dendritic cell per layer and direction)"],  # 2 * 3 * 8 * 8 + 2 * 24
        ["base", 72, True, False, "excluded by config.exclude"],
        ["head.base", 18, True, True, "wrapped (DendriticLinear)"],
    ]


def test_a_users_module_named_like_an_embedding_is_a_lookup_table_not_a_layer():
    class PositionEmbedding(nn.Module):  # not an nn.Embedding subclass: known by its name
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(10, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = PositionEmbedding()
            self.fc = nn.Linear(4, 2)

    rep = apical.coverage(Net())
    assert [(e.name, e.layer, e.reason) for e in rep.entries] == [
        ("pos", False, "embedding: a lookup table, no neurons"),
        ("fc", True, "supported, not wrapped (perforate has not run)")]
    assert rep.layer_parameters == 10


def test_include_and_exclude_by_name_and_type_against_hand_written_statuses():
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(2, 2, 1), nn.Linear(4, 4), nn.Linear(4, 2), nn.Conv2d(2, 2, 1))
    cfg = apical.DendriteConfig(include=["0", "2", nn.Conv2d], exclude=[nn.Conv1d])
    before = {e.name: (e.wrapped, e.reason) for e in apical.coverage(net, cfg).entries}
    assert before == {"0": (False, "supported, not wrapped (perforate has not run)"),
                      "1": (False, "excluded by config.exclude"),  # by type
                      "2": (False, "supported, not wrapped (perforate has not run)"),
                      "3": (False, "not selected by config.include"),
                      "4": (False, "supported, not wrapped (perforate has not run)")}  # included by type
    apical.perforate(net, cfg)
    after = {e.name: (e.wrapped, e.reason) for e in apical.coverage(net).entries}  # no config: the reasons go
    assert after == {"0.base": (True, "wrapped (DendriticLinear)"),
                     "1": (False, "supported, left out by the include / exclude selection"),
                     "2.base": (True, "wrapped (DendriticLinear)"),
                     "3": (False, "supported, left out by the include / exclude selection"),
                     "4.base": (True, "wrapped (DendriticConv)")}


def test_a_module_inside_a_wrapped_one_is_reported_as_such():
    class GainLinear(nn.Linear):  # a registered kind with a parameter-holding child of its own
        def __init__(self):
            super().__init__(3, 3)
            self.gain = nn.Linear(1, 1)

    apical.register_layer(GainLinear, apical.DendriticLinear)
    try:
        net = apical.perforate(nn.Sequential(GainLinear(), nn.Linear(3, 2)))
    finally:
        apical.unregister_layer(GainLinear)
    rows = {e.name: (e.wrapped, e.reason) for e in apical.coverage(net).entries}
    assert rows == {"0.base": (True, "wrapped (DendriticLinear)"), "0.base.gain": (False, "inside a wrapped module"),
                    "1.base": (True, "wrapped (DendriticLinear)")}


def test_the_table_keeps_the_blank_name_of_a_root_that_holds_parameters():
    rows = apical.coverage(nn.Linear(2, 2)).table().splitlines()
    assert rows[1].startswith("  " + " " * len("name")) and rows[1].split()[0] == "Linear"


def test_an_opaque_module_at_the_root_names_its_children_without_a_prefix():
    rows = {e.name: e.reason for e in apical.coverage(nn.MultiheadAttention(8, 2))}
    assert rows["out_proj"] == "inside MultiheadAttention, which reads its weights directly"
