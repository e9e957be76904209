"""``adamx.adam(quantize_moments=True)``: 8-bit ``mu``/``nu``/``nu_max`` wired into the optimizer.

* the step equals per-op NumPy references of the same scheme (``tests/reference_quant.py``
  for the codec, ``tests/reference_impl.py`` for Keras Adam's float32 math), for several
  steps and every Keras option;
* the fused kernel equals ``update`` + ``optax.apply_updates`` bit for bit (codes, scales,
  params), except where the float32 kernel is not bit-exact either (clipping norms);
* resume through Orbax is bit-exact; state bytes per parameter are measured;
* ``quantize_min_size`` and ``quantize_mask`` keep leaves float32; bad options raise naming
  the argument; sharded jit steps and ``optax.inject_hyperparams`` work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import _quantize as Q
from adamx import fused as _fused
from tests import reference_impl as RI
from tests import reference_quant as RQ
from tests.test_performance_paths import (
    OPTIONS,
    assert_trees_close,
    fused_step,
    make_grads,
    make_params,
    ref_step,
    run,
)

FUSED = _fused.available()
needs_kernel = pytest.mark.skipif(not FUSED, reason=f"fused kernel unavailable: {_fused.status()['error']}")
MAPS = {"mu": Q.SIGNED_DYNAMIC_MAP, "nu": Q.UNSIGNED_DYNAMIC_MAP, "nu_max": Q.UNSIGNED_DYNAMIC_MAP}
# small blocks and min size so that the test trees' leaves (up to 703 elements) hold several
# blocks, one of them partial, and small leaves (biases) stay float32 beside them
SMALL = dict(quantize_moments=True, quantize_block_size=64, quantize_min_size=100)


def _np(x):
    return np.asarray(x)


# ---------------------------------------------------------------------- the reference step
REF_OPTIONS = {
    "defaults": dict(),
    "hparams": dict(learning_rate=0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-4),
    "amsgrad": dict(amsgrad=True),
    "weight_decay": dict(learning_rate=0.01, weight_decay=0.1),
    "clipnorm": dict(clipnorm=0.5),
    "global_clipnorm": dict(global_clipnorm=0.3),
    "clipvalue": dict(clipvalue=0.1),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
    "accumulation": dict(gradient_accumulation_steps=3),
    "loss_scale": dict(loss_scale_factor=128.0),
    "everything": dict(
        learning_rate=0.01, amsgrad=True, weight_decay=0.05, clipvalue=0.5, use_ema=True, gradient_accumulation_steps=2
    ),
}
REF_SHAPES = {
    "w": ((40, 30), jnp.float32),
    "h": ((300,), jnp.bfloat16),
    "k": ((7, 41), jnp.float16),
    "b": ((30,), None),
}


def _ref_params():
    key = jax.random.PRNGKey(3)
    out = {}
    for i, (name, (shape, dt)) in enumerate(REF_SHAPES.items()):
        out[name] = jax.random.normal(jax.random.fold_in(key, i), shape).astype(dt or jnp.float32)
    return out


def _ref_grads(params, step):
    rng = np.random.default_rng(50 + step)
    scale = 0.05 if step % 4 == 3 else 1.0
    return {
        k: jnp.asarray(
            np.where(rng.random(p.shape) < 0.1, 0.0, rng.standard_normal(p.shape) * scale), jnp.float32
        ).astype(p.dtype)
        for k, p in params.items()
    }


def _dequantized(field_tree, field, params, bs):
    return {
        k: RQ.dequantize(_np(x.codes), _np(x.scales), MAPS[field], bs, params[k].shape)
        if isinstance(x, Q.QuantizedArray)
        else _np(x).astype(np.float32)
        for k, x in field_tree.items()
    }


def _check_codes(got, want_codes, want_scales, ref_values, code, where, rtol=5e-7):
    """Codes/scales of adamx against the NumPy requantization of the NumPy float32 moments.

    The reference rounds each op once; XLA contracts the moment updates into FMAs (one
    float32 rounding apart, SEMANTICS.md 1.16). So scales agree to 2 ulp, and a code may
    differ by one exactly where the reference value lies within that rounding of a decision
    midpoint; such elements must be rare. Clipping norms are summed in another order than
    the reference's (a few float32 roundings of the gradient): ``rtol`` is larger there.
    """
    np.testing.assert_allclose(_np(got.scales), want_scales, rtol=rtol, atol=0, err_msg=where)
    gc, wc = _np(got.codes).astype(int), want_codes.astype(int)
    diff = gc != wc
    assert np.all(np.abs(gc - wc) <= 1), where
    assert diff.mean() <= 0.01, (where, diff.mean())
    if diff.any():  # every differing element sits next to a midpoint of the map
        mids = (code[:-1] + code[1:]) * np.float32(0.5)
        bs = int(-(-gc.size // want_scales.size))
        y = ref_values.ravel()[diff] / np.repeat(want_scales, bs)[: gc.size][diff]
        near = np.min(np.abs(y[:, None] - mids[None, :]), axis=1)
        assert np.all(near <= 2 * rtol * np.maximum(np.abs(y), 1e-3) + 1e-7), (where, near.max())


@pytest.mark.parametrize("option", list(REF_OPTIONS))
def test_step_equals_numpy_reference(option):
    """Each step of the jitted ``update`` against: NumPy dequantize -> NumPy Keras Adam step
    (float32, per op) -> NumPy requantize, fed adamx's own state each step (8 steps)."""
    kw = REF_OPTIONS[option]
    bs = 64
    opt = adamx.adam(**kw, quantize_moments=True, quantize_block_size=bs, quantize_min_size=200)
    params = _ref_params()
    state = opt.init(params)
    assert [isinstance(state.mu[k], Q.QuantizedArray) for k in sorted(params)] == [False, True, True, True]
    step = ref_step(opt)
    ref_kw = {k: v for k, v in kw.items()}
    for i in range(8):
        grads = _ref_grads(params, i)
        ref_state = {
            "count": int(state.count),
            "mu": _dequantized(state.mu, "mu", params, bs),
            "nu": _dequantized(state.nu, "nu", params, bs),
            "nu_max": _dequantized(state.nu_max, "nu_max", params, bs) if state.nu_max is not None else None,
            "acc": {k: _np(v) for k, v in state.acc.items()} if state.acc is not None else None,
            "ema": {k: _np(v) for k, v in state.ema.items()} if state.ema is not None else None,
        }
        np_params = {k: _np(v) for k, v in params.items()}
        want_p, want_s = RI.adam_step(np_params, {k: _np(v) for k, v in grads.items()}, ref_state, **ref_kw)
        params, new_state = step(grads, state, params)
        real = want_s["count"] % (kw.get("gradient_accumulation_steps") or 1) == 0
        for k in params:
            dt = params[k].dtype
            tol = 4 * float(jnp.finfo(dt).eps)
            np.testing.assert_allclose(
                _np(params[k]).astype(np.float64),
                np.asarray(want_p[k], np.float64),
                rtol=tol,
                atol=tol * float(np.max(np.abs(want_p[k].astype(np.float64)))),
                err_msg=f"{option} step {i} params[{k}]",
            )
            for f in ("mu", "nu", "nu_max"):
                got = getattr(new_state, f)
                if got is None:
                    continue
                if not isinstance(got[k], Q.QuantizedArray):
                    np.testing.assert_allclose(_np(got[k]), want_s[f][k], rtol=1e-5, atol=1e-12)
                    continue
                if not real:  # micro-step: the codes do not move
                    old = getattr(state, f)[k]
                    np.testing.assert_array_equal(_np(got[k].codes), _np(old.codes))
                    np.testing.assert_array_equal(_np(got[k].scales), _np(old.scales))
                    continue
                codes, scales = RQ.quantize(want_s[f][k], MAPS[f], bs)
                rtol = 2e-6 if {"clipnorm", "global_clipnorm"} & set(kw) else 5e-7
                _check_codes(got[k], codes, scales, want_s[f][k], MAPS[f], f"{option} step {i} {f}[{k}]", rtol)
        state = new_state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_default_step_is_bit_exact_to_fma_reference(dtype):
    """Without clipping or accumulation the jitted step equals ``reference_quant.adam_step_8bit``
    (the FMA contractions of XLA:CPU written out) bit for bit: updates, codes, scales; 6 steps
    for float32, bfloat16 and float16 params. (adamx folds ``wd * lr`` before contracting the
    decay, that reference does not: weight decay is checked with a tolerance above.)"""
    if jax.default_backend() != "cpu":
        pytest.skip("the FMA contractions are XLA:CPU's")
    bs, n = 128, 1000
    opt = adamx.adam(learning_rate=0.01, quantize_moments=True, quantize_block_size=bs, quantize_min_size=n)
    p = jax.random.normal(jax.random.PRNGKey(0), (n,)).astype(dtype)
    params = {"w": p}
    state = opt.init(params)
    upd = jax.jit(lambda g, s, p: opt.update(g, s, p))
    m_c, m_s = _np(state.mu["w"].codes), _np(state.mu["w"].scales)
    v_c, v_s = _np(state.nu["w"].codes), _np(state.nu["w"].scales)
    for i in range(6):
        g = jax.random.normal(jax.random.PRNGKey(i + 1), (n,)).astype(dtype) * jnp.asarray(
            0.1 if i == 3 else 1.0, dtype
        )
        u, state = upd({"w": g}, state, params)
        u_ref, (m_c, m_s), (v_c, v_s), _, _ = RQ.adam_step_8bit(
            _np(g),
            _np(params["w"]),
            m_c,
            m_s,
            v_c,
            v_s,
            count=i,
            learning_rate=0.01,
            m_code=Q.SIGNED_DYNAMIC_MAP,
            v_code=Q.UNSIGNED_DYNAMIC_MAP,
            block_size=bs,
        )
        np.testing.assert_array_equal(_np(u["w"]).astype(np.float32), u_ref.astype(np.float32), err_msg=f"step {i}")
        np.testing.assert_array_equal(_np(state.mu["w"].codes), m_c)
        np.testing.assert_array_equal(_np(state.mu["w"].scales), m_s)
        np.testing.assert_array_equal(_np(state.nu["w"].codes), v_c)
        np.testing.assert_array_equal(_np(state.nu["w"].scales), v_s)
        params = optax.apply_updates(params, u)


