"""The validated leaves of one call: flattened, checked, de-duplicated, grouped.

Everything that can fail is checked here, for every leaf, before any kernel runs.
The same array object at several positions is one *unique* leaf: counted once in
totals and updated once; per-position results are gathered back through
``unique_of``.
"""

import numpy as np

from . import _checks, _cuda, _dispatch, _overlap, _table, _tree
from ._kernels import cpu as kernels


class Batch:
    """Leaves of one call.

    Attributes
    ----------
    treedef : the container structure (for out-of-place results).
    arrays : list of numpy.ndarray, one per unique leaf.
    unique_of : int64 array, the unique leaf at each position.
    tables : list of ``_table.Table``, one per dtype.
    originals : the caller's leaf objects, one per unique leaf.
    cuda : None, or the GPU leaves (a ``_cuda.Part``); their entries in ``arrays``
        are empty placeholders, which the CPU kernels skip.
    """

    __slots__ = ("treedef", "arrays", "unique_of", "tables", "originals", "cuda")

    def __init__(self, treedef, arrays, unique_of, tables, originals, cuda=None):
        self.treedef = treedef
        self.arrays = arrays
        self.unique_of = unique_of
        self.tables = tables
        self.originals = originals
        self.cuda = cuda

    def copy(self):
        """The same leaves as fresh writable arrays (for the out-of-place functions)."""
        arrays = [np.array(array, copy=True) for array in self.arrays]
        copied = Batch(self.treedef, arrays, self.unique_of, tables(arrays), self.originals)
        if self.cuda:  # the GPU leaves' copies replace their placeholders after the tables are made
            copied.cuda, results = _cuda.copy(self)
            for u, result in zip(self.cuda.unique.tolist(), results):
                arrays[u] = result
        return copied

    def unique_leaves(self):
        """Every unique leaf: its NumPy array, or its GPU leaf (``_cuda.DeviceLeaf``)."""
        leaves = list(self.arrays)
        if self.cuda:
            for u, leaf in zip(self.cuda.unique.tolist(), self.cuda.leaves):
                leaves[u] = leaf
        return leaves

    def rebuild(self, owned=True):
        """The leaves in the caller's structure and framework (`_dispatch.like`): NumPy
        scalars come back as scalars, torch tensors as tensors, JAX arrays as JAX arrays.
        ``owned=False``: the arrays are buffers that will change (JAX then gets copies)."""
        converted = [_dispatch.like(o, a, owned) for o, a in zip(self.originals, self.arrays)]
        return _tree.unflatten(self.treedef, [converted[u] for u in self.unique_of.tolist()])


def collect(grads, function, *, writes=False, real_only=False, cuda=False):
    """Flatten and validate ``grads`` for ``function`` (its name, for messages).

    ``writes``: the call updates leaves in place (they must be writable, without
    repeated elements, and no two may share memory). ``real_only``: complex leaves are
    refused. ``cuda``: the caller handles GPU leaves (``Batch.cuda``); otherwise they
    are refused.
    """
    if type(grads) is list and grads and not _dispatch.on_cuda(grads[0]):
        # a flat list of arrays (or of tensors), most likely: no walk needed
        batch = _collect_plain_or_torch(grads, _tree.list_of_leaves(len(grads)), writes, real_only)
        if batch is not None:
            return batch
    if type(grads) is list and cuda and grads:
        leaves, treedef = grads, None  # the treedef is needed only if the plan is not reused
    else:
        leaves, treedef = _tree.flatten(grads)
    if cuda and leaves and _dispatch.on_cuda(leaves[0]):
        batch = _reuse(leaves, treedef, grads, writes, real_only)
        if batch is not None:
            return batch
        if treedef is None:
            leaves, treedef = _tree.flatten(grads)
    elif treedef is None:
        leaves, treedef = _tree.flatten(grads)
    batch = _collect_plain_or_torch(leaves, treedef, writes, real_only)
    if batch is not None:
        return batch
    index = {}
    arrays, originals, unique_of = [], [], []
    gpu_unique, gpu_leaves = [], []
    for position, leaf in enumerate(leaves):
        unique = index.get(id(leaf))
        if unique is None:
            where = lambda position=position: _tree.path(treedef, position)  # noqa: E731
            unique = index[id(leaf)] = len(arrays)
            if _dispatch.on_cuda(leaf):
                if not cuda:
                    raise _checks.cpu_only(where, leaf, function)
                device_leaf = _dispatch.as_cuda_leaf(leaf, where)
                _cuda.check(device_leaf, where, function, writes, real_only)
                gpu_unique.append(unique)
                gpu_leaves.append(device_leaf)
                array = _GPU_PLACEHOLDER
            else:
                array = _dispatch.as_cpu_array(leaf, where)
                _check(leaf, array, where, function, writes, real_only)
            arrays.append(array)
            originals.append(leaf)
        unique_of.append(unique)
    unique_of = np.array(unique_of, dtype=np.int64)
    cpu_tables = tables(arrays)
    if writes:
        lo, hi = _table.extents(cpu_tables, len(arrays))
        _check_no_shared_memory(treedef, unique_of, lo, hi, lambda u: _layout(arrays[u]), function)
    gpu = None
    if gpu_leaves:
        gpu_index = np.full(len(arrays), -1, np.int64)
        gpu_index[gpu_unique] = np.arange(len(gpu_unique))
        if writes:  # the GPU leaves among themselves: another memory
            lo, hi = np.zeros(len(arrays), np.int64), np.zeros(len(arrays), np.int64)
            for u, leaf in zip(gpu_unique, gpu_leaves):
                lo[u], hi[u] = _overlap.extent(*_layout(leaf))
            _check_no_shared_memory(treedef, unique_of, lo, hi, lambda u: _layout(gpu_leaves[gpu_index[u]]), function)
        positions = gpu_index[unique_of]
        mixed = len(gpu_leaves) < len(arrays)
        keep = None if mixed else (leaves, unique_of, writes)
        gpu = _cuda.part(gpu_leaves, gpu_unique, positions[positions >= 0], mixed, keep)
    return Batch(treedef, arrays, unique_of, cpu_tables, originals, gpu)


