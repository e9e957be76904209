"""Reliability checks beside the sweep (tests/test_sweep.py): optax's complex Adam convention,
float16 tiny weights on both paths, the README's no-recompile example, moment dtype errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import fused

FUSED = fused.available()


def _adamx_paper(lr: float) -> optax.GradientTransformation:
    return optax.chain(adamx.scale_by_adam(epsilon_mode="paper", eps=1e-8), optax.scale(-lr))


@pytest.mark.parametrize(
    "target", [np.array([1.0 - 1.0j, -2.0 + 0.5j, 0.0 + 3.0j]), np.array([[0.5j, -1.0], [2.0, 1.0 + 1.0j]])]
)
def test_complex_params_follow_optax(target):
    """optax's Adam on complex params (its tests minimise sum |p - target|^2 from complex params and
    check that the optimum is reached); adamx in paper mode must take the same steps and get there."""
    target = jnp.asarray(target, jnp.complex64)
    loss = lambda p: jnp.sum((jnp.conj(p - target) * (p - target)).real)  # noqa: E731
    # jax.grad of a real function of complex params is conj(df/dz): optax's convention uses its conjugate
    grad = lambda p: jnp.conj(jax.grad(loss)(p))  # noqa: E731
    ours, theirs = _adamx_paper(0.1), optax.adam(0.1)
    p = q = jnp.zeros_like(target)
    s, sq = ours.init(p), theirs.init(q)
    assert s[0].mu.dtype == jnp.complex64 and s[0].nu.dtype == jnp.float32  # complex m, real v of |g|^2
    for _ in range(400):
        u, s = ours.update(grad(p), s, p)
        with jax.numpy_dtype_promotion("standard"):  # optax's complex Adam promotes float32 with complex64
            uq, sq = theirs.update(grad(q), sq, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, uq)
    np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p), np.asarray(target), atol=1e-2)
    # optax keeps nu in the params' (complex) dtype with a zero imaginary part; adamx keeps it real
    np.testing.assert_allclose(np.asarray(s[0].nu), np.asarray(sq[0].nu).real, rtol=1e-4)
    assert float(jnp.max(jnp.abs(sq[0].nu.imag))) == 0.0


def test_complex_second_moment_is_abs_squared_not_g_squared():
    """v must grow by |g|^2 = 1 for g = 1j (g*g = -1 would make sqrt(v) NaN)."""
    opt = adamx.adam(learning_rate=0.1)
    p = {"z": jnp.zeros(2, jnp.complex64)}
    u, s = opt.update({"z": jnp.full(2, 1j, jnp.complex64)}, opt.init(p), p)
    np.testing.assert_allclose(np.asarray(s.nu["z"]), 1 - 0.999, rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(u["z"]))) and float(u["z"][0].imag) < 0


@pytest.mark.skipif(not FUSED, reason="the fused kernel is not available here")
@pytest.mark.parametrize(
    "kw",
    [{}, {"use_ema": True}, {"use_ema": True, "ema_overwrite_frequency": 2}, {"use_ema": True, "flat_state": True}],
    ids=["plain", "ema", "ema-overwrite", "ema-flat"],
)
def test_float16_tiny_weights_agree_on_both_paths(kw):
    """float16 subnormal weights: update + apply_updates must keep them as the fused kernel does
    (XLA's reduce_precision flushes float16 subnormals; the average then zeroed tiny weights)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray((rng.standard_normal(512) * 1e-6).astype(np.float16))
    assert bool(jnp.any((w != 0) & (jnp.abs(w) < 2.0**-14)))  # subnormals present
    opt = adamx.adam(1e-6, **kw)
    p1 = p2 = {"w": w}
    s1 = s2 = opt.init(p1)
    up, ag = jax.jit(opt.update), jax.jit(opt.apply_gradients)
    for _ in range(4):
        g = {"w": jnp.asarray((rng.standard_normal(512) * 1e-3).astype(np.float16))}
        assert fused.why_not(opt, g, s1, p1) is None
        p1, s1 = ag(g, s1, p1)
        u, s2 = up(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
        np.testing.assert_array_equal(np.asarray(p1["w"]).view(np.uint16), np.asarray(p2["w"]).view(np.uint16))
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert bool(jnp.any((p2["w"] != 0) & (jnp.abs(p2["w"]) < 2.0**-14))), "tiny weights were zeroed"


def test_readme_inject_hyperparams_does_not_retrace():
    traces = []

    def update(g, s, p):
        traces.append(1)
        return opt.update(g, s, p)

    opt = optax.inject_hyperparams(adamx.adam, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3, weight_decay=0.01, gradient_accumulation_steps=1
    )
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    step = jax.jit(update)
    u1, state = step({"w": jnp.ones(3)}, state, params)
    for lr in (5e-4, 1e-4):
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)  # as in the README: no retrace
        u, state = step({"w": jnp.ones(3)}, state, params)
    assert len(traces) == 1
    state.hyperparams["learning_rate"] = jnp.asarray(1e-4)  # weakly typed: a new input type, one retrace
    step({"w": jnp.ones(3)}, state, params)
    assert len(traces) == 2
    assert float(jnp.abs(u["w"][0])) < float(jnp.abs(u1["w"][0]))  # the new learning rate is used


@pytest.mark.parametrize(
    ("arg", "value", "match"),
    [
        ("mu_dtype", "float8_e4m3fn", "`mu_dtype=float8_e4m3fn` cannot hold"),
        ("nu_dtype", jnp.int8, "`nu_dtype` must be a floating dtype"),
        ("mu_dtype", "bogus", "`mu_dtype` must be a dtype"),
        ("nu_dtype", jnp.float16, "`nu_dtype=float16` cannot hold the second moment"),
    ],
)
def test_moment_dtypes_are_checked_at_construction(arg, value, match):
    with pytest.raises((TypeError, ValueError), match=match):
        adamx.adam(**{arg: value})


def test_integer_leaves_are_left_alone_and_documented():
    params = {"w": jnp.ones(2), "step": jnp.asarray(5, jnp.int32)}
    opt = adamx.adam(0.1)
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) * p["step"].astype(jnp.float32), allow_int=True)(params)
    assert grads["step"].dtype == jax.dtypes.float0
    u, s = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, u)
    assert int(new["step"]) == 5 and new["step"].dtype == jnp.int32 and float(new["w"][0]) < 1
    assert "left alone" in adamx.adam.__doc__
    with pytest.raises(ValueError, match="'step'.*float0.*pass the params"):
        opt.update(grads, opt.init(params))