# ---------------------------------------------------------------------- the fused kernel
def _assert_fused_equal(fused, ref):
    """Params and 8-bit state bit for bit. Float32 state leaves (those below quantize_min_size)
    are the float kernel's, which for one-element leaves may contract differently from XLA
    (tests/test_performance_paths.py): those to float32 rounding."""
    fa = jax.tree_util.tree_flatten_with_path(fused)[0]
    for (path, x), y in zip(fa, jax.tree.leaves(ref)):
        where = jax.tree_util.keystr(path)
        if x.size <= 1 and x.dtype == jnp.float32 and "codes" not in where and "scales" not in where:
            np.testing.assert_allclose(_np(x), _np(y), rtol=4e-7, err_msg=where)
        else:
            np.testing.assert_array_equal(_np(x), _np(y), err_msg=where)


def _codes_close(a, b, lr):
    """Trees equal but for rare one-code differences and what they cause (clipping norms summed
    in another order, or a traced learning rate, change the float32 moments in the last bit; a
    moment next to a decision midpoint then rounds to the neighbouring code, and that element's
    update differs by a fraction of ``lr``)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.size == 0:
            continue
        if x.dtype == jnp.uint8:
            d = np.abs(_np(x).astype(int) - _np(y).astype(int))
            assert d.max(initial=0) <= 1 and (d != 0).mean() <= 0.01
        else:
            xn, yn = _np(x).astype(np.float64), _np(y).astype(np.float64)
            assert np.all(np.abs(xn - yn) <= 0.2 * lr + 1e-5 * np.abs(yn))


# param_rounding / acc_dtype with 8-bit moments fall back (tests/test_param_rounding.py)
Q8_FUSED_OPTIONS = [k for k, v in OPTIONS.items() if "param_rounding" not in v and "acc_dtype" not in v]


@needs_kernel
@pytest.mark.parametrize("option", Q8_FUSED_OPTIONS)
def test_fused_equals_reference_bit_for_bit(option):
    """7 steps of the fused step against ``update`` + ``apply_updates``: params, codes, scales,
    float32 leaves (biases below quantize_min_size) bit for bit; f32/bf16/f16 params. With
    clipnorm/global_clipnorm the norms are summed in another order (as for float32 state,
    tests/test_performance_paths.py), so there the values agree to float32 rounding."""
    opt = adamx.adam(**OPTIONS[option], **SMALL)
    params = make_params()
    state = opt.init(params)
    assert isinstance(state.mu["f32"]["kernel"], Q.QuantizedArray) and not isinstance(
        state.mu["f32"]["bias"], Q.QuantizedArray
    )
    assert _fused.why_not(opt, make_grads(params, 0), state, params) is None
    fused = run(fused_step(opt), opt, 7)
    ref = run(ref_step(opt), opt, 7)
    if {"clipnorm", "global_clipnorm"} & set(OPTIONS[option]):
        _codes_close(fused, ref, OPTIONS[option].get("learning_rate", 0.001))
    else:
        _assert_fused_equal(fused, ref)


@needs_kernel
@pytest.mark.parametrize(
    ("block_size", "n", "extra"),
    [(256, 70_001, dict(amsgrad=True)), (100, 140_001, dict(gradient_accumulation_steps=2, use_ema=True))],
)
def test_fused_large_leaves_split_on_block_boundaries(block_size, n, extra):
    """Leaves longer than one kernel segment (65536): tasks hold whole blocks, also for a block
    size that does not divide the segment length; bit-identical to the reference."""
    opt = adamx.adam(learning_rate=0.01, quantize_moments=True, quantize_block_size=block_size, **extra)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (n,)), "b": jnp.ones((5,))}
    a = b = (params, opt.init(params))
    fs, rs = fused_step(opt), ref_step(opt)
    for i in range(4):
        g = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i + 7), p.shape), params)
        a = fs(g, a[1], a[0])
        b = rs(g, b[1], b[0])
    assert_trees_close(a, b, exact=True)


@needs_kernel
def test_fused_updates_codes_in_place_one_call():
    """Donated: codes and scales are written in place (no copies); one 8-bit kernel call."""
    opt = adamx.adam(learning_rate=0.01, **SMALL)
    params = make_params()
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
    hlo = step.lower(params, state, make_grads(params, 0)).compile().as_text()
    assert hlo.count(f'custom_call_target="{_fused._build.Q8_TARGET}"') == 1
    copies = [c for c in hlo.splitlines() if " copy(" in c and "u8[" in c]
    assert not copies, copies
    p, s = params, state
    for i in range(2):
        before = (
            s.mu["f32"]["kernel"].codes.unsafe_buffer_pointer(),
            s.nu["f32"]["kernel"].scales.unsafe_buffer_pointer(),
        )
        p, s = step(p, s, make_grads(p, i))
        assert (
            s.mu["f32"]["kernel"].codes.unsafe_buffer_pointer(),
            s.nu["f32"]["kernel"].scales.unsafe_buffer_pointer(),
        ) == before
    assert step._cache_size() == 1


def test_kernel_falls_back_on_mismatched_state():
    """8-bit state of another block size: ``update`` and ``apply_gradients`` refuse it, naming the
    field, the path and the block size (the check runs before the fused plan)."""
    params = {"w": jnp.ones((512,))}
    opt = adamx.adam(quantize_moments=True, quantize_block_size=64, quantize_min_size=1)
    other = adamx.adam(quantize_moments=True, quantize_block_size=128, quantize_min_size=1).init(params)
    for call in (opt.update, opt.apply_gradients):
        with pytest.raises(ValueError, match="`mu` at 'w' holds 8-bit codes and scales .*quantize_block_size=64"):
            call(params, other, params)


# ---------------------------------------------------------------------- state, checkpoints
def test_state_bytes_per_param():
    """mu + nu of a large leaf: 2 code bytes + 2 * 4 / 256 scale bytes = 2.03 bytes/param (<= 2.1),
    against 8 for float32 moments; amsgrad adds one more 8-bit field."""
    params = {"w": jnp.zeros((1024, 1024)), "b": jnp.zeros((1024,))}
    n = 1024 * 1024 + 1024
    st = adamx.adam(quantize_moments=True).init(params)
    got = adamx.state_bytes_per_param((st.mu, st.nu), params)
    want = (2 * (1024 * 1024 + 4 * 4096) + 2 * 4 * 1024) / n  # the 1024-element bias stays float32
    assert got == pytest.approx(want) and got <= 2.1
    big = adamx.state_bytes_per_param((st.mu["w"], st.nu["w"]), {"w": params["w"]})
    assert big == 2 + 8 / 256
    f32 = adamx.adam().init(params)
    assert adamx.state_bytes_per_param((f32.mu, f32.nu), params) == 8
    ams = adamx.adam(quantize_moments=True, amsgrad=True).init(params)
    assert adamx.state_bytes_per_param((ams.mu["w"], ams.nu["w"], ams.nu_max["w"]), {"w": params["w"]}) == 3 + 12 / 256


@pytest.mark.parametrize("node", [list, tuple])
def test_mask_of_a_params_tree_whose_top_is_a_list_or_tuple(node):
    """A mask shaped like params whose top node is a list (a model's layers) picks leaf by leaf
    (a list mask was once read as one leaf: "leaves must be Python bools, got {'w': [True]}")."""
    params = node([{"w": jnp.ones((64, 64))}, {"w": jnp.ones((64, 64))}])
    st = adamx.adam(quantize_moments=True, quantize_min_size=1, quantize_mask=node([{"w": True}, {"w": False}])).init(
        params
    )
    assert isinstance(st.mu[0]["w"], Q.QuantizedArray)
    assert not isinstance(st.mu[1]["w"], Q.QuantizedArray)
    with pytest.raises(ValueError, match="quantize_mask` leaves must be Python bools, got 1"):
        adamx.adam(quantize_moments=True, quantize_mask=node([{"w": 1}, {"w": True}])).init(params)


def test_min_size_and_mask_keep_float32_leaves():
    params = {
        "emb": jnp.ones((64, 128)),
        "dense": {"w": jnp.ones((128, 64)), "b": jnp.ones((64,))},
        "i": jnp.ones((8192,), jnp.int32),
    }
    mask = {"emb": False, "dense": True, "i": True}
    for m in (mask, lambda p: mask):
        st = adamx.adam(quantize_moments=True, quantize_mask=m, amsgrad=True).init(params)
        for f in ("mu", "nu", "nu_max"):
            tree = getattr(st, f)
            assert tree["emb"].dtype == jnp.float32 and tree["emb"].shape == (64, 128)  # masked out
            assert tree["dense"]["b"].dtype == jnp.float32  # below quantize_min_size
            assert isinstance(tree["dense"]["w"], Q.QuantizedArray)
            assert tree["dense"]["w"].codes.dtype == jnp.uint8 and tree["dense"]["w"].scales.shape == (
                32,
            )  # 128 x 64: C-order blocks, 1-D scales
            assert not isinstance(tree["i"], Q.QuantizedArray)  # not a float parameter
        assert st.mu["dense"]["w"].codes.shape == (128, 64)
        assert st.mu["dense"]["w"].codes[0, 0] == Q.zero_code(Q.SIGNED_DYNAMIC_MAP)
        assert st.nu["dense"]["w"].codes[0, 0] == Q.zero_code(Q.UNSIGNED_DYNAMIC_MAP)
    low = adamx.adam(quantize_moments=True, quantize_min_size=64).init(params)
    assert isinstance(low.mu["dense"]["b"], Q.QuantizedArray)
    off = adamx.adam(quantize_moments=False, quantize_min_size=0).init(params)
    assert not any(
        isinstance(x, Q.QuantizedArray)
        for x in jax.tree.leaves(off.mu, is_leaf=lambda x: isinstance(x, Q.QuantizedArray))
    )


# ---------------------------------------------------------------------- flat state
FLAT_OPTIONS = {
    "defaults": dict(),
    "amsgrad_ema_accumulation": dict(
        amsgrad=True, use_ema=True, ema_overwrite_frequency=2, gradient_accumulation_steps=2
    ),
    "clipnorm_decay": dict(learning_rate=0.01, clipnorm=0.5, weight_decay=0.1),
}


def _flat_as_tree(opt, state, params):
    """The state with each flat field as the tree of its per-leaf views (8-bit leaves as QuantizedArray)."""
    return adamx._state.tree_views(opt.spec, state, params)[0]


def test_flat_state_layout_bytes_and_zeros():
    """flat_state=True with 8-bit leaves: per field one uint8 buffer with every 8-bit leaf's
    codes, the float buffers of the small leaves, and one float32 buffer of all their block
    scales; each leaf's view is tree state's QuantizedArray, and the bytes are the same."""
    kw = dict(amsgrad=True, **SMALL)
    opt = adamx.adam(flat_state=True, **kw)
    params = make_params()
    state = opt.init(params)
    leaves = jax.tree.leaves(params)
    q = opt.spec.quantized_leaves(params)
    assert any(q) and not all(q)
    n_q = sum(int(np.size(p)) for p, on in zip(leaves, q) if on)
    n_blocks = sum(Q.num_blocks(int(np.size(p)), SMALL["quantize_block_size"]) for p, on in zip(leaves, q) if on)
    for f in ("mu", "nu", "nu_max"):
        bufs = getattr(state, f).buffers
        assert isinstance(getattr(state, f), adamx.FlatBuffers)
        assert [b.shape for b in bufs if b.dtype == jnp.uint8] == [(n_q,)]
        assert bufs[-1].dtype == jnp.float32 and bufs[-1].shape == (n_blocks,)
    tree_opt = adamx.adam(**kw)
    tree_state = tree_opt.init(params)
    assert_trees_close(_flat_as_tree(opt, state, params), tree_state, exact=True)
    assert adamx.state_bytes_per_param((state.mu, state.nu), params) == adamx.state_bytes_per_param(
        (tree_state.mu, tree_state.nu), params
    )


@pytest.mark.parametrize("option", sorted(FLAT_OPTIONS))
def test_flat_state_equals_tree_state_bit_for_bit(option):
    """5 steps of ``update`` with flat 8-bit state give tree state's params and state, bit for bit."""
    kw = {**FLAT_OPTIONS[option], **SMALL}
    flat_opt, tree_opt = adamx.adam(flat_state=True, **kw), adamx.adam(**kw)
    pf, sf = run(ref_step(flat_opt), flat_opt, 5)
    pt, st = run(ref_step(tree_opt), tree_opt, 5)
    assert isinstance(sf.mu, adamx.FlatBuffers)
    assert_trees_close((pf, _flat_as_tree(flat_opt, sf, pf)), (pt, st), exact=True)


@needs_kernel
@pytest.mark.parametrize("option", sorted(FLAT_OPTIONS))
def test_flat_state_fused_equals_reference(option):
    """The fused step takes flat 8-bit state (the kernel runs on per-leaf views, the new state
    is packed back) and equals ``update`` + ``apply_updates`` as for tree state."""
    kw = {**FLAT_OPTIONS[option], **SMALL}
    opt = adamx.adam(flat_state=True, **kw)
    params = make_params()
    assert _fused.why_not(opt, make_grads(params, 0), opt.init(params), params) is None
    pf, sf = run(fused_step(opt), opt, 5)
    pr, sr = run(ref_step(opt), opt, 5)
    assert isinstance(sf.mu, adamx.FlatBuffers)
    fused, ref = (pf, _flat_as_tree(opt, sf, pf)), (pr, _flat_as_tree(opt, sr, pr))
    if "clipnorm" in kw:
        _codes_close(fused, ref, kw["learning_rate"])
    else:
        _assert_fused_equal(fused, ref)


def test_flat_state_of_other_quantize_options_is_refused():
    """A flat state built with other 8-bit options (which leaves are 8-bit, the block size) has
    other buffers: refused naming the field, not misread."""
    params = make_params()
    grads = make_grads(params, 0)
    state = adamx.adam(flat_state=True, **SMALL).init(params)
    for other in (
        dict(SMALL, quantize_min_size=10**9),  # no leaf 8-bit
        dict(SMALL, quantize_block_size=32),  # other blocks
        {},  # float32 moments
    ):
        with pytest.raises(ValueError, match="flat state field `mu` does not match params"):
            adamx.adam(flat_state=True, **other).update(grads, state, params)
    float_state = adamx.adam(flat_state=True).init(params)
    with pytest.raises(ValueError, match="flat state field `mu` does not match params"):
        adamx.adam(flat_state=True, **SMALL).update(grads, float_state, params)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="quantize_moments"):
        adamx.adam(quantize_moments=1)
    for bad in (0, -3, 2.5, True, "256"):
        with pytest.raises(ValueError, match="quantize_block_size"):
            adamx.adam(quantize_moments=True, quantize_block_size=bad)
    for bad in (-1, 1.0, None):
        with pytest.raises(ValueError, match="quantize_min_size"):
            adamx.adam(quantize_moments=True, quantize_min_size=bad)
    params = {"a": jnp.ones((8192,)), "b": jnp.ones((8192,))}
    with pytest.raises(ValueError, match="quantize_mask"):
        adamx.adam(quantize_moments=True, quantize_mask={"a": True}).init(params)
    with pytest.raises(ValueError, match="quantize_mask"):
        adamx.adam(quantize_moments=True, quantize_mask={"a": 1, "b": 0}).init(params)
    opt = adamx.adam(quantize_moments=True)
    with pytest.raises(ValueError, match="quantize_moments needs the params"):
        opt.update(params, opt.init(params))
    with pytest.raises(ValueError, match="quantize_moments"):
        adamx.to_keras_config(adamx.adam(quantize_moments=True))


