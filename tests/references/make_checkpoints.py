"""Write Orbax checkpoints of adamx optimizer states, to prove the on-disk format stays readable.

Run once with the adamx version whose format is to be kept (this set was written at commit
24914bd, before the architecture refactor), from the repository root:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python tests/references/make_checkpoints.py

For each option set it trains a small MLP for ``SAVE_AT`` steps, saves ``(params, opt_state)``
with ``orbax.checkpoint.StandardCheckpointer`` under ``data/checkpoints/<name>/``, then takes
``MORE`` further steps with the same code and stores the params and state leaves reached in
``data/checkpoints/<name>.npz``. ``tests/test_checkpoint_format.py`` restores each checkpoint
with the current code and checks that the same further steps reach the same arrays.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import adamx

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "checkpoints")
SAVE_AT = 3
MORE = 3

FULL = dict(
    weight_decay=0.01,
    global_clipnorm=1.0,
    use_ema=True,
    ema_momentum=0.9,
    ema_overwrite_frequency=3,
    loss_scale_factor=4.0,
    gradient_accumulation_steps=2,
    amsgrad=True,
)
OPTIONS: dict[str, dict] = {
    "plain": {},
    "amsgrad_clipnorm": dict(amsgrad=True, clipnorm=0.5),
    "all": FULL,
    "all_flat": dict(FULL, flat_state=True),
    "bf16_moments": dict(mu_dtype="bfloat16", nu_dtype="bfloat16", weight_decay=0.004),
}


def init_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "dense": {"kernel": jax.random.normal(k1, (6, 5)) * 0.3, "bias": jnp.zeros((5,))},
        "out": {"kernel": jax.random.normal(k2, (5, 2)) * 0.3, "bias": jnp.zeros((2,), jnp.bfloat16)},
    }


def loss(params, x, y):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    out = h @ params["out"]["kernel"] + params["out"]["bias"].astype(jnp.float32)
    return jnp.mean((out - y) ** 2)


def batches(n):
    key = jax.random.PRNGKey(1)
    out = []
    for _ in range(n):
        key, kx, ky = jax.random.split(key, 3)
        out.append((jax.random.normal(kx, (8, 6)), jax.random.normal(ky, (8, 2))))
    return out


def make_step(tx):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        grads["out"]["bias"] = grads["out"]["bias"].astype(jnp.bfloat16)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def tx_for(name):
    return adamx.adam(learning_rate=1e-2, **OPTIONS[name])


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    data = batches(SAVE_AT + MORE)
    ckptr = ocp.StandardCheckpointer()
    for name in OPTIONS:
        tx = tx_for(name)
        step = make_step(tx)
        params, state = init_params(), tx.init(init_params())
        for x, y in data[:SAVE_AT]:
            params, state = step(params, state, x, y)
        ckptr.save(os.path.join(OUT, name), (params, state))
        ckptr.wait_until_finished()
        for x, y in data[SAVE_AT:]:
            params, state = step(params, state, x, y)
        leaves = jax.tree_util.tree_leaves((params, state))
        np.savez(os.path.join(OUT, f"{name}.npz"), *[np.asarray(x.astype(jnp.float32)) for x in leaves])
        print(name, len(leaves), "leaves")


if __name__ == "__main__":
    main()
