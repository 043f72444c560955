"""Shared test helpers: dtypes, shapes, layouts, data makers and bit-exact comparisons.

Never imports gradclip (the tests do); never computes expected results (reference.py
does).
"""

from __future__ import annotations

import contextlib
import math
import concurrent.futures
import re

import numpy as np
import pytest

from reference import BFLOAT16, is_complex, ref_dense_sq_norms, ref_nonfinite_mask, ref_zero_nonfinite, widen

# --------------------------------------------------------------------------- dtypes

DTYPES = [
    np.dtype(np.float16),
    BFLOAT16,
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.complex64),
    np.dtype(np.complex128),
]
REAL_DTYPES = [d for d in DTYPES if not is_complex(d)]
COMPLEX_DTYPES = [d for d in DTYPES if is_complex(d)]


def dtype_id(d) -> str:
    return np.dtype(d).name


dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
real_dtypes = pytest.mark.parametrize("dtype", REAL_DTYPES, ids=dtype_id)

NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf]
norm_types = pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p:g}")

RTOL = 1e-12  # SPEC §4: float64 accumulation, relative error <= 1e-12

# --------------------------------------------------------------------------- shapes

SHAPES = [(), (0,), (1,), (17,), (3, 5), (4, 3, 7), (100_003,)]
SMALL_SHAPES = [s for s in SHAPES if math.prod(s) < 1000]


def shape_id(s) -> str:
    return "x".join(map(str, s)) if s else "0d"


shapes = pytest.mark.parametrize("shape", SHAPES, ids=shape_id)

# --------------------------------------------------------------------------- layouts
#
# A layout turns a wanted view shape S into (base shape, base order, view function).
# The base array owns the memory; view(base) is the leaf handed to gradclip, with
# view(base).shape == S. Applying the same view function to a copy of the base lets a
# test build the whole expected base, gaps included.


def _c(shape):
    return shape, "C", lambda b: b[...]


def _f(shape):
    return shape, "F", lambda b: b[...]


def _transposed(shape):
    return tuple(reversed(shape)), "C", lambda b: b.T


def _step3(shape):  # x[::3] on the first axis
    if not shape:
        return (3,), "C", lambda b: b[1, ...]
    return (3 * shape[0],) + tuple(shape[1:]), "C", lambda b: b[::3]


def _step_all(shape):  # x[::2, 1::3, ::2, ...]
    if not shape:
        return (5,), "C", lambda b: b[2, ...]
    base = tuple(2 * s if i % 2 == 0 else 3 * s + 1 for i, s in enumerate(shape))
    sl = tuple(slice(None, None, 2) if i % 2 == 0 else slice(1, None, 3) for i in range(len(shape)))
    return base, "C", lambda b: b[sl]


def _negative(shape):  # x[::-1, ::-1, ...]
    if not shape:
        return (2,), "C", lambda b: b[-1, ...]
    sl = tuple(slice(None, None, -1) for _ in shape)
    return shape, "C", lambda b: b[sl]


def _negative_step(shape):  # x[::-2, ::-1, ...]
    if not shape:
        return (4,), "C", lambda b: b[-1, ...]
    base = (2 * shape[0],) + tuple(shape[1:])
    sl = (slice(None, None, -2),) + tuple(slice(None, None, -1) for _ in shape[1:])
    return base, "C", lambda b: b[sl]


def _transposed_stepped(shape):
    """Steps (one negative) on every axis, then a rotation of the axes."""
    n = len(shape)
    if n == 0:
        return (3,), "C", lambda b: b[2, ...]
    perm = (n - 1,) + tuple(range(n - 1))  # view axis j is pre axis perm[j]
    pre = [0] * n
    for j, s in enumerate(shape):
        pre[perm[j]] = s
    slices, base = [], []
    for i, s in enumerate(pre):
        if i == 1:
            slices.append(slice(None, None, -2))
            base.append(2 * s)
        else:
            slices.append(slice(1, None, 2))
            base.append(2 * s + 1)
    sl = tuple(slices)
    return tuple(base), "C", lambda b: b[sl].transpose(perm)