def test_keras_config_round_trip():
    opt = adamx.adam(learning_rate=0.01, quantize_moments=True, quantize_block_size=128)
    cfg = adamx.to_keras_config(opt, include_adamx=True)
    assert cfg["quantize_moments"] is True and cfg["quantize_block_size"] == 128 and cfg["quantize_min_size"] == 4096
    back = adamx.from_keras_config(cfg)
    assert back.spec.quantize_moments and back.spec.quantize_block_size == 128
    assert "quantize_moments" not in adamx.to_keras_config(adamx.adam(), include_adamx=True)


def test_orbax_resume_is_bit_exact(tmp_path):
    """Save params + 8-bit state mid-run with Orbax, restore into the abstract target, continue:
    identical to the uninterrupted run (codes, scales, params), with accumulation in flight."""
    ocp = pytest.importorskip("orbax.checkpoint")
    opt = adamx.adam(learning_rate=0.01, amsgrad=True, gradient_accumulation_steps=2, use_ema=True, **SMALL)
    steps = 7
    sub = ("f32", "bf16", "f16", "bf16_f32grad")  # Orbax cannot save the empty leaf
    full = run(ref_step(opt), opt, steps, sub)
    params = make_params(subset=sub)
    state = opt.init(params)
    step = ref_step(opt)
    for i in range(3):
        params, state = step(make_grads(params, i), state, params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", (params, state))
    ckptr.wait_until_finished()
    target = jax.eval_shape(lambda: (make_params(subset=sub), opt.init(make_params(subset=sub))))
    params, state = ckptr.restore(tmp_path / "ckpt", target)
    ckptr.close()
    assert isinstance(state.mu["f32"]["kernel"], Q.QuantizedArray)
    assert state.mu["f32"]["kernel"].codes.dtype == jnp.uint8
    for i in range(3, steps):
        params, state = step(make_grads(params, i), state, params)
    assert_trees_close((params, state), full, exact=True)


# ---------------------------------------------------------------------- wrappers and sharding
def test_inject_hyperparams():
    """``optax.inject_hyperparams(adamx.adam)``: the quantization options stay static (the state
    holds the same QuantizedArray leaves); the numbers equal the plain optimizer's up to the
    last-bit differences of a traced learning rate (XLA folds a constant ``wd * lr``)."""
    kw = dict(learning_rate=0.01, weight_decay=0.05)
    inj = optax.inject_hyperparams(adamx.adam)(**kw, **SMALL)
    plain = adamx.adam(**kw, **SMALL)
    params = make_params(subset=("f32",))
    s1, s2 = inj.init(params), plain.init(params)
    assert isinstance(s1.inner_state.mu["f32"]["kernel"], Q.QuantizedArray)
    p1 = p2 = params
    for i in range(3):
        g = make_grads(p1, i)
        p1, s1 = ref_step(inj)(g, s1, p1)
        p2, s2 = ref_step(plain)(g, s2, p2)
    _codes_close((p1, s1.inner_state), (p2, s2), 0.01)


@pytest.mark.skipif(
    jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
)
def test_sharded_jit_step():
    """Codes are shaped like the params and shard like them; the scales of a (64, 128) leaf are 1-D
    (128 is no multiple of the block size: blocks span two rows) and shard along their one axis
    (``adamx.sharding.zero1_state_sharding`` places both so; a shard holds whole blocks when
    ``rows_per_device * cols`` is a multiple of the block size). A jit over NamedSharding inputs
    under ``jax.set_mesh`` gives the single-device numbers and keeps the shardings."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    opt = adamx.adam(learning_rate=0.01, amsgrad=True, quantize_moments=True, quantize_min_size=1024)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 128)), "b": jnp.ones((128,))}
    grads = [
        jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i + 1), p.shape), params) for i in range(3)
    ]
    ref_p, ref_s = params, opt.init(params)
    step = ref_step(opt)
    for g in grads:
        ref_p, ref_s = step(g, ref_s, ref_p)

    with jax.set_mesh(mesh):
        p_sh = {"w": NamedSharding(mesh, P("d", None)), "b": NamedSharding(mesh, P())}
        params_d = jax.device_put(params, p_sh)
        state = jax.jit(opt.init)(params_d)
        state = jax.device_put(state, adamx.sharding.zero1_state_sharding(state, mesh, axis="d"))
        assert state.mu["w"].codes.sharding.is_equivalent_to(p_sh["w"], 2)
        assert state.nu["w"].scales.sharding.spec == P("d")
        sstep = jax.jit(lambda g, s, p: opt.apply_gradients(g, s, p))
        p = params_d
        for g in grads:
            p, state = sstep(jax.device_put(g, p_sh), state, p)
        assert state.mu["w"].codes.sharding.is_equivalent_to(p_sh["w"], 2)
    assert_trees_close((p, state), (ref_p, ref_s), exact=True)
