"""CUDA kernels of private training (SPEC §9): twins of ``kernels/private_cpu.py``.

Imported only when a GPU batch of examples (or GPU leaves given noise) arrives
(``gradclip._private_cuda``); importing it compiles nothing. Each kernel is compiled once
per element type, on first use, and cached on disk.

**Cells.** A batch's *cells* (example ``i``'s leaf ``u``) are the rows of one plan (the
table of ``kernels/cuda.py``), every cell of leaf ``u`` walked in one order, so that
element ``k`` of each is the same element of the leaf. In a dtype group the rows run
example after example, each example's in leaf order: the row of example ``i``'s leaf is
``row + i * per_example``, ``row`` its example-0 row, and example 0's chunks are the
group's first ``nchunks / n``. The norm passes of ``kernels/cuda.py`` take the cells'
norms; `fold_examples_cuda` folds them into each example's norm and writes each cell's
clip factor into ``scratch[H_COEFS + row]``, where the other kernels read it.

Kernels of other shapes than the passes' take the plan's ``(table, scratch)`` first,
then their arrays and scalars; ``clip_cells_cuda_`` and ``clip_copy_cuda`` are passes.

**The sum.** `weighted_sum_cuda` is parallel over the parameter axis only: a thread
owns one element of example 0's walk, and adds ``f_i x_i`` into its float64 accumulator
example by example, in order (a factor 0 is not read: NaN times 0 is NaN), then adds
the noise, divides, and rounds once. No partial results, no atomics: the bits depend
on the inputs alone. A block takes ``blockDim`` elements of one chunk of example 0 at a
time (a chunk would be too coarse: a model of 100k parameters has 7 of them).

**Noise.** Draw ``d`` of a stream is computed where it is used, from its generator
block alone, exactly as on the CPU: Philox4x32-10 or ChaCha20 (the words held in 64-bit
integers and masked, as the simulator's integers do not wrap silently), the top 52 bits
of a pair of 64-bit words as ``u`` in (0, 1] and ``t`` in [0, 1), and ``r cos 2πt`` (even
``d``) or ``r sin 2πt`` (odd), ``r = sqrt(-2 ln u)``, with the CPU's polynomials for ``ln``,
``sin`` and ``cos`` and its order of operations. NVVM contracts multiply-adds into FMAs
where LLVM on the CPU may not (or elsewhere), so a draw can differ from the CPU's in its
last bits (a few units in the last place); the generator's words, and so the stream,
are the same. The 10 key words (2 for Philox) travel packed two per int64 argument.
"""

import functools
import math

import numpy as np
from numba import cuda

from .cuda import (
    AXES,
    COMPLEX,
    DENSE,
    H_COEFS,
    H_POSITIONS,
    H_ROWS,
    H_WIDTH,
    NDIM,
    OFFSET,
    _block_fold,
    _chunk,
    _kernel,
    _locate,
    _nchunks,
    _root,
    _update,
    codec,
)
from .private_cpu import (
    _ATANH_TERMS,
    _COS_TERMS,
    _LN2_HI,
    _LN2_LO,
    _PHILOX_M0,
    _PHILOX_M1,
    _PHILOX_W0,
    _PHILOX_W1,
    _SIGMA,
    _SIN_TERMS,
    _SQRT2,
    _TWO_PI,
    PHILOX,
)

# What `fold_examples_cuda` does after the examples' norms (its ``mode``).
NORMS, CLIP, CLIP_LAYERS = range(3)

_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_S7, _S8, _S12, _S16, _S20, _S24, _S25, _S32 = (_U64(n) for n in (7, 8, 12, 16, 20, 24, 25, 32))
_ZERO64 = _U64(0)
_UNIT = 2.0**-52
_SIG0, _SIG1, _SIG2, _SIG3 = (_U64(w) for w in _SIGMA)
# The CPU's polynomial coefficients, one name each: the Horner steps are written out
# (a tuple indexed in a loop would go to local memory)
_AT1, _AT2, _AT3, _AT4, _AT5, _AT6, _AT7, _AT8, _AT9, _AT10, _AT11 = _ATANH_TERMS[1:]
_SIN1, _SIN2, _SIN3, _SIN4, _SIN5, _SIN6, _SIN7 = _SIN_TERMS
_COS1, _COS2, _COS3, _COS4, _COS5, _COS6, _COS7, _COS8 = _COS_TERMS