LAYOUTS = {
    "C": _c,
    "F": _f,
    "T": _transposed,
    "step3": _step3,
    "step_all": _step_all,
    "neg": _negative,
    "neg_step": _negative_step,
    "T_step": _transposed_stepped,
}
layouts = pytest.mark.parametrize("layout", list(LAYOUTS))


# --------------------------------------------------------------------------- data


def random_values(shape, dtype, rng, scale=1.0) -> np.ndarray:
    """Random normal values (times ``scale``) of ``dtype``, C-ordered."""
    dtype = np.dtype(dtype)
    v = rng.standard_normal(shape) * scale
    if is_complex(dtype):
        v = v + 1j * rng.standard_normal(shape) * scale
    with np.errstate(all="ignore"):
        return np.asarray(v).astype(dtype)


class Strided:
    """A leaf ``view`` living inside ``base``, both filled with random values."""

    def __init__(self, layout, shape, dtype, rng, scale=1.0):
        self.layout = layout
        base_shape, order, self.view_fn = LAYOUTS[layout](tuple(shape))
        self.base = np.empty(base_shape, dtype=np.dtype(dtype), order=order)
        self.base[...] = random_values(base_shape, dtype, rng, scale)
        self.view = self.view_fn(self.base)
        assert self.view.shape == tuple(shape)
        assert self.view.size == 0 or np.shares_memory(self.view, self.base)
        self.snapshot()

    def __repr__(self):
        return f"Strided({self.layout!r}, {self.view.shape}, {self.view.dtype.name}, view={self.view_before!r})"

    def snapshot(self):
        """Take the 'before' copies again (after the test changed the data itself)."""
        self.before = self.base.copy()
        self.view_before = self.view.copy()

    def poke(self, index, value):
        """Set one element of the view (e.g. a NaN) and take the snapshots again."""
        with np.errstate(all="ignore"):
            self.view[index] = value
        self.snapshot()

    def outside_mask(self):
        """Boolean array shaped like the base: True where the base is not in the view."""
        outside = np.ones(self.base.shape, dtype=bool)
        self.view_fn(outside)[...] = False
        return outside

    def last_index(self):
        return np.unravel_index(self.view.size - 1, self.view.shape)

    def expected_base(self, new_view_values) -> np.ndarray:
        """The base as it must be after only the view's elements became ``new``."""
        exp = self.before.copy()
        self.view_fn(exp)[...] = new_view_values
        return exp

    def assert_untouched(self):
        assert_same_bits(self.base, self.before, what="base (untouched)")


# --------------------------------------------------------------------------- comparisons


def _uint_for(itemsize):
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]


def _real_parts(a):
    if is_complex(a.dtype):
        return [("real", a.real), ("imag", a.imag)]
    return [("", a)]


