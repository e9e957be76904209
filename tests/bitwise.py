"""Bit patterns for bit-for-bit comparisons in the tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def bits(x) -> np.ndarray:
    """Bit patterns of a float array (equal bits: bit-for-bit equal, NaN included; fp8 codes as their
    bytes, bf16/f16 as 16-bit words); other dtypes as they are."""
    x = np.ascontiguousarray(x)
    if x.dtype == jnp.float8_e4m3fn:
        return x.view(np.uint8)
    return x.view(np.uint32) if x.dtype == np.float32 else x.view(np.uint16) if x.dtype.itemsize == 2 else x
