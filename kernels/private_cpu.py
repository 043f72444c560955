"""CPU kernels of private training (SPEC §9): Gaussian noise, the noised sum of clipped
examples, and per-example sums of squares.

**Noise.** Normal draws come from a counter-based generator: draw ``d`` is a function of
the key and ``d`` alone, so any chunk of a stream can be made by any thread, and a stream
has the same bits for any thread count and any split into calls. Two generators:

- ``PHILOX``: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as
  1, 2, 3"); block ``b`` is the generator applied to the counter ``(b mod 2**32,
  b div 2**32, 0, 0)`` under a 64-bit key, and gives one pair of draws.
- ``CHACHA``: the ChaCha20 block function (RFC 8439 §2.3) over a 256-bit key, with a
  64-bit block counter in state words 12-13 and a 64-bit nonce in words 14-15 (the
  original layout; RFC 8439's 32-bit counter would wrap after 2**32 blocks, a few
  hundred steps of a large model). Block ``b`` gives four pairs of draws.

A block's 32-bit words ``x`` are read as 64-bit words ``W_m = x[2m] + 2**32 x[2m+1]``;
each pair of draws takes two: the top 52 bits of the first make ``u`` in (0, 1], those of
the second a fraction ``t`` of a turn in [0, 1), and Box-Muller gives draws
``2j = r cos(2πt)`` and ``2j + 1 = r sin(2πt)`` with ``r = sqrt(-2 ln u)`` (at most
8.49). ``ln``, ``sin`` and ``cos`` are polynomials written here, accurate to about one
unit in the last place of float64 (tests check them against NumPy's): the library
calls would not vectorise (no SVML); the transform took 19 ns a pair with them, 4 with
these. Every stage is a separate loop in its own function: inlined into one bigger loop,
LLVM vectorised none of them (20 ns a pair).

**Sums.** ``weighted_sum_table`` computes, for every element of one example's leaves,
``(Σ_i f_i g_i + std z) / divisor`` in float64 and rounds it once to the leaf's type.
Work is split over the parameter axis (chunks of ``SUM_CHUNK`` elements of one row),
never over examples: each chunk's float64 accumulator stays in cache while the examples
add into it in example order, four per pass, so the bits do not depend on the thread
count. ``cell_sumsq_table`` reads chunks of four examples for their sums of squares,
and ``fold_rows`` folds an example's leaf norms into its norm.
"""

import decimal
import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .cpu import (
    FAST,
    _chunks,
    _f64_bits,
    _f64_from_bits,
    _in_parallel,
    _narrow,
    _times,
    _voidptr,
    _widen,
    fold_norms,
    sumsq4_cpu,
    sumsq_cpu,
)

PHILOX, CHACHA = range(2)
PAIRS_PER_BLOCK = (1, 4)
"""Pairs of draws per block, by generator."""

GROUP = 512
"""Pairs of draws made per window (a multiple of every ``PAIRS_PER_BLOCK``)."""

WINDOW = 2 * GROUP
"""Draws per window: the words, lanes and draws of one take 25 KiB (of a 32 KiB L1), and
the noise goes from there straight into its leaf or sum. Half as large, the calls per
window cost 1% (Philox) to 3% (ChaCha20) of the noise's time."""

SUM_CHUNK = 4096
"""Elements per chunk of a sum: a float64 accumulator of 32 KiB, and runs of 16 KiB
(float32) read from each example. Twice as long, WD2 (a 784-128-10 MLP, B = 1,024)
took 4-5% longer; WD1 (ResNet-18, B = 32) and WD3 (100 clients) within 2%."""

NORM_CHUNK = 8192
"""Elements per chunk of the per-example sums of squares (runs of 32 KiB of float32).
The chunks' partial sums are added in chunk order, so this fixes the norms' bits."""

NOISE_CHUNK = 1 << 14
"""Elements per chunk of noise added in place."""

_U32 = np.uint32
_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_ONE_BITS = _U64(0x3FF0000000000000)  # 1.0
_SHIFT = _U64(12)  # 64 - 52: the bits below a float64's fraction

