"""The implementations raced against each other, behind one interface.

A contender turns a list of NumPy arrays into its own handle (``prepare``,
untimed; torch wraps the arrays in tensors sharing their memory) and implements
the operations it has on that handle::

    grad_norm(h) -> float            clip_grad_norm_(h, max_norm) -> float
    all_finite(h) -> bool            clip_grad_value_(h, clip_value) -> None
    accumulate(h) -> None            (one micro-batch added into buffers the handle owns)

``ops`` lists the operations a contender has. Every implementation writes into
the same NumPy memory, so the suite can check and restore the data whoever ran.
"""

import math

import numpy as np

import gradclip

OPS = ("grad_norm", "all_finite", "clip_grad_norm_", "clip_grad_value_", "accumulate")
WRITING_OPS = ("clip_grad_norm_", "clip_grad_value_")
EPS = 1e-6
"""The ``eps`` of ``max_norm / (total + eps)``, as in gradclip and torch."""


def accumulator_dtype(dtype):
    """The buffers' dtype of an accumulation: float32 for half precision, else the grads'."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


class GradClip:
    """The library under test. Its handle is ``(arrays, accumulator)``; the
    accumulator (a window that never closes, so every timed ``step`` adds into
    its buffers) carries over to fresh arrays of the same workload."""

    name = "gradclip"
    ops = OPS

    def prepare(self, arrays, previous=None):
        if previous is None:
            accumulator = gradclip.GradAccumulator(2**62, copy_result=False)
            accumulator.step(arrays)  # the first micro-batch of a window only copies
        else:
            accumulator = previous[1]
        return arrays, accumulator

    def grad_norm(self, handle):
        return gradclip.grad_norm(handle[0])

    def all_finite(self, handle):
        return gradclip.all_finite(handle[0])

    def clip_grad_norm_(self, handle, max_norm):
        return gradclip.clip_grad_norm_(handle[0], max_norm, eps=EPS)

    def clip_grad_value_(self, handle, clip_value):
        gradclip.clip_grad_value_(handle[0], clip_value)

    def accumulate(self, handle):
        handle[1].step(handle[0])


class NumPy:
    """The fastest plain-NumPy formulation found, everything inside the timed call.

    Reductions: leaves of at least ``OWN_PASS_MIN`` elements are reduced one by
    one (BLAS ``dot`` on a view, strided or not, for float32/float64; half
    formats are widened to float32 in L2-sized chunks, since NumPy's own half
    ``dot`` accumulates in the half format and overflows); all smaller leaves
    are joined by one ``np.concatenate(..., axis=None)`` and reduced at once,
    which beats a Python loop over thousands of leaves several times over.
    Updates are per leaf and in place: ``g *= coef``, ``np.clip(g, -c, c, out=g)``,
    ``np.add(buf, g, out=buf)``. Per-leaf sums are added in float64. The handle is
    ``(arrays, buffers)``, the buffers carrying over to fresh arrays.
    """

    name = "numpy"
    ops = OPS
    OWN_PASS_MIN = 1 << 16
    WIDEN_CHUNK = 1 << 16

    def prepare(self, arrays, previous=None):
        if previous is None:
            buffers = [g.astype(accumulator_dtype(g.dtype)) for g in arrays]
        else:
            buffers = previous[1]
        return arrays, buffers

    def _split(self, arrays):
        """(large leaves as 1-d views, the small ones joined into one array or None)."""
        large = [g if g.ndim == 1 else g.ravel(order="K") for g in arrays if g.size >= self.OWN_PASS_MIN]
        small = [g for g in arrays if g.size < self.OWN_PASS_MIN]
        return large, np.concatenate(small, axis=None) if small else None

    def _sum_of_squares(self, flat):
        if flat.dtype.itemsize >= 4:
            return float(np.dot(flat, flat))
        total = 0.0
        for start in range(0, flat.size, self.WIDEN_CHUNK):
            wide = flat[start : start + self.WIDEN_CHUNK].astype(np.float32)
            total += float(np.dot(wide, wide))
        return total

    def grad_norm(self, handle):
        large, joined = self._split(handle[0])
        total = sum(self._sum_of_squares(g) for g in large)
        if joined is not None:
            total += self._sum_of_squares(joined)
        return math.sqrt(total)

    def all_finite(self, handle):
        large, joined = self._split(handle[0])
        return all(np.isfinite(g).all() for g in large) and (joined is None or bool(np.isfinite(joined).all()))

    def clip_grad_norm_(self, handle, max_norm):
        total = self.grad_norm(handle)
        if total > max_norm:
            coef = max_norm / (total + EPS)
            for g in handle[0]:
                g *= coef
        return total

    def clip_grad_value_(self, handle, clip_value):
        for g in handle[0]:
            np.clip(g, -clip_value, clip_value, out=g)

    def accumulate(self, handle):
        for buffer, g in zip(handle[1], handle[0]):
            np.add(buffer, g, out=buffer)


TORCH_BFLOAT16_NOTE = (
    "torch on bfloat16: torch.from_numpy knows no ml_dtypes.bfloat16, so the arrays are passed as int16 views "
    "reinterpreted with .view(torch.bfloat16): the same memory, no copy."
)


class Torch:
    """``torch.nn.utils`` on tensors sharing the arrays' memory (``torch.from_numpy``).

    Each array becomes the ``.grad`` of a leaf tensor (``torch.empty``, never
    touched), which is what ``clip_grad_norm_`` and ``clip_grad_value_`` take;
    ``get_total_norm`` takes the gradient tensors themselves. bfloat16 arrays go
    through an int16 view (``from_numpy`` knows no ml_dtypes) reinterpreted as
    ``torch.bfloat16``: the same memory, no copy. torch has no all-finite check
    in ``torch.nn.utils``, so that operation is absent.
    """

    ops = ("grad_norm", "clip_grad_norm_", "clip_grad_value_")

    def __init__(self, torch, foreach):
        self.torch = torch
        self.foreach = foreach
        self.name = f"torch foreach={foreach}"
        nn_utils = torch.nn.utils
        self._get_total_norm = nn_utils.get_total_norm
        self._clip_grad_norm_ = nn_utils.clip_grad_norm_
        self._clip_grad_value_ = nn_utils.clip_grad_value_

    def _tensor(self, array):
        if array.dtype.name == "bfloat16":
            return self.torch.from_numpy(array.view(np.int16)).view(self.torch.bfloat16)
        return self.torch.from_numpy(array)

    def prepare(self, arrays, previous=None):
        """``(parameters, gradient tensors)``; the parameters of ``previous`` are reused."""
        grads = [self._tensor(a) for a in arrays]
        if previous is None:
            params = [self.torch.empty(g.shape, dtype=g.dtype, requires_grad=True) for g in grads]
        else:
            params = previous[0]
        for param, grad in zip(params, grads):
            param.grad = grad
        return params, grads

    def grad_norm(self, handle):
        return float(self._get_total_norm(handle[1], 2.0, foreach=self.foreach))

    def clip_grad_norm_(self, handle, max_norm):
        return float(self._clip_grad_norm_(handle[0], max_norm, foreach=self.foreach))

    def clip_grad_value_(self, handle, clip_value):
        self._clip_grad_value_(handle[0], clip_value, foreach=self.foreach)


class GradClipTorch(Torch):
    """``gradclip.torch``'s drop-ins on the same parameters and tensors as `Torch`.

    Each call reads the tensors as NumPy views (``.grad`` of every parameter, then
    the zero-copy view of each tensor) inside the timed region, and returns the norm
    as a tensor, as a PyTorch user would call it.
    """

    def __init__(self, torch):
        import gradclip.torch as drop_ins

        super().__init__(torch, foreach=None)
        self.name = "gradclip.torch"
        self._get_total_norm = drop_ins.get_total_norm
        self._clip_grad_norm_ = drop_ins.clip_grad_norm_
        self._clip_grad_value_ = drop_ins.clip_grad_value_


def all_contenders():
    """``(contenders, note)``: the note says why torch is missing, else None."""
    contenders = [GradClip(), NumPy()]
    try:
        import torch
    except ImportError as error:
        return contenders, f"torch not importable ({error}): the torch contenders are skipped"
    return contenders + [GradClipTorch(torch), Torch(torch, foreach=True), Torch(torch, foreach=False)], None
