"""The input sweep: every argument, params dtype and state/optimizer combination, classified.

Each case either gives the right numbers (checked against the per-op NumPy reference
``tests/reference_impl.py``, or a complex reference written below from optax's
convention) or fails with a ``ValueError``/``TypeError`` whose message names the argument,
the pytree path or the state field (a regex per case). Anything else is a bug: a *silent
wrong result* (accepted, but the numbers disagree with the reference, or accepted where an
error was due) or an *unclear error* (another exception, or a message that names nothing).
``tests/sweep_report.py`` runs the same cases and prints the table of docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.experimental
import jax.experimental.sparse
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamx
from tests import reference_impl

f32 = np.float32
DATA = pathlib.Path(__file__).parent / "references" / "data"


@dataclasses.dataclass(frozen=True)
class Case:
    category: str
    name: str
    run: Callable[[], None]
    error: str | None = None  # regex the error message must match; None: must run and be right


def classify(case: Case) -> tuple[str, str]:
    """``(outcome, detail)``: correct | clear error | silent wrong | unclear error."""
    try:
        with jax.numpy_dtype_promotion("strict"):
            case.run()
    except AssertionError as e:
        return "silent wrong", str(e)[:300]
    except Exception as e:  # noqa: BLE001 - classified below
        msg = f"{type(e).__name__}: {e}"
        if case.error is not None and isinstance(e, (ValueError, TypeError)) and re.search(case.error, str(e)):
            return "clear error", msg[:300]
        return "unclear error", msg[:300]
    if case.error is not None:
        return "silent wrong", f"accepted; expected an error matching {case.error!r}"
    return "correct", ""


# ----------------------------------------------------------------------------- references
SHAPES = {"a": (3, 2), "b": (4,)}
REF_KEYS = (
    "learning_rate",
    "beta_1",
    "beta_2",
    "epsilon",
    "amsgrad",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


def _inputs(dtype: Any, steps: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(f32).astype(dtype) for k, s in SHAPES.items()}
    grads = [
        {k: (rng.standard_normal(s) * 0.3).astype(f32).astype(dtype) for k, s in SHAPES.items()} for _ in range(steps)
    ]
    return params, grads


def _np(tree: Any) -> Any:
    return None if tree is None else {k: np.asarray(v).astype(f32) for k, v in tree.items()}


def _stepper(opt: Any, path: str) -> Callable:
    if path == "apply_gradients":
        return jax.jit(opt.apply_gradients)
    up = jax.jit(opt.update)

    def step(g: Any, s: Any, p: Any) -> Any:
        u, s = up(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def check_against_reference(kw: dict, dtype: Any, path: str, *, state: Any = None, x64: bool = False) -> None:
    """Teacher-forced steps of ``adamx.adam(**kw)`` against ``reference_impl.adam_step``.

    Bounds as in tests/test_adam_properties.py: one ULP of the param dtype plus a few float32
    ULPs of the operands (XLA contracts multiply-adds into FMAs). float64 params (x64) compute in
    float64 with float32 scalars, the float32 reference is then within float32 ULPs.
    """
    opt = adamx.adam(**kw)
    params, grads = _inputs(dtype)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    s = opt.init(p) if state is None else state(p)
    step = _stepper(opt, path)
    rkw = {k: v for k, v in kw.items() if k in REF_KEYS}
    for g in grads:
        ref_state = {f: _np(_field_tree(opt, s, p, f)) for f in ("mu", "nu", "nu_max", "acc", "ema")}
        ref_state["count"] = int(s.count)
        ref_p, ref_s = reference_impl.adam_step({k: np.asarray(v) for k, v in p.items()}, g, ref_state, **rkw)
        prev = p
        p, s = step({k: jnp.asarray(v) for k, v in g.items()}, s, p)
        for k in SHAPES:
            assert p[k].dtype == jnp.dtype(dtype), f"params {k} changed dtype to {p[k].dtype}"
            got, want = np.asarray(p[k]).astype(np.float64), ref_p[k].astype(np.float64)
            ulp = 0.0 if x64 else np.abs(np.spacing(ref_p[k].astype(dtype))).astype(np.float64)
            pv = np.asarray(prev[k]).astype(np.float64)
            bound = 1.01 * ulp + 8 * 2.0**-24 * (np.abs(pv) + np.abs(want - pv)) + 1e-30
            assert np.all(np.abs(got - want) <= bound), f"params {k}: {got} vs reference {want}"
            for f in ("mu", "nu"):
                a = np.asarray(_field_tree(opt, s, p, f)[k])
                # the state is stored in its dtype (mu_dtype/nu_dtype): one rounding to it
                rtol = max(1e-5, float(jnp.finfo(a.dtype).eps))
                a, b = a.astype(np.float64), ref_s[f][k].astype(np.float64)
                assert np.allclose(a, b, rtol=rtol, atol=1e-12), f"state {f} {k}: {a} vs {b}"
        assert int(s.count) == ref_s["count"] or int(s.count) == 2**31 - 1


def _field_tree(opt: Any, s: Any, p: Any, f: str) -> Any:
    """State field ``f`` as a dict like params (flat buffers unpacked)."""
    v = getattr(s, f)
    if not isinstance(v, adamx.FlatBuffers):
        return v
    leaves, treedef = jax.tree_util.tree_flatten(p)
    lay = adamx._state.layout(opt.spec, f, leaves)
    return jax.tree_util.tree_unflatten(treedef, adamx._flat.unpack(v, lay))


def complex_reference(kw: dict, p: np.ndarray, g: np.ndarray, st: dict) -> tuple[np.ndarray, dict]:
    """One Keras-form step on complex params, optax's convention: complex m, real v of |g|^2."""
    n = st["count"]
    lr, b1, b2, eps = kw.get("learning_rate", 0.001), 0.9, 0.999, 1e-7
    g = g / kw["loss_scale_factor"] if "loss_scale_factor" in kw else g
    if "clipnorm" in kw:
        norm = np.sqrt(np.sum(np.abs(g) ** 2))
        g = g * kw["clipnorm"] / max(norm, kw["clipnorm"])
    m = st["mu"] + (g - st["mu"]) * (1 - b1)
    v = st["nu"] + (np.abs(g) ** 2 - st["nu"]) * (1 - b2)
    vu = np.maximum(st["nu_max"], v) if kw.get("amsgrad") else v
    t = n + 1
    alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    u = -(m * alpha) / (np.sqrt(vu) + eps)
    if kw.get("weight_decay"):
        u = u - p * kw["weight_decay"] * lr
    return p + u, {"count": n + 1, "mu": m, "nu": v, "nu_max": vu}


