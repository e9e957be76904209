"""8-bit block-wise quantization of optimizer state (adamx/_quantize.py, adamx/_quant8.h).

The JAX implementation is compared bit for bit with a per-op NumPy reference
(tests/reference_quant.py) and with the C++ header compiled here with g++; the code
maps are compared with bitsandbytes' own (tests/references/make_bnb_refs.py).
"""

from __future__ import annotations

import ctypes
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamx
from adamx import _quantize as Q
from tests import reference_quant as R
from tests.conftest import REFERENCE_DIR
from tests.cpp import BUILDS, compile_library

MAPS = {"signed": Q.SIGNED_DYNAMIC_MAP, "unsigned": Q.UNSIGNED_DYNAMIC_MAP}
EPS32 = float(np.finfo(np.float32).eps)


def wide_data(n: int, signed: bool, seed: int = 0) -> np.ndarray:
    """Normal values times 10**U(-7, 1) per element (7+ decades inside a block), 10% exact zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-7, 1, n)).astype(np.float32)
    x[rng.random(n) < 0.1] = 0
    return x if signed else np.abs(x)


def nasty_data(n: int, code: np.ndarray, block_size: int, seed: int = 1) -> np.ndarray:
    """Wide data plus subnormals, ties (values exactly on midpoints), a zero block, NaN and inf blocks."""
    signed = bool(code[0] < 0)
    x = wide_data(n, signed, seed)
    rng = np.random.default_rng(seed)
    sub = rng.random(n) < 0.05
    x[sub] = np.float32(1e-40) * rng.integers(1, 100, size=sub.sum()).astype(np.float32)
    if signed:
        x[sub] *= np.where(rng.random(sub.sum()) < 0.5, -1, 1).astype(np.float32)
    nb = -(-n // block_size)
    assert nb >= 6, "nasty_data needs at least 6 blocks"
    blk = lambda b: slice(b * block_size, (b + 1) * block_size)  # noqa: E731
    # block 1: ties. absmax 4.0 (a power of two: y = x / 4 is exact), other values exactly 4 * mid[j]
    mids = Q.midpoints(code)
    t = x[blk(1)]
    t[:] = np.float32(4) * mids[rng.integers(0, 255, size=t.size)]
    t[0] = 4.0
    x[blk(2)] = 0  # all-zero block: scale 0, no 0/0
    x[blk(3)][5] = np.nan  # NaN block
    x[blk(4)][7] = np.inf  # inf block
    x[blk(5)][:] = np.float32(1e-40)  # subnormal-only block: counts as a zero block
    return x


# ----------------------------------------------------------------------------------------------- maps


def test_maps_are_bitsandbytes_maps():
    """Same construction as bitsandbytes 0.50.2 ``create_dynamic_map`` / ``create_linear_map``, within 2 ulp.

    bitsandbytes builds its maps with float32 ``torch.linspace`` (whose last bits depend on
    torch's vectorized path); adamx computes them in float64 and rounds once.
    """
    ref = np.load(os.path.join(REFERENCE_DIR, "bnb_quant.npz"))
    for tag, mine in MAPS.items():
        bnb = ref[f"dynamic_{tag}"]
        ulps = np.abs(bnb.view(np.int32).astype(np.int64) - mine.view(np.int32).astype(np.int64))
        assert ulps.max() <= 2, tag
        assert np.array_equal(np.sign(bnb), np.sign(mine)) and np.array_equal(bnb == 0, mine == 0), tag
        # linear: torch's float32 linspace puts ~1e-8 where the exact 0 is; compare absolutely (2**-24 = ulp(1) / 2)
        lin = Q.linear_map(tag == "signed")
        assert np.abs(ref[f"linear_{tag}"] - lin).max() <= 2.0**-24, tag


def test_map_properties():
    s, u = Q.SIGNED_DYNAMIC_MAP, Q.UNSIGNED_DYNAMIC_MAP
    for m in (s, u):
        assert m.dtype == np.float32 and m.shape == (256,) and np.all(np.diff(m) > 0)
        assert m[-1] == 1.0 and m[Q.zero_code(m)] == 0.0
    assert (s < 0).sum() == 127 and (s > 0).sum() == 128 and s[0] == np.float32(-0.99296875)
    assert u[0] == 0 and u[1] == np.float32(3.25e-7)
    assert np.min(np.abs(s[s != 0])) == np.float32(5.5e-7)
    with pytest.raises(ValueError):
        Q.SIGNED_DYNAMIC_MAP[0] = 0  # read-only constant


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
def test_max_error_is_the_worst_nearest_code_error(tag):
    """max_error(code) from the map equals the brute-force worst case over a dense grid of [-1, 1] / [0, 1]."""
    code = MAPS[tag].astype(np.float64)
    lo = -1.0 if tag == "signed" else 0.0
    y = np.linspace(lo, 1.0, 2_000_001)
    err = _nearest_err(y, code)
    assert abs(err.max() - Q.max_error(MAPS[tag])) < 1e-6


def _nearest_err(y: np.ndarray, code: np.ndarray) -> np.ndarray:
    i = np.clip(np.searchsorted(code, y), 1, 255)
    return np.minimum(np.abs(y - code[i - 1]), np.abs(y - code[i]))


# ------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
@pytest.mark.parametrize("block_size", [64, 256, 2048])
@pytest.mark.parametrize("n", [1, 63, 255, 2049, 3 * 2048 + 77])
def test_round_trip_error_bound(tag, block_size, n):
    code = MAPS[tag]
    x = wide_data(n, tag == "signed", seed=n + block_size)
    q = Q.quantize(x, code, block_size)
    nb = -(-n // block_size)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (n,)
    assert q.scales.dtype == jnp.float32 and q.scales.shape == (nb,)
    y = np.asarray(Q.dequantize(q, code, (n,), block_size))
    scale = np.repeat(np.asarray(q.scales), block_size)[:n]
    # half the largest gap of the map, times the block absmax; 4 ulp of the scale cover the float32 division
    # x / scale, the float32 midpoints and the product code * scale.
    bound = (Q.max_error(code) + 4 * EPS32) * scale
    err = np.abs(x - y)
    assert np.all(err <= bound), (err / np.maximum(scale, 1e-30)).max()
    blocks_absmax = np.abs(np.pad(x, (0, nb * block_size - n))).reshape(nb, block_size).max(1)
    np.testing.assert_array_equal(np.asarray(q.scales), blocks_absmax)
    assert np.all(y[x == 0] == 0)  # zeros exact
    # the absmax element of each block is exact where the map holds its sign's end (1.0; -1.0 only unsigned/linear)
    for b in range(nb):
        blk = x[b * block_size : (b + 1) * block_size]
        i = b * block_size + int(np.argmax(np.abs(blk)))
        if x[i] > 0:
            assert y[i] == x[i]
    # the bound is not slack: some element comes within 30% of it
    assert (err / np.maximum(bound, 1e-38)).max() > 0.3 or n < 64


def test_zero_nan_inf_blocks():
    code = Q.SIGNED_DYNAMIC_MAP
    x = np.zeros(4 * 64, np.float32)
    x[64 + 3] = np.nan
    x[128 + 5] = -np.inf
    x[192:] = np.linspace(-1, 1, 64, dtype=np.float32)
    q = Q.quantize(x, code, 64)
    s = np.asarray(q.scales)
    assert s[0] == 0 and np.isnan(s[1]) and s[2] == np.inf and s[3] == 1
    c = np.asarray(q.codes)
    assert np.all(c[:192] == Q.zero_code(code))  # zero block, NaN block, inf block: every code is zero_code
    y = np.asarray(Q.dequantize(q, code, x.shape, 64))
    assert np.all(y[:64] == 0)
    assert np.all(np.isnan(y[64:192]))  # the whole NaN / inf block decodes to NaN
    assert np.all(np.isfinite(y[192:]))


def test_ties_go_to_the_lower_code():
    for code in MAPS.values():
        mids = Q.midpoints(code)
        x = np.concatenate([[np.float32(1.0)], mids]).astype(np.float32)  # absmax 1: y == x exactly
        c = np.asarray(Q.quantize(x, code, 256).codes)
        np.testing.assert_array_equal(c[1:], np.arange(255))  # mid[j] -> code j (the lower one)
        nudged = np.nextafter(mids, np.float32(2))
        c = np.asarray(Q.quantize(np.concatenate([[np.float32(1.0)], nudged]), code, 256).codes)
        np.testing.assert_array_equal(c[1:], np.arange(1, 256))  # just above mid[j] -> code j + 1


def test_input_dtypes_are_cast_to_float32():
    x32 = wide_data(1000, True)
    for dt in (jnp.bfloat16, jnp.float16):
        x = jnp.asarray(x32).astype(dt)
        q = Q.quantize(x, Q.SIGNED_DYNAMIC_MAP, 256)
        ref = Q.quantize(x.astype(jnp.float32), Q.SIGNED_DYNAMIC_MAP, 256)
        np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(ref.scales))
        y = Q.dequantize(q, Q.SIGNED_DYNAMIC_MAP, x.shape, 256, dtype=dt)
        assert y.dtype == dt


def test_any_shape_is_blocked_in_c_order():
    """Codes are shaped like the leaf and blocks are consecutive elements in C order: the codes and
    scales of the flattened leaf, reshaped (the scales keep the leading axes where the last axes
    hold whole blocks)."""
    x = wide_data(6 * 7 * 11, True).reshape(6, 7, 11)
    q = Q.quantize(x, Q.SIGNED_DYNAMIC_MAP, 64)
    q_flat = Q.quantize(x.ravel(), Q.SIGNED_DYNAMIC_MAP, 64)
    assert q.codes.shape == (6, 7, 11) and q.scales.shape == (8,)  # 462 = 7 * 64 + 14: 1-D scales
    np.testing.assert_array_equal(np.asarray(q.codes).ravel(), np.asarray(q_flat.codes))
    x2 = wide_data(6 * 4 * 32, True).reshape(6, 4, 32)  # the last two axes hold 2 blocks of 64
    q2, q2_flat = Q.quantize(x2, Q.SIGNED_DYNAMIC_MAP, 64), Q.quantize(x2.ravel(), Q.SIGNED_DYNAMIC_MAP, 64)
    assert q2.scales.shape == (6, 2) and Q.scale_shape((6, 4, 32), 64) == (6, 2)
    np.testing.assert_array_equal(np.asarray(q2.scales).ravel(), np.asarray(q2_flat.scales))
    np.testing.assert_array_equal(np.asarray(q2.codes).ravel(), np.asarray(q2_flat.codes))
    assert Q.as_layout(q2_flat, (6, 4, 32), 64).codes.shape == (6, 4, 32)  # the first layout, reshaped
    with pytest.raises(ValueError, match=r"does not fit shape \[6, 4, 32\] with block_size=32"):
        Q.as_layout(q2_flat, (6, 4, 32), 32)
    y = Q.dequantize(q, Q.SIGNED_DYNAMIC_MAP, jnp.zeros((6, 7, 11)), 64)
    assert y.shape == (6, 7, 11)
    np.testing.assert_array_equal(
        np.asarray(y).ravel(), np.asarray(Q.dequantize(q_flat, Q.SIGNED_DYNAMIC_MAP, (462,), 64))
    )


# ------------------------------------------------------------------------ NumPy reference, bit for bit


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
@pytest.mark.parametrize("block_size,n", [(64, 6 * 64 + 5), (256, 8 * 256 + 1), (2048, 6 * 2048 + 100)])
def test_jax_equals_numpy_reference_bit_for_bit(tag, block_size, n):
    code = MAPS[tag]
    x = nasty_data(n, code, block_size)
    codes, scales = R.quantize(x, code, block_size)
    for q in (Q.quantize(x, code, block_size), jax.jit(lambda a: Q.quantize(a, code, block_size))(x)):
        np.testing.assert_array_equal(np.asarray(q.codes), codes)
        np.testing.assert_array_equal(np.asarray(q.scales), scales)  # NaN == NaN here
    y_ref = R.dequantize(codes, scales, code, block_size, (n,))
    y = jax.jit(lambda q: Q.dequantize(q, code, (n,), block_size))(
        Q.QuantizedArray(jnp.asarray(codes), jnp.asarray(scales))
    )
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    assert np.array_equal(np.isnan(y_ref), np.isnan(np.asarray(y)))


def test_against_bitsandbytes_cpu_quantize_blockwise():
    """bitsandbytes 0.50.2's CPU kernel on the stored input: the same scales, nearest-or-better codes.

    Where codes differ on a non-zero element, adamx's code is at least as near (bnb's CPU
    search is not always exact near a midpoint); bnb encodes exact zeros to a non-zero code.
    """
    ref = np.load(os.path.join(REFERENCE_DIR, "bnb_quant.npz"))
    for tag, code in MAPS.items():
        x = ref["x"] if tag == "signed" else np.abs(ref["x"])
        q = Q.quantize(x, code, 256)
        scales = np.asarray(q.scales)
        np.testing.assert_array_equal(scales, ref[f"bnb_scales_{tag}"])
        mine, bnb = np.asarray(q.codes), ref[f"bnb_codes_{tag}"]
        nz = x != 0
        y = (x / np.repeat(np.where(scales == 0, 1, scales), 256)[: x.size]).astype(np.float64)
        bmap = ref[f"dynamic_{tag}"].astype(np.float64)
        d_mine = np.abs(y - code.astype(np.float64)[mine])
        d_bnb = np.abs(y - bmap[bnb])
        assert np.all(d_mine[nz] <= d_bnb[nz] + 2 * EPS32)
        differ = (mine != bnb) & nz
        assert differ.sum() < 0.005 * nz.sum() and np.all(np.abs(mine[differ].astype(int) - bnb[differ]) == 1)


# ------------------------------------------------------------------------------ jit, vmap, sharding


def test_jit_vmap_and_sharding():
    code = Q.UNSIGNED_DYNAMIC_MAP
    x = np.abs(wide_data(8 * 1024, False)).reshape(8, 1024)
    eager = [Q.quantize(row, code, 256) for row in x]
    batched = jax.vmap(lambda r: Q.quantize(r, code, 256))(x)
    assert batched.codes.shape == (8, 1024) and batched.scales.shape == (8, 4)
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(batched.codes[i]), np.asarray(eager[i].codes))
        np.testing.assert_array_equal(np.asarray(batched.scales[i]), np.asarray(eager[i].scales))
    deq = jax.vmap(lambda q: Q.dequantize(q, code, (1024,), 256))(batched)
    np.testing.assert_array_equal(np.asarray(deq[3]), np.asarray(Q.dequantize(eager[3], code, (1024,), 256)))

    devices = jax.devices()
    assert len(devices) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)"
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d", None)))
    fn = jax.jit(lambda a: Q.quantize(a, code, 256))
    q = fn(sharded)
    whole = Q.quantize(x, code, 256)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(whole.codes))
    np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(whole.scales))
    # the codes and scales are split like the leaf, with no collective
    assert q.codes.sharding.is_equivalent_to(sharded.sharding, 2)
    assert q.scales.sharding.is_equivalent_to(sharded.sharding, 2)
    hlo = fn.lower(sharded).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))


def test_quantized_zeros_and_bytes_per_param():
    for code in MAPS.values():
        for shape in [(3, 100), (1,), (4096,), (257, 9)]:
            z = Q.quantized_zeros(shape, code, 256)
            q = Q.quantize(jnp.zeros(shape), code, 256)
            np.testing.assert_array_equal(np.asarray(z.codes), np.asarray(q.codes))
            np.testing.assert_array_equal(np.asarray(z.scales), np.asarray(q.scales))
            assert np.all(np.asarray(Q.dequantize(z, code, shape, 256)) == 0)
        z = Q.quantized_zeros(jax.ShapeDtypeStruct((64, 64), jnp.bfloat16), code, 64)
        assert z.codes.shape == (64, 64) and z.scales.shape == (64, 1)
    abstract = jax.eval_shape(lambda: Q.quantized_zeros((1000,), Q.SIGNED_DYNAMIC_MAP, 256))
    assert abstract.codes.shape == (1000,) and abstract.scales.shape == (4,)

    params = {"w": jnp.zeros((1024, 512)), "b": jnp.zeros((513,))}
    for block_size in (64, 256, 2048):
        state = {
            "mu": jax.tree.map(lambda p: Q.quantized_zeros(p, Q.SIGNED_DYNAMIC_MAP, block_size), params),
            "nu": jax.tree.map(lambda p: Q.quantized_zeros(p, Q.UNSIGNED_DYNAMIC_MAP, block_size), params),
        }
        measured = Q.bytes_per_param(state, params)
        n = 1024 * 512 + 513
        expected = 2 * (Q.quantized_nbytes(1024 * 512, block_size) + Q.quantized_nbytes(513, block_size)) / n
        assert measured == expected
        assert abs(measured - 2 * (1 + 4 / block_size)) < 2e-3  # 1 byte code + 4/block_size per moment
        f32_state = {"mu": params, "nu": params}
        assert Q.bytes_per_param(f32_state, params) == 8.0
    assert Q.bytes_per_param(state, params) < 2.01  # block 2048


def test_bad_arguments_raise_clear_errors():
    x = jnp.ones(10)
    with pytest.raises(ValueError, match="block_size"):
        Q.quantize(x, Q.SIGNED_DYNAMIC_MAP, 0)
    with pytest.raises(ValueError, match="block_size"):
        Q.quantized_zeros((3,), Q.SIGNED_DYNAMIC_MAP, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="code"):
        Q.quantize(x, np.zeros(255, np.float32), 64)
    with pytest.raises(ValueError, match="sorted"):
        Q.quantize(x, Q.SIGNED_DYNAMIC_MAP[::-1].copy(), 64)
    with pytest.raises(ValueError, match="must contain 0.0"):
        Q.quantized_zeros((3,), np.linspace(0.1, 1, 256, dtype=np.float32), 64)
    with pytest.raises(TypeError, match="`x` must be a floating"):
        Q.quantize(jnp.ones(10, jnp.int32), Q.SIGNED_DYNAMIC_MAP, 64)
    q = Q.quantize(x, Q.SIGNED_DYNAMIC_MAP, 4)
    with pytest.raises(ValueError, match="does not fit shape"):
        Q.dequantize(q, Q.SIGNED_DYNAMIC_MAP, (11,), 4)
    with pytest.raises(ValueError, match="does not fit shape"):
        Q.dequantize(q, Q.SIGNED_DYNAMIC_MAP, (10,), 8)


# ----------------------------------------------------------------------------------- C++ header


def _cpu_has_vbmi() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512vbmi" in line for line in f)
    except OSError:
        return False


@pytest.fixture(scope="module", params=sorted(BUILDS))
def quant8_lib(request, tmp_path_factory):
    so = compile_library("quant8_test", request.param, tmp_path_factory.mktemp("quant8"))
    f, u8, sz = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t
    so.q8_encode.argtypes = [f, f, sz, sz, u8, f]
    so.q8_encode_block.argtypes = [f, f, sz, u8, f]
    so.q8_decode.argtypes = [f, u8, f, sz, sz, f]
    so.q8_zero_code.argtypes = [f]
    so.q8_encode_table.argtypes = [f, f, sz, sz, u8, f]
    so.q8_decode_blocks.argtypes = [f, u8, f, sz, sz, f]
    so.build = request.param
    return so


def _ptr(a: np.ndarray, t):
    return a.ctypes.data_as(ctypes.POINTER(t))


def cpp_quantize(lib, x: np.ndarray, code: np.ndarray, block_size: int):
    x = np.ascontiguousarray(x, np.float32)
    n = x.size
    codes = np.empty(n, np.uint8)
    scales = np.empty(-(-n // block_size), np.float32)
    lib.q8_encode(_ptr(code, ctypes.c_float), _ptr(x, ctypes.c_float), n, block_size,
                  _ptr(codes, ctypes.c_uint8), _ptr(scales, ctypes.c_float))  # fmt: skip
    return codes, scales


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
@pytest.mark.parametrize("block_size,n", [(64, 6 * 64 + 5), (256, 40 * 256 + 13), (2048, 6 * 2048 + 100)])
def test_cpp_header_equals_jax_bit_for_bit(quant8_lib, tag, block_size, n):
    code = np.ascontiguousarray(MAPS[tag])
    x = nasty_data(n, code, block_size, seed=n)
    codes, scales = cpp_quantize(quant8_lib, x, code, block_size)
    q = jax.jit(lambda a: Q.quantize(a, code, block_size))(x)
    np.testing.assert_array_equal(codes, np.asarray(q.codes))
    np.testing.assert_array_equal(scales, np.asarray(q.scales))
    assert np.isnan(scales[3]) and np.all(codes[3 * block_size : 4 * block_size] == Q.zero_code(code))  # NaN block
    assert quant8_lib.q8_zero_code(_ptr(code, ctypes.c_float)) == Q.zero_code(code)
    out = np.empty(n, np.float32)
    quant8_lib.q8_decode(_ptr(code, ctypes.c_float), _ptr(codes, ctypes.c_uint8), _ptr(scales, ctypes.c_float),
                         n, block_size, _ptr(out, ctypes.c_float))  # fmt: skip
    np.testing.assert_array_equal(out, np.asarray(Q.dequantize(q, code, (n,), block_size)))
    # encode_block on a short (last) block by itself
    blk = np.ascontiguousarray(x[-5:])
    c5, s1 = np.empty(5, np.uint8), np.empty(1, np.float32)
    quant8_lib.q8_encode_block(_ptr(code, ctypes.c_float), _ptr(blk, ctypes.c_float), 5,
                               _ptr(c5, ctypes.c_uint8), _ptr(s1, ctypes.c_float))  # fmt: skip
    q5 = Q.quantize(blk, code, block_size)
    np.testing.assert_array_equal(c5, np.asarray(q5.codes))
    np.testing.assert_array_equal(s1, np.asarray(q5.scales))


def _table_quantize(lib, x: np.ndarray, code: np.ndarray, block_size: int):
    x = np.ascontiguousarray(x, np.float32)
    codes = np.empty(x.size, np.uint8)
    scales = np.empty(-(-x.size // block_size), np.float32)
    fast = lib.q8_encode_table(_ptr(code, ctypes.c_float), _ptr(x, ctypes.c_float), x.size, block_size,
                               _ptr(codes, ctypes.c_uint8), _ptr(scales, ctypes.c_float))  # fmt: skip
    return codes, scales, fast


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
@pytest.mark.parametrize("block_size,n", [(64, 6 * 64 + 5), (256, 40 * 256 + 13)])
def test_cpp_table_encoder_equals_jax_bit_for_bit(quant8_lib, tag, block_size, n):
    """The kernel's encoder (TableEncoder: one table lookup + one compare, vectorized) and
    decode_block give the codes, scales and values of JAX's quantize/dequantize."""
    code = np.ascontiguousarray(MAPS[tag])
    x = nasty_data(n, code, block_size, seed=n + 1)
    codes, scales, fast = _table_quantize(quant8_lib, x, code, block_size)
    assert fast == 1  # the dynamic maps take the exact one-compare path
    q = jax.jit(lambda a: Q.quantize(a, code, block_size))(x)
    np.testing.assert_array_equal(codes, np.asarray(q.codes))
    np.testing.assert_array_equal(scales, np.asarray(q.scales))
    out = np.empty(n, np.float32)
    quant8_lib.q8_decode_blocks(_ptr(code, ctypes.c_float), _ptr(codes, ctypes.c_uint8),
                                _ptr(scales, ctypes.c_float), n, block_size, _ptr(out, ctypes.c_float))  # fmt: skip
    np.testing.assert_array_equal(out, np.asarray(Q.dequantize(q, code, (n,), block_size)))


