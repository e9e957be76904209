"""Data parallelism by hand: ``shard_map`` and legacy ``pmap``, gradients averaged with ``lax.pmean``.

Each of the 8 devices takes 2 rows of the 16-row batch; the mean of the 8 per-device
mean gradients is the full-batch mean gradient up to float32 summation order, so the
params match the single-device reference to the suite's tolerance (see stack_utils).
The optimizer then runs replicated: identical inputs on every device, identical state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from stack_utils import OPTIMIZERS, assert_trees_close, batches, init_mlp, mlp_loss, reference, require_devices

P = PartitionSpec
N_DEV = 8


def local_step(tx, params, state, x, y, *, grad_at=lambda p: p):
    grads = jax.lax.pmean(jax.grad(mlp_loss)(grad_at(params), x, y), "data")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_shard_map_pmean(opt):
    require_devices(N_DEV)
    tx = OPTIMIZERS[opt]()
    mesh = jax.make_mesh((N_DEV,), ("data",))

    def body(params, state, x, y):
        # params enter replicated ("invariant" over data). Differentiating w.r.t. an invariant value inside
        # shard_map already sums the cotangent over the axis (8x the mean), so differentiate at a per-device
        # ("varying") cast: then jax.grad is the local gradient and pmean the data-parallel mean.
        return local_step(tx, params, state, x, y, grad_at=lambda p: jax.lax.pcast(p, "data", to="varying"))

    with jax.set_mesh(mesh):
        step = jax.jit(jax.shard_map(body, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
        params, state = jax.device_put((init_mlp(), tx.init(init_mlp())), NamedSharding(mesh, P()))
        for x, y in batches():
            xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
            params, state = step(params, state, xs, ys)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves((params, state)))
    ref_params, ref_state = reference(opt)
    assert_trees_close(params, ref_params, what="params")
    assert_trees_close(state, ref_state, what="state")


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_pmap_pmean(opt):
    require_devices(N_DEV)
    tx = OPTIMIZERS[opt]()
    step = jax.pmap(lambda p, s, x, y: local_step(tx, p, s, x, y), axis_name="data")
    params, state = jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV, *a.shape)), (init_mlp(), tx.init(init_mlp())))
    for x, y in batches():
        params, state = step(params, state, x.reshape(N_DEV, -1, x.shape[-1]), y.reshape(N_DEV, -1, y.shape[-1]))
    # every replica holds the same values
    for leaf in jax.tree.leaves((params, state)):
        a = np.asarray(leaf)
        assert all(np.array_equal(a[0], a[i]) for i in range(1, N_DEV))
    first = jax.tree.map(lambda a: a[0], (params, state))
    ref_params, ref_state = reference(opt)
    assert_trees_close(first[0], ref_params, what="params")
    assert_trees_close(first[1], ref_state, what="state")
