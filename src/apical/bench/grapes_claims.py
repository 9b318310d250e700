"""GRAPES' further claims (``apical bench grapes --claims ...``): depth, feedback alignment, recurrent and
spiking networks, forgetting.

Every setting trains on sklearn digits (1,079 train / 359 val / 359 test, split by seed) with plain SGD
(no momentum, no weight decay) for a fixed number of epochs, in these arms:

- ``plain``: the learning rule without GRAPES (backprop, or FA / DFA for those settings);
- ``grapes``: the same with GRAPES (``mode="propagate"``; ``clip=(1, 2)``, or ``clip=None`` on top of FA
  and DFA as in the paper's code), output layer left alone;
- ``grapes_local``: ``mode="local"`` (recurrent setting only);
- ``control``: ``plain`` with the learning rate of the chosen ``grapes`` run multiplied by that run's mean
  factor (mean over steps of the mean over modulated layers of the mean over neurons of
  ``handle.factors()``), per seed.

``plain``, ``grapes`` and ``grapes_local`` each get their learning rate from the same grid: every grid
value is run on every seed and the one with the best mean final validation accuracy is kept (the test
set is read only for the report). Arms of a seed share the initial weights, the split and the batch
order, so differences are paired by seed. One JSON line per finished run goes to ``grapes_claims.jsonl``
(resumable: finished runs are skipped; a run counts only if its setting's configuration is unchanged);
``--report-only`` rebuilds ``grapes_claims.md`` and the claims section of ``grapes.md`` from it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apical import datasets
from apical.bench.common import eval_accuracy as _accuracy
from apical.bench.common import header, markdown_table, mean_std, paired_ci
from apical.feedback import feedback_alignment
from apical.grapes import grapes
from apical.models import MLP

NAME = "grapes_claims"
CLAIMS = ("depth", "fa", "recurrent", "spiking", "forgetting")
BEGIN, END = "<!-- grapes-claims:begin -->", "<!-- grapes-claims:end -->"


@dataclass(frozen=True)
class Setting:
    """One model / rule / task with its training budget and learning-rate grid."""

    name: str
    claim: str
    model: str  # "mlp", "gru", "snn"
    hidden: tuple[int, ...]
    activation: str = "relu"
    rule: str = "bp"  # "bp", "fa", "dfa"
    clip: tuple[float, float] | None = (1.0, 2.0)
    arms: tuple[str, ...] = ("plain", "grapes")
    epochs: int = 40
    batch_size: int = 32
    lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    tasks: int = 1  # > 1: permuted-digits tasks trained one after another, `epochs` each
    train_size: int | None = None  # None: the whole training split
    init: str = "torch"  # "torch": PyTorch's default; "he": Kaiming-normal weights (ReLU), zero biases


#: GRAPES' propagated factors compound with depth (up to 2^9 at the first of 10 layers): the grid reaches low;
#: 0.001 and 1.0 were added when the first run chose its ends (depth 10 GRAPES 0.003, depth 3 plain 0.3)
DEPTH_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: FA / DFA: 1.0 added when the first run chose 0.3, the grid's top, for every arm; 3.0 when plain FA then chose 1.0
FA_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)

SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("depth3", "depth", "mlp", (64,) * 2, init="he", lrs=DEPTH_LRS),
    Setting("depth6", "depth", "mlp", (64,) * 5, init="he", lrs=DEPTH_LRS),
    Setting("depth10", "depth", "mlp", (64,) * 9, init="he", lrs=DEPTH_LRS),
    Setting("fa", "fa", "mlp", (64,) * 3, activation="tanh", rule="fa", clip=None, lrs=FA_LRS),
    Setting("dfa", "fa", "mlp", (64,) * 3, activation="tanh", rule="dfa", clip=None, lrs=FA_LRS),
    # 3.0 added when the first run chose 1.0, the top of the default grid
    Setting("gru", "recurrent", "gru", (64,), arms=("plain", "grapes", "grapes_local"), epochs=30,
            lrs=(0.03, 0.1, 0.3, 1.0, 3.0)),
    Setting("snn", "spiking", "snn", (128, 128), epochs=20),
    Setting("permuted", "forgetting", "mlp", (128, 128), epochs=10, tasks=5, lrs=(0.01, 0.03, 0.1, 0.3)),
]}


def quick(s: Setting) -> Setting:
    """Tiny version for smoke tests: 2 epochs, 2 grid values, 128 training samples."""
    return replace(s, epochs=2, lrs=s.lrs[:2], train_size=128, hidden=tuple(min(h, 16) for h in s.hidden))


# ---------------------------------------------------------------------------------------- models


class SeqGRU(nn.Module):
    """Digits read row by row (8 steps of 8 features) by a GRU; a linear readout of the last state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(8, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x.view(-1, 8, 8))
        return self.out(h[-1])