@pytest.mark.parametrize("tag", ["signed", "unsigned", "linear-signed", "linear-unsigned"])
def test_cpp_table_encoder_at_every_midpoint(quant8_lib, tag):
    """Every float32 within 300 ulps of every midpoint of the map, both signs, plus a sweep of
    bit patterns over [-1, 1], against NumPy's searchsorted (the reference's nearest code).
    Blocks of 255 values plus 1.0: scale 1, so y = x exactly. (The table's argument is
    exhaustive: every float32 in [2**-37, 2] and every non-finite one was checked once, see
    adamx/_quant8.h; here the places where an error would show.)"""
    code = {"linear-signed": Q.linear_map(True), "linear-unsigned": Q.linear_map(False)}.get(tag, MAPS.get(tag))
    code = np.ascontiguousarray(code)
    mids = Q.midpoints(code)
    near = (mids.view(np.int32)[:, None] + np.arange(-300, 301, dtype=np.int32)[None, :]).ravel().view(np.float32)
    sweep = np.arange(0, 0x3F800001, 997, dtype=np.int64).astype(np.int32).view(np.float32)  # [0, 1]
    y = np.concatenate([near, -near, sweep, -sweep, [0.0, -0.0, 1e-40, -1e-40]]).astype(np.float32)
    y = y[np.abs(y) <= 1]
    y = np.pad(y, (0, -y.size % 255)).reshape(-1, 255)
    x = np.concatenate([y, np.ones((y.shape[0], 1), np.float32)], axis=1).ravel()
    codes, scales, fast = _table_quantize(quant8_lib, x, code, 256)
    assert np.all(scales == 1)
    xf = np.where(np.abs(x) < Q.FLT_MIN, np.float32(0), x)
    want = np.searchsorted(mids, xf, side="left")
    np.testing.assert_array_equal(codes, want.astype(np.uint8))
    if tag in MAPS:
        assert fast == 1


