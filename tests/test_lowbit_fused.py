"""``moment_format="fp8"`` / ``"4bit"`` in the fused CPU kernel (adamx/_lowbit.h, ``LStepImpl`` in kernel.cc).

* ``apply_gradients`` runs fused (``adamx.fused.why_not`` is ``None``) and equals ``update`` +
  ``optax.apply_updates`` bit for bit: params, codes, scales and the float leaves beside them, for
  f32/bf16/f16 params (and bf16 params with f32 grads), every option the 8-bit kernel runs, 7 steps;
  with clipnorm/global_clipnorm the norms are summed in another order (as for every fused path,
  tests/test_performance_paths.py), so there a code may differ by one where a value sits at a rounding
  boundary, and the params by a fraction of the learning rate;
* leaves longer than one kernel segment split on block boundaries; the codes are written in place
  by one kernel call; resuming from an Orbax checkpoint continues the fused run bit for bit;
* the C++ codecs (tests/cpp/lowbit_test.cc) equal XLA's on every e4m3fn code, around every fp8
  rounding boundary and every 4-bit threshold.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _lowbit
from adamx import _quantize as Q
from adamx import fused as _fused
from tests.bitwise import bits
from tests.cpp import BUILDS, compile_library
from tests.test_performance_paths import OPTIONS, fused_step, ref_step

FUSED = _fused.available()
needs_kernel = pytest.mark.skipif(not FUSED, reason=f"fused kernel unavailable: {_fused.status()['error']}")
LOWBIT = ("fp8", "4bit")
# param_rounding / acc_dtype with quantized moments fall back (the kernels round to nearest)
FUSED_OPTIONS = [k for k, v in OPTIONS.items() if "param_rounding" not in v and "acc_dtype" not in v]
# every quantized leaf is a whole number of 256-blocks (fp8's, two of 4bit's); `odd` is not (float
# moments), `bias` is below quantize_min_size (float moments)
SHAPES = {
    "f32": {"kernel": (12, 256), "bias": (19,), "odd": (3, 100)},
    "bf16": {"kernel": (4, 256)},
    "f16": {"kernel": (2, 512)},
    "bf16_f32grad": (1024,),
}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "bf16_f32grad": jnp.bfloat16}
MIN_SIZE = 512


def make_params(seed: int = 0) -> dict:
    key = jax.random.PRNGKey(seed)
    out: dict = {}
    for i, (name, sub) in enumerate(SHAPES.items()):
        k = jax.random.fold_in(key, i)
        if isinstance(sub, tuple):
            out[name] = jax.random.normal(k, sub).astype(DTYPES[name])
        else:
            ks = jax.random.split(k, len(sub))
            out[name] = {n: jax.random.normal(kk, s).astype(DTYPES[name]) for kk, (n, s) in zip(ks, sub.items())}
    return out


def make_grads(params: dict, step: int) -> dict:
    """Random scale, small every 5th step, 10% exact zeros; float32 grads for ``bf16_f32grad``."""
    rng = np.random.default_rng(2000 + step)
    scale = rng.uniform(0.5, 1.0) * (0.05 if step % 5 == 3 else 1.0)

    def one(path, p):
        g = rng.standard_normal(p.shape) * scale
        g = np.where(rng.random(p.shape) < 0.1, 0.0, g)
        dt = jnp.float32 if "bf16_f32grad" in jax.tree_util.keystr(path) else p.dtype
        return jnp.asarray(g, jnp.float32).astype(dt)

    return jax.tree_util.tree_map_with_path(one, params)


def run(step, opt, n_steps: int, start=None, first: int = 0):
    params, state = start if start is not None else (make_params(), opt.init(make_params()))
    for i in range(first, n_steps):
        params, state = step(make_grads(params, i), state, params)
    return params, state


def is_nan(x) -> np.ndarray:
    """Where ``x`` holds a NaN: floats, e4m3fn codes (0x7f, 0xff); 4-bit codes have no NaN."""
    x = np.asarray(x)
    if x.dtype == jnp.float8_e4m3fn:
        return (bits(x) & 0x7F) == 0x7F
    if x.dtype.kind == "f" or x.dtype == jnp.bfloat16:
        return np.isnan(x.astype(np.float32))
    return np.zeros(x.shape, bool)


def assert_bit_equal(a, b) -> None:
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree.leaves(b)
    assert len(fa) == len(fb)
    for (path, x), y in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=jax.tree_util.keystr(path))


def code_steps(x, fmt: str) -> np.ndarray:
    """Codes as integers on which one rounding step is 1: 4-bit codes unpacked; e4m3fn codes ordered
    by value (sign-magnitude bytes to a signed integer)."""
    x = np.asarray(x)
    if fmt == "4bit":
        return np.asarray(_lowbit.unpack4(x)).astype(int)
    b = bits(x).astype(int)
    return np.where(b & 0x80, -(b & 0x7F), b)


def assert_close(a, b, fmt: str, lr: float) -> None:
    """Equal but for rare one-step code differences and what they cause (clipping norms summed in
    another order change a float32 moment in the last bit; at a rounding boundary it takes the
    neighbouring code, and that element's update differs by a fraction of ``lr``)."""
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(fa, jax.tree.leaves(b)):
        where = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        if where.endswith(".codes"):
            d = np.abs(code_steps(x, fmt) - code_steps(y, fmt))
            assert d.max(initial=0) <= 1 and (d != 0).mean() <= 0.01, where
        elif x.size:
            xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
            assert np.all(np.abs(xn - yn) <= 0.2 * lr + 1e-3 * np.abs(yn)), where


def lowbit_opt(fmt: str, **kw) -> optax.GradientTransformation:
    return adamx.adam(quantize_moments=True, moment_format=fmt, quantize_min_size=MIN_SIZE, **kw)


# ---------------------------------------------------------------------- fused == reference
@needs_kernel
@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("option", FUSED_OPTIONS)
def test_fused_equals_reference_bit_for_bit(fmt, option):
    opt = lowbit_opt(fmt, **OPTIONS[option])
    params = make_params()
    state = opt.init(params)
    assert isinstance(state.mu["f16"]["kernel"], Q.QuantizedArray)
    assert not isinstance(state.mu["f32"]["odd"], Q.QuantizedArray)
    assert not isinstance(state.mu["f32"]["bias"], Q.QuantizedArray)
    assert _fused.why_not(opt, make_grads(params, 0), state, params) is None
    fused = run(fused_step(opt), opt, 7)
    ref = run(ref_step(opt), opt, 7)
    if {"clipnorm", "global_clipnorm"} & set(OPTIONS[option]):
        assert_close(fused, ref, fmt, OPTIONS[option].get("learning_rate", 0.001))
    else:
        assert_bit_equal(fused, ref)


@needs_kernel
@pytest.mark.parametrize(
    ("fmt", "n", "extra"),
    [
        ("fp8", 2 * 65536 + 3 * 256, dict(amsgrad=True)),
        ("4bit", 2 * 65536 + 5 * 128, dict(gradient_accumulation_steps=2, use_ema=True)),
    ],
)
def test_fused_large_leaves_split_on_block_boundaries(fmt, n, extra):
    """Leaves longer than one kernel segment (65536) with a partial last segment: bit-identical."""
    opt = adamx.adam(learning_rate=0.01, quantize_moments=True, moment_format=fmt, **extra)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (n,)), "b": jnp.ones((5,))}
    a = b = (params, opt.init(params))
    assert _fused.why_not(opt, params, a[1], params) is None
    fs, rs = fused_step(opt), ref_step(opt)
    for i in range(4):
        g = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i + 7), p.shape), params)
        a = fs(g, a[1], a[0])
        b = rs(g, b[1], b[0])
    assert_bit_equal(a, b)


