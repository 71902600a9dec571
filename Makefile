# Quick start: `make demo` (set up, then run the benchmark on the embedded data) and `make test` (set up, then the tests).
# `make test-fast`: the tests that neither train real models nor start entry scripts (markers in pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) benchmark.py

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration and not perf" tests

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf benchmark_out results mlflow.db .pytest_cache
