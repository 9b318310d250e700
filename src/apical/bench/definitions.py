"""The benchmark suites' definitions: data set, models and defaults of each ``apical bench SUITE``.

Each model of a suite is a built-in task of :mod:`apical.tasks` (``ModelSpec.task``) trained with the
suite's settings; this module only says which, at which width and with which budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from apical import datasets, models


@dataclass(frozen=True)
class ModelSpec:
    """One model of a suite and how it is trained."""

    name: str
    """Label in the report ("mlp", "cnn")."""
    kind: str
    """Name for :func:`apical.models.build`."""
    task: str
    """The built-in task (:data:`apical.tasks.TASKS`) that trains this model."""
    default_width: float
    """Width multiplier of the mode comparison."""
    lr: float
    batch_size: int
    patience: int
    """P: neuron-phase patience of none/gd/pb (none-long uses 4P)."""
    max_epochs: int
    """Cap on epochs per run (every mode), to bound the cost."""
    sweep: bool = False
    """Part of the compression sweep."""
    pb_widths: tuple[float, ...] = (0.125, 0.25, 0.5)
    """Widths at which the sweep trains pb (``--pb-widths`` overrides)."""
    quick_lr: float | None = None
    """Learning rate of ``--quick`` runs (default 5 x ``lr``)."""


@dataclass(frozen=True)
class Suite:
    """A data set, its models and the suite's defaults."""

    name: str
    dataset: str
    models: tuple[ModelSpec, ...]
    load_kwargs: tuple[tuple[str, Any], ...] = ()
    fixed_split: bool = False
    """One split for every seed (seed 0); otherwise the split follows the seed."""
    sweep_default: bool = False
    estimate_minutes: float = 0.0
    """Estimated cost of the default run on the reference machine, 1 thread (from timed short runs)."""
    notes: str = ""
    """What was reduced to fit the CPU budget."""


SUITES: dict[str, Suite] = {
    "digits": Suite(
        name="digits",
        dataset="digits",
        models=(ModelSpec("mlp", "mlp", "digits", 0.25, 1e-3, 64, 10, 1000, sweep=True),),
        estimate_minutes=2,
        notes="MLP 64-32-10 at width 1; the modes are compared at width 1/4 (8 hidden units). "
        "Sweep off by default (--sweep: about 2 more minutes).",
    ),
    "mnist1d": Suite(
        name="mnist1d",
        dataset="mnist1d",
        models=(
            ModelSpec("mlp", "mlp", "mnist1d-mlp", 0.25, 1e-3, 64, 10, 1000, sweep=True, pb_widths=(0.125, 0.25)),
            ModelSpec("cnn", "cnn1d", "mnist1d-cnn", 0.25, 2e-3, 128, 10, 600, sweep=True, pb_widths=(0.125, 0.25)),
        ),
        sweep_default=True,
        estimate_minutes=26,
        notes="MLP 40-64-64-10 and Conv1dNet (32, 32) at width 1; modes compared at width 1/4. "
        "Reduced for CPU time: the sweep trains pb at widths 1/8 and 1/4 only (at 1/2 a plain network has "
        "over a third of the width-1 parameters, so with one dendrite set it is over half: it cannot "
        "meet the compression criterion; --pb-widths adds it); the CNN trains with batch 128, lr 2e-3, at "
        "most 600 epochs.",
    ),
    "mnist5k": Suite(
        name="mnist5k",
        dataset="mnist5k",
        load_kwargs=(("flat", False),),
        models=(ModelSpec("cnn", "mnist_cnn", "mnist5k", 0.125, 1e-3, 64, 5, 100, sweep=True, pb_widths=(0.125,),
                          quick_lr=1e-3),),
        sweep_default=True,
        estimate_minutes=45,
        notes="PyTorch-examples MNIST CNN (1.2M parameters at width 1) on 3,500 training images. Reduced "
        "for CPU time: patience P = 5 (reference 10), at most 100 epochs per run, modes compared at width "
        "1/8, and the sweep trains pb at width 1/8 only (pb at 1/8 costs ~4 min a seed on this machine; "
        "--pb-widths 0.125,0.25 adds width 1/4, ~1.5x that, per seed). Over the 30-minute budget when the "
        "machine is busy (about 25 min on a free core): --seeds 3 or --max-epochs 60 (which cuts pb) if needed.",
    ),
    "tox21": Suite(
        name="tox21",
        dataset="tox21",
        fixed_split=True,
        models=(ModelSpec("mlp", "mlp", "tox21", 0.25, 1e-3, 128, 10, 300, sweep=True, pb_widths=(0.125, 0.25)),),
        sweep_default=True,
        estimate_minutes=25,
        notes="Multi-task MLP 2048-[512, 128]-12 on ECFP4 bits at width 1, masked BCE, score = mean "
        "ROC-AUC over the 12 assays; one fixed random 80/10/10 split (seed 0) for every seed. Reduced for "
        "CPU time: modes compared at width 1/4 (2048-128-32-12); the sweep trains pb at widths 1/8 and "
        "1/4 (at 1/2 the plain MLP already has 49% of the width-1 parameters; --pb-widths adds it).",
    ),
}



def load_split(suite: Suite, seed: int, quick: bool = False) -> datasets.Split:
    """The split of ``suite`` for ``seed`` (seed 0 for a fixed split); ``quick`` keeps 1,000 random training
    rows (the loaders' rows may be ordered by class)."""
    split_seed = 0 if suite.fixed_split else seed
    split = datasets.load(suite.dataset, seed=split_seed, **dict(suite.load_kwargs))
    if quick and len(split.x_train) > 1000:
        keep = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(split_seed))[:1000]
        keep = keep.sort().values
        split = dataclasses.replace(split, x_train=split.x_train[keep], y_train=split.y_train[keep])
    return split


def build_model(spec: ModelSpec, split: datasets.Split, width: float) -> nn.Module:
    """A fresh model of ``spec`` at ``width`` for ``split``."""
    return models.build(spec.kind, split, width)


def describe(model: nn.Module) -> str:
    """Short architecture description of a suite model."""
    if isinstance(model, models.MLP):
        return "MLP " + "-".join(str(n) for n in (model.in_features, *model.hidden, model.out_features))
    if isinstance(model, models.Conv1dNet):
        return f"Conv1dNet channels {list(model.channels)}"
    if isinstance(model, models.MnistCNN):
        return f"MnistCNN width {model.width:g} ({sum(p.numel() for p in model.parameters()):,} parameters)"
    return type(model).__name__


