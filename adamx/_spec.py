"""``AdamSpec``: the typed, frozen description of an ``adamx.adam`` optimizer.

Every option of :func:`adamx.adam` is a field here, validated once when the spec is built.
The values the step needs besides the raw options (the accumulation window, whether weight
decay is on, the clip mode, the state dtypes) are derived here and nowhere else. The spec is
carried by the optimizer (``opt.spec``), read by the reference step (``adamx._step``), the
state layout (``adamx._state``), the fused kernel's plan (``adamx.fused``) and the Keras
config writer (:meth:`AdamSpec.keras_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _decay, _hyper, _tree, schedules

ClipMode = Literal["none", "norm", "global_norm", "value"]
StateField = Literal["mu", "nu", "nu_max", "acc", "ema", "comp"]
STATE_FIELDS: tuple[StateField, ...] = ("mu", "nu", "nu_max", "acc", "ema")

# The keys Keras 3's Adam.get_config() prints, in its order.
KERAS3_KEYS = (
    "name",
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "beta_1",
    "beta_2",
    "epsilon",
    "amsgrad",
)
# adamx's own options, written into a config only with include_adamx=True.
ADAMX_KEYS = (
    "exclude_from_weight_decay",
    "mu_dtype",
    "nu_dtype",
    "param_rounding",
    "seed",
    "acc_dtype",
    "flat_state",
    "quantize_moments",
    "quantize_block_size",
    "quantize_min_size",
)
# a config writes the quantization options only when quantize_moments is on
_QUANTIZE_DEFAULTS = ("quantize_moments", "quantize_block_size", "quantize_min_size")
ParamRounding = Literal["nearest", "kahan", "stochastic"]
PARAM_ROUNDINGS: tuple[ParamRounding, ...] = ("nearest", "kahan", "stochastic")
_CLIP_ARGS = ("clipnorm", "clipvalue", "global_clipnorm")


class AdamOptions(TypedDict, total=False):
    """adamx's own keyword-only options of :func:`adamx.adam` (fields of :class:`AdamSpec`)."""

    mu_dtype: Any
    nu_dtype: Any
    param_rounding: ParamRounding
    seed: int
    acc_dtype: Any
    flat_state: bool
    quantize_moments: bool
    quantize_block_size: int
    quantize_min_size: int
    quantize_mask: Any


def _mask_leaves(params: Any, mask: Any, name: str) -> list[bool]:
    """A pytree of bools like params (or a prefix), or a callable ``params -> such a tree``, as one bool per leaf."""
    m = mask(params) if callable(mask) else mask
    try:
        per_leaf = jax.tree.map(lambda mk, sub: [mk] * len(jax.tree_util.tree_leaves(sub)), m, params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"`{name}` must be a pytree of bools shaped like params (or a prefix of it): {e}") from e
    lists = jax.tree_util.tree_leaves(per_leaf, is_leaf=lambda x: isinstance(x, list))
    out = [v for lst in lists for v in lst]
    for v in out:
        if not isinstance(v, bool):
            raise ValueError(f"`{name}` leaves must be Python bools, got {v!r}.")
    return out


