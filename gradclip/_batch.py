"""The validated leaves of one call: flattened, checked, de-duplicated, grouped.

Everything that can fail is checked here, for every leaf, before any kernel runs.
The same array object at several positions is one *unique* leaf: counted once in
totals and updated once; per-position results are gathered back through
``unique_of``.
"""

import numpy as np

from . import _checks, _dispatch, _table, _tree


class Batch:
    """Leaves of one call.

    Attributes
    ----------
    treedef : the container structure (for out-of-place results).
    arrays : list of numpy.ndarray, one per unique leaf.
    unique_of : int64 array, the unique leaf at each position.
    tables : list of ``_table.Table``, one per dtype.
    """

    __slots__ = ("treedef", "arrays", "unique_of", "tables", "_originals")

    def __init__(self, treedef, arrays, unique_of, tables, originals):
        self.treedef = treedef
        self.arrays = arrays
        self.unique_of = unique_of
        self.tables = tables
        self._originals = originals

    def copy(self):
        """The same leaves as fresh writable arrays (for the out-of-place functions)."""
        arrays = [np.array(array, copy=True) for array in self.arrays]
        return Batch(self.treedef, arrays, self.unique_of, _tables(arrays), self._originals)

    def rebuild(self):
        """The leaves in the caller's structure; NumPy scalars come back as scalars."""
        leaves = [
            self.arrays[u][()] if isinstance(self._originals[u], np.generic) else self.arrays[u]
            for u in self.unique_of
        ]
        return _tree.unflatten(self.treedef, leaves)


def collect(grads, function, *, writes=False, real_only=False):
    """Flatten and validate ``grads`` for ``function`` (its name, for messages).

    ``writes``: the call updates leaves in place (they must be writable, without
    repeated elements). ``real_only``: complex leaves are refused.
    """
    leaves, treedef = _tree.flatten(grads)
    index = {}
    arrays, originals, unique_of = [], [], []
    for position, leaf in enumerate(leaves):
        unique = index.get(id(leaf))
        if unique is None:
            where = lambda position=position: _tree.path(treedef, position)  # noqa: E731
            array = _dispatch.as_cpu_array(leaf, where)
            _check(array, where, function, writes, real_only)
            unique = index[id(leaf)] = len(arrays)
            arrays.append(array)
            originals.append(leaf)
        unique_of.append(unique)
    return Batch(treedef, arrays, np.array(unique_of, dtype=np.int64), _tables(arrays), originals)


def _tables(arrays):
    """One kernel table per dtype."""
    groups = {}
    for unique, array in enumerate(arrays):
        groups.setdefault(array.dtype, []).append(unique)
    return [_table.build(dtype, [arrays[u] for u in ids], ids) for dtype, ids in groups.items()]


_CONTIGUOUS = 0x1 | 0x2  # NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_F_CONTIGUOUS
_ALIGNED = 0x100


def _check(array, where, function, writes, real_only):
    _checks.check_dtype(where, array.dtype)
    if real_only:
        _checks.check_real(where, array.dtype, function)
    if writes:
        _checks.check_writable(where, array, function)
    flags = array.flags.num
    if not flags & _ALIGNED:
        _checks.check_aligned(where, array)
    if not flags & _CONTIGUOUS:
        _checks.check_layout(where, array)
        if writes:
            _checks.check_no_overlap(where, array, function)
