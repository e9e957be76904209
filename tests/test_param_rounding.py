"""``param_rounding`` ("nearest" | "kahan" | "stochastic"), ``seed`` and ``acc_dtype``.

References: a per-op NumPy implementation of the hash and of stochastic rounding (below,
with ``ml_dtypes`` for the narrow formats), float32 training for the trajectories, and
the reference path ``update`` + ``optax.apply_updates`` for the fused kernel.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import adamx
from adamx import _rounding
from adamx import fused as _fused
from tests import test_performance_paths as tpp

NARROW = [jnp.bfloat16, jnp.float16]


# ---------------------------------------------------------------- NumPy reference
def np_mix(h):
    h = h.astype(np.uint64) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def np_uniforms(seed, count, leaf, size):
    key = np_mix((np_mix(np_mix(np.uint64(seed)) ^ np.uint64(count)) + leaf * 0x9E3779B9) & 0xFFFFFFFF)
    j = np.arange(size, dtype=np.uint64)
    h = np_mix((np_mix(j ^ key) + key) & 0xFFFFFFFF)
    return (h >> 8).astype(np.float64) * 2.0**-24


def np_stochastic(x, dtype, r):
    """Round float32 ``x`` down or up to ``dtype``: up with probability (x - lo) / (hi - lo)."""
    npdt = {jnp.dtype(jnp.bfloat16): ml_dtypes.bfloat16, jnp.dtype(jnp.float16): np.float16}[jnp.dtype(dtype)]
    x = np.asarray(x, np.float64)
    q = x.astype(np.float32).astype(npdt).astype(np.float64)
    toward = np.where(x > q, np.inf, -np.inf)
    o = np.nextafter(q.astype(npdt), toward.astype(npdt)).astype(np.float64)
    lo, hi = np.minimum(q, o), np.maximum(q, o)
    up = r * (hi - lo) < (x - lo)
    return np.where(q == x, q, np.where(up, hi, lo))


@pytest.mark.parametrize("dtype", NARROW)
def test_stochastic_rounding_matches_numpy_reference_and_is_unbiased(dtype):
    rng = np.random.default_rng(0)
    n = 1 << 18
    # values inside one binade, and tiny ones (float16 subnormals), none exactly representable
    x = np.concatenate([rng.uniform(1.0, 2.0, n), rng.uniform(-3e-6, 3e-6, n // 8)]).astype(np.float32)
    r = jax.jit(lambda c: _rounding.uniforms(_rounding.leaf_key(5, c, 3), x.shape))(jnp.int32(11))
    np.testing.assert_array_equal(np.asarray(r, np.float64), np_uniforms(5, 11, 3, x.size))
    got = np.asarray(jax.jit(lambda x, r: _rounding.stochastic(x, dtype, r))(x, r), np.float64)
    np.testing.assert_array_equal(got, np_stochastic(x, dtype, np.asarray(r, np.float64)))
    # unbiased: the mean error over many elements is within 5 standard errors of 0, where
    # round-to-nearest is biased (here: the values sit in one binade, spacing 2**-7 or 2**-10)
    main = slice(0, n)
    err = got[main] - x[main].astype(np.float64)
    spacing = float(jnp.finfo(dtype).eps)
    assert np.all(np.abs(err) < spacing)
    stderr = spacing / 2 / np.sqrt(n)
    assert abs(err.mean()) < 5 * stderr, (err.mean(), stderr)
    # the frequency of rounding up is the fractional distance (first moment of the decision)
    frac = (x[main] - np.floor(x[main] / spacing) * spacing) / spacing
    up = err > 0
    assert abs(up.mean() - frac.mean()) < 5 * 0.5 / np.sqrt(n)


# ---------------------------------------------------------------- the stall of the issue
def _stall(mode, dtype, *, fused=False, n=4096, steps=1000):
    """bf16/f16 params at 1.0, lr 1e-4, a constant gradient: Adam's update is ~1e-4 a step."""
    opt = adamx.adam(learning_rate=1e-4, param_rounding=mode)
    params = {"w": jnp.ones((n,), dtype)}
    grads = {"w": jnp.ones((n,), dtype)}

    @jax.jit
    def step(p, s):
        if fused:
            return opt.apply_gradients(grads, s, p)
        u, s = opt.update(grads, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("dtype", NARROW)
def test_small_updates_stall_with_nearest_and_move_with_kahan_and_stochastic(dtype):
    p32, _ = _stall("nearest", jnp.float32, n=1)
    target = float(p32["w"][0])  # float32 moves 0.1
    assert abs((1.0 - target) - 0.1) < 1e-3
    spacing = float(jnp.finfo(dtype).eps) / 2  # the spacing of `dtype` in [0.5, 1)

    p, _ = _stall("nearest", dtype)
    assert np.all(np.asarray(p["w"], np.float32) == 1.0)  # moved by exactly 0.0

    p, s = _stall("kahan", dtype)
    w = np.asarray(p["w"], np.float64)
    assert np.all(w == w[0])
    assert abs(w[0] - target) <= spacing  # within one spacing of float32's trajectory
    held = w[0] + np.asarray(s.comp["w"], np.float64)[0]
    assert abs(held - target) < spacing / 4  # the compensation holds the rest
    assert s.comp["w"].dtype == dtype

    p, _ = _stall("stochastic", dtype)
    w = np.asarray(p["w"], np.float64)
    assert len(np.unique(w)) > 1  # the elements took different roundings
    # each element is unbiased; the mean of 4096 has a standard error of about
    # sqrt(1000 / 4) * spacing / sqrt(4096) (one coin flip of a spacing per step)
    assert abs(w.mean() - target) < 5 * np.sqrt(1000 / 4) * spacing / 64


@pytest.mark.skipif(not _fused.available(), reason="fused kernel unavailable")
@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_stall_fused_equals_reference_bit_for_bit(mode):
    ref = _stall(mode, jnp.bfloat16, n=257, steps=200)
    fus = _stall(mode, jnp.bfloat16, n=257, steps=200, fused=True)
    tpp.assert_trees_close(fus, ref, exact=True)


# ---------------------------------------------------------------- fused == reference, exactly
@pytest.mark.skipif(not _fused.available(), reason="fused kernel unavailable")
@pytest.mark.parametrize(
    "kw",
    [
        dict(param_rounding="kahan"),
        dict(param_rounding="stochastic", seed=3),
        dict(param_rounding="kahan", weight_decay=0.1, use_ema=True, ema_overwrite_frequency=3),
        dict(param_rounding="stochastic", gradient_accumulation_steps=2, acc_dtype=jnp.bfloat16, clipvalue=0.5),
        dict(param_rounding="kahan", gradient_accumulation_steps=3, acc_dtype=jnp.bfloat16, amsgrad=True),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items() if k != "acc_dtype"),
)
def test_fused_equals_reference_bit_for_bit(kw):
    """Without norm clipping (summed in another order) the kernel gives the reference's bits:
    f32, bf16 and f16 params, bf16 params with f32 grads, tree and flat state."""
    opt = adamx.adam(learning_rate=0.01, **kw)
    params = tpp.make_params()
    assert _fused.why_not(opt, tpp.make_grads(params, 0), opt.init(params), params) is None
    tpp.assert_trees_close(tpp.run(tpp.fused_step(opt), opt, 7), tpp.run(tpp.ref_step(opt), opt, 7), exact=True)
    flat = adamx.adam(learning_rate=0.01, flat_state=True, **kw)
    sub = ("bf16", "bf16_f32grad")
    fp, fs = tpp.run(tpp.fused_step(flat), flat, 7, sub)
    rp, rs = tpp.run(tpp.ref_step(flat), flat, 7, sub)
    tpp.assert_trees_close((fp, fs), (rp, rs), exact=True)


def test_unsupported_accumulator_dtype_falls_back_naming_it():
    with jax.enable_x64(True):  # float64 (the one valid acc_dtype the kernel does not keep) needs x64
        opt = adamx.adam(gradient_accumulation_steps=2, acc_dtype=jnp.float64)
        params = {"w": jnp.ones((4,), jnp.bfloat16)}
        state = opt.init(params)
        assert state.acc["w"].dtype == jnp.float64
        _assert_falls_back_naming(opt, params, state, "acc_dtype")


def _assert_falls_back_naming(opt, params, state, option):
    """The fused step refuses ``opt`` naming ``option``; ``apply_gradients`` then equals ``update``."""
    if _fused.available():
        reason = _fused.why_not(opt, params, state, params)
        assert reason is not None and option in reason
    p1, s1 = opt.apply_gradients(params, state, params)
    u, s2 = opt.update(params, state, params)
    tpp.assert_trees_close((p1, s1), (optax.apply_updates(params, u), s2), exact=True)


# ---------------------------------------------------------------- float32: all modes are nearest
@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_float32_params_equal_nearest_exactly(mode):
    base = adamx.adam(learning_rate=0.01, weight_decay=0.1)
    opt = adamx.adam(learning_rate=0.01, weight_decay=0.1, param_rounding=mode)
    params = tpp.make_params(subset=["f32"])
    want = tpp.run(tpp.ref_step(base), base, 5, ["f32"])
    got = tpp.run(tpp.ref_step(opt), opt, 5, ["f32"])
    tpp.assert_trees_close(got[0], want[0], exact=True)
    tpp.assert_trees_close((got[1].mu, got[1].nu), (want[1].mu, want[1].nu), exact=True)
    if mode == "kahan":
        assert all(not np.any(np.asarray(c)) for c in jax.tree_util.tree_leaves(got[1].comp))
    del params


# ---------------------------------------------------------------- the EMA sees the real params
@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_ema_sees_the_params_the_step_produces(mode):
    opt = adamx.adam(learning_rate=1e-2, param_rounding=mode, use_ema=True)
    params = {"w": jnp.linspace(0.5, 2.0, 64).astype(jnp.bfloat16)}
    state = opt.init(params)
    g = {"w": jnp.linspace(-1.0, 1.0, 64).astype(jnp.bfloat16)}
    u, state = opt.update(g, state, params)
    new = optax.apply_updates(params, u)
    assert not np.array_equal(np.asarray(new["w"]), np.asarray(params["w"]))
    # first step: the average is the new params
    np.testing.assert_array_equal(np.asarray(state.ema["w"]), np.asarray(new["w"], np.float32))


# ---------------------------------------------------------------- reproducibility
def _steps(opt, params, n, start=None):
    state = opt.init(params) if start is None else start
    step = jax.jit(lambda p, s, g: _apply(opt, p, s, g))
    for _ in range(n):
        params, state = step(params, state, _grads(params, int(state.count)))
    return params, state


def _apply(opt, p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s


def _grads(params, i):
    return jax.tree.map(
        lambda p: (jnp.sin(jnp.arange(p.size, dtype=jnp.float32) * 0.37 + i) * 0.3).reshape(p.shape).astype(p.dtype),
        params,
    )


def _params(dtype=jnp.bfloat16):
    return {"a": jnp.linspace(-1.0, 1.0, 96).reshape(12, 8).astype(dtype), "b": jnp.full((16,), 0.5, dtype)}


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_jit_and_eager_give_the_same_bits(mode, dtype):
    """The rounding (hash included) is the same op by op and compiled. (A whole eager step
    can differ from a jitted one in the moments' last bit: XLA contracts FMAs only when
    compiling; that is not the rounding's doing.)"""
    rng = np.random.default_rng(1)
    p = jnp.asarray(rng.uniform(-2, 2, 999), dtype)
    u = jnp.asarray(rng.standard_normal(999) * 1e-3, jnp.float32)
    c = jnp.asarray(rng.standard_normal(999) * 1e-4, dtype)

    def f(p, u, c, n):
        r = _rounding.uniforms(_rounding.leaf_key(3, n, 2), p.shape)
        return _rounding.receive(mode, p, u, c, r)

    eager = f(p, u, c, jnp.int32(7))
    jitted = jax.jit(f)(p, u, c, jnp.int32(7))
    tpp.assert_trees_close(eager, jitted, exact=True)
    # the update lands where the mode wanted: p + update moved some elements
    assert np.any(np.asarray(optax.apply_updates(p, eager[0])) != np.asarray(p))


def test_seed_leaf_and_step_change_the_bits():
    p = _params()
    a = _steps(adamx.adam(learning_rate=1e-3, param_rounding="stochastic", seed=1), p, 3)[0]
    b = _steps(adamx.adam(learning_rate=1e-3, param_rounding="stochastic", seed=2), p, 3)[0]
    assert not np.array_equal(np.asarray(a["a"]), np.asarray(b["a"]))
    k = _rounding.leaf_keys(0, jnp.int32(4), 3)
    assert len({int(x) for x in k}) == 3 and int(k[1]) == int(_rounding.leaf_key(0, jnp.int32(4), 1))
    assert int(_rounding.leaf_key(0, jnp.int32(5), 1)) != int(k[1])


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_vmap_gives_each_member_its_own_bits(mode):
    """vmap over a stack of models: each member's result is the result of its own step."""
    opt = adamx.adam(learning_rate=1e-3, param_rounding=mode)
    members = [jax.tree.map(lambda x, k=k: x * (1 + 0.25 * k), _params()) for k in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    state = jax.vmap(opt.init)(stacked)
    grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[_grads(m, 0) for m in members])
    p_v, s_v = jax.jit(jax.vmap(lambda p, s, g: _apply(opt, p, s, g)))(stacked, state, grads)
    for k, m in enumerate(members):
        p_k, s_k = jax.jit(lambda p, s, g: _apply(opt, p, s, g))(m, opt.init(m), _grads(m, 0))
        tpp.assert_trees_close(jax.tree.map(lambda x, k=k: x[k], (p_v, s_v)), (p_k, s_k), exact=True)


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_resume_from_a_checkpoint_gives_the_same_bits(mode, tmp_path):
    opt = adamx.adam(learning_rate=1e-3, param_rounding=mode, seed=9)
    straight = _steps(opt, _params(), 6)
    half = _steps(opt, _params(), 3)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp_path, "c"), half)
    ckpt.wait_until_finished()
    target = jax.eval_shape(lambda: (_params(), opt.init(_params())))
    restored = ckpt.restore(os.path.join(tmp_path, "c"), target)
    assert type(restored[1]) is type(half[1])
    resumed = _steps(opt, restored[0], 3, start=restored[1])
    tpp.assert_trees_close(resumed, straight, exact=True)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_sharded_step_gives_the_same_bits(mode):
    opt = adamx.adam(learning_rate=1e-3, param_rounding=mode)
    mesh = jax.make_mesh((4,), ("x",))
    shard = NamedSharding(mesh, PartitionSpec("x"))
    params = _params()
    sharded = jax.tree.map(lambda x: jax.device_put(x, shard), params)
    a = _steps(opt, params, 3)
    b = _steps(opt, sharded, 3)
    assert len(b[0]["a"].sharding.device_set) == 4
    tpp.assert_trees_close(b, a, exact=True)


