"""The fused step's ``jax.ffi`` calls: one in-place pass over params, grads and state."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.interpreters import mlir

from adamx import _clipping, _decay, _lowbit, _rounding, _step
from adamx._flat import FlatBuffers
from adamx._quantize import QuantizedArray
from adamx._state import AnyAdamState, code_map, make_state
from adamx._types import ArrayLike, PyTree
from adamx.fused import _build
from adamx.fused._plan import FlatPlan, Plan, TreePlan

log = logging.getLogger("adamx")

# XLA's compile time grows faster than linearly with the operand count of one custom
# call; calls of about OPERANDS_PER_CALL operands keep it linear in the leaf count.
OPERANDS_PER_CALL = 64
# flat state: 2 operands per leaf; calls of 256 operands measured best (docs/performance.md)
FLAT_OPERANDS_PER_CALL = 256


ROUNDING_CODES = {"nearest": 0, "kahan": 1, "stochastic": 2}


class _Step(NamedTuple):
    """What every kernel call of one step shares: the scalars, clip denominators, decay flags, keys."""

    scal: jax.Array  # the Scalars as float32, then the dispatch hint
    denoms: jax.Array  # per leaf: the clipnorm denominator (1 without per-tensor clipping)
    keep: list[bool]  # per leaf: weight decay on
    keys: jax.Array  # per leaf: stochastic rounding's key (zeros for the other modes)
    attrs: dict[str, np.int64]  # the kernel's mode flags
    groups: list[range]  # the leaves of each call


def run(pl: Plan, state: AnyAdamState, params: PyTree) -> tuple[PyTree, AnyAdamState]:
    """One fused step: ``(new_params, new_state)``, the numbers of ``update`` + ``apply_updates``."""
    n = state.count
    if not pl.grads:
        return params, state._replace(count=optax.safe_increment(n))
    step = _prepare(pl, n, params)
    if isinstance(pl, FlatPlan):
        return _run_flat(pl, step, n)
    return _run_tree(pl, step, n)


def _scalar_vec(v: _step.Scalars) -> jax.Array:
    return jnp.stack([jnp.asarray(x).astype(jnp.float32) for x in v])


def _groups(pl: Plan) -> list[range]:
    """The leaves of each kernel call: XLA's compile time grows faster than linearly with the
    operand count of one custom call, so calls of a bounded operand count keep it linear."""
    L = len(pl.grads)
    state = (pl.nu_max, pl.acc, pl.ema, pl.comp)
    n_state = 2 + sum(x is not None for x in state)
    if isinstance(pl, FlatPlan):
        per_call = max(1, (FLAT_OPERANDS_PER_CALL - n_state) // 2)
    else:
        per_call = max(1, OPERANDS_PER_CALL // (2 + n_state))
    return [range(i, min(L, i + per_call)) for i in range(0, L, per_call)]


def _offsets(pl: Plan, grp: range) -> np.ndarray:
    return pl.offsets[grp.start : grp.stop] if isinstance(pl, FlatPlan) else np.zeros((0,), np.int64)


def _prepare(pl: Plan, n: jax.Array, params: PyTree) -> _Step:
    """The per-step values every call shares (the same ``_step.scalars`` as ``update``)."""
    spec, L = pl.spec, len(pl.grads)
    keep = _decay.decay_mask_leaves(params, spec.exclude, spec.weight_decay_mask) if spec.decay_on else [False] * L
    groups = _groups(pl)
    sc = _step.scalars(spec, n)
    denoms = jnp.ones((L,), jnp.float32)
    clip_mode = int(_step.CLIP_CODES[spec.clip_mode])
    if clip_mode in (1, 2):
        sumsq = jnp.concatenate([_sumsq(pl, grp, _scalar_vec(sc)) for grp in groups])
        if clip_mode == 1:  # Keras clipnorm: g * c / max(||g||, c), per tensor
            denoms = jnp.maximum(jnp.sqrt(sumsq), sc.clip_c)
        else:  # Keras global_clipnorm
            sc = sc._replace(clip_scale=_clipping.global_clip_scale(jnp.sqrt(jnp.sum(sumsq)), sc.clip_c))
    scal = _scalar_vec(sc)
    # PjRt:CPU runs a program whose HloCostAnalysis flop count is under 1000 inline on
    # the calling thread, without async dispatch; custom calls count 0 flops, so an
    # optimizer-only step would block Python. A 16x16 matmul on a runtime value (8192
    # flops, about a microsecond) makes the step count as real work. Its result is
    # passed to the kernel, which ignores it, so it is not removed.
    hint = jnp.full((16, 16), scal[0]) @ jnp.full((16, 16), scal[1])
    scal = jnp.concatenate([scal, hint[:1, 0] * 0.0])
    attrs = dict(
        ams=np.int64(pl.nu_max is not None),
        acc=np.int64(pl.acc is not None),
        ema=np.int64(pl.ema is not None),
        rounding=np.int64(ROUNDING_CODES[spec.param_rounding]),
    )
    # stochastic rounding's per-leaf keys (adamx._rounding); unused by the other modes
    keys = _rounding.leaf_keys(spec.seed, n, L) if spec.param_rounding == "stochastic" else jnp.zeros((L,), jnp.uint32)
    return _Step(scal, denoms, keep, keys, attrs, groups)


def _sumsq(pl: Plan, grp: range, scal: jax.Array) -> jax.Array:
    """Each leaf's squared gradient norm (of the window mean under accumulation), one call per group."""
    flat, has_acc = isinstance(pl, FlatPlan), pl.acc is not None
    ops: list[ArrayLike] = [pl.acc] if isinstance(pl, FlatPlan) and pl.acc is not None else []
    for i in grp:
        ops.append(pl.grads[i])
        if isinstance(pl, TreePlan) and pl.acc is not None:
            ops.append(pl.acc[i])
    out = jax.ShapeDtypeStruct((len(grp),), jnp.float32)
    call = jax.ffi.ffi_call(_build.SUMSQ_TARGET, out, vmap_method="sequential")
    result: jax.Array = call(scal, *ops, offsets=_offsets(pl, grp), acc=np.int64(has_acc), flat=np.int64(flat))
    return result