# ------------------------------------------------------------------ generators


@cuda.jit(device=True)
def _philox_words(block, key):
    """``(W_0, W_1)`` of Philox4x32-10 block ``block`` (uint64) under ``key`` (uint64, two words)."""
    c0, c1, c2, c3 = block & _MASK32, block >> _S32, _ZERO64, _ZERO64
    k0, k1 = key & _MASK32, key >> _S32
    for _ in range(10):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = (p1 >> _S32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _S32) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0 | (c1 << _S32), c2 | (c3 << _S32)


@cuda.jit(device=True)
def _rotl(x, n, back):
    return ((x << n) | (x >> back)) & _MASK32


@cuda.jit(device=True)
def _quarter(a, b, c, d):
    a = (a + b) & _MASK32
    d = _rotl(d ^ a, _S16, _S16)
    c = (c + d) & _MASK32
    b = _rotl(b ^ c, _S12, _S20)
    a = (a + b) & _MASK32
    d = _rotl(d ^ a, _S8, _S24)
    c = (c + d) & _MASK32
    b = _rotl(b ^ c, _S7, _S25)
    return a, b, c, d


@cuda.jit(device=True)
def _double_round(x):
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = x
    x0, x4, x8, x12 = _quarter(x0, x4, x8, x12)
    x1, x5, x9, x13 = _quarter(x1, x5, x9, x13)
    x2, x6, x10, x14 = _quarter(x2, x6, x10, x14)
    x3, x7, x11, x15 = _quarter(x3, x7, x11, x15)
    x0, x5, x10, x15 = _quarter(x0, x5, x10, x15)
    x1, x6, x11, x12 = _quarter(x1, x6, x11, x12)
    x2, x7, x8, x13 = _quarter(x2, x7, x8, x13)
    x3, x4, x9, x14 = _quarter(x3, x4, x9, x14)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@cuda.jit(device=True)
def _word(x, s):
    return (x + s) & _MASK32


@cuda.jit(device=True)
def _chacha_words(block, pair, k0, k1, k2, k3, k4):
    """``(W_2m, W_2m+1)`` of ChaCha20 block ``block`` (uint64), ``m = pair`` (0-3): the
    state is the CPU's (constants, 8 key words, 64-bit counter, 2 nonce words), the key
    words packed two per ``k0 .. k4``."""
    s4, s5, s6, s7 = k0 & _MASK32, k0 >> _S32, k1 & _MASK32, k1 >> _S32
    s8, s9, s10, s11 = k2 & _MASK32, k2 >> _S32, k3 & _MASK32, k3 >> _S32
    s12, s13, s14, s15 = block & _MASK32, block >> _S32, k4 & _MASK32, k4 >> _S32
    x = (_SIG0, _SIG1, _SIG2, _SIG3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15)
    for _ in range(10):
        x = _double_round(x)
    if pair == 0:
        a, b, c, d = _word(x[0], _SIG0), _word(x[1], _SIG1), _word(x[2], _SIG2), _word(x[3], _SIG3)
    elif pair == 1:
        a, b, c, d = _word(x[4], s4), _word(x[5], s5), _word(x[6], s6), _word(x[7], s7)
    elif pair == 2:
        a, b, c, d = _word(x[8], s8), _word(x[9], s9), _word(x[10], s10), _word(x[11], s11)
    else:
        a, b, c, d = _word(x[12], s12), _word(x[13], s13), _word(x[14], s14), _word(x[15], s15)
    return a | (b << _S32), c | (d << _S32)


# ---------------------------------------------------------------- Box-Muller


