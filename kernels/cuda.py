"""CUDA kernels: ``@cuda.jit`` twins of ``kernels/cpu.py``, many leaves per launch.

Imported only when a GPU array arrives (``gradclip._cuda``); importing it compiles
nothing (kernels compile on their first launch, once per dtype).

Layout contract. The caller (``gradclip._cuda``) hands every launch up to ``SLOTS``
leaves of one dtype as a tuple of 1-d contiguous device views, each covering the
memory its leaf spans (its *extent*), plus a device table ``meta`` with one row
per leaf of the call: the leaf's size, its number of blocks, whether it takes the
peak pass (``SCALED``), and its walk — an
offset into its extent and ``(length, step)`` pairs, innermost axis first, all in
elements (steps are >= 0: negative strides are flipped, as on the CPU; only a leaf
walked in another leaf's order, for ``accumulate_cuda_``, has negative ones). Element
``k`` of the walk of leaf ``leaf`` is at ``_position(meta, leaf, k)`` of its view,
so contiguous, transposed, stepped and reversed leaves are read and written in
their own memory. Every view of a launch has the same type (1-d, contiguous,
one dtype), which makes the tuple homogeneous: indexed by ``blockIdx.y`` on the
device, and run as plain Python by the CUDA simulator.

Launch shape: grid ``(blocks, leaves)``, ``THREADS_PER_BLOCK`` threads. Leaf
``leaf`` is split over ``meta[leaf, NBLOCKS]`` blocks (a number that depends on
its size only) in a grid-stride loop; the blocks beyond it return at once.

Reductions accumulate in float64 per thread, fold the block in shared memory in
a fixed tree, and write one float64 partial per block into ``partials[leaf,
block]``; ``finish_cuda`` (one block) folds the partials of every leaf in block
order, then the leaf norms into the total. No float atomics: results are
bit-identical from run to run.

Element types ("codecs"): float16, float32 and float64 are read natively and
widened exactly to float64; complex64 and complex128 likewise to complex128; bfloat16 travels as ``int16`` bits, decoded
arithmetically. Writes round once, to nearest-even: the native float conversion
for float16 / float32 / complex64, an integer rounding for bfloat16 (straight
from float64, so there is no double rounding). Every kernel exists once per
codec, in `FLOAT`, `COMPLEX` and `BFLOAT16` (see `for_dtype`). No fastmath:
NaN and inf must be seen.
"""

import functools
import math

import numpy as np
from numba import cuda

THREADS_PER_BLOCK = 256
"""Threads per block of every launch (a power of two; tests patch it small)."""

MAX_BLOCKS = 1024
"""Blocks per leaf at most; larger leaves loop (grid-stride)."""

SLOTS = 32
"""Leaves per launch."""

# Columns of ``meta``.
SIZE, NBLOCKS, SCALED, NDIM, OFFSET, AXES = range(6)

# What ``finish_cuda`` folds: peaks (max |x|), norms (sums), counts.
FOLD_PEAK, FOLD_NORM, FOLD_COUNT = range(3)

_FLOAT64 = np.dtype(np.float64)
_POW2_BIAS = 140
_POW2 = np.ldexp(1.0, np.arange(-_POW2_BIAS, _POW2_BIAS))
"""Exact powers of two, 2**-140 .. 2**139 (a constant table: the simulator's ldexp wants
Python ints)."""


# ----------------------------------------------------------------- device helpers


@cuda.jit(device=True)
def _grid_walk(meta, first):
    """Where this thread works in a launch over rows ``first`` on: the block's slot
    (``blockIdx.y``), its leaf's row, whether the block idles (its ``blockIdx.x`` is past
    the leaf's block count), and the thread's first element of the walk and its stride."""
    slot = cuda.blockIdx.y
    leaf = first + slot
    nblocks = meta[leaf, NBLOCKS]
    first_element = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    return slot, leaf, cuda.blockIdx.x >= nblocks, first_element, nblocks * cuda.blockDim.x


@cuda.jit(device=True)
def _position(meta, leaf, k):
    """Where element ``k`` of the leaf's walk lives in its view."""
    pos = meta[leaf, OFFSET]
    for d in range(meta[leaf, NDIM]):
        n = meta[leaf, AXES + 2 * d]
        pos += (k % n) * meta[leaf, AXES + 2 * d + 1]
        k //= n
    return pos


@cuda.jit(device=True)
def _max_nan(a, b):
    """max(a, b), NaN if either is NaN."""
    if a != a or b != b:
        return math.nan
    return a if a >= b else b


@cuda.jit(device=True)
def _combine(a, b, is_max):
    return _max_nan(a, b) if is_max else a + b


