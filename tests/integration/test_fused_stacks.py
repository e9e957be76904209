"""The fused step from Flax: the one-line replacements of ``TrainState.apply_gradients`` and
``nnx.Optimizer.update`` take the fused kernel and give the reference path's numbers."""

from __future__ import annotations

import functools

import jax
import pytest
from flax import nnx
from flax.training import train_state
from stack_utils import N_STEPS, OPTIMIZERS, assert_trees_close, batches, full_adam, reference
from test_linen import MODEL, fresh_params, loss_fn
from test_nnx import make_model, mse

import adamx
from adamx import fused as _fused

needs_kernel = pytest.mark.skipif(not _fused.available(), reason=f"fused kernel unavailable: {_fused.status()}")


@functools.partial(jax.jit, donate_argnums=0)
def linen_fused_step(state, x, y):
    grads = jax.grad(loss_fn)(state.params, x, y)
    return adamx.fused.train_state_apply_gradients(state, grads)


@needs_kernel
@pytest.mark.filterwarnings("error")  # a donated buffer XLA could not use would fail the test
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_linen_train_state_fused(opt):
    ref_params, ref_state = reference(opt)
    state = train_state.TrainState.create(apply_fn=MODEL.apply, params=fresh_params(), tx=OPTIMIZERS[opt]())
    x0, y0 = batches(1)[0]
    assert "adamx_fused_step" in linen_fused_step.lower(state, x0, y0).as_text()
    for x, y in batches():
        old = state
        state = linen_fused_step(state, x, y)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old) if isinstance(leaf, jax.Array))
    assert int(state.step) == N_STEPS
    assert_trees_close(state.params, ref_params, what="params")
    assert_trees_close(state.opt_state, ref_state, what="opt_state")


@nnx.jit
def nnx_fused_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
    adamx.fused.nnx_update(optimizer, model, grads)
    return loss


@needs_kernel
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_nnx_optimizer_fused(opt):
    ref_params, ref_state = reference(opt)
    model = make_model()
    optimizer = nnx.Optimizer(model, OPTIMIZERS[opt](), wrt=nnx.Param)
    graphdef, st = nnx.split((model, optimizer))

    def pure_step(st, x, y):
        m, o = nnx.merge(graphdef, st)
        nnx_fused_step(m, o, x, y)
        return nnx.state((m, o))

    x0, y0 = batches(1)[0]
    assert "adamx_fused_step" in jax.jit(pure_step).lower(st, x0, y0).as_text()
    for x, y in batches():
        nnx_fused_step(model, optimizer, x, y)
    assert int(optimizer.step[...]) == N_STEPS
    assert_trees_close(nnx.state(model, nnx.Param), ref_params, what="params")
    assert_trees_close(optimizer.opt_state, ref_state, what="opt_state")


@pytest.mark.standard_promotion("optax's own Adam/schedules compute float ** int32 count")
def test_nnx_update_falls_back_for_other_transformations():
    """``nnx_update`` with a plain optax optimizer is ``optimizer.update``."""
    import optax

    m1, m2 = make_model(), make_model()
    o1 = nnx.Optimizer(m1, optax.adam(1e-2), wrt=nnx.Param)
    o2 = nnx.Optimizer(m2, optax.adam(1e-2), wrt=nnx.Param)
    for x, y in batches(3):
        g1 = nnx.grad(lambda m: mse(m(x), y))(m1)
        g2 = nnx.grad(lambda m: mse(m(x), y))(m2)
        adamx.fused.nnx_update(o1, m1, g1)
        o2.update(m2, g2)
    assert_trees_close(nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param), rtol=0, atol=0, what="params")
    assert int(o1.step[...]) == 3


@needs_kernel
def test_nnx_optimizer_fused_flat_state():
    """flat_state=True through nnx: same params as the tree-state reference, EMA read back through
    the nnx variable wrappers."""
    ref_params, ref_state = reference("full")
    model = make_model()
    optimizer = nnx.Optimizer(model, full_adam(flat_state=True), wrt=nnx.Param)
    for x, y in batches():
        nnx_fused_step(model, optimizer, x, y)
    assert isinstance(nnx.as_pure(optimizer.opt_state).mu, adamx.FlatBuffers)
    assert_trees_close(nnx.state(model, nnx.Param), ref_params, what="params")
    assert_trees_close(
        adamx.finalize_variable_values(nnx.state(model, nnx.Param), optimizer.opt_state),
        adamx.finalize_variable_values(ref_params, ref_state),
        what="ema",
    )
