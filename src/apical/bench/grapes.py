"""GRAPES benchmark (``apical bench grapes``): does error modulation speed up training, and is the gain
more than a larger step?

On each data set a small ReLU MLP is trained for a fixed number of epochs (no early stopping; the test
accuracy is that of the final weights) in seven arms, every arm with the same initial weights, split and
batch order for a given seed (so arms are paired by seed):

- ``sgd``: plain SGD (no momentum, no weight decay);
- ``sgd_grapes``: the same with GRAPES, ``mode="propagate"``, ``clip=(1, 2)``, output layer excluded;
- ``sgd_lr_matched``: plain SGD whose learning rate (every layer) is multiplied by the mean GRAPES factor
  ``F`` of the same seed's ``sgd_grapes`` run: the mean over training steps of the mean over hidden layers
  of the mean over neurons of ``handle.factors()``, read after every backward;
- ``sgd_gain_matched``: plain SGD with a per-layer learning rate, each hidden layer's multiplied by the
  gradient-norm gain GRAPES gave that layer's weight in the ``sgd_grapes`` run (the ratio of weight-gradient
  norms with and without modulation on a fixed probe batch, measured after every epoch and averaged; in
  propagate mode factors compound towards the input, so the first layer's gain exceeds ``F``);
- ``adam``, ``adam_grapes`` (propagate) and ``adam_grapes_local`` (``mode="local"``, expected to be close
  to a no-op under Adam).

Reported per data set: validation accuracy after every epoch, epochs to reach a target validation
accuracy (95% of the best final mean validation accuracy over the arms), final test accuracy, mean and
standard deviation over seeds, and paired differences with 95% t confidence intervals.

Writes ``grapes.md``, ``grapes.json`` (every run, with its curves) and ``grapes.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apical import datasets
from apical.bench import grapes_claims
from apical.bench.common import DEFAULT_OUT, header, machine, markdown_table, mean_std, paired_ci, write_json
from apical.bench.common import eval_accuracy as _accuracy
from apical.grapes import grapes
from apical.models import MLP

NAME = "grapes"
CLIP = (1.0, 2.0)
TARGET_FRACTION = 0.95
PROBE_SIZE = 256

ARMS: dict[str, str] = {
    "sgd": "SGD",
    "sgd_grapes": "SGD + GRAPES",
    "sgd_lr_matched": "SGD, lr x mean F",
    "sgd_gain_matched": "SGD, per-layer lr x gain",
    "adam": "Adam",
    "adam_grapes": "Adam + GRAPES",
    "adam_grapes_local": "Adam + GRAPES local",
}

#: paired comparisons (a - b) reported for every data set
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("sgd_grapes", "sgd"),
    ("sgd_grapes", "sgd_lr_matched"),
    ("sgd_grapes", "sgd_gain_matched"),
    ("sgd_lr_matched", "sgd"),
    ("adam_grapes", "adam"),
    ("adam_grapes_local", "adam"),
)


@dataclass(frozen=True)
class DataConfig:
    """Model and training budget of one data set."""

    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    sgd_lr: float
    adam_lr: float


#: learning rates are common defaults (plain SGD 0.1, Adam 1e-3), not tuned per arm: plain SGD at 0.1 is
#: stable with GRAPES' up to 4x compounded amplification on all three sets, while lr 1.0 diverges on digits
CONFIGS: dict[str, DataConfig] = {
    "digits": DataConfig(hidden=(64, 64), epochs=40, batch_size=32, sgd_lr=0.1, adam_lr=1e-3),
    "mnist1d": DataConfig(hidden=(100, 100), epochs=60, batch_size=64, sgd_lr=0.1, adam_lr=1e-3),
    "mnist5k": DataConfig(hidden=(256, 256), epochs=30, batch_size=64, sgd_lr=0.1, adam_lr=1e-3),
}

QUICK_EPOCHS = 2
QUICK_TRAIN = 256


# ---------------------------------------------------------------------------------------- training


def _grad_gain(model: nn.Module, handle: Any, layers: dict[str, nn.Linear], x: Tensor, y: Tensor) -> dict[str, float]:
    """Per layer, ||weight gradient with GRAPES|| / ||without|| on one batch at the current weights."""

    def norms() -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return {name: float(m.weight.grad.norm()) for name, m in layers.items()}

    with handle.pause():
        plain = norms()
    modulated = norms()
    model.zero_grad(set_to_none=True)
    return {n: modulated[n] / plain[n] if plain[n] > 0 else 1.0 for n in layers}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def run_one(
    split: datasets.Split,
    cfg: DataConfig,
    arm: str,
    seed: int,
    epochs: int,
    lr_multiplier: float = 1.0,
    layer_multipliers: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train one arm for ``epochs`` epochs; return its curves and scores (JSON-ready)."""
    n_in = int(torch.Size(split.input_shape()).numel())
    torch.manual_seed(seed)
    model = MLP(n_in, list(cfg.hidden), split.n_outputs)  # same initial weights in every arm of a seed
    hidden = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "out"}
    use_sgd = arm.startswith("sgd")
    base_lr = cfg.sgd_lr if use_sgd else cfg.adam_lr
    layer_multipliers = layer_multipliers or {}
    groups = []
    for name, m in model.named_children():
        params = list(m.parameters())
        if params:
            groups.append({"params": params, "lr": base_lr * lr_multiplier * layer_multipliers.get(name, 1.0)})
    opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=base_lr) if use_sgd else torch.optim.Adam(groups)

    handle = None
    if arm.endswith("grapes") or arm.endswith("grapes_local"):
        handle = grapes(model, mode="local" if arm.endswith("local") else "propagate", clip=CLIP)
        assert set(handle.layers) == set(hidden), handle.layers

    x, y = split.x_train, split.y_train
    n = len(x)
    probe_x, probe_y = x[:PROBE_SIZE], y[:PROBE_SIZE]
    gen = torch.Generator().manual_seed(seed + 1)  # same batch order in every arm of a seed
    val_curve = [_accuracy(model, split.x_val, split.y_val)]
    train_loss: list[float] = []
    layer_factor: dict[str, list[float]] = {name: [] for name in hidden}
    layer_gain: dict[str, list[float]] = {name: [] for name in hidden}
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        loss_sum, steps = 0.0, 0
        fsum = dict.fromkeys(hidden, 0.0)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            steps += 1
            if handle is not None:
                for name, f in handle.factors().items():  # the factors of this step's backward
                    fsum[name] += float(f.mean())
        train_loss.append(loss_sum / steps)
        val_curve.append(_accuracy(model, split.x_val, split.y_val))
        if handle is not None:
            for name in hidden:
                layer_factor[name].append(fsum[name] / steps)
            for name, g in _grad_gain(model, handle, hidden, probe_x, probe_y).items():
                layer_gain[name].append(g)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "optimizer": "SGD" if use_sgd else "Adam",
        "base_lr": base_lr,
        "lr_multiplier": lr_multiplier,
        "layer_lr_multipliers": {name: layer_multipliers.get(name, 1.0) for name in hidden},
        "val_curve": val_curve,
        "train_loss": train_loss,
        "final_val": val_curve[-1],
        "test_acc": _accuracy(model, split.x_test, split.y_test),
        "seconds": seconds,
    }
    if handle is not None:
        result["mode"] = handle.mode
        result["layer_factor_per_epoch"] = layer_factor
        # mean over hidden layers of the per-epoch mean factor; every epoch has the same number of steps,
        # so the mean of this list is the mean over all training steps
        result["factor_per_epoch"] = [_mean([layer_factor[n][e] for n in hidden]) for e in range(epochs)]
        result["mean_factor"] = _mean(result["factor_per_epoch"])
        result["layer_gain_per_epoch"] = layer_gain
        result["mean_layer_gain"] = {n: _mean(g) for n, g in layer_gain.items()}
        handle.remove()
    return result


