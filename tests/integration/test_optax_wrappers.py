"""optax plumbing around adamx: chain, inject_hyperparams, MultiSteps, apply_if_finite, masked, partition,
tree_map_params, and ``init`` on abstract params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from stack_utils import (
    FULL_KWARGS,
    N_STEPS,
    assert_trees_close,
    assert_trees_equal,
    batches,
    full_adam,
    init_mlp,
    mlp_loss,
    reference,
    reference_run,
)

import adamx


def jitted_run(tx, data, params=None):
    """Train the reference problem with ``tx`` in one jitted step; returns ``(params, state, n_traces)``."""
    traces = []

    @jax.jit
    def step(params, state, x, y):
        traces.append(1)
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = init_mlp() if params is None else params
    state = tx.init(params)
    for x, y in data:
        params, state = step(params, state, x, y)
    return params, state, len(traces)


def inject_full(**kw):
    return optax.inject_hyperparams(adamx.adam, hyperparam_dtype=jnp.float32)(**{**FULL_KWARGS, **kw})


def test_inside_chain():
    tx = optax.chain(optax.identity(), full_adam())
    params, state, _ = jitted_run(tx, batches())
    ref_params, ref_state = reference("full")
    assert_trees_close(params, ref_params)
    assert_trees_close(state[1], ref_state)
    # finalize_variable_values finds the averages inside the chain
    assert_trees_close(
        adamx.finalize_variable_values(params, state), adamx.finalize_variable_values(ref_params, ref_state)
    )


def test_inject_hyperparams_change_lr_without_retrace():
    lrs = [1e-2, 1e-2, 5e-3, 5e-3, 2e-3, 1e-3, 1e-3]
    assert len(lrs) == N_STEPS
    tx = inject_full()
    traces = []

    @jax.jit
    def step(params, state, x, y):
        traces.append(1)
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = init_mlp()
    state = tx.init(params)
    assert {k: v.dtype for k, v in state.hyperparams.items()} == {
        "beta_1": jnp.float32,
        "beta_2": jnp.float32,
        "epsilon": jnp.float32,
        "weight_decay": jnp.float32,
        "global_clipnorm": jnp.float32,
        "ema_momentum": jnp.float32,
        "ema_overwrite_frequency": jnp.int32,
        "gradient_accumulation_steps": jnp.int32,
        "learning_rate": jnp.float32,
    }
    for lr, (x, y) in zip(lrs, batches(), strict=True):
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        params, state = step(params, state, x, y)
    assert len(traces) == 1, "changing learning_rate retraced the step"
    assert step._cache_size() == 1, "changing learning_rate recompiled the step"
    assert float(state.hyperparams["learning_rate"]) == np.float32(lrs[-1])

    # same as adamx with the learning rate as a schedule of the call count
    lr_table = jnp.asarray(lrs, jnp.float32)
    ref_params, ref_state = reference_run(
        full_adam(learning_rate=lambda n: lr_table[n]), init_mlp(), mlp_loss, batches()
    )
    # traced betas round 1 - beta on device (adamx/_hyper.one_minus: 1 - f32(0.9) = 0.10000002, not 0.1), so
    # this run drifts from the reference by ~1e-7 relative; the raw gradient held in `acc` has cancellation
    # (entries ~1e-2 summed from O(1) terms), hence an absolute 1e-6 there.
    assert_trees_close(params, ref_params)
    assert_trees_close(state.inner_state, ref_state, atol=1e-6)

    # pitfall kept visible: a Python float has another (weak) type, so it does retrace
    state.hyperparams["learning_rate"] = 1e-3
    step(params, state, *batches(1)[0])
    assert len(traces) == 2


def test_inject_hyperparams_dtype_with_bf16_params():
    """Without ``hyperparam_dtype`` the hyperparameters take the params' dtype: bf16(0.999) == 1."""
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_mlp())
    with pytest.raises(ValueError, match=r"`beta_2` must be in \[0, 1\), got 1.0"):  # adamx refuses it
        optax.inject_hyperparams(adamx.adam)(**FULL_KWARGS).init(params)
    tx = inject_full()
    good = tx.init(params)
    assert good.hyperparams["beta_2"].dtype == jnp.float32
    assert jax.tree.leaves(good.inner_state.mu)[0].dtype == jnp.float32  # adamx keeps float32 moments
    x, y = batches(1)[0]
    g = jax.grad(mlp_loss)(params, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
    u_inj, _ = jax.jit(tx.update)(g, good, params)
    u_ref, _ = jax.jit(full_adam().update)(g, full_adam().init(params), params)
    assert_trees_close(u_inj, u_ref)


@pytest.mark.standard_promotion("optax's own Adam/schedules compute float ** int32 count")
def test_multisteps():
    k = 2
    data = batches(8)
    params, state, _ = jitted_run(optax.MultiSteps(full_adam(), every_k_schedule=k), data)
    # reference: the inner optimizer applied eagerly to the mean gradient of every k calls
    tx = full_adam()
    with jax.disable_jit():
        p, s = init_mlp(), tx.init(init_mlp())
        for i in range(0, len(data), k):
            grads = [jax.grad(mlp_loss)(p, *b) for b in data[i : i + k]]
            mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
            u, s = tx.update(mean, s, p)
            p = optax.apply_updates(p, u)
    assert_trees_close(params, p)
    assert_trees_close(state.inner_opt_state, s)
    assert_trees_close(adamx.finalize_variable_values(params, state), adamx.finalize_variable_values(p, s))


def test_apply_if_finite_skips_nan_step():
    data = batches()
    bad = 3
    nan_data = list(data)
    nan_data[bad] = (data[bad][0] * jnp.nan, data[bad][1])
    tx = optax.apply_if_finite(full_adam(), max_consecutive_errors=3)

    @jax.jit
    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    params, state = init_mlp(), tx.init(init_mlp())
    for i, (x, y) in enumerate(nan_data):
        before = (params, state.inner_state)
        params, state = step(params, state, x, y)
        if i == bad:
            assert int(state.notfinite_count) == 1
            assert_trees_equal((params, state.inner_state), before, what="the NaN step changed something")
    assert int(state.total_notfinite) == 1 and int(state.notfinite_count) == 0
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    ref_params, ref_state = reference_run(full_adam(), init_mlp(), mlp_loss, data[:bad] + data[bad + 1 :])
    assert_trees_close(params, ref_params)
    assert_trees_close(state.inner_state, ref_state)


def test_masked():
    """Masked-out leaves pass their gradient through (optax semantics); the rest is adamx on the sub-tree."""
    mask = {"dense": {"kernel": True, "bias": True}, "out": {"kernel": True, "bias": False}}
    n = 4
    params, state, _ = jitted_run(optax.masked(full_adam(), mask), batches(n))
    tx = full_adam()
    with jax.disable_jit():
        p = init_mlp()
        sub = lambda t: {"dense": t["dense"], "out": {"kernel": t["out"]["kernel"]}}  # noqa: E731
        s = tx.init(sub(p))
        for x, y in batches(n):
            g = jax.grad(mlp_loss)(p, x, y)
            u, s = tx.update(sub(g), s, sub(p))
            u = {"dense": u["dense"], "out": {"kernel": u["out"]["kernel"], "bias": g["out"]["bias"]}}
            p = optax.apply_updates(p, u)
    assert_trees_close(params, p)
    assert_trees_close(jax.tree.leaves(state.inner_state), jax.tree.leaves(s))


def test_partition():
    labels = {"dense": {"kernel": "full", "bias": "full"}, "out": {"kernel": "plain", "bias": "plain"}}
    n = 4
    tx = optax.partition({"full": full_adam(), "plain": adamx.adam(learning_rate=3e-3)}, labels)
    params, state, _ = jitted_run(tx, batches(n))
    # reference: each optimizer on its own sub-dict, gradients from the whole model
    t_full, t_plain = full_adam(), adamx.adam(learning_rate=3e-3)
    with jax.disable_jit():
        p = init_mlp()
        s_full, s_plain = t_full.init({"dense": p["dense"]}), t_plain.init({"out": p["out"]})
        for x, y in batches(n):
            g = jax.grad(mlp_loss)(p, x, y)
            u_full, s_full = t_full.update({"dense": g["dense"]}, s_full, {"dense": p["dense"]})
            u_plain, s_plain = t_plain.update({"out": g["out"]}, s_plain, {"out": p["out"]})
            p = optax.apply_updates(p, {**u_full, **u_plain})
    assert_trees_close(params, p)
    assert_trees_close(jax.tree.leaves(state.inner_states["full"]), jax.tree.leaves(s_full))
    assert_trees_close(jax.tree.leaves(state.inner_states["plain"]), jax.tree.leaves(s_plain))


WRAPPED = {
    "adam": full_adam,
    "plain": adamx.adam,
    "chain": lambda: optax.chain(optax.clip(1.0), full_adam()),
    "inject": inject_full,
    "multisteps": lambda: optax.MultiSteps(full_adam(), 2),
    "apply_if_finite": lambda: optax.apply_if_finite(full_adam(), 2),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_tree_map_params_reaches_every_buffer(name):
    tx = WRAPPED[name]()
    params = init_mlp()
    state = tx.init(params)
    mapped = optax.tree_utils.tree_map_params(tx, lambda p: p.astype(jnp.bfloat16), state)
    adam_states = [s for s in jax.tree.leaves(mapped, is_leaf=lambda x: isinstance(x, adamx.AdamState))]
    adam_states = [s for s in adam_states if isinstance(s, adamx.AdamState)]
    assert len(adam_states) == 1
    (ast,) = adam_states
    assert ast.count.dtype == jnp.int32  # not a param-shaped buffer: untouched
    for field in ("mu", "nu", "nu_max", "acc", "ema"):
        buf = getattr(ast, field)
        if buf is None:
            assert name == "plain"
            continue
        assert {leaf.dtype for leaf in jax.tree.leaves(buf)} == {jnp.dtype(jnp.bfloat16)}, field
    if name == "inject":
        assert mapped.hyperparams["learning_rate"].dtype == jnp.float32


def test_tree_map_params_builds_state_shardings():
    """The canonical use: the state's shardings from the params' (here all on one device)."""
    tx = optax.chain(optax.identity(), full_adam())
    params = init_mlp()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(tx.init, params)
    shardings = optax.tree_utils.tree_map_params(
        tx, lambda _: sharding, abstract, transform_non_params=lambda _: sharding, is_leaf=lambda x: x is None
    )
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("name", list(WRAPPED) + ["masked", "partition"])
def test_init_on_abstract_params(name):
    if name == "masked":
        tx = optax.masked(full_adam(), {"dense": True, "out": False})
    elif name == "partition":
        tx = optax.partition({"a": full_adam(), "b": adamx.adam()}, {"dense": "a", "out": "b"})
    else:
        tx = WRAPPED[name]()
    params = init_mlp()
    abstract_params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    abstract = jax.eval_shape(tx.init, abstract_params)
    concrete = tx.init(params)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (c.shape, c.dtype)
