"""Speed and memory of apical's dendritic layers, as ratios against plain PyTorch models.

Sections (all in one process, ``torch.set_num_threads`` pinned, warm-up then the median of
interleaved repeats):

(a) neuron-phase training step (forward + backward + Adam) of a perforated model with D = 1, 2, 4
    installed sets ("pb": dendrite inputs frozen, v trainable) against a plain model whose
    wrapped layers have (1 + D) times the outputs, folded back to O by a sum ("wide"): the same
    forward arithmetic. Target: <= 1.15x.
(b) dendrite-phase step with C = 1, 4, 8 candidates per neuron against a neuron-phase step,
    next to the arithmetic prediction (multiply-adds of the matmuls / convolutions of the
    pass). Target: measured within 1.2x of predicted.
(c) inference latency of ``apical.export(model)`` against the wide plain model. Target: <= 1.05x.
(d) peak memory of a dendrite phase over two epoch lengths: it must not grow with samples.
(e) OPTIONAL: comparison with the ``perforatedai`` package, skipped when it is not installed.
(r) recurrent layers: a neuron-phase step of a GRU with D installed sets against the same arithmetic
    written as a plain PyTorch step loop (target <= 1.2x), and a GRU without sets (apical keeps
    PyTorch's fused kernel) against ``nn.GRU`` (target <= 1.05x).

``--sections`` runs a subset; the other sections of an existing ``<name>.json`` are kept (the
report says from which run).

Run ``python benchmarks/speed.py`` (``--device cuda`` on a GPU machine, ``--quick`` for a smoke
run). Writes ``benchmarks/results/<name>.md`` and ``<name>.json`` (name: ``speed`` on CPU,
``speed_<device>`` otherwise, or ``--name``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import apical
from apical.dendrites.layer import ACTIVATION_FNS
from apical.export import export

RESULTS = Path("benchmarks") / "results"  # relative to the working directory, like every suite
WRAPPED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------------- models
def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (builder, input shape, batch)
    "mlp 256-512-512-10": (make_mlp, (256,), 256),
    "cnn 1x28x28 c16-c32-fc": (make_cnn, (1, 28, 28), 64),
}


class Wide(nn.Module):
    """Plain stand-in for a layer with D dendrite sets: the same module with (1 + D) * O
    outputs, summed back to O (same forward arithmetic as the dendritic layer, no dendrite).
    With ``activation``, the D * O extra outputs pass through it before the sum (the
    dendrites' non-linearity, without their cascade and output weights)."""

    def __init__(self, base: nn.Module, sets: int, activation: str | None = None) -> None:
        super().__init__()
        o = base.weight.shape[0]
        if isinstance(base, nn.Linear):
            self.op: nn.Module = nn.Linear(base.in_features, (1 + sets) * o)
            self.axis = -1
        else:
            self.op = type(base)(base.in_channels, (1 + sets) * o, base.kernel_size, base.stride,
                                 base.padding, base.dilation, base.groups, padding_mode=base.padding_mode)
            self.axis = 1
        self.shape = (1 + sets, o)
        self.act = ACTIVATION_FNS[activation] if activation else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.op(x).unflatten(self.axis, self.shape)
        axis = self.axis - 1 if self.axis < 0 else self.axis
        if self.act is None:
            return y.sum(axis)
        return y.select(axis, 0) + self.act(y.narrow(axis, 1, self.shape[0] - 1)).sum(axis)


def widen(model: nn.Module, sets: int, activation: str | None = None) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, WRAPPED):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, Wide(module, sets, activation))
    return model


def perforated(make: Callable[[], nn.Module], dendrites: int) -> nn.Module:
    """A "pb" model with ``dendrites`` installed sets, random v and cascade, in the neuron phase."""
    model = make()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    for _, layer in apical.dendritic_layers(model):
        for _ in range(dendrites):
            layer.install_random(1.0)
        with torch.no_grad():
            layer.dendrite_out.normal_(0, 0.1)
            layer.dendrite_cascade.normal_(0, 0.5)
        layer.set_training_mode("neuron", perforated=True)
    return model


