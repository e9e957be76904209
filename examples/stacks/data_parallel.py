"""Data-parallel adamx on 8 simulated CPU devices: jit + NamedSharding, shard_map + pmean, ZeRO-1.

Three ways to spread one training run over a ``data`` mesh axis, all with the same
optimizer (every adamx option on) and the same result up to float32 summation order:

1. ``jax.jit`` with shardings: params (and the optimizer state) replicated, the batch
   split over ``data``; XLA inserts the gradient all-reduce. ``jax.make_mesh`` gives
   Explicit axes, so the step runs under ``jax.set_mesh(mesh)``.
2. ``jax.shard_map``: the per-device step written by hand, gradients averaged with
   ``lax.pmean``. Differentiate at ``lax.pcast(params, "data", to="varying")``: the
   gradient w.r.t. a replicated (invariant) value is already summed over the axis.
3. ZeRO-1: as 1., but the optimizer state (mu, nu, nu_max, acc, ema) is split over
   ``data`` with ``adamx.sharding.zero1_state_sharding`` and jit's ``out_shardings``
   (an Auto mesh); prints the state's bytes per device.

The script prints the largest difference between the three and exits with status 1
if it exceeds 1e-5. ``--smoke``: a few steps (tests).

Run: ``python examples/stacks/data_parallel.py [--steps 200]`` (sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself when no device count is set).
"""

from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adamx  # noqa: E402
from adamx.sharding import bytes_per_device, replicated_sharding, zero1_state_sharding  # noqa: E402

N_DEV = 8


def init_params(seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    return {
        "hidden": {"kernel": jnp.asarray(r.normal(0, 0.5, (8, 64)), jnp.float32), "bias": jnp.zeros(64)},
        "out": {"kernel": jnp.asarray(r.normal(0, 0.5, (64, 1)), jnp.float32), "bias": jnp.zeros(1)},
    }


def loss(p, x, y):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return jnp.mean(((h @ p["out"]["kernel"] + p["out"]["bias"])[:, 0] - y) ** 2)


def make_batches(steps: int, batch: int, seed: int = 1):
    r = np.random.default_rng(seed)
    w = r.normal(size=8).astype(np.float32)
    out = []
    for _ in range(steps):
        x = r.normal(size=(batch, 8)).astype(np.float32)
        out.append((x, np.sin(x @ w).astype(np.float32)))
    return out


def make_tx():
    return adamx.adam(
        learning_rate=1e-2,
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=3,
        gradient_accumulation_steps=2,
    )


def step_fn(tx):
    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    return step


def run_jit_sharded(data):
    mesh = jax.make_mesh((N_DEV,), ("data",))
    tx = make_tx()
    with jax.set_mesh(mesh):
        params = jax.device_put(init_params(), NamedSharding(mesh, P()))
        state = jax.jit(tx.init)(params)
        step = jax.jit(step_fn(tx))
        for x, y in data:
            params, state = step(params, state, *jax.device_put((x, y), NamedSharding(mesh, P("data"))))
    return params


def run_shard_map(data):
    mesh = jax.make_mesh((N_DEV,), ("data",))
    tx = make_tx()

    def per_device(params, state, x, y):
        grads = jax.grad(loss)(jax.lax.pcast(params, "data", to="varying"), x, y)
        grads = jax.lax.pmean(grads, "data")
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh):
        step = jax.jit(jax.shard_map(per_device, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
        params, state = jax.device_put((init_params(), tx.init(init_params())), NamedSharding(mesh, P()))
        for x, y in data:
            params, state = step(params, state, *jax.device_put((x, y), NamedSharding(mesh, P("data"))))
    return params


def run_zero1(data):
    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Auto,))
    tx = make_tx()
    params = jax.device_put(init_params(), replicated_sharding(init_params(), mesh))
    state_sh = zero1_state_sharding(jax.eval_shape(tx.init, params), mesh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    step = jax.jit(step_fn(tx), out_shardings=(replicated_sharding(params, mesh), state_sh))
    for x, y in data:
        params, state = step(params, state, *jax.device_put((x, y), NamedSharding(mesh, P("data"))))
    sharded = max(bytes_per_device(state).values())
    full = max(bytes_per_device(jax.device_put(state, replicated_sharding(state, mesh))).values())
    print(f"ZeRO-1 optimizer state per device: {sharded} bytes (replicated: {full} bytes)")
    print(f"  mu['hidden']['kernel'] sharding: {state.mu['hidden']['kernel'].sharding.spec}")
    return params


def max_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args(argv)
    if jax.device_count() < N_DEV:
        print(f"needs {N_DEV} devices, have {jax.device_count()}: set XLA_FLAGS before starting Python")
        return 1
    data = make_batches(8 if args.smoke else args.steps, batch=64)
    print(f"{jax.device_count()} devices, {len(data)} steps, global batch 64 (8 rows per device)")
    first_loss = float(loss(init_params(), *data[0]))
    results = {
        "jit+NamedSharding": run_jit_sharded(data),
        "shard_map+pmean": run_shard_map(data),
        "ZeRO-1": run_zero1(data),
    }
    base = results["jit+NamedSharding"]
    worst = 0.0
    for name, params in results.items():
        d = max_diff(params, base)
        worst = max(worst, d)
        print(f"{name:18s} max |params - jit+NamedSharding| = {d:.2e}")
    last_loss = float(loss(base, *data[0]))
    ok = worst <= 1e-5 and last_loss < first_loss
    print(f"loss on the first batch {first_loss:.4f} -> {last_loss:.4f}")
    print(f"{'smoke run: ' if args.smoke else ''}all three agree: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
