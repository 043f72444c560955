"""Ghost norms: per-example gradient norms of a layer from its input and output gradient.

DP-SGD clips every example's gradient before summing (SPEC §9). Materialising the
per-example gradients costs B x (parameters) memory; *ghost clipping* (Li et al. 2021,
Bu et al. 2022) needs only their norms, which for a dense layer follow from the layer's
input activations ``A_i`` and output gradients ``G_i`` of each example, and for an
embedding from its indices. The clipped sum then comes from a second backward pass of
``Σ_i f_i loss_i`` with the factors of `clip_factors`.

Arrays of any framework are read zero-copy (SPEC §2); results are float64 NumPy
arrays. Each function gets its kernels and its arrays from one place (`_kernels_for`):
the CPU kernels (``kernels/ghost_cpu.py``, imported on first use) today; GPU twins
with the same names and arguments slot in there.
"""

import numpy as np

from . import _checks, _dispatch, _table, _tree


def dense_sq_norms(activations, output_grads, *, bias=False):
    """Each example's squared gradient norm of a dense layer ``y = x Wᵀ (+ b)``.

    Parameters
    ----------
    activations : array, ``(B, d_in)`` or ``(B, T, d_in)``
        The layer's input: one row per example (and position of a sequence).
    output_grads : array, ``(B, d_out)`` or ``(B, T, d_out)``
        The gradient of the loss with respect to the layer's output, as the loss of
        each example alone would give it (for a mean over the batch, multiply by B).
    bias : bool, default False
        Add the squared norm of the bias gradient ``Σ_t g_t``.

    Returns
    -------
    numpy.ndarray
        float64 ``(B,)``: ``‖Σ_t g_t a_tᵀ‖²_F`` (``+ ‖Σ_t g_t‖²``) for each example.

    Raises
    ------
    ValueError
        Shapes that do not pair up as above.
    TypeError
        A dtype other than float16, bfloat16, float32, float64, or an input that is not an array.
    NotImplementedError
        A CUDA array (GPU kernels are not there yet).

    Notes
    -----
    Two exact routes, picked per call by their cost in multiply-adds: the *Gram route*
    ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` costs ``T²(d_in + d_out)/2`` per example, the *direct
    route* (the weight gradient ``Gᵀ A``, tile by tile, never whole) ``T·d_in·d_out``: the
    Gram route wins while ``T < 2·d_in·d_out / (d_in + d_out)`` (``T < d`` for a square
    layer). Without a sequence axis the norm is ``‖g‖²‖a‖²``. Products and sums are
    float64, whatever the inputs' dtype; examples run in parallel and the result is
    bit-identical for any thread count. Extra memory: a few hundred KB per thread.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> a = np.array([[[1.0, 0.0], [0.0, 2.0]]])  # B = 1, T = 2, d_in = 2
    >>> g = np.array([[[3.0], [4.0]]])  # d_out = 1: the weight gradient is [[3, 8]]
    >>> gradclip.dense_sq_norms(a, g)
    array([73.])
    >>> gradclip.dense_sq_norms(a, g, bias=True)  # + (3 + 4)²
    array([122.])
    """
    kernels, (a, g) = _kernels_for("dense_sq_norms", ("activations", activations), ("output_grads", output_grads))
    _checks.dense_shapes(a.shape, g.shape)
    for name, array in (("activations", a), ("output_grads", g)):
        _checks.ghost_dtype(name, array.dtype, "dense_sq_norms")
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    B, T, d_in = a.shape
    d_out = g.shape[2]
    if T == 0 or d_out == 0 or (d_in == 0 and not bias):
        return np.zeros(B)
    gram = d_in == 0 or kernels.gram_wins(T, d_in, d_out)
    return kernels.dense_sq_norms(_kernel_view(a), _kernel_view(g), bool(bias), gram)


def embedding_sq_norms(indices, output_grads):
    """Each example's squared gradient norm of an embedding ``y_t = W[idx_t]``.

    Parameters
    ----------
    indices : integer array, ``(B,)`` or ``(B, T)``
        The embedding's input.
    output_grads : array, ``(B, d)`` or ``(B, T, d)``
        The gradient of the loss with respect to the embedding's output.

    Returns
    -------
    numpy.ndarray
        float64 ``(B,)``: ``Σ_{t,s: idx_t = idx_s} g_t·g_s``, the squared norm of the rows
        ``Σ_{t: idx_t = v} g_t`` of each example's gradient.

    Notes
    -----
    Each example's positions are sorted by index and each run of equal indices summed
    in float64: no ``(B, vocab, d)`` array, and ``O(T·d)`` work per example. Indices are
    only compared, never bounds-checked against a vocabulary. Rows that the layer does
    not train (PyTorch's ``padding_idx``) must have zero output gradients.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> idx = np.array([[5, 7, 5]])
    >>> g = np.array([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    >>> gradclip.embedding_sq_norms(idx, g)  # row 5: (4, 0), row 7: (0, 2)
    array([20.])
    """
    kernels, (idx, g) = _kernels_for("embedding_sq_norms", ("indices", indices), ("output_grads", output_grads))
    _checks.embedding_shapes(idx.shape, g.shape)
    _checks.ghost_indices_dtype(idx.dtype)
    _checks.ghost_dtype("output_grads", g.dtype, "embedding_sq_norms")
    if idx.ndim == 1:
        idx, g = idx[:, None], g[:, None]
    return kernels.embedding_sq_norms(idx, _kernel_view(g))