def to_dendrite_phase(model: nn.Module, candidates: int) -> list[nn.Parameter]:
    """Add candidates to every layer and freeze everything else, as the controller does."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for _, layer in apical.dendritic_layers(model):
        layer.add_candidates(candidates, 1.0)
        layer.set_training_mode("dendrite", True)
        params += layer.candidate_parameters()
    return params


# ---------------------------------------------------------------------------------- arithmetic
def layer_units(make: Callable[[], nn.Module], shape: tuple[int, ...], batch: int) -> list[int]:
    """Multiply-adds of one forward of each wrapped layer (execution order), plain model."""
    model = make()
    units: list[int] = []

    def hook(module, args, out):
        units.append(out.numel() * module.weight[0].numel())

    for m in model.modules():
        if isinstance(m, WRAPPED):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(batch, *shape))
    return units


def predicted_macs(units: list[int], kind: str, d: int = 0, c: int = 0) -> int:
    """Multiply-adds of the matmuls/convolutions of one training step (forward + backward).

    Per layer of forward cost u: a weight gradient costs u and an input gradient u (none for
    the first layer, whose input is data).
      plain width O:  u (fwd) + u (dW) + u (dx)
      wide (1+D)O:    (1+D) * (fwd + dW + dx)
      pb neuron, D:   (1+D) u fwd; base dW + dx; dendrites: no gradient (frozen, detached input)
      dendrite, C:    (1+D+C) u fwd; dx through the base only; candidates dW: C u (detached input)
    """
    total = 0
    for i, u in enumerate(units):
        dx = 1 if i else 0
        if kind == "plain":
            total += u * (2 + dx)
        elif kind == "wide":
            total += u * (1 + d) * (2 + dx)
        elif kind == "neuron":
            total += u * ((1 + d) + 1 + dx)
        elif kind == "dendrite":
            total += u * ((1 + d + c) + dx + c)
        elif kind == "inference":
            total += u * (1 + d)
        else:
            raise ValueError(kind)
    return total


def dispatched_macs(fn: Callable[[], object]) -> int:
    """Multiply-adds actually dispatched to matmul / convolution kernels by ``fn`` (one call)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