@cuda.jit(device=True)
def _block_fold(value, is_max):
    """Fold ``value`` over the block in a fixed tree; every thread gets the result."""
    buf = cuda.shared.array(0, _FLOAT64)
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            buf[t] = _combine(buf[t], buf[t + step], is_max)
        cuda.syncthreads()
        step //= 2
    result = buf[0]
    cuda.syncthreads()  # buf is reused by the next fold
    return result


@cuda.jit(device=True)
def _pow(t, p):
    if p == 2.0:
        return t * t
    if p == 1.0:
        return t
    return t**p


@cuda.jit(device=True)
def _root(s, p):
    if p == 2.0:
        return math.sqrt(s)
    if p == 1.0:
        return s
    return s ** (1.0 / p)


# --------------------------------------------------------------------- codecs


@cuda.jit(device=True)
def _widen_real(x):
    return np.float64(x)


@cuda.jit(device=True)
def _widen_complex(x):
    return np.complex128(x)


@cuda.jit(device=True)
def _times_real(x, coef):
    return x * coef


@cuda.jit(device=True)
def _zeroed_real(x):
    return 0.0


@cuda.jit(device=True)
def _store_native(v, pos, y):
    v[pos] = y  # one rounding to the element type


@cuda.jit(device=True)
def _times_complex(x, coef):
    return complex(x.real * coef, x.imag * coef)  # part by part: no NaN from inf * 0


@cuda.jit(device=True)
def _zeroed_complex(x):
    re = x.real if math.isfinite(x.real) else 0.0
    im = x.imag if math.isfinite(x.imag) else 0.0
    return complex(re, im)


@cuda.jit(device=True)
def _widen_bf16(bits):
    """bfloat16 bits (int16) -> float64, exactly."""
    u = np.int32(bits) & 0xFFFF
    sign = -1.0 if u & 0x8000 else 1.0
    e = (u >> 7) & 0xFF
    m = u & 0x7F
    if e == 0xFF:
        return math.nan if m else sign * math.inf
    if e == 0:
        return sign * (m * _POW2[_POW2_BIAS - 133])
    return sign * ((128 + m) * _POW2[_POW2_BIAS + e - 134])


@cuda.jit(device=True)
def _store_bf16(v, pos, y):
    """Store float64 ``y`` as bfloat16 bits, rounded once to nearest-even."""
    if y != y:
        v[pos] = np.int16(0x7FC0)
        return
    a = abs(y)
    if a == math.inf:
        bits = 0x7F80
    elif a == 0.0:
        bits = 0
    else:
        e = math.frexp(a)[1] - 1  # a = m * 2**e, 1 <= m < 2
        e = max(e, -126)  # subnormals share the smallest exponent
        if e > 127:
            bits = 0x7F80
        else:
            s = a * _POW2[_POW2_BIAS + 7 - e]  # exact; the significand in [0, 256]
            r = np.int64(s)
            rest = s - r
            if rest > 0.5 or (rest == 0.5 and r % 2 == 1):
                r += 1
            # exponent field and significand add up, carries included (256 -> next
            # exponent; 0x7F80 is inf)
            bits = ((e + 126) << 7) + r
    if math.copysign(1.0, y) < 0:
        bits -= 0x8000  # the sign bit, as int16
    v[pos] = np.int16(bits)


# ------------------------------------------------------------------- elements
# ``element(x, p, scale)``: a widened element's contribution to a reduction.


@cuda.jit(device=True)
def _sq(x, p, scale):
    return x.real * x.real + x.imag * x.imag


@cuda.jit(device=True)
def _abs(x, p, scale):
    return abs(x)


@cuda.jit(device=True)
def _pow_scaled(x, p, scale):
    if not (scale > 0.0 and scale < math.inf):  # a 0 / inf / NaN peak is the norm itself
        return 0.0
    return _pow(abs(x) / scale, p)


@cuda.jit(device=True)
def _pow_scaled_complex(x, p, scale):
    """`_pow_scaled` of a complex x, divided part by part first: the magnitude of a
    subnormal x, rounded to the subnormal grid, is too coarse."""
    if not (scale > 0.0 and scale < math.inf):
        return 0.0
    return _pow(math.hypot(x.real / scale, x.imag / scale), p)


@cuda.jit(device=True)
def _nonfinite(x, p, scale):
    return 0.0 if math.isfinite(x.real) and math.isfinite(x.imag) else 1.0


# -------------------------------------------------------------------- kernels


def _reduction(widen, element, is_max):
    """A reduction kernel: ``element`` of every element, summed (or max), per block."""

    @cuda.jit
    def kernel(views, meta, first, p, peaks, partials):
        slot, leaf, idle, k, stride = _grid_walk(meta, first)
        if idle:
            return
        view = views[slot]
        n = meta[leaf, SIZE]
        flat = meta[leaf, NDIM] == 1
        offset = meta[leaf, OFFSET]
        step = meta[leaf, AXES + 1]
        scale = peaks[leaf]
        acc = 0.0
        while k < n:
            pos = offset + k * step if flat else _position(meta, leaf, k)
            acc = _combine(acc, element(widen(view[pos]), p, scale), is_max)
            k += stride
        total = _block_fold(acc, is_max)
        if cuda.threadIdx.x == 0:
            partials[leaf, cuda.blockIdx.x] = total

    return kernel


