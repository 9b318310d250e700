"""Method ablations: ``apical bench ablate --dataset digits --width 4 --variants a,b,...``.

Each variant is a set of DendriteConfig overrides on top of the current defaults (plus the
neuron-phase patience). Every variant trains the same MLP on the same seeds (same initial
weights per seed), and the report gives each variant's mean test score and its paired
difference to a baseline variant with a 95% confidence interval. Results are appended to
``ablations.jsonl`` and rendered into ``ablations.md`` (one section per dataset and width).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from apical import datasets, models
from apical.bench.common import DEFAULT_OUT, header, markdown_table, mean_std, paired_ci
from apical.dendrites import DendriteConfig
from apical.training import fit

#: name -> DendriteConfig overrides (on top of the library defaults and ``--patience``)
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"mode": "none"},
    "none-long": {"mode": "none", "patience_factor": 4},
    "gd": {"mode": "gd"},
    "pb": {},
    "pb-lr-scale-1": {"candidate_lr_scale": 1.0},
    "pb-lr-scale-30": {"candidate_lr_scale": 30.0},
    "pb-init-1": {"init_scale": 1.0},
    "pb-init-10": {"init_scale": 10.0},
    "pb-pearson": {"normaliser": "pearson"},
    "pb-epoch-centring": {"centring": "epoch"},
    "pb-signed-v": {"output_init": 0.1},
    "pb-c1": {"candidates": 1},
    "pb-c8": {"candidates": 8},
    "pb-long-dendrite-phase": {"dendrite_patience": 10, "max_dendrite_epochs": 100},
    "pb-tanh": {"activation": "tanh"},
    "pb-patience-x2": {"patience_factor": 2},
    "pb-patience-x4": {"patience_factor": 4},
    "pb-inert": {"inert": True},
    "pb-freeze-base": {"freeze_base_after_install": True},
    "pb-r1": {"dendrite_rank": 1},
    "pb-r2": {"dendrite_rank": 2},
    "pb-r4": {"dendrite_rank": 4},
}


def _config(name: str, patience: int, seed: int) -> tuple[DendriteConfig, bool]:
    overrides = dict(VARIANTS[name])
    factor = overrides.pop("patience_factor", 1)
    inert = overrides.pop("inert", False)
    overrides.setdefault("mode", "pb")
    return DendriteConfig(patience=patience * factor, seed=seed, **overrides), inert


def _freeze_v(model: torch.nn.Module, ctl: Any) -> None:
    """The "inert dendrites" control: v held at zero, so dendrites never change the output."""
    from apical.dendrites import dendritic_layers

    for _, layer in dendritic_layers(model):
        with torch.no_grad():
            layer.dendrite_out.zero_()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apical bench ablate", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--width", type=int, default=4, help="hidden width of the MLP")
    parser.add_argument("--layers", type=int, default=1, help="hidden layers of the MLP")
    parser.add_argument("--variants", default="none,none-long,gd,pb", help=f"known: {', '.join(VARIANTS)}")
    parser.add_argument("--baseline", default="none-long")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names + [args.baseline] if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    split = datasets.load(args.dataset, seed=0)
    n_in = int(torch.Size(split.input_shape()).numel())
    hidden = [args.width] * args.layers
    key = {"dataset": args.dataset, "width": args.width, "layers": args.layers, "patience": args.patience,
           "lr": args.lr}
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "ablations.jsonl"
    for name in dict.fromkeys(names + [args.baseline]):
        for seed in range(args.seeds):
            cfg, inert = _config(name, args.patience, seed)
            start = time.perf_counter()
            result = fit(lambda: models.MLP(n_in, hidden, split.n_outputs), split, cfg, lr=args.lr, seed=seed,
                         on_epoch=_freeze_v if inert else None)
            row = {**key, "variant": name, "overrides": VARIANTS[name], "seed": seed,
                   **result.to_dict(), "wall": time.perf_counter() - start}
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{name:24s} seed {seed}: test {result.test_score:.4f} dendrites {result.dendrites} "
                  f"epochs {result.epochs}", flush=True)
    render(log, args.out / "ablations.md", args.baseline, argv)
    return 0


def render(log: Path, out: Path, baseline: str, argv: Sequence[str] | None) -> None:
    """Rewrite ablations.md from every row in ablations.jsonl (latest row per variant and seed)."""
    rows: dict[tuple, dict] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        rows[(r["dataset"], r["width"], r["layers"], r["patience"], r["lr"], r["variant"], r["seed"])] = r
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for k, r in rows.items():
        groups.setdefault(k[:5], {}).setdefault(k[5], {})[k[6]] = r
    parts = [header("Method ablations", ["bench", "ablate", *(argv or [])]),
             "\nEach row: the variant's DendriteConfig overrides, its mean test score over seeds, and the "
             f"paired difference to `{baseline}` (same seeds, same initial weights) with a 95% CI. "
             "Rows come from `benchmarks/results/ablations.jsonl`; the latest run of each (variant, seed) "
             "counts.\n"]
    for (dataset, width, layers, patience, lr), variants in sorted(groups.items()):
        parts.append(f"\n## {dataset}, MLP hidden {[width] * layers}, patience {patience}, Adam lr {lr}\n\n")
        base = variants.get(baseline, {})
        table = []
        for name, by_seed in variants.items():
            seeds = sorted(by_seed)
            tests = [by_seed[s]["test_score"] for s in seeds]
            m, sd = mean_std(tests)
            common = [s for s in seeds if s in base]
            if common and name != baseline:
                d, lo, hi = paired_ci([by_seed[s]["test_score"] for s in common],
                                      [base[s]["test_score"] for s in common])
                diff = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            else:
                diff = "-"
            avg = {f: mean_std([by_seed[s][f] for s in seeds])[0] for f in ("dendrites", "parameters", "epochs",
                                                                             "seconds")}
            table.append([name, f"`{json.dumps(VARIANTS.get(name, by_seed[seeds[0]]['overrides']))}`",
                          len(seeds), f"{m:.4f} ± {sd:.4f}", diff, f"{avg['dendrites']:.1f}",
                          f"{avg['parameters']:.0f}", f"{avg['epochs']:.0f}", f"{avg['seconds']:.1f}"])
        parts.append(markdown_table(["variant", "overrides", "seeds", "test", f"paired vs {baseline}",
                                     "dendrites", "params", "epochs", "seconds"], table))
    out.write_text("".join(parts))