# ---------------------------------------------------------------------------------- timing
class Timer:
    """Times calls with the wall clock, or with this thread's CPU time (``clock="cpu"``): on a
    shared CPU machine with one torch thread the latter leaves out the time the process waits
    for a core, which otherwise dominates the noise (the autograd engine runs CPU backward
    passes on the calling thread, so the thread's CPU time covers the whole step)."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, clock: str = "wall") -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.clock = time.thread_time if clock == "cpu" else time.perf_counter

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = self.clock()
        fn()
        self.sync()
        return self.clock() - t0

    def compare(self, fns: dict[str, Callable[[], object]], base: str) -> tuple[dict[str, float], dict[str, float]]:
        """Median seconds per call of each function, and the median over rounds of each one's
        time over ``base``'s in the same round. The functions run in interleaved rounds (order
        reversed every other round), so that a change of machine load hits all of them alike."""
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        for r in range(self.repeats):
            for k in order if r % 2 == 0 else order[::-1]:
                times[k].append(self.once(fns[k]))
        medians = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: statistics.median(a / b for a, b in zip(v, times[base], strict=True)) for k, v in times.items()}
        return medians, ratios


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _adam_kwargs(args, device: torch.device) -> dict:
    """``fused=True`` where this torch has a fused Adam for the device (much faster on CPU)."""
    if args.adam != "fused":
        return {}
    try:
        torch.optim.Adam([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return {}
    return {"fused": True}


def batch_for(shape: tuple[int, ...], batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)


# ---------------------------------------------------------------------------------- sections
def section_a(args, timer: Timer, device: torch.device) -> list[dict]:
    rows = []
    for name, (make, shape, batch) in MODELS.items():
        units = layer_units(make, shape, batch)
        x, y = batch_for(shape, batch, device)
        for d in args.dendrites:
            torch.manual_seed(0)
            pb = perforated(make, d).to(device).train()
            wide = widen(make(), d).to(device).train()
            plain = make().to(device).train()
            steps = {}
            for key, model in (("pb", pb), ("wide", wide), ("plain", plain)):
                trainable = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.Adam(trainable, lr=1e-4, **_adam_kwargs(args, device))
                steps[key] = train_step(model, opt, x, y)
            t, ratio = timer.compare(steps, "wide")
            pred = predicted_macs(units, "neuron", d) / predicted_macs(units, "wide", d)
            rows.append({
                "model": name, "D": d, "t_pb_ms": 1e3 * t["pb"], "t_wide_ms": 1e3 * t["wide"],
                "t_plain_ms": 1e3 * t["plain"], "ratio_vs_wide": ratio["pb"],
                "predicted_vs_wide": pred,
                "ratio_vs_plain": ratio["pb"] / ratio["plain"],
                "predicted_vs_plain": predicted_macs(units, "neuron", d) / predicted_macs(units, "plain"),
                "dispatched_macs_pb": dispatched_macs(steps["pb"]),
                "predicted_macs_pb": predicted_macs(units, "neuron", d),
            })
            print(_fmt_row("a", rows[-1]), flush=True)
    return rows


def section_b(args, timer: Timer, device: torch.device) -> list[dict]:
    rows = []
    d = args.phase_dendrites
    for name, (make, shape, batch) in MODELS.items():
        units = layer_units(make, shape, batch)
        x, y = batch_for(shape, batch, device)
        torch.manual_seed(0)
        neuron = perforated(make, d).to(device).train()
        trainable = [p for p in neuron.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=1e-4, **_adam_kwargs(args, device))
        steps = {"neuron": train_step(neuron, opt, x, y)}
        for c in args.candidates:
            model = perforated(make, d).to(device).train()
            params = to_dendrite_phase(model, c)
            opt = torch.optim.Adam(params, lr=1e-3, **_adam_kwargs(args, device))
            steps[f"C={c}"] = train_step(model, opt, x, y)
        t, ratio = timer.compare(steps, "neuron")
        for c in args.candidates:
            pred = predicted_macs(units, "dendrite", d, c) / predicted_macs(units, "neuron", d)
            measured = ratio[f"C={c}"]
            rows.append({
                "model": name, "D": d, "C": c, "t_dendrite_ms": 1e3 * t[f"C={c}"],
                "t_neuron_ms": 1e3 * t["neuron"], "ratio": measured, "predicted": pred,
                "measured_over_predicted": measured / pred,
                "dispatched_macs": dispatched_macs(steps[f"C={c}"]),
                "predicted_macs": predicted_macs(units, "dendrite", d, c),
            })
            print(_fmt_row("b", rows[-1]), flush=True)
    return rows


def section_c(args, timer: Timer, device: torch.device) -> list[dict]:
    rows = []
    for name, (make, shape, batch) in MODELS.items():
        x, _ = batch_for(shape, batch, device)
        for d in args.dendrites:
            torch.manual_seed(0)
            model = perforated(make, d).to(device).eval()
            exported = export(model)
            wide = widen(make(), d).to(device).eval()
            wide_act = widen(make(), d, "sigmoid").to(device).eval()
            plain = make().to(device).eval()
            with torch.no_grad():
                err = (exported(x) - model(x)).abs().max().item()
            fns = {"export": exported, "wide": wide, "wide_act": wide_act, "dendritic": model, "plain": plain}
            if args.compile:
                fns = {k: torch.compile(m) for k, m in fns.items()}

            t, ratio = timer.compare({k: _inference(m, x) for k, m in fns.items()}, "wide")
            rows.append({
                "model": name, "D": d, "t_export_ms": 1e3 * t["export"], "t_wide_ms": 1e3 * t["wide"],
                "t_dendritic_ms": 1e3 * t["dendritic"], "t_plain_ms": 1e3 * t["plain"],
                "ratio_vs_wide": ratio["export"], "dendritic_vs_wide": ratio["dendritic"],
                "t_wide_act_ms": 1e3 * t["wide_act"], "ratio_vs_wide_act": ratio["export"] / ratio["wide_act"],
                "max_abs_error": err, "compiled": bool(args.compile),
            })
            print(_fmt_row("c", rows[-1]), flush=True)
    return rows


def _inference(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            model(x)

    return call


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is all there is
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by tensors created while the mode is active (their storages, each counted
    once, released when the storage is freed), and the peak of that sum: a CPU stand-in for
    ``torch.cuda.max_memory_allocated``, insensitive to the allocator's caching."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.ignore:
            return
        size = storage.nbytes()

        def released(_ref, key=key, size=size) -> None:
            self.live.pop(key, None)
            self.current -= size

        self.live[key] = weakref.ref(storage, released)
        self.current += size
        self.peak = max(self.peak, self.current)


def _storage_keys(tensors) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, Tensor)}


def _dendrite_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, n: int,
                    device: torch.device) -> dict:
    """One dendrite-phase epoch of ``n`` fresh batches; peak memory and the statistics' size."""
    layers = [layer for _, layer in apical.dendritic_layers(model)]
    for layer in layers:
        layer.stats.reset()
    gc.collect()

    def step() -> None:
        x.normal_()
        y.random_(0, 10)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    rss_peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        for _ in range(n):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        state = [t for s in opt.state.values() for t in s.values()]
        ignore = _storage_keys([*model.parameters(), *model.buffers(), *state, x, y])
        with LiveTensorBytes(ignore) as tracker:
            for _ in range(n):
                step()
                rss_peak = max(rss_peak, _rss_bytes())
        peak = tracker.peak
    stats = sum(getattr(layer.stats, k).numel() * 8 for layer in layers for k in layer.stats.FIELDS)
    return {"batches": n, "samples": n * x.shape[0], "peak_mib": peak / 2**20, "rss_peak_mib": rss_peak / 2**20,
            "stats_kib": stats / 1024, "observations": layers[0].stats.n}


