"""When the fused kernel applies: the options it supports and the plan it runs.

:data:`SUPPORTED` lists every :class:`adamx.AdamSpec` option the kernel implements, with
the values it takes. An option that is not listed (a new one) makes :func:`plan` fall
back to the reference step whenever it differs from its default, with a reason that
names it (``adamx.fused.why_not``); ``tests/test_performance_paths.py`` checks that every
spec field is either listed or falls back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _checks, _quantize, _state, _tree
from adamx._flat import FlatBuffers
from adamx._spec import AdamSpec
from adamx._state import AdamState, AnyAdamState, KahanAdamState
from adamx.fused import _build

PARAM_DTYPES = frozenset({jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})
MOMENT_DTYPES = frozenset({jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)})
ACC_DTYPES = MOMENT_DTYPES


def _any(value: Any) -> str | None:
    return None


def _moment_dtype(value: Any) -> str | None:
    if value is None or jnp.dtype(value) in MOMENT_DTYPES:
        return None
    return f"unsupported moment dtypes ({jnp.dtype(value).name}; the kernel keeps float32 or bfloat16)"


def _acc_dtype(value: Any) -> str | None:
    if value is None or jnp.dtype(value) in ACC_DTYPES:
        return None
    return f"unsupported accumulator dtype ({jnp.dtype(value).name}; the kernel keeps float32 or bfloat16)"


# Every spec option the kernel implements: a check of its value (``None``: supported).
SUPPORTED: dict[str, Callable[[Any], str | None]] = {
    "learning_rate": _any,
    "beta_1": _any,
    "beta_2": _any,
    "epsilon": _any,
    "amsgrad": _any,
    "weight_decay": _any,
    "clipnorm": _any,
    "clipvalue": _any,
    "global_clipnorm": _any,
    "use_ema": _any,
    "ema_momentum": _any,
    "ema_overwrite_frequency": _any,
    "loss_scale_factor": _any,
    "gradient_accumulation_steps": _any,
    "exclude_from_weight_decay": _any,
    "weight_decay_mask": _any,
    "mu_dtype": _moment_dtype,
    "nu_dtype": _moment_dtype,
    "param_rounding": _any,
    "seed": _any,
    "acc_dtype": _acc_dtype,
    "flat_state": _any,
    "quantize_moments": _any,
    "quantize_block_size": _any,
    "quantize_min_size": _any,
    "quantize_mask": _any,
    "name": _any,
}


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


class Plan(NamedTuple):
    """What the kernel gets: the leaves, the state (per-leaf lists, or single flat buffers)."""

    spec: AdamSpec
    grads: list[Any]
    params: list[Any]
    treedef: Any
    mu: Any  # tree state: list per leaf; flat state: one 1-D buffer
    nu: Any
    nu_max: Any  # None when off
    acc: Any
    ema: Any
    offsets: np.ndarray | None  # flat state: each leaf's offset in the buffers; tree state: None
    quantized: list[bool] | None = None  # tree state: which leaves hold 8-bit mu/nu/nu_max (QuantizedArray)
    comp: Any = None  # param_rounding="kahan": the compensation (like mu); else None
    # flat state with 8-bit leaves: the kernel runs on per-leaf views; this packs the new
    # (tree) state back into flat buffers. None otherwise.
    repack: Callable[[Any], Any] | None = None


def is_sharded(x: Any) -> bool:
    """True when ``x`` may be split over devices: the kernel sees one device's buffers.

    Concrete arrays: on more than one device. While tracing: the abstract mesh of the
    value has a non-manual axis of size > 1 (jit over sharded or replicated inputs);
    inside ``shard_map`` (manual axes) each shard is a plain local array, which is fine.
    """
    if not isinstance(x, jax.core.Tracer):
        sh = getattr(x, "sharding", None)
        if sh is None:
            return False
        try:
            return len(sh.device_set) > 1
        except Exception:  # noqa: BLE001
            return True
    try:
        mesh = jax.typeof(x).sharding.mesh
        sizes = dict(mesh.shape)
        types = tuple(mesh.axis_types)
    except Exception:  # noqa: BLE001 - no sharding information: a plain single-device value
        return False
    return any(size > 1 and "manual" not in str(t).lower() for size, t in zip(sizes.values(), types))


def _leaf_dtype_problem(g: Any, p: Any) -> str | None:
    pd, gd = jnp.dtype(jnp.result_type(p)), jnp.dtype(g.dtype)
    if pd not in PARAM_DTYPES or gd not in (pd, jnp.dtype(jnp.float32)):
        return f"unsupported dtypes (params {pd}, grads {gd})"
    return None


def plan(tx: Any, grads: Any, state: Any, params: Any) -> tuple[str | None, Plan | None]:
    """``(None, plan)`` when the fused kernel applies, else ``(reason, None)``."""
    spec = getattr(tx, "spec", None)
    if not isinstance(spec, AdamSpec) or not isinstance(state, (AdamState, KahanAdamState)):
        if isinstance(spec, AdamSpec):
            _checks.check_state(spec, state, params)  # raises: a wrong state is an error, not a fallback
        return "not an adamx.adam optimizer and its AdamState", None
    _checks.check_state(spec, state, params)
    reason = unsupported_option(spec)
    if not reason and spec.quantize_moments and (spec.param_rounding != "nearest" or spec.acc_dtype is not None):
        reason = "option `param_rounding`/`acc_dtype` with quantize_moments: the 8-bit kernel rounds to nearest"
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
    spec: AdamSpec, state: AnyAdamState, g_l: list, p_l: list, treedef: Any, params: Any
) -> tuple[str | None, Plan | None]:
    """Flat state with 8-bit leaves: the tree plan on per-leaf views of the flat buffers (slices
    in, the new state packed back: copies the tree layout does not make), then repacked."""
    as_tree, repack = _state.tree_views(spec, state, params)
    reason, pl = _plan_tree(spec, as_tree, g_l, p_l, treedef)
    if pl is None:
        return reason, None
    return None, pl._replace(repack=repack)


def _plan_tree(
    spec: AdamSpec, state: AnyAdamState, g_l: list, p_l: list, treedef: Any
) -> tuple[str | None, Plan | None]:
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
    return None, Plan(spec, g_l, p_l, treedef, mu_l, nu_l, nm_l, acc_l, ema_l, None, quantized, comp_l)


def _as_layouts(spec: AdamSpec, xs: list, p_l: list) -> list:
    """8-bit leaves in today's layout (:func:`adamx._quantize.as_layout`); other leaves as they are."""
    return [
        _quantize.as_layout(x, jnp.shape(p), spec.quantize_block_size) if isinstance(x, _quantize.QuantizedArray) else x
        for x, p in zip(xs, p_l)
    ]


