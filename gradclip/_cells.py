"""A batch of examples (SPEC §9) as kernel tables of *cells*.

Cell ``(i, u)`` is example ``i``'s unique leaf ``u``. With ``B`` examples of ``U`` unique
leaves, cell ``i * U + u`` stands where a leaf stands in a ``_batch.Batch``: the cell
tables (``_table.Table``, one per dtype, ``seg_leaf`` holding the cell) go to the CPU
norm and scaling kernels as they are. For the weighted sum, every leaf also has a
`Plan`: the runs of one example's leaf, which every example shares, and each
example's base address.

Two batch forms, both validated here before anything runs:

- *stacked*: one grads container whose every leaf has the example axis first, with the
  same length ``B`` (per-example gradients from ``vmap``, Opacus' ``grad_sample``);
- *a sequence*: ``B`` grads containers with the same structure, shapes and dtypes
  (client updates), each read where it lies.
"""

import numpy as np

from . import _batch, _checks, _table, _tree


class Plan:
    """How the sum reads one leaf ``u`` of every example and where it writes the result.

    ``offset`` (bytes from an example's base), ``count`` and ``step`` (elements): the runs
    of one example's leaf, the same for every example; ``base``: each example's base
    address (int64, ``(B,)``). ``order``: the output's memory order (a
    ``_table.traversal``), and ``out_offset``: where each run lands in it (elements).
    ``keep`` holds copies read instead of the caller's arrays (see `_shared_runs`).
    """

    __slots__ = ("offset", "count", "step", "base", "order", "out_offset", "keep")

    def __init__(self, offset, count, step, base, order, out_offset, keep=None):
        self.offset, self.count, self.step, self.base = offset, count, step, base
        self.order, self.out_offset, self.keep = order, out_offset, keep


class Cells:
    """The validated cells of one call.

    Attributes
    ----------
    batches : list of ``_batch.Batch``: the stacked container (one), or one per example.
    stacked : whether the batch is stacked.
    n : the number of examples, ``B``.
    treedef, unique_of : one example's structure and its positions' unique leaves.
    shapes, dtypes : one example's unique leaves.
    originals : a caller's leaf per unique leaf (results come back in its framework).
    tables : the cell tables (CPU kernels).
    arrays : ``range(B * U)``: the cells' number, which is all the CPU helpers ask of it.
    plans : a `Plan` per unique leaf.
    """

    __slots__ = (
        "batches", "stacked", "n", "treedef", "unique_of", "shapes", "dtypes", "originals", "tables", "arrays", "plans"
    )  # fmt: skip

    def __init__(self, batches, stacked, n, shapes, dtypes, originals, tables, plans):
        self.batches, self.stacked, self.n = batches, stacked, n
        self.treedef, self.unique_of = batches[0].treedef, batches[0].unique_of
        self.shapes, self.dtypes, self.originals = shapes, dtypes, originals
        self.tables, self.plans = tables, plans
        self.arrays = range(n * len(shapes))

    @property
    def leaves(self):
        """``U``, the unique leaves of an example."""
        return len(self.shapes)

    def path(self, u):
        """The path of unique leaf ``u`` (its first position) in one example."""
        return _tree.path(self.treedef, int(np.argmax(self.unique_of == u)))

    def copy(self):
        """The same batch in new writable arrays (for the out-of-place functions)."""
        batches = [batch.copy() for batch in self.batches]
        return _from_stacked(batches[0]) if self.stacked else _from_sequence(batches)

    def rebuild(self):
        """The batch in the caller's structures: the container, or a list of them."""
        rebuilt = [batch.rebuild() for batch in self.batches]
        return rebuilt[0] if self.stacked else rebuilt

    def result(self, outputs):
        """One example's structure holding ``outputs`` (one array per unique leaf) as the caller's kind."""
        from ._dispatch import like

        converted = [like(original, out) for original, out in zip(self.originals, outputs)]
        return _tree.unflatten(self.treedef, [converted[u] for u in self.unique_of.tolist()])


def stacked(grads, function, writes):
    """The cells of a stacked batch (validated, nothing written)."""
    return _from_stacked(_batch.collect(grads, function, writes=writes))


def sequence(examples, function, writes):
    """The cells of a sequence of examples (validated, nothing written)."""
    batches = []
    for i, example in enumerate(examples):
        try:
            batch = _batch.collect(example, function, writes=writes)
        except (TypeError, ValueError, NotImplementedError, ImportError) as error:
            raise _checks.in_example(i, error) from None
        if batches:
            _check_like_first(i, batch, batches[0])
        batches.append(batch)
    if not batches:
        return None
    if writes:
        _check_unshared(batches, function)
    return _from_sequence(batches)


def _from_stacked(batch):
    arrays = [batch.arrays[u] for u in range(len(batch.arrays))]
    n = 0
    for u, array in enumerate(arrays):
        if array.ndim == 0:
            raise _checks.no_example_axis(_tree.path(batch.treedef, _first_position(batch, u)))
        if u == 0:
            n = array.shape[0]
        elif array.shape[0] != n:
            first, where = (_tree.path(batch.treedef, _first_position(batch, v)) for v in (0, u))
            raise _checks.example_counts_differ(first, n, where, array.shape[0])
    plans, rows = [], []
    for array in arrays:
        if n:
            cell = array[0, ...]  # a view, 0-d for a (B,) leaf
            runs = _runs(cell)
            base = array.ctypes.data + np.arange(n, dtype=np.int64) * array.strides[0]
            rows.append((*runs, base))
            plans.append(_plan(cell, runs, base) if _no_repeats(cell) else _copied_plan(array))
        else:  # no example to read: only the (noise) output is planned
            plans.append(_empty_plan(array.shape[1:]))
    tables = _stacked_tables(rows, [a.dtype for a in arrays], n)
    shapes, dtypes = [a.shape[1:] for a in arrays], [a.dtype for a in arrays]
    return Cells([batch], True, n, shapes, dtypes, batch.originals, tables, plans)