@cuda.jit(device=True)
def _log_unit(u):
    """ln u for u in (0, 1], a normal float64: ``kernels/private_cpu.log_unit``, its
    exponent and significand read with frexp instead of bits (the same numbers)."""
    m, e = math.frexp(u)  # u = m 2**e, m in [1/2, 1)
    m = 2.0 * m
    e = float(e - 1)
    if m > _SQRT2:
        m = m * 0.5
        e = e + 1.0
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    r = _AT11 * z + _AT10
    r = r * z + _AT9
    r = r * z + _AT8
    r = r * z + _AT7
    r = r * z + _AT6
    r = r * z + _AT5
    r = r * z + _AT4
    r = r * z + _AT3
    r = r * z + _AT2
    r = r * z + _AT1
    r = r * z
    half_f2 = 0.5 * f * f
    return e * _LN2_HI - ((half_f2 - (s * (half_f2 + r) + e * _LN2_LO)) - f)


@cuda.jit(device=True)
def _sincos_turns(t):
    """``(sin 2πt, cos 2πt)`` for t in [0, 1): ``kernels/private_cpu.sincos_turns``."""
    q = float(math.floor(t * 4.0 + 0.5))
    x = (t - q * 0.25) * _TWO_PI
    z = x * x
    s = _SIN7 * z + _SIN6
    s = s * z + _SIN5
    s = s * z + _SIN4
    s = s * z + _SIN3
    s = s * z + _SIN2
    s = s * z + _SIN1
    s = x + x * z * s
    c = _COS8 * z + _COS7
    c = c * z + _COS6
    c = c * z + _COS5
    c = c * z + _COS4
    c = c * z + _COS3
    c = c * z + _COS2
    c = c * z + _COS1
    c = 1.0 + z * c
    sin = c if q == 1.0 else (-s if q == 2.0 else (-c if q == 3.0 else s))
    cos = -s if q == 1.0 else (-c if q == 2.0 else (s if q == 3.0 else c))
    return sin, cos


@cuda.jit(device=True)
def _normal(d, kind, k0, k1, k2, k3, k4):
    """Draw ``d`` (>= 0) of the stream of generator ``kind`` keyed by ``k0 .. k4``."""
    pair = d >> 1
    if kind == PHILOX:
        w0, w1 = _philox_words(_U64(pair), _U64(k0))
    else:
        w0, w1 = _chacha_words(_U64(pair >> 2), pair & 3, _U64(k0), _U64(k1), _U64(k2), _U64(k3), _U64(k4))
    u = 1.0 - float(w0 >> _S12) * _UNIT  # (0, 1]
    t = float(w1 >> _S12) * _UNIT  # [0, 1)
    r = math.sqrt(-2.0 * _log_unit(u))
    sin, cos = _sincos_turns(t)
    return r * cos if (d & 1) == 0 else r * sin


# ------------------------------------------------------------ element types


@cuda.jit(device=True)
def _zero_real():
    return 0.0


@cuda.jit(device=True)
def _zero_complex():
    return complex(0.0, 0.0)


@cuda.jit(device=True)
def _noised_real(y, std, d, kind, k0, k1, k2, k3, k4):
    """``y + std z`` with ``z`` draw ``d``."""
    return y + std * _normal(d, kind, k0, k1, k2, k3, k4)


@cuda.jit(device=True)
def _noised_complex(y, std, d, kind, k0, k1, k2, k3, k4):
    """``y + std (z_d + i z_d+1)``: the real part's draw first."""
    re = y.real + std * _normal(d, kind, k0, k1, k2, k3, k4)
    return complex(re, y.imag + std * _normal(d + 1, kind, k0, k1, k2, k3, k4))


@cuda.jit(device=True)
def _divided_real(y, divisor):
    return y / divisor


@cuda.jit(device=True)
def _divided_complex(y, divisor):
    return complex(y.real / divisor, y.imag / divisor)


