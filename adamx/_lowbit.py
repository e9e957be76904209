r"""fp8 and 4-bit block-wise codecs of optimizer state, as torchao 0.18's ``AdamFp8`` / ``Adam4bit`` store it.

Pure, jittable JAX functions with no optimizer wiring; the codes equal torchao's, bit for bit
(``tests/test_lowbit.py`` against the NumPy reference ``tests/reference_lowbit.py``, which replays the
real torchao in ``tests/test_lowbit_reference.py``). No gathers and no tables: fp8 encodes by a dtype
conversion, the 4-bit maps by compare and select chains over constants, so they compile to plain
elementwise loops on any backend.

Blocks run over the row-major flattening of the tensor, as in torchao: a block may span rows, and the
tensor's size must be a multiple of the block size (torchao keeps a state in float32 when it is not,
or when it has fewer than 4096 elements: :func:`quantizes`).

**fp8** (``AdamFp8``, block 256), both moments:

.. code-block:: text

    scale[b] = max(max_i |x[b, i]|, f32(1e-12)) / 448          # float32, true division
    code     = e4m3fn(x / scale[b])                              # true division; round to nearest, ties to even,
                                                                 # e4m3fn subnormals kept; |x / scale| <= 448
    decode   = f32(code) * scale[b]

**4-bit** (``Adam4bit``, block 128): ``scale[b] = max(max_i |x[b, i]|, f32(1e-12))`` (the absmax itself),
``y = x / scale[b]`` (true division). torchao searches a sorted 16-value map ``q`` for the largest ``c``
with ``q[c] <= y`` (0 if none) and then takes ``c + 1`` (at most 15) when
``y - q[c] >= (q[c+1] - q[c]) * 0.5`` in float32: the nearest value, a tie going up. That code is a
non-decreasing function of ``y``, so it equals ``#{k in 1..15 : y >= T[k]}`` with ``T[k]`` the smallest
float32 for which torchao's rule gives ``k`` (:func:`q4_thresholds`, found by bisection over the float32
line at import). Decode: ``q[code] * scale[b]``.

* :data:`M4_MAP` (first moment): torchao's ``create_dynamic_map(signed=True, max_exponent_bits=3,
  total_bits=4)``: ``±{0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875}``, ``0`` and ``1``
  (asymmetric: no ``-1``).
* :data:`V4_MAP` (second moment): ``k/16`` for ``k = 1..16``, no zero: an element 0 stores as
  ``scale / 16``. torchao's class does no rank-1 normalization (lpmm does).
* Two codes per byte (:func:`pack4`): ``byte[k] = code[2k] << 4 | code[2k+1]``.

Non-finite input (the same as torchao, tested): a block holding a NaN gets a NaN scale; its fp8 codes
are all the e4m3fn NaN (sign unspecified) and its 4-bit codes all 0; it decodes to NaN. A block
holding ``±inf`` gets an inf scale; the inf elements encode as NaN (fp8) or code 0 (4-bit), the
others as ``±0`` (fp8) or the code of 0 (4-bit ``m``; ``v`` has no 0: code 0); on decode, ``0 * inf``
is NaN. A float32 subnormal input encodes as a zero code either way (``|x / scale|`` is far below
the smallest e4m3fn or the first 4-bit threshold), so flushing subnormals (XLA:CPU) changes nothing.

Elementwise work, per element: full-size ops in the optimized XLA:CPU HLO of a (4096, 256) input
(``jax.jit(f).lower(x).compile().as_text()``; the per-block max and NaN check each add a compare or ``abs``):
``fp8_encode`` 6 (``abs``, ``isnan``, ``x * 0``, ``+ scale``, divide, convert); ``fp8_decode`` 2;
``m4_encode`` / ``v4_encode`` 49 (``abs``, ``isnan``, ``x * 0``, ``+``, divide, then 15 compares,
15 converts and 15 adds); ``m4_decode`` 28 (4 x shift, and, compare; 15 selects; multiply);
``v4_decode`` 4 (convert, ``+ 1``, ``* 1/16``, ``* scale``); ``pack4`` 2 per byte; ``unpack4`` 2.

Why ``x / (scale + x * 0)``: XLA rewrites a division by a broadcast into a multiplication by the
reciprocal, which rounds differently from torch's true division. Adding ``x * 0`` (which XLA does not
fold: it is NaN for ``±inf``) makes the divisor elementwise, so the division stays one IEEE division,
and gives the same result as torch for every input (``±inf / inf`` is NaN either way).

Example:

  >>> import jax.numpy as jnp
  >>> from adamx._lowbit import fp8_encode, fp8_decode, m4_encode, m4_decode
  >>> x = jnp.linspace(-1.0, 2.0, 256)
  >>> codes, scales = fp8_encode(x)
  >>> codes.dtype, codes.shape, scales.shape
  (dtype(float8_e4m3fn), (256,), (1,))
  >>> float(fp8_decode(codes, scales)[-1])  # the absmax is exact
  2.0
  >>> c, s = m4_encode(x[:128])
  >>> float(m4_decode(c, s)[0]), float(s[0])  # -1 of a block of absmax 1 stores as -0.8875
  (-0.887499988079071, 1.0)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from adamx._quantize import _reshape as _quantize_reshape
from adamx._types import Leaf

FP8_BLOCK_SIZE = 256
"""torchao ``AdamFp8``'s default block size."""
Q4_BLOCK_SIZE = 128
"""torchao ``Adam4bit``'s default block size."""
FP8_MAX = 448.0
"""The largest float8 e4m3fn value."""
SCALE_FLOOR = np.float32(1e-12)
"""torchao clips every block absmax to at least this (float32) before dividing by it."""
MIN_QUANTIZED_SIZE = 4096
"""torchao (after bitsandbytes) quantizes a state only from this many elements."""


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace`` on CPU: ``start + step*i`` for the first half, ``end - step*(steps-1-i)`` after."""
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(steps - 1)
    i = np.arange(steps)
    lo = s + step * i.astype(np.float32)
    hi = e - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def _m4_map() -> np.ndarray:
    """torchao ``create_dynamic_map(True, 3, 4)``: float32 linspace midpoints, times ``10**(i-2)`` in double."""
    data = [0.0, 1.0]
    for i in range(3):
        b = _linspace32(0.1, 1.0, 2**i + 1)
        means = ((b[:-1] + b[1:]) / np.float32(2)).tolist()
        data += [10.0 ** (i - 2) * m for m in means] + [-(10.0 ** (i - 2)) * m for m in means]
    return np.asarray(sorted(data), np.float32)


M4_MAP: np.ndarray = _m4_map()
"""First-moment 4-bit map: 16 sorted float32 values from -0.8875 to 1 (torchao's signed map)."""
V4_MAP: np.ndarray = (np.arange(1, 17) / 16.0).astype(np.float32)
"""Second-moment 4-bit map: ``k/16``, ``k = 1..16`` (torchao's unsigned map; no zero)."""
M4_MAP.setflags(write=False)
V4_MAP.setflags(write=False)


def _key(x: np.ndarray) -> np.ndarray:
    """float32 -> int64, increasing with the value (-0.0 and 0.0 share a key)."""
    b = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b)


