r"""Block-wise 8-bit quantization of optimizer state (the scheme only; no optimizer wiring).

An 8-bit moment is stored as one ``uint8`` code per element and one float32 scale per
block of ``block_size`` consecutive elements (in C order; codes are shaped like the leaf,
scales as :func:`scale_shape` says, so the state shards like the leaf). The code indexes a
sorted map of 256 float32 values in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned):

.. code-block:: text

    blocks    = x.reshape(scale_shape + (block_size,))          # ravel and pad with 0 if the size is no multiple
    x         = where(|x| < FLT_MIN, 0, x)                 # subnormal inputs count as 0
    scale[b]  = max_i |blocks[b, i]|                        # NaN if the block holds a NaN
    inv[b]    = 1 / (scale[b] if scale[b] != 0 else 1)       # float32, one reciprocal per block
    y[b, i]   = blocks[b, i] * inv[b]                       # (XLA rewrites x / s as x * (1/s); bitsandbytes too)
    mid[j]    = (code[j] + code[j+1]) * 0.5                 # float32, j = 0..254
    codes     = #{j : mid[j] < y}                           # nearest code; a tie goes to the lower code
    codes     = zero_code where y is NaN                    # zero_code: the code of 0.0
    decode    = code[codes] * scale[block], then |.| < FLT_MIN -> 0

Properties (all tested in ``tests/test_quantize.py``):

* zeros are exact: ``0`` encodes to the code whose value is exactly ``0.0``; a block of
  zeros has scale ``0`` and decodes to zeros (no ``0/0``);
* the element with the largest magnitude is exact when the map holds ``±1`` (``1.0`` is
  in every map; ``-1.0`` is not in the signed dynamic map, see below);
* error bound: ``|x - decode(quantize(x))| <= max_error(code) * scale[block]`` (plus a
  few float32 ulps of the scale), with ``max_error`` half the largest gap of the map,
  or the distance from ``±1`` to the end of the map if that is larger;
* non-finite input: a NaN makes its block's scale NaN, an inf makes it inf; every code
  of that block is ``zero_code`` and the whole block decodes to NaN. (Float32 state
  would poison only the element; a quantized block is poisoned whole. Adam state holding
  a NaN is lost either way.)

The two dynamic maps are encoded and decoded by arithmetic on the code's bits and the value's
decade (:func:`dynamic_encode`, :func:`dynamic_decode`: no gather and no table, so the step
compiles to elementwise code on TPU/GPU); another map by ``searchsorted``. The same scheme is
written in C++ in ``adamx/_quant8.h`` (for the fused CPU kernel, by tables) and in NumPy in
``tests/reference_quant.py``; the three agree bit for bit.

Code maps (computed here with NumPy at import, float64 rounded once to float32):

* :data:`SIGNED_DYNAMIC_MAP` (first moment) and :data:`UNSIGNED_DYNAMIC_MAP` (second
  moment): bitsandbytes' ``create_dynamic_map(signed=True/False)`` ("dynamic tree"
  quantization, Dettmers 2016; 8-bit optimizers, Dettmers et al. 2022). For decade
  ``k = 0..6`` the map holds the midpoints of ``n_k`` equal steps of ``[0.1, 1]`` scaled by
  ``10**(k-6)``, with ``n_k = 2**k`` (signed, mirrored to negative values) or
  ``2**(k+1)`` (unsigned), plus ``0`` and ``1``. It covers 7 decades with ~2-3 significant
  digits: the smallest non-zero magnitude is ``3.25e-7`` (unsigned) or ``5.5e-7``
  (signed) of the block absmax. The signed map has 127 negative values and 128 positive
  ones (``1.0`` is there, ``-1.0`` is not: the most negative value is ``-0.99296875``).
* :func:`linear_map`: bitsandbytes' ``create_linear_map``, equal steps. Documented for
  comparison only: as a second-moment map it rounds every ``v < absmax/510`` to 0, and
  Adam's step ``m / (sqrt(0) + eps)`` then explodes (shown in the tests).

The state leaf is :class:`QuantizedArray`: codes shaped like the params leaf, scales of
:func:`scale_shape`; ``block_size`` is the optimizer's static configuration. (The first 8-bit
layout kept 1-D codes and scales of the same blocks: :func:`as_layout` reshapes them.)

Example:

  >>> import jax.numpy as jnp
  >>> from adamx._quantize import SIGNED_DYNAMIC_MAP, quantize, dequantize
  >>> x = jnp.array([[0.0, -0.5], [0.25, 2.0]])
  >>> q = quantize(x, SIGNED_DYNAMIC_MAP, block_size=256)
  >>> q.codes.dtype, q.codes.shape, q.scales.tolist()
  (dtype('uint8'), (2, 2), [2.0])
  >>> dequantize(q, SIGNED_DYNAMIC_MAP, x.shape, block_size=256).tolist()  # 0 and the absmax are exact
  [[0.0, -0.49531251192092896], [0.2421875, 2.0]]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adamx._types import Leaf

DEFAULT_BLOCK_SIZE = 256
FLT_MIN = float(np.finfo(np.float32).tiny)  # 2**-126, the smallest normal float32


def _dynamic_map(signed: bool, exponent_bits: int = 7) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``, in float64 rounded once."""
    values: list[float] = [0.0, 1.0]
    for k in range(exponent_bits):
        n = 2**k if signed else 2 ** (k + 1)
        bounds = np.linspace(0.1, 1.0, n + 1, dtype=np.float64)
        means = (bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (k - (exponent_bits - 1))
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    out = np.sort(np.asarray(values, dtype=np.float64)).astype(np.float32)
    assert out.shape == (256,) and bool(np.all(np.diff(out) > 0)), "dynamic map must be 256 strictly increasing values"
    return out


def linear_map(signed: bool) -> np.ndarray:
    """bitsandbytes' ``create_linear_map(signed, total_bits=8, add_zero=True)``: equal steps.

    Unsigned: ``linspace(0, 1, 256)``. Signed: ``linspace(-1, 1, 255)`` (which holds 0)
    with a second 0 inserted in the middle to fill 256 codes. For comparison only; see
    the module docstring.

    >>> m = linear_map(signed=False)
    >>> m.shape, float(m[1])
    ((256,), 0.003921568859368563)
    """
    if not signed:
        return np.linspace(0.0, 1.0, 256, dtype=np.float64).astype(np.float32)
    v = np.linspace(-1.0, 1.0, 255, dtype=np.float64).astype(np.float32)
    return np.concatenate([v[:127], np.zeros(1, np.float32), v[127:]])


SIGNED_DYNAMIC_MAP: np.ndarray = _dynamic_map(signed=True)
"""First-moment map: 256 sorted float32 values in ``[-0.99296875, 1]`` (bitsandbytes ``create_dynamic_map(True)``)."""
UNSIGNED_DYNAMIC_MAP: np.ndarray = _dynamic_map(signed=False)
"""Second-moment map: 256 sorted float32 values in ``[0, 1]`` (bitsandbytes ``create_dynamic_map(False)``)."""
SIGNED_DYNAMIC_MAP.setflags(write=False)
UNSIGNED_DYNAMIC_MAP.setflags(write=False)


def midpoints(code: Leaf) -> np.ndarray:
    """The 255 decision thresholds ``(code[j] + code[j+1]) * 0.5`` in float32 (as the C++ header computes them)."""
    c = _check_code(code)
    return (c[:-1] + c[1:]) * np.float32(0.5)


def zero_code(code: Leaf) -> int:
    """The code that ``0.0`` encodes to; it decodes to exactly 0 (the first 0 if the map has two).

    >>> zero_code(SIGNED_DYNAMIC_MAP), zero_code(UNSIGNED_DYNAMIC_MAP)
    (127, 0)
    """
    c = _check_code(code)
    z = int(np.searchsorted(midpoints(c), np.float32(0.0), side="left"))
    if c[z] != 0:
        raise ValueError("`code` must contain 0.0 (zeros must be exact)")
    return z


def encoder_table(code: Leaf) -> np.ndarray | None:
    """The nearest-code search as one table lookup and one compare (``TableEncoder`` of
    ``adamx/_quant8.h``, the same table): ``None`` for a map where it is not exact.

    Bucket ``k`` = the top 16 bits of a float32 ``y``; ``entry[k] = lo << 16 | t`` with ``lo``
    the code of the bucket's lowest value and ``t`` the low 16 bits of the one midpoint in the
    bucket (complemented for a negative bucket), ``0xffff`` for none; then
    ``code(y) = (entry >> 16) + ((entry & 0xffff) < s(y))``, ``s(y)`` = the low 16 bits of ``y``
    (complemented when negative). Exact for every non-NaN ``y`` when every bucket holds at most
    one midpoint, a normal float of the bucket (true for both dynamic maps; checked here).
    Under ``jit`` a lookup compiles far faster than ``searchsorted``'s 8 dependent gathers
    (about 0.1 s per quantized leaf otherwise), and runs as fast.
    """
    c = _check_code(code)
    key = c.tobytes()
    if key not in _TABLES:
        _TABLES[key] = _build_encoder_table(c)
    return _TABLES[key]


_TABLES: dict[bytes, np.ndarray | None] = {}


def _build_encoder_table(c: np.ndarray) -> np.ndarray | None:
    mids = midpoints(c)
    zero = zero_code(c)
    k = np.arange(65536, dtype=np.uint32)
    negative = (k & 0x8000) != 0
    b0, b1 = (k << 16).view(np.float32), ((k << 16) | 0xFFFF).view(np.float32)
    lo_v, hi_v = np.where(negative, b1, b0), np.where(negative, b0, b1)  # the bucket's min and max
    with np.errstate(invalid="ignore"):
        enc_lo = np.searchsorted(mids, lo_v, side="left")
        enc_hi = np.searchsorted(mids, hi_v, side="left")
    nan_lo, nan_hi = np.isnan(lo_v), np.isnan(hi_v)
    lo = np.where(nan_lo, np.where(nan_hi, zero, enc_hi), enc_lo).astype(np.int64)
    hi = np.where(nan_hi, lo, enc_hi).astype(np.int64)
    if np.any(hi > lo + 1):
        return None
    one = hi == lo + 1
    mid_bits = mids[np.minimum(lo, 254)].view(np.uint32)
    if np.any(one & (((mid_bits >> 16) != k) | ((k & 0x7F80) == 0))):
        return None  # the midpoint must be a normal float of its bucket
    t = np.where(one, (mid_bits & 0xFFFF) ^ np.where(negative, 0xFFFF, 0), 0xFFFF).astype(np.uint32)
    table = (lo.astype(np.uint32) << 16) | t
    table.setflags(write=False)
    return table


def encode_with_table(y: jax.Array, table: jax.Array, zero: int) -> jax.Array:
    """The codes (int32) of float32 ``y`` through :func:`encoder_table`'s ``table``; NaN -> ``zero``."""
    u = jax.lax.bitcast_convert_type(y, jnp.uint32)
    e = table[(u >> 16).astype(jnp.int32)]
    s = (u & 0xFFFF) ^ jnp.where((u >> 31) != 0, jnp.uint32(0xFFFF), jnp.uint32(0))
    idx = (e >> 16) + ((e & 0xFFFF) < s).astype(jnp.uint32)
    return jnp.where(jnp.isnan(y), zero, idx.astype(jnp.int32))


def max_error(code: Leaf) -> float:
    """Worst-case ``|y - code[nearest(y)]|`` over ``y`` in ``[-1, 1]`` (signed map) or ``[0, 1]``.

    Half the largest gap between neighbouring codes, or the distance from the range
    end (``±1``, ``0``) to the nearest code if that is larger. The round-trip error of a
    block is at most ``max_error(code) * scale`` (plus float32 rounding of the scale).

    >>> round(max_error(SIGNED_DYNAMIC_MAP), 7), round(max_error(UNSIGNED_DYNAMIC_MAP), 7)
    (0.0070313, 0.0035156)
    """
    c = _check_code(code).astype(np.float64)
    lo = -1.0 if c[0] < 0 else 0.0
    return float(max(np.max(np.diff(c)) / 2.0, c[0] - lo, 1.0 - c[-1]))


def _check_code(code: Leaf) -> np.ndarray:
    c = np.asarray(code)
    if c.shape != (256,) or c.dtype != np.float32:
        raise ValueError(f"`code` must be a float32 array of shape (256,), got {c.dtype}{list(c.shape)}")
    if not (np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0) and c[0] >= -1 and c[-1] <= 1):
        raise ValueError("`code` must be sorted (non-decreasing) finite values in [-1, 1]")
    return c


