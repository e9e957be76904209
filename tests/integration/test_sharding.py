"""Sharding on 8 simulated CPU devices: NamedSharding on an Explicit mesh, global clipping, ZeRO-1.

``jax.make_mesh`` gives Explicit axes: shardings are part of the array types, and
``jit`` over sharded inputs runs under ``jax.set_mesh(mesh)``.
"""

from __future__ import annotations

import doctest
import functools
import textwrap

import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from stack_utils import (
    FULL_KWARGS,
    N_STEPS,
    assert_trees_close,
    batches,
    full_adam,
    init_mlp,
    mlp_loss,
    reference,
    reference_run,
    require_devices,
)

import adamx
import adamx.sharding
from adamx.sharding import bytes_per_device, replicated_sharding, zero1, zero1_state_sharding

P = PartitionSpec
NO_ACCUMULATION = {k: v for k, v in FULL_KWARGS.items() if k != "gradient_accumulation_steps"}
OPTS = {
    "plain": adamx.adam,
    "all_but_accumulation": lambda: adamx.adam(**NO_ACCUMULATION),
    "full": full_adam,
}
OPT_PARAMS = [
    pytest.param("plain"),
    pytest.param("all_but_accumulation"),
    pytest.param("full"),
]
STATE_FIELDS = ("mu", "nu", "nu_max", "acc", "ema")
# tensor-parallel layout: every param split over "model" (contracting dimensions left whole)
PARAM_SPECS = {
    "dense": {"kernel": P(None, "model"), "bias": P("model")},
    "out": {"kernel": P(None, "model"), "bias": P("model")},
}


@pytest.fixture(scope="module")
def mesh():
    require_devices(8)
    return jax.make_mesh((4, 2), ("data", "model"))


_REFS: dict[str, tuple] = {}


def ref(opt: str):
    if opt in ("plain", "full"):
        return reference(opt)
    if opt not in _REFS:
        _REFS[opt] = reference_run(OPTS[opt](), init_mlp(), mlp_loss, batches())
    return _REFS[opt]


def shard_batch(mesh, x, y):
    s = NamedSharding(mesh, P("data"))
    return jax.device_put(x, s), jax.device_put(y, s)


def assert_state_follows(state, params):
    """Every per-param buffer has its param's sharding; scalars are replicated."""
    p_leaves, treedef = jax.tree.flatten(params)
    for field in STATE_FIELDS:
        buf = getattr(state, field)
        if buf is None:
            continue
        for p, b in zip(p_leaves, treedef.flatten_up_to(buf), strict=True):
            assert b.sharding.is_equivalent_to(p.sharding, p.ndim), f"{field}: {b.sharding.spec} vs {p.sharding.spec}"
    assert state.count.sharding.is_fully_replicated


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("opt", OPT_PARAMS)
def test_state_follows_param_sharding(mesh, opt, jit):
    tx = OPTS[opt]()

    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh):
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), PARAM_SPECS)
        params = jax.device_put(init_mlp(), param_sh)
        state = (jax.jit(tx.init) if jit else tx.init)(params)
        assert_state_follows(state, params)
        run = jax.jit(step) if jit else step
        for x, y in batches():
            params, state = run(params, state, *shard_batch(mesh, x, y))
        assert_state_follows(state, params)
        for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_sh), strict=True):
            assert p.sharding.is_equivalent_to(s, p.ndim)
    ref_params, ref_state = ref(opt)
    assert_trees_close(params, ref_params, what="params")
    assert_trees_close(state, ref_state, what="state")


