"""Hypothesis properties (STYLE "Tests", after optax's clipping tests): after clipping the
norm is max_norm (up to eps and one rounding), clipping twice changes nothing, scaling
by a power of two scales the norm exactly, per-layer norms combine to the global norm,
per-layer clipping agrees with layer_norms, and random trees/layouts match the
references bit for bit."""

import math

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradclip as gc
from helpers import DTYPES, LAYOUTS, Strided, assert_norm_close, assert_norms_close, assert_same_bits
from reference import (
    BFLOAT16,
    is_complex,
    ref_clamp,
    ref_clip_by_norm,
    ref_coef,
    ref_layer_norms,
    ref_norm,
    ref_scale,
)

# unit roundoff u (|round(v) - v| <= u |v| for normal results) and the subnormal
# spacing q (|round(v) - v| <= q / 2 below the normal range), per dtype
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
SUBNORMAL_SPACING = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 2.0**-1074}
# binary exponents of element magnitudes that stay comfortably normal, per dtype
EXP_RANGE = {"float16": (-6, 6), "bfloat16": (-40, 40), "float32": (-40, 40), "float64": (-100, 100)}


def _part_name(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.complex64:
        return "float32"
    if dtype == np.complex128:
        return "float64"
    return "bfloat16" if dtype == BFLOAT16 else dtype.name


@st.composite
def leaf_values(draw, dtype, shape, exp_range=None):
    """Values of ``dtype`` with magnitudes in [2**e, 2**(e+1)], e in exp_range, or +-0."""
    lo, hi = exp_range or EXP_RANGE[_part_name(dtype)]
    n = math.prod(shape) * (2 if is_complex(dtype) else 1)
    mantissas = (
        st.floats(1.0, 2.0, exclude_max=True)
        | st.floats(-2.0, -1.0, exclude_min=True)
        | st.sampled_from([0.0, -0.0])
    )
    mant = draw(hnp.arrays(np.float64, n, elements=mantissas))
    exps = draw(hnp.arrays(np.int64, n, elements=st.integers(lo, hi)))
    v = np.ldexp(mant, exps)
    out = np.empty(shape, dtype=dtype)
    if is_complex(dtype):  # set the parts directly: keeps the signs of zero parts
        out.real = v[: n // 2].reshape(shape)
        out.imag = v[n // 2 :].reshape(shape)
    else:
        out[...] = v.reshape(shape)
    return out


@st.composite
def leaves(draw, dtypes=DTYPES, max_leaves=4, max_side=5, exp_range=None):
    """A list of leaves of random dtypes, shapes and layouts; returns the Strided objects."""
    k = draw(st.integers(1, max_leaves))
    out = []
    for _ in range(k):
        dtype = np.dtype(draw(st.sampled_from(dtypes)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=max_side))
        layout = draw(st.sampled_from(list(LAYOUTS)))
        s = Strided(layout, shape, dtype, np.random.default_rng(draw(st.integers(0, 2**31))))
        s.view[...] = draw(leaf_values(dtype, shape, exp_range))  # exact: values fit dtype
        s.snapshot()
        out.append(s)
    return out


norm_type = st.sampled_from([1.0, 2.0, 3.0, math.inf])


@given(leaves(), norm_type, st.floats(0.01, 0.99))
def test_norm_after_clipping_is_max_norm(strided, p, frac):
    views = [s.view for s in strided]
    true_total = ref_norm(views, p)
    assume(true_total > 0)
    max_norm = frac * true_total
    eps = 1e-6
    total = gc.clip_grad_norm_(views, max_norm, p)
    assume(total > max_norm)  # frac < 0.99 and the total is exact to 1e-12: always true
    target = max_norm * total / (total + eps)
    # each element: |y - x c| <= u |x c| + q/2 (one rounding, normal or subnormal
    # result; complex: per part, so <= u |x c| + q/2 * sqrt(2)). By the triangle
    # inequality for the p-norm (p >= 1): | ||y|| - c||x|| | <= u c||x|| + q * #parts;
    # and c||x|| is the target within the 1e-12 accuracy of the total.
    u = max(UNIT_ROUNDOFF[_part_name(v.dtype)] for v in views)
    q = max(SUBNORMAL_SPACING[_part_name(v.dtype)] for v in views)
    atol = q * sum(v.size * (2 if is_complex(v.dtype) else 1) for v in views)
    new = ref_norm(views, p)
    assert abs(new - target) <= (u + 3e-12) * target + atol, (new, target)
    for s in strided:  # and the memory holds exactly the reference result
        assert_same_bits(s.base, s.expected_base(ref_scale(s.view_before, ref_coef(max_norm, total))))


@given(
    leaves(dtypes=[np.float64, np.complex128], max_leaves=3, max_side=4, exp_range=(-10, 0)),
    st.sampled_from([1.0, 2.0, 3.0, 0.5, math.inf]),
    st.just(0.0) | st.floats(1e-280, 0.999),  # clipped magnitudes >= 2**-10 * frac: no subnormals
)
def test_clipping_twice_changes_nothing(strided, p, frac):
    # Why the second call cannot scale (float64 / complex128 leaves, no subnormals):
    # after the first call |y_i| <= (1 + u)|x_i| c with c = M / (T + eps), so for any
    # p > 0: ||y|| <= (1 + u) c ||x||, and ||x|| <= T (1 + 1e-12) (SPEC §4 accuracy).
    # The second total T2 <= (1 + 1e-12)||y|| <= M * T / (T + eps) * (1 + 2.1e-12),
    # which is < M as long as eps / (T + eps) > 2.1e-12, i.e. T < ~4.7e5 for eps = 1e-6.
    # Magnitudes <= 1 and <= 3 * 4**3 elements keep T below 2e5 even for p = 0.5.
    views = [s.view for s in strided]
    true_total = ref_norm(views, p)
    assert true_total < 2e5
    max_norm = frac * true_total
    gc.clip_grad_norm_(views, max_norm, p)
    after = [s.base.copy() for s in strided]
    total2 = gc.clip_grad_norm_(views, max_norm, p)
    assert total2 <= max_norm
    for s, a in zip(strided, after):
        assert_same_bits(s.base, a, nan_payload=True)
    gc.clip_grad_norm_per_layer_(views, max_norm, p)  # per leaf, the same argument
    gc.clip_grad_norm_per_layer_(views, max_norm, p)
    norms = gc.layer_norms(views, p)
    assert (norms <= max_norm).all() or max_norm == 0


@given(leaves(), st.sampled_from([1.0, 2.0, math.inf, 3.0, 0.5]), st.integers(-6, 6), st.data())
def test_power_of_two_scaling(strided, p, k, data):
    views = [s.view for s in strided]
    n1 = gc.grad_norm(views, p)
    l1 = gc.layer_norms(views, p)
    # scale in place (same memory, so the summation order cannot change with alignment);
    # the element ranges keep every x * 2**k a normal number: the scaling is exact
    for v in views:
        wide = v.astype(np.complex128 if is_complex(v.dtype) else np.float64)
        v[...] = (wide * 2.0**k).astype(v.dtype)
        assert (v.astype(wide.dtype) == wide * 2.0**k).all()
    n2 = gc.grad_norm(views, p)
    l2 = gc.layer_norms(views, p)
    if p in (1.0, 2.0, math.inf):  # every step is exact under a power-of-two scaling
        assert n2 == math.ldexp(n1, k), (n1, n2, k)
        assert np.array_equal(l2, np.ldexp(l1, k))
    else:  # x**(1/p) with 1/p inexact: equal to the accuracy of the norm
        assert_norm_close(n2, math.ldexp(n1, k), rtol=2e-12)
        assert_norms_close(l2, np.ldexp(l1, k), rtol=2e-12)


@given(leaves(max_leaves=6), st.sampled_from([1.0, 2.0, 3.0, 0.5, math.inf, 1.7]))
def test_layer_norms_combine_to_the_global_norm(strided, p):
    views = [s.view for s in strided]
    ln = gc.layer_norms(views, p)
    assert_norms_close(ln, ref_layer_norms(views, p))
    # each is within 1e-12 of exact, so their combination and the total differ by <= 2e-12
    assert_norm_close(ref_norm([ln], p), gc.grad_norm(views, p), rtol=2e-12)


@given(leaves(max_leaves=6), norm_type, st.floats(0.0, 2.0))
def test_per_layer_clipping_agrees_with_layer_norms(strided, p, frac):
    views = [s.view for s in strided]
    ln = gc.layer_norms(views, p)
    max_norm = frac * float(np.median(ln))
    got = gc.clip_grad_norm_per_layer_(views, max_norm, p)
    assert_norms_close(got, ln, rtol=2e-12)
    for s, n in zip(strided, got):
        (exp,) = ref_clip_by_norm([s.view_before], max_norm, n)
        assert_same_bits(s.base, s.expected_base(exp))


@given(leaves(), st.floats(0.0, 4.0), st.sampled_from([1e-6, 0.0, 0.5]))
def test_clip_grad_norm_matches_reference(strided, frac, eps):
    views = [s.view for s in strided]
    max_norm = frac * ref_norm(views)
    out, total = gc.clip_grad_norm(views, max_norm, eps=eps)
    assert_norm_close(total, ref_norm(views))
    for s, o in zip(strided, out):
        s.assert_untouched()
        (exp,) = ref_clip_by_norm([s.view_before], max_norm, total, eps)
        assert_same_bits(o, exp)


@given(
    leaves(dtypes=[d for d in DTYPES if not is_complex(d)]),
    st.floats(0.0, 1e4, allow_subnormal=False) | st.sampled_from([math.inf, 0.0]),
)
def test_clip_grad_value_matches_reference(strided, c):
    views = [s.view for s in strided]
    gc.clip_grad_value_(views, c)
    for s in strided:
        exp = ref_clamp(s.view_before, c)
        if c == 0:  # the sign of a zero made by clamping to [-0, 0] is unspecified
            exp = np.where(exp == 0, s.view, exp).astype(exp.dtype)
        assert_same_bits(s.base, s.expected_base(exp))
