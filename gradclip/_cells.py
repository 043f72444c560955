"""A batch of examples (SPEC §9) as kernel tables of *cells*, on the CPU or the GPU.

Cell ``(i, u)`` is example ``i``'s unique leaf ``u``. With ``B`` examples of ``U`` unique
leaves, cell ``i * U + u`` stands where a leaf stands in a ``_batch.Batch``: the cell
tables (``_table.Table``, one per dtype, ``seg_leaf`` holding the cell) go to the CPU
norm and scaling kernels as they are. For the weighted sum, every leaf also has a
`Plan`: the runs of one example's leaf, which every example shares, and each
example's base address. A batch on the GPU is planned by ``_private_cuda`` instead
(`Cells.gpu`): this is where the device is chosen, and `Cells.twin` names the module
of operations for it.

Two batch forms, both validated here before anything runs:

- *stacked*: one grads container whose every leaf has the example axis first, with the
  same length ``B`` (per-example gradients from ``vmap``, Opacus' ``grad_sample``);
- *a sequence*: ``B`` grads containers with the same structure, shapes and dtypes
  (client updates), each read where it lies.

A batch lives on one device: CPU and GPU leaves in one batch are refused.
"""

import numpy as np

from . import _batch, _checks, _private_cpu, _private_cuda, _table, _tree


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
    gpu : None on the CPU; on the GPU, the cells' plan (``_private_cuda.CellPlan``), and
        ``tables`` and ``plans`` are None.
    """

    __slots__ = (
        "batches", "stacked", "n", "treedef", "unique_of", "shapes", "dtypes", "originals", "tables", "arrays",
        "plans", "gpu",
    )  # fmt: skip

    def __init__(self, batches, stacked, n, shapes, dtypes, originals, tables, plans, gpu=None):
        self.batches, self.stacked, self.n = batches, stacked, n
        self.treedef, self.unique_of = batches[0].treedef, batches[0].unique_of
        self.shapes, self.dtypes, self.originals = shapes, dtypes, originals
        self.tables, self.plans, self.gpu = tables, plans, gpu
        self.arrays = range(n * len(shapes))

    @property
    def twin(self):
        """The module of operations on these cells: ``_private_cpu`` or ``_private_cuda``."""
        return _private_cpu if self.gpu is None else _private_cuda

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

    def result(self, outputs, example=0):
        """The batch's structure (one example's) holding ``outputs`` (one array per unique
        leaf) as the caller's kind: that of ``example``'s leaves."""
        from ._dispatch import like

        originals = self.batches[example].originals
        converted = [like(original, out) for original, out in zip(originals, outputs)]
        return _tree.unflatten(self.treedef, [converted[u] for u in self.unique_of.tolist()])

    def draw_sizes(self):
        """The noise draws each unique leaf of one example takes: one per real number."""
        return [int(np.prod(s)) * (2 if d.kind == "c" else 1) for s, d in zip(self.shapes, self.dtypes)]

    def draw_starts(self):
        """Where each unique leaf's draws start in a noised sum's (int64, leaf after leaf)."""
        sizes = self.draw_sizes()
        return (np.cumsum(sizes, dtype=np.int64) - sizes).astype(np.int64)


def stacked(grads, function, writes):
    """The cells of a stacked batch (validated, nothing written)."""
    return _from_stacked(_batch.collect(grads, function, writes=writes, cuda=True))


def sequence(examples, function, writes):
    """The cells of a sequence of examples (validated, nothing written)."""
    batches = []
    for i, example in enumerate(examples):
        try:
            batch = _batch.collect(example, function, writes=writes, cuda=True)
            _check_one_device(batch)
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
    _check_one_device(batch)
    arrays = batch.unique_leaves()
    n = 0
    for u, array in enumerate(arrays):
        if not array.shape:
            raise _checks.no_example_axis(_tree.path(batch.treedef, _first_position(batch, u)))
        if u == 0:
            n = array.shape[0]
        elif array.shape[0] != n:
            first, where = (_tree.path(batch.treedef, _first_position(batch, v)) for v in (0, u))
            raise _checks.example_counts_differ(first, n, where, array.shape[0])
    shapes, dtypes = [a.shape[1:] for a in arrays], [a.dtype for a in arrays]
    if batch.cuda is not None:
        gpu = _private_cuda.stacked(batch.cuda, n, _cell_positions(batch.unique_of, len(arrays), n))
        return Cells([batch], True, n, shapes, dtypes, batch.originals, None, None, gpu)
    plans, rows = [], []
    for array in arrays:
        if n:
            cell = array[0, ...]  # a view, 0-d for a (B,) leaf
            runs = _runs(cell)
            base = array.ctypes.data + np.arange(n, dtype=np.int64) * array.strides[0]
            rows.append((*runs, base))
            order = _table.shared_traversal([cell])
            plans.append(_copied_plan(array) if order is None else _plan(cell, runs, base, order))
        else:  # no example to read: only the (noise) output is planned
            plans.append(_empty_plan(array.shape[1:]))
    tables = _stacked_tables(rows, dtypes, n)
    return Cells([batch], True, n, shapes, dtypes, batch.originals, tables, plans)


def _cell_positions(unique_of, leaves, n):
    """The cells at the positions of a GPU cells' plan: every example's leaf positions
    (``B * L``), then every example's unique leaves (``B * U``), example after example."""
    examples = np.arange(n, dtype=np.int64)[:, None] * leaves
    return np.concatenate([(examples + unique_of).ravel(), (examples + np.arange(leaves)).ravel()])