def test_cpp_decoder_path_is_the_one_this_cpu_runs(quant8_lib):
    """The native build of the header takes the AVX-512 VBMI decoder exactly when the CPU has
    VBMI (so on such a machine the tests here check the permute path, not only the loop)."""
    want = 1 if quant8_lib.build == "native" and _cpu_has_vbmi() else 0
    assert quant8_lib.q8_vbmi() == want


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
def test_cpp_table_decoder_every_code_and_every_tail(quant8_lib, tag):
    """TableDecoder against the map lookup (decode_block on the map) and JAX's dequantize:
    every code in every position of a 64-code group, block lengths 1..200 (the permute path
    takes groups of 64, the loop the tail), and scales that are 0, tiny (code * scale
    subnormal: flushed to +0), huge (inf products), NaN, and negative-zero."""
    code = np.ascontiguousarray(MAPS[tag])
    rng = np.random.default_rng(7)
    codes = np.concatenate([np.arange(256), np.roll(np.arange(256), 37), rng.integers(0, 256, 3000)]).astype(np.uint8)
    for bs in (64, 256, 1, 7, 100, 129, 200):
        n = codes.size
        nb = -(-n // bs)
        scales = rng.lognormal(0.0, 3.0, nb).astype(np.float32)
        scales[:6] = np.array([0.0, 1e-38, 3e38, np.nan, -0.0, 1.0], np.float32)[: min(6, nb)]
        out = np.empty(n, np.float32)
        quant8_lib.q8_decode_blocks(_ptr(code, ctypes.c_float), _ptr(codes, ctypes.c_uint8),
                                    _ptr(scales, ctypes.c_float), n, bs, _ptr(out, ctypes.c_float))  # fmt: skip
        want = np.empty(n, np.float32)
        quant8_lib.q8_decode(_ptr(code, ctypes.c_float), _ptr(codes, ctypes.c_uint8), _ptr(scales, ctypes.c_float),
                             n, bs, _ptr(want, ctypes.c_float))  # fmt: skip
        np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))  # bit for bit, signed zeros too
        q = Q.QuantizedArray(codes=jnp.asarray(codes), scales=jnp.asarray(scales))
        np.testing.assert_array_equal(out, np.asarray(Q.dequantize(q, code, (n,), bs)))


