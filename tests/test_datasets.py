"""Tests for apical.datasets: splits, determinism, caching, the multilabel loss and ROC-AUC."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apical import datasets as D

torch.set_num_threads(1)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty cache directory."""
    monkeypatch.setenv("APICAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _check_partition(split: D.Split, n_total: int) -> None:
    idx = split.info["indices"]
    tr, va, te = idx["train"], idx["val"], idx["test"]
    assert split.sizes() == (len(tr), len(va), len(te))
    assert len(tr) + len(va) + len(te) == n_total
    assert len(np.unique(np.concatenate([tr, va, te]))) == n_total  # disjoint and covering
    assert len(split.y_train) == len(tr) and len(split.y_val) == len(va) and len(split.y_test) == len(te)
    for x in (split.x_train, split.x_val, split.x_test):
        assert x.dtype == torch.float32
        assert tuple(x.shape[1:]) == split.input_shape()


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="known: .*digits.*tox21"):
        D.load("cifar10")


@pytest.mark.parametrize(
    ("name", "n", "n_features", "n_outputs"),
    [("digits", 1797, 64, 10), ("breast_cancer", 569, 30, 2), ("wine", 178, 13, 3)],
)
def test_sklearn_tables(name: str, n: int, n_features: int, n_outputs: int) -> None:
    s = D.load(name, seed=0)
    assert s.task == "classification" and s.n_outputs == n_outputs
    assert s.input_shape() == (n_features,)
    _check_partition(s, n)
    assert s.y_train.dtype == torch.int64
    assert set(s.y_test.tolist()) == set(range(n_outputs))  # stratified: every class in every part
    if name == "digits":
        assert s.x_train.min() >= 0 and s.x_train.max() <= 1
    else:  # standardised with training statistics
        assert torch.allclose(s.x_train.mean(0), torch.zeros(n_features), atol=1e-5)
        assert torch.allclose(s.x_train.std(0, unbiased=False), torch.ones(n_features), atol=1e-4)


def test_determinism_by_seed() -> None:
    a, b, c = D.load("wine", seed=3), D.load("wine", seed=3), D.load("wine", seed=4)
    for part in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.info["indices"]["test"], c.info["indices"]["test"])


def test_diabetes_regression() -> None:
    s = D.load("diabetes", seed=1)
    assert s.task == "regression" and s.n_outputs == 1
    assert s.y_train.shape == (len(s.x_train), 1) and s.y_train.dtype == torch.float32
    assert abs(float(s.y_train.mean())) < 1e-5
    _check_partition(s, 442)


def test_mnist1d(cache: Path) -> None:
    state = np.random.get_state()
    a = D.load("mnist1d", seed=0)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1])  # global RNG left alone
    assert a.sizes() == (3200, 800, 1000) and a.input_shape() == (40,)
    _check_partition(a, 5000)
    assert any(cache.glob("mnist1d_*.npz"))
    b = D.load("mnist1d", seed=1)  # from the cache
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)  # the same test set
    assert not torch.equal(a.y_val, b.y_val)
    pool_a = np.sort(np.concatenate([a.info["indices"]["train"], a.info["indices"]["val"]]))
    assert np.array_equal(pool_a, np.arange(4000))  # validation carved from the 4,000 training samples


def test_mnist5k(cache: Path) -> None:
    s = D.load("mnist5k", seed=0)
    assert s.input_shape() == (1, 28, 28) and s.sizes() == (3500, 500, 1000)
    assert 0 <= float(s.x_train.min()) and float(s.x_train.max()) <= 1
    _check_partition(s, 5000)
    assert torch.bincount(s.y_test, minlength=10).tolist() == [100] * 10
    f = D.load("mnist5k", seed=0, flat=True)
    assert f.input_shape() == (784,)
    assert torch.equal(f.x_train, s.x_train.reshape(-1, 784))


