"""The integrations import their framework lazily, and say how to install it when it is missing."""

import importlib
import sys

import pytest

import apical.integrations


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "apical.integrations.lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "apical.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install apical\[lightning\]"):
        importlib.import_module("apical.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install apical\[lightning\]"):
        apical.integrations.DendriteCallback  # noqa: B018 - the lazy attribute imports it


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        apical.integrations.Nope  # noqa: B018