def test_cpp_header_subnormal_products_flush_like_xla(quant8_lib):
    """A tiny scale makes code * scale subnormal: both sides give 0 (XLA CPU flushes; the header says so)."""
    code = np.ascontiguousarray(Q.UNSIGNED_DYNAMIC_MAP)
    x = np.array([1e-37, 3e-38, 2e-38], np.float32)  # absmax 1e-37; small codes * 1e-37 < FLT_MIN
    codes, scales = cpp_quantize(quant8_lib, x, code, 64)
    out = np.empty(3, np.float32)
    quant8_lib.q8_decode(_ptr(code, ctypes.c_float), _ptr(codes, ctypes.c_uint8), _ptr(scales, ctypes.c_float),
                         3, 64, _ptr(out, ctypes.c_float))  # fmt: skip
    q = Q.quantize(x, code, 64)
    np.testing.assert_array_equal(out, np.asarray(Q.dequantize(q, code, (3,), 64)))


# ------------------------------------------------------------------------------- one 8-bit Adam step


def test_first_step_equals_adamx_adam():
    """From zero state the first step uses exact float32 moments: 8-bit adamx.adam's update equals
    float32 adamx.adam's, bit for bit."""
    rng = np.random.default_rng(3)
    p = {"w": jnp.asarray(rng.standard_normal((64, 80)).astype(np.float32))}
    g = {"w": jnp.asarray((rng.standard_normal((64, 80)) * 10.0 ** rng.uniform(-5, 0, (64, 80))).astype(np.float32))}
    opt = adamx.adam(learning_rate=2e-3)
    u_ref, _ = opt.update(g, opt.init(p), p)
    q8 = adamx.adam(learning_rate=2e-3, quantize_moments=True)
    u, _ = q8.update(g, q8.init(p), p)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(u_ref["w"]))


