"""Total and per-leaf gradient norms."""


from . import _batch, _checks, _cpu, _cuda


def grad_norm(grads, norm_type=2.0):
    """The total p-norm of all gradients.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
        ``None`` leaves are skipped; the same array object given twice counts once.
    norm_type : float, default 2.0
        ``p > 0`` or ``inf`` (the largest magnitude).

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
    p = _checks.norm_type(norm_type)
    batch = _batch.collect(grads, "grad_norm", cuda=True)
    if batch.cuda:
        return _cuda.grad_norm(batch, p)
    return _cpu.total_norm(_cpu.leaf_norms(batch, p), p)


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
    if batch.cuda:
        return _cuda.layer_norms(batch, p)
    return _cpu.leaf_norms(batch, p)[batch.unique_of]
