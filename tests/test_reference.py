"""Checks of the references themselves (reference.py), against independent facts.

The one-step round-to-nearest-even used for bfloat16 is a generic rounder; it is checked
here against NumPy's correctly rounded float64 -> float16 / float32 casts, including ties
and subnormals, and against ml_dtypes on float32 inputs (a single rounding there).
"""

import math

import ml_dtypes
import numpy as np

from reference import (
    BFLOAT16,
    ref_clamp,
    ref_norm,
    ref_scale,
    round_f16_generic,
    round_f32_generic,
    round_to_bf16,
)


def _tricky_doubles(rng, n=200_000):
    """Random doubles over a wide exponent range plus exact ties of the narrow formats."""
    v = rng.standard_normal(n) * np.exp2(rng.integers(-160, 140, n).astype(np.float64))
    ties16 = (rng.integers(1 << 10, 1 << 11, 2000) * 2 + 1).astype(np.float64)
    ties16 = np.ldexp(ties16, rng.integers(-30, 5, 2000))  # 12-bit odd mantissas: f16 ties
    ties32 = (rng.integers(1 << 23, 1 << 24, 2000, dtype=np.int64) * 2 + 1).astype(np.float64)
    ties32 = np.ldexp(ties32, rng.integers(-160, 100, 2000))
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 1e-8, 5.9e-8])
    return np.concatenate([v, -v[:1000], ties16, -ties16, ties32, -ties32, specials])


def test_generic_rounder_matches_numpy_float16_and_float32():
    rng = np.random.default_rng(1)
    v = _tricky_doubles(rng)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(
            round_f16_generic(v).view(np.uint16), v.astype(np.float16).view(np.uint16)
        )
        np.testing.assert_array_equal(
            round_f32_generic(v).view(np.uint32), v.astype(np.float32).view(np.uint32)
        )


def test_bf16_rounder_matches_ml_dtypes_on_float32_inputs():
    # float32 -> bfloat16 is a single rounding in ml_dtypes, so it is a valid oracle there
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 1 << 32, 300_000, dtype=np.uint64).astype(np.uint32)
    f32 = bits.view(np.float32)
    f32 = f32[np.isfinite(f32)]
    ours = round_to_bf16(f32.astype(np.float64)).view(np.uint16)
    theirs = f32.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_bf16_rounder_rounds_once():
    # 1 + 2**-8 + 2**-40 lies just above the midpoint of bf16 neighbours 1 and 1 + 2**-7;
    # rounding through float32 first would land on the midpoint and then round to 1.
    v = np.array([1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-8, 1 + 3 * 2.0**-8])
    got = round_to_bf16(v).astype(np.float64)
    np.testing.assert_array_equal(got, [1 + 2.0**-7, 1.0, 1 + 2 * 2.0**-7])


def test_ref_norm_basic_facts():
    x = np.array([3.0, -4.0])
    assert ref_norm([x], 2) == 5.0
    assert ref_norm([x], 1) == 7.0
    assert ref_norm([x], math.inf) == 4.0
    assert ref_norm([np.array([3 + 4j], dtype=np.complex64)], 2) == 5.0
    assert ref_norm([np.array([1e200, 1e200])], 2) == math.sqrt(2) * 1e200
    assert math.isclose(ref_norm([np.full(4, 1e-200)], 2), 2e-200, rel_tol=1e-15)
    assert math.isnan(ref_norm([x, np.array([np.nan])], math.inf))
    assert ref_norm([x, np.array([-np.inf])], 2) == math.inf
    assert ref_norm([], 2) == 0.0


def test_ref_scale_and_clamp_round_per_dtype():
    x = np.array([1.0, -3.0, np.nan], dtype=BFLOAT16)
    out = ref_scale(x, 1 / 3)
    assert out.dtype == BFLOAT16
    assert np.float64(out[0]) == np.float64(np.float32(1 / 3).astype(BFLOAT16))
    c = ref_clamp(np.array([2.0, -2.0, 0.5, np.nan], dtype=np.float16), 1.0)
    np.testing.assert_array_equal(c[:3], np.array([1.0, -1.0, 0.5], dtype=np.float16))
    assert np.isnan(c[3])
