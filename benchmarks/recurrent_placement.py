"""Where a recurrent neuron's dendrites enter: the gates' pre-activations (apical's default) or the
new hidden state. Trains pb on the sequence suite's task (digits read row by row by a GRU, width
1/4) with the hidden-state placement, and compares it, paired by seed, with the gate placement's
pb runs of ``benchmarks/results/digits-gru/trial.jsonl`` (same task, seeds and settings).

    python benchmarks/recurrent_placement.py [--seeds 5]

Writes ``benchmarks/results/digits-gru-placement/`` (the trial's files and ``placement.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import apical
from apical import tasks
from apical.stats import mean_std, paired_ci

OUT = Path("benchmarks/results/digits-gru-placement")
GATES = Path("benchmarks/results/digits-gru/trial.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = tasks.get("digits-gru")
    with apical.layer_registry.registered(nn.GRU, apical.DendriticGRUOnHidden):
        hidden = apical.trial(task, modes=("pb",), seeds=args.seeds, widths=(0.25,), out=OUT / "hidden",
                              progress=False, log=print, command="python benchmarks/recurrent_placement.py")
    gates = [json.loads(line) for line in GATES.read_text().splitlines() if line.strip()]
    rows, pairs = [], {}
    for name, records in (("gates", [r for r in gates if r["mode"] == "pb" and r["for_width"] == 0.25]),
                          ("hidden", [r for r in hidden.records if r["mode"] == "pb"])):
        by_seed = {int(r["seed"]): r for r in records if int(r["seed"]) < args.seeds}
        pairs[name] = by_seed
        if by_seed:
            test = mean_std([r["test"] for r in by_seed.values()])
            params = mean_std([r["parameters"] for r in by_seed.values()])
            dend = mean_std([r["dendrites"] for r in by_seed.values()])
            rows.append(f"| {name} | {len(by_seed)} | {test[0]:.4f} ± {test[1]:.4f} | {params[0]:,.0f} | "
                        f"{dend[0]:.1f} |")
    seeds = sorted(set(pairs["gates"]) & set(pairs["hidden"]))
    lines = ["# Where a recurrent neuron's dendrites enter", "",
             f"- command: `python benchmarks/recurrent_placement.py --seeds {args.seeds}`",
             "- task: digits-gru (digits read row by row, GRU with 4 hidden units at width 1/4), pb, seeds "
             f"{seeds}; gate placement from `{GATES}`", "",
             "| placement | runs | test | parameters | dendrites |", "|---|---|---|---|---|", *rows, ""]
    if len(seeds) >= 2:
        d, lo, hi = paired_ci([pairs["hidden"][s]["test"] for s in seeds], [pairs["gates"][s]["test"] for s in seeds])
        lines.append(f"hidden - gates, paired over {len(seeds)} seeds: {d:+.4f} (95% CI {lo:+.4f} to {hi:+.4f})")
    (OUT / "placement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
