"""Every example in examples/stacks/ runs with ``--smoke`` in a fresh interpreter, warnings as errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STACKS = Path(__file__).resolve().parents[2] / "examples" / "stacks"

# script (and extra args) -> strings its --smoke output must contain
EXPECTED = {
    ("linen_train.py",): ["opt_state buffers shared with params: 0", "EMA weights", "smoke run: loss", ": OK"],
    ("nnx_train.py",): ["EMA weights", "smoke run: loss", ": OK"],
    ("equinox_train.py",): ["filtered tree: activation=None", "EMA weights", "smoke run: loss", ": OK"],
    ("data_parallel.py",): [
        "8 devices",
        "ZeRO-1 optimizer state per device",
        "shard_map+pmean",
        "smoke run: all three agree: OK",
    ],
    ("multiprocess_launcher.py",): [
        "launching 2 processes x 2 CPU devices",
        "[process 0/2] 2 local of 4 devices",
        "[process 1/2] 2 local of 4 devices",
        "smoke run: multi-process == single-process: OK",
    ],
}


def test_every_example_is_listed():
    assert sorted({k[0] for k in EXPECTED}) == sorted(p.name for p in STACKS.glob("*.py"))


@pytest.mark.parametrize("script", list(EXPECTED), ids=[" ".join(k) for k in EXPECTED])
def test_example_smoke(script):
    name, *extra = script
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-W", "ignore::DeprecationWarning", str(STACKS / name), "--smoke", *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=STACKS.parents[1],
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{out[-4000:]}"
    for s in EXPECTED[script]:
        assert s in proc.stdout, f"{name}: {s!r} not in output:\n{proc.stdout[-3000:]}"