@cuda.jit(device=True)
def _position(table, record, k):
    """Where element ``k`` of the walk of the row at ``record`` lives."""
    if table[record + NDIM] == 1:
        return table[record + OFFSET] + k * table[record + AXES + 1]
    return _locate(table, record, k)


@cuda.jit(device=True)
def _zeroed_real(x):
    """``x * 0``, and 0 for a non-finite ``x``: the CPU scales, then zeroes what is not finite."""
    return x * 0.0 if math.isfinite(x) else 0.0


@cuda.jit(device=True)
def _zeroed_complex(x):
    return complex(_zeroed_real(x.real), _zeroed_real(x.imag))


def _clip(times, zeroed):
    """The clip transform: ``x`` times its cell's factor (0: `_zeroed_real`)."""

    @cuda.jit(device=True)
    def transform(x, coef):
        return True, zeroed(x) if coef == 0.0 else times(x, coef)

    return transform


# --------------------------------------------------------------------- kernels


def _clip_copy(name, widen, store, transform):
    """A pass writing element ``k`` of every cell's walk, clipped by the cell's factor,
    to ``out[DENSE + k]``: copied as it is where the factor is 1."""

    def clip_copy(data, out, table, scratch, group, a, b, c):
        t = cuda.threadIdx.x
        threads = cuda.blockDim.x
        for chunk in range(cuda.blockIdx.x, _nchunks(table, group), cuda.gridDim.x):
            record, row, start, count, slot = _chunk(table, group, chunk)
            coef = scratch[table[H_COEFS] + row]
            dense = table[record + DENSE] + start
            for i in range(t, count, threads):
                pos = _position(table, record, start + i)
                if coef == 1.0:
                    out[dense + i] = data[pos]
                else:
                    _, y = transform(widen(data[pos]), coef)
                    store(out, dense + i, y)

    return _kernel(name, clip_copy)


