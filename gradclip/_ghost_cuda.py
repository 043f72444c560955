"""The ghost norms (``ghost.py``) on GPU arrays: the twin of ``_ghost_cpu``, the same
operations by name and arguments.

Inputs are ``_cuda.DeviceLeaf`` objects (torch, CuPy, Numba or any
``__cuda_array_interface__`` producer; JAX through CuPy), read where they lie, any
strides. A call's work goes through a ``_cuda.Plan`` of its inputs: on the caller's
stream (other inputs' streams joined), launched as the library's other kernels are, its
results new float64 device arrays of the first input's kind (torch in, torch out; CuPy
in, CuPy out; Numba arrays otherwise). Nothing is read back to the host. The kernels are
``kernels/ghost_cuda.py`` (dense layers by the Gram route only); per-example gradients
take the private-training norm passes (``_private_cuda``) and are squared on the device.
"""

import functools

import numpy as np

from . import _cells, _checks, _cuda, _dispatch, _private_cuda


@functools.cache
def _kernels():
    """``gradclip._kernels.ghost_cuda`` (after ``numba.cuda``: `_cuda._kernels`)."""
    _cuda._kernels()
    from ._kernels import ghost_cuda

    return ghost_cuda


def read(array, where):
    """``array`` (a CUDA array) as a ``_cuda.DeviceLeaf``; an error naming it (``where()``)
    if the kernels cannot read its elements."""
    leaf = _dispatch.as_cuda_leaf(array, where)
    if leaf.ptr % leaf.itemsize:
        _checks.raise_unaligned(where, leaf.dtype)
    _checks.check_layout(where, leaf)
    return leaf


def zeros(n, like):
    """``n`` float64 zeros on ``like``'s device, of its kind."""
    with _part([like]) as plan:
        _, out = plan.filled(n, 0.0)
    return out


