"""``update`` of 8-bit moments on XLA:CPU through the C++ kernel (issue 21, item 5).

Each 8-bit (dynamic8) unit's moments are one primitive (``adamx._step.coded_moments_p``) whose
CPU lowering ``adamx.fused`` registers: one ``jax.ffi`` call per leaf running the fused step's
per-block arithmetic. Checked here against XLA's own schedule (the kernel switched off), bit for
bit, and for where the XLA schedule is kept: ``jax.export``, ``vmap``, arrays split over devices,
a state of the first (1-D) layout, programs compiled for other platforms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _quantize
from adamx.fused import _build
from tests.bitwise import bits

TARGET = _build.MOMENTS_Q8_TARGET


def _params(dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "w": jax.random.normal(k[0], (96, 512), dtype),
        "odd": jax.random.normal(k[1], (70, 100), dtype),  # 8-bit, a partial last block
        "b": jax.random.normal(k[2], (300,), dtype),  # float32 moments
    }


def _grads(params, i):
    return jax.tree.map(
        lambda x: (jax.random.normal(jax.random.PRNGKey(i), x.shape) * 10.0 ** (i % 3 - 1)).astype(x.dtype), params
    )


def _run(opt, params, steps=4):
    """``steps`` jitted steps (update + apply_updates) from a fresh state; a new jit each call."""

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    f = jax.jit(step)
    p, s = params, opt.init(params)
    for i in range(steps):
        p, s = f(p, s, _grads(params, i))
    return p, s, f.lower(p, s, _grads(params, 0)).compile().as_text()


def _assert_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(bits(x), bits(y))


OPTIONS = {
    "adam": {},
    "amsgrad": {"amsgrad": True},
    "adamw": {"weight_decay": 0.05},
    "loss scale": {"loss_scale_factor": 64.0},
    "clipvalue": {"clipvalue": 0.5},
    "clipnorm": {"clipnorm": 0.5},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "accumulation": {"gradient_accumulation_steps": 2},  # XLA's schedule (the window mean)
    "ema": {"use_ema": True, "ema_overwrite_frequency": 3},
    "block 128": {"quantize_block_size": 128},
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_update_equals_xla_schedule(option, dtype, monkeypatch):
    """With the kernel (the CPU default) and without it: params, codes, scales, every state leaf
    bit for bit over 4 steps; the kernel's program holds its call and the other does not."""
    make = lambda: adamx.adam(1e-2, quantize_moments=True, **OPTIONS[option])  # noqa: E731
    params = _params(dtype)
    p1, s1, text1 = _run(make(), params)
    # clipping by norm and the accumulation window keep XLA's schedule (their products are
    # contracted into the moments' g - m: adamx._step.coded_kernel_applies)
    assert (TARGET in text1) == (option not in ("clipnorm", "global_clipnorm", "accumulation"))
    monkeypatch.setattr(_build, "available", lambda: False)
    p2, s2, text2 = _run(make(), params)
    assert TARGET not in text2
    _assert_equal((p1, s1), (p2, s2))


def test_gradient_computed_in_the_step_update_equals_apply_gradients():
    """The gradient computed inside the jitted step (jax.grad, whose last operation is a product):
    for 8-bit leaves ``update`` and the fused ``apply_gradients`` both take it as a kernel operand,
    so they agree bit for bit (a float32-moment leaf's update contracts that product into its
    moments, the fused kernel cannot: there they may differ by an ulp, as before)."""
    opt = adamx.adam(1e-2, quantize_moments=True)
    params = {k: v for k, v in _params().items() if k != "b"}
    x = jax.random.normal(jax.random.PRNGKey(5), (512,))

    def loss(p):
        return jnp.sum(jnp.tanh(p["w"] @ x) ** 2) + jnp.sum(p["odd"] ** 3)

    @jax.jit
    def by_update(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def by_apply(p, s):
        return opt.apply_gradients(jax.grad(loss)(p), s, p)

    a = b = (params, opt.init(params))
    for _ in range(3):
        a, b = by_update(*a), by_apply(*b)
    _assert_equal(a, b)


def test_export_takes_the_xla_schedule():
    """``jax.export`` refuses unknown custom calls: an exported step holds XLA's schedule, and runs
    to the same numbers."""
    opt = adamx.adam(1e-2, quantize_moments=True)
    params = _params()
    state = opt.init(params)
    g = _grads(params, 1)
    exported = jax.export.export(jax.jit(opt.update))(g, state, params)
    assert TARGET not in exported.mlir_module()
    _assert_equal(exported.call(g, state, params), jax.jit(opt.update)(g, state, params))


def test_vmap_takes_the_xla_schedule():
    """An ensemble: ``vmap`` over params, state and grads runs XLA's schedule per member and equals
    each member's own step."""
    opt = adamx.adam(1e-2, quantize_moments=True)
    members = [_params() for _ in range(2)]
    members[1] = jax.tree.map(lambda x: x * 2, members[1])
    states = [opt.init(p) for p in members]
    grads = [_grads(p, i) for i, p in enumerate(members)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    u, s = jax.jit(jax.vmap(opt.update))(stack(grads), stack(states), stack(members))
    for i in range(2):
        ui, si = jax.jit(opt.update)(grads[i], states[i], members[i])
        _assert_equal(jax.tree.map(lambda x: x[i], (u, s)), (ui, si))


def test_split_over_devices_takes_the_xla_schedule():
    """Params split over an Explicit mesh: no call (it would need the arrays gathered), the same numbers."""
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)"
    opt = adamx.adam(1e-2, quantize_moments=True)
    params = {"w": _params()["w"]}
    want_p, want_s, _ = _run(opt, params, steps=2)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        sharded = jax.tree.map(
            lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))), params
        )
        got_p, got_s, text = _run(adamx.adam(1e-2, quantize_moments=True), sharded, steps=2)
    assert TARGET not in text
    _assert_equal((got_p, got_s), (want_p, want_s))


def test_first_layout_takes_the_xla_schedule():
    """A state of the first 8-bit layout (1-D codes and scales) is converted by XLA's path, not the call."""
    opt = adamx.adam(1e-2, quantize_moments=True)
    params = {"w": _params()["w"]}
    state = opt.init(params)
    q = state.mu["w"]
    old = state._replace(
        mu={"w": _quantize.QuantizedArray(q.codes.reshape(-1), q.scales.reshape(-1))},
        nu={"w": _quantize.QuantizedArray(state.nu["w"].codes.reshape(-1), state.nu["w"].scales.reshape(-1))},
    )
    g = _grads(params, 1)
    text = jax.jit(opt.update).lower(g, old, params).compile().as_text()
    assert TARGET not in text
    _assert_equal(jax.jit(opt.update)(g, old, params)[0], jax.jit(opt.update)(g, state, params)[0])