def _keras_step_8bit(g, m, v, count, lr, v_code, bs=256):
    """One Keras-Adam step on 8-bit moments with any second-moment map (adamx.adam has the dynamic
    maps only): dequantize, float32 moments, requantize."""
    c1, c2 = np.float32(1 - 0.9), np.float32(1 - 0.999)
    t = np.float32(count + 1)
    alpha = np.float32(lr) * np.sqrt(1 - np.float32(0.999) ** t) / (1 - np.float32(0.9) ** t)
    m32 = Q.dequantize(m, Q.SIGNED_DYNAMIC_MAP, g.shape, bs)
    v32 = Q.dequantize(v, v_code, g.shape, bs)
    m32 = m32 + (g - m32) * c1
    v32 = v32 + (g * g - v32) * c2
    u = -(m32 * alpha) / (jnp.sqrt(v32) + np.float32(1e-7))
    return u, Q.quantize(m32, Q.SIGNED_DYNAMIC_MAP, bs), Q.quantize(v32, v_code, bs)


def _run_adam(v_code, steps: int = 20):
    """A block where element 0 has g = 1 and the rest g = 1e-3 for `steps` steps, then g = 0 on the rest."""
    n, lr = 256, 1e-3
    p = jnp.zeros(n)
    g = jnp.full(n, 1e-3).at[0].set(1.0)
    m = Q.quantized_zeros(p, Q.SIGNED_DYNAMIC_MAP)
    v = Q.quantized_zeros(p, v_code)
    for count in range(steps):
        _, m, v = _keras_step_8bit(g, m, v, count, lr, v_code)
    u, m, v = _keras_step_8bit(g.at[1:].set(0.0), m, v, steps, lr, v_code)
    return float(jnp.max(jnp.abs(u[1:]))) / lr, np.asarray(Q.dequantize(v, v_code, (n,)))


