"""Independent references for the gradclip tests.

Plain float64 NumPy, ``math.fsum`` and Python, written for clarity rather than speed.
This module never imports gradclip.

Conventions
-----------
* A "leaf" is a NumPy array (or NumPy scalar) of one of the supported dtypes:
  float16, bfloat16, float32, float64, complex64, complex128.
* Every value of those dtypes widens exactly to float64 (complex: to two float64 parts),
  so the references work on exact float64 copies of the data.
* Rounding back to a leaf dtype happens exactly once, with round-to-nearest-even.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- widening


def is_complex(dtype) -> bool:
    return np.dtype(dtype).kind == "c"


def parts_f64(x) -> list[np.ndarray]:
    """The exact float64 values of a leaf, flattened: [real] or [real, imag]."""
    a = np.asarray(x)
    if is_complex(a.dtype):
        return [a.real.astype(np.float64).ravel(), a.imag.astype(np.float64).ravel()]
    return [a.astype(np.float64).ravel()]


def abs_f64(x) -> np.ndarray:
    """|x| per element in float64 (|z| = hypot(re, im) for complex), flattened."""
    p = parts_f64(x)
    with np.errstate(all="ignore"):
        if len(p) == 1:
            return np.abs(p[0])
        return np.hypot(p[0], p[1])


# --------------------------------------------------------------------------- norms


def ref_norm(leaves, p=2.0) -> float:
    """Total p-norm of all elements of all leaves, ``(sum |x|^p)^(1/p)``.

    p = inf gives max |x|. NaN anywhere gives NaN; an infinite element gives inf.
    To avoid spurious overflow/underflow every magnitude is divided by a power of two
    close to the largest magnitude before being raised to p (exact for p = 2, where the
    squares of the scaled real and imaginary parts are summed with ``math.fsum``).
    """
    p = float(p)
    if isinstance(leaves, np.ndarray) or np.isscalar(leaves):
        leaves = [leaves]
    leaves = list(leaves)
    mags = [abs_f64(x) for x in leaves]
    mags = [m for m in mags if m.size]
    if not mags:
        return 0.0
    # NaN in any part (|z|^2 = re^2 + im^2 is NaN even where hypot(nan, inf) = inf)
    if any(np.isnan(part).any() for x in leaves for part in parts_f64(x)):
        return math.nan
    big = max(float(m.max()) for m in mags)
    if math.isinf(big):
        return math.inf
    if big == 0.0:
        return 0.0
    if math.isinf(p):
        return big
    # power-of-two scale: big / scale in [1, 2) (2**1024 would overflow)
    scale = math.ldexp(1.0, math.frexp(big)[1] - 1)
    if p == 2.0:
        # squares of the scaled parts (exact: float32 and narrower square exactly in
        # float64), summed exactly by fsum, chunk by chunk to keep memory small
        def squares():
            for x in leaves:
                for part in parts_f64(x):
                    for i in range(0, part.size, _CHUNK):
                        s = part[i : i + _CHUNK] / scale  # exact: power-of-two scale
                        yield from (s * s).tolist()

        return scale * math.sqrt(math.fsum(squares()))

    def powers():
        for m in mags:
            for i in range(0, m.size, _CHUNK):
                with np.errstate(all="ignore"):
                    yield from ((m[i : i + _CHUNK] / scale) ** p).tolist()

    try:
        root = math.fsum(powers()) ** (1.0 / p)
    except OverflowError:  # the true norm is beyond float64 (tiny p, many elements)
        return math.inf
    return scale * root


def ref_layer_norms(leaves, p=2.0) -> np.ndarray:
    """One p-norm per leaf, in order, as a float64 array."""
    return np.array([ref_norm([x], p) for x in leaves], dtype=np.float64)


def ref_coef(max_norm, total, eps=1e-6) -> float:
    """The clipping factor ``max_norm / (total + eps)``, computed in float64."""
    return float(np.float64(max_norm) / (np.float64(total) + np.float64(eps)))


def ref_should_clip(max_norm, total) -> bool:
    """The clipping rule: scale iff total is finite and total > max_norm."""
    return math.isfinite(total) and total > max_norm


# --------------------------------------------------------------------------- rounding


def _round_rne_f64(v: np.ndarray, mant_bits: int, emin: int, emax: int) -> np.ndarray:
    """Round float64 values once, to nearest-even, onto a binary format with
    ``mant_bits`` explicit mantissa bits, minimum normal exponent ``emin`` and maximum
    exponent ``emax`` (gradual underflow; overflow to +-inf). Result still float64, but
    every value is exactly representable in the target format.
    """
    v = np.asarray(v, dtype=np.float64)
    out = v.copy()
    finite = np.isfinite(v) & (v != 0)
    x = v[finite]
    _, e = np.frexp(x)  # |x| = m * 2**e, m in [0.5, 1)  ->  floor(log2|x|) = e - 1
    # spacing of the target format at x: 2**(exponent - mant_bits), never below the
    # subnormal spacing 2**(emin - mant_bits)
    q_exp = np.maximum(e - 1, emin) - mant_bits
    scaled = np.ldexp(x, -q_exp)  # exact: |scaled| < 2**(mant_bits+1)
    r = np.ldexp(np.rint(scaled), q_exp)  # np.rint rounds half to even
    largest = math.ldexp(2.0 - math.ldexp(1.0, -mant_bits), emax)
    r = np.where(np.abs(r) > largest, np.copysign(np.inf, r), r)
    # keep the sign of zero results (rint(-0.3) = -0.0, ldexp keeps it)
    out[finite] = r
    return out


def round_to_bf16(v) -> np.ndarray:
    """float64 -> bfloat16 with a single round-to-nearest-even step (NaN stays NaN)."""
    r = _round_rne_f64(v, mant_bits=7, emin=-126, emax=127)
    # r is exactly representable in bfloat16, so this cast does not round
    return r.astype(BFLOAT16)


def round_f16_generic(v) -> np.ndarray:
    """float64 -> float16 through the generic rounder (used to check the rounder)."""
    return _round_rne_f64(v, mant_bits=10, emin=-14, emax=15).astype(np.float16)


def round_f32_generic(v) -> np.ndarray:
    """float64 -> float32 through the generic rounder (used to check the rounder)."""
    return _round_rne_f64(v, mant_bits=23, emin=-126, emax=127).astype(np.float32)


def round_real(v, dtype) -> np.ndarray:
    """Round float64 values once (RNE) to the real dtype ``dtype``."""
    dtype = np.dtype(dtype)
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(all="ignore"):
        if dtype == BFLOAT16:
            return round_to_bf16(v)
        # NumPy's float64 -> float16 / float32 casts are correctly rounded (RNE)
        return v.astype(dtype)


def round_to(v, dtype) -> np.ndarray:
    """Round float64 (or complex128) values once to ``dtype``; complex: each part."""
    dtype = np.dtype(dtype)
    if is_complex(dtype):
        part = np.dtype(np.float32) if dtype == np.complex64 else np.dtype(np.float64)
        v = np.asarray(v, dtype=np.complex128)
        out = np.empty(v.shape, dtype=dtype)
        out.real = round_real(v.real, part)
        out.imag = round_real(v.imag, part)
        return out
    return round_real(v, dtype)


def widen(x) -> np.ndarray:
    """Exact float64 / complex128 copy of a leaf (same shape)."""
    a = np.asarray(x)
    if is_complex(a.dtype):
        return a.astype(np.complex128)
    return a.astype(np.float64)


# --------------------------------------------------------------------------- clipping


def ref_scale(x, coef) -> np.ndarray:
    """``round_to_dtype(float64(x) * coef)`` elementwise (complex: parts separately)."""
    a = np.asarray(x)
    with np.errstate(all="ignore"):
        w = widen(a)
        if is_complex(a.dtype):
            prod = np.empty(w.shape, dtype=np.complex128)
            prod.real = w.real * np.float64(coef)
            prod.imag = w.imag * np.float64(coef)
        else:
            prod = w * np.float64(coef)
    return round_to(prod, a.dtype)


def ref_clamp(x, c) -> np.ndarray:
    """Clamp to [-c, c] in float64 (NaN stays NaN), then round once to the dtype."""
    a = np.asarray(x)
    if is_complex(a.dtype):
        raise TypeError("ref_clamp: complex leaves are not clamped")
    c = float(c)
    with np.errstate(all="ignore"):
        w = widen(a)
        clamped = np.where(w > c, c, np.where(w < -c, -c, w))  # NaN fails both tests
    return round_to(clamped, a.dtype)


def ref_clip_by_norm(leaves, max_norm, total, eps=1e-6) -> list[np.ndarray]:
    """The leaves after clipping by norm with the total ``total`` (the one the code
    under test returned, so that the factor is bit for bit the one it must use):
    scaled by ref_coef iff ref_should_clip, else unchanged copies."""
    if ref_should_clip(max_norm, total):
        coef = ref_coef(max_norm, total, eps)
        return [ref_scale(x, coef) for x in leaves]
    return [np.array(x, copy=True) for x in leaves]


# --------------------------------------------------------------------------- finiteness


def ref_nonfinite_mask(x) -> np.ndarray:
    """Per element (same shape): True where the element (either part) is NaN/inf."""
    a = np.asarray(x)
    with np.errstate(all="ignore"):
        if is_complex(a.dtype):
            return ~(np.isfinite(a.real.astype(np.float64)) & np.isfinite(a.imag.astype(np.float64)))
        return ~np.isfinite(a.astype(np.float64))


def ref_all_finite(leaves) -> bool:
    return not any(bool(ref_nonfinite_mask(x).any()) for x in leaves)


def ref_zero_nonfinite(x) -> np.ndarray:
    """Real leaves: NaN/+-inf replaced by 0 (other elements unchanged)."""
    a = np.asarray(x)
    if is_complex(a.dtype):
        raise TypeError("ref_zero_nonfinite: real dtypes only")
    out = np.array(a, copy=True)
    out[ref_nonfinite_mask(a)] = 0
    return out


def ref_zeroed(x) -> np.ndarray:
    """What clipping by a factor 0 leaves: ``x * 0`` part by part (a signed zero), 0 for a
    non-finite part."""
    a = np.asarray(x)
    w = widen(a)
    with np.errstate(all="ignore"):
        for part in (w.real, w.imag) if is_complex(a.dtype) else (w,):
            part[...] = np.where(np.isfinite(part), part * 0.0, 0.0)  # views of w: written in place
    return round_to(w, a.dtype)


# --------------------------------------------------------------------------- memory


def ref_bytes(address, shape, strides, itemsize) -> set[int]:
    """Every byte address a layout covers, one element at a time."""
    covered = set()
    for index in np.ndindex(*shape):
        start = address + sum(i * s for i, s in zip(index, strides))
        covered.update(range(start, start + itemsize))
    return covered


def ref_layout(a) -> tuple:
    """``(address, shape, strides, itemsize)`` of a NumPy array."""
    return a.__array_interface__["data"][0], a.shape, a.strides, a.itemsize


def ref_share_memory(a, b) -> bool:
    """Whether two arrays (or layouts) have a byte in common, by enumerating both."""
    layouts = [x if isinstance(x, tuple) else ref_layout(x) for x in (a, b)]
    return not ref_bytes(*layouts[0]).isdisjoint(ref_bytes(*layouts[1]))


# --------------------------------------------------------------------------- private training


def ref_example_norms(examples, p=2.0) -> np.ndarray:
    """Each example's global p-norm; ``examples`` is a list of lists of leaves."""
    return np.array([ref_norm(list(leaves), p) for leaves in examples], dtype=np.float64)


