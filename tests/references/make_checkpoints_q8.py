"""Write Orbax checkpoints of 8-bit (``quantize_moments=True``) adamx states in the first 8-bit layout.

The first 8-bit layout (before the state was shaped like params) kept each quantized leaf's
codes as a 1-D ``uint8[n]`` and its scales as ``float32[ceil(n / block_size)]``. This script was run
once with that code (commit 338c623), from the repository root:

    .venv/bin/python tests/references/make_checkpoints_q8.py

For each option set it trains a small model for ``SAVE_AT`` steps, saves ``(params, opt_state)`` with
``orbax.checkpoint.StandardCheckpointer`` under ``data/checkpoints_q8/<name>/``, takes ``MORE`` further
steps with the same code and stores the params reached in ``data/checkpoints_q8/<name>.npz``.
``tests/test_checkpoint_format.py`` restores them with the current code (which converts the layout)
and checks that the same further steps reach the same params.
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
OUT = os.path.join(HERE, "data", "checkpoints_q8")
SAVE_AT = 3
MORE = 3

OPTIONS: dict[str, dict] = {
    "q8": dict(quantize_moments=True),
    "q8_amsgrad_ema": dict(quantize_moments=True, amsgrad=True, use_ema=True, weight_decay=0.01),
    "q8_flat": dict(quantize_moments=True, flat_state=True),
}


def init_params():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "w": jax.random.normal(k1, (64, 256)) * 0.1,  # last axis a multiple of the block size
        "v": jax.random.normal(k2, (50, 100)) * 0.1,  # 5000 elements: the last block is partial
        "b": jax.random.normal(k3, (300,)) * 0.1,  # below quantize_min_size: float32 moments
    }


def loss(params, x):
    h = jnp.tanh(x @ params["w"])  # x: (8, 64)
    return jnp.mean(h**2) + jnp.mean(jnp.sin(params["v"]) ** 2) + jnp.mean(params["b"] ** 2)


def batches(n):
    key = jax.random.PRNGKey(1)
    out = []
    for _ in range(n):
        key, kx = jax.random.split(key)
        out.append(jax.random.normal(kx, (8, 64)))
    return out


def make_step(tx):
    @jax.jit
    def step(params, state, x):
        updates, state = tx.update(jax.grad(loss)(params, x), state, params)
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
        for x in data[:SAVE_AT]:
            params, state = step(params, state, x)
        ckptr.save(os.path.join(OUT, name), (params, state))
        ckptr.wait_until_finished()
        for x in data[SAVE_AT:]:
            params, state = step(params, state, x)
        np.savez(os.path.join(OUT, f"{name}.npz"), *[np.asarray(x) for x in jax.tree_util.tree_leaves(params)])
        print(name, [x.shape for x in jax.tree_util.tree_leaves(state)])


if __name__ == "__main__":
    main()
