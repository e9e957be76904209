"""Linear regression with ``adamx.adam``, one optimizer step written out in full.

The data are ``y = x @ w_true + b_true + noise`` with 3 features. Each step is the
plain optax pattern::

    grads = jax.grad(loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)

The script prints the loss going down and the recovered weights next to the true
ones and to the exact least-squares solution; it exits with status 1 when the fit is
off by more than 1e-2. ``--smoke`` runs a few steps only (used by the tests).

Run: ``python examples/linear_regression.py [--steps 500] [--lr 0.1]``
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamx

W_TRUE = np.array([2.0, -3.0, 0.5], np.float32)
B_TRUE = np.float32(1.0)


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, W_TRUE.size)).astype(np.float32)
    y = x @ W_TRUE + B_TRUE + 0.1 * rng.normal(size=n).astype(np.float32)
    return x, y


def loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the linear model ``x @ w + b``."""
    pred = x @ params["w"] + params["b"]
    return jnp.mean((pred - y) ** 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=256, help="number of samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args(argv)
    steps = 20 if args.smoke else args.steps

    x, y = make_data(args.n, args.seed)
    params = {"w": jnp.zeros(W_TRUE.size, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    opt = adamx.adam(learning_rate=args.lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        # One Adam step, written out: gradient, optimizer update, apply.
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state

    print(f"fitting y = x @ w + b on {args.n} samples with adamx.adam(learning_rate={args.lr}), {steps} steps")
    print(f"step {0:5d}  loss {float(loss(params, x, y)):.6f}")
    every = max(1, steps // 10)
    losses = [float(loss(params, x, y))]
    for i in range(1, steps + 1):
        params, state = step(params, state)
        if i % every == 0 or i == steps:
            losses.append(float(loss(params, x, y)))
            print(f"step {i:5d}  loss {losses[-1]:.6f}")

    # The exact least-squares fit, for comparison.
    xb = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    sol = np.linalg.lstsq(xb.astype(np.float64), y.astype(np.float64), rcond=None)[0]
    w, b = np.asarray(params["w"]), float(params["b"])
    np.set_printoptions(precision=4, suppress=True)
    print(f"\nrecovered w = {w}, b = {b:.4f}")
    print(f"true      w = {W_TRUE}, b = {float(B_TRUE):.4f}")
    print(f"lstsq     w = {sol[:-1].astype(np.float32)}, b = {sol[-1]:.4f}")
    print(f"Adam step count in the state: {int(state.count)}")

    if not losses[-1] < losses[0]:
        print("FAILED: the loss did not go down")
        return 1
    if args.smoke:
        print("smoke run: loss went down")
        return 0
    err = float(np.max(np.abs(np.append(w, b) - sol)))
    print(f"max |adam - lstsq| = {err:.2e}")
    if err > 1e-2:
        print("FAILED: not converged to the least-squares solution")
        return 1
    print("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
