"""The fused step's accelerator kernels (adamx/fused/_pallas.py), run on CPU.

The Pallas kernels for GPU (Triton) and TPU (Mosaic) run here in interpret mode, against the XLA
step they replace; the step as a whole (the primitive lowered to the XLA step on CPU) against
``update`` + ``optax.apply_updates``. Their compiled bytes for an H100 and a TPU v5e are checked in
tests/accel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _step
from adamx.fused import _pallas
from tests.bitwise import bits

SHAPES = [(64, 1024), (40, 256), (3, 8, 512), (4096 * 3,), (37, 768), (100, 4096), (33, 384)]


def _bs(fmt):
    return 128 if fmt == "4bit" else 256


def _states(shape, dtype, seed=0, steps=3, **kw):
    """Params, a state after ``steps`` real steps with gradients of several magnitudes, and a gradient."""
    opt = adamx.adam(1e-2, quantize_moments=True, **kw)
    p = {"w": jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)}
    s = opt.init(p)

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(steps):
        g = {"w": (jax.random.normal(jax.random.PRNGKey(seed + i + 1), shape) * 10.0 ** (i - 1)).astype(dtype)}
        p, s = step(p, s, g)
    g = {"w": jax.random.normal(jax.random.PRNGKey(seed + 99), shape).astype(dtype)}
    return opt, p, s, g


def _scal(opt, s, lsf=1.0):
    sc = _step.scalars(opt.spec, s.count)
    return jnp.stack([sc.c1, sc.c2, sc.alpha, sc.eps, sc.lr, sc.wd, jnp.float32(lsf), jnp.float32(448)])


@pytest.mark.parametrize("fmt", _pallas.FORMATS)
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_equals_xla_step(platform, shape, dtype, fmt):
    """Codes, scales and params of the interpreted kernel equal the XLA step's, bit for bit."""
    if shape[-1] % _bs(fmt):
        return  # (33, 384): an odd number of 4-bit blocks a row (the TPU kernel's last chunk of one)
    if platform == "tpu" and not _pallas.tpu_takes(shape, _bs(fmt)):
        pytest.fail(f"shape {shape} is meant for the TPU kernel")
    opt, p, s, g = _states(shape, dtype, moment_format=fmt)
    mu, nu = s.mu["w"], s.nu["w"]
    args = (_scal(opt, s, 4.0), g["w"] * 4, p["w"], mu.codes, mu.scales, nu.codes, nu.scales)
    kw = {"fmt": fmt, "block_size": _bs(fmt), "decay": False, "has_lsf": True}
    got = _pallas._kernel_leaf(platform, *args, interpret=True, **kw)
    want = jax.jit(lambda *a: _pallas._reference_leaf(*a, **kw))(*args)
    for name, a, b in zip(["param", "mu codes", "mu scales", "nu codes", "nu scales"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(bits(a), bits(b), err_msg=name)


@pytest.mark.parametrize("fmt", _pallas.FORMATS)
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_kernel_decay_within_one_ulp(platform, fmt):
    """With weight decay the codes are equal and the params within one float32 ulp (where the
    compiler contracts ``p * wd * lr`` into the update is its choice)."""
    opt, p, s, g = _states((64, 512), jnp.float32, weight_decay=0.05, moment_format=fmt)
    mu, nu = s.mu["w"], s.nu["w"]
    args = (_scal(opt, s), g["w"], p["w"], mu.codes, mu.scales, nu.codes, nu.scales)
    kw = {"fmt": fmt, "block_size": _bs(fmt), "decay": True, "has_lsf": False}
    got = _pallas._kernel_leaf(platform, *args, interpret=True, **kw)
    want = jax.jit(lambda *a: _pallas._reference_leaf(*a, **kw))(*args)
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(bits(a), bits(b))
    ulps = np.abs(bits(got[0]).astype(np.int64) - bits(want[0]).astype(np.int64))
    assert ulps.max() <= 1
    assert not np.array_equal(np.asarray(got[0]), np.asarray(p["w"]))  # the step moved the params


@pytest.mark.parametrize("fmt", _pallas.FORMATS)
def test_kernel_non_finite_gradient(fmt):
    """A NaN gradient poisons its block as the XLA step does (scale NaN)."""
    opt, p, s, g = _states((16, 512), jnp.float32, moment_format=fmt)
    gw = g["w"].at[3, 300].set(jnp.nan)
    mu, nu = s.mu["w"], s.nu["w"]
    args = (_scal(opt, s), gw, p["w"], mu.codes, mu.scales, nu.codes, nu.scales)
    kw = {"fmt": fmt, "block_size": _bs(fmt), "decay": False, "has_lsf": False}
    got = _pallas._kernel_leaf("gpu", *args, interpret=True, **kw)
    want = jax.jit(lambda *a: _pallas._reference_leaf(*a, **kw))(*args)
    block = (3 * 512 + 300) // _bs(fmt)  # the block of element (3, 300)
    assert np.isnan(np.asarray(got[2]).ravel()[block]) and np.isnan(np.asarray(got[4]).ravel()[block])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(bits(a), bits(b))


def _tree():
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    return {
        "dense": jax.random.normal(k[0], (96, 512)),  # the kernel
        "emb": jax.random.normal(k[1], (50, 256), jnp.bfloat16),  # the kernel, bf16
        "odd": jax.random.normal(k[2], (70, 100)),  # 8-bit, last axis not whole blocks: the XLA step
        "bias": jax.random.normal(k[3], (512,)),  # too small to quantize: float32 moments
        "norm": {"scale": jax.random.normal(k[4], (64, 512))},  # the kernel, excluded from decay
    }


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"weight_decay": 0.1, "exclude_from_weight_decay": ["scale"]},
        {"clipnorm": 0.5},
        {"global_clipnorm": 0.5, "loss_scale_factor": 128.0},
        {"loss_scale_factor": 64.0, "learning_rate": optax.linear_schedule(1e-2, 1e-3, 10)},
    ],
    ids=["adam", "decay", "clipnorm", "global_clip_lsf", "lsf_schedule"],
)
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("fmt", _pallas.FORMATS)
def test_step_equals_update(platform, kw, fmt):
    """The accelerator step (kernel leaves lowered to the XLA step on CPU) equals update +
    optax.apply_updates bit for bit, over three steps, on a tree of kernel and XLA leaves."""
    kw = dict(kw)
    lr = kw.pop("learning_rate", 1e-2)
    opt = adamx.adam(lr, quantize_moments=True, moment_format=fmt, **kw)
    params = _tree()
    s_ref = s_acc = opt.init(params)
    p_ref = p_acc = params

    @jax.jit
    def ref(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def acc(p, s, g):
        reason, plan = _pallas.plan(opt, g, s, p)
        assert reason is None and plan.kernel == [False, True, True, True, False]  # bias, dense, emb, norm, odd
        return _pallas.run(plan, s, platform)

    for i in range(3):
        g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(i), x.shape, x.dtype) * 3, params)
        p_ref, s_ref = ref(p_ref, s_ref, g)
        p_acc, s_acc = acc(p_acc, s_acc, g)
    for a, b in zip(jax.tree.leaves((p_ref, s_ref)), jax.tree.leaves((p_acc, s_acc))):
        np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"quantize_moments": False}, "coded moments"),
        ({"quantize_moments": True, "amsgrad": True}, "amsgrad"),
        ({"quantize_moments": True, "gradient_accumulation_steps": 2}, "accumulation"),
        ({"quantize_moments": True, "use_ema": True}, "use_ema"),
        ({"quantize_moments": True, "flat_state": True}, "flat_state"),
    ],
)
def test_plan_refuses(kw, why):
    opt = adamx.adam(1e-3, **kw)
    params = {"w": jnp.ones((64, 512))}
    reason, plan = _pallas.plan(opt, params, opt.init(params), params)
    assert plan is None and why in reason