def check_complex(kw: dict, dtype: Any, path: str) -> None:
    opt = adamx.adam(**kw)
    rng = np.random.default_rng(1)
    p = {"z": jnp.asarray((rng.standard_normal(5) + 1j * rng.standard_normal(5)).astype(dtype))}
    s = opt.init(p)
    assert s.mu["z"].dtype == jnp.dtype(dtype), "first moment must be complex"
    assert not jnp.iscomplexobj(s.nu["z"]), "second moment must be real"
    step = _stepper(opt, path)
    rtol = 1e-5 if dtype == np.complex64 else 1e-6  # float32 scalars (alpha, 1 - beta) also for complex128
    for i in range(3):
        g = (rng.standard_normal(5) + 1j * rng.standard_normal(5)).astype(dtype) * 0.3
        st = {"count": int(s.count), "mu": np.asarray(s.mu["z"]), "nu": np.asarray(s.nu["z"])}
        st["nu_max"] = np.asarray(s.nu_max["z"]) if s.nu_max is not None else None
        want, _ = complex_reference(kw, np.asarray(p["z"]).astype(np.complex128), g.astype(np.complex128), st)
        p, s = step({"z": jnp.asarray(g)}, s, p)
        assert p["z"].dtype == jnp.dtype(dtype)
        got = np.asarray(p["z"])
        assert np.allclose(got, want, rtol=rtol, atol=rtol), f"step {i}: {got} vs {want}"


def check_frozen(dtype: Any, path: str, kw: dict) -> None:
    """Integer/bool leaves: left alone (zero update), gradient ignored; float leaves train normally."""
    opt = adamx.adam(learning_rate=0.1, **kw)
    step_v = jnp.asarray(np.array([7, 3]).astype(dtype))
    p = {"w": jnp.ones(3), "step": step_v}
    s = opt.init(p)
    ref = adamx.adam(learning_rate=0.1, **kw)
    pr, sr = {"w": jnp.ones(3)}, ref.init({"w": jnp.ones(3)})
    for g_step in (jnp.ones(2, step_v.dtype), np.zeros(2, jax.dtypes.float0), None):
        g = {"w": jnp.full(3, 0.5), "step": g_step}
        p, s = _stepper(opt, path)(g, s, p)
        pr, sr = _stepper(ref, "update")({"w": jnp.full(3, 0.5)}, sr, pr)
        assert p["step"].dtype == step_v.dtype and np.array_equal(np.asarray(p["step"]), np.asarray(step_v))
        mu, nu = _field_tree(opt, s, p, "mu"), _field_tree(opt, s, p, "nu")
        assert not bool(jnp.any(mu["step"])) and not bool(jnp.any(nu["step"]))
        assert np.array_equal(np.asarray(p["w"]), np.asarray(pr["w"])), "the float leaf must train as without it"


