"""Which leaves share memory (SPEC §10): in-place functions refuse two leaves with an
element in common, which would be written twice.

A leaf is described by its layout, ``(address, shape, strides, itemsize)`` in bytes,
whatever memory it lives in; nothing here reads the memory. The search is in two
steps:

1. Extents: each leaf's byte range ``[lo, hi)``, from its lowest to its highest byte.
   Disjoint extents cannot share anything. Ranges in address order are seen to be
   disjoint in one pass (`kernels.cpu.in_address_order`); others are sorted by
   their start (O(n log n)) and swept for the groups whose extents chain together.
2. Within a group, the layouts decide: strided views can interleave without sharing
   a byte (``a[::2]`` and ``a[1::2]``). A group is checked exactly, pair by pair with
   NumPy's solver (``numpy.shares_memory`` with bounded work: cheap for a few views
   however large), or element by element, sorting every element's byte range (cheap
   for many small views, such as the columns of one matrix), whichever costs less.

For contiguous leaves, extents that meet share memory: `disjoint` is the whole test.
"""

import numpy as np

from ._kernels import cpu as kernels

MAX_WORK = 1 << 16
"""The most candidate solutions ``numpy.shares_memory`` may try on one pair; the views
seen in practice need a handful. A pair beyond it is checked element by element (or,
beyond ``_ELEMENTS_LIMIT``, by the solver without a bound)."""

_ELEMENTS_LIMIT = 1 << 26
"""The most elements a group is checked element by element (8 bytes each, twice)."""

_FEW = 512
"""Fewer ranges than this are sorted in one compiled call; NumPy sorts more faster."""

_PAIR_COST = 200
"""What checking one pair costs, in elements checked one by one (~5 us vs ~25 ns)."""


def extent(address, shape, strides, itemsize):
    """The byte range ``(lo, hi)`` that a layout spans; ``(0, 0)`` if it has no element."""
    if 0 in shape:
        return 0, 0
    lo = hi = address
    for n, stride in zip(shape, strides):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi + itemsize


def disjoint(lo, hi):
    """Whether the byte ranges ``[lo[i], hi[i])`` (int64 arrays) are pairwise disjoint (an
    empty one meets nothing): one pass for ranges in address order, else a sort."""
    if lo.size < _FEW:
        return kernels.disjoint(lo, hi)  # one compiled call
    if kernels.in_address_order(lo, hi):
        return True
    keep = lo < hi
    starts, ends = np.sort(lo[keep]), np.sort(hi[keep])
    # non-empty ranges are disjoint iff, with both ends sorted on their own, each end
    # comes at or before the next start
    return bool((starts[1:] >= ends[:-1]).all())


def first_overlap(lo, hi, layout):
    """A pair ``(i, j)``, ``i < j``, of leaves that share a byte, or None.

    Parameters
    ----------
    lo, hi : sequences of int
        Each leaf's extent (see `extent`); ``lo == hi`` for a leaf with no element.
    layout : callable
        ``layout(i)`` -> ``(address, shape, strides, itemsize)`` of leaf ``i``; only
        called for leaves whose extent meets another's.

    Every leaf must be free of repeated elements on its own (no zero strides).
    """
    lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    if disjoint(lo, hi):
        return None
    leaves = np.flatnonzero(lo < hi)
    leaves = leaves[np.argsort(lo[leaves], kind="stable")]
    reach = np.maximum.accumulate(hi[leaves])
    group_starts = np.flatnonzero(np.concatenate([[True], lo[leaves][1:] >= reach[:-1]]))
    for first, last in zip(group_starts.tolist(), [*group_starts[1:].tolist(), leaves.size]):
        if last - first > 1:
            pair = _group_overlap(leaves[first:last].tolist(), lo, hi, layout)
            if pair is not None:
                return pair
    return None


def _group_overlap(group, lo, hi, layout):
    """A pair of ``group`` (leaves in order of their lowest address, whose extents chain
    together) that shares a byte, or None."""
    layouts = {i: layout(i) for i in group}
    elements = sum(int(np.prod(layouts[i][1])) for i in group)
    pairs = len(group) * (len(group) - 1) // 2  # at most
    if elements <= min(_PAIR_COST * pairs, _ELEMENTS_LIMIT):
        return _shared_element([layouts[i] for i in group], group)
    views = {}
    for k, j in enumerate(group):
        for i in group[:k]:
            if hi[i] > lo[j] and _share(views, layouts, i, j):
                return min(i, j), max(i, j)
    return None


def _share(views, layouts, i, j):
    for leaf in (i, j):
        if leaf not in views:
            views[leaf] = np.asarray(_Memory(*layouts[leaf]))
    try:
        return np.shares_memory(views[i], views[j], max_work=MAX_WORK)
    except np.exceptions.TooHardError:
        if sum(int(np.prod(layouts[leaf][1])) for leaf in (i, j)) <= _ELEMENTS_LIMIT:
            return _shared_element([layouts[i], layouts[j]], [i, j]) is not None
        return np.shares_memory(views[i], views[j], max_work=None)  # exact, however long it takes


class _Memory:
    """The layout as NumPy's array interface: a NumPy array over that memory, made only for
    ``numpy.shares_memory`` to compare addresses (never read; read-only)."""

    def __init__(self, address, shape, strides, itemsize):
        self.__array_interface__ = {
            "version": 3,
            "data": (address, True),
            "shape": tuple(shape),
            "strides": tuple(strides),
            "typestr": f"|V{itemsize}",
        }


def _shared_element(layouts, names):
    """A pair of ``names`` (one per layout) whose elements share a byte, found by sorting
    every element's byte range; or None."""
    starts, owners, widest = [], [], 0
    for name, (address, shape, strides, itemsize) in zip(names, layouts):
        offsets = np.zeros((), np.int64)
        for n, stride in zip(shape, strides):
            offsets = np.add.outer(offsets, np.arange(n, dtype=np.int64) * stride)
        starts.append(address + offsets.ravel())
        owners.append(np.full(offsets.size, name))
        widest = max(widest, itemsize)
    itemsizes = np.repeat([layout[3] for layout in layouts], [s.size for s in starts])
    starts, owners = np.concatenate(starts), np.concatenate(owners)
    order = np.argsort(starts, kind="stable")
    starts, owners, ends = starts[order], owners[order], (starts + itemsizes)[order]
    reach = np.maximum.accumulate(ends)
    for k in (np.flatnonzero(starts[1:] < reach[:-1]) + 1).tolist():  # element k meets an earlier one
        window = slice(np.searchsorted(starts, starts[k] - widest, side="right"), k)  # all that can reach it
        earlier = np.flatnonzero((ends[window] > starts[k]) & (owners[window] != owners[k]))
        if earlier.size:
            i, j = int(owners[window][earlier[0]]), int(owners[k])
            return min(i, j), max(i, j)
    return None
