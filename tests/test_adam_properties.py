"""adamx.adam against its per-op reference, in float32/bfloat16/float16, and JAX contract checks."""

import itertools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adamx
from tests import reference_impl

SHAPES = {"kernel": (5, 4), "bias": (4,), "out": (4, 3)}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

CONFIGS = {
    "defaults": dict(),
    "custom": dict(learning_rate=0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-4),
    "amsgrad_wd": dict(learning_rate=0.01, amsgrad=True, weight_decay=0.1, exclude_from_weight_decay=["bias"]),
    "clipnorm": dict(learning_rate=0.01, clipnorm=0.5),
    "global_clipnorm": dict(learning_rate=0.01, global_clipnorm=0.3),
    "clipvalue": dict(learning_rate=0.01, clipvalue=0.1),
    "ema_overwrite": dict(learning_rate=0.01, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
    "accumulation": dict(learning_rate=0.01, gradient_accumulation_steps=3, loss_scale_factor=64.0),
    "everything": dict(
        learning_rate=0.01,
        amsgrad=True,
        weight_decay=0.05,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=2,
        gradient_accumulation_steps=2,
        loss_scale_factor=8.0,
    ),
}


def _inputs(dtype, n_steps, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32).astype(dtype) for k, s in SHAPES.items()}
    grads = [
        {k: (rng.normal(size=s) * (rng.random(s) > 0.1)).astype(np.float32).astype(dtype) for k, s in SHAPES.items()}
        for _ in range(n_steps)
    ]
    return params, grads


def _to_np(tree):
    return None if tree is None else {k: np.asarray(v).astype(np.float32) for k, v in tree.items()}


def _ref_kwargs(kw):
    kw = dict(kw)
    if "exclude_from_weight_decay" in kw:
        excluded = kw.pop("exclude_from_weight_decay")
        kw["decay_keys"] = tuple(k for k in SHAPES if not any(e in k for e in excluded))
    return kw


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_step_matches_per_op_reference(name, dtype, strict_promotion):
    """Teacher-forced: every step starts the reference from adamx's own params and state.

    Tolerances: float32 state within 8 ULP of its operands' magnitude (XLA fuses
    multiply-adds into FMAs and computes x/scalar as x*(1/scalar), SEMANTICS.md
    1.16-1.17; in ``m + (g - m) * c`` the rounding error scales with |m| and |g|, not
    with the possibly tiny result). Params in their own dtype may round the other way when the float32
    values sit near a rounding boundary: at most one ULP of the param dtype.
    """
    kw = CONFIGS[name]
    np_dtype = DTYPES[dtype]
    params, grads = _inputs(np_dtype, 12)
    opt = adamx.adam(**kw)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(p)
    step = jax.jit(opt.update)
    for g in grads:
        ref_state = dict(
            count=int(state.count),
            mu=_to_np(state.mu),
            nu=_to_np(state.nu),
            nu_max=_to_np(state.nu_max),
            acc=_to_np(state.acc),
            ema=_to_np(state.ema),
        )
        ref_p, ref_s = reference_impl.adam_step(
            {k: np.asarray(v) for k, v in p.items()}, g, ref_state, **_ref_kwargs(kw)
        )
        params_before = p
        u, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, u)
        for k in SHAPES:
            got, want = np.asarray(p[k]).astype(np.float32), ref_p[k].astype(np.float32)
            ulp = np.abs(np.spacing(want.astype(np_dtype))).astype(np.float32)
            prev = np.asarray(params_before[k]).astype(np.float32)
            # p + u: one rounding in the param dtype, plus float32 ULPs of |p| and |u| upstream
            bound = 1.01 * ulp + 4 * 2.0**-24 * (np.abs(prev) + np.abs(want - prev))
            assert p[k].dtype == jnp.dtype(np_dtype)
            np.testing.assert_array_less(np.abs(got - want), bound, err_msg=f"{name} {dtype} params {k}")
            for field in ("mu", "nu", "nu_max", "acc", "ema"):
                if ref_s[field] is None:
                    assert getattr(state, field) is None
                    continue
                # the error of x + (y - x) * c is a few ULP of the operands, not of the result
                gk = np.abs(np.asarray(g[k]).astype(np.float32))
                operand = np.abs(ref_state[field][k]) + np.abs(ref_s[field][k])
                operand += gk**2 if field in ("nu", "nu_max") else gk
                if field == "ema":
                    operand += np.abs(got)
                np.testing.assert_array_less(
                    np.abs(np.asarray(getattr(state, field)[k]) - ref_s[field][k]),
                    8 * 2.0**-24 * operand + 1e-30,
                    err_msg=f"{name} {dtype} {field} {k}",
                )