def x64(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with jax.enable_x64(True):
            fn()

    return run


# ----------------------------------------------------------------------------- the cases
PATHS = ("update", "apply_gradients")
OPTION_SETS = {
    "defaults": {},
    "adamw": {"weight_decay": 0.004, "learning_rate": 0.01},
    "amsgrad+clipnorm": {"amsgrad": True, "clipnorm": 0.5, "learning_rate": 0.01},
    "global_clipnorm+lsf": {"global_clipnorm": 0.3, "loss_scale_factor": 4.0},
    "clipvalue": {"clipvalue": 0.1},
    "ema+overwrite": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 2},
    "accumulation": {"gradient_accumulation_steps": 2, "learning_rate": 0.01},
    "flat_state": {"flat_state": True, "amsgrad": True},
}
REAL_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def _params_dtype_cases() -> list[Case]:
    out = []
    for dn, dt in REAL_DTYPES.items():
        for on, kw in OPTION_SETS.items():
            for path in PATHS:
                out.append(
                    Case(
                        "params dtypes",
                        f"{dn} {on} {path}",
                        lambda kw=kw, dt=dt, path=path: check_against_reference(kw, dt, path),
                    )
                )
    for on in ("defaults", "amsgrad+clipnorm", "ema+overwrite"):
        out.append(
            Case(
                "params dtypes",
                f"float64 (x64) {on} update",
                x64(lambda kw=OPTION_SETS[on]: check_against_reference(kw, np.float64, "update", x64=True)),
            )
        )
    cplx = {
        "defaults": {},
        "adamw+amsgrad": {"weight_decay": 0.01, "amsgrad": True, "learning_rate": 0.01},
        "clipnorm+lsf": {"clipnorm": 0.2, "loss_scale_factor": 2.0},
    }
    for on, kw in cplx.items():
        for path in PATHS:
            out.append(
                Case(
                    "params dtypes", f"complex64 {on} {path}", lambda kw=kw, p=path: check_complex(kw, np.complex64, p)
                )
            )
        out.append(
            Case(
                "params dtypes", f"complex128 (x64) {on}", x64(lambda kw=kw: check_complex(kw, np.complex128, "update"))
            )
        )
    out.append(
        Case(
            "params dtypes",
            "complex64 with mu_dtype",
            lambda: adamx.adam(mu_dtype=jnp.float32).init({"z": jnp.ones(2, jnp.complex64)}),
            r"'z'.*mu_dtype",
        )
    )
    out.append(
        Case(
            "params dtypes",
            "complex64 with clipvalue",
            lambda: adamx.adam(clipvalue=1.0).init({"z": jnp.ones(2, jnp.complex64)}),
            r"'z'.*clipvalue",
        )
    )
    for dn in ("int32", "bool"):
        for on in ("defaults", "ema+overwrite", "flat_state"):
            for path in PATHS:
                out.append(
                    Case(
                        "params dtypes",
                        f"{dn} leaf {on} {path}",
                        lambda dn=dn, kw=OPTION_SETS[on], p=path: check_frozen(np.dtype(dn), p, kw),
                    )
                )

    def scalar_leaf(path: str) -> None:
        opt = adamx.adam(learning_rate=0.1)
        p, s = _stepper(opt, path)(
            {"w": 0.5, "v": np.float32(0.25)},
            opt.init({"w": 1.5, "v": np.float32(2.0)}),
            {"w": 1.5, "v": np.float32(2.0)},
        )
        ref, _ = reference_impl.adam_step(
            {"w": np.asarray(1.5, f32), "v": np.asarray(2.0, f32)},
            {"w": np.asarray(0.5, f32), "v": np.asarray(0.25, f32)},
            {
                "count": 0,
                "mu": {"w": f32(0), "v": f32(0)},
                "nu": {"w": f32(0), "v": f32(0)},
                "nu_max": None,
                "acc": None,
                "ema": None,
            },
            learning_rate=0.1,
        )
        for k in ("w", "v"):
            assert abs(float(p[k]) - float(ref[k])) <= 1e-6, (k, p[k], ref[k])

    for path in PATHS:
        out.append(Case("params dtypes", f"Python/NumPy scalar leaves {path}", lambda p=path: scalar_leaf(p)))
    return out


