"""``loss_scale_optimizer``: Keras 3's dynamic ``LossScaleOptimizer`` as an optax transformation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamx import fused
from adamx._adam import Adam
from adamx._types import Leaf, Update, spec_of

AxisName = Hashable | Sequence[Hashable]

# Keras's LossScaleOptimizer.__init__ accepts these base-optimizer keys in a config only at
# their defaults (backwards compatibility with configs of older Keras versions).
_KERAS_BASE_DEFAULTS: dict[str, Leaf] = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}
_KERAS_KEYS = ("name", "inner_optimizer", "initial_scale", "dynamic_growth_steps")
_ADAMX_KEYS = ("min_scale", "max_scale")


class LossScaleState(NamedTuple):
    """State of :func:`loss_scale_optimizer`. Field names are the checkpoint format."""

    scale: jax.Array  # shape=(), dtype=float32; the loss scale (Keras `dynamic_scale`)
    step_counter: jax.Array  # shape=(), dtype=int32; finite steps since the scale last changed (Keras `step_counter`)
    skipped_steps: jax.Array  # shape=(), dtype=int32; total skipped (non-finite) steps, saturating; not in Keras
    inner_state: optax.OptState  # the wrapped transformation's state, untouched on skipped steps


@dataclasses.dataclass(frozen=True, eq=False)
class LossScaleSpec:
    """The options of a :func:`loss_scale_optimizer` (validated when built)."""

    inner: Leaf
    initial_scale: float = 2.0**15
    dynamic_growth_steps: int = 2000
    min_scale: float | None = None
    max_scale: float | None = None
    axis_name: Leaf = None
    name: str = "loss_scale_optimizer"


def _update(
    spec: LossScaleSpec, grads: optax.Updates, state: LossScaleState, params: optax.Params | None = None, **extra: Leaf
) -> tuple[optax.Updates, LossScaleState]:
    """``update`` of a :class:`LossScaleOptimizer` (its :class:`adamx._types.Update` carries ``spec``)."""
    inner_tx = optax.with_extra_args_support(spec.inner)

    def inner_step(unscaled: Leaf, inner_state: Leaf, params: Leaf) -> tuple[Leaf, Leaf]:
        return inner_tx.update(unscaled, inner_state, params, **extra)

    return _scaled_step(spec, grads, state, params, inner_step, keep_params=False)


class LossScaleOptimizer(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` with ``spec``, ``apply_gradients`` and ``get_config``."""

    @property
    def spec(self) -> LossScaleSpec:
        """The options this loss scaler was built with."""
        return spec_of(self.update, LossScaleSpec)

    @property
    def hyperparams(self) -> dict[str, Leaf]:
        """The options as a dict keyed by argument name (``inner`` is the wrapped transformation)."""
        return {f.name: getattr(self.spec, f.name) for f in dataclasses.fields(self.spec)}

    def apply_gradients(self, grads: optax.Updates, state: LossScaleState, params: optax.Params) -> tuple[Leaf, Leaf]:
        """``update`` then ``optax.apply_updates`` in one call: ``(new_params, new_state)``.

        The inner step runs inside ``jax.lax.cond`` on the finite flag, through the
        inner transformation's own ``apply_gradients`` where it has one (the fused CPU
        step of :func:`adamx.adam`). A skipped step returns ``params`` as they came.
        """
        inner = self.spec.inner

        def inner_step(unscaled: Leaf, inner_state: Leaf, params: Leaf) -> tuple[Leaf, Leaf]:
            if hasattr(inner, "apply_gradients"):
                return inner.apply_gradients(unscaled, inner_state, params)
            return fused.apply_gradients(optax.with_extra_args_support(inner), unscaled, inner_state, params)

        return _scaled_step(self.spec, grads, state, params, inner_step, keep_params=True)

    def get_config(self, *, include_adamx: bool = False) -> dict[str, Leaf]:
        """The dict Keras's ``LossScaleOptimizer.get_config()`` prints (see :func:`loss_scale_to_keras_config`)."""
        return loss_scale_to_keras_config(self, include_adamx=include_adamx)


def _same_types(new: Leaf, old: Leaf) -> Leaf:
    """``lax.cond`` needs both branches to return the same types: keep the input's."""
    return jax.tree.map(lambda n, o: jnp.asarray(n, jnp.asarray(o).dtype), new, old)


def _check_state(state: Leaf) -> None:
    if not isinstance(state, LossScaleState):
        raise ValueError(
            f"`state` is a {type(state).__name__}, not the LossScaleState of adamx.loss_scale_optimizer (a bare "
            "inner state?): build it with this loss scaler's `init`, which wraps the inner state."
        )


