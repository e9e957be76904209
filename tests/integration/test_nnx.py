"""Flax NNX: ``nnx.Optimizer(model, adamx.adam(...), wrt=nnx.Param)`` under ``nnx.jit``, and the EMA read back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from stack_utils import (
    HIDDEN,
    IN,
    N_STEPS,
    OPTIMIZERS,
    OUT,
    assert_trees_close,
    batches,
    init_mlp,
    mlp,
    mse,
    reference,
)

import adamx


class MLP(nnx.Module):
    """The reference problem's function, as an NNX module."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.dense(x)))


def make_model() -> MLP:
    model = MLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, init_mlp())
    nnx.update(model, state)
    return model


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
    optimizer.update(model, grads)
    return loss


def train(opt: str) -> tuple[MLP, nnx.Optimizer]:
    model = make_model()
    optimizer = nnx.Optimizer(model, OPTIMIZERS[opt](), wrt=nnx.Param)
    for x, y in batches():
        train_step(model, optimizer, x, y)
    return model, optimizer


@pytest.fixture(scope="module")
def trained_full():
    return train("full")


def variable_values(tree):
    """Replace each nnx Variable by its array (keeps the State / NamedTuple structure)."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_nnx_optimizer_jit_matches_reference(opt, trained_full):
    model, optimizer = trained_full if opt == "full" else train(opt)
    ref_params, ref_state = reference(opt)
    assert int(optimizer.step[...]) == N_STEPS
    # nnx.State and the reference dicts flatten in the same order (sorted keys)
    assert_trees_close(nnx.state(model, nnx.Param), ref_params, what="params")
    assert_trees_close(optimizer.opt_state, ref_state, what="opt_state")
    opt_state = variable_values(optimizer.opt_state)
    assert isinstance(opt_state, adamx.AdamState)
    assert (opt_state.ema is not None) == (opt == "full")


def _check_ema_model(eval_model: MLP, model: MLP):
    ref_params, ref_state = reference("full")
    ref_ema = adamx.finalize_variable_values(ref_params, ref_state)
    assert_trees_close(nnx.state(eval_model, nnx.Param), ref_ema, what="ema")
    x, _ = batches(1, seed=7)[0]
    assert_trees_close(eval_model(x), mlp(ref_ema, x), what="ema model output")
    # the training model keeps its own weights
    assert_trees_close(nnx.state(model, nnx.Param), ref_params, what="params")


def test_nnx_ema_readback(trained_full):
    """The documented way: finalize on nnx.state(model, nnx.Param) and optimizer.opt_state, then nnx.update."""
    model, optimizer = trained_full
    eval_model = nnx.clone(model)
    ema = adamx.finalize_variable_values(nnx.state(model, nnx.Param), optimizer.opt_state)
    nnx.update(eval_model, ema)
    _check_ema_model(eval_model, model)


def test_nnx_ema_readback_from_variable_values(trained_full):
    """Works today: strip the Variable wrappers first (the Param / OptVariable types differ)."""
    model, optimizer = trained_full
    eval_model = nnx.clone(model)
    ema = adamx.finalize_variable_values(
        variable_values(nnx.state(model, nnx.Param)), variable_values(optimizer.opt_state)
    )
    nnx.update(eval_model, ema)
    _check_ema_model(eval_model, model)
