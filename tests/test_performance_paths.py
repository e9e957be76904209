"""The fused step (``Adam.apply_gradients`` / ``adamx.fused``) against the reference path.

The reference path is ``update`` + ``optax.apply_updates``. The fused path must give
the same numbers for every option, use one in-place pass without full-size
temporaries, fall back where it cannot apply, and not recompile on a second call.
No timings here: see benchmarks/run.py.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from adamx import fused as _fused

FUSED = _fused.available()
needs_kernel = pytest.mark.skipif(not FUSED, reason=f"fused kernel unavailable: {_fused.status()['error']}")

# One tree holds every supported parameter dtype, so one compile covers all of them.
SHAPES = {
    "f32": {"kernel": (37, 19), "bias": (19,), "scalar": ()},
    "bf16": {"kernel": (23, 11), "bias": (11,)},
    "f16": {"kernel": (13, 17), "bias": (17,)},
    "bf16_f32grad": (301,),  # bfloat16 params with float32 gradients (mixed precision)
    "empty": (0,),
}
DTYPES = {
    "f32": jnp.float32,
    "bf16": jnp.bfloat16,
    "f16": jnp.float16,
    "bf16_f32grad": jnp.bfloat16,
    "empty": jnp.float32,
}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def make_params(seed=0, subset=None):
    out = {}
    key = jax.random.PRNGKey(seed)
    for name, sub in SHAPES.items():
        if subset is not None and name not in subset:
            continue
        leaves, td = jax.tree_util.tree_flatten(sub, is_leaf=_is_shape)
        keys = jax.random.split(jax.random.fold_in(key, len(out)), len(leaves))
        out[name] = jax.tree_util.tree_unflatten(
            td, [jax.random.normal(k, s).astype(DTYPES[name]) for k, s in zip(keys, leaves)]
        )
    return out


def make_grads(params, step):
    """Gradients like tests/references/cases.py: random scale, small every 5th step, 10% zeros."""
    rng = np.random.default_rng(1000 + step)
    scale = rng.uniform(0.5, 1.0) * (0.05 if step % 5 == 3 else 1.0)

    def one(path, p):
        g = np.asarray(rng.standard_normal(p.shape) * scale)
        g = np.where(rng.random(p.shape) < 0.1, 0.0, g)
        dt = jnp.float32 if "bf16_f32grad" in jax.tree_util.keystr(path) else p.dtype
        return jnp.asarray(g, jnp.float32).astype(dt)

    return jax.tree_util.tree_map_with_path(one, params)


def ref_step(opt):
    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def fused_step(opt):
    return jax.jit(lambda grads, state, params: opt.apply_gradients(grads, state, params))


def run(step, opt, n_steps, subset=None):
    params = make_params(subset=subset)
    state = opt.init(params)
    for i in range(n_steps):
        params, state = step(make_grads(params, i), state, params)
    return params, state


def tolerance(dtype, scale):
    """A few roundings of the dtype, relative to the leaf's magnitude."""
    eps = float(jnp.finfo(dtype).eps)
    return dict(rtol=4 * eps, atol=4 * eps * max(scale, 1e-30))


def _param_dtype(path, leaf):
    """The dtype of the parameter a leaf belongs to (state leaves follow their parameter)."""
    for k in path:
        if isinstance(k, jax.tree_util.DictKey) and k.key in DTYPES:
            return DTYPES[k.key]
    return leaf.dtype


def assert_trees_close(a, b, exact):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_leaves(b)
    assert len(fa) == len(fb)
    for (path, x), y in zip(fa, fb):
        where = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if exact or not jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_array_equal(xn, yn, err_msg=where)
        else:
            # a state leaf (float32 moments, averages) of a bfloat16/float16 parameter
            # inherits the parameter's roundings
            dt = _param_dtype(path, x)
            dt = x.dtype if jnp.finfo(x.dtype).eps > jnp.finfo(dt).eps else dt
            scale = float(np.max(np.abs(yn))) if yn.size else 0.0
            np.testing.assert_allclose(xn, yn, err_msg=where, **tolerance(dt, scale))


