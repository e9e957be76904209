"""Checks of the inputs of a step: params leaves and a state against the spec.

``update`` and the fused ``apply_gradients`` call :func:`check_state` first, so a state
built for other params, other options (``amsgrad``, ``use_ema``, accumulation, flat vs
tree) or another optimizer is refused with an error naming the state field and what was
expected, never used for a silently different step. :func:`check_params` runs in
``init``: it refuses params leaves adamx cannot train with the options given, naming the
leaf path. Everything here reads only shapes, dtypes and tree structure (free under jit).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _codecs, _flat, _quantize, _tree
from adamx._spec import STATE_FIELDS, AdamSpec, StateField
from adamx._state import QUANTIZED_FIELDS, AdamState, AnyAdamState, KahanAdamState, layout
from adamx._types import Leaf

# The option that switches each optional state field on.
_OPTION_OF = {
    "nu_max": "amsgrad",
    "acc": "gradient_accumulation_steps",
    "ema": "use_ema",
}
_REBUILD = "build the state with this optimizer's `init` (or drop/add the field with `state._replace`)"


def _option_text(spec: AdamSpec, field: str) -> str:
    opt = _OPTION_OF.get(field)
    return "" if opt is None else f" ({opt}={getattr(spec, opt)!r})"


def _shape_dtype(x: Leaf) -> tuple[tuple[int, ...], Leaf] | None:
    """``(shape, dtype)`` of an array-like leaf (also of containers such as nnx variables)."""
    if hasattr(x, "get_value"):
        x = x[...]
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(x, (bool, int, float, complex)):
            return (), jnp.result_type(x)
        return None
    return tuple(shape), jnp.dtype(dtype)


def is_trainable(dtype: Leaf) -> bool:
    """Floating or complex leaves are trained; integer and bool leaves are left alone."""
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.inexact))


def check_params(spec: AdamSpec, params: Leaf) -> None:
    """Refuse params leaves the options cannot handle, naming the leaf path.

    Complex leaves follow optax's convention (complex first moment, real second moment of
    ``|g|^2``): a real ``mu_dtype`` cannot hold their first moment, and ``clipvalue``
    (which clips real values) has no meaning for them.
    """
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        sd = _shape_dtype(p)
        if sd is None:
            raise ValueError(
                f"params leaf at '{_tree.path_str(path)}' is a {type(p).__name__}, not an array or a number."
            )
        if jnp.issubdtype(sd[1], jnp.complexfloating):
            where = f"params leaf at '{_tree.path_str(path)}' is {sd[1].name}"
            if spec.mu_dtype is not None:
                raise ValueError(
                    f"{where}: `mu_dtype={jnp.dtype(spec.mu_dtype).name}` cannot hold its complex first moment "
                    "(leave mu_dtype=None for complex params)."
                )
            if spec.clipvalue is not None:
                raise ValueError(f"{where}: `clipvalue` clips real values; use clipnorm or global_clipnorm.")


def check_state(spec: AdamSpec, state: Leaf, params: Leaf, grads: Leaf = None) -> None:
    """Raise ``ValueError`` naming the state field unless ``state`` is this spec's state for ``params``.

    Checks the state's type, which fields are set (``spec.fields_on``), tree vs flat
    buffers, and each field's tree structure, shapes and dtypes (``spec.state_dtype``).
    Without params (tree state) the fields are checked against ``mu``.
    """
    if not isinstance(state, (AdamState, KahanAdamState)):
        raise ValueError(
            f"`state` is a {type(state).__name__}, not the AdamState of adamx.adam: it was built by another "
            f"optimizer; {_REBUILD}."
        )
    if isinstance(state, KahanAdamState) != (spec.param_rounding == "kahan"):
        want = "KahanAdamState" if spec.param_rounding == "kahan" else "AdamState"
        raise ValueError(
            f"`state` is a {type(state).__name__}, but this optimizer (param_rounding={spec.param_rounding!r}) "
            f"keeps a {want}; build the state with this optimizer's `init`."
        )
    c = _shape_dtype(state.count)
    if c is None or c[0] != () or not jnp.issubdtype(c[1], jnp.integer):
        raise ValueError(f"state field `count` must be a 0-d integer array, got {state.count!r}.")
    on = spec.fields_on
    for f in STATE_FIELDS:
        value = getattr(state, f)
        if f in on and value is None:
            raise ValueError(
                f"state field `{f}` is None, but this optimizer{_option_text(spec, f)} keeps it: the state "
                f"was built with other options; {_REBUILD}."
            )
        if f not in on and value is not None:
            raise ValueError(
                f"state field `{f}` is set, but this optimizer{_option_text(spec, f)} keeps none: the state "
                f"was built with other options; {_REBUILD}."
            )
        if value is not None and isinstance(value, _flat.FlatBuffers) != spec.flat_state:
            got, want = ("flat buffers", "a tree like params") if not spec.flat_state else ("a tree", "flat buffers")
            raise ValueError(
                f"state field `{f}` holds {got}, but this optimizer (flat_state={spec.flat_state}) keeps {want}; "
                f"{_REBUILD}."
            )
    if grads is not None and params is not None:
        check_grad_dtypes(grads, params)
    if spec.flat_state:
        if params is not None:
            _check_flat(spec, state, jax.tree_util.tree_leaves(params), spec.quantized_leaves(params))
        return
    ref = params if params is not None else state.mu
    _check_tree(spec, state, ref, params is not None)
    check_quantized(spec, state, ref, params)


def grad_dtype_error(path: str, grad_dtype: Leaf, param_dtype: Leaf) -> str:
    """The message refusing an integer, bool or ``float0`` gradient for a float params leaf."""
    return (
        f"grads at '{path}' is {jnp.dtype(grad_dtype).name} for a {jnp.dtype(param_dtype).name} params leaf: a "
        "float parameter needs a float gradient (an integer gradient would leave it frozen silently)."
    )


def check_grad_dtypes(grads: Leaf, params: Leaf) -> None:
    """Refuse a non-float gradient for a float params leaf, naming the path. Integer and bool
    params take any gradient (they are left alone); structure mismatches are reported later,
    by the step, with the first differing path."""
    treedef: Any = jax.tree_util.tree_structure(params)
    try:
        g_l = treedef.flatten_up_to(grads)
    except (ValueError, TypeError):
        return
    paths = None
    for i, (g, p) in enumerate(zip(g_l, treedef.flatten_up_to(params))):
        gsd, psd = _shape_dtype(g), _shape_dtype(p)
        if gsd is None or psd is None or not is_trainable(psd[1]) or is_trainable(gsd[1]):
            continue
        paths = paths or _tree.leaf_paths(params)
        raise ValueError(grad_dtype_error(paths[i], gsd[1], psd[1]))


def _check_tree(spec: AdamSpec, state: AnyAdamState, ref: Leaf, have_params: bool) -> None:
    treedef: Any = jax.tree_util.tree_structure(ref)
    paths = None
    ref_l = treedef.flatten_up_to(ref)
    for f in spec.fields_on:
        value = getattr(state, f)
        try:
            leaves = treedef.flatten_up_to(value)
        except (ValueError, TypeError):
            raise ValueError(
                f"state field `{f}` does not match params: {_tree._first_mismatch(value, ref)} "
                f"(the state was built for other params; {_REBUILD})."
            ) from None
        for i, (x, p) in enumerate(zip(leaves, ref_l)):
            sx, sp = _shape_dtype(x), _shape_dtype(p)
            if sx is None or sp is None:
                continue
            paths = paths or _tree.leaf_paths(ref)
            if sx[0] != sp[0]:
                raise ValueError(
                    f"state field `{f}` at '{paths[i]}' has shape {sx[0]}, params have shape {sp[0]} "
                    f"(the state was built for other params; {_REBUILD})."
                )
            if have_params:
                want = spec.state_dtype(f, sp[1])
                if sx[1] != want:
                    raise ValueError(
                        f"state field `{f}` at '{paths[i]}' is {sx[1].name}, this optimizer keeps {want.name} "
                        f"for {sp[1].name} params (mu_dtype={_name(spec.mu_dtype)}, "
                        f"nu_dtype={_name(spec.nu_dtype)}); {_REBUILD}."
                    )


def check_quantized(spec: AdamSpec, state: AnyAdamState, ref: Leaf, params: Leaf) -> None:
    """Tree state: each moment leaf is coded (a :class:`adamx.QuantizedArray`) exactly where this
    optimizer quantizes (``quantize_moments``, ``moment_format``, ``quantize_min_size``,
    ``quantize_mask``), with the codes and scales its codec gives; a ``ValueError`` naming field,
    path and option (and the format the state seems to hold) otherwise. Without params (and
    ``quantize_moments`` on) it cannot tell: skipped."""
    if params is None and spec.quantize_moments:
        return
    treedef: Any = jax.tree_util.tree_structure(ref)
    want = spec.quantized_leaves(params) if params is not None else [False] * treedef.num_leaves
    opts = (
        f"quantize_moments={spec.quantize_moments}, moment_format={spec.moment_format!r}, "
        f"quantize_min_size={spec.quantize_min_size}, quantize_block_size={spec.quantize_block_size}"
    )
    paths = _tree.leaf_paths(ref)
    for f in (f for f in QUANTIZED_FIELDS if f in spec.fields_on):
        for path, x, q, p in zip(paths, treedef.flatten_up_to(getattr(state, f)), want, treedef.flatten_up_to(ref)):
            if isinstance(x, _quantize.QuantizedArray) != q:
                got, keeps = ("quantized (a QuantizedArray)", "float") if not q else ("float", "quantized")
                raise ValueError(
                    f"state field `{f}` at '{path}' is {got}, this optimizer ({opts}) keeps it {keeps}; {_REBUILD}."
                )
            if q:
                _check_blocks(spec, f, path, x, p)


def _layout(x: Leaf) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(int(d) for d in jnp.shape(a)), jnp.dtype(a.dtype).name) for a in (x.codes, x.scales)]


def has_layout(x: Leaf, codec: _codecs.MomentCodec, shape: tuple[int, ...]) -> bool:
    """Whether the coded moment ``x`` has the codes and scales ``codec`` keeps for a leaf of ``shape``
    (today's layout: not the first 8-bit layout, which only the XLA step converts)."""
    return _layout(x) == _layout(codec.state_shapes(shape))


def _format_of(spec: AdamSpec, field: StateField, shape: tuple[int, ...], got: list[Leaf]) -> str:
    """`` (it looks like moment_format='fp8')`` when another registered format has the layout ``got``."""
    for fmt in _codecs.FORMATS:
        if fmt == spec.moment_format:
            continue
        c = _codecs.codec(fmt, field, spec.quantize_block_size, 1)
        if _layout(c.state_shapes(shape)) == got:
            return f" (it looks like moment_format={fmt!r})"
    return ""


def _check_blocks(spec: AdamSpec, field: StateField, path: str, x: Leaf, p: Leaf) -> None:
    """Codes and scales of this spec's codec (``state_shapes``); for ``dynamic8`` also the first 8-bit
    layout of the same blocks (1-D codes and scales), which the step converts."""
    shape = tuple(int(d) for d in jnp.shape(p))
    n = int(np.prod(shape, dtype=np.int64))
    want = _layout(spec.codec(field).state_shapes(shape))
    got = _layout(x)
    if got == want:
        return
    if spec.moment_format == "dynamic8":
        nb = int(np.prod(want[1][0], dtype=np.int64))
        if got == [((n,), "uint8"), ((nb,), "float32")]:
            return
    raise ValueError(
        f"state field `{field}` at '{path}' holds {'8-bit ' if spec.moment_format == 'dynamic8' else ''}codes and "
        f"scales {got}, this optimizer "
        f"(moment_format={spec.moment_format!r}, quantize_block_size={spec.quantize_block_size}) needs {want}"
        f"{_format_of(spec, field, shape, got)}: the state was built with another moment format or block size, "
        f"or for other params; {_REBUILD}."
    )


def _check_flat(spec: AdamSpec, state: AnyAdamState, leaves: list[Leaf], quantized: list[bool]) -> None:
    for f in spec.fields_on:
        lay = layout(spec, f, leaves, quantized)
        bufs = _flat.buffers_of(getattr(state, f))
        got = [(int(b.shape[0]) if b.ndim == 1 else tuple(b.shape), jnp.dtype(b.dtype).name) for b in bufs]
        want = [(n, jnp.dtype(dt).name) for n, dt in zip(lay.sizes, lay.buffer_dtypes)]
        if got != want:
            raise ValueError(
                f"flat state field `{f}` does not match params: it has buffers (size, dtype) {got}, this "
                f"optimizer needs {want} (the state was built for other params or options; {_REBUILD})."
            )


def _name(dtype: Leaf) -> str:
    return "None" if dtype is None else np.dtype(dtype).name
