"""CUDA kernels: ``@cuda.jit`` twins of ``kernels/cpu.py``, one launch per pass and dtype.

Imported only when a GPU array arrives (``gradclip._cuda``); importing it compiles
nothing. Each kernel is compiled once per element type, on first use, and cached on
disk (``cache=True``).

Layout contract. The caller (``gradclip._cuda``) describes the leaves of one call
in an int64 ``table``, made and uploaded once per plan:

- a header (``H_*``) saying where the other regions start;
- one *row* per leaf: ``OFFSET`` (where its walk starts in its group's view, in
  elements), ``SIZE``, ``NDIM`` and ``(length, step)`` pairs from ``AXES`` on,
  innermost first, all in elements (the axes merged as far as they tile, so a
  contiguous, transposed or reversed leaf has one axis with step +-1, and a 0-d
  leaf one axis of length 1); its number of chunks and where its partial results go
  (``NCHUNKS``, ``PARTIAL``); ``DENSE``, where element ``k`` of its walk goes in a
  dense buffer of its group (at ``DENSE + k``); ``WIDE``, whether it is float64-based;
- one *chunk* per ``CHUNK`` elements of a row (the last one shorter): its row, its
  first element and its length (``CHUNK_*``);
- one *group* per dtype: its chunks and rows (``GROUP_*``);
- ``tickets``, one per row, zero between launches;
- the rows of each leaf position (``H_POSITIONS``), for per-position results.

A float64 ``scratch`` array holds, per row, the reduced value (``H_SUMS``), the
peak of the scaled route (``H_PEAKS``, -1 where a row does not take it), the norm
(``H_NORMS``) and a coefficient (``H_COEFS``); the total (``H_TOTAL``); and the
chunks' partial results (``H_PARTIALS``).

A pass over one dtype group is one launch of a grid of a few blocks per
multiprocessor that loop over the group's chunks. Every pass kernel takes the same
arguments: ``(data, out, table, scratch, group, a, b, c)``: ``data`` is one 1-d
view of the group's element type that spans all its leaves, ``out`` a 1-d array
for results (the copy kernels' destination, or the user's norm), and ``a, b, c``
three float64 parameters, whose meaning each kernel states.

Addressing: element ``k`` of a row with one axis is at ``OFFSET + k * step`` (no
division). With two axes a thread divides once per chunk and then steps its
(inner, outer) index by ``blockDim`` without dividing. Rows with more axes divide
per element (three or more axes that do not merge: rare). Reductions keep four
accumulators per thread and issue four loads before using them; updates load four
elements before storing any.

Reductions accumulate in float64, fold each block in shared memory in a fixed
tree, and give one value per chunk. A row of one chunk stores it at once; a row of
several stores a partial per chunk, and the block that completes the row (an
integer ticket, counted atomically) folds the row's partials in chunk order. The
partials of different rows never share a 128-byte line, so that block never reads
a line its multiprocessor cached before the others wrote it. ``finish_cuda`` (one
block) turns the rows' values into norms and their total. No float atomics, and
the split into chunks and the folding order depend on the table alone: results are
bit-identical from launch to launch.

Element types ("codecs"): float16, float32 and float64 are read natively and
widened exactly to float64; complex64 and complex128 likewise to complex128;
bfloat16 travels as ``int16`` bits, decoded arithmetically. Writes round once, to
nearest-even: the native conversion for float16 / float32 / complex64, an integer
rounding for bfloat16 (straight from float64, so there is no double rounding). No
fastmath: NaN and inf must be seen.
"""

import functools
import math

import numpy as np
from numba import cuda, int32

THREADS_PER_BLOCK = 256
"""Threads per block of every launch (a power of two; tests patch it small)."""

CHUNK = 1 << 14
"""Elements per chunk: the unit of work and of partial results."""

BLOCKS_PER_SM = 16
"""Blocks per multiprocessor in a pass's grid (never more than its chunks; on an H200 the
fastest W2 norm of 128, 256 and 512 threads by 4, 8 and 16 blocks, bench/gpu.py's sweep)."""

FINISH_THREADS = 1024
"""Threads of ``finish_cuda``'s one block (a power of two), which loops over every row."""

PARTIAL_ALIGN = 16
"""Each row's partials start on a multiple of this many float64 (128 bytes)."""

