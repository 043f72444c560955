"""CPU kernels: ``@njit`` reductions and in-place updates over tables of strided runs.

The caller (``gradclip._table``) describes every leaf of one dtype as rows of a
table: ``addr[r]`` (the address of the first element), ``count[r]`` (how many
elements) and ``step[r]`` (the distance between them, in elements, >= 1), plus
``seg_leaf[r]``, the leaf the row belongs to. One kernel call then processes every
leaf of the group, whatever their number, shape or strides.

Work is split into chunks of at most ``CHUNK`` elements of one row. The split
depends only on the table, never on the thread count, and partial results are
folded serially in chunk order, so reductions are bit-identical for any
``NUMBA_NUM_THREADS``. Small tables run a serial driver (no thread start-up);
large ones run the same chunks under ``prange``, except in a process forked after
Numba's thread pool started, where every table runs serially (see "the thread pool").

Element types: float32, float64, complex64 and complex128 are used as they are.
Numba's CPU target has no float16 and knows no bfloat16, so both travel as their
16-bit patterns: float16 as ``uint16``, bfloat16 as ``int16`` (the two integer
types keep the two formats apart at compile time). ``_widen`` decodes an element
exactly to float64 (or complex128); ``_narrow`` rounds a float64 result back to
the element type, once, to nearest-even. float16 goes through the CPU's own
conversions where it has them (F16C, see `_f16c`).

Accumulation is in float64. ``fastmath`` allows reassociation and contraction
(needed to vectorise the sums) but never ``nnan``/``ninf``: NaN and inf must be
seen.

Also here: ``plain_headers`` / ``array_layouts`` read many NumPy array headers in
one call (the boundary's per-leaf cost), and ``array_rows`` walks the strided ones
into table rows; ``in_address_order`` / ``disjoint`` tell
whether byte ranges overlap (``gradclip._overlap``); ``plain_list_norm`` and its
siblings run a whole operation on a plain list of arrays in one call; and
``accumulate_table`` adds a table of grads into contiguous buffers (``GradAccumulator``).
"""

import functools
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

CHUNK = 1 << 14
"""Elements per chunk: the unit of work and of partial sums."""

PARALLEL_MIN = 1 << 16
"""Tables with fewer elements than this run serially."""

FAST = {"reassoc", "contract"}

# Reduction ops (``reduce_table``) and update ops (``update_table``).
SUMSQ, SUMABS, SUMPOW, MAXABS, NONFINITE = range(5)
SCALE, CLAMP, ZERO_NONFINITE = range(3)


# ---------------------------------------------------------------- bit casts


@intrinsic
def _voidptr(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.intp), codegen


