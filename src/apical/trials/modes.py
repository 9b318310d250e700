"""What each mode of a trial (and of ``apical bench``) means, as a DendriteConfig."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from apical.dendrites import DendriteConfig

BASELINES = ("none", "none-long")
"""Plain training: early stopping with patience P, and with 4P (a baseline that may train as long as it improves)."""
MATCHED = "none-matched"
"""Plain training (none-long's patience) at the width whose parameter count is closest to pb's (or gd's)."""
DENDRITIC = ("gd", "pb")
MODES = (*BASELINES, MATCHED, *DENDRITIC)
DEFAULT_MODES = ("none", "none-long", "gd", "pb")


def mode_config(mode: str, patience: int, seed: int, exclude: Sequence[str] = (),
                overrides: Mapping[str, Any] | None = None) -> DendriteConfig:
    """The DendriteConfig of each mode; the one place that says what the modes mean.

    ``none``: plain early stopping with patience P. ``none-long`` and ``none-matched``: the same with
    4P. ``gd`` / ``pb``: DendriteConfig defaults except patience P, ``exclude`` (module names that
    get no dendrites) and any other DendriteConfig ``overrides`` (``patience`` there changes gd/pb's
    neuron-phase patience only). ``perforatedai`` (the reference package, ``apical bench`` only)
    mirrors the ``gd`` settings.
    """
    if mode == "none":
        return DendriteConfig(mode="none", patience=patience, seed=seed)
    if mode in ("none-long", MATCHED):
        return DendriteConfig(mode="none", patience=4 * patience, seed=seed)
    if mode in ("gd", "perforatedai", "pb"):
        kind = "pb" if mode == "pb" else "gd"
        return DendriteConfig(**{"mode": kind, "patience": patience, "seed": seed, "exclude": tuple(exclude),
                                 **dict(overrides or {})})
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join((*MODES, 'perforatedai'))}")


def with_matched(modes: Sequence[str]) -> list[str]:
    """``modes`` in order, with ``none-matched`` added after the plain ones whenever gd or pb is there."""
    out = list(dict.fromkeys(modes))
    if MATCHED not in out and any(m in DENDRITIC for m in out):
        plain = [m for m in out if m in BASELINES]
        at = out.index(plain[-1]) + 1 if plain else 0
        out.insert(at, MATCHED)
    return out