def section_d(args, device: torch.device) -> list[dict]:
    """Peak memory of a dendrite phase over a short and a long epoch (fresh batches each step,
    so nothing but the layer's own state could grow)."""
    rows = []
    c = args.memory_candidates
    for name, (make, shape, batch) in MODELS.items():
        torch.manual_seed(0)
        model = perforated(make, 1).to(device).train()
        opt = torch.optim.Adam(to_dendrite_phase(model, c), lr=1e-3, **_adam_kwargs(args, device))
        x, y = batch_for(shape, batch, device)
        _dendrite_epoch(model, opt, x, y, 2, device)  # warm-up: optimiser state, allocator
        short, long = (_dendrite_epoch(model, opt, x, y, n, device) for n in args.memory_batches)
        grew = long["peak_mib"] - short["peak_mib"]
        tolerance = 0.01 * short["peak_mib"]
        rows.append({
            "model": name, "C": c, "D": 1, "short": short, "long": long,
            "peak_difference_mib": grew, "tolerance_mib": tolerance, "flat": grew <= tolerance,
            "measure": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                        else "peak bytes of live tensors allocated during the epoch"),
        })
        print(f"[d] {name}: short {short['peak_mib']:.2f} MiB ({short['samples']} samples), "
              f"long {long['peak_mib']:.2f} MiB ({long['samples']} samples), flat={rows[-1]['flat']}",
              flush=True)
    return rows


