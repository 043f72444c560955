"""Norms, scaling, clamping and finite checks of a ``Batch`` with GPU leaves.

The counterpart of ``_cpu``. Numba's CUDA modules (and CuPy) are imported only
when the first GPU leaf arrives.

A call's GPU leaves are described once (`DeviceLeaf`) and planned once
(`_Plan`): a ``meta`` table with one row per leaf (rows grouped by dtype, empty
leaves last), copied to the device, and launches of up to ``SLOTS`` consecutive
rows. Each pass is ``ceil(leaves / SLOTS)`` launches per dtype plus one
finishing launch, and its results stay in device memory:

- norms: one pass for float32 and narrower (and complex64) with p = 1 or 2;
  a max-abs pass then a scaled pass (the peak read from device memory) for
  float64 / complex128 and for any other p (no spurious overflow or underflow);
  p = inf is the max-abs pass alone;
- ``clip_grad_norm_``: the scale kernel reads the total from device memory and
  decides there, so nothing is copied to the host.

Leaves of one call on the GPU and on the CPU are reduced apart and combined on
the host (this synchronises); so is the bool of ``all_finite``.

The stateful tools' helpers close the module: `Accumulation` (GradAccumulator's
device buffers), AGC's `units` (a unit is a row of the plan) and `multiply_`, and
`multiplied` (norm_penalty's direction).
"""

import ctypes
import importlib
import math

import numpy as np

from . import _checks, _cpu, _table

_STREAM_DEFAULT = 0


def _cuda():
    """``numba.cuda``, or an ImportError that names the extra to install."""
    try:
        importlib.import_module("numba_cuda")
        from numba import cuda
    except ImportError as error:
        raise _checks.cuda_missing(error) from None
    return cuda


def _simulated():
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def _kernels():
    from ._kernels import cuda as kernels

    return kernels


class DeviceLeaf:
    """A GPU leaf: its memory (``ptr``, ``shape``, byte ``strides``), dtype and owner."""

    __slots__ = ("obj", "kind", "ptr", "shape", "strides", "dtype", "itemsize", "readonly", "stream")

    def __init__(self, obj, kind):
        cuda = _cuda()
        interface = getattr(obj, "__cuda_array_interface__", None)
        if interface is None:  # the simulator's arrays: host memory behind a CUDA array's API
            interface = obj.__array_interface__
        self.obj, self.kind = obj, kind
        self.ptr, self.readonly = interface["data"]
        self.shape = tuple(interface["shape"])
        dtype = getattr(obj, "dtype", None)  # Numba and CuPy arrays know bfloat16's name
        self.dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(interface["typestr"])
        self.itemsize = self.dtype.itemsize
        strides = interface.get("strides")
        self.strides = tuple(strides) if strides is not None else _c_strides(self.shape, self.itemsize)
        stream = interface.get("stream")
        if kind == "numba":
            self.stream = getattr(obj, "stream", _STREAM_DEFAULT)
        elif stream and not _simulated():
            self.stream = cuda.external_stream(stream)
        else:
            self.stream = _STREAM_DEFAULT

    @property
    def size(self):
        return math.prod(self.shape)

    def part(self, offset, shape, strides):
        """The sub-array at byte ``offset`` with ``shape`` and byte ``strides``, of the same owner."""
        part = DeviceLeaf.__new__(DeviceLeaf)
        for name in ("obj", "kind", "dtype", "itemsize", "readonly", "stream"):
            setattr(part, name, getattr(self, name))
        part.ptr, part.shape, part.strides = self.ptr + offset, tuple(shape), tuple(strides)
        return part


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
        _checks.raise_read_only(where, function)
    if leaf.ptr % leaf.itemsize:
        _checks.raise_unaligned(where, leaf.dtype)
    _checks.check_layout(where, leaf)
    if writes:
        _checks.check_no_overlap(where, leaf, function)


