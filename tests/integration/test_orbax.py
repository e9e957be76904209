"""Orbax: save ``(params, opt_state)`` mid-run, restore into an abstract target, continue: bit-identical.

The resumed half runs in a freshly built optimizer and a freshly compiled step (as a
new process would), so equality also checks that nothing the optimizer needs lives
outside the saved state (the step count for bias correction, the accumulation window,
the EMA and its overwrite schedule, the AMSGrad maximum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from stack_utils import FULL_KWARGS, N_STEPS, assert_trees_equal, batches, init_mlp, mlp_loss, require_devices

import adamx
from adamx.sharding import zero1_state_sharding

OPTIONS = {
    "plain": {},
    "amsgrad": dict(amsgrad=True),
    "weight_decay": dict(weight_decay=0.01),
    "global_clipnorm": dict(global_clipnorm=1.0),
    "clipnorm": dict(clipnorm=0.5),
    "ema_overwrite": dict(use_ema=True, ema_overwrite_frequency=3),
    "accumulation": dict(gradient_accumulation_steps=2),
    "all": {k: v for k, v in FULL_KWARGS.items() if k != "learning_rate"},
    "all, flat state": {**{k: v for k, v in FULL_KWARGS.items() if k != "learning_rate"}, "flat_state": True},
}
SAVE_AT = 3  # with accumulation 2: one real step done, the second window half full
FIELDS = {"count", "mu", "nu", "nu_max", "acc", "ema"}


def make_tx(option: str):
    return adamx.adam(learning_rate=1e-2, **OPTIONS[option])


def make_step(tx):
    @jax.jit
    def step(params, state, x, y):
        updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    return step


def run(step, params, state, data):
    for x, y in data:
        params, state = step(params, state, x, y)
    return params, state


def abstract_target(option: str):
    """What a restarting job has before loading: shapes and dtypes only."""
    return jax.eval_shape(lambda: (init_mlp(), make_tx(option).init(init_mlp())))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_standard_checkpointer_resume_is_bit_identical(option, tmp_path):
    data = batches(N_STEPS)
    tx = make_tx(option)
    full = run(make_step(tx), init_mlp(), tx.init(init_mlp()), data)

    params, state = run(make_step(tx), init_mlp(), tx.init(init_mlp()), data[:SAVE_AT])
    if state.acc is not None:  # a partial accumulation window is in flight
        assert any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(state.acc))
    ckptr = ocp.StandardCheckpointer()
    path = tmp_path / "ckpt"
    ckptr.save(path, (params, state))
    ckptr.wait_until_finished()
    del params, state

    # the on-disk tree uses AdamState's field names, None where an option is off
    on_disk = ckptr.metadata(path).item_metadata.tree[1]
    assert set(on_disk) == FIELDS
    for field in FIELDS:
        expected_off = getattr(make_tx(option).init(init_mlp()), field) is None
        assert (on_disk[field] is None) == expected_off, field

    tx2 = make_tx(option)
    params, state = ckptr.restore(path, abstract_target(option))
    assert isinstance(state, adamx.AdamState)
    resumed = run(make_step(tx2), params, state, data[SAVE_AT:])
    assert_trees_equal(resumed, full, what=f"{option}: resumed run")
    ckptr.close()


def test_checkpoint_manager_resume_is_bit_identical(tmp_path):
    data = batches(N_STEPS)
    tx = make_tx("all")
    step = make_step(tx)
    full = run(step, init_mlp(), tx.init(init_mlp()), data)

    crash_after = 5  # odd: the accumulation window is half full at the last save
    params, state = init_mlp(), tx.init(init_mlp())
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
        for i, (x, y) in enumerate(data[:crash_after], start=1):
            params, state = step(params, state, x, y)
            mngr.save(i, args=ocp.args.StandardSave((params, state)))
        mngr.wait_until_finished()
    del params, state

    with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
        assert mngr.all_steps() == [crash_after - 1, crash_after]
        last = mngr.latest_step()
        params, state = mngr.restore(last, args=ocp.args.StandardRestore(abstract_target("all")))
    assert int(state.count) == crash_after
    resumed = run(make_step(make_tx("all")), params, state, data[last:])
    assert_trees_equal(resumed, full, what="resumed run")
    assert_trees_equal(adamx.finalize_variable_values(*resumed), adamx.finalize_variable_values(*full), what="ema")


def test_restore_into_zero1_shardings(tmp_path):
    """An unsharded checkpoint restored straight into ZeRO-1 shardings on 8 devices."""
    require_devices(8)
    tx = make_tx("all")
    params, state = run(make_step(tx), init_mlp(), tx.init(init_mlp()), batches(SAVE_AT))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", (params, state))
    ckptr.wait_until_finished()

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    p_abs, s_abs = abstract_target("all")
    rep = NamedSharding(mesh, PartitionSpec())
    p_target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), p_abs)
    s_target = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s_abs, zero1_state_sharding(s_abs, mesh)
    )
    r_params, r_state = ckptr.restore(tmp_path / "ckpt", (p_target, s_target))
    ckptr.close()
    assert_trees_equal((r_params, r_state), (params, state), what="restored values")
    assert r_state.mu["dense"]["bias"].sharding.spec == PartitionSpec("data")  # 16 entries over 8 devices
    assert r_state.mu["out"]["bias"].sharding.is_fully_replicated  # 2 entries: replicated
    shard = r_state.ema["dense"]["kernel"].addressable_shards[0].data
    assert shard.shape == (4, 2)  # (4, 16): the first axis is not divisible by 8, the second is
    np.testing.assert_array_equal(np.asarray(r_params["out"]["kernel"]), np.asarray(params["out"]["kernel"]))
