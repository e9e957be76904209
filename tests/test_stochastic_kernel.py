"""The fused kernel's stochastic rounding (``adamx/fused/kernel.cc``) is ``adamx/_rounding.py``'s, bit for bit.

The kernel rounds x (float32) stochastically to the param dtype with hash h in two ways:
``stochastic_round<P>`` (the reference's arithmetic op by op, bf16 and f16) and, for bf16,
``stochastic_round_bf16_fast`` (the top 16 bits of h added to x's bits), which it takes for the
blocks whose every x is 0 or has 2**-103 <= |x| <= the largest bf16. This checks

* both against ``adamx._rounding.stochastic`` (XLA:CPU) on edge values and random ones;
* the fast form against the general one for every float32 x in its range with a few hashes (the
  proof of the kernel's comment, by exhaustion), and for edge x with every hash;
* that it is wrong outside its range (the range test matters);
* the kernel's short hash (``SrHash``) against MurmurHash3's finalizer for every counter, and its
  NaN-free bf16 rounding (``round_bf16_not_nan``, for the fast blocks) against ``round_to`` for every float32;
* the whole kernel against the reference step on a leaf whose blocks take both paths.

The C++ is the kernel's own source, cut out of ``kernel.cc`` (``tests/cpp/stochastic_test.cc``).
"""

from __future__ import annotations

import ctypes
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _rounding
from adamx import fused as _fused
from tests.cpp import compile_library

KERNEL = pathlib.Path(adamx.__file__).parent / "fused" / "kernel.cc"
HASHES = [0x00000000, 0xFFFFFFFF, 0x80007F00]  # r = 0 and H = 0; r and H largest; H = 2**15
MAX_BF16 = 0x7F7F0000


def kernel_rounding_source() -> str:
    """kernel.cc's MXCSR switch, its ``dtypes`` and ``param_rounding`` sections and ``ScopedFtz``."""
    src = KERNEL.read_text()
    parts = re.split(r"^// -{10,} (.+)\n", src, flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2]))
    mxcsr = re.search(r"^#if defined\(__x86_64__\).*?^#endif\n", src, flags=re.M | re.S)
    ftz = re.search(r"^struct ScopedFtz \{.*?^\};\n", src, flags=re.M | re.S)
    assert mxcsr and ftz and "dtypes" in sections and "param_rounding" in sections, "kernel.cc's layout changed"
    return mxcsr.group(0) + sections["dtypes"] + sections["param_rounding"] + ftz.group(0)


@pytest.fixture(scope="module")
def srlib(tmp_path_factory):
    d = tmp_path_factory.mktemp("stochastic")
    (d / "kernel_rounding.inc").write_text(kernel_rounding_source())
    lib = compile_library("stochastic_test", "native", d, include=[d])
    u32p = ctypes.POINTER(ctypes.c_uint32)
    lib.sr_bf16_diff_over_x.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64, u32p]
    lib.sr_bf16_diff_over_h.argtypes = [ctypes.c_float, ctypes.c_uint32, u32p]
    lib.sr_hash_diff.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64, u32p]
    lib.sr_round_not_nan_diff.argtypes = [ctypes.c_uint32, ctypes.c_uint64, u32p]
    for f in (lib.sr_bf16_diff_over_x, lib.sr_bf16_diff_over_h, lib.sr_hash_diff, lib.sr_round_not_nan_diff):
        f.restype = ctypes.c_uint64
    return lib


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def cpp_round(lib, dtype, form: int, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    x, h = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(h, np.uint32)
    out = np.empty_like(x)
    lib.sr_round(1 if dtype == jnp.bfloat16 else 2, form, _ptr(x), _ptr(h), ctypes.c_size_t(x.size), _ptr(out))
    return out


def edge_bits() -> np.ndarray:
    """float32 bits around every case of the rounding: each exponent with low bits 0, 1, 0x7fff,
    0x8000, 0x8001, 0xffff and random ones, around the largest bf16 and f16, zeros, inf, NaN; both signs."""
    rng = np.random.default_rng(0)
    exps = np.arange(1, 255, dtype=np.uint32) << 23
    highs = np.array([0, 0x7F, 0x40, *rng.integers(0, 0x80, 3)], np.uint32) << 16  # bf16's kept mantissa
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, *rng.integers(0, 0x10000, 4)], np.uint32)
    grid = (exps[:, None, None] | highs[None, :, None] | lows[None, None, :]).ravel()
    near_max = np.concatenate([MAX_BF16 + np.arange(-3, 0x10004, 97, dtype=np.int64), [0x7F7F7FFF, 0x7F7F8000]])
    f16_max = 0x477FE000 + np.arange(-0x2000, 0x2010, 37, dtype=np.int64)  # 65504 and the values past it
    special = np.array([0, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FBFFFFF, 0x00800000], np.int64)
    pos = np.concatenate([grid, near_max, f16_max, special, rng.integers(0x00800000, 0x7F800000, 20000)])
    pos = pos.astype(np.uint32)
    return np.concatenate([pos, pos | np.uint32(0x80000000)])


