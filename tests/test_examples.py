"""Run every example in examples/ with ``--smoke`` in a fresh interpreter and check its output.

Each example is a script; a few seconds each on two CPU cores. The demo (mnist_mlp.py)
also trains the same model in Keras 3 and prints how far its weights are from
adamx's: the first steps must agree to float32 rounding.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> strings its --smoke output must contain
EXPECTED = {
    "lazy_embeddings.py": [
        "untouched rows unchanged (weights and moments, bit for bit): True",
        "every seen row moved: True",
        "lazy embeddings: OK",
    ],
    "mnist_mlp.py": [
        "data=digits",
        "optimizer config, opt.get_config():",
        "learning_rate: 0.0010000000474974513",
        "keras config == adamx config: True",
        "adamx vs Keras agreement: OK",
        "smoke run: test accuracy",
    ],
    "linear_regression.py": ["recovered w =", "smoke run: loss went down"],
    "custom_train_step_clipping.py": [
        "clipnorm=0.5 (each tensor)",
        "global_clipnorm=0.5 (jointly)",
        "dense1/bias     excluded",
        "dense1/kernel   decayed",
        "clipping: OK",
        "weight decay mask: OK",
        "training: OK",
    ],
    "custom_hyperparameters.py": [
        "state has nu_max",
        "ExponentialDecay",
        "<- overwritten with the EMA",
        "round trip identical: True",
        "InverseTimeDecay",
        "keras accepts the configs: OK",
    ],
}


RUNS = {name: ("--smoke",) for name in EXPECTED} | {"mnist_mlp.py eager": ("--smoke", "--keras-eager")}


class Run:
    """One example started in a subprocess; ``result()`` waits for it."""

    def __init__(self, key: str, args: tuple[str, ...]):
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        env.pop("KERAS_BACKEND", None)  # the examples choose JAX themselves
        # `make test` simulates 8 CPU devices for adamx's sharding tests; the examples need one.
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags)
        self.key = key
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / key.split()[0]), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=EXAMPLES.parent,
        )
        self._out: tuple[str, str] | None = None

    def result(self) -> tuple[int, str, str]:
        if self._out is None:
            try:
                self._out = self.proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._out = self.proc.communicate()
                pytest.fail(f"{self.key} timed out\n{self._out[0]}\n{self._out[1]}")
        return self.proc.returncode, self._out[0], self._out[1]


@pytest.fixture(scope="module")
def runs():
    """Start all example runs at once (they overlap on the two cores), wait for each where it is checked."""
    started = {key: Run(key, args) for key, args in RUNS.items()}
    yield started
    for r in started.values():
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.communicate()


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_smoke(name, runs):
    rc, out, err = runs[name].result()
    assert rc == 0, f"{name} exited {rc}\n--- stdout\n{out}\n--- stderr\n{err}"
    missing = [s for s in EXPECTED[name] if s not in out]
    assert not missing, f"{name}: missing {missing} in its output:\n{out}"


def parse_diffs(out: str) -> dict[int, float]:
    """``{step: max |w_adamx - w_keras|}`` from the demo's "after step N: max_abs_diff = D" lines."""
    found = re.findall(r"after step\s+(\d+)\S*\s*: max_abs_diff = (\S+)", out)
    return {int(step): float(d) for step, d in found}


def check_first_steps(out: str) -> None:
    diffs = parse_diffs(out)
    assert {1, 10} <= set(diffs), out
    # Weights are O(0.1) and each step moves them by up to lr = 1e-3; float32 rounding of
    # a step is ~1e-8. A different update rule shows up at >= 1e-5 after one step: the
    # optax-epsilon control run printed by the demo differs from Keras by ~7e-4.
    assert diffs[1] <= 1e-6, diffs
    assert diffs[10] <= 1e-5, diffs
    control = re.search(r"control, optax\.adam.*?step 1: (\S+),", out)
    assert control is not None, out
    assert float(control.group(1)) > 1e-5, "the comparison must tell optax's epsilon placement from Keras's"


def test_mnist_adamx_matches_keras_in_first_steps(runs):
    """adamx.adam() and keras.optimizers.Adam() (jitted model.fit), same weights and batches: float32 agreement."""
    rc, out, err = runs["mnist_mlp.py"].result()
    assert rc == 0, f"--- stdout\n{out}\n--- stderr\n{err}"
    check_first_steps(out)


def test_mnist_adamx_matches_eager_keras_in_first_steps(runs):
    """Against Keras run without jit_compile, a program that rounds differently: still float32-level agreement."""
    rc, out, err = runs["mnist_mlp.py eager"].result()
    assert rc == 0, f"--- stdout\n{out}\n--- stderr\n{err}"
    assert "jit_compile=False" in out
    check_first_steps(out)
