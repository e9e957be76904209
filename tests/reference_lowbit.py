"""A NumPy reference of torchao 0.18's fp8 and 4-bit optimizer-state formats and of its Adam step.

Written from torchao's source (``torchao/optim/subclass_fp8.py``, ``subclass_4bit.py``,
``quant_utils.py``, ``adam.py``) as /work/shared/LOWBIT.md summarizes it, without importing torch
or adamx: float32 NumPy, each op rounded once (no FMA: inductor builds with ``-ffp-contract=off``),
true divisions. The e4m3fn rounding is written out in float64 arithmetic (exact here), not taken
from ml_dtypes or XLA, so it is an independent check of both.
``tests/test_lowbit_reference.py`` replays torchao's own trajectories with it bit for bit.

Blocks run over the row-major flattening of the tensor (a block may span rows), as in torchao.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_FLOOR = f32(1e-12)  # torchao's .clip(1e-12) of the block absmax
FP8_BLOCK = 256  # AdamFp8's default block_size
Q4_BLOCK = 128  # Adam4bit's default block_size


# ------------------------------------------------------------------------------------------------- fp8


def e4m3fn_values() -> np.ndarray:
    """The float32 value of each of the 256 e4m3fn bit patterns (NaN at 0x7f and 0xff).

    Bits ``s eeee mmm``: exponent bias 7; ``e == 0`` subnormal ``m * 2**-9``; otherwise
    ``(1 + m/8) * 2**(e-7)``; ``e == 15, m == 7`` is NaN (no infinities; the largest value is 448).
    """
    b = np.arange(256)
    s, e, m = b >> 7, (b >> 3) & 15, b & 7
    mag = np.where(e == 0, m * 2.0**-9, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(s == 1, -mag, mag).astype(np.float32)


def e4m3fn_bits(y: np.ndarray) -> np.ndarray:
    """Round float32 ``y`` to e4m3fn (nearest, ties to even; subnormals kept), as c10's ``Float8_e4m3fn(float)``.

    NaN -> 0x7f with the sign bit of the input; ``|y| >= 480`` (beyond the top rounding interval of 448) -> NaN
    too, as c10 does (torchao never gets there: ``|x / scale| <= 448`` up to one float32 rounding).
    """
    y = np.asarray(y, np.float32)
    sign = (y.view(np.uint32) >> 31).astype(np.uint8) << 7
    a = np.abs(y.astype(np.float64))
    _, ea = np.frexp(np.where(np.isfinite(a), a, 0.0))  # a = f * 2**ea, f in [0.5, 1): floor(log2 a) = ea - 1
    quantum = 2.0 ** (np.maximum(ea - 1, -6) - 3)  # the spacing of e4m3fn values around a (2**-9 when subnormal)
    with np.errstate(invalid="ignore"):
        r = np.round(a / quantum) * quantum  # a / quantum is exact in float64; np.round: half to even
    nan = np.isnan(a) | (r >= 480.0)
    r = np.where(nan, 0.0, r)
    sub = r < 2.0**-6
    mr, er = np.frexp(np.where(sub, 1.0, r))  # r = mr * 2**er, mr in [0.5, 1)
    normal_bits = ((er - 1 + 7) << 3) | np.round((mr * 2 - 1) * 8).astype(np.int64)
    bits = np.where(sub, np.round(r / 2.0**-9).astype(np.int64), normal_bits)
    bits = np.where(nan, 0x7F, bits).astype(np.uint8)
    return bits | sign


def fp8_quantize(x: np.ndarray, block_size: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """torchao ``quantize_fp8``: ``(codes uint8 bits in x's shape, scales float32[numel // block_size])``.

    ``scale = max(amax|block|, 1e-12) / 448``; ``code = e4m3fn(x / scale)``, true division in float32.
    """
    x = np.asarray(x, np.float32)
    blocks = x.reshape(-1, block_size)
    with np.errstate(invalid="ignore"):
        amax = np.abs(blocks).max(axis=1)  # NaN if the block holds a NaN
        scale = np.maximum(amax, SCALE_FLOOR) / f32(FP8_MAX)
        y = blocks / scale[:, None]
    return e4m3fn_bits(y).reshape(x.shape), scale.astype(np.float32)


def fp8_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``float(code) * scale`` per block, in ``codes``' shape."""
    vals = e4m3fn_values()[np.asarray(codes, np.uint8)]
    with np.errstate(invalid="ignore"):
        return (vals.reshape(scales.size, -1) * scales[:, None]).reshape(codes.shape)


# ----------------------------------------------------------------------------------------------- 4-bit


def _torch_linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace`` on CPU: ``start + step*i`` for the first half, ``end - step*(steps-1-i)`` after."""
    s, e = f32(start), f32(end)
    step = (e - s) / f32(steps - 1)
    i = np.arange(steps)
    lo = s + step * i.astype(np.float32)
    hi = e - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def qmap_signed() -> np.ndarray:
    """torchao ``create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)``, sorted, to float32.

    For ``i = 0, 1, 2``: the midpoints of ``linspace(0.1, 1, 2**i + 1)`` (float32), times ``10**(i-2)`` in
    double, and their negatives; plus 0 and 1. 16 values from -0.8875 to 1 (no -1).
    """
    data: list[float] = []
    for i in range(3):
        b = _torch_linspace32(0.1, 1.0, 2**i + 1)
        means = ((b[:-1] + b[1:]) / f32(2.0)).tolist()
        data += [10.0 ** (i - 2) * m for m in means]
        data += [-(10.0 ** (i - 2)) * m for m in means]
    data += [0.0, 1.0]
    return np.asarray(sorted(data), np.float32)


def qmap_unsigned() -> np.ndarray:
    """torchao's unsigned 4-bit map ``linspace(0, 1, 17)[1:]`` = k/16 for k = 1..16 (no zero)."""
    return (np.arange(1, 17) / 16.0).astype(np.float32)