@needs_kernel
@pytest.mark.parametrize("fmt", LOWBIT)
def test_fused_non_finite_gradients_equal_reference_bits(fmt):
    """A NaN and an inf in the gradients: the blocks that hold them get NaN scales and NaN codes.
    The fused step has NaN exactly where the reference has, and the same bits everywhere else.
    (Not the NaN's sign: where two NaNs meet, x86 returns the one of the instruction's first
    operand, and GCC and XLA's LLVM order an FMA's operands differently.)"""
    opt = lowbit_opt(fmt, learning_rate=0.01, amsgrad=True)
    params = make_params()
    a = b = (params, opt.init(params))
    fs, rs = fused_step(opt), ref_step(opt)
    for i in range(3):
        g = make_grads(params, i)
        w = np.asarray(g["f32"]["kernel"]).copy()
        if i == 1:
            w[1, 7], w[5, 44] = np.nan, np.inf
        g["f32"]["kernel"] = jnp.asarray(w)
        a = fs(g, a[1], a[0])
        b = rs(g, b[1], b[0])
    assert np.isnan(np.asarray(a[1].mu["f32"]["kernel"].scales)).any()
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(fa, jax.tree.leaves(b)):
        where = jax.tree_util.keystr(path)
        nx, ny = is_nan(x), is_nan(y)
        np.testing.assert_array_equal(nx, ny, err_msg=where)
        np.testing.assert_array_equal(bits(x)[~nx], bits(y)[~ny], err_msg=where)


