"""The private-training operations (SPEC §9) on CPU cells, with the CPU kernels.

Each is a small function over prepared tables (``_cells.Cells``, ``_batch.Batch``);
``private.py`` and ``noise.py`` call them without knowing the device. The kernels of
``kernels/private_cpu.py`` are imported on first use, keeping them out of
``import gradclip`` (10-30 ms here).
"""

import numpy as np

from . import _cpu, _table
from ._kernels import cpu as kernels


def private_kernels():
    """``gradclip._kernels.private_cpu``, imported on first use."""
    from ._kernels import private_cpu

    return private_cpu


def cell_norms(cells, p):
    """The p-norm of every cell, float64 ``(B, U)``.

    p = 2 reads the examples by their plans, four at a time; a cell whose sum of squares
    overflowed, or may have lost float64 bits to underflow, is redone scaled by its
    largest magnitude, as `_cpu.leaf_norms` does (which takes every other p).
    """
    if p != 2.0:
        return _cpu.leaf_norms(cells, p).reshape(cells.n, cells.leaves)
    sums = np.zeros((cells.n, cells.leaves))
    base = _bases(cells)
    for dtype in dict.fromkeys(cells.dtypes):
        rows = [np.concatenate(column).astype(np.int64) for column in zip(*_plan_rows(cells, dtype))]
        private_kernels().cell_sumsq_table(rows, base, sums, _table.witness(dtype))
    norms, redo, any_redo = kernels.norms_from_sums(sums.reshape(-1), 2.0, _cpu._TINY, _cpu._float64_based(cells))
    if any_redo:
        norms[redo] = _cpu._scaled_norms(cells, 2.0, redo)[redo]
    return norms.reshape(cells.n, cells.leaves)


def _bases(cells):
    """Example ``i``'s leaf ``u`` starts at ``[i, u]`` (int64 ``(B, U)``; read through the plans)."""
    base = np.zeros((cells.n, cells.leaves), np.int64)
    for u, plan in enumerate(cells.plans):
        base[:, u] = plan.base
    return base


def _plan_rows(cells, dtype):
    """Per leaf of ``dtype``: its runs' columns ``(leaf, offset, count, step)``."""
    for u in (u for u, d in enumerate(cells.dtypes) if d == dtype):
        plan = cells.plans[u]
        yield np.full(plan.count.size, u), plan.offset, plan.count, plan.step


def example_norms(norms, p):
    """Each example's p-norm from its cells' (``norms``, ``(B, U)``)."""
    return private_kernels().fold_rows(norms, float(p))


def scale_cells_(cells, factors):
    """Scale cell ``(i, u)`` by ``factors[i, u]`` in place: 1 writes nothing, 0 writes zeros
    (NaN and inf included)."""
    coef = factors.reshape(-1)
    _cpu.scale_(cells, coef)
    zeroed = coef == 0.0
    if zeroed.any():  # x * 0 is NaN for a NaN or inf x
        for table in cells.tables:
            table = table.select(zeroed)
            if table.size:
                kernels.update_table(kernels.ZERO_NONFINITE, table)


def weighted_sum(cells, factors, std, divisor, noise, first_draw):
    """``(Σ_i factors[i, u] g_iu + std z) / divisor`` for every unique leaf ``u``, rounded
    once to its dtype: new arrays laid out like the examples' leaves. The draws ``z``
    are the noise stream's from ``first_draw`` on, leaf after leaf (see `draws_of`)."""
    outputs, buffers = [], []
    for shape, dtype, plan in zip(cells.shapes, cells.dtypes, cells.plans):
        buffer = np.empty(int(np.prod(shape)), dtype)
        buffers.append(buffer)
        outputs.append(_table.dense_view(buffer, 0, shape, plan.order))
    base = _bases(cells)
    starts = first_draw + _leaf_draw_starts(cells)
    kind, key = (noise._kind, noise._key) if std else (private_kernels().PHILOX, np.zeros(2, np.uint32))
    for dtype in dict.fromkeys(cells.dtypes):
        parts = 2 if dtype.kind == "c" else 1
        leaves = [u for u, d in enumerate(cells.dtypes) if d == dtype]
        runs = [np.concatenate(column) for column in zip(*_plan_rows(cells, dtype))]
        out_addr = [buffers[u].ctypes.data + cells.plans[u].out_offset * dtype.itemsize for u in leaves]
        draw = [starts[u] + cells.plans[u].out_offset * parts for u in leaves]
        rows = [column.astype(np.int64) for column in (*runs, np.concatenate(out_addr), np.concatenate(draw))]
        private_kernels().weighted_sum_table(rows, base, factors, std, divisor, kind, key, _table.witness(dtype))
    return outputs


def draws_of(cells):
    """The draws a noised sum of ``cells`` takes: one per real number of one example."""
    return int(sum(int(np.prod(s)) * (2 if d.kind == "c" else 1) for s, d in zip(cells.shapes, cells.dtypes)))


def _leaf_draw_starts(cells):
    sizes = [int(np.prod(s)) * (2 if d.kind == "c" else 1) for s, d in zip(cells.shapes, cells.dtypes)]
    return (np.cumsum(sizes, dtype=np.int64) - sizes).astype(np.int64)


def add_noise_(batch, std, noise, first_draw):
    """Add ``std`` times the stream's draws from ``first_draw`` on to every unique leaf of
    ``batch`` in place: leaf after leaf, each in its memory order."""
    starts, _ = batch_draws(batch)
    for table in batch.tables:
        if table.size:
            parts = 2 if table.witness.dtype.kind == "c" else 1
            draw = first_draw + starts[table.seg_leaf] + _offsets_in_leaf(table) * parts
            private_kernels().add_noise_table(table, draw, std, noise._kind, noise._key)


def batch_draws(batch):
    """``(start, total)``: the draw each unique leaf of ``batch`` starts at, and the draws taken."""
    size = np.zeros(len(batch.arrays), np.int64)
    for table in batch.tables:
        parts = 2 if table.witness.dtype.kind == "c" else 1
        size += np.bincount(table.seg_leaf, weights=table.count * parts, minlength=size.size).astype(np.int64)
    ends = np.cumsum(size)
    return ends - size, int(ends[-1]) if size.size else 0


def _offsets_in_leaf(table):
    """Elements of the same leaf in the rows before each row (a leaf's rows are consecutive)."""
    before = np.cumsum(table.count) - table.count
    first = np.concatenate([[True], table.seg_leaf[1:] != table.seg_leaf[:-1]])
    return before - np.repeat(before[first], np.diff(np.append(np.flatnonzero(first), first.size)))


def normals(out, noise, first_draw):
    """Fill ``out`` (float64, contiguous) with the stream's draws from ``first_draw`` on."""
    private_kernels().normals_cpu(out.reshape(-1), first_draw, noise._kind, noise._key)