# The header of ``table``: where its regions and the scratch's regions start.
(
    H_ROWS,
    H_WIDTH,
    H_NROWS,
    H_CHUNKS,
    H_GROUPS,
    H_TICKETS,
    H_POSITIONS,
    H_NPOSITIONS,
    H_SUMS,
    H_PEAKS,
    H_NORMS,
    H_COEFS,
    H_TOTAL,
    H_PARTIALS,
    HEADER,
) = range(15)

# A row's fields; its axes follow from AXES on.
OFFSET, SIZE, NDIM, NCHUNKS, PARTIAL, DENSE, WIDE, AXES = range(8)

# A chunk's fields, and a group's.
CHUNK_ROW, CHUNK_START, CHUNK_COUNT, CHUNK_SLOT, CHUNK_WIDTH = range(5)
GROUP_CHUNK, GROUP_NCHUNKS, GROUP_WIDTH = range(3)

# What ``finish_cuda`` does.
FOLD_SUMS, FOLD_PEAKS, FOLD_SCALED, FOLD_COUNT = range(4)
FINAL, ALL_ROWS = 1, 2  # its flags

# Where the update kernels take each row's factor from (their ``c``).
BY_TOTAL, BY_ROW_NORM, BY_OUT, BY_COEF, BY_ROW_COEF = range(5)

_FLOAT64 = np.dtype(np.float64)
_TINY = 2.0**-900
"""A float64 sum below this may have lost bits to underflow (as on the CPU)."""

_POW2_BIAS = 140
_POW2 = np.ldexp(1.0, np.arange(-_POW2_BIAS, _POW2_BIAS))
"""Exact powers of two, 2**-140 .. 2**139 (a constant table: the simulator's ldexp wants
Python ints)."""


# ----------------------------------------------------------------- device helpers


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


@cuda.jit(device=True)
def _chunk(table, group, c):
    """Chunk ``c`` of ``group``: its row's record, row, first element, length and partial slot."""
    g = table[H_GROUPS] + GROUP_WIDTH * group
    entry = table[H_CHUNKS] + CHUNK_WIDTH * (table[g + GROUP_CHUNK] + c)
    row = table[entry + CHUNK_ROW]
    record = table[H_ROWS] + table[H_WIDTH] * row
    return record, row, table[entry + CHUNK_START], table[entry + CHUNK_COUNT], table[entry + CHUNK_SLOT]


@cuda.jit(device=True)
def _nchunks(table, group):
    return table[table[H_GROUPS] + GROUP_WIDTH * group + GROUP_NCHUNKS]


@cuda.jit(device=True)
def _locate(table, record, k):
    """Where element ``k`` of the walk of the row at ``record`` lives (any number of axes)."""
    pos = table[record + OFFSET]
    for d in range(table[record + NDIM]):
        n = table[record + AXES + 2 * d]
        pos += (k % n) * table[record + AXES + 2 * d + 1]
        k //= n
    return pos


@cuda.jit(device=True)
def _start_2d(table, record, k):
    """For a row of two axes: the (inner, outer) index of element ``k``, and the position
    steps of both axes."""
    n0 = table[record + AXES]
    return k % n0, k // n0, n0, table[record + AXES + 1], table[record + AXES + 3]


@cuda.jit(device=True)
def _next_2d(inner, outer, n0, by_inner, by_outer):
    """The (inner, outer) index ``blockDim`` elements further on; ``by_*`` = divmod(blockDim, n0)."""
    inner += by_inner
    outer += by_outer
    if inner >= n0:
        inner -= n0
        outer += 1
    return inner, outer


@cuda.jit(device=True)
def _deliver(table, scratch, record, row, slot, value, is_max):
    """Store a chunk's folded ``value`` (every thread holds it) as its row's result, or as
    one partial of it; the block that completes a row of several chunks folds them."""
    nchunks = table[record + NCHUNKS]
    t = cuda.threadIdx.x
    if nchunks == 1:
        if t == 0:
            scratch[table[H_SUMS] + row] = value
        return
    last = cuda.shared.array(1, int32)
    partials = table[H_PARTIALS] + table[record + PARTIAL]
    if t == 0:
        scratch[partials + slot] = value
        cuda.threadfence()  # the partial is visible before the ticket is taken
        last[0] = cuda.atomic.add(table, table[H_TICKETS] + row, 1) == nchunks - 1
    cuda.syncthreads()
    if last[0]:
        cuda.threadfence()
        v = 0.0
        for i in range(t, nchunks, cuda.blockDim.x):
            v = _combine(v, scratch[partials + i], is_max)
        v = _block_fold(v, is_max)
        if t == 0:
            scratch[table[H_SUMS] + row] = v
            table[table[H_TICKETS] + row] = 0  # ready for the next pass
    cuda.syncthreads()  # ``last`` is read before the next chunk sets it


