"""Reference cases and their inputs, in plain numpy.

This module is shared by the generator scripts (``make_*_refs.py``, which run the
real libraries) and by the tests (which replay the stored inputs through adamx).
It imports nothing but numpy, so the tests never need Keras, TensorFlow or torch.

A :class:`Case` names one trajectory: a library, an optimizer class, its keyword
arguments, the parameter dtype and the number of steps.  :func:`make_inputs`
turns a case into deterministic initial parameters and per-step gradients.

Input recipe (all from ``np.random.default_rng(case.seed)``, drawn in this order):

* initial parameters, one ``standard_normal`` array per variable in
  :data:`DENSE_SHAPES` order (or the embedding table for sparse cases);
* then, step by step, one gradient per variable: ``standard_normal * s_t`` with a
  per-step scale ``s_t ~ U(0.5, 1.0)``; on every step with ``t % 5 == 3``
  (1-based) the scale is multiplied by 0.05, so clipping thresholds are not
  reached on those steps; then about 10 % of the entries are set to exactly 0.

Because the gradients are drawn step by step, a 25-step case is a prefix of the
50-step case with the same seed, and every case with the same seed shares its
inputs, whatever the library (cross-library comparisons are meaningful).

All values are rounded to the case dtype (bfloat16: round to nearest even,
done here in numpy) and returned as float32, so they are exact in every dtype
and the stored float32 arrays are the values the library really saw.
``loss_scale_factor`` cases return gradients already multiplied by the factor
(what a user would pass to ``apply``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

DENSE_SHAPES: dict[str, tuple[int, ...]] = {
    "dense/kernel": (4, 3),
    "dense/bias": (3,),
    "out/kernel": (3, 2),
}
EMBEDDING_KEY = "embedding/embeddings"
EMBEDDING_SHAPE = (10, 4)
SPARSE_SLICES_PER_STEP = 6  # rows per IndexedSlices gradient, with duplicates

DEFAULT_STEPS = 25
ZERO_FRACTION = 0.1
SMALL_STEP_EVERY = 5  # 1-based steps t with t % 5 == 3 get a 0.05 gradient scale
SMALL_STEP_PHASE = 3
SMALL_STEP_SCALE = 0.05


@dataclasses.dataclass(frozen=True)
class Case:
    """One reference trajectory.

    Attributes:
      name: file stem under ``data/``.
      library: ``'keras'``, ``'tf1'``, ``'tf_keras_legacy'`` or ``'torch'``.
      optimizer: class name in that library (``'Adam'``, ``'AdamW'``,
        ``'AdamOptimizer'``).
      kwargs: constructor keyword arguments, JSON-safe.  A Keras learning-rate
        schedule is given in Keras' serialized form (see :func:`schedule`).
      dtype: parameter dtype, ``'float32'``, ``'bfloat16'`` or ``'float16'``.
      n_steps: number of optimizer steps.
      seed: seed of :func:`make_inputs`.
      sparse: TF1 only: one (10, 4) embedding table whose gradients are
        ``tf.IndexedSlices`` with duplicate indices (see :func:`make_sparse_slices`).
      sparse_as_dense: with ``sparse``: pass the dense scatter-summed gradient
        instead of the IndexedSlices (same inputs, for comparison).
      exclude_from_weight_decay: Keras only: kwargs for
        ``optimizer.exclude_from_weight_decay`` called before the first step.
      callable_beta1: TF1 only: ``beta1`` is a Python closure, see
        :func:`tf1_callable_beta1`.
      loss_scale: the stored gradients are multiplied by this factor.
    """

    name: str
    library: str
    optimizer: str
    kwargs: dict[str, Any]
    dtype: str = "float32"
    n_steps: int = DEFAULT_STEPS
    seed: int = 0
    sparse: bool = False
    sparse_as_dense: bool = False
    exclude_from_weight_decay: dict[str, Any] | None = None
    callable_beta1: bool = False
    loss_scale: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def schedule(class_name: str, **config: Any) -> dict[str, Any]:
    """A Keras learning-rate schedule in ``keras.optimizers.schedules.serialize`` form.

    ``keras.optimizers.schedules.deserialize`` accepts it; ``config`` may leave
    out arguments that keep their defaults.
    """
    return {
        "module": "keras.optimizers.schedules",
        "class_name": class_name,
        "config": dict(config),
        "registered_name": None,
    }


def tf1_callable_beta1(step: int) -> float:
    """The time-varying beta1 of the TF1 callable case.

    ``step`` is the number of ``apply_gradients`` calls completed before the call
    (so the value at slot creation and at step 1 is 0.5): 0.5, 0.54, 0.58, ...,
    capped at 0.9 from step 11 on.
    """
    return min(0.5 + 0.04 * step, 0.9)


_EXP = schedule("ExponentialDecay", initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5)


def _keras(name: str, dtype: str = "float32", n_steps: int = DEFAULT_STEPS, **kw: Any) -> Case:
    return Case(name=name, library="keras", optimizer="Adam", kwargs=kw, dtype=dtype, n_steps=n_steps)


KERAS_CASES: list[Case] = [
    _keras("keras_defaults", n_steps=50),
    _keras("keras_custom_hparams", learning_rate=0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-4),
    _keras("keras_amsgrad", amsgrad=True),
    _keras("keras_weight_decay", learning_rate=0.01, weight_decay=0.1),
    dataclasses.replace(
        _keras("keras_weight_decay_exclude_bias", learning_rate=0.01, weight_decay=0.1),
        exclude_from_weight_decay={"var_names": ["bias"]},
    ),
    _keras("keras_clipnorm_0.5", clipnorm=0.5),
    _keras("keras_clipvalue_0.1", clipvalue=0.1),
    _keras("keras_global_clipnorm_0.3", global_clipnorm=0.3),
    _keras("keras_ema_0.9", use_ema=True, ema_momentum=0.9),
    _keras("keras_ema_overwrite_5", use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5),
    _keras("keras_grad_accum_3", gradient_accumulation_steps=3),
    _keras(
        "keras_grad_accum_3_ema_overwrite_2",
        gradient_accumulation_steps=3,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=2,
    ),
    dataclasses.replace(_keras("keras_loss_scale_128", loss_scale_factor=128.0), loss_scale=128.0),
    _keras("keras_sched_exponential", learning_rate=_EXP),
    _keras(
        "keras_sched_exponential_staircase",
        learning_rate=schedule(
            "ExponentialDecay", initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5, staircase=True
        ),
    ),
    _keras(
        "keras_sched_piecewise",
        learning_rate=schedule("PiecewiseConstantDecay", boundaries=[5, 15], values=[0.01, 0.005, 0.001]),
    ),
    _keras(
        "keras_sched_inverse_time",
        learning_rate=schedule("InverseTimeDecay", initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5),
    ),
    _keras(
        "keras_sched_inverse_time_staircase",
        learning_rate=schedule(
            "InverseTimeDecay", initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5, staircase=True
        ),
    ),
    _keras(
        "keras_sched_polynomial",
        learning_rate=schedule(
            "PolynomialDecay", initial_learning_rate=0.01, decay_steps=20, end_learning_rate=0.001, power=2.0
        ),
    ),
    _keras(
        "keras_sched_polynomial_cycle",
        learning_rate=schedule(
            "PolynomialDecay",
            initial_learning_rate=0.01,
            decay_steps=8,
            end_learning_rate=0.001,
            power=2.0,
            cycle=True,
        ),
    ),
    _keras(
        "keras_sched_cosine",
        learning_rate=schedule("CosineDecay", initial_learning_rate=0.01, decay_steps=20, alpha=0.1),
    ),
    _keras(
        "keras_sched_cosine_warmup",
        learning_rate=schedule(
            "CosineDecay", initial_learning_rate=0.0, decay_steps=15, warmup_target=0.01, warmup_steps=5
        ),
    ),
    _keras(
        "keras_sched_cosine_restarts",
        learning_rate=schedule(
            "CosineDecayRestarts",
            initial_learning_rate=0.01,
            first_decay_steps=5,
            t_mul=2.0,
            m_mul=0.5,
            alpha=0.1,
        ),
    ),
    _keras("keras_sched_exponential_grad_accum_2", learning_rate=_EXP, gradient_accumulation_steps=2),
    Case(name="keras_adamw_defaults", library="keras", optimizer="AdamW", kwargs={}),
    Case(
        name="keras_adamw_lr0.01_wd0.05_amsgrad",
        library="keras",
        optimizer="AdamW",
        kwargs={"learning_rate": 0.01, "weight_decay": 0.05, "amsgrad": True},
    ),
    _keras(
        "keras_combined",
        learning_rate=_EXP,
        amsgrad=True,
        weight_decay=0.05,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=4,
        gradient_accumulation_steps=2,
    ),
    _keras("keras_clipnorm_wd_amsgrad", learning_rate=0.01, clipnorm=0.7, weight_decay=0.05, amsgrad=True),
    _keras("keras_bfloat16_defaults", dtype="bfloat16"),
    _keras("keras_bfloat16_lr0.01_beta2_0.99", dtype="bfloat16", learning_rate=0.01, beta_2=0.99),
    _keras("keras_float16_defaults", dtype="float16"),
    _keras("keras_float16_lr0.01", dtype="float16", learning_rate=0.01),
]


def _tf1(name: str, dtype: str = "float32", **kw: Any) -> Case:
    return Case(name=name, library="tf1", optimizer="AdamOptimizer", kwargs=kw, dtype=dtype)


TF1_CASES: list[Case] = [
    _tf1("tf1_defaults"),
    _tf1("tf1_custom_hparams", learning_rate=0.01, beta1=0.8, beta2=0.95, epsilon=1e-4),
    _tf1("tf1_epsilon_1e-7", epsilon=1e-7),
    dataclasses.replace(_tf1("tf1_sparse_embedding"), sparse=True),
    # Same inputs as tf1_sparse_embedding, but the dense scatter-summed gradient.
    dataclasses.replace(_tf1("tf1_sparse_as_dense_embedding"), sparse=True, sparse_as_dense=True),
    dataclasses.replace(_tf1("tf1_callable_beta1"), callable_beta1=True),
    _tf1("tf1_bfloat16_defaults", dtype="bfloat16"),
    _tf1("tf1_float16_defaults", dtype="float16"),
]

TF_KERAS_LEGACY_CASES: list[Case] = [
    Case(
        name="tf_keras_legacy_decay_0.1",
        library="tf_keras_legacy",
        optimizer="Adam",
        kwargs={"learning_rate": 0.01, "decay": 0.1},
    ),
]

TORCH_CASES: list[Case] = [
    Case(name="torch_defaults", library="torch", optimizer="Adam", kwargs={}),
    Case(
        name="torch_custom_hparams",
        library="torch",
        optimizer="Adam",
        kwargs={"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-4},
    ),
    Case(name="torch_amsgrad", library="torch", optimizer="Adam", kwargs={"amsgrad": True}),
    Case(name="torch_weight_decay_l2_0.1", library="torch", optimizer="Adam", kwargs={"weight_decay": 0.1}),
    Case(name="torch_adamw_wd_0.1", library="torch", optimizer="AdamW", kwargs={"weight_decay": 0.1}),
]

ALL_CASES: list[Case] = KERAS_CASES + TF1_CASES + TF_KERAS_LEGACY_CASES + TORCH_CASES
CASES: dict[str, Case] = {c.name: c for c in ALL_CASES}
assert len(CASES) == len(ALL_CASES), "duplicate case names"


def cases_for(library: str) -> list[Case]:
    return [c for c in ALL_CASES if c.library == library]


# ----------------------------------------------------------------------------- inputs


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to ``dtype`` (nearest even) and return them as float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        if not np.all(np.isfinite(x)):
            raise ValueError("round_to_dtype: only finite values are supported")
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
        return rounded.astype(np.uint32).view(np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")


def param_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    return {EMBEDDING_KEY: EMBEDDING_SHAPE} if case.sparse else dict(DENSE_SHAPES)


def _step_scale(rng: np.random.Generator, t: int) -> float:
    scale = rng.uniform(0.5, 1.0)
    if t % SMALL_STEP_EVERY == SMALL_STEP_PHASE:
        scale *= SMALL_STEP_SCALE
    return float(scale)


def _with_zeros(rng: np.random.Generator, g: np.ndarray) -> np.ndarray:
    return np.where(rng.random(g.shape) < ZERO_FRACTION, 0.0, g)


def make_sparse_slices(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """IndexedSlices gradients of a sparse case.

    Returns ``(indices, values)``: int64 ``(n_steps, 6)`` row indices into the
    (10, 4) table, each step with at least one duplicate (slot 1 repeats slot 0),
    and float32 ``(n_steps, 6, 4)`` values (rounded to the case dtype).
    """
    if not case.sparse:
        raise ValueError(f"{case.name} is not a sparse case")
    rng = np.random.default_rng(case.seed)
    rng.standard_normal(EMBEDDING_SHAPE)  # initial table, see make_inputs
    rows, width = EMBEDDING_SHAPE
    indices = np.empty((case.n_steps, SPARSE_SLICES_PER_STEP), np.int64)
    values = np.empty((case.n_steps, SPARSE_SLICES_PER_STEP, width), np.float32)
    for t in range(1, case.n_steps + 1):
        scale = _step_scale(rng, t)
        idx = rng.integers(0, rows, SPARSE_SLICES_PER_STEP)
        idx[1] = idx[0]
        vals = _with_zeros(rng, rng.standard_normal((SPARSE_SLICES_PER_STEP, width)) * scale)
        indices[t - 1] = idx
        values[t - 1] = round_to_dtype(vals.astype(np.float32), case.dtype)
    return indices, values


def scatter_sum(indices: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    """Dense equivalent of IndexedSlices: ``out[i] = sum of values whose index is i``.

    Summed in float32, in slice order (duplicates: first + second).
    """
    out = np.zeros((rows, *values.shape[1:]), np.float32)
    for i, v in zip(indices, values):
        out[i] = out[i] + v
    return out


def make_inputs(case: Case) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial parameters and per-step gradients of ``case``.

    Returns ``(params, grads)``: ``params[key]`` is float32 with the variable's
    shape, ``grads[key]`` is float32 ``(n_steps, *shape)``.  Both are exact in
    ``case.dtype``.  For sparse cases the gradient is the dense scatter-sum of
    :func:`make_sparse_slices` (exact in float32; in low precision the scatter-sum
    is done in float32 and rounded).  For ``loss_scale`` cases the gradients are
    multiplied by the factor.
    """
    rng = np.random.default_rng(case.seed)
    shapes = param_shapes(case)
    params = {k: round_to_dtype(rng.standard_normal(s).astype(np.float32), case.dtype) for k, s in shapes.items()}
    if case.sparse:
        indices, values = make_sparse_slices(case)
        dense = np.stack([scatter_sum(i, v, EMBEDDING_SHAPE[0]) for i, v in zip(indices, values)])
        return params, {EMBEDDING_KEY: round_to_dtype(dense, case.dtype)}
    grads = {k: np.empty((case.n_steps, *s), np.float32) for k, s in shapes.items()}
    for t in range(1, case.n_steps + 1):
        scale = _step_scale(rng, t)
        for k, s in shapes.items():
            g = _with_zeros(rng, rng.standard_normal(s) * scale).astype(np.float32)
            grads[k][t - 1] = round_to_dtype(g, case.dtype)
    if case.loss_scale is not None:
        grads = {k: (g * np.float32(case.loss_scale)).astype(np.float32) for k, g in grads.items()}
    return params, grads