# ===================================================================================== (e)
# OPTIONAL: comparison with the reference package `perforatedai`. Skipped when it is not
# installed. What to compare (and whether at all) is still to be decided; this section only
# records the package's presence and version so the report says whether it could run.
# ===================================================================================== (e)
def section_e(args) -> dict:
    """apical's gd against perforatedai (its open variant is gd) per training epoch: the digits
    MLP 64-8-10 of ``apical bench digits``, same split, seed, optimiser, patience and epoch cap,
    each in its own process, timed end to end (perforatedai's per-epoch file writes included)."""
    from apical.bench.reference import installed_version, run_reference

    version = installed_version()
    if version is None:
        return {"status": "skipped: perforatedai is not installed"}
    from apical.bench.definitions import SUITES, build_model, load_split
    from apical.training import fit
    from apical.trials.modes import mode_config

    epochs = 40 if args.quick else 120
    spec = next(m for m in SUITES["digits"].models if m.name == "mlp")
    ref = run_reference("digits", "mlp", spec.default_width, 0, lr=spec.lr, batch_size=spec.batch_size,
                        patience=spec.patience, max_epochs=epochs, threads=args.threads, timeout=1800)
    if "failed" in ref:
        return {"status": f"perforatedai {version} failed: {ref['failed']}"}
    r = ref["result"]
    split = load_split(SUITES["digits"], 0, False)
    ours = fit(lambda: build_model(spec, split, spec.default_width), split,
               mode_config("gd", spec.patience, 0), lr=spec.lr, batch_size=spec.batch_size, max_epochs=epochs, seed=0)
    row = {
        "model": "digits MLP 64-8-10", "epoch_cap": epochs,
        "pai_epochs": r["epochs"], "pai_dendrites": r["dendrites"], "pai_s_per_epoch": r["seconds"] / r["epochs"],
        "pai_loop_s_per_epoch": r["loop_seconds"] / r["epochs"], "pai_test": r["test_score"],
        "apical_epochs": ours.epochs, "apical_dendrites": ours.dendrites,
        "apical_s_per_epoch": ours.seconds / ours.epochs, "apical_test": ours.test_score,
    }
    row["speedup"] = row["pai_s_per_epoch"] / row["apical_s_per_epoch"]
    print(_fmt_row("e", row))
    return {"status": f"perforatedai {version} measured", "version": version, "rows": [row]}


