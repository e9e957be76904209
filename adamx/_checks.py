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

from adamx import _flat, _tree
from adamx._spec import STATE_FIELDS, AdamSpec
from adamx._state import AdamState, AnyAdamState, KahanAdamState, layout

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


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], Any] | None:
    """``(shape, dtype)`` of an array-like leaf (also of containers such as nnx variables)."""
    if hasattr(x, "get_value"):
        x = x[...]
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(x, (bool, int, float, complex)):
            return (), jnp.result_type(x)
        return None
    return tuple(shape), jnp.dtype(dtype)


def is_trainable(dtype: Any) -> bool:
    """Floating or complex leaves are trained; integer and bool leaves are left alone."""
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.inexact))


def check_params(spec: AdamSpec, params: Any) -> None:
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


def check_state(spec: AdamSpec, state: Any, params: Any, grads: Any = None) -> None:
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
    if spec.flat_state:
        if params is not None:
            _check_flat(spec, state, jax.tree_util.tree_leaves(params), spec.quantized_leaves(params))
        return
    ref = params if params is not None else state.mu
    _check_tree(spec, state, ref, params is not None)


def _check_tree(spec: AdamSpec, state: AnyAdamState, ref: Any, have_params: bool) -> None:
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


def _check_flat(spec: AdamSpec, state: AnyAdamState, leaves: list[Any], quantized: list[bool]) -> None:
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


def _name(dtype: Any) -> str:
    return "None" if dtype is None else np.dtype(dtype).name
