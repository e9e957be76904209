"""Keras configs in and out: ``from_keras_config`` and ``to_keras_config``."""

from __future__ import annotations

from typing import Any

import numpy as np

from adamx import schedules
from adamx._adam import Adam, adam

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
# Keys only older tf.keras (TF 2.x) printed: accepted, and what they mean.
LEGACY_KEYS = ("decay", "jit_compile", "is_legacy_optimizer", "lr")
# adamx's own options, written only with include_adamx=True.
ADAMX_KEYS = ("exclude_from_weight_decay", "mu_dtype", "nu_dtype", "flat_state")


def from_keras_config(config: dict[str, Any]) -> Adam:
    """Build the optimizer a Keras ``Adam``/``AdamW`` config describes.

    Accepts what ``keras.optimizers.Adam(...).get_config()`` (Keras 3) prints, what
    ``keras.optimizers.serialize`` prints (``{'class_name': 'Adam', 'config': {...}}``),
    and the configs of older tf.keras (TF 2.x), e.g.
    ``{'name': 'Adam', 'learning_rate': 0.001, 'decay': 0.0, 'beta_1': 0.9,
    'beta_2': 0.999, 'epsilon': 1e-07, 'amsgrad': False}``. A legacy ``decay`` becomes
    ``InverseTimeDecay(lr, decay_steps=1, decay_rate=decay)``, i.e.
    ``lr / (1 + decay * step)``, what tf.keras computed; ``jit_compile`` and
    ``is_legacy_optimizer`` are accepted and have no effect. A serialized learning-rate
    schedule is rebuilt with :mod:`adamx.schedules`. Unknown keys raise ``ValueError``.

    Example:
      >>> import adamx
      >>> opt = adamx.from_keras_config({'name': 'Adam', 'learning_rate': 0.001, 'decay': 0.0,
      ...     'beta_1': 0.9, 'beta_2': 0.999, 'epsilon': 1e-07, 'amsgrad': False})
      >>> opt.hyperparams["epsilon"]
      1e-07
    """
    if not isinstance(config, dict):
        raise TypeError(f"`config` must be a dict, got {type(config).__name__}.")
    if "config" in config and "class_name" in config:
        cls = config["class_name"]
        if cls not in ("Adam", "AdamW"):
            raise ValueError(f"from_keras_config builds Adam and AdamW, got class_name={cls!r}.")
        config = config["config"]
    if "inner_optimizer" in config:  # a keras.optimizers.LossScaleOptimizer config
        from adamx._loss_scale import loss_scale_from_keras_config

        return loss_scale_from_keras_config(config)  # type: ignore[return-value]
    known = set(KERAS3_KEYS) | set(LEGACY_KEYS) | set(ADAMX_KEYS)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"Unknown key(s) in the Adam config: {unknown}. Known keys: {sorted(known)}."
        )
    cfg = dict(config)
    if "lr" in cfg:
        if "learning_rate" in cfg:
            raise ValueError("The config has both `lr` and `learning_rate`.")
        cfg["learning_rate"] = cfg.pop("lr")
    cfg.pop("jit_compile", None)
    cfg.pop("is_legacy_optimizer", None)
    decay = cfg.pop("decay", None)

    lr = cfg.pop("learning_rate", 0.001)
    if isinstance(lr, dict):
        lr = schedules.deserialize(lr)
    if decay:
        if isinstance(lr, schedules.KerasSchedule):
            raise ValueError("A legacy `decay` together with a learning-rate schedule is not supported.")
        lr = schedules.InverseTimeDecay(float(lr), decay_steps=1, decay_rate=float(decay), name="decay")
    kwargs = {k: cfg[k] for k in cfg if k != "name"}
    return adam(learning_rate=lr, name=str(cfg.get("name") or "adam"), **kwargs)


def _f32_float(x: Any) -> Any:
    return float(np.float32(x))


def to_keras_config(opt: Adam, *, include_adamx: bool = False) -> dict[str, Any]:
    """The Keras 3 ``Adam.get_config()`` dict for an :func:`adamx.adam` optimizer.

    ``keras.optimizers.Adam.from_config`` (or :func:`from_keras_config`) rebuilds the
    same optimizer from it. As in Keras, a float learning rate is written
    float32-rounded (``0.001`` -> ``0.0010000000474974513``) and a schedule as its
    serialized dict. Options Keras has no key for (``exclude_from_weight_decay``,
    moment dtypes) raise ``ValueError`` unless ``include_adamx=True``, which adds them
    as extra keys (read back by :func:`from_keras_config`, not by Keras; also
    ``flat_state``, which otherwise is left out: it changes storage, not numbers); a
    ``weight_decay_mask`` or a non-Keras schedule cannot be written at all.
    """
    if not isinstance(opt, Adam):
        raise TypeError(f"to_keras_config takes an optimizer made by adamx.adam/adamw, got {type(opt).__name__}.")
    hp = opt.hyperparams
    lr = hp["learning_rate"]
    if isinstance(lr, schedules.KerasSchedule):
        lr_out: Any = lr.serialize()
    elif callable(lr):
        raise ValueError("`learning_rate` is a schedule that is not one of adamx.schedules: it has no Keras config.")
    else:
        lr_out = _f32_float(lr)
    for k in ("beta_1", "beta_2", "weight_decay"):
        if callable(hp[k]):
            raise ValueError(f"`{k}` is a schedule: Keras's config has no place for it.")
    if hp["weight_decay_mask"] is not None:
        raise ValueError("`weight_decay_mask` cannot be written into a config; use exclude_from_weight_decay.")
    out: dict[str, Any] = {"name": hp["name"], "learning_rate": lr_out}
    for k in KERAS3_KEYS[2:]:
        v = hp[k]
        out[k] = float(v) if isinstance(v, (np.floating, np.integer)) and not isinstance(v, bool) else v
    extra = {k: hp[k] for k in ADAMX_KEYS if hp.get(k) is not None and hp.get(k) is not False}
    if not include_adamx:
        extra.pop("flat_state", None)  # a storage layout, not a semantic: Keras needs no key for it
    if extra and not include_adamx:
        raise ValueError(
            f"Keras's Adam config has no key for {sorted(extra)}; pass include_adamx=True to add them "
            "(Keras itself will then refuse the config)."
        )
    for k, v in extra.items():
        if k == "flat_state":
            out[k] = bool(v)
        else:
            out[k] = list(v) if k == "exclude_from_weight_decay" else np.dtype(v).name
    return out

