"""``AdamSpec``: the typed, frozen description of an ``adamx.adam`` optimizer.

Every option of :func:`adamx.adam` is a field here, validated once when the spec is built.
Each field carries an :class:`Option` (its ``dataclasses.field`` metadata): how it is
validated, its key in a Keras config (Keras's own, adamx's, or none) and how the config
writes and reads it, whether it is one of adamx's keyword-only options
(:class:`AdamOptions`), and what the fused kernel does with it. Validation, the config
writer (:meth:`AdamSpec.keras_config`) and reader (``adamx.from_keras_config``) and the
kernel's plan (``adamx.fused._plan.SUPPORTED``) all read that one table.

The values the step needs besides the raw options (the accumulation window, whether weight
decay is on, the clip mode, the state dtypes) are derived here and nowhere else. The spec is
carried by the optimizer (``opt.spec``), read by the reference step (``adamx._step``), the
state layout (``adamx._state``) and the fused kernel's plan (``adamx.fused``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypedDict, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from adamx import _clipping, _codecs, _decay, _hyper, _tree, schedules
from adamx._types import DType, KerasConfig, PyTree, Scalar, ScalarOrSchedule

ClipMode = Literal["none", "norm", "global_norm", "value"]
StateField = Literal["mu", "nu", "nu_max", "acc", "ema", "comp"]
STATE_FIELDS: tuple[StateField, ...] = ("mu", "nu", "nu_max", "acc", "ema")

# The keys Keras 3's Adam.get_config() prints, in its order (Keras's fact; each is the
# `Option(config="keras")` of the field of that name, which tests/test_spec_options.py checks).
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
MomentFormat = Literal["dynamic8", "fp8", "4bit"]  # and any name adamx._codecs.register adds
ParamRounding = Literal["nearest", "kahan", "stochastic"]
PARAM_ROUNDINGS: tuple[ParamRounding, ...] = ("nearest", "kahan", "stochastic")

# Where a field goes in a Keras config: Keras's own key (always written), an adamx key
# (written when set, with include_adamx=True), or nowhere (a set value cannot be written).
ConfigKey = Literal["keras", "adamx", "none"]
# What the fused kernel does with a field: "any" value runs fused; "moment_dtype" and
# "acc_dtype": the dtypes the kernel keeps run fused (adamx.fused._plan checks them); "moment_format":
# the formats whose codec has a kernel tag run fused;
# "fallback": the kernel does not implement it, a non-default value takes the reference step.
FusedSupport = Literal["any", "moment_dtype", "acc_dtype", "moment_format", "fallback"]
# What a field holds; a config writes each kind its own way (see Option.to_config).
Kind = Literal["number", "count", "flag", "int", "dtype", "choice", "str", "patterns", "mask"]
Check = Callable[[str, Any], None]
T = TypeVar("T")
Convert = Callable[[Any], Any]


def _as_is(value: object) -> object:
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    """What the code knows about one :class:`AdamSpec` field (its ``dataclasses.field`` metadata).

    - ``kind``: see :data:`Kind`; ``check(name, value)``: raises a ``TypeError``/``ValueError``
      naming the field.
    - ``config``: see :data:`ConfigKey`; ``write``/``read``: the value into a config and back, when
      its kind's way (:meth:`to_config`) is not the one.
    - ``fused``: see :data:`FusedSupport`. Every field must decide (``tests/test_spec_options.py``).
    - ``keyword``: one of adamx's keyword-only options of ``adamx.adam`` (a key of :class:`AdamOptions`).
    - ``example``: a valid non-default value (tests round-trip it through a config).
    - ``only_with``: the config writes the field only when this bool field is on (its meaning needs it).
    - ``no_config``: for ``config="none"``, what to do instead (in the error).
    """

    kind: Kind
    check: Check
    config: ConfigKey
    fused: FusedSupport
    example: object
    write: Convert | None = None
    read: Convert = _as_is
    keyword: bool = False
    only_with: str | None = None
    no_config: str = ""

    def to_config(self, value: object) -> object:
        """``value`` as a config holds it: ``write``, else its kind's writer."""
        return (self.write or _WRITERS[self.kind])(value)

    def from_config(self, value: object) -> object:
        """A config's value as the field takes it."""
        return self.read(value)


METADATA_KEY = "adamx"