# ------------------------------------------------------------ Philox4x32-10
# Every value holds 32 bits in a 64-bit integer: NumPy's uint32 products widen anyway,
# and in 64-bit lanes LLVM multiplies with vpmuludq without repacking.

_PHILOX_M0, _PHILOX_M1 = _U64(0xD2511F53), _U64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = _U64(0x9E3779B9), _U64(0xBB67AE85)


@njit(inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    for _ in range(10):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = (p1 >> _U64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _U64(32)) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


@njit(cache=True)
def philox4x32_10(counter, key):
    """The four output words of Philox4x32-10 for a counter (4 words) and key (2 words)."""
    c = [_U64(x) for x in counter]
    x = _philox(c[0], c[1], c[2], c[3], _U64(key[0]), _U64(key[1]))
    return np.array([x[0], x[1], x[2], x[3]], dtype=np.uint32)


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _philox_words(w0, w1, first_block, key):
    """Pair ``j``: ``(W_0, W_1)`` of block ``first_block + j``."""
    k0, k1 = _U64(key[0]), _U64(key[1])
    for j in range(w0.size):
        b = _U64(first_block + j)
        x0, x1, x2, x3 = _philox(b & _MASK32, b >> _U64(32), _U64(0), _U64(0), k0, k1)
        w0[j] = x0 | (x1 << _U64(32))
        w1[j] = x2 | (x3 << _U64(32))


# ------------------------------------------------------------------ ChaCha20


@njit(inline="always")
def _rotl(x, n):
    return _U32((x << _U32(n)) | (x >> _U32(32 - n)))


@njit(inline="always")
def _quarter(a, b, c, d):
    a = _U32(a + b)
    d = _rotl(_U32(d ^ a), 16)
    c = _U32(c + d)
    b = _rotl(_U32(b ^ c), 12)
    a = _U32(a + b)
    d = _rotl(_U32(d ^ a), 8)
    c = _U32(c + d)
    b = _rotl(_U32(b ^ c), 7)
    return a, b, c, d


@njit(inline="always")
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


@njit(inline="always")
def _chacha(s):
    """The ChaCha20 block function of the 16-word state ``s``: 20 rounds, then ``+ s``.

    The ten double rounds are written out: as a loop, LLVM kept it a loop and
    vectorised nothing (125 ns a block); straight-line, the loop over blocks around it
    runs in vector lanes (`_chacha_lanes`).
    """
    x = _double_round(_double_round(_double_round(_double_round(_double_round(s)))))
    x = _double_round(_double_round(_double_round(_double_round(_double_round(x)))))
    return (
        _U32(x[0] + s[0]), _U32(x[1] + s[1]), _U32(x[2] + s[2]), _U32(x[3] + s[3]),
        _U32(x[4] + s[4]), _U32(x[5] + s[5]), _U32(x[6] + s[6]), _U32(x[7] + s[7]),
        _U32(x[8] + s[8]), _U32(x[9] + s[9]), _U32(x[10] + s[10]), _U32(x[11] + s[11]),
        _U32(x[12] + s[12]), _U32(x[13] + s[13]), _U32(x[14] + s[14]), _U32(x[15] + s[15]),
    )  # fmt: skip


_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


@njit(inline="always")
def _chacha_state(key, counter_lo, counter_hi):
    """The state of one block: constants, key words ``key[0:8]``, the 64-bit counter,
    and the nonce words ``key[8:10]``."""
    return (
        _U32(_SIGMA[0]), _U32(_SIGMA[1]), _U32(_SIGMA[2]), _U32(_SIGMA[3]),
        _U32(key[0]), _U32(key[1]), _U32(key[2]), _U32(key[3]),
        _U32(key[4]), _U32(key[5]), _U32(key[6]), _U32(key[7]),
        _U32(counter_lo), _U32(counter_hi), _U32(key[8]), _U32(key[9]),
    )  # fmt: skip


@njit(cache=True)
def chacha20_block(key, counter_lo, counter_hi):
    """The 16 output words of ChaCha20 for a key (8 words) + nonce (2 words) and a counter."""
    x = _chacha(_chacha_state(key, counter_lo, counter_hi))
    out = np.empty(16, np.uint32)
    for i in range(16):
        out[i] = x[i]
    return out


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _chacha_lanes(x, nblocks, first_block, key):
    """``x[i, j]`` <- word ``i`` of block ``first_block + j``, for ``j < nblocks``.

    Each block is a lane: stored word by word across blocks, the loop runs eight blocks
    at once in 32-bit vector lanes, 3.3 ns a draw (one block at a time, whose four
    quarter rounds filled only 128-bit lanes: 5.3). The key's words are read before the
    loop: read inside it, they might alias ``x``, and the loop was not vectorised."""
    s = _chacha_state(key, 0, 0)
    for j in range(nblocks):
        b = _U64(first_block + j)
        y = _chacha((
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11],
            _U32(b & _MASK32), _U32(b >> _U64(32)), s[14], s[15],
        ))  # fmt: skip
        x[0, j], x[1, j], x[2, j], x[3, j] = y[0], y[1], y[2], y[3]
        x[4, j], x[5, j], x[6, j], x[7, j] = y[4], y[5], y[6], y[7]
        x[8, j], x[9, j], x[10, j], x[11, j] = y[8], y[9], y[10], y[11]
        x[12, j], x[13, j], x[14, j], x[15, j] = y[12], y[13], y[14], y[15]


