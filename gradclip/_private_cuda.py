"""The private-training operations (SPEC §9) on GPU cells: the twin of ``_private_cpu``.

A GPU batch's cells (example ``i``'s leaf ``u``) are the rows of one ``_cuda.Plan``,
made for the call (per-example gradients are new arrays at every step: there is no plan
to reuse): every cell of leaf ``u`` walked in the order the sum writes ``u`` in (its
layout if every example shares it, else C order, as on the CPU), example after example
(see ``kernels/private_cuda.py``). Stacked leaves are walked once and their cells
placed by the example stride; no cell is copied, whatever its layout. The plan's
norm passes (``kernels/cuda.py``) give the cells' norms, one launch per dtype;
``fold_examples_cuda`` folds them and leaves each cell's factor in the plan's scratch,
which the clip and sum passes read: nothing is decided on the host, and results are
float64 device arrays of the first leaf's kind, so nothing waits for the GPU.

Numba's CUDA modules are imported when the first GPU leaf arrives (``_cuda``), the
private kernels when first used.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import _cuda, _table

_FLOAT64 = np.dtype(np.float64)


@functools.cache
def _kernels():
    """``gradclip._kernels.private_cuda`` (after ``numba.cuda``: `_cuda._kernels`)."""
    _cuda._kernels()
    from ._kernels import private_cuda

    return private_cuda


class CellPlan:
    """The GPU side of a ``_cells.Cells``: the plan whose rows are its cells.

    ``part``: a ``_cuda.Part`` holding the plan (entering it joins the leaves' streams),
    or for ``n = 0`` the batch's own (which only allocates). ``orders``: per unique leaf,
    the `_table.traversal` its cells are walked in and the sum is laid out in.
    ``sizes``: one example's unique leaves' elements; ``starts``: where each starts in
    the dense buffer of one example's leaves of its dtype (``DENSE`` of its example-0
    row); ``per_example``: dtype -> one example's rows of it.
    """

    __slots__ = ("part", "orders", "sizes", "starts", "per_example")

    def __init__(self, part, orders, sizes, dtypes):
        self.part, self.orders, self.sizes = part, orders, sizes
        self.starts, self.per_example = [], {}
        for size, dtype in zip(sizes, dtypes):
            self.starts.append(self.per_example.get(dtype, (0, 0))[1])
            if size:
                rows, elements = self.per_example.get(dtype, (0, 0))
                self.per_example[dtype] = (rows + 1, elements + size)

    def rows(self, dtype):
        """One example's rows of ``dtype``."""
        return self.per_example[dtype][0]

    def elements(self, dtype):
        """One example's elements of ``dtype``: the dense stride between examples."""
        return self.per_example[dtype][1]


def stacked(part, n, positions):
    """The `CellPlan` of a stacked batch of ``n`` examples whose unique leaves are
    ``part``'s GPU leaves; ``positions``: the plan's positions (``_cells._cell_positions``)."""
    leaves = part.leaves
    cells = [leaf.part(0, leaf.shape[1:], leaf.strides[1:]) for leaf in leaves]
    orders = [_order([cell]) for cell in cells]
    sizes, dtypes = [cell.size for cell in cells], [leaf.dtype for leaf in leaves]
    if not n:
        return CellPlan(part, orders, sizes, dtypes)
    firsts = [_cuda._walk(cell, order) for cell, order in zip(cells, orders)]
    walks = [  # every example's cells: the first example's, moved by the example stride
        (base + i * leaf.strides[0], offset, axes)
        for i in range(n)
        for leaf, (base, offset, axes) in zip(leaves, firsts)
    ]
    return _planned(leaves, (sizes * n, dtypes * n, walks), positions, orders, sizes, dtypes)


def sequence(parts, positions):
    """The `CellPlan` of examples whose GPU leaves are ``parts``' (one `_cuda.Part` each,
    every unique leaf of its example, in order)."""
    columns = list(zip(*(part.leaves for part in parts)))  # per unique leaf, every example's
    orders = [_order(cells) for cells in columns]
    sizes, dtypes = [cells[0].size for cells in columns], [cells[0].dtype for cells in columns]
    walks = [_cuda._walk(leaf, order) for part in parts for leaf, order in zip(part.leaves, orders)]
    leaves = [leaf for part in parts for leaf in part.leaves]
    return _planned(leaves, (sizes * len(parts), dtypes * len(parts), walks), positions, orders, sizes, dtypes)


def _order(cells):
    """The walk of cells of one leaf (``_cells._shared_runs``'s rule): their own layout if
    they share one that repeats no element, else C order."""
    shared = _table.shared_traversal(cells)
    return _table.c_traversal(cells[0].shape) if shared is None else shared


def _planned(leaves, rows, positions, orders, sizes, dtypes):
    plan = _cuda.Plan(leaves, positions, _cuda._stream_of(leaves[0]), rows=rows)
    part = _cuda.Part(np.arange(len(leaves)), leaves, plan.positions, False, plan)
    return CellPlan(part, orders, sizes, dtypes)


