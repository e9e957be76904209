"""Flax linen: ``TrainState.create(tx=adamx.adam(...))`` + ``apply_gradients`` in a jitted step donating the state."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state
from stack_utils import (
    HIDDEN,
    N_STEPS,
    OPTIMIZERS,
    OUT,
    assert_trees_close,
    batches,
    buffer_pointers,
    init_mlp,
    mlp_loss,
    mse,
    reference,
)

import adamx


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(HIDDEN, name="dense")(x))
        return nn.Dense(OUT, name="out")(h)


MODEL = MLP()


def loss_fn(params, x, y):
    return mse(MODEL.apply({"params": params}, x), y)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: train_state.TrainState, x, y):
    grads = jax.grad(loss_fn)(state.params, x, y)
    return state.apply_gradients(grads=grads)


def fresh_params():
    # TrainState.create keeps the arrays it is given and the step donates them: never share with the reference
    return jax.tree.map(jnp.copy, init_mlp())


@pytest.mark.filterwarnings("error")  # "Some donated buffers were not usable" would fail the test
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_train_state_donated_step_matches_reference(opt):
    data = batches()
    # the linen model computes exactly the reference problem's function
    assert float(loss_fn(init_mlp(), *data[0])) == float(mlp_loss(init_mlp(), *data[0]))
    ref_params, ref_state = reference(opt)

    state = train_state.TrainState.create(apply_fn=MODEL.apply, params=fresh_params(), tx=OPTIMIZERS[opt]())
    # no optimizer buffer aliases a parameter (the EMA copy) or another buffer
    p_ptrs, s_ptrs = buffer_pointers(state.params), buffer_pointers(state.opt_state)
    assert not set(p_ptrs) & set(s_ptrs), "opt_state shares a buffer with params: donation would fail"
    assert len(set(s_ptrs)) == len(s_ptrs), "two opt_state leaves share a buffer"

    for i, (x, y) in enumerate(data):
        old = state
        state = train_step(state, x, y)
        if i == 0:  # donation really happened: every input buffer was consumed
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old) if isinstance(leaf, jax.Array))
    assert int(state.step) == N_STEPS
    assert_trees_close(state.params, ref_params, what="params")
    assert_trees_close(state.opt_state, ref_state, what="opt_state")
    assert_trees_close(
        adamx.finalize_variable_values(state.params, state.opt_state),
        adamx.finalize_variable_values(ref_params, ref_state),
        what="ema",
    )


def test_aliasing_init_is_caught_by_donation():
    """Control: an ``init`` returning the params themselves (as a naive EMA would) fails under donation.

    This is the failure the test above guards against; adamx copies instead.
    """
    aliasing = optax.GradientTransformation(lambda p: p, lambda u, s, p=None: (u, s))
    tx = optax.chain(optax.sgd(0.1), aliasing)
    state = train_state.TrainState.create(apply_fn=MODEL.apply, params=fresh_params(), tx=tx)
    x, y = batches(1)[0]
    with pytest.raises(Exception, match="donate the same buffer twice"):
        jax.block_until_ready(train_step(state, x, y))
