"""Replay the stored real-Keras trajectories (tests/references/) through jitted adamx.

The fixtures were made by ``tests/references/make_keras_refs.py``: keras 3.15.1 on the
JAX backend, eager ``optimizer.apply`` step by step, per-op rounding. adamx runs under
``jax.jit``, where XLA contracts multiply-adds into FMAs and turns ``x / scalar`` into
``x * (1/scalar)``. SEMANTICS.md 1.16 measured that difference for Keras's own jitted
path at up to 4.8e-7 absolute on params of magnitude 1-3 over 25 steps; we allow
1e-6 absolute + 1e-6 relative on params, moments and averages, at every step.
"""

import glob
import json
import os

import jax
import numpy as np
import optax
import pytest

import adamx
from tests.conftest import REFERENCE_DIR

ATOL = 1e-6
RTOL = 1e-6


def _load(name):
    with open(os.path.join(REFERENCE_DIR, name + ".json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(REFERENCE_DIR, name + ".npz"))


def _cases(dtype="float32"):
    out = []
    for path in sorted(glob.glob(os.path.join(REFERENCE_DIR, "keras_*.json"))):
        name = os.path.basename(path)[:-5]
        if name == "keras_configs":
            continue
        with open(path) as f:
            meta = json.load(f)
        if meta["dtype"] == dtype:
            out.append(name)
    return out


def _build(meta):
    kwargs = dict(meta["kwargs"])
    if isinstance(kwargs.get("learning_rate"), dict):
        kwargs["learning_rate"] = adamx.schedules.deserialize(kwargs["learning_rate"])
    if meta.get("exclude_from_weight_decay"):
        # Keras: optimizer.exclude_from_weight_decay(var_names=[...]), a regex search in the
        # variable name; adamx searches the key path "dense/bias", which contains it
        kwargs["exclude_from_weight_decay"] = meta["exclude_from_weight_decay"]["var_names"]
    if meta["optimizer"].endswith("AdamW"):
        return adamx.adamw(**kwargs)
    return adamx.adam(**kwargs)


def _run(opt, data, keys, dtype, n_steps):
    params = {k: jax.numpy.asarray(data[f"params/{k}"][0], dtype) for k in keys}
    state = opt.init(params)
    step = jax.jit(opt.update)
    traj = []
    for t in range(n_steps):
        grads = {k: jax.numpy.asarray(data[f"grads/{k}"][t], dtype) for k in keys}
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        traj.append((params, state))
    return traj


def test_fixtures_are_present():
    assert len(_cases()) >= 25, "run tests/references/make_keras_refs.py"


@pytest.mark.parametrize("name", _cases())
def test_adamx_replays_keras(name):
    meta, data = _load(name)
    keys = meta["param_keys"]
    opt = _build(meta)
    traj = _run(opt, data, keys, np.float32, meta["n_steps"])
    slot = {"m": "mu", "v": "nu", "vhat": "nu_max", "ema": "ema", "accum": "acc"}
    checked = set()
    for t, (params, state) in enumerate(traj):
        for k in keys:
            np.testing.assert_allclose(
                np.asarray(params[k]),
                data[f"params/{k}"][t + 1],
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"{name} step {t + 1} {k}",
            )
            for ks, field in slot.items():
                if f"{ks}/{k}" not in data.files:
                    continue
                want = data[f"{ks}/{k}"][t]
                np.testing.assert_allclose(
                    np.asarray(getattr(state, field)[k]),
                    want,
                    rtol=RTOL,
                    atol=ATOL,
                    err_msg=f"{name} step {t + 1} {ks} {k}",
                )
                checked.add(ks)
    assert {"m", "v"} <= checked
    if any(f.startswith("after_finalize/") for f in data.files):
        final = adamx.finalize_variable_values(traj[-1][0], traj[-1][1])
        for k in keys:
            np.testing.assert_allclose(np.asarray(final[k]), data[f"after_finalize/{k}"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", _cases())
def test_config_round_trip_matches_keras(name):
    """adamx reads the config real Keras printed and writes back exactly that dict."""
    meta, _ = _load(name)
    config = meta["config"]
    opt = adamx.from_keras_config(config)
    assert opt.get_config() == config
    built = _build(meta)
    if meta.get("exclude_from_weight_decay"):
        # Keras's config silently loses the exclusion; adamx refuses to
        with pytest.raises(ValueError, match="exclude_from_weight_decay"):
            built.get_config()
        extended = adamx.to_keras_config(built, include_adamx=True)
        assert extended == dict(config, exclude_from_weight_decay=["bias"])
        assert adamx.from_keras_config(extended).hyperparams["exclude_from_weight_decay"] == ["bias"]
    else:
        assert built.get_config() == config


def test_ema_overwrite_puts_params_on_the_average():
    """Keras fixture: params equal the average after steps 5, 10, ... (and step 1, by the first-step rule)."""
    meta, data = _load("keras_ema_overwrite_5")
    keys = meta["param_keys"]
    traj = _run(_build(meta), data, keys, np.float32, meta["n_steps"])
    for t, (params, state) in enumerate(traj):
        step = t + 1
        on_avg = all(np.array_equal(np.asarray(params[k]), np.asarray(state.ema[k])) for k in keys)
        assert on_avg == (step == 1 or step % 5 == 0), step


@pytest.mark.parametrize("name", _cases("bfloat16"))
def test_keras_bfloat16_fixture_shows_the_freeze_adamx_avoids(name):
    """Keras bf16 with beta_2=0.999 never moves (bf16(0.999) == 1 -> alpha = 0). adamx moves.

    Both run on the same bf16 inputs; adamx keeps scalars and moments in float32. Its
    params, for entries whose update exceeds half a bf16 ULP, must change.
    """
    meta, data = _load(name)
    keys = meta["param_keys"]
    frozen = all(np.array_equal(data[f"params/{k}"][0], data[f"params/{k}"][-1]) for k in keys)
    assert frozen == (meta["kwargs"].get("beta_2", 0.999) == 0.999)
    traj = _run(_build(meta), data, keys, jax.numpy.bfloat16, meta["n_steps"])
    moved = sum(int(np.sum(np.asarray(traj[-1][0][k]).astype(np.float32) != data[f"params/{k}"][0])) for k in keys)
    assert moved > 0
    assert all(np.all(np.isfinite(np.asarray(traj[-1][1].nu[k]))) for k in keys)