# -------------------------------------------------------------------- operations
# Twins of ``_private_cpu``'s, over a ``_cells.Cells`` whose ``gpu`` is a `CellPlan`.


class Clipping(NamedTuple):
    """What clipping the examples to bounds finds, in one float64 device array (its views);
    the factors stay in the cells' plan."""

    norms: object  # (B,)
    layer_norms: object  # (B, L)
    clipped: object  # 0-d
    nonfinite: object  # 0-d


def example_norms(cells, p):
    """Each example's p-norm, a float64 ``(B,)`` device array."""
    return _fold(cells, p, _kernels().NORMS).norms


def clipping(cells, bounds, eps):
    """The norms and counts; each cell's factor ``min(1, bound / (norm + eps))`` (0 for an
    example whose norm is not finite) goes to the plan's scratch. ``bounds``: one (0-d)
    or one per unique leaf."""
    kernels = _kernels()
    if bounds.ndim:
        return _fold(cells, 2.0, kernels.CLIP_LAYERS, bounds, eps)
    return _fold(cells, 2.0, kernels.CLIP, bounds, eps)


def _fold(cells, p, mode, bounds=None, eps=0.0):
    """The cells' p-norms (the plan's norm passes), then `fold_examples_cuda`: one array
    ``[total, layer norms (B x L), cell norms (B x U), norms (B), clipped, nonfinite]``."""
    n, U, L = cells.n, cells.leaves, cells.unique_of.size
    at = 1 + n * L
    bound = float(bounds) if mode == _kernels().CLIP else 0.0
    with cells.gpu.part as plan:
        if not n:
            _, out = plan.filled(at + 2, 0.0)
        else:
            buffer, out = plan.new(at + n * U + n + 2)
            plan.norms(p, buffer)
            per_layer = plan.upload(bounds) if mode == _kernels().CLIP_LAYERS else buffer  # else unread
            scalars = [(n, "i8"), (U, "i8"), (at, "i8"), (float(p), "f8"), (bound, "f8"), (eps, "f8"), (mode, "i8")]
            plan.launch(_kernels().fold_examples_cuda, 1, _cuda._kernels().FINISH_THREADS, [buffer, per_layer], scalars)
    norms = at + n * U
    return Clipping(
        _view(plan, out, (n,), norms), _view(plan, out, (n, L), 1), _view(plan, out, (), norms + n),
        _view(plan, out, (), norms + n + 1),
    )  # fmt: skip


def _view(plan, out, shape, start):
    """The C-ordered float64 ``shape`` of ``out`` from element ``start`` on."""
    strides = tuple(8 * int(np.prod(shape[k + 1 :])) for k in range(len(shape)))
    return _cuda._shaped(plan.kind, out, shape, strides, _FLOAT64, 8 * start)


def scale_cells_(cells, clipping):
    """Scale every cell by its factor in place, one launch per dtype: cells of factor 1 are
    not written, those of factor 0 are zeroed (NaN and inf included)."""
    if not cells.n:
        return
    kernels = _kernels()
    with cells.gpu.part as plan:
        plan.run(lambda g: kernels.private_kernels_for(g.dtype).clip_cells_cuda_, c=float(_cuda._kernels().BY_ROW_COEF))


def clipped_copy(cells, clipping):
    """The clipped examples in new device arrays (one pass per dtype, copying where the
    factor is 1), in the batch's structures: the stacked container, or a list of them."""
    gpu, n = cells.gpu, cells.n
    kernels = _kernels()
    with gpu.part as plan:
        made = {dtype: plan.new(n * gpu.elements(dtype), dtype) for dtype in gpu.per_example}
        if n:
            plan.run(
                lambda g: kernels.private_kernels_for(g.dtype).clip_copy_cuda, out=lambda g: made[g.dtype][0],
                c=float(_cuda._kernels().BY_ROW_COEF),
            )  # fmt: skip
    if cells.stacked:
        return cells.result([_leaf_of(plan, gpu, made, u, cells, n) for u in range(cells.leaves)])
    return [cells.result([_leaf_of(plan, gpu, made, u, cells, i) for u in range(cells.leaves)], i) for i in range(n)]


def _leaf_of(plan, gpu, made, u, cells, example):
    """Leaf ``u`` over its dtype's dense buffer in ``made``: example ``example``'s, or with
    ``example = n`` (stacked) every example's, the example axis first."""
    shape, dtype = cells.shapes[u], cells.dtypes[u]
    if not gpu.sizes[u]:
        return _empty(plan, (example, *shape) if example == cells.n else shape, dtype)
    flat = made[dtype][1]
    itemsize = dtype.itemsize
    strides, offset = _cuda.dense_strides(shape, gpu.orders[u], itemsize)
    stride = gpu.elements(dtype) * itemsize
    start = gpu.starts[u] * itemsize + offset
    if example == cells.n:
        return _cuda._shaped(plan.kind, flat, (example, *shape), (stride, *strides), dtype, start)
    return _cuda._shaped(plan.kind, flat, shape, strides, dtype, start + example * stride)