def ref_clip_factor(norm, bound, eps) -> float:
    """``min(1, bound / (norm + eps))``; 0 for a non-finite norm; 1 for a zero norm with bound
    0 and eps 0 (nothing to scale)."""
    if not math.isfinite(norm):
        return 0.0
    if norm + eps == 0.0:
        return 1.0
    return min(1.0, float(np.float64(bound) / (np.float64(norm) + np.float64(eps))))


def ref_weighted_sum(cells, factors, extra=None):
    """``Σ_i factors[i] * x_i (+ extra)`` per element, in float64 (complex: per part), each
    product rounded to float64 and the terms summed exactly with ``math.fsum``; examples
    with factor 0 are left out. Also returns ``Σ_i |factors[i] * x_i| (+ |extra|)`` per
    element, the scale of the error of any float64 summation order.

    ``cells``: one array per example (same shape); ``extra``: float64 (or complex128)
    values added to the sum, e.g. the noise.
    """
    wide = [widen(c) for c, f in zip(cells, factors) if f != 0.0]
    kept = [np.float64(f) for f in factors if f != 0.0]
    shape = np.shape(cells[0])
    complex_ = is_complex(np.asarray(cells[0]).dtype)

    def exact(part):
        terms = [part(w) * f for w, f in zip(wide, kept)]
        extras = [part(np.asarray(extra))] if extra is not None else []
        stacked = np.stack([t.ravel() for t in terms + extras]) if terms + extras else np.zeros((0, int(np.prod(shape))))
        sums = np.array([math.fsum(column) for column in stacked.T.tolist()]) if stacked.size else np.zeros(int(np.prod(shape)))
        return sums.reshape(shape), np.abs(stacked).sum(axis=0).reshape(shape)

    if complex_:
        (re, re_scale), (im, im_scale) = exact(np.real), exact(np.imag)
        return re + 1j * im, np.maximum(re_scale, im_scale)
    return exact(lambda a: np.asarray(a, dtype=np.float64))