def _quantized_leaf_problem(spec: AdamSpec, g: Any, p: Any, m: Any, v: Any, vm: Any) -> str | None:
    """Why the kernel cannot take a leaf with 8-bit moments (codes u8 like p, scales f32 of
    :func:`adamx._quantize.scale_shape`), or ``None``."""
    shape = tuple(jnp.shape(p))
    ss = _quantize.scale_shape(shape, spec.quantize_block_size)
    for x in (m, v) + ((vm,) if spec.amsgrad else ()):
        if not isinstance(x, _quantize.QuantizedArray):
            return "optimizer state does not match params (mu is 8-bit, nu or nu_max is not)"
        c, sc = x
        if jnp.dtype(c.dtype) != jnp.dtype(jnp.uint8) or tuple(c.shape) != shape:
            return "8-bit optimizer state does not match params (codes)"
        if jnp.dtype(sc.dtype) != jnp.dtype(jnp.float32) or tuple(sc.shape) != ss:
            return "8-bit optimizer state does not match params (scales; another quantize_block_size?)"
        if is_sharded(c) or is_sharded(sc):
            return "arrays are sharded over several devices"
    if is_sharded(p) or is_sharded(g):
        return "arrays are sharded over several devices"
    return None


def _plan_flat(
    spec: AdamSpec, state: AnyAdamState, g_l: list, p_l: list, treedef: Any
) -> tuple[str | None, Plan | None]:
    """The plan for ``flat_state=True``: each state field one 1-D buffer, leaves at offsets."""
    f32 = jnp.dtype(jnp.float32)
    sizes = [int(np.prod(jnp.shape(p), dtype=np.int64)) for p in p_l]
    total = int(sum(sizes))
    fields: dict[str, Any] = {}
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
    if jnp.dtype(mu.dtype) not in MOMENT_DTYPES or jnp.dtype(nu.dtype) not in MOMENT_DTYPES:
        return f"unsupported moment dtypes ({mu.dtype}, {nu.dtype})", None
    if fields["nu_max"] is not None and fields["nu_max"].dtype != nu.dtype:
        return "optimizer state dtypes or shapes are not the expected ones", None
    pds = {jnp.dtype(jnp.result_type(p)) for p in p_l}
    want = {"ema": {f32}, "acc": {spec.state_dtype("acc", d) for d in pds}, "comp": pds}
    for name in ("acc", "ema", "comp"):
        if fields[name] is not None and {jnp.dtype(fields[name].dtype)} != want[name]:
            return "optimizer state dtypes or shapes are not the expected ones", None
    for g, p in zip(g_l, p_l):
        reason = _leaf_dtype_problem(g, p)
        if reason:
            return reason, None
        if is_sharded(p) or is_sharded(g):
            return "arrays are sharded over several devices", None
    if any(is_sharded(b) for b in fields.values() if b is not None):
        return "arrays are sharded over several devices", None
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64) if sizes else None
    plan = Plan(
        spec, g_l, p_l, treedef, mu, nu, fields["nu_max"], fields["acc"], fields["ema"], offsets, comp=fields["comp"]
    )
    return None, plan