def test_tox21(cache: Path) -> None:
    s = D.load("tox21", seed=0)
    assert s.task == "multilabel" and s.n_outputs == 12 and s.input_shape() == (2048,)
    info = s.info
    assert info["n_rows"] == 8014 and info["n_unique_smiles"] == 7831
    n = 7831 - info["n_dropped"]
    assert 0 <= info["n_dropped"] < 20 and len(info["dropped_smiles"]) == info["n_dropped"]
    _check_partition(s, n)
    assert s.sizes() == (n - 2 * round(0.1 * n), round(0.1 * n), round(0.1 * n))
    smiles = info["smiles_train"] + info["smiles_val"] + info["smiles_test"]
    assert len(set(smiles)) == n  # merged by SMILES, no molecule in two parts
    y = torch.cat([s.y_train, s.y_val, s.y_test])
    known = ~torch.isnan(y)
    assert 0.1 < float((~known).float().mean()) < 0.3  # missing labels are NaN
    assert set(y[known].unique().tolist()) == {0.0, 1.0}
    assert bool(((s.x_train == 0) | (s.x_train == 1)).all())
    assert float(s.x_train.sum(1).min()) > 0
    assert len(list(cache.glob("tox21_*.npz"))) == 1
    again = D.load("tox21", seed=0)  # cached
    assert torch.equal(again.x_test, s.x_test) and torch.equal(
        again.y_test.nan_to_num(-1), s.y_test.nan_to_num(-1)
    )
    other = D.load("tox21", seed=1)
    assert set(other.info["smiles_test"]) != set(info["smiles_test"])


def test_tox21_merge_rule() -> None:
    header = "mol_id,smiles," + ",".join(D.TOX21_ASSAYS)
    blank = [""] * 12

    def row(i: int, smi: str, labels: list[str]) -> str:
        return f"T{i},{smi}," + ",".join(labels)

    rows = [
        row(0, "C", ["1", "0", "1", ""] + blank[4:]),
        row(1, "C", ["1", "1", "0", ""] + blank[4:]),
        row(2, "C", ["0", "1", "", ""] + blank[4:]),
        row(3, "CC", ["0"] + blank[1:]),
    ]
    raw = "\r\n".join([header, *rows]).encode() + b"\r\n"
    smiles, y, n_rows = D._tox21_merge(raw)
    assert smiles == ["C", "CC"] and n_rows == 4
    np.testing.assert_array_equal(y[0, :4], [1.0, 1.0, np.nan, np.nan])  # 2/3 -> 1, 2/3 -> 1, tie -> NaN
    assert y[1, 0] == 0 and np.isnan(y[1, 1:]).all()


def test_cache_atomic_and_corrupt(cache: Path) -> None:
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"a": np.arange(3)}

    assert D._cached("t.npz", build)["a"].tolist() == [0, 1, 2]
    assert D._cached("t.npz", build)["a"].tolist() == [0, 1, 2]
    assert len(calls) == 1
    assert [p.name for p in cache.iterdir()] == ["t.npz"]  # no temporary file left behind
    (cache / "t.npz").write_bytes(b"garbage")
    assert D._cached("t.npz", build)["a"].tolist() == [0, 1, 2]
    assert len(calls) == 2


def test_missing_optional_package(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install apical\[bench\]"):
        D.load("mnist1d")


def test_masked_bce_loss() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]], requires_grad=True)
    y = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 1.0]])

    def bce(z: float, t: float) -> float:
        p = 1 / (1 + np.exp(-z))
        return -(t * np.log(p) + (1 - t) * np.log(1 - p))

    expected = (bce(0.5, 1) + bce(2.0, 0) + bce(0.0, 1) + bce(-0.3, 1)) / 4
    loss = D.masked_bce_loss(logits, y)
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0
    empty = D.masked_bce_loss(logits, torch.full_like(y, float("nan")))
    assert empty.item() == 0 and empty.requires_grad


def test_roc_auc_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    n, k = 300, 5
    y = (rng.random((n, k)) < 0.3).astype(np.float32)
    scores = rng.normal(size=(n, k)) + y
    scores[:, 1] = np.round(scores[:, 1])  # many ties
    y[rng.random((n, k)) < 0.2] = np.nan
    expected = []
    for j in range(k):
        m = ~np.isnan(y[:, j])
        expected.append(metrics.roc_auc_score(y[m, j], scores[m, j]))
    per = D.roc_auc_per_task(torch.from_numpy(scores), torch.from_numpy(y))
    np.testing.assert_allclose(per, expected, rtol=0, atol=1e-12)
    assert abs(D.roc_auc_mean(scores, y) - float(np.mean(expected))) < 1e-12
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)  # one class only: left out of the mean
    per = D.roc_auc_per_task(scores, y)
    assert np.isnan(per[2])
    assert abs(D.roc_auc_mean(scores, y) - float(np.mean(np.delete(expected, 2)))) < 1e-12
