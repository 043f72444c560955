"""gradclip: fast, exact gradient norms, clipping and checks on plain arrays."""

from . import privacy
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
from .ghost import clip_factors, dense_sq_norms, embedding_sq_norms, sq_norms_from_per_example
from .monitor import NormMonitor
from .noise import GaussianNoise
from .norms import grad_norm, layer_norms
from .penalty import norm_penalty
from .private import (
    Examples,
    ExampleStats,
    QuantileClipNorm,
    add_noise_,
    clip_per_example,
    clip_per_example_,
    clipped_sum,
    per_example_norms,
)

__version__ = "0.1.0"

__all__ = [
    "ClipStats",
    "EMAClipper",
    "ExampleStats",
    "Examples",
    "GaussianNoise",
    "GradAccumulator",
    "NonFiniteGradientError",
    "NormMonitor",
    "QuantileClipNorm",
    "QuantileClipper",
    "ZScoreClipper",
    "add_noise_",
    "adaptive_grad_clip_",
    "all_finite",
    "clip_factors",
    "clip_per_example",
    "clip_per_example_",
    "clipped_sum",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "dense_sq_norms",
    "embedding_sq_norms",
    "grad_norm",
    "layer_norms",
    "norm_penalty",
    "per_example_norms",
    "privacy",
    "sq_norms_from_per_example",
    "zero_nonfinite_",
]
