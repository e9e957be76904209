"""fp8 and 4-bit codecs (adamx/_lowbit.py) equal the NumPy reference of torchao, bit for bit.

The reference (tests/reference_lowbit.py) replays the real torchao in tests/test_lowbit_reference.py;
here the JAX codecs are held to it on the fixture's inputs (torchao's own codec inputs and the
moments of its trajectories) and on adversarial inputs, eagerly and under jit.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamx import _lowbit as L
from tests import reference_lowbit as R
from tests.conftest import REFERENCE_DIR

f32 = np.float32


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(os.path.join(REFERENCE_DIR, "torchao_lowbit.npz")) as f:
        return {k: f[k] for k in f.files}


def bits(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == jnp.float8_e4m3fn:
        return a.view(np.uint8)
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def check_all(x: np.ndarray, jit: bool) -> None:
    """Every codec on ``x`` (flat float32) against the reference: codes, scales, packed bytes, decoded values."""
    w = jax.jit if jit else (lambda f: f)
    codes, scales = w(L.fp8_encode)(x)
    rc, rs = R.fp8_quantize(x, 256)
    assert np.array_equal(bits(codes), rc) and np.array_equal(bits(scales), bits(rs))
    assert np.array_equal(bits(w(L.fp8_decode)(codes, scales)), bits(R.fp8_dequantize(rc, rs)))
    for enc, dec, q, xi in (
        (L.m4_encode, L.m4_decode, R.qmap_signed(), x),
        (L.v4_encode, L.v4_decode, R.qmap_unsigned(), np.abs(x)),
    ):
        codes, scales = w(enc)(xi)
        rc, rs = R.q4_quantize(xi, q, 128)
        assert np.array_equal(np.asarray(codes), rc), enc.__name__
        assert np.array_equal(bits(scales), bits(rs)), enc.__name__
        assert np.array_equal(np.asarray(w(L.pack4)(codes)), R.pack4(rc)), enc.__name__
        assert np.array_equal(np.asarray(w(L.unpack4)(R.pack4(rc))), rc), enc.__name__
        assert np.array_equal(bits(w(dec)(codes, scales)), bits(R.q4_dequantize(rc, rs, q))), dec.__name__


def test_maps_and_thresholds():
    assert np.array_equal(bits(L.M4_MAP), bits(R.qmap_signed()))
    assert np.array_equal(bits(L.V4_MAP), bits(R.qmap_unsigned()))
    for q in (L.M4_MAP, L.V4_MAP):
        t = L.q4_thresholds(q)
        assert np.all((t > q[:-1]) & (t <= q[1:]))
        below = np.nextafter(t, f32(-np.inf))
        # T[k] is where torchao's rule first gives k: one float32 below it, it gives k - 1
        assert np.array_equal(R.q4_quantize(np.concatenate([t, np.ones(113, f32)]), q)[0][:15], np.arange(1, 16))
        assert np.array_equal(R.q4_quantize(np.concatenate([below, np.ones(113, f32)]), q)[0][:15], np.arange(15))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_torchaos_codec_inputs(ref, jit):
    """torchao's adversarial codec inputs (ties, map values, ±0, subnormals, huge, tiny, NaN, ±inf)."""
    check_all(ref["codec/x"].ravel(), jit)
    # and the codes are torchao's own (the reference equals them: test_lowbit_reference.py)
    codes, _ = L.fp8_encode(ref["codec/x"].ravel())
    assert np.array_equal(bits(codes), ref["codec/fp8_codes"])
    assert np.array_equal(np.asarray(L.pack4(L.m4_encode(ref["codec/x"].ravel())[0])), ref["codec/m4_packed"])


def test_trajectory_moments(ref):
    """The float32 moments torchao quantized along both stored trajectories, through every codec (under jit)."""
    with open(os.path.join(REFERENCE_DIR, "torchao_lowbit.json")) as f:
        h = json.load(f)["hyper"]
    n_inputs = 0
    for run, fmt, adamw in (("fp8_adam", "fp8", False), ("4bit_adamw", "4bit", True)):
        m, v = R.State(fmt, (64, 64), True), R.State(fmt, (64, 64), False)
        p = ref[f"{run}/params/w"][0]
        for t in range(10):
            kw = dict(lr=h["lr"], betas=tuple(h["betas"]), eps=h["eps"], weight_decay=h["weight_decay"], adamw=adamw)
            p, m32, v32 = R.adam_step(p, ref["grads/w"][t], m, v, t + 1, **kw)
            check_all(m32.ravel(), jit=True)
            check_all(v32.ravel(), jit=True)
            n_inputs += 2
    assert n_inputs == 40


