import re

import pytest
from torch import nn

from apical import DendriteConfig


def test_defaults_are_valid_and_round_trip():
    cfg = DendriteConfig()
    assert cfg.mode == "pb" and cfg.candidates >= 1
    again = DendriteConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_types_in_include_and_exclude_round_trip():
    cfg = DendriteConfig(include=[nn.Linear, "fc.*"], exclude=["head", nn.Conv2d])
    again = DendriteConfig.from_dict(cfg.to_dict())
    assert again.include == (nn.Linear, "fc.*") and again.exclude == ("head", nn.Conv2d)


C = "DendriteConfig."
INVALID = [
    ({"mode": "magic"}, C + "mode must be one of ('pb', 'gd', 'none'), got 'magic'"),
    ({"activation": "gelu"}, C + "activation must be one of ('sigmoid', 'tanh', 'relu'), got 'gelu'"),
    ({"normaliser": "l2"}, C + "normaliser must be one of ('error', 'pearson'), got 'l2'"),
    ({"centring": "none"}, C + "centring must be one of ('batch', 'epoch'), got 'none'"),
    ({"candidates": 0}, C + "candidates must be an integer >= 1, got 0"),
    ({"candidates": 1.5}, C + "candidates must be an integer >= 1, got 1.5"),
    ({"candidates": True}, C + "candidates must be an integer >= 1, got True"),
    ({"max_tries": 0}, C + "max_tries must be an integer >= 1, got 0"),
    ({"max_dendrite_epochs": 0}, C + "max_dendrite_epochs must be an integer >= 1, got 0"),
    ({"min_dendrite_epochs": 0}, C + "min_dendrite_epochs must be an integer >= 1, got 0"),
    ({"max_dendrites": -1}, C + "max_dendrites must be an integer >= 0, got -1"),
    ({"patience": True}, C + "patience must be an integer >= 0, got True"),
    ({"patience": -1}, C + "patience must be an integer >= 0, got -1"),
    ({"dendrite_patience": -1}, C + "dendrite_patience must be an integer >= 0, got -1"),
    ({"dendrite_rank": 0}, C + "dendrite_rank must be an integer >= 1, got 0"),
    ({"dendrite_rank": 2.0}, C + "dendrite_rank must be an integer >= 1, got 2.0"),
    ({"min_dendrite_epochs": 5, "max_dendrite_epochs": 2},
     C + "min_dendrite_epochs (5) exceeds max_dendrite_epochs (2)"),
    ({"freeze_base_after_install": 1}, C + "freeze_base_after_install must be True or False, got 1"),
    ({"init_scale": 0.0}, C + "init_scale must be a finite number > 0, got 0.0"),
    ({"init_scale": float("nan")}, C + "init_scale must be a finite number > 0, got nan"),
    ({"init_scale": float("inf")}, C + "init_scale must be a finite number > 0, got inf"),
    ({"init_scale": True}, C + "init_scale must be a finite number > 0, got True"),
    ({"candidate_lr_scale": -1.0}, C + "candidate_lr_scale must be a finite number > 0, got -1.0"),
    ({"candidate_lr_scale": "10"}, C + "candidate_lr_scale must be a finite number > 0, got '10'"),
    ({"output_init": -1.0}, C + "output_init must be a finite number >= 0, got -1.0"),
    ({"improvement_threshold_raw": float("inf")},
     C + "improvement_threshold_raw must be a finite number >= 0, got inf"),
    ({"dendrite_improvement": -0.01}, C + "dendrite_improvement must be a finite number >= 0, got -0.01"),
    ({"improvement_threshold": -0.1}, C + "improvement_threshold must be a non-negative number or a non-empty sequence "
                                          "of them, got -0.1"),
    ({"improvement_threshold": []}, C + "improvement_threshold must be a non-negative number or a non-empty sequence "
                                        "of them, got []"),
    ({"improvement_threshold": [0.1, True]}, C + "improvement_threshold must be a non-negative number or a non-empty "
                                                 "sequence of them, got [0.1, True]"),
    ({"improvement_threshold": [0.1, float("nan")]}, C + "improvement_threshold must be a non-negative number or a "
                                                         "non-empty sequence of them, got [0.1, nan]"),
    ({"improvement_threshold": ["0.1"]}, C + "improvement_threshold must be a non-negative number or a non-empty "
                                             "sequence of them, got ['0.1']"),
    ({"include": "fc1"}, C + "include must be a sequence, e.g. include=['fc1'] or [nn.Linear]"),
    ({"include": nn.Linear}, C + "include must be a sequence, e.g. include=['fc1'] or [nn.Linear]"),
    ({"include": []}, C + "include is empty: pass None to wrap the default types"),
    ({"include": ["(unclosed"]}, C + "include: '(unclosed' is not a valid regex (missing ), unterminated "
                                     "subpattern at position 0)"),
    ({"include": [int]}, C + "include entries must be nn.Module types or strings, got <class 'int'>"),
    ({"exclude": "head"}, C + "exclude must be a sequence, e.g. exclude=['head']"),
    ({"exclude": [3]}, C + "exclude entries must be nn.Module types or strings, got 3"),
    ({"exclude": ["a[b"]}, C + "exclude: 'a[b' is not a valid regex (unterminated character set at position 1)"),
]