class Leaves:
    """The GPU part of a ``Batch``: ``unique`` ids (into ``Batch.arrays``) and their `DeviceLeaf`."""

    __slots__ = ("unique", "leaves", "mixed", "_plan")

    def __init__(self, unique, leaves, mixed):
        self.unique = np.asarray(unique, dtype=np.int64)
        self.leaves = leaves
        self.mixed = mixed  # CPU leaves in the same call
        self._plan = None

    def plan(self):
        if self._plan is None:
            self._plan = _Plan(self.leaves)
        return self._plan


# ---------------------------------------------------------------- planning


def _walk(leaf, order=None):
    """``(base address, extent, offset, [(length, step), ...] innermost first)``: where the
    memory the leaf spans starts, its extent and the position of the walk's first element
    in it, and the walk's axes, all in elements but the address. ``order``: the
    `_table.traversal` to walk the leaf in, its own by default (then every step is >= 0
    and the offset 0); steps are negative where ``order`` runs against the leaf's strides."""
    if order is None:
        axes = _table._axes(leaf)  # (axis, length, |stride|, flipped)
    else:
        axes = [(a, leaf.shape[a], -leaf.strides[a] if flipped else leaf.strides[a], flipped) for a, flipped in order]
    if not axes:  # one element
        return leaf.ptr, 1, 0, []
    start = leaf.ptr - sum((n - 1) * s for _, n, s, flipped in axes if flipped)
    merged = [(n, s // leaf.itemsize) for n, s in _table._merged(axes)]
    low = sum((n - 1) * s for n, s in merged if s < 0)
    return start + low * leaf.itemsize, 1 + sum((n - 1) * abs(s) for n, s in merged), -low, merged


class _Plan:
    """Rows, views and launches for the leaves of one call (see the module docstring)."""

    def __init__(self, leaves, orders=None):
        """``orders``: per leaf, the `_table.traversal` to walk it in (see `_walk`)."""
        cuda, kernels = _cuda(), _kernels()
        first = leaves[0]
        self.kind, self.stream, self.owner = first.kind, first.stream, first.obj
        nonempty = [i for i, leaf in enumerate(leaves) if leaf.size]
        groups = {}
        for i in nonempty:
            groups.setdefault(leaves[i].dtype, []).append(i)
        order = [i for ids in groups.values() for i in ids]
        order += [i for i, leaf in enumerate(leaves) if not leaf.size]
        self.row_of = np.empty(len(leaves), np.int64)
        self.row_of[order] = np.arange(len(leaves))
        walks = [_walk(leaves[i], None if orders is None else orders[i]) if leaves[i].size else (0, 0, 0, []) for i in order]
        width = kernels.AXES + 2 * max(1, max(len(w[3]) for w in walks))
        meta = np.zeros((len(leaves), width), np.int64)
        tpb = kernels.THREADS_PER_BLOCK
        for row, (i, (_, _, offset, axes)) in enumerate(zip(order, walks)):
            size = leaves[i].size
            meta[row, : kernels.AXES] = (size, min(kernels.MAX_BLOCKS, -(-size // tpb)), 0, len(axes), offset)
            for d, (n, s) in enumerate(axes):
                meta[row, kernels.AXES + 2 * d : kernels.AXES + 2 * d + 2] = (n, s)
        self.meta_host = meta
        self.scaled = None  # the SCALED column on the device, set per norm plan
        self.launches = []  # (kernel set, first row, views, blocks)
        row = 0
        for dtype, ids in groups.items():
            kind_dtype = _kernel_dtype(dtype)
            views = [_view(cuda, leaves[i], walks[row + j][0], walks[row + j][1], kind_dtype) for j, i in enumerate(ids)]
            for start in range(0, len(ids), kernels.SLOTS):
                chunk = views[start : start + kernels.SLOTS]
                blocks = int(meta[row + start : row + start + len(chunk), kernels.NBLOCKS].max())
                padded = tuple(chunk + [chunk[0]] * (kernels.SLOTS - len(chunk)))
                self.launches.append((kernels.for_dtype(dtype), row + start, padded, len(chunk), blocks))
            row += len(ids)
        self.rows = len(leaves)
        self.max_blocks = max(1, int(meta[:, kernels.NBLOCKS].max()))

    def device_meta(self, scaled_rows):
        """``meta`` on the device with the SCALED column set for ``scaled_rows`` (a mask)."""
        kernels = _kernels()
        meta = self.meta_host.copy()
        meta[:, kernels.SCALED] = scaled_rows
        return _cuda().to_device(meta, stream=self.stream)

    def launch(self, name, meta, *args, rows=None, dst=None):
        """Launch kernel ``name`` of each dtype's set on its rows.

        ``name`` is a kernel name or a function of the kernel set's first row;
        ``rows``: only the launches whose rows are set in this mask; an argument that
        is a list holds one value per launch. ``dst``: the
        update kernels' target views (the leaves themselves if None), one tuple per
        launch, appended to ``args`` with the flag that they are dense.
        """
        kernels = _kernels()
        tpb = kernels.THREADS_PER_BLOCK
        for i, (kernel_set, first, views, count, blocks) in enumerate(self.launches):
            if rows is not None and not rows[first]:
                continue
            kernel = getattr(kernel_set, name if isinstance(name, str) else name(first))
            values = [arg[i] if isinstance(arg, list) else arg for arg in args]  # lists: one per launch
            tail = () if dst is False else (views, False) if dst is None else (dst[i], True)
            kernel[(blocks, count), tpb, self.stream, tpb * 8](views, meta, first, *values, *tail)

    def finish(self, partials, meta, what, p, peaks, norms, total, positions, by_position):
        kernels = _kernels()
        tpb = kernels.THREADS_PER_BLOCK
        kernels.finish_cuda[1, tpb, self.stream, tpb * 8](
            partials, meta, what, p, peaks, norms, total, positions, by_position
        )

    def empty(self, shape, dtype=np.float64):
        """``(kernel argument, result object)``: a new device array of the call's kind."""
        cuda = _cuda()
        if self.kind == "cupy":
            import cupy

            result = cupy.empty(shape, dtype)  # on CuPy's current stream, from its pool
            return cuda.as_cuda_array(result, sync=False), result
        array = cuda.device_array(shape, dtype, stream=self.stream)
        return array, array

    def to_device(self, host):
        return _cuda().to_device(np.ascontiguousarray(host), stream=self.stream)

    def scalar(self, kernel_array, result):
        """Element 0 of a new 1-d array as a 0-d array of the call's kind."""
        if self.kind == "cupy":
            return result.reshape(())
        return _shaped(kernel_array, (), (), np.float64, 0)

    def dense_copies(self, leaves):
        """Per launch, a tuple of new dense buffers for its leaves; and every leaf's result."""
        kernels = _kernels()
        dst, results = [], [None] * len(leaves)
        order = np.argsort(self.row_of)
        for kernel_set, first, views, count, blocks in self.launches:
            buffers = []
            for row in range(first, first + count):
                leaf = leaves[order[row]]
                buffer, owner = self.empty((leaf.size,), views[0].dtype)
                buffers.append(buffer)
                results[order[row]] = _leaf_shaped(self.kind, owner, leaf)
            dst.append(tuple(buffers + [buffers[0]] * (kernels.SLOTS - count)))
        for i, leaf in enumerate(leaves):
            if results[i] is None:  # empty
                _, owner = self.empty((0,), _kernel_dtype(leaf.dtype))
                results[i] = _leaf_shaped(self.kind, owner, leaf)
        return dst, results


def _kernel_dtype(dtype):
    """The element type of the kernels' views: bfloat16 as its int16 bits, others as they are."""
    return np.dtype(np.int16) if dtype.name == "bfloat16" else dtype


def _view(cuda, leaf, base, extent, dtype):
    """A 1-d contiguous device array of ``extent`` elements of ``dtype`` at ``base``."""
    if _simulated():  # device memory is host memory
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        buffer = (ctypes.c_char * (extent * dtype.itemsize)).from_address(base)
        return FakeCUDAArray(np.frombuffer(buffer, dtype=dtype))
    interface = {"shape": (extent,), "strides": None, "typestr": dtype.str, "data": (base, False), "version": 3}
    return cuda.from_cuda_array_interface(interface, owner=leaf.obj, sync=False)


def _dense_layout(shape, order, itemsize):
    """Strides and start (bytes) of a leaf laid out densely in its walk ``order``, as
    ``_table.dense_view`` lays it out: walk element ``k`` at position ``k``."""
    strides, start, dense = [itemsize] * len(shape), 0, itemsize
    for axis, flipped in order:
        strides[axis] = -dense if flipped else dense
        if flipped:
            start += (shape[axis] - 1) * dense
        dense *= shape[axis]
    return tuple(strides), start


def _leaf_shaped(kind, owner, leaf):
    """The out-of-place result of ``leaf``: its shape and dtype over the dense ``owner``."""
    return _dense_shaped(kind, owner, leaf.shape, _table.traversal(leaf), leaf.dtype)


def _dense_shaped(kind, flat, shape, order, dtype):
    """``shape`` and ``dtype`` over ``flat`` (a dense 1-d array of the call's kind) laid out
    in ``order`` (a `_table.traversal`)."""
    strides, start = _dense_layout(shape, order, dtype.itemsize)
    if kind == "cupy":
        import cupy

        return cupy.ndarray(shape, dtype, memptr=flat.data + start, strides=strides)
    return _shaped(flat, shape, strides, dtype, start)


def _shaped(array, shape, strides, dtype, start):
    """A Numba device array (or the simulator's) over ``array``'s memory from byte ``start``."""
    if _simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        base = array._ary
        return FakeCUDAArray(np.ndarray(shape, dtype, buffer=base, offset=start, strides=strides))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, dtype, stream=array.stream, gpu_data=array.gpu_data.view(start))




# -------------------------------------------------------------- operations


def _wide_rows(plan, leaves):
    order = np.argsort(plan.row_of)
    return np.array([leaves[i].dtype in (np.float64, np.complex128) for i in order], dtype=bool)


def _device_norms(gpu, p, positions=None):
    """Leaf norms (one per row) and their total, in device memory: ``(plan, norms, total,
    by_position)``; ``by_position[i]`` is the norm of the leaf at row ``positions[i]``."""
    kernels, plan = _kernels(), gpu.plan()
    if p == math.inf or p not in (1.0, 2.0):
        scaled = np.ones(plan.rows, dtype=bool)
    else:
        scaled = _wide_rows(plan, gpu.leaves)
    meta = plan.device_meta(scaled)
    peaks = plan.to_device(np.where(scaled, 0.0, -1.0))
    partials, _ = plan.empty((plan.rows, plan.max_blocks))
    norms, _ = plan.empty((plan.rows,))
    total = plan.empty((1,))
    positions = np.zeros(0, np.int64) if positions is None else positions
    by_position = plan.empty((positions.size,))
    positions = plan.to_device(positions)
    if scaled.any():
        plan.launch("maxabs_cuda", meta, p, peaks, partials, rows=scaled, dst=False)
        plan.finish(partials, meta, kernels.FOLD_PEAK, p, peaks, norms, total[0], positions, by_position[0])
    if p != math.inf:
        plain = "sumsq_cuda" if p == 2.0 else "sumabs_cuda"
        plan.launch(lambda row: "sumpow_cuda" if scaled[row] else plain, meta, p, peaks, partials, dst=False)
        plan.finish(partials, meta, kernels.FOLD_NORM, p, peaks, norms, total[0], positions, by_position[0])
    return plan, norms, total, by_position


def host_norms(batch, p):
    """Every unique leaf's norm on the host: the CPU ones and the GPU ones (synchronises)."""
    norms = _cpu.leaf_norms(batch, p)
    norms[batch.cuda.unique] = _gpu_host_norms(batch.cuda, p)
    return norms


def leaf_norms(leaves, p):
    """The norm of each `DeviceLeaf` of ``leaves``, on the host (synchronises)."""
    return _gpu_host_norms(Leaves(np.arange(len(leaves)), leaves, False), p)


def _gpu_host_norms(gpu, p):
    plan, device, _, _ = _device_norms(gpu, p)
    return device.copy_to_host()[plan.row_of]


def on_first_device(batch, value):
    """A host float as the call's result: on the GPU if the first leaf is there."""
    return _on_first_device(batch, batch.cuda.plan(), value)


def _on_first_device(batch, plan, value):
    if not np.isin(batch.unique_of[0], batch.cuda.unique):
        return value
    array, result = plan.empty((1,))
    array.copy_to_device(np.array([value]), stream=plan.stream)
    return plan.scalar(array, result)


def _gpu_index(batch):
    """For each unique leaf, its index among the GPU leaves (-1 for CPU ones)."""
    index = np.full(len(batch.arrays), -1, np.int64)
    index[batch.cuda.unique] = np.arange(batch.cuda.unique.size)
    return index


def _position_rows(batch, plan):
    """The row of the leaf at every position (every leaf on the GPU)."""
    return plan.row_of[_gpu_index(batch)[batch.unique_of]]


def _rebuild(batch, copy, gpu_results):
    """The out-of-place result: ``copy`` (a ``Batch.copy``) with the GPU leaves' new arrays."""
    for u, result in zip(batch.cuda.unique, gpu_results):
        copy.arrays[u] = result
    return copy.rebuild()


def grad_norm(batch, p):
    if batch.cuda.mixed:
        return _on_first_device(batch, batch.cuda.plan(), _cpu.total_norm(host_norms(batch, p), p))
    plan, _, total, _ = _device_norms(batch.cuda, p)
    return plan.scalar(*total)


def layer_norms(batch, p):
    if batch.cuda.mixed:
        return host_norms(batch, p)[batch.unique_of]  # on the host, as NumPy
    plan = batch.cuda.plan()
    return _device_norms(batch.cuda, p, _position_rows(batch, plan))[3][1]


def clip_grad_norm_(batch, p, max_norm, eps, error_if_nonfinite, out_of_place=False, total=None):
    """The total norm before clipping; with ``out_of_place``, ``(clipped, total)``.

    ``total``: the norm when it is already known on the host (all-reduced across ranks).
    """
    target = batch.copy() if out_of_place else batch
    if batch.cuda.mixed or total is not None:
        if total is None:
            total = _cpu.total_norm(host_norms(batch, p), p)
        if error_if_nonfinite and not math.isfinite(total):
            _checks.raise_nonfinite(total)
        plan = batch.cuda.plan()
        if math.isfinite(total) and total > max_norm:
            _cpu.scale_(target, np.full(len(batch.arrays), max_norm / (total + eps)))
        clipped = _scale(batch, plan, plan.to_device(np.array([total])), False, max_norm, eps, out_of_place)
        total = _on_first_device(batch, plan, total)
    else:
        plan, _, device_total, _ = _device_norms(batch.cuda, p)
        if error_if_nonfinite:
            value = float(device_total[0].copy_to_host()[0])  # the one documented synchronisation
            if not math.isfinite(value):
                _checks.raise_nonfinite(value)
        clipped = _scale(batch, plan, device_total[0], False, max_norm, eps, out_of_place)
        total = plan.scalar(*device_total)
    return (_rebuild(batch, target, clipped), total) if out_of_place else total


def clip_grads_with_norm_(batch, max_norm, total, eps):
    """``total``: a float, or a 0-d / 1-element device array holding the norm (read on the device)."""
    plan = batch.cuda.plan()
    if is_device_array(total):
        total = _as_numba(total).reshape((1,))
    else:
        total = plan.to_device(np.array([total], dtype=np.float64))
    if batch.cuda.mixed:
        value = float(total.copy_to_host()[0])
        if math.isfinite(value) and value > max_norm:
            _cpu.scale_(batch, np.full(len(batch.arrays), max_norm / (value + eps)))
    _scale(batch, plan, total, False, max_norm, eps, False)


def is_device_array(value):
    return hasattr(value, "__cuda_array_interface__") or hasattr(value, "__cuda_ndarray__")


def _as_numba(array):
    """A Numba device array (or the simulator's) sharing ``array``'s memory, without synchronising."""
    if hasattr(array, "__cuda_ndarray__"):
        return array
    return _cuda().as_cuda_array(array, sync=False)


def clip_grad_norm_per_layer_(batch, p, max_norm, eps):
    plan = batch.cuda.plan()
    if batch.cuda.mixed:
        norms = host_norms(batch, p)
        clip = np.isfinite(norms) & (norms > max_norm)
        if clip.any():
            with np.errstate(invalid="ignore", over="ignore"):
                _cpu.scale_(batch, np.where(clip, max_norm / (norms + eps), 1.0))
        rows = np.empty(plan.rows)
        rows[plan.row_of] = norms[batch.cuda.unique]
        _scale(batch, plan, plan.to_device(rows), True, max_norm, eps, False)
        return norms[batch.unique_of]
    _, norms, _, by_position = _device_norms(batch.cuda, p, _position_rows(batch, plan))
    _scale(batch, plan, norms, True, max_norm, eps, False)
    return by_position[1]


def _scale(batch, plan, norms, per_leaf, max_norm, eps, out_of_place):
    """The scale kernel on every GPU leaf; their new arrays if ``out_of_place``."""
    meta = plan.device_meta(np.zeros(plan.rows, dtype=bool))
    dst, results = plan.dense_copies(batch.cuda.leaves) if out_of_place else (None, None)
    plan.launch("scale_cuda_", meta, norms, per_leaf, float(max_norm), float(eps), dst=dst)
    return results


def clip_grad_value_(batch, bound, out_of_place=False):
    """Clamp every leaf; with ``out_of_place``, the clamped new arrays in the caller's structure."""
    target = batch.copy() if out_of_place else batch
    if bound != math.inf or out_of_place:  # in place, inf writes nothing
        if batch.cuda.mixed:
            _cpu.clamp_(target, bound)
        plan = batch.cuda.plan()
        meta = plan.device_meta(np.zeros(plan.rows, dtype=bool))
        dst, results = plan.dense_copies(batch.cuda.leaves) if out_of_place else (None, None)
        order = np.argsort(plan.row_of)
        bounds = [_rounded_bound(bound, batch.cuda.leaves[order[first]].dtype) for _, first, *_ in plan.launches]
        plan.launch("clamp_cuda_", meta, bounds, dst=dst)
    return _rebuild(batch, target, results) if out_of_place else None


def _rounded_bound(bound, dtype):
    """``bound`` rounded once to ``dtype`` (nearest-even), as a float64."""
    if dtype.name != "bfloat16":
        return float(np.array(bound).astype(dtype))
    # round to odd in float32, then to nearest-even in bfloat16: one rounding in effect
    f = np.float32(bound)
    if float(f) != bound and not f.view(np.uint32) & 1:
        f = np.nextafter(f, np.float32(math.copysign(math.inf, bound - float(f))))
    return float(np.array(f).astype(dtype))


def all_finite(batch):
    """Whether every element is finite: a bool, so this synchronises."""
    if batch.cuda.mixed and _cpu.count_nonfinite(batch):
        return False
    return float(_count(batch.cuda.plan(), "nonfinite_cuda")[0].copy_to_host()[0]) == 0


def zero_nonfinite_(batch):
    """Zero the non-finite elements; the count as a device array (an int if mixed: synchronises)."""
    plan = batch.cuda.plan()
    total = _count(plan, "zero_nonfinite_cuda_")
    if batch.cuda.mixed:
        return _cpu.zero_nonfinite_(batch) + int(total[0].copy_to_host()[0])
    return plan.scalar(*total)


def _count_scratch(plan):
    """New device arrays for `_count`: ``(meta, partials, total, positions)``."""
    meta = plan.device_meta(np.zeros(plan.rows, dtype=bool))
    partials, _ = plan.empty((plan.rows, plan.max_blocks))
    return meta, partials, plan.empty((1,)), plan.to_device(np.zeros(0, np.int64))


def _count(plan, name, scratch=None):
    """Launch a counting kernel over every leaf of ``plan``; the count (float64) in device
    memory, as ``(kernel array, result)``. ``scratch``: `_count_scratch`'s arrays to reuse."""
    kernels = _kernels()
    meta, partials, total, positions = scratch or _count_scratch(plan)
    if name == "nonfinite_cuda":
        plan.launch(name, meta, 2.0, partials[:, 0], partials, dst=False)  # p and the peaks: not read
    else:
        plan.launch(name, meta, partials, dst=False)
    unused = partials[:, 0]
    plan.finish(partials, meta, kernels.FOLD_COUNT, 2.0, unused, unused, total[0], positions, unused)
    return total


# ------------------------------------------------- the stateful tools' helpers


def position_leaves(batch):
    """The `DeviceLeaf` at every position of ``batch`` (a repeated array at each of its
    positions), None at the CPU ones."""
    return [batch.cuda.leaves[i] if i >= 0 else None for i in _gpu_index(batch)[batch.unique_of].tolist()]


def plan(leaves, orders=None):
    """The plan of ``leaves`` (`DeviceLeaf` objects, repeats allowed), each walked in its
    entry of ``orders`` (see `_walk`)."""
    return _Plan(leaves, orders)


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


def multiply_(leaves, coefs):
    """``leaves[i] *= coefs[i]`` in place, rounded once; leaves whose coefficient is 1 are not
    written, and launches holding only such leaves are not made."""
    plan = _Plan(leaves)
    rows = np.empty(plan.rows)
    rows[plan.row_of] = coefs
    meta = plan.device_meta(np.zeros(plan.rows, dtype=bool))
    plan.launch("multiply_cuda_", meta, plan.to_device(rows), False, rows=_launches_with(plan, rows != 1.0))


def _launches_with(plan, row_mask):
    """A row mask for `_Plan.launch`: each launch's first row set iff any of its rows is."""
    first_rows = np.zeros(plan.rows, dtype=bool)
    for _, first, _, count, _ in plan.launches:
        first_rows[first] = row_mask[first : first + count].any()
    return first_rows


def multiplied(batch, target, value, fill):
    """The out-of-place result: ``target`` (a ``Batch.copy``) with new arrays for the GPU
    leaves holding ``x * value`` rounded once, or ``value`` everywhere (``fill``)."""
    plan = batch.cuda.plan()
    meta = plan.device_meta(np.zeros(plan.rows, dtype=bool))
    dst, results = plan.dense_copies(batch.cuda.leaves)
    plan.launch("multiply_cuda_", meta, plan.to_device(np.full(plan.rows, float(value))), fill, dst=dst)
    return _rebuild(batch, target, results)


class Accumulation:
    """`GradAccumulator`'s buffers on the GPU and what every micro-batch's launches reuse.

    One dense buffer per position, of the grads' kind (CuPy or Numba), element ``k`` of
    the position's walk in the window's ``order`` at ``k`` (as on the CPU). Allocated
    once, when the window is placed on the GPU, with the device ``meta`` of the
    micro-batches, the scratch of the non-finite check and the averaging coefficients:
    later micro-batches of the same layout allocate nothing on the device.
    """

    def __init__(self, leaves, plan, orders, accumulators, coef, saved=None):
        """``leaves``: the placing micro-batch's `DeviceLeaf` per position, and ``plan`` its
        ``_Plan(leaves, orders)``; ``coef``: the factor of the window's result; ``saved``:
        host buffers to start from."""
        kernels = _kernels()
        self.kind, self.stream = plan.kind, plan.stream
        self.meta_host = plan.meta_host
        self.scratch = _count_scratch(plan)
        self.meta = self.scratch[0]
        self.buffers, self.flats = [], []  # kernel views (bfloat16 as int16); as 1-d arrays of the kind
        for position, (leaf, acc) in enumerate(zip(leaves, accumulators)):
            buffer, owner = plan.empty((leaf.size,), _kernel_dtype(acc))
            if saved is not None and leaf.size:
                buffer.copy_to_device(np.ascontiguousarray(saved[position]).view(buffer.dtype), stream=self.stream)
            self.buffers.append(buffer)
            self.flats.append(_dense_shaped(self.kind, owner, (buffer.size,), ((0, False),), acc))
        self.orders = orders
        self.launches = []  # per launch of ``plan`` (and of every later micro-batch's): kernel, buffers
        order = np.argsort(plan.row_of)
        for _, first, _, count, _ in plan.launches:
            rows = order[first : first + count]
            dst = [self.buffers[i] for i in rows]
            kernel = kernels.accumulate_for(leaves[rows[0]].dtype, accumulators[rows[0]])
            self.launches.append((kernel, tuple(dst + [dst[0]] * (kernels.SLOTS - count))))
        self.result_leaves = [DeviceLeaf(flat, self.kind) for flat in self.flats]
        self.result_plan = Leaves(np.arange(len(self.flats)), self.result_leaves, False).plan()
        self.result_meta = self.result_plan.device_meta(np.zeros(self.result_plan.rows, dtype=bool))
        self.coefs = self.result_plan.to_device(np.full(self.result_plan.rows, float(coef)))
        self.coef = coef

    def _meta_for(self, plan):
        """The device ``meta`` of a micro-batch: the window's unless its layout differs."""
        if not np.array_equal(plan.meta_host, self.meta_host):
            self.meta_host, self.meta = plan.meta_host, plan.device_meta(np.zeros(plan.rows, dtype=bool))
            self.scratch = (self.meta, *self.scratch[1:])
        return self.meta

    def finite(self, plan):
        """Whether every element of the micro-batch of ``plan`` is finite (synchronises)."""
        self._meta_for(plan)
        return float(_count(plan, "nonfinite_cuda", self.scratch)[0].copy_to_host()[0]) == 0

    def add(self, plan, first):
        """Accumulate the micro-batch of ``plan`` into the buffers (``first``: overwrite)."""
        tpb = _kernels().THREADS_PER_BLOCK
        meta = self._meta_for(plan)
        for (kernel, dst), (_, first_row, views, count, blocks) in zip(self.launches, plan.launches):
            kernel[(blocks, count), tpb, self.stream](dst, views, meta, first_row, bool(first))

    def result(self, shapes, copy):
        """The window's result, one array per position: views of the buffers (scaled in place
        by the coefficient), or new arrays (``copy``)."""
        plan = self.result_plan
        if copy:
            dst, flats = plan.dense_copies(self.result_leaves)
            if self.coef == 1.0:  # a plain copy, bit for bit
                for buffers, (_, _, views, count, _) in zip(dst, plan.launches):
                    for j in range(count):
                        buffers[j].copy_to_device(views[j], stream=self.stream)
            else:
                plan.launch("multiply_cuda_", self.result_meta, self.coefs, False, dst=dst)
        else:
            flats = self.flats
            if self.coef != 1.0:
                plan.launch("multiply_cuda_", self.result_meta, self.coefs, False)
        return [
            _dense_shaped(self.kind, flat, shape, order, flat.dtype)
            for flat, shape, order in zip(flats, shapes, self.orders)
        ]

    def snapshot(self):
        """The buffers as host NumPy arrays of the accumulator dtypes (synchronises)."""
        return [buffer.copy_to_host().view(flat.dtype) for buffer, flat in zip(self.buffers, self.flats)]

