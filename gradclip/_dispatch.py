"""The one place that inspects array types and picks a kernel family (SPEC §2).

- ``numpy.ndarray`` -> CPU kernels, as it is.
- NumPy scalars -> read-only 0-d arrays.
- ``__cuda_array_interface__`` / ``__cuda_ndarray__`` (CuPy, Numba device arrays, the
  CUDA simulator's) -> CUDA kernels (``_cuda``, imported only then).
- ``__dlpack__`` producers (torch, JAX) in CPU memory -> a zero-copy NumPy view; in
  CUDA memory -> a zero-copy CuPy array.

Frameworks are recognised without importing them: a leaf can only be a
``torch.Tensor`` (or a ``jax.Array``) if ``torch`` (``jax``) is in ``sys.modules``.
The out-of-place functions hand their NumPy results back through `like`, as
leaves of the caller's framework.
"""

import functools
import sys
from collections.abc import Sequence

import numpy as np

from . import _checks

_DLPACK_CPU = 1
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_CUDA_TYPES = set()
"""Array types known to live in CUDA memory (CuPy's, Numba's), found by `on_cuda`."""


def on_cuda(leaf):
    """Whether ``leaf`` is a CUDA array: a torch tensor's own flag, else one attribute check
    (its DLPack device for others)."""
    kind = type(leaf)
    if kind is np.ndarray:
        return False
    if kind in _CUDA_TYPES:
        return True
    torch = _torch_of(leaf)
    if torch is not None:  # before the interface, which a tensor requiring grad refuses
        return leaf.is_cuda and _torch_without_memory(leaf) is None  # a sparse one: `as_cpu_array` names it
    if hasattr(leaf, "__cuda_ndarray__") or hasattr(leaf, "__cuda_array_interface__"):
        if kind.__module__.startswith(("cupy", "numba")):
            _CUDA_TYPES.add(kind)  # every array of these types is a CUDA array (CuPy makes the interface per call)
        return True
    device = getattr(leaf, "__dlpack_device__", None)
    return device is not None and hasattr(leaf, "__dlpack__") and int(device()[0]) in _DLPACK_CUDA


def as_cuda_leaf(leaf, where):
    """A ``_cuda.DeviceLeaf`` for a leaf where `on_cuda` holds (imports the CUDA backend).

    torch tensors, CuPy arrays, Numba device arrays and other ``__cuda_array_interface__``
    producers are described as they are; other DLPack producers (JAX) through CuPy.
    """
    from . import _cuda

    if _torch_of(leaf) is not None or hasattr(leaf, "__cuda_array_interface__") or hasattr(leaf, "__cuda_ndarray__"):
        return _cuda.describe(leaf, where)
    try:
        import cupy
    except ImportError as error:
        raise _checks.cuda_needs_cupy(where, leaf, error) from None
    try:
        wrapped = cupy.from_dlpack(leaf)
    except (BufferError, TypeError, ValueError, RuntimeError) as error:
        raise _checks.dlpack_failed(where, leaf, error) from None
    return _cuda.describe(wrapped, where)


def as_cpu_array(leaf, where):
    """``leaf`` as a NumPy array sharing its memory; ``where()`` names it in errors."""
    if isinstance(leaf, np.ndarray):
        if type(leaf) is not np.ndarray and _is_masked(leaf):
            raise _checks.masked_array(where)
        return leaf
    if isinstance(leaf, np.generic):
        scalar = np.array(leaf)
        scalar.flags.writeable = False  # a NumPy scalar is immutable
        return scalar
    what = _torch_without_memory(leaf)
    if what is not None:
        raise _checks.tensor_without_memory(where, what)
    if on_cuda(leaf):
        raise _checks.cpu_only(where, leaf, "this function")
    if hasattr(leaf, "__dlpack__") and hasattr(leaf, "__dlpack_device__"):
        if int(leaf.__dlpack_device__()[0]) != _DLPACK_CPU:
            raise _checks.unsupported_device(where, leaf)
        try:
            torch = _torch_of(leaf)
            if torch is not None:
                return _torch_view(torch, leaf, where)
            if _jax_of(leaf) is not None:
                return _jax_view(leaf)
            return np.from_dlpack(leaf)
        except (BufferError, TypeError, ValueError, RuntimeError) as error:
            raise _checks.dlpack_failed(where, leaf, error) from None
    if _jax_of(leaf) is not None:  # a tracer: a jax.Array with no memory to view
        raise _checks.jax_traced(where, leaf)
    raise _checks.not_an_array(where, leaf)


def torch_cpu_headers(leaves, writes):
    """``(data, size, itemsize, dtypes, code, views, contiguous)`` of ``leaves`` if they
    are all distinct CPU torch tensors with strided memory, of supported dtypes (none
    requiring grad, if ``writes``), else None.

    The bulk path for the common PyTorch call (a model's gradients): addresses and
    sizes are read from torch (a few hundred nanoseconds a tensor), ``dtypes[code[i]]``
    is leaf ``i``'s NumPy dtype, and ``views`` makes each NumPy view only when asked
    for (``tensor.numpy()`` costs microseconds). ``data`` and ``size`` describe the
    tensors' memory only if ``contiguous`` (all are); otherwise the caller walks the
    views. None means "not that case": the general path (`as_cpu_array`, leaf by
    leaf) then decides, and names errors.
    """
    torch = sys.modules.get("torch")
    if torch is None or not leaves:
        return None
    known = _torch_dtypes(torch)
    if known is None:
        return None
    tensor_type = torch.Tensor
    data, size, code = [], [], []
    codes = {}
    contiguous = True
    try:
        for leaf in leaves:
            if not (isinstance(leaf, tensor_type) and leaf.is_cpu):
                return None
            contiguous = leaf.is_contiguous() and contiguous  # raises for a sparse tensor
            if writes and leaf.requires_grad:
                return None
            dtype = leaf.dtype
            c = codes.get(dtype)
            if c is None:
                if dtype not in known:
                    return None
                c = codes[dtype] = len(codes)
            if dtype.is_complex and (leaf.is_conj() or leaf.is_neg()):
                return None  # the lazy conjugate / negative bits are not in the memory
            data.append(leaf.data_ptr())
            size.append(leaf.numel())
            code.append(c)
    except RuntimeError:  # e.g. a sparse tensor has no strides
        return None
    if len(set(map(id, leaves))) != len(leaves):  # a repeated tensor: the general path counts it once
        return None
    data, size, code = (np.array(column, dtype=np.int64) for column in (data, size, code))
    dtypes = [known[dtype] for dtype in codes]
    itemsize = np.array([d.itemsize for d in dtypes])[code]
    if np.any(data % itemsize):  # e.g. torch.frombuffer at an odd offset
        return None
    return data, size, itemsize, dtypes, code, TensorViews(leaves), contiguous


