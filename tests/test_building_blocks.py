"""The small transforms: paper form vs optax and PyTorch, and chains of blocks vs adamx.adam."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests.conftest import REFERENCE_DIR


def _load(name):
    with open(os.path.join(REFERENCE_DIR, name + ".json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(REFERENCE_DIR, name + ".npz"))


def _run(tx, data, keys, n_steps, jit=True):
    params = {k: jnp.asarray(data[f"params/{k}"][0]) for k in keys}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for t in range(n_steps):
        u, state = update({k: jnp.asarray(data[f"grads/{k}"][t]) for k in keys}, state, params)
        params = optax.apply_updates(params, u)
        out.append(params)
    return out


def _paper(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, amsgrad=False):
    return optax.chain(adamx.scale_by_adam(b1, b2, eps, epsilon_mode="paper", amsgrad=amsgrad), optax.scale(-lr))


@pytest.mark.parametrize(
    "name, tx",
    [
        ("torch_defaults", lambda: _paper()),
        ("torch_custom_hparams", lambda: _paper(0.01, 0.8, 0.95, 1e-4)),
        ("torch_amsgrad", lambda: _paper(amsgrad=True)),
        # torch Adam(weight_decay) is L2: the decay enters the gradient before the moments
        ("torch_weight_decay_l2_0.1", lambda: optax.chain(optax.add_decayed_weights(0.1), _paper())),
        # torch AdamW: p *= 1 - lr*wd, then the Adam step: decoupled decay after the moments
        (
            "torch_adamw_wd_0.1",
            lambda: optax.chain(
                adamx.scale_by_adam(epsilon_mode="paper", eps=1e-8),
                adamx.decoupled_weight_decay(0.1),
                optax.scale(-1e-3),
            ),
        ),
    ],
)
def test_paper_form_matches_pytorch(name, tx):
    """PyTorch runs op by op in float32; 1e-6 abs/rel as for Keras (FMA contraction under jit)."""
    meta, data = _load(name)
    keys = meta["param_keys"]
    for t, params in enumerate(_run(tx(), data, keys, meta["n_steps"])):
        for k in keys:
            np.testing.assert_allclose(
                np.asarray(params[k]), data[f"params/{k}"][t + 1], rtol=1e-6, atol=1e-6, err_msg=f"{name} {t} {k}"
            )


@pytest.mark.standard_promotion("optax's own Adam/schedules compute float ** int32 count")
def test_paper_form_equals_optax_adam():
    meta, data = _load("keras_defaults")
    keys = meta["param_keys"]
    ours = _run(_paper(lr=1e-3), data, keys, meta["n_steps"])
    theirs = _run(optax.adam(1e-3), data, keys, meta["n_steps"])
    for a, b in zip(ours, theirs):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.standard_promotion("optax's own Adam/schedules compute float ** int32 count")
def test_optax_amsgrad_is_a_different_variant():
    """optax.amsgrad takes the max over bias-corrected nu: a different trajectory (SEMANTICS.md 4)."""
    meta, data = _load("torch_amsgrad")
    keys = meta["param_keys"]
    ours = _run(_paper(amsgrad=True), data, keys, meta["n_steps"])[-1]
    theirs = _run(optax.amsgrad(1e-3), data, keys, meta["n_steps"])[-1]
    want = {k: data[f"params/{k}"][-1] for k in keys}
    ours_err = max(float(np.abs(np.asarray(ours[k]) - want[k]).max()) for k in keys)
    theirs_err = max(float(np.abs(np.asarray(theirs[k]) - want[k]).max()) for k in keys)
    assert ours_err < 1e-6 < 1e-4 < theirs_err


@pytest.mark.standard_promotion("optax's own Adam/schedules compute float ** int32 count")
def test_epsilon_story_hat_vs_optax():
    """Keras's epsilon-hat: optax with the same constant eps drifts; the step-dependent mapping does not."""
    meta, data = _load("keras_custom_hparams")  # eps 1e-4, beta_2 0.95: a visible difference
    keys, n = meta["param_keys"], meta["n_steps"]
    want = {k: data[f"params/{k}"][-1] for k in keys}
    naive = _run(optax.adam(0.01, b1=0.8, b2=0.95, eps=1e-4), data, keys, n)[-1]
    hat = _run(
        optax.chain(adamx.scale_by_adam(0.8, 0.95, 1e-4, epsilon_mode="hat"), optax.scale(-0.01)), data, keys, n
    )[-1]
    err = lambda p: max(float(np.abs(np.asarray(p[k]) - want[k]).max()) for k in keys)  # noqa: E731
    assert err(hat) < 1e-6
    assert err(naive) > 1e-3


def test_chain_of_blocks_equals_adam():
    """adamx.adam is the chain clip -> scale_by_adam -> decay -> lr -> ema, written as one transform."""
    meta, data = _load("keras_defaults")
    keys, n = meta["param_keys"], meta["n_steps"]
    kw = dict(
        learning_rate=0.01, amsgrad=True, weight_decay=0.05, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=4
    )
    for clip_kw, clip_tx in (
        (dict(clipnorm=0.5), adamx.clip_by_norm(0.5)),
        (dict(global_clipnorm=0.5), adamx.clip_by_global_norm(0.5)),
        (dict(clipvalue=0.1), optax.clip(0.1)),
    ):
        mono = adamx.adam(**kw, **clip_kw)
        chain = optax.chain(
            clip_tx,
            adamx.scale_by_adam(amsgrad=True),
            adamx.decoupled_weight_decay(0.05),
            optax.scale_by_learning_rate(0.01),
            adamx.ema_params(0.9, 4),
        )
        a = _run(mono, data, keys, n)
        b = _run(chain, data, keys, n)
        for pa, pb in zip(a, b):
            chex.assert_trees_all_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_keras_clipnorm_is_per_tensor():
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    u, _ = adamx.clip_by_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(np.asarray(u["a"]), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["b"]), [0.3, 0.4], rtol=1e-6)  # below the threshold
    u, _ = adamx.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    total = np.sqrt(25 + 0.25)
    np.testing.assert_allclose(np.asarray(u["b"]), np.array([0.3, 0.4]) / total, rtol=1e-6)


def test_ema_params_needs_params_and_finalize_finds_nested_state():
    tx = optax.chain(optax.sgd(0.1), adamx.ema_params(0.5))
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update({"w": jnp.ones(2)}, state)
    wrapped = optax.inject_hyperparams(adamx.adam, hyperparam_dtype=jnp.float32)(learning_rate=0.1, use_ema=True)
    s = wrapped.init(params)
    u, s = wrapped.update({"w": jnp.ones(2)}, s, params)
    new = optax.apply_updates(params, u)
    chex.assert_trees_all_close(adamx.finalize_variable_values(new, s), new)  # first step: average == params
    assert adamx.finalize_variable_values(params, adamx.adam().init(params)) is params


def test_scale_by_adam_state_and_dtypes():
    tx = adamx.scale_by_adam(mu_dtype=jnp.bfloat16, amsgrad=True)
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    s = tx.init(params)
    assert isinstance(s, adamx.ScaleByAdamState) and s.mu["w"].dtype == jnp.bfloat16 and s.nu["w"].dtype == jnp.float32
    u, s2 = jax.jit(tx.update)({"w": jnp.ones(3, jnp.bfloat16)}, s, params)
    assert u["w"].dtype == jnp.bfloat16
    chex.assert_trees_all_equal_dtypes(s, s2)