def _from_sequence(batches):
    first = batches[0]
    U = len(first.arrays)
    columns = {}  # dtype -> (addr, count, step, cell) column lists, and the witness
    for i, batch in enumerate(batches):
        for table in batch.tables:
            entry = columns.setdefault(table.witness.dtype, ([], [], [], [], table.witness))
            for column, values in zip(entry, (table.addr, table.count, table.step, i * U + table.seg_leaf)):
                column.append(values)
    tables = [_table.Table(*(np.concatenate(c) for c in entry[:4]), entry[4]) for entry in columns.values()]
    plans = [_shared_runs([batch.arrays[u] for batch in batches]) for u in range(U)]
    arrays = [first.arrays[u] for u in range(U)]
    shapes, dtypes = [a.shape for a in arrays], [a.dtype for a in arrays]
    return Cells(batches, False, len(batches), shapes, dtypes, first.originals, tables, plans)


def _first_position(batch, u):
    return int(np.argmax(batch.unique_of == u))


def _runs(cell):
    """``(offset, count, step)`` of the runs that cover ``cell``, offsets from its address."""
    table = _table.build(cell.dtype, [cell], [0])
    return table.addr - cell.ctypes.data, table.count, table.step


def _no_repeats(array):
    """Whether no axis repeats elements (a zero stride): the runs then match a dense output."""
    return all(s or n == 1 for n, s in zip(array.shape, array.strides))


def _plan(cell, runs, base, keep=None):
    contiguous = cell.flags.c_contiguous or cell.flags.f_contiguous
    out_offset = np.zeros(runs[1].size, np.int64) if contiguous else _table.dense_offsets(cell)
    return Plan(*runs, base, _table.traversal(cell), out_offset, keep)


def _copied_plan(array):
    """The plan of a stacked leaf read through a C-ordered copy."""
    copy = np.array(array, order="C")
    cell = copy[0, ...]
    base = copy.ctypes.data + np.arange(copy.shape[0], dtype=np.int64) * copy.strides[0]
    return _plan(cell, _runs(cell), base, keep=copy)


def _empty_plan(shape):
    size = int(np.prod(shape))
    rows = np.zeros(1 if size else 0, np.int64)
    order = tuple((axis, False) for axis in reversed(range(len(shape))) if shape[axis] != 1)
    return Plan(rows, rows + size, rows + 1, np.zeros(0, np.int64), order, rows)


def _shared_runs(arrays):
    """The plan of one leaf given by every example: runs shared when every example lays it
    out alike; otherwise every example is read through a C-ordered copy (a one-off cost,
    rather than a kernel that walks each example's own layout)."""
    first = arrays[0]
    if all(a.strides == first.strides for a in arrays) and _no_repeats(first):
        base = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
        return _plan(first, _runs(first), base)
    copies = [np.array(a, order="C") for a in arrays]
    base = np.array([c.ctypes.data for c in copies], dtype=np.int64)
    return _plan(copies[0], _runs(copies[0]), base, keep=copies)


def _stacked_tables(rows, dtypes, n):
    """Cell tables of a stacked batch: leaf ``u``'s runs repeated at every example's base."""
    U = len(rows)
    groups = {}
    for u, ((offset, count, step, base), dtype) in enumerate(zip(rows, dtypes)):
        witness = _table.witness(dtype)
        entry = groups.setdefault(witness.dtype, ([], [], [], [], witness))
        entry[0].append((base[:, None] + offset[None, :]).ravel())
        entry[1].append(np.tile(count, n))
        entry[2].append(np.tile(step, n))
        entry[3].append(np.repeat(np.arange(n, dtype=np.int64) * U + u, count.size))
    return [_table.Table(*(np.concatenate(c) for c in entry[:4]), entry[4]) for entry in groups.values()]


def _check_like_first(i, batch, first):
    found = _tree.difference(first.treedef, batch.treedef)
    if found is not None:
        where, expected, got = found
        raise _checks.example_differs(i, where, "structure", expected, got)
    if not np.array_equal(batch.unique_of, first.unique_of):
        position = int(np.argmax(batch.unique_of != first.unique_of))
        raise _checks.example_differs(
            i, _tree.path(first.treedef, position), "which positions hold one same array",
            first.unique_of.tolist(), batch.unique_of.tolist(),
        )  # fmt: skip
    for u in range(len(first.arrays)):
        mine, theirs = first.arrays[u], batch.arrays[u]
        for what in ("shape", "dtype"):
            if getattr(mine, what) != getattr(theirs, what):
                where = _tree.path(first.treedef, _first_position(first, u))
                raise _checks.example_differs(i, where, what, getattr(mine, what), getattr(theirs, what))


def _check_unshared(batches, function):
    """No array is given by two examples (an in-place call would scale it twice)."""
    owner = {}
    for i, batch in enumerate(batches):
        for u, original in enumerate(batch.originals):
            j = owner.setdefault(id(original), i)
            if j != i:
                where = _tree.path(batch.treedef, _first_position(batch, u))
                raise _checks.example_shares_array(j, i, where, function)
