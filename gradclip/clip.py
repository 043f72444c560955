"""Clipping by global norm, by value and per layer, in place and out of place.

The rule everywhere (as in PyTorch): when a norm ``total`` exceeds ``max_norm``
the leaves are scaled by ``max_norm / (total + eps)``. Unlike PyTorch, nothing is
written when there is nothing to clip, and a non-finite norm leaves the
gradients untouched instead of filling them with NaN.
"""

import math

from . import _backend, _batch, _checks, _cpu, _dispatch
from ._collective import Collective


def clip_grad_norm_(
    grads, max_norm, norm_type=2.0, *, eps=1e-6, error_if_nonfinite=False, reducer=None, replicated=None
):
    """Scale all gradients in place so that their total norm is at most ``max_norm``.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
        Writable leaves; ``None`` leaves are skipped, a repeated array is scaled once.
    max_norm : float
        ``>= 0``; ``inf`` never clips (a way to read the norm).
    norm_type : float, default 2.0
        ``p > 0`` or ``inf``.
    eps : float, default 1e-6
        Added to the total in the scaling coefficient.
    error_if_nonfinite : bool, default False
        Raise instead of returning a non-finite total.
    reducer : optional
        For gradients sharded across ranks (``gradclip.distributed.MPIReducer``,
        ``TorchReducer``): the total is the norm of every rank's shard together, and every
        rank clips its shard by the same coefficient. Every rank must make the call.
    replicated : leaves of ``grads`` in any container, optional
        Leaves that every rank holds whole (not sharded): counted once in the total.

    Returns
    -------
    float
        The total norm before clipping (see `grad_norm`).

    Raises
    ------
    NonFiniteGradientError
        The total is NaN or inf and ``error_if_nonfinite`` is true; nothing was written.
    ValueError
        A bad argument, or a read-only leaf; checked before anything is written.
    TypeError
        A leaf that is not an array or has an unsupported dtype.
    gradclip.distributed.RemoteRankError
        With ``reducer``: the call failed on another rank; nothing was written here.

    Notes
    -----
    If ``total > max_norm`` every element becomes ``x * max_norm / (total + eps)``,
    the product taken in float64 and rounded once to the leaf's dtype. Otherwise,
    and whenever ``total`` is not finite, no memory is written.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> g = [np.array([3.0, 0.0]), np.array([4.0])]
    >>> gradclip.clip_grad_norm_(g, max_norm=2.5, eps=0.0)
    5.0
    >>> g
    [array([1.5, 0. ]), array([2.])]
    """
    with Collective("clip_grad_norm_", reducer) as collective:
        max_norm = _checks.nonnegative("max_norm", max_norm)
        p = _checks.norm_type(norm_type)
        eps = _checks.nonnegative("eps", eps)
        if p == 2.0 and collective.local(replicated):
            total = _cpu.plain_list_norm(grads, _batch.plain_list(grads, writes=True), max_norm, eps)
            if total is not None:  # finite; the leaves are clipped
                return total
        batch = _batch.collect(grads, "clip_grad_norm_", writes=True, cuda=True)
        if collective.local(replicated):
            return _backend.clip_(batch, p, max_norm, eps, error_if_nonfinite)
        total = collective.total_norm(batch, p, replicated)
    _backend.check_finite(total, error_if_nonfinite)
    _backend.scale_to_max_norm_(batch, max_norm, total, eps)
    return _backend.on_first_device(batch, total)


def clip_grad_norm(
    grads, max_norm, norm_type=2.0, *, eps=1e-6, error_if_nonfinite=False, reducer=None, replicated=None
):
    """Out-of-place `clip_grad_norm_`: returns ``(clipped, total)``, ``grads`` untouched.

    ``clipped`` has the structure of ``grads`` and always holds new arrays, also
    when nothing needed clipping. ``reducer`` and ``replicated`` as in `clip_grad_norm_`.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> clipped, total = gradclip.clip_grad_norm({"w": np.array([6.0, 8.0])}, 5.0, eps=0.0)
    >>> clipped, total
    ({'w': array([3., 4.])}, 10.0)
    """
    with Collective("clip_grad_norm", reducer) as collective:
        max_norm = _checks.nonnegative("max_norm", max_norm)
        p = _checks.norm_type(norm_type)
        eps = _checks.nonnegative("eps", eps)
        batch = _batch.collect(grads, "clip_grad_norm", cuda=True)
        if collective.local(replicated):
            clipped = batch.copy()
            total = _backend.clip_(batch, p, max_norm, eps, error_if_nonfinite, target=clipped)
            return clipped.rebuild(), total
        total = collective.total_norm(batch, p, replicated)  # of the input, as grad_norm gives it
    _backend.check_finite(total, error_if_nonfinite)
    clipped = batch.copy()
    _backend.scale_to_max_norm_(clipped, max_norm, total, eps)
    return clipped.rebuild(), _backend.on_first_device(batch, total)