@njit(inline="always")
def _w(lo, hi):
    return _U64(lo) | (_U64(hi) << _U64(32))


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _chacha_words(w0, w1, first_block, key, x):
    """Pairs ``4j .. 4j + 3``: ``(W_0, W_1) .. (W_6, W_7)`` of block ``first_block + j``,
    through the lanes ``x`` (16 rows of at least ``w0.size / 4``)."""
    nblocks = w0.size // 4
    _chacha_lanes(x, nblocks, first_block, key)
    for j in range(nblocks):
        w0[4 * j], w1[4 * j] = _w(x[0, j], x[1, j]), _w(x[2, j], x[3, j])
        w0[4 * j + 1], w1[4 * j + 1] = _w(x[4, j], x[5, j]), _w(x[6, j], x[7, j])
        w0[4 * j + 2], w1[4 * j + 2] = _w(x[8, j], x[9, j]), _w(x[10, j], x[11, j])
        w0[4 * j + 3], w1[4 * j + 3] = _w(x[12, j], x[13, j]), _w(x[14, j], x[15, j])


# ---------------------------------------------------------------- Box-Muller

_SQRT2 = math.sqrt(2.0)
_LN2_HI = float.fromhex("0x1.62e42fee00000p-1")  # ln 2 to 32 bits: e * _LN2_HI is exact
_LN2_LO = float(decimal.Decimal("0.693147180559945309417232121458176568075500134") - decimal.Decimal(_LN2_HI))
_EXPONENT_MAGIC = _U64(0x4330000000000000)  # 2**52: its low bits hold small integers exactly
_ATANH_TERMS = tuple(2.0 / (2 * k + 1) for k in range(12))  # ln m = Σ 2 s^(2k+1) / (2k + 1)
_TWO_PI = 2.0 * math.pi


@njit(inline="always", fastmath=FAST, error_model="numpy")
def log_unit(u):
    """ln u for u in (0, 1], a normal float64, within 2 units in the last place.

    ``u = (1 + f) 2**e`` with ``1 + f`` in [sqrt(1/2), sqrt(2)) (``f`` exact), and
    ``ln(1 + f) = 2 atanh(s) = 2s + s R``, ``s = f / (2 + f)``, ``|s| <= 0.172``,
    ``R = Σ_k>=1 2 s**2k / (2k + 1)`` (to ``s**22``: exact to float64). Written as
    ``f - (f²/2 - s (f²/2 + R))`` (as ``2s = f - s f``), the rounding errors fall on
    small terms; ``e ln 2`` is added in two parts, the first exact. The exponent is read
    as a float through 2**52's bits (AVX2 has no vector int64 -> float64 conversion,
    and without one the loop is not vectorised).
    """
    b = _f64_bits(u)
    e = _f64_from_bits((b >> _U64(52)) | _EXPONENT_MAGIC) - (4503599627370496.0 + 1023.0)
    m = _f64_from_bits((b & _U64(0x000FFFFFFFFFFFFF)) | _ONE_BITS)
    high = m > _SQRT2
    m = m * 0.5 if high else m
    e = e + 1.0 if high else e
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    r = _ATANH_TERMS[11]
    for k in range(10, 0, -1):
        r = r * z + _ATANH_TERMS[k]
    r = r * z
    half_f2 = 0.5 * f * f
    return e * _LN2_HI - ((half_f2 - (s * (half_f2 + r) + e * _LN2_LO)) - f)


