"""Keras configs in and out: ``from_keras_config`` and ``to_keras_config``."""

from __future__ import annotations

from adamx import _loss_scale, schedules
from adamx._adam import Adam, adam
from adamx._spec import ADAMX_KEYS, KERAS3_KEYS, options_table
from adamx._types import KerasConfig

# Keys only older tf.keras (TF 2.x) printed: accepted, and what they mean.
LEGACY_KEYS = ("decay", "jit_compile", "is_legacy_optimizer", "lr")
# Default `name`s of Keras's other optimizers (Keras 3 and tf.keras), lower-cased, -> class name.
OTHER_OPTIMIZERS = {
    n.lower().replace("_", ""): n
    for n in (
        "Nadam",
        "Adamax",
        "Lion",
        "Lamb",
        "Adafactor",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "SGD",
        "Ftrl",
        "Muon",
        "LossScaleOptimizer",
    )
}


def _check_is_adam(config: KerasConfig) -> None:
    """Refuse configs of Keras's other optimizers (several have Adam's keys), naming the one it got.

    Every Keras Adam/AdamW config (Keras 3 and tf.keras) has ``amsgrad``; Nadam, Adamax and Lamb
    have ``beta_1``, ``beta_2``, ``epsilon`` but no ``amsgrad``, Lion not even ``epsilon``.
    """
    if "amsgrad" in config:
        return
    name = str(config.get("name", "")).lower().replace("_", "")
    if name in OTHER_OPTIMIZERS:
        raise ValueError(
            f"from_keras_config builds Adam and AdamW, got a config of {OTHER_OPTIMIZERS[name]} "
            f"(name={config.get('name')!r}, no `amsgrad` key)."
        )
    if all(k in config for k in KERAS3_KEYS[2:11]):  # a complete Keras 3 config, yet no `amsgrad`
        guess = "Nadam, Adamax or Lamb" if "epsilon" in config else "Lion"
        raise ValueError(
            f"from_keras_config builds Adam and AdamW, got a Keras 3 config without `amsgrad` (name="
            f"{config.get('name')!r}): its keys are those of {guess}, not Adam's."
        )


def from_keras_config(config: KerasConfig) -> Adam | _loss_scale.LossScaleOptimizer:
    """Build the optimizer a Keras ``Adam``/``AdamW`` (or ``LossScaleOptimizer``) config describes.

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
      >>> opt.spec.epsilon
      1e-07
    """
    if not isinstance(config, dict):
        raise TypeError(f"`config` must be a dict, got {type(config).__name__}.")
    if "config" in config and "class_name" in config:
        cls = config["class_name"]
        if cls == "LossScaleOptimizer":
            return loss_scale_from_keras_config(config)
        if cls not in ("Adam", "AdamW"):
            raise ValueError(
                f"from_keras_config builds Adam and AdamW (and LossScaleOptimizer), got class_name={cls!r}."
            )
        config = config["config"]
    if "inner_optimizer" in config:  # a keras.optimizers.LossScaleOptimizer config
        return loss_scale_from_keras_config(config)
    _check_is_adam(config)
    known = set(KERAS3_KEYS) | set(LEGACY_KEYS) | set(ADAMX_KEYS)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"Unknown key(s) in the Adam config: {unknown}. Known keys: {sorted(known)}.")
    cfg = dict(config)
    if "lr" in cfg:
        if "learning_rate" in cfg:
            raise ValueError("The config has both `lr` and `learning_rate`.")
        cfg["learning_rate"] = cfg.pop("lr")
    cfg.pop("jit_compile", None)
    cfg.pop("is_legacy_optimizer", None)
    decay = cfg.pop("decay", None)

    table = options_table()
    kwargs: KerasConfig = {k: table[k].from_config(v) for k, v in cfg.items() if k != "name"}  # as each Option reads it
    lr = kwargs.pop("learning_rate", 0.001)
    if decay:
        if isinstance(lr, schedules.KerasSchedule):
            raise ValueError("A legacy `decay` together with a learning-rate schedule is not supported.")
        lr = schedules.InverseTimeDecay(float(lr), decay_steps=1, decay_rate=float(decay), name="decay")
    return adam(learning_rate=lr, name=str(cfg.get("name") or "adam"), **kwargs)