# --------------------------------------------------------------------- codecs


# float() after the widening is a no-op on the GPU (float() of a float16 alone stays a
# float16 there); in the simulator it gives a Python number, whose overflow to inf is silent.


@cuda.jit(device=True)
def _widen_real(x):
    return float(np.float64(x))


@cuda.jit(device=True)
def _widen_complex(x):
    return complex(np.complex128(x))


@cuda.jit(device=True)
def _times_real(x, coef):
    return x * coef


@cuda.jit(device=True)
def _times_complex(x, coef):
    return complex(x.real * coef, x.imag * coef)  # part by part: no NaN from inf * 0


@cuda.jit(device=True)
def _add_complex(x, y):
    return complex(x.real + y.real, x.imag + y.imag)


@cuda.jit(device=True)
def _add_real(x, y):
    return x + y


@cuda.jit(device=True)
def _zeroed_real(x):
    return 0.0


@cuda.jit(device=True)
def _zeroed_complex(x):
    re = x.real if math.isfinite(x.real) else 0.0
    im = x.imag if math.isfinite(x.imag) else 0.0
    return complex(re, im)


@cuda.jit(device=True)
def _store_native(v, pos, y):
    v[pos] = y  # one rounding to the element type


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


class Codec:
    """How one element type is read (``widen``), written (``store``), scaled, added and
    repaired, and its contribution to a scaled norm (``pow_scaled``)."""

    def __init__(self, widen, store, times, add, zeroed, pow_scaled):
        self.widen, self.store, self.times, self.add, self.zeroed = widen, store, times, add, zeroed
        self.pow_scaled = pow_scaled


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


FLOAT = Codec(_widen_real, _store_native, _times_real, _add_real, _zeroed_real, _pow_scaled)
COMPLEX = Codec(_widen_complex, _store_native, _times_complex, _add_complex, _zeroed_complex, _pow_scaled_complex)
BFLOAT16 = Codec(_widen_bf16, _store_bf16, _times_real, _add_real, _zeroed_real, _pow_scaled)


def codec(dtype):
    """The codec of leaves of ``dtype`` (a NumPy dtype)."""
    if dtype.name == "bfloat16":
        return BFLOAT16
    return COMPLEX if dtype.kind == "c" else FLOAT


# -------------------------------------------------------------------- kernels


def _kernel(name, function):
    """``function`` as a kernel named ``name`` (the name shows in profiles and keys the
    on-disk cache), compiled on first use and cached."""
    function.__name__ = function.__qualname__ = name
    return cuda.jit(cache=True)(function)


