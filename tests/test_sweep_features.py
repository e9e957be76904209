"""The input sweep, extended to the features added after it (issue 19): loss scaling,
``param_rounding``/``acc_dtype``, 8-bit moments and lazy rows.

The machinery (``Case``, ``classify``, the per-op reference of ``adamx.adam``) is
tests/test_sweep.py's. References here:

* ``loss_scale_optimizer``: the inner optimizer run on the gradient divided by the scale
  in NumPy (``adamx.adam`` itself is checked against the per-op reference by the sweep);
* ``lazy_adam``: TF Addons' ``LazyAdam`` written op by op (``tests/test_lazy.py``), the
  touched rows after de-duplication; untouched rows must stay bit for bit;
* ``acc_dtype``/``param_rounding``: the per-op reference of ``adamx.adam`` (float32
  params, where every rounding mode is the identity);
* 8-bit moments: ``update`` + ``optax.apply_updates`` equals ``apply_gradients`` and the
  state is 8-bit where the options say (the codec itself: tests/test_quantized_adam.py).
* bit identities: ``apply_gradients`` equals jitted ``update`` + ``apply_updates`` bit for
  bit (params and state) for the cases issue 19 listed as exceptions;
* 8-bit moments on meshes (2x2, Explicit and Auto; needs
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, as ``make test`` sets): the
  single-device run, bit for bit.

``tests/sweep_report.py --features`` prints this file's table for docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests.test_lazy import tfa_lazy_adam_step
from tests.test_sweep import PATHS, Case, _stepper, check_against_reference, classify

f32 = np.float32
XFAIL_8BIT = "the lead's 8-bit state rewrite (Explicit meshes, bit identity)"
XFAIL_BCOO = "optax transformations map over a BCOO's indices like any array leaf"
STATE_ERR = r"`state` is a|state field `(count|mu|nu|nu_max|acc|ema|comp)`"


@dataclasses.dataclass(frozen=True)
class FCase(Case):
    """A sweep case; ``xfail``: a goal not met yet, owned elsewhere (strict xfail, with the reason)."""

    xfail: str | None = None


def _params(dtype: Any = np.float32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {"a": jnp.asarray(rng.standard_normal((3, 2)).astype(f32).astype(dtype)), "b": jnp.asarray(f32([1, -2]))}


def _grads(p: dict, i: int, scale: float = 1.0, dtype: Any = None) -> dict:
    rng = np.random.default_rng(10 + i)
    return {
        k: jnp.asarray((rng.standard_normal(v.shape) * 0.3 * scale).astype(f32).astype(dtype or v.dtype))
        for k, v in p.items()
    }


def _close(got: Any, want: Any, what: str, rtol: float = 2e-6) -> None:
    got, want = np.asarray(got).astype(np.complex128), np.asarray(want).astype(np.complex128)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    assert np.allclose(got, want, rtol=rtol, atol=rtol * 1e-2), f"{what}: {got.ravel()[:4]} vs {want.ravel()[:4]}"


# ----------------------------------------------------------------------------- loss scaling
def _unscaled(g: Any, s: float) -> Any:
    """What the scaler hands the inner optimizer: ``g / s`` in float32 (or wider), back in g's dtype."""
    if g is None or not jnp.issubdtype(g.dtype, jnp.inexact):
        return g
    wide = g.dtype.type if jnp.dtype(g.dtype).itemsize >= 4 else np.float32  # float32, float64 or complex
    return jnp.asarray((np.asarray(g).astype(wide) / wide(s)).astype(g.dtype))


def check_loss_scale(
    path: str, *, dtype: Any = np.float32, gdtype: Any = None, inner: Callable[[], Any] = adamx.adam, extra: Any = None
) -> None:
    """Three finite steps through the scaler equal the inner optimizer on the unscaled grads;
    a non-finite step leaves params and inner state alone and halves the scale."""
    s0 = 2.0**10
    opt = adamx.loss_scale_optimizer(inner(), initial_scale=s0)
    ref = inner()
    p = _params(dtype) if extra is None else {**_params(dtype), **extra[0]}
    s, rs, rp = opt.init(p), ref.init(p), p
    for i in range(3):
        g = {**_grads(_params(dtype), i, s0, gdtype), **({} if extra is None else extra[1])}
        p, s = _stepper(opt, path)(g, s, p)
        ru, rs = ref.update(jax.tree.map(lambda x: _unscaled(x, s0), g), rs, rp)
        rp = optax.apply_updates(rp, ru)
        for k in p:
            assert p[k].dtype == rp[k].dtype, f"{k}: dtype {p[k].dtype} vs {rp[k].dtype}"
            _close(p[k], rp[k], f"step {i} params {k}")
    bad = {**_grads(_params(dtype), 9, s0, gdtype), **({} if extra is None else extra[1])}
    bad["a"] = bad["a"].at[0, 0].set(jnp.inf)
    p2, s2 = _stepper(opt, path)(bad, s, p)
    assert all(np.array_equal(np.asarray(p2[k]), np.asarray(p[k])) for k in p), "a skipped step moved params"
    assert float(adamx.loss_scale(s2)) == s0 / 2, "the scale must halve on a skipped step"


