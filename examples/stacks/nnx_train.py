"""Flax NNX + ``nnx.Optimizer`` + adamx, and evaluation with the EMA weights.

The one-line change from optax::

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)      # before
    optimizer = nnx.Optimizer(model, adamx.adam(1e-2, use_ema=True, ...), wrt=nnx.Param)

The step is the stock ``nnx.jit`` + ``nnx.value_and_grad`` + ``optimizer.update(model,
grads)``. For evaluation the EMA weights held in the optimizer state are copied into a
clone of the model with ``adamx.finalize_variable_values`` and ``nnx.update``.

Exits with status 1 if the loss does not go down. ``--smoke``: a few steps (tests).

Run: ``python examples/stacks/nnx_train.py [--steps 300]``
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

import adamx


class MLP(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(2, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))[..., 0]


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
    y = (np.sin(x[:, 0]) * np.cos(x[:, 1])).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def mse(model: MLP, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
    loss, grads = nnx.value_and_grad(mse)(model, x, y)
    optimizer.update(model, grads)
    return loss


def ema_model(model: MLP, optimizer: nnx.Optimizer) -> MLP:
    """A copy of ``model`` holding the EMA weights (``adamx.finalize_variable_values``)."""
    ema = adamx.finalize_variable_values(nnx.state(model, nnx.Param), optimizer.opt_state)
    out = nnx.clone(model)
    nnx.update(out, ema)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args(argv)
    steps = 24 if args.smoke else args.steps

    x, y = make_data(args.batch * 8)
    model = MLP(32, nnx.Rngs(0))
    tx = adamx.adam(
        learning_rate=1e-2,
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        gradient_accumulation_steps=2,
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    first = last = None
    for i in range(steps):
        j = (i * args.batch) % x.shape[0]
        loss = float(train_step(model, optimizer, x[j : j + args.batch], y[j : j + args.batch]))
        first = loss if first is None else first
        last = loss
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {loss:.5f}")

    evaluator = ema_model(model, optimizer)
    live, ema = float(mse(model, x, y)), float(mse(evaluator, x, y))
    print(f"full-data loss: live weights {live:.5f}, EMA weights {ema:.5f}")
    moved = not np.allclose(np.asarray(evaluator.l1.kernel[...]), np.asarray(model.l1.kernel[...]))
    ok = last < first and moved and np.isfinite(ema)
    print(f"{'smoke run: ' if args.smoke else ''}loss {first:.4f} -> {last:.4f}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