def _grads_cases() -> list[Case]:
    out = []
    P = {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}

    def run_update(g: Any, kw: dict | None = None, path: str = "update") -> Any:
        opt = adamx.adam(**(kw or {}))
        return _stepper(opt, path)(g, opt.init(P), P)

    bad = {
        "shape mismatch": ({"a": jnp.ones((2, 3)), "b": jnp.ones(4)}, r"'a'.*shape"),
        "missing leaf": ({"a": jnp.ones((3, 2))}, r"'b'"),
        "extra leaf": ({"a": jnp.ones((3, 2)), "b": jnp.ones(4), "c": jnp.ones(1)}, r"'c'"),
        "subtree for a leaf": ({"a": {"x": jnp.ones(1)}, "b": jnp.ones(4)}, r"'a'"),
        "list for dict": ([jnp.ones((3, 2)), jnp.ones(4)], r"grads do not match params"),
        "string leaf": ({"a": "x", "b": jnp.ones(4)}, r"'a'"),
    }
    for name, (g, err) in bad.items():
        for path in PATHS:
            for kw in ({}, {"flat_state": True}):
                out.append(
                    Case(
                        "grads",
                        f"{name} {path} {'flat' if kw else 'tree'}",
                        lambda g=g, kw=kw, p=path: run_update(g, kw, p),
                        err,
                    )
                )

    def good(g_fn: Callable[[], Any], kw: dict | None = None, path: str = "update") -> None:
        p, _ = run_update(g_fn(), kw, path)
        ref, _ = run_update({"a": jnp.full((3, 2), 0.5), "b": jnp.full(4, 0.5)}, kw, "update")
        for k in P:
            assert np.allclose(np.asarray(p[k]), np.asarray(ref[k]), rtol=1e-6), k

    for path in PATHS:
        out.append(
            Case(
                "grads",
                f"NumPy arrays {path}",
                lambda p=path: good(lambda: {"a": np.full((3, 2), 0.5, f32), "b": np.full(4, 0.5, f32)}, None, p),
            )
        )
        out.append(
            Case(
                "grads",
                f"BCOO sparse {path}",
                lambda p=path: good(
                    lambda: {"a": jax.experimental.sparse.BCOO.fromdense(jnp.full((3, 2), 0.5)), "b": jnp.full(4, 0.5)},
                    None,
                    p,
                ),
            )
        )
    return out


BAD_OPTIONS: list[tuple[str, dict]] = [
    ("learning_rate", {"learning_rate": -1.0}),
    ("learning_rate", {"learning_rate": float("nan")}),
    ("learning_rate", {"learning_rate": "0.1"}),
    ("learning_rate", {"learning_rate": jnp.ones(2)}),
    ("beta_1", {"beta_1": 1.0}),
    ("beta_1", {"beta_1": -0.1}),
    ("beta_2", {"beta_2": 1.5}),
    ("epsilon", {"epsilon": -1e-7}),
    ("epsilon", {"epsilon": lambda n: 1e-7}),
    ("amsgrad", {"amsgrad": 1}),
    ("weight_decay", {"weight_decay": -0.1}),
    ("clipnorm", {"clipnorm": 0.0}),
    ("clipvalue", {"clipvalue": -1.0}),
    ("global_clipnorm", {"global_clipnorm": float("inf")}),
    ("clipnorm", {"clipnorm": 1.0, "clipvalue": 1.0}),
    ("use_ema", {"use_ema": "yes"}),
    ("ema_momentum", {"ema_momentum": 1.5}),
    ("ema_overwrite_frequency", {"ema_overwrite_frequency": 0}),
    ("ema_overwrite_frequency", {"ema_overwrite_frequency": 1.5}),
    ("loss_scale_factor", {"loss_scale_factor": 0.0}),
    ("gradient_accumulation_steps", {"gradient_accumulation_steps": 0}),
    ("gradient_accumulation_steps", {"gradient_accumulation_steps": "2"}),
    ("exclude_from_weight_decay", {"exclude_from_weight_decay": 3}),
    ("exclude_from_weight_decay", {"exclude_from_weight_decay": ["("]}),
    ("flat_state", {"flat_state": 1}),
    ("name", {"name": 3}),
    ("unknown", {"nesterov": True}),
    ("mu_dtype", {"mu_dtype": "float8_e4m3fn"}),
    ("mu_dtype", {"mu_dtype": jnp.int8}),
    ("mu_dtype", {"mu_dtype": "no_such_dtype"}),
    ("mu_dtype", {"mu_dtype": jnp.complex64}),
    ("nu_dtype", {"nu_dtype": jnp.float16}),
    ("nu_dtype", {"nu_dtype": jnp.float8_e5m2}),
    ("nu_dtype", {"nu_dtype": bool}),
]
GOOD_OPTIONS: dict[str, dict] = {
    "learning_rate=0.05": {"learning_rate": 0.05},
    "beta_1=0.5, beta_2=0.9": {"beta_1": 0.5, "beta_2": 0.9},
    "epsilon=1e-3": {"epsilon": 1e-3},
    "epsilon=0": {"epsilon": 0.0},
    "weight_decay=0": {"weight_decay": 0.0},
    "clipvalue": {"clipvalue": 0.05},
    "ema_momentum=0": {"use_ema": True, "ema_momentum": 0.0},
    "ema_overwrite_frequency=1": {"use_ema": True, "ema_overwrite_frequency": 1},
    "gradient_accumulation_steps=1": {"gradient_accumulation_steps": 1},
    "gradient_accumulation_steps=3": {"gradient_accumulation_steps": 3},
    "numpy scalars": {"learning_rate": np.float32(0.01), "gradient_accumulation_steps": np.int64(2)},
    "mu_dtype=bfloat16": {"mu_dtype": jnp.bfloat16},
    "mu_dtype=float16": {"mu_dtype": jnp.float16},
}