def check_small_updates_not_rounded(path: str) -> None:
    """float16 grads on float32 params: tiny updates stay float32 (not rounded to 0 in float16)."""
    opt = adamx.loss_scale_optimizer(adamx.adam(1e-9), initial_scale=2.0**10)
    p = {"w": jnp.ones(4)}
    g = {"w": jnp.full(4, 0.5, jnp.float16)}
    out, _ = _stepper(opt, path)(g, opt.init(p), p)
    ru, _ = adamx.adam(1e-9).update({"w": _unscaled(g["w"], 2.0**10)}, adamx.adam(1e-9).init(p), p)
    want = optax.apply_updates(p, ru)
    assert out["w"].dtype == jnp.float32
    assert np.array_equal(np.asarray(out["w"]), np.asarray(want["w"])), f"{out['w']} vs {want['w']}"


def _lso_state_run(path: str, src: Callable[[dict], Any]) -> Callable[[], None]:
    def run() -> None:
        opt = adamx.loss_scale_optimizer(adamx.adam(), initial_scale=8.0)
        p = _params()
        _stepper(opt, path)(_grads(p, 0), src(p), p)

    return run


def _lso_cases() -> list[FCase]:
    out = []
    cat = "loss scaling"
    for path in PATHS:
        for dn, dt in (("float32", np.float32), ("bfloat16", jnp.bfloat16), ("float16", np.float16)):
            out.append(FCase(cat, f"{dn} params {path}", lambda p=path, dt=dt: check_loss_scale(p, dtype=dt)))
        out.append(
            FCase(cat, f"float16 grads on float32 params {path}", lambda p=path: check_small_updates_not_rounded(p))
        )
        out.append(
            FCase(cat, f"float64 params (x64) {path}", _x64(lambda p=path: check_loss_scale(p, dtype=np.float64)))
        )
        int_leaf = {"n": jnp.asarray([3, 4], jnp.int32)}
        for gn, gv in (("float0", np.zeros(2, jax.dtypes.float0)), ("int32", jnp.ones(2, jnp.int32)), ("None", None)):
            out.append(
                FCase(
                    cat,
                    f"int leaf with {gn} grad {path}",
                    lambda p=path, gv=gv, il=int_leaf: check_loss_scale(p, extra=(il, {"n": gv})),
                )
            )
        out.append(
            FCase(
                cat, f"None grad for a float leaf {path}", lambda p=path: check_loss_scale(p, extra=({}, {"b": None}))
            )
        )
        out.append(FCase(cat, f"complex64 params {path}", lambda p=path: check_loss_scale(p, dtype=np.complex64)))
        inners: dict[str, Callable[[], Any]] = {
            "optax.chain(clip, adam)": lambda: optax.chain(optax.clip_by_global_norm(1.0), adamx.adam()),
            "inject_hyperparams(adam)": lambda: optax.inject_hyperparams(adamx.adam)(learning_rate=0.01),
            "nested loss scaler": lambda: adamx.loss_scale_optimizer(adamx.adam(), initial_scale=1.0),
            "adam(param_rounding=kahan)": lambda: adamx.adam(param_rounding="kahan"),
            "adam(quantize_moments)": lambda: adamx.adam(quantize_moments=True, quantize_min_size=1),
            "tf1_adam": adamx.tf1_adam,
        }
        for name, inner in inners.items():
            if name == "nested loss scaler":
                out.append(FCase(cat, f"inner {name} {path}", lambda p=path, i=inner: _nested(p, i), "nested"))
            else:
                out.append(FCase(cat, f"inner {name} {path}", lambda p=path, i=inner: check_loss_scale(p, inner=i)))
        sources = {
            "bare inner AdamState": lambda p: adamx.adam().init(p),
            "inner state of adam(amsgrad)": lambda p: adamx.loss_scale_optimizer(adamx.adam(amsgrad=True)).init(p),
            "inner state for other params": lambda p: adamx.loss_scale_optimizer(adamx.adam()).init({"a": p["a"]}),
            "inner state of adam(quantize_moments)": lambda p: adamx.loss_scale_optimizer(
                adamx.adam(quantize_moments=True, quantize_min_size=1)
            ).init(p),
        }
        for sn, src in sources.items():
            out.append(FCase(cat, f"{sn} {path}", _lso_state_run(path, src), STATE_ERR + r"|state field"))
    for path in PATHS:
        out.append(FCase(cat, f"inner MultiSteps(adam, 2) {path}", lambda p=path: _standard(_lso_multisteps, p)))
    out.append(
        FCase(
            cat,
            "apply_if_finite(loss scaler) update",
            lambda: _apply_if_finite(),
        )
    )
    return out