class SeqSNN(nn.Module):
    """Digits row by row as input currents to leaky integrate-and-fire layers (snntorch, fast-sigmoid
    surrogate); the logits are the output layer's membrane potential averaged over the 8 steps. The
    hidden layers' default weights are multiplied by ``gain`` (3: about 20% of the units spike at the
    start; with PyTorch's default, the second layer is nearly silent and plain SGD does not train)."""

    def __init__(self, hidden: Sequence[int], beta: float = 0.9, gain: float = 3.0) -> None:
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        sizes = [8, *hidden]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.out = nn.Linear(sizes[-1], 10)
        grad = surrogate.fast_sigmoid()
        self.lifs = nn.ModuleList(snn.Leaky(beta=beta, spike_grad=grad) for _ in hidden)
        self.lif_out = snn.Leaky(beta=beta, spike_grad=grad, reset_mechanism="none")
        with torch.no_grad():
            for fc in self.fcs:
                fc.weight.mul_(gain)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.view(-1, 8, 8).transpose(0, 1)  # [8 steps, N, 8]
        mems = [lif.reset_mem() for lif in self.lifs]
        mem_out = self.lif_out.reset_mem()
        logits = 0.0
        for row in rows:
            s = row
            for k, (fc, lif) in enumerate(zip(self.fcs, self.lifs, strict=True)):
                s, mems[k] = lif(fc(s), mems[k])
            _, mem_out = self.lif_out(self.out(s), mem_out)
            logits = logits + mem_out
        return logits / len(rows)


def build(s: Setting) -> nn.Module:
    if s.model == "gru":
        return SeqGRU(s.hidden[0])
    if s.model == "snn":
        return SeqSNN(s.hidden)
    model = MLP(64, list(s.hidden), 10, activation=s.activation)
    if s.init == "he":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return model


# ---------------------------------------------------------------------------------------- training


def _permutations(tasks: int, seed: int) -> list[Tensor]:
    """Task 0 is the identity; the others are fixed random pixel permutations (drawn from ``seed``)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return [torch.arange(64)] + [torch.randperm(64, generator=gen) for _ in range(tasks - 1)]


def run_one(s: Setting, arm: str, lr: float, seed: int, split: datasets.Split) -> dict[str, Any]:
    """Train one arm at one learning rate on one seed; the scores of the final weights (JSON-ready)."""
    torch.manual_seed(seed)
    model = build(s)  # same initial weights for every arm and learning rate of a seed
    rule = feedback_alignment(model, s.rule, seed=seed) if s.rule != "bp" else None
    handle = None
    if arm.startswith("grapes"):
        handle = grapes(model, mode="local" if arm == "grapes_local" else "propagate", clip=s.clip)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = split.x_train, split.y_train
    if s.train_size is not None:
        x, y = x[: s.train_size], y[: s.train_size]
    perms = _permutations(s.tasks, seed)
    gen = torch.Generator().manual_seed(seed + 1)  # same batch order in every arm of a seed
    factor_sum, steps, diverged = 0.0, 0, False
    val_curve: list[float] = []  # per epoch (task 0's validation accuracy when there are tasks)
    first_task_after: list[float] = []  # task 0's test accuracy after each task
    start = time.perf_counter()
    for task in range(s.tasks):
        xt = x[:, perms[task]]
        for _ in range(s.epochs):
            if not diverged:
                for idx in torch.randperm(len(xt), generator=gen).split(s.batch_size):
                    loss = F.cross_entropy(model(xt[idx]), y[idx])
                    if not torch.isfinite(loss):
                        diverged = True
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if handle is not None:
                        fs = handle.factors().values()
                        factor_sum += sum(float(f.mean()) for f in fs) / len(fs)
                        steps += 1
            val_curve.append(_accuracy(model, split.x_val[:, perms[0]], split.y_val))
        first_task_after.append(_accuracy(model, split.x_test[:, perms[0]], split.y_test))
    seconds = time.perf_counter() - start
    val_all = [_accuracy(model, split.x_val[:, p], split.y_val) for p in perms]
    result: dict[str, Any] = {
        "setting": s.name, "arm": arm, "lr": lr, "seed": seed, "spec": asdict(s),
        "val_curve": val_curve,
        # model selection: final validation accuracy (mean over tasks for the forgetting setting)
        "final_val": sum(val_all) / len(val_all),
        "test_acc": _accuracy(model, split.x_test, split.y_test),
        "auc": sum(val_curve) / len(val_curve),
        "diverged": diverged,
        "seconds": seconds,
    }
    if s.tasks > 1:
        result["first_task_after"] = first_task_after
        result["first_task_final"] = first_task_after[-1]
        result["forgetting"] = first_task_after[0] - first_task_after[-1]
        result["test_all_tasks"] = sum(_accuracy(model, split.x_test[:, p], split.y_test) for p in perms) / len(perms)
    if handle is not None:
        result["mean_factor"] = factor_sum / steps if steps else float("nan")
        handle.remove()
    if rule is not None:
        rule.remove()
    return result


# ---------------------------------------------------------------------------------------- bookkeeping


def _spec_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


def load_runs(path: Path, settings: dict[str, Setting]) -> list[dict[str, Any]]:
    """Finished runs whose setting is unchanged (a changed budget invalidates old lines). A widened
    grid keeps the runs at the learning rates still on it; a control is checked again by
    :func:`run_setting` against GRAPES' learning rate chosen on the new grid."""
    if not path.is_file():
        return []

    def budget(spec: dict[str, Any]) -> str:
        return _spec_key({k: v for k, v in spec.items() if k != "lrs"})

    want = {n: budget(asdict(s)) for n, s in settings.items()}
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            s = settings.get(r["setting"])
            if s is None or want[r["setting"]] != budget(r["spec"]):
                continue
            if r["arm"] == "control" or r["lr"] in s.lrs:
                runs.append(r)
    return runs


