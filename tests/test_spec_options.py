"""The spec's per-field table (``adamx._spec.Option``): every field decides its validation, config
key and fused-kernel support once, and validation, configs, ``AdamOptions`` and the plan read it."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import typing

import jax
import jax.numpy as jnp
import ml_dtypes
import pytest

import adamx
from adamx import _spec
from adamx.fused import _build, _plan

TABLE = _spec.options_table()
CONFIG_FIELDS = [name for name, opt in TABLE.items() if opt.config != "none"]
NO_CONFIG_FIELDS = [name for name, opt in TABLE.items() if opt.config == "none"]


def _with_example(name: str) -> dict[str, object]:
    """The options that set ``name`` to its example (and switch on the field it needs)."""
    opt = TABLE[name]
    kwargs: dict[str, object] = {name: opt.example}
    if opt.only_with is not None:
        kwargs[opt.only_with] = True
    return kwargs


# ---------------------------------------------------------------- one table
def test_every_field_has_an_option_with_a_kernel_decision():
    names = [f.name for f in dataclasses.fields(adamx.AdamSpec)]
    assert list(TABLE) == names
    for name, opt in TABLE.items():
        assert opt.fused in _plan.DECISIONS, f"{name}: unknown kernel decision {opt.fused!r}"
        assert opt.config != "none" or opt.no_config, f"{name}: say what to do instead of a config key"
    assert set(_spec._WRITERS) == set(typing.get_args(_spec.Kind)), "a config writer for every kind"
    # the plan's table is the spec's decisions: "fallback" fields are the ones it leaves out
    assert set(_plan.SUPPORTED) == {name for name, opt in TABLE.items() if opt.fused != "fallback"}


def test_a_field_added_without_an_option_fails_this_test_not_a_user():
    @dataclasses.dataclass(frozen=True, eq=False)
    class Extended(adamx.AdamSpec):
        nesterov: bool = False

    with pytest.raises(TypeError, match="`nesterov` has no Option.*fused-kernel decision"):
        _spec.options_table(Extended)


def test_a_new_bool_option_is_written_and_falls_back_until_the_kernel_learns_it():
    """The recipe of docs/architecture.md: a new field declared with its Option needs no other
    edit to be validated, written into configs and refused by the kernel."""

    @dataclasses.dataclass(frozen=True, eq=False)
    class Extended(adamx.AdamSpec):
        nesterov: bool = _spec.option(
            False, kind="flag", check=_spec._flag, config="adamx", fused="fallback", example=True
        )

    spec = Extended(nesterov=True)
    assert spec.keras_config(include_adamx=True)["nesterov"] is True
    with pytest.raises(ValueError, match=r"no key for \['nesterov'\]"):
        spec.keras_config()
    with pytest.raises(TypeError, match="`nesterov` must be a bool"):
        Extended(nesterov=1)
    assert "nesterov" in (_plan.unsupported_option(spec) or "")
    assert _plan.unsupported_option(Extended()) is None


def test_adam_options_are_the_keyword_fields():
    keyword = {name for name, opt in TABLE.items() if opt.keyword}
    assert set(_spec.AdamOptions.__annotations__) == keyword
    named = set(inspect.signature(adamx.adam).parameters) - {"options"}
    assert keyword == set(TABLE) - named
    assert named - {"name"} == set(inspect.signature(adamx.adamw).parameters) - {"options", "name"}


def test_keras_keys_are_the_keras_fields():
    assert set(_spec.KERAS3_KEYS) == {name for name, opt in TABLE.items() if opt.config == "keras"}
    assert set(_spec.ADAMX_KEYS) == {name for name, opt in TABLE.items() if opt.config == "adamx"}


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("name", CONFIG_FIELDS)
def test_every_field_round_trips_through_a_config(name):
    opt = TABLE[name]
    tx = adamx.adam(**_with_example(name))
    default = adamx.AdamSpec.__dataclass_fields__[name].default
    assert getattr(tx.spec, name) != default, "the example must not be the default"
    if opt.config == "keras":
        cfg = tx.get_config()
    else:
        if name != "flat_state":  # a storage layout: left out of Keras's config, not refused
            with pytest.raises(ValueError, match=f"no key for .*'{name}'.*include_adamx"):
                tx.get_config()
        cfg = adamx.to_keras_config(tx, include_adamx=True)
    assert cfg[name] == opt.to_config(opt.example)
    back = adamx.from_keras_config(cfg)
    assert opt.to_config(getattr(back.spec, name)) == cfg[name]
    assert adamx.to_keras_config(back, include_adamx=True) == cfg


@pytest.mark.parametrize("name", NO_CONFIG_FIELDS)
def test_a_field_without_a_config_key_is_refused_naming_it(name):
    tx = adamx.adam(**_with_example(name))
    for include in (False, True):
        with pytest.raises(ValueError, match=f"`{name}` cannot be written into a config; {TABLE[name].no_config}"):
            adamx.to_keras_config(tx, include_adamx=include)


def test_quantize_sizes_are_written_only_with_quantize_moments():
    cfg = adamx.to_keras_config(adamx.adam(quantize_block_size=128), include_adamx=True)
    assert "quantize_block_size" not in cfg
    cfg = adamx.to_keras_config(adamx.adam(quantize_moments=True), include_adamx=True)
    assert (cfg["quantize_block_size"], cfg["quantize_min_size"]) == (256, 4096)


# ---------------------------------------------------------------- acc_dtype (issue 19)
def test_float16_accumulator_is_refused_saying_why():
    with pytest.raises(ValueError, match=r"`acc_dtype=float16` would overflow silently.*65504.*bfloat16"):
        adamx.adam(gradient_accumulation_steps=2, acc_dtype=jnp.float16)


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_float8_accumulator_is_refused(dtype):
    with pytest.raises(ValueError, match=rf"`acc_dtype={jnp.dtype(dtype).name}` cannot hold a sum of gradients"):
        adamx.adam(gradient_accumulation_steps=2, acc_dtype=dtype)


def test_float64_accumulator_needs_x64_and_says_so():
    assert not jax.config.read("jax_enable_x64")
    with pytest.raises(ValueError, match=r"`acc_dtype=float64` needs 64-bit JAX.*jax_enable_x64"):
        adamx.adam(gradient_accumulation_steps=2, acc_dtype=jnp.float64)
    with jax.enable_x64(True):
        opt = adamx.adam(gradient_accumulation_steps=2, acc_dtype=jnp.float64)
        state = opt.init({"w": jnp.ones((3,), jnp.float32)})
        assert state.acc["w"].dtype == jnp.float64


# ---------------------------------------------------------------- fallback warnings
def _fallback_warnings(caplog):
    return [r for r in caplog.records if r.name == "adamx" and r.levelno == logging.WARNING]


def test_a_fallback_warns_once_per_reason(monkeypatch, caplog):
    monkeypatch.setattr(adamx.fused, "_warned", set())
    params = {"w": jnp.ones((4,), jnp.float32)}
    opt = adamx.adam(learning_rate=0.1, mu_dtype=jnp.float16)  # a moment dtype the kernel does not keep
    state = opt.init(params)
    reason = adamx.fused.why_not(opt, params, state, params)
    assert reason is not None and "mu_dtype" in reason
    with caplog.at_level(logging.WARNING, logger="adamx"):
        for _ in range(3):
            params, state = opt.apply_gradients(params, state, params)
        (record,) = _fallback_warnings(caplog)
        assert reason in record.getMessage()
        other = adamx.adam(learning_rate=0.1, mu_dtype=jnp.float16, nu_dtype=jnp.bfloat16)
        other.apply_gradients(params, other.init(params), params)  # the same reason: no second warning
        assert len(_fallback_warnings(caplog)) == 1


def test_an_unavailable_kernel_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(adamx.fused, "_warned", set())
    monkeypatch.setitem(_build._status, "tried", True)
    monkeypatch.setitem(_build._status, "ok", False)
    monkeypatch.setitem(_build._status, "error", "switched off by the test")
    params = {"w": jnp.ones((4,), jnp.float32)}
    opt = adamx.adam(learning_rate=0.1)
    state = opt.init(params)
    with caplog.at_level(logging.WARNING, logger="adamx"):
        for _ in range(2):
            params, state = opt.apply_gradients(params, state, params)
    (record,) = _fallback_warnings(caplog)
    assert "kernel unavailable: switched off by the test" in record.getMessage()
