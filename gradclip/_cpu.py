"""Norms, scaling, clamping and finite checks of a ``Batch`` with the CPU kernels.

Per-leaf results are indexed by unique leaf (``Batch.arrays``).
"""

import functools
import math

import numpy as np

from . import _batch, _table
from ._kernels import cpu as kernels

_TINY = 2.0**-900
"""A float64 sum below this may have lost bits to underflow."""


def _tables(batch, leaf_mask=None):
    """The non-empty tables of ``batch``, cut to the leaves where ``leaf_mask`` holds."""
    for table in batch.tables:
        if leaf_mask is not None:
            table = table.select(leaf_mask)
        if table.size:
            yield table


def _run(op, batch, out, p=2.0, leaf_arg=None, leaf_mask=None):
    for table in _tables(batch, leaf_mask):
        kernels.reduce_table(op, table, out, p, leaf_arg)


def leaf_norms(batch, p):
    """The p-norm of every unique leaf, in float64.

    p = 1 and 2 take one pass. A leaf whose sum overflowed, or whose float64
    elements may have underflowed, is redone scaled by its largest magnitude, as
    is every leaf for other p (where ``|x|**p`` overflows easily).
    """
    n = len(batch.arrays)
    if p == math.inf:
        out = np.zeros(n)
        _run(kernels.MAXABS, batch, out)
        return out
    if p not in (1.0, 2.0):
        return _scaled_norms(batch, p, np.ones(n, dtype=bool))
    sums = np.zeros(n)
    _run(kernels.SUMSQ if p == 2.0 else kernels.SUMABS, batch, sums)
    norms, redo, any_redo = kernels.norms_from_sums(sums, p, _TINY, _float64_based(batch))
    if any_redo:
        norms[redo] = _scaled_norms(batch, p, redo)[redo]
    return norms


def _float64_based(batch):
    """Per unique leaf: is it float64 or complex128?"""
    wide = np.zeros(len(batch.arrays), dtype=bool)
    for table in batch.tables:
        if _wide(table.witness.dtype):
            wide[table.seg_leaf] = True
    return wide


def _wide(dtype):
    return dtype in (np.float64, np.complex128)


def _scaled_norms(batch, p, leaf_mask):
    """``m * (sum (|x| / m)**p) ** (1/p)`` with ``m`` the largest magnitude of each leaf."""
    peak = np.zeros(leaf_mask.size)
    _run(kernels.MAXABS, batch, peak, leaf_mask=leaf_mask)
    regular = leaf_mask & np.isfinite(peak) & (peak > 0)
    sums = np.zeros(leaf_mask.size)
    if regular.any():
        _run(kernels.SUMPOW, batch, sums, p, leaf_arg=peak, leaf_mask=regular)
    norms = peak.copy()  # 0, inf and NaN leaves: the peak is the norm
    with np.errstate(over="ignore"):  # a true norm beyond float64 is inf
        norms[regular] = peak[regular] * sums[regular] ** (1.0 / p)
    return norms


def total_norm(norms, p):
    """The p-norm of a vector of leaf norms, as a float (NaN wins over inf)."""
    return float(kernels.fold_norms(norms, float(p)))


def plain_list_norm(grads, plain, max_norm=math.inf, eps=0.0):
    """The total 2-norm of ``grads`` in one compiled call, every leaf scaled in place to
    ``max_norm`` as `clip_grad_norm_` does; or None, with nothing written. The total is
    finite: the path declines any leaf whose sum of squares is not.

    ``plain``: what `_batch.plain_list` says of ``grads``; None (not a plain list) gives
    None, and so does a call that needs more than the plain 2-norm: a leaf norm to redo
    (see `leaf_norms`), or many 16-bit elements to scale (by table, see `scale_`).
    """
    if plain is None:
        return None
    dtype, required = plain
    size_limit = LOOKUP_MIN if dtype.itemsize == 2 and max_norm < math.inf else kernels.NO_LIMIT
    witness = _table.witness(dtype)
    return kernels.plain_list_norm(
        grads, dtype, required, size_limit, max_norm, eps, _TINY, _wide(witness.dtype), witness
    )


