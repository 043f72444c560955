"""Total and per-leaf gradient norms."""

from . import _backend, _batch, _checks, _cpu
from ._collective import Collective


def grad_norm(grads, norm_type=2.0, *, reducer=None, replicated=None):
    """The total p-norm of all gradients.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
        ``None`` leaves are skipped; the same array object given twice counts once.
    norm_type : float, default 2.0
        ``p > 0`` or ``inf`` (the largest magnitude).
    reducer : optional
        For gradients sharded across ranks (``gradclip.distributed.MPIReducer``,
        ``TorchReducer``): the norm of every rank's shard together, the same on every
        rank. Every rank of the reducer must make the call.
    replicated : leaves of ``grads`` in any container, optional
        Leaves that every rank holds whole (not sharded): counted once, not once per rank.

    Returns
    -------
    float
        ``‖(‖g_1‖_p, …, ‖g_n‖_p)‖_p``, accumulated in float64; NaN if any element
        is NaN, inf if any is infinite (and none is NaN). 0.0 for no leaves.

    Raises
    ------
    TypeError
        A leaf is not an array, or has an unsupported dtype.
    ValueError
        ``norm_type`` is not > 0.
    gradclip.distributed.RemoteRankError
        With ``reducer``: the call failed on another rank.

    Notes
    -----
    float16 and bfloat16 are widened exactly; complex leaves use ``|z|``. The
    result is finite whenever the true norm is (no spurious overflow).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.grad_norm([np.array([3.0, 0.0]), np.array([[4.0]])])
    5.0
    """
    with Collective("grad_norm", reducer) as collective:
        p = _checks.norm_type(norm_type)
        if p == 2.0 and collective.local(replicated):
            total = _cpu.plain_list_norm(grads, _batch.plain_list(grads, writes=False))
            if total is not None:
                return total
        batch = _batch.collect(grads, "grad_norm", cuda=True)
        if collective.local(replicated):
            return _backend.total_norm(batch, p)
        total = collective.total_norm(batch, p, replicated)
    return _backend.on_first_device(batch, total)


def layer_norms(grads, norm_type=2.0):
    """The p-norm of each leaf.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
    norm_type : float, default 2.0
        ``p > 0`` or ``inf``.

    Returns
    -------
    numpy.ndarray
        float64, one norm per leaf position in leaf order (depth-first, dicts in
        insertion order, ``None`` skipped).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.layer_norms({"w": np.array([3.0, 4.0]), "b": np.array([-2.0])})
    array([5., 2.])
    """
    p = _checks.norm_type(norm_type)
    batch = _batch.collect(grads, "layer_norms", cuda=True)
    return _backend.layer_norms(batch, p)