def _key(r: dict[str, Any]) -> tuple:
    if r["arm"] == "control":
        return r["setting"], r["arm"], r["seed"]
    return r["setting"], r["arm"], r["lr"], r["seed"]


def choose_lr(runs: list[dict[str, Any]], setting: str, arm: str) -> float | None:
    """The grid value with the best mean final validation accuracy over seeds (ties: the smaller)."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r["setting"] == setting and r["arm"] == arm:
            by_lr.setdefault(r["lr"], []).append(r["final_val"])
    if not by_lr:
        return None
    return max(sorted(by_lr), key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))


def run_setting(s: Setting, seeds: int, path: Path, done: dict[tuple, dict[str, Any]],
                log: Callable[[str], None] = print) -> None:
    """Every tuned arm on the whole grid and every seed, then the controls; skips finished runs."""
    splits = {}

    def split(seed: int) -> datasets.Split:
        if seed not in splits:
            splits[seed] = datasets.load("digits", seed=seed)
        return splits[seed]

    def record(r: dict[str, Any]) -> None:
        done[_key(r)] = r
        with path.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
        log(f"[grapes claims] {s.name:9s} {r['arm']:13s} lr {r['lr']:<8.4g} seed {r['seed']} "
            f"val {r['final_val']:.4f} test {r['test_acc']:.4f} ({r['seconds']:.1f} s)")

    for arm in s.arms:
        for lr in s.lrs:
            for seed in range(seeds):
                if (s.name, arm, lr, seed) not in done:
                    record(run_one(s, arm, lr, seed, split(seed)))
    runs = [r for r in done.values() if r["setting"] == s.name and r["seed"] < seeds and r["arm"] != "control"]
    lr_g = choose_lr(runs, s.name, "grapes")
    for seed in range(seeds):
        g = done[(s.name, "grapes", lr_g, seed)]
        old = done.get((s.name, "control", seed))
        # a control run at another learning rate (GRAPES' choice moved on a widened grid) is redone
        if old is None or not math.isclose(old["lr"], lr_g * g["mean_factor"], rel_tol=1e-12):
            r = run_one(s, "plain", lr_g * g["mean_factor"], seed, split(seed))
            r["arm"] = "control"
            record(r)


# ---------------------------------------------------------------------------------------- analysis


def _verdict_sign(c: tuple[float, float, float]) -> int:
    _, lo, hi = c
    if math.isnan(lo):
        return 0
    return 1 if lo > 0 else (-1 if hi < 0 else 0)


@dataclass
class SettingSummary:
    setting: Setting
    seeds: list[int]
    lr: dict[str, float]
    runs: dict[str, list[dict[str, Any]]]  # arm -> runs at its chosen lr, by seed
    grid: dict[str, dict[float, float]]  # arm -> lr -> mean final val
    comparisons: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = field(default_factory=dict)


METRICS = {"test_acc": "test acc", "auc": "mean val acc over epochs"}
FORGET_METRICS = {"first_task_final": "task-1 test acc after all tasks", "forgetting": "forgetting (task-1 drop)",
                  "test_all_tasks": "mean test acc over tasks"}


def summarise(runs: list[dict[str, Any]], s: Setting) -> SettingSummary | None:
    mine = [r for r in runs if r["setting"] == s.name]
    tuned = [r for r in mine if r["arm"] != "control"]
    lr_g = choose_lr(tuned, s.name, "grapes")
    grapes_at = {r["seed"]: r for r in tuned if r["arm"] == "grapes" and r["lr"] == lr_g}
    # a control counts only at GRAPES' chosen lr times that seed's mean factor (a widened grid may
    # have moved the choice since it ran)
    controls = {r["seed"]: r for r in mine if r["arm"] == "control" and r["seed"] in grapes_at
                and math.isclose(r["lr"], lr_g * grapes_at[r["seed"]]["mean_factor"], rel_tol=1e-12)}
    if not controls:
        return None
    seeds = sorted(controls)
    lr = {arm: choose_lr([r for r in tuned if r["seed"] in seeds], s.name, arm) for arm in s.arms}
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for arm in s.arms:
        at = {r["seed"]: r for r in mine if r["arm"] == arm and r["lr"] == lr[arm]}
        by_arm[arm] = [at[k] for k in seeds]
    by_arm["control"] = [controls[k] for k in seeds]
    grid: dict[str, dict[float, float]] = {}
    for arm in s.arms:
        vals: dict[float, list[float]] = {}
        for r in mine:
            if r["arm"] == arm and r["seed"] in seeds:
                vals.setdefault(r["lr"], []).append(r["final_val"])
        grid[arm] = {k: sum(v) / len(v) for k, v in sorted(vals.items())}
    out = SettingSummary(s, seeds, lr, by_arm, grid)
    metrics = list(FORGET_METRICS if s.tasks > 1 else METRICS)
    pairs = [("grapes", "plain"), ("grapes", "control")] + ([("grapes_local", "plain")] if "grapes_local" in s.arms
                                                             else [])
    for a, b in pairs:
        out.comparisons[(a, b)] = {m: paired_ci([r[m] for r in by_arm[a]], [r[m] for r in by_arm[b]]) for m in metrics}
    return out


def _pct(values: list[float]) -> str:
    m, sd = mean_std(values)
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def _ci(c: tuple[float, float, float]) -> str:
    m, lo, hi = (100 * v for v in c)
    return f"{m:+.2f} (n/a)" if math.isnan(lo) else f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"


LABELS = {"plain": "plain", "grapes": "GRAPES", "grapes_local": "GRAPES local", "control": "plain, lr x mean F"}


def _rule_label(s: Setting) -> str:
    return {"bp": "SGD", "fa": "FA", "dfa": "DFA"}[s.rule]


def setting_section(ss: SettingSummary) -> str:
    s = ss.setting
    forget = s.tasks > 1
    init = ", He init" if s.init == "he" else ""
    model = {"mlp": f"MLP 64-[{'-'.join(map(str, s.hidden))}]-10 ({s.activation}{init})",
             "gru": f"GRU(8, {s.hidden[0]}) over 8 rows + linear readout",
             "snn": f"spiking (Leaky LIF, beta 0.9, hidden weights x 3) 8-[{'-'.join(map(str, s.hidden))}]-10 "
                    "over 8 rows"}[s.model]
    budget = (f"{s.tasks} permuted-digits tasks x {s.epochs} epochs" if forget else f"{s.epochs} epochs")
    lines = [f"#### {s.name}\n",
             f"{model}, rule {_rule_label(s)}, GRAPES clip {s.clip}, {budget}, batch {s.batch_size}, "
             f"lr grid {list(s.lrs)}, {len(ss.seeds)} seeds.\n"]
    metric_names = FORGET_METRICS if forget else METRICS
    rows = []
    for arm, rs in ss.runs.items():
        lr = (f"{mean_std([r['lr'] for r in rs])[0]:.4g}" if arm == "control" else f"{ss.lr[arm]:g}")
        if arm != "control" and ss.lr[arm] in (s.lrs[0], s.lrs[-1]) and len(s.lrs) > 1:
            lr += " (grid edge)"
        cells = [f"{_rule_label(s)} {LABELS[arm]}", lr] + [_pct([r[m] for r in rs]) for m in metric_names]
        f = [r["mean_factor"] for r in rs if "mean_factor" in r]
        cells.append(f"{mean_std(f)[0]:.3f}" if f else "")
        cells.append(str(sum(r["diverged"] for r in rs)))
        rows.append(cells)
    lines.append(markdown_table(["arm", "lr", *(f"{v} %" for v in metric_names.values()), "mean F", "diverged"],
                                rows))
    rows = [[f"{LABELS[a]} − {LABELS[b]}", *(_ci(c[m]) for m in metric_names)] for (a, b), c in ss.comparisons.items()]
    lines.append("\nPaired differences, mean [95% CI] over seeds (pp):\n")
    lines.append(markdown_table(["comparison", *(f"Δ {v}" for v in metric_names.values())], rows))
    grid_rows = [[LABELS[arm], *(f"{100 * v:.2f}" for v in g.values())] for arm, g in ss.grid.items()]
    lines.append("\nMean final validation accuracy (%) per grid learning rate (the selection criterion):\n")
    lines.append(markdown_table(["arm", *(f"lr {lr:g}" for lr in s.lrs)], grid_rows))
    return "\n".join(lines)


def _beats(c: tuple[float, float, float]) -> str:
    v = _verdict_sign(c)
    return {1: "better", -1: "worse", 0: "no detectable difference"}[v]


def verdict(kind: str, summaries: list[SettingSummary]) -> str:
    """One line from the CIs: supported when GRAPES beats both the tuned plain arm and the lr control on
    the primary metric, not supported when it beats neither, mixed otherwise."""
    metric = "first_task_final" if kind == "forgetting" else "test_acc"
    parts, wins = [], []
    for ss in summaries:
        vs_plain = ss.comparisons[("grapes", "plain")][metric]
        vs_ctrl = ss.comparisons[("grapes", "control")][metric]
        wins.append((_verdict_sign(vs_plain), _verdict_sign(vs_ctrl)))
        parts.append(f"{ss.setting.name}: vs tuned plain {_beats(vs_plain)} ({_ci(vs_plain)} pp), "
                     f"vs lr x mean F {_beats(vs_ctrl)} ({_ci(vs_ctrl)} pp)")
    extra = ""
    if kind == "depth" and len(summaries) >= 2:
        lo_ss, hi_ss = summaries[0], summaries[-1]
        seeds = [k for k in lo_ss.seeds if k in hi_ss.seeds]

        def gain(ss: SettingSummary) -> list[float]:
            g = {r["seed"]: r[metric] for r in ss.runs["grapes"]}
            p = {r["seed"]: r[metric] for r in ss.runs["plain"]}
            return [g[k] - p[k] for k in seeds]

        growth = paired_ci(gain(hi_ss), gain(lo_ss))
        extra = (f"; growth of the gain over plain from {lo_ss.setting.name} to {hi_ss.setting.name}: "
                 f"{_ci(growth)} pp ({_beats(growth)})")
        top = wins[-1]
        label = ("supported" if top == (1, 1) and _verdict_sign(growth) > 0
                 else "not supported" if top[0] <= 0 and top[1] <= 0 and _verdict_sign(growth) <= 0 else "mixed")
    else:
        if all(w == (1, 1) for w in wins):
            label = "supported"
        elif all(w[0] <= 0 and w[1] <= 0 for w in wins):
            label = "not supported"
        else:
            label = "mixed"
    what = {"depth": "gains grow with depth under plain SGD", "fa": "GRAPES improves FA / DFA",
            "recurrent": "GRAPES improves a recurrent network", "spiking": "GRAPES improves a spiking network",
            "forgetting": "GRAPES reduces catastrophic forgetting (task-1 accuracy after all tasks)"}[kind]
    return f"**Verdict ({what}): {label} at this size.** " + "; ".join(parts) + extra + "."


def report(runs: list[dict[str, Any]], settings: dict[str, Setting], argv: Sequence[str]) -> str:
    """The claims section: setup, one table set and one verdict per claim (claims with no finished
    setting are listed as not run)."""
    shown = ["bench", "grapes", *(a for a in argv if a != "--report-only")]  # the command that made the runs
    md = [header("GRAPES claims: depth, feedback alignment, recurrent, spiking, forgetting",
                 shown).replace("# GRAPES claims", "## GRAPES claims", 1),
          "Data: sklearn digits (8x8), split by seed; the recurrent and spiking models read the image row by row "
          "(8 steps of 8 features); the forgetting setting trains on 5 permuted-digits tasks one after another "
          "(task 1 unpermuted, one shared 10-way head) and reports task 1's test accuracy after the last task. "
          "Plain SGD (no momentum), PyTorch's default initialisation unless marked, fixed epoch budget, final "
          "weights. "
          "`plain`, `GRAPES` and `GRAPES local` each take the grid learning rate with the best mean final "
          "validation accuracy over seeds; `plain, lr x mean F` is plain training at GRAPES' chosen lr times "
          "the mean factor of the same seed's GRAPES run. Arms of a seed share initial weights, split, batch "
          "order (and feedback matrices). Verdicts: **supported** when GRAPES beats both the tuned plain arm "
          "and the lr control (95% CI of the paired difference above zero) on test accuracy, **not supported** "
          "when it beats neither, **mixed** otherwise; for depth, the depth-10 setting must also gain more "
          "than the depth-3 one.\n"]
    for claim in CLAIMS:
        names = [n for n, s in settings.items() if s.claim == claim]
        summaries = [ss for n in names if (ss := summarise(runs, settings[n])) is not None]
        md.append(f"### Claim: {claim}\n")
        if not summaries:
            md.append("Not run.\n")
            continue
        for ss in summaries:
            md.append(setting_section(ss))
        missing = [n for n in names if n not in {ss.setting.name for ss in summaries}]
        if missing:
            md.append(f"Not finished: {', '.join(missing)}.\n")
        md.append(verdict(claim, summaries) + "\n")
    total = sum(r["seconds"] for r in runs)
    md.append(f"Training time of the runs above: {total / 60:.1f} min (single thread).\n")
    return "\n".join(md)


def write_reports(out: Path, runs: list[dict[str, Any]], settings: dict[str, Setting], argv: Sequence[str]) -> Path:
    """``grapes_claims.md``, and the same text between markers at the end of ``grapes.md``."""
    text = report(runs, settings, argv)
    (out / f"{NAME}.md").write_text(text.replace("## GRAPES claims", "# GRAPES claims", 1))
    main_md = out / "grapes.md"
    block = f"{BEGIN}\n{text}\n{END}\n"
    old = main_md.read_text() if main_md.is_file() else ""
    if BEGIN in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block
    main_md.write_text(new)
    return out / f"{NAME}.md"


def main(argv: Sequence[str], claims: Sequence[str], seeds: int, out: Path, is_quick: bool,
         report_only: bool = False, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or only report) the given claims; returns the finished runs."""
    unknown = [c for c in claims if c not in CLAIMS]
    if unknown:
        raise SystemExit(f"unknown claim(s) {unknown}; known: {', '.join(CLAIMS)}")
    settings = {n: (quick(s) if is_quick else s) for n, s in SETTINGS.items() if s.claim in claims}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.jsonl"
    runs = load_runs(path, settings)
    done = {_key(r): r for r in runs}
    if not report_only:
        for s in settings.values():
            run_setting(s, seeds, path, done, log)
            write_reports(out, list(done.values()), settings, argv)  # partial tables as settings finish
    runs = [r for r in done.values() if r["seed"] < seeds]
    md = write_reports(out, runs, settings, argv)
    log(f"[grapes claims] wrote {md} and the claims section of {out / 'grapes.md'}")
    return runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--claims", default=None,
                   help=f"comma-separated claims to run instead of the speed benchmark: {', '.join(CLAIMS)} "
                        "(or 'all'); results in grapes_claims.jsonl / .md and a section of grapes.md")
    p.add_argument("--report-only", action="store_true",
                   help="with --claims: rebuild the markdown from grapes_claims.jsonl without training")
