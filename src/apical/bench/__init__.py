"""Benchmark suites behind ``apical bench SUITE``. Each suite is a module with ``main(argv)``."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

SUITES = {
    "digits": "apical.bench.suites",
    "mnist1d": "apical.bench.suites",
    "mnist5k": "apical.bench.suites",
    "tox21": "apical.bench.suites",
    "grapes": "apical.bench.grapes",
    "speed": "apical.bench.speed",
    "ablate": "apical.bench.ablate",
}


def run_suite(name: str, argv: Sequence[str] = ()) -> None:
    """Run suite ``name`` with its own command-line options ``argv``."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known suites: {', '.join(sorted(SUITES))}")
    module = importlib.import_module(SUITES[name])
    module.main([name, *argv] if SUITES[name].endswith("suites") else list(argv))
