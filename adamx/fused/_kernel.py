"""The fused step's ``jax.ffi`` calls: one in-place pass over params, grads and state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamx import _clipping, _decay, _rounding, _step
from adamx._flat import FlatBuffers
from adamx._quantize import QuantizedArray
from adamx._state import AnyAdamState, code_map, make_state
from adamx.fused import _build
from adamx.fused._plan import Plan

# XLA's compile time grows faster than linearly with the operand count of one custom
# call; calls of about OPERANDS_PER_CALL operands keep it linear in the leaf count.
OPERANDS_PER_CALL = 64
# flat state: 2 operands per leaf; calls of 256 operands measured best (docs/performance.md)
FLAT_OPERANDS_PER_CALL = 256


ROUNDING_CODES = {"nearest": 0, "kahan": 1, "stochastic": 2}


def run(pl: Plan, state: AnyAdamState, params: Any) -> tuple[Any, Any]:
    """One fused step: ``(new_params, new_state)``, the numbers of ``update`` + ``apply_updates``."""
    spec = pl.spec
    g_l, p_l, treedef = pl.grads, pl.params, pl.treedef
    mu_l, nu_l, nm_l, acc_l, ema_l, offsets = pl.mu, pl.nu, pl.nu_max, pl.acc, pl.ema, pl.offsets
    comp_l = pl.comp
    n = state.count
    keep = (
        _decay.decay_mask_leaves(params, spec.exclude, spec.weight_decay_mask) if spec.decay_on else [False] * len(g_l)
    )
    # Per-step scalars: the same function adamx.adam's update uses.
    sc = _step.scalars(spec, n)
    clip_mode, clip_c = int(_step.CLIP_CODES[spec.clip_mode]), sc.clip_c
    L = len(g_l)
    has_acc = acc_l is not None
    if L == 0:
        return params, state._replace(count=optax.safe_increment(n))

    def scalar_vec(v: _step.Scalars) -> jax.Array:
        return jnp.stack([jnp.asarray(x).astype(jnp.float32) for x in v])

    # XLA's compile time grows faster than linearly with the operand count of one custom
    # call; calls of about OPERANDS_PER_CALL operands keep it linear in the leaf count.
    flat = offsets is not None
    n_state = 2 + sum(x is not None for x in (nm_l, acc_l, ema_l, comp_l))
    per_leaf = 2 if flat else 2 + n_state
    per_call = max(1, (FLAT_OPERANDS_PER_CALL - n_state) // per_leaf) if flat else max(1, OPERANDS_PER_CALL // per_leaf)
    groups = [range(i, min(L, i + per_call)) for i in range(0, L, per_call)]
    no_offsets = np.zeros((0,), np.int64)

    def offs(grp: range) -> np.ndarray:
        return offsets[grp.start : grp.stop] if offsets is not None else no_offsets

    denoms = jnp.ones((L,), jnp.float32)
    if clip_mode in (1, 2):
        sums = []
        for grp in groups:
            sum_ops: list[Any] = [acc_l] if (flat and has_acc) else []
            for i in grp:
                sum_ops.append(g_l[i])
                if has_acc and not flat:
                    sum_ops.append(acc_l[i])
            sums.append(
                jax.ffi.ffi_call(
                    _build.SUMSQ_TARGET, jax.ShapeDtypeStruct((len(grp),), jnp.float32), vmap_method="sequential"
                )(scalar_vec(sc), *sum_ops, offsets=offs(grp), acc=np.int64(has_acc), flat=np.int64(flat))
            )
        sumsq = jnp.concatenate(sums)
        if clip_mode == 1:  # Keras clipnorm: g * c / max(||g||, c), per tensor
            denoms = jnp.maximum(jnp.sqrt(sumsq), clip_c)
        else:  # Keras global_clipnorm
            sc = sc._replace(clip_scale=_clipping.global_clip_scale(jnp.sqrt(jnp.sum(sumsq)), clip_c))

    scal = scalar_vec(sc)
    # PjRt:CPU runs a program whose HloCostAnalysis flop count is under 1000 inline on
    # the calling thread, without async dispatch; custom calls count 0 flops, so an
    # optimizer-only step would block Python. A 16x16 matmul on a runtime value (8192
    # flops, about a microsecond) makes the step count as real work. Its result is
    # passed to the kernel, which ignores it, so it is not removed.
    hint = jnp.full((16, 16), scal[0]) @ jnp.full((16, 16), scal[1])
    scal = jnp.concatenate([scal, hint[:1, 0] * 0.0])
    attrs = dict(
        ams=np.int64(nm_l is not None),
        acc=np.int64(has_acc),
        ema=np.int64(ema_l is not None),
        rounding=np.int64(ROUNDING_CODES[spec.param_rounding]),
    )
    # stochastic rounding's per-leaf keys (adamx._rounding); unused by the other modes
    keys = _rounding.leaf_keys(spec.seed, n, L) if spec.param_rounding == "stochastic" else jnp.zeros((L,), jnp.uint32)
    if flat:
        # the state buffers go through the calls in turn, each updating its leaves in place
        st = [x for x in (mu_l, nu_l, nm_l, acc_l, ema_l, comp_l) if x is not None]
        new_p: list[Any] = []
        for grp in groups:
            ops: list[Any] = [scal, denoms[grp.start : grp.stop], keys[grp.start : grp.stop], *st]
            outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in st]
            aliases = {3 + k: k for k in range(len(st))}
            for i in grp:
                p = jnp.asarray(p_l[i])
                aliases[len(ops)] = len(outs)
                ops.extend([p, g_l[i]])
                outs.append(jax.ShapeDtypeStruct(p.shape, p.dtype))
            r = jax.ffi.ffi_call(_build.STEP_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops,
                decay=np.asarray([bool(keep[i]) for i in grp], np.int64),
                offsets=offs(grp),
                flat=np.int64(1),
                **attrs,
            )
            st = list(r[: len(st)])
            new_p.extend(r[len(st) :])
        it = iter(st)
        fb = lambda x: None if x is None else FlatBuffers((next(it),))  # noqa: E731
        new_mu, new_nu, new_nm, new_acc, new_ema, new_comp = (fb(x) for x in (mu_l, nu_l, nm_l, acc_l, ema_l, comp_l))
        fields = dict(mu=new_mu, nu=new_nu, nu_max=new_nm, acc=new_acc, ema=new_ema, comp=new_comp)
        new_state = make_state(spec, optax.safe_increment(n), fields)
        return jax.tree_util.tree_unflatten(treedef, new_p), new_state

    quantized = pl.quantized or [False] * L
    res: list[Any] = []
    for grp in groups:
        if any(quantized[i] for i in grp):
            res.extend(_run_groups(pl, grp, scal, denoms, keep, attrs, quantized))
            continue
        ops = [scal, denoms[grp.start : grp.stop], keys[grp.start : grp.stop]]
        outs = []
        aliases = {}
        for i in grp:
            p, g = jnp.asarray(p_l[i]), g_l[i]
            leaf_in = [p, g, mu_l[i], nu_l[i]]
            leaf_out = [p, mu_l[i], nu_l[i]]
            for lst in (nm_l, acc_l, ema_l, comp_l):
                if lst is not None:
                    leaf_in.append(lst[i])
                    leaf_out.append(lst[i])
            base = len(ops)
            ops.extend(leaf_in)
            for j, x in enumerate(leaf_out):
                aliases[base + (0 if j == 0 else j + 1)] = len(outs)
                outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
        res.extend(
            jax.ffi.ffi_call(_build.STEP_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops,
                decay=np.asarray([bool(keep[i]) for i in grp], np.int64),
                offsets=offs(grp),
                flat=np.int64(0),
                **attrs,
            )
        )
    per = len(res) // L
    col = lambda j: [res[i * per + j] for i in range(L)]  # noqa: E731
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
    j = 3
    new_nm = new_acc = new_ema = new_comp = None
    if nm_l is not None:
        new_nm, j = unflat(col(j)), j + 1
    if has_acc:
        new_acc, j = unflat(col(j)), j + 1
    if ema_l is not None:
        new_ema, j = unflat(col(j)), j + 1
    if comp_l is not None:
        new_comp = unflat(col(j))
    fields = dict(mu=unflat(col(1)), nu=unflat(col(2)), nu_max=new_nm, acc=new_acc, ema=new_ema, comp=new_comp)
    new_state = make_state(spec, optax.safe_increment(n), fields)
    return unflat(col(0)), (new_state if pl.repack is None else pl.repack(new_state))


def _run_groups(
    pl: Plan, grp: range, scal: Any, denoms: Any, keep: list[bool], attrs: dict[str, Any], quantized: list[bool]
) -> list[Any]:
    """One group of leaves, some with 8-bit moments (``quantize_moments``): the float leaves go
    through the float kernel call, the 8-bit ones through :data:`_build.Q8_TARGET`. Returns the
    outputs per leaf in the float call's order (``p, mu, nu[, nu_max][, acc][, ema]``), an 8-bit
    moment as one :class:`QuantizedArray`."""
    mu_l, nu_l, nm_l, acc_l, ema_l = pl.mu, pl.nu, pl.nu_max, pl.acc, pl.ema
    per_leaf: dict[int, list[Any]] = {}
    for q in (False, True):
        idx = [i for i in grp if quantized[i] == q]
        if not idx:
            continue
        ops: list[Any] = [scal, denoms[np.asarray(idx)]]
        if q:
            ops.append(_CODE_MAPS)
        else:  # the plan refuses param_rounding with 8-bit moments: nearest, keys unused
            ops.append(jnp.zeros((len(idx),), jnp.uint32))
        outs: list[Any] = []
        aliases: dict[int, int] = {}
        for i in idx:
            p = jnp.asarray(pl.params[i])
            moms = [x[i] for x in (mu_l, nu_l, nm_l) if x is not None]
            state = [*(a for m in moms for a in m)] if q else moms
            state += [x[i] for x in (acc_l, ema_l) if x is not None]
            aliases[len(ops)] = len(outs)
            outs.append(jax.ShapeDtypeStruct(p.shape, p.dtype))
            ops.extend([p, pl.grads[i]])
            for x in state:
                aliases[len(ops)] = len(outs)
                ops.append(x)
                outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
        decay = np.asarray([bool(keep[i]) for i in idx], np.int64)
        if q:
            r = jax.ffi.ffi_call(_build.Q8_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops,
                decay=decay,
                block=np.int64(pl.spec.quantize_block_size),
                **{k: v for k, v in attrs.items() if k != "rounding"},
            )
        else:
            r = jax.ffi.ffi_call(_build.STEP_TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
                *ops, decay=decay, offsets=np.zeros((0,), np.int64), flat=np.int64(0), **attrs
            )
        per = len(r) // len(idx)
        nq = sum(x is not None for x in (mu_l, nu_l, nm_l))
        for k, i in enumerate(idx):
            leaf: list[Any] = list(r[k * per : (k + 1) * per])
            if q:
                pairs = [QuantizedArray(leaf[1 + 2 * j], leaf[2 + 2 * j]) for j in range(nq)]
                leaf = [leaf[0], *pairs, *leaf[1 + 2 * nq :]]
            per_leaf[i] = leaf
    return [x for i in grp for x in per_leaf[i]]


# the 8-bit kernel's code maps operand: the signed map (mu), then the unsigned map (nu, nu_max)
_CODE_MAPS = np.concatenate([code_map("mu"), code_map("nu")]).astype(np.float32)
