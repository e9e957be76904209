"""Replay stored tf.compat.v1.train.AdamOptimizer (TF 2.21, eager) and legacy tf.keras runs.

Made by ``tests/references/make_tf1_refs.py``. TF eager runs the C++ ApplyAdam kernel op
by op; adamx runs jitted (FMA contraction), so we allow the same 1e-6 abs/rel as for
Keras (SEMANTICS.md 1.16-1.17). The beta powers are float32 running products in both
and must agree to 1 ULP.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import sparse

import adamx
from tests.conftest import REFERENCE_DIR
from tests.references import cases

ATOL = RTOL = 1e-6


def _load(name):
    with open(os.path.join(REFERENCE_DIR, name + ".json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(REFERENCE_DIR, name + ".npz"))


def _tf1_kwargs(meta):
    names = {"learning_rate": "learning_rate", "beta1": "beta1", "beta2": "beta2", "epsilon": "epsilon"}
    return {names[k]: v for k, v in meta["kwargs"].items() if k in names and not str(v).startswith("callable")}


def _replay(opt, data, keys, grads_at, n_steps, dtype=jnp.float32):
    params = {k: jnp.asarray(data[f"params/{k}"][0], dtype) for k in keys}
    state = opt.init(params)
    step = jax.jit(opt.update)
    out = []
    for t in range(n_steps):
        updates, state = step(grads_at(t), state, params)
        params = optax.apply_updates(params, updates)
        out.append((params, state))
    return out


def _check(name, meta, data, traj, slots=True):
    keys = meta["param_keys"]
    for t, (params, state) in enumerate(traj):
        for k in keys:
            np.testing.assert_allclose(
                np.asarray(params[k]), data[f"params/{k}"][t + 1], rtol=RTOL, atol=ATOL, err_msg=f"{name} {t + 1} {k}"
            )
            if slots:
                np.testing.assert_allclose(np.asarray(state.mu[k]), data[f"m/{k}"][t], rtol=RTOL, atol=ATOL)
                np.testing.assert_allclose(np.asarray(state.nu[k]), data[f"v/{k}"][t], rtol=RTOL, atol=ATOL)
        if "beta1_power" in data.files:
            for field in ("beta1_power", "beta2_power"):
                got = np.float32(getattr(state, field))
                want = np.float32(data[field][t + 1])
                assert abs(got - want) <= np.spacing(want), (name, t, field, got, want)


def _dense_grads(data, keys):
    return lambda t: {k: jnp.asarray(data[f"grads/{k}"][t]) for k in keys}


@pytest.mark.parametrize("name", ["tf1_defaults", "tf1_custom_hparams", "tf1_epsilon_1e-7"])
def test_tf1_dense(name):
    meta, data = _load(name)
    opt = adamx.tf1_adam(**_tf1_kwargs(meta))
    traj = _replay(opt, data, meta["param_keys"], _dense_grads(data, meta["param_keys"]), meta["n_steps"])
    _check(name, meta, data, traj)


def test_tf1_default_epsilon_is_1e8():
    import inspect

    assert inspect.signature(adamx.tf1_adam).parameters["epsilon"].default == 1e-8
    assert inspect.signature(adamx.adam).parameters["epsilon"].default == 1e-7


def test_tf1_sparse_indexed_slices_as_bcoo():
    """tf.IndexedSlices with duplicate indices -> BCOO: summed, textbook moments, all rows move."""
    name = "tf1_sparse_embedding"
    meta, data = _load(name)
    key = meta["param_keys"][0]
    shape = data[f"params/{key}"].shape[1:]

    def grads_at(t):
        idx = jnp.asarray(data["sparse_indices"][t])[:, None]
        vals = jnp.asarray(data[f"sparse_values/{key}"][t])
        return {key: sparse.BCOO((vals, idx), shape=shape)}

    assert len(set(data["sparse_indices"][0].tolist())) < data["sparse_indices"].shape[1], "needs duplicates"
    traj = _replay(adamx.tf1_adam(), data, [key], grads_at, meta["n_steps"])
    _check(name, meta, data, traj)


def test_tf1_callable_beta1_lags_like_tf():
    """TF1 evaluates a callable beta1 at slot creation and multiplies the power after each step."""
    name = "tf1_callable_beta1"
    meta, data = _load(name)
    table = jnp.asarray(data["beta1"], jnp.float32)
    assert float(data["beta1_at_creation"]) == cases.tf1_callable_beta1(0)

    def beta1(count):
        return table[jnp.minimum(count, table.shape[0] - 1)]

    opt = adamx.tf1_adam(beta1=beta1)
    traj = _replay(opt, data, meta["param_keys"], _dense_grads(data, meta["param_keys"]), meta["n_steps"])
    _check(name, meta, data, traj)


@pytest.mark.parametrize("name", ["tf1_bfloat16_defaults", "tf1_float16_defaults"])
def test_tf1_low_precision_failures_do_not_happen_in_adamx(name):
    """TF1 bf16 diverges (1 - bf16(0.999) = 0) and TF1 fp16 gives NaN (fp16(1e-8) = 0); adamx stays sane."""
    meta, data = _load(name)
    keys = meta["param_keys"]
    tf_final = np.stack([np.abs(data[f"params/{k}"][-1]).max() for k in keys])
    assert np.isnan(tf_final).any() or tf_final.max() > 100, "the fixture shows TF1's failure"
    dtype = jnp.bfloat16 if "bfloat16" in name else jnp.float16
    traj = _replay(
        adamx.tf1_adam(),
        data,
        keys,
        lambda t: {k: jnp.asarray(data[f"grads/{k}"][t], dtype) for k in keys},
        meta["n_steps"],
        dtype,
    )
    for k in keys:
        final = np.asarray(traj[-1][0][k]).astype(np.float32)
        start = data[f"params/{k}"][0]
        assert np.isfinite(final).all()
        # 25 Adam steps of lr 1e-3 move a parameter by at most ~0.025 (+ rounding of the dtype)
        assert np.abs(final - start).max() < 0.05


def test_legacy_tf_keras_decay_config():
    """tf_keras (Keras 2) legacy Adam(decay=0.1): its printed config rebuilds the same trajectory."""
    meta, data = _load("tf_keras_legacy_decay_0.1")
    config = meta["config"]
    assert "decay" in config
    opt = adamx.from_keras_config(config)
    traj = _replay(opt, data, meta["param_keys"], _dense_grads(data, meta["param_keys"]), meta["n_steps"])
    _check("legacy", meta, data, traj)
    for t in range(meta["n_steps"]):
        lr = float(opt.hyperparams["learning_rate"](jnp.int32(t)))
        np.testing.assert_allclose(lr, data["learning_rate"][t], rtol=1e-6)
