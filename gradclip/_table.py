"""Describe leaves to the CPU kernels as tables of strided runs.

A leaf of any shape and strides is a set of rows ``(address, count, step)``:
runs of ``count`` elements ``step`` elements apart. Axes are reordered by stride
and negative strides flipped (every kernel is elementwise or an
order-independent reduction), then adjacent axes that tile each other are
merged, so C-, Fortran-order, transposed and reversed arrays are one contiguous
row and a stepped slice is one row per outer index. Nothing is copied: the
kernels read and write the leaves' own memory.
"""

import functools
import numbers

import numpy as np

# The integer type each format travels as inside the kernels (see kernels/cpu.py).
_KERNEL_DTYPE = {"float16": np.uint16, "bfloat16": np.int16}


class Table:
    """Rows of one dtype: ``addr``, ``count``, ``step`` and owning ``seg_leaf``."""

    __slots__ = ("addr", "count", "step", "seg_leaf", "witness", "size")

    def __init__(self, addr, count, step, seg_leaf, witness, size=None):
        self.addr = addr
        self.count = count
        self.step = step
        self.seg_leaf = seg_leaf
        self.witness = witness  # an empty array of the kernels' element type
        self.size = int(count.sum()) if size is None else size  # elements, unless the caller counted them

    def select(self, leaf_mask):
        """The rows of the leaves where ``leaf_mask`` (indexed by leaf) is true."""
        keep = leaf_mask[self.seg_leaf]
        return Table(self.addr[keep], self.count[keep], self.step[keep], self.seg_leaf[keep], self.witness)


def build(dtype, arrays, leaf_ids):
    """The table of ``arrays`` (all of ``dtype``), row owners from ``leaf_ids``."""
    flat, flat_count, flat_leaf = [], [], []  # one contiguous row per leaf
    strided = []  # (addr, count, step, leaf) columns of the other leaves
    for array, leaf in zip(arrays, leaf_ids):
        if array.size == 0:
            continue
        if array.flags.c_contiguous or array.flags.f_contiguous:
            flat.append(array)
            flat_count.append(array.size)
            flat_leaf.append(leaf)
            continue
        starts, n, step = _runs(array)
        rows = len(starts)
        strided.append((starts, *(np.full(rows, value, dtype=np.int64) for value in (n, step, leaf))))
    flat_columns = ([array.ctypes.data for array in flat], flat_count, [1] * len(flat), flat_leaf)
    columns = [
        np.concatenate([np.asarray(column, dtype=np.int64), *(rows[i] for rows in strided)])
        for i, column in enumerate(flat_columns)
    ]
    return Table(*columns, witness(dtype))


def extents(tables, n):
    """``(lo, hi)``: the byte range of each of ``n`` leaves described by ``tables``, from its
    first byte to past its last (``lo == hi == 0`` for a leaf without rows: no element)."""
    lo, hi = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for table in tables:
        if not table.addr.size:
            continue
        ends = table.addr + ((table.count - 1) * table.step + 1) * table.witness.itemsize
        firsts = np.flatnonzero(np.diff(table.seg_leaf, prepend=-1))  # a leaf's rows are consecutive
        leaves = table.seg_leaf[firsts]
        lo[leaves] = np.minimum.reduceat(table.addr, firsts)
        hi[leaves] = np.maximum.reduceat(ends, firsts)
    return lo, hi


@functools.cache
def witness(dtype):
    """An empty array of the type ``dtype``'s elements travel as in the kernels."""
    return np.empty(0, _KERNEL_DTYPE.get(dtype.name, dtype))


def _axes(array):
    """The axes of ``array`` in walking order: ``(axis, length, stride, flipped)``, innermost first.

    Length-1 axes are left out and negative strides flipped (positive); axes are ordered
    by stride, zero strides (broadcast axes, which repeat elements) outermost.
    """
    axes = [(axis, n, abs(s), s < 0) for axis, (n, s) in enumerate(zip(array.shape, array.strides)) if n != 1]
    axes.sort(key=lambda axis: (axis[2] == 0, axis[2]))  # stable: ties keep their order
    return axes