def assert_same_bits(actual, expected, what="array", nan_payload=False):
    """Bit-for-bit equality (signed zeros included); two NaNs compare equal unless
    ``nan_payload``. Shapes and dtypes must match."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.dtype.kind == "O":
        same = all(x is y for x, y in zip(actual.ravel().tolist(), expected.ravel().tolist()))
        assert same, f"{what}: object elements differ"
        return
    if actual.dtype not in DTYPES:  # ints, bools, long double...: plain bytes
        assert actual.tobytes() == expected.tobytes(), f"{what}: bytes differ"
        return
    for name, pa in _real_parts(actual):
        pe = dict(_real_parts(expected))[name]
        ua = np.ascontiguousarray(pa).view(_uint_for(pa.dtype.itemsize))
        ue = np.ascontiguousarray(pe).view(_uint_for(pe.dtype.itemsize))
        bad = ua != ue
        if not nan_payload:
            with np.errstate(all="ignore"):
                both_nan = np.isnan(pa.astype(np.float64)) & np.isnan(pe.astype(np.float64))
            bad &= ~both_nan
        if bad.any():
            fa, fe = pa.reshape(-1), pe.reshape(-1)
            fua, fue = ua.reshape(-1), ue.reshape(-1)
            rows = [
                f"  at {tuple(int(i) for i in np.unravel_index(j, bad.shape))}: got {fa[j]!r} "
                f"(0x{int(fua[j]):x}) expected {fe[j]!r} (0x{int(fue[j]):x})"
                for j in np.flatnonzero(bad)[:5]
            ]
            raise AssertionError(
                f"{what}{' ' + name if name else ''}: {int(bad.sum())} of {bad.size} elements "
                "differ bitwise\n" + "\n".join(rows)
            )


def assert_norm_close(actual, expected, rtol=RTOL, what="norm"):
    actual = float(actual)
    expected = float(expected)
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: got {actual!r}, expected NaN"
    elif math.isinf(expected) or expected == 0.0:
        assert actual == expected, f"{what}: got {actual!r}, expected {expected!r}"
    else:
        err = abs(actual - expected) / expected
        assert err <= rtol, f"{what}: got {actual!r}, expected {expected!r} (rel err {err:.3g})"


def assert_norms_close(actual, expected, rtol=RTOL, what="norms"):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    for i, (a, e) in enumerate(zip(actual.tolist(), expected.tolist())):
        assert_norm_close(a, e, rtol, what=f"{what}[{i}]")


def assert_dense_close(got, a, g, bias, rtol=RTOL, other=None):
    """``got`` (dense_sq_norms' result, on the host) against the float64 reference, to
    float64 rounding of sums whose terms may cancel: within ``rtol`` of
    ``(Σ_t ‖a_t‖‖g_t‖)² (+ (Σ_t ‖g_t‖)²)``, a bound on the sum of the terms' magnitudes,
    per example. ``other``: another computation of the same sums (e.g. the CPU's), to
    compare with instead; both lie within ``rtol`` of the exact value, so within twice it
    of each other."""
    a, g = widen(a), widen(g)
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    a_norms, g_norms = np.linalg.norm(a, axis=2), np.linalg.norm(g, axis=2)
    scale = (a_norms * g_norms).sum(axis=1) ** 2 + (g_norms.sum(axis=1) ** 2 if bias else 0.0)
    expected = ref_dense_sq_norms(a, g, bias) if other is None else other
    rtol = rtol if other is None else 2 * rtol
    assert got.dtype == np.float64 and got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= rtol * scale), (got, expected, scale)


def dense_inputs(rng, shape, dtype=np.float32, g_dtype=None):
    """A dense layer's activations and output gradients, standard normal: ``shape`` is
    ``(B, T, d_in, d_out)``, T None for no sequence axis; ``g_dtype`` defaults to ``dtype``."""
    B, T, d_in, d_out = shape
    lead = (B,) if T is None else (B, T)
    a = rng.standard_normal((*lead, d_in)).astype(dtype)
    g = rng.standard_normal((*lead, d_out)).astype(g_dtype or dtype)
    return a, g


def assert_zeroed(actual, before, what="leaf"):
    """The result of zero_nonfinite_ on a real leaf: where ``before`` was NaN/inf the
    value is now 0 (SPEC says "0": either sign of zero), every other element keeps its
    bits."""
    actual = np.asarray(actual)
    mask = ref_nonfinite_mask(before)
    assert (actual[mask].astype(np.float64) == 0).all(), f"{what}: non-finite values not zeroed"
    expected = ref_zero_nonfinite(before)
    got = actual.copy()
    got[mask] = expected[mask]
    assert_same_bits(got, expected, what=what)


# --------------------------------------------------------------------------- trees


def tree_leaves(tree):
    """Depth-first leaves of a dict/list/tuple tree, dicts in insertion order, None
    skipped (SPEC §2)."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in tree_leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in tree_leaves(v)]
    return [tree]


def assert_same_structure(result, template):
    """Same container types, dict keys (in order), lengths and None positions."""
    if template is None:
        assert result is None, f"expected None, got {type(result).__name__}"
    elif isinstance(template, dict):
        assert type(result) is type(template), f"{type(result)} != {type(template)}"
        assert list(result.keys()) == list(template.keys())
        for k in template:
            assert_same_structure(result[k], template[k])
    elif isinstance(template, (list, tuple)):
        assert type(result) is type(template), f"{type(result)} != {type(template)}"
        assert len(result) == len(template)
        for r, t in zip(result, template):
            assert_same_structure(r, t)
    else:
        assert isinstance(result, np.ndarray), f"leaf is a {type(result).__name__}"
        t = np.asarray(template)
        assert result.shape == t.shape and result.dtype == t.dtype


class Frozen:
    """Snapshot of the bytes of arrays (and of their bases) to prove nothing changed."""

    def __init__(self, *arrays):
        self.items = []
        for a in arrays:
            if isinstance(a, np.ndarray):
                self.items.append((a, a.copy()))
                if isinstance(a.base, np.ndarray):
                    self.items.append((a.base, a.base.copy()))

    def check(self):
        for a, before in self.items:
            assert_same_bits(a, before, what="leaf after the call", nan_payload=True)


@contextlib.contextmanager
def raises_with(exc, *fragments, regex=()):
    """pytest.raises plus: the message contains every fragment (and matches every
    regex)."""
    with pytest.raises(exc) as info:
        yield info
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in error message {msg!r}"
    for r in regex:
        assert re.search(r, msg), f"/{r}/ does not match error message {msg!r}"


# --------------------------------------------------------------------------- background work
# The slowest checks run fresh interpreters that compile for minutes on one core each (the
# PTX of every CUDA kernel, Numba's cache histories). They start as soon as they are
# collected (`pytest_collection_finish` in conftest.py calls each test module's
# ``start_in_background``) and run one at a time beside the rest of the suite, which
# leaves a core idle most of the time.

_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradclip-background")
_JOBS = {}


def in_background(key, function, *args):
    """The future of ``function(*args)`` on the background thread, submitted by the first
    caller for ``key`` (at collection, or by the test itself when run alone)."""
    if key not in _JOBS:
        _JOBS[key] = _BACKGROUND.submit(function, *args)
    return _JOBS[key]


def stop_background():
    """Drop background jobs not started yet (an interrupted or failing session)."""
    _BACKGROUND.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- device arrays
# The GPU tests run on numba-cuda's simulator in CI and on a real GPU in ``make gpu-check``
# (NUMBA_ENABLE_CUDASIM=0): these helpers make and read device arrays on either.


def simulated():
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def device_array_type():
    """The class of Numba's device arrays here (the simulator's, or the driver's)."""
    if simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray


def device_view(device_base, host_base, host_view):
    """The view of ``device_base`` (a device copy of ``host_base``) that ``host_view`` is of
    ``host_base``: the same shape, strides and offset."""
    from numba import cuda

    offset = host_view.__array_interface__["data"][0] - host_base.__array_interface__["data"][0]
    if simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        memory = device_base._ary.reshape(-1, order="A").view(np.uint8)
        return FakeCUDAArray(np.ndarray(host_view.shape, host_view.dtype, buffer=memory, offset=offset, strides=host_view.strides))
    start = device_base.__cuda_array_interface__["data"][0] + offset
    bits = np.dtype(np.int16) if host_view.dtype.name == "bfloat16" else host_view.dtype  # Numba knows no bfloat16
    interface = {
        "shape": host_view.shape,
        "strides": host_view.strides,
        "typestr": bits.str,
        "data": (start, False),
        "version": 3,
    }
    view = cuda.from_cuda_array_interface(interface, owner=device_base, sync=False)
    return view if host_view.dtype.name != "bfloat16" else _with_dtype(view, host_view.dtype)


def _with_dtype(view, dtype):
    """A device view whose ``dtype`` is ``dtype`` (Numba's interface knows no bfloat16 name)."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(view.shape, view.strides, dtype, gpu_data=view.gpu_data)


def to_device(host_array):
    """A device copy of ``host_array`` (bfloat16 kept: Numba's copies know no bfloat16, so
    the bits travel as int16 on a GPU)."""
    from numba import cuda

    if simulated() or host_array.dtype.name != "bfloat16":
        return cuda.to_device(host_array)
    return _with_dtype(cuda.to_device(host_array.view(np.int16)), host_array.dtype)


def refresh(device_array, host_array):
    """Copy ``host_array`` over ``device_array`` (same shape and dtype, contiguous)."""
    if not simulated() and host_array.dtype.name == "bfloat16":
        device_array, host_array = _with_dtype(device_array, np.dtype(np.int16)), host_array.view(np.int16)
    device_array.copy_to_device(host_array)


def to_host(x):
    """A device array's values on the host (a NumPy array, bfloat16 kept), any strides.

    On a GPU, the bytes the array spans are copied as they lie (Numba copies no
    negative strides and no bfloat16) and viewed with its shape and strides."""
    from numba import cuda

    assert isinstance(x, device_array_type()), f"expected a device array, got {type(x).__name__}"
    if simulated():
        return x.copy_to_host()
    if x.size == 0:
        return np.empty(x.shape, x.dtype)
    low = sum((n - 1) * s for n, s in zip(x.shape, x.strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(x.shape, x.strides) if s > 0) + x.dtype.itemsize
    start = x.__cuda_array_interface__["data"][0] + low
    interface = {"shape": (high - low,), "strides": None, "typestr": "|u1", "data": (start, False), "version": 3}
    raw = cuda.from_cuda_array_interface(interface, owner=x, sync=False).copy_to_host()
    return np.ndarray(x.shape, x.dtype, buffer=raw, offset=-low, strides=x.strides)


class OnDevice:
    """A `Strided` leaf whose base lives on the (simulated) device; ``view`` is the device view."""

    def __init__(self, layout, shape, dtype, rng, scale=1.0):
        self.host = Strided(layout, shape, dtype, rng, scale)
        self.base = to_device(self.host.base)
        self.view = device_view(self.base, self.host.base, self.host.view)
        assert isinstance(self.view, device_array_type())

    def poke(self, value, index=None):
        """Set one element of the view (the last by default), here and on the device."""
        index = self.host.last_index() if index is None else index
        self.host.poke(index, value)
        refresh(self.base, self.host.base)

    def values(self):
        return self.host.view_fn(to_host(self.base))

    def assert_base(self, expected_view, what="leaf"):
        """The view holds ``expected_view``, and the memory around it is untouched."""
        assert_same_bits(to_host(self.base), self.host.expected_base(expected_view), what=what)


class ForeignArray:
    """Only ``__cuda_array_interface__``, pointing at a device array's memory."""

    def __init__(self, device_array, readonly=False):
        from gradclip import _cuda

        self._keep = device_array
        self.__cuda_array_interface__ = {
            "shape": device_array.shape,
            "strides": device_array.strides,
            "typestr": device_array.dtype.str,
            "data": (_cuda._interface(device_array)["data"][0], readonly),
            "version": 3,
        }


# --------------------------------------------------------------------------- rounding once


def assert_rounded_once(actual, exact, scale, terms, what="sum"):
    """``actual`` (of a leaf dtype) is ``exact`` (float64 / complex128) rounded once to its
    dtype, up to float64 accumulation error: it lies between the roundings of ``exact -
    tol`` and ``exact + tol``, ``tol = terms * 2**-52 * scale`` (``scale``: the sum of the
    terms' magnitudes, per element). A float32 sum, or a second rounding, lands outside."""
    from reference import round_to

    actual = np.asarray(actual)
    tol = terms * 2.0**-52 * np.asarray(scale, dtype=np.float64)
    parts = [(np.real, "real"), (np.imag, "imag")] if is_complex(actual.dtype) else [(lambda a: a, "")]
    for part, name in parts:
        got = np.asarray(part(actual)).astype(np.float64)
        x = np.asarray(part(exact), dtype=np.float64)
        real = np.dtype(part(np.zeros(1, actual.dtype)).dtype)
        low = round_to(x - tol, real).astype(np.float64)
        high = round_to(x + tol, real).astype(np.float64)
        bad = ~((low <= got) & (got <= high))
        if bad.any():
            j = np.flatnonzero(bad.ravel())[:5]
            raise AssertionError(
                f"{what}{' ' + name if name else ''}: {int(bad.sum())} of {bad.size} elements not rounded once "
                f"from the float64 sum; got {got.ravel()[j]}, exact {x.ravel()[j]}"
            )