def _run_flat(pl: FlatPlan, step: _Step, n: jax.Array) -> tuple[PyTree, AnyAdamState]:
    """Flat state: the state buffers go through the calls in turn, each updating its leaves in place."""
    fields = {"mu": pl.mu, "nu": pl.nu, "nu_max": pl.nu_max, "acc": pl.acc, "ema": pl.ema, "comp": pl.comp}
    st = [x for x in fields.values() if x is not None]
    new_p: list[jax.Array] = []
    for grp in step.groups:
        ops: list[ArrayLike] = [step.scal, step.denoms[grp.start : grp.stop], step.keys[grp.start : grp.stop], *st]
        outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in st]
        aliases = {3 + k: k for k in range(len(st))}
        for i in grp:
            p = jnp.asarray(pl.params[i])
            aliases[len(ops)] = len(outs)
            ops.extend([p, pl.grads[i]])
            outs.append(jax.ShapeDtypeStruct(p.shape, p.dtype))
        r = jax.ffi.ffi_call(_build.STEP_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
            *ops,
            decay=np.asarray([bool(step.keep[i]) for i in grp], np.int64),
            offsets=_offsets(pl, grp),
            flat=np.int64(1),
            **step.attrs,
        )
        st = list(r[: len(st)])
        new_p.extend(r[len(st) :])
    it = iter(st)
    new = {k: None if v is None else FlatBuffers((next(it),)) for k, v in fields.items()}
    new_state = make_state(pl.spec, optax.safe_increment(n), new)
    return jax.tree_util.tree_unflatten(pl.treedef, new_p), new_state


