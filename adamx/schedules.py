"""Keras 3's learning-rate schedules, as optax schedules ``count -> value``.

Each class computes exactly what ``keras.optimizers.schedules.<Name>`` computes (same
float32 operations, same boundary rules), is a plain callable usable anywhere optax
takes a schedule, and writes/reads Keras's serialized form
(``{'module': 'keras.optimizers.schedules', 'class_name': ..., 'config': ...}``).

``adamx.adam`` calls a schedule with the number of ``update`` calls made before this
one, as Keras calls it with ``optimizer.iterations`` before the increment: the first
step uses ``schedule(0)``.

Example:
  >>> import adamx
  >>> sched = adamx.schedules.PiecewiseConstantDecay([5, 15], [0.01, 0.005, 0.001])
  >>> [round(float(sched(s)), 4) for s in (0, 5, 6, 15, 16)]
  [0.01, 0.01, 0.005, 0.005, 0.001]
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from adamx._types import ArrayLike, KerasConfig

_MODULE = "keras.optimizers.schedules"


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"Argument `{name}` must be > 0. Received: {name}={value}")


class KerasSchedule:
    """Base: a callable ``count -> learning rate`` with Keras's ``get_config``.

    Each schedule is a dataclass whose fields, in order, are the keys of Keras's config.
    """

    class_name: ClassVar[str]

    def __call__(self, count: ArrayLike) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config(self) -> KerasConfig:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def serialize(self) -> KerasConfig:
        """Keras's serialized form, as found in ``Adam.get_config()['learning_rate']``."""
        return {"module": _MODULE, "class_name": self.class_name, "config": self.get_config(), "registered_name": None}

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, KerasSchedule) and type(self) is type(other) and self.get_config() == other.get_config()
        )

    def __hash__(self) -> int:
        return hash((type(self), repr(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@dataclasses.dataclass(eq=False)
class ExponentialDecay(KerasSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (floored if ``staircase``)."""

    class_name = "ExponentialDecay"

    initial_learning_rate: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False
    name: str = "ExponentialDecay"

    def __post_init__(self) -> None:
        _positive("decay_steps", self.decay_steps)

    def __call__(self, count: ArrayLike) -> jax.Array:
        p = _f32(count) / _f32(self.decay_steps)
        if self.staircase:
            p = jnp.floor(p)
        return _f32(self.initial_learning_rate) * jnp.power(_f32(self.decay_rate), p)


@dataclasses.dataclass(eq=False)
class PiecewiseConstantDecay(KerasSchedule):
    """``values[0]`` while ``step <= boundaries[0]``, ``values[i]`` on ``(b[i-1], b[i]]``, ``values[-1]`` after."""

    class_name = "PiecewiseConstantDecay"

    boundaries: list[float]
    values: list[float]
    name: str = "PiecewiseConstant"

    def __post_init__(self) -> None:
        if len(self.boundaries) != len(self.values) - 1:
            raise ValueError(
                "The length of boundaries should be 1 less than the length of values. "
                f"Received: boundaries={self.boundaries} of length {len(self.boundaries)}, and "
                f"values={self.values} of length {len(self.values)}."
            )
        self.boundaries = list(self.boundaries)
        self.values = list(self.values)

    def __call__(self, count: ArrayLike) -> jax.Array:
        step = jnp.asarray(count)
        b = [jnp.asarray(x).astype(step.dtype) for x in self.boundaries]
        vals = [_f32(v) for v in self.values]
        out = (step <= b[0]).astype(jnp.float32) * vals[0]
        out = out + (step > b[-1]).astype(jnp.float32) * vals[-1]
        for low, high, v in zip(b[:-1], b[1:], vals[1:-1]):
            out = out + ((step > low) & (step <= high)).astype(jnp.float32) * v
        return out


@dataclasses.dataclass(eq=False)
class PolynomialDecay(KerasSchedule):
    """``(init - end) * (1 - step/decay_steps) ** power + end``; ``cycle`` restarts at multiples."""

    class_name = "PolynomialDecay"

    initial_learning_rate: float
    decay_steps: int
    end_learning_rate: float = 0.0001
    power: float = 1.0
    cycle: bool = False
    name: str = "PolynomialDecay"

    def __post_init__(self) -> None:
        _positive("decay_steps", self.decay_steps)

    def __call__(self, count: ArrayLike) -> jax.Array:
        init = _f32(self.initial_learning_rate)
        end = _f32(self.end_learning_rate)
        step = _f32(count)
        steps = _f32(self.decay_steps)
        if self.cycle:
            mult = jnp.where(step == 0, 1.0, jnp.ceil(step / self.decay_steps))
            steps = steps * mult
        else:
            step = jnp.minimum(step, steps)
        p = step / steps
        return (init - end) * jnp.power(1 - p, _f32(self.power)) + end


@dataclasses.dataclass(eq=False)
class InverseTimeDecay(KerasSchedule):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)`` (floored if ``staircase``)."""

    class_name = "InverseTimeDecay"

    initial_learning_rate: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False
    name: str = "InverseTimeDecay"

    def __post_init__(self) -> None:
        _positive("decay_steps", self.decay_steps)

    def __call__(self, count: ArrayLike) -> jax.Array:
        p = _f32(count) / _f32(self.decay_steps)
        if self.staircase:
            p = jnp.floor(p)
        return _f32(self.initial_learning_rate) / (_f32(1) + _f32(self.decay_rate) * p)


@dataclasses.dataclass(eq=False)
class CosineDecay(KerasSchedule):
    """Cosine decay to ``alpha * lr`` over ``decay_steps``, after an optional linear warmup."""

    class_name = "CosineDecay"

    initial_learning_rate: float
    decay_steps: int
    alpha: float = 0.0
    name: str = "CosineDecay"
    warmup_target: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _positive("decay_steps", self.decay_steps)

    def _decay(self, step: jax.Array, decay_steps: jax.Array, from_lr: jax.Array) -> jax.Array:
        frac = step / decay_steps
        cosine = 0.5 * (1.0 + jnp.cos(_f32(math.pi) * frac))
        return from_lr * ((1 - self.alpha) * cosine + self.alpha)

    def __call__(self, count: ArrayLike) -> jax.Array:
        init = _f32(self.initial_learning_rate)
        decay_steps = _f32(self.decay_steps)
        step = _f32(count)
        if self.warmup_target is None:
            return self._decay(jnp.minimum(step, decay_steps), decay_steps, init)
        target = _f32(self.warmup_target)
        warm = _f32(self.warmup_steps)
        step = jnp.minimum(step, decay_steps + warm)
        warmup = (target - init) * (step / warm) + init
        return jnp.where(step < warm, warmup, self._decay(step - warm, decay_steps, target))


@dataclasses.dataclass(eq=False)
class CosineDecayRestarts(KerasSchedule):
    """SGDR: cosine decay restarting after ``first_decay_steps * t_mul**i`` steps, scaled by ``m_mul**i``."""

    class_name = "CosineDecayRestarts"

    initial_learning_rate: float
    first_decay_steps: int
    t_mul: float = 2.0
    m_mul: float = 1.0
    alpha: float = 0.0
    name: str = "SGDRDecay"

    def __post_init__(self) -> None:
        _positive("first_decay_steps", self.first_decay_steps)

    def __call__(self, count: ArrayLike) -> jax.Array:
        init = _f32(self.initial_learning_rate)
        alpha = _f32(self.alpha)
        t_mul = _f32(self.t_mul)
        m_mul = _f32(self.m_mul)
        frac = _f32(count) / _f32(self.first_decay_steps)
        if self.t_mul == 1.0:
            i_restart = jnp.floor(frac)
            frac = frac - i_restart
        else:
            i_restart = jnp.floor(jnp.log(1.0 - frac * (1.0 - t_mul)) / jnp.log(t_mul))
            sum_r = (1.0 - jnp.power(t_mul, i_restart)) / (1.0 - t_mul)
            frac = (frac - sum_r) / jnp.power(t_mul, i_restart)
        m_fac = jnp.power(m_mul, i_restart)
        cosine = 0.5 * m_fac * (1.0 + jnp.cos(_f32(math.pi) * frac))
        return init * ((1 - alpha) * cosine + alpha)


SCHEDULES: dict[str, type[KerasSchedule]] = {
    c.class_name: c
    for c in (
        ExponentialDecay,
        PiecewiseConstantDecay,
        PolynomialDecay,
        InverseTimeDecay,
        CosineDecay,
        CosineDecayRestarts,
    )
}


def deserialize(config: KerasConfig) -> KerasSchedule:
    """Build a schedule from Keras's serialized dict (``{'class_name': ..., 'config': ...}``)."""
    if not isinstance(config, dict) or "class_name" not in config or "config" not in config:
        raise ValueError(f"A serialized schedule needs 'class_name' and 'config' keys, got {config!r}.")
    name = config["class_name"]
    if name not in SCHEDULES:
        raise ValueError(f"Unknown learning-rate schedule {name!r}; adamx knows {sorted(SCHEDULES)}.")
    return SCHEDULES[name](**config["config"])


__all__ = [
    "KerasSchedule",
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
    "deserialize",
]