# Philox4x32-10 (Salmon et al. 2011), written from the paper: ten rounds of two 32x32-bit
# multiplies, the key bumped by the Weyl constants between rounds.

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_M32 = 0xFFFFFFFF


def ref_philox4x32_10(counter, key):
    c0, c1, c2, c3 = (int(x) for x in counter)
    k0, k1 = (int(x) for x in key)
    for _ in range(10):
        p0, p1 = _PHILOX_M[0] * c0, _PHILOX_M[1] * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0), p1 & _M32, ((p0 >> 32) ^ c3 ^ k1), p0 & _M32
        k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
    return [c0, c1, c2, c3]


# ChaCha20 (RFC 8439 §2.1-2.3).


def _rotl32(x, n):
    return ((x << n) | (x >> (32 - n))) & _M32


def _quarter_round(s, a, b, c, d):
    s[a] = (s[a] + s[b]) & _M32
    s[d] = _rotl32(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _M32
    s[b] = _rotl32(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & _M32
    s[d] = _rotl32(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _M32
    s[b] = _rotl32(s[b] ^ s[c], 7)


def ref_chacha20_block(state):
    """The block function on a 16-word input state (constants, key, counter, nonce)."""
    initial = [int(x) for x in state]
    s = list(initial)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):
            _quarter_round(s, a, b, c, d)
        for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            _quarter_round(s, a, b, c, d)
    return [(x + y) & _M32 for x, y in zip(s, initial)]


CHACHA_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)


def ref_box_muller(words) -> np.ndarray:
    """Draws from 64-bit words, two per pair of words, with NumPy's own log / cos / sin:
    ``u = 1 - (w0 >> 12) 2**-52``, ``t = (w1 >> 12) 2**-52``, ``r = sqrt(-2 ln u)``,
    draws ``r cos 2πt``, ``r sin 2πt``."""
    w = np.asarray(words, dtype=np.uint64).reshape(-1, 2)
    u = 1.0 - (w[:, 0] >> np.uint64(12)).astype(np.float64) * 2.0**-52
    t = (w[:, 1] >> np.uint64(12)).astype(np.float64) * 2.0**-52
    r = np.sqrt(-2.0 * np.log(u))
    return np.stack([r * np.cos(2 * np.pi * t), r * np.sin(2 * np.pi * t)], axis=1).ravel()


def ref_words(words32) -> list:
    """32-bit words ``x`` as 64-bit words ``x[2m] + 2**32 x[2m + 1]``."""
    return [int(words32[2 * m]) | (int(words32[2 * m + 1]) << 32) for m in range(len(words32) // 2)]


def ref_philox_draws(key, first_block, blocks) -> np.ndarray:
    """Draws ``2 first_block ..`` of a seeded stream: block b is Philox of counter (b, 0)."""
    words = []
    for b in range(first_block, first_block + blocks):
        words += ref_words(ref_philox4x32_10([b & _M32, b >> 32, 0, 0], key))
    return ref_box_muller(words)


def ref_chacha_draws(key, first_block, blocks) -> np.ndarray:
    """Draws ``8 first_block ..`` of a secure stream: key words key[0:8], 64-bit block
    counter in state words 12-13, nonce key[8:10] in words 14-15."""
    words = []
    for b in range(first_block, first_block + blocks):
        state = [*CHACHA_CONSTANTS, *(int(k) for k in key[:8]), b & _M32, b >> 32, int(key[8]), int(key[9])]
        words += ref_words(ref_chacha20_block(state))
    return ref_box_muller(words)


# --------------------------------------------------------------------------- ghost norms


def ref_dense_sq_norms(a, g, bias=False) -> np.ndarray:
    """Squared per-example norms of a dense layer's weight (and bias) gradient, from the
    materialised per-example gradients ``einsum('bto,bti->boi')`` in float64."""
    a, g = widen(a), widen(g)
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    weight = np.einsum("bto,bti->boi", g, a)
    norms = np.array([math.fsum(w.ravel() ** 2) for w in weight])
    if bias:
        norms += np.array([math.fsum(b**2) for b in g.sum(axis=1)])
    return norms


def ref_embedding_sq_norms(indices, g) -> np.ndarray:
    """Squared per-example norms of an embedding's gradient, from the materialised
    ``(vocab, d)`` gradient of each example (``np.add.at`` in float64)."""
    indices, g = np.asarray(indices), widen(g)
    if indices.ndim == 1:
        indices, g = indices[:, None], g[:, None]
    vocab = int(indices.max()) + 1 if indices.size else 0
    norms = []
    for idx, rows in zip(indices, g):
        weight = np.zeros((vocab, g.shape[-1]))
        np.add.at(weight, idx, rows)
        norms.append(math.fsum(weight.ravel() ** 2))
    return np.array(norms)
