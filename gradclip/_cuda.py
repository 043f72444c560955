"""The GPU twin of ``_cpu``: norms, scaling, clamping and finite checks of a ``Batch``'s GPU leaves.

Numba's CUDA modules (and CuPy, torch) are imported only when a GPU leaf arrives.

A call's GPU leaves (`DeviceLeaf`, one per unique leaf) are planned once (`Plan`):
one row per leaf, the rows of a dtype forming a *group* with one view spanning all
their memory, cut into chunks (see ``kernels/cuda.py``). The plan's tables go to the
device once, with its scratch; its launches are prepared once (`_Launcher`). A pass
is one launch per group, and a norm one more (``finish_cuda``). Plans are cached
(`_PLANS`) by the identity of the call's leaves and its stream, so a later call with
the same leaves copies nothing to the device and allocates nothing but its result.

Work goes on the caller's stream: ``torch.cuda.current_stream()`` for torch tensors,
CuPy's current stream for CuPy arrays, a Numba array's own stream, and the ``stream``
that other producers declare in ``__cuda_array_interface__``. Leaves of one call on
other streams are joined to it (the call's stream waits for theirs, and theirs for it
after a write).

The operations are twins of ``_cpu``'s, over the same ``Batch``: values indexed by
unique leaf, results in device memory (float64 arrays of the first leaf's kind:
torch in, torch out; CuPy in, CuPy out; Numba arrays otherwise), so that nothing
synchronises unless a host value is asked for.
"""

import collections
import ctypes
import functools
import importlib
import math
import sys
import threading
import weakref

import numpy as np

from . import _checks, _dispatch, _table
from ._kernels import cpu as cpu_kernels

_PLANS_KEPT = 16
"""Plans kept for reuse (most recently used first)."""

_FLOAT64 = np.dtype(np.float64)


@functools.cache
def _cuda():
    """``numba.cuda``, or an ImportError that names the extra to install."""
    try:
        importlib.import_module("numba_cuda")
        if not hasattr(np, "row_stack"):
            # numba-cuda <= 0.30 registers an overload of np.row_stack, which NumPy 2.5
            # removed (an alias of vstack): without it no kernel compiles
            np.row_stack = np.vstack
        from numba import cuda
    except ImportError as error:
        raise _checks.cuda_missing(error) from None
    return cuda


@functools.cache
def simulated():
    """Whether kernels run on numba-cuda's simulator (device memory is host memory)."""
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


@functools.cache
def _kernels():
    _cuda()
    from ._kernels import cuda as kernels

    return kernels


# ------------------------------------------------------------------------ leaves


class DeviceLeaf:
    """A GPU leaf: its memory (``ptr``, ``shape``, byte ``strides``), dtype, device and owner.

    ``kind`` is the owner's framework: ``"torch"``, ``"cupy"``, ``"numba"`` (Numba's and
    the simulator's device arrays) or ``"foreign"`` (another ``__cuda_array_interface__``
    producer, which declares its ``stream``). A DeviceLeaf is itself a CUDA array (it has
    the interface), so parts of a leaf (`part`) travel wherever leaves do.
    """

    __slots__ = ("obj", "kind", "ptr", "shape", "strides", "dtype", "device", "readonly", "stream", "__weakref__")

    def __init__(self, obj, kind, ptr, shape, strides, dtype, device, readonly=False, stream=None):
        self.obj, self.kind, self.ptr = obj, kind, ptr
        self.shape, self.strides, self.dtype = shape, strides, dtype
        self.device, self.readonly, self.stream = device, readonly, stream

    @property
    def itemsize(self):
        return self.dtype.itemsize

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "strides": self.strides,
            "typestr": self.dtype.str,
            "data": (self.ptr, self.readonly),
            "version": 3,
        }

    def described(self):
        """This leaf's description without its owner (what a cached plan may hold: it must not
        keep the caller's arrays alive)."""
        return DeviceLeaf(
            None, self.kind, self.ptr, self.shape, self.strides, self.dtype, self.device, self.readonly, self.stream
        )

    def part(self, offset, shape, strides):
        """The sub-array at byte ``offset`` with ``shape`` and byte ``strides``, of the same owner."""
        return DeviceLeaf(
            self.obj, self.kind, self.ptr + offset, tuple(shape), tuple(strides), self.dtype, self.device,
            self.readonly, self.stream,
        )


def describe(leaf, where):
    """The `DeviceLeaf` of a CUDA array: a torch tensor, a CuPy array, a Numba device array
    or any ``__cuda_array_interface__`` producer."""
    if type(leaf) is DeviceLeaf:
        return leaf
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(leaf, torch.Tensor):
        return _describe_tensor(torch, leaf, where)
    if type(leaf).__module__.startswith("cupy"):
        return DeviceLeaf(
            leaf, "cupy", leaf.data.ptr, leaf.shape, leaf.strides, leaf.dtype, leaf.device.id
        )
    if hasattr(leaf, "__cuda_ndarray__"):  # Numba's device arrays, the simulator's too
        interface = _interface(leaf)
        return _from_interface(leaf, "numba", interface, leaf.dtype, getattr(leaf, "stream", 0))
    interface = leaf.__cuda_array_interface__
    return _from_interface(leaf, "foreign", interface, np.dtype(interface["typestr"]), interface.get("stream"))


def _interface(array):
    if simulated():  # the simulator's arrays are host memory behind a CUDA array's API
        return array.__array_interface__
    return array.__cuda_array_interface__


def _from_interface(obj, kind, interface, dtype, stream):
    ptr, readonly = interface["data"]
    shape = tuple(interface["shape"])
    strides = interface.get("strides")
    strides = tuple(strides) if strides is not None else _c_strides(shape, dtype.itemsize)
    return DeviceLeaf(obj, kind, ptr, shape, strides, dtype, _device_of(ptr), bool(readonly), stream)


def _device_of(ptr):
    """The ordinal of the device holding ``ptr`` (the current one if it cannot tell)."""
    if simulated() or not ptr:
        return 0
    from cuda.bindings import driver

    error, ordinal = driver.cuPointerGetAttribute(driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr)
    return int(ordinal) if error == driver.CUresult.CUDA_SUCCESS else 0


def _describe_tensor(torch, tensor, where):
    if tensor.is_conj() or tensor.is_neg():
        raise _checks.lazy_tensor(where)
    dtype = _torch_dtype(torch, tensor.dtype, where)
    itemsize = dtype.itemsize
    leaf = DeviceLeaf(
        tensor, "torch", tensor.data_ptr(), tuple(tensor.shape), tuple(s * itemsize for s in tensor.stride()),
        dtype, tensor.device.index,
    )
    leaf.readonly = _dispatch.requires_grad(tensor)  # torch refuses in-place writes into such tensors
    return leaf