def q4_quantize(x: np.ndarray, qmap: np.ndarray, block_size: int = Q4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """torchao ``scale_tensor`` + ``quantize_4bit_with_qmap``: ``(codes uint8[numel] in 0..15, scales[numel // bs])``.

    ``scale = max(amax|block|, 1e-12)``, ``y = x / scale``; ``c`` = the largest code with ``q[c] <= y``
    (a 4-step branchless binary search, 0 when none), then ``c + 1`` (at most 15) when
    ``y - q[c] >= (q[c+1] - q[c]) * 0.5`` in float32: the nearest value, a tie going up.
    """
    flat = np.asarray(x, np.float32).reshape(-1, block_size)
    with np.errstate(invalid="ignore"):
        scale = np.maximum(np.abs(flat).max(axis=1), SCALE_FLOOR)
        y = (flat / scale[:, None]).ravel()
        c = np.where(y >= qmap[8], 8, 0)
        for step in (4, 2, 1):
            c = c + np.where(y >= qmap[c + step], step, 0)
        up = np.minimum(c + 1, 15)
        c = np.where(y - qmap[c] >= (qmap[up] - qmap[c]) * f32(0.5), up, c)
    return c.astype(np.uint8), scale.astype(np.float32)


def q4_dequantize(codes: np.ndarray, scales: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """``qmap[code] * scale`` per block (flat)."""
    with np.errstate(invalid="ignore"):
        return (qmap[np.asarray(codes)].reshape(scales.size, -1) * scales[:, None]).ravel()


def pack4(codes: np.ndarray) -> np.ndarray:
    """torchao's packing: ``byte[k] = code[2k] << 4 | code[2k+1]``."""
    c = np.asarray(codes, np.uint8).ravel()
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack4(packed: np.ndarray) -> np.ndarray:
    p = np.asarray(packed, np.uint8)
    return np.stack([p >> 4, p & 15], axis=-1).ravel()


# ------------------------------------------------------------------------------------------------ step


def is_quantized(numel: int, block_size: int) -> bool:
    """torchao ``_new_buffer``'s rule (from bitsandbytes): quantize only when ``numel >= 4096`` and blocks divide it."""
    return numel >= 4096 and numel % block_size == 0


class State:
    """One torchao moment: ``codes``/``scales`` (quantized) or ``values`` (float32); zeros at creation."""

    def __init__(self, fmt: str, shape: tuple[int, ...], signed: bool):
        self.fmt, self.shape, self.signed = fmt, shape, signed
        n = int(np.prod(shape))
        self.block = FP8_BLOCK if fmt == "fp8" else Q4_BLOCK
        self.quantized = is_quantized(n, self.block)
        self.qmap = qmap_signed() if signed else qmap_unsigned()
        if not self.quantized:
            self.values = np.zeros(shape, np.float32)
        elif fmt == "fp8":
            self.codes, self.scales = np.zeros(shape, np.uint8), np.zeros(n // self.block, np.float32)
        else:
            self.codes, self.scales = np.zeros(n // 2, np.uint8), np.zeros(n // self.block, np.float32)

    def read(self) -> np.ndarray:
        if not self.quantized:
            return self.values
        if self.fmt == "fp8":
            return fp8_dequantize(self.codes, self.scales)
        return q4_dequantize(unpack4(self.codes), self.scales, self.qmap).reshape(self.shape)

    def write(self, x: np.ndarray) -> None:
        if not self.quantized:
            self.values = x.astype(np.float32)
        elif self.fmt == "fp8":
            self.codes, self.scales = fp8_quantize(x, self.block)
        else:
            c, self.scales = q4_quantize(x, self.qmap, self.block)
            self.codes = pack4(c)


def adam_step(
    p: np.ndarray,
    g: np.ndarray,
    m: State,
    v: State,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    adamw: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchao ``single_param_adam`` (no amsgrad, no bf16 rounding) for step ``step`` (1-based), in float32.

    .. code-block:: text

        Adam*:  g = g + wd * p                 AdamW*: p = p - (lr * wd) * p
        bc1, bc2 = 1 - powf(f32(b1), step), 1 - powf(f32(b2), step)   (glibc powf: float64 power rounded once here)
        m = m_old + (g - m_old) * f32(1 - b1)   v = v_old + (g*g - v_old) * f32(1 - b2)   (lerp, weight < 0.5)
        p = p - (lr * (m / bc1)) / (sqrt(v) / sqrt(bc2) + eps)
        store m, v (quantized if the state is)

    Updates ``m`` and ``v`` in place; returns ``(new p, m, v)``, the float32 moments before storing.
    """
    lr32, wd = f32(lr), f32(weight_decay)
    p = np.asarray(p, np.float32)
    g = np.asarray(g, np.float32)
    if adamw:
        p = p - (lr32 * wd) * p
    else:
        g = g + wd * p
    b1, b2 = f32(betas[0]), f32(betas[1])
    # inductor calls glibc powf, which for these steps equals the double power rounded once (LOWBIT.md: not at
    # t = 2958, 3606). NumPy's own float32 power is not powf: it differs at t = 4 for 0.9 and t = 9 for 0.999.
    bc1 = f32(1) - f32(float(b1) ** step)
    bc2 = f32(1) - f32(float(b2) ** step)
    m_old, v_old = m.read(), v.read()
    m32 = m_old + (g - m_old) * f32(1.0 - betas[0])
    v32 = v_old + (g * g - v_old) * f32(1.0 - betas[1])
    m.write(m32)
    v.write(v32)
    denom = np.sqrt(v32) / np.sqrt(bc2) + f32(eps)
    p = p - (lr32 * (m32 / bc1)) / denom
    return p.astype(np.float32), m32, v32