def _run_tree(pl: TreePlan, step: _Step, n: jax.Array) -> tuple[PyTree, AnyAdamState]:
    """Tree state: per-leaf operands, the outputs per leaf ``p, mu, nu[, nu_max][, acc][, ema][, comp]``."""
    L = len(pl.grads)
    res: list[jax.Array | QuantizedArray] = []
    for grp in step.groups:
        if any(pl.quantized[i] for i in grp):
            res.extend(_run_groups(pl, grp, step.scal, step.denoms, step.keep, step.attrs, pl.quantized))
        else:
            res.extend(_call_tree(pl, grp, step))
    per = len(res) // L
    extra = {"nu_max": pl.nu_max, "acc": pl.acc, "ema": pl.ema, "comp": pl.comp}
    names = ["params", "mu", "nu", *(k for k, v in extra.items() if v is not None)]
    col = {
        k: jax.tree_util.tree_unflatten(pl.treedef, [res[i * per + j] for i in range(L)]) for j, k in enumerate(names)
    }
    fields = {k: col.get(k) for k in ("mu", "nu", "nu_max", "acc", "ema", "comp")}
    new_state = make_state(pl.spec, optax.safe_increment(n), fields)
    return col["params"], (new_state if pl.repack is None else pl.repack(new_state))


def _call_tree(pl: TreePlan, grp: range, step: _Step) -> list[jax.Array]:
    """One float kernel call over a group of leaves with float moments (each aliased in place)."""
    ops: list[ArrayLike] = [step.scal, step.denoms[grp.start : grp.stop], step.keys[grp.start : grp.stop]]
    outs: list[jax.ShapeDtypeStruct] = []
    aliases: dict[int, int] = {}
    for i in grp:
        p, g = jnp.asarray(pl.params[i]), pl.grads[i]
        # a float group: every moment is an array (8-bit leaves go through _run_groups)
        fields = (pl.mu, pl.nu, pl.nu_max, pl.acc, pl.ema, pl.comp)
        state = cast("list[jax.Array]", [x[i] for x in fields if x is not None])
        base = len(ops)
        ops.extend([p, g, *state])
        for j, x in enumerate([p, *state]):
            aliases[base + (0 if j == 0 else j + 1)] = len(outs)
            outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    r = jax.ffi.ffi_call(_build.STEP_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
        *ops,
        decay=np.asarray([bool(step.keep[i]) for i in grp], np.int64),
        offsets=np.zeros((0,), np.int64),
        flat=np.int64(0),
        **step.attrs,
    )
    return list(r)


def _run_groups(
    pl: TreePlan,
    grp: range,
    scal: jax.Array,
    denoms: jax.Array,
    keep: list[bool],
    attrs: dict[str, np.int64],
    quantized: list[bool],
) -> list[jax.Array | QuantizedArray]:
    """One group of leaves, some with coded moments (``quantize_moments``): the float leaves go
    through the float kernel call, the coded ones through :data:`_build.Q8_TARGET` (``dynamic8``)
    or :data:`_build.LOWBIT_TARGET` (``fp8``, ``4bit``). Returns the outputs per leaf in the float
    call's order (``p, mu, nu[, nu_max][, acc][, ema]``), a coded moment as one :class:`QuantizedArray`."""
    mu_l, nu_l, nm_l, acc_l, ema_l = pl.mu, pl.nu, pl.nu_max, pl.acc, pl.ema
    per_leaf: dict[int, list[jax.Array | QuantizedArray]] = {}
    for q in (False, True):
        idx = [i for i in grp if quantized[i] == q]
        if not idx:
            continue
        ops: list[ArrayLike] = [scal, denoms[np.asarray(idx)]]
        tag = pl.spec.codec("mu").kernel  # the plan only runs the tags the kernel knows
        lowbit = q and tag in LOWBIT_FORMATS
        if q:
            ops.append(_LOWBIT_TABLES if lowbit else _CODE_MAPS)
        else:  # the plan refuses param_rounding with 8-bit moments: nearest, keys unused
            ops.append(jnp.zeros((len(idx),), jnp.uint32))
        outs: list[jax.ShapeDtypeStruct] = []
        aliases: dict[int, int] = {}
        for i in idx:
            p = jnp.asarray(pl.params[i])
            moms = [x[i] for x in (mu_l, nu_l, nm_l) if x is not None]
            # 8-bit leaves: each moment as its codes and scales; float leaves: the arrays
            state = cast("list[jax.Array]", [a for m in moms for a in m] if q else moms)
            state += [x[i] for x in (acc_l, ema_l) if x is not None]
            aliases[len(ops)] = len(outs)
            outs.append(jax.ShapeDtypeStruct(p.shape, p.dtype))
            ops.extend([p, pl.grads[i]])
            for x in state:
                aliases[len(ops)] = len(outs)
                ops.append(x)
                outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
        decay = np.asarray([bool(keep[i]) for i in idx], np.int64)
        flags = {k: v for k, v in attrs.items() if k != "rounding"}
        if lowbit:
            r = jax.ffi.ffi_call(_build.LOWBIT_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops, decay=decay, format=np.int64(LOWBIT_FORMATS[str(tag)]), **flags
            )
        elif q:
            r = jax.ffi.ffi_call(_build.Q8_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops, decay=decay, block=np.int64(pl.spec.quantize_block_size), **flags
            )
        else:
            r = jax.ffi.ffi_call(_build.STEP_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops, decay=decay, offsets=np.zeros((0,), np.int64), flat=np.int64(0), **attrs
            )
        per = len(r) // len(idx)
        nq = sum(x is not None for x in (mu_l, nu_l, nm_l))
        for k, i in enumerate(idx):
            out: list[jax.Array] = list(r[k * per : (k + 1) * per])
            if q:
                pairs = [QuantizedArray(out[1 + 2 * j], out[2 + 2 * j]) for j in range(nq)]
                per_leaf[i] = [out[0], *pairs, *out[1 + 2 * nq :]]
            else:
                per_leaf[i] = list(out)
    return [x for i in grp for x in per_leaf[i]]