def sq_norms_from_per_example(grads):
    """Each example's squared gradient norm from materialised per-example gradients.

    The route for layers without a ghost norm: their per-example gradients (e.g. from
    ``torch.func.vmap(torch.func.grad(f))``) give squared norms that add to the ghost
    norms of the other layers, into each example's global norm.

    Parameters
    ----------
    grads : array, or nested dict / list / tuple of arrays
        Every leaf stacks the examples on axis 0, the same ``B`` in each; ``None``
        leaves are skipped and the same array object twice counts once (SPEC §2).

    Returns
    -------
    numpy.ndarray
        float64 ``(B,)``: ``Σ_leaves ‖leaf[i]‖²`` (``|z|²`` for complex leaves).

    Notes
    -----
    Contiguous leaves are read in place; other layouts are copied once, leaf by leaf.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.sq_norms_from_per_example({"w": np.array([[3.0, 4.0], [1.0, 0.0]]), "b": np.array([1.0, 2.0])})
    array([26.,  5.])
    """
    leaves, treedef = _tree.flatten(grads)
    arrays, seen, batch = [], set(), None
    for position, leaf in enumerate(leaves):
        if id(leaf) in seen:
            continue
        seen.add(id(leaf))
        where = lambda position=position: _tree.path(treedef, position)  # noqa: E731
        kernels, (array,) = _kernels_for("sq_norms_from_per_example", (where, leaf))
        _checks.check_dtype(where, array.dtype)
        _checks.per_example_leaf(where, array.shape, batch)
        batch = array.shape[0]
        arrays.append(array)
    if batch is None:
        raise _checks.no_per_example_leaves()
    out = np.zeros(batch)
    for array in arrays:
        rows = np.ascontiguousarray(array).reshape(batch, -1)  # a view unless the layout needs a copy
        kernels.add_per_example_sq_norms(_kernel_view(rows), out)
    return out


def clip_factors(sq_norms, max_norm, eps=1e-6):
    """Per-example loss weights that clip each example's gradient to ``max_norm``.

    Parameters
    ----------
    sq_norms : 1-d array
        Each example's squared gradient norm (the sum over layers of `dense_sq_norms`,
        `embedding_sq_norms`, `sq_norms_from_per_example`).
    max_norm : float
        ``>= 0``; ``inf`` never clips.
    eps : float, default 1e-6
        Opacus' default; ``0.0`` gives Optax's ``per_example_global_norm_clip`` factor.

    Returns
    -------
    numpy.ndarray
        float64 ``(B,)``: ``f_i = min(1, max_norm / (n_i + eps))`` with ``n_i = √sq_norms[i]``;
        1 where ``n_i + eps = 0``, and 0 where ``n_i`` is NaN or inf (the example is dropped,
        as SPEC §9's ``clip_per_example_`` zeroes it). A second backward pass of
        ``Σ_i f_i loss_i`` gives the clipped sum ``Σ_i f_i ∇loss_i``.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.clip_factors(np.array([16.0, 0.25, np.nan]), max_norm=1.0, eps=0.0)
    array([0.25, 1.  , 0.  ])
    """
    max_norm = _checks.nonnegative("max_norm", max_norm)
    eps = _checks.nonnegative("eps", eps)
    _, (sq,) = _kernels_for("clip_factors", ("sq_norms", sq_norms))
    _checks.sq_norms(sq.shape, sq.dtype)
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


def _kernels_for(function, *named):
    """``(kernels, arrays)``: the kernel module for the arrays' device, and the arrays as it
    reads them (NumPy views for ``ghost_cpu``). ``named``: ``(name, array)`` pairs, the name
    a string or a callable that makes it. CUDA arrays are refused until a GPU twin exists."""
    arrays = []
    for name, array in named:
        where = name if callable(name) else lambda name=name: name
        if _dispatch.on_cuda(array):
            raise _checks.ghost_cuda(where(), array, function)
        arrays.append(_dispatch.as_cpu_array(array, where))
    from ._kernels import ghost_cpu  # on first use: making its dispatchers costs milliseconds

    return ghost_cpu, arrays


def _kernel_view(array):
    """``array`` as the kernels read it: 16-bit floats as their bit patterns (`_table.witness`)."""
    return array.view(_table.witness(array.dtype).dtype) if array.dtype.itemsize == 2 else array
