# One command for the demo, one for the tests; each sets up its own environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-accel lint bench bench-quick bench-features clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,examples]"
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

test: lint
	JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 ADAMX_REQUIRE_FUSED=1 ADAMX_KERNEL_WERROR=1 $(VENV)/bin/pytest -q

# the accelerator check: the step compiled deviceless for a TPU v5e and an H100 (tests/accel/)
test-accel: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test,accel]"
	@echo "test-accel: tests/accel/test_tpu.py (TPU v5e, libtpu) and tests/accel/test_gpu.py (H100, jax CUDA plugin)"
	JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=-1 ADAMX_REQUIRE_ACCEL=1 $(VENV)/bin/pytest -q -rA tests/accel

bench: $(VENV)/.bench
	$(PY) benchmarks/run.py
	$(PY) benchmarks/convergence.py

# the feature benchmarks: lazy rows, loss scaling, bf16 param rounding, 8-bit state (about 25 minutes)
bench-features: $(VENV)/.bench
	PYTHONPATH=. $(PY) benchmarks/lazy.py
	PYTHONPATH=. $(PY) benchmarks/loss_scale.py
	PYTHONPATH=. $(PY) benchmarks/mixed_precision.py
	PYTHONPATH=. $(PY) benchmarks/quantized_convergence.py
	PYTHONPATH=. $(PY) benchmarks/quantized_speed.py
	PYTHONPATH=. $(PY) benchmarks/quantized_codec.py

bench-quick: $(VENV)/.bench
	$(PY) benchmarks/run.py --quick
	$(PY) benchmarks/convergence.py --quick --out benchmarks/results/quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
