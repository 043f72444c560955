"""Drop-ins for ``torch.nn.utils``' gradient clipping, run on gradclip's kernels (SPEC §6).

``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
``clip_grads_with_norm_`` have PyTorch 2.13's signatures and take what PyTorch
takes: a tensor or an iterable of parameters (their ``.grad`` is used, ``None``
skipped) or, for ``get_total_norm``, the gradient tensors themselves. Norms come
back as 0-d tensors of the dtype and device PyTorch returns. The gradients are
read and written in place, zero-copy. CUDA tensors go to gradclip's GPU backend
(``pip install 'gradclip[cuda]'``) as they are, its work on torch's current stream,
and their norm stays on the device.

``import gradclip`` does not import this module; ``import gradclip.torch`` imports torch.

Where the result differs from ``torch.nn.utils``, by design:

- **No write below the threshold.** Gradients are scaled iff ``total > max_norm``
  (by ``max_norm / (total + 1e-6)``, PyTorch's coefficient). PyTorch multiplies by
  ``min(max_norm / (total + 1e-6), 1)`` every time, so for ``total`` in
  ``(max_norm - 1e-6, max_norm]`` it scales by a factor just below 1 where gradclip
  leaves the memory untouched.
- **Non-finite totals.** PyTorch multiplies every gradient by NaN; gradclip
  leaves them untouched and returns the non-finite norm (so the step can be
  skipped). With ``error_if_nonfinite=True`` both raise (gradclip's
  `NonFiniteGradientError` is a ``RuntimeError``) before any gradient changes.
- **float64 accumulation.** Norms accumulate in float64 whatever the dtype and
  are rounded once to the returned tensor's dtype; PyTorch accumulates in the
  gradients' dtype (float32 norms of large models differ in the 4th digit). The
  scale factor is applied in float64 and rounded once per element. No spurious
  overflow (float64 norms near 1e200 stay finite).
- **Repeated tensors count once.** The same gradient tensor given twice is
  counted and scaled once; PyTorch counts and scales it twice.
- **Arguments are checked first.** ``max_norm``, ``clip_value`` < 0 or NaN and
  ``norm_type`` <= 0 (PyTorch's 0 and negative "norms") raise ``ValueError``
  before anything is written.
- ``foreach`` is accepted and ignored: gradclip always runs one fused kernel per dtype.

Examples
--------
>>> import torch, gradclip.torch
>>> model = torch.nn.Linear(2, 1)
>>> model.weight.grad = torch.tensor([[3.0, 0.0]])
>>> model.bias.grad = torch.tensor([4.0])
>>> gradclip.torch.clip_grad_norm_(model.parameters(), max_norm=1.0)
tensor(5.)
>>> gradclip.torch.get_total_norm([p.grad for p in model.parameters()])
tensor(1.0000)
"""

import functools
import math
import types
import warnings

import torch