def _moment_dtype_ok(kw: dict, path: str) -> None:
    opt = adamx.adam(learning_rate=0.01, **kw)
    p = {"w": jnp.linspace(-1, 1, 6)}
    s = opt.init(p)
    for f, want in (("mu", kw.get("mu_dtype")), ("nu", kw.get("nu_dtype"))):
        assert getattr(s, f)["w"].dtype == jnp.dtype(want or jnp.float32), f
    p2, _ = _stepper(opt, path)({"w": jnp.full(6, 0.3)}, s, p)
    ref, _ = _stepper(adamx.adam(learning_rate=0.01), "update")({"w": jnp.full(6, 0.3)}, adamx.adam().init(p), p)
    # one step from zero moments: the moments round to their dtype, the step within its relative precision
    assert np.allclose(np.asarray(p2["w"]), np.asarray(ref["w"]), rtol=0, atol=0.01 * 2**-7)


def _option_cases() -> list[Case]:
    out = []
    for arg, kw in BAD_OPTIONS:
        err = r"unknown option" if arg == "unknown" else re.escape(f"`{arg}")
        out.append(
            Case(
                "options",
                f"adam({', '.join(f'{k}={v!r}' for k, v in kw.items())})"[:80],
                lambda kw=kw: adamx.adam(**kw),
                err,
            )
        )
        if arg not in ("unknown",):
            out.append(
                Case(
                    "options",
                    f"adamw({', '.join(f'{k}={v!r}' for k, v in kw.items())})"[:80],
                    lambda kw=kw: adamx.adamw(**kw),
                    err,
                )
            )
    out.append(Case("options", "adamw(weight_decay=None)", lambda: adamx.adamw(weight_decay=None), r"weight_decay"))
    out.append(
        Case(
            "options", "scale_by_adam(epsilon_mode='x')", lambda: adamx.scale_by_adam(epsilon_mode="x"), r"epsilon_mode"
        )
    )
    out.append(Case("options", "scale_by_adam(b1=2)", lambda: adamx.scale_by_adam(b1=2.0), r"beta_1"))
    out.append(
        Case("options", "tf1_adam(learning_rate=-1)", lambda: adamx.tf1_adam(learning_rate=-1.0), r"learning_rate")
    )
    for name, kw in GOOD_OPTIONS.items():
        for path in PATHS:
            if "dtype" in name:
                out.append(Case("options", f"{name} {path}", lambda kw=kw, p=path: _moment_dtype_ok(kw, p)))
            else:
                out.append(
                    Case("options", f"{name} {path}", lambda kw=kw, p=path: check_against_reference(kw, np.float32, p))
                )
    out.append(
        Case("options", "nu_dtype=bfloat16 update", lambda: _moment_dtype_ok({"nu_dtype": jnp.bfloat16}, "update"))
    )
    out.append(
        Case(
            "options",
            "mu/nu float64 (x64)",
            x64(lambda: _moment_dtype_ok({"mu_dtype": jnp.float64, "nu_dtype": jnp.float64}, "update")),
        )
    )
    return out