def test_bfloat16_trains_where_keras_freezes():
    """bf16(0.999) == 1, so Keras's bf16 Adam never moves; adamx keeps scalars and moments in float32."""
    assert float(jnp.asarray(0.999, jnp.bfloat16)) == 1.0
    params = {"w": jnp.full((8,), 2.0, jnp.bfloat16)}
    opt = adamx.adam(learning_rate=0.01)
    state = opt.init(params)
    assert state.mu["w"].dtype == jnp.float32 and state.nu["w"].dtype == jnp.float32
    for _ in range(10):
        u, state = opt.update(jax.grad(lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2))(params), state, params)
        params = optax.apply_updates(params, u)
    assert params["w"].dtype == jnp.bfloat16
    assert float(params["w"][0]) < 1.95  # ten steps of ~0.01 each


def test_float16_zero_gradient_gives_no_nan():
    """TF1's fp16 Adam gives 0/0 = NaN for never-touched entries (eps rounds to 0 in fp16); adamx does not."""
    params = {"w": jnp.ones((4,), jnp.float16)}
    opt = adamx.tf1_adam()
    state = opt.init(params)
    u, state = opt.update({"w": jnp.array([0.0, 0.0, 1.0, -1.0], jnp.float16)}, state, params)
    assert bool(jnp.all(jnp.isfinite(u["w"])))
    assert u["w"][0] == 0 and u["w"][2] < 0


def test_low_precision_moment_dtypes_are_honoured():
    params = {"w": jnp.ones((3,), jnp.float32)}
    opt = adamx.adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.float32, amsgrad=True)
    state = opt.init(params)
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32
    _, state2 = jax.jit(opt.update)({"w": jnp.ones(3)}, state, params)
    chex.assert_trees_all_equal_dtypes(state, state2)