def _next_scalars(
    spec: LossScaleSpec, finite: jax.Array, state: LossScaleState
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The scale, growth counter and skip count after a step (Keras's rule, optional bounds)."""
    grow = state.step_counter == spec.dynamic_growth_steps - 1
    up = state.scale * jnp.float32(2.0)
    if spec.max_scale is not None:
        up = jnp.minimum(up, jnp.float32(spec.max_scale))
    down = state.scale * jnp.float32(0.5)
    if spec.min_scale is not None:
        down = jnp.maximum(down, jnp.float32(spec.min_scale))
    scale = jnp.where(finite, jnp.where(grow, up, state.scale), down)
    counter = jnp.where(finite & ~grow, state.step_counter + 1, jnp.zeros_like(state.step_counter))
    skipped = jnp.where(finite, state.skipped_steps, optax.safe_int32_increment(state.skipped_steps))
    return scale, counter, skipped


def _scaled_step(
    spec: LossScaleSpec, grads: Leaf, state: LossScaleState, params: Leaf, inner_step: Leaf, *, keep_params: bool
) -> tuple[Leaf, LossScaleState]:
    """One step: ``inner_step(grads / scale, ...)`` if every gradient is finite, else the
    skipped step; then the scale update. A skipped step returns ``params`` as they came
    (``keep_params``, ``apply_gradients``) or zero updates with the inner step's types
    (``update``: the inner step decides the update dtypes, e.g. the params', not the grads')."""
    _check_state(state)
    finite = all_finite(grads, spec.axis_name)
    inner_in = jax.tree.map(jnp.asarray, state.inner_state)
    scale = state.scale

    def apply_branch(inner_state: Leaf, params: Leaf) -> tuple[Leaf, Leaf]:
        out, new_inner = inner_step(jax.tree.map(lambda g: _unscale(g, scale), grads), inner_state, params)
        return out, _same_types(new_inner, inner_state)

    if keep_params:
        out_like: Leaf = params
    else:
        out_like = jax.eval_shape(lambda s, p: apply_branch(s, p)[0], inner_in, params)

    def applied(inner_state: Leaf, params: Leaf) -> tuple[Leaf, Leaf]:
        out, new_inner = apply_branch(inner_state, params)
        return (_same_types(out, params) if keep_params else out), new_inner

    def skipped(inner_state: Leaf, params: Leaf) -> tuple[Leaf, Leaf]:
        out = params if keep_params else jax.tree.map(jnp.zeros_like, out_like)
        return out, inner_state

    out, new_inner = jax.lax.cond(finite, applied, skipped, inner_in, params)
    scale, counter, n_skipped = _next_scalars(spec, finite, state)
    return out, LossScaleState(scale, counter, n_skipped, new_inner)


def _check_scale(name: str, value: Leaf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive finite number, got {value!r}.")
    v = float(value)
    f32 = np.finfo(np.float32)
    if not (math.isfinite(v) and float(f32.smallest_normal) <= v <= float(f32.max)):
        raise ValueError(
            f"`{name}` must be a positive finite float32 number (normal, so it can be halved), got {value!r}."
        )
    return v


def _validate(
    inner: Leaf, initial_scale: Leaf, dynamic_growth_steps: Leaf, min_scale: Leaf, max_scale: Leaf, axis_name: Leaf
) -> None:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"`inner` must be an optax GradientTransformation, got {type(inner).__name__}.")
    init = _check_scale("initial_scale", initial_scale)
    if isinstance(dynamic_growth_steps, bool) or not isinstance(dynamic_growth_steps, numbers.Integral):
        raise TypeError(f"`dynamic_growth_steps` must be an int >= 1, got {dynamic_growth_steps!r}.")
    if not 1 <= int(dynamic_growth_steps) < 2**31 - 1:
        raise ValueError(f"`dynamic_growth_steps` must be an int >= 1, got {dynamic_growth_steps!r}.")
    lo = _check_scale("min_scale", min_scale) if min_scale is not None else None
    hi = _check_scale("max_scale", max_scale) if max_scale is not None else None
    if lo is not None and lo > init:
        raise ValueError(f"`min_scale` ({min_scale!r}) must be <= `initial_scale` ({initial_scale!r}).")
    if hi is not None and hi < init:
        raise ValueError(f"`max_scale` ({max_scale!r}) must be >= `initial_scale` ({initial_scale!r}).")
    if axis_name is not None and not isinstance(axis_name, (str, tuple)):
        raise TypeError(f"`axis_name` must be a mesh axis name (str) or a tuple of them, got {axis_name!r}.")


def all_finite(tree: Leaf, axis_name: AxisName | None = None) -> jax.Array:
    """``True`` when every element of every array leaf of ``tree`` is finite (a bool scalar).

    With ``axis_name`` (inside ``shard_map``/``pmap``) the flag is combined over those
    mesh axes with ``jax.lax.pmin``, so every device gets the same answer.
    """
    finite = jnp.asarray(True)
    for x in jax.tree.leaves(tree):
        if _is_float(x):  # integer, bool and float0 leaves are always finite
            finite = jnp.logical_and(finite, jnp.all(jnp.isfinite(x)))
    if axis_name is not None:
        finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) == 1
    return finite


def _is_float(x: Leaf) -> bool:
    return hasattr(x, "dtype") and bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _unscale(g: Leaf, scale: jax.Array) -> Leaf:
    # Keras: ops.divide(g, scale) with the float32 scale (result dtype: g's promoted with
    # float32), then the inner Adam casts the gradient to the variable dtype. Here the
    # quotient goes back to g's dtype, the same rounding for a float16/bfloat16 grad.
    if not _is_float(g):  # integer, bool and float0 gradients have nothing to unscale
        return g
    wide = g.dtype if jnp.dtype(g.dtype).itemsize >= 4 else jnp.dtype(jnp.float32)  # float32 or float64
    return (g.astype(wide) / scale.astype(wide)).astype(g.dtype)


def loss_scale_optimizer(
    inner: optax.GradientTransformation,
    initial_scale: float = 2.0**15,
    dynamic_growth_steps: int = 2000,
    *,
    min_scale: float | None = None,
    max_scale: float | None = None,
    axis_name: AxisName | None = None,
    name: str = "loss_scale_optimizer",
) -> LossScaleOptimizer:
    r"""Dynamic loss scaling around any optax transformation (Keras 3's ``LossScaleOptimizer``).

    Multiply the loss by :func:`loss_scale` ``(state)`` before taking gradients; the
    wrapper divides the gradients by the same scale. With ``s`` the scale and ``c`` the
    step counter in the state, one ``update`` is one Keras ``stateless_apply``:

    .. code-block:: text

        if all(isfinite(g)):                 # every leaf, every element
            updates, inner_state = inner.update(g / s, inner_state, params)   # the OLD s
            if c == dynamic_growth_steps - 1:  s = min(2 * s, max_scale);  c = 0
            else:                              c = c + 1
        else:                                # step skipped
            updates = 0                      # params, inner state and inner count unchanged
            s = max(s / 2, min_scale);  c = 0;  skipped_steps += 1

    So the scale doubles on every ``dynamic_growth_steps``-th consecutive finite step,
    and that step is still unscaled by the scale its loss was multiplied with.
    ``initial_scale`` is the scale of the first step. The scale is float32; the
    division happens in float32 (or wider) and is cast back to the gradient's dtype,
    which is what Keras's inner Adam sees for float16/bfloat16 variables.
    Without bounds (Keras) the scale can reach float32 ``inf`` after ~128 doublings or
    ``0`` after ~150 halvings; ``min_scale``/``max_scale`` clamp it (not in Keras).

    The inner step runs inside ``jax.lax.cond`` on the finite flag (as Keras does), so
    it is computed only on steps that are applied. Put the loss scaler outermost: a
    transformation chained *before* it sees scaled (possibly non-finite) gradients.

    Args:
      inner: the transformation to wrap: :func:`adamx.adam`, an ``optax.chain``, any
        ``GradientTransformation``. Extra ``update`` keyword arguments are passed on.
      initial_scale: > 0, the first loss scale (Keras default ``2**15``).
      dynamic_growth_steps: int >= 1: double the scale after this many consecutive
        finite steps.
      min_scale, max_scale: optional bounds for the scale, ``min_scale <=
        initial_scale <= max_scale``.
      axis_name: inside ``shard_map``/``pmap`` where each device holds different
        gradients (sharded params, or grads not yet averaged), the mesh axis name(s)
        over which the finite flag is combined (``jax.lax.pmin``), so that all devices
        skip the same steps. Not needed under ``jit`` with global (sharded) arrays.
      name: kept for ``get_config()``.

    Returns:
      A :class:`LossScaleOptimizer` with state :class:`LossScaleState`; also
      ``apply_gradients(grads, state, params) -> (params, state)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adamx
      >>> opt = adamx.loss_scale_optimizer(adamx.adam(0.1), initial_scale=1024.0, dynamic_growth_steps=2)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> loss = lambda p, s: jnp.sum(p["w"] ** 2) * s          # the scaled loss
      >>> for inject in (False, True, False, False):             # step 2 overflows
      ...     grads = jax.grad(loss)(params, adamx.loss_scale(state))
      ...     if inject:
      ...         grads = {"w": grads["w"].at[0].set(jnp.inf)}
      ...     updates, state = opt.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     print(float(adamx.loss_scale(state)), int(state.skipped_steps))
      1024.0 0
      512.0 1
      512.0 1
      1024.0 1
      >>> [round(x, 4) for x in params["w"].tolist()]
      [0.7016, -1.7006]
    """
    _validate(inner, initial_scale, dynamic_growth_steps, min_scale, max_scale, axis_name)
    spec = LossScaleSpec(
        inner=inner,
        initial_scale=float(initial_scale),
        dynamic_growth_steps=int(dynamic_growth_steps),
        min_scale=None if min_scale is None else float(min_scale),
        max_scale=None if max_scale is None else float(max_scale),
        axis_name=axis_name,
        name=name,
    )
    inner_tx = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> LossScaleState:
        return LossScaleState(
            scale=jnp.asarray(spec.initial_scale, jnp.float32),
            step_counter=jnp.zeros([], jnp.int32),
            skipped_steps=jnp.zeros([], jnp.int32),
            inner_state=inner_tx.init(params),
        )

    return LossScaleOptimizer(init_fn, Update(spec, _update))


def loss_scale(state: Leaf) -> jax.Array:
    """The current loss scale (float32 scalar): multiply the loss by it before ``jax.grad``.

    ``state`` is the :class:`LossScaleState`, or any optimizer state that holds exactly
    one (an ``optax.chain`` state, a Flax ``TrainState.opt_state``, an ``nnx.Optimizer``'s
    ``opt_state``).

    Example:
      >>> import jax.numpy as jnp, adamx
      >>> opt = adamx.loss_scale_optimizer(adamx.adam(), initial_scale=256.0)
      >>> float(adamx.loss_scale(opt.init({"w": jnp.ones(2)})))
      256.0
    """
    found = _scale_states(state)
    if len(found) != 1:
        raise ValueError(
            f"`state` must hold exactly one LossScaleState (from adamx.loss_scale_optimizer), found {len(found)}"
            + (
                " (a loss scaler nested inside another: which scale multiplies the loss is ambiguous)."
                if found
                else "."
            )
        )
    scale = found[0].scale
    if not isinstance(scale, (jax.Array, np.ndarray)) and hasattr(scale, "get_value"):
        scale = scale.get_value()  # an nnx Variable
    return jnp.asarray(scale, jnp.float32)


def _scale_states(state: Leaf) -> list[LossScaleState]:
    """Every :class:`LossScaleState` in ``state``, also those nested in another's ``inner_state``."""
    out: list[LossScaleState] = []
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LossScaleState)):
        if isinstance(s, LossScaleState):
            out += [s, *_scale_states(s.inner_state)]
    return out