def option(
    default: T,
    *,
    kind: Kind,
    check: Check,
    config: ConfigKey,
    fused: FusedSupport,
    example: object,
    write: Convert | None = None,
    read: Convert = _as_is,
    keyword: bool = False,
    only_with: str | None = None,
    no_config: str = "",
) -> T:
    """A dataclass field of ``default`` that carries its :class:`Option` (the arguments are its fields)."""
    meta = Option(kind, check, config, fused, example, write, read, keyword, only_with, no_config)
    field: T = dataclasses.field(default=default, metadata={METADATA_KEY: meta})
    return field


def option_of(f: dataclasses.Field[object]) -> Option:
    """The :class:`Option` of a spec field; a ``TypeError`` for a field declared without one."""
    opt = f.metadata.get(METADATA_KEY)
    if not isinstance(opt, Option):
        raise TypeError(
            f"AdamSpec field `{f.name}` has no Option: declare it with `option(default, check=..., config=..., "
            "fused=..., example=...)` (its validation, Keras config key and fused-kernel decision)."
        )
    return opt


def options_table(cls: type | None = None) -> dict[str, Option]:
    """Every field of ``cls`` (default :class:`AdamSpec`) and its :class:`Option`, in field order."""
    return {f.name: option_of(f) for f in dataclasses.fields(cls or AdamSpec)}


# ------------------------------------------------------------------ checks
def _scalar(**bounds: Any) -> Check:
    """A number (or a schedule where ``allow_schedule``) in the given range; ``None`` passes when ``optional``."""
    optional = bounds.pop("optional", False)

    def check(name: str, value: object) -> None:
        if value is None and optional:
            return
        _hyper.check_scalar(name, value, **bounds)

    return check


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def _count(lo: int) -> Check:
    def check(name: str, value: object) -> None:
        _hyper.check_int(name, value, lo=lo)

    return check


def _size(lo: int) -> Check:
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"`{name}` must be an int >= {lo}, got {value!r}.")

    return check


def _seed(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")


def _rounding(name: str, value: object) -> None:
    if value not in PARAM_ROUNDINGS:
        raise ValueError(f"`{name}` must be one of {PARAM_ROUNDINGS}, got {value!r}.")


def _name(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {value!r}.")


def _patterns(name: str, value: object) -> None:
    _decay.check_exclude(value)


def _mask(name: str, value: object) -> None:
    if value is not None and not callable(value) and not isinstance(value, (dict, list, tuple, bool)):
        if not hasattr(value, "__dataclass_fields__"):
            jax.tree_util.tree_structure(value)  # must at least be a pytree


def check_moment_dtype(name: str, dtype: DType | None) -> None:
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


def check_acc_dtype(name: str, dtype: DType | None) -> None:
    """``dtype`` must be ``None``, bfloat16, float32 or float64 (with x64 on): the accumulator sums up
    to ``gradient_accumulation_steps`` gradients, so it needs float32's range."""
    if dtype is None:
        return
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"`{name}` must be a floating dtype or None, got {dtype!r}.") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"`{name}` must be a floating dtype or None, got {dt.name}.")
    if dt.itemsize < 2:
        raise ValueError(
            f"`{name}={dt.name}` cannot hold a sum of gradients: 8-bit floats keep 2-3 significant bits "
            "and overflow early. Use bfloat16 (half of float32's memory) or float32."
        )
    if dt == jnp.dtype(jnp.float16):
        raise ValueError(
            f"`{name}=float16` would overflow silently: the sum of the window's gradients becomes inf above "
            "65504. Use bfloat16 (same size, float32's range) or float32."
        )
    if dt == jnp.dtype(np.float64) and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            f"`{name}=float64` needs 64-bit JAX: enable it first with jax.config.update('jax_enable_x64', True) "
            "(without it JAX stores float32), or use float32."
        )


# ------------------------------------------------------------------ config writers
def _number(value: object) -> object:
    """A NumPy scalar as a Python float (Keras's config holds plain numbers); others as they are."""
    return float(value) if isinstance(value, (np.floating, np.integer)) and not isinstance(value, bool) else value


def _no_schedule(name: str) -> Convert:
    def write(value: object) -> object:
        if callable(value):
            raise ValueError(f"`{name}` is a schedule: Keras's config has no place for it.")
        return _number(value)

    return write


def _write_lr(lr: ScalarOrSchedule) -> object:
    if isinstance(lr, schedules.KerasSchedule):
        return lr.serialize()
    if callable(lr):
        raise ValueError("`learning_rate` is a schedule that is not one of adamx.schedules: it has no Keras config.")
    return float(np.asarray(lr, np.float32))  # as Keras stores it: in a float32 variable


