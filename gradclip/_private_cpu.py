"""The private-training operations (SPEC §9) on CPU cells, with the CPU kernels.

Each is a small function over prepared tables (``_cells.Cells``, ``_batch.Batch``);
``private.py`` and ``noise.py`` call them without knowing the device (``_private_cuda``
is the GPU twin). The kernels of ``kernels/private_cpu.py`` are imported on first use,
keeping them out of ``import gradclip`` (10-30 ms here).
"""

from typing import NamedTuple

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


def example_norms(cells, p):
    """Each example's p-norm, float64 ``(B,)``."""
    return _fold_rows(cell_norms(cells, p), p)


def _fold_rows(norms, p):
    """Each example's p-norm from its cells' (``norms``, ``(B, U)``)."""
    return private_kernels().fold_rows(norms, float(p))


class Clipping(NamedTuple):
    """What clipping the examples to bounds finds (`clipping`)."""

    cell: np.ndarray  # (B, U) per-cell norms
    norms: np.ndarray  # (B,) per-example global norms
    factors: np.ndarray  # (B, U), C-ordered
    clipped: int
    nonfinite: int
    unique_of: np.ndarray  # one example's positions' unique leaves

    @property
    def layer_norms(self):
        """The per-cell norms by position, ``(B, L)``."""
        return self.cell[:, self.unique_of]


def clipping(cells, bounds, eps):
    """The norms, the factors ``f = min(1, bound / (norm + eps))`` (0 for an example whose
    norm is not finite) and the counts; ``bounds``: one (0-d) or one per unique leaf."""
    cell = cell_norms(cells, 2.0)
    norms = _fold_rows(cell, 2.0)
    finite = np.isfinite(norms)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = bounds / ((norms[:, None] if bounds.ndim == 0 else cell) + eps)
    factors = np.where(ratio < 1.0, ratio, 1.0)  # NaN (0 / 0: a zero example, bound 0) -> 1
    factors = np.where(finite[:, None], np.broadcast_to(factors, cell.shape), 0.0)
    clipped = int(np.count_nonzero(finite & (factors < 1.0).any(axis=1)))
    nonfinite = int(np.count_nonzero(~finite))
    return Clipping(cell, norms, np.ascontiguousarray(factors), clipped, nonfinite, cells.unique_of)


def scale_cells_(cells, clipping):
    """Scale cell ``(i, u)`` by its factor in place: 1 writes nothing, 0 writes zeros (NaN
    and inf included)."""
    if not (clipping.factors != 1.0).any():
        return
    coef = clipping.factors.reshape(-1)
    _cpu.scale_(cells, coef)
    zeroed = coef == 0.0
    if zeroed.any():  # x * 0 is NaN for a NaN or inf x
        for table in cells.tables:
            table = table.select(zeroed)
            if table.size:
                kernels.update_table(kernels.ZERO_NONFINITE, table)


def clipped_copy(cells, clipping):
    """The clipped examples in new arrays, in the batch's structures (`_cells.Cells.rebuild`)."""
    copied = cells.copy()
    scale_cells_(copied, clipping)
    return copied.rebuild()


def weighted_sum(cells, clipping, std, divisor, noise, first_draw):
    """``(Σ_i f_iu g_iu + std z) / divisor`` for every unique leaf ``u``, ``f`` the
    clipping's factors, rounded once to its dtype: new arrays laid out like the examples'
    leaves. The draws ``z`` are the noise stream's from ``first_draw`` on, leaf after
    leaf (see ``_cells.Cells.draw_starts``)."""
    factors = clipping.factors
    outputs, buffers = [], []
    for shape, dtype, plan in zip(cells.shapes, cells.dtypes, cells.plans):
        buffer = np.empty(int(np.prod(shape)), dtype)
        buffers.append(buffer)
        outputs.append(_table.dense_view(buffer, 0, shape, plan.order))
    base = _bases(cells)
    starts = first_draw + cells.draw_starts()
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


def add_noise_(batch, std, noise, starts):
    """Add ``std`` times the stream's draws to every unique CPU leaf of ``batch`` in place,
    leaf ``u``'s from ``starts[u]`` on, in its memory order."""
    for table in batch.tables:
        if table.size:
            parts = 2 if table.witness.dtype.kind == "c" else 1
            draw = starts[table.seg_leaf] + _offsets_in_leaf(table) * parts
            private_kernels().add_noise_table(table, draw, std, noise._kind, noise._key)


def _offsets_in_leaf(table):
    """Elements of the same leaf in the rows before each row (a leaf's rows are consecutive)."""
    before = np.cumsum(table.count) - table.count
    first = np.concatenate([[True], table.seg_leaf[1:] != table.seg_leaf[:-1]])
    return before - np.repeat(before[first], np.diff(np.append(np.flatnonzero(first), first.size)))


def normals(out, noise, first_draw):
    """Fill ``out`` (float64, contiguous) with the stream's draws from ``first_draw`` on."""
    private_kernels().normals_cpu(out.reshape(-1), first_draw, noise._kind, noise._key)