def test_plan_needs_a_kernel_leaf():
    opt = adamx.adam(1e-3, quantize_moments=True)
    params = {"w": jnp.ones((100, 100))}  # 8-bit, but no whole blocks along the last axis
    reason, plan = _pallas.plan(opt, params, opt.init(params), params)
    assert plan is None and "no leaf" in reason


def test_primitive_eager_and_cpu_apply_gradients():
    """The primitive runs eagerly (its XLA step), and apply_gradients on CPU still takes the C++
    kernel (the accelerator branches are traced, not lowered): the same numbers as update."""
    opt, p, s, g = _states((32, 512), jnp.float32)
    mu, nu = s.mu["w"], s.nu["w"]
    p2, m2, v2 = _pallas.leaf_step(
        _scal(opt, s), g["w"], p["w"], mu, nu, fmt="dynamic8", block_size=256, decay=False, has_lsf=False
    )
    u, s_ref = jax.jit(opt.update)(g, s, p)
    p_ref = optax.apply_updates(p, u)
    np.testing.assert_array_equal(np.asarray(p2), np.asarray(p_ref["w"]))
    np.testing.assert_array_equal(np.asarray(m2.codes), np.asarray(s_ref.mu["w"].codes))
    pa, sa = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p))(p, s, g)
    np.testing.assert_array_equal(np.asarray(pa["w"]), np.asarray(p_ref["w"]))
    np.testing.assert_array_equal(np.asarray(sa.nu["w"].codes), np.asarray(s_ref.nu["w"].codes))


