"""Generate Keras 3 Adam / AdamW reference trajectories (JAX backend, eager).

Run with a Python that has keras==3.15.1 and jax==0.10.2 (any working directory):

    python tests/references/make_keras_refs.py

For every case in ``cases.KERAS_CASES`` it builds ``keras.optimizers.Adam`` (or
``AdamW``) with the case kwargs, one ``keras.Variable`` per parameter (dtype of
the case, Keras name = last part of the key: ``'kernel'``, ``'bias'``), and calls
``optimizer.apply(grads, variables)`` once per step, eagerly.  After each step it
records the parameters and the optimizer state, and at the end it calls
``optimizer.finalize_variable_values(variables)``.  Output: ``data/<case>.npz``
and ``data/<case>.json`` (see README.md), plus ``data/keras_configs.json``,
real ``get_config()`` outputs for from_config tests.

Each case runs after ``keras.utils.clear_session()``, so optimizer names are
the un-numbered defaults (``'adam'``, ``'adam_w'``).
"""

from __future__ import annotations

import copy
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402


def _np32(x) -> np.ndarray:
    """A Keras variable/tensor as a float32 numpy array (exact for bf16/fp16)."""
    return np.asarray(x).astype(np.float32)


def _learning_rate(kw_value):
    if isinstance(kw_value, dict):
        return keras.optimizers.schedules.deserialize(kw_value)
    return kw_value


def build_optimizer(case: C.Case) -> keras.optimizers.Optimizer:
    kwargs = dict(case.kwargs)
    if "learning_rate" in kwargs:
        kwargs["learning_rate"] = _learning_rate(kwargs["learning_rate"])
    cls = {"Adam": keras.optimizers.Adam, "AdamW": keras.optimizers.AdamW}[case.optimizer]
    return cls(**kwargs)


def serialized_kwargs(case: C.Case, optimizer) -> dict:
    """The case kwargs with a schedule replaced by Keras' own full serialization."""
    kwargs = dict(case.kwargs)
    if isinstance(kwargs.get("learning_rate"), dict):
        kwargs["learning_rate"] = keras.optimizers.schedules.serialize(optimizer._learning_rate)
    return kwargs


def run_case(case: C.Case) -> None:
    keras.utils.clear_session()
    params0, grads = C.make_inputs(case)
    keys = list(params0)
    variables = [keras.Variable(params0[k], dtype=case.dtype, name=k.split("/")[-1]) for k in keys]
    opt = build_optimizer(case)
    if case.exclude_from_weight_decay is not None:
        opt.exclude_from_weight_decay(**case.exclude_from_weight_decay)
    opt.build(variables)

    def slot_lists() -> dict[str, list]:
        slots = {"m": opt._momentums, "v": opt._velocities}
        if opt.amsgrad:
            slots["vhat"] = opt._velocity_hats
        if opt.use_ema:
            slots["ema"] = opt._model_variables_moving_average
        if opt.gradient_accumulation_steps:
            slots["accum"] = opt._accumulated_gradients
        return slots

    rec: dict[str, list] = {f"params/{k}": [_np32(v.value)] for k, v in zip(keys, variables)}
    lr_used, iterations, raw_iterations = [], [], []
    for t in range(case.n_steps):
        lr_used.append(_np32(opt.learning_rate))  # value this step will use
        step_grads = [jax.numpy.asarray(grads[k][t]).astype(case.dtype) for k in keys]
        opt.apply(step_grads, variables)
        for k, v in zip(keys, variables):
            rec[f"params/{k}"].append(_np32(v.value))
        for prefix, slot_vars in slot_lists().items():
            for k, v in zip(keys, variables):
                rec.setdefault(f"{prefix}/{k}", []).append(_np32(slot_vars[opt._get_variable_index(v)].value))
        iterations.append(int(np.asarray(opt.iterations)))
        raw_iterations.append(int(np.asarray(opt._iterations)))

    arrays = {name: np.stack(vals) for name, vals in rec.items()}
    arrays.update({f"grads/{k}": grads[k] for k in keys})
    arrays["learning_rate"] = np.asarray(lr_used, np.float32)
    arrays["iterations"] = np.asarray(iterations, np.int64)
    arrays["raw_iterations"] = np.asarray(raw_iterations, np.int64)
    if opt.use_ema:
        opt.finalize_variable_values(variables)
        arrays.update({f"after_finalize/{k}": _np32(v.value) for k, v in zip(keys, variables)})

    meta = {
        "case": case.to_json(),
        "name": case.name,
        "library": "keras",
        "library_version": keras.__version__,
        "versions": {"keras": keras.__version__, "jax": jax.__version__, "numpy": np.__version__},
        "backend": keras.backend.backend(),
        "execution": "eager optimizer.apply(grads, vars), one call per step",
        "optimizer": f"keras.optimizers.{case.optimizer}",
        "dtype": case.dtype,
        "stored_dtype": "float32 (exact copies of the parameter-dtype values)",
        "n_steps": case.n_steps,
        "param_keys": keys,
        "keras_variable_names": [v.name for v in variables],
        "kwargs": serialized_kwargs(case, opt),
        "exclude_from_weight_decay": case.exclude_from_weight_decay,
        "config": opt.get_config(),
        "optimizer_variables": [v.path for v in opt.variables],
    }
    C.save(case.name, arrays, meta)


