"""Equinox: ``eqx.filter(model, eqx.is_array)`` trees (``None`` at non-array leaves) under ``eqx.filter_jit``."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from stack_utils import (
    OPTIMIZERS,
    assert_trees_close,
    batches,
    full_adam,
    init_mlp,
    mse,
    reference,
)

import adamx


class MLP(eqx.Module):
    """The reference problem's function; ``activation`` and ``name`` are non-array leaves (``None`` once filtered)."""

    dense: dict
    out: dict
    activation: Callable
    name: str

    def __call__(self, x):
        h = self.activation(x @ self.dense["kernel"] + self.dense["bias"])
        return h @ self.out["kernel"] + self.out["bias"]


def make_model() -> MLP:
    p = init_mlp()
    return MLP(dense=p["dense"], out=p["out"], activation=jnp.tanh, name="mlp")


def loss_fn(model: MLP, x, y):
    return mse(model(x), y)


def params_of(model: MLP):
    return eqx.filter(model, eqx.is_array)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_filtered_model_filter_jit_matches_reference(opt):
    tx = OPTIMIZERS[opt]()
    model = make_model()
    params = params_of(model)
    assert params.activation is None and params.name is None  # the None leaves the optimizer must accept
    opt_state = tx.init(params)
    traces = []

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        traces.append(1)
        grads = eqx.filter_grad(loss_fn)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, params_of(model))
        return eqx.apply_updates(model, updates), opt_state

    for x, y in batches():
        model, opt_state = step(model, opt_state, x, y)
    assert len(traces) == 1
    assert model.activation is jnp.tanh and model.name == "mlp"
    ref_params, ref_state = reference(opt)
    # the filtered module flattens like the reference dict: dense/{bias,kernel}, out/{bias,kernel}
    assert_trees_close(params_of(model), ref_params, what="params")
    assert_trees_close(opt_state, ref_state, what="opt_state")
    ema = adamx.finalize_variable_values(params_of(model), opt_state)
    assert_trees_close(ema, adamx.finalize_variable_values(ref_params, ref_state), what="ema")
    assert ema.activation is None  # same structure as params: combine it with the static part
    assert eqx.combine(ema, model).activation is jnp.tanh


def test_frozen_leaf_with_none_gradient():
    """A leaf frozen with ``eqx.partition`` gets a ``None`` gradient while params has an array there."""
    n = 3  # eager reference below: keep it short
    tx = full_adam()
    model = make_model()
    spec = jax.tree.map(eqx.is_array, model)
    spec = eqx.tree_at(lambda m: m.out["bias"], spec, replace=False)

    def step(model, opt_state, x, y):
        diff, static = eqx.partition(model, spec)
        grads = jax.grad(lambda d: loss_fn(eqx.combine(d, static), x, y))(diff)
        assert grads.out["bias"] is None
        updates, opt_state = tx.update(grads, opt_state, params_of(model))
        return eqx.apply_updates(model, updates), opt_state

    data = batches(n)
    model_j, state_j = make_model(), tx.init(params_of(model))
    jitted = eqx.filter_jit(step)
    for x, y in data:
        model_j, state_j = jitted(model_j, state_j, x, y)
    with jax.disable_jit():
        model_e, state_e = make_model(), tx.init(params_of(model))
        for x, y in data:
            model_e, state_e = step(model_e, state_e, x, y)
    assert_trees_close(params_of(model_j), params_of(model_e), what="params")
    assert_trees_close(state_j, state_e, what="opt_state")
    # no update reached the frozen bias (no EMA overwrite yet in 3 calls), the others moved
    assert bool(jnp.all(model_j.out["bias"] == make_model().out["bias"]))
    assert not bool(jnp.all(model_j.out["kernel"] == make_model().out["kernel"]))