def reference(x: np.ndarray, h: np.ndarray, dtype) -> np.ndarray:
    r = jnp.asarray(h >> 8, jnp.uint32).astype(jnp.float32) * jnp.float32(2.0**-24)  # _rounding.uniforms
    return np.asarray(jax.jit(_rounding.stochastic, static_argnums=1)(jnp.asarray(x), dtype, r))


def assert_same_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str) -> None:
    """Equal bits, NaN for NaN (the kernel's NaN is quiet with x's top bits; XLA's payload is its own)."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=what)
    bad = np.flatnonzero(got.view(np.uint32)[~nan] != want.view(np.uint32)[~nan])
    assert bad.size == 0, f"{what}: {bad.size} differ, first x = {x[~nan][bad[0]].view(np.uint32):#010x}"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_kernel_forms_equal_the_reference_on_edge_values(srlib, dtype):
    bits = edge_bits()
    x = bits.view(np.float32)
    rng = np.random.default_rng(1)
    for h in [np.full(x.size, v, np.uint32) for v in HASHES] + [rng.integers(0, 2**32, x.size, dtype=np.uint32)]:
        want = reference(x, h, dtype)
        name = "general" if dtype == jnp.bfloat16 else "f16"
        assert_same_bits(cpp_round(srlib, dtype, 0, x, h), want, x, f"{name} form, h[0] = {h[0]:#x}")
        if dtype == jnp.bfloat16:  # the fast form, where the kernel takes it
            ok = fast_ok(bits)
            got = cpp_round(srlib, dtype, 1, x[ok], h[ok])
            assert_same_bits(got, want[ok], x[ok], f"fast form, h[0] = {h[0]:#x}")
            assert not ok.all() and ok.sum() > x.size // 2  # both kinds of x are here


def fast_ok(bits: np.ndarray) -> np.ndarray:
    """Where the kernel takes the fast form: x is +-0 or 2**-103 <= |x| <= the largest bf16."""
    ax = bits & np.uint32(0x7FFFFFFF)
    return (ax == 0) | ((ax >= 0x0C000000) & (ax <= MAX_BF16))


def test_fast_form_is_wrong_outside_its_range(srlib):
    """The range test matters: under 2**-103, where x - lo flushes to zero, and past the largest bf16
    (up to inf for x > 0, -inf for x < 0) the reference rounds down where the fast form may not."""
    x = np.array([0x0B800001, 0x04000001, 0x7F7F4000, 0xFF7F4000], np.uint32).view(np.float32)
    h = np.zeros(x.size, np.uint32)  # H = 0: the fast form rounds every inexact x toward +inf
    got, want = cpp_round(srlib, jnp.bfloat16, 1, x, h), reference(x, h, jnp.bfloat16)
    assert (got.view(np.uint32) != want.view(np.uint32)).all()


@pytest.mark.slow
@pytest.mark.parametrize("h", HASHES, ids=lambda h: f"{h:#010x}")
def test_fast_form_equals_the_general_one_for_every_x_in_its_range(srlib, h):
    bad = ctypes.c_uint32()
    n = srlib.sr_bf16_diff_over_x(h, 0, 2**32, ctypes.byref(bad))
    assert n == 0, f"{n} x differ, first {bad.value:#010x}"


def test_fast_form_equals_the_general_one_for_every_hash(srlib):
    """For x at the edges of the fast range and of bf16's steps, every 24 bits of hash the general form reads."""
    sample = np.array(
        [
            0x0C000000, 0x0C000001, 0x0C007FFF, 0x0C008000, 0x0C00FFFF, 0x0C7FFFFF, 0x0C7F0001, 0x0C80FFFF,
            0x3F800001, 0x3F80FFFF, 0x3FFF8000, 0x3FFFFFFF, 0x7F7EFFFF, 0x7F7E0001, 0x7F7F0000, 0x00000000,
        ],
        np.uint32,
    )  # fmt: skip
    assert fast_ok(sample).all()
    bad = ctypes.c_uint32()
    for xb in np.concatenate([sample, sample | np.uint32(0x80000000)]):
        for low in (0x00, 0xFF):
            n = srlib.sr_bf16_diff_over_h(ctypes.c_float(xb.view(np.float32)), low, ctypes.byref(bad))
            assert n == 0, f"x = {xb:#010x}: {n} hashes differ, first k = {bad.value:#x}"