@pytest.mark.parametrize("fmt", _pallas.FORMATS)
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("spec", [("xy", None), (None, "xy"), ("x", "y"), (None, "x"), ("x", None)])
def test_step_on_an_explicit_mesh(platform, spec, fmt):
    """Params split on an Explicit 2x4 mesh: a leaf split in whole blocks runs the kernel per shard
    (shard_map, no collective) and equals the single-device step; a split that cuts blocks (the
    last axis 1024 over 8: 128 per shard) takes the XLA step. The state stays split like the params.
    fp8's scales and 4-bit's codes and scales are 1-D: split along the major axis when the params
    are split there alone (then the kernel), unsplit otherwise (then the XLA step for the leaf)."""
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)"
    rng = np.random.default_rng(3)
    w = {
        "a": rng.standard_normal((64, 4096)).astype(np.float32),
        "b": rng.standard_normal((32, 1024)).astype(np.float32),
    }
    g = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 1e-2).astype(np.float32), w)
    opt = adamx.adamw(1e-3, weight_decay=0.01, quantize_moments=True, moment_format=fmt)
    major = all(e is None for e in spec[1:])  # fp8 and 4bit: the kernel takes a split along axis 0 alone

    def ref(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    def acc(p, s, g):
        reason, plan = _pallas.plan(opt, g, s, p)
        if reason is not None:
            assert fmt != "dynamic8" and not major and "no leaf" in reason, reason
            return ref(p, s, g)
        return _pallas.run(plan, s, platform)

    one = jax.tree.map(jnp.asarray, w)
    want_p, want_s = jax.jit(ref)(one, opt.init(one), jax.tree.map(jnp.asarray, g))
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    pspec = jax.sharding.PartitionSpec(*(("x", "y") if a == "xy" else a for a in spec))
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, pspec)
        params = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), sharding), w)
        grads = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), sharding), g)
        state = jax.jit(opt.init)(params)
        got_p, got_s = jax.jit(acc)(params, state, grads)
        _, plan = _pallas.plan(opt, grads, state, params)
        text = jax.jit(acc).lower(params, state, grads).compile().as_text()
    cuts_blocks = spec == (None, "xy")  # b: 1024 / 8 = 128 per shard
    if fmt != "dynamic8" and not major:
        assert plan is None
    else:
        assert plan.kernel == [True, not cuts_blocks]
    # the kernel leaves move no data between devices (a leaf whose blocks the split cuts does: the XLA step)
    assert (
        plan is None
        or not all(plan.kernel)
        or not any(c in text for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))
    )
    for a, b in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((want_p, want_s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for leaf in ("a", "b"):
        codes = got_s.mu[leaf].codes
        if codes.ndim == 2:
            assert codes.sharding.is_equivalent_to(got_p[leaf].sharding, 2)
        else:  # 4-bit's packed codes: split along the major axis alone
            assert tuple(codes.sharding.spec) == (pspec[0] if major else None,)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(got_s)):  # init's shardings are the step's
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