# ---------------------------------------------------------------- state and checkpoints
def test_kahan_state_is_its_own_class_because_orbax_refuses_an_extra_field(tmp_path):
    """Old checkpoints hold the six-field AdamState; Orbax will not restore them into a
    seven-field target (why ``comp`` lives in KahanAdamState, not in AdamState)."""
    opt = adamx.adam()
    params = {"w": jnp.ones((3,))}
    state = opt.init(params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp_path, "six"), state)
    ckpt.wait_until_finished()
    seven = adamx.KahanAdamState(*state, comp=None)
    with pytest.raises(ValueError, match="comp"):
        ckpt.restore(os.path.join(tmp_path, "six"), jax.eval_shape(lambda: seven))
    assert type(adamx.adam(param_rounding="kahan").init(params)) is adamx.KahanAdamState
    assert type(adamx.adam(param_rounding="stochastic").init(params)) is adamx.AdamState


def test_state_bytes_per_param():
    params = {"w": jnp.ones((1000,), jnp.bfloat16)}

    def per_param(opt):
        s = opt.init(params)
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(s) if x.ndim) / 1000

    assert per_param(adamx.adam()) == 8.0
    assert per_param(adamx.adam(param_rounding="stochastic")) == 8.0
    assert per_param(adamx.adam(param_rounding="kahan")) == 10.0
    assert per_param(adamx.adam(gradient_accumulation_steps=4)) == 12.0
    assert per_param(adamx.adam(gradient_accumulation_steps=4, acc_dtype=jnp.bfloat16)) == 10.0