def _standard(fn: Callable[[str], None], path: str) -> None:
    """optax's MultiSteps computes ``int32 * float32`` itself: run it with standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        fn(path)


def _lso_multisteps(path: str) -> None:
    check_loss_scale(path, inner=lambda: optax.MultiSteps(adamx.adam(), 2))


def _nested(path: str, inner: Callable[[], Any]) -> None:
    opt = adamx.loss_scale_optimizer(inner(), initial_scale=4.0)
    p = _params()
    s = opt.init(p)
    _stepper(opt, path)(_grads(p, 0), s, p)
    adamx.loss_scale(s)  # which scale multiplies the loss? must refuse


def _apply_if_finite() -> None:
    """optax.apply_if_finite around the scaler: finite steps equal the scaler alone."""
    opt = adamx.loss_scale_optimizer(adamx.adam(), initial_scale=4.0)
    wrapped = optax.apply_if_finite(opt, 3)
    p = _params()
    s, ws = opt.init(p), wrapped.init(p)
    for i in range(2):
        g = _grads(p, i)
        u, s = opt.update(g, s, p)
        wu, ws = wrapped.update(g, ws, p)
        for k in u:
            assert np.array_equal(np.asarray(u[k]), np.asarray(wu[k])), k


def _x64(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with jax.enable_x64(True):
            fn()

    return run


# ----------------------------------------------------------------------------- param_rounding / acc_dtype
def _rounding_cases() -> list[FCase]:
    out = []
    cat = "param_rounding / acc_dtype"
    for path in PATHS:
        for mode in ("nearest", "kahan", "stochastic"):
            kw = {"param_rounding": mode}
            out.append(
                FCase(
                    cat,
                    f"param_rounding={mode} float32 {path}",
                    lambda kw=kw, p=path: check_against_reference(kw, np.float32, p),
                )
            )
            for acc in (None, jnp.float32):
                kw2 = {"param_rounding": mode, "gradient_accumulation_steps": 2, "acc_dtype": acc}
                out.append(
                    FCase(
                        cat,
                        f"{mode} + accumulation, acc_dtype={acc and 'float32'} {path}",
                        lambda kw=kw2, p=path: check_against_reference(kw, np.float32, p),
                    )
                )
        # states of other rounding modes
        for tn, tkw in (("kahan", {"param_rounding": "kahan"}), ("nearest", {})):
            for sn, skw in (("kahan", {"param_rounding": "kahan"}), ("nearest", {}), ("stochastic", {})):
                if (tn == "kahan") == (sn == "kahan"):
                    continue

                def run(tkw: dict = tkw, skw: dict = skw, p: str = path) -> None:
                    params = _params(jnp.bfloat16)
                    opt = adamx.adam(**tkw)
                    _stepper(opt, p)(_grads(params, 0), adamx.adam(**skw).init(params), params)

                out.append(FCase(cat, f"{sn} state -> {tn} optimizer {path}", run, r"`state` is a"))
        for dn, dt in (
            ("float16", jnp.float16),
            ("float8_e4m3fn", jnp.float8_e4m3fn),
            ("int32", jnp.int32),
            ("bool", jnp.bool_),
            ("complex64", jnp.complex64),
            ("float64 without x64", jnp.float64),
        ):
            out.append(FCase(cat, f"acc_dtype={dn} {path}", lambda dt=dt, p=path: _acc_run(dt, p), r"`acc_dtype"))
    out.append(FCase(cat, "param_rounding='up'", lambda: adamx.adam(param_rounding="up"), r"`param_rounding"))
    return out


def _acc_run(dt: Any, path: str) -> None:
    opt = adamx.adam(gradient_accumulation_steps=2, acc_dtype=dt)
    p = {"w": jnp.ones(3)}
    s = opt.init(p)
    g = {"w": jnp.full(3, 6e4)}  # float16 would overflow at 65504 on the second micro-step
    for _ in range(2):
        p, s = _stepper(opt, path)(g, s, p)
    assert bool(jnp.all(jnp.isfinite(p["w"]))), f"non-finite params {p['w']}"
    check_against_reference({"gradient_accumulation_steps": 2, "acc_dtype": dt}, np.float32, path)


# ----------------------------------------------------------------------------- 8-bit moments
Q = {"quantize_moments": True, "quantize_min_size": 64}


def _qparams() -> dict[str, jax.Array]:
    rng = np.random.default_rng(1)
    return {"big": jnp.asarray(rng.standard_normal((20, 30)).astype(f32)), "small": jnp.asarray(f32([1, 2, 3]))}


def check_8bit(kw: dict, path: str) -> None:
    """8-bit where the options say; ``update`` + ``apply_updates`` equals ``apply_gradients``."""
    opt = adamx.adam(**kw)
    p = _qparams()
    s = opt.init(p)
    assert isinstance(s.mu["big"], adamx.QuantizedArray) or kw.get("flat_state"), "mu['big'] must be 8-bit"
    assert not isinstance(s.mu["small"], adamx.QuantizedArray), "a leaf under quantize_min_size stays float"
    pu, su, pa, sa = p, s, p, s
    for i in range(3):
        g = _grads(p, i)
        u, su = opt.update(g, su, pu)
        pu = optax.apply_updates(pu, u)
        pa, sa = jax.jit(opt.apply_gradients)(g, sa, pa) if path == "apply_gradients" else (pu, su)
    for k in p:
        _close(pa[k], pu[k], f"apply_gradients vs update, {k}", rtol=1e-6)
        assert bool(jnp.all(jnp.isfinite(pu[k])))


def _quantize_cases() -> list[FCase]:
    out = []
    cat = "8-bit moments"
    for path in PATHS:
        for name, kw in (
            ("defaults", Q),
            ("amsgrad", {**Q, "amsgrad": True}),
            ("block 64", {**Q, "quantize_block_size": 64}),
            ("EMA", {**Q, "use_ema": True}),
        ):
            out.append(FCase(cat, f"{name} {path}", lambda kw=kw, p=path: check_8bit(kw, p)))
        states = {
            "8-bit state -> float32 optimizer": ({}, Q),
            "float32 state -> 8-bit optimizer": (Q, {}),
            "block 128 state -> block 256 optimizer": (Q, {**Q, "quantize_block_size": 128}),
            "min_size 64 state -> min_size 1 optimizer": ({**Q, "quantize_min_size": 1}, Q),
            "flat: min_size 64 state -> min_size 1 optimizer": (
                {**Q, "quantize_min_size": 1, "flat_state": True},
                {**Q, "flat_state": True},
            ),
            "flat 8-bit state -> tree 8-bit optimizer": (Q, {**Q, "flat_state": True}),
            "amsgrad 8-bit state -> 8-bit optimizer": (Q, {**Q, "amsgrad": True}),
        }
        for sn, (tkw, skw) in states.items():

            def run(tkw: dict = tkw, skw: dict = skw, p: str = path) -> None:
                params = _qparams()
                _stepper(adamx.adam(**tkw), p)(_grads(params, 0), adamx.adam(**skw).init(params), params)

            out.append(FCase(cat, f"{sn} {path}", run, r"state field `(mu|nu|nu_max)`|flat state field"))
        for dn, dt in (("bfloat16", jnp.bfloat16), ("float16", np.float16)):

            def run_dt(dt: Any = dt, p: str = path) -> None:
                opt = adamx.adam(**Q)
                params = jax.tree.map(lambda x: x.astype(dt), _qparams())
                pp, _ = _stepper(opt, p)(_grads(params, 0), opt.init(params), params)
                assert all(pp[k].dtype == dt and bool(jnp.all(jnp.isfinite(pp[k]))) for k in pp)

            out.append(FCase(cat, f"{dn} params {path}", run_dt))
        out.append(FCase(cat, f"int leaf beside 8-bit {path}", lambda p=path: _q_int_leaf(p)))
    out.append(
        FCase(
            cat,
            "quantize_block_size=0",
            lambda: adamx.adam(quantize_moments=True, quantize_block_size=0),
            r"`quantize_block_size",
        )
    )
    return out


def _q_int_leaf(path: str) -> None:
    opt = adamx.adam(**Q)
    p = {**_qparams(), "n": jnp.asarray([1, 2], jnp.int32)}
    g = {**_grads(_qparams(), 0), "n": np.zeros(2, jax.dtypes.float0)}
    pp, _ = _stepper(opt, path)(g, opt.init(p), p)
    assert np.array_equal(np.asarray(pp["n"]), [1, 2])


def _mixed_params() -> dict[str, jax.Array]:
    """bfloat16, float16 and float32 leaves, two of them big enough for 8-bit moments."""
    rng = np.random.default_rng(4)
    return {
        "bf16": jnp.asarray(rng.standard_normal((300,)).astype(f32), jnp.bfloat16),
        "f16": jnp.asarray(rng.standard_normal((7, 50)).astype(f32), jnp.float16),
        "f32": jnp.asarray(rng.standard_normal((2, 700)).astype(f32)),
        "tiny": jnp.asarray(f32([1.0, -2.0])),
    }


def check_bits(kw: dict, params: Callable[[], dict] = _qparams, steps: int = 6) -> None:
    """``apply_gradients`` (the fused kernel) equals jitted ``update`` + ``optax.apply_updates`` bit for
    bit: params and every state leaf, after each of ``steps`` steps."""
    opt = adamx.adam(0.01, **kw)
    p = params()
    su = sa = opt.init(p)
    pu = pa = p
    up, ap = jax.jit(opt.update), jax.jit(opt.apply_gradients)
    for i in range(steps):
        g = _grads(p, i)
        u, su = up(g, su, pu)
        pu = optax.apply_updates(pu, u)
        pa, sa = ap(g, sa, pa)
        for k in p:
            assert np.array_equal(np.asarray(pa[k]), np.asarray(pu[k])), f"step {i}, {k}: not bit-identical"
        for j, (a, b) in enumerate(zip(jax.tree.leaves(sa), jax.tree.leaves(su), strict=True)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"step {i}, state leaf {j}: not bit-identical"


def _bits_cases() -> list[FCase]:
    """The exceptions issue 19 listed to "apply_gradients equals update bit for bit"; they hold now."""
    cat = "bit identities"
    ema = {"use_ema": True, "ema_overwrite_frequency": 3}
    cases: dict[str, tuple[dict, Callable[[], dict]]] = {
        "EMA + overwrite, bf16/f16/f32 leaves": (ema, _mixed_params),
        "EMA + overwrite, flat state, bf16/f16/f32 leaves": ({**ema, "flat_state": True}, _mixed_params),
        "EMA + accumulation, bf16/f16/f32 leaves": ({**ema, "gradient_accumulation_steps": 2}, _mixed_params),
        "EMA + AMSGrad + weight decay, bf16/f16/f32 leaves": (
            {**ema, "amsgrad": True, "weight_decay": 0.01},
            _mixed_params,
        ),
        "8-bit + accumulation": ({**Q, "gradient_accumulation_steps": 2}, _qparams),
        "8-bit + accumulation, flat state": ({**Q, "gradient_accumulation_steps": 2, "flat_state": True}, _qparams),
        "8-bit, flat state + AMSGrad + EMA": ({**Q, "flat_state": True, "amsgrad": True, "use_ema": True}, _qparams),
        "8-bit + AMSGrad + EMA, bf16/f16/f32 leaves": ({**Q, "amsgrad": True, **ema}, _mixed_params),
    }
    return [
        FCase(cat, f"apply_gradients == update: {n}", lambda kw=kw, pf=pf: check_bits(kw, pf))
        for n, (kw, pf) in cases.items()
    ]


# ----------------------------------------------------------------------------- 8-bit moments on meshes
MESH_SPECS = {"rows": ("x", None), "cols": (None, "x"), "straddle": (None, "x"), "small": ()}


def _mesh_params() -> dict[str, np.ndarray]:
    """``rows`` split on axis 0 and ``cols`` on axis 1 in whole 256-blocks; ``straddle`` (768 columns
    over 2 devices: 384 each) has blocks that cross the shards; ``small`` stays float32."""
    rng = np.random.default_rng(3)
    shapes = {"rows": (8, 512), "cols": (4, 1024), "straddle": (4, 768), "small": (3,)}
    return {k: rng.standard_normal(s).astype(f32) for k, s in shapes.items()}


def _is_q(x: Any) -> bool:
    return isinstance(x, adamx.QuantizedArray)


def _mesh_opt(name: str, mesh: Any) -> Any:
    if name == "zero1":
        return adamx.sharding.zero1(adamx.adam(**Q), mesh, axis="x")
    if name == "loss scaler":
        return adamx.loss_scale_optimizer(adamx.adam(**Q), initial_scale=4.0)
    return adamx.adam(**Q)


def check_8bit_mesh(name: str, axis_type: Any, path: str, leaves: tuple[str, ...]) -> None:
    """Three jitted steps with params (and grads) split over a 2x2 mesh equal the single-device steps bit
    for bit: params and every state leaf (codes, scales, count, loss scale). zero1's single-device
    reference is ``adamx.adam`` itself (it has no reduction here)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 4:
        raise RuntimeError("needs 4 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    params = {k: v for k, v in _mesh_params().items() if k in leaves}
    grads = [{k: (v * 0.3 * (i + 1)).astype(f32)[::-1].copy() for k, v in params.items()} for i in range(3)]
    ref = _mesh_opt("adam" if name == "zero1" else name, None)
    rp, rs = jax.tree.map(jnp.asarray, params), ref.init(jax.tree.map(jnp.asarray, params))
    for g in grads:
        rp, rs = _stepper(ref, path)(jax.tree.map(jnp.asarray, g), rs, rp)
    mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(axis_type, axis_type))
    with jax.set_mesh(mesh):
        opt = _mesh_opt(name, mesh)

        def put(t: dict) -> dict:
            return {k: jax.device_put(v, NamedSharding(mesh, P(*MESH_SPECS[k]))) for k, v in t.items()}

        p = put(params)
        s = opt.init(p)
        n_q = sum(isinstance(x, adamx.QuantizedArray) for x in jax.tree.leaves(s, is_leaf=_is_q))
        assert n_q == 2 * (len(p) - 1), f"{n_q} 8-bit moments; mu and nu of every leaf but 'small' must be"
        step = _stepper(opt, path)
        for g in grads:
            p, s = step(put(g), s, p)
        for k in p:
            want_sh = NamedSharding(mesh, P(*MESH_SPECS[k]))
            assert p[k].sharding.is_equivalent_to(want_sh, p[k].ndim), f"{k}: sharding {p[k].sharding}"
    got, want = jax.tree.leaves((p, s)), jax.tree.leaves((rp, rs))
    assert len(got) == len(want), "state structure differs from the single-device one"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"leaf {i} ({a.shape}, {a.dtype}) not bit-identical"