# ----------------------------------------------------------------------------- storage helpers


def data_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays become Python values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}: {obj!r}")


def save(name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``data/<name>.npz`` (compressed) and ``data/<name>.json`` (sorted keys)."""
    os.makedirs(data_dir(), exist_ok=True)
    base = os.path.join(data_dir(), name)
    for k, a in arrays.items():
        if a.dtype not in (np.float32, np.int64, np.float64, np.bool_):
            raise TypeError(f"{name}: array {k} has dtype {a.dtype}; store float32/float64/int64/bool")
    np.savez_compressed(base + ".npz", **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds vs allow_pickle
    save_json(name, meta)


def save_json(name: str, obj: Any) -> None:
    """Write ``data/<name>.json`` (indented, sorted keys, numpy values converted)."""
    os.makedirs(data_dir(), exist_ok=True)
    with open(os.path.join(data_dir(), name + ".json"), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=json_default)
        f.write("\n")


def load(name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load ``data/<name>.npz`` and ``data/<name>.json``: ``(arrays, meta)``."""
    base = os.path.join(data_dir(), name)
    with np.load(base + ".npz") as z:
        arrays = {k: z[k] for k in z.files}
    with open(base + ".json") as f:
        meta = json.load(f)
    return arrays, meta


def group(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """``{'dense/kernel': ...}`` from the arrays named ``'<prefix>/dense/kernel'``."""
    p = prefix + "/"
    return {k[len(p) :]: v for k, v in arrays.items() if k.startswith(p)}
