"""Flat optimizer state: every per-parameter buffer field as a few 1-D arrays.

With ``adamx.adam(..., flat_state=True)`` each per-parameter field of the state
(``mu``, ``nu``, ``nu_max``, ``acc``, ``ema``) is a :class:`FlatBuffers`: one 1-D array per
dtype, holding the leaves of params (in ``jax.tree_util`` leaf order) one after the
other. A model with thousands of parameter tensors then has a handful of state arrays
instead of thousands: a jitted step passes, donates and compiles far fewer buffers
(see docs/performance.md). The layout is a pure function of the params' shapes and
dtypes, so nothing else is stored.

With 8-bit moments (``quantize_moments=True``) a quantized leaf of ``mu``/``nu``/``nu_max``
keeps its codes in the field's ``uint8`` group and its block scales in one more ``float32``
buffer at the end (``Layout.n_blocks`` scales; ``Slot.block`` is a leaf's first one):
``FlatBuffers((..., codes, scales))``. Each leaf keeps its own blocks, so a leaf's view is
the same :class:`adamx.QuantizedArray` that tree state holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from adamx import _quantize
from adamx._types import Leaf


class FlatBuffers(NamedTuple):
    """One field of a flat state: ``buffers[i]`` holds the leaves of the i-th dtype group."""

    buffers: tuple[jax.Array, ...]


class Slot(NamedTuple):
    group: int
    offset: int
    size: int
    shape: tuple[int, ...]
    block: int = -1  # an 8-bit leaf: its first scale in the scales buffer; -1 for a plain leaf


class Layout(NamedTuple):
    dtypes: tuple[Leaf, ...]  # one per group, in order of first appearance
    totals: tuple[int, ...]  # elements per group
    slots: tuple[Slot, ...]  # one per leaf
    block_size: int = 0  # 8-bit leaves: the quantization block size (0: none)
    n_blocks: int = 0  # 8-bit leaves: scales in the last buffer (0: no scales buffer)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every buffer's length: the groups, then the scales (when a leaf is 8-bit)."""
        return self.totals + ((self.n_blocks,) if self.n_blocks else ())

    @property
    def buffer_dtypes(self) -> tuple[Leaf, ...]:
        return self.dtypes + ((jnp.dtype(jnp.float32),) if self.n_blocks else ())


def layout(
    leaves: Sequence[Leaf],
    dtype_of: Callable[[Leaf], Leaf],
    quantized: Sequence[bool] | None = None,
    block_size: int = 0,
) -> Layout:
    """Where each leaf lives: groups by ``dtype_of(leaf)``, leaves in order within a group.

    ``quantized[i]``: leaf ``i`` is 8-bit (codes in the ``uint8`` group, ``ceil(size /
    block_size)`` scales in the scales buffer).
    """
    dtypes: list[Leaf] = []
    totals: list[int] = []
    slots = []
    n_blocks = 0
    for i, x in enumerate(leaves):
        q = bool(quantized[i]) if quantized is not None else False
        dt = jnp.dtype(jnp.uint8) if q else jnp.dtype(dtype_of(x))
        if dt not in dtypes:
            dtypes.append(dt)
            totals.append(0)
        g = dtypes.index(dt)
        shape = tuple(int(d) for d in jnp.shape(x))
        size = math.prod(shape)
        slots.append(Slot(g, totals[g], size, shape, n_blocks if q else -1))
        totals[g] += size
        if q:
            n_blocks += _quantize.num_blocks(size, block_size)
    return Layout(tuple(dtypes), tuple(totals), tuple(slots), block_size if n_blocks else 0, n_blocks)


def pack(leaves: Sequence[Leaf], lay: Layout, *, fresh: bool = False) -> FlatBuffers:
    """The leaves (of the layout's shapes) as flat buffers in the layout's dtypes.

    An 8-bit slot takes a :class:`adamx.QuantizedArray` (codes to its group, scales to the
    scales buffer). A buffer of one leaf may share the leaf's array; ``fresh=True`` copies it then.
    """
    parts: list[list[Leaf]] = [[] for _ in lay.sizes]
    for x, s in zip(leaves, lay.slots):
        if s.block >= 0:
            if not isinstance(x, _quantize.QuantizedArray):
                raise TypeError(f"an 8-bit slot of the flat layout needs a QuantizedArray, got {type(x).__name__}")
            parts[s.group].append(jnp.ravel(x.codes))
            parts[-1].append(jnp.ravel(x.scales))
        else:
            parts[s.group].append(jnp.ravel(jnp.asarray(x)).astype(lay.dtypes[s.group]))

    def join(p: list[Leaf]) -> Leaf:
        if len(p) > 1:
            return jnp.concatenate(p)
        return jnp.array(p[0], copy=True) if fresh else p[0]

    return FlatBuffers(tuple(join(p) for p in parts))


def zeros(lay: Layout) -> FlatBuffers:
    """Zero buffers (a layout without 8-bit leaves: their zero codes depend on the code map)."""
    assert not lay.n_blocks, "8-bit leaves: pack their quantized zeros"
    return FlatBuffers(tuple(jnp.zeros((n,), dt) for n, dt in zip(lay.totals, lay.dtypes)))


def checked_buffers(flat: FlatBuffers, lay: Layout, name: str | None = None) -> tuple[Leaf, ...]:
    """The arrays of ``flat``; a ``ValueError`` (naming the state field ``name``) unless they fit ``lay``."""
    bufs = buffers_of(flat)
    if len(bufs) != len(lay.sizes) or any(int(b.shape[0]) != n for b, n in zip(bufs, lay.sizes)):
        raise ValueError(
            "flat optimizer state does not match params: "
            + ("buffers" if name is None else f"`{name}` has buffers")
            + f" of sizes {[int(b.shape[0]) for b in bufs]}, params need {list(lay.sizes)}."
        )
    return bufs


def view(bufs: Sequence[Leaf], s: Slot) -> jax.Array:
    """One leaf of a flat state: its slice of its group's buffer, in its shape."""
    return jax.lax.slice(bufs[s.group], (s.offset,), (s.offset + s.size,)).reshape(s.shape)


def unpack(flat: FlatBuffers, lay: Layout) -> list[Leaf]:
    """The leaves, as slices of the flat buffers (an 8-bit leaf as a :class:`adamx.QuantizedArray`)."""
    bufs = checked_buffers(flat, lay)
    out: list[Leaf] = []
    for s in lay.slots:
        if s.block >= 0:
            nb = _quantize.num_blocks(s.size, lay.block_size)
            codes = view(bufs, s)
            scales = jax.lax.slice(bufs[-1], (s.block,), (s.block + nb,))
            out.append(_quantize.QuantizedArray(codes, scales.reshape(_quantize.scale_shape(s.shape, lay.block_size))))
        else:
            out.append(view(bufs, s))
    return out


def buffers_of(flat: Leaf) -> tuple[Leaf, ...]:
    """The arrays of a :class:`FlatBuffers` (unwrapping containers such as nnx variables)."""
    return tuple(jnp.asarray(b[...] if hasattr(b, "get_value") else b) for b in flat.buffers)