def _unkey(k: int) -> np.float32:
    b = np.int64(k)
    bits = np.uint32(b) if b >= 0 else np.uint32(0x80000000 | int(-b))
    return np.array([bits], np.uint32).view(np.float32)[0]


def q4_thresholds(qmap: Leaf) -> np.ndarray:
    """``T[k-1]`` (k = 1..15): the smallest float32 ``y`` that torchao's 4-bit rule encodes to ``k`` or more.

    Between ``q[k-1]`` and ``q[k]`` torchao takes ``k`` iff ``f32(y - q[k-1]) >= f32(q[k] - q[k-1]) * 0.5``,
    which holds from some float32 on (``y - q[k-1]`` rounds monotonically): that float32, found by bisection.

    >>> float(q4_thresholds(V4_MAP)[0])  # 1.5 / 16
    0.09375
    """
    q = _check_map(qmap)
    out = np.empty(15, np.float32)
    for k in range(1, 16):
        half = (q[k] - q[k - 1]) * np.float32(0.5)
        lo, hi = int(_key(q[k - 1])), int(_key(q[k]))  # the rule fails at lo (half > 0), holds at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _unkey(mid) - q[k - 1] >= half:
                hi = mid
            else:
                lo = mid
        out[k - 1] = _unkey(hi)
    return out