def _check_block_size(block_size: Leaf) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
    return int(block_size)


class QuantizedArray(NamedTuple):
    """An 8-bit state leaf: one code per element, one scale per block. Field names are the checkpoint format.

    ``codes`` has the shape of the params leaf this state belongs to; ``scales`` has
    :func:`scale_shape` of it (blocks of ``block_size`` consecutive elements in C order, the
    block size being the optimizer's static configuration). Being a NamedTuple of two arrays, it is a pytree:
    ``jax.tree`` maps, ``jit``, ``vmap`` and Orbax see two plain arrays.
    """

    codes: jax.Array  # shape=params leaf's, dtype=uint8; index into the code map
    scales: jax.Array  # shape=scale_shape(leaf shape, block_size), dtype=float32; block absmax


def num_blocks(size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """``ceil(size / block_size)``: the number of scales of a leaf with ``size`` elements."""
    return -(-int(size) // _check_block_size(block_size))


# ------------------------------------------------------------------ the dynamic maps by arithmetic
#
# Map structure (bitsandbytes' dynamic map): besides 0 and 1, the magnitude with index r >= 1
# (r = code - 127 or 127 - code signed, r = code + 1 unsigned) has n = 2**floor(log2 r),
# j = r - n, decade k = log2(n) - shift (shift 0 signed, 1 unsigned), and value
# (0.1 + 0.9 (j + 1/2) / n) * 10**(k-6) = N * A_k with the integer N = 2n + 18j + 9 and
# A_k = 10**(k-7) / (2n). With A_k = hi_k + lo_k, hi_k of 12 significant bits, N * hi_k is exact
# in float32 (N < 2**12), so N * hi_k + N * lo_k rounds once whether or not a backend contracts it
# into an FMA: both roundings equal the map for all 256 codes (checked at import, below).
# Encoding compares |y| with the 8 midpoints between decades (exact, they are the map's own
# float32 midpoints) to find the decade, estimates j a little low from |y| * 10**(7-k), and
# corrects the estimate by one step up against the intra-decade midpoint above it, computed as
# the map's: (v_j + v_{j+1}) * 0.5 in float32. Ties go to the lower code, as searchsorted's.


def _decade_constants(signed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    shift = 0 if signed else 1
    m = SIGNED_DYNAMIC_MAP if signed else UNSIGNED_DYNAMIC_MAP
    mids = midpoints(m)
    hi, lo = np.zeros(7, np.float32), np.zeros(7, np.float32)
    for k in range(7):
        n = 2 ** (k + shift)
        a = 10.0 ** (k - 7) / (2 * n)
        q = 2.0 ** (np.floor(np.log2(a)) - 11)
        hi[k] = np.float32(np.round(a / q) * q)
        lo[k] = np.float32(a - float(hi[k]))
        for j in range(n):  # both roundings (FMA or not) give the map's value
            big = np.float32(2 * n + 18 * j + 9)
            want = m[(127 + n + j) if signed else (n + j - 1)]
            plain = np.float32(big * hi[k]) + np.float32(big * lo[k])
            fused = np.float32(float(big) * float(hi[k]) + float(big) * float(lo[k]))
            assert float(big) * float(hi[k]) == float(np.float32(big * hi[k])) and plain == want and fused == want
    first = [(127 + 2**k) if signed else (2 ** (k + 1) - 1) for k in range(7)]
    bounds = np.array([mids[f - 1] for f in first] + [mids[254]], np.float32)  # below decade k, and below 1.0
    inv = np.array([10.0 ** (7 - k) for k in range(7)], np.float32)  # exact integers
    return hi, lo, bounds, inv


_DECADES = {s: _decade_constants(s) for s in (True, False)}


def _dynamic_kind(code: np.ndarray) -> bool | None:
    """``True``/``False`` for the signed/unsigned dynamic map, ``None`` for another map."""
    for signed, m in ((True, SIGNED_DYNAMIC_MAP), (False, UNSIGNED_DYNAMIC_MAP)):
        if code is m or np.array_equal(code.view(np.uint32), m.view(np.uint32)):
            return signed
    return None


def _pick(k: jax.Array, table: np.ndarray) -> jax.Array:
    """``table[k]`` for a 7-entry constant by selects (a gather of a small table is slow on TPU)."""
    out = jnp.full(k.shape, table[0], table.dtype)
    for i in range(1, len(table)):
        out = jnp.where(k == i, table[i], out)
    return out


def _magnitude(n: jax.Array, j: jax.Array, hi: jax.Array, lo: jax.Array) -> jax.Array:
    big = (2 * n + 18 * j + 9).astype(jnp.float32)
    return big * hi + big * lo


def dynamic_decode(codes: jax.Array, signed: bool) -> jax.Array:
    """``SIGNED_DYNAMIC_MAP[codes]`` (or the unsigned map's) by arithmetic: float32 values, exactly the map's.

    >>> bool(jnp.all(dynamic_decode(jnp.arange(256), True) == SIGNED_DYNAMIC_MAP))
    True
    """
    hi_t, lo_t, _, _ = _DECADES[signed]
    c = codes.astype(jnp.int32)
    r = jnp.abs(c - 127) if signed else c + 1
    e = (jax.lax.bitcast_convert_type(jnp.maximum(r, 1).astype(jnp.float32), jnp.int32) >> 23) - 127  # floor(log2 r)
    n = jnp.left_shift(jnp.int32(1), e)
    k = jnp.clip(e - (0 if signed else 1), 0, 6)
    v = _magnitude(n, r - n, _pick(k, hi_t), _pick(k, lo_t))
    zero, one = (127, 255) if signed else (0, 255)
    if signed:
        v = jnp.where(c < 127, -v, v)
    return jnp.where(c == zero, jnp.float32(0), jnp.where(c == one, jnp.float32(1), v))


def dynamic_encode(y: jax.Array, signed: bool) -> jax.Array:
    """The nearest code of float32 ``y`` in the signed/unsigned dynamic map (int32; ties to the lower
    code; NaN to the code of 0): the codes of ``searchsorted(midpoints(map), y)``, by arithmetic.

    >>> dynamic_encode(jnp.array([0.0, 1.0, -0.5, 0.2421875]), True).tolist()
    [127, 255, 35, 201]
    """
    hi_t, lo_t, bounds, inv = _DECADES[signed]
    shift = 0 if signed else 1
    y = y.astype(jnp.float32)
    a = jnp.abs(y)
    neg = jnp.signbit(y)
    if signed:
        # a negative value's tie goes to the larger magnitude (the lower code): compare the next
        # float up instead, since a >= t <=> next_up(a) > t (for finite a; NaN stays NaN)
        up_one = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(a, jnp.int32) + 1, jnp.float32)
        a = jnp.where(neg & (a < jnp.float32(np.inf)), up_one, a)
    # decade: how many decade bounds lie below |y| (the signed map has no -1.0: a negative value
    # stops at decade 6)
    big = sum((a > t).astype(jnp.int32) for t in bounds)
    k = jnp.clip(big - 1, 0, 6)
    n = jnp.left_shift(jnp.int32(1), k + shift)
    nf = n.astype(jnp.float32)
    # the index within the decade, estimated a little low (by 2**-8, far above the float32 errors
    # of the estimate, ~1e-4): it is the nearest code's or one below, and one step up corrects it
    t = (a * _pick(k, inv) - jnp.float32(1)) * (nf * np.float32(1.0 / 9.0)) - jnp.float32(2.0**-8)
    j0 = jnp.clip(jnp.floor(t), 0, nf - 1).astype(jnp.int32)
    hi, lo = _pick(k, hi_t), _pick(k, lo_t)
    mid = (_magnitude(n, j0, hi, lo) + _magnitude(n, j0 + 1, hi, lo)) * jnp.float32(0.5)
    r = n + j0 + ((j0 <= n - 2) & (a > mid)).astype(jnp.int32)
    if signed:
        c = jnp.where(neg, 127 - r, 127 + r)
        return jnp.where(big == 0, 127, jnp.where((big == 8) & ~neg, 255, c))
    c = jnp.where(big == 0, 0, jnp.where(big == 8, 255, r - 1))
    return jnp.where(neg, 0, c)  # a negative value's nearest code in [0, 1] is 0


def scale_shape(shape: Leaf, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, ...]:
    """The shape of a leaf's block scales: blocks are ``block_size`` consecutive elements in C order.

    Where the last axes hold whole blocks (``prod(shape[a:]) % block_size == 0`` for some axis ``a``;
    the largest such ``a`` is taken), the scales keep the leading axes: ``shape[:a] +
    (prod(shape[a:]) // block_size,)``, so a sharding of the leading axes (or of axis ``a`` in whole
    blocks) applies to the scales as it does to the codes, and no block straddles a shard.
    Otherwise (the size is not a multiple of the block size) the last block is partial and the
    scales are 1-D: ``(ceil(size / block_size),)``.

    >>> scale_shape((768, 2304)), scale_shape((3, 3, 64, 128)), scale_shape((50, 100))
    ((768, 9), (3, 3, 32), (20,))
    """
    bs = _check_block_size(block_size)
    shape = _shape_of(shape)
    for a in range(len(shape) - 1, -1, -1):
        tail = math.prod(shape[a:])
        if tail % bs == 0:
            return shape[:a] + (tail // bs,)
    return (num_blocks(math.prod(shape), bs),)


def _reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x.reshape(shape)``; on an Explicit mesh where a sharded axis would be cut into blocks that
    its shards do not hold whole, the axes from the first reshaped one on are gathered first (the
    leading axes keep their sharding): correct, with a collective that whole blocks per shard avoid."""
    try:
        return x.reshape(shape)
    except Exception as e:  # jax's ShardingTypeError (not public)
        if type(e).__name__ != "ShardingTypeError":
            raise
    sh = jax.typeof(x).sharding
    in_spec = tuple(sh.spec) + (None,) * (x.ndim - len(tuple(sh.spec)))
    n = _shards(sh.mesh, in_spec[0]) if in_spec else 1
    if in_spec and in_spec[0] is not None and not any(in_spec[1:]) and shape and shape[0] % n == 0:
        # split along the major axis only, in and out: both cut the C-order elements into the same
        # n contiguous runs, so the output keeps the split with no data moved
        spec = jax.sharding.PartitionSpec(in_spec[0], *([None] * (len(shape) - 1)))
        return jax.lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(sh.mesh, spec))
    keep = 0
    while keep < min(len(shape), x.ndim) and shape[keep] == x.shape[keep]:
        keep += 1
    spec = jax.sharding.PartitionSpec(*tuple(sh.spec)[:keep], *([None] * (len(shape) - keep)))
    return jax.lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(sh.mesh, spec))


def major_split(x: Leaf, n: int) -> jax.sharding.NamedSharding | None:
    """The sharding of a 1-D state array of ``n`` elements kept for leaf ``x`` (blocks in C order):
    ``P(a)`` where ``x`` is split on an Explicit mesh along its first axis alone, by ``a``, into
    ``k`` pieces with ``k`` dividing ``n`` (each device then holds the blocks of its own rows,
    as :func:`_reshape` keeps them), else ``None`` (unsplit)."""
    if not isinstance(x, jax.Array):
        return None
    sh = jax.typeof(x).sharding
    if not _explicit(sh) or x.ndim == 0:
        return None
    spec = tuple(sh.spec) + (None,) * (x.ndim - len(tuple(sh.spec)))
    if spec[0] is None or any(e is not None for e in spec[1:]) or n % _shards(sh.mesh, spec[0]):
        return None
    return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(spec[0]))


def _shards(mesh: Any, entry: Any) -> int:
    """How many pieces a ``PartitionSpec`` entry (an axis name, a tuple of them, or ``None``) cuts into."""
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    return math.prod(mesh.shape[a] for a in names)


def blocks_of(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` as ``scale_shape + (block_size,)`` (whole blocks: a reshape of its last axes; else ravel and pad)."""
    ss = scale_shape(x.shape, block_size)
    n = x.size
    if math.prod(ss) * block_size == n:
        return _reshape(x, ss + (block_size,))
    return jnp.pad(_reshape(x, (n,)), (0, math.prod(ss) * block_size - n)).reshape(ss + (block_size,))


def _unblocks(b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    n = math.prod(shape)
    if b.size == n:
        return _reshape(b, shape)
    return _reshape(_reshape(b, (b.size,))[:n], shape)


def _abs_bits(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) & jnp.int32(0x7FFFFFFF)
    return jnp.where(bits < jnp.int32(0x00800000), jnp.int32(0), bits)  # |x| < FLT_MIN counts as 0


def _scale_of(top: jax.Array) -> jax.Array:
    return jnp.where(top > jnp.int32(0x7F800000), jnp.float32(jnp.nan), jax.lax.bitcast_convert_type(top, jnp.float32))


def block_absmax(x: jax.Array, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """Each block's largest magnitude (:func:`scale_shape`), ``NaN`` if the block holds a NaN, subnormals as 0.

    One integer max over the float32 bit patterns with the sign bit cleared: for non-negative floats
    the integer order is the float order, and every NaN pattern is above ``inf``'s, so one reduce
    both finds the maximum and propagates NaN (a float max does not reliably on XLA:CPU).
    """
    return _absmax_of_blocks(blocks_of(x, block_size))


def _absmax_of_blocks(blocks: jax.Array) -> jax.Array:
    """:func:`block_absmax` of values already cut into blocks (last axis).

    (A strided window max over the unblocked leaf was tried for the TPU: its compiler then moved
    184 instead of 128 bytes a parameter; benchmarks/results/accelerator.md.)
    """
    return _scale_of(jnp.max(_abs_bits(blocks), axis=-1))


def quantize(
    x: Leaf, code: Leaf, block_size: int = DEFAULT_BLOCK_SIZE, scales: jax.Array | None = None, lanes: bool = False
) -> QuantizedArray:
    """Block-wise absmax quantization of ``x`` (any shape; any float dtype, cast to float32).

    ``code`` is a map of 256 sorted float32 values (a NumPy constant such as
    :data:`SIGNED_DYNAMIC_MAP`); the scheme is in the module docstring. Pure JAX:
    jittable, vmappable, and shardable like ``x`` (see :func:`scale_shape`). The two dynamic
    maps encode by arithmetic (:func:`dynamic_encode`: no gather, no table); another map by
    ``searchsorted`` over its midpoints (the same codes).

    ``scales``: :func:`block_absmax` of ``x``, computed beforehand (the accelerator step computes
    it in a pass of its own, so that the float32 ``x`` is never written to memory); by default
    computed here. ``lanes`` (the TPU step): where :func:`lane_blocks` allows, every block is
    read and scaled in ``x``'s own shape by static slices and selects along its last axis, with
    no reshape (a reshape into blocks is a relayout copy on a TPU). Same codes and scales.

    Returns ``QuantizedArray(codes uint8 shaped like x, scales float32[scale_shape(x.shape)])``.
    """
    c = _check_code(code)
    bs = _check_block_size(block_size)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be a floating array, got dtype {x.dtype}")
    shape = tuple(x.shape)
    lanes = lanes and lanes_apply(x, bs)
    in_place = lanes or (scales is not None and _whole_blocks(shape, bs))
    # the accelerator step (scales given) stays in x's shape: codes written over the old codes
    # in place (a blocked output is another shape, and XLA would copy it back)
    blocks = x.astype(jnp.float32) if in_place else blocks_of(x.astype(jnp.float32), bs)
    blocks = jnp.where(jnp.abs(blocks) < FLT_MIN, jnp.float32(0), blocks)  # subnormal inputs count as 0
    if scales is None:
        scales = lane_absmax(blocks, bs) if lanes else _absmax_of_blocks(blocks)
    divisor = jnp.where(scales == 0, jnp.float32(1), scales)
    # multiply by the reciprocal: XLA rewrites a division by a broadcast into this anyway under
    # jit (eagerly it would not); written out, eager, jit, C++ and NumPy all agree
    inv = jnp.float32(1) / divisor
    y = blocks * (_per_element(inv, shape, bs, lanes) if in_place else inv[..., None])
    signed = _dynamic_kind(c)
    if signed is not None:
        idx = dynamic_encode(y, signed)
    else:
        idx = jnp.searchsorted(jnp.asarray(midpoints(c)), y, side="left", method="scan_unrolled")
        idx = jnp.where(jnp.isnan(y), zero_code(c), idx)
    return QuantizedArray(_like(_unblocks(idx.astype(jnp.uint8), shape), x), scales)


def _explicit(sharding: Any) -> bool:
    """Whether ``sharding`` is over a mesh with an Explicit axis."""
    mesh = getattr(sharding, "mesh", None)
    return mesh is not None and any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _gather(code: np.ndarray, codes: jax.Array) -> jax.Array:
    """``code[codes]``, split like ``codes`` (on an Explicit mesh the gather must be told so)."""
    sharding = jax.typeof(codes).sharding
    if not _explicit(sharding):
        return jnp.asarray(code)[codes.astype(jnp.int32)]
    return jnp.asarray(code).at[codes.astype(jnp.int32)].get(out_sharding=sharding)


def _whole_blocks(shape: tuple[int, ...], block_size: int) -> bool:
    """Whether a leaf of ``shape`` is cut into blocks by a reshape of its last axes (no padding)."""
    return math.prod(scale_shape(shape, block_size)) * block_size == math.prod(shape)


def _per_element(s: jax.Array, shape: tuple[int, ...], block_size: int, lanes: bool = False) -> jax.Array:
    """A per-block array ``s`` (:func:`scale_shape`) repeated over each block's elements, in ``shape``.

    ``lanes``: by one select per block of a row along the last axis (elementwise, fused by every
    compiler), instead of a broadcast and a reshape (a relayout on a TPU).
    """
    if not lanes:
        return _reshape(jnp.broadcast_to(s[..., None], s.shape + (block_size,)), shape)
    block = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) // block_size
    out = jnp.broadcast_to(s[..., :1], shape)
    for j in range(1, s.shape[-1]):
        out = jnp.where(block == j, s[..., j : j + 1], out)
    return out


LANE_BLOCKS_MAX = 32
"""The most blocks per row that the ``lanes`` formulation takes (one select per block and element)."""


def lane_blocks(shape: tuple[int, ...], block_size: int) -> int:
    """Blocks per row along the last axis where a leaf of ``shape`` keeps its leading axes in its
    scales (:func:`scale_shape`) and has at most :data:`LANE_BLOCKS_MAX` of them, else 0."""
    shape = tuple(shape)
    ss = scale_shape(shape, block_size)
    if len(shape) < 2 or len(ss) != len(shape) or shape[-1] != ss[-1] * block_size:
        return 0
    return ss[-1] if ss[-1] <= LANE_BLOCKS_MAX else 0


def lanes_apply(x: jax.Array, block_size: int) -> bool:
    """Whether the ``lanes`` formulation takes ``x`` (:func:`lane_blocks`), and its last axis is known
    whole on each device: not split on an Explicit mesh, and no multi-device mesh with other axis
    types in context (there XLA may split it, and a slice of a split axis costs collectives)."""
    if lane_blocks(tuple(x.shape), block_size) == 0:
        return False
    sharding = jax.typeof(x).sharding
    if _explicit(sharding):
        spec = tuple(sharding.spec)
        return len(spec) < x.ndim or spec[x.ndim - 1] is None
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def lane_absmax(x: jax.Array, block_size: int) -> jax.Array:
    """:func:`block_absmax` of a leaf that :func:`lane_blocks` takes, by static slices of its last axis
    (no reshape): the same integer max over the bit patterns, per block."""
    x = x.astype(jnp.float32)
    bits = _abs_bits(x)
    n = x.shape[-1] // block_size
    return _scale_of(jnp.stack([jnp.max(bits[..., j * block_size : (j + 1) * block_size], -1) for j in range(n)], -1))


def _like(codes: jax.Array, x: jax.Array) -> jax.Array:
    """``codes`` with ``x``'s sharding on an Explicit mesh (blocks that straddle shards were gathered)."""
    want = jax.typeof(x).sharding
    if not _explicit(want):
        return codes
    if tuple(jax.typeof(codes).sharding.spec) == tuple(want.spec):
        return codes
    return jax.sharding.reshard(codes, jax.sharding.NamedSharding(want.mesh, want.spec))


def dequantize(
    q: QuantizedArray,
    code: Leaf,
    shape: Leaf,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: Leaf = jnp.float32,
    lookup: str | None = None,
) -> jax.Array:
    """``code[codes] * scale`` per block, in ``shape`` (an int tuple, or a leaf whose ``.shape`` is used).

    Results below the smallest normal float32 are 0 (as on XLA's CPU backend, which
    flushes subnormals; written out so that every backend and the C++ kernel agree).
    Takes the first 8-bit layout too (1-D codes and scales, see :func:`as_layout`).

    ``lookup`` (the accelerator steps; the same values): ``None`` decodes block by block,
    ``"table"`` or ``"arithmetic"`` in the leaf's own shape by a gather from the map or by
    :func:`dynamic_decode` (a gather fuses into XLA:GPU's reductions, arithmetic into an update
    that writes the codes in place: XLA copies an output that a gather indexes by); ``"lanes"``
    by :func:`dynamic_decode` with the scales spread by selects (see :func:`quantize`).
    """
    c = _check_code(code)
    bs = _check_block_size(block_size)
    shape = _shape_of(shape)
    codes, scales = as_layout(q, shape, bs)
    signed = _dynamic_kind(c)
    lanes = lookup == "lanes" and lanes_apply(codes, bs)
    if lanes or (lookup in ("table", "arithmetic") and _whole_blocks(shape, bs)):  # in the leaf's shape
        if signed is None or lookup == "table":
            v = _gather(c, codes)
        else:
            v = dynamic_decode(codes, signed)
        values = v * _per_element(scales.astype(jnp.float32), shape, bs, lanes)
        return jnp.where(jnp.abs(values) < FLT_MIN, jnp.float32(0), values).astype(dtype)
    values = dynamic_decode(codes, signed) if signed is not None else jnp.asarray(c)[codes.astype(jnp.int32)]
    values = blocks_of(values, bs) * scales.astype(jnp.float32)[..., None]
    values = jnp.where(jnp.abs(values) < FLT_MIN, jnp.float32(0), values)
    return _unblocks(values, shape).astype(dtype)


def as_layout(q: QuantizedArray, shape: Leaf, block_size: int = DEFAULT_BLOCK_SIZE) -> QuantizedArray:
    """``q`` in the current layout for a leaf of ``shape``: codes shaped like the leaf, scales of
    :func:`scale_shape`. A state of the first 8-bit layout (codes ``uint8[n]``, scales
    ``float32[ceil(n / block_size)]``; the same blocks in the same order) is reshaped; anything
    else is a ``ValueError``."""
    shape = _shape_of(shape)
    n = math.prod(shape)
    ss = scale_shape(shape, block_size)
    codes, scales = q
    if tuple(codes.shape) == shape and tuple(scales.shape) == ss:
        return QuantizedArray(codes, scales)
    if tuple(codes.shape) in {(n,), shape} and tuple(scales.shape) in {(math.prod(ss),), ss}:
        return QuantizedArray(codes.reshape(shape), scales.reshape(ss))
    raise ValueError(
        f"QuantizedArray of codes{list(codes.shape)}, scales{list(scales.shape)} does not fit shape {list(shape)} "
        f"with block_size={block_size} (expected codes{list(shape)}, scales{list(ss)})"
    )


def _shape_of(shape_or_leaf: Leaf) -> tuple[int, ...]:
    if hasattr(shape_or_leaf, "shape"):
        return tuple(int(d) for d in shape_or_leaf.shape)
    if isinstance(shape_or_leaf, (int, np.integer)):
        return (int(shape_or_leaf),)
    try:
        return tuple(int(d) for d in shape_or_leaf)
    except TypeError:
        raise TypeError(f"expected a shape (tuple of ints) or an array-like leaf, got {shape_or_leaf!r}") from None


def quantized_zeros(shape_or_leaf: Leaf, code: Leaf, block_size: int = DEFAULT_BLOCK_SIZE) -> QuantizedArray:
    """The quantized zero state for a leaf: equal, bit for bit, to ``quantize(zeros(shape), code, block_size)``.

    ``shape_or_leaf``: a shape, or any object with ``.shape`` (an array, a
    ``jax.ShapeDtypeStruct``). The code map is needed because the code of 0 differs
    between maps (127 signed, 0 unsigned).

    >>> q = quantized_zeros((3, 100), UNSIGNED_DYNAMIC_MAP, block_size=256)
    >>> q.codes.shape, q.scales.shape
    ((3, 100), (2,))
    """
    bs = _check_block_size(block_size)
    shape = _shape_of(shape_or_leaf)
    if isinstance(shape_or_leaf, jax.Array):  # an array or tracer: the state takes its sharding
        codes = jnp.full_like(shape_or_leaf, zero_code(code), dtype=jnp.uint8)
        return QuantizedArray(codes, jnp.zeros_like(block_absmax(jnp.zeros_like(codes, jnp.float32), bs)))
    return QuantizedArray(jnp.full(shape, zero_code(code), jnp.uint8), jnp.zeros(scale_shape(shape, bs), jnp.float32))


def quantized_nbytes(size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of one quantized leaf of ``size`` elements: ``size + 4 * ceil(size / block_size)``."""
    return int(size) + 4 * num_blocks(size, block_size)


def tree_nbytes(tree: Leaf) -> int:
    """Total ``nbytes`` of the array leaves of a pytree (``QuantizedArray`` counts its codes and scales)."""
    return int(sum(int(np.dtype(leaf.dtype).itemsize) * int(leaf.size) for leaf in jax.tree.leaves(tree)))


def bytes_per_param(state: Leaf, params: Leaf) -> float:
    """Measured state bytes divided by the number of parameters.

    >>> p = {"w": jnp.zeros((512, 512))}
    >>> m = {"w": quantized_zeros(p["w"], SIGNED_DYNAMIC_MAP)}
    >>> bytes_per_param(m, p)  # 1 byte code + 4 bytes per 256 elements
    1.015625
    """
    n = sum(int(leaf.size) for leaf in jax.tree.leaves(params))
    if n == 0:
        raise ValueError("`params` has no elements")
    return tree_nbytes(state) / n
