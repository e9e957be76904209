# One command for the demo, one for the tests; each sets up its own environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench refs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,examples,bench]"
	$(PY) -m pip install -q torch==2.13.0 || echo "torch 2.13.0 not installable here: torch comparisons are skipped by the benchmarks only"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/mnist_mlp.py

lint: $(STAMP)
	$(VENV)/bin/ruff check adamx tests examples benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) lint
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
