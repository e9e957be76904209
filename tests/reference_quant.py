"""A per-op NumPy reference of adamx's 8-bit state scheme and of one 8-bit Keras-Adam step.

Written from the scheme as documented in ``adamx/_quantize.py`` (module docstring) and
``adamx/_quant8.h``, block by block in plain NumPy float32 (each op rounds once, no FMA),
without importing adamx. The code maps are inputs (the tests pass adamx's constants and,
separately, check those against bitsandbytes' own maps).
"""

from __future__ import annotations

import math

import numpy as np

f32 = np.float32
FLT_MIN = np.finfo(np.float32).tiny


def scale_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """The scales' shape: the leading axes kept where the last axes hold whole blocks (the largest
    such split), else 1-D ``ceil(n / block_size)`` (blocks are consecutive elements in C order)."""
    for a in range(len(shape) - 1, -1, -1):
        tail = math.prod(shape[a:])
        if tail % block_size == 0:
            return tuple(shape[:a]) + (tail // block_size,)
    return (-(-math.prod(shape) // block_size),)


def quantize(x: np.ndarray, code: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8 shaped like x, scales float32[scale_shape])``, one block at a time."""
    shape = np.shape(x)
    flat = np.asarray(x).astype(np.float32).ravel()
    n = flat.size
    nb = -(-n // block_size)
    mids = (code[:-1] + code[1:]) * f32(0.5)
    zero = int(np.searchsorted(mids, f32(0), side="left"))
    codes = np.empty(n, np.uint8)
    scales = np.empty(nb, np.float32)
    for b in range(nb):
        blk = flat[b * block_size : (b + 1) * block_size].copy()
        blk[np.abs(blk) < FLT_MIN] = f32(0)  # subnormals (and -0.0) count as +0
        if np.isnan(blk).any():
            scale = f32(np.nan)
        else:
            scale = np.abs(blk).max() if blk.size else f32(0)
        inv = f32(1) / (scale if scale != 0 else f32(1))  # reciprocal, then product (as XLA and bnb)
        with np.errstate(invalid="ignore", divide="ignore"):
            y = blk * inv
        idx = np.searchsorted(mids, y, side="left")  # number of midpoints strictly below y
        idx[np.isnan(y)] = zero
        codes[b * block_size : (b + 1) * block_size] = idx
        scales[b] = scale
    return codes.reshape(shape), scales.reshape(scale_shape(shape, block_size))


def dequantize(codes: np.ndarray, scales: np.ndarray, code: np.ndarray, block_size: int, shape) -> np.ndarray:
    n = math.prod(shape)
    codes, scales = np.ravel(codes), np.ravel(scales)
    out = np.empty(n, np.float32)
    for b in range(scales.size):
        sl = slice(b * block_size, min(n, (b + 1) * block_size))
        with np.errstate(invalid="ignore"):
            v = code[codes[sl]] * scales[b]
        v[np.abs(v) < FLT_MIN] = f32(0)
        out[sl] = v
    return out.reshape(shape)


def _fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add ``a*b + c`` rounded once.

    The float32 product is exact in float64; the float64 sum is then rounded to float32
    (double rounding differs from a true fma only when the float64 sum lands exactly on a
    float32 rounding boundary, probability ~2**-29 per element).
    """
    a64, b64, c64 = (np.asarray(z, np.float64) for z in (a, b, c))
    return (a64 * b64 + c64).astype(np.float32)


def adam_step_8bit(
    g: np.ndarray,
    p: np.ndarray,
    m_codes: np.ndarray,
    m_scales: np.ndarray,
    v_codes: np.ndarray,
    v_scales: np.ndarray,
    *,
    count: int,
    learning_rate: float,
    m_code: np.ndarray,
    v_code: np.ndarray,
    block_size: int,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    weight_decay: float | None = None,
    fma: bool = True,
):
    """One Keras Adam step (SEMANTICS.md 1.2) on dequantized float32 moments, then requantized.

    Returns ``(updates in p.dtype, (m_codes, m_scales), (v_codes, v_scales), m, v)``: the
    float32 moments ``m``, ``v`` before requantization are returned too, for diagnosis.
    ``b**t`` is correctly rounded (float64 pow rounded once), as XLA's pow is for these
    arguments (SEMANTICS.md 1.2).
    """
    shape = p.shape
    m = dequantize(m_codes, m_scales, m_code, block_size, shape)
    v = dequantize(v_codes, v_scales, v_code, block_size, shape)
    g = g.astype(f32)
    lr = f32(learning_rate)
    t = count + 1
    b1p = f32(float(f32(beta_1)) ** t)
    b2p = f32(float(f32(beta_2)) ** t)
    alpha = (lr * np.sqrt(f32(1) - b2p)) / (f32(1) - b1p)
    c1, c2 = f32(1.0 - beta_1), f32(1.0 - beta_2)
    # XLA:CPU (jit, on a CPU with FMA) contracts the moment updates into fused multiply-adds
    # (SEMANTICS.md 1.16, the rule adamx's fused kernel follows): m = fma(g - m, c1, m),
    # v = fma(fma(g, g, -v), c2, v). Without FMA hardware or eagerly, XLA rounds twice.
    if fma:
        m = _fma32(g - m, c1, m)
        v = _fma32(_fma32(g, g, -v), c2, v)
    else:
        m = m + (g - m) * c1
        v = v + (g * g - v) * c2
    u = -((m * alpha) / (np.sqrt(v) + f32(epsilon)))
    if weight_decay:
        wd = p.astype(f32) * f32(weight_decay)
        u = _fma32(-wd, lr, u) if fma else u - wd * lr  # XLA contracts u - wd * lr as well
    return u.astype(p.dtype), quantize(m, m_code, block_size), quantize(v, v_code, block_size), m, v
