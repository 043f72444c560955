"""grad_norm and layer_norms (SPEC §3, §4): values vs the fsum reference for every dtype,
shape and layout, norm types, non-finite inputs, overflow/underflow and accuracy."""

import decimal
import math

import numpy as np
import pytest

import gradclip as gc
from helpers import (
    LAYOUTS,
    NORM_TYPES,
    SHAPES,
    Frozen,
    Strided,
    assert_norm_close,
    assert_norms_close,
    dtype_id,
    dtypes,
    layouts,
    norm_types,
    random_values,
    shapes,
)
from reference import ref_layer_norms, ref_norm


@dtypes
@shapes
@layouts
def test_grad_norm_matches_reference(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    for p in NORM_TYPES:
        expected = ref_norm([s.view], p)
        got = gc.grad_norm(s.view, p)
        assert type(got) is float
        assert_norm_close(got, expected, what=f"grad_norm(view, {p})")
        assert_norm_close(gc.grad_norm([s.view], norm_type=p), expected, what=f"grad_norm([view], {p})")
        ln = gc.layer_norms([s.view], norm_type=p)
        assert isinstance(ln, np.ndarray) and ln.dtype == np.float64 and ln.shape == (1,)
        assert_norm_close(ln[0], expected, what=f"layer_norms([view], {p})")
    s.assert_untouched()


@dtypes
@norm_types
def test_many_layouts_in_one_call(dtype, p, rng):
    leaves = [Strided(lay, shape, dtype, rng).view for lay in LAYOUTS for shape in SHAPES[:6]]
    frozen = Frozen(*leaves)
    assert_norm_close(gc.grad_norm(leaves, p), ref_norm(leaves, p))
    got = gc.layer_norms(leaves, p)
    assert got.dtype == np.float64 and got.ndim == 1
    assert_norms_close(got, ref_layer_norms(leaves, p))
    frozen.check()


@pytest.mark.parametrize("p", [1.5, 0.25, 7.3, 4.0, 0.05], ids=str)
def test_unusual_norm_types(p, rng):
    leaves = [random_values(n, np.float64, rng) for n in (1, 5, 33)]
    leaves.append(random_values((4, 4), np.complex64, rng))
    assert_norm_close(gc.grad_norm(leaves, p), ref_norm(leaves, p))
    assert_norms_close(gc.layer_norms(leaves, p), ref_layer_norms(leaves, p))


def test_default_norm_type_is_two(rng):
    leaves = [random_values(10, np.float32, rng), random_values(3, np.float64, rng)]
    assert gc.grad_norm(leaves) == gc.grad_norm(leaves, 2.0)
    assert_norm_close(gc.grad_norm(leaves), ref_norm(leaves, 2))
    assert np.array_equal(gc.layer_norms(leaves), gc.layer_norms(leaves, norm_type=2))


def test_integer_norm_type_accepted(rng):
    leaves = [random_values(10, np.float64, rng)]
    assert_norm_close(gc.grad_norm(leaves, 1), ref_norm(leaves, 1))
    assert_norm_close(gc.grad_norm(leaves, 3), ref_norm(leaves, 3))


@pytest.mark.parametrize("grads", [[], (), {}, [None], {"a": None, "b": [None]}], ids=repr)
def test_empty_grads(grads):
    n = gc.grad_norm(grads)
    assert type(n) is float and n == 0.0
    ln = gc.layer_norms(grads)
    assert isinstance(ln, np.ndarray) and ln.dtype == np.float64 and ln.shape == (0,)


@dtypes
def test_zero_and_empty_leaves(dtype):
    leaves = [np.zeros((3, 2), dtype), np.zeros(0, dtype), np.zeros((), dtype)]
    for p in NORM_TYPES:
        assert gc.grad_norm(leaves, p) == 0.0
        assert_norms_close(gc.layer_norms(leaves, p), np.zeros(3))


# --------------------------------------------------------------------------- non-finite


@dtypes
@norm_types
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "nan+inf"])
def test_nonfinite_elements(dtype, p, bad, rng):
    good = random_values((5, 4), dtype, rng)
    x = random_values(31, dtype, rng)
    view = x[::2]  # elements 0, 2, ..., 30 of x
    with np.errstate(all="ignore"):
        if bad == "nan":
            x[30] = np.nan  # the view's last element
        elif bad == "inf":
            x[14] = np.inf
            x[15] = np.nan  # in a gap of the view: must not be seen
        elif bad == "-inf":
            x[0] = -np.inf
            x[29] = np.nan  # in a gap
        else:
            x[2], x[4] = np.nan, np.inf
    leaves = [good, view]
    got = gc.grad_norm(leaves, p)
    ln = gc.layer_norms(leaves, p)
    assert_norm_close(ln[0], ref_norm([good], p))
    if bad in ("inf", "-inf"):
        assert got == math.inf and ln[1] == math.inf
    elif bad == "nan":  # NaN must propagate, also for p = inf
        assert math.isnan(got) and math.isnan(ln[1]), (got, ln)
    else:  # NaN and inf together: non-finite is all the contract says
        assert not math.isfinite(got) and not math.isfinite(ln[1]), (got, ln)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=dtype_id)