# the 8-bit kernel's code maps operand: the signed map (mu), then the unsigned map (nu, nu_max)
_CODE_MAPS = np.concatenate([code_map("mu"), code_map("nu")]).astype(np.float32)
# the low-bit kernel's operands: its format codes, and the 4-bit tables (mu's map and thresholds,
# then nu's; adamx/_lowbit.h's Q4Map), which fp8 does not read
LOWBIT_FORMATS = {"fp8": 1, "4bit": 2}
_LOWBIT_TABLES = np.concatenate(
    [_lowbit.M4_MAP, _lowbit._M4_THRESHOLDS, _lowbit.V4_MAP, _lowbit._V4_THRESHOLDS]
).astype(np.float32)


# ---------------------------------------------------------------------- the update path
def _coded_moments_ffi(*args: jax.Array, codecs: tuple, ams: bool) -> list[jax.Array]:
    """:data:`adamx._step.coded_moments_p` as one call of :data:`_build.MOMENTS_Q8_TARGET`: per
    block decode, the float32 moments and the direction (the fused step's ``step_segment``), encode."""
    n_sc = len(_step.Scalars._fields)
    sc, g, ops = _step.Scalars(*args[:n_sc]), args[n_sc], args[n_sc + 1 :]
    block = int(codecs[0].block_size)
    outs = [jax.ShapeDtypeStruct(g.shape, jnp.float32)] + [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ops]
    call = jax.ffi.ffi_call(
        _build.MOMENTS_Q8_TARGET, outs, input_output_aliases={3 + k: 1 + k for k in range(len(ops))}
    )
    return list(call(_scalar_vec(sc), _CODE_MAPS, g, *ops, ams=np.int64(ams), block=np.int64(block)))


_ffi_rule = mlir.lower_fun(_coded_moments_ffi, multiple_results=True)
_xla_rule = mlir.lower_fun(_step.coded_moments_xla, multiple_results=True)
_said_unavailable: list[bool] = []


def _coded_moments_cpu(ctx: Any, *args: Any, **params: Any) -> Any:
    """The CPU lowering of :data:`adamx._step.coded_moments_p`: the C++ kernel, or XLA's step where
    the kernel is not built or the program is exported (``jax.export`` takes no custom call)."""
    if ctx.module_context.lowering_parameters.for_export or not _build.available():
        if not _build.available() and not _said_unavailable:
            _said_unavailable.append(True)
            log.debug("adamx: 8-bit update on XLA:CPU without the fused kernel: %s", _build.status()["error"])
        return _xla_rule(ctx, *args, **params)
    return _ffi_rule(ctx, *args, **params)


mlir.register_lowering(_step.coded_moments_p, _coded_moments_cpu, platform="cpu")