STATE_SOURCES: dict[str, Callable[[Any], Any]] = {
    "adam()": lambda p: adamx.adam().init(p),
    "adam(amsgrad)": lambda p: adamx.adam(amsgrad=True).init(p),
    "adam(use_ema)": lambda p: adamx.adam(use_ema=True).init(p),
    "adam(accumulation)": lambda p: adamx.adam(gradient_accumulation_steps=2).init(p),
    "adam(flat_state)": lambda p: adamx.adam(flat_state=True).init(p),
    "adam(mu_dtype=bf16)": lambda p: adamx.adam(mu_dtype=jnp.bfloat16).init(p),
    "adam() of other shapes": lambda p: adamx.adam().init(jax.tree.map(lambda x: jnp.ones((x.size + 1,)), p)),
    "adam() of another tree": lambda p: adamx.adam().init({**p, "extra": jnp.ones(2)}),
    "adam(flat_state) of other params": lambda p: adamx.adam(flat_state=True).init({"a": jnp.ones(5)}),
    "scale_by_adam": lambda p: adamx.scale_by_adam().init(p),
    "tf1_adam": lambda p: adamx.tf1_adam().init(p),
    "optax.adam": lambda p: optax.adam(1e-3).init(p),
    "empty tuple": lambda p: (),
}
STATE_TARGETS = {
    "adam()": {},
    "adam(amsgrad)": {"amsgrad": True},
    "adam(use_ema)": {"use_ema": True},
    "adam(accumulation)": {"gradient_accumulation_steps": 2},
    "adam(flat_state)": {"flat_state": True},
    "adam(mu_dtype=bf16)": {"mu_dtype": jnp.bfloat16},
}
STATE_ERROR = r"state field `(count|mu|nu|nu_max|acc|ema)`|`state` is a"


def _state_cases() -> list[Case]:
    out = []
    for tn, tkw in STATE_TARGETS.items():
        for sn, src in STATE_SOURCES.items():
            for path in PATHS:
                if sn == tn:
                    run = lambda tkw=tkw, src=src, p=path: check_against_reference(tkw, np.float32, p, state=src)  # noqa: E731
                    out.append(Case("state vs optimizer", f"{sn} state -> {tn} {path}", run))
                else:

                    def run(tkw: dict = tkw, src: Callable = src, p: str = path) -> None:
                        opt = adamx.adam(**tkw)
                        params = {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}
                        _stepper(opt, p)(params, src(params), params)

                    out.append(Case("state vs optimizer", f"{sn} state -> {tn} {path}", run, STATE_ERROR))
    # tree state without params: checked against mu
    out.append(
        Case(
            "state vs optimizer",
            "adam(amsgrad) state -> adam() update without params",
            lambda: adamx.adam().update({"w": jnp.ones(2)}, adamx.adam(amsgrad=True).init({"w": jnp.ones(2)})),
            STATE_ERROR,
        )
    )
    return out


def _config_cases() -> list[Case]:
    out = []
    refs = json.loads((DATA / "other_optimizer_configs.json").read_text())
    for cls, d in sorted(refs.items()):
        if cls.startswith("_"):
            continue
        for form in ("config", "serialized"):
            cfg = d[form]
            if cls in ("Adam", "AdamW"):

                def ok(cfg: dict = cfg) -> None:
                    opt = adamx.from_keras_config(cfg)
                    assert abs(float(opt.spec.learning_rate) - 0.01) < 1e-8
                    check_against_reference(dict(opt.spec.hyperparams, name="x"), np.float32, "update")

                out.append(Case("Keras configs", f"{cls} {form}", ok))
            else:
                out.append(
                    Case("Keras configs", f"{cls} {form}", lambda cfg=cfg: adamx.from_keras_config(cfg), re.escape(cls))
                )
    nadam = dict(refs["Nadam"]["config"], name="my_optimizer")
    out.append(Case("Keras configs", "Nadam config renamed", lambda: adamx.from_keras_config(nadam), r"Nadam"))
    lion = dict(refs["Lion"]["config"], name="my_optimizer")
    out.append(Case("Keras configs", "Lion config renamed", lambda: adamx.from_keras_config(lion), r"Lion"))
    legacy = {"name": "Nadam", "learning_rate": 0.001, "decay": 0.004, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
    out.append(Case("Keras configs", "tf.keras Nadam (legacy)", lambda: adamx.from_keras_config(legacy), r"Nadam"))
    out.append(Case("Keras configs", "not a dict", lambda: adamx.from_keras_config([1]), r"`config`"))
    out.append(
        Case(
            "Keras configs", "unknown key", lambda: adamx.from_keras_config({"learning_rate": 0.1, "foo": 1}), r"'foo'"
        )
    )
    return out


COUNT_OPTIONS = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "accumulation 2": {"gradient_accumulation_steps": 2},
    "accumulation 3": {"gradient_accumulation_steps": 3},
    "ema overwrite 2": {"use_ema": True, "ema_overwrite_frequency": 2},
    "flat_state": {"flat_state": True},
}


