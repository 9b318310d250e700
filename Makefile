# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both build .venv first if it is missing (pinned CPU build of torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean mutate

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

# Mutation testing of the core (slow: about half an hour on 2 cores; not part of `make test`).
# Config in pyproject.toml [tool.mutmut]; the report lands in docs/mutation.md.
mutate: $(STAMP)
	$(PY) -m pip install -q -e ".[mutate]" "$(TORCH_PIN)"
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 || true
	$(PY) tools/mutation_report.py

bench: $(STAMP)
	$(VENV)/bin/apical bench digits

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info mutants