def _mesh_cases() -> list[FCase]:
    from jax.sharding import AxisType

    out = []
    cat = "8-bit moments on meshes"
    for tn, at in (("Explicit", AxisType.Explicit), ("Auto", AxisType.Auto)):
        for name in ("adam", "zero1", "loss scaler"):
            for path in PATHS if name != "zero1" else ("update",):  # zero1 is an optax transformation
                for ln, leaves in (
                    ("whole blocks", ("rows", "cols", "small")),
                    ("straddling blocks", ("straddle", "small")),
                ):
                    out.append(
                        FCase(
                            cat,
                            f"{tn} mesh, {name}, {ln} {path}",
                            lambda n=name, a=at, p=path, lv=leaves: check_8bit_mesh(n, a, p, lv),
                        )
                    )
    return out


# ----------------------------------------------------------------------------- lazy rows
N_ROWS, ROW = 6, 2


def _lazy_params(dtype: Any = np.float32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(2)
    return {
        "emb": jnp.asarray(rng.standard_normal((N_ROWS, ROW)).astype(f32).astype(dtype)),
        "w": jnp.asarray(f32([0.5, -1.0])),
    }


def check_lazy(path: str, idx: Any, *, dtype: Any = np.float32, want_rows: list[int] | None = None) -> None:
    """Two steps with row indices ``idx`` (any integer dtype) against TF Addons' per-op LazyAdam.

    The reference reads the indices as ``BCOO.todense()`` does, in int64: ``-1`` is the last
    row, anything outside ``[-N, N)`` is ignored. ``want_rows`` (optional) must be the set of
    rows that moves; every other row stays bit for bit.
    """
    opt = adamx.lazy_adam(0.01)
    p = _lazy_params(dtype)
    s = opt.init(p)
    i64 = np.asarray(idx).astype(np.int64)
    i64 = np.where(i64 < 0, i64 + N_ROWS, i64)
    keep = (i64 >= 0) & (i64 < N_ROWS)
    rows = sorted(set(i64[keep].tolist()))
    if want_rows is not None:
        assert rows == sorted(want_rows), f"test setup: {rows} vs {want_rows}"
    m = np.zeros((N_ROWS, ROW), f32)
    v = np.zeros((N_ROWS, ROW), f32)
    table = np.asarray(p["emb"]).astype(f32)
    for t in (1, 2):
        vals = (np.arange(i64.size * ROW, dtype=f32).reshape(i64.size, ROW) * 0.1 + t).astype(dtype)
        g = {"emb": adamx.row_gradient(jnp.asarray(idx), jnp.asarray(vals), N_ROWS), "w": jnp.ones(2, f32)}
        p0 = p
        p, s = _stepper(opt, path)(g, s, p)
        untouched = [r for r in range(N_ROWS) if r not in rows]
        assert np.array_equal(np.asarray(p["emb"])[untouched], np.asarray(p0["emb"])[untouched]), "a row moved"
        if rows:
            uniq, step, m, v = tfa_lazy_adam_step(
                table, m, v, i64[keep], vals[keep].astype(f32), t, lr=0.01, b1=0.9, b2=0.999, eps=1e-7
            )
            table = table.copy()
            table[uniq] = (table[uniq] - step).astype(dtype).astype(f32)
        _close(np.asarray(p["emb"]).astype(f32), table, f"step {t} table", rtol=1e-6)


def _lazy_run(path: str, grads: Callable[[dict], dict], state: Callable[[dict], Any] | None = None) -> Callable:
    def run() -> None:
        opt = adamx.lazy_adam(0.01)
        p = _lazy_params()
        _stepper(opt, path)(grads(p), opt.init(p) if state is None else state(p), p)

    return run


def _row_g(idx: Any, n: int = N_ROWS) -> Any:
    idx = jnp.asarray(idx)
    return adamx.row_gradient(idx, jnp.ones((idx.size, ROW)), n)


def _lazy_cases() -> list[FCase]:
    out = []
    cat = "lazy rows"
    u32_big = np.asarray([2**32 - 5, 1], np.uint32)  # was cast to int32 -5 -> row 1 of 6
    for path in PATHS:
        idx_cases: dict[str, tuple[Any, list[int] | None]] = {
            "int32 rows": (np.asarray([1, 4], np.int32), None),
            "duplicates": (np.asarray([2, 2, 5], np.int32), [2, 5]),
            "negative -1 (last row)": (np.asarray([-1, 0], np.int32), [5, 0]),
            "uint8 rows": (np.asarray([3, 1], np.uint8), None),
            "uint32 rows": (np.asarray([3, 1], np.uint32), None),
            "uint32 past int32 (ignored, not wrapped)": (u32_big, [1]),
            "out of range 6 and -7 (ignored)": (np.asarray([6, -7, 2], np.int32), [2]),
            "int16 negative": (np.asarray([-2], np.int16), [4]),
        }
        for name, (idx, rows) in idx_cases.items():
            out.append(FCase(cat, f"{name} {path}", lambda p=path, i=idx, r=rows: check_lazy(p, i, want_rows=r)))
        out.append(
            FCase(
                cat,
                f"int64 past int32 (x64, ignored) {path}",
                _x64(lambda p=path: check_lazy(p, np.asarray([2**32 + 1, 3], np.int64), want_rows=[3])),
            )
        )
        out.append(
            FCase(cat, f"empty indices {path}", lambda p=path: check_lazy(p, np.zeros(0, np.int32), want_rows=[]))
        )
        for dn, dt in (("bfloat16", jnp.bfloat16), ("float16", np.float16)):
            out.append(FCase(cat, f"{dn} table {path}", lambda p=path, dt=dt: check_lazy(p, [1, 3], dtype=dt)))
        states = {
            "state of a 20-row table": lambda p: adamx.lazy_adam().init({**p, "emb": jnp.ones((20, ROW))}),
            "adam state": lambda p: adamx.adam().init(p),
            "tf1_adam state": lambda p: adamx.tf1_adam().init(p),
            "bfloat16 moments": lambda p: adamx.LazyAdamState(
                jnp.zeros([], jnp.int32), *(jax.tree.map(lambda x: x.astype(jnp.bfloat16), p),) * 2
            ),
            "float count": lambda p: adamx.lazy_adam().init(p)._replace(count=jnp.zeros([])),
            "state of another tree": lambda p: adamx.lazy_adam().init({"emb": p["emb"]}),
        }
        for sn, src in states.items():
            out.append(
                FCase(
                    cat,
                    f"{sn} {path}",
                    _lazy_run(path, lambda p: {"emb": _row_g([1]), "w": jnp.ones(2)}, src),
                    STATE_ERR,
                )
            )
        errs = {
            "int32 gradient for a float leaf": (lambda p: {"emb": _row_g([1]), "w": jnp.ones(2, jnp.int32)}, r"'w'"),
            "wrong num_rows": (lambda p: {"emb": _row_g([1], 7), "w": jnp.ones(2)}, r"'emb'"),
            "complex table": (None, r"'emb'"),
        }
        for en, (gf, rx) in errs.items():
            if gf is None:
                out.append(
                    FCase(
                        cat,
                        f"{en} {path}",
                        lambda: adamx.lazy_adam().init({"emb": jnp.ones((2, 2), jnp.complex64)}),
                        rx,
                    )
                )
            else:
                out.append(FCase(cat, f"{en} {path}", _lazy_run(path, gf), rx))
        out.append(FCase(cat, f"None gradients {path}", lambda p=path: _lazy_none(p)))
        out.append(FCase(cat, f"int leaf with float0 grad {path}", lambda p=path: _lazy_int_leaf(p)))
        out.append(
            FCase(cat, f"float64 table (x64) {path}", _x64(lambda p=path: check_lazy(p, [1, 3], dtype=np.float64)))
        )
    out += [
        FCase(cat, "chain(lazy, optax.scale(.5)) update", _lazy_chain_after, xfail=XFAIL_BCOO),
        FCase(cat, "chain(clip_by_global_norm, lazy) update", _lazy_chain_before, xfail=XFAIL_BCOO),
        FCase(cat, "MultiSteps(lazy, 2) update", _lazy_multisteps, xfail=XFAIL_BCOO),
        FCase(cat, "inject_hyperparams(lazy_adam) update", _lazy_inject),
        FCase(cat, "loss_scale_optimizer(lazy) apply_gradients", _lazy_in_loss_scale),
        FCase(cat, "lazy_adam(beta_1=1.0)", lambda: adamx.lazy_adam(beta_1=1.0), r"`beta_1`"),
        FCase(cat, "lazy_adam(epsilon_mode='x')", lambda: adamx.lazy_adam(epsilon_mode="x"), r"`epsilon_mode`"),
        FCase(
            cat,
            "row_gradient float indices",
            lambda: adamx.row_gradient(jnp.ones(2), jnp.ones((2, 2)), 4),
            r"`indices`",
        ),
    ]
    return out


def _lazy_none(path: str) -> None:
    opt = adamx.lazy_adam(0.01)
    p = _lazy_params()
    s = opt.init(p)
    p2, s2 = _stepper(opt, path)({"emb": None, "w": jnp.ones(2)}, s, p)
    assert np.array_equal(np.asarray(p2["emb"]), np.asarray(p["emb"])) and int(s2.count) == 1
    if path == "update":
        u, _ = opt.update({"emb": None, "w": jnp.ones(2)}, s, p)
        assert u["emb"].dtype == p["emb"].dtype and not bool(jnp.any(u["emb"])), "zero update, param dtype"
    assert not np.array_equal(np.asarray(p2["w"]), np.asarray(p["w"]))


def _lazy_int_leaf(path: str) -> None:
    opt = adamx.lazy_adam(0.01)
    p = {**_lazy_params(), "n": jnp.asarray([3, 4], jnp.int32)}
    s = opt.init(p)
    g = {"emb": _row_g([1]), "w": jnp.ones(2), "n": np.zeros(2, jax.dtypes.float0)}
    p2, _ = _stepper(opt, path)(g, s, p)
    assert np.array_equal(np.asarray(p2["n"]), [3, 4])


def _dense_equiv(opt_tx: Any, g_fn: Callable[[Any], Any]) -> None:
    """``opt_tx`` over lazy_adam equals lazy_adam's update with ``g_fn`` applied to the dense update."""
    p = _lazy_params()
    lazy = adamx.lazy_adam(0.01)
    g = {"emb": _row_g([1, 3]), "w": jnp.ones(2)}
    u, _ = opt_tx.update(g, opt_tx.init(p), p)
    ru, _ = lazy.update(g, lazy.init(p), p)
    got = optax.apply_updates(p, u)
    want = optax.apply_updates(p, g_fn(ru))
    for k in p:
        _close(got[k], want[k], k)


def _half_dense(u: dict) -> dict:
    return {k: (v.todense() if hasattr(v, "todense") else v) * 0.5 for k, v in u.items()}


def _lazy_chain_after() -> None:
    _dense_equiv(optax.chain(adamx.lazy_adam(0.01), optax.scale(0.5)), _half_dense)


def _lazy_chain_before() -> None:
    _dense_equiv(optax.chain(optax.clip_by_global_norm(1e6), adamx.lazy_adam(0.01)), lambda u: u)


def _lazy_multisteps() -> None:
    opt = optax.MultiSteps(adamx.lazy_adam(0.01), 1)
    _dense_equiv(opt, lambda u: u)


def _lazy_inject() -> None:
    _dense_equiv(optax.inject_hyperparams(adamx.lazy_adam)(learning_rate=0.01), lambda u: u)


def _lazy_in_loss_scale() -> None:
    opt = adamx.loss_scale_optimizer(adamx.lazy_adam(0.01), initial_scale=4.0)
    p = _lazy_params()
    g = {"emb": adamx.row_gradient(jnp.asarray([1]), jnp.full((1, ROW), 4.0), N_ROWS), "w": jnp.full(2, 4.0)}
    p2, _ = jax.jit(opt.apply_gradients)(g, opt.init(p), p)
    lazy = adamx.lazy_adam(0.01)
    g1 = {"emb": adamx.row_gradient(jnp.asarray([1]), jnp.ones((1, ROW)), N_ROWS), "w": jnp.ones(2)}
    want, _ = lazy.apply_gradients(g1, lazy.init(p), p)
    for k in p:
        assert np.array_equal(np.asarray(p2[k]), np.asarray(want[k])), k


# ----------------------------------------------------------------------------- messages
def _message_cases() -> list[FCase]:
    cat = "messages"
    return [
        FCase(cat, "tf1_adam(beta1=1.0)", lambda: adamx.tf1_adam(beta1=1.0), r"`beta1`"),
        FCase(cat, "tf1_adam(beta2=-1)", lambda: adamx.tf1_adam(beta2=-1.0), r"`beta2`"),
        FCase(cat, "tf1_adam(mu_dtype=bool)", lambda: adamx.tf1_adam(mu_dtype=jnp.bool_), r"`mu_dtype`"),
        FCase(cat, "tf1_adam(nu_dtype=int32)", lambda: adamx.tf1_adam(nu_dtype=jnp.int32), r"`nu_dtype`"),
        FCase(cat, "tf1_adam(nu_dtype=float16)", lambda: adamx.tf1_adam(nu_dtype=jnp.float16), r"`nu_dtype"),
        FCase(cat, "tf1_adam given an adam state", _tf1_wrong_state, r"`state` is a"),
        FCase(cat, "adam: int32 grad for a float leaf", lambda: _int_grad({}), r"'b'"),
        FCase(cat, "adam(flat_state): int32 grad for a float leaf", lambda: _int_grad({"flat_state": True}), r"'b'"),
    ]


def _tf1_wrong_state() -> None:
    p = _params()
    adamx.tf1_adam().update(_grads(p, 0), adamx.adam().init(p), p)


def _int_grad(kw: dict) -> None:
    opt = adamx.adam(**kw)
    p = _params()
    g = {**_grads(p, 0), "b": jnp.ones(2, jnp.int32)}
    for path in PATHS:
        _stepper(opt, path)(g, opt.init(p), p)


def all_cases() -> list[FCase]:
    return (
        _lso_cases()
        + _rounding_cases()
        + _quantize_cases()
        + _bits_cases()
        + _mesh_cases()
        + _lazy_cases()
        + _message_cases()
    )


CASES = all_cases()


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.xfail)) if c.xfail else c for c in CASES],
    ids=[f"{c.category}: {c.name}" for c in CASES],
)
def test_sweep_case(case: FCase) -> None:
    outcome, detail = classify(case)
    want = "correct" if case.error is None else "clear error"
    assert outcome == want, f"{outcome}: {detail}"