def run_dataset(name: str, seeds: int, epochs: int | None, quick: bool, sgd_lr: float | None = None,
                adam_lr: float | None = None, log: Any = print) -> dict[str, Any]:
    """Every arm and seed on one data set; the controls take their multipliers from ``sgd_grapes``."""
    cfg = CONFIGS[name]
    if sgd_lr is not None:
        cfg = replace(cfg, sgd_lr=sgd_lr)
    if adam_lr is not None:
        cfg = replace(cfg, adam_lr=adam_lr)
    n_epochs = epochs if epochs is not None else (QUICK_EPOCHS if quick else cfg.epochs)
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        split = datasets.load(name, seed=seed)
        if quick:
            split.x_train, split.y_train = split.x_train[:QUICK_TRAIN], split.y_train[:QUICK_TRAIN]
        done: dict[str, dict[str, Any]] = {}
        for arm in ARMS:
            kwargs: dict[str, Any] = {}
            if arm == "sgd_lr_matched":
                kwargs["lr_multiplier"] = done["sgd_grapes"]["mean_factor"]
            elif arm == "sgd_gain_matched":
                kwargs["layer_multipliers"] = done["sgd_grapes"]["mean_layer_gain"]
            r = run_one(split, cfg, arm, seed, n_epochs, **kwargs)
            done[arm] = r
            runs.append(r)
            log(f"[grapes] {name} seed {seed} {arm:18s} val {r['final_val']:.4f} test {r['test_acc']:.4f} "
                f"({r['seconds']:.1f} s)")
    n_in = int(torch.Size(split.input_shape()).numel())
    model = f"MLP {n_in}-[{'-'.join(str(h) for h in cfg.hidden)}]-{split.n_outputs} (ReLU)"
    return {"config": asdict(cfg), "model": model, "epochs": n_epochs, "train_size": len(split.x_train),
            "sizes": list(split.sizes()), "runs": runs}


