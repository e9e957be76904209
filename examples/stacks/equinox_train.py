"""Equinox + adamx: filtered trees (``None`` at non-array leaves) under ``eqx.filter_jit``.

The one-line change from optax::

    optim = optax.adam(1e-2)                               # before
    optim = adamx.adam(1e-2, weight_decay=0.01, ...)       # after

The rest is the stock Equinox recipe: ``optim.init(eqx.filter(model, eqx.is_array))``,
``eqx.filter_value_and_grad``, ``optim.update(grads, opt_state, eqx.filter(model,
eqx.is_array))`` (weight decay and the EMA need the params) and ``eqx.apply_updates``.
The activation functions of ``eqx.nn.MLP`` are ``None`` in those trees; adamx accepts
``None`` leaves and returns ``None`` updates there. The EMA weights come back with
``adamx.finalize_variable_values`` in the same filtered form: ``eqx.combine`` them
with the model.

Exits with status 1 if the loss does not go down. ``--smoke``: a few steps (tests).

Run: ``python examples/stacks/equinox_train.py [--steps 300]``
"""

from __future__ import annotations

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import adamx


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
    y = (np.sin(x[:, 0]) * np.cos(x[:, 1])).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def mse(model, x, y):
    return jnp.mean((jax.vmap(model)(x)[:, 0] - y) ** 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for the tests)")
    args = ap.parse_args(argv)
    steps = 24 if args.smoke else args.steps

    x, y = make_data(args.batch * 8)
    model = eqx.nn.MLP(2, 1, width_size=32, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    optim = adamx.adam(
        learning_rate=1e-2,
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        gradient_accumulation_steps=2,
    )
    params = eqx.filter(model, eqx.is_array)
    print(f"filtered tree: activation={params.activation!r}, final_activation={params.final_activation!r}")
    opt_state = optim.init(params)

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    first = last = None
    for i in range(steps):
        j = (i * args.batch) % x.shape[0]
        model, opt_state, loss = train_step(model, opt_state, x[j : j + args.batch], y[j : j + args.batch])
        first = float(loss) if first is None else first
        last = float(loss)
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {last:.5f}")

    ema_params = adamx.finalize_variable_values(eqx.filter(model, eqx.is_array), opt_state)
    ema_model = eqx.combine(ema_params, model)
    live, ema = float(mse(model, x, y)), float(mse(ema_model, x, y))
    print(f"full-data loss: live weights {live:.5f}, EMA weights {ema:.5f}")
    ok = last < first and np.isfinite(ema)
    print(f"{'smoke run: ' if args.smoke else ''}loss {first:.4f} -> {last:.4f}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