OPTIONS = {
    "defaults": dict(),
    "hparams": dict(learning_rate=0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-4),
    "amsgrad": dict(amsgrad=True),
    "weight_decay": dict(learning_rate=0.01, weight_decay=0.1),
    "wd_exclude_mask": dict(
        learning_rate=0.01,
        weight_decay=0.1,
        exclude_from_weight_decay=["bias"],
        weight_decay_mask=lambda p: {k: k != "f32" for k in p},
    ),
    "clipnorm": dict(clipnorm=0.5),
    "global_clipnorm": dict(global_clipnorm=0.3),
    "clipvalue": dict(clipvalue=0.1),
    "ema": dict(use_ema=True, ema_momentum=0.9),
    "ema_overwrite": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
    "accumulation": dict(gradient_accumulation_steps=3),
    "loss_scale": dict(loss_scale_factor=128.0),
    "schedules": dict(
        learning_rate=optax.exponential_decay(0.01, 3, 0.5), weight_decay=lambda n: 0.01 / (1.0 + n.astype(jnp.float32))
    ),
    "everything": dict(
        learning_rate=0.01,
        amsgrad=True,
        weight_decay=0.05,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=2,
        loss_scale_factor=4.0,
        gradient_accumulation_steps=2,
    ),
    # mixed precision (tests/test_param_rounding.py): how bf16/f16 params receive updates
    "kahan": dict(learning_rate=0.01, param_rounding="kahan"),
    "stochastic": dict(learning_rate=0.01, param_rounding="stochastic", seed=7),
    "acc_bf16": dict(gradient_accumulation_steps=3, acc_dtype=jnp.bfloat16),
    "rounding_everything": dict(
        learning_rate=0.01,
        param_rounding="kahan",
        weight_decay=0.05,
        clipvalue=0.5,
        use_ema=True,
        ema_overwrite_frequency=2,
        gradient_accumulation_steps=2,
        acc_dtype=jnp.bfloat16,
    ),
    "stochastic_everything": dict(
        learning_rate=0.01,
        param_rounding="stochastic",
        amsgrad=True,
        weight_decay=0.05,
        global_clipnorm=1.0,
        use_ema=True,
        loss_scale_factor=4.0,
        gradient_accumulation_steps=2,
    ),
}