def weighted_sum(cells, clipping, std, divisor, noise, first_draw):
    """``(Σ_i f_iu g_iu + std z) / divisor`` for every unique leaf ``u``, rounded once to its
    dtype: new device arrays laid out in the cells' walk (like the examples' leaf), one
    launch per dtype. The draws ``z`` are the noise stream's from ``first_draw`` on,
    leaf after leaf, each in that order."""
    gpu, n = cells.gpu, cells.n
    kernels, passes = _kernels(), _cuda._kernels()
    starts = first_draw + cells.draw_starts()
    if not n:
        return _noise_only(cells, std, divisor, noise, starts)
    kind, keys = _key(noise, std)
    with gpu.part as plan:
        made = {dtype: plan.new(gpu.elements(dtype), dtype) for dtype in gpu.per_example}
        draws = np.empty(plan.nrows, np.int64)
        draws[plan.row_of] = np.tile(starts, n)  # the draw of every cell's element 0
        draws = plan.upload(draws)
        pieces = -(-passes.CHUNK // passes.THREADS_PER_BLOCK)
        for g in plan.groups:
            chunks = sum(-(-size // passes.CHUNK) for size, d in zip(gpu.sizes, cells.dtypes) if d == g.dtype)
            grid = _cuda.grid_size(plan.device, chunks * pieces)
            plan.launch(
                kernels.private_kernels_for(g.dtype).weighted_sum_cuda, grid, passes.THREADS_PER_BLOCK,
                [g.data, made[g.dtype][0], draws],
                [(g.index, "i8"), (n, "i8"), (gpu.rows(g.dtype), "i8"), (passes.CHUNK, "i8"), (std, "f8"),
                 (divisor, "f8"), (kind, "i8"), *keys],
            )  # fmt: skip
    return [
        _cuda._dense_shaped(plan.kind, made[dtype][1], shape, gpu.orders[u], dtype, gpu.starts[u] * dtype.itemsize)
        if gpu.sizes[u] else _empty(plan, shape, dtype)
        for u, (shape, dtype) in enumerate(zip(cells.shapes, cells.dtypes))
    ]


def _empty(plan, shape, dtype):
    """A new array of ``shape`` (holding no element) and ``dtype``."""
    return _cuda._shaped(plan.kind, plan.new(0, dtype)[1], shape, _cuda._c_strides(shape, dtype.itemsize), dtype, 0)


def _noise_only(cells, std, divisor, noise, starts):
    """The sum of no examples: zeros, plus ``std`` times the draws from ``starts[u]`` on,
    divided; C-ordered (as the CPU lays them out)."""
    plan = cells.gpu.part.plan
    outputs = []
    for shape, dtype in zip(cells.shapes, cells.dtypes):
        flat = plan.new(int(np.prod(shape)), dtype)[1]
        outputs.append(_cuda._shaped(plan.kind, flat, shape, _cuda._c_strides(shape, dtype.itemsize), dtype, 0))
    leaves = [_cuda.describe(out, None) for out in outputs]
    part = _cuda.Part(np.arange(len(leaves)), leaves, np.arange(len(leaves)), False)
    with part as made:
        made.run("fill_cuda_", a=0.0, c=float(_cuda._kernels().BY_COEF))
        if std:
            _noise(made, std, divisor, noise, starts)
    return outputs


def add_noise_(batch, std, noise, starts):
    """Add ``std`` times the stream's draws to every GPU leaf of ``batch`` in place, leaf
    ``u`` of ``batch.cuda`` from ``starts[u]`` on, in its memory order: one launch per dtype."""
    with batch.cuda as plan:
        _noise(plan, std, 1.0, noise, starts)


def _noise(plan, std, divisor, noise, starts):
    """``x = (x + std z) / divisor`` on every leaf of ``plan``, leaf ``u``'s draws from ``starts[u]`` on."""
    kernels, passes = _kernels(), _cuda._kernels()
    kind, keys = _key(noise, std)
    draws = np.empty(plan.nrows, np.int64)
    draws[plan.row_of] = starts
    draws = plan.upload(draws)
    for g in plan.groups:
        plan.launch(
            kernels.private_kernels_for(g.dtype).add_noise_cuda_, g.grid, passes.THREADS_PER_BLOCK, [g.data, draws],
            [(g.index, "i8"), (std, "f8"), (divisor, "f8"), (kind, "i8"), *keys],
        )  # fmt: skip


def _key(noise, std):
    """``(kind, keys)``: the generator and its key words packed two per int64 argument
    (``(value, "i8")`` pairs; values of 64 bits, which the launch passes bit for bit)."""
    if not std:
        return 0, [(0, "i8")] * 5
    words = [int(w) for w in noise._key] + [0] * (10 - noise._key.size)
    return int(noise._kind), [(words[2 * j] | words[2 * j + 1] << 32, "i8") for j in range(5)]