@needs_kernel
@pytest.mark.parametrize("fmt", LOWBIT)
def test_fused_updates_codes_in_place_one_call(fmt):
    """Donated: codes and scales are written in place (no copies), by one low-bit kernel call."""
    opt = lowbit_opt(fmt, learning_rate=0.01, amsgrad=True)
    params = make_params()
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
    hlo = step.lower(params, state, make_grads(params, 0)).compile().as_text()
    assert hlo.count(f'custom_call_target="{_fused._build.LOWBIT_TARGET}"') == 1
    assert hlo.count(f'custom_call_target="{_fused._build.Q8_TARGET}"') == 0
    copies = [c for c in hlo.splitlines() if " copy(" in c and ("u8[" in c or "f8e4m3fn[" in c)]
    assert not copies, copies
    p, s = params, state
    for i in range(2):
        before = (
            s.mu["f32"]["kernel"].codes.unsafe_buffer_pointer(),
            s.nu_max["f16"]["kernel"].scales.unsafe_buffer_pointer(),
        )
        p, s = step(p, s, make_grads(p, i))
        after = (
            s.mu["f32"]["kernel"].codes.unsafe_buffer_pointer(),
            s.nu_max["f16"]["kernel"].scales.unsafe_buffer_pointer(),
        )
        assert after == before
    assert step._cache_size() == 1


@needs_kernel
@pytest.mark.parametrize("fmt", LOWBIT)
def test_fused_resume_from_orbax_is_bit_exact(tmp_path, fmt):
    """Save mid-run (accumulation in flight), restore into the abstract target, continue fused:
    identical to the uninterrupted fused run, and to the reference run."""
    ocp = pytest.importorskip("orbax.checkpoint")
    opt = lowbit_opt(fmt, learning_rate=0.01, amsgrad=True, gradient_accumulation_steps=2, use_ema=True)
    step = fused_step(opt)
    full = run(step, opt, 7)
    mid = run(step, opt, 3)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", mid)
    ckptr.wait_until_finished()
    target = jax.eval_shape(lambda: (make_params(), opt.init(make_params())))
    restored = ckptr.restore(tmp_path / "ckpt", target)
    ckptr.close()
    assert restored[1].mu["f32"]["kernel"].codes.dtype == mid[1].mu["f32"]["kernel"].codes.dtype
    assert_bit_equal(run(step, opt, 7, start=restored, first=3), full)
    assert_bit_equal(full, run(ref_step(opt), opt, 7))


@needs_kernel
@pytest.mark.parametrize("fmt", LOWBIT)
def test_rounding_and_acc_dtype_fall_back_naming_them(fmt):
    """The low-bit kernel rounds params to nearest and keeps a float32 accumulator, as the 8-bit one."""
    params = make_params()
    for kw in (dict(param_rounding="kahan"), dict(gradient_accumulation_steps=2, acc_dtype=jnp.bfloat16)):
        opt = lowbit_opt(fmt, **kw)
        why = _fused.why_not(opt, make_grads(params, 0), opt.init(params), params)
        assert why is not None and "param_rounding`/`acc_dtype" in why


@needs_kernel
def test_flat_state_stays_refused_naming_the_format():
    """fp8/4bit codes do not fit the flat buffers (uint8 codes in the params' layout): a clear error."""
    for fmt in LOWBIT:
        with pytest.raises(ValueError, match=f"`moment_format='{fmt}'` cannot be stored with `flat_state=True`"):
            adamx.adam(quantize_moments=True, moment_format=fmt, flat_state=True)