def _reuse(leaves, treedef, grads, writes, real_only):
    """The Batch of a call whose GPU leaves are those of a recent call (`_cuda.cached`), if
    its plan allows this call (writable leaves known not to share memory for ``writes``,
    real ones for ``real_only``); else None, and the general path decides (and names any
    error)."""
    gpu = _cuda.cached(leaves)
    if gpu is None:
        return None
    plan = gpu.plan
    if (writes and not (plan.writable and plan.disjoint)) or (real_only and not plan.real):
        return None
    if treedef is None:
        treedef = _tree.list_of_leaves(len(leaves))
    originals = leaves if plan.first_positions is None else [leaves[i] for i in plan.first_positions]
    return Batch(treedef, [_GPU_PLACEHOLDER] * len(originals), plan.unique_of, [], originals, gpu)


def _check_no_shared_memory(treedef, unique_of, lo, hi, layout, function):
    """Raise if two distinct leaves, of byte ranges ``lo``/``hi`` (zero where none), share
    memory, naming both."""
    pair = _overlap.first_overlap(lo, hi, layout)
    if pair is not None:
        first, second = (_tree.path(treedef, int(np.argmax(unique_of == u))) for u in pair)
        raise _checks.shared_memory(first, second, function)


def _layout(array):
    """``(address, shape, strides, itemsize)`` of a NumPy array or a GPU leaf."""
    if isinstance(array, np.ndarray):
        return array.ctypes.data, array.shape, array.strides, array.itemsize
    return array.ptr, array.shape, array.strides, array.itemsize


_GPU_PLACEHOLDER = np.empty(0)
"""A GPU leaf's entry in ``Batch.arrays``: empty, so the CPU kernels pass over it."""


def tables(arrays):
    """One kernel table per dtype."""
    groups = {}
    for unique, array in enumerate(arrays):
        groups.setdefault(array.dtype, []).append(unique)
    return [_table.build(dtype, [arrays[u] for u in ids], ids) for dtype, ids in groups.items()]


_C_CONTIGUOUS, _F_CONTIGUOUS, _ALIGNED, _WRITEABLE = 0x1, 0x2, 0x100, 0x400  # NumPy's flag bits
_CONTIGUOUS = _C_CONTIGUOUS | _F_CONTIGUOUS


def plain_list(grads, writes, real_only=False):
    """``(dtype, required)`` if ``grads`` may be a plain list, for the one-call paths
    (`_cpu.plain_list_norm` and its siblings): a non-empty ``list`` whose first item is a
    ``numpy.ndarray`` of a dtype accepted before (real if ``real_only``); else None. The
    kernel then checks that every item is a distinct array of that dtype with every
    ``required`` flag bit and strides it can walk, as `_collect_plain` does.
    """
    if type(grads) is not list or not grads or type(grads[0]) is not np.ndarray:
        return None
    dtype = grads[0].dtype
    if not _checks.accepted(dtype) or (real_only and dtype.kind == "c"):
        return None
    return dtype, _required_flags(writes)


def _required_flags(writes):
    return _ALIGNED | (_WRITEABLE if writes else 0)


def _collect_plain_or_torch(leaves, treedef, writes, real_only):
    """`_collect_plain`, or its twin for CPU torch tensors, or None."""
    batch = _collect_plain(leaves, treedef, writes, real_only)
    return batch if batch is not None else _collect_torch(leaves, treedef, writes, real_only)