def _merged(axes):
    """``(length, stride)`` of the walking axes after merging those that tile each other."""
    merged = [axes[0][1:3]]
    for _, n, s, _ in axes[1:]:
        inner_n, inner_s = merged[-1]
        if s == inner_n * inner_s:
            merged[-1] = (inner_n * n, inner_s)
        else:
            merged.append((n, s))
    return merged


def _runs(array):
    """Start addresses, length and step (in elements) of the runs covering ``array``."""
    axes = _axes(array)
    base = array.ctypes.data - sum((n - 1) * s for _, n, s, flipped in axes if flipped)
    (n, s), *outer = _merged(axes)
    if s == 0:  # every axis is a broadcast one: runs of one element
        (n, s), outer = (1, array.itemsize), [(n, s), *outer]
    offsets = np.zeros(1, dtype=np.int64)
    for m, t in outer:
        offsets = (offsets[:, None] + np.arange(m, dtype=np.int64) * t).ravel()
    return base + offsets, n, s // array.itemsize


def traversal(array):
    """The order in which `_runs` walks ``array``: ``(axis, flipped)`` pairs, innermost first.

    A dense buffer laid out in this order holds element k of the walk at position k (see
    `dense_offsets`).
    """
    return tuple((axis, flipped) for axis, _, _, flipped in _axes(array))


def shared_traversal(arrays):
    """The `traversal` of ``arrays`` (of one shape) if they all have the same strides and
    none repeats elements (a zero stride), else None: whether one walk, with dense runs
    of its output, visits every element of each once and in the same order."""
    first = arrays[0]
    if all(a.strides == first.strides for a in arrays) and all(s or n == 1 for n, s in zip(first.shape, first.strides)):
        return traversal(first)
    return None


def c_traversal(shape):
    """The `traversal` of a C-ordered array of ``shape``."""
    return tuple((axis, False) for axis in reversed(range(len(shape))) if shape[axis] != 1)


def as_traversal(order, shape):
    """``order`` as the `traversal` of some array of ``shape`` (a saved one, checked), or None:
    ``(axis, flipped)`` pairs naming each axis whose length is not 1 once."""
    if not isinstance(order, (list, tuple)):
        return None
    pairs = []
    for pair in order:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            return None
        axis, flipped = pair
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            return None
        if not isinstance(flipped, (bool, np.bool_)):
            return None
        pairs.append((int(axis), bool(flipped)))
    walked = sorted(axis for axis, _ in pairs)
    return tuple(pairs) if walked == [axis for axis, n in enumerate(shape) if n != 1] else None


def dense_offsets(array):
    """For each row of ``_runs(array)``, in its order: where the row starts, in elements,
    in a dense buffer laid out in ``traversal(array)`` order (rows there have step 1)."""
    merged = _merged(_axes(array))
    offsets = np.zeros(1, dtype=np.int64)
    dense = merged[0][0]  # the dense stride of the next merged axis
    for m, _ in merged[1:]:
        offsets = (offsets[:, None] + np.arange(m, dtype=np.int64) * dense).ravel()
        dense *= m
    return offsets


def dense_view(buffer, offset, shape, order):
    """A view with ``shape`` of the dense buffer ``buffer[offset:]`` laid out in ``order``
    (a `traversal`): the element at index i is where a leaf with that traversal puts its own
    element i."""
    itemsize = buffer.dtype.itemsize
    strides = [itemsize] * len(shape)
    start = offset * itemsize
    dense = itemsize
    for axis, flipped in order:
        strides[axis] = -dense if flipped else dense
        if flipped:
            start += (shape[axis] - 1) * dense
        dense *= shape[axis]
    return np.ndarray(shape, buffer.dtype, buffer=buffer, offset=start, strides=tuple(strides))