ALL_ON = CONFIGS["everything"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_state_dtypes_and_shapes_stable_through_update(dtype):
    params = {"a": jnp.ones((3, 2), dtype), "b": {"c": jnp.zeros((4,), dtype)}}
    opt = adamx.adam(**ALL_ON)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    u, state2 = jax.jit(opt.update)(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state2)
    chex.assert_trees_all_equal_dtypes(u, params)


def test_jit_and_eager_agree():
    params, grads = _inputs(np.float32, 6, seed=3)
    results = []
    for jit in (False, True):
        opt = adamx.adam(**ALL_ON)
        update = jax.jit(opt.update) if jit else opt.update
        p = {k: jnp.asarray(v) for k, v in params.items()}
        s = opt.init(p)
        for g in grads:
            u, s = update(g, s, p)
            p = optax.apply_updates(p, u)
        results.append(p)
    # eager runs op by op (no FMA contraction); jit fuses: a few float32 ULP apart
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_second_call_does_not_recompile():
    opt = adamx.adam(**ALL_ON)
    params = {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for i in range(5):
        params, s = step(params, s, jax.tree.map(lambda x: jnp.full_like(x, i + 1.0), params))
    assert len(traces) == 1


def test_init_on_abstract_shapes():
    params = {"w": jax.ShapeDtypeStruct((1000, 1000), jnp.float32), "b": jax.ShapeDtypeStruct((7,), jnp.bfloat16)}
    opt = adamx.adam(**ALL_ON)
    abstract = jax.eval_shape(opt.init, params)
    assert abstract.mu["w"].shape == (1000, 1000) and abstract.mu["b"].dtype == jnp.float32
    assert abstract.ema["b"].dtype == jnp.float32 and abstract.count.dtype == jnp.int32
    concrete = opt.init({"w": jnp.zeros((1000, 1000)), "b": jnp.zeros((7,), jnp.bfloat16)})
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)


def test_state_never_aliases_params():
    params = {"w": jnp.arange(4.0)}
    state = jax.jit(adamx.adam(use_ema=True).init)(params)
    assert state.ema["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
    state = adamx.adam(use_ema=True).init(params)
    assert state.ema["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()


def test_step_counter_saturates():
    opt = adamx.adam(use_ema=True, ema_overwrite_frequency=3, gradient_accumulation_steps=2)
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    imax = jnp.iinfo(jnp.int32).max
    state = state._replace(count=jnp.asarray(imax - 1, jnp.int32))
    for _ in range(3):
        u, state = opt.update({"w": jnp.ones(2)}, state, params)
        params = optax.apply_updates(params, u)
    assert int(state.count) == imax
    assert bool(jnp.all(jnp.isfinite(params["w"])))


def test_none_gradient_leaves_the_leaf_alone_but_counts_the_step():
    """Keras: a variable whose gradient is None gets no update, its moments stay, the counter advances."""
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    opt = adamx.adam(learning_rate=0.1)
    state = opt.init(params)
    u, state = opt.update({"a": jnp.ones(3), "b": None}, state, params)
    # the update is zeros in the param's dtype, so optax.apply_updates takes it
    assert u["b"].dtype == params["b"].dtype and not bool(jnp.any(u["b"])) and int(state.count) == 1
    assert bool(jnp.all(state.nu["b"] == 0)) and bool(jnp.all(state.nu["a"] > 0))
    # the next real update of b uses t = 2
    u, state = opt.update({"a": jnp.ones(3), "b": jnp.ones(2)}, state, params)
    f32 = np.float32
    b1p, b2p = f32(0.9) ** f32(2), f32(0.999) ** f32(2)  # t = 2, in float32 like adamx
    m, v = f32(0.1), f32(1 - 0.999)
    want = -(m * (f32(0.1) * np.sqrt(f32(1) - b2p) / (f32(1) - b1p))) / (np.sqrt(v) + f32(1e-7))
    np.testing.assert_allclose(np.asarray(u["b"]), want, rtol=1e-6)


def test_sparse_bcoo_gradient_equals_dense_scatter_sum():
    """Keras on JAX: a BCOO gradient (duplicates included) is bit-identical to its dense sum."""
    from jax.experimental import sparse

    emb = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    idx = jnp.array([[1], [4], [1]])
    vals = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)).astype(np.float32))
    g_sparse = sparse.BCOO((vals, idx), shape=(6, 3))
    opt = adamx.adam(learning_rate=0.01)
    s = opt.init({"e": emb})
    u_sparse, _ = opt.update({"e": g_sparse}, s, {"e": emb})
    u_dense, _ = opt.update({"e": g_sparse.todense()}, s, {"e": emb})
    np.testing.assert_array_equal(np.asarray(u_sparse["e"]), np.asarray(u_dense["e"]))
    assert np.all(np.asarray(u_dense["e"])[[0, 2, 3, 5]] == 0)


