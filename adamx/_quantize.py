r"""Block-wise 8-bit quantization of optimizer state (the scheme only; no optimizer wiring).

An 8-bit moment is stored as one ``uint8`` code per element and one float32 scale per
block of ``block_size`` consecutive elements (of the flattened leaf). The code indexes a
sorted map of 256 float32 values in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned):

.. code-block:: text

    blocks    = pad(ravel(x), to a multiple of block_size with 0).reshape(-1, block_size)
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

The same scheme is written in C++ in ``adamx/_quant8.h`` (for the fused CPU kernel) and
in NumPy in ``tests/reference_quant.py``; the three agree bit for bit.

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

The state leaf is :class:`QuantizedArray`; the leaf's shape is not stored (the codes
are flat): it is the shape of the params leaf the state belongs to, and ``block_size``
is the optimizer's static configuration.

Example:

  >>> import jax.numpy as jnp
  >>> from adamx._quantize import SIGNED_DYNAMIC_MAP, quantize, dequantize
  >>> x = jnp.array([[0.0, -0.5], [0.25, 2.0]])
  >>> q = quantize(x, SIGNED_DYNAMIC_MAP, block_size=256)
  >>> q.codes.dtype, q.codes.shape, q.scales.tolist()
  (dtype('uint8'), (4,), [2.0])
  >>> dequantize(q, SIGNED_DYNAMIC_MAP, x.shape, block_size=256).tolist()  # 0 and the absmax are exact
  [[0.0, -0.49531251192092896], [0.2421875, 2.0]]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def midpoints(code: Any) -> np.ndarray:
    """The 255 decision thresholds ``(code[j] + code[j+1]) * 0.5`` in float32 (as the C++ header computes them)."""
    c = _check_code(code)
    return (c[:-1] + c[1:]) * np.float32(0.5)


def zero_code(code: Any) -> int:
    """The code that ``0.0`` encodes to; it decodes to exactly 0 (the first 0 if the map has two).

    >>> zero_code(SIGNED_DYNAMIC_MAP), zero_code(UNSIGNED_DYNAMIC_MAP)
    (127, 0)
    """
    c = _check_code(code)
    z = int(np.searchsorted(midpoints(c), np.float32(0.0), side="left"))
    if c[z] != 0:
        raise ValueError("`code` must contain 0.0 (zeros must be exact)")
    return z


def encoder_table(code: Any) -> np.ndarray | None:
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


def max_error(code: Any) -> float:
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


def _check_code(code: Any) -> np.ndarray:
    c = np.asarray(code)
    if c.shape != (256,) or c.dtype != np.float32:
        raise ValueError(f"`code` must be a float32 array of shape (256,), got {c.dtype}{list(c.shape)}")
    if not (np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0) and c[0] >= -1 and c[-1] <= 1):
        raise ValueError("`code` must be sorted (non-decreasing) finite values in [-1, 1]")
    return c


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
    return int(block_size)


class QuantizedArray(NamedTuple):
    """An 8-bit state leaf: one code per element, one scale per block. Field names are the checkpoint format.

    ``codes`` is flat (the leaf ravelled, C order); the leaf's shape is the shape of the
    params leaf this state belongs to, and the block size is the optimizer's static
    configuration, so neither is stored. Being a NamedTuple of two arrays, it is a pytree:
    ``jax.tree`` maps, ``jit``, ``vmap`` and Orbax see two plain arrays.
    """

    codes: jax.Array  # shape=(n,), dtype=uint8; index into the code map
    scales: jax.Array  # shape=(ceil(n / block_size),), dtype=float32; block absmax


def num_blocks(size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """``ceil(size / block_size)``: the number of scales of a leaf with ``size`` elements."""
    return -(-int(size) // _check_block_size(block_size))


def quantize(x: Any, code: Any, block_size: int = DEFAULT_BLOCK_SIZE, *, table: Any = None) -> QuantizedArray:
    """Block-wise absmax quantization of ``x`` (any shape, flattened; any float dtype, cast to float32).

    ``code`` is a map of 256 sorted float32 values (a NumPy constant such as
    :data:`SIGNED_DYNAMIC_MAP`); the scheme is in the module docstring. Pure JAX:
    jittable, vmappable (over a leading batch axis of ``x``, giving batched codes and
    scales), and correct on sharded inputs (an elementwise map and a per-block max).

    ``table``: :func:`encoder_table` of ``code`` (as an array), to search by one lookup instead
    of ``searchsorted`` (the same codes; compiles much faster: pass one array to every leaf's
    call under one ``jit``).

    Returns ``QuantizedArray(codes uint8[n], scales float32[ceil(n / block_size)])``.
    """
    c = _check_code(code)
    bs = _check_block_size(block_size)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be a floating array, got dtype {x.dtype}")
    n = x.size
    nb = num_blocks(n, bs)
    flat = jnp.ravel(x).astype(jnp.float32)
    flat = jnp.where(jnp.abs(flat) < FLT_MIN, jnp.float32(0), flat)
    blocks = jnp.pad(flat, (0, nb * bs - n)).reshape(nb, bs)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # XLA's vectorized CPU reduce-max does not reliably propagate NaN (it did for 256-element blocks, not 2048)
    scales = jnp.where(jnp.any(jnp.isnan(blocks), axis=1), jnp.float32(jnp.nan), absmax)
    divisor = jnp.where(scales == 0, jnp.float32(1), scales)
    # multiply by the reciprocal: XLA rewrites a division by a broadcast into this anyway under
    # jit (eagerly it would not); written out, eager, jit, C++ and NumPy all agree
    y = blocks * (jnp.float32(1) / divisor)[:, None]
    if table is not None:
        idx = encode_with_table(y, table, zero_code(c))
    else:
        idx = jnp.searchsorted(jnp.asarray(midpoints(c)), y, side="left", method="scan_unrolled")
        idx = jnp.where(jnp.isnan(y), zero_code(c), idx)
    codes = idx.astype(jnp.uint8).reshape(nb * bs)[:n]
    return QuantizedArray(codes, scales)


def dequantize(
    q: QuantizedArray, code: Any, shape: Any, block_size: int = DEFAULT_BLOCK_SIZE, dtype: Any = jnp.float32
) -> jax.Array:
    """``code[codes] * scale`` per block, reshaped to ``shape`` (an int tuple, or a leaf whose ``.shape`` is used).

    Results below the smallest normal float32 are 0 (as on XLA's CPU backend, which
    flushes subnormals; written out so that every backend and the C++ kernel agree).
    """
    c = _check_code(code)
    bs = _check_block_size(block_size)
    shape = _shape_of(shape)
    n = math.prod(shape)
    nb = num_blocks(n, bs)
    codes, scales = q
    if codes.shape != (n,) or scales.shape != (nb,):
        raise ValueError(
            f"QuantizedArray of codes{list(codes.shape)}, scales{list(scales.shape)} does not fit shape {shape} "
            f"with block_size={bs} (expected codes[{n}], scales[{nb}])"
        )
    padded = jnp.pad(codes, (0, nb * bs - n)).reshape(nb, bs)
    values = jnp.asarray(c)[padded.astype(jnp.int32)] * scales.astype(jnp.float32)[:, None]
    values = jnp.where(jnp.abs(values) < FLT_MIN, jnp.float32(0), values)
    return values.reshape(nb * bs)[:n].reshape(shape).astype(dtype)


def _shape_of(shape_or_leaf: Any) -> tuple[int, ...]:
    if hasattr(shape_or_leaf, "shape"):
        return tuple(int(d) for d in shape_or_leaf.shape)
    if isinstance(shape_or_leaf, (int, np.integer)):
        return (int(shape_or_leaf),)
    try:
        return tuple(int(d) for d in shape_or_leaf)
    except TypeError:
        raise TypeError(f"expected a shape (tuple of ints) or an array-like leaf, got {shape_or_leaf!r}") from None


def quantized_zeros(shape_or_leaf: Any, code: Any, block_size: int = DEFAULT_BLOCK_SIZE) -> QuantizedArray:
    """The quantized zero state for a leaf: equal, bit for bit, to ``quantize(zeros(shape), code, block_size)``.

    ``shape_or_leaf``: a shape, or any object with ``.shape`` (an array, a
    ``jax.ShapeDtypeStruct``). The code map is needed because the code of 0 differs
    between maps (127 signed, 0 unsigned).

    >>> q = quantized_zeros((3, 100), UNSIGNED_DYNAMIC_MAP, block_size=256)
    >>> q.codes.shape, q.scales.shape
    ((300,), (2,))
    """
    bs = _check_block_size(block_size)
    n = math.prod(_shape_of(shape_or_leaf))
    return QuantizedArray(jnp.full((n,), zero_code(code), jnp.uint8), jnp.zeros((num_blocks(n, bs),), jnp.float32))


def quantized_nbytes(size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of one quantized leaf of ``size`` elements: ``size + 4 * ceil(size / block_size)``."""
    return int(size) + 4 * num_blocks(size, block_size)