# Taylor coefficients of sin and cos on [-π/4, π/4]; the first omitted terms are below
# 2**-54 of the result.
_SIN_TERMS = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(1, 8))
_COS_TERMS = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(1, 9))


@njit(inline="always", fastmath=FAST, error_model="numpy")
def sincos_turns(t):
    """``(sin 2πt, cos 2πt)`` for t in [0, 1).

    ``t = q/4 + r`` with ``q`` the nearest quarter turn and ``|r| <= 1/8``, exactly
    (``t`` and ``q/4`` are within a factor 2 of each other unless ``q = 0``); the
    quadrant ``q`` then swaps and negates the polynomials of ``x = 2πr``: an odd ``q``
    swaps them, ``q`` = 2, 3 negates the sine and ``q`` = 1, 2 the cosine (``q = 4``
    is ``q = 0``). The quadrant's bits are read through 2**52's and the signs set by
    xor: one select per result instead of three comparisons and three selects (the
    transform 2.89 -> 2.66 ns a draw). The draws are the same to the bit.
    """
    q = np.floor(t * 4.0 + 0.5)
    x = (t - q * 0.25) * _TWO_PI
    z = x * x
    s = _SIN_TERMS[6]
    for k in range(5, -1, -1):
        s = s * z + _SIN_TERMS[k]
    s = x + x * z * s
    c = _COS_TERMS[7]
    for k in range(6, -1, -1):
        c = c * z + _COS_TERMS[k]
    c = 1.0 + z * c
    quadrant = _f64_bits(q + 4503599627370496.0)  # q in the low bits
    swap = (quadrant & _U64(1)) != _U64(0)
    sin_sign = (quadrant & _U64(2)) << _U64(62)
    cos_sign = ((quadrant + _U64(1)) & _U64(2)) << _U64(62)
    sin = _f64_from_bits(_f64_bits(c if swap else s) ^ sin_sign)
    cos = _f64_from_bits(_f64_bits(s if swap else c) ^ cos_sign)
    return sin, cos


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _box_muller(w0, w1, out):
    """Draws ``2j`` and ``2j + 1`` from the words of pair ``j``."""
    for j in range(w0.size):
        u = 2.0 - _f64_from_bits((w0[j] >> _SHIFT) | _ONE_BITS)  # 1 - k 2**-52: (0, 1]
        t = _f64_from_bits((w1[j] >> _SHIFT) | _ONE_BITS) - 1.0  # k 2**-52: [0, 1)
        r = np.sqrt(-2.0 * log_unit(u))
        sin, cos = sincos_turns(t)
        out[2 * j] = r * cos
        out[2 * j + 1] = r * sin


