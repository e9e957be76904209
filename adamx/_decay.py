"""Decoupled weight decay and its masks (Keras ``weight_decay``, ``exclude_from_weight_decay``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeAlias

import jax
import jax.numpy as jnp
import optax

from adamx import _hyper, _tree
from adamx._types import PyTree, ScalarOrSchedule

# a pytree of bools, a callable params -> such a pytree, or None
MaskOrFn: TypeAlias = PyTree


def decay_mask_leaves(
    params: PyTree,
    exclude_from_weight_decay: Sequence[str] | None = None,
    weight_decay_mask: MaskOrFn = None,
) -> list[bool]:
    """Which leaves of ``params`` are decayed, as a list of Python bools in leaf order.

    ``exclude_from_weight_decay`` holds regular expressions searched (``re.search``,
    as Keras matches variable names) in each leaf's key path written ``a/b/c``; a leaf
    that matches any is not decayed. ``weight_decay_mask`` is a pytree of bools shaped
    like params (or a prefix of it), or a callable ``params -> such a tree``: the optax
    convention, ``True`` = decay. Both may be given; a leaf is decayed when both allow it.
    """
    paths = _tree.leaf_paths(params)
    keep = [True] * len(paths)
    if exclude_from_weight_decay:
        rx = re.compile("|".join(f"(?:{p})" for p in exclude_from_weight_decay))
        keep = [k and rx.search(p) is None for k, p in zip(keep, paths)]
    if weight_decay_mask is not None:
        m = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
        try:
            per_leaf = jax.tree.map(lambda mk, sub: [mk] * len(jax.tree_util.tree_leaves(sub)), m, params)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"`weight_decay_mask` must be a pytree of bools shaped like params (or a prefix of it): {e}"
            ) from e
        lists = jax.tree_util.tree_leaves(per_leaf, is_leaf=lambda x: isinstance(x, list))
        mask_leaves = [v for lst in lists for v in lst]
        for v in mask_leaves:
            if not isinstance(v, bool):
                raise ValueError(f"`weight_decay_mask` leaves must be Python bools, got {v!r}.")
        keep = [k and bool(v) for k, v in zip(keep, mask_leaves)]
    return keep


def check_exclude(exclude_from_weight_decay: object) -> None:
    if exclude_from_weight_decay is None:
        return
    if (
        isinstance(exclude_from_weight_decay, str)
        or not isinstance(exclude_from_weight_decay, (list, tuple, set, frozenset))
        or not all(isinstance(p, str) for p in exclude_from_weight_decay)
    ):
        raise TypeError(
            f"`exclude_from_weight_decay` must be a list of name patterns (strings), got {exclude_from_weight_decay!r}."
        )
    for p in exclude_from_weight_decay:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"`exclude_from_weight_decay` pattern {p!r} is not a valid regex: {e}") from e


def decoupled_weight_decay(
    weight_decay: ScalarOrSchedule,
    *,
    exclude_from_weight_decay: Sequence[str] | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""Add ``weight_decay * params`` to the updates of the decayed leaves.

    Place it after :func:`scale_by_adam` and before the learning-rate scaling, as
    ``adamx.adam`` does; the step then is Keras's decoupled decay

    .. code-block:: text

        params <- params - lr * (adam_direction + weight_decay * params)
               == params * (1 - lr * weight_decay) - lr * adam_direction

    The decay uses the parameters from before this step, and is scaled by the current
    learning rate (so it follows a schedule).

    Args:
      weight_decay: >= 0, or a schedule ``count -> value``.
      exclude_from_weight_decay: regexes searched in the ``a/b/c`` key path of each leaf.
      mask: pytree of bools or callable ``params -> pytree`` (``True`` = decay).
    """
    _hyper.check_scalar("weight_decay", weight_decay, lo=0.0, allow_schedule=True)
    check_exclude(exclude_from_weight_decay)

    def init_fn(params: optax.Params) -> optax.ScaleByScheduleState:
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates, state: optax.ScaleByScheduleState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.ScaleByScheduleState]:
        if params is None:
            raise ValueError("decoupled_weight_decay needs `params`: call update(updates, state, params).")
        u_leaves, p_leaves, treedef = _tree.align_grads(updates, params)
        keep = decay_mask_leaves(params, exclude_from_weight_decay, mask)
        wd = _hyper.value_at(weight_decay, state.count)
        out = []
        for u, p, k in zip(u_leaves, p_leaves, keep):
            if u is not None and k:
                u = (u.astype(wd.dtype) + p.astype(wd.dtype) * wd).astype(u.dtype)
            out.append(u)
        return jax.tree_util.tree_unflatten(treedef, out), optax.ScaleByScheduleState(
            count=optax.safe_increment(state.count)
        )

    return optax.GradientTransformation(init_fn, update_fn)
