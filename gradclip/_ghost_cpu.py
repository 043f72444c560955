"""The ghost norms (``ghost.py``) on CPU arrays: the twin of ``_ghost_cuda``, the same
operations by name and arguments.

Inputs are NumPy views of any framework's host memory (SPEC §2); results are float64
NumPy arrays. The kernels are ``kernels/ghost_cpu.py``, imported on first use (making
its dispatchers costs milliseconds).
"""

import numpy as np

from . import _checks, _dispatch, _table


def _kernels():
    from ._kernels import ghost_cpu

    return ghost_cpu


def read(array, where):
    """``array`` (not a CUDA array) as a NumPy array sharing its memory."""
    return _dispatch.as_cpu_array(array, where)


def zeros(n, like):
    return np.zeros(n)


def dense_sq_norms(a, g, bias):
    """Squared per-example norms of a dense layer's weight gradient (plus the bias
    gradient's if ``bias``), float64 ``(B,)``; ``a`` ``(B, d_in)`` or ``(B, T, d_in)`` and
    ``g`` alike, B, T and d_out > 0. The cheaper route by multiply-adds (see the kernels)."""
    kernels = _kernels()
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    T, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    gram = d_in == 0 or kernels.gram_wins(T, d_in, d_out)
    return kernels.dense_sq_norms(_kernel_view(a), _kernel_view(g), bias, gram)


def embedding_sq_norms(idx, g):
    """Squared per-example norms of an embedding's weight gradient, float64 ``(B,)``;
    ``idx`` ``(B,)`` or ``(B, T)`` integers, ``g`` ``(B, d)`` or ``(B, T, d)``."""
    if idx.ndim == 1:
        idx, g = idx[:, None], g[:, None]
    return _kernels().embedding_sq_norms(idx, _kernel_view(g))


def sq_norms_from_per_example(leaves):
    """``Σ_leaves ‖leaf[i]‖²`` of stacked per-example ``leaves`` (unique, validated), float64
    ``(B,)``. Contiguous leaves are read in place, others copied once, leaf by leaf."""
    kernels = _kernels()
    batch = leaves[0].shape[0]
    out = np.zeros(batch)
    for leaf in leaves:
        rows = np.ascontiguousarray(leaf).reshape(batch, -1)  # a view unless the layout needs a copy
        kernels.add_per_example_sq_norms(_kernel_view(rows), out)
    return out


def clip_factors(sq, max_norm, eps):
    """``min(1, max_norm / (√sq + eps))`` per example, float64: 1 where ``√sq + eps = 0``, 0
    where the norm is NaN or inf; a negative ``sq`` is refused."""
    sq = sq.astype(np.float64)
    negative = np.flatnonzero(sq < 0)
    if negative.size:
        raise _checks.negative_sq_norm(int(negative[0]), float(sq[negative[0]]))
    norms = np.sqrt(sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.minimum(1.0, max_norm / (norms + eps))
    factors[norms + eps == 0] = 1.0
    factors[~np.isfinite(norms)] = 0.0
    return factors


def _kernel_view(array):
    """``array`` as the kernels read it: 16-bit floats as their bit patterns (`_table.witness`)."""
    return array.view(_table.witness(array.dtype).dtype) if array.dtype.itemsize == 2 else array
