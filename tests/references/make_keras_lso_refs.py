"""Generate Keras 3 ``LossScaleOptimizer`` reference trajectories (JAX backend, ``stateless_apply``).

Run with a Python that has keras==3.15.1 and jax==0.10.2 (any working directory):

    python tests/references/make_keras_lso_refs.py

Keras's stateful ``LossScaleOptimizer.apply()`` fails on the JAX backend
(``jax.errors.UnexpectedTracerError``: it assigns variables inside ``jax.lax.cond``), so
each case runs the way ``model.fit`` does on JAX (``keras/src/backend/jax/trainer.py``):
``jax.jit(optimizer.stateless_apply)`` on the list of optimizer variables, one call per
step. The user side is simulated exactly: before step t the script reads the current
``dynamic_scale`` from the optimizer variables and passes ``raw_grad_t * scale`` as the
gradient (what ``jax.grad`` of the scaled loss gives), with a non-finite value (inf,
-inf or NaN) written into one element on the case's ``overflow`` steps.

Output, in ``data/keras_lso_fixtures/`` (a folder, so that the ``keras_*.json`` glob of
tests/test_keras_reference.py does not take these for plain Adam cases):
``keras_lso_<case>.npz`` / ``.json`` per case (see README.md) and
``keras_lso_configs.json`` (real ``LossScaleOptimizer.get_config()`` dicts).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "keras_lso_fixtures")
SHAPES = {"dense/kernel": (4, 3), "dense/bias": (3,), "out/kernel": (3, 2)}
BAD = {"inf": np.inf, "-inf": -np.inf, "nan": np.nan}

# name -> (inner Adam kwargs, LossScaleOptimizer kwargs, n_steps, {step: (kind, key, flat index)}, seed)
CASES: dict[str, tuple[dict, dict, int, dict[int, tuple[str, str, int]], int]] = {
    "keras_lso_adam_growth3": (
        dict(learning_rate=0.01),
        dict(initial_scale=1024.0, dynamic_growth_steps=3),
        30,
        {
            5: ("inf", "dense/kernel", 4),
            9: ("nan", "out/kernel", 0),
            10: ("-inf", "dense/bias", 2),
            20: ("inf", "out/kernel", 5),
        },
        0,
    ),
    "keras_lso_amsgrad_wd_clip_growth2": (
        dict(learning_rate=0.005, amsgrad=True, weight_decay=0.05, global_clipnorm=1.0),
        dict(initial_scale=2.0**15, dynamic_growth_steps=2),
        30,
        {
            3: ("nan", "dense/kernel", 0),
            4: ("inf", "dense/bias", 1),
            12: ("inf", "out/kernel", 3),
            13: ("-inf", "dense/kernel", 11),
            14: ("nan", "dense/bias", 0),
            25: ("inf", "dense/kernel", 7),
        },
        1,
    ),
    "keras_lso_scale1000_growth1_custom": (
        dict(learning_rate=0.02, beta_1=0.8, beta_2=0.95, epsilon=1e-4),
        dict(initial_scale=1000.0, dynamic_growth_steps=1),
        25,
        {2: ("inf", "out/kernel", 1), 6: ("nan", "dense/kernel", 3), 7: ("nan", "dense/kernel", 3)},
        2,
    ),
}


def make_inputs(n_steps: int, seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Initial params (standard normal) and unscaled per-step grads (standard normal x U(0.5, 1))."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = []
    for _ in range(n_steps):
        s = rng.uniform(0.5, 1.0)
        grads.append({k: (rng.standard_normal(shape) * s).astype(np.float32) for k, shape in SHAPES.items()})
    return params, grads


def by_path(opt: keras.optimizers.Optimizer) -> dict[str, int]:
    """Index in ``opt.variables`` by path (for the optimizer's own scalars, whose paths are unique)."""
    return {v.path: i for i, v in enumerate(opt.variables)}


def run_case(name: str) -> dict:
    inner_kw, lso_kw, n, overflow, seed = CASES[name]
    keras.utils.clear_session()
    params0, raw = make_inputs(n, seed)
    keys = list(SHAPES)
    variables = [keras.Variable(params0[k], dtype="float32", name=k.split("/")[-1]) for k in keys]
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(**inner_kw), **lso_kw)
    opt.build(variables)
    idx = by_path(opt)
    inner = opt.inner_optimizer
    slot = {"m": inner._momentums, "v": inner._velocities}
    if inner.amsgrad:
        slot["vhat"] = inner._velocity_hats
    # by identity: two params named "kernel" give two slots with the same path
    pos = {id(v): i for i, v in enumerate(opt.variables)}
    slot_idx = {f: [pos[id(v)] for v in vs] for f, vs in slot.items()}
    assert all(
        ov_shape == params0[k].shape
        for f in slot_idx
        for k, ov_shape in zip(keys, [opt.variables[i].shape for i in slot_idx[f]])
    )

    step_jit = jax.jit(opt.stateless_apply)
    tv = [v.value for v in variables]
    ov = [v.value for v in opt.variables]
    tv_e, ov_e = list(tv), list(ov)  # the same run through eager (un-jitted) stateless_apply
    eager_diff = 0.0

    rec: dict[str, list] = {f"params/{k}": [params0[k]] for k in keys}
    for f in slot:
        for k in keys:
            rec[f"{f}/{k}"] = []
    for f in ("grads",):
        for k in keys:
            rec[f"{f}/{k}"] = []
    for f in ("scale_before", "scale", "step_counter", "inner_iterations", "finite"):
        rec[f] = []
    for t in range(1, n + 1):
        scale = np.float32(ov[idx["loss_scale_optimizer/dynamic_scale"]])
        g = {k: (raw[t - 1][k] * scale).astype(np.float32) for k in keys}
        if t in overflow:
            kind, key, flat = overflow[t]
            g[key].reshape(-1)[flat] = BAD[kind]
        grads = [jax.numpy.asarray(g[k]) for k in keys]
        tv, ov = step_jit(ov, grads, tv)
        tv_e, ov_e = opt.stateless_apply(ov_e, grads, tv_e)
        eager_diff = max(eager_diff, *(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(tv, tv_e)))
        for k, p in zip(keys, tv):
            rec[f"params/{k}"].append(np.asarray(p, np.float32))
            rec[f"grads/{k}"].append(g[k])
        for f, ids in slot_idx.items():
            for k, i in zip(keys, ids):
                rec[f"{f}/{k}"].append(np.asarray(ov[i], np.float32))
        rec["scale_before"].append(scale)
        rec["scale"].append(np.float32(ov[idx["loss_scale_optimizer/dynamic_scale"]]))
        rec["step_counter"].append(np.int64(ov[idx["loss_scale_optimizer/step_counter"]]))
        rec["inner_iterations"].append(np.int64(ov[idx["adam/iteration"]]))
        rec["finite"].append(t not in overflow)
    arrays = {k: np.stack(v) for k, v in rec.items()}
    meta = {
        "name": name,
        "library": "keras",
        "library_version": keras.__version__,
        "versions": {"jax": jax.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "optimizer": "LossScaleOptimizer(Adam)",
        "execution": "jax.jit(optimizer.stateless_apply), one call per step (what model.fit runs on JAX)",
        "dtype": "float32",
        "n_steps": n,
        "seed": seed,
        "param_keys": keys,
        "inner_kwargs": inner_kw,
        "lso_kwargs": lso_kw,
        "overflow_steps": {str(t): list(v) for t, v in overflow.items()},
        "config": opt.get_config(),
        "optimizer_variables": [v.path for v in opt.variables],
        "max_abs_param_diff_jit_vs_eager_stateless_apply": eager_diff,
    }
    sanity_check(name, arrays, overflow, lso_kw)
    save(name, arrays, meta)
    return meta


def sanity_check(name: str, a: dict[str, np.ndarray], overflow: dict, lso_kw: dict) -> None:
    n = len(a["scale"])
    grew = 0
    for t in range(1, n + 1):
        before, after = a["scale_before"][t - 1], a["scale"][t - 1]
        params_moved = any(not np.array_equal(a[f"params/{k}"][t], a[f"params/{k}"][t - 1]) for k in SHAPES)
        if t in overflow:
            assert after == before * 0.5 and a["step_counter"][t - 1] == 0, (name, t)
            assert not params_moved, (name, t, "params moved on a skipped step")
            prev_it = a["inner_iterations"][t - 2] if t > 1 else 0
            assert a["inner_iterations"][t - 1] == prev_it, (name, t, "inner iterations advanced on a skip")
        else:
            assert params_moved, (name, t)
            assert after in (before, before * 2), (name, t)
            grew += int(after == before * 2)
    assert grew >= 2, f"{name}: the scale grew only {grew} times"
    for k in SHAPES:
        assert np.all(np.isfinite(a[f"params/{k}"])), name


def save(name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    base = os.path.join(OUT_DIR, name)
    np.savez_compressed(base + ".npz", **arrays)  # type: ignore[arg-type]
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")


def configs() -> list[dict]:
    """Real ``LossScaleOptimizer.get_config()`` dicts; each survives Keras's own from_config round trip."""
    out = []
    for desc, make in [
        ("LossScaleOptimizer(Adam()) defaults", lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())),
        (
            "LossScaleOptimizer(Adam(0.003, amsgrad, clipnorm), 256, 100, name)",
            lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.Adam(learning_rate=0.003, amsgrad=True, clipnorm=0.5, beta_2=0.99),
                initial_scale=256.0,
                dynamic_growth_steps=100,
                name="my_lso",
            ),
        ),
        (
            "LossScaleOptimizer(AdamW(), 2**10, 7)",
            lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.AdamW(weight_decay=0.01), initial_scale=1024.0, dynamic_growth_steps=7
            ),
        ),
        (
            "LossScaleOptimizer(Adam(ExponentialDecay))",
            lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.Adam(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.5))
            ),
        ),
    ]:
        keras.utils.clear_session()
        config = make().get_config()
        again = keras.optimizers.LossScaleOptimizer.from_config(json.loads(json.dumps(config))).get_config()
        assert again == config, desc
        out.append({"desc": desc, "config": config})
    return out


def main() -> None:
    for name in CASES:
        meta = run_case(name)
        print(
            f"{name}: jit vs eager stateless_apply max |dparams| = {meta['max_abs_param_diff_jit_vs_eager_stateless_apply']:.3g}"
        )
    with open(os.path.join(OUT_DIR, "keras_lso_configs.json"), "w") as f:
        json.dump(configs(), f, indent=1, sort_keys=True)
        f.write("\n")
    # Keras's stateful apply() on the JAX backend: measured to fail (SEMANTICS.md 1.11).
    keras.utils.clear_session()
    v = [keras.Variable(np.ones(3, np.float32), name="w")]
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    try:
        opt.apply([jax.numpy.ones(3)], v)
        print("stateful apply(): worked")
    except jax.errors.UnexpectedTracerError:
        print("stateful apply(): UnexpectedTracerError (as recorded in SEMANTICS.md 1.11)")


if __name__ == "__main__":
    main()