def _torch_dtype(torch, dtype, where):
    """The NumPy dtype of a torch dtype: the floating ones gradclip supports, and integers
    (embedding indices; the functions' own checks refuse them where they need floats)."""
    known = {
        torch.float16: np.float16,
        torch.float32: np.float32,
        torch.float64: np.float64,
        torch.complex64: np.complex64,
        torch.complex128: np.complex128,
        torch.int8: np.int8,
        torch.int16: np.int16,
        torch.int32: np.int32,
        torch.int64: np.int64,
        torch.uint8: np.uint8,
    }
    if dtype in known:
        return np.dtype(known[dtype])
    if dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            raise _checks.bfloat16_needs_ml_dtypes(where) from None
        return np.dtype(ml_dtypes.bfloat16)
    raise _checks.unsupported_torch_dtype(where, dtype)


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def check(leaf, where, function, writes, real_only):
    """The checks of ``_batch._check`` for a GPU leaf."""
    _checks.check_dtype(where, leaf.dtype)
    if real_only:
        _checks.check_real(where, leaf.dtype, function)
    if writes and leaf.readonly:
        if leaf.kind == "torch":
            raise _checks.requires_grad(where, function)
        _checks.raise_read_only(where, function)
    if leaf.ptr % leaf.itemsize:
        _checks.raise_unaligned(where, leaf.dtype)
    _checks.check_layout(where, leaf)
    if writes:
        _checks.check_no_overlap(where, leaf, function)


# ----------------------------------------------------------------------- streams


def _stream_of(leaf):
    """The handle of the stream ``leaf``'s work goes on (0: the legacy default stream)."""
    if leaf.kind == "torch":
        return _torch_stream(leaf.device)
    if leaf.kind == "cupy":
        import cupy

        return cupy.cuda.get_current_stream().ptr
    return _declared_stream(leaf.stream)


def _declared_stream(stream):
    """The handle of the stream a producer declares (none: 0, the legacy default stream)."""
    if not stream:  # none declared: no ordering asked for
        return 0
    if isinstance(stream, int):  # 1 and 2 are the legacy and per-thread default streams' handles too
        return stream
    if simulated():  # the simulator's streams have no handle
        return id(stream)
    handle = getattr(stream, "handle", stream)  # a Numba stream
    return int(getattr(handle, "value", handle) or 0)


def _torch_stream(device):
    """``torch.cuda.current_stream(device).cuda_stream``, without making a Stream object."""
    torch = sys.modules["torch"]
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device)
    return torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------------- launches


class _Buffer:
    """1-d, contiguous memory of one dtype for a kernel argument: ``ptr``, ``n`` elements,
    and the object that owns it (kept alive)."""

    __slots__ = ("ptr", "n", "dtype", "owner", "_abi")

    def __init__(self, ptr, n, dtype, owner=None):
        self.ptr, self.n, self.dtype, self.owner, self._abi = ptr, n, np.dtype(dtype), owner, None

    def kernel_array(self):
        """The argument as the simulator's kernels take it: a device array over this memory."""
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        nbytes = self.n * self.dtype.itemsize
        memory = (ctypes.c_char * max(nbytes, 1)).from_address(self.ptr)
        return FakeCUDAArray(np.frombuffer(memory, dtype=self.dtype, count=self.n))

    def abi(self):
        """Numba's arguments for a 1-d C-contiguous array: meminfo, parent, size,
        itemsize, data, shape, stride (made once: plans launch with the same ones often)."""
        if self._abi is None:
            itemsize = self.dtype.itemsize
            self._abi = (0, 0, self.n, itemsize, self.ptr, self.n, itemsize)
        return self._abi


def _address(array):
    """Where a Numba (or simulator) device array's data starts."""
    if simulated():
        return array._ary.__array_interface__["data"][0]
    return array.device_ctypes_pointer.value or 0


def _buffer_of(array):
    return _Buffer(_address(array), array.size, array.dtype, array)


class _Launcher:
    """Launches of the pass kernels ``(data, out, table, scratch, group, a, b, c)`` and of
    ``finish_cuda`` on one stream.

    On a GPU each kernel is compiled once per signature and launched through
    ``cuda.core`` with its arguments marshalled as Numba marshals them; the arrays'
    part is made once per plan and group. On the simulator the kernels are called as
    numba-cuda calls them.
    """

    def __init__(self, stream):
        self.stream = stream
        self._core_stream = None if simulated() else _core_stream(stream)

    def launch(self, kernel, grid, threads, arrays, values, types):
        """``kernel`` on ``grid`` blocks of ``threads``: ``arrays`` are `_Buffer`s, then the
        scalars ``values`` of ``types`` (a tuple of "i8" and "f8")."""
        _LAUNCHES.record(kernel)
        shared = threads * 8
        if self._core_stream is None:  # the simulator
            kernel[grid, threads, 0, shared](*[b.kernel_array() for b in arrays], *values)
            return
        compiled, args = self.marshalled(kernel, arrays, values, types)
        compiled.launch(self._core_stream, grid, threads, shared, args)

    @staticmethod
    def marshalled(kernel, arrays, values, types):
        """The compiled ``kernel`` for these arguments' types, and the arguments as Numba
        passes them to the driver."""
        compiled = _compiled(kernel, tuple([b.dtype for b in arrays]), types)
        args = []
        for b in arrays:
            args += b.abi()
        args += [_C_TYPES[t](v) for v, t in zip(values, types)]
        return compiled, args

    def wait_for(self, handle):
        """Make this stream wait for the work queued so far on stream ``handle``."""
        if not simulated():
            self._core_stream.wait(_core_stream(handle))

    def then(self, handle):
        """Make stream ``handle`` wait for the work queued so far on this one."""
        if not simulated():
            _core_stream(handle).wait(self._core_stream)


_C_TYPES = {"i8": ctypes.c_int64, "f8": ctypes.c_double}
_PASS_SCALARS = ("i8", "f8", "f8", "f8")  # group, a, b, c
_FINISH_SCALARS = ("i8", "f8", "i8")  # mode, p, flags


class _LaunchLog:
    """The names of the kernels launched while ``names`` is a list (tests and the host-cost
    bench set it)."""

    names = None

    def record(self, kernel):
        if self.names is not None:
            function = getattr(kernel, "py_func", None) or kernel.fn  # a dispatcher, or the simulator's kernel
            self.names.append(function.__name__)


_LAUNCHES = _LaunchLog()


@functools.cache
def _core_stream(handle):
    from cuda.core import Stream

    return Stream.from_handle(handle)


class _Compiled:
    """A kernel compiled for one signature, with the ``cuda.core`` kernel to launch."""

    def __init__(self, kernel):
        from cuda.core import LaunchConfig, launch

        # numba-cuda keeps the loaded module's function in its code library; its
        # ``kernel`` is the cuda.core object that cuda.core's launch takes
        self.kernel = kernel._codelibrary.get_cufunc().kernel
        self._config, self._launch = LaunchConfig, launch
        self._configs = {}

    def launch(self, stream, grid, threads, shared, args):
        config = self._configs.get((grid, threads))
        if config is None:
            config = self._configs[(grid, threads)] = self._config(grid=grid, block=threads, shmem_size=shared)
        self._launch(stream, config, self.kernel, *args)