@norm_types
def test_complex_nan_in_one_part(dtype, p):
    x = np.ones(9, dtype)
    x.imag[4] = np.nan
    assert math.isnan(gc.grad_norm([x], p))
    y = np.ones(9, dtype)
    y.real[8] = -np.inf
    assert gc.grad_norm([y], p) == math.inf


# --------------------------------------------------------------------------- overflow


@pytest.mark.parametrize(
    "dtype, magnitude, p",
    [
        (np.float64, 1e200, 2.0),
        (np.float64, 1e200, 8.0),
        (np.float64, 1e300, 3.0),
        (np.float64, 1e307, 2.0),
        (np.float64, 1e100, 4.0),
        (np.complex128, 1e200, 2.0),
        (np.complex128, 1e200, 8.0),
        (np.float32, 3e38, 10.0),
        (np.float32, 1e30, 12.0),
        (np.float64, 1e-200, 2.0),
        (np.float64, 1e-150, 3.0),
        (np.float64, 1e-300, 8.0),
        (np.complex128, 1e-200, 2.0),
        (np.float32, 1e-38, 10.0),
    ],
    ids=lambda v: dtype_id(v) if isinstance(v, type) else f"{v:g}",
)
def test_no_spurious_overflow_or_underflow(dtype, magnitude, p, rng):
    leaves = [
        (random_values(n, dtype, rng) * (magnitude / 3)).astype(dtype) for n in (1, 7, 40)
    ]
    expected = ref_norm(leaves, p)
    assert math.isfinite(expected) and expected > 0
    got = gc.grad_norm(leaves, p)
    assert math.isfinite(got) and got > 0, f"spurious over/underflow: {got!r}"
    assert_norm_close(got, expected)
    assert_norms_close(gc.layer_norms(leaves, p), ref_layer_norms(leaves, p))


@pytest.mark.parametrize(
    "leaves, p",
    [
        ([np.array([1.7e308, -1.7e308])], 2.0),
        ([np.array([1e308]), np.array([1e308], dtype=np.complex128)], 1.0),
        ([np.ones(2000)], 0.01),  # 2000**100 ~ 1e330
    ],
    ids=["p2", "p1", "p0.01"],
)
def test_true_norm_beyond_float64_is_inf(leaves, p):
    assert ref_norm(leaves, p) == math.inf
    assert gc.grad_norm(leaves, p) == math.inf  # and no warning (filterwarnings = error)
    assert gc.layer_norms(leaves[:1], p)[0] == ref_layer_norms(leaves[:1], p)[0]


