"""Summarise a mutmut run (``make mutate``) as a markdown report with kill rates per module.

Run from the repository root after ``mutmut run``: it reads ``mutants/**/*.meta`` (mutmut's
results) and the diff of each mutant that was not killed, matches those diffs against the
committed list of equivalent mutants (``tools/mutation_equivalent.toml``: mutants that cannot
change behaviour, each with its reason), and writes the report.

    python tools/mutation_report.py [--out docs/mutation.md]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.toml"
GROUPS = {  # report group -> path prefix inside src/; the targets
    "dendrites/": ("apical/dendrites/", 0.90),
    "checkpoint.py": ("apical/checkpoint.py", 0.90),
    "grapes.py": ("apical/grapes.py", 0.85),
    "export.py": ("apical/export.py", 0.85),
}
# mutmut's exit-code meanings (mutmut.stats.status_by_exit_code)
KILLED = {1, 3, -24, 24, 152, 255, 36, -11, -9}  # a failing test, a timeout or a crash detects the mutant
SURVIVED = {0}
NO_TESTS = {5, 33}


def _changed_lines(diff: str) -> tuple[str, str]:
    """The removed and added lines of a unified diff, whitespace-normalised, joined by ' / '."""
    old, new = [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++", "@@")):
            continue
        if line.startswith("-"):
            old.append(" ".join(line[1:].split()))
        elif line.startswith("+"):
            new.append(" ".join(line[1:].split()))
    return " / ".join(old), " / ".join(new)


def _function_of(key: str) -> str:
    """``apical.grapes.x_grapes__mutmut_43`` -> ``apical.grapes.grapes``; methods keep their class."""
    module, _, rest = key.rpartition(".")
    rest = re.sub(r"__mutmut_\d+$", "", rest)
    rest = rest.replace("ǁ", ".").lstrip("x").lstrip("_") if "ǁ" in rest else re.sub(r"^x_", "", rest)
    return f"{module}.{rest.strip('.')}"


def _head() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def load_equivalent() -> list[dict]:
    if not EQUIVALENT.exists():
        return []
    entries = tomllib.loads(EQUIVALENT.read_text()).get("mutant", [])
    for e in entries:
        for field in ("function", "old", "new", "reason"):
            if field not in e:
                raise ValueError(f"{EQUIVALENT.name}: an entry lacks {field!r}: {e}")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "mutation.md"))
    parser.add_argument("--mutants", default=str(ROOT / "mutants"))
    parser.add_argument("--how", default="one `make mutate` run",
                        help="how the results were obtained, for the report's first line")
    args = parser.parse_args(argv)
    mutants = Path(args.mutants)
    metas = sorted((mutants / "src").rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {mutants}: run `make mutate` first", file=sys.stderr)
        return 2
    sys.path.insert(0, str(mutants / "src"))
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    equivalent = load_equivalent()
    used = [0] * len(equivalent)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    open_rows: dict[str, list[str]] = defaultdict(list)
    equiv_rows: dict[str, list[str]] = defaultdict(list)
    for meta in metas:
        rel = meta.relative_to(mutants / "src").as_posix()[: -len(".meta")]
        group = next((g for g, (prefix, _) in GROUPS.items() if rel.startswith(prefix)), None)
        if group is None:
            continue
        data = json.loads(meta.read_text())
        source = meta.with_suffix("")  # the trampolined copy holds every mutant's code
        for key, code in sorted(data["exit_code_by_key"].items()):
            c = counts[rel]
            c["total"] += 1
            if code in KILLED:
                c["killed"] += 1
                continue
            if code is None:
                c["not checked"] += 1
                continue
            status = "survived" if code in SURVIVED else "no tests" if code in NO_TESTS else f"exit {code}"
            diff = get_diff_for_mutant(key, path=source)  # reads the two functions through mutmut's line index
            old, new = _changed_lines(diff)
            func = _function_of(key)
            hit = next((i for i, e in enumerate(equivalent)
                        if e["function"] == func and e["old"] == old and e["new"] == new), None)
            row = f"| `{func}` | {status} | `{old}` | `{new}` |"
            if hit is not None:
                used[hit] += 1
                c["equivalent"] += 1
                equiv_rows[rel].append(row[:-1] + f" {equivalent[hit]['reason']} |")
            else:
                c["open"] += 1
                c[status] += 1
                open_rows[rel].append(row)
    stale = [e for e, n in zip(equivalent, used, strict=True) if n == 0]

    lines = [
        "# Mutation testing",
        "",
        f"{args.how} (mutmut; config in `pyproject.toml`), summarised by `tools/mutation_report.py` on "
        f"{date.today()}, commit {_head()}.",
        "A mutant is killed when a test fails, times out or crashes with it. Equivalent mutants (they cannot "
        "change behaviour) are listed in `tools/mutation_equivalent.toml`, each with its reason, and left out "
        "of the kill rate: kill rate = killed / (mutants - equivalent).",
        "",
        "mutmut runs, for each mutant, the tests that reach its function in one process (`pyproject.toml` lists "
        "the ones it leaves out: tests in other processes import the unmutated package, and the torch.compile, "
        "ONNX, CLI and benchmark tests take seconds each). *Not checked* mutants were not reached before the run "
        "stopped; `make mutate-resume` continues from `benchmarks/results/mutation-state.json` (kills of unchanged "
        "functions are kept, everything else is tested again). The kill rate is over the mutants checked; the "
        "*worst case* counts every unchecked mutant as a survivor, and a target it meets is met whatever the "
        "unchecked mutants turn out to be.",
        "",
        "| module | mutants | killed | equivalent | survived | no tests | not checked | kill rate | worst case "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdict_ok = True
    for group, (prefix, target) in GROUPS.items():
        mods = sorted(m for m in counts if m.startswith(prefix))
        rows = [(m, counts[m]) for m in mods]
        if len(mods) > 1:
            tot = defaultdict(int)
            for _, c in rows:
                for k, v in c.items():
                    tot[k] += v
            rows.append((f"**{group} (all)**", tot))
        for name, c in rows:
            whole = c["total"] - c["equivalent"]
            denom = whole - c["not checked"]
            rate = c["killed"] / denom if denom else None  # nothing checked: no rate, not 100%
            worst = c["killed"] / whole if whole else None
            is_group = name.startswith("**") or len(mods) == 1
            mark = ""
            if is_group:
                ok = rate is not None and rate >= target
                verdict_ok &= ok
                unfinished = c["not checked"] > 0 and not (worst is not None and worst >= target)
                mark = f"{target:.0%} {'met' if ok else 'missed'}{' so far' if unfinished else ''}"
            shown = "n/a" if rate is None else f"{rate:.1%}"
            low = "n/a" if worst is None else f"{worst:.1%}"
            lines.append(f"| {name} | {c['total']} | {c['killed']} | {c['equivalent']} | {c['survived']} | "
                         f"{c['no tests']} | {c['not checked']} | {shown} | {low} | {mark} |")
    lines += ["", "## Mutants not killed", ""]
    for rel in sorted(open_rows):
        lines += [f"### {rel}", "", "| function | status | original | mutant |", "|---|---|---|---|",
                  *open_rows[rel], ""]
    lines += ["## Equivalent mutants", ""]
    for rel in sorted(equiv_rows):
        lines += [f"### {rel}", "", "| function | status | original | mutant | why it is equivalent |",
                  "|---|---|---|---|---|", *equiv_rows[rel], ""]
    if stale:
        lines += ["## Equivalence entries that matched no mutant this run", "",
                  *[f"- `{e['function']}`: `{e['old']}` -> `{e['new']}`" for e in stale], ""]
    Path(args.out).write_text("\n".join(lines).replace("\n\n\n", "\n\n"))
    print("\n".join(lines[7:7 + 20]))
    print(f"report: {args.out}; targets {'met' if verdict_ok else 'not all met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