def config_examples() -> list[dict]:
    """Real get_config() outputs, for from_config tests."""
    # Every schedule that a case uses alone (kwargs == {"learning_rate": <schedule dict>}).
    sched = [
        c.kwargs["learning_rate"]
        for c in C.KERAS_CASES
        if list(c.kwargs) == ["learning_rate"] and isinstance(c.kwargs["learning_rate"], dict)
    ]
    specs: list[tuple[str, type, dict]] = [
        ("Adam defaults", keras.optimizers.Adam, {}),
        (
            "Adam, every argument non-default (clipnorm)",
            keras.optimizers.Adam,
            dict(
                learning_rate=0.01,
                beta_1=0.8,
                beta_2=0.95,
                epsilon=1e-4,
                amsgrad=True,
                weight_decay=0.05,
                clipnorm=0.5,
                use_ema=True,
                ema_momentum=0.9,
                ema_overwrite_frequency=5,
                loss_scale_factor=128.0,
                gradient_accumulation_steps=3,
                name="my_adam",
            ),
        ),
        ("Adam clipvalue=0.1", keras.optimizers.Adam, dict(clipvalue=0.1)),
        ("Adam global_clipnorm=0.3", keras.optimizers.Adam, dict(global_clipnorm=0.3)),
        ("AdamW defaults", keras.optimizers.AdamW, {}),
        (
            "AdamW lr=0.01 weight_decay=0.05 amsgrad",
            keras.optimizers.AdamW,
            dict(learning_rate=0.01, weight_decay=0.05, amsgrad=True),
        ),
    ]
    for lr in sched:
        cfg = lr["config"]
        desc = f"Adam learning_rate={lr['class_name']}({', '.join(f'{k}={v}' for k, v in cfg.items())})"
        specs.append((desc, keras.optimizers.Adam, dict(learning_rate=lr)))
    out = []
    for desc, cls, kwargs in specs:
        keras.utils.clear_session()
        if "learning_rate" in kwargs:
            kwargs = dict(kwargs, learning_rate=_learning_rate(kwargs["learning_rate"]))
        config = cls(**kwargs).get_config()
        # Round trip; on a copy, since Keras' from_config replaces a schedule dict in its argument.
        assert cls.from_config(copy.deepcopy(config)).get_config() == config, desc
        out.append({"desc": desc, "class": cls.__name__, "config": config})
    # The wrapper that replaces loss_scale_factor for dynamic scaling.
    keras.utils.clear_session()
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(), initial_scale=1024.0, dynamic_growth_steps=4)
    out.append(
        {"desc": "LossScaleOptimizer(Adam(), 1024, 4)", "class": "LossScaleOptimizer", "config": lso.get_config()}
    )
    return out


def sanity_checks() -> None:
    """Properties the stored data must have (see SEMANTICS.md)."""
    a, _ = C.load("keras_bfloat16_defaults")
    for k, p in C.group(a, "params").items():
        assert np.array_equal(p, np.broadcast_to(p[0], p.shape)), f"bf16 defaults: {k} moved"
        assert np.any(a[f"v/{k}"] != 0), "bf16 defaults: v stays zero"
    for name, freq in [("keras_ema_overwrite_5", 5)]:
        a, _ = C.load(name)
        for k, p in C.group(a, "params").items():
            for t in [1, *range(freq, a["iterations"].size + 1, freq)]:
                assert np.array_equal(p[t], a[f"ema/{k}"][t - 1]), f"{name}: params != ema at step {t}"
            assert not np.array_equal(p[freq + 1], a[f"ema/{k}"][freq]), f"{name}: params == ema at step {freq + 1}"
    a, _ = C.load("keras_grad_accum_3")
    for k, p in C.group(a, "params").items():
        moved = [t for t in range(1, p.shape[0]) if not np.array_equal(p[t], p[t - 1])]
        assert moved == list(range(3, p.shape[0], 3)), f"GA 3: {k} moved at {moved}"
    a, _ = C.load("keras_sched_piecewise")
    assert np.allclose(a["learning_rate"][:6], 0.01) and np.allclose(a["learning_rate"][6:16], 0.005)
    for name in [c.name for c in C.KERAS_CASES]:
        a, _ = C.load(name)
        if "float16" not in name:
            assert all(np.all(np.isfinite(x)) for x in a.values()), f"{name}: non-finite values"
    print("sanity checks passed")


def main() -> None:
    for case in C.KERAS_CASES:
        run_case(case)
        print(f"wrote {case.name}")
    C.save_json("keras_configs", config_examples())
    print("wrote keras_configs.json")
    sanity_checks()


if __name__ == "__main__":
    main()
