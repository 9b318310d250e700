"""Molecular graphs for the Tox21 graph task: RDKit featurisation (through torch_geometric's
``from_smiles``), one-hot atom and bond features, random and scaffold splits, graph batches.

Needs ``torch_geometric`` and ``rdkit`` (``pip install apical[bench,test]``); apical imports this
module only when a graph task is used.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ATOM_FEATURES", "BOND_FEATURES", "GraphDataset", "collate_graphs", "featurize", "random_split",
           "scaffold_split", "tox21_graphs"]


def _maps() -> tuple[dict, dict]:
    from torch_geometric.utils import smiles

    return smiles.x_map, smiles.e_map


def _sizes(mapping: dict) -> list[int]:
    return [len(v) for v in mapping.values()]


def _one_hot(codes: Tensor, sizes: Sequence[int]) -> Tensor:
    """``[N, K]`` category indices -> ``[N, sum(sizes)]`` concatenated one-hot blocks (float32)."""
    offsets = torch.tensor([0, *np.cumsum(sizes)[:-1]], dtype=torch.long)
    out = torch.zeros(codes.shape[0], int(sum(sizes)))
    if codes.numel():
        out.scatter_(1, codes.long() + offsets, 1.0)
    return out


ATOM_FEATURES = 177
"""Width of an atom's feature vector: one-hot atomic number (119), chirality (9), degree (11),
formal charge (12), hydrogens (9), radical electrons (5), hybridisation (8), aromatic (2), in a ring (2)."""
BOND_FEATURES = 30
"""Width of a bond's feature vector: one-hot bond type (22), stereo (6), conjugated (2)."""


def featurize(smiles: str):
    """A ``torch_geometric.data.Data`` graph of one molecule: one-hot ``x`` ``[atoms, 177]``, both
    directions of every bond in ``edge_index`` with one-hot ``edge_attr`` ``[2 * bonds, 30]``."""
    from torch_geometric.utils import from_smiles

    x_map, e_map = _maps()
    data = from_smiles(smiles)
    data.x = _one_hot(data.x, _sizes(x_map))
    data.edge_attr = _one_hot(data.edge_attr, _sizes(e_map)) if data.edge_attr.numel() else \
        torch.zeros(0, sum(_sizes(e_map)))
    return data


@functools.lru_cache(maxsize=2)
def tox21_graphs(limit: int | None = None) -> tuple[list, Tensor, list[str]]:
    """The molecules of the shipped Tox21 CSV (merged by SMILES, as ``apical.datasets`` does) that
    RDKit parses, the first ``limit`` of them if given: (graphs, labels ``[M, 12]`` with NaN for a
    missing label, SMILES)."""
    from apical.datasets import _tox21_bytes, _tox21_merge

    smiles, labels, _ = _tox21_merge(_tox21_bytes())
    graphs, keep = [], []
    for i, s in enumerate(smiles):
        if limit is not None and len(graphs) >= limit:
            break
        try:
            g = featurize(s)
        except (ValueError, RuntimeError, AttributeError):  # RDKit cannot parse it
            continue
        if g.x.shape[0] == 0:
            continue
        graphs.append(g)
        keep.append(i)
    return graphs, torch.from_numpy(labels[keep]), [smiles[i] for i in keep]


def random_split(n: int, seed: int, fractions: tuple[float, float] = (0.8, 0.1)) -> tuple[np.ndarray, ...]:
    """Shuffled indices cut into train / val / test (the rest) by ``fractions``."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    return order[:a], order[a:b], order[b:]


def scaffold_split(smiles: Sequence[str], fractions: tuple[float, float] = (0.8, 0.1)) -> tuple[np.ndarray, ...]:
    """Bemis-Murcko scaffold split (deterministic, as MoleculeNet's): molecules grouped by scaffold,
    groups sorted largest first (ties by first appearance), train filled first, then val, then test;
    no scaffold is in two splits."""
    from rdkit import RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    RDLogger.DisableLog("rdApp.*")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        try:
            key = MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False)
        except (ValueError, RuntimeError):
            key = s
        groups.setdefault(key, []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    n = len(smiles)
    train_cut, val_cut = fractions[0] * n, (fractions[0] + fractions[1]) * n
    train, val, test = [], [], []
    for g in ordered:
        if len(train) + len(g) <= train_cut:
            train += g
        elif len(train) + len(val) + len(g) <= val_cut:
            val += g
        else:
            test += g
    return np.array(train, dtype=int), np.array(val, dtype=int), np.array(test, dtype=int)


class GraphDataset(Dataset):
    """(graph, label row) pairs; batch them with :func:`collate_graphs`."""

    def __init__(self, graphs: Sequence, labels: Tensor) -> None:
        self.graphs, self.labels = list(graphs), labels

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int):
        return self.graphs[i], self.labels[i]


def collate_graphs(items: list) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """A list of (graph, label) pairs -> ((x, edge_index, edge_attr, batch), labels): the arguments
    of ``torch_geometric.nn.models.AttentiveFP.forward``, and ``[B, 12]`` targets."""
    from torch_geometric.data import Batch

    b = Batch.from_data_list([g for g, _ in items])
    return (b.x, b.edge_index, b.edge_attr, b.batch), torch.stack([y for _, y in items])