# ---------------------------------------------------------------------- the C++ codecs against XLA
@pytest.fixture(scope="module", params=sorted(BUILDS))
def lowbit_lib(request, tmp_path_factory):
    return compile_library("lowbit_test", request.param, tmp_path_factory.mktemp("lowbit"))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def cpp_fp8_encode(lib, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, np.float32)
    codes = np.empty(x.size, np.uint8)
    scales = np.empty(x.size // 256, np.float32)
    lib.lb_fp8_encode(_ptr(x), ctypes.c_size_t(x.size), _ptr(codes), _ptr(scales))
    return codes, scales


def test_cpp_e4m3fn_every_code_decodes_as_xla(lowbit_lib):
    codes = np.arange(256, dtype=np.uint8)
    out = np.empty(256, np.float32)
    lowbit_lib.lb_e4m3fn_values(_ptr(codes), ctypes.c_size_t(256), _ptr(out))
    want = np.asarray(jnp.asarray(codes.view(jnp.float8_e4m3fn)).astype(jnp.float32))
    np.testing.assert_array_equal(bits(out), bits(want))


def _around_every_e4m3fn_boundary() -> np.ndarray:
    """Every float32 within 64 ulps of every e4m3fn value and of every midpoint between two, both signs."""
    vals = np.asarray(jnp.asarray(np.arange(0x7F, dtype=np.uint8).view(jnp.float8_e4m3fn)).astype(jnp.float32))
    mids = (vals[:-1].astype(np.float64) + vals[1:]) / 2
    centers = np.concatenate([vals, mids.astype(np.float32), [np.float32(464.0)]]).astype(np.float32)
    c = centers.view(np.int32).astype(np.int64)
    around = (c[:, None] + np.arange(-64, 65)[None, :]).ravel()
    around = around[(around >= 0x00800000) & (around < 0x7F800000)]  # normal floats (XLA flushes the others)
    y = np.unique(around).astype(np.uint32).view(np.float32)
    return np.concatenate([y, -y])


def test_cpp_e4m3fn_rounds_as_xla_at_every_boundary(lowbit_lib):
    y = _around_every_e4m3fn_boundary()
    got = np.empty(y.size, np.uint8)
    lowbit_lib.lb_e4m3fn_bits(_ptr(y), ctypes.c_size_t(y.size), _ptr(got))
    want = bits(np.asarray(jnp.asarray(y).astype(jnp.float8_e4m3fn)))
    nan = np.abs(y) > 464  # XLA: NaN where |y| rounds past 448 (no saturation; 464 ties to 448)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all((got[nan] & 0x7F) == 0x7F) and np.all((want[nan] & 0x7F) == 0x7F)


def test_cpp_fp8_blocks_equal_jax_codec(lowbit_lib):
    """Whole blocks through the kernel's encode/decode: codes, scales and values equal adamx._lowbit's,
    including a zero block, a block of subnormals, one with an inf and one with a NaN."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(256 * 8) * np.exp(rng.uniform(-30, 10, 256 * 8))).astype(np.float32)
    x[256:512] = 0.0
    x[512:768] = np.float32(1e-39)
    x[800] = np.inf
    x[1100] = np.nan
    codes, scales = cpp_fp8_encode(lowbit_lib, x)
    wc, ws = _lowbit.fp8_encode(jnp.asarray(x))
    np.testing.assert_array_equal(bits(scales), bits(np.asarray(ws)))
    np.testing.assert_array_equal(codes[np.isfinite(x)], bits(np.asarray(wc))[np.isfinite(x)])
    out = np.empty(x.size, np.float32)
    lowbit_lib.lb_fp8_decode(_ptr(codes), _ptr(scales), ctypes.c_size_t(x.size), _ptr(out))
    want = np.asarray(_lowbit.fp8_decode(jnp.asarray(codes.view(jnp.float8_e4m3fn)), jnp.asarray(scales)))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(bits(out)[~np.isnan(out)], bits(want)[~np.isnan(want)])


@pytest.mark.parametrize("signed", [True, False], ids=["m4", "v4"])
def test_cpp_q4_blocks_equal_jax_codec_at_every_threshold(lowbit_lib, signed):
    """4-bit encode at every float32 within 8 ulps of every threshold (times a block absmax of 1),
    plus random blocks; decode of every code."""
    qmap = _lowbit.M4_MAP if signed else _lowbit.V4_MAP
    thr = _lowbit.q4_thresholds(qmap)
    c = thr.view(np.int32).astype(np.int64)
    near = (c[:, None] + np.arange(-8, 9)[None, :]).ravel().astype(np.uint32).view(np.float32)
    rng = np.random.default_rng(1)
    x = np.concatenate([near, rng.uniform(-1 if signed else 0, 1, 128 * 16).astype(np.float32)])
    x = np.concatenate([x, np.zeros((-x.size) % 127, np.float32)]).reshape(-1, 127)
    x = np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1).ravel()  # absmax 1: y = x
    table = np.concatenate([qmap, thr]).astype(np.float32)
    packed = np.empty(x.size // 2, np.uint8)
    scales = np.empty(x.size // 128, np.float32)
    lowbit_lib.lb_q4_encode(_ptr(table), _ptr(x), ctypes.c_size_t(x.size), _ptr(packed), _ptr(scales))
    enc = _lowbit.m4_encode if signed else _lowbit.v4_encode
    wc, ws = enc(jnp.asarray(x))
    np.testing.assert_array_equal(packed, np.asarray(_lowbit.pack4(wc)))
    np.testing.assert_array_equal(bits(scales), bits(np.asarray(ws)))
    out = np.empty(x.size, np.float32)
    lowbit_lib.lb_q4_decode(_ptr(table), _ptr(packed), _ptr(scales), ctypes.c_size_t(x.size), _ptr(out))
    dec = _lowbit.m4_decode if signed else _lowbit.v4_decode
    np.testing.assert_array_equal(bits(out), bits(np.asarray(dec(wc, ws))))