class TensorViews(Sequence):
    """Zero-copy NumPy views of CPU tensors, each made when first asked for."""

    def __init__(self, tensors):
        self._tensors = list(tensors)
        self._views = [None] * len(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def __getitem__(self, index):
        view = self._views[index]
        if view is None:
            tensor = self._tensors[index]
            view = self._views[index] = _torch_view(sys.modules["torch"], tensor, None)
        return view


@functools.cache
def _torch_dtypes(torch):
    """torch dtype -> NumPy dtype for every dtype gradclip supports, or None without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return {
        torch.float16: np.dtype(np.float16),
        torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
        torch.float32: np.dtype(np.float32),
        torch.float64: np.dtype(np.float64),
        torch.complex64: np.dtype(np.complex64),
        torch.complex128: np.dtype(np.complex128),
    }


def requires_grad(leaf):
    """Whether ``leaf`` is a torch tensor that requires grad outside ``torch.no_grad()``:
    where torch refuses in-place writes into a leaf tensor, which would bypass autograd."""
    torch = _torch_of(leaf)
    return torch is not None and leaf.requires_grad and torch.is_grad_enabled()


def _torch_without_memory(leaf):
    """What a torch tensor without strided memory to view is ("a sparse torch tensor
    (layout torch.sparse_coo)", "a torch tensor on the meta device"), or None for any
    other leaf."""
    torch = _torch_of(leaf)
    if torch is None:
        return None
    if leaf.layout != torch.strided:
        return f"a sparse torch tensor (layout {leaf.layout})"
    return "a torch tensor on the meta device" if leaf.is_meta else None


def _is_masked(array):
    ma = sys.modules.get("numpy.ma")  # a masked array can only exist once numpy.ma is imported
    return ma is not None and isinstance(array, ma.MaskedArray)


def immutable_kind(leaf):
    """What makes ``leaf`` read-only by nature, for the message, or None."""
    return "a JAX array (jax.Array is immutable)" if _jax_of(leaf) is not None else None


def like(original, array, owned=True):
    """``array`` (a result) as a leaf of the caller's kind, given its input leaf ``original``.

    torch in -> a ``torch.Tensor`` sharing ``array``'s memory (a CUDA one for a GPU
    result); JAX in -> a ``jax.Array`` on the original's devices; a NumPy scalar -> a
    NumPy scalar; an ``np.matrix`` -> an ``np.matrix`` view (the type is all a matrix
    adds, and it decides what ``*`` means); anything else -> ``array`` itself. The dtype
    is ``array``'s (bfloat16 included).
    ``owned``: nothing else will write ``array``, so a JAX array may alias it;
    otherwise (a buffer gradclip reuses) JAX gets a copy, as its arrays never change.
    """
    if isinstance(original, np.ndarray):
        return array.view(np.matrix) if isinstance(original, np.matrix) else array
    if isinstance(original, np.generic):
        return array[()]
    torch = _torch_of(original)
    if torch is not None:
        if not isinstance(array, np.ndarray):  # a GPU result: a tensor over the same device memory
            return torch.as_tensor(array, device=original.device)
        if array.dtype.name == "bfloat16":  # torch.from_numpy knows no ml_dtypes: the same bits as int16
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    jax = _jax_of(original)
    if jax is not None:
        # device_put aliases aligned NumPy memory (may_alias=False does not stop it in jax 0.10)
        return jax.device_put(array if owned else array.copy(), original.sharding)
    return array


def _torch_of(leaf):
    """The torch module if ``leaf`` is a ``torch.Tensor``, else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(leaf, torch.Tensor) else None


def _jax_of(leaf):
    """The jax module if ``leaf`` is a ``jax.Array``, else None."""
    jax = sys.modules.get("jax")
    return jax if jax is not None and isinstance(leaf, getattr(jax, "Array", ())) else None


def _torch_view(torch, tensor, where):
    """A CPU tensor's memory as a writable NumPy array (any strides; bfloat16 as ml_dtypes')."""
    if tensor.requires_grad:
        tensor = tensor.detach()  # the same memory, outside autograd
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_bfloat16(where))
    return tensor.numpy()  # zero-copy, and cheaper per tensor than np.from_dlpack


def _jax_view(array):
    """A JAX CPU array's buffer as a read-only NumPy array (zero-copy for a single-device array)."""
    view = np.asarray(array)
    if view.flags.writeable:  # JAX marks its own views read-only; never write into its buffers
        view = view.view()
        view.flags.writeable = False
    return view


def _bfloat16(where):
    try:
        import ml_dtypes
    except ImportError:
        raise _checks.bfloat16_needs_ml_dtypes(where) from None
    return ml_dtypes.bfloat16
