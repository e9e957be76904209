"""Checkpoints written by an earlier adamx restore unchanged and continue to the same numbers.

``tests/references/make_checkpoints.py`` wrote ``data/checkpoints/<name>/`` (Orbax) at commit
24914bd, before the architecture refactor, together with the arrays that the next steps reached
with that code. Here the current code restores each checkpoint into the state its own ``init``
describes (so field names, tree structure, flat-buffer layout, dtypes and shapes must all be the
same) and takes the same steps: every array must be bit-identical.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adamx._quantize import QuantizedArray
from adamx.fused import _build
from tests.references import make_checkpoints as mk
from tests.references import make_checkpoints_q8 as mk8


@pytest.mark.parametrize("name", sorted(mk.OPTIONS))
def test_old_checkpoint_restores_and_continues(name):
    tx = mk.tx_for(name)
    target = jax.eval_shape(lambda: (mk.init_params(), tx.init(mk.init_params())))
    params, state = ocp.StandardCheckpointer().restore(os.path.join(mk.OUT, name), target)
    assert jax.tree_util.tree_structure((params, state)) == jax.tree_util.tree_structure(target)
    assert int(state.count) == mk.SAVE_AT
    step = mk.make_step(tx)
    for x, y in mk.batches(mk.SAVE_AT + mk.MORE)[mk.SAVE_AT :]:
        params, state = step(params, state, x, y)
    want = np.load(os.path.join(mk.OUT, f"{name}.npz"))
    got = [np.asarray(x.astype(np.float32)) for x in jax.tree_util.tree_leaves((params, state))]
    assert len(got) == len(want.files)
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, want[f"arr_{i}"], err_msg=f"{name}: leaf {i}")


def first_8bit_layout(abstract_state):
    """A restore target for a checkpoint of the first 8-bit layout: each quantized leaf's codes and
    scales 1-D (the same blocks, in the same order); ``update`` takes such a state and goes on in
    today's layout (docs/quantized_state.md)."""

    def flat(x):
        if isinstance(x, QuantizedArray):
            return QuantizedArray(*(jax.ShapeDtypeStruct((a.size,), a.dtype) for a in x))
        return x

    return jax.tree.map(flat, abstract_state, is_leaf=lambda x: isinstance(x, QuantizedArray))


@pytest.mark.parametrize("name", sorted(mk8.OPTIONS))
@pytest.mark.parametrize("kernel", [False, True], ids=["xla", "kernel"])
def test_first_8bit_layout_restores_and_continues(name, kernel, monkeypatch):
    """8-bit checkpoints written before the state was shaped like params (1-D codes and scales)
    restore into :func:`first_8bit_layout` of today's state and continue to the same params, bit
    for bit, through XLA's schedule (the one that wrote them); the state they continue in is today's
    layout. Through the CPU kernel of ``update`` (the default since), the gradient of this step
    (``jax.grad`` in the same program) reaches the moments rounded, not contracted into ``g - m``:
    the same trajectory to float32 rounding."""
    if not kernel:
        monkeypatch.setattr(_build, "available", lambda: False)
    tx = mk8.tx_for(name)
    target = jax.eval_shape(lambda: (mk8.init_params(), tx.init(mk8.init_params())))
    params, state = ocp.StandardCheckpointer().restore(os.path.join(mk8.OUT, name), first_8bit_layout(target))
    assert int(state.count) == mk8.SAVE_AT
    step = mk8.make_step(tx)
    for x in mk8.batches(mk8.SAVE_AT + mk8.MORE)[mk8.SAVE_AT :]:
        params, state = step(params, state, x)
    want = np.load(os.path.join(mk8.OUT, f"{name}.npz"))
    got = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
    for i, g in enumerate(got):
        if kernel:
            np.testing.assert_allclose(g, want[f"arr_{i}"], rtol=1e-5, atol=1e-7, err_msg=f"{name}: leaf {i}")
        else:
            np.testing.assert_array_equal(g, want[f"arr_{i}"], err_msg=f"{name}: leaf {i}")
    now = jax.tree_util.tree_map(lambda a: a.shape, state)
    assert now == jax.tree_util.tree_map(lambda a: a.shape, target[1])