# ---------------------------------------------------------------------------------------- analysis


def _by_arm(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for r in runs:
        out[r["arm"]].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return out


def epochs_to(curve: Sequence[float], target: float) -> int | None:
    """First epoch (1-based; index 0 of the curve is before training) with accuracy >= target."""
    for e, acc in enumerate(curve[1:], start=1):
        if acc >= target:
            return e
    return None


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Target, per-arm statistics and paired comparisons of one data set (added to ``data``)."""
    by_arm = _by_arm(data["runs"])
    n_epochs = data["epochs"]
    final_means = {arm: mean_std([r["final_val"] for r in rs])[0] for arm, rs in by_arm.items()}
    target = TARGET_FRACTION * max(final_means.values())
    for r in data["runs"]:
        r["epochs_to_target"] = epochs_to(r["val_curve"], target)
        r["curve_mean"] = _mean(r["val_curve"][1:])

    def censored(r: dict[str, Any]) -> float:  # a run that never reaches the target counts as budget + 1
        e = r["epochs_to_target"]
        return float(n_epochs + 1 if e is None else e)

    arms: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        arms[arm] = {
            "lr": mean_std([r["base_lr"] * r["lr_multiplier"] for r in rs]),
            "test_acc": mean_std([r["test_acc"] for r in rs]),
            "final_val": mean_std([r["final_val"] for r in rs]),
            "curve_mean": mean_std([r["curve_mean"] for r in rs]),
            "epochs_to_target": mean_std([censored(r) for r in rs]),
            "not_reached": sum(r["epochs_to_target"] is None for r in rs),
            "seconds": mean_std([r["seconds"] for r in rs]),
        }
        if "mean_factor" in rs[0]:
            arms[arm]["mean_factor"] = mean_std([r["mean_factor"] for r in rs])
            arms[arm]["mean_layer_gain"] = {
                n: mean_std([r["mean_layer_gain"][n] for r in rs]) for n in rs[0]["mean_layer_gain"]
            }
    comparisons = []
    for a, b in COMPARISONS:
        ra, rb = by_arm[a], by_arm[b]
        comparisons.append({
            "a": a,
            "b": b,
            "test_acc": paired_ci([r["test_acc"] for r in ra], [r["test_acc"] for r in rb]),
            "curve_mean": paired_ci([r["curve_mean"] for r in ra], [r["curve_mean"] for r in rb]),
            "epochs_to_target": paired_ci([censored(r) for r in ra], [censored(r) for r in rb]),
        })
    data["summary"] = {"target": target, "final_val_means": final_means, "arms": arms, "comparisons": comparisons}
    return data["summary"]


# ---------------------------------------------------------------------------------------- report


def _pct(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


def _ci(c: tuple[float, float, float], scale: float = 100.0, digits: int = 2) -> str:
    m, lo, hi = (scale * v for v in c)
    if math.isnan(lo):
        return f"{m:+.{digits}f} (n/a)"
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _verdict(c: tuple[float, float, float], higher_is_better: bool = True) -> int:
    """+1 when the CI lies above zero in the good direction, -1 when in the bad one, 0 otherwise."""
    _, lo, hi = c
    if math.isnan(lo):
        return 0
    if lo > 0:
        return 1 if higher_is_better else -1
    if hi < 0:
        return -1 if higher_is_better else 1
    return 0


def _dataset_section(name: str, data: dict[str, Any]) -> str:
    s, cfg = data["summary"], data["config"]
    n_seeds = len(_by_arm(data["runs"])["sgd"])
    lines = [
        f"## {name}\n",
        f"{data['model']}, {data['epochs']} epochs, batch {cfg['batch_size']}, "
        f"{data['sizes'][0]} train / {data['sizes'][1]} val / {data['sizes'][2]} test, {n_seeds} seeds. "
        f"SGD lr {cfg['sgd_lr']} (no momentum), Adam lr {cfg['adam_lr']}. "
        f"Target validation accuracy: {100 * s['target']:.2f}% "
        f"(= {TARGET_FRACTION} x the best final mean, {100 * max(s['final_val_means'].values()):.2f}%).\n",
    ]
    rows = []
    for arm, a in s["arms"].items():
        ett = f"{a['epochs_to_target'][0]:.1f} ± {a['epochs_to_target'][1]:.1f}"
        if a["not_reached"]:
            ett += f" ({a['not_reached']} not reached)"
        lr = f"{a['lr'][0]:.4g}" + (f" ± {a['lr'][1]:.2g}" if a["lr"][1] > 0 else "")
        if arm == "sgd_gain_matched":
            lr = "per layer (below)"
        rows.append([ARMS[arm], lr, _pct(a["test_acc"]), _pct(a["final_val"]), _pct(a["curve_mean"]), ett,
                     f"{a['seconds'][0]:.1f}"])
    lines.append(markdown_table(
        ["arm", "lr", "test acc %", "final val acc %", "mean val acc over epochs %", "epochs to target", "s/run"],
        rows))
    rows = [
        [f"{ARMS[c['a']]} − {ARMS[c['b']]}", _ci(c["test_acc"]), _ci(c["curve_mean"]),
         _ci(c["epochs_to_target"], scale=1.0, digits=1)]
        for c in s["comparisons"]
    ]
    lines.append("\nPaired differences (mean [95% CI] over seeds):\n")
    lines.append(markdown_table(
        ["comparison", "Δ test acc (pp)", "Δ mean val acc over epochs (pp)", "Δ epochs to target"], rows))
    g = s["arms"]["sgd_grapes"]
    gains = ", ".join(f"{n} {v[0]:.3f}" for n, v in g["mean_layer_gain"].items())
    ga = s["arms"]["adam_grapes"]
    lines.append(
        f"\nGRAPES factors in the SGD run: mean F over hidden layers and steps {g['mean_factor'][0]:.3f} "
        f"± {g['mean_factor'][1]:.3f} (over seeds); weight-gradient norm gain per layer (input first): {gains}. "
        f"Under Adam (propagate): mean F {ga['mean_factor'][0]:.3f}.\n"
    )
    return "\n".join(lines)


def _phrase(c: dict[str, Any], key: str) -> str:
    v = _verdict(c[key], higher_is_better=key != "epochs_to_target")
    unit = "epochs" if key == "epochs_to_target" else "pp"
    scale = 1.0 if key == "epochs_to_target" else 100.0
    m, lo, hi = (scale * x for x in c[key])
    num = f"{m:+.1f} {unit}" if math.isnan(lo) else f"{m:+.2f} {unit}, 95% CI [{lo:+.2f}, {hi:+.2f}]"
    what = {1: "better", -1: "worse", 0: "no detectable difference"}[v]
    return f"{what} ({num})"


def what_this_shows(results: dict[str, Any]) -> str:
    """A paragraph per data set and an overall one, generated from the paired comparisons."""
    out = ["## What this shows\n",
           "Verdicts come from the paired 95% CIs: 'better'/'worse' when the interval excludes zero, "
           "otherwise 'no detectable difference'. Convergence speed is read from the epochs to the target "
           "and from the mean validation accuracy over all epochs (area under the curve).\n"]
    names = list(results["datasets"])
    verdicts: dict[tuple[str, str, str], dict[str, int]] = {}  # (a, b, key) -> {data set: verdict}
    for name in names:
        s = results["datasets"][name]["summary"]
        comp = {(c["a"], c["b"]): c for c in s["comparisons"]}
        for (a, b), c in comp.items():
            for key in ("epochs_to_target", "curve_mean", "test_acc"):
                v = _verdict(c[key], higher_is_better=key != "epochs_to_target")
                verdicts.setdefault((a, b, key), {})[name] = v
        g = s["arms"]["sgd_grapes"]
        parts = []
        c = comp[("sgd_grapes", "sgd")]
        parts.append(f"GRAPES under SGD vs plain SGD: epochs to target {_phrase(c, 'epochs_to_target')}, "
                     f"mean validation accuracy over epochs {_phrase(c, 'curve_mean')}, "
                     f"final test accuracy {_phrase(c, 'test_acc')}.")
        c = comp[("sgd_grapes", "sgd_lr_matched")]
        parts.append(f"Against plain SGD with the learning rate x {g['mean_factor'][0]:.3f} (the mean factor): "
                     f"epochs to target {_phrase(c, 'epochs_to_target')}, mean validation accuracy "
                     f"{_phrase(c, 'curve_mean')}, test accuracy {_phrase(c, 'test_acc')}.")
        c = comp[("sgd_grapes", "sgd_gain_matched")]
        parts.append(f"Against per-layer learning rates matched to the measured gradient gain: epochs to target "
                     f"{_phrase(c, 'epochs_to_target')}, mean validation accuracy {_phrase(c, 'curve_mean')}, "
                     f"test accuracy {_phrase(c, 'test_acc')}.")
        c = comp[("adam_grapes", "adam")]
        parts.append(f"Under Adam, GRAPES (propagate) vs Adam: mean validation accuracy {_phrase(c, 'curve_mean')}, "
                     f"test accuracy {_phrase(c, 'test_acc')}.")
        c = comp[("adam_grapes_local", "adam")]
        parts.append(f"Local GRAPES under Adam vs Adam: mean validation accuracy {_phrase(c, 'curve_mean')}, "
                     f"test accuracy {_phrase(c, 'test_acc')}.")
        out.append(f"**{name}.** " + " ".join(parts) + "\n")

    k = len(names)

    def tally(a: str, b: str, key: str) -> str:
        v = verdicts[(a, b, key)]
        better, worse = sum(x > 0 for x in v.values()), sum(x < 0 for x in v.values())
        return f"better on {better}, worse on {worse}, no detectable difference on {k - better - worse} of {k}"

    def sets(a: str, b: str, key: str, sign: int) -> list[str]:
        return [n for n, x in verdicts[(a, b, key)].items() if x == sign]

    lines = [
        f"**Overall ({k} data set(s)).** Mean validation accuracy over epochs, GRAPES+SGD vs plain SGD: "
        f"{tally('sgd_grapes', 'sgd', 'curve_mean')}; vs the mean-factor lr-matched control: "
        f"{tally('sgd_grapes', 'sgd_lr_matched', 'curve_mean')}; vs the gain-matched control: "
        f"{tally('sgd_grapes', 'sgd_gain_matched', 'curve_mean')}. The lr-matched control alone vs plain SGD: "
        f"{tally('sgd_lr_matched', 'sgd', 'curve_mean')}. Final test accuracy, GRAPES+SGD vs plain SGD: "
        f"{tally('sgd_grapes', 'sgd', 'test_acc')}; vs the lr-matched control: "
        f"{tally('sgd_grapes', 'sgd_lr_matched', 'test_acc')}. Under Adam, GRAPES (propagate) test accuracy: "
        f"{tally('adam_grapes', 'adam', 'test_acc')}; local GRAPES: {tally('adam_grapes_local', 'adam', 'test_acc')}."
    ]
    faster = sets("sgd_grapes", "sgd", "curve_mean", 1)
    if faster:
        beyond_lr = [n for n in faster if verdicts[("sgd_grapes", "sgd_lr_matched", "curve_mean")][n] > 0]
        beyond_gain = [n for n in faster if verdicts[("sgd_grapes", "sgd_gain_matched", "curve_mean")][n] > 0]
        lines.append(
            f"Of the data set(s) where GRAPES+SGD converged faster than plain SGD ({', '.join(faster)}), it also "
            f"beat the mean-factor control on {len(beyond_lr)} ({', '.join(beyond_lr) or 'none'}) and the "
            f"gain-matched control on {len(beyond_gain)} ({', '.join(beyond_gain) or 'none'}); where a control "
            "closes the gap, the speed-up is accounted for by the larger step size, not by GRAPES' per-neuron "
            "reweighting."
        )
    else:
        lines.append("GRAPES+SGD did not converge detectably faster than plain SGD on any data set.")
    local = [results["datasets"][n]["summary"]["comparisons"] for n in names]
    local_c = [next(c for c in cs if (c["a"], c["b"]) == ("adam_grapes_local", "adam")) for cs in local]
    max_curve = max(abs(100 * c["curve_mean"][0]) for c in local_c)
    max_test = max(abs(100 * c["test_acc"][0]) for c in local_c)
    n_zero = sum(_verdict(c["curve_mean"]) == 0 and _verdict(c["test_acc"]) == 0 for c in local_c)
    lines.append(
        f"Local GRAPES under Adam moved the mean validation accuracy by at most {max_curve:.2f} pp and the test "
        f"accuracy by at most {max_test:.2f} pp (mean paired differences); both CIs include zero on {n_zero} of "
        f"{k} data set(s)"
        + (", consistent with Adam's normalisation cancelling a slowly varying per-row scale." if n_zero == k
           else "." )
    )
    lines.append("All of this is at one fixed learning rate per optimiser, the same for every arm; a different "
                 "choice (`--sgd-lr`, `--adam-lr`) can change the picture.")
    out.append(" ".join(lines) + "\n")
    return "\n".join(out)


def write_report(results: dict[str, Any], out: Path, argv: Sequence[str]) -> Path:
    md = [header("GRAPES: error modulation against plain and learning-rate-matched training", ["bench", NAME, *argv])]
    md.append(f"- total time: {results['seconds_total'] / 60:.1f} min\n")
    md.append(
        "Arms (same initial weights, split and batch order within a seed): "
        + "; ".join(f"**{label}**" for label in ARMS.values())
        + f". GRAPES: `mode=\"propagate\"` (local where marked), `clip={CLIP}`, output layer not modulated. "
        "The lr-matched control multiplies every layer's SGD learning rate by the mean factor F of the same "
        "seed's GRAPES-SGD run (mean over steps of the mean over hidden layers of `handle.factors()`); the "
        "gain-matched control multiplies each hidden layer's learning rate by the weight-gradient norm ratio "
        f"(GRAPES on / paused) measured on a fixed probe batch of {PROBE_SIZE} training samples after every "
        "epoch of that run, averaged. Fixed epoch budget, no early stopping; test accuracy of the final "
        "weights. Epochs to target: runs that never reach it count as budget + 1. Learning rates are common "
        "defaults, the same for every arm of an optimiser (not tuned per arm). s/run is wall time per run on "
        "a shared machine; for GRAPES arms it includes the measurements (reading the factors after every step, "
        "the probe-batch gradients after every epoch), so it is not GRAPES' own cost.\n"
    )
    for name, data in results["datasets"].items():
        md.append(_dataset_section(name, data))
    md.append(what_this_shows(results))
    path = out / f"{NAME}.md"
    old = path.read_text() if path.is_file() else ""
    if grapes_claims.BEGIN in old:  # the claims section (apical bench grapes --claims) stays
        md.append(old[old.index(grapes_claims.BEGIN):])
    path.write_text("\n".join(md))
    return path


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Validation accuracy vs epoch, mean ± std over seeds per arm, one panel per data set."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: grapes.png not written", stacklevel=2)
        return None
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    styles = {"sgd": "-", "sgd_grapes": "-", "sgd_lr_matched": "--", "sgd_gain_matched": ":",
              "adam": "-", "adam_grapes": "-", "adam_grapes_local": "--"}
    colors = {"sgd": "tab:blue", "sgd_grapes": "tab:red", "sgd_lr_matched": "tab:purple",
              "sgd_gain_matched": "tab:brown", "adam": "tab:green", "adam_grapes": "tab:orange",
              "adam_grapes_local": "tab:olive"}
    for ax, name in zip(axes[0], names, strict=True):
        data = results["datasets"][name]
        for arm, rs in _by_arm(data["runs"]).items():
            curves = torch.tensor([r["val_curve"] for r in rs], dtype=torch.float64)
            mean = curves.mean(0)
            std = curves.std(0) if len(rs) > 1 else torch.zeros_like(mean)
            xs = range(len(mean))
            ax.plot(xs, mean, styles[arm], color=colors[arm], label=ARMS[arm], lw=1.4)
            ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.12, lw=0)
        target = data["summary"]["target"]
        ax.axhline(target, color="grey", lw=0.8, ls="-.")
        ax.set_title(f"{name} (target {100 * target:.1f}%)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        best = max(data["summary"]["final_val_means"].values())
        ax.set_ylim(max(0.0, best - 0.25), min(1.0, best + 0.03))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apical bench grapes", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; 2 with --quick)")
    p.add_argument("--datasets", default=None,
                   help="comma-separated, from digits, mnist1d, mnist5k (default all; digits with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget for every data set (default per set)")
    p.add_argument("--sgd-lr", type=float, default=None, help="SGD learning rate for every data set (default 0.1)")
    p.add_argument("--adam-lr", type=float, default=None, help="Adam learning rate for every data set (default 1e-3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_EPOCHS} epochs on {QUICK_TRAIN} training samples")
    grapes_claims.add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if args.claims:
        claims = grapes_claims.CLAIMS if args.claims == "all" else tuple(args.claims.split(","))
        runs = grapes_claims.main(argv, claims, seeds, args.out, args.quick, args.report_only)
        return {"suite": grapes_claims.NAME, "runs": runs}
    names = (args.datasets or ("digits" if args.quick else ",".join(CONFIGS))).split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown data set(s) {unknown}; known: {', '.join(CONFIGS)}")
    if seeds < 1 or (args.epochs is not None and args.epochs < 1):
        raise SystemExit("--seeds and --epochs must be >= 1")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "suite": NAME,
        "argv": argv,
        "machine": machine(),
        "quick": args.quick,
        "clip": list(CLIP),
        "target_fraction": TARGET_FRACTION,
        "arms": ARMS,
        "datasets": {},
    }
    for name in names:
        results["datasets"][name] = run_dataset(name, seeds, args.epochs, args.quick, args.sgd_lr, args.adam_lr)
        summarise(results["datasets"][name])
    results["seconds_total"] = time.perf_counter() - start
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{NAME}.json", results)
    md = write_report(results, out, argv)
    png = plot(results, out / f"{NAME}.png")
    print(f"[grapes] wrote {md}, {out / (NAME + '.json')}" + (f", {png}" if png else ""))
    return results


if __name__ == "__main__":
    main()