@needs_kernel
@pytest.mark.parametrize("moments", ["f32", "bf16"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fused_equals_reference(option, moments):
    """Params and optimizer state after 7 steps agree within a few roundings of their dtype.

    The kernel contracts to FMA and rounds where XLA:CPU does, so most leaves agree to the
    last bit (see the next test); the exceptions are the norms of clipnorm and
    global_clipnorm (summed in another order) and tiny leaves, for which XLA picks other
    contractions. With bfloat16 moments such a last-bit difference can flip one bfloat16
    rounding of a moment, so there only the params are compared.
    """
    kw = dict(OPTIONS[option])
    if moments == "bf16":
        kw.update(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    opt = adamx.adam(**kw)
    params = make_params()
    assert _fused.why_not(opt, make_grads(params, 0), opt.init(params), params) is None
    fused = run(fused_step(opt), opt, 7)
    ref = run(ref_step(opt), opt, 7)
    if moments == "bf16":
        assert_trees_close(fused[0], ref[0], exact=False)
        assert fused[1].count == ref[1].count
    else:
        assert_trees_close(fused, ref, exact=False)


@needs_kernel
def test_adamw_and_defaults_bit_identical():
    """The common configurations agree to the last bit (f32, bf16 and f16 leaves)."""
    for opt in (adamx.adam(), adamx.adamw(learning_rate=0.01)):
        assert_trees_close(run(fused_step(opt), opt, 5), run(ref_step(opt), opt, 5), exact=True)


def _full_size_instructions(hlo: str, dims: str) -> list[str]:
    """Instructions of the entry computation that produce an array of shape ``dims``."""
    entry = hlo[hlo.index("\nENTRY") :]
    pat = re.compile(r"^\s*(?:ROOT )?%\S+ = f32\[" + re.escape(dims) + r"\]\{[^}]*\} (\S+?)\(", re.M)
    return [m.group(1) for m in pat.finditer(entry)]


@needs_kernel
@pytest.mark.standard_promotion("optax's own Adam/schedules compute float ** int32 count")
def test_clip_and_weight_decay_step_has_no_full_size_temporary():
    """Global clipnorm + weight decay: one read pass for the norm, one in-place update pass.

    With params and state donated, every full-size buffer of the compiled step must be an
    entry parameter or a result of the fused custom call (aliased in place to its operand,
    ``input_output_aliases``); any fusion, copy or other op with the full shape would be a
    full-size temporary or an extra pass. memory_analysis() confirms: temporaries are a few
    hundred bytes (scalars), not the 4 MiB of a leaf. The same checks on optax's
    ``chain(clip_by_global_norm, adamw)`` find the materialised clipped gradient.
    """
    n = 1 << 20
    params = {"w": jnp.ones((n,), jnp.float32), "b": jnp.ones((7,), jnp.float32)}
    grads = jax.tree.map(lambda x: x * 0.1, params)
    opt = adamx.adamw(1e-3, weight_decay=0.01, global_clipnorm=1.0)
    state = opt.init(params)
    compiled = (
        jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
        .lower(params, state, grads)
        .compile()
    )
    hlo = compiled.as_text()
    ops = _full_size_instructions(hlo, str(n))
    assert ops and set(ops) <= {"parameter", "get-tuple-element"}, ops
    assert hlo.count('custom_call_target="adamx_fused_step_v2"') == 1
    assert hlo.count('custom_call_target="adamx_fused_sumsq_v2"') == 1
    assert not re.search(r"= f32\[" + str(n) + r"\]\{0\} (fusion|copy)\(", hlo)
    ma = compiled.memory_analysis()
    assert ma.temp_size_in_bytes < 4096
    # outputs reuse the donated inputs: only the 4-byte count is a fresh output
    assert ma.output_size_in_bytes - ma.alias_size_in_bytes <= 64

    # The check does see a full-size temporary where there is one.
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    cstate = chain.init(params)

    def optax_step(p, s, g):
        u, s = chain.update(g, s, p)
        return optax.apply_updates(p, u), s

    c2 = jax.jit(optax_step, donate_argnums=(0, 1)).lower(params, cstate, grads).compile()
    assert c2.memory_analysis().temp_size_in_bytes >= 4 * n


@needs_kernel
def test_fused_donation_updates_in_place_and_does_not_recompile():
    """``step(params, state, grads) -> (params, state)`` with params and state donated.

    JAX pairs donated inputs with outputs of the same shape in argument order, so the step
    must return params and state in the order it takes them; then the kernel writes into
    the donated buffers and the compiled step has no copies.
    """
    opt = adamx.adam(learning_rate=0.01, amsgrad=True, use_ema=True)
    params = make_params()
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
    ref = ref_step(opt)
    rp, rs = params, state
    p, s = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)
    hlo = step.lower(p, s, make_grads(rp, 0)).compile().as_text()
    copies = re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", hlo)
    assert all(np.prod([int(d) for d in c.split(",")]) == 0 for c in copies), copies  # no array copies
    for i in range(3):
        g = make_grads(rp, i)
        before = p["f32"]["kernel"].unsafe_buffer_pointer(), s.mu["bf16"]["kernel"].unsafe_buffer_pointer()
        p, s = step(p, s, g)
        rp, rs = ref(g, rs, rp)
        assert (p["f32"]["kernel"].unsafe_buffer_pointer(), s.mu["bf16"]["kernel"].unsafe_buffer_pointer()) == before
    assert step._cache_size() == 1  # the second and third calls did not recompile
    assert_trees_close((p, s), (rp, rs), exact=False)
    # eager (not jitted) calls work too
    p2, s2 = opt.apply_gradients(make_grads(rp, 3), rs, rp)
    p3, s3 = ref(make_grads(rp, 3), rs, rp)
    assert_trees_close((p2, s2), (p3, s3), exact=False)


# ---------------------------------------------------------------- flat_state=True
def as_tree_state(flat_state, tree_state):
    """A flat ``AdamState`` unpacked into the tree layout of ``tree_state`` (for comparison)."""
    fields = {}
    for f in ("mu", "nu", "nu_max", "acc", "ema", "comp"):
        flat_f, tree_f = getattr(flat_state, f, None), getattr(tree_state, f, None)
        assert (flat_f is None) == (tree_f is None), f
        if flat_f is None:
            continue
        assert isinstance(flat_f, adamx.FlatBuffers), f
        leaves, td = jax.tree_util.tree_flatten(tree_f)
        lay = adamx._flat.layout(leaves, lambda x: x.dtype)
        fields[f] = jax.tree_util.tree_unflatten(td, adamx._flat.unpack(flat_f, lay))
    return flat_state._replace(**fields)


# Trees for the flat reference path: every dtype in one float32 arithmetic group (leaves of
# several storage dtypes: updates per leaf), and groups of one storage dtype (updates and
# the average's params as whole buffers, unless the decay mask splits the group).
FLAT_TREES = {"mixed": None, "f32": ("f32",), "bf16": ("bf16", "bf16_f32grad")}


@pytest.mark.parametrize("tree", list(FLAT_TREES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_flat_state_reference_path_equals_tree_state(option, tree):
    """flat_state changes storage only: the reference path (whole-buffer arithmetic on the
    flat buffers) gives bit-identical params and state, except that XLA may sum a clipping
    norm in another order over slices of a flat buffer, or contract a multiply-add into an
    FMA in one loop and not in the other (one float32 rounding: the tolerance)."""
    tree_opt = adamx.adam(**OPTIONS[option])
    flat_opt = adamx.adam(**OPTIONS[option], flat_state=True)
    exact = not ({"clipnorm", "global_clipnorm", "use_ema", "gradient_accumulation_steps"} & set(OPTIONS[option]))
    tp, ts = run(ref_step(tree_opt), tree_opt, 5, FLAT_TREES[tree])
    fp, fs = run(ref_step(flat_opt), flat_opt, 5, FLAT_TREES[tree])
    assert_trees_close((fp, as_tree_state(fs, ts)), (tp, ts), exact=exact)
    if OPTIONS[option].get("use_ema"):
        assert_trees_close(adamx.finalize_variable_values(fp, fs), adamx.finalize_variable_values(tp, ts), exact=exact)


def _loops(opt, params):
    """Kernels (fusions) in the compiled reference step ``update + apply_updates``."""

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    txt = jax.jit(step).lower(params, opt.init(params), params).compile().as_text()
    return len(re.findall(r"= \S+ fusion\(", txt))


def test_flat_reference_path_is_one_loop_per_leaf():
    """With flat state the moments, accumulator, clipping and average are whole-buffer loops:
    each extra leaf adds exactly one loop (its update), with every Keras option on. A decay
    mask that splits a dtype group costs a second loop per leaf (the average's params)."""
    kw = dict(
        weight_decay=0.1,
        amsgrad=True,
        global_clipnorm=1.0,
        use_ema=True,
        ema_overwrite_frequency=3,
        gradient_accumulation_steps=2,
        loss_scale_factor=4.0,
        flat_state=True,
    )
    trees = {n: {f"w{i:02d}": jnp.ones((i + 3,)) for i in range(n)} for n in (10, 20)}
    uniform = {n: _loops(adamx.adam(**kw), t) for n, t in trees.items()}
    assert uniform[20] - uniform[10] == 10, uniform
    masked = {
        n: _loops(adamx.adam(**kw, weight_decay_mask=lambda p: {k: k != "w00" for k in p}), t) for n, t in trees.items()
    }
    assert masked[20] - masked[10] == 20, masked


@needs_kernel
@pytest.mark.parametrize("moments", ["f32", "bf16"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fused_flat_equals_reference(option, moments):
    """The fused step on flat state against the tree-state reference path (tolerance as above)."""
    kw = dict(OPTIONS[option])
    if moments == "bf16":
        kw.update(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    flat_opt, tree_opt = adamx.adam(**kw, flat_state=True), adamx.adam(**kw)
    params = make_params()
    subset = None
    if kw.get("param_rounding") == "kahan":
        # the compensation is kept in each param's dtype: one flat buffer per dtype, which
        # the kernel does not take (it falls back); a tree of one dtype runs fused
        reason = _fused.why_not(flat_opt, make_grads(params, 0), flat_opt.init(params), params)
        assert reason is not None and "several dtype groups" in reason
        subset = FLAT_TREES["bf16"]
        params = make_params(subset=subset)
    assert _fused.why_not(flat_opt, make_grads(params, 0), flat_opt.init(params), params) is None
    fp, fs = run(fused_step(flat_opt), flat_opt, 7, subset)
    tp, ts = run(ref_step(tree_opt), tree_opt, 7, subset)
    if moments == "bf16":
        assert_trees_close(fp, tp, exact=False)
    else:
        assert_trees_close((fp, as_tree_state(fs, ts)), (tp, ts), exact=False)


@needs_kernel
def test_fused_flat_defaults_bit_identical_and_in_place():
    """Defaults: bit-identical to the reference; donated flat buffers are updated in place,
    the compiled step has no copies, and few operands (2 per leaf + the flat buffers)."""
    opt = adamx.adamw(learning_rate=0.01, flat_state=True)
    tree_opt = adamx.adamw(learning_rate=0.01)
    assert_trees_close(run(fused_step(opt), opt, 5)[0], run(ref_step(tree_opt), tree_opt, 5)[0], exact=True)
    params = make_params()
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p), donate_argnums=(0, 1))
    lowered = step.lower(params, state, make_grads(params, 0))
    hlo = lowered.compile().as_text()
    copies = re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", hlo)
    assert all(np.prod([int(d) for d in c.split(",")]) == 0 for c in copies), copies
    assert lowered.as_text().count(_fused._build.STEP_TARGET) == 1
    p, s = params, state
    for i in range(3):
        before = s.mu.buffers[0].unsafe_buffer_pointer(), s.nu.buffers[0].unsafe_buffer_pointer()
        p, s = step(p, s, make_grads(p, i))
        assert (s.mu.buffers[0].unsafe_buffer_pointer(), s.nu.buffers[0].unsafe_buffer_pointer()) == before
    assert step._cache_size() == 1


def test_flat_layout_groups_by_dtype_and_round_trips():
    leaves = [jnp.ones((2, 3), jnp.float32), jnp.full((4,), 2, jnp.float16), jnp.full((), 3.0), jnp.zeros((0,))]
    lay = adamx._flat.layout(leaves, lambda x: x.dtype)
    assert lay.dtypes == (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16))
    assert lay.totals == (7, 4)
    assert [s.offset for s in lay.slots] == [0, 0, 6, 7]
    flat = adamx._flat.pack(leaves, lay)
    back = adamx._flat.unpack(flat, lay)
    for a, b in zip(leaves, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="does not match params"):
        adamx._flat.unpack(adamx.FlatBuffers((jnp.zeros(6), jnp.zeros(4, jnp.float16))), lay)


def test_flat_state_errors():
    opt = adamx.adam(flat_state=True)
    params = {"w": jnp.ones((3,))}
    state = opt.init(params)
    with pytest.raises(ValueError, match="needs the params"):
        opt.update(params, state)
    with pytest.raises(ValueError, match="does not match params"):
        opt.update({"w": jnp.ones((4,))}, state, {"w": jnp.ones((4,))})


def test_flat_state_ema_is_a_copy_not_the_params():
    """A one-leaf EMA pack must not alias the params (donation would fail)."""
    params = {"w": jnp.arange(4.0)}
    state = adamx.adam(use_ema=True, flat_state=True).init(params)
    assert state.ema.buffers[0].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()


def _check_fallback(opt, grads, state, params, reason_part):
    reason = _fused.why_not(opt, grads, state, params)
    assert reason is not None and reason_part in reason, reason
    p1, s1 = _fused.apply_gradients(opt, grads, state, params)
    u, s2 = opt.update(grads, state, params)
    p2 = jax.tree.map(
        lambda p, u: p if u is None else optax.apply_updates(p, u), params, u, is_leaf=lambda x: x is None
    )
    assert_trees_close((p1, s1), (p2, s2), exact=True)


@pytest.mark.skipif(
    os.environ.get("ADAMX_REQUIRE_FUSED") != "1", reason="set ADAMX_REQUIRE_FUSED=1 (make test does) to require it"
)
def test_kernel_builds_where_required():
    """``make test`` sets ADAMX_REQUIRE_FUSED=1: there a machine with a C++ compiler must build
    the kernel, so the tests above that need it cannot skip unnoticed."""
    assert FUSED, _fused.status()
    assert (
        _fused.why_not(adamx.adam(), {"w": jnp.ones(3)}, adamx.adam().init({"w": jnp.ones(3)}), {"w": jnp.ones(3)})
        is None
    )


@pytest.mark.standard_promotion("optax's own Adam/schedules compute float ** int32 count")
def test_fallback_for_other_transformations():
    params = make_params()
    grads = make_grads(params, 0)
    for tx in (optax.adam(1e-3), optax.inject_hyperparams(adamx.adam)(learning_rate=1e-3)):
        _check_fallback(tx, grads, tx.init(params), params, "not an adamx.adam")


def test_fallback_for_none_gradient_and_unusual_dtypes():
    opt = adamx.adam(learning_rate=0.01)
    params = make_params()
    grads = make_grads(params, 0)
    grads["f16"]["bias"] = None
    _check_fallback(opt, grads, opt.init(params), params, "None")
    opt16 = adamx.adam(learning_rate=0.01, mu_dtype=jnp.float16)
    params = {"w": jnp.ones((5,))}
    if FUSED:
        _check_fallback(opt16, {"w": jnp.ones((5,))}, opt16.init(params), params, "moment dtypes")
    params = {"w": jnp.arange(5, dtype=jnp.int32)}  # not a float parameter
    if FUSED:
        g = {"w": jnp.ones((5,), jnp.float32)}
        assert "unsupported dtypes" in _fused.why_not(opt, g, opt.init(params), params)


def test_fallback_when_kernel_unavailable(monkeypatch):
    monkeypatch.setitem(_fused._build._status, "tried", True)
    monkeypatch.setitem(_fused._build._status, "ok", False)
    monkeypatch.setitem(_fused._build._status, "error", "switched off by the test")
    opt = adamx.adamw(learning_rate=0.01, global_clipnorm=0.5)
    params = make_params()
    _check_fallback(opt, make_grads(params, 0), opt.init(params), params, "switched off by the test")


@pytest.mark.skipif(
    jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
)
def test_fallback_for_sharded_params():
    """Arrays split over devices take the reference path (eagerly and under jit); inside
    shard_map every shard is a local array and the kernel applies per shard."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    sharded = jax.sharding.NamedSharding(mesh, spec)
    params = {"w": jax.device_put(jnp.arange(8, dtype=jnp.float32), sharded)}
    grads = {"w": jax.device_put(jnp.full((8,), 0.5, jnp.float32), sharded)}
    opt = adamx.adam(learning_rate=0.1)
    state = opt.init(params)
    if FUSED:
        _check_fallback(opt, grads, state, params, "sharded")
    step = jax.jit(lambda p, s, g: opt.apply_gradients(g, s, p))
    assert "adamx_fused_step" not in step.lower(params, state, grads).as_text()
    p, _ = step(params, state, grads)
    u, _ = opt.update(grads, state, params)
    expected = np.asarray(optax.apply_updates(params, u)["w"])
    np.testing.assert_array_equal(np.asarray(p["w"]), expected)

    def local(p, g):  # per-shard step; global_clipnorm would be per shard too
        s = opt.init(p)
        return opt.apply_gradients(g, s, p)[0]

    smap = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
    if FUSED:
        assert "adamx_fused_step" in smap.lower(params, grads).as_text()
    np.testing.assert_array_equal(np.asarray(smap(params, grads)["w"]), expected)


def test_apply_gradients_needs_params():
    opt = adamx.adamw()
    params = {"w": jnp.ones((3,))}
    with pytest.raises(ValueError, match="needs the params"):
        _fused.apply_gradients(opt, params, opt.init(params), None)
