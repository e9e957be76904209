"""``adam`` and ``adamw``: every argument of Keras 3's ``keras.optimizers.Adam``.

The factories build an :class:`adamx.AdamSpec` (validated there) and wrap the step of
``adamx._step`` as an optax transformation; :meth:`Adam.apply_gradients` runs the fused
kernel of :mod:`adamx.fused` where it applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import optax

from adamx import _checks, _decay, _hyper, _state, _step, fused
from adamx._spec import AdamOptions, AdamSpec
from adamx._state import AdamState, AnyAdamState
from adamx._types import KerasConfig, Update, spec_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Adam", "AdamState", "adam", "adamw"]


def _update(
    spec: AdamSpec, grads: optax.Updates, state: AdamState, params: optax.Params | None = None, **extra: object
) -> tuple[optax.Updates, AdamState]:
    """``update(grads, state, params=None)`` of an :class:`Adam` (its :class:`adamx._types.Update` carries ``spec``)."""
    del extra
    _checks.check_state(spec, state, params, grads)
    if spec.flat_state:
        if params is None:
            raise ValueError("adamx.adam(flat_state=True) needs the params: call update(grads, state, params).")
        out = _step.update_flat(spec, grads, state, params)
        return out if out is not None else _step.update_flat_by_leaf(spec, grads, state, params)
    if params is None and spec.needs_params:
        raise ValueError(
            "adamx.adam with weight_decay, use_ema, param_rounding or quantize_moments needs the params: "
            "call update(grads, state, params)."
        )
    return _step.update_tree(spec, grads, state, params)


class Adam(optax.GradientTransformationExtraArgs):
    """The transformation :func:`adam` returns: ``init``, ``update``, its ``spec``, and
    :meth:`apply_gradients` (the fused step) and :meth:`get_config` (Keras's dict)."""

    @property
    def spec(self) -> AdamSpec:
        """The options this optimizer was built with (an :class:`adamx.AdamSpec`)."""
        return spec_of(self.update, AdamSpec)

    @property
    def hyperparams(self) -> dict[str, object]:
        """``spec.hyperparams``: the options as a dict keyed by argument name."""
        return self.spec.hyperparams

    def get_config(self) -> KerasConfig:
        """Keras 3's ``Adam.get_config()`` dict (see :func:`adamx.to_keras_config`)."""
        return self.spec.keras_config()

    def apply_gradients(
        self, grads: optax.Updates, state: AnyAdamState, params: optax.Params
    ) -> tuple[optax.Params, AnyAdamState]:
        """``update`` then ``optax.apply_updates`` in one call: ``(new_params, new_state)``.

        Same numbers as the two calls; on CPU one fused in-place pass over all leaves
        (see :func:`adamx.fused.apply_gradients`, docs/performance.md).
        """
        return fused.apply_gradients(self, grads, state, params)


def _spec_of(args: dict[str, object]) -> AdamSpec:
    """The spec of a factory call, from its ``locals()``: the named arguments and ``**options``."""
    args = dict(args)
    opts = dict(cast("dict[str, object]", args.pop("options")))  # the **options dict
    # optax.inject_hyperparams binds the signature and passes the var-keyword part back as
    # one argument named `options`: unfold it.
    nested = opts.pop("options", None)
    if isinstance(nested, dict):
        opts = {**nested, **opts}
    return AdamSpec.build(**args, **opts)


def from_spec(spec: AdamSpec) -> Adam:
    """The optimizer a spec describes (``adamx.adam(**spec.hyperparams)`` without re-validating)."""

    def init(params: optax.Params) -> AdamState:
        _checks.check_params(spec, params)
        return _state.init(spec, params)

    return Adam(init, Update(spec, _update))


def adam(
    learning_rate: _hyper.ScalarOrSchedule = 0.001,
    beta_1: _hyper.ScalarOrSchedule = 0.9,
    beta_2: _hyper.ScalarOrSchedule = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    weight_decay: _hyper.ScalarOrSchedule | None = None,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    weight_decay_mask: _decay.MaskOrFn = None,
    *,
    name: str = "adam",
    **options: Unpack[AdamOptions],
) -> Adam:
    r"""Adam with Keras 3's arguments, defaults and semantics.

    One call of ``update`` is one ``optimizer.apply`` of Keras. With ``n`` the number
    of earlier calls, ``k = gradient_accumulation_steps or 1`` and ``t = n // k + 1``:

    .. code-block:: text

        g   = grads / loss_scale_factor                        # if set
        # accumulation (k > 1): on micro-steps (n+1) % k != 0 only acc += g, no update
        g   = (g + acc) / k ;  acc = 0
        g   = clip(g)             # clipnorm: per tensor | global_clipnorm | clipvalue
        lr  = learning_rate(n)    # schedules see n, the raw call count (Keras)
        m   = m + (g - m) * (1 - beta_1)
        v   = v + (g*g - v) * (1 - beta_2)
        v_u = max(v_u, v) if amsgrad else v                    # max over RAW v
        alpha  = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
        params = params - params * weight_decay * lr           # decoupled, masked
        params = params - m * alpha / (sqrt(v_u) + epsilon)    # epsilon-hat form
        # use_ema: average all params (first step: average = params); every
        # ema_overwrite_frequency steps params <- average

    ``update`` returns the difference as optax ``updates``; apply it with
    ``optax.apply_updates``. Arithmetic is float32 (wider for float64 params) and,
    by default, the moments, accumulator and average are float32 too, also for
    bfloat16/float16 params. (Keras keeps them in the parameter dtype, where
    ``bf16(0.999) == 1`` freezes training.)

    .. warning::
       ``epsilon`` is "epsilon hat" (default ``1e-7``), added to ``sqrt(v)`` without
       bias correction, as in Keras and TF. optax's ``eps`` (default ``1e-8``) is added
       to the bias-corrected ``sqrt(v_hat)``; no constant optax ``eps`` reproduces this.

    Params leaves: float16, bfloat16, float32, float64 (x64), Python/NumPy scalars, and complex
    leaves, which follow optax's convention (complex ``m``, real ``v`` of ``|g|^2 =
    (conj(g) * g).real``; ``clipvalue`` and a ``mu_dtype`` are refused for them). Integer and
    bool leaves (e.g. step counters kept in params) are left alone: their gradient (also
    ``float0`` from ``jax.grad(..., allow_int=True)``) is ignored and their update is zeros.
    A ``None`` gradient leaves its leaf and moments alone; with ``params`` given its update
    is zeros in the params' dtype, so ``optax.apply_updates`` takes it. A state built for
    other params, other options or another optimizer is refused with a ``ValueError``
    naming the state field (docs/reliability.md).

    Non-finite gradients propagate (NaN in, NaN out) as in Keras; with
    ``global_clipnorm`` one non-finite gradient makes every update NaN. To skip such
    steps wrap the optimizer in ``optax.apply_if_finite``.

    Args:
      learning_rate: float >= 0 or a schedule ``count -> lr`` (see ``adamx.schedules``
        for Keras's schedules).
      beta_1, beta_2: in [0, 1), or schedules; the current value is used in
        ``beta^t`` and in ``1 - beta``, as Keras does with a variable beta.
      epsilon: >= 0, epsilon hat.
      amsgrad: Keras/PyTorch AMSGrad.
      weight_decay: decoupled decay rate (>= 0, or a schedule), scaled by the current lr.
      clipnorm: clip each gradient tensor to this L2 norm.
      clipvalue: clip each gradient element to ``[-clipvalue, clipvalue]``.
      global_clipnorm: clip all gradients together to this L2 norm. At most one of
        the three clip arguments may be set.
      use_ema: keep a moving average of the parameters (read it with
        :func:`adamx.finalize_variable_values`).
      ema_momentum: in [0, 1].
      ema_overwrite_frequency: ``None`` or int >= 1: every that many steps the params
        are set to their average.
      loss_scale_factor: gradients are divided by it first (> 0).
      gradient_accumulation_steps: ``None`` or int >= 1: average this many calls'
        gradients into one update.
      exclude_from_weight_decay: regexes; leaves whose key path (``a/b/c``) matches
        any are not decayed.
      weight_decay_mask: pytree of bools or callable ``params -> pytree``: ``True``
        leaves are decayed (optax convention).
      name: kept for ``get_config()``.
      **options: adamx's own keyword-only options (fields of :class:`adamx.AdamSpec`,
        documented there): ``mu_dtype``, ``nu_dtype`` (moment storage dtypes),
        ``param_rounding`` and ``seed`` (how bfloat16/float16 params receive their
        update: ``"nearest"``, ``"kahan"``, ``"stochastic"``; docs/mixed_precision.md),
        ``acc_dtype`` (accumulator storage dtype), ``flat_state`` (state fields as flat
        buffers), ``quantize_moments``, ``quantize_block_size``, ``quantize_min_size``,
        ``quantize_mask`` (8-bit moments).

    Returns:
      An :class:`Adam` (an ``optax.GradientTransformationExtraArgs``) with state
      :class:`AdamState`; its options are ``opt.spec`` (an :class:`adamx.AdamSpec`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, adamx
      >>> opt = adamx.adam(learning_rate=0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> [round(float(x), 4) for x in optax.apply_updates(params, updates)["w"]]
      [0.9, -1.9]
    """
    return from_spec(_spec_of(locals()))


def adamw(
    learning_rate: _hyper.ScalarOrSchedule = 0.001,
    weight_decay: _hyper.ScalarOrSchedule = 0.004,
    beta_1: _hyper.ScalarOrSchedule = 0.9,
    beta_2: _hyper.ScalarOrSchedule = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    weight_decay_mask: _decay.MaskOrFn = None,
    *,
    name: str = "adam_w",
    **options: Unpack[AdamOptions],
) -> Adam:
    """Keras 3's ``AdamW``: :func:`adam` with ``weight_decay=0.004`` by default.

    The argument order is Keras AdamW's (``weight_decay`` second). ``weight_decay``
    may not be ``None`` (Keras raises too).

    Example:
      >>> import adamx
      >>> adamx.adamw().spec.weight_decay
      0.004
    """
    if weight_decay is None:
        raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
    return from_spec(_spec_of(locals()))