# ---------------------------------------------------------------- acc_dtype
def test_bfloat16_accumulator_accuracy():
    """The window mean through a bfloat16 accumulator: measured against float32's. Each add
    rounds to bfloat16 (relative 2**-9), so after k micro-steps the mean is off by at most
    about k * 2**-9 of the gradients' magnitude; with float32 it is exact to float32."""
    k = 8
    rng = np.random.default_rng(3)
    gs = [{"w": jnp.asarray(rng.standard_normal(4096), jnp.float32)} for _ in range(k)]
    params = {"w": jnp.zeros((4096,), jnp.float32)}

    def first_moment(acc_dtype):
        opt = adamx.adam(gradient_accumulation_steps=k, acc_dtype=acc_dtype, beta_1=0.0)
        s = opt.init(params)
        for g in gs:
            _, s = opt.update(g, s, params)
        return np.asarray(s.mu["w"], np.float64)  # beta_1 = 0: mu is the window mean

    exact = np.mean([np.asarray(g["w"], np.float64) for g in gs], axis=0)
    err32 = np.max(np.abs(first_moment(None) - exact))
    err16 = np.max(np.abs(first_moment(jnp.bfloat16) - exact))
    scale = np.max(np.abs(np.asarray([g["w"] for g in gs])))
    assert err32 < 1e-6 * scale
    assert 1e-4 * scale < err16 < k * 2.0**-9 * scale


