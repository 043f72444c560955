"""Ghost norms: per-example gradient norms of a layer from its input and output gradient.

DP-SGD clips every example's gradient before summing (SPEC §9). Materialising the
per-example gradients costs B x (parameters) memory; *ghost clipping* (Li et al. 2021,
Bu et al. 2022) needs only their norms, which for a dense layer follow from the layer's
input activations ``A_i`` and output gradients ``G_i`` of each example, and for an
embedding from its indices. The clipped sum then comes from a second backward pass of
``Σ_i f_i loss_i`` with the factors of `clip_factors`.

Arrays of any framework are read zero-copy (SPEC §2). Each function validates its
inputs here and runs on the twin of their device, chosen in one place (`_twin_for`):
``_ghost_cpu`` (float64 NumPy results) or ``_ghost_cuda`` (float64 device arrays of the
first input's kind, nothing read back to the host). Inputs on both devices are refused.
"""

import math

from . import _checks, _dispatch, _ghost_cpu, _ghost_cuda, _tree


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
        float64 ``(B,)``: ``‖Σ_t g_t a_tᵀ‖²_F`` (``+ ‖Σ_t g_t‖²``) for each example. For
        CUDA inputs, a device array of the first input's kind (nothing waits for the GPU).

    Raises
    ------
    ValueError
        Shapes that do not pair up as above; one input on the CPU and one on the GPU.
    TypeError
        A dtype other than float16, bfloat16, float32, float64, or an input that is not an array.

    Notes
    -----
    Two exact routes on the CPU, picked per call by their cost in multiply-adds: the
    *Gram route* ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` costs ``T²(d_in + d_out)/2`` per example,
    the *direct route* (the weight gradient ``Gᵀ A``, tile by tile, never whole)
    ``T·d_in·d_out``: the Gram route wins while ``T < 2·d_in·d_out / (d_in + d_out)``
    (``T < d`` for a square layer). Without a sequence axis the norm is ``‖g‖²‖a‖²``.
    Products and sums are float64, whatever the inputs' dtype; examples run in parallel
    and the result is bit-identical for any thread count. Extra memory: a few hundred KB
    per thread. On the GPU the Gram route only (tiles of 16 x 16 ``(t, s)`` pairs, their
    features staged in shared memory), the same bits at every launch; extra memory: two
    float64 per example and row of tiles.

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
    twin, (a, g) = _twin_for("dense_sq_norms", ("activations", activations), ("output_grads", output_grads))
    _checks.dense_shapes(tuple(a.shape), tuple(g.shape))
    for name, array in (("activations", a), ("output_grads", g)):
        _checks.ghost_dtype(name, array.dtype, "dense_sq_norms")
    B, d_in, d_out = a.shape[0], a.shape[-1], g.shape[-1]
    T = a.shape[1] if len(a.shape) == 3 else 1
    if 0 in (B, T, d_out) or (d_in == 0 and not bias):
        return twin.zeros(B, a)
    return twin.dense_sq_norms(a, g, bool(bias))


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
        ``Σ_{t: idx_t = v} g_t`` of each example's gradient. For CUDA inputs, a device
        array of the first input's kind.

    Notes
    -----
    Each example's positions are sorted by index and each run of equal indices summed
    in float64: no ``(B, vocab, d)`` array, and ``O(T·d)`` work per example. On the GPU
    each position that first holds its index sums the positions holding it, in position
    order: ``O(T·d)`` float64 work and ``O(T²)`` index comparisons per example. Indices
    are only compared, never bounds-checked against a vocabulary. Rows that the layer
    does not train (PyTorch's ``padding_idx``) must have zero output gradients.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> idx = np.array([[5, 7, 5]])
    >>> g = np.array([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    >>> gradclip.embedding_sq_norms(idx, g)  # row 5: (4, 0), row 7: (0, 2)
    array([20.])
    """
    twin, (idx, g) = _twin_for("embedding_sq_norms", ("indices", indices), ("output_grads", output_grads))
    _checks.embedding_shapes(tuple(idx.shape), tuple(g.shape))
    _checks.ghost_indices_dtype(idx.dtype)
    _checks.ghost_dtype("output_grads", g.dtype, "embedding_sq_norms")
    if not math.prod(g.shape):
        return twin.zeros(g.shape[0], g)
    return twin.embedding_sq_norms(idx, g)


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
        float64 ``(B,)``: ``Σ_leaves ‖leaf[i]‖²`` (``|z|²`` for complex leaves). For CUDA
        leaves (all of them), a device array of the first leaf's kind.

    Notes
    -----
    On the CPU contiguous leaves are read in place, other layouts copied once, leaf by
    leaf. On the GPU every leaf is read in place by `per_example_norms`' passes, and the
    norms are squared on the device (within a few units of float64 rounding of the sum).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.sq_norms_from_per_example({"w": np.array([[3.0, 4.0], [1.0, 0.0]]), "b": np.array([1.0, 2.0])})
    array([26.,  5.])
    """
    leaves, treedef = _tree.flatten(grads)
    first = {}  # each array at its first position: the same array twice counts once
    for position, leaf in enumerate(leaves):
        first.setdefault(id(leaf), (position, leaf))
    named = [(lambda position=position: _tree.path(treedef, position), leaf) for position, leaf in first.values()]
    if not named:
        raise _checks.no_per_example_leaves()
    twin, arrays = _twin_for("sq_norms_from_per_example", *named)
    batch = None
    for (where, _), array in zip(named, arrays):
        _checks.check_dtype(where, array.dtype)
        _checks.per_example_leaf(where, tuple(array.shape), batch)
        batch = array.shape[0]
    return twin.sq_norms_from_per_example(arrays)


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
        ``Σ_i f_i loss_i`` gives the clipped sum ``Σ_i f_i ∇loss_i``. For a CUDA
        ``sq_norms``, a device array of its kind, computed there.

    Raises
    ------
    ValueError
        ``sq_norms`` not 1-d or not real; a negative value (CPU only: on the GPU values
        are not read back to the host, and a negative one gets the factor 0, as NaN
        does); a negative or NaN ``max_norm`` or ``eps``.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> gradclip.clip_factors(np.array([16.0, 0.25, np.nan]), max_norm=1.0, eps=0.0)
    array([0.25, 1.  , 0.  ])
    """
    max_norm = _checks.nonnegative("max_norm", max_norm)
    eps = _checks.nonnegative("eps", eps)
    twin, (sq,) = _twin_for("clip_factors", ("sq_norms", sq_norms))
    _checks.sq_norms(tuple(sq.shape), sq.dtype)
    return twin.clip_factors(sq, max_norm, eps)


def _twin_for(function, *named):
    """``(twin, arrays)``: the module of operations for the arrays' device (``_ghost_cpu`` or
    ``_ghost_cuda``), and the arrays as it reads them. ``named``: ``(name, array)`` pairs,
    the name a string or a callable that makes it. Arrays on both devices are refused."""
    arrays, device_of = [], {}
    for name, array in named:
        where = name if callable(name) else lambda name=name: name
        twin = _ghost_cuda if _dispatch.on_cuda(array) else _ghost_cpu
        arrays.append(twin.read(array, where))
        device_of.setdefault(twin, where)
    if len(device_of) > 1:
        raise _checks.ghost_devices(device_of[_ghost_cpu](), device_of[_ghost_cuda](), function)
    return next(iter(device_of)), arrays
