"""gradclip: fast, exact gradient norms, clipping and checks on plain arrays."""

from ._checks import NonFiniteGradientError
from .clip import (
    clip_grad_norm,
    clip_grad_norm_,
    clip_grad_norm_per_layer_,
    clip_grad_value,
    clip_grad_value_,
    clip_grads_with_norm_,
)
from .finite import all_finite, zero_nonfinite_
from .norms import grad_norm, layer_norms

__version__ = "0.1.0"

__all__ = [
    "NonFiniteGradientError",
    "all_finite",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "grad_norm",
    "layer_norms",
    "zero_nonfinite_",
]
