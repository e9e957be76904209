"""When the fused kernel applies: the options it supports and the plan it runs.

Each :class:`adamx.AdamSpec` field decides in its :class:`adamx._spec.Option` what the
kernel does with it (``fused=``): :data:`SUPPORTED` is built from those decisions, a check
per field of the values the kernel takes. A field the kernel does not implement
(``fused="fallback"``, or a field missing from the table) makes :func:`plan` fall back
to the reference step whenever it differs from its default, with a reason that names it
(``adamx.fused.why_not``). ``tests/test_spec_options.py`` checks that every field decides.
The plan itself is typed: a :class:`TreePlan` (per-leaf lists) or a :class:`FlatPlan`
(one buffer per state field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _checks, _codecs, _quantize, _state, _tree
from adamx._flat import FlatBuffers
from adamx._spec import AdamSpec, FusedSupport, StateField, options_table
from adamx._state import AdamState, AnyAdamState, KahanAdamState
from adamx._tree import is_sharded as is_sharded
from adamx._types import ArrayLike, DType, PyTree
from adamx.fused import _build

PARAM_DTYPES = frozenset({jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})
MOMENT_DTYPES = frozenset({jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)})
ACC_DTYPES = MOMENT_DTYPES

OptionCheck = Callable[[object], "str | None"]
# A leaf's moment in a tree plan: a float array, or 8-bit codes and block scales.
LeafMoment: TypeAlias = "jax.Array | _quantize.QuantizedArray"


def _any(value: object) -> str | None:
    return None


def _moment_dtype(value: DType | None) -> str | None:
    if value is None or jnp.dtype(value) in MOMENT_DTYPES:
        return None
    return f"unsupported moment dtypes ({jnp.dtype(value).name}; the kernel keeps float32 or bfloat16)"


def _acc_dtype(value: DType | None) -> str | None:
    if value is None or jnp.dtype(value) in ACC_DTYPES:
        return None
    return f"unsupported accumulator dtype ({jnp.dtype(value).name}; the kernel keeps float32 or bfloat16)"


# The codecs' kernel tags the fused kernel runs: dynamic8 (the 8-bit call), fp8 and 4bit (the low-bit call).
KERNEL_FORMATS = frozenset({"dynamic8", "fp8", "4bit"})


def _moment_format(value: str) -> str | None:
    if _codecs.codec(value, "mu", 256, 4096).kernel in KERNEL_FORMATS:
        return None
    return (
        f"moment_format={value!r} has no fused kernel (only {', '.join(sorted(KERNEL_FORMATS))}); "
        "the reference step runs it"
    )


# What each decision of the spec's table means here; "fallback" fields are left out of SUPPORTED.
DECISIONS: dict[FusedSupport, OptionCheck | None] = {
    "any": _any,
    "moment_dtype": _moment_dtype,  # type: ignore[dict-item]
    "acc_dtype": _acc_dtype,  # type: ignore[dict-item]
    "moment_format": _moment_format,  # type: ignore[dict-item]
    "fallback": None,
}


def supported_options(table: dict[str, FusedSupport]) -> dict[str, OptionCheck]:
    """The check of every field the kernel implements, from each field's decision."""
    out: dict[str, OptionCheck] = {}
    for name, decision in table.items():
        check = DECISIONS[decision]
        if check is not None:
            out[name] = check
    return out


# Every spec option the kernel implements: a check of its value (``None``: supported).
SUPPORTED: dict[str, OptionCheck] = supported_options({k: o.fused for k, o in options_table().items()})


