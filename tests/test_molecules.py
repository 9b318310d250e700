"""Molecular graphs for the Tox21 graph task: featurisation, splits, batches, the task end to end."""

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
pytest.importorskip("rdkit")

import apical  # noqa: E402
from apical import molecules, tasks  # noqa: E402


def test_feature_widths_are_the_sum_of_torch_geometrics_category_counts():
    from torch_geometric.utils import smiles

    assert molecules.ATOM_FEATURES == sum(len(v) for v in smiles.x_map.values()) == 177
    assert molecules.BOND_FEATURES == sum(len(v) for v in smiles.e_map.values()) == 30


def test_acetic_acid_as_a_graph():
    g = molecules.featurize("CC(=O)O")  # C1-C2(=O3)-O4
    assert g.x.shape == (4, 177) and g.edge_attr.shape == (6, 30)
    assert torch.equal(g.x.sum(1), torch.full((4,), 9.0))  # one category per atom feature
    assert torch.equal(g.edge_attr.sum(1), torch.full((6,), 3.0))
    assert g.x[:, :119].argmax(1).tolist() == [6, 6, 8, 8]  # atomic numbers
    bonds = {tuple(sorted(e)) for e in g.edge_index.t().tolist()}
    assert bonds == {(0, 1), (1, 2), (1, 3)}
    from torch_geometric.utils import smiles

    bond_types = list(smiles.e_map["bond_type"])
    double = bond_types.index("DOUBLE")
    pairs = zip(g.edge_index.t().tolist(), g.edge_attr, strict=True)
    kinds = {tuple(sorted(e)): int(a[:22].argmax()) for e, a in pairs}
    assert kinds[(1, 2)] == double and kinds[(0, 1)] == bond_types.index("SINGLE")


def test_scaffold_split_keeps_each_scaffold_in_one_part():
    from rdkit.Chem.Scaffolds import MurckoScaffold

    _, _, smi = molecules.tox21_graphs(400)
    parts = molecules.scaffold_split(smi)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(smi)))
    scaffolds = [{MurckoScaffold.MurckoScaffoldSmiles(smiles=smi[i], includeChirality=False) for i in p} for p in parts]
    assert not (scaffolds[0] & scaffolds[1]) and not (scaffolds[0] & scaffolds[2]) and not (scaffolds[1] & scaffolds[2])
    assert len(parts[0]) <= 0.8 * len(smi) and len(parts[0]) + len(parts[1]) <= 0.9 * len(smi)
    assert all(np.array_equal(a, b) for a, b in zip(parts, molecules.scaffold_split(smi), strict=True))


def test_batches_are_attentivefp_arguments():
    graphs, labels, _ = molecules.tox21_graphs(5)
    ds = molecules.GraphDataset(graphs, labels)
    (x, edge_index, edge_attr, batch), y = molecules.collate_graphs([ds[i] for i in range(5)])
    assert x.shape == (sum(g.x.shape[0] for g in graphs), 177) and y.shape == (5, 12)
    assert batch.max().item() == 4 and edge_attr.shape[0] == edge_index.shape[1]


def test_the_graph_task_runs_end_to_end_on_64_molecules():
    task = tasks.get("tox21-gnn", molecules=64, max_epochs=3, max_dendrite_epochs=2)
    train, val, test = task.data(0)
    assert (len(train), len(val), len(test)) == (51, 7, 6)
    result = apical.trial(task, modes=("none", "pb"), seeds=1, out=None)
    assert {r["mode"] for r in result.records} == {"none", "none-matched", "pb"}
    assert all(0.0 <= r["test"] <= 1.0 for r in result.records)
    assert apical.coverage(task.model(1.0)).fraction < 1.0  # before perforation nothing is wrapped
    scaffold = tasks.get("tox21-gnn-scaffold", molecules=64)
    assert sum(len(p) for p in scaffold.data(0)) == 64