from . import _checks, clip, norms

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Clip the total norm of the parameters' gradients in place; ``torch.nn.utils.clip_grad_norm_``.

    Parameters
    ----------
    parameters : torch.Tensor or iterable of torch.Tensor
        Parameters whose ``.grad`` is clipped (``None`` grads are skipped).
    max_norm : float
        ``>= 0``; ``inf`` never clips.
    norm_type : float or str, default 2.0
        ``p > 0``, or ``inf`` / ``'inf'``.
    error_if_nonfinite : bool, default False
        Raise if the total norm is NaN or inf (nothing is written).
    foreach : bool or None
        Ignored (accepted for PyTorch's signature).

    Returns
    -------
    torch.Tensor
        The total norm before clipping, 0-d, of the gradients' dtype (promoted
        as PyTorch does over mixed dtypes) and the first gradient's device;
        ``torch.tensor(0.0)`` when there are no gradients.

    Raises
    ------
    NonFiniteGradientError
        A non-finite total with ``error_if_nonfinite=True`` (a ``RuntimeError``).
    ValueError, TypeError
        Bad arguments or gradients; checked before anything is written.

    Notes
    -----
    Gradients are scaled by ``max_norm / (total + 1e-6)`` iff ``total > max_norm``
    and is finite; otherwise nothing is written (see the module notes).

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> w.grad = torch.tensor([6.0, 8.0])
    >>> gradclip.torch.clip_grad_norm_(w, max_norm=5.0)
    tensor(10.)
    >>> w.grad
    tensor([3.0000, 4.0000])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)  # a generator is read once
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in parameters]
    total = clip.clip_grad_norm_(
        grads, float(max_norm), float(norm_type), eps=_EPS, error_if_nonfinite=error_if_nonfinite
    )
    return _norm_tensor(total, grads)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The total norm of ``tensors`` (the gradients themselves); ``torch.nn.utils.get_total_norm``.

    Parameters
    ----------
    tensors : torch.Tensor or iterable of torch.Tensor
        ``None`` entries are skipped.
    norm_type : float or str, default 2.0
        ``p > 0``, or ``inf`` / ``'inf'``.
    error_if_nonfinite : bool, default False
        Raise if the norm is NaN or inf.
    foreach : bool or None
        Ignored.

    Returns
    -------
    torch.Tensor
        0-d, accumulated in float64 and rounded to the dtype PyTorch returns.

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> gradclip.torch.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5.)
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    total = norms.grad_norm(tensors, float(norm_type))
    if error_if_nonfinite and not math.isfinite(float(total)):  # a device norm: this synchronises
        _checks.raise_nonfinite(total)
    return _norm_tensor(total, tensors)


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """Scale the parameters' gradients given a total norm computed elsewhere; ``torch.nn.utils.clip_grads_with_norm_``.

    Parameters
    ----------
    parameters : torch.Tensor or iterable of torch.Tensor
        Parameters whose ``.grad`` is scaled (``None`` grads are skipped).
    max_norm : float
    total_norm : torch.Tensor or float
        E.g. from `get_total_norm`, or all-reduced across ranks.
    foreach : bool or None
        Ignored.

    Notes
    -----
    Scales by ``max_norm / (total_norm + 1e-6)`` iff ``total_norm > max_norm``; a
    NaN or infinite ``total_norm`` writes nothing.

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> w.grad = torch.tensor([1.0, 2.0])
    >>> gradclip.torch.clip_grads_with_norm_([w], max_norm=1.0, total_norm=torch.tensor(4.0))
    >>> w.grad
    tensor([0.2500, 0.5000])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip.clip_grads_with_norm_([p.grad for p in parameters], float(max_norm), total_norm, eps=_EPS)


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp the parameters' gradients in place to ``[-clip_value, clip_value]``; ``torch.nn.utils.clip_grad_value_``.

    Parameters
    ----------
    parameters : torch.Tensor or iterable of torch.Tensor
        Parameters whose ``.grad`` is clamped (``None`` grads are skipped).
    clip_value : float
        ``>= 0``. NaN gradients stay NaN.
    foreach : bool or None
        Ignored.

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> w.grad = torch.tensor([-3.0, 0.5, 2.0])
    >>> gradclip.torch.clip_grad_value_(w, 1.0)
    >>> w.grad
    tensor([-1.0000,  0.5000,  1.0000])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip.clip_grad_value_([p.grad for p in parameters], float(clip_value))


_EPS = 1e-6
"""PyTorch's constant in ``max_norm / (total + 1e-6)``."""


def _norm_tensor(total, grads):
    """``total`` as the 0-d tensor PyTorch returns: the promoted (real) dtype of the
    gradients' norms, on the first gradient's device."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.tensor(total)
    dtype = functools.reduce(torch.promote_types, [d.to_real() for d in {g.dtype for g in grads}])
    if not isinstance(total, float):  # a 0-d device array (CUDA gradients): it stays there
        return torch.as_tensor(total, device=grads[0].device).to(dtype)
    return torch.tensor(total, dtype=dtype, device=grads[0].device)