def clip_grads_with_norm_(grads, max_norm, total_norm, *, eps=1e-6):
    """The scaling step of `clip_grad_norm_` alone, with a total norm computed elsewhere.

    Leaves are scaled by ``max_norm / (total_norm + eps)`` iff
    ``total_norm > max_norm``; a NaN or infinite ``total_norm`` writes nothing.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
    max_norm : float
    total_norm : float or 0-d array
        E.g. an all-reduced norm of sharded gradients.
    eps : float, default 1e-6

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> g = np.array([1.0, 2.0])
    >>> gradclip.clip_grads_with_norm_(g, max_norm=1.0, total_norm=4.0, eps=0.0)
    >>> g
    array([0.25, 0.5 ])
    """
    max_norm = _checks.nonnegative("max_norm", max_norm)
    on_gpu = _dispatch.on_cuda(total_norm)  # read where it is: a GPU total is not copied to the host
    total = total_norm if on_gpu else _checks.total_norm(total_norm)
    eps = _checks.nonnegative("eps", eps)
    batch = _batch.collect(grads, "clip_grads_with_norm_", writes=True, cuda=True)
    _backend.scale_to_max_norm_(batch, max_norm, total, eps)


def clip_grad_norm_per_layer_(grads, max_norm, norm_type=2.0, *, eps=1e-6):
    """Clip each leaf on its own norm, in place.

    A leaf whose norm exceeds ``max_norm`` is scaled by ``max_norm / (norm + eps)``;
    the others, and leaves with a non-finite norm, are not written.

    Returns
    -------
    numpy.ndarray
        float64, each leaf's norm before clipping, one per position (as `layer_norms`).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> g = [np.array([3.0, 4.0]), np.array([0.5])]
    >>> gradclip.clip_grad_norm_per_layer_(g, max_norm=2.5, eps=0.0)
    array([5. , 0.5])
    >>> g
    [array([1.5, 2. ]), array([0.5])]
    """
    max_norm = _checks.nonnegative("max_norm", max_norm)
    p = _checks.norm_type(norm_type)
    eps = _checks.nonnegative("eps", eps)
    batch = _batch.collect(grads, "clip_grad_norm_per_layer_", writes=True, cuda=True)
    return _backend.clip_per_layer_(batch, p, max_norm, eps)


def clip_grad_value_(grads, clip_value):
    """Clamp every element in place to ``[-clip_value, clip_value]``.

    NaN stays NaN; ``clip_value = inf`` writes nothing. For float16 / bfloat16 the
    bound is rounded to the leaf's dtype (to nearest-even).

    Raises
    ------
    TypeError
        A complex leaf (complex numbers have no order).
    ValueError
        ``clip_value`` is negative or NaN, or a leaf is read-only.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> g = np.array([-3.0, 0.5, 2.0, np.nan])
    >>> gradclip.clip_grad_value_(g, 1.0)
    >>> g
    array([-1. ,  0.5,  1. ,  nan])
    """
    clip_value = _checks.nonnegative("clip_value", clip_value)
    if clip_value != math.inf:  # inf never clips: the general path writes nothing
        if _cpu.plain_list_clamp_(grads, _batch.plain_list(grads, writes=True, real_only=True), clip_value):
            return None
    batch = _batch.collect(grads, "clip_grad_value_", writes=True, real_only=True, cuda=True)
    _clamp_(batch, clip_value)


def clip_grad_value(grads, clip_value):
    """Out-of-place `clip_grad_value_`: new arrays in the structure of ``grads``.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.clip_grad_value([np.array([-3.0, 0.5])], 1.0)
    [array([-1. ,  0.5])]
    """
    clip_value = _checks.nonnegative("clip_value", clip_value)
    batch = _batch.collect(grads, "clip_grad_value", real_only=True, cuda=True)
    clipped = batch.copy()
    _clamp_(clipped, clip_value)
    return clipped.rebuild()


def _clamp_(batch, clip_value):
    if clip_value != math.inf:  # inf never clips: write nothing
        _backend.clamp_(batch, clip_value)