def _read_lr(lr: object) -> object:
    return schedules.deserialize(lr) if isinstance(lr, dict) else lr


def _dtype_name(value: DType) -> str:
    return np.dtype(value).name


def _int(value: int) -> int:
    return int(value)


def _bool(value: object) -> bool:
    return bool(value)


def _list(value: Sequence[str]) -> list[str]:
    return list(value)


# How a config writes each kind (a field's own ``write`` comes first).
_WRITERS: dict[Kind, Convert] = {
    "number": _number,
    "count": _number,  # as Keras: a NumPy integer becomes a float, a Python int stays
    "flag": _bool,
    "int": _int,
    "dtype": _dtype_name,
    "choice": _as_is,
    "str": _as_is,
    "patterns": _list,
    "mask": _as_is,  # never written (config="none")
}


# ------------------------------------------------------------------ field declarations
_BETA = _scalar(lo=0.0, hi=1.0, hi_open=True, allow_schedule=True)
_POSITIVE = _scalar(lo=0.0, lo_open=True, optional=True)  # a threshold or factor > 0, or None


def _keras(
    default: T, kind: Kind, check: Check, example: object, *, write: Convert | None = None, read: Convert = _as_is
) -> T:
    """A field with Keras's own config key that the kernel takes at any value."""
    return option(default, kind=kind, check=check, config="keras", fused="any", example=example, write=write, read=read)


def _dtype_option(check: Check, fused: FusedSupport) -> DType | None:
    """A storage dtype (adamx's keyword option, ``None`` = the default dtype), written by name."""
    return option(None, kind="dtype", check=check, config="adamx", fused=fused, example="bfloat16", keyword=True)


def _quantize_size(default: int, check: Check, example: int) -> int:
    """A size of the 8-bit moments, written only with ``quantize_moments`` on."""
    return option(
        default,
        kind="int",
        check=check,
        config="adamx",
        fused="any",
        example=example,
        keyword=True,
        only_with="quantize_moments",
    )


class AdamOptions(TypedDict, total=False):
    """adamx's own keyword-only options of :func:`adamx.adam` (the fields of :class:`AdamSpec` whose
    :class:`Option` has ``keyword=True``; tests/test_spec_options.py keeps the two equal)."""

    mu_dtype: DType | None
    nu_dtype: DType | None
    param_rounding: ParamRounding
    seed: int
    acc_dtype: DType | None
    flat_state: bool
    quantize_moments: bool
    quantize_block_size: int
    quantize_min_size: int
    quantize_mask: _decay.MaskOrFn
    moment_format: MomentFormat


@dataclasses.dataclass(frozen=True)
class _Run:
    """A mask value repeated over a params subtree's leaves (not a pytree: a leaf of the mapped tree,
    so a params tree whose own nodes are lists is not mistaken for it)."""

    values: list[Any]