def test_subnormal_float64_leaves():
    tiny = np.full(4, 5e-324)  # the smallest subnormal
    expected = ref_norm([tiny], 2)
    assert expected > 0
    assert_norm_close(gc.grad_norm(tiny), expected)
    mixed = [np.array([1e200, -1e200]), np.array([1e-200, 3e-300])]
    assert_norm_close(gc.grad_norm(mixed), ref_norm(mixed))
    assert_norms_close(gc.layer_norms(mixed), ref_layer_norms(mixed))


SUBNORMAL_UNIT = 5e-324
"""2**-1074: float64's subnormals are the integer multiples of it."""


def _rounded_units(value):
    """A nonnegative Decimal rounded to the nearest integer, as a float64 of that many units."""
    return float(value.to_integral_value(decimal.ROUND_HALF_EVEN)) * SUBNORMAL_UNIT


def test_subnormal_complex128_norm_is_correctly_rounded():
    # the magnitude of a subnormal z is rounded to the subnormal grid: a norm must scale first
    z = np.array([5e-324 - 5e-324j, -5e-324 + 0j])  # the norm is sqrt(3) units
    assert gc.grad_norm([z]) == gc.grad_norm([np.array([5e-324, -5e-324, -5e-324])]) == 1e-323

    rng = np.random.default_rng(1074)
    units = rng.integers(-1000, 1001, size=(2, 60))
    leaf = np.empty(60, np.complex128)
    leaf.real, leaf.imag = units * SUBNORMAL_UNIT  # exact
    squares = [int(a) ** 2 + int(b) ** 2 for a, b in units.T]
    with decimal.localcontext(decimal.Context(prec=60)):
        # sqrt(n) of an integer n is never within 1 / (4 sqrt(n) + 2) of a half-integer
        two = decimal.Decimal(sum(squares)).sqrt()
        one = sum(decimal.Decimal(n).sqrt() for n in squares)
        assert abs(one % 1 - decimal.Decimal("0.5")) > decimal.Decimal("1e-6")  # its rounding is clear-cut
    for p, exact in ((2.0, two), (1.0, one)):
        expected = _rounded_units(exact)
        assert gc.grad_norm([leaf], p) == expected, f"p={p}"
        assert gc.layer_norms([leaf, leaf[:0]], p).tolist() == [expected, 0.0], f"p={p}"


def test_largest_float64_does_not_overflow():
    big = np.finfo(np.float64).max
    x = np.array([big / 2, -big / 4, big / 8])  # every norm below is < big
    for p in (1.0, 1.5, 2.0, 3.0):
        expected = ref_norm([x], p)
        assert math.isfinite(expected)
        assert_norm_close(gc.grad_norm(x, p), expected, what=f"p={p}")


# --------------------------------------------------------------------------- accuracy


def _wide_range_float32(n, rng):
    mag = 10.0 ** rng.uniform(-7, 7, n)
    sign = rng.choice([-1.0, 1.0], n)
    return (mag * sign).astype(np.float32)


def test_accuracy_ten_million_float32(rng):
    x = _wide_range_float32(10_000_000, rng)
    expected = ref_norm([x], 2)
    assert_norm_close(gc.grad_norm(x), expected, what="single leaf")
    cuts = [0, 17, 1_000_001, 4_500_000, 9_999_990, x.size]
    parts = [x[a:b] for a, b in zip(cuts, cuts[1:])]
    assert_norm_close(gc.grad_norm(parts), expected, what="split leaves")
    assert_norms_close(gc.layer_norms(parts), ref_layer_norms(parts, 2))


def test_accuracy_float64_large(rng):
    x = _wide_range_float32(2_000_001, rng).astype(np.float64) * (1 + rng.random(2_000_001))
    strided = x[::2]
    assert_norm_close(gc.grad_norm(x), ref_norm([x]))
    assert_norm_close(gc.grad_norm(strided), ref_norm([strided]))
    assert_norm_close(gc.grad_norm(x, 1), ref_norm([x], 1))
    assert_norm_close(gc.grad_norm(x, math.inf), ref_norm([x], math.inf))
