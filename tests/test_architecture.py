"""The codebase's structure: imports point downward, one spec, the kernel's options and layout.

See docs/architecture.md for the map these tests keep true.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import jax.numpy as jnp
import pytest

import adamx
from adamx import _step
from adamx.fused import _build, _plan

PKG = pathlib.Path(adamx.__file__).parent

# Bottom to top: a module may import only modules of a lower layer (or of its own layer's
# earlier entries, listed in order). adamx/__init__.py, the public face, sits above all.
LAYERS = [
    ["adamx._types", "adamx._hyper", "adamx._tree", "adamx.schedules"],
    [
        "adamx._quantize",
        "adamx._lowbit",
        "adamx._codecs",
        "adamx._flat",
        "adamx._clipping",
        "adamx._decay",
        "adamx._moments",
        "adamx._averaging",
        "adamx._rounding",
    ],
    ["adamx._spec"],
    ["adamx._state", "adamx._checks"],
    ["adamx._step"],
    [
        "adamx.fused._build",
        "adamx.fused._plan",
        "adamx.fused._kernel",
        "adamx.fused._pallas",
        "adamx.fused",
        "adamx.fused.__main__",
    ],
    ["adamx._adam"],
    ["adamx._tf1", "adamx._lazy", "adamx._loss_scale"],
    ["adamx._config", "adamx.sharding"],
]
ORDER = {m: i for i, m in enumerate(m for layer in LAYERS for m in layer)}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _adamx_imports(path: pathlib.Path) -> set[str]:
    """Every adamx module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adamx"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in ORDER else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("adamx"))
    return out


def test_every_module_is_placed_in_a_layer():
    modules = {_module_name(p) for p in PKG.rglob("*.py")} - {"adamx"}
    assert modules == set(ORDER), "add new modules to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize("module", sorted(ORDER))
def test_imports_point_downward(module):
    path = PKG.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for dep in _adamx_imports(path):
        if dep == "adamx.fused" and module.startswith("adamx.fused."):
            continue  # the subpackage's own modules import each other through it
        assert dep in ORDER, f"{module} imports {dep}, which is not placed in LAYERS"
        assert ORDER[dep] < ORDER[module], f"{module} imports {dep} from above it (a hidden circle)"


def test_the_optimizer_carries_its_spec():
    opt = adamx.adam(learning_rate=0.01, gradient_accumulation_steps=3, amsgrad=True, mu_dtype=jnp.bfloat16)
    assert isinstance(opt.spec, adamx.AdamSpec)
    assert opt.spec.window == 3 and opt.spec.fields_on == ("mu", "nu", "nu_max", "acc")
    assert opt.spec.state_dtype("mu", jnp.float32) == jnp.bfloat16
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.spec.learning_rate = 0.1  # type: ignore[misc]
    # survives what optax does to transformations: rebuilding the NamedTuple from its fields
    rebuilt = type(opt)(*opt)
    assert rebuilt.spec is opt.spec
    # unknown options are refused by name
    with pytest.raises(TypeError, match="bogus_option"):
        adamx.adam(bogus_option=1)  # type: ignore[call-arg]
    # a changed copy is validated again
    with pytest.raises(ValueError, match="beta_1"):
        dataclasses.replace(opt.spec, beta_1=1.5)


def test_kernel_supports_or_refuses_every_spec_option(monkeypatch):
    """Each spec field is listed in the kernel's SUPPORTED table; an unlisted one falls back."""
    assert set(_plan.SUPPORTED) == {f.name for f in dataclasses.fields(adamx.AdamSpec)}
    params = {"w": jnp.ones(4)}
    opt = adamx.adam(learning_rate=0.1, amsgrad=True)
    state = opt.init(params)
    assert _plan.unsupported_option(opt.spec) is None
    # pretend amsgrad were a new option the kernel has not learned: it must fall back, naming it
    monkeypatch.delitem(_plan.SUPPORTED, "amsgrad")
    reason = adamx.fused.why_not(opt, params, state, params)
    assert reason is not None and "amsgrad" in reason
    p_fused, _ = opt.apply_gradients(params, state, params)
    u, _ = opt.update(params, state, params)
    assert jnp.array_equal(p_fused["w"], params["w"] + u["w"])
    # at its default value an unlisted option does not matter
    assert _plan.unsupported_option(adamx.adam().spec) is None


def test_kernel_scalar_layout_is_checked_at_load():
    _build.check_layout(",".join(_step.Scalars._fields) + ",")
    with pytest.raises(RuntimeError, match="scalar layout"):
        _build.check_layout("c2,c1," + ",".join(_step.Scalars._fields[2:]))
    if adamx.fused.available():  # the loaded kernel passed the same check
        lib = _build._status["lib"]
        assert lib.adamx_fused_scalar_names().decode().split(",")[:-1] == list(_step.Scalars._fields)


def test_kernel_is_built_with_warnings_on(monkeypatch):
    monkeypatch.setenv("ADAMX_KERNEL_WERROR", "1")
    assert {"-Wall", "-Wextra", "-Werror"} <= set(_build.flags())
    monkeypatch.setenv("ADAMX_KERNEL_WERROR", "0")
    assert "-Werror" not in _build.flags() and "-Wall" in _build.flags()
    assert pathlib.Path(_build.SOURCE).is_file() and _build.SOURCE.endswith("kernel.cc")
