"""The operations the API needs, on a ``Batch`` whose leaves live on the CPU, the GPU or both.

Each operation runs on each device's twin (``_cpu`` for the CPU leaves, ``_cuda`` for
the GPU ones, the same operations by name) and combines their results. A call whose
leaves are all on the GPU keeps its results there (device arrays of the first leaf's
kind) and decides on the device, so nothing synchronises; a call with CPU leaves
combines on the host, and a result goes to the device of the first leaf (SPEC §2).
"""

import math

import numpy as np

from . import _checks, _cpu, _cuda, _dispatch, _private_cpu, _private_cuda


def _gpu_only(batch):
    return batch.cuda is not None and not batch.cuda.mixed


def host_leaf_norms(batch, p):
    """The p-norm of every unique leaf, a float64 NumPy array (GPU leaves synchronise)."""
    norms = _cpu.leaf_norms(batch, p)
    if batch.cuda:
        _cuda.host_norms(batch, p, norms)
    return norms


def total_norm(batch, p):
    """The total p-norm: a 0-d device array if every leaf is on the GPU, else placed as
    `on_first_device` places it."""
    if _gpu_only(batch):
        return _cuda.norms(batch, p)[0]
    return on_first_device(batch, _cpu.total_norm(host_leaf_norms(batch, p), p))


def layer_norms(batch, p):
    """The norm at every position: a device array if every leaf is on the GPU, else NumPy."""
    if _gpu_only(batch):
        return _cuda.norms(batch, p, per_position=True)[1]
    return host_leaf_norms(batch, p)[batch.unique_of]


def on_first_device(batch, value):
    """A host float as the call's result: on the GPU if the first leaf is there."""
    if batch.cuda is not None and batch.unique_of.size and np.isin(batch.unique_of[0], batch.cuda.unique):
        return _cuda.on_device(batch, value)
    return value


def clip_(batch, p, max_norm, eps, error_if_nonfinite, target=None):
    """`clip_grad_norm_`'s work on this process's leaves: the total before clipping.

    ``target``: the batch to scale (a ``Batch.copy`` of ``batch``, out of place), else
    ``batch`` itself. GPU only: the device decides, and only ``error_if_nonfinite``
    reads the total on the host.
    """
    target = batch if target is None else target
    if _gpu_only(batch):
        total, _ = _cuda.norms(batch, p)
        if error_if_nonfinite:
            check_finite(_cuda.to_host(total), True)
        _cuda.clip_(target, max_norm, eps)
        return total
    total = _cpu.total_norm(host_leaf_norms(batch, p), p)
    check_finite(total, error_if_nonfinite)
    scale_to_max_norm_(target, max_norm, total, eps)
    return on_first_device(batch, total)


def check_finite(total, error_if_nonfinite):
    if error_if_nonfinite and not math.isfinite(total):
        _checks.raise_nonfinite(total)


def scale_to_max_norm_(batch, max_norm, total, eps):
    """Scale by ``max_norm / (total + eps)`` iff ``total > max_norm`` and is finite.

    ``total``: a float, or a device array that the GPU leaves' kernels read where they
    are (the CPU leaves need it on the host)."""
    on_device = not isinstance(total, float)
    if batch.cuda:
        _cuda.clip_(batch, max_norm, eps, _cuda.float64_total(total) if on_device else total)
        if _gpu_only(batch):
            return
    value = _cuda.to_host(total) if on_device else total
    if math.isfinite(value) and value > max_norm:
        _cpu.scale_(batch, np.full(len(batch.arrays), max_norm / (value + eps)))


def clip_per_layer_(batch, p, max_norm, eps):
    """Clip each leaf on its own norm; the norms before clipping, one per position."""
    if _gpu_only(batch):
        _, norms = _cuda.norms(batch, p, per_position=True)
        _cuda.clip_rows_(batch, max_norm, eps)
        return norms
    norms = host_leaf_norms(batch, p)
    clip = np.isfinite(norms) & (norms > max_norm)
    if clip.any():
        with np.errstate(invalid="ignore", over="ignore"):
            scale_(batch, np.where(clip, max_norm / (norms + eps), 1.0))
    return norms[batch.unique_of]