def _count_cases() -> list[Case]:
    out = []
    imax = 2**31 - 1

    def at_max(kw: dict) -> Callable[[Any], Any]:
        def build(p: Any) -> Any:
            s = adamx.adam(**kw).init(p)
            return s._replace(count=jnp.asarray(imax, jnp.int32))

        return build

    for name, kw in COUNT_OPTIONS.items():
        for path in PATHS:
            out.append(
                Case(
                    "extreme counts",
                    f"count = int32 max, {name} {path}",
                    lambda kw=kw, p=path: check_against_reference(kw, np.float32, p, state=at_max(kw)),
                )
            )

    def sba_max() -> None:
        tx = adamx.scale_by_adam()
        s = tx.init({"w": jnp.ones(2)})._replace(count=jnp.asarray(imax, jnp.int32))
        u, s = tx.update({"w": jnp.ones(2)}, s)
        assert bool(jnp.all(jnp.isfinite(u["w"]))) and int(s.count) == imax

    out.append(Case("extreme counts", "scale_by_adam at int32 max", sba_max))
    return out


def _none_cases() -> list[Case]:
    out = []

    def readme_loop(kw: dict, path: str) -> None:
        opt = adamx.adam(learning_rate=0.1, **kw)
        params = {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}
        state = opt.init(params)
        step = _stepper(opt, path)
        ref = adamx.adam(learning_rate=0.1, **kw)
        pa = {"a": jnp.ones((3, 2))}
        sa = ref.init(pa)
        for _ in range(3):
            params, state = step({"a": jnp.full((3, 2), 0.5), "b": None}, state, params)
            pa, sa = _stepper(ref, "update")({"a": jnp.full((3, 2), 0.5)}, sa, pa)
        assert np.array_equal(np.asarray(params["b"]), np.ones(4)), "b has no gradient: it must not move"
        assert np.allclose(np.asarray(params["a"]), np.asarray(pa["a"]), rtol=1e-6), "a trains as without b"
        assert not bool(jnp.any(state.nu["b"] if not kw.get("flat_state") else 0))

    for name, kw in {
        "defaults": {},
        "ema": {"use_ema": True},
        "accumulation": {"gradient_accumulation_steps": 2},
        "flat_state": {"flat_state": True},
    }.items():
        for path in PATHS:
            out.append(Case("None gradients", f"README loop, {name} {path}", lambda kw=kw, p=path: readme_loop(kw, p)))
    return out


INJECTABLE = {
    "learning_rate": {"learning_rate": 0.05},
    "beta_1": {"beta_1": 0.8},
    "beta_2": {"beta_2": 0.99},
    "epsilon": {"epsilon": 1e-4},
    "weight_decay": {"weight_decay": 0.01},
    "clipnorm": {"clipnorm": 0.3},
    "clipvalue": {"clipvalue": 0.1},
    "global_clipnorm": {"global_clipnorm": 0.3},
    "ema_momentum": {"use_ema": True, "ema_momentum": 0.9},
    "ema_overwrite_frequency": {"use_ema": True, "ema_overwrite_frequency": 2},
    "loss_scale_factor": {"loss_scale_factor": 8.0},
    "gradient_accumulation_steps=1": {"gradient_accumulation_steps": 1},
    "gradient_accumulation_steps=2": {"gradient_accumulation_steps": 2},
}