def _scale(widen, store, times):
    @cuda.jit
    def scale_cuda_(views, meta, first, norms, per_leaf, max_norm, eps, dst, dense_dst):
        """x <- round(x * max_norm / (norm + eps)) iff the norm is finite and above max_norm.

        The norm is ``norms[leaf]`` (``per_leaf``) or ``norms[0]``, read from device
        memory. Not clipping writes nothing, unless ``dst`` is another set of views
        (out of place): then the elements are copied unchanged. ``dense_dst``: ``dst``
        holds element ``k`` of the walk at position ``k``.
        """
        slot, leaf, idle, k, stride = _grid_walk(meta, first)
        norm = norms[leaf] if per_leaf else norms[0]
        clip = math.isfinite(norm) and norm > max_norm
        if idle or not (clip or dense_dst):
            return
        coef = max_norm / (norm + eps) if clip else 1.0
        src = views[slot]
        out = dst[slot]
        n = meta[leaf, SIZE]
        while k < n:
            pos = _position(meta, leaf, k)
            at = k if dense_dst else pos
            if clip:
                store(out, at, times(widen(src[pos]), coef))
            else:
                out[at] = src[pos]
            k += stride

    return scale_cuda_


def _clamp(widen, store):
    @cuda.jit
    def clamp_cuda_(views, meta, first, bound, dst, dense_dst):
        """x <- min(max(x, -bound), bound); NaN stays NaN.

        ``bound`` is already rounded to the element type (exact in float64), so it is
        stored as it is, and comparing with it selects what the exact bound selects.
        Out of place (``dense_dst``), the other elements are copied unchanged.
        """
        slot, leaf, idle, k, stride = _grid_walk(meta, first)
        if idle:
            return
        src = views[slot]
        out = dst[slot]
        n = meta[leaf, SIZE]
        while k < n:
            pos = _position(meta, leaf, k)
            at = k if dense_dst else pos
            x = widen(src[pos])
            if x > bound:
                store(out, at, bound)
            elif x < -bound:
                store(out, at, -bound)
            elif dense_dst:
                out[at] = src[pos]
            k += stride

    return clamp_cuda_


def _zero_nonfinite(widen, store, zeroed):
    @cuda.jit
    def zero_nonfinite_cuda_(views, meta, first, partials):
        """Non-finite parts -> 0 (only those are written); elements changed per block."""
        slot, leaf, idle, k, stride = _grid_walk(meta, first)
        if idle:
            return
        v = views[slot]
        n = meta[leaf, SIZE]
        changed = 0.0
        while k < n:
            pos = _position(meta, leaf, k)
            x = widen(v[pos])
            if not (math.isfinite(x.real) and math.isfinite(x.imag)):
                store(v, pos, zeroed(x))
                changed += 1.0
            k += stride
        total = _block_fold(changed, False)
        if cuda.threadIdx.x == 0:
            partials[leaf, cuda.blockIdx.x] = total

    return zero_nonfinite_cuda_


def _multiply(widen, store, times):
    @cuda.jit
    def multiply_cuda_(views, meta, first, coefs, fill, dst, dense_dst):
        """x <- round(x * coefs[leaf]) for any real coefficient, the CPU's ``scale_cpu_``
        (``scale_cuda_`` is `clip_grad_norm_`'s, which decides on the device); with
        ``fill``, every element <- round(coefs[leaf]) instead (NumPy's ``fill``).

        In place, a leaf whose coefficient is 1 is not written. Out of place
        (``dense_dst``), every element is written.
        """
        slot, leaf, idle, k, stride = _grid_walk(meta, first)
        coef = coefs[leaf]
        if idle or (coef == 1.0 and not (fill or dense_dst)):
            return
        src = views[slot]
        out = dst[slot]
        n = meta[leaf, SIZE]
        while k < n:
            pos = _position(meta, leaf, k)
            at = k if dense_dst else pos
            if fill:
                store(out, at, coef)
            else:
                store(out, at, times(widen(src[pos]), coef))
            k += stride

    return multiply_cuda_


