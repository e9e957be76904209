"""The 8-bit step's schedules (``adamx._step.moments_coded``): one pass behind a barrier on XLA:CPU,
two passes on GPU (block absmax, then encode with those scales), one plain pass on TPU.

The GPU and TPU schedules only compile for their backends under ``platform_dependent``; here every
schedule is forced on the CPU and checked against the CPU one: the same codes, scales and update.
The bytes they move are checked by tests/accel (the GPU and TPU compilers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamx
from adamx import _codecs, _step
from adamx import _quantize as Q

SIGNED = (Q.SIGNED_DYNAMIC_MAP, True)
UNSIGNED = (Q.UNSIGNED_DYNAMIC_MAP, False)


def _hard_values(shape, seed=0):
    """Magnitudes over 12 decades, a zero block, a subnormal-only block, a block with a NaN and one with inf."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-12, 0, shape)).astype(np.float32)
    flat = x.reshape(-1)
    flat[:256] = 0.0
    flat[256:512] = np.float32(1e-40) * rng.standard_normal(256).astype(np.float32)
    flat[700] = np.nan
    flat[1000] = -np.inf
    return jnp.asarray(x)


@pytest.mark.parametrize("code,signed", [SIGNED, UNSIGNED])
@pytest.mark.parametrize("shape", [(16, 512), (8, 4, 256), (3000,)])
def test_quantize_with_precomputed_scales_equals_quantize(code, signed, shape):
    """The GPU schedule's encode (scales from :meth:`Dynamic8.scales_of`, in the leaf's own shape)
    gives quantize's codes and scales bit for bit, NaN/inf/zero/subnormal blocks included; a leaf
    that is not a whole number of blocks (3000) takes the blocked path."""
    x = _hard_values(shape)
    if not signed:
        x = jnp.abs(x)
    codec = _codecs.Dynamic8(signed=signed)
    want = Q.quantize(x, code)
    got = jax.jit(lambda x: codec.encode(x, codec.scales_of(x)))(x)
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))


@pytest.mark.parametrize("shape", [(16, 512), (8, 4, 1024), (4, 256 * 32)])
def test_lane_absmax_equals_block_absmax(shape):
    """The TPU schedule's block absmax (static slices of the last axis, no reshape) is
    block_absmax's, NaN/inf/zero/subnormal blocks included; quantize with ``lanes`` gives
    quantize's codes and scales, and decoding with ``lookup="lanes"`` dequantize's values."""
    x = _hard_values(shape, seed=2)
    assert Q.lane_blocks(shape, 256) == shape[-1] // 256
    np.testing.assert_array_equal(
        np.asarray(jax.jit(Q.lane_absmax, static_argnums=1)(x, 256)), np.asarray(Q.block_absmax(x))
    )
    for code, signed in (SIGNED, UNSIGNED):
        y = x if signed else jnp.abs(x)
        want = Q.quantize(y, code)
        got = jax.jit(lambda y, code=code: Q.quantize(y, code, lanes=True))(y)
        np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
        finite = Q.quantize(jnp.where(jnp.isfinite(y), y, 0.0), code)
        ref = np.asarray(Q.dequantize(finite, code, shape))
        dec = jax.jit(lambda q, code=code: Q.dequantize(q, code, shape, lookup="lanes"))(finite)
        np.testing.assert_array_equal(np.asarray(dec), ref)


def test_lanes_only_where_the_last_axis_is_whole():
    """More than LANE_BLOCKS_MAX blocks a row, 1-D scales or a 1-D leaf: the blocked path."""
    assert Q.lane_blocks((4, 256 * (Q.LANE_BLOCKS_MAX + 1)), 256) == 0
    assert Q.lane_blocks((4, 300), 256) == 0
    assert Q.lane_blocks((4096,), 256) == 0
    assert Q.lane_blocks((3, 512), 256) == 2


@pytest.mark.parametrize("code,signed", [SIGNED, UNSIGNED])
def test_a_value_a_hair_above_its_scale_encodes_to_the_end_code(code, signed):
    """Where a compiler rounds the two passes differently, the value encoded may exceed the scale of
    pass 1 by an ulp: it must get the end code (255; the signed map's most negative code for a
    negative value), never wrap around."""
    x = jnp.asarray(np.linspace(0.5, 1.0, 512, dtype=np.float32).reshape(2, 256))
    if signed:
        x = x.at[1].multiply(-1.0)
    scales = jnp.nextafter(jnp.max(jnp.abs(x), axis=-1), 0.0)  # one ulp below the true absmax
    codes = np.asarray(Q.quantize(x, code, scales=scales).codes)
    assert codes[0, -1] == 255
    if signed:
        assert codes[1, -1] == Q.quantize(x, code).codes[1, -1]  # the most negative code
        assert codes[1, -1] == 0


