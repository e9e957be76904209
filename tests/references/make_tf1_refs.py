"""Generate TF1 AdamOptimizer (and tf_keras legacy Adam) reference trajectories.

Run with a Python that has tensorflow-cpu==2.21.0 and, for the legacy case,
tf_keras==2.21.0 (any working directory):

    python tests/references/make_tf1_refs.py

TF1 cases (``cases.TF1_CASES``): ``tf.compat.v1.train.AdamOptimizer(**kwargs)``
in TF2 eager mode, on ``tf.Variable`` s named by their full key
(``'dense/kernel'``), one ``apply_gradients`` call per step.  Recorded: the
parameters, the slots ``m`` and ``v``, and the shared non-slot variables
``beta1_power`` / ``beta2_power``.  To observe their initial value, the script
calls ``optimizer._create_slots(var_list)`` before the first step; that is the
first thing ``apply_gradients`` does anyway (it creates nothing twice), so the
trajectory is unchanged.

* sparse case: the gradient is a ``tf.IndexedSlices`` with duplicate indices;
  the indices, the values and their dense scatter-sum are stored.
  ``tf1_sparse_as_dense_embedding`` runs the same inputs with the dense gradient.
* callable case: ``beta1`` is a closure over the number of finished steps,
  ``cases.tf1_callable_beta1``; every value it returned is stored.
* bf16 / fp16: gradients are passed in the variable dtype (a float32 gradient
  for a bf16 variable aborts the process in eager mode).  These runs diverge
  (bf16) or give NaN (fp16); they are stored anyway.

tf_keras legacy case (``cases.TF_KERAS_LEGACY_CASES``):
``tf_keras.optimizers.legacy.Adam(learning_rate=0.01, decay=0.1)`` in eager mode;
params, slots m/v, iterations, the decayed learning rate of each step and the
legacy ``get_config()`` (with its ``decay`` key).  Skipped with a message if
tf_keras is not installed.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402

TF_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def _np32(x) -> np.ndarray:
    """A TF variable/tensor as a float32 numpy array (exact for bf16/fp16)."""
    return np.asarray(x.numpy()).astype(np.float32)


def _variables(case: C.Case, params0: dict[str, np.ndarray]) -> list[tf.Variable]:
    dtype = TF_DTYPES[case.dtype]
    return [tf.Variable(tf.constant(p, dtype=dtype), name=k) for k, p in params0.items()]


def run_tf1_case(case: C.Case) -> None:
    params0, grads = C.make_inputs(case)
    keys = list(params0)
    dtype = TF_DTYPES[case.dtype]
    variables = _variables(case, params0)

    kwargs = dict(case.kwargs)
    step = 0
    beta1_values: list[float] = []
    if case.callable_beta1:

        def beta1() -> float:
            value = C.tf1_callable_beta1(step)
            beta1_values.append(value)
            return value

        kwargs["beta1"] = beta1
    opt = tf.compat.v1.train.AdamOptimizer(**kwargs)
    with tf.init_scope():
        opt._create_slots(variables)  # what apply_gradients does first; see docstring
    b1p, b2p = opt._get_beta_accumulators()

    arrays: dict[str, np.ndarray] = {}
    rec: dict[str, list] = {f"params/{k}": [_np32(v)] for k, v in zip(keys, variables)}
    rec["beta1_power"] = [np.float32(b1p.numpy())]
    rec["beta2_power"] = [np.float32(b2p.numpy())]
    if case.sparse and not case.sparse_as_dense:
        indices, values = C.make_sparse_slices(case)
        arrays["sparse_indices"] = indices
        arrays[f"sparse_values/{C.EMBEDDING_KEY}"] = values
    for t in range(case.n_steps):
        if case.sparse and not case.sparse_as_dense:
            step_grads = [
                tf.IndexedSlices(
                    values=tf.constant(values[t], dtype=dtype),
                    indices=tf.constant(indices[t]),
                    dense_shape=tf.constant(C.EMBEDDING_SHAPE, dtype=tf.int64),
                )
            ]
        else:
            step_grads = [tf.constant(grads[k][t], dtype=dtype) for k in keys]
        opt.apply_gradients(list(zip(step_grads, variables)))
        step += 1
        for k, v in zip(keys, variables):
            rec[f"params/{k}"].append(_np32(v))
            rec.setdefault(f"m/{k}", []).append(_np32(opt.get_slot(v, "m")))
            rec.setdefault(f"v/{k}", []).append(_np32(opt.get_slot(v, "v")))
        rec["beta1_power"].append(np.float32(b1p.numpy()))
        rec["beta2_power"].append(np.float32(b2p.numpy()))

    arrays.update({name: np.stack(vals) for name, vals in rec.items()})
    arrays.update({f"grads/{k}": grads[k] for k in keys})
    meta = {
        "case": case.to_json(),
        "name": case.name,
        "library": "tf1",
        "library_version": tf.__version__,
        "versions": {"tensorflow": tf.__version__, "numpy": np.__version__},
        "execution": "TF2 eager, tf.Variable (ResourceVariable), one apply_gradients call per step",
        "optimizer": "tf.compat.v1.train.AdamOptimizer",
        "dtype": case.dtype,
        "stored_dtype": "float32 (exact copies of the parameter-dtype values)",
        "n_steps": case.n_steps,
        "param_keys": keys,
        "kwargs": case.kwargs,
        "config": None,  # AdamOptimizer has no get_config
        "beta_power_dtype": b1p.dtype.name,
    }
    if case.callable_beta1:
        # Call 0 comes from creating beta1_power, call t from step t's _prepare.
        assert len(beta1_values) == case.n_steps + 1, beta1_values
        arrays["beta1_at_creation"] = np.float64(beta1_values[0])
        arrays["beta1"] = np.asarray(beta1_values[1:], np.float64)
        meta["kwargs"] = dict(case.kwargs, beta1="callable: cases.tf1_callable_beta1(finished_steps)")
    C.save(case.name, arrays, meta)


def run_tf_keras_legacy_case(case: C.Case, tf_keras) -> None:
    params0, grads = C.make_inputs(case)
    keys = list(params0)
    variables = _variables(case, params0)
    opt = tf_keras.optimizers.legacy.Adam(**case.kwargs)
    rec: dict[str, list] = {f"params/{k}": [_np32(v)] for k, v in zip(keys, variables)}
    lr_used, iterations = [], []
    for t in range(case.n_steps):
        lr_used.append(np.float32(opt._decayed_lr(tf.float32).numpy()))
        opt.apply_gradients([(tf.constant(grads[k][t]), v) for k, v in zip(keys, variables)])
        for k, v in zip(keys, variables):
            rec[f"params/{k}"].append(_np32(v))
            rec.setdefault(f"m/{k}", []).append(_np32(opt.get_slot(v, "m")))
            rec.setdefault(f"v/{k}", []).append(_np32(opt.get_slot(v, "v")))
        iterations.append(int(opt.iterations.numpy()))
    arrays = {name: np.stack(vals) for name, vals in rec.items()}
    arrays.update({f"grads/{k}": grads[k] for k in keys})
    arrays["learning_rate"] = np.asarray(lr_used, np.float32)
    arrays["iterations"] = np.asarray(iterations, np.int64)
    meta = {
        "case": case.to_json(),
        "name": case.name,
        "library": "tf_keras_legacy",
        "library_version": tf_keras.__version__,
        "versions": {"tf_keras": tf_keras.__version__, "tensorflow": tf.__version__, "numpy": np.__version__},
        "execution": "TF2 eager, tf.Variable, one apply_gradients call per step",
        "optimizer": "tf_keras.optimizers.legacy.Adam",
        "dtype": case.dtype,
        "stored_dtype": "float32",
        "n_steps": case.n_steps,
        "param_keys": keys,
        "kwargs": case.kwargs,
        "config": opt.get_config(),
    }
    C.save(case.name, arrays, meta)


def sanity_checks() -> None:
    a, _ = C.load("tf1_defaults")
    b1 = np.float32(0.9)
    expect = [np.float32(0.9)]
    for _ in range(a["beta1_power"].size - 1):
        expect.append(np.float32(expect[-1] * b1))
    assert np.array_equal(a["beta1_power"], np.asarray(expect, np.float32)), "beta1_power is not a running product"
    a, _ = C.load("tf1_callable_beta1")
    assert np.allclose(a["beta1"][:4], [0.5, 0.54, 0.58, 0.62])
    assert np.allclose(a["beta1_power"][:4], [0.5, 0.25, 0.135, 0.135 * 0.58], rtol=1e-6), a["beta1_power"][:4]
    s, _ = C.load("tf1_sparse_embedding")
    d, _ = C.load("tf1_sparse_as_dense_embedding")
    assert np.array_equal(s[f"grads/{C.EMBEDDING_KEY}"], d[f"grads/{C.EMBEDDING_KEY}"])
    diff = np.abs(s[f"params/{C.EMBEDDING_KEY}"] - d[f"params/{C.EMBEDDING_KEY}"]).max()
    assert 0 < diff < 1e-6, diff
    assert any(len(set(i)) < len(i) for i in s["sparse_indices"])
    print(f"sanity checks passed (sparse vs dense-equivalent max |dparams| = {diff:.2g})")


def main() -> None:
    for case in C.TF1_CASES:
        run_tf1_case(case)
        print(f"wrote {case.name}")
    try:
        import tf_keras
    except ImportError:
        print("tf_keras is not installed: skipping", [c.name for c in C.TF_KERAS_LEGACY_CASES])
    else:
        for case in C.TF_KERAS_LEGACY_CASES:
            run_tf_keras_legacy_case(case, tf_keras)
            print(f"wrote {case.name}")
    sanity_checks()


if __name__ == "__main__":
    main()