def _accumulate(widen, widen_into, store_into):
    @cuda.jit
    def accumulate_cuda_(dst, views, meta, first_row, first):
        """dst <- round(src) if ``first``, else dst <- round(dst + src), the sum in float64.

        ``dst[slot]`` is the dense buffer of leaf ``first_row + slot``: element ``k`` of
        the leaf's walk lands at ``k``. Complex values are added and rounded part by part.
        The buffers' element type may differ from the leaves' (``widen_into`` /
        ``store_into`` are its codec).
        """
        slot, leaf, idle, k, stride = _grid_walk(meta, first_row)
        if idle:
            return
        src = views[slot]
        out = dst[slot]
        n = meta[leaf, SIZE]
        while k < n:
            x = widen(src[_position(meta, leaf, k)])
            if first:
                store_into(out, k, x)
            else:
                store_into(out, k, widen_into(out[k]) + x)
            k += stride

    return accumulate_cuda_


@cuda.jit
def finish_cuda(partials, meta, what, p, peaks, norms, total, positions, by_position):
    """Fold the partials of every leaf in block order; then the total, on one block.

    ``what``: ``FOLD_PEAK`` writes ``peaks[leaf]`` of the ``SCALED`` leaves (and, for
    ``p = inf``, the norms and the total); ``FOLD_NORM`` turns sums into
    ``norms[leaf]`` — ``sum ** (1/p)``, or ``peak * sum ** (1/p)`` for a scaled leaf
    (one whose ``peaks[leaf]`` is not the -1 of unscaled leaves) — and the total
    ``‖norms‖_p``; ``FOLD_COUNT`` adds every partial into ``total[0]``.
    ``by_position[i] = norms[positions[i]]`` for the per-position results.
    """
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    n = meta.shape[0]
    is_max = what == FOLD_PEAK
    final = what == FOLD_NORM or (is_max and p == math.inf)
    count = 0.0
    for leaf in range(t, n, threads):
        if is_max and meta[leaf, SCALED] == 0:
            continue  # not in the peak pass
        v = 0.0
        for b in range(meta[leaf, NBLOCKS]):
            v = _combine(v, partials[leaf, b], is_max)
        if what == FOLD_COUNT:
            count += v
        elif is_max:
            peaks[leaf] = v
            if final:
                norms[leaf] = v
        else:
            peak = peaks[leaf]
            if peak < 0.0:  # not scaled: v is the plain sum
                norms[leaf] = _root(v, p)
            elif math.isfinite(peak) and peak > 0.0:
                norms[leaf] = peak * _root(v, p)
            else:  # 0, inf and NaN: the peak is the norm
                norms[leaf] = peak
    if what == FOLD_COUNT:
        count = _block_fold(count, False)
        if t == 0:
            total[0] = count
        return
    if not final:
        return
    cuda.syncthreads()  # every norm is written
    peak = 0.0
    for leaf in range(t, n, threads):
        peak = _max_nan(peak, norms[leaf])
    peak = _block_fold(peak, True)
    s = 0.0
    regular = math.isfinite(peak) and peak > 0.0 and p != math.inf
    if regular:
        for leaf in range(t, n, threads):
            s += _pow(norms[leaf] / peak, p)
    s = _block_fold(s, False)
    if t == 0:
        total[0] = peak * _root(s, p) if regular else peak
    for i in range(t, positions.size, threads):
        by_position[i] = norms[positions[i]]


class KernelSet:
    """The kernels of one codec, named as their CPU twins."""

    def __init__(self, widen, store, times, zeroed, pow_scaled):
        self.widen, self.store = widen, store
        self.sumsq_cuda = _reduction(widen, _sq, False)
        self.sumabs_cuda = _reduction(widen, _abs, False)
        self.sumpow_cuda = _reduction(widen, pow_scaled, False)
        self.maxabs_cuda = _reduction(widen, _abs, True)
        self.nonfinite_cuda = _reduction(widen, _nonfinite, False)
        self.scale_cuda_ = _scale(widen, store, times)
        self.clamp_cuda_ = _clamp(widen, store)
        self.zero_nonfinite_cuda_ = _zero_nonfinite(widen, store, zeroed)
        self.multiply_cuda_ = _multiply(widen, store, times)


FLOAT = KernelSet(_widen_real, _store_native, _times_real, _zeroed_real, _pow_scaled)
COMPLEX = KernelSet(_widen_complex, _store_native, _times_complex, _zeroed_complex, _pow_scaled_complex)
BFLOAT16 = KernelSet(_widen_bf16, _store_bf16, _times_real, _zeroed_real, _pow_scaled)


def for_dtype(dtype):
    """The kernel set for leaves of ``dtype`` (a NumPy dtype)."""
    if dtype.name == "bfloat16":
        return BFLOAT16
    return COMPLEX if dtype.kind == "c" else FLOAT


def accumulate_for(dtype, accumulator):
    """``accumulate_cuda_`` from leaves of ``dtype`` into buffers of ``accumulator`` (NumPy dtypes)."""
    return _accumulate_kernel(for_dtype(dtype), for_dtype(accumulator))


@functools.cache
def _accumulate_kernel(source, into):
    return _accumulate(source.widen, into.widen, into.store)