def plain_list_count_nonfinite(grads, plain):
    """`count_nonfinite` of a plain list (see `plain_list_norm`) in one call, or None."""
    return None if plain is None else kernels.plain_list_count_nonfinite(grads, *plain, _table.witness(plain[0]))


def plain_list_clamp_(grads, plain, bound):
    """`clamp_` of a plain list (see `plain_list_norm`) in one call; False if not done."""
    return plain is not None and _plain_list_update(kernels.CLAMP, grads, plain, bound) is not None


def plain_list_zero_nonfinite_(grads, plain):
    """`zero_nonfinite_` of a plain list (see `plain_list_norm`) in one call, or None."""
    return None if plain is None else _plain_list_update(kernels.ZERO_NONFINITE, grads, plain, 0.0)


def _plain_list_update(op, grads, plain, bound):
    return kernels.plain_list_update(op, grads, *plain, bound, _table.witness(plain[0]))


LOOKUP_MIN = 1 << 20
"""16-bit elements scaled by one coefficient from which computing all 65,536 codes'
results first (~50-100 us) is cheaper than rounding each float64 product."""

FACTOR_TRIES = 5
"""float32 factors `kernels.float32_factor` tries (the nearest and two on each side)."""


def scale_(batch, coef):
    """Multiply every element of unique leaf ``u`` by ``coef[u]``; leaves with 1 are not touched."""
    scaled = coef != 1.0
    for table in _tables(batch, None if scaled.all() else scaled):
        coefs = coef[table.seg_leaf]
        if table.witness.itemsize == 2 and table.size >= LOOKUP_MIN and (coefs == coefs[0]).all():
            _scale_codes(table, float(coefs[0]))
        else:
            kernels.update_table(kernels.SCALE, table, coef)


def _scale_codes(table, coef):
    """Every element of a 16-bit table times ``coef``, by its code's exact result: in
    float32 where a factor gives the elements' codes theirs, else by lookup (see
    kernels/cpu.py)."""
    codes = _all_codes(table.witness.dtype)
    results = kernels.scaled_codes(codes, coef)
    factor, below = math.nan, kernels.ALL_CODES
    if kernels.scales_in_float32(table.witness):
        factor, below = kernels.float32_factor(codes, results, coef, FACTOR_TRIES)
    kernels.scale_codes_table(table, results, factor, below)


@functools.cache
def _all_codes(dtype):
    """Every 16-bit pattern once, as ``dtype``, in the order of its ``uint16`` value."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)


def fill_(batch, value):
    """Set every element of every CPU leaf to ``value``."""
    for table in _tables(batch):
        for u in np.unique(table.seg_leaf).tolist():
            batch.arrays[u].fill(value)


def clamp_(batch, bound):
    _update(kernels.CLAMP, batch, bound=bound)


def count_nonfinite(batch):
    counts = np.zeros(len(batch.arrays))
    _run(kernels.NONFINITE, batch, counts)
    return int(counts.sum())


def zero_nonfinite_(batch):
    return _update(kernels.ZERO_NONFINITE, batch)


def _update(op, batch, bound=0.0):
    return sum(kernels.update_table(op, table, bound=bound) for table in _tables(batch))


# ------------------------------------------------------------ GradAccumulator


_ALIGN = 64
"""Each position's buffer starts on a multiple of this many bytes of the one allocation."""