def test_linear_second_moment_blows_up_dynamic_does_not():
    """Why the second moment needs the dynamic map.

    v of the small elements is ~1e-6 of the block absmax (element 0's v). The linear map's
    smallest step is absmax/255, so v rounds to 0; when g then is 0, the step is
    m * alpha / (sqrt(0) + eps) ~ 1e3 x lr. The dynamic map keeps v (smallest non-zero
    code 3.25e-7 x absmax) and the step stays ~ lr, as with float32 moments (0.9 x lr here).
    """
    ratio_dyn, v_dyn = _run_adam(Q.UNSIGNED_DYNAMIC_MAP)
    ratio_lin, v_lin = _run_adam(Q.linear_map(signed=False))
    assert np.all(v_lin[1:] == 0) and np.all(v_dyn[1:] > 0)
    assert ratio_dyn < 2.0
    assert ratio_lin > 500.0


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
def test_arithmetic_codec_gives_searchsorted_codes(tag):
    """``dynamic_encode`` (the codes by arithmetic, what the step runs under jit: no gather, no
    table) equals ``searchsorted`` over the map's midpoints and the C++ encoder's table on every
    float within 300 ulps of every midpoint (both signs), a bit-pattern sweep of [-2, 2] and
    adversarial blocks (ties, subnormals, NaN/inf, zero blocks); ``dynamic_decode`` is the map."""
    code = np.ascontiguousarray(MAPS[tag])
    signed = tag == "signed"
    np.testing.assert_array_equal(
        np.asarray(Q.dynamic_decode(jnp.arange(256), signed)).view(np.uint32), code.view(np.uint32)
    )
    mids = Q.midpoints(code)
    near = (mids.view(np.int32)[:, None] + np.arange(-300, 301, dtype=np.int32)[None, :]).ravel().view(np.float32)
    sweep = np.arange(0, 0x40000001, 997, dtype=np.int64).astype(np.int32).view(np.float32)
    y = np.concatenate([near, -near, sweep, -sweep, [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]]).astype(np.float32)
    got = np.asarray(jax.jit(lambda a: Q.dynamic_encode(a, signed))(y))
    want = np.searchsorted(mids, y, side="left")
    want[np.isnan(y)] = Q.zero_code(code)
    np.testing.assert_array_equal(got, want)
    table = jnp.asarray(Q.encoder_table(code))
    np.testing.assert_array_equal(got, np.asarray(Q.encode_with_table(jnp.asarray(y), table, Q.zero_code(code))))
    x = nasty_data(40 * 256 + 13, code, 256, seed=3)
    q = jax.jit(lambda a: Q.quantize(a, code, 256))(x)
    rc, rs = R.quantize(x, code, 256)
    np.testing.assert_array_equal(np.asarray(q.codes), rc)
    np.testing.assert_array_equal(np.asarray(q.scales), rs)


