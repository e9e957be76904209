"""Hyperparameters: validation at construction, evaluation at a step.

A numeric hyperparameter is a Python number, a NumPy/JAX scalar, or (where the
signature says so) a schedule ``count -> value``. Concrete values are checked at
construction; traced values (``optax.inject_hyperparams`` passes them inside
``update``) cannot be checked and are used as given.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from adamx._types import DType
from adamx._types import ScalarOrSchedule as ScalarOrSchedule
from adamx._types import Schedule as Schedule


def concrete(x: object) -> float | None:
    """``float(x)`` when ``x`` is a concrete scalar, else ``None``."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        if np.ndim(x) != 0:
            return None
        try:
            return float(x)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return None
    return None


def _type_error(name: str, x: object, what: str) -> TypeError:
    return TypeError(f"`{name}` must be {what}, got {x!r} of type {type(x).__name__}.")


def check_scalar(
    name: str,
    x: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_schedule: bool = False,
    what: str | None = None,
) -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``name`` if ``x`` is out of range.

    ``x`` must be finite. Schedules (callables) are accepted only when
    ``allow_schedule``; their values are not checked. Traced values are not checked.
    """
    if callable(x) and not isinstance(x, (jax.Array, np.ndarray)):
        if allow_schedule:
            return
        raise _type_error(name, x, "a number (schedules are not accepted here)")
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.ndarray, np.generic, jax.Array)):
        raise _type_error(name, x, "a number" + (" or a schedule `count -> value`" if allow_schedule else ""))
    if isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) != 0 and not isinstance(x, jax.core.Tracer):
        raise ValueError(f"`{name}` must be a scalar, got an array of shape {np.shape(x)}.")
    v = concrete(x)
    if v is None:
        return
    rng = what or _range_text(lo, hi, lo_open, hi_open)
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {v!r}.")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"`{name}` must be {rng}, got {v!r}.")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"`{name}` must be {rng}, got {v!r}.")


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


def check_int(name: str, x: object, *, lo: int) -> None:
    """``x`` must be ``None`` or an integer ``>= lo`` (traced integers pass)."""
    if x is None:
        return
    if isinstance(x, jax.core.Tracer):
        return
    if isinstance(x, bool) or not (
        isinstance(x, numbers.Integral)
        or (
            isinstance(x, (np.ndarray, np.generic, jax.Array))
            and np.ndim(x) == 0
            and np.issubdtype(np.asarray(x).dtype, np.integer)
        )
    ):
        raise ValueError(f"`{name}` must be an integer >= {lo} or None, got {x!r}.")
    if int(x) < lo:
        raise ValueError(f"`{name}` must be an integer >= {lo} or None, got {int(x)}.")


def value_at(x: ScalarOrSchedule, count: jax.Array, dtype: DType = jnp.float32) -> jax.Array:
    """The value of a scalar-or-schedule at step ``count``, as a 0-d array of ``dtype``."""
    if callable(x) and not isinstance(x, (jax.Array, np.ndarray)):
        x = x(count)
    return jnp.asarray(x, dtype)


def one_minus(b: ScalarOrSchedule, b_now: jax.Array, dtype: DType, *, keras_rounding: bool) -> jax.Array:
    """``1 - b`` as the moment updates use it.

    Keras computes ``1 - beta`` in Python float64 and rounds once to the variable
    dtype (``f32(1 - 0.9) = 0.10000000149``); TF1 computes it in the variable dtype
    (``1 - f32(0.9) = 0.10000002384``). For schedules and traced values both round
    like TF1, since the subtraction happens on device.
    """
    if keras_rounding:
        v = concrete(b) if not callable(b) or isinstance(b, (jax.Array, np.ndarray)) else None
        if v is not None:
            return jnp.asarray(1.0 - v, dtype)
    return jnp.asarray(1, dtype) - b_now.astype(dtype)


def is_schedule(x: object) -> bool:
    return callable(x) and not isinstance(x, (jax.Array, np.ndarray))