@pytest.mark.parametrize("kwargs, message", INVALID, ids=[f"{i}-{next(iter(k))}" for i, (k, _) in enumerate(INVALID)])
def test_invalid_values_are_refused_by_name_and_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DendriteConfig(**kwargs)


def test_every_bound_itself_is_accepted():
    cfg = DendriteConfig(candidates=1, max_tries=1, max_dendrite_epochs=1, min_dendrite_epochs=1, max_dendrites=0,
                         patience=0, dendrite_patience=0, dendrite_rank=1, output_init=0.0, improvement_threshold=0,
                         improvement_threshold_raw=0.0, dendrite_improvement=0.0, init_scale=1e-9,
                         candidate_lr_scale=1e-9, freeze_base_after_install=True, mode="none", activation="relu",
                         normaliser="pearson", centring="epoch", include=[nn.Linear, "fc.*"], exclude=[nn.Conv2d])
    assert (cfg.candidates, cfg.dendrite_rank, cfg.min_dendrite_epochs) == (1, 1, 1)
    # a sequence of thresholds becomes a tuple of floats; include and exclude become tuples
    cfg = DendriteConfig(improvement_threshold=[1, 0.5, 0], include=["a"], exclude=["b"])
    assert cfg.improvement_threshold == (1.0, 0.5, 0.0) and all(type(v) is float for v in cfg.improvement_threshold)
    assert (cfg.include, cfg.exclude) == (("a",), ("b",))
    assert DendriteConfig(improvement_threshold=0.5).improvement_threshold == 0.5  # a number stays a number


def test_threshold_list_indexed_by_dendrites():
    cfg = DendriteConfig(improvement_threshold=[1e-2, 1e-3])
    assert [cfg.threshold_for(d) for d in range(4)] == [1e-2, 1e-3, 1e-3, 1e-3]
    assert DendriteConfig(improvement_threshold=0.5).threshold_for(7) == 0.5


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"^DendriteConfig: unknown field\(s\) \['colour', 'size'\]$"):
        DendriteConfig.from_dict({"mode": "pb", "size": 3, "colour": "red"})


def test_every_field_is_documented_and_the_reference_is_current():
    import dataclasses
    from pathlib import Path

    from apical.dendrites.config import config_reference, field_docs
    assert set(field_docs()) == {f.name for f in dataclasses.fields(DendriteConfig)}
    page = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert page.read_text() == config_reference(), "regenerate: python -m apical.dendrites.config > docs/config.md"


@pytest.mark.parametrize("spec, message", [
    ("type:collections.OrderedDict", r"^DendriteConfig: cannot restore module type 'collections.OrderedDict'; "
                                     r"only torch.nn types$"),
    ("type:torch.nn.NoSuchLayer", r"^DendriteConfig: unknown module type 'torch.nn.NoSuchLayer'$"),
    ("type:torch.nn.functional", r"^DendriteConfig: unknown module type 'torch.nn.functional'$"),  # not a class
    ("type:torch.nn.Parameter", r"^DendriteConfig: unknown module type 'torch.nn.Parameter'$"),  # not a Module
])
def test_from_dict_refuses_types_it_cannot_restore(spec, message):
    """A saved include entry names a type; only torch.nn module classes come back, anything else is refused."""
    with pytest.raises(ValueError, match=message):
        DendriteConfig.from_dict({"include": [spec]})
    assert DendriteConfig.from_dict({"include": ["type:torch.nn.Conv2d"]}).include == (nn.Conv2d,)