def test_non_finite_gradients_propagate_as_documented():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    g = {"a": jnp.array([np.nan, np.inf, 1.0]), "b": jnp.ones(2)}
    u, _ = adamx.adam().update(g, adamx.adam().init(params), params)
    assert np.isnan(np.asarray(u["a"][:2])).all() and np.isfinite(np.asarray(u["a"][2]))
    assert np.isfinite(np.asarray(u["b"])).all()
    opt = adamx.adam(global_clipnorm=1.0)
    u, _ = opt.update(g, opt.init(params), params)
    assert np.isnan(np.asarray(u["b"])).all()  # global clip spreads NaN to every tensor (as Keras, optax)
    guarded = optax.apply_if_finite(adamx.adam(), max_consecutive_errors=3)
    u, s = guarded.update(g, guarded.init(params), params)
    assert float(jnp.abs(u["a"]).sum()) == 0.0 and int(s.notfinite_count) == 1


@pytest.mark.parametrize("k", [2, 3])
def test_accumulation_equals_one_big_batch(k):
    """k micro-steps of accumulated grads equal one step on their mean (Keras GA)."""
    params, grads = _inputs(np.float32, 3 * k, seed=5)
    acc = adamx.adam(learning_rate=0.01, gradient_accumulation_steps=k)
    big = adamx.adam(learning_rate=0.01)
    pa = {kk: jnp.asarray(v) for kk, v in params.items()}
    pb = dict(pa)
    sa, sb = acc.init(pa), big.init(pb)
    for i in range(0, len(grads), k):
        window = grads[i : i + k]
        for j, g in enumerate(window):
            u, sa = acc.update(g, sa, pa)
            before = pa
            pa = optax.apply_updates(pa, u)
            if j < k - 1:
                chex.assert_trees_all_equal(pa, before)  # micro-steps do not move params
        mean = {kk: sum(w[kk] for w in window) / k for kk in SHAPES}
        u, sb = big.update(mean, sb, pb)
        pb = optax.apply_updates(pb, u)
        chex.assert_trees_all_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_schedules_see_the_raw_call_count():
    seen = []

    def lr(count):
        jax.debug.callback(lambda c: seen.append(int(c)), count)
        return 0.01

    opt = adamx.adam(learning_rate=lr, gradient_accumulation_steps=2)
    p = {"w": jnp.ones(2)}
    s = opt.init(p)
    for _ in range(6):
        _, s = opt.update({"w": jnp.ones(2)}, s, p)
    # evaluated on the update steps only, with the raw counter: calls 2, 4, 6 -> counts 1, 3, 5
    assert seen == [1, 3, 5]


@pytest.mark.parametrize("b1, b2", list(itertools.product([0.0, 0.5], [0.0, 0.9])))
def test_extreme_betas_are_finite(b1, b2):
    params = {"w": jnp.ones(3)}
    opt = adamx.adam(beta_1=b1, beta_2=b2)
    u, _ = opt.update({"w": jnp.array([0.0, 1.0, -2.0])}, opt.init(params), params)
    assert np.isfinite(np.asarray(u["w"])).all()


def test_every_numeric_hyperparameter_changes_without_recompiling():
    """optax.inject_hyperparams puts every numeric argument in the state: change it, no retrace."""
    make = optax.inject_hyperparams(adamx.adam, hyperparam_dtype=jnp.float32)
    opt = make(
        learning_rate=0.01,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=True,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=3,
        loss_scale_factor=2.0,
        gradient_accumulation_steps=2,
    )
    params = {"w": jnp.ones(3)}
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = opt.update({"w": jnp.full(3, 0.5)}, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    assert set(state.hyperparams) >= {"learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay", "ema_momentum"}
    history = []
    for i in range(4):
        if i == 2:  # calls 3-4 are the second accumulation window; no EMA overwrite falls in it
            state.hyperparams["learning_rate"] = jnp.asarray(0.0, jnp.float32)
            state.hyperparams["beta_1"] = jnp.asarray(0.8, jnp.float32)
        params, state = step(params, state)
        history.append(params["w"])
    assert float(history[1][0]) < 1.0  # the first window moved the params
    np.testing.assert_array_equal(np.asarray(history[3]), np.asarray(history[1]))  # lr = 0: no move
    assert len(traces) == 1