@functools.cache
def _compiled(kernel, array_dtypes, scalar_types):
    from numba.cuda import types
    from numba.cuda.np.numpy_support import from_dtype

    signature = tuple(types.Array(from_dtype(d), 1, "C") for d in array_dtypes)
    signature += tuple(types.int64 if t == "i8" else types.float64 for t in scalar_types)
    return _Compiled(kernel.compile(signature))


# ------------------------------------------------------------------------- plans


def _walk(leaf, order=None):
    """``(base address, offset, [(length, step), ...] innermost first)``: where the memory
    the leaf spans starts, the position of the walk's first element in it, and the walk's
    axes, in elements but the address. ``order``: the `_table.traversal` to walk the leaf
    in, its own by default (then every step is >= 0 and the offset 0); steps are negative
    where ``order`` runs against the leaf's strides. A leaf of one element has one axis
    of length 1."""
    itemsize = leaf.itemsize
    if order is None:
        if leaf.strides == _c_strides(leaf.shape, itemsize):  # the common case, fast
            return leaf.ptr, 0, [(leaf.size, 1)]
        axes = _table._axes(leaf)  # (axis, length, |stride|, flipped)
    else:
        axes = [(a, leaf.shape[a], -leaf.strides[a] if flipped else leaf.strides[a], flipped) for a, flipped in order]
    if not axes:
        return leaf.ptr, 0, [(1, 1)]
    start = leaf.ptr - sum((n - 1) * s for _, n, s, flipped in axes if flipped)
    merged = [(n, s // itemsize) for n, s in _table._merged(axes)]
    low = sum((n - 1) * s for n, s in merged if s < 0)
    return start + low * itemsize, -low, merged


_INT16 = np.dtype(np.int16)


def _kernel_dtype(dtype):
    """The element type of the kernels' views: bfloat16 (the one supported dtype of kind
    "V") as its int16 bits, others as they are."""
    return _INT16 if dtype.kind == "V" else dtype


class _Group:
    """The rows of one dtype: their kernels, the view spanning their memory, their grid."""

    __slots__ = ("index", "dtype", "kernels", "data", "grid", "rows")

    def __init__(self, index, dtype, kernels, data, grid, rows):
        self.index, self.dtype, self.kernels, self.data = index, dtype, kernels, data
        self.grid, self.rows = grid, rows


def _layout(leaves, positions, orders, device):
    """The host side of a `Plan` of one row per leaf: ``(table, groups, row_of, nrows, width,
    scratch size)`` (see ``kernels/cuda.py`` for the table)."""
    walks = [_walk(leaf, None if orders is None else orders[i]) for i, leaf in enumerate(leaves)]
    return _rows_layout([leaf.size for leaf in leaves], [leaf.dtype for leaf in leaves], walks, positions, device)


def _rows_layout(sizes, dtypes, walks, positions, device):
    """`_layout` for rows given by their ``sizes``, ``dtypes`` and walks (`_walk`'s), in
    any number: rows of one dtype keep their order in its group."""
    kernels = _kernels()
    groups = {}
    for i, (size, dtype) in enumerate(zip(sizes, dtypes)):
        if size:
            groups.setdefault(dtype, []).append(i)
    order = [i for ids in groups.values() for i in ids] + [i for i, size in enumerate(sizes) if not size]
    row_of = np.empty(len(sizes), np.int64)
    row_of[order] = np.arange(len(sizes))
    walks = [walks[i] for i in order]
    nrows = len(order)
    flat = [[x for axis in w[2] for x in axis] for w in walks]  # (length, step) pairs, innermost first
    width = kernels.AXES + max(map(len, flat))
    rows = np.zeros((nrows, width), np.int64)
    sizes = np.array([sizes[i] for i in order], np.int64)
    rows[:, kernels.SIZE] = sizes
    rows[:, kernels.NDIM] = [len(w[2]) for w in walks]
    rows[:, kernels.WIDE] = [dtypes[i] in (np.float64, np.complex128) for i in order]
    rows[:, kernels.AXES :] = [f + [0] * (width - kernels.AXES - len(f)) for f in flat]
    nchunks = -(-sizes // kernels.CHUNK)
    rows[:, kernels.NCHUNKS] = nchunks
    spans = np.where(nchunks > 1, -(-nchunks // kernels.PARTIAL_ALIGN) * kernels.PARTIAL_ALIGN, 0)
    rows[:, kernels.PARTIAL] = np.cumsum(spans) - spans
    plan_groups, chunk_tables, first_row = [], [], 0
    for index, (dtype, ids) in enumerate(groups.items()):
        group_rows = slice(first_row, first_row + len(ids))
        itemsize = dtype.itemsize
        group_walks = walks[group_rows]
        bases = np.array([w[0] for w in group_walks], np.int64)
        low = int(bases.min())
        starts = (bases - low) // itemsize
        extents = [1 + sum((n - 1) * abs(s) for n, s in w[2]) for w in group_walks]
        rows[group_rows, kernels.OFFSET] = starts + [w[1] for w in group_walks]
        rows[group_rows, kernels.DENSE] = np.cumsum(sizes[group_rows]) - sizes[group_rows]
        chunks = _chunks(kernels, np.arange(group_rows.start, group_rows.stop), sizes[group_rows], nchunks[group_rows])
        chunk_tables.append(chunks)
        grid = grid_size(device, len(chunks))
        data = _Buffer(low, int((starts + extents).max()), _kernel_dtype(dtype))
        plan_groups.append(_Group(index, dtype, kernels.kernels_for(dtype), data, grid, group_rows))
        first_row = group_rows.stop
    chunks = np.concatenate(chunk_tables) if chunk_tables else np.zeros((0, kernels.CHUNK_WIDTH), np.int64)
    group_table = np.zeros((len(plan_groups), kernels.GROUP_WIDTH), np.int64)
    chunk_starts = np.cumsum([0] + [len(c) for c in chunk_tables])
    group_table[:, kernels.GROUP_CHUNK] = chunk_starts[:-1]
    group_table[:, kernels.GROUP_NCHUNKS] = np.diff(chunk_starts)
    position_rows = row_of[positions]
    header = np.zeros(kernels.HEADER, np.int64)
    regions = [rows.ravel(), chunks.ravel(), group_table.ravel(), np.zeros(nrows, np.int64), position_rows]
    starts = np.cumsum([kernels.HEADER] + [r.size for r in regions])
    header[[kernels.H_ROWS, kernels.H_CHUNKS, kernels.H_GROUPS, kernels.H_TICKETS, kernels.H_POSITIONS]] = starts[:-1]
    header[kernels.H_WIDTH], header[kernels.H_NROWS], header[kernels.H_NPOSITIONS] = width, nrows, position_rows.size
    scratch_starts = np.cumsum([0, nrows, nrows, nrows, nrows, 1, int(spans.sum())])
    names = [kernels.H_SUMS, kernels.H_PEAKS, kernels.H_NORMS, kernels.H_COEFS, kernels.H_TOTAL, kernels.H_PARTIALS]
    header[names] = scratch_starts[:-1]
    return np.concatenate([header, *regions]), plan_groups, row_of, nrows, width, int(scratch_starts[-1])


class Plan:
    """Rows, tables, scratch and launches for the unique leaves of one call on one stream.

    Parameters
    ----------
    leaves : list of DeviceLeaf
        The unique leaves (one device).
    positions : int64 array
        For each per-position result, the index of its leaf in ``leaves``.
    stream : int
        The stream's handle.
    orders : list, optional
        Per leaf, the `_table.traversal` to walk it in (``GradAccumulator``'s buffers).
    rows : tuple, optional
        ``(sizes, dtypes, walks)`` of rows that are not the leaves (the cells of private
        training, parts of ``leaves``): ``positions`` then index them.
    """

    def __init__(self, leaves, positions, stream, orders=None, rows=None):
        cuda = _cuda()
        leaves = [leaf.described() for leaf in leaves]
        self.leaves, self.stream = leaves, stream
        self.positions = np.asarray(positions, np.int64)
        self.kind, self.device = leaves[0].kind, leaves[0].device
        streams = {}  # one leaf per kind and declared stream: whose streams a call joins
        for leaf in leaves:
            streams.setdefault((leaf.kind, leaf.device, leaf.stream if leaf.kind in ("numba", "foreign") else None), leaf)
        self.representatives = list(streams.values())
        self.writable = not any(leaf.readonly for leaf in leaves)
        self.real = not any(leaf.dtype.kind == "c" for leaf in leaves)
        self.unique = self.unique_of = self.first_positions = None  # the call's, for reuse (`keep`)
        self.disjoint = False  # whether its leaves were found not to share memory
        self.launcher = _Launcher(stream)
        self.lock = threading.Lock()
        if rows is None:
            self._place(_layout(leaves, self.positions, orders, self.device))
        else:
            self._place(_rows_layout(*rows, self.positions, self.device))
        # on the plan's stream: a copy from pageable memory is staged at once and waits for no kernel
        self.table = cuda.to_device(self.host_table, stream=self._numba_stream())
        self.scratch = cuda.to_device(np.zeros(self.scratch_size), stream=self._numba_stream())
        self._table, self._scratch = _buffer_of(self.table), _buffer_of(self.scratch)
        self._dense = None  # the table of dense copies, made when first asked for
        self.ids = self.pointers = None  # the leaves' ids (bytes of int64) and torch data pointers, set by `_PlanCache`
        self.alive = True

    def _place(self, layout):
        self.host_table, self.groups, self.row_of, self.nrows, self.width, self.scratch_size = layout
        self.npositions = self.positions.size
        # whether float64-based rows are here, whose sums of squares may over- or underflow
        self.float64_based = any(g.dtype in (np.float64, np.complex128) for g in self.groups)

    def rebind(self, leaves, orders=None):
        """The plan of other ``leaves`` of the same dtypes, shapes and order (the next
        micro-batch): their table replaces this one's where it differs, in the same device
        memory if it has the same size (nothing is allocated then)."""
        leaves = [leaf.described() for leaf in leaves]
        layout = _layout(leaves, self.positions, orders, self.device)
        self.leaves = leaves
        if not np.array_equal(layout[0], self.host_table):
            if layout[0].size == self.host_table.size and layout[5] <= self.scratch_size:
                self.table.copy_to_device(layout[0], stream=self._numba_stream())
            else:
                self.table = _cuda().to_device(layout[0])
                self.scratch = _cuda().to_device(np.zeros(layout[5]))
                self._table, self._scratch = _buffer_of(self.table), _buffer_of(self.scratch)
            self._dense = None
        scratch_size = max(self.scratch_size, layout[5])
        self._place(layout)
        self.scratch_size = scratch_size

    # ------------------------------------------------------------------ passes

    def run(self, name, out=None, a=0.0, b=0.0, c=0.0, groups=None, data=None, table=None):
        """Kernel ``name`` of each group's set over its rows (the groups in ``groups`` only);
        ``name`` may also be a function of the `_Group` giving the kernel. ``out``: a
        `_Buffer` (the scratch when None), or a function of the group giving one;
        ``data``: per group, another view to run on (dense copies); ``table``: another
        table (theirs)."""
        kernels = _kernels()
        for g in self.groups if groups is None else groups:
            kernel = name(g) if callable(name) else getattr(g.kernels, name)
            target = out(g) if callable(out) else out or self._scratch
            self.launcher.launch(
                kernel, g.grid, kernels.THREADS_PER_BLOCK,
                [g.data if data is None else data[g.index], target, table or self._table, self._scratch],
                (g.index, a, b, c), _PASS_SCALARS,
            )  # fmt: skip

    def launch(self, kernel, grid, threads, arrays, scalars):
        """``kernel(table, scratch, *arrays, *scalars)`` on this plan's stream: a kernel of
        another shape than the passes' (``kernels/private_cuda.py``'s). ``arrays``:
        `_Buffer`s; ``scalars``: ``(value, "i8" | "f8")`` pairs."""
        values, types = zip(*scalars) if scalars else ((), ())
        self.launcher.launch(kernel, grid, threads, [self._table, self._scratch, *arrays], values, types)

    def finish(self, mode, p, flags, out):
        kernels = _kernels()
        self.launcher.launch(
            kernels.finish_cuda, 1, kernels.FINISH_THREADS, [self._table, self._scratch, out], (mode, p, flags),
            _FINISH_SCALARS,
        )

    def norms(self, p, out):
        """Every row's p-norm and their total into the scratch; ``out[0]`` the total and
        ``out[1 + i]`` the norm at position ``i``.

        p = 1 and 2 take one pass, plus, where float64-based rows are, a max-abs pass and a
        scaled pass for those whose sum over- or underflowed (their blocks return at once
        otherwise); p = inf the max-abs pass alone; any other p both, for every row.
        """
        kernels = _kernels()
        final, every = kernels.FINAL, kernels.ALL_ROWS
        if p in (1.0, 2.0):
            redo = self.float64_based
            self.run("sumsq_cuda" if p == 2.0 else "sumabs_cuda", a=p)
            self.finish(kernels.FOLD_SUMS, p, 0 if redo else final, out)
            if redo:
                self.run("maxabs_cuda", a=p, c=1.0)
                self.finish(kernels.FOLD_PEAKS, p, 0, out)
                self.run("sumpow_cuda", a=p, c=1.0)
                self.finish(kernels.FOLD_SCALED, p, final, out)
        elif p == math.inf:
            self.run("maxabs_cuda", a=p)
            self.finish(kernels.FOLD_PEAKS, p, final | every, out)
        else:
            self.run("maxabs_cuda", a=p)
            self.finish(kernels.FOLD_PEAKS, p, every, out)
            self.run("sumpow_cuda", a=p)
            self.finish(kernels.FOLD_SCALED, p, final | every, out)

    def count(self, name, out, data=None, table=None):
        """Launch a counting kernel (``nonfinite_cuda``, ``zero_nonfinite_cuda_``; on
        ``data`` and ``table`` as `run` takes them); the count (float64) in ``out[0]``."""
        kernels = _kernels()
        self.run(name, c=float(kernels.BY_COEF), data=data, table=table)
        self.finish(kernels.FOLD_COUNT, 2.0, 0, out)

    def upload_coefs(self, coefs):
        """Each row's coefficient (``coefs`` per leaf) into the scratch: a host-to-device copy."""
        kernels = _kernels()
        start = int(self.host_table[kernels.H_COEFS])
        rows = np.empty(self.nrows)
        rows[self.row_of] = coefs
        self.scratch[start : start + self.nrows].copy_to_device(rows, stream=self._numba_stream())

    def _numba_stream(self):
        if simulated() or not self.stream:
            return 0
        return _cuda().external_stream(self.stream)

    # ---------------------------------------------------------------- results

    def new(self, shape, dtype=_FLOAT64):
        """``(buffer, array)``: a new array of ``shape`` (an integer: 1-d; ``()``: 0-d) and
        ``dtype`` on the plan's device, of the call's kind; the buffer spans it."""
        dtype = np.dtype(dtype)
        if not simulated():
            n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
            if self.kind == "torch":
                torch = sys.modules["torch"]
                array = torch.empty(shape, dtype=_TORCH_OF[dtype.name](torch), device=torch.device("cuda", self.device))
                return _Buffer(array.data_ptr(), n, _kernel_dtype(dtype), array), array
            if self.kind == "cupy":
                import cupy

                with cupy.cuda.Device(self.device):
                    array = cupy.empty(shape, dtype)
                return _Buffer(array.data.ptr, n, _kernel_dtype(dtype), array), array
        array = _cuda().device_array(shape, _kernel_dtype(dtype), stream=self._numba_stream())
        return _buffer_of(array), array

    def upload(self, values):
        """A `_Buffer` of device memory holding the host array ``values`` (1-d; for the
        kernels alone), copied on the plan's stream as its table is."""
        return _buffer_of(_cuda().to_device(values, stream=self._numba_stream()))

    def filled(self, shape, value):
        """`new` of ``shape``, float64, set to ``value``."""
        buffer, array = self.new(shape)
        if self.kind == "torch" and not simulated():
            array.fill_(value)
        elif self.kind == "cupy" and not simulated():
            array.fill(value)
        else:
            array.copy_to_device(np.full(shape, value), stream=self._numba_stream())
        return buffer, array

    def scalar(self, array):
        """Element 0 of a float64 result ``array`` (from `new`) as a 0-d array of its kind."""
        return _shaped(self.kind, array, (), (), _FLOAT64, 0)

    def tail(self, array):
        """Elements 1 on of a float64 result ``array``."""
        return _shaped(self.kind, array, (array.shape[0] - 1,), (8,), _FLOAT64, 8)

    # ------------------------------------------------------------- dense copies

    def dense_table(self):
        """The table of this plan's rows laid out densely (row ``r`` at its ``DENSE``
        offset of its group's buffer, step 1): made and uploaded once."""
        if self._dense is None:
            kernels = _kernels()
            table = self.host_table.copy()
            start = int(table[kernels.H_ROWS])
            rows = table[start : start + self.nrows * self.width].reshape(self.nrows, self.width)
            rows[:, kernels.OFFSET] = rows[:, kernels.DENSE]
            rows[:, kernels.NDIM] = 1
            rows[:, kernels.AXES :] = 0
            rows[:, kernels.AXES] = np.maximum(rows[:, kernels.SIZE], 1)
            rows[:, kernels.AXES + 1] = 1
            self._dense = _buffer_of(_cuda().to_device(table))
        return self._dense

    def group_of(self, row):
        """The `_Group` of ``row``, or None (an empty leaf's row is in none)."""
        return next((g for g in self.groups if g.rows.start <= row < g.rows.stop), None)

    def _dense_start(self, row):
        """Where ``row`` starts in its group's dense buffer, in elements."""
        kernels = _kernels()
        return int(self.host_table[self.host_table[kernels.H_ROWS] + row * self.width + kernels.DENSE])

    def _dense_end(self, group):
        """The elements of ``group``'s dense buffer."""
        kernels = _kernels()
        last = group.rows.stop - 1
        return self._dense_start(last) + int(self.host_table[self.host_table[kernels.H_ROWS] + last * self.width + kernels.SIZE])

    def copies(self):
        """New dense buffers, one per group, holding every leaf's elements in walk order:
        ``(buffers, arrays)`` (`_Buffer`s for the kernels, arrays of the call's kind)."""
        buffers, arrays = [], []
        for g in self.groups:
            buffer, array = self.new(self._dense_end(g), g.dtype)
            self.run("copy_cuda", out=buffer, groups=[g])
            buffers.append(buffer)
            arrays.append(array)
        return buffers, arrays

    def dense_results(self, arrays):
        """Every leaf's out-of-place result: its shape and dtype over its group's dense
        buffer (``arrays``, from `copies`), laid out in its walk order."""
        results = []
        for i, leaf in enumerate(self.leaves):
            row = int(self.row_of[i])
            group = self.group_of(row)
            if group is None:  # empty
                _, flat = self.new(0, leaf.dtype)
                start = 0
            else:
                flat, start = arrays[group.index], self._dense_start(row) * leaf.itemsize
            results.append(_dense_shaped(self.kind, flat, leaf.shape, _table.traversal(leaf), leaf.dtype, start))
        return results


_TORCH_OF = {
    "float16": lambda torch: torch.float16,
    "bfloat16": lambda torch: torch.bfloat16,
    "float32": lambda torch: torch.float32,
    "float64": lambda torch: torch.float64,
    "complex64": lambda torch: torch.complex64,
    "complex128": lambda torch: torch.complex128,
}


def _chunks(kernels, row_ids, sizes, nchunks):
    """The chunk records of rows ``row_ids`` (their ``sizes`` and chunk counts)."""
    total = int(nchunks.sum())
    chunks = np.empty((total, kernels.CHUNK_WIDTH), np.int64)
    row_of_chunk = np.repeat(row_ids, nchunks)
    first = np.repeat(np.cumsum(nchunks) - nchunks, nchunks)
    slot = np.arange(total) - first
    start = slot * kernels.CHUNK
    chunks[:, kernels.CHUNK_ROW] = row_of_chunk
    chunks[:, kernels.CHUNK_START] = start
    chunks[:, kernels.CHUNK_COUNT] = np.minimum(kernels.CHUNK, np.repeat(sizes, nchunks) - start)
    chunks[:, kernels.CHUNK_SLOT] = slot
    return chunks


def grid_size(device, items):
    """Blocks of a grid-stride launch over ``items`` (chunks, examples) on ``device``: a few
    per multiprocessor, at most one per item."""
    return max(1, min(items, _multiprocessors(device) * _kernels().BLOCKS_PER_SM))


@functools.cache
def _multiprocessors(device):
    if simulated():
        return 1
    return _cuda().gpus[device].MULTIPROCESSOR_COUNT


def _dense_shaped(kind, flat, shape, order, dtype, start=0):
    """``shape`` and ``dtype`` over ``flat`` (a dense 1-d array of the call's kind) from
    byte ``start``, laid out in ``order`` (a `_table.traversal`)."""
    strides, offset = dense_strides(shape, order, dtype.itemsize)
    return _shaped(kind, flat, tuple(shape), strides, dtype, start + offset)


def dense_strides(shape, order, itemsize):
    """``(strides, offset)`` in bytes of ``shape`` laid out densely in ``order`` (a
    `_table.traversal`): its element at index 0 lies ``offset`` bytes from the first."""
    strides, offset, dense = [itemsize] * len(shape), 0, itemsize
    for axis, flipped in order:
        strides[axis] = -dense if flipped else dense
        if flipped:
            offset += (shape[axis] - 1) * dense
        dense *= shape[axis]
    return tuple(strides), offset


def _shaped(kind, array, shape, strides, dtype, start):
    """An array of ``kind`` over ``array``'s memory from byte ``start``."""
    if simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        base = array._ary
        return FakeCUDAArray(np.ndarray(shape, dtype, buffer=base, offset=start, strides=strides))
    if kind == "torch":
        torch = sys.modules["torch"]
        itemsize = dtype.itemsize
        flat = array.view(_TORCH_OF[dtype.name](torch)) if array.element_size() == itemsize else array
        return flat.as_strided(shape, tuple(s // itemsize for s in strides), start // itemsize)
    if kind == "cupy":
        import cupy

        return cupy.ndarray(shape, dtype, memptr=array.data + start, strides=strides)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, dtype, stream=array.stream, gpu_data=array.gpu_data.view(start))


# ------------------------------------------------------------------- plan cache


class _PlanCache:
    """Plans of recent calls, found again by the identity of the call's leaves and its stream.

    A plan holds weak references to its leaves: when one dies the plan is dropped, so an
    identity can never stand for another array. torch tensors can change their memory
    under the same identity (``.data =``, ``set_``), so their data pointers are compared
    too.
    """

    def __init__(self):
        self._plans = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(ids, stream):
        """A plan's place in the cache: its stream, and its leaves' count and first id."""
        return (stream, ids.size, int(ids[0])) if ids.size else None

    def find(self, leaves, stream):
        ids = cpu_kernels.object_ids(leaves)
        key = self._key(ids, stream)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None or not plan.alive or plan.ids != ids.tobytes():
                return None
            self._plans.move_to_end(key)
        if plan.pointers is not None and _data_pointers(leaves, plan.pointers[0]) != plan.pointers[1]:
            return None
        return plan

    def keep(self, plan, leaves, stream):
        """Keep ``plan`` for ``leaves`` (the call's, in position order) if they can be
        referenced weakly."""
        ids = cpu_kernels.object_ids(leaves)
        drop = functools.partial(_PlanCache._drop, weakref.ref(plan))
        try:
            plan.refs = [weakref.ref(leaf, drop) for leaf in {id(x): x for x in leaves}.values()]
        except TypeError:  # an owner that cannot be referenced weakly: no reuse
            return
        plan.ids = ids.tobytes()
        tensors = [i for i, leaf in enumerate(leaves) if type(leaf).__module__.startswith("torch")]
        plan.pointers = None
        if tensors:
            plan.pointers = (None if len(tensors) == len(leaves) else tensors, _data_pointers(leaves, tensors))
        with self._lock:
            self._plans[self._key(ids, stream)] = plan
            while len(self._plans) > _PLANS_KEPT:
                self._plans.popitem(last=False)

    @staticmethod
    def _drop(plan_ref, _):
        plan = plan_ref()
        if plan is not None:
            plan.alive = False

    def clear(self):
        with self._lock:
            self._plans.clear()


def _data_pointers(leaves, tensors):
    """The data pointers of the torch tensors at ``tensors`` in ``leaves`` (all if None)."""
    data_ptr = sys.modules["torch"].Tensor.data_ptr
    return list(map(data_ptr, leaves if tensors is None else [leaves[i] for i in tensors]))


_PLANS = _PlanCache()


# --------------------------------------------------------------------- the part


class Part:
    """The GPU part of a ``Batch``: its ``unique`` leaves' ids (into ``Batch.arrays``) and
    `DeviceLeaf` objects, whose per-position results follow ``positions`` (indices into
    ``leaves``), and whether CPU leaves share the call (``mixed``). Its `Plan` is made
    when first needed (a micro-batch of ``GradAccumulator`` needs none).

    ``data`` and ``table``: for a part over dense copies of the leaves (`copy`), the
    copies' views (one per group) and the plan's dense table.
    """

    __slots__ = ("unique", "leaves", "positions", "mixed", "data", "table", "_plan", "_keep")

    def __init__(self, unique, leaves, positions, mixed, plan=None, data=None, table=None, keep=None):
        self.unique, self.leaves, self.positions, self.mixed = np.asarray(unique, np.int64), leaves, positions, mixed
        self.data, self.table, self._plan, self._keep = data, table, plan, keep

    @property
    def plan(self):
        if self._plan is None:
            self._plan = Plan(self.leaves, self.positions, _stream_of(self.leaves[0]))
            if self._keep is not None:
                _keep(self, *self._keep)
        return self._plan

    def run(self, name, **kwargs):
        self.plan.run(name, data=self.data, table=self.table, **kwargs)

    def __enter__(self):
        """Order this call's work after what the leaves' other streams have queued."""
        plan = self.plan
        plan.lock.acquire()
        # the joined streams (none where every leaf is of one kind and stream, the common case)
        self._keep = [h for h in map(_stream_of, plan.representatives[1:]) if h != plan.stream]
        for handle in self._keep:
            plan.launcher.wait_for(handle)
        return plan

    def __exit__(self, *error):
        for handle in self._keep:
            self.plan.launcher.then(handle)
        self.plan.lock.release()
        return False


def part(leaves, unique, positions, mixed, keep=None):
    """The `Part` of a call's GPU ``leaves`` (unique, with their ``unique`` ids), whose
    per-position results follow ``positions`` (indices into ``leaves``). ``keep``: the
    call's leaves in position order, their unique ids and whether they were found not to
    share memory, when every leaf is on the GPU: the plan is then kept for later calls
    with the same leaves."""
    return Part(unique, leaves, positions, mixed, keep=keep)


def cached(leaves):
    """The `Part` of a call whose leaves (in position order) are those of a recent call
    on the same stream, or None."""
    stream = call_stream(leaves[0])
    if stream is None:
        return None
    plan = _PLANS.find(leaves, stream)
    if plan is None:
        return None
    return Part(plan.unique, plan.leaves, plan.positions, False, plan)


def _keep(part, leaves, unique_of, checked_disjoint):
    if call_stream(leaves[0]) is None:
        return  # parts of leaves, or producers whose stream is declared per array
    plan = part.plan
    plan.unique, plan.unique_of, plan.disjoint = part.unique, unique_of, checked_disjoint
    distinct = unique_of.size == part.unique.size
    plan.first_positions = None if distinct else np.unique(unique_of, return_index=True)[1].tolist()
    _PLANS.keep(plan, leaves, plan.stream)


def call_stream(leaf):
    """The handle of the stream a call whose first leaf is ``leaf`` works on, read cheaply
    (no checks); None if ``leaf`` is not of a kind the plan cache serves."""
    if type(leaf).__module__.startswith("cupy"):
        import cupy

        return cupy.cuda.get_current_stream().ptr
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(leaf, torch.Tensor):
        return _torch_stream(leaf.device.index)
    if hasattr(leaf, "__cuda_ndarray__"):
        return _declared_stream(getattr(leaf, "stream", 0))
    return None


# -------------------------------------------------------------------- operations
# Twins of ``_cpu``'s: ``batch.cuda`` is the `Part`; per-leaf values are indexed by
# unique leaf (``Batch.arrays``); results stay in device memory unless said otherwise.


def norms(batch, p, per_position=False):
    """The total p-norm of the GPU leaves (a 0-d device array) and, with ``per_position``,
    the norm at every position (a 1-d device array; every leaf on the GPU)."""
    gpu = batch.cuda
    with gpu as plan:
        buffer, out = plan.new(1 + plan.npositions if per_position else ())
        plan.norms(p, buffer)
    return (plan.scalar(out), plan.tail(out)) if per_position else (out, None)


def host_norms(batch, p, into):
    """Write the GPU leaves' norms into ``into`` (host, per unique leaf); synchronises."""
    gpu = batch.cuda
    with gpu as plan:
        buffer, out = plan.new(1 + plan.npositions)
        plan.norms(p, buffer)
    values = host_copy(out)
    into[gpu.unique] = values[1 + _position_of_unique(plan)]


def _position_of_unique(plan):
    """The per-position result of each unique leaf (a plan's positions cover every leaf)."""
    position = np.empty(len(plan.leaves), np.int64)
    position[plan.positions[::-1]] = np.arange(plan.npositions)[::-1]
    return position


def clip_(batch, max_norm, eps, total=None):
    """Scale every GPU leaf by ``max_norm / (total + eps)`` iff the total is finite and above
    ``max_norm``. ``total``: None for the total of this call's `norms` (in the plan's
    scratch: the device decides), a host float (the host decides), or a 0-d / 1-element
    float64 device array (the device reads it)."""
    kernels = _kernels()
    with batch.cuda:
        if total is None:
            batch.cuda.run("scale_cuda_", a=max_norm, b=eps, c=float(kernels.BY_TOTAL))
        elif isinstance(total, float):
            if math.isfinite(total) and total > max_norm:
                batch.cuda.run("scale_cuda_", a=max_norm / (total + eps), c=float(kernels.BY_COEF))
        else:
            out = _Buffer(_pointer(total), 1, np.float64, total)
            batch.cuda.run("scale_cuda_", out=out, a=max_norm, b=eps, c=float(kernels.BY_OUT))


def clip_rows_(batch, max_norm, eps):
    """Scale each GPU leaf on its own norm from this call's `norms` (on the device)."""
    kernels = _kernels()
    with batch.cuda:
        batch.cuda.run("scale_cuda_", a=max_norm, b=eps, c=float(kernels.BY_ROW_NORM))


def scale_(batch, coef):
    """Multiply every element of GPU leaf ``u`` by ``coef[u]`` (host); leaves with 1 are not
    written. One coefficient for all travels as an argument; several are copied to the
    device."""
    kernels = _kernels()
    coefs = np.asarray(coef, np.float64)[batch.cuda.unique]
    if (coefs == 1.0).all():
        return
    with batch.cuda as plan:
        if (coefs == coefs[0]).all():
            batch.cuda.run("scale_cuda_", a=float(coefs[0]), c=float(kernels.BY_COEF))
        else:
            plan.upload_coefs(coefs)
            batch.cuda.run("scale_cuda_", c=float(kernels.BY_ROW_COEF))


def fill_(batch, value):
    """Set every element of every GPU leaf to ``value``, rounded once."""
    kernels = _kernels()
    with batch.cuda:
        batch.cuda.run("fill_cuda_", a=float(value), c=float(kernels.BY_COEF))


def clamp_(batch, bound):
    """Clamp every GPU leaf to ``[-bound, bound]``, the bound rounded once to each dtype."""
    kernels = _kernels()
    with batch.cuda as plan:
        for g in plan.groups:
            batch.cuda.run("clamp_cuda_", a=_rounded_bound(bound, g.dtype), c=float(kernels.BY_COEF), groups=[g])


def _rounded_bound(bound, dtype):
    """``bound`` rounded once to ``dtype`` (nearest-even), as a float64."""
    if dtype.name != "bfloat16":
        return float(np.array(bound).astype(dtype))
    # round to odd in float32, then to nearest-even in bfloat16: one rounding in effect
    f = np.float32(bound)
    if float(f) != bound and not f.view(np.uint32) & 1:
        f = np.nextafter(f, np.float32(math.copysign(math.inf, bound - float(f))))
    return float(np.array(f).astype(dtype))


def count_nonfinite(batch):
    """How many elements of the GPU leaves are NaN or infinite: a 0-d float64 device array."""
    return _count(batch, "nonfinite_cuda")


def zero_nonfinite_(batch):
    """Zero the non-finite elements (parts) of the GPU leaves; how many elements changed, as
    a 0-d float64 device array."""
    return _count(batch, "zero_nonfinite_cuda_")


def _count(batch, name):
    gpu = batch.cuda
    with gpu as plan:
        buffer, out = plan.new(())
        plan.count(name, buffer, gpu.data, gpu.table)
    return out


def copy(batch):
    """``(part, results)``: a `Part` over new dense copies of the GPU leaves, and each
    leaf's copy as an array of its kind, in its shape (per unique GPU leaf)."""
    gpu = batch.cuda
    with gpu as plan:
        buffers, arrays = plan.copies()
    return Part(gpu.unique, gpu.leaves, gpu.positions, gpu.mixed, plan, buffers, plan.dense_table()), plan.dense_results(arrays)


def on_device(batch, value):
    """A host float as a 0-d float64 array on the first GPU leaf's device, of its kind."""
    plan = batch.cuda.plan
    return plan.filled((), value)[1]


def to_host(value):
    """A float from a 0-d device array (synchronises)."""
    return float(host_copy(value).reshape(-1)[0])


def host_copy(array):
    """A NumPy copy of a Numba, torch or CuPy device array (synchronises)."""
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    if type(array).__module__.startswith("torch"):
        return array.cpu().numpy()
    import cupy

    return cupy.asnumpy(array)


def is_device_array(value):
    return _dispatch_on_cuda(value)


def _dispatch_on_cuda(value):
    from . import _dispatch

    return _dispatch.on_cuda(value)


def float64_total(total):
    """A 0-d or 1-element device array holding a norm, as float64 device memory the kernels
    can read (a copy, on the device, if it is of another dtype)."""
    leaf = describe(total, lambda: "total_norm")
    if leaf.size != 1:
        raise _checks.total_norm_shape(leaf.shape)
    if leaf.dtype == np.float64:
        return total
    if leaf.kind == "torch":
        return total.to(sys.modules["torch"].float64)
    if leaf.kind == "cupy":
        return total.astype(np.float64)
    raise _checks.total_norm_dtype(leaf.dtype)


def _pointer(array):
    return describe(array, lambda: "total_norm").ptr


# ------------------------------------------------- the stateful tools' helpers


def units(leaf, unit_axes):
    """One `DeviceLeaf` per unit of ``leaf``: its sub-array over ``unit_axes`` at every index
    of the other axes (as ``adaptive._units`` cuts a NumPy array)."""
    outer = [a for a in range(len(leaf.shape)) if a not in unit_axes]
    shape = [leaf.shape[a] for a in unit_axes]
    strides = [leaf.strides[a] for a in unit_axes]
    return [
        leaf.part(sum(i * leaf.strides[a] for i, a in zip(index, outer)), shape, strides)
        for index in np.ndindex(*(leaf.shape[a] for a in outer))
    ]


class Accumulation:
    """`GradAccumulator`'s buffers on the GPU, the twin of ``_cpu.Accumulation``: one dense
    buffer per dtype group of the window's positions, in the accumulator dtype, element
    ``k`` of a position's walk (in the window's ``orders``) at the position's offset + ``k``.
    Allocated once, when the window is placed; every micro-batch is then added by one
    launch per group through one plan, rebound to it, so nothing more is allocated (but
    the results of ``copy_result=True``)."""

    on_gpu = True

    def __init__(self, window, leaves, saved=None):
        """``leaves``: the placing micro-batch's `DeviceLeaf` per position; ``saved``: host
        buffers to start from."""
        self.orders, self.accumulators = window.orders, window.accumulators
        self._plan, self._leaves = None, None  # the micro-batches' plan, and whose it is now
        template = Plan(leaves, np.arange(len(leaves)), _stream_of(leaves[0]), self.orders)
        self.template, self.kind = template, template.kind
        self.acc = [self.accumulators[int(np.flatnonzero(template.row_of == g.rows.start)[0])] for g in template.groups]
        sizes = [template._dense_end(g) for g in template.groups]
        made = [template.new(n, acc) for n, acc in zip(sizes, self.acc)]
        self.buffers, self.arrays = [b for b, _ in made], [a for _, a in made]
        self.count = template.new(())  # the non-finite check's result, read at once
        self.empty = {acc: template.new(0, acc)[1] for acc in set(self.accumulators)}  # what empty leaves view
        self.flats = self._position_views(self.arrays, lambda i, leaf: ((leaf.size,), ((0, False),)))
        if saved is not None:
            for flat, values in zip(self.flats, saved):
                if values.size:
                    _write(flat, np.ascontiguousarray(values).reshape(-1), template)

    def _plan_for(self, leaves):
        """The plan of a micro-batch's ``leaves`` (per position, walked in the window's orders):
        one plan for every micro-batch, rebound to each."""
        if self._plan is None:
            self._plan = Plan(leaves, np.arange(len(leaves)), _stream_of(leaves[0]), self.orders)
        elif leaves is not self._leaves:
            self._plan.rebind(leaves, self.orders)
        self._leaves = leaves
        return self._plan

    def _position_views(self, arrays, layout):
        """Each position's part of the group buffers ``arrays``, shaped by ``layout(i, leaf)``
        (its shape and walk order)."""
        plan, views = self.template, []
        for i, leaf in enumerate(plan.leaves):
            shape, order = layout(i, leaf)
            dtype, row = self.accumulators[i], int(plan.row_of[i])
            group = plan.group_of(row)
            if group is None:
                flat, start = self.empty[dtype], 0
            else:
                flat, start = arrays[group.index], plan._dense_start(row) * dtype.itemsize
            views.append(_dense_shaped(self.kind, flat, shape, order, dtype, start))
        return views

    def fits(self, leaves):
        return False  # the window checks shapes and dtypes itself

    def finite(self, batch, leaves):
        """Whether every element of the micro-batch is finite (synchronises)."""
        plan = self._plan_for(leaves)
        buffer, out = self.count
        with plan.lock:
            plan.count("nonfinite_cuda", buffer)
        return to_host(out) == 0

    def add(self, batch, leaves, first):
        """Accumulate the micro-batch into the buffers (``first``: overwrite)."""
        kernels = _kernels()
        plan = self._plan_for(leaves)
        with plan.lock:
            plan.run(
                lambda g: kernels.accumulate_for(g.dtype, self.acc[g.index]),
                out=lambda g: self.buffers[g.index],
                c=1.0 if first else 0.0,
            )

    def result(self, coef, copy, shapes):
        """The window's result, one array per position: views of the buffers (scaled in place
        by ``coef``), or new arrays (``copy``)."""
        kernels = _kernels()
        plan, table = self.template, self.template.dense_table()
        data, arrays = self.buffers, self.arrays
        acc_kernels = lambda name: lambda g: getattr(kernels.kernels_for(self.acc[g.index]), name)  # noqa: E731
        with plan.lock:
            if copy:
                made = [plan.new(b.n, acc) for b, acc in zip(self.buffers, self.acc)]
                plan.run(acc_kernels("copy_cuda"), out=lambda g: made[g.index][0], data=data, table=table)
                data, arrays = [b for b, _ in made], [a for _, a in made]
            if coef != 1.0:
                plan.run(acc_kernels("scale_cuda_"), a=coef, c=float(kernels.BY_COEF), data=data, table=table)
        return self._position_views(arrays, lambda i, leaf: (shapes[i], self.orders[i]))

    def snapshot(self):
        """The buffers as host NumPy arrays of the accumulator dtypes, per position (synchronises)."""
        return [host_copy(flat).reshape(-1) for flat in self.flats]


def _write(flat, values, plan):
    """Copy host ``values`` into the device array ``flat`` (of the plan's kind)."""
    if simulated() or plan.kind not in ("torch", "cupy"):
        bits = _kernel_dtype(values.dtype)  # Numba copies no bfloat16 host arrays: its bits as int16
        flat = _shaped("numba", flat, flat.shape, flat.strides, bits, 0)
        flat.copy_to_device(values.view(bits), stream=plan._numba_stream())
    elif plan.kind == "torch":
        torch = sys.modules["torch"]
        flat.copy_(torch.from_numpy(values.view(np.int16) if values.dtype.name == "bfloat16" else values))
    else:
        flat.set(values)
