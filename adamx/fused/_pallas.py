"""The fused step on GPU and TPU: one Pallas kernel per leaf for coded (dynamic8, fp8, 4bit) moments.

``jit(update + optax.apply_updates)`` with 8-bit moments cannot reach the memory roofline on an
accelerator: the block absmax of the new moments must be known before any code is written, so
XLA either keeps the float32 moments in memory (TPU: 63 bytes a float32 param) or computes them
twice (GPU: 22), against 16 for one pass that reads grad, param and codes and writes param and
codes. And a custom kernel behind ``update`` would still write the update for ``apply_updates``
to read (24 bytes and a full-size temporary). :func:`adamx.fused.apply_gradients` owns the params,
so here it is one pass: per leaf a Pallas kernel (Triton on GPU, Mosaic on TPU) that decodes the
codes, runs the Adam step, writes the param and re-encodes the moments with the new block scales,
in place (``input_output_aliases``; donate params and state).

.. code-block:: text

    per block of ``block_size`` elements (a row tile of the leaf, viewed 2-D):
    g  = grad / loss_scale_factor                       (float32)
    m  = code_mu[c_mu] * s_mu ;  v = code_nu[c_nu] * s_nu      (|.| < FLT_MIN -> 0)
    m' = m + (g - m) * c1 ;  v' = v + (g*g - v) * c2           (Keras kernel form)
    p' = p + (-(m' * alpha) / (sqrt(v') + eps) - p * wd * lr)  (decay on decayed leaves)
    s' = absmax(m') ; c' = nearest code of m' / s'              (and the same for v')

(``dynamic8``; for ``fp8``: ``m = f32(c_mu) * s_mu``, ``s' = max(absmax(m'), 1e-12) / 448``,
``c' = e4m3fn(m' / s')``; for ``4bit``, blocks of 128: ``m = M4_MAP[c_mu] * s_mu``,
``v = ((c_nu + 1) / 16) * s_nu``, ``s' = max(absmax, 1e-12)``, ``c' = #{T_k <= m' / s'}``, two codes
a byte; all as :mod:`adamx._lowbit`.)

4-bit codes are packed ``byte[k] = code[2k] << 4 | code[2k+1]``: the Triton kernel reads and writes
the even and the odd elements of a block by stride-2 slices; Mosaic has no lane-strided access,
so the TPU kernel spreads each byte to its two elements, and packs the new codes, by products with
constant 0/1 (and 16) matrices on the MXU (exact: bfloat16 values below 256, float32 sums). On the
TPU the 1-D packed codes are relaid out to the kernel's 2-D tiles through VMEM (15.6 bytes a
float32 param against 14.13 on one 16M leaf).

The arithmetic is :mod:`adamx._step`'s, written with the same functions (``dynamic_decode``,
``dynamic_encode``, the absmax over the float bits), so it compiles from one body for both
backends and runs on CPU in interpret mode (the tests compare it with the reference step there:
codes, scales and undecayed params equal bit for bit, decayed params within one ulp, the FMA
contraction of ``p * wd * lr`` being the compiler's). On a GPU or TPU the compiler may contract
other multiply-adds; a value a hair above its block's scale still encodes to the end code, as in
the two-pass XLA schedule (docs/quantized_state.md, "bit identities").

Which leaves: coded moments of the current layout whose last axis holds whole
blocks, on params of float32 or bfloat16, on one device or (``dynamic8``) split alike on an Explicit
mesh in whole blocks (then per shard, under ``shard_map``: no collective). Every other leaf of the same tree takes
the XLA step (:func:`adamx._step.moments_coded`, then the update added as ``optax.apply_updates``
adds it), in the same jitted program. Options the kernel does not take (amsgrad, accumulation, EMA,
``param_rounding``) leave the whole step to ``update`` + ``apply_updates``; clipping runs in XLA
before the kernels (one more read of the gradients).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import optax
from jax.interpreters import mlir

from adamx import _checks, _codecs, _decay, _lowbit, _quantize, _step, _tree
from adamx._codecs import MomentCodec
from adamx._spec import AdamSpec
from adamx._state import AdamState, next_state
from adamx._types import Leaf, PyTree
from adamx.fused import _plan

PLATFORMS = ("gpu", "tpu")
PARAM_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
TPU_BLOCKS_PER_ROW = 32  # blocks of a row unrolled in the TPU kernel (static lane slices)
TPU_VMEM_BYTES = 4 << 20  # the row tile's buffers (double-buffered) stay below this
GPU_ROWS = 8  # blocks per Triton program (8 x 256 = 2048 elements)
N_SCALARS = 8  # c1, c2, alpha, eps, lr, wd, lsf, fp8's 448 (a runtime value: the division stays one)
FORMATS = ("dynamic8", "fp8", "4bit")  # the moment formats the kernel codes


class AccelPlan(NamedTuple):
    """What the accelerator step runs on: the aligned leaves and, per leaf, whether the kernel takes it."""

    spec: AdamSpec
    g_l: list[Leaf]
    p_l: list[Leaf]
    treedef: Any
    mu_l: list[Leaf]
    nu_l: list[Leaf]
    decay: list[bool]
    kernel: list[bool]


def _spec_problem(spec: AdamSpec) -> str | None:
    if not spec.quantize_moments or spec.moment_format not in FORMATS:
        return f"the accelerator kernel is for coded moments ({', '.join(FORMATS)})"
    if spec.amsgrad or spec.window is not None or spec.use_ema or spec.param_rounding != "nearest":
        return "amsgrad, gradient accumulation, use_ema and param_rounding are not in the accelerator kernel"
    bs = _block_size(spec)
    if bs % 128 or bs & (bs - 1):
        return f"quantize_block_size {bs} is not a power of two >= 128"
    return None


def _block_size(spec: AdamSpec) -> int:
    return int(spec.codec("mu").block_size)  # type: ignore[attr-defined]


class Split(NamedTuple):
    """How a leaf's arrays are split on an Explicit mesh: the kernel runs per shard (``shard_map``)."""

    mesh: Any
    spec: Any


