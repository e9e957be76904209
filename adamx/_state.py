"""``AdamState``: the state of ``adamx.adam``, its checkpoint format, and how it is allocated.

The per-parameter fields are trees like params, or with ``flat_state=True`` one
:class:`adamx.FlatBuffers` each (one 1-D buffer per dtype, params' leaves in tree order;
8-bit leaves' codes in a ``uint8`` buffer and their scales in one more, see adamx/_flat.py).
Which fields are on and their dtypes come from the :class:`adamx.AdamSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamx import _flat, _quantize, _tree
from adamx._spec import STATE_FIELDS, AdamSpec, StateField
from adamx._types import Leaf


class AdamState(NamedTuple):
    """State of :func:`adamx.adam` / :func:`adamx.adamw`. Field names are the checkpoint format.

    Optional features keep ``None`` in their field when off, so the tuple always has
    these six fields.
    """

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; update() calls so far (micro-steps under accumulation), saturating
    # With flat_state=True each of the five buffer fields is an adamx.FlatBuffers instead of a tree.
    # With quantize_moments=True a quantized leaf of mu, nu, nu_max is an adamx.QuantizedArray (codes, scales).
    mu: optax.Updates  # first moment, like params; mu_dtype (default float32 for f32/bf16/f16 params)
    nu: optax.Updates  # second moment, like params; nu_dtype (default as mu)
    nu_max: optax.Updates | None  # amsgrad: running max of raw nu, else None
    acc: optax.Updates | None  # gradient_accumulation_steps: sum of this window's micro-step grads, else None
    ema: optax.Params | None  # use_ema: moving average of params (float32 at least), else None


class KahanAdamState(NamedTuple):
    """State of :func:`adamx.adam` with ``param_rounding="kahan"``: :class:`AdamState`'s six
    fields and ``comp``. Field names are the checkpoint format.

    A separate class, not a seventh ``AdamState`` field that is ``None`` when off: Orbax
    refuses to restore a checkpoint written with the six-field ``AdamState`` into a target
    with another field (``tests/test_param_rounding.py`` checks both).
    """

    count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32; as AdamState.count
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | None
    acc: optax.Updates | None
    ema: optax.Params | None
    comp: optax.Params  # like params, in each param's dtype: the rounding error the params still owe


AnyAdamState = AdamState | KahanAdamState


def make_state(spec: AdamSpec, count: jax.Array, fields: dict[str, Leaf]) -> Leaf:
    """The state class ``spec`` uses (:class:`KahanAdamState` for kahan rounding), from its fields."""
    base = {f: fields.get(f) for f in STATE_FIELDS}
    if spec.param_rounding == "kahan":
        return KahanAdamState(count=count, comp=fields["comp"], **base)
    return AdamState(count=count, **base)


def _buffer(spec: AdamSpec, field: StateField, p: Leaf) -> jax.Array:
    dt = spec.state_dtype(field, jnp.result_type(p))
    # the average starts as a fresh copy of params (never their own buffers: donation)
    return _tree.fresh_copy(p, dt) if field == "ema" else _tree.zeros_like(p, dt)


QUANTIZED_FIELDS: tuple[StateField, ...] = ("mu", "nu", "nu_max")


def code_map(field: StateField) -> Leaf:
    """The 8-bit code map of a quantized field: signed for ``mu``, unsigned for ``nu``/``nu_max``."""
    return _quantize.SIGNED_DYNAMIC_MAP if field == "mu" else _quantize.UNSIGNED_DYNAMIC_MAP


def _quantized_tree(spec: AdamSpec, field: StateField, params: optax.Params) -> Leaf:
    """A moment field with ``quantize_moments``: the codec's zero state (``spec.codec(field)``, in
    ``moment_format``) on the quantized leaves, zeros elsewhere."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    on = spec.quantized_leaves(params)
    c = spec.codec(field)
    out = [c.zeros(p) if q else _buffer(spec, field, p) for p, q in zip(leaves, on)]
    return jax.tree_util.tree_unflatten(treedef, out)


def init(spec: AdamSpec, params: optax.Params) -> AdamState:
    """The initial state: count 0, zero moments and accumulator, the average a copy of params."""
    on = spec.fields_on
    fields: dict[str, Leaf] = {f: None for f in on}
    if spec.flat_state:
        leaves, tdef = jax.tree_util.tree_flatten(params)
        treedef: Any = tdef
        quantized = spec.quantized_leaves(params)
        for f in on:
            lay = layout(spec, f, leaves, quantized)
            if lay.n_blocks:  # 8-bit leaves: their quantized zeros, packed
                fields[f] = _flat.pack(treedef.flatten_up_to(_quantized_tree(spec, f, params)), lay)
            else:
                fields[f] = _flat.pack(leaves, lay, fresh=True) if f == "ema" else _flat.zeros(lay)
    else:
        for f in on:
            if spec.quantize_moments and f in QUANTIZED_FIELDS:
                fields[f] = _quantized_tree(spec, f, params)
            else:
                fields[f] = jax.tree.map(lambda p, f=f: _buffer(spec, f, p), params)
    return make_state(spec, jnp.zeros([], jnp.int32), fields)


def layout(spec: AdamSpec, field: StateField, leaves: list[Leaf], quantized: list[bool] | None = None) -> _flat.Layout:
    """Where each leaf of params lives in the flat buffers of ``field``.

    ``quantized``: :meth:`AdamSpec.quantized_leaves` of the params (8-bit ``mu``/``nu``/``nu_max``
    leaves); ``None`` when no leaf is.
    """
    q = quantized if field in QUANTIZED_FIELDS else None
    return _flat.layout(leaves, lambda p: spec.state_dtype(field, jnp.result_type(p)), q, spec.quantize_block_size)


def tree_views(spec: AdamSpec, state: Leaf, params: optax.Params) -> tuple[Leaf, Callable[[Leaf], Leaf]]:
    """A flat state as tree state (each field the tree of its leaves' views of the flat buffers;
    an 8-bit leaf as a :class:`adamx.QuantizedArray`), and the function that packs a tree state
    of the same params back into flat buffers."""
    leaves, tdef = jax.tree_util.tree_flatten(params)
    treedef: Any = tdef
    quantized = spec.quantized_leaves(params)
    lays = {f: layout(spec, f, leaves, quantized) for f in spec.fields_on}
    views = {f: jax.tree_util.tree_unflatten(treedef, _flat.unpack(getattr(state, f), lay)) for f, lay in lays.items()}

    def repack(new: Leaf) -> Leaf:
        return new._replace(**{f: _flat.pack(treedef.flatten_up_to(getattr(new, f)), lay) for f, lay in lays.items()})

    return state._replace(**views), repack


def next_state(spec: AdamSpec, n: jax.Array, wrap: Leaf, fields: dict[str, Leaf]) -> Leaf:
    """The state after a step: each on field's leaves wrapped (as a tree or flat buffers)."""
    return make_state(spec, optax.safe_increment(n), {f: wrap(fields[f]) for f in spec.fields_on})