@pytest.mark.parametrize("tag", ["signed", "unsigned"])
def test_arithmetic_codec_exhaustive(tag):
    """Every float32 bit pattern with |y| <= 2 (2**31 values, both signs): ``dynamic_encode`` gives
    the C++ encoder table's codes (itself proven equal to the nearest-code search)."""
    code = np.ascontiguousarray(MAPS[tag])
    signed = tag == "signed"
    table, zero = jnp.asarray(Q.encoder_table(code)), Q.zero_code(code)

    @jax.jit
    def mismatches(start):
        bits = start + jnp.arange(1 << 24, dtype=jnp.uint32)
        n = jnp.int32(0)
        for sign in (0, 0x80000000):
            y = jax.lax.bitcast_convert_type(bits | jnp.uint32(sign), jnp.float32)
            n += jnp.sum(Q.dynamic_encode(y, signed) != Q.encode_with_table(y, table, zero))
        return n

    bad = sum(int(mismatches(jnp.uint32(s))) for s in range(0, 0x40000000 + 1, 1 << 24))
    assert bad == 0


def test_encoder_table_refuses_maps_it_cannot_serve():
    """A map whose buckets hold two midpoints (the signed linear map) gets no table: quantize
    then searches (and the step falls back the same way)."""
    assert Q.encoder_table(Q.linear_map(True)) is None
    assert Q.encoder_table(Q.linear_map(False)) is not None