def _split(arrays: tuple[Leaf, ...], shape: tuple[int, ...], block_size: int) -> Split | None | bool:
    """``None`` for arrays on one device (or inside ``shard_map``), a :class:`Split` for arrays split
    alike on an Explicit mesh in whole blocks (params, grads, codes by one spec; dynamic8's scales by
    the same spec, their last axis counted in blocks; a 1-D array of a leaf of more axes, fp8's
    scales and 4-bit's codes and scales, along the major axis alone, as
    :func:`adamx._quantize.major_split` splits them), ``False`` otherwise (the XLA step)."""
    if not any(_tree.is_sharded(x) for x in arrays):
        return None
    if isinstance(arrays[0], jax.core.Tracer):
        shardings = [jax.typeof(x).sharding for x in arrays]
    else:
        shardings = [getattr(x, "sharding", None) for x in arrays]
    first = shardings[0]
    if not _quantize._explicit(first) or any(
        not isinstance(sh, jax.sharding.NamedSharding) or sh.mesh != first.mesh for sh in shardings
    ):
        return False
    spec = tuple(first.spec) + (None,) * (len(shape) - len(tuple(first.spec)))
    for x, sh in zip(arrays, shardings):
        if _array_spec(spec, jnp.ndim(x)) != tuple(sh.spec) + (None,) * (jnp.ndim(x) - len(tuple(sh.spec))):
            return False
    for i, entry in enumerate(spec):
        n = _quantize._shards(first.mesh, entry)
        if shape[i] % n or (i == len(shape) - 1 and (shape[i] // block_size) % n):
            return False
    return Split(first.mesh, jax.sharding.PartitionSpec(*spec))


def _array_spec(spec: tuple[Any, ...], ndim: int) -> tuple[Any, ...] | None:
    """The spec of an array of ``ndim`` axes kept for a leaf split by ``spec``: the same, or for a
    1-D array of a leaf of more axes the major entry where that is the only split one (else ``None``)."""
    if ndim == len(spec):
        return spec
    if ndim == 1 and all(e is None for e in spec[1:]):
        return spec[:1]
    return None


def leaf_fits(p: Leaf, g: Leaf, m: Leaf, v: Leaf, codecs: tuple[MomentCodec, MomentCodec]) -> bool:
    """Whether the kernel takes this leaf (coded moments of the current layout, blocks along the last
    axis; on one device, or, for dynamic8, split alike in whole blocks on an Explicit mesh)."""
    if not all(isinstance(x, _quantize.QuantizedArray) for x in (m, v)):
        return False
    block_size = int(codecs[0].block_size)  # type: ignore[attr-defined]
    shape = tuple(jnp.shape(p))
    if not shape or shape[-1] % block_size or jnp.dtype(jnp.result_type(p)) not in PARAM_DTYPES:
        return False
    if tuple(g.shape) != shape or jnp.dtype(g.dtype) not in (jnp.dtype(jnp.result_type(p)), jnp.dtype(jnp.float32)):
        return False
    if not all(_checks.has_layout(q, c, shape) for q, c in zip((m, v), codecs)):
        return False
    return _split((p, g, m.codes, m.scales, v.codes, v.scales), shape, block_size) is not False


def local_shape(p: Leaf, block_size: int) -> tuple[int, ...]:
    """The shape of one shard of a kernel leaf ``p`` (its own shape when it is not split)."""
    shape = tuple(jnp.shape(p))
    sp = _split((p,), shape, block_size)
    if not isinstance(sp, Split):
        return shape
    return tuple(d // _quantize._shards(sp.mesh, e) for d, e in zip(shape, sp.spec))


def plan(tx: object, grads: PyTree, state: PyTree, params: PyTree) -> tuple[str | None, AccelPlan | None]:
    """``(None, plan)`` when the accelerator step applies (at least one leaf for the kernel), else the reason."""
    spec = getattr(tx, "spec", None)
    if not isinstance(spec, AdamSpec) or type(state) is not AdamState:
        return "not an adamx.adam optimizer and its AdamState", None
    reason = _spec_problem(spec)
    if reason:
        return reason, None
    if params is None:
        return "params are required", None
    if isinstance(state.mu, _plan.FlatBuffers):
        return "flat_state is not in the accelerator kernel", None
    g_l, p_l, treedef = _tree.align_grads(grads, params)
    if any(g is None for g in g_l):
        return "a gradient is None", None
    try:
        mu_l, nu_l = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    except (ValueError, TypeError):
        return "optimizer state does not match params", None
    codecs = (spec.codec("mu"), spec.codec("nu"))
    kernel = [leaf_fits(p, g, m, v, codecs) for p, g, m, v in zip(p_l, g_l, mu_l, nu_l)]
    if not any(kernel):
        return "no leaf the accelerator kernel takes (coded moments with whole blocks along the last axis)", None
    decay = _decay.decay_mask_leaves(params, spec.exclude, spec.weight_decay_mask) if spec.decay_on else []
    return None, AccelPlan(spec, g_l, p_l, treedef, mu_l, nu_l, decay or [False] * len(p_l), kernel)


# ------------------------------------------------------------------ the kernel


def _decode(fmt: str, codes: jax.Array, scale: jax.Array, signed: bool) -> jax.Array:
    """One block per row: :meth:`Dynamic8.decode` / :func:`adamx._lowbit.fp8_decode`."""
    if fmt == "fp8":
        return codes.astype(jnp.float32) * scale
    v = _quantize.dynamic_decode(codes, signed) * scale
    return jnp.where(jnp.abs(v) < _quantize.FLT_MIN, jnp.float32(0), v)


def _encode(fmt: str, x: jax.Array, signed: bool, fp8_max: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Codes and the ``(rows, 1)`` block scales of ``x`` (one block per row), as
    :func:`adamx._quantize.quantize` / :func:`adamx._lowbit.fp8_encode`."""
    if fmt == "fp8":
        s = _block_scale([x]) / fp8_max
        return (x / (s + x * jnp.float32(0))).astype(jnp.float8_e4m3fn), s
    x = jnp.where(jnp.abs(x) < _quantize.FLT_MIN, jnp.float32(0), x)
    s = _quantize._scale_of(jnp.max(_quantize._abs_bits(x), axis=-1, keepdims=True))
    inv = jnp.float32(1) / jnp.where(s == 0, jnp.float32(1), s)
    return _quantize.dynamic_encode(x * inv, signed).astype(jnp.uint8), s


def _body(s_ref, g_ref, p_ref, mc_ref, ms_ref, vc_ref, vs_ref, po_ref, mco_ref, mso_ref, vco_ref, vso_ref, **kw):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN003
    """One tile: ``nb`` blocks per row of ``block_size`` lanes each (static slices; the scales of
    the row tile are read and written whole, a block's picked out by a select on its lane)."""
    fmt, nb, bs, decay, has_lsf = kw["fmt"], kw["nb"], kw["block_size"], kw["decay"], kw["has_lsf"]
    c1, c2, alpha, eps, lr, wd, lsf, fp8_max = (s_ref[i] for i in range(8))
    ms_all, vs_all = ms_ref[...], vs_ref[...]
    lane = jax.lax.broadcasted_iota(jnp.int32, ms_all.shape, 1)

    def pick(s: jax.Array, j: int) -> jax.Array:
        return s if nb == 1 else jnp.max(jnp.where(lane == j, s, -jnp.inf), axis=1, keepdims=True)

    new_ms, new_vs = ms_all, vs_all
    for j in range(nb):
        sl = slice(j * bs, (j + 1) * bs)
        g = g_ref[:, sl].astype(jnp.float32)
        if has_lsf:
            g = g / lsf
        m = _decode(fmt, mc_ref[:, sl], pick(ms_all, j), True)
        v = _decode(fmt, vc_ref[:, sl], pick(vs_all, j), False)
        po_ref[:, sl], m2, v2 = _adam(g, m, v, p_ref[:, sl], (c1, c2, alpha, eps, lr, wd), decay)
        mc, ms = _encode(fmt, m2, True, fp8_max)
        vc, vs = _encode(fmt, v2, False, fp8_max)
        mco_ref[:, sl] = mc
        vco_ref[:, sl] = vc
        new_ms = ms if nb == 1 else jnp.where(lane == j, ms, new_ms)
        new_vs = vs if nb == 1 else jnp.where(lane == j, vs, new_vs)
    mso_ref[...] = new_ms
    vso_ref[...] = new_vs


def _adam(g, m, v, p, sc, decay):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """The Keras step on decoded moments: ``(new param, m', v')`` (the kernel bodies' shared arithmetic)."""
    c1, c2, alpha, eps, lr, wd = sc
    m2 = m + (g - m) * c1
    v2 = v + (g * g - v) * c2
    u = -((m2 * alpha) / (jnp.sqrt(v2) + eps))
    if decay:
        u = u - (p.astype(jnp.float32) * wd) * lr
    return (p + u.astype(p.dtype)).astype(p.dtype), m2, v2


def _q4_decode(code: jax.Array, scale: jax.Array, signed: bool) -> jax.Array:
    """:func:`adamx._lowbit.m4_decode` / ``v4_decode`` of int32 codes 0..15, in blocks of scale ``scale``."""
    return _lowbit.q4_value(code, signed) * scale


def _block_scale(parts: list[jax.Array]) -> jax.Array:
    """A block's ``max(absmax, 1e-12)`` (torchao's fp8 and 4-bit scale before fp8's ``/ 448``; NaN
    if the block holds one) over its ``parts`` (``(rows, k)`` each): an integer max over the float
    bits (Triton has no reduce_or)."""
    tops = [
        jnp.max(jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF), axis=-1, keepdims=True)
        for x in parts
    ]
    top = functools.reduce(jnp.maximum, tops)
    return jnp.maximum(_quantize._scale_of(top), _lowbit.SCALE_FLOOR)


def _q4_code(x: jax.Array, s: jax.Array, signed: bool) -> jax.Array:
    """int32 codes of ``x`` in blocks of scale ``s``: ``#{T <= x / s}`` (:func:`adamx._lowbit.m4_encode`)."""
    return _lowbit.q4_code(x / (s + x * jnp.float32(0)), signed, jnp.int32)


def _body4(s_ref, g_ref, p_ref, mc_ref, ms_ref, vc_ref, vs_ref, po_ref, mco_ref, mso_ref, vco_ref, vso_ref, **kw):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN003
    """One tile of a ``4bit`` leaf: codes packed two a byte, ``byte[k] = code[2k] << 4 | code[2k+1]``.

    ``layout="strided"`` (Triton): one block of 128 a row; the even and the odd elements are read and
    written by stride-2 slices, so a byte's two codes are two lanes of the same index.
    ``layout="mxu"`` (Mosaic, which has no lane-strided access): chunks of 256 elements (two blocks; the
    last may be one); the bytes are spread to their two elements, and the codes packed back, by
    products with 0/1 (and 16) matrices on the MXU, exact in bfloat16 with float32 sums (values < 256).
    """
    layout, nb, decay, has_lsf = kw["layout"], kw["nb"], kw["decay"], kw["has_lsf"]
    c1, c2, alpha, eps, lr, wd, lsf = (s_ref[i] for i in range(7))
    sc = (c1, c2, alpha, eps, lr, wd)

    def grad(sl: Any) -> jax.Array:
        g = g_ref[:, sl].astype(jnp.float32)
        return g / lsf if has_lsf else g

    if layout == "strided":
        from jax.experimental import pallas as pl

        cm, cv = mc_ref[...].astype(jnp.int32), vc_ref[...].astype(jnp.int32)
        s_m, s_v = ms_ref[...], vs_ref[...]
        new: list[tuple[jax.Array, jax.Array]] = []
        for h, sl in enumerate((pl.ds(0, 64, stride=2), pl.ds(1, 64, stride=2))):
            code_m, code_v = (cm >> 4, cv >> 4) if h == 0 else (cm & 15, cv & 15)
            m, v = _q4_decode(code_m, s_m, True), _q4_decode(code_v, s_v, False)
            p2, m2, v2 = _adam(grad(sl), m, v, p_ref[:, sl], sc, decay)
            po_ref[:, sl] = p2
            new.append((m2, v2))
        sm2, sv2 = _block_scale([x[0] for x in new]), _block_scale([x[1] for x in new])
        pm = [_q4_code(x[0], sm2, True) for x in new]
        pv = [_q4_code(x[1], sv2, False) for x in new]
        mco_ref[...] = ((pm[0] << 4) | pm[1]).astype(jnp.uint8)
        vco_ref[...] = ((pv[0] << 4) | pv[1]).astype(jnp.uint8)
        mso_ref[...] = sm2
        vso_ref[...] = sv2
        return

    ms_all, vs_all = ms_ref[...], vs_ref[...]
    lane_s = jax.lax.broadcasted_iota(jnp.int32, ms_all.shape, 1)

    def pick(s: jax.Array, j: int) -> jax.Array:
        return s if nb == 1 else jnp.max(jnp.where(lane_s == j, s, -jnp.inf), axis=1, keepdims=True)

    def spread(c: jax.Array, w: int) -> jax.Array:  # bytes (rows, w/2) -> codes (rows, w)
        k = jax.lax.broadcasted_iota(jnp.int32, (w // 2, w), 0)
        e = jnp.where((jax.lax.broadcasted_iota(jnp.int32, (w // 2, w), 1) >> 1) == k, 1.0, 0.0)
        b = jnp.dot(
            c.astype(jnp.int32).astype(jnp.float32).astype(jnp.bfloat16),
            e.astype(jnp.bfloat16),
            preferred_element_type=jnp.float32,
        ).astype(jnp.int32)
        odd = (jax.lax.broadcasted_iota(jnp.int32, b.shape, 1) & 1) != 0
        return jnp.where(odd, b & 15, b >> 4)

    def pack(code: jax.Array, w: int) -> jax.Array:  # codes (rows, w) -> bytes (rows, w/2)
        j = jax.lax.broadcasted_iota(jnp.int32, (w, w // 2), 0)
        k2 = 2 * jax.lax.broadcasted_iota(jnp.int32, (w, w // 2), 1)
        q = jnp.where(j == k2, 16.0, jnp.where(j == k2 + 1, 1.0, 0.0)).astype(jnp.bfloat16)
        b = jnp.dot(code.astype(jnp.float32).astype(jnp.bfloat16), q, preferred_element_type=jnp.float32)
        return b.astype(jnp.int32).astype(jnp.uint8)

    new_ms, new_vs = ms_all, vs_all
    width = nb * 128
    for start in range(0, width, 256):
        w = min(256, width - start)
        sl, csl = slice(start, start + w), slice(start // 2, (start + w) // 2)
        blocks = [start // 128 + j for j in range(w // 128)]
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, w), 1)

        def per_block(vals: list[jax.Array]) -> jax.Array:
            return vals[0] if len(vals) == 1 else jnp.where(lane < 128, vals[0], vals[1])

        m = _q4_decode(spread(mc_ref[:, csl], w), per_block([pick(ms_all, j) for j in blocks]), True)
        v = _q4_decode(spread(vc_ref[:, csl], w), per_block([pick(vs_all, j) for j in blocks]), False)
        p2, m2, v2 = _adam(grad(sl), m, v, p_ref[:, sl], sc, decay)
        po_ref[:, sl] = p2
        sm = [_block_scale([m2[:, 128 * i : 128 * (i + 1)]]) for i in range(len(blocks))]
        sv = [_block_scale([v2[:, 128 * i : 128 * (i + 1)]]) for i in range(len(blocks))]
        mco_ref[:, csl] = pack(_q4_code(m2, per_block(sm), True), w)
        vco_ref[:, csl] = pack(_q4_code(v2, per_block(sv), False), w)
        for j, a, b in zip(blocks, sm, sv):
            new_ms = a if nb == 1 else jnp.where(lane_s == j, a, new_ms)
            new_vs = b if nb == 1 else jnp.where(lane_s == j, b, new_vs)
    mso_ref[...] = new_ms
    vso_ref[...] = new_vs


def _tpu_view(shape: tuple[int, ...], bs: int) -> tuple[int, int] | None:
    """The 2-D ``(rows, width)`` the TPU kernel takes a leaf as (the last axis, or a 1-D leaf cut
    into rows of whole blocks), or ``None`` where a row would hold more than 32 blocks."""
    n, c = math.prod(shape), shape[-1]
    if len(shape) == 1 and c // bs > TPU_BLOCKS_PER_ROW:
        k = max(d for d in range(1, TPU_BLOCKS_PER_ROW + 1) if (c // bs) % d == 0)
        c = bs * k
    if c // bs > TPU_BLOCKS_PER_ROW:
        return None
    return n // c, c


def tpu_takes(shape: tuple[int, ...], bs: int) -> bool:
    """Whether the TPU kernel takes a leaf of ``shape`` (see :func:`_tpu_view`)."""
    return _tpu_view(shape, bs) is not None


def _kernel_leaf(
    platform: str,
    scal: jax.Array,
    g: jax.Array,
    p: jax.Array,
    mc: jax.Array,
    ms: jax.Array,
    vc: jax.Array,
    vs: jax.Array,
    *,
    fmt: str,
    block_size: int,
    decay: bool,
    has_lsf: bool,
    interpret: bool = False,
) -> list[jax.Array]:
    """The Pallas kernel on one leaf: ``[param, mu codes, mu scales, nu codes, nu scales]``, new.

    ``platform`` is ``"gpu"`` (Triton: rows of one block, ``GPU_ROWS`` rows a program) or ``"tpu"``
    (Mosaic: a tile of whole rows of the leaf, every block of the row by a static slice);
    ``interpret`` runs the kernel body with XLA on the host (the tests).
    """
    from jax.experimental import pallas as pl

    shape, bs = tuple(p.shape), block_size
    per_code = 2 if fmt == "4bit" else 1  # elements a code byte holds
    if platform == "gpu":
        rows, width, nb = math.prod(shape) // bs, bs, 1
        tr = GPU_ROWS * per_code
        s_spec = pl.BlockSpec((N_SCALARS,), lambda i: (0,))
        extra: dict[str, Any] = {}
        if not interpret:
            from jax.experimental.pallas import triton as pl_triton

            extra["compiler_params"] = pl_triton.CompilerParams(num_warps=4, num_stages=1)
    elif platform == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        view = _tpu_view(shape, bs)
        if view is None:
            raise ValueError(f"the TPU kernel takes at most {TPU_BLOCKS_PER_ROW} blocks a row, got shape {shape}")
        rows, width = view
        nb = width // bs
        per_row = 2 * width * (2 * p.dtype.itemsize + g.dtype.itemsize + 4)  # in + out, double-buffered
        tr = max(32, TPU_VMEM_BYTES // per_row // 32 * 32)
        tr = rows if tr >= rows else tr
        s_spec = pl.BlockSpec(memory_space=pl_tpu.SMEM)
        extra = {}
    else:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")

    def block(w: int) -> Any:
        return pl.BlockSpec((tr, w), lambda i: (i, 0))

    def view2(x: jax.Array, w: int) -> jax.Array:
        return x.reshape(x.size // w, w)

    cw = width // per_code
    args = (scal, view2(g, width), view2(p, width), view2(mc, cw), view2(ms, nb), view2(vc, cw), view2(vs, nb))
    if fmt == "4bit":
        layout = "strided" if platform == "gpu" else "mxu"
        body = functools.partial(_body4, layout=layout, nb=nb, decay=decay, has_lsf=has_lsf)
    else:
        body = functools.partial(_body, fmt=fmt, nb=nb, block_size=bs, decay=decay, has_lsf=has_lsf)
    outs = pl.pallas_call(
        body,
        grid=(pl.cdiv(rows, tr),),
        in_specs=[s_spec, block(width), block(width), block(cw), block(nb), block(cw), block(nb)],
        out_specs=[block(width), block(cw), block(nb), block(cw), block(nb)],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args[2:]],
        input_output_aliases={2: 0, 3: 1, 4: 2, 5: 3, 6: 4},
        interpret=interpret,
        **extra,
    )(*args)
    return [o.reshape(x.shape) for o, x in zip(outs, (p, mc, ms, vc, vs))]


def _scalars(scal: jax.Array) -> _step.Scalars:
    """The :class:`adamx._step.Scalars` the kernel reads, from its scalar vector (the others unused)."""
    one = jnp.float32(1)
    c1, c2, alpha, eps, lr, wd, lsf = (scal[i] for i in range(7))  # scal[7]: fp8's 448, the codec's own
    return _step.Scalars(c1, c2, alpha, eps, lr, wd, lsf, one, one, one, one, one, one, one, one, one)


def _reference_leaf(
    scal: jax.Array,
    g: jax.Array,
    p: jax.Array,
    mc: jax.Array,
    ms: jax.Array,
    vc: jax.Array,
    vs: jax.Array,
    *,
    fmt: str,
    block_size: int,
    decay: bool,
    has_lsf: bool,
) -> list[jax.Array]:
    """What the kernel computes, by the XLA step (:func:`adamx._step.moments_coded`): the primitive
    on a backend without a kernel."""
    sc = _scalars(scal)
    g32 = g.astype(jnp.float32)
    if has_lsf:
        g32 = g32 / sc.lsf
    codecs = [_codecs.codec(fmt, f, block_size, 0) for f in ("mu", "nu")]
    mu, nu = _quantize.QuantizedArray(mc, ms), _quantize.QuantizedArray(vc, vs)
    d, m2, v2, _ = _step.moments_coded(sc, g32, mu, nu, None, codecs + codecs[1:], kernel=False)
    u = _step.descent(sc, d, p, decay, p.dtype)
    return [(p + u).astype(p.dtype), *m2, *v2]


# One primitive per leaf, lowered per platform: the kernels are traced only when the step is
# lowered for a GPU or a TPU (the CPU step, which traces every branch of ``platform_dependent``,
# does not pay for them).
step_p = jax.extend.core.Primitive("adamx_q8_adam_step")
step_p.multiple_results = True
step_p.def_impl(lambda *args, **kw: jax.jit(functools.partial(_reference_leaf, **kw))(*args))
step_p.def_abstract_eval(lambda scal, g, p, mc, ms, vc, vs, **kw: [p, mc, ms, vc, vs])
mlir.register_lowering(step_p, mlir.lower_fun(_reference_leaf, multiple_results=True))
mlir.register_lowering(
    step_p, mlir.lower_fun(functools.partial(_kernel_leaf, "gpu"), multiple_results=True), platform="cuda"
)
mlir.register_lowering(
    step_p, mlir.lower_fun(functools.partial(_kernel_leaf, "tpu"), multiple_results=True), platform="tpu"
)


def leaf_step(
    scal: jax.Array,
    g: jax.Array,
    p: jax.Array,
    mu: _quantize.QuantizedArray,
    nu: _quantize.QuantizedArray,
    *,
    fmt: str,
    block_size: int,
    decay: bool,
    has_lsf: bool,
) -> tuple[jax.Array, _quantize.QuantizedArray, _quantize.QuantizedArray]:
    """One leaf's step: ``(new param, new mu, new nu)`` with moments in format ``fmt`` (:data:`FORMATS`);
    ``scal`` holds :data:`N_SCALARS` float32 (``c1, c2, alpha, eps, lr, wd, lsf, 448``). The kernel
    on a GPU or TPU, the XLA step elsewhere."""

    def bind(*args: jax.Array) -> list[jax.Array]:
        return step_p.bind(*args, fmt=fmt, block_size=block_size, decay=decay, has_lsf=has_lsf)

    arrays = (g, p, mu.codes, mu.scales, nu.codes, nu.scales)
    sp = _split(arrays, tuple(p.shape), block_size)
    if isinstance(sp, Split):  # per shard: the kernel is elementwise in whole blocks, no collective
        specs = [jax.sharding.PartitionSpec(*_array_spec(tuple(sp.spec), x.ndim)) for x in arrays]  # type: ignore[misc]
        bind = jax.shard_map(
            bind,
            mesh=sp.mesh,
            in_specs=(jax.sharding.PartitionSpec(), *specs),
            out_specs=specs[1:],
            check_vma=False,
        )
    p2, mc, ms, vc, vs = bind(scal, *arrays)
    return p2, _quantize.QuantizedArray(mc, ms), _quantize.QuantizedArray(vc, vs)


# ------------------------------------------------------------------ the step


def run(ap: AccelPlan, state: AdamState, platform: str) -> tuple[PyTree, PyTree]:
    """The step for ``platform`` (``"gpu"``/``"tpu"``): ``(new params, new state)``, the values of
    ``update`` + ``optax.apply_updates`` (see the module docstring for the bit identities).
    ``platform`` picks the leaves (the TPU kernel takes at most 32 blocks a row); the primitive
    lowers to the kernel of the platform the step is compiled for, elsewhere (``"other"``) to the
    XLA step."""
    spec, n = ap.spec, state.count
    sc = _step.scalars(spec, n)
    clipped = spec.clip_mode != "none"
    g_l = _step.clip(spec, _step.unscale(spec, ap.g_l), None, None) if clipped else ap.g_l
    has_lsf = spec.loss_scale_factor is not None and not clipped
    lsf = sc.lsf if has_lsf else jnp.float32(1)
    fp8_max = jnp.float32(_lowbit.FP8_MAX)
    scal = jnp.stack([sc.c1, sc.c2, sc.alpha, sc.eps, sc.lr, sc.wd, lsf, fp8_max]).astype(jnp.float32)
    codecs = [spec.codec(f) for f in ("mu", "nu", "nu_max")]
    fmt, bs = spec.moment_format, _block_size(spec)
    p_new, mu_new, nu_new = [], [], []
    for g, p, m, v, dec, k in zip(g_l, ap.p_l, ap.mu_l, ap.nu_l, ap.decay, ap.kernel):
        if k and (platform != "tpu" or tpu_takes(local_shape(p, bs), bs)):
            p2, m2, v2 = leaf_step(scal, g, p, m, v, fmt=fmt, block_size=bs, decay=dec, has_lsf=has_lsf)
        else:
            g32 = g if clipped else _step.unscale(spec, [g])[0]
            d, m2, v2, _ = _step.moments_coded(sc, g32, m, v, None, codecs, kernel=_step.coded_kernel_applies(spec))
            u = _step.descent(sc, d, p, dec, jnp.result_type(p))
            with jax.numpy_dtype_promotion("standard"):
                p2 = optax.apply_updates(p, u)
        p_new.append(p2)
        mu_new.append(m2)
        nu_new.append(v2)
    unflat = functools.partial(jax.tree_util.tree_unflatten, ap.treedef)
    fields = {"mu": mu_new, "nu": nu_new}
    return unflat(p_new), next_state(spec, n, unflat, fields)