class Accumulation:
    """`GradAccumulator`'s buffers in host memory: one allocation, one dense run per
    position, in the accumulator dtype. Element ``k`` of a position's walk (in the window's
    ``orders``, ``_table.traversal``) is at its buffer's element ``k``; the results are views
    with the positions' shapes and strides that follow the same walk
    (``_table.dense_view``), so a transposed grad gets a transposed-looking result."""

    on_gpu = False

    def __init__(self, window, leaves, saved=None):
        self.orders, self.accumulators, self.sizes = window.orders, window.accumulators, window.sizes
        ends = np.cumsum([_ALIGN * -(-n * acc.itemsize // _ALIGN) for n, acc in zip(self.sizes, self.accumulators)])
        arena = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self.flats = [
            arena[start : start + n * acc.itemsize].view(acc)
            for start, n, acc in zip(starts.tolist(), self.sizes.tolist(), self.accumulators)
        ]
        self.views = [
            _table.dense_view(flat, 0, shape, order) for flat, shape, order in zip(self.flats, window.shapes, self.orders)
        ]
        self.address = arena.ctypes.data + starts
        if saved is not None:
            for flat, values in zip(self.flats, saved):
                flat[...] = values
        positions = np.arange(len(self.flats))
        self.batch = _batch.Batch(window.treedef, self.flats, positions, _batch.tables(self.flats), self.flats)
        self.layouts = None  # `_layouts` of the last micro-batch whose every leaf followed `orders`
        self.pinned = None  # and its dtype objects, whose addresses `layouts` holds
        self.current = None  # `_layouts` of the micro-batch being added

    def fits(self, leaves):
        """Whether ``leaves`` have the layouts of an earlier micro-batch (then their shapes and
        dtypes need no check)."""
        self.current = _layouts(leaves)
        return _same(self.current, self.layouts)

    def finite(self, batch, leaves):
        return count_nonfinite(batch) == 0

    def add(self, batch, leaves, first):
        """Accumulate ``leaves`` (one array per position, those of ``batch``) into the buffers."""
        identity = len(batch.arrays) == len(batch.unique_of)
        layouts = self.current if self.current is not None else _layouts(leaves)
        sources, tables = leaves, batch.tables
        if not _same(layouts, self.layouts):
            sources = [self._in_buffer_order(p, a) for p, a in enumerate(leaves)]
            if all(s is a for s, a in zip(sources, leaves)):
                self.layouts = layouts
                self.pinned = [a.dtype for a in leaves]  # their addresses stay theirs
            else:
                identity = False
        self.current = None
        if not identity:  # a repeated array, or copies: rows per position
            tables = _batch.tables(sources)
        for table in tables:
            if table.size:
                acc = self.accumulators[table.seg_leaf[0]]
                kernels.accumulate_table(table, self._dst_rows(table, sources), _table.witness(acc), first)

    def _in_buffer_order(self, position, array):
        """``array``, or a copy of it that walks in the order of the position's buffer (also
        made where a zero stride repeats elements: the kernels take steps >= 1)."""
        order = self.orders[position]
        if _table.traversal(array) == order and all(s or n == 1 for n, s in zip(array.shape, array.strides)):
            return array
        copy = _table.dense_view(np.empty(array.size, array.dtype), 0, array.shape, order)
        copy[...] = array
        return copy

    def _dst_rows(self, table, sources):
        """Where each row of ``table`` lands: its leaf's buffer, after the leaf's earlier rows."""
        leaf = table.seg_leaf
        dst = self.address[leaf]
        split = np.flatnonzero(table.count != self.sizes[leaf])  # leaves of several rows
        if split.size:
            for position in np.unique(leaf[split]).tolist():
                rows = np.flatnonzero(leaf == position)
                itemsize = self.accumulators[position].itemsize
                dst[rows] += _table.dense_offsets(sources[position]) * itemsize
        return dst

    def result(self, coef, copy, shapes):
        """The window's result, one array per position: new arrays (``copy``), or views of the
        buffers, scaled by ``coef`` (in place, for views)."""
        if copy:
            out = _batch.Batch(self.batch.treedef, self.views, self.batch.unique_of, [], self.views).copy()
            if coef != 1.0:
                scale_(out, np.full(len(out.arrays), coef))
            return out.arrays
        if coef != 1.0:
            scale_(self.batch, np.full(len(self.flats), coef))
        return self.views

    def snapshot(self):
        """The buffers as new host arrays, one per position."""
        return [flat.copy() for flat in self.flats]


def _layouts(arrays):
    """Something equal for two lists of arrays with the same dtypes, shapes and strides."""
    layouts = kernels.array_layouts(arrays)  # one kernel call for many arrays
    return [(a.dtype, a.shape, a.strides) for a in arrays] if layouts is None else layouts


def _same(layouts, other):
    if isinstance(layouts, np.ndarray) and isinstance(other, np.ndarray):
        return layouts.size == other.size and bool((layouts == other).all())
    return type(layouts) is type(other) and layouts == other