def _bitcast(source, target):
    """An intrinsic that reads a ``source`` value's bits as a ``target`` of the same width."""

    @intrinsic
    def bitcast(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return bitcast


_f32_from_bits = _bitcast(types.uint32, types.float32)
_f32_bits = _bitcast(types.float32, types.uint32)
_f64_from_bits = _bitcast(types.uint64, types.float64)
_f64_bits = _bitcast(types.float64, types.uint64)


# ------------------------------------------------------ half-precision codecs


# Written with conditional expressions on values computed either way (selects rather
# than branches).


@functools.cache
def _f16c():
    """Whether the machine code Numba generates here may use F16C, the x86 conversions
    between float16 and float32 (``vcvtph2ps``, ``vcvtps2ph``): the features of Numba's
    CPU target machine, which also key its on-disk cache. Asked when a kernel compiles."""
    from numba.core.registry import cpu_target

    return "+f16c" in cpu_target.target_context.codegen()._tm_features.split(",")


# float16 codes are converted with LLVM's half type where F16C is there: one instruction
# for 8 codes, 2.5x faster than a table lookup per code. Without F16C LLVM turns the
# conversion into a call of a library function that Numba does not link (the process
# crashed), so there the kernels read float16 through a table of every code's value.


@intrinsic
def _f16_to_f32(typingctx, code):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@functools.cache
def _f16_values():
    """The float32 value of every float16 code (NumPy's exact conversion), for targets
    without F16C."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit
def _bf16_to_f32(h):
    """bfloat16 bits -> float32, exactly: bfloat16 is float32's upper half."""
    return _f32_from_bits(np.uint32(np.uint16(h)) << np.uint32(16))


@njit
def _round_to_odd(y, keep):
    """``y`` rounded to odd at ``keep`` of float64's 52 fraction bits: the rest cut
    off, and the last bit kept set if anything nonzero was cut (inf stays inf, a NaN
    a NaN).

    Rounding to odd with two bits more than a target format, then to nearest-even
    at the target, equals one rounding to nearest-even. On the float64's bits that
    takes four integer operations, which vectorise; the callers keep few enough bits
    for the result to convert to float32 exactly, without a second rounding there.
    """
    cut = np.uint64((1 << (52 - keep)) - 1)
    b = _f64_bits(y)
    # (b & cut) + cut carries into the last kept bit exactly when something is cut off
    return _f64_from_bits((b | ((b & cut) + cut)) & ~cut)


# numba does uint32 arithmetic in 64 bits; with every result wrapped back in np.uint32,
# LLVM uses 32-bit lanes (eight per AVX2 register rather than four).


@njit
def _f64_to_bf16(y):
    """float64 -> bfloat16 bits, rounded once to nearest-even; a NaN -> its float32's
    upper half with the quiet bit set.

    bfloat16's bits, subnormals included, are the upper half of a float32's. Rounded
    to odd at 10 significant bits (bfloat16's 8 and 2 more), ``y`` is exactly a
    float32 from 2**-140 on; below that bfloat16 rounds to zero either way.
    """
    return _f32_to_bf16(np.float32(_round_to_odd(y, 9)))


@njit
def _f32_to_bf16(f):
    """float32 -> bfloat16 bits, rounded to nearest-even; a NaN -> its upper half with
    the quiet bit set."""
    b = _f32_bits(f)
    upper = np.uint32(b >> np.uint32(16))
    rounded = np.uint32(np.uint32(b + np.uint32(0x7FFF) + (upper & np.uint32(1))) >> np.uint32(16))
    return np.uint32(upper | np.uint32(0x0040)) if f != f else rounded


@njit
def _f64_to_f16(y):
    """float64 -> float16 bits, rounded once to nearest-even; a NaN -> sign | 0x7E00.

    Scaled by 2**-112, float16's values are float32s whose bits shifted right by 13
    are float16's bits, subnormals included. Rounded to odd at 13 significant bits
    (float16's 11 and 2 more) and scaled (exactly: a power of two), ``y`` is exactly
    a float32 from 2**-25 on; below that float16 rounds to zero either way.
    """
    f = np.float32(_round_to_odd(y, 12) * 2.0**-112)
    b = _f32_bits(f)
    a = np.uint32(b & np.uint32(0x7FFFFFFF))
    rounded = np.uint32(np.uint32(a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
    h = min(rounded, np.uint32(0x7C00))  # from 65520 on (float32's inf included): inf
    h = np.uint32(0x7E00) if f != f else h
    return np.uint32(h | np.uint32((b >> np.uint32(16)) & np.uint32(0x8000)))


@njit
def _f64_to_f16_f16c(y):
    """`_f64_to_f16` with F16C's conversion from float32, which rounds to nearest-even.

    Rounded to odd at 13 significant bits, ``y`` is exactly a float32 from 2**-126 on;
    below that float16 rounds to zero either way.
    """
    return _f32_to_f16_rounded(np.float32(_round_to_odd(y, 12)))


@njit
def _f32_to_f16_rounded(f):
    """float32 -> float16 bits by F16C, rounded to nearest-even; a NaN -> the quiet NaN
    of its sign, as `_f64_to_f16` gives it."""
    nan = np.uint16(np.uint16(np.uint16(_f32_bits(f) >> np.uint32(16)) & np.uint16(0x8000)) | np.uint16(0x7E00))
    return nan if f != f else _f32_to_f16(f)


# ------------------------------------------- element decode / encode by type


def _widen(x):
    """An element as float64 (or complex128), exactly."""


def _narrow(y, like):
    """``y`` (float64 / complex128) rounded once to the element type of ``like``."""


@overload(_widen)
def _widen_impl(x):
    if isinstance(x, types.Float):
        return lambda x: np.float64(x)
    if isinstance(x, types.Complex):
        return lambda x: np.complex128(x)
    if x == types.uint16 and _f16c():
        return lambda x: np.float64(_f16_to_f32(x))
    if x == types.uint16:
        values = _f16_values()
        return lambda x: np.float64(values[x])
    if x == types.int16:
        return lambda x: np.float64(_bf16_to_f32(x))
    return None


@overload(_narrow)
def _narrow_impl(y, like):
    dtype = like.dtype
    if dtype == types.uint16 and _f16c():
        return lambda y, like: _f64_to_f16_f16c(y)
    if dtype == types.uint16:
        return lambda y, like: np.uint16(_f64_to_f16(y))
    if dtype == types.int16:
        return lambda y, like: np.int16(np.uint16(_f64_to_bf16(y)))
    if isinstance(dtype, (types.Float, types.Complex)):
        return lambda y, like: dtype(y)
    return None


def _beyond(x, hi):
    """Whether element ``x`` lies outside ``[-hi, hi]``, for a bound ``hi >= 0`` of the
    element type (a NaN does not)."""


def _clamped(x, hi, lo):
    """``x`` clamped to ``[lo, hi]`` (``lo`` is ``-hi``); a NaN as it is."""


# float32 and float64 compare as they are (in float64 they would use half the vector
# width). A 16-bit code is compared by its magnitude bits, which order finite values
# and inf as their values do (above inf's bits lie the NaNs); the sign bit picks the
# side. Those integer operations run in 16-bit lanes, 5x faster than decoding each
# element.


def _code_inf(code):
    return np.uint16(0x7C00 if code == types.uint16 else 0x7F80)  # float16's, bfloat16's


@njit
def _magnitude_bits(code):
    """A 16-bit code's bits without its sign."""
    return np.uint16(np.uint16(code) & np.uint16(0x7FFF))


@overload(_beyond)
def _beyond_impl(x, hi):
    if isinstance(x, types.Float):
        return lambda x, hi: (x > hi) | (x < -hi)
    if x in (types.uint16, types.int16):
        inf = _code_inf(x)

        def impl(x, hi):
            magnitude = _magnitude_bits(x)
            return (magnitude > _magnitude_bits(hi)) & (magnitude <= inf)

        return impl
    return None


@overload(_clamped)
def _clamped_impl(x, hi, lo):
    if isinstance(x, types.Float):
        return lambda x, hi, lo: hi if x > hi else (lo if x < lo else x)
    if x in (types.uint16, types.int16):
        return lambda x, hi, lo: (lo if np.uint16(x) >= np.uint16(0x8000) else hi) if _beyond(x, hi) else x
    return None


def _finite_or_zero(x):
    """``x`` with every non-finite part replaced by 0."""


@overload(_finite_or_zero)
def _finite_or_zero_impl(x):
    if isinstance(x, types.Complex):
        return lambda x: complex(_finite_or_zero(x.real), _finite_or_zero(x.imag))
    return lambda x: x if np.isfinite(x) else 0.0


def _times(x, coef):
    """``x * coef`` for a real ``coef``: complex parts scaled one by one (no NaN from inf * 0)."""


@overload(_times)
def _times_impl(x, coef):
    if isinstance(x, types.Complex):
        return lambda x, coef: complex(x.real * coef, x.imag * coef)
    return lambda x, coef: x * coef


def _magnitude_over(x, scale):
    """``|x| / scale`` for a real ``scale > 0``; a complex x is divided part by part first:
    the magnitude of a subnormal x, rounded to the subnormal grid, is too coarse."""


@overload(_magnitude_over)
def _magnitude_over_impl(x, scale):
    if isinstance(x, types.Complex):
        return lambda x, scale: np.hypot(x.real / scale, x.imag / scale)
    return lambda x, scale: abs(x) / scale


def _finite(x):
    """Whether element ``x`` is finite (complex: both parts); a 16-bit code by its bits."""


@overload(_finite)
def _finite_impl(x):
    if isinstance(x, (types.Float, types.Complex)):
        return lambda x: np.isfinite(x.real) and np.isfinite(x.imag)
    if x in (types.uint16, types.int16):
        inf = _code_inf(x)
        return lambda x: _magnitude_bits(x) < inf
    return None


# ------------------------------------------------------------ chunk kernels
# Each takes a 1-d view (contiguous or strided) of at most CHUNK elements.


@njit(fastmath=FAST, cache=True)
def sumsq_cpu(v):
    """Sum of |x|**2 in float64."""
    return _sumsq(v)


def _sumsq(v):
    """`sumsq_cpu` by the loop that suits ``v``'s type."""


@overload(_sumsq, inline="always")
def _sumsq_impl(v):
    if v.dtype == types.int16 and v.layout == "C":
        return lambda v: _sumsq_bfloat16_pairs(v)
    if v.layout == "C" or v.dtype == types.uint16:
        return lambda v: _sumsq_elements(v) if v.size < STREAMS_MIN else _sumsq_quarters(v)
    return lambda v: _sumsq_elements(v)


@njit(fastmath=FAST, inline="always")
def _sumsq_elements(v):
    s = 0.0
    for i in range(v.size):
        x = _widen(v[i])
        s += x.real * x.real + x.imag * x.imag
    return s


STREAMS_MIN = 1 << 11
"""Elements from which `_sumsq_quarters` reads a view as four streams."""


@njit(fastmath=FAST, cache=True)
def _sumsq_quarters(v):
    """The four quarters of ``v`` summed side by side (`sumsq4_cpu`), then its tail.

    A core keeps more reads in flight from four streams than from one: a float32 sum
    of squares over 1 GiB on one core of an Intel Xeon (Emerald Rapids) read 9.3-9.8
    GB/s as one stream, 12.0 as the quarters of each 16,384-element chunk (GPT-2
    small's 148 leaves: 1.25-1.3x on one thread and on two). Called, not inlined: inlined
    beside the short loop, it cost W4's 10,000 leaves of 256 float32 11%.
    """
    q = v.size // 4
    s0, s1, s2, s3 = sumsq4_cpu(v[:q], v[q : 2 * q], v[2 * q : 3 * q], v[3 * q : 4 * q])
    return (s0 + s1) + (s2 + s3) + _sumsq_elements(v[4 * q :])


@njit(fastmath=FAST, error_model="numpy", cache=True)
def sumsq4_cpu(v0, v1, v2, v3):
    """The sums of |x|**2 of four runs of one length in float64, read in one pass."""
    s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    for e in range(v0.size):
        x0, x1, x2, x3 = _widen(v0[e]), _widen(v1[e]), _widen(v2[e]), _widen(v3[e])
        s0 += x0.real * x0.real + x0.imag * x0.imag
        s1 += x1.real * x1.real + x1.imag * x1.imag
        s2 += x2.real * x2.real + x2.imag * x2.imag
        s3 += x3.real * x3.real + x3.imag * x3.imag
    return s0, s1, s2, s3


@intrinsic
def _load_uint32(typingctx, addr):
    """The 4 bytes at ``addr``, whatever its alignment (a 16-bit array's may be 2)."""

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()), align=1)

    return types.uint32(types.intp), codegen


@njit(fastmath=FAST, inline="always")
def _sumsq_bfloat16_pairs(v):
    """`_sumsq_elements` of contiguous bfloat16 codes, read two at a time.

    Element by element (zero-extend 4 codes to 32 bits, shift, widen to float64, FMA) the
    loop issued 5 vector instructions per 4 codes, 3 of them on the two shuffle/shift
    pipes of this Zen 3 core: one thread summed 6.2 G codes/s from L1, half the memory
    bandwidth. A 32-bit word of two codes is both their float32s at once: ``w << 16`` is
    the first (little-endian: the lower address), ``w & 0xFFFF0000`` the second. 16.5 ->
    18.5 GB/s from L1, 12.8 -> 14.3 GB/s from memory. The words are read at the codes'
    own positions, so the sum's order (hence its bits) does not depend on the address.
    """
    pairs = v.size // 2
    half = pairs // 2
    base = v.ctypes.data
    s0 = s1 = t0 = t1 = 0.0
    for i in range(half):
        w, x = _load_uint32(base + 4 * i), _load_uint32(base + 4 * (half + i))
        a, b = np.float64(_f32_from_bits(np.uint32(w << _SIXTEEN))), np.float64(_f32_from_bits(np.uint32(w & _UPPER)))
        c, d = np.float64(_f32_from_bits(np.uint32(x << _SIXTEEN))), np.float64(_f32_from_bits(np.uint32(x & _UPPER)))
        s0 += a * a
        s1 += b * b
        t0 += c * c
        t1 += d * d
    s = (s0 + s1) + (t0 + t1)
    for i in range(4 * half, v.size):  # at most 3
        x = _widen(v[i])
        s += x * x
    return s


_SIXTEEN, _UPPER = np.uint32(16), np.uint32(0xFFFF0000)


@njit(fastmath=FAST, cache=True)
def sumabs_cpu(v):
    """Sum of |x| in float64."""
    s = 0.0
    for i in range(v.size):
        s += abs(_widen(v[i]))
    return s


@njit(fastmath=FAST, cache=True)
def sumpow_cpu(v, p, scale):
    """Sum of (|x| / scale)**p in float64; ``scale`` (the max |x|) keeps it finite."""
    s = 0.0
    for i in range(v.size):
        s += _magnitude_over(_widen(v[i]), scale) ** p
    return s


@njit(cache=True)
def maxabs_cpu(v):
    """Largest |x|; NaN if any element is NaN."""
    m = 0.0
    nan = False
    for i in range(v.size):
        a = abs(_widen(v[i]))
        m = max(m, a)
        nan |= a != a
    return np.nan if nan else m


@njit(cache=True)
def nonfinite_cpu(v):
    """Number of elements that are NaN or +-inf."""
    return _nonfinite_elements(v)


@njit(inline="always")
def _nonfinite_elements(v):
    n = 0
    for i in range(v.size):
        n += not _finite(v[i])
    return n


@njit(cache=True)
def _nonfinite_quarters(v):
    """`_nonfinite_elements` of the four quarters of ``v`` side by side (see
    `_sumsq_quarters`)."""
    q = v.size // 4
    n0 = n1 = n2 = n3 = 0
    for i in range(q):
        n0 += not _finite(v[i])
        n1 += not _finite(v[q + i])
        n2 += not _finite(v[2 * q + i])
        n3 += not _finite(v[3 * q + i])
    return (n0 + n1) + (n2 + n3) + _nonfinite_elements(v[4 * q :])


@njit(fastmath=FAST, cache=True)
def scale_cpu_(v, coef):
    """x <- round(x * coef), the product taken in float64."""
    for i in range(v.size):
        v[i] = _narrow(_times(_widen(v[i]), coef), v)


CLAMP_BLOCK = 256
"""Elements `clamp_cpu_` checks before it decides to write."""


@njit(cache=True)
def clamp_cpu_(v, bound):
    """x <- min(max(x, -bound), bound); NaN stays NaN.

    The bound is rounded to the element type first; comparing with the rounded
    bound selects the same elements as comparing with the exact one. A block of
    `CLAMP_BLOCK` elements with nothing to clamp is not written; a block with
    something to clamp is rewritten whole, the other elements with their own bits:
    unlike a store per clamped element, that store vectorises without masked stores.
    A contiguous view of STREAMS_MIN elements or more is checked four blocks at a
    time, one from each quarter (see `_sumsq_quarters`).
    """
    hi = _narrow(bound, v)
    lo = _narrow(-bound, v)
    done = 0
    if v.size >= STREAMS_MIN and v.flags.c_contiguous:
        q = v.size // 4
        for start in range(0, q, CLAMP_BLOCK):
            n = min(CLAMP_BLOCK, q - start)
            a, b = v[start : start + n], v[q + start : q + start + n]
            c, d = v[2 * q + start : 2 * q + start + n], v[3 * q + start : 3 * q + start + n]
            beyond = _beyond4(a, b, c, d, hi)
            for block, dirty in ((a, beyond[0]), (b, beyond[1]), (c, beyond[2]), (d, beyond[3])):
                if dirty:
                    _clamp_block(block, hi, lo)
        done = 4 * q
    for start in range(done, v.size, CLAMP_BLOCK):
        block = v[start : start + CLAMP_BLOCK]
        if _any_beyond(block, hi):
            _clamp_block(block, hi, lo)


@njit(inline="always")
def _clamp_block(block, hi, lo):
    for i in range(block.size):
        block[i] = _clamped(block[i], hi, lo)


@njit
def _beyond4(a, b, c, d, hi):
    """`_any_beyond` of four blocks of one length, read side by side."""
    ba = bb = bc = bd = False
    for i in range(a.size):
        ba |= _beyond(a[i], hi)
        bb |= _beyond(b[i], hi)
        bc |= _beyond(c[i], hi)
        bd |= _beyond(d[i], hi)
    return ba, bb, bc, bd


@njit
def _any_beyond(v, hi):
    beyond = False
    for i in range(v.size):
        beyond |= _beyond(v[i], hi)
    return beyond


@njit(cache=True)
def zero_nonfinite_cpu_(v):
    """Non-finite parts -> 0 (only those are written); returns the elements changed."""
    n = 0
    for i in range(v.size):
        if not _finite(v[i]):
            v[i] = _narrow(_finite_or_zero(_widen(v[i])), v)
            n += 1
    return n


# ---------------------------------------------------------------- the thread pool
# Numba starts its thread pool (the "threading layer") on the first parallel call of a
# process. Two things follow.
#
# A process forked after the pool started cannot use it: Linux's default layer, GNU
# OpenMP, kills such a child at its first parallel region (a 'fork' multiprocessing pool
# then hangs), and the layer that survives fork, workqueue, aborts when two threads use
# it at once. A child forked from a process whose pool had started runs every table
# serially: the same chunks in the same order, so the same bits.
#
# A cached compiled function that calls a parallel one is loaded from the cache by
# starting the pool first, but Numba writes that into the function's cache entry only
# when it compiled the parallel callee in the same process. Compiled against a callee
# loaded from the cache, the entry omits it, and a later process that loads that entry
# before anything started its pool crashes (numba/numba#8578). So gradclip starts the
# pool itself before it calls such a function (the one-call paths' parallel ones).


def _pool_started():
    """Whether this process (or the one it was forked from) started Numba's thread pool."""
    try:
        numba.threading_layer()
    except ValueError:  # "not initialized"
        return False
    return True


_forked_after_pool = False
"""Whether this process was forked from one whose thread pool had started."""


def _note_fork():
    global _forked_after_pool
    _forked_after_pool = _pool_started()


if hasattr(os, "register_at_fork"):  # POSIX; where it is missing, nothing forks
    os.register_at_fork(after_in_child=_note_fork)


def parallel_allowed():
    """Whether this process may run a parallel kernel: not when it was forked from one
    whose thread pool had started (then every kernel runs serially)."""
    return not _forked_after_pool


def _in_parallel(size):
    """Whether a table of ``size`` elements runs under ``prange`` here."""
    return size >= PARALLEL_MIN and parallel_allowed()


@functools.cache
def _start_pool():
    """Start Numba's thread pool, once (see above)."""
    numba.get_num_threads()  # starts the pool to read its size


# ------------------------------------------------------------------ drivers


@njit(cache=True)
def _chunks(count, size=CHUNK):
    """Row and first element of every chunk of at most ``size`` elements, in row order."""
    n = 0
    for r in range(count.size):
        n += (count[r] + size - 1) // size
    row = np.empty(n, np.int64)
    lo = np.empty(n, np.int64)
    k = 0
    for r in range(count.size):
        for start in range(0, count[r], size):
            row[k] = r
            lo[k] = start
            k += 1
    return row, lo


@njit(inline="always")
def _chunk_row(k, row, lo, count):
    """Row, first element and length of chunk ``k``."""
    r = row[k]
    return r, lo[k], min(CHUNK, count[r] - lo[k])


@njit(inline="always")
def _reduce_chunk(op, v, p, scale):
    if op == SUMSQ:
        return sumsq_cpu(v)
    if op == SUMABS:
        return sumabs_cpu(v)
    if op == SUMPOW:
        return sumpow_cpu(v, p, scale)
    if op == MAXABS:
        return maxabs_cpu(v)
    # Chosen here rather than inside nonfinite_cpu (as `_sumsq` does for sums): there the
    # branch cost W4's 10,000 leaves of 256 5-7%, here nothing measurable.
    return np.float64(nonfinite_cpu(v) if v.size < STREAMS_MIN else _nonfinite_quarters(v))


@njit(inline="always")
def _reduce_at(op, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness):
    r, offset, n = _chunk_row(k, row, lo, count)
    start = addr[r] + offset * step[r] * witness.itemsize
    scale = leaf_arg[seg_leaf[r]] if op == SUMPOW else 1.0
    if step[r] == 1:
        v = numba.carray(_voidptr(start), (n,), witness.dtype)
        return _reduce_chunk(op, v, p, scale)
    w = numba.carray(_voidptr(start), ((n - 1) * step[r] + 1,), witness.dtype)
    return _reduce_chunk(op, w[:: step[r]], p, scale)


def _update_chunk(op, v, coef, bound):
    """Run update ``op`` on one chunk; returns the elements it changed (zeroing only)."""


@overload(_update_chunk, inline="always")
def _update_chunk_impl(op, v, coef, bound):
    if isinstance(v.dtype, types.Complex):  # no order: CLAMP is rejected before any kernel runs

        def impl(op, v, coef, bound):
            if op == SCALE:
                scale_cpu_(v, coef)
                return 0
            return zero_nonfinite_cpu_(v)

        return impl

    def impl(op, v, coef, bound):
        if op == SCALE:
            scale_cpu_(v, coef)
            return 0
        if op == CLAMP:
            clamp_cpu_(v, bound)
            return 0
        return zero_nonfinite_cpu_(v)

    return impl


@njit(inline="always")
def _update_at(op, k, row, lo, addr, count, step, seg_leaf, leaf_arg, bound, witness):
    r, offset, n = _chunk_row(k, row, lo, count)
    start = addr[r] + offset * step[r] * witness.itemsize
    coef = leaf_arg[seg_leaf[r]] if op == SCALE else 1.0
    if step[r] == 1:
        v = numba.carray(_voidptr(start), (n,), witness.dtype)
        return _update_chunk(op, v, coef, bound)
    w = numba.carray(_voidptr(start), ((n - 1) * step[r] + 1,), witness.dtype)
    return _update_chunk(op, w[:: step[r]], coef, bound)


@njit(cache=True)
def _fold(op, part, row, seg_leaf, out):
    """Combine chunk partials into ``out[leaf]``, serially and in chunk order."""
    for k in range(part.size):
        leaf = seg_leaf[row[k]]
        if op == MAXABS:
            if part[k] != part[k] or out[leaf] != out[leaf]:
                out[leaf] = np.nan
            elif part[k] > out[leaf]:
                out[leaf] = part[k]
        else:
            out[leaf] += part[k]


# The drivers branch on ``op`` outside their chunk loops, every loop passing its op as a
# constant and its arguments one by one: with the op chosen per chunk at run time, or the
# arguments packed in a tuple, the kernels were not vectorised (9.4 instead of 16.8 GB/s
# on one core for float32 sums of squares). The per-chunk helpers are inlined where Numba
# compiles them (``inline="always"``), so the constant op prunes their other branches:
# called as functions they cost ~35 ns per chunk, doubling the time of small leaves.


@njit(cache=True)
def _reduce_serial(op, addr, count, step, seg_leaf, p, leaf_arg, out, witness):
    row, lo = _chunks(count)
    part = np.empty(row.size)
    if op == SUMSQ:
        for k in range(row.size):
            part[k] = _reduce_at(SUMSQ, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    elif op == SUMABS:
        for k in range(row.size):
            part[k] = _reduce_at(SUMABS, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    elif op == SUMPOW:
        for k in range(row.size):
            part[k] = _reduce_at(SUMPOW, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    elif op == MAXABS:
        for k in range(row.size):
            part[k] = _reduce_at(MAXABS, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    else:
        for k in range(row.size):
            part[k] = _reduce_at(NONFINITE, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    _fold(op, part, row, seg_leaf, out)


@njit(cache=True, parallel=True)
def _reduce_parallel(op, addr, count, step, seg_leaf, p, leaf_arg, out, witness):
    row, lo = _chunks(count)
    part = np.empty(row.size)
    if op == SUMSQ:
        for k in prange(row.size):
            part[k] = _reduce_at(SUMSQ, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    elif op == SUMABS:
        for k in prange(row.size):
            part[k] = _reduce_at(SUMABS, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    elif op == SUMPOW:
        for k in prange(row.size):
            part[k] = _reduce_at(SUMPOW, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    elif op == MAXABS:
        for k in prange(row.size):
            part[k] = _reduce_at(MAXABS, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    else:
        for k in prange(row.size):
            part[k] = _reduce_at(NONFINITE, k, row, lo, addr, count, step, seg_leaf, p, leaf_arg, witness)
    _fold(op, part, row, seg_leaf, out)


@njit(cache=True)
def _update_serial(op, addr, count, step, seg_leaf, leaf_arg, bound, witness):
    row, lo = _chunks(count)
    changed = 0
    if op == SCALE:
        for k in range(row.size):
            _update_at(SCALE, k, row, lo, addr, count, step, seg_leaf, leaf_arg, bound, witness)
    elif op == CLAMP:
        for k in range(row.size):
            _update_at(CLAMP, k, row, lo, addr, count, step, seg_leaf, leaf_arg, bound, witness)
    else:
        for k in range(row.size):
            changed += _update_at(ZERO_NONFINITE, k, row, lo, addr, count, step, seg_leaf, leaf_arg, bound, witness)
    return changed


@njit(cache=True, parallel=True)
def _update_parallel(op, addr, count, step, seg_leaf, leaf_arg, bound, witness):
    row, lo = _chunks(count)
    changed = np.zeros(row.size, np.int64)
    if op == SCALE:
        for k in prange(row.size):
            _update_at(SCALE, k, row, lo, addr, count, step, seg_leaf, leaf_arg, bound, witness)
    elif op == CLAMP:
        for k in prange(row.size):
            _update_at(CLAMP, k, row, lo, addr, count, step, seg_leaf, leaf_arg, bound, witness)
    else:
        for k in prange(row.size):
            changed[k] = _update_at(ZERO_NONFINITE, k, row, lo, addr, count, step, seg_leaf, leaf_arg, bound, witness)
    return changed.sum()


def reduce_table(op, table, out, p=2.0, leaf_arg=None):
    """Reduce every row of ``table`` with ``op``, accumulating into ``out[leaf]``.

    ``out`` is float64, one entry per leaf, and must start at 0 (sums) or 0 / the
    running max (``MAXABS``). ``leaf_arg`` is the per-leaf scale of ``SUMPOW``.
    """
    if leaf_arg is None:
        leaf_arg = out  # not read
    driver = _reduce_parallel if _in_parallel(table.size) else _reduce_serial
    driver(op, table.addr, table.count, table.step, table.seg_leaf, float(p), leaf_arg, out, table.witness)


def update_table(op, table, leaf_arg=None, bound=0.0):
    """Apply the in-place ``op`` to every row of ``table``; returns elements changed.

    ``leaf_arg`` is the per-leaf coefficient of ``SCALE``; ``bound`` the clip
    value of ``CLAMP``.
    """
    if leaf_arg is None:
        leaf_arg = np.zeros(0)  # not read
    driver = _update_parallel if _in_parallel(table.size) else _update_serial
    return int(driver(op, table.addr, table.count, table.step, table.seg_leaf, leaf_arg, float(bound), table.witness))


# ------------------------------------------------------------ leaf norms


@njit(cache=True)
def norms_from_sums(sums, p, tiny, wide):
    """``sums ** (1 / p)`` for p = 1 or 2; which leaves need their norm redone scaled by
    their largest magnitude, and whether any does.

    A sum that is infinite or NaN needs it, and so does one below ``tiny`` of a ``wide``
    (float64-based) leaf, whose elements may have underflowed when squared; narrower
    elements cannot.
    """
    norms = np.sqrt(sums) if p == 2.0 else sums.copy()
    redo = np.empty(sums.size, np.bool_)
    for i in range(sums.size):
        redo[i] = not (sums[i] < np.inf) or (wide[i] and not (sums[i] >= tiny))
    return norms, redo, redo.any()


@njit(fastmath={"reassoc"}, cache=True)
def _sum_of_powers(norms, peak, p):
    s = 0.0
    if p == 2.0:
        for x in norms:
            s += (x / peak) * (x / peak)
    elif p == 1.0:
        for x in norms:
            s += x / peak
    else:
        for x in norms:
            s += (x / peak) ** p
    return s


@njit(cache=True)
def fold_norms(norms, p):
    """The p-norm of a vector of leaf norms (>= 0): NaN if any is NaN, else inf if any is
    inf; otherwise computed scaled by the largest, so it overflows only if the result does."""
    peak = 0.0
    for x in norms:
        if x != x:
            return np.nan
        peak = max(peak, x)
    if p == np.inf or peak == 0.0 or peak == np.inf:
        return peak
    return peak * _sum_of_powers(norms, peak, p) ** (1.0 / p)


# NumPy's array object, ``PyArrayObject_fields``: after the object header (reference
# count, type) come data (char *), nd (int), dimensions (npy_intp *), strides, base,
# descr and flags (int).
_TYPE, _DATA, _NDIM, _DIMS, _STRIDES, _BASE, _DESCR, _FLAGS = 8, 16, 24, 32, 40, 48, 56, 64
_CONTIGUOUS, _OWNDATA, _WRITEABLE = 0x1 | 0x2, 0x4, 0x400
"""NumPy's flag bits of an array that is contiguous (C or Fortran order), of one that
owns its memory, and of one that may be written (``required`` holds it when a call
writes in place)."""


@njit
def _load_int64(address):
    return numba.carray(_voidptr(address), (1,), np.int64)[0]


@njit
def _load_int32(address):
    return numba.carray(_voidptr(address), (1,), np.int32)[0]


@njit
def _distinct(addresses):
    """Whether no address appears twice: an open-addressing hash set (sorting took
    30 ns per address, this a few)."""
    bits = 1
    while (1 << bits) < 2 * addresses.size:
        bits += 1
    slots = np.zeros(1 << bits, np.int64)  # 0 marks a free slot: no object lives at address 0
    mask = (1 << bits) - 1
    for address in addresses:
        # Fibonacci hashing: the top bits of the product spread addresses of any alignment
        h = np.int64((np.uint64(address) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits))
        while slots[h] != 0:
            if slots[h] == address:
                return False
            h = (h + 1) & mask
        slots[h] = address
    return True


@njit(cache=True)
def in_address_order(lo, hi):
    """Whether the non-empty byte ranges ``[lo[i], hi[i])`` come one after another in
    address order, ascending or descending: then no two overlap. One pass; arrays
    allocated one after another, or cut from one buffer in turn, mostly do. False says
    nothing: ranges out of order may still be disjoint."""
    ascending = descending = True
    previous = -1
    for i in range(lo.size):
        if lo[i] >= hi[i]:
            continue
        if previous >= 0:
            ascending &= lo[i] >= hi[previous]
            descending &= hi[i] <= lo[previous]
            if not (ascending or descending):
                return False
        previous = i
    return True


@njit(cache=True)
def disjoint(lo, hi):
    """Whether the byte ranges ``[lo[i], hi[i])`` are pairwise disjoint (an empty one meets
    nothing): `in_address_order`, else by sorting both ends (O(n log n); for a few hundred
    ranges, NumPy's sort is faster beyond)."""
    if in_address_order(lo, hi):
        return True
    keep = lo < hi
    starts, ends = np.sort(lo[keep]), np.sort(hi[keep])
    for k in range(starts.size - 1):  # disjoint iff each end comes before the next start
        if starts[k + 1] < ends[k]:
            return False
    return True


@njit
def _owner(obj, flags, ndarray_type):
    """The array object that owns the memory of the array at ``obj``: itself, or its base if
    that is a ``numpy.ndarray`` owning its memory; 0 if neither (a base of another kind)."""
    if flags & _OWNDATA:
        return obj
    base = _load_int64(obj + _BASE)
    if base != 0 and _load_int64(base + _TYPE) == ndarray_type and _load_int32(base + _FLAGS) & _OWNDATA:
        return base
    return 0


@njit(cache=True)
def _read_array_headers(object_addresses, ndarray_type, owners):
    """``(ok, data, size, descr, flags, may_share)``; ok: every object is a distinct
    ``numpy.ndarray``. With ``owners``, may_share is False when no two arrays can share
    memory because no two have the same owner (`_owner`, all known); else it is True
    (and then the memory itself decides)."""
    n = object_addresses.size
    data = np.empty(n, np.int64)
    size = np.empty(n, np.int64)
    descr = np.empty(n, np.int64)
    flags = np.empty(n, np.int64)
    if not (owners or _distinct(object_addresses)):  # the same object twice
        return False, data, size, descr, flags, True
    owner = np.empty(n, np.int64) if owners else object_addresses  # written only with owners
    all_own = known = True
    for i in range(n):
        obj = object_addresses[i]
        if _load_int64(obj + _TYPE) != ndarray_type:  # checked before reading further
            return False, data, size, descr, flags, True
        data[i] = _load_int64(obj + _DATA)
        dims = _load_int64(obj + _DIMS)
        size[i] = 1
        for axis in range(_load_int32(obj + _NDIM)):
            size[i] *= _load_int64(dims + 8 * axis)
        descr[i] = _load_int64(obj + _DESCR)
        flags[i] = _load_int32(obj + _FLAGS)
        if owners and not flags[i] & _OWNDATA:
            if all_own:  # the first view: the arrays before it are their own owners
                owner[:i] = object_addresses[:i]
                all_own = False
            owner[i] = _owner(obj, flags[i], ndarray_type)
            known &= owner[i] != 0
        elif owners and not all_own:
            owner[i] = obj
    if not owners:
        return True, data, size, descr, flags, True
    if all_own:  # distinct objects owning their memory share none
        return _distinct(object_addresses), data, size, descr, flags, False
    if known and _distinct(owner):  # distinct owners: distinct objects too
        return True, data, size, descr, flags, False
    return _distinct(object_addresses), data, size, descr, flags, True


def plain_headers(objects, required):
    """What a kernel table needs of distinct ``numpy.ndarray``s with every ``required``
    flag bit: ``(data, size, descr, flags, one_dtype, none_empty, contiguous, total,
    may_share)`` (data addresses, sizes, dtype object addresses and flags per array;
    whether they share one dtype, whether none is empty, whether all are contiguous, the
    number of elements; with the writeable flag ``required``, whether two may share
    memory, see `_read_array_headers`), or None.

    None unless every object is an exact ``numpy.ndarray`` with those flags and none
    appears twice. One call for all of them, reading each array object's fields
    directly: asking NumPy costs a microsecond or more per array and attribute. The
    layout is confirmed once against NumPy's own answers; where it differs (another
    interpreter build) this always returns None and callers take the general path.
    """
    if not _header_layout_confirmed():
        return None
    ok, *headers = _plain_headers(object_ids(objects), id(np.ndarray), required)
    return headers if ok else None


@njit(cache=True)
def _plain_headers(object_addresses, ndarray_type, required):
    ok, data, size, descr, flags, may_share = _read_array_headers(
        object_addresses, ndarray_type, required & _WRITEABLE != 0
    )
    one_dtype, none_empty, contiguous, total = True, True, True, 0
    for i in range(size.size if ok else 0):
        ok &= (flags[i] & required) == required
        one_dtype &= descr[i] == descr[0]
        none_empty &= size[i] > 0
        contiguous &= flags[i] & _CONTIGUOUS != 0
        total += size[i]
    return ok, data, size, descr, flags, one_dtype, none_empty, contiguous, total, may_share


# ------------------------------------------------------------- strided arrays
# A kernel table describes a leaf as rows of runs (see ``gradclip._table``, whose `_runs`
# walks a leaf's axes in Python). For arrays whose headers were read above, the same
# rows, in the same order, come from one compiled call: ~0.2 us per array instead of
# ~15 us of Python and NumPy calls.

_MAX_DIMS = 64
"""The most axes a NumPy array has (NPY_MAXDIMS: 64 from NumPy 2 on, 32 before)."""


def array_rows(objects, data, size, flags, itemsize):
    """The table rows of ``numpy.ndarray``s whose headers `plain_headers` read (``data``,
    ``size``, ``flags``; ``itemsize``: int64, one per array), leaf ``i`` being array ``i``:
    ``(addr, count, step, seg_leaf, lo, hi)``, the rows as `_table.build` makes them and
    each array's byte range (``lo == hi == 0`` when empty); or None, leaving it to the
    general path, if an array has a zero stride or one that is no multiple of its
    itemsize."""
    ok, *rows = _array_rows(object_ids(objects), data, size, flags, itemsize)
    return rows if ok else None


@njit
def _walk(obj, itemsize, lengths, strides):
    """The axes that walk the array at ``obj`` as `_table._axes` and `_table._merged` find
    them: ``(ok, base, m)``, the merged axes in ``lengths[:m]`` and ``strides[:m]`` (in
    bytes), innermost first, from the lowest address ``base``; not ok for a stride that is
    zero or no multiple of ``itemsize``."""
    ndim = _load_int32(obj + _NDIM)
    dims, steps = _load_int64(obj + _DIMS), _load_int64(obj + _STRIDES)
    base = _load_int64(obj + _DATA)
    m = 0
    for axis in range(ndim):
        n, s = _load_int64(dims + 8 * axis), _load_int64(steps + 8 * axis)
        if n == 1:
            continue
        if s == 0 or s % itemsize:
            return False, base, 0
        if s < 0:  # flipped
            base += (n - 1) * s
            s = -s
        j = m  # by stride, ties in axis order
        while j > 0 and strides[j - 1] > s:
            lengths[j], strides[j] = lengths[j - 1], strides[j - 1]
            j -= 1
        lengths[j], strides[j] = n, s
        m += 1
    if m == 0:
        return True, base, 0
    k = 0
    for j in range(1, m):  # merge the axes that tile the one inside them
        if strides[j] == lengths[k] * strides[k]:
            lengths[k] *= lengths[j]
        else:
            k += 1
            lengths[k], strides[k] = lengths[j], strides[j]
    return True, base, k + 1


@njit(cache=True)
def _array_rows(object_addresses, data, size, flags, itemsize):
    n = object_addresses.size
    lengths, strides, index = np.empty(_MAX_DIMS, np.int64), np.empty(_MAX_DIMS, np.int64), np.empty(_MAX_DIMS, np.int64)
    lo, hi = np.zeros(n, np.int64), np.zeros(n, np.int64)
    rows = 0
    for i in range(n):  # count the rows, find the byte ranges
        if size[i] == 0:
            continue
        if flags[i] & _CONTIGUOUS:
            rows += 1
            lo[i], hi[i] = data[i], data[i] + size[i] * itemsize[i]
            continue
        ok, base, m = _walk(object_addresses[i], itemsize[i], lengths, strides)
        if not ok:
            empty = np.empty(0, np.int64)
            return False, empty, empty, empty, empty, lo, hi
        lo[i] = hi[i] = base
        for j in range(m):
            hi[i] += (lengths[j] - 1) * strides[j]
        hi[i] += itemsize[i]
        rows += np.prod(lengths[1:m]) if m > 1 else 1
    columns = np.empty((4, rows), np.int64)
    addr, count, step, seg_leaf = columns[0], columns[1], columns[2], columns[3]
    r = 0
    for i in range(n):
        if size[i] == 0:
            continue
        if flags[i] & _CONTIGUOUS:
            addr[r], count[r], step[r], seg_leaf[r] = data[i], size[i], 1, i
            r += 1
            continue
        _, base, m = _walk(object_addresses[i], itemsize[i], lengths, strides)
        inner, inner_step = (lengths[0], strides[0] // itemsize[i]) if m else (1, 1)
        index[:m] = 0
        offset = 0
        for _ in range(np.prod(lengths[1:m]) if m > 1 else 1):
            addr[r], count[r], step[r], seg_leaf[r] = base + offset, inner, inner_step, i
            r += 1
            j = m - 1  # the next row: the outermost axis moves fastest, as in `_table._runs`
            while j >= 1:
                index[j] += 1
                offset += strides[j]
                if index[j] < lengths[j]:
                    break
                offset -= lengths[j] * strides[j]
                index[j] = 0
                j -= 1
    return True, addr, count, step, seg_leaf, lo, hi


# ------------------------------------------------------- a plain list in one call
# On a few small leaves, Python steps and compiled-function dispatches (~1 us each) cost
# more than the arithmetic. For the common call, a list of distinct arrays of one dtype,
# a whole operation runs as one compiled call built from the drivers and helpers of the
# general path, so both give the same bits. Each operation has one such function per
# driver kind: Numba compiles every function a function calls, and the parallel drivers,
# slow to compile, are then compiled only once a list is large enough.
#
# A list is described by ``plain``: its address, the ndarray type's and the dtype's,
# the flags `plain_headers` checks (``required``) and the range of element counts the
# function takes. Each returns ``(status, result)``; unless it RAN, nothing was written.
# The ops go to the drivers as run-time integers, as the general path passes them, so
# the drivers compiled for it serve (constants would compile copies).

RAN, DECLINED, OUT_OF_RANGE = range(3)


@njit(inline="always")
def _plain_table(plain, itemsize):
    """``(status, leaves, addr, count, step, seg_leaf)``: the list's table, or why not. A
    call that writes declines arrays that may share memory (see `_read_array_headers` and
    `in_address_order`; ``itemsize``: the dtype's); the general path then decides, and
    names them."""
    list_address, ndarray_type, dtype_address, required, lowest_size, size_limit = plain
    objects = _list_items(list_address)
    ok, data, size, descr, flags, one_dtype, _, contiguous, total, may_share = _plain_headers(
        objects, ndarray_type, required
    )
    n = size.size
    status = RAN
    if not (ok and n and one_dtype and descr[0] == dtype_address):
        status = DECLINED
    elif not lowest_size <= total < size_limit:
        status = OUT_OF_RANGE
    if status != RAN or contiguous:  # a row per array
        addr, count, step, seg_leaf, lo, hi = data, size, np.ones(n, np.int64), np.arange(n), data, data + size * itemsize
    else:
        ok, addr, count, step, seg_leaf, lo, hi = _array_rows(objects, data, size, flags, np.full(n, itemsize))
        status = RAN if ok else DECLINED
    if status == RAN and required & _WRITEABLE and may_share and not in_address_order(lo, hi):
        status = DECLINED  # arrays that may share memory: the general path decides
    return status, n, addr, count, step, seg_leaf


@njit(inline="always")
def _norm_and_clip(reduce, update, plain, max_norm, eps, tiny, wide, witness):
    status, n, addr, count, step, seg_leaf = _plain_table(plain, witness.itemsize)
    if status != RAN:
        return status, 0.0
    sums = np.zeros(n)
    reduce(np.int64(SUMSQ), addr, count, step, seg_leaf, 2.0, sums, sums, witness)
    norms, _, any_redo = norms_from_sums(sums, 2.0, tiny, np.full(n, wide))
    if any_redo:
        return DECLINED, 0.0
    total = fold_norms(norms, 2.0)  # finite: every sum of squares is
    if total > max_norm:
        update(np.int64(SCALE), addr, count, step, seg_leaf, np.full(n, max_norm / (total + eps)), 0.0, witness)
    return RAN, total


@njit(inline="always")
def _count_nonfinite(reduce, plain, witness):
    status, n, addr, count, step, seg_leaf = _plain_table(plain, witness.itemsize)
    counts = np.zeros(n)
    if status == RAN:
        reduce(np.int64(NONFINITE), addr, count, step, seg_leaf, 2.0, counts, counts, witness)
    return status, np.int64(counts.sum())


@njit(inline="always")
def _update_in_place(update, plain, op, bound, witness):
    status, _, addr, count, step, seg_leaf = _plain_table(plain, witness.itemsize)
    changed = np.int64(0)
    if status == RAN:
        changed = update(op, addr, count, step, seg_leaf, np.zeros(0), bound, witness)
    return status, changed


@njit(cache=True)
def _plain_norm_serial(plain, max_norm, eps, tiny, wide, witness):
    return _norm_and_clip(_reduce_serial, _update_serial, plain, max_norm, eps, tiny, wide, witness)


@njit(cache=True)
def _plain_norm_parallel(plain, max_norm, eps, tiny, wide, witness):
    return _norm_and_clip(_reduce_parallel, _update_parallel, plain, max_norm, eps, tiny, wide, witness)


@njit(cache=True)
def _plain_nonfinite_serial(plain, witness):
    return _count_nonfinite(_reduce_serial, plain, witness)


@njit(cache=True)
def _plain_nonfinite_parallel(plain, witness):
    return _count_nonfinite(_reduce_parallel, plain, witness)


@njit(cache=True)
def _plain_update_serial(plain, op, bound, witness):
    return _update_in_place(_update_serial, plain, op, bound, witness)


@njit(cache=True)
def _plain_update_parallel(plain, op, bound, witness):
    return _update_in_place(_update_parallel, plain, op, bound, witness)


NO_LIMIT = 1 << 62
"""A ``size_limit`` that takes any list."""


def _run_plain(serial, parallel, objects, dtype, required, size_limit, *args):
    """The result of ``serial``, or of ``parallel`` for many elements; None unless one ran."""
    if not (_header_layout_confirmed() and _list_layout_confirmed()):
        return None
    plain = (id(objects), id(np.ndarray), id(dtype), required)
    threads = parallel_allowed()
    status, result = serial((*plain, 0, PARALLEL_MIN if threads else size_limit), *args)
    if status == OUT_OF_RANGE and threads:
        _start_pool()  # before ``parallel`` is loaded (see "the thread pool")
        status, result = parallel((*plain, PARALLEL_MIN, size_limit), *args)
    return result if status == RAN else None


def plain_list_norm(objects, dtype, required, size_limit, max_norm, eps, tiny, wide, witness):
    """The total 2-norm of a list of ``numpy.ndarray``s in one call, every leaf scaled in
    place by ``max_norm / (total + eps)`` when ``total > max_norm``; or None, with
    nothing written, unless every object is a distinct array of ``dtype`` with the
    `plain_headers` flags and strides `array_rows` takes, they hold fewer than
    ``size_limit`` elements, no leaf's norm
    needs redoing (`norms_from_sums`), and (with the writeable flag ``required``) no two
    arrays share memory.

    ``wide``: ``dtype`` is float64-based; ``witness``: its kernel element type.
    """
    return _run_plain(
        _plain_norm_serial, _plain_norm_parallel, objects, dtype, required, size_limit,
        max_norm, eps, tiny, wide, witness,
    )  # fmt: skip


def plain_list_count_nonfinite(objects, dtype, required, witness):
    """The non-finite elements of a plain list (as `plain_list_norm` takes it), or None."""
    count = _run_plain(
        _plain_nonfinite_serial, _plain_nonfinite_parallel, objects, dtype, required, NO_LIMIT, witness
    )
    return None if count is None else int(count)


def plain_list_update(op, objects, dtype, required, bound, witness):
    """`update_table`'s ``CLAMP`` or ``ZERO_NONFINITE`` on a plain list (as `plain_list_norm`
    takes it): the elements changed, or None with nothing written."""
    changed = _run_plain(
        _plain_update_serial, _plain_update_parallel, objects, dtype, required, NO_LIMIT,
        op, float(bound), witness,
    )  # fmt: skip
    return None if changed is None else int(changed)


# ------------------------------------------------------------- accumulation
# ``accumulate_table`` adds every leaf of one table into a buffer of its own: the
# source rows are the table's (any layout, any step); destination row ``r`` is
# contiguous, ``count[r]`` elements from the address ``dst_addr[r]``, of the
# buffers' element type (``dst_witness``). The chunks are the table's, so the
# serial and the parallel driver write the same bits.


@njit(fastmath=FAST, cache=True)
def accumulate_cpu_(dst, src, first):
    """dst <- round(src) if ``first``, else dst <- round(dst + src), the sum in float64.

    ``dst`` is a contiguous chunk of a buffer, ``src`` the grad elements that land there
    (contiguous or strided); complex values are added and rounded part by part.
    """
    if first:
        for i in range(dst.size):
            dst[i] = _narrow(_widen(src[i]), dst)
    else:
        for i in range(dst.size):
            dst[i] = _narrow(_widen(dst[i]) + _widen(src[i]), dst)


@njit(inline="always")
def _accumulate_at(k, row, lo, addr, count, step, dst_addr, first, witness, dst_witness):
    r, offset, n = _chunk_row(k, row, lo, count)
    dst = numba.carray(_voidptr(dst_addr[r] + offset * dst_witness.itemsize), (n,), dst_witness.dtype)
    start = addr[r] + offset * step[r] * witness.itemsize
    if step[r] == 1:
        accumulate_cpu_(dst, numba.carray(_voidptr(start), (n,), witness.dtype), first)
    else:
        w = numba.carray(_voidptr(start), ((n - 1) * step[r] + 1,), witness.dtype)
        accumulate_cpu_(dst, w[:: step[r]], first)


@njit(cache=True)
def _accumulate_serial(addr, count, step, dst_addr, first, witness, dst_witness):
    row, lo = _chunks(count)
    for k in range(row.size):
        _accumulate_at(k, row, lo, addr, count, step, dst_addr, first, witness, dst_witness)


@njit(cache=True, parallel=True)
def _accumulate_parallel(addr, count, step, dst_addr, first, witness, dst_witness):
    row, lo = _chunks(count)
    for k in prange(row.size):
        _accumulate_at(k, row, lo, addr, count, step, dst_addr, first, witness, dst_witness)


def accumulate_table(table, dst_addr, dst_witness, first):
    """Add every row of ``table`` into the contiguous rows at ``dst_addr`` (int64, one per row).

    ``first``: write the (rounded) grads instead of adding them, the first micro-batch
    of a window. ``dst_witness`` is an empty array of the buffers' kernel element type.
    """
    driver = _accumulate_parallel if _in_parallel(table.size) else _accumulate_serial
    driver(table.addr, table.count, table.step, dst_addr, bool(first), table.witness, dst_witness)


# ----------------------------------------- half precision by one coefficient
# A 16-bit element has 65,536 possible values. Scaling many of them by one coefficient,
# the exact result of every code is known in ~50 us (`scaled_codes`, made with the very
# expressions `scale_cpu_` uses, so the bits are the same by construction). The elements
# are then scaled in one of two ways, both giving those results:
#
# - in float32 (`scale32_cpu_`: the code widened, multiplied by a float32 factor and
#   rounded to nearest-even in 32-bit lanes; ~6 cycles per 16 codes, at memory speed, 3x
#   faster than the float64 product and 1.5x faster than a lookup), with a factor that
#   gives every code's exact result: the nearest float32 to the coefficient or one of its
#   neighbours, checked on all 65,536 codes (`float32_factor`). Each element being one of
#   those codes, each gets its exact result. Near a tie of the float64 product, or where
#   bfloat16's result is subnormal and the float32 product rounds twice, a factor may miss
#   some codes: the factor taken is the one whose missed codes are the smallest in
#   magnitude (none, for ~99% of coefficients), and a block of `SCALE_BLOCK` elements that
#   holds such a small nonzero code is looked up instead. The bench's coefficient, just
#   under 0.5, misses bfloat16's subnormal results on every factor; gradients rarely hold
#   such codes, so it stays in float32 (one thread, 16M codes: 6.4 -> 3.3 ms);
# - otherwise (no float32 path) by a lookup into the table of results, per element.
#
# float16 is scaled in float32 only where F16C converts it (`_f16c`).


@njit(cache=True)
def scaled_codes(codes, coef):
    """``round(x * coef)`` for every 16-bit code, at index ``uint16(code)``; ``codes``
    holds every code once, in that order."""
    table = np.empty_like(codes)
    for i in range(codes.size):
        table[i] = _narrow(_times(_widen(codes[i]), coef), codes)
    return table


def _scaled32(x, factor):
    """A 16-bit code times a float32 ``factor``, the product in float32 rounded to the
    code's format (nearest-even); a NaN product as `_narrow` gives it."""


@overload(_scaled32)
def _scaled32_impl(x, factor):
    if x == types.int16:
        return lambda x, factor: np.int16(np.uint16(_f32_to_bf16(_bf16_to_f32(x) * factor)))
    if x == types.uint16 and _f16c():
        return lambda x, factor: _f32_to_f16_rounded(_f16_to_f32(x) * factor)
    return None


def scales_in_float32(witness):
    """Whether `float32_factor` and `scale32_cpu_` take codes of ``witness``'s type."""
    return witness.dtype == np.int16 or (witness.dtype == np.uint16 and _f16c())


@njit(cache=True)
def scale32_cpu_(v, factor):
    """x <- x * factor for 16-bit codes, in float32 (see `float32_factor`)."""
    for i in range(v.size):
        v[i] = _scaled32(v[i], factor)


SCALE_BLOCK = 1024
"""Elements `_scale_codes_` checks for codes its float32 factor misses before it scales them."""

ALL_CODES = 1 << 15
"""A ``below`` of `float32_factor` that no code's magnitude reaches: every code missed."""


@njit(cache=True)
def float32_factor(codes, results, coef, tries):
    """``(factor, below)``: a float32 with which `scale32_cpu_` turns every code whose
    magnitude (its bits without the sign) is 0 or at least ``below`` into its entry of
    ``results`` (the exact products by ``coef``, from `scaled_codes`). Of the nearest
    float32 to ``coef`` and its neighbours, nearest first, ``tries`` in all, the first
    with the lowest ``below`` (1: every code); ``(NaN, ALL_CODES)`` if each misses a zero."""
    work = np.empty_like(codes)
    up = down = factor = np.float32(coef)
    best, best_below = np.float32(np.nan), ALL_CODES
    for k in range(tries):
        if k % 2:
            up = factor = np.nextafter(up, np.float32(np.inf))
        elif k:
            down = factor = np.nextafter(down, np.float32(-np.inf))
        work[:] = codes
        scale32_cpu_(work, factor)
        below = 1
        for i in range(codes.size):
            if work[i] != results[i]:
                below = max(below, (i & 0x7FFF) + 1 if i & 0x7FFF else ALL_CODES + 1)
        if below < best_below:
            best, best_below = factor, below
        if below == 1:
            break
    return best, best_below


@njit
def _look_up_(v, table):
    for i in range(v.size):
        v[i] = table[np.uint16(v[i])]


@njit(inline="always")
def _scale_codes_at(k, row, lo, addr, count, step, results, factor, below, in_float32):
    r, offset, n = _chunk_row(k, row, lo, count)
    start = addr[r] + offset * step[r] * results.itemsize
    if step[r] == 1:  # a contiguous view, which vectorises ('A' views do not)
        _scale_codes_(numba.carray(_voidptr(start), (n,), results.dtype), results, factor, below, in_float32)
    else:
        w = numba.carray(_voidptr(start), ((n - 1) * step[r] + 1,), results.dtype)
        _scale_codes_(w[:: step[r]], results, factor, below, in_float32)


def _scale_codes_(v, results, factor, below, in_float32):
    """`scale32_cpu_` or `_look_up_` on one chunk: by lookup alone unless ``in_float32``,
    else by blocks (see `float32_factor`)."""


@overload(_scale_codes_, inline="always")
def _scale_codes_impl(v, results, factor, below, in_float32):
    if v.dtype == types.uint16 and not _f16c():  # by lookup alone (see `scales_in_float32`)
        return lambda v, results, factor, below, in_float32: _look_up_(v, results)

    def impl(v, results, factor, below, in_float32):
        if not in_float32:
            _look_up_(v, results)
        elif below == 1:  # the factor gives every code's result
            scale32_cpu_(v, factor)
        else:
            for start in range(0, v.size, SCALE_BLOCK):
                block = v[start : start + SCALE_BLOCK]
                if _any_missed(block, below):
                    _look_up_(block, results)
                else:
                    scale32_cpu_(block, factor)

    return impl


@njit
def _any_missed(v, below):
    """Whether a code of ``v`` has a magnitude in ``[1, below)`` (``below >= 1``)."""
    lowest = np.uint16(0xFFFF)
    for i in range(v.size):  # magnitude - 1 wraps for 0; a min reduction vectorises best
        lowest = min(lowest, np.uint16(_magnitude_bits(v[i]) - np.uint16(1)))
    return lowest < np.uint16(below - 1)


@njit(cache=True)
def _scale_codes_serial(addr, count, step, results, factor, below):
    row, lo = _chunks(count)
    if factor == factor:
        for k in range(row.size):
            _scale_codes_at(k, row, lo, addr, count, step, results, factor, below, True)
    else:
        for k in range(row.size):
            _scale_codes_at(k, row, lo, addr, count, step, results, factor, below, False)


@njit(cache=True, parallel=True)
def _scale_codes_parallel(addr, count, step, results, factor, below):
    row, lo = _chunks(count)
    if factor == factor:
        for k in prange(row.size):
            _scale_codes_at(k, row, lo, addr, count, step, results, factor, below, True)
    else:
        for k in prange(row.size):
            _scale_codes_at(k, row, lo, addr, count, step, results, factor, below, False)


def scale_codes_table(table, results, factor, below):
    """Replace every element of ``table`` (a 16-bit type) by its entry in ``results`` (from
    `scaled_codes`): in float32 by ``factor`` where ``below`` allows (both from
    `float32_factor`), else by lookup; by lookup alone if ``factor`` is NaN."""
    driver = _scale_codes_parallel if _in_parallel(table.size) else _scale_codes_serial
    driver(table.addr, table.count, table.step, results, np.float32(factor), np.int64(below))


@njit(cache=True)
def _read_layouts(object_addresses, ndarray_type):
    total = 0
    for obj in object_addresses:
        if _load_int64(obj + _TYPE) != ndarray_type:  # checked before reading further
            return False, np.empty(0, np.int64)
        total += 2 + 2 * _load_int32(obj + _NDIM)
    out = np.empty(total, np.int64)
    j = 0
    for obj in object_addresses:
        ndim = _load_int32(obj + _NDIM)
        out[j] = ndim
        out[j + 1] = _load_int64(obj + _DESCR)
        dims, strides = _load_int64(obj + _DIMS), _load_int64(obj + _STRIDES)
        for axis in range(ndim):
            out[j + 2 + axis] = _load_int64(dims + 8 * axis)
            out[j + 2 + ndim + axis] = _load_int64(strides + 8 * axis)
        j += 2 + 2 * ndim
    return True, out


def array_layouts(arrays):
    """The dtype object, shape and strides of ``numpy.ndarray``s, as one int64 array.

    Per array: ndim, the dtype object's address, the shape, the strides. Two lists of
    arrays with equal layouts give equal results. None unless every object is an exact
    ``numpy.ndarray`` and the header layout is confirmed (as for `plain_headers`).
    """
    if not _header_layout_confirmed():
        return None
    ok, layouts = _read_layouts(object_ids(arrays), id(np.ndarray))
    return layouts if ok else None


def object_ids(objects):
    """``id()`` of every object, as int64.

    A list's own item pointers are read where the list keeps them (a few ns per item);
    otherwise an object array of the items holds exactly those pointers, and NumPy
    fills it in C (a fifth of the time of ``map(id, ...)``, still ~15 ns per item).
    """
    if type(objects) is list and _list_layout_confirmed():
        return _list_items(id(objects))
    holder = np.fromiter(objects, dtype=object, count=len(objects))
    return _pointers(holder.ctypes.data, holder.size)


# CPython's list object, ``PyListObject``: after the object header comes ob_size, then
# ob_item, the address of the item pointers.
_LIST_SIZE, _LIST_ITEMS = 16, 24


@njit(cache=True)
def _list_items(address):
    """The item pointers of the list object at ``address``."""
    return _pointers(_load_int64(address + _LIST_ITEMS), _load_int64(address + _LIST_SIZE))


@njit(cache=True)
def _pointers(base, n):
    """The ``n`` pointers stored from address ``base`` on."""
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = _load_int64(base + 8 * i)
    return out


@functools.cache
def _list_layout_confirmed():
    """Whether list objects keep their size and items where `_list_items` reads them."""
    probe = [object() for _ in range(5)]
    probe.pop()  # the item array now has room to spare: the size must come from ob_size
    return _list_items(id(probe)).tolist() == [id(item) for item in probe] and _list_items(id([])).size == 0


@functools.cache
def _header_layout_confirmed():
    """Whether the array object fields read above are where this NumPy keeps them."""
    probes = [np.empty((3, 5), np.float32), np.empty((4, 2), order="F"), np.zeros((6, 7))[::2, ::-3], np.array(1.5)]
    probes[2].flags.writeable = False
    addresses = np.array([id(a) for a in probes], dtype=np.int64)
    ok, data, size, descr, flags, _ = _read_array_headers(addresses, id(np.ndarray), False)
    headers_match = ok and all(
        (data[i], size[i], descr[i], flags[i]) == (a.ctypes.data, a.size, id(a.dtype), a.flags.num)
        for i, a in enumerate(probes)
    )
    ok, layouts = _read_layouts(addresses, id(np.ndarray))
    expected = [x for a in probes for x in (a.ndim, id(a.dtype), *a.shape, *a.strides)]
    if not (headers_match and ok and layouts.tolist() == expected):
        return False
    owner, other = np.empty(4), np.empty(3)  # the base field, read for `_owner`
    owners = [([owner, other], False), ([owner, owner[1:]], True), ([owner[1:], other[::2]], False)]
    return all(
        _read_array_headers(np.array([id(a) for a in arrays], dtype=np.int64), id(np.ndarray), True)[-1] == shared
        for arrays, shared in owners
    )