def _check_one_device(batch):
    """Refuse a batch (or an example) with leaves on the CPU and on the GPU."""
    if batch.cuda is not None and batch.cuda.mixed:
        on_gpu = np.isin(batch.unique_of, batch.cuda.unique)
        cpu, gpu = (_tree.path(batch.treedef, int(np.argmax(on_gpu == side))) for side in (False, True))
        raise _checks.examples_on_two_devices(cpu, gpu)


def _from_sequence(batches):
    first = batches[0]
    U = len(first.arrays)
    if first.cuda is not None:
        positions = _cell_positions(first.unique_of, U, len(batches))
        gpu = _private_cuda.sequence([batch.cuda for batch in batches], positions)
        shapes, dtypes = [leaf.shape for leaf in first.cuda.leaves], [leaf.dtype for leaf in first.cuda.leaves]
        return Cells(batches, False, len(batches), shapes, dtypes, first.originals, None, None, gpu)
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


def _plan(cell, runs, base, order, keep=None):
    """The `Plan` of a leaf whose every example is laid out as ``cell``, walked in ``order`` (its traversal)."""
    contiguous = cell.flags.c_contiguous or cell.flags.f_contiguous
    out_offset = np.zeros(runs[1].size, np.int64) if contiguous else _table.dense_offsets(cell)
    return Plan(*runs, base, order, out_offset, keep)


def _copied_plan(array):
    """The plan of a stacked leaf read through a C-ordered copy."""
    copy = np.array(array, order="C")
    cell = copy[0, ...]
    base = copy.ctypes.data + np.arange(copy.shape[0], dtype=np.int64) * copy.strides[0]
    return _plan(cell, _runs(cell), base, _table.traversal(cell), keep=copy)


def _empty_plan(shape):
    size = int(np.prod(shape))
    rows = np.zeros(1 if size else 0, np.int64)
    return Plan(rows, rows + size, rows + 1, np.zeros(0, np.int64), _table.c_traversal(shape), rows)


def _shared_runs(arrays):
    """The plan of one leaf given by every example: runs shared when every example lays it
    out alike; otherwise every example is read through a C-ordered copy (a one-off cost,
    rather than a kernel that walks each example's own layout)."""
    first = arrays[0]
    order = _table.shared_traversal(arrays)
    if order is not None:
        base = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
        return _plan(first, _runs(first), base, order)
    copies = [np.array(a, order="C") for a in arrays]
    base = np.array([c.ctypes.data for c in copies], dtype=np.int64)
    return _plan(copies[0], _runs(copies[0]), base, _table.traversal(copies[0]), keep=copies)


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
    if (batch.cuda is None) != (first.cuda is None):
        raise _checks.example_on_other_device(i, batch.cuda is not None)
    first_leaves, leaves = first.unique_leaves(), batch.unique_leaves()
    for u in range(len(first.arrays)):
        mine, theirs = first_leaves[u], leaves[u]
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
