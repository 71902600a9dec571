# Quick start: `make demo` (set up, then run the benchmark on the embedded data) and `make test` (set up, then the tests).
# `make test-fast`: the tests that neither train real models nor start entry scripts (markers in pyproject.toml).
# Both run the test files in parallel worker processes (pytest-xdist; one file per worker at a time, so a file's shared
# fixtures are built once), each with one torch thread: much of a test is single-threaded Python, so two workers keep
# 2 cores busier than one process with two threads. `python -m pytest tests` runs the same tests in one process.
PYTEST_PARALLEL := -n auto --maxprocesses 4 --dist loadfile
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
	$(PY) benchmark.py --epoch-eval masked

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_PARALLEL) tests

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow and not integration and not perf" tests

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf benchmark_out results mlflow.db .pytest_cache
