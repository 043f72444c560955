"""Non-finite checks and repair."""

from . import _backend, _batch, _cpu


def all_finite(grads):
    """Whether every element of every leaf is finite (no NaN, no ±inf).

    One pass over all leaves. Complex elements are finite when both parts are.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.all_finite([np.ones(3), np.array([1.0, np.nan])])
    False
    """
    count = _cpu.plain_list_count_nonfinite(grads, _batch.plain_list(grads, writes=False))
    if count is not None:
        return count == 0
    batch = _batch.collect(grads, "all_finite", cuda=True)
    return _backend.all_finite(batch)


def zero_nonfinite_(grads):
    """Replace NaN and ±inf by 0, in place.

    Only the non-finite elements are written; in a complex element only its
    non-finite parts become 0.

    Returns
    -------
    int
        The number of elements changed.

    Raises
    ------
    ValueError
        A leaf is read-only.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> g = np.array([1.0, np.inf, np.nan])
    >>> gradclip.zero_nonfinite_(g), g
    (2, array([1., 0., 0.]))
    """
    changed = _cpu.plain_list_zero_nonfinite_(grads, _batch.plain_list(grads, writes=True))
    if changed is not None:
        return changed
    batch = _batch.collect(grads, "zero_nonfinite_", writes=True, cuda=True)
    return _backend.zero_nonfinite_(batch)
