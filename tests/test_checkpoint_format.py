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

from tests.references import make_checkpoints as mk


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
