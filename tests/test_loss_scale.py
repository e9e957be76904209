"""``adamx.loss_scale_optimizer``: Keras 3's dynamic LossScaleOptimizer.

Reference trajectories come from real Keras 3.15 (JAX backend) through
``jax.jit(LossScaleOptimizer.stateless_apply)``, what ``model.fit`` runs; see
tests/references/make_keras_lso_refs.py. adamx runs under ``jax.jit`` too. The inner Adam
step of both runs inside a traced ``lax.cond``, where XLA contracts multiply-adds into FMAs
in whichever way it fuses; SEMANTICS.md 1.16 measured Keras's jit vs eager arithmetic at up
to 4.8e-7 absolute on params of magnitude 1-3 over 25 steps, so params and moments are
compared at 1e-6 absolute + 1e-6 relative at every step. The scale, the step counter and
the inner iteration count are compared exactly. A wrong skip, a wrong growth step or an
unscale by the wrong scale moves params by about one learning-rate step (>= 5e-3 here).

Stack tests (chain, linen, nnx, sharding) compare with the same optimizer run eagerly
(``jax.disable_jit``) on plain pytrees, at the tolerances of tests/integration/stack_utils.py
(rtol 1e-5, atol 1e-7: jit reorders float32 arithmetic by a few ulps).
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec

import adamx
from tests.conftest import REFERENCE_DIR

P = PartitionSpec
LSO_DIR = os.path.join(REFERENCE_DIR, "keras_lso_fixtures")
ATOL = RTOL = 1e-6
STACK_RTOL, STACK_ATOL = 1e-5, 1e-7
CASES = sorted(f[:-5] for f in os.listdir(LSO_DIR) if f.endswith(".json") and f != "keras_lso_configs.json")


def _load(name):
    with open(os.path.join(LSO_DIR, name + ".json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(LSO_DIR, name + ".npz")) as z:
        return meta, {k: z[k] for k in z.files}


def _build(meta, **extra):
    return adamx.loss_scale_optimizer(adamx.adam(**meta["inner_kwargs"]), **meta["lso_kwargs"], **extra)


def _replay(opt, meta, data, fused=False):
    keys = meta["param_keys"]
    params = {k: jnp.asarray(data[f"params/{k}"][0]) for k in keys}
    state = opt.init(params)

    @jax.jit
    def step(grads, state, params):
        if fused:
            return opt.apply_gradients(grads, state, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    traj = []
    for t in range(meta["n_steps"]):
        # what the user multiplies the loss by is what Keras used: check before the step
        assert float(adamx.loss_scale(state)) == data["scale_before"][t]
        grads = {k: jnp.asarray(data[f"grads/{k}"][t]) for k in keys}
        params, state = step(grads, state, params)
        traj.append((params, state))
    return traj


def _check_against_keras(name, meta, data, traj):
    keys = meta["param_keys"]
    slots = {"m": "mu", "v": "nu", "vhat": "nu_max"}
    for t, (params, state) in enumerate(traj):
        where = f"{name} step {t + 1}"
        assert float(state.scale) == data["scale"][t], where
        assert int(state.step_counter) == data["step_counter"][t], where
        assert int(state.inner_state.count) == data["inner_iterations"][t], where
        assert int(state.skipped_steps) == int(np.sum(~data["finite"][: t + 1])), where
        for k in keys:
            np.testing.assert_allclose(params[k], data[f"params/{k}"][t + 1], rtol=RTOL, atol=ATOL, err_msg=where)
            for key, field in slots.items():
                if f"{key}/{k}" in data:
                    got = getattr(state.inner_state, field)[k]
                    np.testing.assert_allclose(
                        got, data[f"{key}/{k}"][t], rtol=RTOL, atol=ATOL, err_msg=f"{where} {key}"
                    )


def test_fixtures_cover_skips_and_growth():
    assert len(CASES) >= 3, "run tests/references/make_keras_lso_refs.py"
    for name in CASES:
        meta, data = _load(name)
        assert not data["finite"].all(), name
        assert np.sum(data["scale"] == 2 * data["scale_before"]) >= 2, f"{name}: no growth to check"
        assert meta["execution"].startswith("jax.jit(optimizer.stateless_apply)")


@pytest.mark.parametrize("fused", [False, True], ids=["update", "apply_gradients"])
@pytest.mark.parametrize("name", CASES)
def test_replays_keras_loss_scale_optimizer(name, fused):
    meta, data = _load(name)
    _check_against_keras(name, meta, data, _replay(_build(meta), meta, data, fused=fused))


@pytest.mark.parametrize("name", CASES)
def test_config_keras_printed_builds_the_same_trajectory(name):
    meta, data = _load(name)
    opt = adamx.from_keras_config(meta["config"])
    assert isinstance(opt, adamx.LossScaleOptimizer)
    assert opt.get_config() == meta["config"]
    _check_against_keras(name, meta, data, _replay(opt, meta, data))


def test_fixture_tells_the_growth_step_unscales_by_the_old_scale():
    """Negative control: unscaling the growth step by the new (doubled) scale misses the Keras trajectory."""
    name = "keras_lso_adam_growth3"
    meta, data = _load(name)
    keys = meta["param_keys"]
    inner = adamx.adam(**meta["inner_kwargs"])
    params = {k: jnp.asarray(data[f"params/{k}"][0]) for k in keys}
    state = inner.init(params)
    errs = []
    for t in range(meta["n_steps"]):
        if not data["finite"][t]:
            continue
        scale = data["scale"][t]  # the scale *after* the step: wrong on growth steps only
        grads = {k: jnp.asarray(data[f"grads/{k}"][t] / scale) for k in keys}
        updates, state = inner.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        errs.append(max(float(np.max(np.abs(params[k] - data[f"params/{k}"][t + 1]))) for k in keys))
    assert max(errs) > 1e-4


# ---------------------------------------------------------------------------
# semantics without Keras
# ---------------------------------------------------------------------------
def _params(dtype=jnp.float32):
    r = np.random.default_rng(0)
    return {"a": jnp.asarray(r.standard_normal((3, 4)), dtype), "b": {"c": jnp.asarray(r.standard_normal(5), dtype)}}


def _grads(params, seed, scale):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(r.standard_normal(p.shape) * scale, p.dtype), params)


def _trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("leaf", ["a", "c"])
def test_non_finite_step_is_skipped(bad, leaf):
    opt = adamx.loss_scale_optimizer(
        adamx.adam(0.1, amsgrad=True, use_ema=True), initial_scale=64.0, dynamic_growth_steps=5
    )
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update)
    for seed in range(2):
        updates, state = update(_grads(params, seed, 64.0), state, params)
        params = optax.apply_updates(params, updates)
    grads = _grads(params, 7, 32.0)
    if leaf == "a":
        grads["a"] = grads["a"].at[1, 2].set(bad)
    else:
        grads["b"]["c"] = grads["b"]["c"].at[0].set(bad)
    updates, new = update(grads, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert _trees_equal(new.inner_state, state.inner_state)  # moments, EMA, count untouched
    assert float(new.scale) == 32.0 and int(new.step_counter) == 0 and int(new.skipped_steps) == 1
    new_params, fstate = jax.jit(opt.apply_gradients)(grads, state, params)
    assert _trees_equal(new_params, params) and _trees_equal(fstate, new)


def test_growth_after_dynamic_growth_steps_unscaled_by_the_old_scale():
    inner = adamx.adam(0.01)
    opt = adamx.loss_scale_optimizer(inner, initial_scale=8.0, dynamic_growth_steps=3)
    params = _params()
    state, istate = opt.init(params), inner.init(params)
    scales, counters = [], []
    for seed in range(7):
        g = _grads(params, seed, 1.0)
        s = float(adamx.loss_scale(state))
        updates, state = opt.update(jax.tree.map(lambda x: x * s, g), state, params)
        want, istate = inner.update(g, istate, params)  # g*s/s == g exactly (s a power of 2)
        for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
            np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-9)
        params = optax.apply_updates(params, updates)
        scales.append(float(state.scale))
        counters.append(int(state.step_counter))
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]
    assert counters == [1, 2, 0, 1, 2, 0, 1]


def test_min_and_max_scale_clamp():
    opt = adamx.loss_scale_optimizer(
        optax.sgd(0.1), initial_scale=4.0, dynamic_growth_steps=1, min_scale=1.0, max_scale=16.0
    )
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
    good = {"w": jnp.ones(3)}
    seen = []
    for g in [bad, bad, bad, good, good, good, good, good]:
        _, state = opt.update(g, state, params)
        seen.append(float(state.scale))
    assert seen == [2.0, 1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 16.0]
    # without bounds (Keras) the scale keeps going
    keras_like = adamx.loss_scale_optimizer(optax.sgd(0.1), initial_scale=4.0, dynamic_growth_steps=1)
    state = keras_like.init(params)
    for g in [bad, bad, bad]:
        _, state = keras_like.update(g, state, params)
    assert float(state.scale) == 0.5


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(initial_scale=0.0), ValueError, "initial_scale"),
        (dict(initial_scale=-2.0), ValueError, "initial_scale"),
        (dict(initial_scale=float("inf")), ValueError, "initial_scale"),
        (dict(initial_scale=1e39), ValueError, "initial_scale"),
        (dict(initial_scale="big"), TypeError, "initial_scale"),
        (dict(dynamic_growth_steps=0), ValueError, "dynamic_growth_steps"),
        (dict(dynamic_growth_steps=2.5), TypeError, "dynamic_growth_steps"),
        (dict(dynamic_growth_steps=True), TypeError, "dynamic_growth_steps"),
        (dict(min_scale=0.0), ValueError, "min_scale"),
        (dict(min_scale=2.0**16), ValueError, "min_scale"),
        (dict(max_scale=1.0), ValueError, "max_scale"),
        (dict(max_scale=float("nan")), ValueError, "max_scale"),
        (dict(axis_name=["x"]), TypeError, "axis_name"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        adamx.loss_scale_optimizer(adamx.adam(), **kwargs)


def test_inner_must_be_a_transformation():
    with pytest.raises(TypeError, match="inner"):
        adamx.loss_scale_optimizer(0.001)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_low_precision_params(dtype, strict_promotion):
    """Unscaling happens in float32 and goes back to the gradient dtype (what Keras's Adam casts to);
    a float16 gradient scaled by 2**16 overflows by itself and the step is skipped."""
    inner = adamx.adam(0.01)
    opt = adamx.loss_scale_optimizer(inner, initial_scale=2.0**16, dynamic_growth_steps=2)
    params = _params(dtype)
    state = opt.init(params)
    assert state.scale.dtype == jnp.float32
    raw = _grads(params, 3, 1.0)
    scaled = jax.tree.map(lambda g: (g.astype(jnp.float32) * 2.0**16).astype(dtype), raw)
    updates, new = jax.jit(opt.update)(scaled, state, params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    if dtype == jnp.float16:  # |g| * 65536 > 65504 for |g| > ~1
        assert not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(scaled))
        assert float(new.scale) == 2.0**15 and int(new.inner_state.count) == 0
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
        return
    # per-op reference: float32 division, back to the param dtype, then the inner Adam
    unscaled = jax.tree.map(lambda g: (np.asarray(g, np.float32) / np.float32(2.0**16)).astype(dtype), scaled)
    want, _ = inner.update(unscaled, inner.init(params), params)
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
        np.testing.assert_allclose(
            np.asarray(u, np.float32), np.asarray(w, np.float32), rtol=1e-2 if dtype != jnp.float32 else 1e-6
        )
    assert int(new.inner_state.count) == 1


def test_float16_compute_gradient_that_underflows_survives_through_the_scale():
    """What loss scaling is for: float32 params, float16 compute. The backward pass multiplies
    1e-4 by 1e-4; 1e-8 underflows to 0 in float16, but scaled by 2**15 it does not."""
    w = {"w": jnp.ones(4, jnp.float32)}
    c = jnp.float16(1e-4)

    def loss(p, s):
        return jnp.sum((p["w"].astype(jnp.float16) * c) * c).astype(jnp.float32) * s

    assert np.all(np.asarray(jax.grad(loss)(w, jnp.float32(1.0))["w"]) == 0)  # without a scale: lost
    opt = adamx.loss_scale_optimizer(optax.sgd(1.0), initial_scale=2.0**15)
    state = opt.init(w)
    grads = jax.grad(loss)(w, adamx.loss_scale(state))
    updates, _ = opt.update(grads, state, w)
    np.testing.assert_allclose(updates["w"], -1e-8, rtol=2e-3)  # float16 products: 3 significant digits


# ---------------------------------------------------------------------------
# composition: chain, extra args, loss_scale lookup, jit
# ---------------------------------------------------------------------------
def _train(tx, n=6, bad_steps=(2,), fused=False, jit=True):
    """A small regression problem trained with the scaled loss; ``bad_steps`` get an inf gradient."""
    params = _params()
    r = np.random.default_rng(1)
    xs = [jnp.asarray(r.standard_normal((8, 3)), jnp.float32) for _ in range(n)]

    def loss(p, x):
        return jnp.mean((x @ p["a"]) ** 2) + jnp.sum(p["b"]["c"] ** 2)

    def step(params, state, x, bad):
        s = adamx.loss_scale(state)
        g = jax.grad(lambda p: loss(p, x) * s.astype(jnp.float32))(params)
        g["a"] = jnp.where(bad, jnp.inf, 1.0) * g["a"]
        if fused:
            return tx.apply_gradients(g, state, params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    if jit:
        step = jax.jit(step)
    state = tx.init(params)
    for i, x in enumerate(xs):
        params, state = step(params, state, x, jnp.asarray(i in bad_steps))
    return params, state


def _close(a, b, rtol=STACK_RTOL, atol=STACK_ATOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_chain_inside_and_outside():
    make_inner = lambda: optax.chain(optax.clip_by_global_norm(1.0), adamx.adam(0.01, amsgrad=True))  # noqa: E731
    lso = lambda: adamx.loss_scale_optimizer(make_inner(), initial_scale=2.0**10, dynamic_growth_steps=2)  # noqa: E731
    with jax.disable_jit():
        ref_p, ref_s = _train(lso(), jit=False)
    p, s = _train(lso())
    _close(p, ref_p)
    # 1024 -> 2048 (2 finite steps) -> 1024 (step 3 skipped) -> 2048 (steps 4, 5) -> step 6: counter 1
    assert int(s.skipped_steps) == 1 and float(s.scale) == float(ref_s.scale) == 2.0**11
    # the wrapper inside a chain: loss_scale finds its state in the chain's tuple
    outer = optax.chain(lso(), optax.scale(1.0))
    p2, s2 = _train(outer)
    _close(p2, ref_p)
    assert float(adamx.loss_scale(s2)) == 2.0**11
    # inner count and clipping: the chain's inner Adam ran 5 of 6 steps
    assert int(s2[0].inner_state[1].count) == 5


def test_loss_scale_needs_exactly_one_state():
    opt = adamx.loss_scale_optimizer(adamx.adam())
    params = _params()
    with pytest.raises(ValueError, match="found 0"):
        adamx.loss_scale(adamx.adam().init(params))
    two = (opt.init(params), opt.init(params))
    with pytest.raises(ValueError, match="found 2"):
        adamx.loss_scale(two)


def test_extra_args_reach_the_inner_transformation():
    seen = {}

    def update(updates, state, params=None, *, value=None, **extra):
        seen["value"] = value
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    opt = adamx.loss_scale_optimizer(inner, initial_scale=2.0)
    params = {"w": jnp.ones(2)}
    updates, _ = opt.update({"w": jnp.full(2, 4.0)}, opt.init(params), params, value=jnp.float32(3.0))
    assert float(seen["value"]) == 3.0
    np.testing.assert_array_equal(updates["w"], [2.0, 2.0])


def test_jit_compiles_once():
    opt = adamx.loss_scale_optimizer(adamx.adam(0.01), dynamic_growth_steps=2)
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update)
    for seed in range(4):
        _, state = update(_grads(params, seed, 1.0), state, params)
    assert update._cache_size() == 1


@pytest.mark.parametrize(
    "inner", ["adamx", pytest.param("optax_adam", marks=pytest.mark.standard_promotion("optax.adam: float ** int32"))]
)
def test_apply_gradients_equals_update(inner):
    make = {"adamx": lambda: adamx.adam(0.01, weight_decay=0.01), "optax_adam": lambda: optax.adam(0.01)}[inner]
    opt = adamx.loss_scale_optimizer(make(), initial_scale=2.0**8, dynamic_growth_steps=2)
    p1, s1 = _train(opt, n=7, bad_steps=(1, 4))
    p2, s2 = _train(opt, n=7, bad_steps=(1, 4), fused=True)
    _close(p2, p1, rtol=1e-6, atol=1e-7)
    assert float(s1.scale) == float(s2.scale) and int(s2.skipped_steps) == 2
    assert int(s2.step_counter) == int(s1.step_counter)


# ---------------------------------------------------------------------------
# Flax linen and nnx
# ---------------------------------------------------------------------------
IN, HID, OUT = 4, 8, 2


def _mlp_params():
    r = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(r.standard_normal((IN, HID)) * 0.5, jnp.float32), "bias": jnp.zeros(HID)},
        "out": {"kernel": jnp.asarray(r.standard_normal((HID, OUT)) * 0.5, jnp.float32), "bias": jnp.zeros(OUT)},
    }


def _mlp(p, x):
    return jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"]


def _batches(n=6):
    r = np.random.default_rng(2)
    return [
        (
            jnp.asarray(r.standard_normal((16, IN)), jnp.float32),
            jnp.asarray(3 * r.standard_normal((16, OUT)), jnp.float32),
        )
        for _ in range(n)
    ]


BAD_STEPS = (1, 4)


def _lso():
    return adamx.loss_scale_optimizer(adamx.adam(0.01, amsgrad=True), initial_scale=2.0**12, dynamic_growth_steps=2)


def _poison(grads, bad):
    return jax.tree.map(lambda g: g * jnp.where(bad, jnp.nan, 1.0), grads)


@functools.cache
def _pytree_reference():
    tx = _lso()
    with jax.disable_jit():
        params = _mlp_params()
        state = tx.init(params)
        for i, (x, y) in enumerate(_batches()):
            s = adamx.loss_scale(state)
            g = jax.grad(lambda p: jnp.mean((_mlp(p, x) - y) ** 2) * s)(params)
            if i in BAD_STEPS:
                g = _poison(g, True)
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("fused", [False, True], ids=["apply_gradients", "adamx.fused"])
def test_flax_linen_train_state(fused):
    state = train_state.TrainState.create(apply_fn=_mlp, params=_mlp_params(), tx=_lso())

    @jax.jit
    def train_step(state, x, y, bad):
        s = adamx.loss_scale(state.opt_state)
        grads = jax.grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2) * s)(state.params)
        grads = _poison(grads, bad)
        if fused:
            return adamx.fused.train_state_apply_gradients(state, grads)
        return state.apply_gradients(grads=grads)

    for i, (x, y) in enumerate(_batches()):
        state = train_step(state, x, y, jnp.asarray(i in BAD_STEPS))
    ref_params, ref_state = _pytree_reference()
    _close(state.params, ref_params)
    assert int(state.opt_state.skipped_steps) == 2 and float(state.opt_state.scale) == float(ref_state.scale)
    assert int(state.opt_state.inner_state.count) == 4


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(IN, HID, rngs=rngs)
        self.out = nnx.Linear(HID, OUT, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.dense(x)))


def test_flax_nnx_optimizer():
    model = _Model(nnx.Rngs(0))
    pstate = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(pstate, _mlp_params())
    nnx.update(model, pstate)
    optimizer = nnx.Optimizer(model, _lso(), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y, bad):
        s = adamx.loss_scale(optimizer.opt_state)
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2) * s)(model)
        optimizer.update(model, _poison(grads, bad))

    for i, (x, y) in enumerate(_batches()):
        train_step(model, optimizer, x, y, jnp.asarray(i in BAD_STEPS))
    ref_params, ref_state = _pytree_reference()
    _close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), ref_params)
    assert float(adamx.loss_scale(optimizer.opt_state)) == float(ref_state.scale)


# ---------------------------------------------------------------------------
# across devices
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test does)"
    return jax.make_mesh((4, 2), ("data", "model"))


def test_jit_over_sharded_params(mesh):
    specs = {
        "dense": {"kernel": P(None, "model"), "bias": P("model")},
        "out": {"kernel": P(None, "model"), "bias": P("model")},
    }
    tx = _lso()
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), _mlp_params(), specs)
        state = tx.init(params)

        @jax.jit
        def step(params, state, x, y, bad):
            s = adamx.loss_scale(state)
            g = _poison(jax.grad(lambda p: jnp.mean((_mlp(p, x) - y) ** 2) * s)(params), bad)
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        for i, (x, y) in enumerate(_batches()):
            x = jax.device_put(x, NamedSharding(mesh, P("data")))
            y = jax.device_put(y, NamedSharding(mesh, P("data")))
            params, state = step(params, state, x, y, jnp.asarray(i in BAD_STEPS))
    ref_params, ref_state = _pytree_reference()
    _close(params, ref_params)
    assert params["dense"]["kernel"].sharding.spec == P(None, "model")
    assert state.inner_state.mu["dense"]["kernel"].sharding.spec == P(None, "model")
    assert float(state.scale) == float(ref_state.scale) and int(state.skipped_steps) == 2


def _shard_map_step(mesh, axis_name):
    """Params split over all 8 devices along axis 'x'; each device sees only its own gradient shard."""
    tx = adamx.loss_scale_optimizer(adamx.adam(0.1), initial_scale=2.0**8, axis_name=axis_name)
    params = {"w": jnp.arange(16.0)}
    state = tx.init(params)
    state_spec = adamx.LossScaleState(P(), P(), P(), jax.tree.map(lambda _: P("x"), state.inner_state))
    state_spec = state_spec._replace(inner_state=state_spec.inner_state._replace(count=P()))

    def per_device(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state.scale[None], state.inner_state.count[None]

    f = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=({"w": P("x")}, state_spec, {"w": P("x")}),
        out_specs=({"w": P("x")}, P("x"), P("x")),
        check_vma=False,
    )
    grads = {"w": jnp.ones(16).at[5].set(jnp.inf)}  # device 2 of 8 holds the inf
    put = lambda tree, specs: jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)  # noqa: E731
    with jax.set_mesh(mesh):
        out = jax.jit(f)(put(params, {"w": P("x")}), put(state, state_spec), put(grads, {"w": P("x")}))
    return out, params


def test_shard_map_skip_decision_agrees_across_devices():
    mesh = jax.make_mesh((8,), ("x",))
    (new_params, scales, counts), params = _shard_map_step(mesh, "x")
    assert np.all(np.asarray(scales) == 128.0)  # every device halved
    assert np.all(np.asarray(counts) == 0)  # no device ran its Adam step
    np.testing.assert_array_equal(new_params["w"], params["w"])
    # Without axis_name the devices disagree: only the one that saw the inf skips.
    (new_params, scales, counts), _ = _shard_map_step(mesh, None)
    assert sorted(np.asarray(scales).tolist()) == [128.0] + [256.0] * 7
    assert np.asarray(counts).tolist() == [1, 1, 0, 1, 1, 1, 1, 1]


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------
def _keras_lso_configs():
    with open(os.path.join(LSO_DIR, "keras_lso_configs.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("entry", _keras_lso_configs(), ids=lambda e: e["desc"][:50])
def test_keras_lso_configs_round_trip(entry):
    config = entry["config"]
    opt = adamx.from_keras_config(config)
    assert opt.get_config() == config
    again = keras.optimizers.LossScaleOptimizer.from_config(json.loads(json.dumps(opt.get_config())))
    assert again.get_config() == config
    # the serialized form keras.saving.serialize_keras_object prints
    wrapped = {
        "module": "keras.optimizers",
        "class_name": "LossScaleOptimizer",
        "config": config,
        "registered_name": None,
    }
    assert adamx._config.loss_scale_from_keras_config(wrapped).get_config() == config


def test_config_errors_name_the_key():
    base = _keras_lso_configs()[0]["config"]
    from_cfg = adamx.from_keras_config
    with pytest.raises(ValueError, match="bogus"):
        from_cfg(dict(base, bogus=1))
    with pytest.raises(ValueError, match="clipnorm"):
        from_cfg(dict(base, clipnorm=1.0))
    with pytest.raises(ValueError, match="dynamic=False"):
        from_cfg(dict(base, dynamic=False))
    # Keras's backwards-compatible keys at their defaults are accepted, as Keras accepts them
    assert from_cfg(dict(base, clipnorm=None, use_ema=False, dynamic=True)).get_config() == base
    with pytest.raises(ValueError, match="initial_scale"):
        from_cfg(dict(base, initial_scale=0.0))
    with pytest.raises(ValueError, match="class_name='LossScaleOptimizer'"):
        adamx._config.loss_scale_from_keras_config({"class_name": "Adam", "config": base})


def test_get_config_of_adamx_only_options():
    opt = adamx.loss_scale_optimizer(adamx.adam(), min_scale=1.0, max_scale=2.0**24)
    with pytest.raises(ValueError, match="max_scale"):
        opt.get_config()
    cfg = opt.get_config(include_adamx=True)
    assert cfg["min_scale"] == 1.0 and cfg["max_scale"] == 2.0**24
    back = adamx.from_keras_config(cfg)
    assert back.hyperparams["min_scale"] == 1.0 and back.get_config(include_adamx=True) == cfg
    with pytest.raises(ValueError, match="inner"):
        adamx.loss_scale_optimizer(optax.adam(1e-3)).get_config()


def test_flax_dynamic_scale_migration_mapping():
    """docs/mixed_precision.md: Flax DynamicScale(growth_interval=N) == dynamic_growth_steps=N + 1 (same scales)."""
    from flax.training.dynamic_scale import DynamicScale

    n = 3
    finite_pattern = [True] * 9 + [False] + [True] * 5 + [False, False] + [True] * 6
    ds = DynamicScale(growth_interval=n, scale=65536.0)
    opt = adamx.loss_scale_optimizer(optax.sgd(0.1), initial_scale=65536.0, dynamic_growth_steps=n + 1)
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    flax_scales, ours = [], []
    for fin in finite_pattern:
        value = 1.0 if fin else float("inf")
        ds, _, _, _ = ds.value_and_grad(lambda p, v=value: jnp.sum(p["w"]) * v)(params)
        _, state = opt.update({"w": jnp.full(2, value)}, state, params)
        flax_scales.append(float(ds.scale))
        ours.append(float(state.scale))
    assert ours == flax_scales
    assert len(set(ours)) > 2  # grew and shrank


def test_flat_state_inner():
    inner = lambda: adamx.adam(0.01, flat_state=True)  # noqa: E731
    p1, s1 = _train(adamx.loss_scale_optimizer(inner(), initial_scale=2.0**8, dynamic_growth_steps=2))
    p2, _ = _train(adamx.loss_scale_optimizer(adamx.adam(0.01), initial_scale=2.0**8, dynamic_growth_steps=2))
    _close(p1, p2, rtol=1e-6, atol=1e-7)
    assert int(s1.skipped_steps) == 1