def _reduction(name, widen, element, is_max):
    """A reduction kernel: ``element`` of every element, summed (or max), one value per row
    in ``scratch[H_SUMS + row]``. ``a`` is p; with ``c`` set, rows whose peak is negative
    (not on the scaled route) are skipped."""

    def reduction(data, out, table, scratch, group, a, b, c):
        t = cuda.threadIdx.x
        threads = cuda.blockDim.x
        for chunk in range(cuda.blockIdx.x, _nchunks(table, group), cuda.gridDim.x):
            record, row, start, count, slot = _chunk(table, group, chunk)
            scale = scratch[table[H_PEAKS] + row]
            if c != 0.0 and scale < 0.0:
                continue  # block-uniform: no fold to join
            acc0 = acc1 = acc2 = acc3 = 0.0
            i = t
            if table[record + NDIM] == 1:
                step = table[record + AXES + 1]
                base = table[record + OFFSET] + start * step
                stride = threads * step
                while i + 7 * threads < count:  # eight loads in flight, then four sums
                    pos = base + i * step
                    x0, x1, x2, x3 = data[pos], data[pos + stride], data[pos + 2 * stride], data[pos + 3 * stride]
                    pos += 4 * stride
                    x4, x5, x6, x7 = data[pos], data[pos + stride], data[pos + 2 * stride], data[pos + 3 * stride]
                    acc0 = _combine(acc0, _combine(element(widen(x0), a, scale), element(widen(x4), a, scale), is_max), is_max)
                    acc1 = _combine(acc1, _combine(element(widen(x1), a, scale), element(widen(x5), a, scale), is_max), is_max)
                    acc2 = _combine(acc2, _combine(element(widen(x2), a, scale), element(widen(x6), a, scale), is_max), is_max)
                    acc3 = _combine(acc3, _combine(element(widen(x3), a, scale), element(widen(x7), a, scale), is_max), is_max)
                    i += 8 * threads
                while i < count:
                    acc0 = _combine(acc0, element(widen(data[base + i * step]), a, scale), is_max)
                    i += threads
            elif table[record + NDIM] == 2:
                inner, outer, n0, s0, s1 = _start_2d(table, record, start + i)
                by_inner, by_outer = threads % n0, threads // n0
                base = table[record + OFFSET]
                while i < count:
                    x = data[base + inner * s0 + outer * s1]
                    acc0 = _combine(acc0, element(widen(x), a, scale), is_max)
                    inner, outer = _next_2d(inner, outer, n0, by_inner, by_outer)
                    i += threads
            else:
                while i < count:
                    x = data[_locate(table, record, start + i)]
                    acc0 = _combine(acc0, element(widen(x), a, scale), is_max)
                    i += threads
            value = _block_fold(_combine(_combine(acc0, acc1, is_max), _combine(acc2, acc3, is_max), is_max), is_max)
            _deliver(table, scratch, record, row, slot, value, is_max)

    return _kernel(name, reduction)


def _update(name, widen, store, transform, counted):
    """An in-place update kernel: ``(write, y) = transform(x, coef)`` for every element ``x``
    (widened), storing ``y`` where ``write``. ``factor(...)`` gives each row's ``coef``
    and whether the row is written at all. ``counted``: count the written elements,
    per row, as a reduction does."""

    def update(data, out, table, scratch, group, a, b, c):
        t = cuda.threadIdx.x
        threads = cuda.blockDim.x
        for chunk in range(cuda.blockIdx.x, _nchunks(table, group), cuda.gridDim.x):
            record, row, start, count, slot = _chunk(table, group, chunk)
            active, coef = _factor(out, table, scratch, row, a, b, c)
            if not (active or counted):
                continue  # block-uniform
            written = 0.0
            i = t
            if table[record + NDIM] == 1:
                step = table[record + AXES + 1]
                base = table[record + OFFSET] + start * step
                stride = threads * step
                while i + 3 * threads < count:
                    p0 = base + i * step
                    p1, p2, p3 = p0 + stride, p0 + 2 * stride, p0 + 3 * stride
                    x0, x1, x2, x3 = widen(data[p0]), widen(data[p1]), widen(data[p2]), widen(data[p3])
                    w0, y0 = transform(x0, coef)
                    w1, y1 = transform(x1, coef)
                    w2, y2 = transform(x2, coef)
                    w3, y3 = transform(x3, coef)
                    if w0:
                        store(data, p0, y0)
                    if w1:
                        store(data, p1, y1)
                    if w2:
                        store(data, p2, y2)
                    if w3:
                        store(data, p3, y3)
                    if counted:
                        written += (1.0 if w0 else 0.0) + (1.0 if w1 else 0.0) + (1.0 if w2 else 0.0) + (1.0 if w3 else 0.0)
                    i += 4 * threads
                while i < count:
                    pos = base + i * step
                    w, y = transform(widen(data[pos]), coef)
                    if w:
                        store(data, pos, y)
                        written += 1.0
                    i += threads
            elif table[record + NDIM] == 2:
                inner, outer, n0, s0, s1 = _start_2d(table, record, start + i)
                by_inner, by_outer = threads % n0, threads // n0
                base = table[record + OFFSET]
                while i < count:
                    pos = base + inner * s0 + outer * s1
                    w, y = transform(widen(data[pos]), coef)
                    if w:
                        store(data, pos, y)
                        written += 1.0
                    inner, outer = _next_2d(inner, outer, n0, by_inner, by_outer)
                    i += threads
            else:
                while i < count:
                    pos = _locate(table, record, start + i)
                    w, y = transform(widen(data[pos]), coef)
                    if w:
                        store(data, pos, y)
                        written += 1.0
                    i += threads
            if counted:
                _deliver(table, scratch, record, row, slot, _block_fold(written, False), False)

    return _kernel(name, update)