def test_global_clipnorm_is_over_global_arrays(mesh):
    """Clipping is active here, and the sharded run clips by the norm of the whole gradient."""
    clipped = adamx.adam(learning_rate=1e-2, global_clipnorm=1.0)
    x, y = batches(1)[0]
    g = jax.grad(mlp_loss)(init_mlp(), x, y)
    assert float(optax.global_norm(g)) > 2.0  # well above the threshold
    ref_params, _ = reference_run(clipped, init_mlp(), mlp_loss, batches(3))
    unclipped, _ = reference_run(adamx.adam(learning_rate=1e-2), init_mlp(), mlp_loss, batches(3))
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(unclipped)))
    assert gap > 1e-4  # the comparison below can tell clipped from unclipped (tolerance is 1e-7)

    with jax.set_mesh(mesh):
        # each param split over both axes where it can be: per-shard norms would all differ from the global one
        specs = {
            "dense": {"kernel": P("data", "model"), "bias": P("model")},
            "out": {"kernel": P(None, "model"), "bias": P()},
        }
        params = jax.device_put(init_mlp(), jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        state = clipped.init(params)

        @jax.jit
        def step(params, state, x, y):
            grads = jax.grad(mlp_loss)(params, x, y)
            updates, state = clipped.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for x, y in batches(3):
            params, state = step(params, state, *shard_batch(mesh, x, y))
        assert params["dense"]["kernel"].sharding.spec == P("data", "model")
    assert_trees_close(params, ref_params)


# ---------------------------------------------------------------------------
# ZeRO-1
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_mesh():
    require_devices(8)
    return jax.make_mesh((8,), ("data",))


def test_zero1_state_sharding_specs(data_mesh):
    tx = full_adam()
    abstract = jax.eval_shape(tx.init, init_mlp())
    sh = zero1_state_sharding(abstract, data_mesh)
    assert isinstance(sh, adamx.AdamState)
    assert sh.count.spec == P()
    for field in STATE_FIELDS:
        buf = getattr(sh, field)
        assert buf["dense"]["kernel"].spec == P(None, "data")  # (4, 16): first divisible axis is the second
        assert buf["dense"]["bias"].spec == P("data")  # (16,)
        assert buf["out"]["kernel"].spec == P("data", None)  # (16, 2)
        assert buf["out"]["bias"].spec == P(None)  # (2,): not divisible by 8, replicated
    # None fields stay None; concrete states give the same answer
    plain = zero1_state_sharding(adamx.adam().init(init_mlp()), data_mesh)
    assert plain.nu_max is None and plain.acc is None and plain.ema is None
    assert plain.mu["out"]["kernel"].spec == P("data", None)
    # leaves already sharded on another axis keep it and gain the data axis on a free dimension
    mesh2 = jax.make_mesh((4, 2), ("data", "model"))
    with jax.set_mesh(mesh2):
        p = jax.device_put(jnp.zeros((8, 6)), NamedSharding(mesh2, P(None, "model")))
        assert zero1_state_sharding({"w": p}, mesh2)["w"].spec == P("data", "model")


def _state_bytes(state) -> dict:
    per_device = bytes_per_device(state)
    assert len(per_device) == 8
    return per_device


def _expected_sharded_bytes(state, n: int = 8) -> int:
    total = 0
    for leaf in jax.tree.leaves(state):
        divisible = any(d % n == 0 for d in leaf.shape)
        total += leaf.nbytes // n if divisible else leaf.nbytes
    return total


def test_zero1_out_shardings_auto_mesh(capsys):
    """Classic GSPMD ZeRO-1: Auto axes, jit's out_shardings alone place the state."""
    require_devices(8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    tx = full_adam()
    params = jax.device_put(init_mlp(), replicated_sharding(init_mlp(), mesh))
    state_sh = zero1_state_sharding(jax.eval_shape(tx.init, params), mesh)
    param_sh = replicated_sharding(params, mesh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)

    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, out_shardings=(param_sh, state_sh))
    for x, y in batches():
        params, state = step(params, state, *shard_batch(mesh, x, y))

    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(params))
    assert state.mu["out"]["kernel"].addressable_shards[0].data.shape == (2, 2)
    replicated_state = jax.device_put(state, replicated_sharding(state, mesh))
    zero1_bytes, full_bytes = _state_bytes(state), _state_bytes(replicated_state)
    assert set(zero1_bytes.values()) == {_expected_sharded_bytes(state)}
    assert set(full_bytes.values()) == {sum(leaf.nbytes for leaf in jax.tree.leaves(state))}
    with capsys.disabled():
        print(
            f"\n[zero1] optimizer state bytes per device: replicated {max(full_bytes.values())}, "
            f"ZeRO-1 {max(zero1_bytes.values())} (8 devices)"
        )
    ref_params, ref_state = reference("full")
    assert_trees_close(params, ref_params, what="params")
    assert_trees_close(state, ref_state, what="state")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("opt", OPT_PARAMS)
def test_zero1_wrapper_explicit_mesh(data_mesh, opt, jit):
    """``adamx.sharding.zero1`` on an Explicit mesh: replicated params, sharded state, the replicated result."""
    mesh = data_mesh
    tx = zero1(OPTS[opt](), mesh)
    with jax.set_mesh(mesh):
        params = jax.device_put(init_mlp(), replicated_sharding(init_mlp(), mesh))
        state = (jax.jit(tx.init) if jit else tx.init)(params)
        state_sh = zero1_state_sharding(jax.eval_shape(tx.init, params), mesh)

        def step(params, state, x, y):
            updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
            return optax.apply_updates(params, updates), state

        run = jax.jit(step, out_shardings=(replicated_sharding(params, mesh), state_sh)) if jit else step
        for x, y in batches():
            params, state = run(params, state, *shard_batch(mesh, x, y))
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(params))
    assert set(_state_bytes(state).values()) == {_expected_sharded_bytes(state)}
    ref_params, ref_state = ref(opt)
    assert_trees_close(params, ref_params, what="params")
    assert_trees_close(state, ref_state, what="state")
    assert int(state.count) == N_STEPS


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("opt", [p for p in OPT_PARAMS if p.values[0] != "plain"])
def test_zero1_inside_train_state_with_donation(data_mesh, opt):
    """The wrapper is an ordinary optax transformation: Flax TrainState, donated jitted step, Explicit mesh."""
    mesh = data_mesh
    with jax.set_mesh(mesh):
        params = jax.device_put(init_mlp(), replicated_sharding(init_mlp(), mesh))
        state = train_state.TrainState.create(apply_fn=None, params=params, tx=zero1(OPTS[opt](), mesh))

        @functools.partial(jax.jit, donate_argnums=0)
        def step(state, x, y):
            return state.apply_gradients(grads=jax.grad(mlp_loss)(state.params, x, y))

        for x, y in batches():
            state = step(state, *shard_batch(mesh, x, y))
    assert state.opt_state.mu["out"]["kernel"].sharding.spec == P("data", None)
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(state.params))
    ref_params, ref_state = ref(opt)
    assert_trees_close(state.params, ref_params, what="params")
    assert_trees_close(state.opt_state, ref_state, what="state")


def test_sharding_module_doctests_and_example(data_mesh, capsys):
    results = doctest.testmod(adamx.sharding)
    assert results.attempted >= 5 and results.failed == 0
    # the module docstring's 8-device example (a literal block, not a doctest) runs as written
    doc = adamx.sharding.__doc__
    code = textwrap.dedent(doc[doc.index("Example (8 devices") :].split("::\n", 1)[1])
    exec(compile(code, "adamx.sharding example", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("131204") == 8, printed  # 4 buffers of (1024, 64) + (64,) float32, / 8, + count