@njit(cache=True)
def _scratch():
    """Words, lanes and draws for one window: ``GROUP`` pairs and one block more (a
    window that starts inside a block can end inside another)."""
    pairs = GROUP + PAIRS_PER_BLOCK[CHACHA]
    return (
        np.empty(pairs, np.uint64), np.empty(pairs, np.uint64),
        np.empty((16, pairs // PAIRS_PER_BLOCK[CHACHA]), np.uint32), np.empty(2 * pairs),
    )  # fmt: skip


@njit(inline="always")
def _make(out, first_block, kind, key, scratch):
    """The draws of blocks ``first_block ..`` into ``out`` (float64, whole blocks)."""
    w0, w1, lanes, _ = scratch
    pairs = out.size // 2
    if kind == PHILOX:
        _philox_words(w0[:pairs], w1[:pairs], first_block, key)
    else:
        _chacha_words(w0[:pairs], w1[:pairs], first_block, key, lanes)
    _box_muller(w0[:pairs], w1[:pairs], out)


@njit(cache=True)
def _draws(first_draw, n, kind, key, scratch):
    """Draws ``first_draw .. first_draw + n - 1`` (``n <= WINDOW + 1``) as a view of the
    scratch's draws: the blocks that hold them, and no other."""
    draws_per_block = 2 * PAIRS_PER_BLOCK[kind]
    block = first_draw // draws_per_block
    skip = first_draw - block * draws_per_block  # draws of the first block before ours
    stage = scratch[3][: (skip + n + draws_per_block - 1) // draws_per_block * draws_per_block]
    _make(stage, block, kind, key, scratch)
    return stage[skip : skip + n]


@njit(inline="always")
def _window(first_draw, done, n, parts):
    """Elements from element ``done`` (of ``n``, ``parts`` draws each, the first at
    ``first_draw``) up to the stream's next multiple of ``WINDOW`` draws: the windows of
    a run fall on the same blocks whatever its start. A complex run that starts at an
    odd draw straddles each multiple by one draw."""
    room = WINDOW - (first_draw + done * parts) % WINDOW
    return min(n - done, (room if room >= parts else room + WINDOW) // parts)


@njit(cache=True)
def _fill_normals(out, first_draw, kind, key, scratch):
    """Draws ``first_draw ..`` into ``out`` (float64), window by window; whole blocks go
    straight into place."""
    draws_per_block = 2 * PAIRS_PER_BLOCK[kind]
    done = 0
    while done < out.size:
        m = _window(first_draw, done, out.size, 1)
        d = first_draw + done
        if d % draws_per_block == 0 and m % draws_per_block == 0:
            _make(out[done : done + m], d // draws_per_block, kind, key, scratch)
        else:
            out[done : done + m] = _draws(d, m, kind, key, scratch)
        done += m


@njit(cache=True)
def _normals_serial(out, first_draw, kind, key):
    _fill_normals(out, first_draw, kind, key, _scratch())


@njit(cache=True, parallel=True)
def _normals_parallel(out, first_draw, kind, key):
    chunks = (out.size + NOISE_CHUNK - 1) // NOISE_CHUNK
    for k in prange(chunks):
        lo = k * NOISE_CHUNK
        _fill_normals(out[lo : lo + NOISE_CHUNK], first_draw + lo, kind, key, _scratch())


def normals_cpu(out, first_draw, kind, key):
    """Draws ``first_draw .. first_draw + out.size - 1`` of a stream into ``out`` (float64)."""
    if _in_parallel(out.size):
        _parallel(_normals_parallel, out, first_draw, kind, key)
    else:
        _normals_serial(out, first_draw, kind, key)


# ------------------------------------------------------------ element types


def _parts(like):
    """Real numbers per element of ``like``'s type: 2 for complex, else 1."""


def _zeros(n, like):
    """A float64 (complex128 for complex elements) accumulator of ``n`` zeros."""


def _plus_noise(y, z, e, std):
    """``y`` (a float64 / complex128 accumulator value of element ``e``) plus ``std``
    times its draw(s) in ``z``: one for a real element, two (real, imaginary) for a complex one."""


def _divided(y, divisor):
    """``y / divisor`` for a real ``divisor`` (complex: part by part)."""


@overload(_parts)
def _parts_impl(like):
    two = isinstance(like.dtype, types.Complex)
    return lambda like: 2 if two else 1


@overload(_zeros)
def _zeros_impl(n, like):
    if isinstance(like.dtype, types.Complex):
        return lambda n, like: np.zeros(n, np.complex128)
    return lambda n, like: np.zeros(n)


@overload(_plus_noise)
def _plus_noise_impl(y, z, e, std):
    if isinstance(y, types.Complex):
        return lambda y, z, e, std: complex(y.real + std * z[2 * e], y.imag + std * z[2 * e + 1])
    return lambda y, z, e, std: y + std * z[e]


@overload(_divided)
def _divided_impl(y, divisor):
    if isinstance(y, types.Complex):
        return lambda y, divisor: complex(y.real / divisor, y.imag / divisor)
    return lambda y, divisor: y / divisor


# ------------------------------------------------------------ chunk kernels


@njit(fastmath=FAST, error_model="numpy", cache=True)
def axpy_cpu(acc, f, v):
    """acc += f * x, the product and the sum in float64 (complex: part by part)."""
    for e in range(acc.size):
        acc[e] += _times(_widen(v[e]), f)


@njit(fastmath=FAST, error_model="numpy", cache=True)
def axpy4_cpu(acc, f0, v0, f1, v1, f2, v2, f3, v3):
    """acc += (f0 x0 + f1 x1) + (f2 x2 + f3 x3), in float64: four examples in one pass over
    the accumulator (1.2-1.3x a plain read pass on one core here, one at a time 0.6-0.8x)."""
    for e in range(acc.size):
        near = _times(_widen(v0[e]), f0) + _times(_widen(v1[e]), f1)
        far = _times(_widen(v2[e]), f2) + _times(_widen(v3[e]), f3)
        acc[e] += near + far


@njit(fastmath=FAST, error_model="numpy", cache=True)
def round_out_cpu(out, acc, z, std, divisor):
    """out <- round((acc + std z) / divisor), once, to ``out``'s type (``z`` unread if std = 0)."""
    if std == 0.0:
        for e in range(out.size):
            out[e] = _narrow(_divided(acc[e], divisor), out)
    else:
        for e in range(out.size):
            out[e] = _narrow(_divided(_plus_noise(acc[e], z, e, std), divisor), out)


@njit(fastmath=FAST, error_model="numpy", cache=True)
def add_noise_cpu_(v, z, std):
    """x <- round(x + std z), the sum in float64 (complex: a draw for each part)."""
    for e in range(v.size):
        v[e] = _narrow(_plus_noise(_widen(v[e]), z, e, std), v)


# ------------------------------------------------------------------ drivers


def _parallel(driver, *args):
    """Run a parallel driver with its chunks handed out one at a time.

    Numba's default splits the iterations into one equal run per thread. The sum's chunks
    are few and uneven (28 on the 784-128-10 MLP, 24 of them full), and a thread that
    waits for a busy core then holds back all of its run; one at a time, only one chunk.
    Measured on that MLP, B = 1024, with 16 chunks: 114 -> 97 ms (median, loaded
    machine). The setting costs ~7 us, so the serial drivers go without it.
    """
    with numba.parallel_chunksize(1):
        return driver(*args)


@njit(inline="always")
def _view(address, n, step, witness):
    """``n`` elements of ``witness``'s type from ``address``, ``step`` apart."""
    if step == 1:
        return numba.carray(_voidptr(address), (n,), witness.dtype)
    return numba.carray(_voidptr(address), ((n - 1) * step + 1,), witness.dtype)[::step]


@njit(inline="always")
def _sum_at(k, row, lo, leaf, offset, count, step, out_addr, draw, base, factors, std, divisor, kind, key, witness):
    r = row[k]
    start = lo[k]
    n = min(SUM_CHUNK, count[r] - start)
    u = leaf[r]
    acc = _zeros(n, witness)
    shift = offset[r] + start * step[r] * witness.itemsize
    # Examples in order, four at a time (the rest one by one): the bits depend on the
    # factors only, never on threads. A factor 0 (a zeroed example, or a bound of 0) is
    # not read: a NaN times 0 is NaN.
    active = np.empty(base.shape[0], np.int64)
    m = 0
    for i in range(base.shape[0]):
        if factors[i, u] != 0.0:
            active[m] = i
            m += 1
    j = 0
    if step[r] == 1:
        while j + 4 <= m:
            i0, i1, i2, i3 = active[j], active[j + 1], active[j + 2], active[j + 3]
            axpy4_cpu(
                acc,
                factors[i0, u], numba.carray(_voidptr(base[i0, u] + shift), (n,), witness.dtype),
                factors[i1, u], numba.carray(_voidptr(base[i1, u] + shift), (n,), witness.dtype),
                factors[i2, u], numba.carray(_voidptr(base[i2, u] + shift), (n,), witness.dtype),
                factors[i3, u], numba.carray(_voidptr(base[i3, u] + shift), (n,), witness.dtype),
            )  # fmt: skip
            j += 4
        for i in active[j:m]:
            axpy_cpu(acc, factors[i, u], numba.carray(_voidptr(base[i, u] + shift), (n,), witness.dtype))
    else:
        for i in active[:m]:
            axpy_cpu(acc, factors[i, u], _view(base[i, u] + shift, n, step[r], witness))
    out = numba.carray(_voidptr(out_addr[r] + start * witness.itemsize), (n,), witness.dtype)
    if std == 0.0:
        round_out_cpu(out, acc, np.empty(0), std, divisor)
        return
    parts = _parts(witness)
    first = draw[r] + start * parts
    scratch = _scratch()
    done = 0
    while done < n:
        m = _window(first, done, n, parts)
        z = _draws(first + done * parts, m * parts, kind, key, scratch)
        round_out_cpu(out[done : done + m], acc[done : done + m], z, std, divisor)
        done += m


@njit(cache=True)
def _sum_serial(leaf, offset, count, step, out_addr, draw, base, factors, std, divisor, kind, key, witness):
    row, lo = _chunks(count, SUM_CHUNK)
    for k in range(row.size):
        _sum_at(k, row, lo, leaf, offset, count, step, out_addr, draw, base, factors, std, divisor, kind, key, witness)


@njit(cache=True, parallel=True)
def _sum_parallel(leaf, offset, count, step, out_addr, draw, base, factors, std, divisor, kind, key, witness):
    row, lo = _chunks(count, SUM_CHUNK)
    for k in prange(row.size):
        _sum_at(k, row, lo, leaf, offset, count, step, out_addr, draw, base, factors, std, divisor, kind, key, witness)


def weighted_sum_table(rows, base, factors, std, divisor, kind, key, witness):
    """Write ``(Σ_i factors[i, u] g_iu + std z) / divisor`` into the output rows.

    ``rows``: ``(leaf, offset, count, step, out_addr, draw)``, int64 columns, one entry
    per run of one example's leaves of ``witness``'s type: the run's leaf ``u``, its
    start in bytes from the leaf's base address, its length and step in elements, the
    address of its contiguous output, and the draw of its first real number. ``base``
    (int64) and ``factors`` (float64) are ``(B, U)``: example ``i``'s leaf ``u`` starts at
    ``base[i, u]`` and is weighted by ``factors[i, u]`` (0: not read). ``std = 0``: no
    noise. ``kind`` / ``key``: the generator (``PHILOX`` / ``CHACHA``) and its key words.
    """
    leaf, offset, count, step, out_addr, draw = rows
    reads = int(count.sum()) * max(1, base.shape[0])
    args = (leaf, offset, count, step, out_addr, draw, base, factors, float(std), float(divisor), kind, key, witness)
    if _in_parallel(reads):
        _parallel(_sum_parallel, *args)
    else:
        _sum_serial(*args)


@njit(inline="always")
def _sumsq_at(t, row, lo, leaf, offset, count, step, base, part, witness):
    # Task t: examples 4q to 4q + 3 (fewer in the last quad) over chunk k. The tasks run
    # quad after quad, so the threads read on along the same four examples.
    q, k = divmod(np.int64(t), np.int64(row.size))
    r = row[k]
    start = lo[k]
    n = min(NORM_CHUNK, count[r] - start)
    u = leaf[r]
    shift = offset[r] + start * step[r] * witness.itemsize
    i = 4 * q
    if step[r] == 1 and i + 4 <= base.shape[0]:
        part[k, i], part[k, i + 1], part[k, i + 2], part[k, i + 3] = sumsq4_cpu(
            numba.carray(_voidptr(base[i, u] + shift), (n,), witness.dtype),
            numba.carray(_voidptr(base[i + 1, u] + shift), (n,), witness.dtype),
            numba.carray(_voidptr(base[i + 2, u] + shift), (n,), witness.dtype),
            numba.carray(_voidptr(base[i + 3, u] + shift), (n,), witness.dtype),
        )
        return
    for j in range(i, min(i + 4, base.shape[0])):
        part[k, j] = sumsq_cpu(_view(base[j, u] + shift, n, step[r], witness))


@njit(cache=True)
def _fold_sumsq(part, row, leaf, out):
    """``out[i, u] +=`` the chunk partials of cell ``(i, u)``, serially and in chunk order."""
    for k in range(part.shape[0]):
        u = leaf[row[k]]
        for i in range(part.shape[1]):
            out[i, u] += part[k, i]


@njit(cache=True)
def _sumsq_serial(leaf, offset, count, step, base, out, witness):
    row, lo = _chunks(count, NORM_CHUNK)
    part = np.empty((row.size, base.shape[0]))
    for t in range(row.size * ((base.shape[0] + 3) // 4)):
        _sumsq_at(t, row, lo, leaf, offset, count, step, base, part, witness)
    _fold_sumsq(part, row, leaf, out)


@njit(cache=True, parallel=True)
def _sumsq_parallel(leaf, offset, count, step, base, out, witness):
    row, lo = _chunks(count, NORM_CHUNK)
    part = np.empty((row.size, base.shape[0]))
    for t in prange(row.size * ((base.shape[0] + 3) // 4)):
        _sumsq_at(t, row, lo, leaf, offset, count, step, base, part, witness)
    _fold_sumsq(part, row, leaf, out)


def cell_sumsq_table(rows, base, out, witness):
    """Add each cell's sum of |x|**2 into ``out[i, u]`` (float64 ``(B, U)``), for the runs
    ``rows = (leaf, offset, count, step)`` of the leaves of ``witness``'s type laid out
    as for `weighted_sum_table`. Four examples are read per pass: the general norm kernel,
    one run at a time, took 29.5 ms of one core on WD3 (100 clients x 1.2M float32), this
    22.6 ms. A task is one chunk of four examples, and the tasks go quad after quad, so
    the threads read on along the same four examples. With a task per chunk of all the
    examples (a thread reading 32 KiB from each of B examples in turn), WD2's norms (a
    784-128-10 MLP, B = 1,024) took 1.1-1.3x as long. The chunks' partial sums are added
    in chunk order."""
    leaf, offset, count, step = rows
    args = (leaf, offset, count, step, base, out, witness)
    if _in_parallel(int(count.sum()) * max(1, base.shape[0])):
        _parallel(_sumsq_parallel, *args)
    else:
        _sumsq_serial(*args)


@njit(inline="always")
def _noise_at(k, row, lo, addr, count, step, draw, std, kind, key, witness):
    r = row[k]
    start = lo[k]
    n = min(NOISE_CHUNK, count[r] - start)
    parts = _parts(witness)
    first = draw[r] + start * parts
    v = _view(addr[r] + start * step[r] * witness.itemsize, n, step[r], witness)
    scratch = _scratch()
    done = 0
    while done < n:
        m = _window(first, done, n, parts)
        add_noise_cpu_(v[done : done + m], _draws(first + done * parts, m * parts, kind, key, scratch), std)
        done += m


@njit(cache=True)
def _noise_serial(addr, count, step, draw, std, kind, key, witness):
    row, lo = _chunks(count, NOISE_CHUNK)
    for k in range(row.size):
        _noise_at(k, row, lo, addr, count, step, draw, std, kind, key, witness)


@njit(cache=True, parallel=True)
def _noise_parallel(addr, count, step, draw, std, kind, key, witness):
    row, lo = _chunks(count, NOISE_CHUNK)
    for k in prange(row.size):
        _noise_at(k, row, lo, addr, count, step, draw, std, kind, key, witness)


def add_noise_table(table, draw, std, kind, key):
    """Add ``std`` times draws to every element of ``table`` (a ``_table.Table``) in place;
    ``draw`` (int64, one per row) is the draw of each row's first real number."""
    args = (table.addr, table.count, table.step, draw, float(std), kind, key, table.witness)
    if _in_parallel(table.size):
        _parallel(_noise_parallel, *args)
    else:
        _noise_serial(*args)


# ------------------------------------------------------ per-example norms


@njit(cache=True)
def fold_rows(norms, p):
    """The p-norm of each row of ``norms`` (B, U): an example's norm from its leaves'."""
    out = np.empty(norms.shape[0])
    for i in range(norms.shape[0]):
        out[i] = fold_norms(norms[i], p)
    return out
