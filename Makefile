# One command for the demo, one for the tests; each sets up its own environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-accel lint docs bench bench-quick bench-features clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $@

$(VENV)/.docs: $(VENV)/.base
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

$(VENV)/.bench: $(VENV)/.base
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pip install -q torch==2.13.0 || echo "torch 2.13.0 is not installable here: the benchmarks run without the torch peers"
	touch $@

demo: $(VENV)/.base
	$(PY) examples/mnist_mlp.py

lint: $(VENV)/.base
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# the docs site: docs/*.md and the API reference from the docstrings, into site/ (warnings are errors)
docs: $(VENV)/.docs
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs site

TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 ADAMX_REQUIRE_FUSED=1 ADAMX_KERNEL_WERROR=1

test: lint docs
	$(TEST_ENV) $(VENV)/bin/pytest -q

# the tests not marked slow (tests/conftest.py's SLOW list; `make test` runs every test): 558 of 1644
# tests, 3 min 39 s wall on the idle 2-core machine (load 1.3); the full `make test` took 19 min there
test-fast: $(VENV)/.base
	$(TEST_ENV) $(VENV)/bin/pytest -q -m "not slow"

# the accelerator check: the step compiled deviceless for a TPU v5e and an H100 (tests/accel/)
test-accel: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test,accel]"
	@echo "test-accel: tests/accel/test_tpu.py (TPU v5e, libtpu) and tests/accel/test_gpu.py (H100, jax CUDA plugin)"
	JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=-1 ADAMX_REQUIRE_ACCEL=1 $(VENV)/bin/pytest -q -rA tests/accel

bench: $(VENV)/.bench
	$(PY) -m benchmarks run
	$(PY) -m benchmarks convergence

# every benchmark is `python -m benchmarks <name> [args]` (`--list` names them)
# the feature benchmarks: lazy rows, loss scaling, bf16 param rounding, 8-bit state (about 25 minutes)
bench-features: $(VENV)/.bench
	$(PY) -m benchmarks lazy
	$(PY) -m benchmarks loss_scale
	$(PY) -m benchmarks mixed_precision
	$(PY) -m benchmarks quantized_convergence
	$(PY) -m benchmarks quantized_speed
	$(PY) -m benchmarks quantized_codec

bench-quick: $(VENV)/.bench
	$(PY) -m benchmarks run --quick
	$(PY) -m benchmarks convergence --quick --out benchmarks/results/quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