def adversarial(seed: int = 3) -> np.ndarray:
    """Blocks of 256: random wide values; the 4-bit thresholds and one float32 below; map values; fp8 ties
    at several scales; ±0; subnormals; huge and tiny blocks; NaN and inf."""
    rng = np.random.default_rng(seed)
    rows = [(rng.standard_normal(256) * 10.0 ** rng.uniform(-6, 2, 256)).astype(f32) for _ in range(4)]
    for q in (L.M4_MAP, L.V4_MAP):
        t = L.q4_thresholds(q)
        r = np.concatenate([t, np.nextafter(t, f32(-2)), q, -t, -np.nextafter(t, f32(-2))])
        for scale in (f32(1), f32(2.0**-20), f32(3.0)):  # absmax = scale: y = x / scale exact for powers of two
            rows.append(np.concatenate([r, np.zeros(255 - r.size, f32), [f32(1)]]) * scale)
    vals = R.e4m3fn_values()[:127].astype(np.float64)
    mids = ((vals[:-1] + vals[1:]) / 2).astype(f32)
    for scale in (f32(1), f32(2.0**40), f32(7.0)):
        rows.append(np.concatenate([mids, -mids, f32([1, -2, 448, 448])]) * scale / f32(448))
    sub = rng.integers(1, 2**23, 256).astype(np.uint32).view(f32)
    rows += [np.zeros(256, f32), -np.zeros(256, f32), sub, -sub, rows[0] * f32(1e30), rows[0] * f32(1e-35)]
    nan, inf = rows[1].copy(), rows[2].copy()
    nan[17] = np.nan
    inf[3], inf[4] = np.inf, -np.inf
    rows += [nan, inf]
    assert all(r.shape == (256,) for r in rows), [r.shape for r in rows]
    return np.concatenate(rows).astype(f32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adversarial_inputs(jit):
    check_all(adversarial(), jit)


def test_non_finite_blocks_as_documented():
    x = np.ones(512, f32)
    x[3], x[300] = np.nan, np.inf
    codes, scales = L.fp8_encode(x)
    assert np.isnan(scales[0]) and np.isinf(scales[1])
    d = np.asarray(L.fp8_decode(codes, scales))
    assert np.isnan(d).all()  # NaN block: all NaN; inf block: the inf is NaN, the others 0 * inf
    assert np.isnan(np.asarray(codes[:256], np.float32)).all() and np.isnan(np.asarray(codes[300], np.float32))
    assert (bits(codes[256:300]) == 0).all()  # 1 / inf: +0
    m, ms = L.m4_encode(x)
    m = np.asarray(m)
    assert (m[:128] == 0).all() and np.isnan(np.asarray(L.m4_decode(m, ms))[:128]).all()  # NaN block
    assert m[300] == 0 and (np.delete(m[256:384], 300 - 256) == 7).all()  # inf block: inf -> 0, others -> code of 0
    v, vs = L.v4_encode(x)
    assert (np.asarray(v[256:384]) == 0).all() and np.isinf(np.asarray(L.v4_decode(v, vs))[256:384]).all()


def test_shapes_dtypes_and_bfloat16_input():
    x = np.random.default_rng(0).standard_normal((3, 8, 64)).astype(f32)  # a block spans rows
    x16 = jnp.asarray(x, jnp.bfloat16)
    c, s = L.fp8_encode(x16)
    assert c.shape == x.shape and c.dtype == jnp.float8_e4m3fn and s.shape == (6,) and s.dtype == jnp.float32
    c32, _ = L.fp8_encode(np.asarray(x16.astype(jnp.float32)))
    assert np.array_equal(bits(c), bits(c32))
    m, ms = L.m4_encode(x)
    assert m.shape == x.shape and m.dtype == jnp.uint8 and ms.shape == (12,)
    assert L.m4_decode(m, ms).shape == x.shape and L.unpack4(L.pack4(m), x.shape).shape == x.shape


def test_state_nbytes_counts_the_arrays():
    for shape in [(64, 64), (33, 128), (10,)]:
        x = np.ones(shape, f32)
        n = x.size
        if L.quantizes(n, 256):
            c, s = L.fp8_encode(x)
            assert L.state_nbytes("fp8", n) == c.nbytes + s.nbytes
        else:
            assert L.state_nbytes("fp8", n) == x.nbytes
        if L.quantizes(n, 128):
            c, s = L.m4_encode(x)
            assert L.state_nbytes("4bit", n) == L.pack4(c).nbytes + s.nbytes
        else:
            assert L.state_nbytes("4bit", n) == x.nbytes
    assert L.state_nbytes("fp8", 2**20) / 2**20 == 1.015625 and L.state_nbytes("4bit", 2**20) / 2**20 == 0.53125


@pytest.mark.parametrize("name", ["fp8_encode", "fp8_decode", "m4_encode", "m4_decode", "v4_encode", "v4_decode"])
def test_no_gather_in_hlo(name):
    x = jnp.ones((16, 256), jnp.float32)
    f = getattr(L, name)
    args = (x,) if name.endswith("encode") else L.fp8_encode(x) if name.startswith("fp8") else L.m4_encode(x)
    text = jax.jit(f).lower(*args).as_text()
    assert "gather" not in text and ("divide" in text) == name.endswith("encode")


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`x` of shape \(3, 100\)"):
        L.fp8_encode(np.ones((3, 100), f32))
    with pytest.raises(TypeError, match="`x` must be a floating array"):
        L.m4_encode(np.ones(256, np.int32))
    with pytest.raises(ValueError, match="`block_size`"):
        L.v4_encode(np.ones(256, f32), block_size=0)
    with pytest.raises(ValueError, match="`codes` must be uint8 with an even"):
        L.pack4(jnp.ones(3, jnp.uint8))
    with pytest.raises(ValueError, match="`scales`"):
        L.m4_decode(jnp.zeros(256, jnp.uint8), jnp.ones(3))
    with pytest.raises(TypeError, match="`codes` must be float8_e4m3fn"):
        L.fp8_decode(jnp.zeros(256, jnp.uint8), jnp.ones(1))
    with pytest.raises(ValueError, match="`fmt`"):
        L.state_nbytes("int4", 4096)


def test_fused_pack_forms_give_the_same_bytes_and_codes():
    """``pack4``/``unpack4`` ``fused=True`` (the GPU two-pass schedule's elementwise forms) equal the
    default forms: every byte value unpacked, random codes packed, eagerly and under jit."""
    every_byte = jnp.arange(256, dtype=jnp.uint8)
    np.testing.assert_array_equal(L.unpack4(every_byte, fused=True), L.unpack4(every_byte))
    assert L.unpack4(every_byte, fused=True)[2 * 0x3A : 2 * 0x3A + 2].tolist() == [3, 10]
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (64, 128)), jnp.uint8)
    np.testing.assert_array_equal(L.pack4(codes, fused=True), L.pack4(codes))
    fused = jax.jit(lambda c: L.unpack4(L.pack4(c, fused=True), c.shape, fused=True))(codes)
    np.testing.assert_array_equal(fused, codes)


@pytest.mark.parametrize("encode", [L.m4_encode, L.v4_encode], ids=["m4", "v4"])
def test_q4_scales_are_the_encode_scales(encode):
    """Codes encoded with the scales of a pass of their own (``q4_scales``) equal the one-pass codes,
    non-finite and all-zero blocks included."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 128)).astype(np.float32) * 10.0 ** rng.uniform(-8, 3, (8, 1)).astype(np.float32)
    x[1, 5], x[2, 7], x[3] = np.nan, np.inf, 0.0
    if encode is L.v4_encode:
        x = np.abs(x)
    want_codes, want_scales = encode(jnp.asarray(x))
    scales = L.q4_scales(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(scales).view(np.uint32), np.asarray(want_scales).view(np.uint32))
    codes, got_scales = encode(jnp.asarray(x), scales=scales)
    np.testing.assert_array_equal(codes, want_codes)
    assert got_scales is scales