def tree_nbytes(tree: Any) -> int:
    """Total ``nbytes`` of the array leaves of a pytree (``QuantizedArray`` counts its codes and scales)."""
    return int(sum(int(np.dtype(leaf.dtype).itemsize) * int(leaf.size) for leaf in jax.tree.leaves(tree)))


def bytes_per_param(state: Any, params: Any) -> float:
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


def _one_minus(b: float) -> np.float32:
    return np.float32(1.0 - float(b))  # Python-double subtraction rounded once (Keras)


def adam_step_8bit(
    g: jax.Array,
    p: jax.Array,
    m_q: QuantizedArray,
    v_q: QuantizedArray,
    *,
    count: Any,
    learning_rate: Any,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    m_code: Any = SIGNED_DYNAMIC_MAP,
    v_code: Any = UNSIGNED_DYNAMIC_MAP,
) -> tuple[jax.Array, QuantizedArray, QuantizedArray]:
    r"""One Keras-Adam step for one leaf with 8-bit moments: dequantize, step in float32, requantize.

    .. code-block:: text

        m, v    = dequantize(m_q), dequantize(v_q)            # float32
        t       = f32(count + 1)
        alpha   = (lr * sqrt(1 - b2**t)) / (1 - b1**t)        # float32, XLA pow
        m       = m + (g - m) * f32(1 - beta_1)
        v       = v + (g*g - v) * f32(1 - beta_2)
        step    = (m * alpha) / (sqrt(v) + f32(epsilon))      # "epsilon hat", float32 m and v
        updates = -step [- p * weight_decay * lr]  cast to p.dtype
        m_q, v_q = quantize(m, m_code), quantize(v, v_code)

    The step uses this step's float32 moments; only what is stored is rounded (as in
    bitsandbytes). ``count`` is the number of completed steps (int32, may be traced),
    ``learning_rate`` a float or a traced float32 scalar. ``p + updates`` is Keras'
    new parameter. Returns ``(updates, m_q, v_q)``.

    >>> import jax.numpy as jnp
    >>> p = jnp.ones((300,)); g = jnp.full((300,), 0.5)
    >>> m = quantized_zeros(p, SIGNED_DYNAMIC_MAP); v = quantized_zeros(p, UNSIGNED_DYNAMIC_MAP)
    >>> u, m, v = adam_step_8bit(g, p, m, v, count=0, learning_rate=0.001)
    >>> round(float(u[0]), 10)  # Keras' first step: about -lr (float32 1 - beta_2 vs 1 - beta_2**1, SEMANTICS 1.2)
    -0.0009999869
    """
    f32 = jnp.float32
    shape = p.shape
    g32 = jnp.asarray(g).astype(f32)
    p32 = jnp.asarray(p).astype(f32)
    if g32.shape != shape:
        raise ValueError(f"`g` has shape {g32.shape}, params leaf has shape {shape}")
    m = dequantize(m_q, m_code, shape, block_size)
    v = dequantize(v_q, v_code, shape, block_size)
    lr = jnp.asarray(learning_rate, f32)
    t = (jnp.asarray(count, jnp.int32) + 1).astype(f32)
    b1, b2 = f32(beta_1), f32(beta_2)
    b1p, b2p = jnp.power(b1, t), jnp.power(b2, t)
    alpha = (lr * jnp.sqrt(f32(1) - b2p)) / (f32(1) - b1p)
    m = m + (g32 - m) * _one_minus(beta_1)
    v = v + (g32 * g32 - v) * _one_minus(beta_2)
    u = -((m * alpha) / (jnp.sqrt(v) + f32(epsilon)))
    if weight_decay:
        u = u - (p32 * f32(weight_decay)) * lr
    return u.astype(p.dtype), quantize(m, m_code, block_size), quantize(v, v_code, block_size)