def scale_(batch, coef):
    """Multiply every element of unique leaf ``u`` by ``coef[u]``; leaves with 1 are not touched."""
    _cpu.scale_(batch, coef)
    if batch.cuda:
        _cuda.scale_(batch, coef)


def fill_(batch, value):
    """Set every element of every leaf to ``value``."""
    _cpu.fill_(batch, value)
    if batch.cuda:
        _cuda.fill_(batch, value)


def clamp_(batch, bound):
    _cpu.clamp_(batch, bound)
    if batch.cuda:
        _cuda.clamp_(batch, bound)


def all_finite(batch):
    """Whether every element is finite: a bool (GPU leaves synchronise)."""
    if _cpu.count_nonfinite(batch):
        return False
    return batch.cuda is None or _cuda.to_host(_cuda.count_nonfinite(batch)) == 0


def zero_nonfinite_(batch):
    """Zero the non-finite elements; how many changed: a 0-d device array if every leaf is on
    the GPU, else an int (GPU leaves synchronise)."""
    changed = _cpu.zero_nonfinite_(batch)
    if batch.cuda is None:
        return changed
    on_gpu = _cuda.zero_nonfinite_(batch)
    return on_gpu if _gpu_only(batch) else changed + int(_cuda.to_host(on_gpu))


def add_noise_(batch, std, noise):
    """Add ``std`` times the next draws of ``noise`` to every unique leaf, in place: leaf
    after leaf, each in its memory order (a complex element takes two draws)."""
    sizes = [leaf.size * (2 if leaf.dtype.kind == "c" else 1) for leaf in batch.unique_leaves()]
    ends = np.cumsum(sizes, dtype=np.int64)
    starts = noise._take(int(ends[-1]) if sizes else 0) + ends - sizes
    _private_cpu.add_noise_(batch, std, noise, starts)
    if batch.cuda:
        _private_cuda.add_noise_(batch, std, noise, starts[batch.cuda.unique])


def host_values(value):
    """``value`` as the host sees it: a NumPy copy of a device array (which waits for the
    GPU), anything else as it is."""
    return _cuda.host_copy(value) if _dispatch.on_cuda(value) else value


def units(leaf, unit_axes):
    """AGC's units of ``leaf`` (a NumPy array or a GPU leaf): one array per index of the axes
    not in ``unit_axes``."""
    if isinstance(leaf, _cuda.DeviceLeaf):
        return _cuda.units(leaf, unit_axes)
    outer = [a for a in range(leaf.ndim) if a not in unit_axes]
    moved = np.transpose(leaf, outer + list(unit_axes))
    return [moved[(*index, ...)] for index in np.ndindex(moved.shape[: len(outer)])]


def position_leaves(batch):
    """The leaf at every position: a NumPy array, or a GPU leaf (``_cuda.DeviceLeaf``)."""
    leaves = batch.unique_leaves()
    return [leaves[u] for u in batch.unique_of.tolist()]


def leaf_like(leaf, other, where, function, leaf_where):
    """``other`` (a caller's array paired with ``leaf``, e.g. AGC's parameter) as a leaf of
    ``leaf``'s device, checked for reading; an error if it lives on the other device."""
    on_gpu = isinstance(leaf, _cuda.DeviceLeaf)
    if _dispatch.on_cuda(other) != on_gpu:
        raise _checks.agc_devices(leaf_where(), where(), on_gpu)
    if on_gpu:
        other = _dispatch.as_cuda_leaf(other, where)
        _cuda.check(other, where, function, False, False)
        return other
    other = _dispatch.as_cpu_array(other, where)
    _checks.check_dtype(where, other.dtype)
    return other


def accumulation(batch, window, leaves, saved):
    """`GradAccumulator`'s buffers for ``window`` on the device of ``batch`` (one device),
    placed by its ``leaves`` (per position), starting from ``saved`` host buffers if any."""
    twin = _cuda.Accumulation if batch.cuda is not None else _cpu.Accumulation
    return twin(window, leaves, saved)
