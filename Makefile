# Quick start: `make train` (set up, then train configs/default.py) and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
PYTEST_ARGS ?=

.PHONY: setup train test lint bench clean

setup: $(STAMP)

# Reinstall only when the dependency list changes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py --config=configs/default.py --workdir=$(WORKDIR)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not slow" --durations=10 $(PYTEST_ARGS) tests

# Long checks and benchmarks: run by hand, results recorded in benchmarks/results/.
bench: $(STAMP)
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
