"""Two processes x two CPU devices (``jax.distributed.initialize`` on 127.0.0.1, gloo collectives).

The workers are the documented ones of ``examples/stacks/multiprocess_launcher.py``,
started here with ``subprocess`` on a port chosen at run time, bounded by a timeout,
and killed in a ``finally`` if still alive. Their params must equal the single-device
eager reference of the same problem (tolerance: see stack_utils; the global-batch
gradient is summed across 4 devices in another order).
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from stack_utils import N_STEPS, assert_trees_close, batches, init_mlp, reference

LAUNCHER = Path(__file__).resolve().parents[2] / "examples" / "stacks" / "multiprocess_launcher.py"
TIMEOUT = 120.0
PROCESSES, DEVICES = 2, 2


def load_launcher():
    spec = importlib.util.spec_from_file_location("multiprocess_launcher", LAUNCHER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_workers(mp, out_dir: Path, zero1: bool) -> dict[int, str]:
    """Start the workers on a fresh port, wait (bounded), kill any left in ``finally``; returns their outputs."""
    port = mp.free_port()
    procs: list[subprocess.Popen] = []
    outputs: dict[int, str] = {}
    try:
        for i in range(PROCESSES):
            cmd = mp.worker_command(i, port, PROCESSES, DEVICES, N_STEPS, str(out_dir), TIMEOUT, zero1)
            procs.append(
                subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mp.worker_env(DEVICES)
                )
            )
        deadline = time.monotonic() + TIMEOUT
        for i, p in enumerate(procs):
            outputs[i], _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                if any(s in outputs[i] for s in mp.PORT_TAKEN):
                    break  # the others cannot connect: kill them now, the caller retries on a new port
                raise AssertionError(f"worker {i} exited with {p.returncode}:\n{outputs[i][-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            if p.stdout is not None:
                p.stdout.close()
    assert all(p.poll() is not None for p in procs)  # nothing left running
    return outputs


@pytest.mark.parametrize("zero1", [False, True], ids=["replicated_state", "zero1_state"])
def test_two_processes_match_single_process(tmp_path, zero1):
    mp = load_launcher()
    # the launcher trains the suite's standard problem
    np.testing.assert_array_equal(mp.init_params_np()["dense"]["kernel"], np.asarray(init_mlp()["dense"]["kernel"]))
    np.testing.assert_array_equal(mp.batches_np(N_STEPS)[-1][1], np.asarray(batches()[-1][1]))

    outputs = run_workers(mp, tmp_path, zero1)
    if any(any(s in out for s in mp.PORT_TAKEN) for out in outputs.values()):  # lost the port race: once more
        outputs = run_workers(mp, tmp_path, zero1)
    for i, out in outputs.items():
        assert f"[process {i}/{PROCESSES}] {DEVICES} local of {PROCESSES * DEVICES} devices" in out, out[-4000:]

    ref_params, _ = reference("full")
    results = []
    for i in range(PROCESSES):
        with np.load(tmp_path / f"params_{i}.npz") as f:
            results.append({k: f[k] for k in f.files})
    for k in results[0]:
        np.testing.assert_array_equal(results[1][k], results[0][k], err_msg=f"processes disagree on {k}")
    expected = {f"{a}/{b}": np.asarray(v) for a, sub in ref_params.items() for b, v in sub.items()}
    assert sorted(expected) == sorted(results[0])
    assert_trees_close(results[0], expected, what="multi-process params")