@cuda.jit(device=True)
def _factor(out, table, scratch, row, a, b, c):
    """``(write the row, its factor)`` for the update kernels; ``c`` says where the factor
    comes from (``BY_*``). By a norm (the total, the row's own, or ``out[0]``):
    ``a / (norm + b)`` iff the norm is finite and above ``a`` (``max_norm``, ``eps``).
    ``BY_COEF``: ``a`` for every row; ``BY_ROW_COEF``: the row's coefficient, rows whose
    coefficient is 1 not written."""
    mode = np.int64(c)
    if mode == BY_COEF:
        return True, a
    if mode == BY_ROW_COEF:
        coef = scratch[table[H_COEFS] + row]
        return coef != 1.0, coef
    if mode == BY_TOTAL:
        norm = scratch[table[H_TOTAL]]
    elif mode == BY_ROW_NORM:
        norm = scratch[table[H_NORMS] + row]
    else:
        norm = out[0]
    clip = math.isfinite(norm) and norm > a
    return clip, a / (norm + b) if clip else 1.0


def _scale(times):
    @cuda.jit(device=True)
    def transform(x, coef):
        return True, times(x, coef)

    return transform


def _fill():
    @cuda.jit(device=True)
    def transform(x, value):
        return True, value

    return transform


def _clamp_transform():
    @cuda.jit(device=True)
    def transform(x, bound):
        """``bound`` is already rounded to the element type (exact in float64), so it is
        stored as it is, and comparing with it selects what the exact bound selects.
        NaN stays NaN (and is not written)."""
        if x > bound:
            return True, bound
        if x < -bound:
            return True, -bound
        return False, x

    return transform


def _zero_transform(zeroed):
    @cuda.jit(device=True)
    def transform(x, coef):
        if math.isfinite(x.real) and math.isfinite(x.imag):
            return False, x
        return True, zeroed(x)

    return transform


def _copy(name, widen_out, store_out, add_out, widen, accumulate):
    """A kernel writing element ``k`` of every row's walk to ``out[DENSE + k]``: the value
    itself (``accumulate`` False), or ``out + value`` in float64, rounded once to
    ``out``'s type (``accumulate`` True; with ``c`` set, the first micro-batch: the value
    alone)."""

    def copy(data, out, table, scratch, group, a, b, c):
        t = cuda.threadIdx.x
        threads = cuda.blockDim.x
        for chunk in range(cuda.blockIdx.x, _nchunks(table, group), cuda.gridDim.x):
            record, row, start, count, slot = _chunk(table, group, chunk)
            dense = table[record + DENSE] + start
            i = t
            while i < count:
                if table[record + NDIM] == 1:
                    pos = table[record + OFFSET] + (start + i) * table[record + AXES + 1]
                else:
                    pos = _locate(table, record, start + i)
                if not accumulate:
                    out[dense + i] = data[pos]
                elif c != 0.0:
                    store_out(out, dense + i, widen(data[pos]))
                else:
                    store_out(out, dense + i, add_out(widen_out(out[dense + i]), widen(data[pos])))
                i += threads

    return _kernel(name, copy)


