"""Multi-process data-parallel adamx on one machine: N processes x M CPU devices, gloo collectives.

Launcher (default): picks a free port on 127.0.0.1, starts N copies of this script as
workers, waits for them (bounded by ``--timeout``; any worker still running is killed
on the way out, whatever happens) and checks their result against the same training
run in this single process.

Worker (``--worker --process-id I --port P``): joins the job with::

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{P}", num_processes=N, process_id=I)

then builds one mesh over all N*M devices, keeps the params (and optimizer state)
replicated, splits every global batch over the ``data`` axis (each process creates
only its own devices' rows, ``jax.make_array_from_callback``) and runs the same jitted
step. With ``--zero1`` the optimizer state is split over ``data`` instead (ZeRO-1,
``adamx.sharding.zero1_state_sharding``), across processes. Each worker writes its
final params to ``--out-dir/params_I.npz``.

On a real cluster, start the worker command on every host with the coordinator's
address instead of 127.0.0.1 (or call ``jax.distributed.initialize()`` without
arguments under SLURM / Cloud TPU, which fill them in).

``--smoke``: few steps (tests). Exit status 1 if the processes disagree with each
other or with the single-process run by more than 1e-5.

Run: ``python examples/stacks/multiprocess_launcher.py [--processes 2] [--devices 2] [--zero1]``
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IN, HIDDEN, BATCH = 4, 16, 16
LEARNING_RATE = 1e-2


# ---------------------------------------------------------------------------
# the training problem (numpy only, so the launcher can build it before jax starts)
# ---------------------------------------------------------------------------
def init_params_np(seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": (r.standard_normal((IN, HIDDEN)) * 0.5).astype(np.float32),
            "bias": np.zeros(HIDDEN, np.float32),
        },
        "out": {"kernel": (r.standard_normal((HIDDEN, 2)) * 0.5).astype(np.float32), "bias": np.zeros(2, np.float32)},
    }


def batches_np(steps: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [
        (r.standard_normal((BATCH, IN)).astype(np.float32), (3.0 * r.standard_normal((BATCH, 2))).astype(np.float32))
        for _ in range(steps)
    ]


def loss(p, x, y):
    import jax.numpy as jnp

    h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2)


def make_tx():
    import adamx

    return adamx.adam(
        learning_rate=LEARNING_RATE,
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=3,
        gradient_accumulation_steps=2,
    )


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


# ---------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.processes,
        process_id=args.process_id,
        initialization_timeout=int(args.timeout),
    )
    try:
        import optax
        from jax.sharding import AxisType, NamedSharding
        from jax.sharding import PartitionSpec as P

        from adamx.sharding import bytes_per_device, replicated_sharding, zero1_state_sharding

        n = jax.device_count()
        assert n == args.processes * args.devices, (n, args.processes, args.devices)
        axis_type = AxisType.Auto if args.zero1 else AxisType.Explicit
        mesh = jax.make_mesh((n,), ("data",), axis_types=(axis_type,))
        tx = make_tx()
        rep = NamedSharding(mesh, P())
        data_sharding = NamedSharding(mesh, P("data"))

        def global_array(a: np.ndarray, sharding):
            # every process knows the whole batch here; each materializes only its own devices' rows
            return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

        def step(params, state, x, y):
            updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
            return optax.apply_updates(params, updates), state

        with jax.set_mesh(mesh):
            params = jax.tree.map(lambda a: global_array(a, rep), init_params_np())
            if args.zero1:
                state_sh = zero1_state_sharding(jax.eval_shape(tx.init, params), mesh)
                state = jax.jit(tx.init, out_shardings=state_sh)(params)
                jstep = jax.jit(step, out_shardings=(replicated_sharding(params, mesh), state_sh))
            else:
                state = jax.jit(tx.init)(params)
                jstep = jax.jit(step)
            for x, y in batches_np(args.steps):
                params, state = jstep(params, state, global_array(x, data_sharding), global_array(y, data_sharding))
            local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
            state_bytes = max(bytes_per_device(state).values())
        out = Path(args.out_dir) / f"params_{args.process_id}.npz"
        np.savez(out, **flatten(local))
        print(
            f"[process {jax.process_index()}/{jax.process_count()}] {jax.local_device_count()} local of "
            f"{n} devices, optimizer state {state_bytes} bytes/device, wrote {out.name}",
            flush=True,
        )
    finally:
        jax.distributed.shutdown()
    return 0


# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(
    process_id: int, port: int, processes: int, devices: int, steps: int, out_dir: str, timeout: float, zero1: bool
) -> list[str]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--process-id",
        str(process_id),
        "--port",
        str(port),
        "--processes",
        str(processes),
        "--devices",
        str(devices),
        "--steps",
        str(steps),
        "--out-dir",
        out_dir,
        "--timeout",
        str(timeout),
    ]
    return cmd + (["--zero1"] if zero1 else [])


def worker_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


PORT_TAKEN = ("already in use", "Failed to add port")  # the free port was grabbed before the coordinator bound it


def run_workers(
    processes: int, devices: int, steps: int, out_dir: str, timeout: float, zero1: bool = False
) -> list[str]:
    """Start the workers, wait at most ``timeout`` seconds, kill whatever is left. Returns their outputs.

    Raises ``RuntimeError`` if a worker fails or times out. Retries once on a new port
    if the coordinator could not bind the one it was given.
    """
    try:
        return _run_workers_once(free_port(), processes, devices, steps, out_dir, timeout, zero1)
    except RuntimeError as e:
        if not any(s in str(e) for s in PORT_TAKEN):
            raise
        return _run_workers_once(free_port(), processes, devices, steps, out_dir, timeout, zero1)


def _run_workers_once(
    port: int, processes: int, devices: int, steps: int, out_dir: str, timeout: float, zero1: bool
) -> list[str]:
    procs: list[subprocess.Popen] = []
    try:
        for i in range(processes):
            procs.append(
                subprocess.Popen(
                    worker_command(i, port, processes, devices, steps, out_dir, timeout, zero1),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=worker_env(devices),
                )
            )
        deadline = time.monotonic() + timeout
        outputs = []
        for i, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"worker {i} did not finish within {timeout:.0f}s") from e
            outputs.append(out)
            if p.returncode != 0:
                raise RuntimeError(f"worker {i} exited with {p.returncode}:\n{out[-3000:]}")
        return outputs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


def single_process_params(steps: int) -> dict[str, np.ndarray]:
    """The same run in this process, on one device."""
    import jax
    import optax

    tx = make_tx()
    params = jax.tree.map(jax.numpy.asarray, init_params_np())
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    for x, y in batches_np(steps):
        params, state = step(params, state, x, y)
    return flatten(jax.tree.map(np.asarray, params))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole job")
    ap.add_argument("--zero1", action="store_true", help="shard the optimizer state over all devices (ZeRO-1)")
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    steps = 5 if args.smoke else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or tmp
        print(f"launching {args.processes} processes x {args.devices} CPU devices, {steps} steps", flush=True)
        for out in run_workers(args.processes, args.devices, steps, out_dir, args.timeout, args.zero1):
            print(out.strip().splitlines()[-1])
        results = []
        for i in range(args.processes):
            with np.load(Path(out_dir) / f"params_{i}.npz") as f:
                results.append({k: f[k] for k in f.files})
    ref = single_process_params(steps)
    across = max(float(np.max(np.abs(r[k] - results[0][k]))) for r in results for k in ref)
    vs_single = max(float(np.max(np.abs(results[0][k] - ref[k]))) for k in ref)
    print(f"max |params(process i) - params(process 0)| = {across:.2e}")
    print(f"max |multi-process - single-process|        = {vs_single:.2e}")
    ok = across == 0.0 and vs_single <= 1e-5
    print(f"{'smoke run: ' if args.smoke else ''}multi-process == single-process: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
