"""The one place that inspects array types and picks a kernel family (SPEC §2).

- ``numpy.ndarray`` -> CPU kernels, as it is.
- NumPy scalars -> read-only 0-d arrays.
- ``__cuda_array_interface__`` / ``__cuda_ndarray__`` (CuPy, Numba device arrays, the
  CUDA simulator's) -> CUDA kernels (``_cuda``, imported only then).
- ``__dlpack__`` producers (torch, JAX) in CPU memory -> a zero-copy NumPy view; in
  CUDA memory -> a zero-copy CuPy array.
"""

import numpy as np

from . import _checks

_DLPACK_CPU = 1
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def on_cuda(leaf):
    """Whether ``leaf`` is a CUDA array: one attribute check (its DLPack device for others)."""
    if type(leaf) is np.ndarray:
        return False
    if hasattr(leaf, "__cuda_array_interface__") or hasattr(leaf, "__cuda_ndarray__"):
        return True
    device = getattr(leaf, "__dlpack_device__", None)
    return device is not None and hasattr(leaf, "__dlpack__") and int(device()[0]) in _DLPACK_CUDA


def as_cuda_leaf(leaf, where):
    """A ``_cuda.DeviceLeaf`` for a leaf where `on_cuda` holds (imports the CUDA backend)."""
    from . import _cuda

    if hasattr(leaf, "__cuda_ndarray__"):
        return _cuda.DeviceLeaf(leaf, "numba")
    if hasattr(leaf, "__cuda_array_interface__"):
        return _cuda.DeviceLeaf(leaf, "cupy" if type(leaf).__module__.startswith("cupy") else "foreign")
    try:
        import cupy
    except ImportError as error:
        raise _checks.cuda_needs_cupy(where, leaf, error) from None
    try:
        wrapped = cupy.from_dlpack(leaf)
    except (BufferError, TypeError, ValueError, RuntimeError) as error:
        raise _checks.dlpack_failed(where, leaf, error) from None
    return _cuda.DeviceLeaf(wrapped, "cupy")


def as_cpu_array(leaf, where):
    """``leaf`` as a NumPy array sharing its memory; ``where()`` names it in errors."""
    if isinstance(leaf, np.ndarray):
        return leaf
    if isinstance(leaf, np.generic):
        scalar = np.array(leaf)
        scalar.flags.writeable = False  # a NumPy scalar is immutable
        return scalar
    if on_cuda(leaf):
        raise _checks.cpu_only(where, leaf, "this function")
    if hasattr(leaf, "__dlpack__") and hasattr(leaf, "__dlpack_device__"):
        if int(leaf.__dlpack_device__()[0]) != _DLPACK_CPU:
            raise _checks.unsupported_device(where, leaf)
        try:
            return np.from_dlpack(leaf)
        except (BufferError, TypeError, ValueError, RuntimeError) as error:
            raise _checks.dlpack_failed(where, leaf, error) from None
    raise _checks.not_an_array(where, leaf)
