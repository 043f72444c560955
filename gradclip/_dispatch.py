"""The one place that inspects array types and picks a kernel family (SPEC §2).

- ``numpy.ndarray`` -> CPU kernels, as it is.
- NumPy scalars -> read-only 0-d arrays.
- ``__cuda_array_interface__`` / ``__cuda_ndarray__`` (CuPy, Numba device arrays)
  -> CUDA, not available yet: a clear error.
- ``__dlpack__`` producers (torch, JAX) in CPU memory -> a zero-copy NumPy view.
"""

import numpy as np

from . import _checks

_DLPACK_CPU = 1


def as_cpu_array(leaf, where):
    """``leaf`` as a NumPy array sharing its memory; ``where()`` names it in errors."""
    if isinstance(leaf, np.ndarray):
        return leaf
    if isinstance(leaf, np.generic):
        scalar = np.array(leaf)
        scalar.flags.writeable = False  # a NumPy scalar is immutable
        return scalar
    if hasattr(leaf, "__cuda_array_interface__") or hasattr(leaf, "__cuda_ndarray__"):
        raise _checks.cuda_unavailable(where, leaf)
    if hasattr(leaf, "__dlpack__") and hasattr(leaf, "__dlpack_device__"):
        if int(leaf.__dlpack_device__()[0]) != _DLPACK_CPU:
            raise _checks.cuda_unavailable(where, leaf)
        try:
            return np.from_dlpack(leaf)
        except (BufferError, TypeError, ValueError, RuntimeError) as error:
            raise _checks.dlpack_failed(where, leaf, error) from None
    raise _checks.not_an_array(where, leaf)