def unsupported_option(spec: AdamSpec) -> str | None:
    """Why the kernel cannot run ``spec``'s options, or ``None``."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        check = SUPPORTED.get(f.name)
        if check is None:
            if value is not f.default and value != f.default:
                return f"option `{f.name}={value!r}` is not supported by the fused kernel"
        else:
            why = check(value)
            if why is not None:
                return f"option `{f.name}`: {why}"
    return None


class TreePlan(NamedTuple):
    """What the kernel gets for tree state: per-leaf lists (grads, params and each state field)."""

    spec: AdamSpec
    grads: list[jax.Array]
    params: list[ArrayLike]
    treedef: jax.tree_util.PyTreeDef
    mu: list[LeafMoment]
    nu: list[LeafMoment]
    nu_max: list[LeafMoment] | None  # None when off (also acc, ema, comp)
    acc: list[jax.Array] | None
    ema: list[jax.Array] | None
    comp: list[jax.Array] | None  # param_rounding="kahan": the compensation
    quantized: list[bool]  # which leaves hold coded mu/nu/nu_max (QuantizedArray, spec.moment_format)
    # flat state with 8-bit leaves: the kernel runs on per-leaf views; this packs the new
    # (tree) state back into flat buffers. None otherwise.
    repack: Callable[[AnyAdamState], AnyAdamState] | None = None


class FlatPlan(NamedTuple):
    """What the kernel gets for ``flat_state=True``: per-leaf grads and params, one 1-D buffer per field."""

    spec: AdamSpec
    grads: list[jax.Array]
    params: list[ArrayLike]
    treedef: jax.tree_util.PyTreeDef
    mu: jax.Array
    nu: jax.Array
    nu_max: jax.Array | None  # None when off (also acc, ema, comp)
    acc: jax.Array | None
    ema: jax.Array | None
    comp: jax.Array | None
    offsets: np.ndarray  # each leaf's offset in the buffers


Plan: TypeAlias = "TreePlan | FlatPlan"
Planned: TypeAlias = "tuple[str | None, Plan | None]"


def _leaf_dtype_problem(g: jax.Array, p: ArrayLike) -> str | None:
    pd, gd = jnp.dtype(jnp.result_type(p)), jnp.dtype(g.dtype)
    if pd not in PARAM_DTYPES or gd not in (pd, jnp.dtype(jnp.float32)):
        return f"unsupported dtypes (params {pd}, grads {gd})"
    return None


def plan(tx: object, grads: PyTree, state: PyTree, params: PyTree) -> Planned:
    """``(None, plan)`` when the fused kernel applies, else ``(reason, None)``."""
    spec = getattr(tx, "spec", None)
    if not isinstance(spec, AdamSpec) or not isinstance(state, (AdamState, KahanAdamState)):
        if isinstance(spec, AdamSpec):
            _checks.check_state(spec, state, params)  # raises: a wrong state is an error, not a fallback
        return "not an adamx.adam optimizer and its AdamState", None
    _checks.check_state(spec, state, params)
    reason = unsupported_option(spec)
    if not reason and spec.quantize_moments and (spec.param_rounding != "nearest" or spec.acc_dtype is not None):
        reason = "option `param_rounding`/`acc_dtype` with quantize_moments: the quantized kernels round to nearest"
    if reason:
        return reason, None
    if params is None:
        return "params are required", None
    if jax.default_backend() != "cpu":
        return f"backend is {jax.default_backend()}, the kernel is CPU only", None
    if not _build.available():
        return f"kernel unavailable: {_build.status()['error']}", None
    g_l, p_l, treedef = _tree.align_grads(grads, params)
    if any(g is None for g in g_l):
        return "a gradient is None", None
    kahan_state = isinstance(state, KahanAdamState)
    if (state.nu_max is not None) != spec.amsgrad or (state.ema is not None) != spec.use_ema:
        return "optimizer state does not match the optimizer's options", None
    if kahan_state != (spec.param_rounding == "kahan") or (state.acc is not None) != (spec.window is not None):
        return "optimizer state does not match the optimizer's options", None
    if isinstance(state.mu, FlatBuffers):
        if any(spec.quantized_leaves(params)):
            return _plan_flat_8bit(spec, state, g_l, p_l, treedef, params)
        return _plan_flat(spec, state, g_l, p_l, treedef)
    return _plan_tree(spec, state, g_l, p_l, treedef)


def _plan_flat_8bit(
    spec: AdamSpec,
    state: AnyAdamState,
    g_l: list[jax.Array],
    p_l: list[ArrayLike],
    treedef: jax.tree_util.PyTreeDef,
    params: PyTree,
) -> Planned:
    """Flat state with 8-bit leaves: the tree plan on per-leaf views of the flat buffers (slices
    in, the new state packed back: copies the tree layout does not make), then repacked."""
    as_tree, repack = _state.tree_views(spec, state, params)
    reason, pl = _plan_tree(spec, as_tree, g_l, p_l, treedef)
    if pl is None:
        return reason, None
    return None, pl._replace(repack=repack)


def _plan_tree(
    spec: AdamSpec, state: AnyAdamState, g_l: list[jax.Array], p_l: list[ArrayLike], treedef: jax.tree_util.PyTreeDef
) -> tuple[str | None, TreePlan | None]:
    flat = treedef.flatten_up_to
    try:
        mu_l, nu_l = flat(state.mu), flat(state.nu)
        nm_l = flat(state.nu_max) if state.nu_max is not None else None
        acc_l = flat(state.acc) if state.acc is not None else None
        ema_l = flat(state.ema) if state.ema is not None else None
        comp_l = flat(state.comp) if isinstance(state, KahanAdamState) else None
    except (ValueError, TypeError):
        return "optimizer state does not match params", None
    f32 = jnp.dtype(jnp.float32)
    quantized = [isinstance(m, _quantize.QuantizedArray) for m in mu_l]
    try:  # a state of the first 8-bit layout (1-D codes and scales) goes on in today's layout
        mu_l, nu_l = _as_layouts(spec, mu_l, p_l), _as_layouts(spec, nu_l, p_l)
        nm_l = _as_layouts(spec, nm_l, p_l) if nm_l is not None else None
    except ValueError:
        return "8-bit optimizer state does not match params (codes or scales; another quantize_block_size?)", None
    for i, (g, p, m, v) in enumerate(zip(g_l, p_l, mu_l, nu_l)):
        reason = _leaf_dtype_problem(g, p)
        if reason:
            return reason, None
        if quantized[i]:
            reason = _quantized_leaf_problem(spec, g, p, m, v, nm_l[i] if nm_l is not None else None)
            if reason:
                return reason, None
            for lst in (acc_l, ema_l):
                if lst is not None and (jnp.dtype(lst[i].dtype) != f32 or tuple(lst[i].shape) != tuple(jnp.shape(p))):
                    return "optimizer state dtypes or shapes are not the expected ones", None
            continue
        if isinstance(v, _quantize.QuantizedArray) or (
            nm_l is not None and isinstance(nm_l[i], _quantize.QuantizedArray)
        ):
            return "optimizer state does not match params (mu is float, nu is 8-bit)", None
        if jnp.dtype(m.dtype) not in MOMENT_DTYPES or jnp.dtype(v.dtype) not in MOMENT_DTYPES:
            return f"unsupported moment dtypes ({m.dtype}, {v.dtype})", None
        shape = tuple(jnp.shape(p))
        if any(tuple(x.shape) != shape for x in (m, v)):
            return "optimizer state shapes do not match params", None
        pd = jnp.dtype(jnp.result_type(p))
        for lst, want in ((nm_l, v.dtype), (acc_l, spec.state_dtype("acc", pd)), (ema_l, f32), (comp_l, pd)):
            if lst is not None and (jnp.dtype(lst[i].dtype) != jnp.dtype(want) or tuple(lst[i].shape) != shape):
                return "optimizer state dtypes or shapes are not the expected ones", None
        if any(is_sharded(x) for x in (p, g, m, v)):
            return "arrays are sharded over several devices", None
    return None, TreePlan(spec, g_l, p_l, treedef, mu_l, nu_l, nm_l, acc_l, ema_l, comp_l, quantized)


def _as_layouts(spec: AdamSpec, xs: list, p_l: list) -> list:
    """8-bit leaves in today's layout (:func:`adamx._quantize.as_layout`); other leaves (and other
    formats, which have one layout) as they are."""
    if spec.moment_format != "dynamic8":
        return xs
    return [
        _quantize.as_layout(x, jnp.shape(p), spec.quantize_block_size) if isinstance(x, _quantize.QuantizedArray) else x
        for x, p in zip(xs, p_l)
    ]


def _quantized_leaf_problem(
    spec: AdamSpec, g: jax.Array, p: ArrayLike, m: LeafMoment, v: LeafMoment, vm: LeafMoment | None
) -> str | None:
    """Why the kernel cannot take a leaf with coded moments (codes and scales of the layout of
    ``spec.codec(field).state_shapes``: 8-bit codes u8 like p with scales of
    :func:`adamx._quantize.scale_shape`; fp8/4bit as :mod:`adamx._codecs` says), or ``None``."""
    shape = tuple(jnp.shape(p))
    fmt = spec.moment_format
    fields: tuple[StateField, ...] = ("mu", "nu", "nu_max")
    for field, x in zip(fields, (m, v) + ((vm,) if spec.amsgrad else ())):
        if not isinstance(x, _quantize.QuantizedArray):
            return "optimizer state does not match params (mu is quantized, nu or nu_max is not)"
        c, sc = x
        want = spec.codec(field).state_shapes(shape)
        if jnp.dtype(c.dtype) != jnp.dtype(want.codes.dtype) or tuple(c.shape) != tuple(want.codes.shape):
            return f"{fmt} optimizer state does not match params (codes)"
        if jnp.dtype(sc.dtype) != jnp.dtype(want.scales.dtype) or tuple(sc.shape) != tuple(want.scales.shape):
            return f"{fmt} optimizer state does not match params (scales; another quantize_block_size?)"
        if is_sharded(c) or is_sharded(sc):
            return "arrays are sharded over several devices"
    if is_sharded(p) or is_sharded(g):
        return "arrays are sharded over several devices"
    return None


def _plan_flat(
    spec: AdamSpec, state: AnyAdamState, g_l: list[jax.Array], p_l: list[ArrayLike], treedef: jax.tree_util.PyTreeDef
) -> Planned:
    """The plan for ``flat_state=True``: each state field one 1-D buffer, leaves at offsets."""
    f32 = jnp.dtype(jnp.float32)
    sizes = [int(np.prod(jnp.shape(p), dtype=np.int64)) for p in p_l]
    total = int(sum(sizes))
    fields: dict[str, jax.Array | None] = {}
    for name in ("mu", "nu", "nu_max", "acc", "ema", "comp"):
        field = getattr(state, name, None)
        if field is None:
            fields[name] = None
            continue
        if not isinstance(field, FlatBuffers) or len(field.buffers) != 1:
            return "flat state with several dtype groups", None
        (buf,) = field.buffers
        if tuple(buf.shape) != (total,):
            return "flat optimizer state does not match params", None
        fields[name] = buf
    mu, nu = fields["mu"], fields["nu"]
    if mu is None or nu is None:
        return "optimizer state does not match the optimizer's options", None
    if jnp.dtype(mu.dtype) not in MOMENT_DTYPES or jnp.dtype(nu.dtype) not in MOMENT_DTYPES:
        return f"unsupported moment dtypes ({mu.dtype}, {nu.dtype})", None
    if fields["nu_max"] is not None and fields["nu_max"].dtype != nu.dtype:
        return "optimizer state dtypes or shapes are not the expected ones", None
    pds = {jnp.dtype(jnp.result_type(p)) for p in p_l}
    want = {"ema": {f32}, "acc": {spec.state_dtype("acc", d) for d in pds}, "comp": pds}
    for name in ("acc", "ema", "comp"):
        extra = fields[name]
        if extra is not None and {jnp.dtype(extra.dtype)} != want[name]:
            return "optimizer state dtypes or shapes are not the expected ones", None
    for g, p in zip(g_l, p_l):
        reason = _leaf_dtype_problem(g, p)
        if reason:
            return reason, None
        if is_sharded(p) or is_sharded(g):
            return "arrays are sharded over several devices", None
    if any(is_sharded(b) for b in fields.values() if b is not None):
        return "arrays are sharded over several devices", None
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64)
    nm, acc, ema, comp = fields["nu_max"], fields["acc"], fields["ema"], fields["comp"]
    return None, FlatPlan(spec, g_l, p_l, treedef, mu, nu, nm, acc, ema, comp, offsets)