@cuda.jit(cache=True)
def finish_cuda(table, scratch, out, mode, p, flags):
    """Turn the rows' reduced values into norms and their total, on one block.

    ``FOLD_SUMS``: plain sums of p = 1 or 2 -> ``sum ** (1/p)``; without ``FINAL`` a
    scaled redo follows, and float64-based rows whose sum may have overflowed (inf or
    NaN) or underflowed (below ``_TINY``) get peak 0 to take it (others -1).
    ``FOLD_PEAKS``: the max-abs pass's values become the peaks of the rows on the
    scaled route (all rows with ``ALL_ROWS``), and for p = inf their norms.
    ``FOLD_SCALED``: those rows' norms become ``peak * sum ** (1/p)`` (or the peak when
    it is 0, inf or NaN). ``FOLD_COUNT``: ``out[0]`` is the sum of all rows' values.

    With ``FINAL`` the total ``‖norms‖_p`` (NaN if any norm is NaN, else inf if any is
    inf; computed scaled by the largest norm) goes to ``scratch[H_TOTAL]`` and
    ``out[0]``, and the norm of the leaf at position ``i`` to ``out[1 + i]`` where
    ``out`` has room (a call that asks for the total alone passes one element).
    """
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    nrows = table[H_NROWS]
    sums, peaks, norms = table[H_SUMS], table[H_PEAKS], table[H_NORMS]
    if mode == FOLD_COUNT:
        count = 0.0
        for row in range(t, nrows, threads):
            count += scratch[sums + row]
        count = _block_fold(count, False)
        if t == 0:
            out[0] = count
        return
    final = flags & FINAL != 0
    every = flags & ALL_ROWS != 0
    for row in range(t, nrows, threads):
        s = scratch[sums + row]
        if mode == FOLD_SUMS:
            wide = table[table[H_ROWS] + table[H_WIDTH] * row + WIDE] != 0
            if not final and wide and not (s < math.inf and s >= _TINY):
                scratch[peaks + row] = 0.0  # redo it scaled
            else:
                scratch[peaks + row] = -1.0
                scratch[norms + row] = _root(s, p)
        elif every or scratch[peaks + row] >= 0.0:
            if mode == FOLD_PEAKS:
                scratch[peaks + row] = s
                if p == math.inf:
                    scratch[norms + row] = s
            else:
                peak = scratch[peaks + row]
                scratch[norms + row] = peak * _root(s, p) if math.isfinite(peak) and peak > 0.0 else peak
    if not final:
        return
    cuda.syncthreads()  # every norm is written
    peak = 0.0
    for row in range(t, nrows, threads):
        peak = _max_nan(peak, scratch[norms + row])
    peak = _block_fold(peak, True)
    s = 0.0
    regular = math.isfinite(peak) and peak > 0.0 and p != math.inf
    if regular:
        for row in range(t, nrows, threads):
            s += _pow(scratch[norms + row] / peak, p)
    s = _block_fold(s, False)
    total = peak * _root(s, p) if regular else peak
    if t == 0:
        scratch[table[H_TOTAL]] = total
        out[0] = total
    positions = table[H_POSITIONS]
    for i in range(t, min(table[H_NPOSITIONS], out.size - 1), threads):
        out[1 + i] = scratch[norms + table[positions + i]]


class KernelSet:
    """The pass kernels of one codec, named as their CPU twins."""

    def __init__(self, c):
        self.codec = c
        self.sumsq_cuda = _reduction("sumsq_cuda", c.widen, _sq, False)
        self.sumabs_cuda = _reduction("sumabs_cuda", c.widen, _abs, False)
        self.sumpow_cuda = _reduction("sumpow_cuda", c.widen, c.pow_scaled, False)
        self.maxabs_cuda = _reduction("maxabs_cuda", c.widen, _abs, True)
        self.nonfinite_cuda = _reduction("nonfinite_cuda", c.widen, _nonfinite, False)
        self.scale_cuda_ = _update("scale_cuda_", c.widen, c.store, _scale(c.times), False)
        self.fill_cuda_ = _update("fill_cuda_", c.widen, c.store, _fill(), False)
        self.zero_nonfinite_cuda_ = _update("zero_nonfinite_cuda_", c.widen, c.store, _zero_transform(c.zeroed), True)
        self.copy_cuda = _copy("copy_cuda", c.widen, c.store, c.add, c.widen, False)
        if c is not COMPLEX:
            self.clamp_cuda_ = _update("clamp_cuda_", c.widen, c.store, _clamp_transform(), False)


@functools.cache
def kernels_for(dtype):
    """The `KernelSet` of leaves of ``dtype`` (made once per codec)."""
    return _kernel_set(codec(dtype))


@functools.cache
def _kernel_set(c):
    return KernelSet(c)


@functools.cache
def accumulate_for(dtype, accumulator):
    """``accumulate_cuda_``: leaves of ``dtype`` added into dense buffers of ``accumulator``."""
    source, into = codec(dtype), codec(accumulator)
    return _copy("accumulate_cuda_", into.widen, into.store, into.add, source.widen, True)
