"""Flat optimizer state: every per-parameter buffer field as a few 1-D arrays.

With ``adamx.adam(..., flat_state=True)`` each per-parameter field of the state
(``mu``, ``nu``, ``nu_max``, ``acc``, ``ema``) is a :class:`FlatBuffers`: one 1-D array per
dtype, holding the leaves of params (in ``jax.tree_util`` leaf order) one after the
other. A model with thousands of parameter tensors then has a handful of state arrays
instead of thousands: a jitted step passes, donates and compiles far fewer buffers
(see docs/performance.md). The layout is a pure function of the params' shapes and
dtypes, so nothing else is stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class FlatBuffers(NamedTuple):
    """One field of a flat state: ``buffers[i]`` holds the leaves of the i-th dtype group."""

    buffers: tuple[jax.Array, ...]


class Slot(NamedTuple):
    group: int
    offset: int
    size: int
    shape: tuple[int, ...]


class Layout(NamedTuple):
    dtypes: tuple[Any, ...]  # one per group, in order of first appearance
    totals: tuple[int, ...]  # elements per group
    slots: tuple[Slot, ...]  # one per leaf


def layout(leaves: Sequence[Any], dtype_of: Callable[[Any], Any]) -> Layout:
    """Where each leaf lives: groups by ``dtype_of(leaf)``, leaves in order within a group."""
    dtypes: list[Any] = []
    totals: list[int] = []
    slots = []
    for x in leaves:
        dt = jnp.dtype(dtype_of(x))
        if dt not in dtypes:
            dtypes.append(dt)
            totals.append(0)
        g = dtypes.index(dt)
        shape = tuple(int(d) for d in jnp.shape(x))
        size = math.prod(shape)
        slots.append(Slot(g, totals[g], size, shape))
        totals[g] += size
    return Layout(tuple(dtypes), tuple(totals), tuple(slots))


def pack(leaves: Sequence[Any], lay: Layout, *, fresh: bool = False) -> FlatBuffers:
    """The leaves (of the layout's shapes) as flat buffers in the layout's dtypes.

    A group of one leaf may share the leaf's buffer; ``fresh=True`` copies it then.
    """
    parts: list[list[Any]] = [[] for _ in lay.dtypes]
    for x, s in zip(leaves, lay.slots):
        parts[s.group].append(jnp.ravel(jnp.asarray(x)).astype(lay.dtypes[s.group]))

    def join(p: list[Any]) -> Any:
        if len(p) > 1:
            return jnp.concatenate(p)
        return jnp.array(p[0], copy=True) if fresh else p[0]

    return FlatBuffers(tuple(join(p) for p in parts))


def zeros(lay: Layout) -> FlatBuffers:
    return FlatBuffers(tuple(jnp.zeros((n,), dt) for n, dt in zip(lay.totals, lay.dtypes)))


def checked_buffers(flat: FlatBuffers, lay: Layout, name: str | None = None) -> tuple[Any, ...]:
    """The arrays of ``flat``; a ``ValueError`` (naming the state field ``name``) unless they fit ``lay``."""
    bufs = buffers_of(flat)
    if len(bufs) != len(lay.dtypes) or any(int(b.shape[0]) != n for b, n in zip(bufs, lay.totals)):
        raise ValueError(
            "flat optimizer state does not match params: "
            + ("buffers" if name is None else f"`{name}` has buffers")
            + f" of sizes {[int(b.shape[0]) for b in bufs]}, params need {list(lay.totals)}."
        )
    return bufs


def view(bufs: Sequence[Any], s: Slot) -> jax.Array:
    """One leaf of a flat state: its slice of its group's buffer, in its shape."""
    return jax.lax.slice(bufs[s.group], (s.offset,), (s.offset + s.size,)).reshape(s.shape)


def unpack(flat: FlatBuffers, lay: Layout) -> list[jax.Array]:
    """The leaves, as slices of the flat buffers."""
    bufs = checked_buffers(flat, lay)
    return [view(bufs, s) for s in lay.slots]


def buffers_of(flat: Any) -> tuple[Any, ...]:
    """The arrays of a :class:`FlatBuffers` (unwrapping containers such as nnx variables)."""
    return tuple(jnp.asarray(b[...] if hasattr(b, "get_value") else b) for b in flat.buffers)