def _mask_leaves(params: PyTree, mask: _decay.MaskOrFn, name: str) -> list[bool]:
    """A pytree of bools like params (or a prefix), or a callable ``params -> such a tree``, as one bool per leaf."""
    m = mask(params) if callable(mask) else mask
    try:
        per_leaf = jax.tree.map(lambda mk, sub: _Run([mk] * len(jax.tree_util.tree_leaves(sub))), m, params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"`{name}` must be a pytree of bools shaped like params (or a prefix of it): {e}") from e
    out = [v for run in jax.tree_util.tree_leaves(per_leaf) for v in run.values]
    for v in out:
        if not isinstance(v, bool):
            raise ValueError(f"`{name}` leaves must be Python bools, got {v!r}.")
    return out


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
    - ``moment_format``: how ``quantize_moments=True`` stores the moments (adamx/_codecs.py,
      docs/quantized_state.md): ``"dynamic8"`` (default, the 8-bit dynamic maps above),
      ``"fp8"`` (torchao ``AdamFp8``: e4m3fn codes, one scale per 256 elements) or ``"4bit"``
      (torchao ``Adam4bit``: packed 4-bit codes, one scale per 128). fp8 and 4bit use their
      fixed blocks (``quantize_block_size`` must stay 256 or be that block), take only leaves
      that are a whole number of blocks, run fused as ``dynamic8`` does, and do not combine
      with ``flat_state=True``.

    Frozen: build a changed copy with ``dataclasses.replace(spec, ...)`` (validated again).
    Numeric options may be traced values (``optax.inject_hyperparams`` passes them); those
    cannot be checked and are used as given.

    Example:
      >>> import adamx
      >>> spec = adamx.AdamSpec(gradient_accumulation_steps=4, clipnorm=1.0)
      >>> spec.window, spec.clip_mode, spec.decay_on
      (4, 'norm', False)
    """

    learning_rate: ScalarOrSchedule = _keras(
        0.001, "number", _scalar(lo=0.0, allow_schedule=True), 0.01, write=_write_lr, read=_read_lr
    )
    beta_1: ScalarOrSchedule = _keras(0.9, "number", _BETA, 0.8, write=_no_schedule("beta_1"))
    beta_2: ScalarOrSchedule = _keras(0.999, "number", _BETA, 0.99, write=_no_schedule("beta_2"))
    epsilon: Scalar = _keras(1e-7, "number", _scalar(lo=0.0), 1e-5)
    amsgrad: bool = _keras(False, "flag", _flag, True)
    weight_decay: ScalarOrSchedule | None = _keras(
        None, "number", _scalar(lo=0.0, allow_schedule=True, optional=True), 0.01, write=_no_schedule("weight_decay")
    )
    clipnorm: Scalar | None = _keras(None, "number", _POSITIVE, 1.0)
    clipvalue: Scalar | None = _keras(None, "number", _POSITIVE, 0.5)
    global_clipnorm: Scalar | None = _keras(None, "number", _POSITIVE, 2.0)
    use_ema: bool = _keras(False, "flag", _flag, True)
    ema_momentum: Scalar = _keras(0.99, "number", _scalar(lo=0.0, hi=1.0), 0.9)
    ema_overwrite_frequency: Scalar | None = _keras(None, "count", _count(1), 5)
    loss_scale_factor: Scalar | None = _keras(None, "number", _POSITIVE, 128.0)
    gradient_accumulation_steps: Scalar | None = _keras(None, "count", _count(1), 4)
    exclude_from_weight_decay: Sequence[str] | None = option(
        None, kind="patterns", check=_patterns, config="adamx", fused="any", example=("bias",)
    )
    weight_decay_mask: _decay.MaskOrFn = option(
        None,
        kind="mask",
        check=_mask,
        config="none",
        fused="any",
        example=True,
        no_config="use exclude_from_weight_decay",
    )
    mu_dtype: DType | None = _dtype_option(check_moment_dtype, "moment_dtype")
    nu_dtype: DType | None = _dtype_option(check_moment_dtype, "moment_dtype")
    param_rounding: ParamRounding = option(
        "nearest", kind="choice", check=_rounding, config="adamx", fused="any", example="stochastic", keyword=True
    )
    seed: int = option(0, kind="int", check=_seed, config="adamx", fused="any", example=7, keyword=True)
    acc_dtype: DType | None = _dtype_option(check_acc_dtype, "acc_dtype")
    flat_state: bool = option(False, kind="flag", check=_flag, config="adamx", fused="any", example=True, keyword=True)
    quantize_moments: bool = option(
        False, kind="flag", check=_flag, config="adamx", fused="any", example=True, keyword=True
    )
    quantize_block_size: int = _quantize_size(256, _size(1), 128)
    quantize_min_size: int = _quantize_size(4096, _size(0), 1024)
    quantize_mask: _decay.MaskOrFn = option(
        None,
        kind="mask",
        check=_mask,
        config="none",
        fused="any",
        example=False,
        keyword=True,
        no_config="give it to adamx.adam after reading the config",
    )
    moment_format: MomentFormat = option(
        "dynamic8",
        kind="choice",
        check=_codecs.check_format,
        config="adamx",
        fused="moment_format",
        example="fp8",
        keyword=True,
        only_with="quantize_moments",
    )
    name: str = _keras("adam", "str", _name, "my_adam")

    @classmethod
    def build(cls, **kwargs: object) -> AdamSpec:
        """``AdamSpec(**kwargs)``, with a ``TypeError`` naming an unknown option."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"adamx.adam got unknown option(s) {unknown}; the options are {names}.")
        return cls(**kwargs)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        _clipping.check_clip_args(self.clipnorm, self.clipvalue, self.global_clipnorm)
        for name, opt in options_table(type(self)).items():
            opt.check(name, getattr(self, name))
        self._check_moment_format()

    def _check_moment_format(self) -> None:
        """``moment_format`` needs ``quantize_moments``; a fixed-block format refuses another block size
        and, unless it can, ``flat_state``."""
        fmt = self.moment_format
        if fmt == "dynamic8":
            return
        if not self.quantize_moments:
            raise ValueError(
                f"`moment_format={fmt!r}` stores quantized moments: set `quantize_moments=True` with it "
                "(or leave moment_format at 'dynamic8')."
            )
        spec = _codecs.FORMATS[fmt]
        bs, default_bs = self.quantize_block_size, type(self).__dataclass_fields__["quantize_block_size"].default
        if spec.block_size is not None and bs not in (default_bs, spec.block_size):
            raise ValueError(
                f"`quantize_block_size={bs}` does not apply to `moment_format={fmt!r}`, whose blocks are "
                f"{spec.block_size} elements (torchao's): leave quantize_block_size at {default_bs} or set it "
                f"to {spec.block_size}."
            )
        if self.flat_state and not spec.flat:
            raise ValueError(
                f"`moment_format={fmt!r}` cannot be stored with `flat_state=True` (flat buffers hold 8-bit "
                "dynamic codes only): use flat_state=False, or moment_format='dynamic8'."
            )

    # ------------------------------------------------------------------ derived values
    @property
    def window(self) -> Scalar | None:
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
    def clip_threshold(self) -> Scalar | None:
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

    def codec(self, field: StateField) -> _codecs.MomentCodec:
        """The :class:`adamx._codecs.MomentCodec` of ``field`` (``mu``, ``nu``, ``nu_max``) in ``moment_format``."""
        return _codecs.codec(self.moment_format, field, self.quantize_block_size, self.quantize_min_size)

    def quantized_leaves(self, params: PyTree) -> list[bool]:
        """Which leaves of ``params`` keep quantized ``mu``/``nu``/``nu_max`` (leaf order).

        A leaf is quantized when ``quantize_moments`` is on, the codec of ``moment_format``
        takes its shape (at least ``quantize_min_size`` elements; fp8/4bit: also a whole
        number of blocks), its dtype is floating, and ``quantize_mask`` (``True`` = quantize)
        allows it.
        """
        leaves = jax.tree_util.tree_leaves(params)
        if not self.quantize_moments:
            return [False] * len(leaves)
        on = [True] * len(leaves)
        if self.quantize_mask is not None:
            on = _mask_leaves(params, self.quantize_mask, "quantize_mask")
        c = self.codec("mu")
        return [
            bool(q)
            and c.applies(tuple(int(d) for d in jnp.shape(p)))
            and jnp.issubdtype(jnp.result_type(p), jnp.floating)
            for q, p in zip(on, leaves)
        ]

    def state_dtype(self, field: StateField, param_dtype: DType) -> jnp.dtype:
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
    def hyperparams(self) -> dict[str, object]:
        """The options as a dict keyed by argument name (what ``adamx.adam`` was called with)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def keras_config(self, *, include_adamx: bool = False) -> KerasConfig:
        """The Keras 3 ``Adam.get_config()`` dict (see :func:`adamx.to_keras_config`).

        Each field is written as its :class:`Option` says: Keras's keys always (in Keras's
        order), adamx's keys when set and ``include_adamx`` (``flat_state``, a storage
        layout, is left out without it), a field without a key refused when set.
        """
        table = options_table(type(self))
        out = {k: table[k].to_config(getattr(self, k)) for k in KERAS3_KEYS}
        extra: KerasConfig = {}
        for name, opt in table.items():
            value = getattr(self, name)
            if opt.config == "keras" or not _is_set(self, name, value):
                continue
            if opt.config == "none":
                raise ValueError(f"`{name}` cannot be written into a config; {opt.no_config}.")
            if opt.only_with is None or getattr(self, opt.only_with):
                extra[name] = opt.to_config(value)
        if not include_adamx:
            extra.pop("flat_state", None)  # a storage layout, not a semantic: Keras needs no key for it
        if extra and not include_adamx:
            raise ValueError(
                f"Keras's Adam config has no key for {sorted(extra)}; pass include_adamx=True to add them "
                "(Keras itself will then refuse the config)."
            )
        return {**out, **extra}


def _is_set(spec: AdamSpec, name: str, value: object) -> bool:
    """Whether a field differs from its default (``only_with`` fields: whether their switch is on)."""
    f = type(spec).__dataclass_fields__[name]
    opt = option_of(f)
    if opt.only_with is not None and getattr(spec, opt.only_with):
        return True
    if value is f.default:
        return False
    try:
        return bool(value != f.default)
    except (TypeError, ValueError):  # e.g. an array compared elementwise
        return True


# adamx's own config keys, written only with include_adamx=True (from the table).
ADAMX_KEYS: tuple[str, ...] = tuple(name for name, opt in options_table().items() if opt.config == "adamx")
