"""``adamx.adam(quantize_moments=True, moment_format=...)``: the moment codecs of adamx/_codecs.py wired in.

* the default format (``dynamic8``) keeps today's state and codes (tests/test_quantized_adam.py and
  tests/test_checkpoint_format.py run unchanged beside this file);
* ``fp8`` and ``4bit`` replay torchao 0.18's ``AdamFp8`` / ``AdamW4bit`` fixture
  (tests/references/make_torchao_lowbit_refs.py) through ``adamx.adam``;
* every option combination runs, ``apply_gradients`` equals ``update``; errors name the arguments;
  the config round trip, Orbax, bytes per parameter, and a toy codec registered from outside.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _codecs, _lowbit, _step
from adamx import _quantize as Q
from tests.bitwise import bits
from tests.conftest import REFERENCE_DIR
from tests.test_lowbit_fused import assert_close

NPZ = os.path.join(REFERENCE_DIR, "torchao_lowbit.npz")
FORMATS = ("dynamic8", "fp8", "4bit")
LOWBIT = ("fp8", "4bit")


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "w": jax.random.normal(k[0], (64, 64)),  # quantized in every format
        "odd": jax.random.normal(k[1], (33, 128)),  # 4bit only (not a whole number of 256-blocks)
        "b": jax.random.normal(k[2], (10,)),  # float in every format
    }


def _grads(params, i):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(100 + i), p.shape) * 0.1, params)


# ---------------------------------------------------------------------- (a) the default is unchanged
def test_default_format_state_and_codes_are_todays():
    """``quantize_moments=True`` alone is ``moment_format='dynamic8'``: the same state, and after a step
    from zeros the codes are ``_quantize.quantize`` of the float32 moments ``g * c1``, ``(g * g) * c2``."""
    params = _params()
    plain = adamx.adam(learning_rate=0.01, quantize_moments=True)
    explicit = adamx.adam(learning_rate=0.01, quantize_moments=True, moment_format="dynamic8")
    assert plain.spec.moment_format == "dynamic8"
    s0, s1 = plain.init(params), explicit.init(params)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    z = Q.quantized_zeros(params["w"], Q.SIGNED_DYNAMIC_MAP, 256)
    assert np.array_equal(s0.mu["w"].codes, z.codes) and s0.mu["w"].scales.shape == z.scales.shape
    assert not isinstance(s0.mu["odd"], Q.QuantizedArray) or s0.mu["odd"].codes.dtype == jnp.uint8
    g = _grads(params, 0)
    _, new = jax.jit(plain.update)(g, s0, params)
    sc = _step.scalars(plain.spec, jnp.zeros([], jnp.int32))
    m = Q.quantize(g["w"] * sc.c1, Q.SIGNED_DYNAMIC_MAP, 256)
    v = Q.quantize((g["w"] * g["w"]) * sc.c2, Q.UNSIGNED_DYNAMIC_MAP, 256)
    for got, want in ((new.mu["w"], m), (new.nu["w"], v)):
        assert np.array_equal(got.codes, want.codes)
        assert np.array_equal(bits(got.scales), bits(want.scales))


# ---------------------------------------------------------------------- (b) torchao's trajectory
@pytest.fixture(scope="module")
def ref():
    with np.load(NPZ) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("run,fmt", [("fp8_adam", "fp8"), ("4bit_adamw", "4bit")])
def test_lowbit_replays_torchao(ref, run, fmt):
    """adamx's stored state follows torchao's fixture (10 steps, a (64, 64) leaf coded, a (6, 10) leaf float).

    The moments depend only on the gradients the step sees: ``AdamW4bit`` decays the params apart
    (decoupled), and for ``AdamFp8`` (``g + wd * p``, L2) adamx is fed torchao's own ``g + wd * p`` of
    the fixture's params. So the epsilon placement (adamx has epsilon hat only, torchao the paper's)
    does not enter the state. What does: XLA:CPU contracts Keras's ``m + (g - m) * c1`` into an FMA,
    which torchao's ``lerp`` (inductor, ``-ffp-contract=off``) does not. So:

    * step 1 (from zero moments, where both give one rounding): codes, scales and the float leaf's
      moments equal torchao's bit for bit;
    * every step: every code equals torchao's (the FMA moves a moment by an ulp, not across a code
      boundary, on this fixture), scales to 1e-6 relative;
    * every step: the stored codes are exactly the ``adamx._lowbit`` encoding of adamx's own float32
      moments (those of the same step run with float moments from the decoded state).
    """
    f32 = np.float32
    adamw = run.endswith("adamw")
    kw = dict(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    opt = adamx.adam(**kw, quantize_moments=True, moment_format=fmt)
    flt = adamx.adam(**kw)
    c = [opt.spec.codec(f) for f in ("mu", "nu")]
    p = {k: jnp.asarray(ref[f"{run}/params/{k}"][0]) for k in ("w", "b")}
    s = opt.init(p)
    upd, fupd = jax.jit(opt.update), jax.jit(flt.update)
    for t in range(10):
        g = {k: ref[f"grads/{k}"][t] for k in ("w", "b")}
        if not adamw:
            g = {k: g[k] + f32(0.01) * ref[f"{run}/params/{k}"][t] for k in g}
        g = jax.tree.map(jnp.asarray, g)
        # adamx's own float32 moments of this step, from the decoded state
        dec = {
            f: {"w": c[i].decode(getattr(s, f)["w"], (64, 64)), "b": getattr(s, f)["b"]}
            for i, f in enumerate(("mu", "nu"))
        }
        _, fs = fupd(g, flt.init(p)._replace(count=s.count, **dec), p)
        _, s = upd(g, s, p)
        for i, (f, tag) in enumerate((("mu", "m"), ("nu", "v"))):
            got = getattr(s, f)["w"]
            want_codes = ref[f"{run}/{tag}_codes/w"][t]
            assert np.array_equal(bits(got.codes), want_codes), (t, f)
            np.testing.assert_allclose(got.scales, ref[f"{run}/{tag}_scales/w"][t], rtol=1e-6)
            own = c[i].encode(getattr(fs, f)["w"])
            assert np.array_equal(bits(got.codes), bits(own.codes)), (t, f)
            assert np.array_equal(bits(got.scales), bits(own.scales)), (t, f)
            if t == 0:
                assert np.array_equal(bits(got.scales), bits(ref[f"{run}/{tag}_scales/w"][t]))
                assert np.array_equal(bits(getattr(s, f)["b"]), bits(ref[f"{run}/{tag}_values/b"][t]))


# ---------------------------------------------------------------------- (c) every combination
COMBOS = {
    "amsgrad": dict(amsgrad=True),
    "clipnorm": dict(clipnorm=0.5),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
    "accumulation": dict(gradient_accumulation_steps=2),
    "weight_decay": dict(weight_decay=0.05),
}


def _combos():
    names = list(COMBOS)
    return [(), *((n,) for n in names), tuple(names)]


@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("combo", _combos(), ids=lambda c: "+".join(c) or "plain")
def test_combinations_run_and_apply_gradients_equals_update(fmt, combo):
    kw: dict = dict(learning_rate=0.01, quantize_moments=True, moment_format=fmt)
    for name in combo:
        kw.update(COMBOS[name])
    opt = adamx.adam(**kw)
    params = _params()
    s1 = s2 = opt.init(params)
    p1 = p2 = params

    @jax.jit
    def by_update(g, s, p):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    fused = jax.jit(opt.apply_gradients)  # the fused kernel where it is built (tests/test_lowbit_fused.py)
    for i in range(4):
        g = _grads(params, i)
        p1, s1 = by_update(g, s1, p1)
        p2, s2 = fused(g, s2, p2)
    if adamx.fused.available():
        assert adamx.fused.why_not(opt, _grads(params, 0), s2, p2) is None
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p1))
    if "clipnorm" in combo and adamx.fused.available():  # the fused norms are summed in another order
        assert_close((p2, s2), (p1, s1), fmt, 0.01)
    else:
        for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
            assert np.array_equal(bits(a), bits(b))
    assert isinstance(s1.mu["w"], Q.QuantizedArray)
    if "amsgrad" in combo:
        assert isinstance(s1.nu_max["w"], Q.QuantizedArray)


# ---------------------------------------------------------------------- (d) errors
def test_errors_name_the_arguments():
    with pytest.raises(ValueError, match="`moment_format` must be one of .*'8bit'"):
        adamx.adam(quantize_moments=True, moment_format="8bit")
    with pytest.raises(ValueError, match="`moment_format='fp8'` .*`quantize_moments=True`"):
        adamx.adam(moment_format="fp8")
    with pytest.raises(ValueError, match="`quantize_block_size=64` .*`moment_format='4bit'`.*128"):
        adamx.adam(quantize_moments=True, moment_format="4bit", quantize_block_size=64)
    with pytest.raises(ValueError, match="`quantize_block_size=128` .*`moment_format='fp8'`.*256"):
        adamx.adam(quantize_moments=True, moment_format="fp8", quantize_block_size=128)
    assert (
        adamx.adam(quantize_moments=True, moment_format="4bit", quantize_block_size=128)
        .spec.codec("mu")
        .applies((128,) * 2)
    )
    with pytest.raises(ValueError, match="`moment_format='4bit'` cannot be stored with `flat_state=True`"):
        adamx.adam(quantize_moments=True, moment_format="4bit", flat_state=True)


@pytest.mark.parametrize("have,use", [("fp8", "4bit"), ("4bit", "dynamic8"), ("dynamic8", "fp8")])
def test_state_of_another_format_is_refused(have, use):
    params = {"w": jnp.ones((64, 64))}
    state = adamx.adam(quantize_moments=True, moment_format=have).init(params)
    opt = adamx.adam(quantize_moments=True, moment_format=use)
    with pytest.raises(ValueError, match=rf"`mu` at 'w' .*moment_format='{use}'.*looks like moment_format='{have}'"):
        opt.update(params, state, params)


def test_leaf_taken_by_one_format_only_is_refused_naming_the_format():
    params = {"odd": jnp.ones((33, 128))}  # 4bit codes it, fp8 keeps it float
    state = adamx.adam(quantize_moments=True, moment_format="4bit").init(params)
    with pytest.raises(ValueError, match="`mu` at 'odd' is quantized .*moment_format='fp8'.*keeps it float"):
        adamx.adam(quantize_moments=True, moment_format="fp8").update(params, state, params)


# ---------------------------------------------------------------------- (e) config, Orbax, sharding
@pytest.mark.parametrize("fmt", FORMATS)
def test_config_round_trip(fmt):
    opt = adamx.adam(learning_rate=0.01, quantize_moments=True, moment_format=fmt)
    cfg = adamx.to_keras_config(opt, include_adamx=True)
    assert cfg["moment_format"] == fmt
    assert adamx.from_keras_config(cfg).spec.moment_format == fmt


@pytest.mark.parametrize("fmt", LOWBIT)
def test_orbax_resume_is_bit_exact(tmp_path, fmt):
    ocp = pytest.importorskip("orbax.checkpoint")
    opt = adamx.adam(learning_rate=0.01, amsgrad=True, quantize_moments=True, moment_format=fmt)
    params = _params()
    state = opt.init(params)
    upd = jax.jit(opt.update)

    def step(p, s, i):
        u, s = upd(_grads(params, i), s, p)
        return optax.apply_updates(p, u), s

    for i in range(2):
        params, state = step(params, state, i)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", (params, state))
    ckptr.wait_until_finished()
    target = jax.eval_shape(lambda: (_params(), opt.init(_params())))
    rp, rs = ckptr.restore(tmp_path / "ckpt", target)
    ckptr.close()
    assert rs.mu["w"].codes.dtype == state.mu["w"].codes.dtype
    a, b = (params, state), (rp, rs)
    for i in range(2, 4):
        a, b = step(*a, i), step(*b, i)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(bits(x), bits(y))


@pytest.mark.skipif(
    jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
)
@pytest.mark.parametrize("fmt", LOWBIT)
def test_sharded_jit_step(fmt):
    """zero1 shardings of an fp8/4bit state: a jit over them gives the single-device numbers."""
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    opt = adamx.adam(learning_rate=0.01, quantize_moments=True, moment_format=fmt)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 128))}
    g = _grads(params, 0)
    u_ref, s_ref = jax.jit(opt.update)(g, opt.init(params), params)
    state = opt.init(params)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, adamx.sharding.zero1_state_sharding(state, mesh, axis="d"))
        assert len(state.mu["w"].codes.sharding.device_set) == 4
        u, s = jax.jit(opt.update)(g, state, params)
    for x, y in zip(jax.tree.leaves((u, s)), jax.tree.leaves((u_ref, s_ref))):
        assert np.array_equal(bits(x), bits(y))


# ---------------------------------------------------------------------- (f) bytes per parameter
@pytest.mark.parametrize("fmt,lo,hi", [("dynamic8", 2.03, 2.032), ("fp8", 2.03, 2.032), ("4bit", 1.06, 1.1)])
def test_bytes_per_param(fmt, lo, hi):
    """Both moments of a (1024, 1024) leaf: fp8 ~2.03 B/param, 4bit <= 1.1 (issue 20), measured."""
    params = {"w": jnp.zeros((1024, 1024))}
    s = adamx.adam(quantize_moments=True, moment_format=fmt).init(params)
    bpp = adamx.state_bytes_per_param((s.mu, s.nu), params)
    assert lo <= bpp <= hi
    codec = s and adamx.adam(quantize_moments=True, moment_format=fmt).spec.codec("mu")
    assert 2 * codec.nbytes((1024, 1024)) == bpp * 1024 * 1024
    if fmt != "dynamic8":
        assert codec.nbytes((1024, 1024)) == _lowbit.state_nbytes(fmt, 1024 * 1024)


# ---------------------------------------------------------------------- the codec recipe, walked
@dataclasses.dataclass(frozen=True)
class Half(_codecs._Blockwise):
    """A toy codec: float16 codes in the param's shape, one unused scale (docs/architecture.md's recipe)."""

    min_size: int = 1
    name = "half"
    kernel = None

    def applies(self, shape):
        return int(np.prod(shape)) >= self.min_size

    def encode(self, x):
        return Q.QuantizedArray(x.astype(jnp.float16), jnp.ones((1,), jnp.float32))

    def decode(self, state, shape):
        return state.codes.astype(jnp.float32).reshape(shape)

    def state_shapes(self, shape):
        return _codecs.abstract(jax.ShapeDtypeStruct(shape, jnp.float16), jax.ShapeDtypeStruct((1,), jnp.float32))


@pytest.fixture
def half_format():
    _codecs.register("half", _codecs.Format(lambda signed, bs, ms: Half(ms)))
    yield "half"
    _codecs.unregister("half")


def test_a_registered_codec_goes_through_init_update_and_check(half_format):
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 64)), "b": jnp.ones((10,))}
    opt = adamx.adam(learning_rate=0.01, quantize_moments=True, moment_format=half_format, quantize_min_size=100)
    ref = adamx.adam(learning_rate=0.01)
    s, r = opt.init(params), ref.init(params)
    assert s.mu["w"].codes.dtype == jnp.float16 and not isinstance(s.mu["b"], Q.QuantizedArray)
    g = _grads(params, 0)
    u, s = jax.jit(opt.update)(g, s, params)
    ur, r = jax.jit(ref.update)(g, r, params)
    assert np.array_equal(s.mu["w"].codes, r.mu["w"].astype(jnp.float16))
    np.testing.assert_allclose(u["w"], ur["w"], rtol=1e-2)
    with pytest.raises(ValueError, match="looks like moment_format='half'"):
        adamx.adam(quantize_moments=True, moment_format="fp8", quantize_min_size=100).update(g, s, params)
    assert "half" not in itertools.chain(FORMATS)


@pytest.mark.parametrize("fmt", ["fp8", "4bit"])
@pytest.mark.parametrize("spec", [("xy", None), (None, "xy"), ("x", "y"), ("x", None)])
def test_lowbit_formats_on_an_explicit_mesh_equal_one_device(fmt, spec):
    """fp8 and 4-bit moments on an Explicit 2x4 mesh (jax.make_mesh's default), params split along
    either axis or both: the step runs (it once failed in a reshape of the split leaf) and gives the
    single-device params and codes; fp8 codes are split like the params. ``init`` gives the state
    the sharding the step returns (it once gave the 1-D codes and scales unsplit, which the step
    then split: a second compile and no donation); split along the major axis alone, the 1-D
    arrays are split along it too (each device holds its rows' blocks)."""
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)"
    rng = np.random.default_rng(11)
    w = rng.standard_normal((64, 2048)).astype(np.float32)
    g = (rng.standard_normal((64, 2048)) * 1e-2).astype(np.float32)
    opt = adamx.adam(1e-3, quantize_moments=True, moment_format=fmt)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    one = {"w": jnp.asarray(w)}
    want_p, want_s = jax.jit(step)(one, opt.init(one), {"w": jnp.asarray(g)})
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    pspec = jax.sharding.PartitionSpec(*(("x", "y") if a == "xy" else a for a in spec))
    with jax.set_mesh(mesh):
        sharding = jax.sharding.NamedSharding(mesh, pspec)
        params = {"w": jax.device_put(jnp.asarray(w), sharding)}
        s0 = jax.jit(opt.init)(params)
        got_p, got_s = jax.jit(step)(params, s0, {"w": jax.device_put(jnp.asarray(g), sharding)})
    for f in ("mu", "nu"):
        before, after = getattr(s0, f)["w"], getattr(got_s, f)["w"]
        for a, b in zip(before, after):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (f, a.sharding.spec, b.sharding.spec)
        flat = [x for x in after if x.ndim == 1]
        assert flat  # fp8's scales; 4-bit's codes and scales
        major = pspec[0] if all(e is None for e in tuple(pspec)[1:]) else None
        for x in flat:
            assert tuple(x.sharding.spec) == ((major,) if major else (None,)), (f, x.sharding.spec)
    np.testing.assert_array_equal(np.asarray(got_p["w"]), np.asarray(want_p["w"]))
    for f in ("mu", "nu"):
        a, b = getattr(got_s, f)["w"], getattr(want_s, f)["w"]
        np.testing.assert_array_equal(np.asarray(a.codes).view(np.uint8), np.asarray(b.codes).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))
    if fmt == "fp8":
        assert got_s.mu["w"].codes.sharding.is_equivalent_to(sharding, 2)