def _wrapper_cases() -> list[Case]:
    out = []

    def injected(kw: dict, path: str) -> None:
        opt = optax.inject_hyperparams(adamx.adam, hyperparam_dtype=jnp.float32)(**kw)
        plain = adamx.adam(**kw)
        params, grads = _inputs(np.float32, 4)
        p = q = {k: jnp.asarray(v) for k, v in params.items()}
        s, sq = opt.init(p), plain.init(q)
        up = jax.jit(opt.update)
        for g in grads:
            g = {k: jnp.asarray(v) for k, v in g.items()}
            u, s = up(g, s, p)
            p = optax.apply_updates(p, u)
            q, sq = _stepper(plain, path)(g, sq, q)
            for k in SHAPES:
                # traced betas round 1 - beta on device (TF1 rounding), concrete ones in double (Keras)
                assert np.allclose(np.asarray(p[k]), np.asarray(q[k]), rtol=1e-5, atol=1e-6), (k, p[k], q[k])

    for name, kw in INJECTABLE.items():
        for path in PATHS:
            out.append(
                Case("wrappers", f"inject_hyperparams {name} vs plain {path}", lambda kw=kw, p=path: injected(kw, p))
            )

    def chained(path: str) -> None:
        opt = optax.chain(optax.clip(1.0), adamx.adam(0.1))
        p = {"w": jnp.ones(3)}
        s = opt.init(p)
        u, s = jax.jit(opt.update)({"w": jnp.full(3, 0.5)}, s, p)
        want, _ = _stepper(adamx.adam(0.1), path)({"w": jnp.full(3, 0.5)}, adamx.adam(0.1).init(p), p)
        assert np.allclose(np.asarray(optax.apply_updates(p, u)["w"]), np.asarray(want["w"]), rtol=1e-6)

    for path in PATHS:
        out.append(Case("wrappers", f"optax.chain {path}", lambda p=path: chained(p)))
    return out


def _other_transform_cases() -> list[Case]:
    out = []

    def sba_complex(kw: dict) -> None:
        rng = np.random.default_rng(3)
        tx = optax.chain(adamx.scale_by_adam(epsilon_mode="paper", eps=1e-8, **kw), optax.scale(-0.01))
        ref = optax.adam(0.01)
        p = q = {"z": jnp.asarray((rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64))}
        s, sr = tx.init(p), ref.init(q)
        for _ in range(4):
            g = {"z": jnp.asarray((rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64))}
            u, s = tx.update(g, s, p)
            with jax.numpy_dtype_promotion("standard"):  # optax's own complex Adam promotes implicitly
                ur, sr = ref.update(g, sr, q)
            p, q = optax.apply_updates(p, u), optax.apply_updates(q, ur)
        assert np.allclose(np.asarray(p["z"]), np.asarray(q["z"]), rtol=1e-5), (p, q)

    out.append(Case("other transformations", "scale_by_adam(paper) complex64 vs optax.adam", lambda: sba_complex({})))

    def tf1_dtype(dt: Any) -> None:
        opt = adamx.tf1_adam(learning_rate=0.01)
        p = {"w": jnp.ones(3, dt)}
        u, _ = opt.update({"w": jnp.full(3, 0.5, dt)}, opt.init(p), p)
        # first TF1 step: lr * sqrt(1-b2)/(1-b1) * m / (sqrt(v) + eps) with m = 0.05, v = 0.00025 -> ~ lr
        assert u["w"].dtype == jnp.dtype(dt)
        assert np.allclose(np.asarray(u["w"]).astype(np.float64), -0.01, rtol=2e-2 if dt != np.float32 else 1e-5)

    for dn, dt in REAL_DTYPES.items():
        out.append(Case("other transformations", f"tf1_adam {dn}", lambda dt=dt: tf1_dtype(dt)))

    def lso_wrong_state() -> None:
        opt = adamx.loss_scale_optimizer(adamx.adam(amsgrad=True))
        p = {"w": jnp.ones(2)}
        s = opt.init(p)
        s = s._replace(inner_state=adamx.adam().init(p))
        opt.update({"w": jnp.ones(2)}, s, p)

    out.append(
        Case("other transformations", "loss_scale_optimizer with a wrong inner state", lso_wrong_state, STATE_ERROR)
    )
    return out


def all_cases() -> list[Case]:
    return (
        _params_dtype_cases()
        + _grads_cases()
        + _option_cases()
        + _state_cases()
        + _config_cases()
        + _count_cases()
        + _none_cases()
        + _wrapper_cases()
        + _other_transform_cases()
    )


CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}: {c.name}" for c in CASES])
def test_sweep_case(case: Case) -> None:
    outcome, detail = classify(case)
    want = "correct" if case.error is None else "clear error"
    assert outcome == want, f"{case.category} / {case.name}: {outcome}: {detail}"
