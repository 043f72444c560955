"""The gradient-norm penalty: a soft alternative to clipping (SPEC §5)."""

import math

import numpy as np

from . import _backend, _batch, _checks
from ._collective import Collective


def norm_penalty(grads, tau, lam, *, reducer=None, replicated=None):
    """The penalty ``lam · max(0, ‖g‖ - tau)`` on the gradient norm, and its derivative.

    The tutorial's alternative to hard clipping, ``L_total = L + λ·max(0, ‖g‖ - τ)``:
    rather than rescaling large gradients, penalise them. Training on ``L_total`` needs
    the penalty's gradient with respect to the parameters, ``H · direction`` (a
    Hessian-vector product through ``g = ∇L``), which the caller's framework computes
    from ``direction``, e.g. in PyTorch
    ``torch.autograd.grad(g, params, grad_outputs=direction)`` with ``g`` taken
    with ``create_graph=True``.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
        The gradients ``g`` (read, never written).
    tau : float
        The norm below which there is no penalty; >= 0.
    lam : float
        The penalty's weight ``λ``; >= 0.
    reducer, replicated : optional
        For gradients sharded across ranks: ``‖g‖`` is the norm of every rank's shard
        together (see `clip_grad_norm_`).

    Returns
    -------
    value : float
        ``lam · max(0, ‖g‖ - tau)`` with ``‖g‖`` the total L2 norm (float64).
    direction : the structure of ``grads``
        ``d value / d g``: new arrays of the leaves' shapes and dtypes holding
        ``lam · g / ‖g‖`` where ``‖g‖ > tau``, zeros otherwise.

    Raises
    ------
    ValueError
        ``tau`` or ``lam`` negative or NaN.
    TypeError
        A leaf that is not an array or has an unsupported dtype.

    Notes
    -----
    At the kink ``‖g‖ == tau``, and so at ``‖g‖ == 0``, the derivative taken is the
    one from below: zero (as PyTorch's ``relu`` takes it at 0). A NaN or infinite
    ``‖g‖`` has no meaningful penalty: ``value`` is NaN and ``direction`` is NaN
    everywhere — skip the step. The direction is computed in float64 and rounded once
    to each leaf's dtype; a NumPy scalar leaf gives a NumPy scalar.

    GPU leaves: ``‖g‖`` is read on the host (one device-to-host synchronisation) and
    the direction is written on the device, as new arrays of the leaves' kind (CuPy in,
    CuPy out; Numba in, Numba out).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> value, direction = gradclip.norm_penalty({"w": np.array([3.0, 4.0])}, tau=2.0, lam=0.5)
    >>> value, direction
    (1.5, {'w': array([0.3, 0.4])})
    >>> gradclip.norm_penalty([np.array([0.3, 0.4])], tau=2.0, lam=0.5)
    (0.0, [array([0., 0.])])
    """
    with Collective("norm_penalty", reducer) as collective:
        tau = _checks.nonnegative("tau", tau)
        lam = _checks.nonnegative("lam", lam)
        batch = _batch.collect(grads, "norm_penalty", cuda=True)
        norm = collective.total_norm(batch, 2.0, replicated)  # on the host: GPU leaves synchronise
    direction = batch.copy()
    if not math.isfinite(norm):
        value = math.nan
        _backend.fill_(direction, math.nan)
    elif norm > tau:
        value = lam * (norm - tau)
        _backend.scale_(direction, np.full(len(direction.arrays), lam / norm))
    else:
        value = 0.0
        _backend.fill_(direction, 0.0)
    return value, direction.rebuild()
