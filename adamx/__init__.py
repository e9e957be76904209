"""adamx: Adam for JAX with Keras 3 / TF1 semantics, as composable optax transforms."""

from importlib.metadata import PackageNotFoundError, version

from adamx import fused as fused
from adamx import schedules as schedules
from adamx import sharding as sharding
from adamx._adam import Adam as Adam
from adamx._adam import adam as adam
from adamx._adam import adamw as adamw
from adamx._averaging import EmaParamsState as EmaParamsState
from adamx._averaging import ema_params as ema_params
from adamx._averaging import finalize_variable_values as finalize_variable_values
from adamx._clipping import clip_by_global_norm as clip_by_global_norm
from adamx._clipping import clip_by_norm as clip_by_norm
from adamx._config import from_keras_config as from_keras_config
from adamx._config import to_keras_config as to_keras_config
from adamx._decay import decoupled_weight_decay as decoupled_weight_decay
from adamx._flat import FlatBuffers as FlatBuffers
from adamx._lazy import LazyAdam as LazyAdam
from adamx._lazy import LazyAdamState as LazyAdamState
from adamx._lazy import lazy_adam as lazy_adam
from adamx._lazy import row_gradient as row_gradient
from adamx._loss_scale import LossScaleOptimizer as LossScaleOptimizer
from adamx._loss_scale import LossScaleSpec as LossScaleSpec
from adamx._loss_scale import LossScaleState as LossScaleState
from adamx._loss_scale import loss_scale as loss_scale
from adamx._loss_scale import loss_scale_optimizer as loss_scale_optimizer
from adamx._moments import ScaleByAdamState as ScaleByAdamState
from adamx._moments import scale_by_adam as scale_by_adam
from adamx._quantize import QuantizedArray as QuantizedArray
from adamx._quantize import bytes_per_param as state_bytes_per_param
from adamx._spec import AdamOptions as AdamOptions
from adamx._spec import AdamSpec as AdamSpec
from adamx._state import AdamState as AdamState
from adamx._state import KahanAdamState as KahanAdamState
from adamx._tf1 import Tf1AdamState as Tf1AdamState
from adamx._tf1 import tf1_adam as tf1_adam

try:
    __version__ = version("adamx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+src"

__all__ = [
    "Adam",
    "AdamOptions",
    "AdamSpec",
    "AdamState",
    "KahanAdamState",
    "EmaParamsState",
    "FlatBuffers",
    "LazyAdam",
    "LazyAdamState",
    "LossScaleOptimizer",
    "LossScaleSpec",
    "LossScaleState",
    "QuantizedArray",
    "ScaleByAdamState",
    "Tf1AdamState",
    "adam",
    "adamw",
    "clip_by_global_norm",
    "clip_by_norm",
    "decoupled_weight_decay",
    "ema_params",
    "finalize_variable_values",
    "fused",
    "loss_scale",
    "loss_scale_optimizer",
    "from_keras_config",
    "lazy_adam",
    "row_gradient",
    "schedules",
    "sharding",
    "scale_by_adam",
    "state_bytes_per_param",
    "tf1_adam",
    "to_keras_config",
]