def to_keras_config(opt: Adam | _loss_scale.LossScaleOptimizer, *, include_adamx: bool = False) -> KerasConfig:
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
    if isinstance(opt, _loss_scale.LossScaleOptimizer):
        return _loss_scale.loss_scale_to_keras_config(opt, include_adamx=include_adamx)
    if not isinstance(opt, Adam):
        raise TypeError(
            "to_keras_config takes an optimizer made by adamx.adam/adamw or adamx.loss_scale_optimizer, "
            f"got {type(opt).__name__}."
        )
    return opt.spec.keras_config(include_adamx=include_adamx)


def loss_scale_from_keras_config(config: KerasConfig) -> _loss_scale.LossScaleOptimizer:
    """Build a :func:`loss_scale_optimizer` from Keras's ``LossScaleOptimizer.get_config()``.

    Also accepts the ``{'class_name': 'LossScaleOptimizer', 'config': {...}}`` form and,
    as Keras does, the base-optimizer keys of older configs (``weight_decay``,
    ``use_ema``, ...) at their default values, and ``dynamic=True``. The inner optimizer
    is built by :func:`adamx.from_keras_config`.

    Example:
      >>> import adamx
      >>> opt = adamx.from_keras_config({"name": "loss_scale_optimizer", "initial_scale": 1024.0,
      ...     "dynamic_growth_steps": 4, "inner_optimizer": {"class_name": "Adam",
      ...     "config": {"name": "adam", "learning_rate": 0.001}}})
      >>> opt.hyperparams["initial_scale"], opt.hyperparams["dynamic_growth_steps"]
      (1024.0, 4)
    """
    if not isinstance(config, dict):
        raise TypeError(f"`config` must be a dict, got {type(config).__name__}.")
    if "class_name" in config and "config" in config:
        if config["class_name"] != "LossScaleOptimizer":
            raise ValueError(f"Expected class_name='LossScaleOptimizer', got {config['class_name']!r}.")
        config = config["config"]
    cfg = dict(config)
    if "inner_optimizer" not in cfg:
        raise ValueError("A LossScaleOptimizer config needs the key `inner_optimizer`.")
    if not cfg.pop("dynamic", True):
        raise ValueError(
            "`dynamic=False` is not supported (Keras neither): set `loss_scale_factor` on the inner optimizer."
        )
    for key, default in _loss_scale._KERAS_BASE_DEFAULTS.items():
        if key in cfg:
            value = cfg.pop(key)
            if value != default or (default is None and value is not None):
                raise ValueError(f"LossScaleOptimizer does not support `{key}`; set it on the inner optimizer.")
    unknown = sorted(set(cfg) - set(_loss_scale._KERAS_KEYS) - set(_loss_scale._ADAMX_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown key(s) in the LossScaleOptimizer config: {unknown}. "
            f"Known keys: {sorted(_loss_scale._KERAS_KEYS + _loss_scale._ADAMX_KEYS)}."
        )
    inner_cfg = cfg["inner_optimizer"]
    if not isinstance(inner_cfg, dict):
        raise TypeError(f"`inner_optimizer` must be a dict (a serialized optimizer), got {type(inner_cfg).__name__}.")
    inner = from_keras_config(inner_cfg)
    return _loss_scale.loss_scale_optimizer(
        inner,
        cfg.get("initial_scale", 2.0**15),
        cfg.get("dynamic_growth_steps", 2000),
        min_scale=cfg.get("min_scale"),
        max_scale=cfg.get("max_scale"),
        name=str(cfg.get("name") or "loss_scale_optimizer"),
    )