@pytest.mark.parametrize("code,signed", [SIGNED, UNSIGNED])
@pytest.mark.parametrize("shape", [(16, 512), (3000,)])
def test_decode_lookups_agree(code, signed, shape):
    """Pass 1 decodes by a gather, pass 2 by arithmetic: both are the map's values exactly, scaled."""
    x = _hard_values(shape, seed=1)
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    if not signed:
        x = jnp.abs(x)
    q = Q.quantize(x, code)
    ref = np.asarray(Q.dequantize(q, code, shape))
    for lookup in ("table", "arithmetic"):
        got = jax.jit(lambda q, lookup=lookup: Q.dequantize(q, code, shape, lookup=lookup))(q)
        np.testing.assert_array_equal(np.asarray(got), ref)


def _steps(opt, params, grads):
    state = opt.init(params)
    step = jax.jit(opt.update)
    out = []
    for g in grads:
        u, state = step(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, u)
        out.append((u, state))
    return out


@pytest.mark.parametrize("schedule", ["two_passes", "plain", "lanes"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kwargs", [{}, {"amsgrad": True}, {"moment_format": "fp8"}, {"moment_format": "4bit"}])
def test_every_schedule_gives_the_cpu_schedules_steps(monkeypatch, schedule, dtype, kwargs):
    """Five jitted steps of ``adamx.adam(quantize_moments=True)`` with the GPU (two passes) or TPU
    (plain) schedule forced on the CPU: the same updates and states, bit for bit, as the CPU
    schedule (which equals the fused kernel)."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((32, 512)), dtype), "b": jnp.zeros((40,), dtype)}
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-6, 0), p.dtype), params)
        for _ in range(5)
    ]
    make = functools.partial(adamx.adam, 1e-3, quantize_moments=True, quantize_min_size=1024, **kwargs)
    want = _steps(make(), params, grads)
    monkeypatch.setattr(_step, "moments_coded", functools.partial(_step.moments_coded, schedule=schedule))
    got = _steps(make(), params, grads)  # a new optimizer: its update is traced anew
    for (u, s), (u0, s0) in zip(got, want):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), (u, s), (u0, s0))


@pytest.mark.parametrize("schedule", ["two_passes", "lanes"])
@pytest.mark.parametrize("spec", [("xy", None), (None, "xy"), ("x", "y")])
def test_accelerator_schedules_on_an_explicit_mesh_split_like_params_without_collectives(monkeypatch, spec, schedule):
    """The GPU (two passes) and TPU (lanes) schedules on an Explicit 2x4 mesh (params split along
    either axis or both; lanes falls back to blocks where the last axis is split): the same steps
    as the CPU schedule on the same mesh, the state split like the params, and no collective in
    the compiled step."""
    devices = jax.devices()
    assert len(devices) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)"
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    pspec = jax.sharding.PartitionSpec(*(("x", "y") if a == "xy" else a for a in spec))
    rng = np.random.default_rng(7)
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, pspec)
        params = {"w": jax.device_put(jnp.asarray(rng.standard_normal((64, 2048)), jnp.float32), sharding)}
        grads = [
            {"w": jax.device_put(jnp.asarray(rng.standard_normal((64, 2048)) * 1e-2, jnp.float32), sharding)}
            for _ in range(3)
        ]
        want = _steps(adamx.adam(1e-3, quantize_moments=True), params, grads)
        monkeypatch.setattr(_step, "moments_coded", functools.partial(_step.moments_coded, schedule=schedule))
        opt = adamx.adam(1e-3, quantize_moments=True)  # a new optimizer: its update is traced anew
        got = _steps(opt, params, grads)
        hlo = jax.jit(opt.update).lower(grads[0], opt.init(params), params).compile().as_text()
    for (u, s), (u0, s0) in zip(got, want):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), (u, s), (u0, s0))
    codes = got[-1][1].mu["w"].codes
    assert codes.sharding.is_equivalent_to(sharding, 2)
    assert not any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))