def check_moment_dtype(name: str, dtype: Any) -> None:
    """``dtype`` must be ``None`` or a floating dtype that can hold a moment (bfloat16, float32, float64;
    float16 for the first moment only): a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if dtype is None:
        return
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"`{name}` must be a dtype such as jnp.float32 or jnp.bfloat16, got {dtype!r}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating dtype (bfloat16, float32, float64), got {dt.name}: the moments are "
            "real numbers (complex params get complex first moments by themselves)."
        )
    if dt.itemsize < 2:
        raise ValueError(f"`{name}={dt.name}` cannot hold Adam's moments: use bfloat16, float32 or float64.")
    if dt == jnp.dtype(jnp.float16) and name == "nu_dtype":
        raise ValueError(
            "`nu_dtype=float16` cannot hold the second moment: g*g underflows to 0 in float16 for "
            "|g| < 2.4e-4 (and overflows above 256), which turns Adam's step into lr*m/epsilon. "
            "Use bfloat16 (same size, float32's range) or float32."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class AdamSpec:
    """All options of :func:`adamx.adam`, validated at construction.

    The Keras arguments are documented in :func:`adamx.adam`. adamx's own options
    (keyword-only in ``adam``, listed in :class:`AdamOptions`):

    - ``mu_dtype``, ``nu_dtype``: storage dtypes of the moments (e.g. ``jnp.bfloat16``);
      default float32 for float32/bfloat16/float16 params (the params' dtype if wider).
    - ``param_rounding``: how a bfloat16/float16 param receives its update
      (docs/mixed_precision.md). ``"nearest"`` (default, Keras): ``p + u`` rounded to
      nearest, so updates under half a spacing of the param vanish. ``"kahan"``: the
      rounding error is kept in a compensation buffer in the param's dtype (state field
      ``comp``) and added to the next update. ``"stochastic"``: ``p + u`` rounded up or
      down at random with probability proportional to the distance (unbiased), the random
      bits a hash of ``(seed, count, leaf index, element index)``. float32 params: all three
      are ``"nearest"``.
    - ``seed``: the int seed of ``"stochastic"`` rounding.
    - ``acc_dtype``: storage dtype of the gradient-accumulation buffer (default float32 at
      least; e.g. ``jnp.bfloat16`` halves its memory, see docs/mixed_precision.md).
    - ``flat_state``: keep each per-parameter state field (``mu``, ``nu``, ``nu_max``,
      ``acc``, ``ema``) as one flat 1-D buffer per dtype (:class:`adamx.FlatBuffers`,
      params' leaves in tree order) instead of a tree like params. Same numbers; for
      models with many parameter tensors a jitted step then passes and compiles far fewer
      buffers (docs/performance.md). ``update`` then needs ``params``. Meant for
      single-device steps: flat buffers cannot follow the params' shardings.
    - ``quantize_moments``: store ``mu``, ``nu`` (and ``nu_max``) as 8-bit codes with one
      float32 scale per block of ``quantize_block_size`` elements (block-wise absmax,
      bitsandbytes' dynamic maps: signed for ``mu``, unsigned for ``nu``;
      :class:`adamx.QuantizedArray` leaves, docs/quantized_state.md). Each step
      dequantizes, runs the float32 Adam step and requantizes. Leaves with fewer than
      ``quantize_min_size`` elements, and leaves where ``quantize_mask`` (a pytree of
      bools like params, or a callable ``params -> pytree``) is ``False``, keep float32
      moments (``mu_dtype``/``nu_dtype`` apply to them). With ``flat_state=True`` the codes
      of the 8-bit leaves sit in one ``uint8`` buffer and their scales in one more
      (each leaf keeps its own blocks; adamx/_flat.py).

    Frozen: build a changed copy with ``dataclasses.replace(spec, ...)`` (validated again).
    Numeric options may be traced values (``optax.inject_hyperparams`` passes them); those
    cannot be checked and are used as given.

    Example:
      >>> import adamx
      >>> spec = adamx.AdamSpec(gradient_accumulation_steps=4, clipnorm=1.0)
      >>> spec.window, spec.clip_mode, spec.decay_on
      (4, 'norm', False)
    """

    learning_rate: _hyper.ScalarOrSchedule = 0.001
    beta_1: _hyper.ScalarOrSchedule = 0.9
    beta_2: _hyper.ScalarOrSchedule = 0.999
    epsilon: Any = 1e-7
    amsgrad: bool = False
    weight_decay: _hyper.ScalarOrSchedule | None = None
    clipnorm: Any = None
    clipvalue: Any = None
    global_clipnorm: Any = None
    use_ema: bool = False
    ema_momentum: Any = 0.99
    ema_overwrite_frequency: Any = None
    loss_scale_factor: Any = None
    gradient_accumulation_steps: Any = None
    exclude_from_weight_decay: Sequence[str] | None = None
    weight_decay_mask: _decay.MaskOrFn = None
    mu_dtype: Any = None
    nu_dtype: Any = None
    param_rounding: ParamRounding = "nearest"
    seed: int = 0
    acc_dtype: Any = None
    flat_state: bool = False
    quantize_moments: bool = False
    quantize_block_size: int = 256
    quantize_min_size: int = 4096
    quantize_mask: _decay.MaskOrFn = None
    name: str = "adam"

    @classmethod
    def build(cls, **kwargs: Any) -> AdamSpec:
        """``AdamSpec(**kwargs)``, with a ``TypeError`` naming an unknown option."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"adamx.adam got unknown option(s) {unknown}; the options are {names}.")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        _hyper.check_scalar("learning_rate", self.learning_rate, lo=0.0, allow_schedule=True)
        _hyper.check_scalar("beta_1", self.beta_1, lo=0.0, hi=1.0, hi_open=True, allow_schedule=True)
        _hyper.check_scalar("beta_2", self.beta_2, lo=0.0, hi=1.0, hi_open=True, allow_schedule=True)
        _hyper.check_scalar("epsilon", self.epsilon, lo=0.0)
        for flag in ("amsgrad", "use_ema", "flat_state"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"`{flag}` must be a bool, got {getattr(self, flag)!r}.")
        if self.weight_decay is not None:
            _hyper.check_scalar("weight_decay", self.weight_decay, lo=0.0, allow_schedule=True)
        set_clips = [k for k in _CLIP_ARGS if getattr(self, k) is not None]
        if len(set_clips) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: {', '.join(f'{k}={getattr(self, k)}' for k in set_clips)}."
            )
        for k in set_clips:
            _hyper.check_scalar(k, getattr(self, k), lo=0.0, lo_open=True)
        _hyper.check_scalar("ema_momentum", self.ema_momentum, lo=0.0, hi=1.0)
        _hyper.check_int("ema_overwrite_frequency", self.ema_overwrite_frequency, lo=1)
        _hyper.check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, lo=1)
        if self.loss_scale_factor is not None:
            _hyper.check_scalar("loss_scale_factor", self.loss_scale_factor, lo=0.0, lo_open=True)
        _decay.check_exclude(self.exclude_from_weight_decay)
        wdm = self.weight_decay_mask
        if wdm is not None and not callable(wdm) and not isinstance(wdm, (dict, list, tuple, bool)):
            if not hasattr(wdm, "__dataclass_fields__"):
                jax.tree_util.tree_structure(wdm)  # must at least be a pytree
        self._check_mixed_precision()
        if not isinstance(self.name, str):
            raise TypeError(f"`name` must be a str, got {self.name!r}.")
        check_moment_dtype("mu_dtype", self.mu_dtype)
        check_moment_dtype("nu_dtype", self.nu_dtype)
        self._check_quantize()

    def _check_quantize(self) -> None:
        if not isinstance(self.quantize_moments, bool):
            raise TypeError(f"`quantize_moments` must be a bool, got {self.quantize_moments!r}.")
        for k, lo in (("quantize_block_size", 1), ("quantize_min_size", 0)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"`{k}` must be an int >= {lo}, got {v!r}.")
        qm = self.quantize_mask
        if qm is not None and not callable(qm) and not isinstance(qm, (dict, list, tuple, bool)):
            jax.tree_util.tree_structure(qm)  # must at least be a pytree

    def _check_mixed_precision(self) -> None:
        if self.param_rounding not in PARAM_ROUNDINGS:
            raise ValueError(f"`param_rounding` must be one of {PARAM_ROUNDINGS}, got {self.param_rounding!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"`seed` must be an int, got {self.seed!r}.")
        if self.acc_dtype is not None:
            try:
                dt = jnp.dtype(self.acc_dtype)
            except TypeError as e:
                raise TypeError(f"`acc_dtype` must be a floating dtype or None, got {self.acc_dtype!r}.") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(f"`acc_dtype` must be a floating dtype or None, got {dt.name}.")

    # ------------------------------------------------------------------ derived values
    @property
    def window(self) -> Any:
        """The accumulation window ``k`` (``None`` without accumulation, also for ``k == 1``)."""
        k = self.gradient_accumulation_steps
        # Only a static 1 (a Python/NumPy int) switches accumulation off: an array (e.g. from
        # optax.inject_hyperparams, traced in `update`) may change, so it keeps the accumulator.
        if k is not None and isinstance(k, (int, np.integer)) and k == 1:
            return None
        return k

    @property
    def decay_on(self) -> bool:
        """Whether weight decay runs: ``None`` and a concrete 0 switch it off (Keras: ``if weight_decay``)."""
        wd = self.weight_decay
        return not (wd is None or (_hyper.concrete(wd) == 0.0 and not _hyper.is_schedule(wd)))

    @property
    def exclude(self) -> list[str] | None:
        """The ``exclude_from_weight_decay`` patterns as a list, ``None`` when empty."""
        return list(self.exclude_from_weight_decay) if self.exclude_from_weight_decay else None

    @property
    def clip_mode(self) -> ClipMode:
        """Which clipping runs: per-tensor ``norm``, ``global_norm``, element ``value``, or ``none``."""
        if self.clipnorm is not None:
            return "norm"
        if self.global_clipnorm is not None:
            return "global_norm"
        if self.clipvalue is not None:
            return "value"
        return "none"

    @property
    def clip_threshold(self) -> Any:
        """The threshold of :attr:`clip_mode` (``None`` for ``none``)."""
        return {"norm": self.clipnorm, "global_norm": self.global_clipnorm, "value": self.clipvalue}.get(self.clip_mode)

    @property
    def needs_params(self) -> bool:
        """``update`` must be given the params (weight decay, the EMA and param_rounding read them; flat
        state too; 8-bit moments take their leaves' shapes from them)."""
        return self.decay_on or self.use_ema or self.quantize_moments or self.param_rounding != "nearest"

    @property
    def fields_on(self) -> tuple[StateField, ...]:
        """The per-parameter state fields this spec keeps (the others hold ``None``)."""
        on = {"mu": True, "nu": True, "nu_max": self.amsgrad, "acc": self.window is not None, "ema": self.use_ema}
        kahan: tuple[StateField, ...] = ("comp",) if self.param_rounding == "kahan" else ()
        return tuple(f for f in STATE_FIELDS if on[f]) + kahan

    def quantized_leaves(self, params: Any) -> list[bool]:
        """Which leaves of ``params`` keep 8-bit ``mu``/``nu``/``nu_max`` (leaf order).

        A leaf is quantized when ``quantize_moments`` is on, it has at least
        ``quantize_min_size`` elements, its dtype is floating, and ``quantize_mask``
        (``True`` = quantize) allows it.
        """
        leaves = jax.tree_util.tree_leaves(params)
        if not self.quantize_moments:
            return [False] * len(leaves)
        on = [True] * len(leaves)
        if self.quantize_mask is not None:
            on = _mask_leaves(params, self.quantize_mask, "quantize_mask")
        return [
            bool(q)
            and int(np.prod(jnp.shape(p), dtype=np.int64)) >= self.quantize_min_size
            and jnp.issubdtype(jnp.result_type(p), jnp.floating)
            for q, p in zip(on, leaves)
        ]

    def state_dtype(self, field: StateField, param_dtype: Any) -> jnp.dtype:
        """Storage dtype of ``field`` for a parameter of ``param_dtype``."""
        if field in ("mu",):
            return _tree.state_dtype(param_dtype, self.mu_dtype)
        if field in ("nu", "nu_max"):  # real also for complex params: the moment of |g|^2 (optax)
            return _tree.state_dtype(_tree.real_dtype(param_dtype), self.nu_dtype)
        if field == "acc":
            return _tree.state_dtype(param_dtype, self.acc_dtype)
        if field == "comp":  # kahan compensation: in the param's dtype
            return jnp.dtype(param_dtype)
        return _tree.compute_dtype(param_dtype)  # acc, ema: float32 at least

    # ------------------------------------------------------------------ Keras config
    @property
    def hyperparams(self) -> dict[str, Any]:
        """The options as a dict keyed by argument name (what ``adamx.adam`` was called with)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def keras_config(self, *, include_adamx: bool = False) -> dict[str, Any]:
        """The Keras 3 ``Adam.get_config()`` dict (see :func:`adamx.to_keras_config`)."""
        lr = self.learning_rate
        if isinstance(lr, schedules.KerasSchedule):
            lr_out: Any = lr.serialize()
        elif callable(lr):
            raise ValueError(
                "`learning_rate` is a schedule that is not one of adamx.schedules: it has no Keras config."
            )
        else:
            lr_out = float(np.float32(lr))
        for k in ("beta_1", "beta_2", "weight_decay"):
            if callable(getattr(self, k)):
                raise ValueError(f"`{k}` is a schedule: Keras's config has no place for it.")
        if self.weight_decay_mask is not None:
            raise ValueError("`weight_decay_mask` cannot be written into a config; use exclude_from_weight_decay.")
        out: dict[str, Any] = {"name": self.name, "learning_rate": lr_out}
        for k in KERAS3_KEYS[2:]:
            v = getattr(self, k)
            out[k] = float(v) if isinstance(v, (np.floating, np.integer)) and not isinstance(v, bool) else v
        extra = {
            k: getattr(self, k) for k in ADAMX_KEYS if getattr(self, k) is not None and getattr(self, k) is not False
        }
        if not self.quantize_moments:  # the block and min sizes mean nothing then
            for k in _QUANTIZE_DEFAULTS:
                extra.pop(k, None)
        if self.quantize_mask is not None:
            raise ValueError("`quantize_mask` cannot be written into a config.")
        if extra.get("param_rounding") == "nearest":
            extra.pop("param_rounding")
        if extra.get("seed") == 0:
            extra.pop("seed")
        if not include_adamx:
            extra.pop("flat_state", None)  # a storage layout, not a semantic: Keras needs no key for it
        if extra and not include_adamx:
            raise ValueError(
                f"Keras's Adam config has no key for {sorted(extra)}; pass include_adamx=True to add them "
                "(Keras itself will then refuse the config)."
            )
        for k, v in extra.items():
            if k in ("flat_state", "quantize_moments"):
                out[k] = bool(v)
            elif k in ("quantize_block_size", "quantize_min_size"):
                out[k] = int(v)
            elif k in ("param_rounding", "seed"):
                out[k] = v
            else:
                out[k] = list(v) if k == "exclude_from_weight_decay" else np.dtype(v).name
        return out