def dense_sq_norms(a, g, bias):
    """Squared per-example norms of a dense layer's weight gradient (plus the bias
    gradient's if ``bias``), a float64 ``(B,)`` device array; ``a`` ``(B, d_in)`` or
    ``(B, T, d_in)`` and ``g`` alike, B, T and d_out > 0. Gram route (see the kernels)."""
    kernels = _kernels()
    B, d_in, d_out = a.shape[0], a.shape[-1], g.shape[-1]
    T = a.shape[1] if len(a.shape) == 3 else 1
    (a_data, a_off, a_steps), (g_data, g_off, g_steps) = _operand(a), _operand(g)
    dense = kernels.dense_kernels_for(a.dtype, g.dtype)
    with _part([a, g]) as plan:
        buffer, out = plan.new(B)
        if T == 1:  # ‖a‖²‖g‖²: the batch and feature steps
            a_bd, g_bd = (a_steps[0], a_steps[-1]), (g_steps[0], g_steps[-1])
            plan.launcher.launch(
                dense.dense_rows_cuda, _cuda.grid_size(plan.device, B), kernels.THREADS, [a_data, g_data, buffer],
                *_i8(B, d_in, d_out, a_off, *a_bd, g_off, *g_bd, int(bias)),
            )
            return out
        m = -(-T // kernels.TILE)
        partial, _ = plan.new(2 * B * m)
        plan.launcher.launch(
            dense.dense_gram_cuda, _cuda.grid_size(plan.device, B * m), kernels.TILE * kernels.TILE,
            [a_data, g_data, partial],
            *_i8(B, T, m, d_in, d_out, a_off, *a_steps, g_off, *g_steps),
        )
        _fold(plan, partial, buffer, B, m, 2 if bias else 1)
    return out


def embedding_sq_norms(idx, g):
    """Squared per-example norms of an embedding's weight gradient, a float64 ``(B,)``
    device array; ``idx`` ``(B,)`` or ``(B, T)`` integers, ``g`` ``(B, d)`` or ``(B, T, d)``,
    none of B, T, d zero."""
    kernels = _kernels()
    B, d = g.shape[0], g.shape[-1]
    T = g.shape[1] if len(g.shape) == 3 else 1
    (x_data, x_off, x_steps), (g_data, g_off, g_steps) = _operand(idx), _operand(g)
    if T == 1 and len(g.shape) == 2:  # no sequence axis: one position, of any step
        x_steps, g_steps = [x_steps[0], 0], [g_steps[0], 0, g_steps[1]]
    with _part([idx, g]) as plan:
        buffer, out = plan.new(B)
        partial, _ = plan.new(B * T)
        plan.launcher.launch(
            kernels.embedding_for(g.dtype), _cuda.grid_size(plan.device, B * T), kernels.THREADS,
            [x_data, g_data, partial],
            *_i8(B, T, d, x_off, *x_steps, g_off, *g_steps),
        )
        _fold(plan, partial, buffer, B, T, 1)
    return out


def sq_norms_from_per_example(leaves):
    """``Σ_leaves ‖leaf[i]‖²`` of stacked per-example ``leaves`` (unique, validated), a
    float64 ``(B,)`` device array: the private-training norms (``per_example_norms``'
    passes), squared in place."""
    kernels = _kernels()
    cells = _cells.stacked(leaves, "sq_norms_from_per_example", writes=False)
    norms = _private_cuda.example_norms(cells, 2.0)
    if cells.n:
        with cells.gpu.part as plan:
            data = _cuda._Buffer(_cuda.describe(norms, None).ptr, cells.n, np.float64, norms)
            plan.launcher.launch(
                kernels.square_cuda_, _cuda.grid_size(plan.device, cells.n), kernels.THREADS, [data], *_i8(cells.n)
            )
    return norms


def clip_factors(sq, max_norm, eps):
    """``min(1, max_norm / (√sq + eps))`` per example, a float64 device array: 1 where
    ``√sq + eps = 0``, 0 where the norm is NaN or inf. Values are not read on the host, so a
    negative ``sq`` is not refused as on the CPU: its norm is NaN, its factor 0."""
    kernels = _kernels()
    n = sq.shape[0]
    data, off, (step,) = _operand(sq)
    with _part([sq]) as plan:
        buffer, out = plan.new(n)
        if n:
            plan.launcher.launch(
                kernels.clip_factors_for(sq.dtype), _cuda.grid_size(plan.device, n), kernels.THREADS, [data, buffer],
                (n, off, step, max_norm, eps), ("i8", "i8", "i8", "f8", "f8"),
            )
    return out


# ---------------------------------------------------------------------- helpers


def _part(leaves):
    """The ``_cuda.Part`` of a call over ``leaves``: entering it joins their streams and
    gives the plan (its stream, launcher and result arrays)."""
    positions = np.arange(len(leaves))
    plan = _cuda.Plan(leaves, positions, _cuda._stream_of(leaves[0]))
    return _cuda.Part(positions, leaves, plan.positions, False, plan)


def _operand(leaf):
    """``(buffer, offset, steps)``: a 1-d `_cuda._Buffer` over the memory ``leaf`` spans, the
    offset of its element 0 in it and its steps, in elements (any sign)."""
    itemsize = leaf.itemsize
    steps = [s // itemsize for s in leaf.strides]
    low = sum((n - 1) * s for n, s in zip(leaf.shape, steps) if s < 0)
    high = sum((n - 1) * s for n, s in zip(leaf.shape, steps) if s > 0)
    span = high - low + 1 if leaf.size else 0
    return _cuda._Buffer(leaf.ptr + low * itemsize, span, _cuda._kernel_dtype(leaf.dtype), leaf.obj), -low, steps


def _fold(plan, partial, out, B, m, parts):
    """``out[i]``: example ``i``'s ``m`` partials (of each of ``parts`` columns) added in order."""
    kernels = _kernels()
    plan.launcher.launch(kernels.fold_cuda, -(-B // kernels.THREADS), kernels.THREADS, [partial, out], *_i8(B, m, parts))


def _i8(*values):
    """A launch's scalars ``(values, types)``, all int64."""
    return tuple(int(v) for v in values), ("i8",) * len(values)