def _collect_torch(leaves, treedef, writes, real_only):
    """`_collect_plain` for distinct CPU torch tensors of supported dtypes (not requiring
    grad, if ``writes``). Contiguous ones: the tables come from the addresses and sizes
    torch reports, and ``Batch.arrays`` makes each tensor's NumPy view only if it is
    asked for. Otherwise their NumPy views go through `_collect_plain`."""
    headers = _dispatch.torch_cpu_headers(leaves, writes)
    if headers is None:
        return None
    data, size, itemsize, dtypes, code, views, contiguous = headers
    if not contiguous:
        batch = _collect_plain(list(views), treedef, writes, real_only)
        if batch is not None:
            batch.originals = list(leaves)
        return batch
    if writes and not _overlap.disjoint(data, data + size * itemsize):
        return None  # tensors that share memory: the general path names them
    tables = []
    for c, dtype in enumerate(dtypes):
        if real_only and dtype.kind == "c":
            return None  # the general path refuses it, naming the leaf
        _checks.check_dtype(None, dtype)  # supported by construction: only marks bfloat16 as seen
        rows = np.flatnonzero((code == c) & (size > 0))
        tables.append(_table.Table(data[rows], size[rows], np.ones(rows.size, np.int64), rows, _table.witness(dtype)))
    return Batch(treedef, views, np.arange(len(views)), tables, list(leaves))


def _collect_plain(leaves, treedef, writes, real_only):
    """The common case without a Python step per leaf, or None to take the general path.

    It applies when every leaf is a distinct, aligned ``numpy.ndarray`` of a dtype
    already accepted once, with strides that are nonzero multiples of its itemsize
    (writable, and sharing no memory with another, if ``writes``; real if
    ``real_only``): then nothing can fail, and the array headers read in one kernel
    call say all (and a second call walks the strided ones, `kernels.array_rows`).
    """
    headers = kernels.plain_headers(leaves, _required_flags(writes)) if leaves else None
    if headers is None:
        return None
    data, size, descr, flags, one_dtype, none_empty, contiguous, total, may_share = headers
    itemsize = _itemsizes(leaves, descr, one_dtype)
    if contiguous:
        rows, lo, hi = None, data, data + size * itemsize
    else:
        rows = kernels.array_rows(leaves, data, size, flags, np.full(size.size, itemsize) if one_dtype else itemsize)
        if rows is None:
            return None
        lo, hi = rows[4:]
    if writes and may_share and not _overlap.disjoint(lo, hi):
        return None  # arrays that share memory: the general path names them
    if one_dtype:
        dtypes = [leaves[0].dtype]
    else:
        dtypes = [leaves[int(np.argmax(descr == address))].dtype for address in np.unique(descr)]
    tables = []
    for dtype in dtypes:
        if not _checks.accepted(dtype) or (real_only and dtype.kind == "c"):
            return None
        witness = _table.witness(dtype)
        if rows is not None:  # the strided walk's rows
            addr, count, step, seg_leaf = rows[:4]
            if not one_dtype:
                keep = descr[seg_leaf] == id(dtype)
                addr, count, step, seg_leaf = addr[keep], count[keep], step[keep], seg_leaf[keep]
            table = _table.Table(addr, count, step, seg_leaf, witness)
        elif one_dtype and none_empty:  # every leaf: the header columns as they are
            table = _table.Table(data, size, np.ones(size.size, np.int64), np.arange(size.size), witness, total)
        else:
            rows_of = np.flatnonzero((descr == id(dtype)) & (size > 0))
            table = _table.Table(data[rows_of], size[rows_of], np.ones(rows_of.size, np.int64), rows_of, witness)
        tables.append(table)
    leaves = list(leaves)  # the caller's list may change after we return
    return Batch(treedef, leaves, np.arange(len(leaves)), tables, leaves)


def _itemsizes(leaves, descr, one_dtype):
    """The itemsize of each leaf (or of all, if ``one_dtype``), given their dtypes' addresses."""
    if one_dtype:
        return leaves[0].dtype.itemsize
    itemsize = np.empty_like(descr)
    for address in np.unique(descr):
        of_dtype = descr == address
        itemsize[of_dtype] = leaves[int(np.argmax(of_dtype))].dtype.itemsize
    return itemsize


def _check(leaf, array, where, function, writes, real_only):
    _checks.check_dtype(where, array.dtype)
    if real_only:
        _checks.check_real(where, array.dtype, function)
    if writes and not array.flags.writeable:
        _checks.check_writable(where, array, function, _dispatch.immutable_kind(leaf))
    if writes and _dispatch.requires_grad(leaf):
        raise _checks.requires_grad(where, function)
    flags = array.flags.num
    if not flags & _ALIGNED:
        _checks.check_aligned(where, array)
    if not flags & _CONTIGUOUS:
        _checks.check_layout(where, array)
        if writes:
            _checks.check_no_overlap(where, array, function)