def _check_map(qmap: Leaf) -> np.ndarray:
    q = np.asarray(qmap)
    if q.shape != (16,) or q.dtype != np.float32 or not np.all(np.diff(q) > 0):
        raise ValueError(f"`qmap` must be 16 increasing float32 values, got {q.dtype}{list(q.shape)}")
    return q


_M4_THRESHOLDS: np.ndarray = q4_thresholds(M4_MAP)
_V4_THRESHOLDS: np.ndarray = q4_thresholds(V4_MAP)


def _check_block_size(block_size: Leaf) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
    return int(block_size)


def quantizes(size: int, block_size: int) -> bool:
    """torchao's rule: a state is quantized iff ``size >= 4096`` and ``size % block_size == 0`` (else float32).

    >>> quantizes(64 * 64, 256), quantizes(33 * 128, 256), quantizes(33 * 128, 128), quantizes(1024, 128)
    (True, False, True, False)
    """
    return int(size) >= MIN_QUANTIZED_SIZE and int(size) % _check_block_size(block_size) == 0


def state_nbytes(fmt: str, size: int, block_size: int | None = None) -> int:
    """Bytes of one moment of ``size`` elements in format ``fmt`` (``"fp8"`` or ``"4bit"``), scales included.

    ``fp8``: ``size + 4 * size / block``; ``4bit``: ``size / 2 + 4 * size / block``; ``4 * size``
    (float32) where torchao would not quantize (:func:`quantizes`). Divide by ``size`` for bytes per
    element: 1.015625 (fp8, block 256) and 0.53125 (4-bit, block 128) per moment.

    >>> state_nbytes("fp8", 4096), state_nbytes("4bit", 4096), state_nbytes("4bit", 100)
    (4160, 2176, 400)
    """
    if fmt not in ("fp8", "4bit"):
        raise ValueError(f"`fmt` must be 'fp8' or '4bit', got {fmt!r}")
    bs = _check_block_size(
        block_size if block_size is not None else (FP8_BLOCK_SIZE if fmt == "fp8" else Q4_BLOCK_SIZE)
    )
    n = int(size)
    if not quantizes(n, bs):
        return 4 * n
    return (n if fmt == "fp8" else n // 2) + 4 * (n // bs)


def _blocks(x: Leaf, block_size: int) -> jax.Array:
    """``x`` (any float dtype) as float32 ``[size // block_size, block_size]``, row-major."""
    bs = _check_block_size(block_size)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must be a floating array, got dtype {x.dtype}")
    if x.size == 0 or x.size % bs:
        raise ValueError(f"`x` of shape {x.shape} ({x.size} elements) is not a whole number of blocks of {bs}")
    return _reshape(x.astype(jnp.float32), (x.size // bs, bs))


def _scaled(blocks: jax.Array, scale: jax.Array) -> jax.Array:
    """``blocks / scale[:, None]`` as one IEEE division per element (see the module docstring: ``+ x * 0``)."""
    return blocks / (scale[:, None] + blocks * jnp.float32(0))


def _absmax(blocks: jax.Array) -> jax.Array:
    """Per-block ``max |x|`` clipped to 1e-12, NaN when the block holds a NaN (as torch's ``amax``)."""
    amax = jnp.max(jnp.abs(blocks), axis=1)
    # XLA's vectorized CPU reduce-max does not reliably propagate NaN (adamx/_quantize.py)
    amax = jnp.where(jnp.any(jnp.isnan(blocks), axis=1), jnp.float32(jnp.nan), amax)
    return jnp.maximum(amax, SCALE_FLOOR)


def _check_codes(codes: jax.Array, scales: Leaf, per_byte: int = 1) -> tuple[jax.Array, int]:
    scales = jnp.asarray(scales)
    n = codes.size * per_byte
    if scales.ndim != 1 or scales.size == 0 or n % scales.size:
        raise ValueError(
            f"`scales` of shape {scales.shape} does not divide `codes` of {codes.size} elements into blocks"
        )
    return scales.astype(jnp.float32), n // scales.size


def fp8_encode(x: Leaf, block_size: int = FP8_BLOCK_SIZE) -> tuple[jax.Array, jax.Array]:
    """torchao ``quantize_fp8``: ``(codes float8_e4m3fn in x's shape, scales float32[x.size // block_size])``.

    ``scale = max(absmax, 1e-12) / 448`` per block of the row-major flattening; ``code = e4m3fn(x / scale)``,
    true division, nearest-even. ``x``: any float dtype (cast to float32), ``x.size`` a multiple of ``block_size``.
    """
    blocks = _blocks(x, block_size)
    amax = _absmax(blocks)
    # a division by a constant also becomes a product with its reciprocal; the barrier hides the constant
    # (one float per block, so nothing full-size is materialized)
    scale = amax / jax.lax.optimization_barrier(jnp.full(amax.shape, FP8_MAX, jnp.float32))
    codes = _scaled(blocks, scale).astype(jnp.float8_e4m3fn)
    return _reshape(codes, jnp.shape(x)), scale


def fp8_decode(codes: Leaf, scales: Leaf) -> jax.Array:
    """``f32(code) * scale`` per block, in ``codes``' shape (float32)."""
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"`codes` must be float8_e4m3fn, got dtype {codes.dtype}")
    scales, bs = _check_codes(codes, scales)
    values = _reshape(codes.astype(jnp.float32), (scales.size, bs)) * scales[:, None]
    return _reshape(values, codes.shape)


def q4_scales(x: Leaf, block_size: int = Q4_BLOCK_SIZE) -> jax.Array:
    """The block scales :func:`m4_encode` / :func:`v4_encode` give ``x``: ``max(absmax, 1e-12)`` per
    block, NaN where the block holds one (for a reduction pass of its own)."""
    return _absmax(_blocks(x, block_size))


def q4_code(y: jax.Array, signed: bool, dtype: Leaf = jnp.uint8) -> jax.Array:
    """The 4-bit code of each scaled value ``y = x / scale``, elementwise: ``#{k : y >= T[k]}`` with
    ``T`` the :func:`q4_thresholds` of :data:`M4_MAP` (``signed``) or :data:`V4_MAP`. A NaN compares
    false everywhere: code 0, as torchao's search gives."""
    code = jnp.zeros(jnp.shape(y), dtype)
    for t in _M4_THRESHOLDS if signed else _V4_THRESHOLDS:
        code = code + (y >= t).astype(dtype)
    return code


def q4_value(code: jax.Array, signed: bool) -> jax.Array:
    """The map value of each 4-bit code (integers 0..15), elementwise, float32: :data:`M4_MAP`'s by a
    4-level select tree on the code's bits (``signed``, no gather), else ``V4_MAP``'s ``(code + 1) / 16``."""
    if not signed:
        return (code.astype(jnp.float32) + jnp.float32(1)) * jnp.float32(1 / 16)
    level: list[Leaf] = [np.float32(v) for v in M4_MAP]
    for bit in range(4):
        on = ((code >> bit) & 1) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _q4_encode(x: Leaf, signed: bool, block_size: int, scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    blocks = _blocks(x, block_size)
    scale = _absmax(blocks) if scales is None else scales
    code = q4_code(_scaled(blocks, scale), signed)
    return _reshape(code, jnp.shape(x)), scale


def m4_encode(x: Leaf, block_size: int = Q4_BLOCK_SIZE, scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """First moment, torchao ``Adam4bit``: ``(codes uint8 0..15 in x's shape, scales float32[x.size // block_size])``.

    ``scale = max(absmax, 1e-12)``; ``code`` = the nearest :data:`M4_MAP` value to ``x / scale``, a tie going
    up, exactly as torchao's float32 search (module docstring). Store with :func:`pack4`. ``scales``:
    the blocks' :func:`q4_scales`, when a pass of its own computed them (the codes are then elementwise).
    """
    return _q4_encode(x, True, block_size, scales)


def v4_encode(x: Leaf, block_size: int = Q4_BLOCK_SIZE, scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Second moment: as :func:`m4_encode` with :data:`V4_MAP` (k/16, no zero: 0 stores as code 0 = 1/16).

    Meant for ``x >= 0``; a negative element encodes as code 0, as in torchao.
    """
    return _q4_encode(x, False, block_size, scales)


def m4_decode(codes: Leaf, scales: Leaf) -> jax.Array:
    """``M4_MAP[code] * scale`` per block, in ``codes``' shape: a 4-level select tree on the code's bits, no gather."""
    codes = jnp.asarray(codes)
    scales, bs = _check_codes(codes, scales)
    values = _reshape(q4_value(codes.astype(jnp.uint8), True), (scales.size, bs)) * scales[:, None]
    return _reshape(values, codes.shape)


def v4_decode(codes: Leaf, scales: Leaf) -> jax.Array:
    """``V4_MAP[code] * scale = ((code + 1) / 16) * scale`` per block (the first product is exact)."""
    codes = jnp.asarray(codes)
    scales, bs = _check_codes(codes, scales)
    return _reshape(_reshape(q4_value(codes, False), (scales.size, bs)) * scales[:, None], codes.shape)


def pack4(codes: Leaf, fused: bool = False) -> jax.Array:
    """Two 4-bit codes per byte, torchao's order: ``byte[k] = code[2k] << 4 | code[2k+1]`` (row-major, flat).

    ``fused``: the same bytes as a sum over each pair (``16 * code[2k] + code[2k+1]``), which XLA:GPU
    fuses with the encode that produces the codes (the two slices of the default form it does not).

    >>> pack4(jnp.array([1, 2, 15, 0], jnp.uint8)).tolist()
    [18, 240]
    """
    c = jnp.asarray(codes)
    if c.dtype != jnp.uint8 or c.size % 2:
        raise ValueError(f"`codes` must be uint8 with an even number of elements, got {c.dtype}{list(c.shape)}")
    pairs = _reshape(c, (c.size // 2, 2))
    if fused:
        return jnp.sum(pairs * jnp.array([16, 1], jnp.uint8), axis=-1, dtype=jnp.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack4(packed: Leaf, shape: Leaf = None, fused: bool = False) -> jax.Array:
    """Inverse of :func:`pack4`: ``uint8[2 * packed.size]`` codes, reshaped to ``shape`` if given.

    ``fused``: each code from its byte, broadcast to the pair and shifted by the element's parity
    (the same codes, elementwise, which XLA:GPU fuses into the consumer; the default stacks the two
    nibbles, a concatenation it writes out)."""
    p = jnp.asarray(packed)
    if p.dtype != jnp.uint8:
        raise TypeError(f"`packed` must be uint8, got dtype {p.dtype}")
    if fused:
        pair = jnp.broadcast_to(_reshape(p, (p.size, 1)), (p.size, 2))
        odd = jax.lax.broadcasted_iota(jnp.uint8, (p.size, 2), 1)
        codes = _reshape((pair >> (jnp.uint8(4) - jnp.uint8(4) * odd)) & jnp.uint8(15), (2 * p.size,))
    else:
        codes = _reshape(jnp.stack([p >> 4, p & 15], axis=-1), (2 * p.size,))
    if shape is None:
        return codes
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) != codes.size:
        raise ValueError(f"`shape` {shape} does not hold the {codes.size} codes of `packed`")
    return _reshape(codes, shape)


def _reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x.reshape(shape)``, also on an Explicit mesh (:func:`adamx._quantize._reshape`: where the
    blocks are not whole on each shard, gathered first)."""
    return _quantize_reshape(jnp.asarray(x), tuple(int(d) for d in shape))
