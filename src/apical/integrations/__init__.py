"""Integrations with training frameworks. Each one imports its framework only when used:

* :class:`apical.integrations.lightning.DendriteCallback` (PyTorch Lightning,
  ``pip install apical[lightning]``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DendriteCallback"]


def __getattr__(name: str) -> Any:
    if name == "DendriteCallback":
        from apical.integrations.lightning import DendriteCallback

        return DendriteCallback
    raise AttributeError(f"module 'apical.integrations' has no attribute {name!r}")
