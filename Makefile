# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both build .venv first if it is missing (pinned CPU build of torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean mutate mutate-resume

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,test,bench,progress,lightning]" "$(TORCH_PIN)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apical demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples tools
	$(PY) -m pytest

# Mutation testing of the core (slow: hours on 2 cores; not part of `make test`). Config in
# pyproject.toml [tool.mutmut]; the report lands in docs/mutation.md and the verdicts in
# benchmarks/results/mutation-state.json. `mutate` starts from scratch; `mutate-resume` keeps the
# committed kills of unchanged functions and tests everything else (a run can span sessions).
mutate: $(STAMP)
	rm -f benchmarks/results/mutation-state.json
	$(MAKE) mutate-resume

mutate-resume: $(STAMP)
	$(PY) -m pip install -q -e ".[mutate]" "$(TORCH_PIN)"
	rm -rf mutants
	$(PY) tools/mutation_state.py restore
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 || echo "mutmut stopped early: the report counts what it checked"
	$(PY) tools/mutation_state.py save
	$(PY) tools/mutation_report.py

bench: $(STAMP)
	$(VENV)/bin/apical bench digits

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info mutants
