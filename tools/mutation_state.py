"""Keep mutmut's verdicts in the repository, so that a mutation run can be finished over several sessions.

    python tools/mutation_state.py save      # mutants/**/*.py.meta -> benchmarks/results/mutation-state.json
    python tools/mutation_state.py restore   # the reverse, before `mutmut run` (make mutate-resume)
    python tools/mutation_state.py pending 'apical.checkpoint.*'   # names without a kill, for `mutmut run NAMES`

Only *kills* are restored, and only for functions whose source is unchanged (mutmut compares each
function's hash and re-tests a changed one): tests are only ever added or strengthened, so a kill stays a
kill, while a survivor, a mutant without tests and an unchecked mutant are all tested again. ``save``
keeps an earlier verdict (a survivor, say) that the run did not reach, if its function is unchanged,
so that a partial run never makes the report look better than what is known.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "benchmarks" / "results" / "mutation-state.json"
MUTANTS = ROOT / "mutants"
KILLED = {1, 3, -24, 24, 152, 255, 36, -11, -9}  # as in tools/mutation_report.py


def save() -> int:
    metas = sorted((MUTANTS / "src").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: nothing to save", file=sys.stderr)
        return 2
    previous = json.loads(STATE.read_text()) if STATE.exists() else {}
    state = {}
    kept = 0
    for meta in metas:
        data = json.loads(meta.read_text())
        rel = meta.relative_to(MUTANTS).as_posix()
        codes = dict(data["exit_code_by_key"])
        hashes = data.get("hash_by_function_name", {})
        old = previous.get(rel, {})
        old_codes, old_hashes = old.get("exit_code_by_key", {}), old.get("hash_by_function_name", {})
        for key, code in codes.items():
            # a verdict this run did not reach (a survivor is restored as unchecked) stays known,
            # as long as its function is unchanged
            func = key.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
            if code is None and old_codes.get(key) is not None and old_hashes.get(func) == hashes.get(func):
                codes[key] = old_codes[key]
                kept += 1
        state[rel] = {"exit_code_by_key": codes, "hash_by_function_name": hashes}
        if codes != data["exit_code_by_key"]:  # the report reads the metas: give it the known verdicts too
            meta.write_text(json.dumps({**data, "exit_code_by_key": codes}))
    if kept:
        print(f"kept {kept} earlier verdicts of unchanged functions that this run did not reach")
    STATE.write_text(json.dumps(state, indent=0, sort_keys=True) + "\n")
    done = sum(v is not None for s in state.values() for v in s["exit_code_by_key"].values())
    total = sum(len(s["exit_code_by_key"]) for s in state.values())
    print(f"saved {done} of {total} verdicts to {STATE.relative_to(ROOT)}")
    return 0


def restore() -> int:
    if not STATE.exists():
        print(f"no {STATE.relative_to(ROOT)}: a full run starts from scratch", file=sys.stderr)
        return 0
    state = json.loads(STATE.read_text())
    kept = 0
    for rel, entry in state.items():
        codes = {k: (v if v in KILLED else None) for k, v in entry["exit_code_by_key"].items()}
        kept += sum(v is not None for v in codes.values())
        path = MUTANTS / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": entry["hash_by_function_name"],
                                    "type_check_error_by_key": {}, "durations_by_key": {},
                                    "estimated_durations_by_key": {}}))
    print(f"restored {kept} kills from {STATE.relative_to(ROOT)}; everything else is tested again")
    return 0


def pending(patterns: list[str]) -> int:
    """Print the stored mutants matching ``patterns`` (fnmatch) that have no kill, one per line:
    ``mutmut run $(python tools/mutation_state.py pending 'apical.checkpoint.*')`` tests just those
    (named mutants are always re-run, so naming the kills too would redo them)."""
    import fnmatch

    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    for entry in state.values():
        for key, code in sorted(entry["exit_code_by_key"].items()):
            if code not in KILLED and any(fnmatch.fnmatch(key, p) for p in patterns or ["*"]):
                print(key)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore", "pending"))
    parser.add_argument("patterns", nargs="*", help="for pending: mutant-name patterns (default: all)")
    args = parser.parse_args(argv)
    if args.action == "pending":
        return pending(args.patterns)
    return save() if args.action == "save" else restore()


if __name__ == "__main__":
    raise SystemExit(main())
