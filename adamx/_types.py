"""Types every layer shares: annotation aliases and the ``update`` carrier.

The aliases name what a value is (a pytree, a dtype, a schedule) where Python's type
system has nothing precise: a pytree is any nesting of containers that JAX can flatten,
so :data:`PyTree` stays open, but an annotation that says ``PyTree`` tells the reader
more than ``Any``. :class:`Update` is the ``update`` function of an optax transformation
that carries the spec it was built from (optax rebuilds the ``NamedTuple`` of a
transformation from its fields, so the spec must live on one of them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeAlias, TypeVar

import jax
from jax.typing import ArrayLike as ArrayLike
from jax.typing import DTypeLike

# Any nesting of lists, tuples, dicts and registered nodes that ``jax.tree_util`` flattens.
PyTree: TypeAlias = Any
# One leaf of params, grads or state as the pieces pass it: an array (possibly traced), a
# Python/NumPy scalar, or None (no gradient); 8-bit moments are QuantizedArray leaves.
Leaf: TypeAlias = Any
# A dtype as JAX takes it (``jnp.float32``, ``"bfloat16"``, ``np.dtype(...)``).
DType: TypeAlias = DTypeLike
# A scalar hyperparameter: a Python/NumPy number or a 0-d (possibly traced) array.
Scalar: TypeAlias = float | int | jax.Array | ArrayLike
# A schedule: the step count in, the value at that step out.
Schedule: TypeAlias = Callable[[jax.Array], ArrayLike]
# A hyperparameter that may also be a schedule.
ScalarOrSchedule: TypeAlias = Scalar | Schedule

# A Keras config dict: JSON-like values (numbers, strings, bools, None, lists, nested configs).
KerasConfig: TypeAlias = dict[str, Any]

SpecT = TypeVar("SpecT")
StateT = TypeVar("StateT")


class Update(Generic[SpecT, StateT]):
    """``update(grads, state, params=None, **extra)`` of a transformation, carrying its ``spec``.

    ``step(spec, grads, state, params, **extra)`` does the work; the carrier keeps the spec
    where ``opt.update.spec`` finds it after optax rebuilds the transformation.

    Example:
      >>> upd = Update("my-spec", lambda spec, g, s, p, **extra: (g, s))
      >>> upd.spec, upd(1.0, None)
      ('my-spec', (1.0, None))
    """

    __name__ = "update"

    def __init__(self, spec: SpecT, step: Callable[..., tuple[PyTree, StateT]]) -> None:
        self.spec = spec
        self.step = step

    def __call__(
        self, grads: PyTree, state: StateT, params: PyTree | None = None, **extra: object
    ) -> tuple[PyTree, StateT]:
        return self.step(self.spec, grads, state, params, **extra)


def spec_of(update: Callable[..., object], spec_type: type[SpecT]) -> SpecT:
    """The spec an :class:`Update` carries, checked to be a ``spec_type``."""
    spec = getattr(update, "spec", None)
    if not isinstance(spec, spec_type):
        raise TypeError(f"this transformation's `update` carries no {spec_type.__name__}; build it with its factory.")
    return spec