# ---------------------------------------------------------------- validation and configs
def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="param_rounding"):
        adamx.adam(param_rounding="up")
    with pytest.raises(TypeError, match="seed"):
        adamx.adam(param_rounding="stochastic", seed=1.5)
    with pytest.raises(TypeError, match="acc_dtype"):
        adamx.adam(acc_dtype=jnp.int32)
    with pytest.raises(TypeError, match="acc_dtype"):
        adamx.adam(acc_dtype="not a dtype")
    opt = adamx.adam(param_rounding="kahan")
    params = {"w": jnp.ones((2,), jnp.bfloat16)}
    with pytest.raises(ValueError, match="param_rounding"):
        opt.update(params, opt.init(params))
    with pytest.raises(ValueError, match="KahanAdamState"):
        opt.update(params, adamx.adam().init(params), params)


def test_config_round_trip():
    opt = adamx.adam(param_rounding="stochastic", seed=4, acc_dtype=jnp.bfloat16, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="include_adamx"):
        adamx.to_keras_config(opt)
    cfg = adamx.to_keras_config(opt, include_adamx=True)
    assert (cfg["param_rounding"], cfg["seed"], cfg["acc_dtype"]) == ("stochastic", 4, "bfloat16")
    back = adamx.from_keras_config(cfg)
    assert (back.spec.param_rounding, back.spec.seed, jnp.dtype(back.spec.acc_dtype)) == (
        "stochastic",
        4,
        jnp.dtype(jnp.bfloat16),
    )
    assert "param_rounding" not in adamx.to_keras_config(adamx.adam())


def test_rounding_with_8bit_moments_falls_back_naming_it():
    opt = adamx.adam(param_rounding="kahan", quantize_moments=True, quantize_min_size=1)
    params = {"w": jnp.linspace(0.5, 1.5, 300).astype(jnp.bfloat16)}
    state = opt.init(params)
    _assert_falls_back_naming(opt, params, state, "param_rounding")