def _weighted_sum(name, c, zero, noised, divided, parts):
    widen, times, add, store = c.widen, c.times, c.add, c.store

    def weighted_sum(
        table, scratch, data, out, draws, group, n, per_example, chunk_size, std, divisor, kind, k0, k1, k2, k3, k4
    ):
        """``out[DENSE + k] = (Σ_i f_i x_i[k] + std z) / divisor`` for every element ``k`` of
        example 0's rows of ``group``, rounded once; ``draws[row]`` is the draw of the
        row's element 0 (read only if ``std``), ``chunk_size`` the chunks' longest."""
        t = cuda.threadIdx.x
        threads = cuda.blockDim.x
        rows, width, coefs = table[H_ROWS], table[H_WIDTH], table[H_COEFS]
        pieces = (chunk_size + threads - 1) // threads
        for unit in range(cuda.blockIdx.x, _nchunks(table, group) // n * pieces, cuda.gridDim.x):
            chunk = unit // pieces
            record, row, start, count, slot = _chunk(table, group, chunk)
            k = (unit - chunk * pieces) * threads + t
            if k < count:
                e = start + k
                acc = zero()
                for i in range(n):
                    r = row + i * per_example
                    f = scratch[coefs + r]
                    if f != 0.0:
                        acc = add(acc, times(widen(data[_position(table, rows + width * r, e)]), f))
                if std != 0.0:
                    acc = noised(acc, std, draws[row] + e * parts, kind, k0, k1, k2, k3, k4)
                store(out, table[record + DENSE] + e, divided(acc, divisor))

    return _kernel(name, weighted_sum)


def _add_noise(name, c, noised, divided, parts):
    widen, store = c.widen, c.store

    def add_noise(table, scratch, data, draws, group, std, divisor, kind, k0, k1, k2, k3, k4):
        """``x = (x + std z) / divisor`` in place, rounded once, for every element of
        ``group``'s rows; ``draws[row]`` is the draw of the row's element 0, the walk in
        memory order (a leaf's own)."""
        t = cuda.threadIdx.x
        threads = cuda.blockDim.x
        for chunk in range(cuda.blockIdx.x, _nchunks(table, group), cuda.gridDim.x):
            record, row, start, count, slot = _chunk(table, group, chunk)
            first = draws[row]
            for i in range(t, count, threads):
                e = start + i
                pos = _position(table, record, e)
                y = noised(widen(data[pos]), std, first + e * parts, kind, k0, k1, k2, k3, k4)
                store(data, pos, divided(y, divisor))

    return _kernel(name, add_noise)


@cuda.jit(cache=True)
def fold_examples_cuda(table, scratch, out, bounds, n, leaves, at, p, bound, eps, mode):
    """Each example's norm from its cells' and, to clip, each cell's factor, on one block.

    ``out[at + i * leaves + u]`` holds the p-norm of example ``i``'s leaf ``u``, which the
    table's positions from ``at - 1`` on map to its row (``finish_cuda`` put the norms
    there). Example ``i``'s norm, folded as the CPU's ``fold_norms`` folds (in leaf
    order), goes to ``out[at + n * leaves + i]``. ``CLIP``: each cell's factor is
    ``min(1, bound / (norm_i + eps))`` (``CLIP_LAYERS``: ``bounds[u] / (norm_iu + eps)``),
    1 where that is NaN, 0 for an example whose norm is not finite; it goes to
    ``scratch[H_COEFS + row]``, and the examples clipped (some factor < 1) and zeroed are
    counted into ``out[at + n * leaves + n]`` and the next.
    """
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    norms = at + n * leaves
    rows = table[H_POSITIONS] + at - 1
    clipped = 0.0
    zeroed = 0.0
    for i in range(t, n, threads):
        cells = at + i * leaves
        peak = 0.0
        nan = False
        for u in range(leaves):
            x = out[cells + u]
            nan = nan or x != x
            peak = max(peak, x)
        if nan:
            norm = math.nan
        elif p == math.inf or peak == 0.0 or peak == math.inf:
            norm = peak
        else:
            s = 0.0
            for u in range(leaves):
                x = out[cells + u] / peak
                s += x * x if p == 2.0 else (x if p == 1.0 else x**p)
            norm = peak * _root(s, p)
        out[norms + i] = norm
        if mode != NORMS:
            finite = math.isfinite(norm)
            shrunk = False
            for u in range(leaves):
                f = 0.0
                if finite:
                    ratio = bound / (norm + eps) if mode == CLIP else bounds[u] / (out[cells + u] + eps)
                    f = ratio if ratio < 1.0 else 1.0  # NaN (0 / 0: a zero example, bound 0) -> 1
                    shrunk = shrunk or f < 1.0
                scratch[table[H_COEFS] + table[rows + i * leaves + u]] = f
            clipped += 1.0 if shrunk else 0.0
            zeroed += 0.0 if finite else 1.0
    clipped = _block_fold(clipped, False)
    zeroed = _block_fold(zeroed, False)
    if t == 0 and mode != NORMS:
        out[norms + n] = clipped
        out[norms + n + 1] = zeroed


class PrivateKernels:
    """The private-training kernels of one codec."""

    def __init__(self, c):
        complex_ = c is COMPLEX
        zero = _zero_complex if complex_ else _zero_real
        noised = _noised_complex if complex_ else _noised_real
        divided = _divided_complex if complex_ else _divided_real
        parts = 2 if complex_ else 1
        clip = _clip(c.times, _zeroed_complex if complex_ else _zeroed_real)
        self.clip_cells_cuda_ = _update("clip_cells_cuda_", c.widen, c.store, clip, False)
        self.clip_copy_cuda = _clip_copy("clip_copy_cuda", c.widen, c.store, clip)
        self.weighted_sum_cuda = _weighted_sum("weighted_sum_cuda", c, zero, noised, divided, parts)
        self.add_noise_cuda_ = _add_noise("add_noise_cuda_", c, noised, divided, parts)


@functools.cache
def private_kernels_for(dtype):
    """The `PrivateKernels` of leaves of ``dtype`` (made once per codec)."""
    return _private_set(codec(dtype))


@functools.cache
def _private_set(c):
    return PrivateKernels(c)
