"""Flax linen + ``TrainState`` + adamx, with the state donated to the jitted step.

The one-line change from optax::

    tx = optax.adam(1e-2)                      # before
    tx = adamx.adam(1e-2, amsgrad=True, ...)   # after: Keras 3 Adam, every option

Everything else is the stock Flax recipe: ``TrainState.create(tx=tx)``,
``state.apply_gradients(grads=grads)`` in a ``jax.jit(..., donate_argnums=0)`` step.
Donation is safe: adamx's EMA starts as a *copy* of the params, never the same buffers
(donating one buffer twice is an error). At the end the EMA weights are read with
``adamx.finalize_variable_values`` for evaluation.

Exits with status 1 if the loss does not go down. ``--smoke``: a few steps (tests).

Run: ``python examples/stacks/linen_train.py [--steps 300]``
"""

from __future__ import annotations

import argparse
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

import adamx


class MLP(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
    y = (np.sin(x[:, 0]) * np.cos(x[:, 1])).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def loss_fn(params, apply_fn, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: train_state.TrainState, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=grads), loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args(argv)
    steps = 24 if args.smoke else args.steps

    x, y = make_data(args.batch * 8)
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    tx = adamx.adam(
        learning_rate=1e-2,
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=None,
        gradient_accumulation_steps=2,
    )
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    shared = {a.unsafe_buffer_pointer() for a in jax.tree.leaves(state.params)} & {
        a.unsafe_buffer_pointer() for a in jax.tree.leaves(state.opt_state)
    }
    print(f"opt_state buffers shared with params: {len(shared)} (donation needs 0)")

    first = last = None
    for i in range(steps):
        j = (i * args.batch) % x.shape[0]
        state, loss = train_step(state, x[j : j + args.batch], y[j : j + args.batch])
        first = float(loss) if first is None else first
        last = float(loss)
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {last:.5f}")

    ema_params = adamx.finalize_variable_values(state.params, state.opt_state)
    live = float(loss_fn(state.params, model.apply, x, y))
    ema = float(loss_fn(ema_params, model.apply, x, y))
    print(f"full-data loss: live weights {live:.5f}, EMA weights {ema:.5f}")
    ok = last < first and not shared and np.isfinite(ema)
    print(f"{'smoke run: ' if args.smoke else ''}loss {first:.4f} -> {last:.4f}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
