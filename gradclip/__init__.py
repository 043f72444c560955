"""gradclip: fast, exact gradient norms, clipping and checks on plain arrays."""

from ._checks import NonFiniteGradientError
from .accumulate import GradAccumulator
from .adaptive import (
    ClipStats,
    EMAClipper,
    QuantileClipper,
    ZScoreClipper,
    adaptive_grad_clip_,
)
from .clip import (
    clip_grad_norm,
    clip_grad_norm_,
    clip_grad_norm_per_layer_,
    clip_grad_value,
    clip_grad_value_,
    clip_grads_with_norm_,
)
from .finite import all_finite, zero_nonfinite_
from .monitor import NormMonitor
from .norms import grad_norm, layer_norms
from .penalty import norm_penalty

__version__ = "0.1.0"

__all__ = [
    "ClipStats",
    "EMAClipper",
    "GradAccumulator",
    "NonFiniteGradientError",
    "NormMonitor",
    "QuantileClipper",
    "ZScoreClipper",
    "adaptive_grad_clip_",
    "all_finite",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "grad_norm",
    "layer_norms",
    "norm_penalty",
    "zero_nonfinite_",
]