@pytest.mark.slow
def test_short_hash_equals_murmur_for_every_counter(srlib):
    bad = ctypes.c_uint32()
    n = srlib.sr_hash_diff(0x9E3779B9, 0, 2**32, ctypes.byref(bad))
    assert n == 0, f"{n} counters differ, first {bad.value:#x}"


def test_short_hash_equals_murmur_across_runs(srlib):
    """The fast test: counters across many runs of 2**16 (and the wrap at 2**32), from the start of
    a block and from inside one."""
    bad = ctypes.c_uint32()
    for key, j0 in ((0x12345678, 0xFFF00000), (0xDEADBEEF, 0x0000FF00), (0x9E3779B9, 0x0001FFF3)):
        n = srlib.sr_hash_diff(key, j0, 2**22, ctypes.byref(bad))
        assert n == 0, f"key {key:#x}: {n} counters differ, first {bad.value:#x}"


@pytest.mark.slow
def test_not_nan_rounding_equals_round_to_for_every_float(srlib):
    bad = ctypes.c_uint32()
    n = srlib.sr_round_not_nan_diff(0, 2**32, ctypes.byref(bad))
    assert n == 0, f"{n} floats differ, first {bad.value:#010x}"


@pytest.mark.skipif(not _fused.available(), reason="fused kernel unavailable")
@pytest.mark.parametrize("kw", [dict(), dict(use_ema=True, weight_decay=0.01)], ids=["plain", "ema"])
def test_fused_step_equals_reference_where_blocks_take_both_paths(kw):
    """A bf16 leaf of 3 runs of 2**16 params and a bit: most blocks take the fast path, those holding a
    tiny param the general one (+-2**-122 with gradients of 1e-34 and epsilon 1: x is inexact and
    under 2**-119, where x - lo flushes to zero and the fast form would round up about half the time).
    Zeros and the largest bf16 stay on the fast path."""
    n = 3 * 65536 + 777
    rng = np.random.default_rng(5)
    p = rng.standard_normal(n).astype(np.float32)
    tiny = rng.integers(0, n, 40)
    p[tiny] = 2.0**-122 * rng.choice([-1.0, 1.0], tiny.size)
    p[rng.integers(0, n, 40)] = 0.0
    p[rng.integers(0, n, 40)] = np.uint32(MAX_BF16).view(np.float32) * rng.choice([-1.0, 1.0], 40)
    params = {"w": jnp.asarray(p).astype(jnp.bfloat16), "b": jnp.zeros((1000,), jnp.bfloat16)}
    g_scale = np.ones(n, np.float32)
    g_scale[tiny] = 1e-34
    opt = adamx.adam(learning_rate=0.01, epsilon=1.0, param_rounding="stochastic", seed=11, **kw)
    assert _fused.why_not(opt, params, opt.init(params), params) is None

    def ref(g, s, q):
        u, s = opt.update(g, s, q)
        return optax.apply_updates(q, u), s

    fused = jax.jit(lambda g, s, q: opt.apply_gradients(g, s, q))
    ref = jax.jit(ref)
    a = b = (params, opt.init(params))
    for step in range(3):
        g = {"w": jnp.asarray(rng.standard_normal(n) * g_scale, jnp.bfloat16), "b": jnp.zeros((1000,), jnp.bfloat16)}
        a, b = fused(g, a[1], a[0]), ref(g, b[1], b[0])
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(
                np.asarray(x, np.float64),
                np.asarray(y, np.float64),
                err_msg=f"step {step} {jax.tree_util.keystr(path)}",
            )
