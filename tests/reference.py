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
