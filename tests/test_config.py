import pytest
from torch import nn

from apical import DendriteConfig


def test_defaults_are_valid_and_round_trip():
    cfg = DendriteConfig()
    assert cfg.mode == "pb" and cfg.candidates >= 1
    again = DendriteConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_types_in_include_round_trip():
    cfg = DendriteConfig(include=[nn.Linear, "fc.*"], exclude=["head"])
    again = DendriteConfig.from_dict(cfg.to_dict())
    assert again.include == (nn.Linear, "fc.*") and again.exclude == ("head",)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "magic"}, "mode"),
        ({"activation": "gelu"}, "activation"),
        ({"candidates": 0}, "candidates"),
        ({"candidates": 1.5}, "candidates"),
        ({"max_dendrites": -1}, "max_dendrites"),
        ({"patience": True}, "patience"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_scale": float("nan")}, "init_scale"),
        ({"output_init": -1.0}, "output_init"),
        ({"improvement_threshold": -0.1}, "improvement_threshold"),
        ({"improvement_threshold": []}, "improvement_threshold"),
        ({"normaliser": "l2"}, "normaliser"),
        ({"include": "fc1"}, "include"),
        ({"include": ["(unclosed"]}, "include"),
        ({"exclude": [3]}, "exclude"),
        ({"min_dendrite_epochs": 5, "max_dendrite_epochs": 2}, "min_dendrite_epochs"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DendriteConfig(**kwargs)


def test_threshold_list_indexed_by_dendrites():
    cfg = DendriteConfig(improvement_threshold=[1e-2, 1e-3])
    assert [cfg.threshold_for(d) for d in range(4)] == [1e-2, 1e-3, 1e-3, 1e-3]
    assert DendriteConfig(improvement_threshold=0.5).threshold_for(7) == 0.5


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown"):
        DendriteConfig.from_dict({"mode": "pb", "colour": "red"})


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