def loss_scale_to_keras_config(opt: LossScaleOptimizer, *, include_adamx: bool = False) -> dict[str, Leaf]:
    """Keras's ``LossScaleOptimizer.get_config()`` dict for a :func:`loss_scale_optimizer`.

    ``{'name', 'inner_optimizer': <serialized inner>, 'initial_scale',
    'dynamic_growth_steps'}``, the inner written by :func:`adamx.to_keras_config` in the
    form ``keras.saving.serialize_keras_object`` prints. The inner must be an
    :func:`adamx.adam`/:func:`adamx.adamw`. ``min_scale``/``max_scale`` have no Keras
    key: set, they raise ``ValueError`` unless ``include_adamx=True`` adds them.
    """
    hp = opt.hyperparams
    inner = hp["inner"]
    if not isinstance(inner, Adam):
        raise ValueError(
            f"`inner` is a {type(inner).__name__}: only an adamx.adam/adamw inner optimizer has a Keras config."
        )
    extra = {k: hp[k] for k in _ADAMX_KEYS if hp[k] is not None}
    if extra and not include_adamx:
        raise ValueError(
            f"Keras's LossScaleOptimizer config has no key for {sorted(extra)}; pass include_adamx=True to add "
            "them (Keras itself will then refuse the config)."
        )
    inner_cfg = inner.spec.keras_config(include_adamx=include_adamx)
    out: dict[str, Leaf] = {
        "name": hp["name"],
        "inner_optimizer": {
            "module": "keras.optimizers",
            "class_name": "AdamW" if str(inner_cfg.get("name", "")).startswith("adam_w") else "Adam",
            "config": inner_cfg,
            "registered_name": None,
        },
        "initial_scale": hp["initial_scale"],
        "dynamic_growth_steps": hp["dynamic_growth_steps"],
    }
    out.update(extra)
    return out