# ---------------------------------------------------------------------------------- report
def _fmt_row(section: str, row: dict) -> str:
    parts = [f"[{section}]"]
    for k, v in row.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def machine_info(device: torch.device) -> dict:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "apical": apical.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git": _git_revision(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git_revision() -> str | None:
    import subprocess

    root = Path.cwd()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + (" (with uncommitted changes)" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def write_report(path_md: Path, results: dict, command: str) -> None:
    m = results["machine"]
    lines = [
        "# apical speed benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), torch.set_num_threads"
        f"({m['threads']}), device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}; "
        f"torch {m['torch']}, Python {m['python']}, {m['platform']}; load average at start "
        f"{m['load_average']}; {m['date']}; apical {m['apical']} at git {m['git']}.",
        "",
    ]
    if results.get("kept"):
        k, km = results["kept"], results["kept"]["machine"]
        lines += [f"Sections {', '.join(k['sections'])} are kept from an earlier run: `{k['command']}` on "
                  f"{km.get('cpu')}, {km.get('date')}, load average {km.get('load_average')}, apical at git "
                  f"{km.get('git')}. The command and machine above are those of the sections run last.", ""]
    lines += [
        f"Timing: {results['settings']['warmup']} warm-up calls, then {results['settings']['repeats']} "
        "interleaved rounds; times are medians, ratios the median over rounds of the per-round ratio, "
        f"clock: {'CPU time of the calling thread' if results['settings']['clock'] == 'cpu' else 'wall'}. "
        "Ratios are this "
        "implementation's time over the baseline's. \"Predicted\" is the ratio of the multiply-adds of "
        "the matmuls / convolutions each pass needs (elementwise work not counted); \"wide\" is a plain "
        "model whose wrapped layers have (1 + D) x the outputs, summed back to O (the dendritic "
        "layer's forward arithmetic without dendrites).",
        "",
    ]
    if results.get("a"):
        lines += [
            "## (a) Neuron-phase training step, pb, D installed sets (target <= 1.15x the wide model)",
            "",
            "| model | D | pb ms | wide ms | plain ms | pb / wide | predicted | <= 1.15 | pb / plain |"
            " predicted | dispatched / predicted MACs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["a"]:
            lines.append(
                f"| {r['model']} | {r['D']} | {r['t_pb_ms']:.2f} | {r['t_wide_ms']:.2f} | {r['t_plain_ms']:.2f} "
                f"| {r['ratio_vs_wide']:.3f} | {r['predicted_vs_wide']:.3f} | "
                f"{_verdict(r['ratio_vs_wide'] <= 1.15)} | {r['ratio_vs_plain']:.3f} | "
                f"{r['predicted_vs_plain']:.3f} | {r['dispatched_macs_pb'] / r['predicted_macs_pb']:.3f} |"
            )
        lines.append("")
    if results.get("b"):
        lines += [
            "## (b) Dendrite-phase step with C candidates vs a neuron-phase step "
            "(target: measured within 1.2x of predicted)",
            "",
            "| model | D | C | dendrite ms | neuron ms | measured | predicted | measured / predicted |"
            " within 1.2x | dispatched / predicted MACs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["b"]:
            lines.append(
                f"| {r['model']} | {r['D']} | {r['C']} | {r['t_dendrite_ms']:.2f} | {r['t_neuron_ms']:.2f} | "
                f"{r['ratio']:.2f} | {r['predicted']:.2f} | {r['measured_over_predicted']:.3f} | "
                f"{_verdict(r['measured_over_predicted'] <= 1.2)} | "
                f"{r['dispatched_macs'] / r['predicted_macs']:.3f} |"
            )
        lines.append("")
    if results.get("c"):
        compiled = any(r["compiled"] for r in results["c"])
        lines += [
            "## (c) Inference latency of apical.export vs the wide plain model (target <= 1.05x)"
            + (" (torch.compile)" if compiled else " (eager)"),
            "",
            "\"wide+act\" also applies the dendrites' sigmoid to the D * O extra outputs (the same "
            "arithmetic including the non-linearity, without cascade and v).",
            "",
            "| model | D | export ms | wide ms | export / wide | <= 1.05 | export / wide+act |"
            " dendritic (unexported) / wide | plain ms | max abs error |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["c"]:
            lines.append(
                f"| {r['model']} | {r['D']} | {r['t_export_ms']:.3f} | {r['t_wide_ms']:.3f} | "
                f"{r['ratio_vs_wide']:.3f} | {_verdict(r['ratio_vs_wide'] <= 1.05)} | "
                f"{r['ratio_vs_wide_act']:.3f} | "
                f"{r['dendritic_vs_wide']:.3f} | {r['t_plain_ms']:.3f} | {r['max_abs_error']:.1e} |"
            )
        lines.append("")
    if results.get("d"):
        lines += [
            "## (d) Peak memory of a dendrite phase over two epoch lengths (must not grow)",
            "",
            f"Measure: {results['d'][0]['measure']}; flat = the long epoch's peak within 1% of the short "
            "one's. Fresh random batches are drawn in place each step, so only the layers' own state "
            "could grow with the samples seen.",
            "",
            "| model | C | short epoch: samples, peak MiB | long epoch: samples, peak MiB | difference MiB |"
            " flat | statistics KiB | process RSS peak MiB (short / long) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["d"]:
            s, g = r["short"], r["long"]
            lines.append(
                f"| {r['model']} | {r['C']} | {s['samples']}, {s['peak_mib']:.2f} | "
                f"{g['samples']}, {g['peak_mib']:.2f} | {r['peak_difference_mib']:+.3f} | {_verdict(r['flat'])} | "
                f"{s['stats_kib']:.0f} / {g['stats_kib']:.0f} | {s['rss_peak_mib']:.0f} / {g['rss_peak_mib']:.0f} |"
            )
        lines.append("")
    if results.get("r"):
        lines += [
            "## (r) Recurrent layers: a GRU's training step",
            "",
            "D = 0: perforated, no set installed (apical runs PyTorch's fused kernel) against nn.GRU. D >= 1: a "
            "neuron-phase step (pb) against the same arithmetic written as a plain PyTorch step loop (a GRU "
            "written out, with the D sets' matmul, sigmoid and v-weighted sum per step); the fused nn.GRU's "
            "time is shown for scale (a loop over time steps cannot match a fused kernel).",
            "",
            "| model | D | apical ms | reference ms | reference | apical / reference | target | met |"
            " fused nn.GRU ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["r"]:
            fused = f"{r['t_fused_gru_ms']:.2f}" if "t_fused_gru_ms" in r else ""
            lines.append(f"| {r['model']} | {r['D']} | {r['t_apical_ms']:.2f} | {r['t_reference_ms']:.2f} | "
                         f"{r['reference']} | {r['ratio']:.3f} | <= {r['target']} | "
                         f"{_verdict(r['ratio'] <= r['target'])} | {fused} |")
        lines.append("")
    lines += ["## (e) OPTIONAL: apical gd vs perforatedai per training epoch (target: at least 5x faster)", "",
              f"{results['e']['status']}.", ""]
    if results["e"].get("rows"):
        lines += [
            "Same data, model, split, seed, Adam lr, patience and epoch cap; wall time of the whole run per epoch "
            "(validation and the controller included; perforatedai's per-epoch plots and CSV files are part of "
            "its cost). 'loop' is perforatedai's train + evaluate time alone.", "",
            "| model | epoch cap | perforatedai epochs / dendrites / test | s/epoch | loop s/epoch "
            "| apical gd epochs / dendrites / test | s/epoch | speed-up |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["e"]["rows"]:
            lines.append(
                f"| {r['model']} | {r['epoch_cap']} | {r['pai_epochs']} / {r['pai_dendrites']} / {r['pai_test']:.4f} | "
                f"{r['pai_s_per_epoch']:.4f} | {r['pai_loop_s_per_epoch']:.4f} | {r['apical_epochs']} / "
                f"{r['apical_dendrites']} / {r['apical_test']:.4f} | {r['apical_s_per_epoch']:.4f} | "
                f"{r['speedup']:.1f}x |")
        lines.append("")
    path_md.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------- (r) recurrent
class GRUNet(nn.Module):
    """A one-layer GRU over ``[T, B, I]`` and a Linear head on the last hidden state."""

    def __init__(self, inputs: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.rnn = nn.GRU(inputs, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[1][-1])


class HandGRUNet(nn.Module):
    """The arithmetic of a GRU with D installed dendrite sets per gate unit (pb's neuron phase:
    dendrite inputs frozen and detached, v trainable), as a plain PyTorch step loop."""

    def __init__(self, net: GRUNet, sets: int) -> None:
        super().__init__()
        rnn, self.sets = net.rnn, sets
        n, i = rnn.hidden_size, rnn.input_size
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(self, name, nn.Parameter(getattr(rnn, name + "_l0").detach().clone()))
        self.register_buffer("wd", torch.randn(sets * 3 * n, i + n) / math.sqrt(i + n))
        self.register_buffer("bd", torch.zeros(sets * 3 * n))
        self.v = nn.Parameter(torch.zeros(sets, 3 * n))
        self.head = copy.deepcopy(net.head)
        self.hidden = n

    def forward(self, x: Tensor) -> Tensor:
        n, h = self.hidden, x.new_zeros(x.shape[1], self.hidden)
        for t in range(x.shape[0]):
            gi, gh = F.linear(x[t], self.weight_ih, self.bias_ih), F.linear(h, self.weight_hh, self.bias_hh)
            pre = F.linear(torch.cat([x[t], h], -1).detach(), self.wd, self.bd)
            a = torch.sigmoid(pre).unflatten(-1, (self.sets, 3 * n))
            s = torch.cat([gi[:, : 2 * n] + gh[:, : 2 * n], gi[:, 2 * n:]], -1) + (self.v * a).sum(-2)
            r, z = torch.sigmoid(s[:, : 2 * n]).chunk(2, -1)
            cand = torch.tanh(s[:, 2 * n:] + r * gh[:, 2 * n:])
            h = cand + z * (h - cand)
        return self.head(h)


def section_r(args, timer: Timer, device: torch.device) -> list[dict]:
    steps_t, batch, rows = 32, 64, []
    x = torch.randn(steps_t, batch, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step_of(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                               **_adam_kwargs(args, device))
        return train_step(model, opt, x, y)

    torch.manual_seed(0)
    plain = GRUNet().to(device).train()
    bare = copy.deepcopy(plain)
    apical.perforate(bare, apical.DendriteConfig(mode="pb"))  # no sets yet: the fused kernel
    t, ratio = timer.compare({"apical": step_of(bare), "plain": step_of(plain)}, "plain")
    rows.append({"model": "GRU 32-64, T 32, batch 64", "D": 0, "t_apical_ms": 1e3 * t["apical"],
                 "t_reference_ms": 1e3 * t["plain"], "reference": "nn.GRU (fused kernel)",
                 "ratio": ratio["apical"], "target": 1.05})
    print(_fmt_row("r", rows[-1]), flush=True)
    for d in args.dendrites[:2]:
        torch.manual_seed(0)
        net = GRUNet().to(device)
        hand = HandGRUNet(net, d).to(device).train()
        pb = copy.deepcopy(net)
        cfg = apical.DendriteConfig(mode="pb")
        apical.perforate(pb, cfg)
        for _, layer in apical.dendritic_layers(pb):
            for _ in range(d):
                layer.install_random(1.0)
            layer.set_training_mode("neuron", perforated=True)
        pb.head = copy.deepcopy(net.head)  # the head plain in both: the row measures the recurrent layer
        pb.to(device).train()
        steps = {"apical": step_of(pb), "hand": step_of(hand), "fused": step_of(copy.deepcopy(plain))}
        t, ratio = timer.compare(steps, "hand")
        rows.append({"model": "GRU 32-64, T 32, batch 64", "D": d, "t_apical_ms": 1e3 * t["apical"],
                     "t_reference_ms": 1e3 * t["hand"], "reference": "the same arithmetic as a plain step loop",
                     "ratio": ratio["apical"], "target": 1.2, "t_fused_gru_ms": 1e3 * t["fused"]})
        print(_fmt_row("r", rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="apical bench speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dendrites", type=int, nargs="+", default=[1, 2, 4], help="D for (a) and (c)")
    p.add_argument("--candidates", type=int, nargs="+", default=[1, 4, 8], help="C for (b)")
    p.add_argument("--phase-dendrites", type=int, default=0, help="installed sets during (b)")
    p.add_argument("--memory-candidates", type=int, default=4)
    p.add_argument("--memory-batches", type=int, nargs=2, default=[20, 80], help="short and long epoch")
    p.add_argument("--sections", default="abcder", help="which sections to run (default abcder); the others "
                   "are kept from an existing report of the same name")
    p.add_argument("--adam", choices=["fused", "default"], default="fused",
                   help="Adam implementation for every model (default: fused where available)")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="wall time, or the thread's CPU time (auto: cpu on a CPU device with 1 thread)")
    p.add_argument("--compile", action="store_true", help="(c): torch.compile both models (inductor)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few repeats, short epochs")
    p.add_argument("--name", default=None, help="output file stem (default speed / speed_<device>)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.memory_batches = 1, 3, [3, 6]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    args.clock = clock
    timer = Timer(device, args.warmup, args.repeats, clock)
    results: dict = {
        "machine": machine_info(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": command,
    }
    if "a" in args.sections:
        results["a"] = section_a(args, timer, device)
    if "b" in args.sections:
        results["b"] = section_b(args, timer, device)
    if "c" in args.sections:
        results["c"] = section_c(args, timer, device)
    if "d" in args.sections:
        results["d"] = section_d(args, device)
    if "r" in args.sections:
        results["r"] = section_r(args, timer, device)
    results["e"] = section_e(args) if "e" in args.sections else {"status": "not run"}
    print(f"[e] {results['e']['status']}")
    if not args.no_write:
        name = args.name or ("speed" if device.type == "cpu" else f"speed_{device.type}")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        previous_path = args.out_dir / f"{name}.json"
        if previous_path.is_file():  # keep the sections not run this time
            previous = json.loads(previous_path.read_text())
            kept = [k for k in "abcder" if k not in args.sections and previous.get(k)
                    and not (k == "e" and previous[k].get("status") == "not run")]
            for k in kept:
                results[k] = previous[k]
            if kept:
                results["kept"] = {"sections": kept, "machine": previous.get("machine", {}),
                                   "command": previous.get("command", "?")}
        (args.out_dir / f"{name}.json").write_text(json.dumps(results, indent=1, default=_json_default))
        write_report(args.out_dir / f"{name}.md", results, command)
        print(f"wrote {args.out_dir / name}.md and .json")
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
