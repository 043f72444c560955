"""Clipping (SPEC §3, §4): clip_grad_norm_ / clip_grad_norm, clip_grads_with_norm_,
clip_grad_value_ / clip_grad_value and clip_grad_norm_per_layer_.

Results are compared bit for bit with reference.ref_scale / ref_clamp (one rounding to
the leaf dtype, round-to-nearest-even), and in-place results are checked on the whole
base array, so that writes reach the original memory for every layout and nothing
outside the view changes.
"""

import math

import ml_dtypes
import numpy as np
import pytest

import gradclip as gc
from helpers import (
    DTYPES,
    LAYOUTS,
    Frozen,
    Strided,
    assert_norm_close,
    assert_norms_close,
    assert_same_bits,
    dtype_id,
    dtypes,
    layouts,
    norm_types,
    random_values,
    real_dtypes,
    shapes,
)
from reference import (
    BFLOAT16,
    ref_clamp,
    ref_clip_by_norm,
    ref_coef,
    ref_layer_norms,
    ref_norm,
    ref_scale,
    ref_should_clip,
)

CLIP_VALUE = 0.7123456789012345  # an arbitrary float64, not representable in any leaf dtype


def _assert_new_array(out, s):
    assert isinstance(out, np.ndarray), type(out)
    assert out is not s.view
    assert not np.shares_memory(out, s.base), "out-of-place result shares the input's memory"


# --------------------------------------------------------------------------- clip_grad_norm


@dtypes
@shapes
@layouts
def test_clip_grad_norm_inplace_every_layout(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    max_norm = 0.4 * ref_norm([s.view])  # 0.0 for empty / all-zero leaves
    total = gc.clip_grad_norm_(s.view, max_norm)
    assert type(total) is float
    assert_norm_close(total, ref_norm([s.view_before]))
    (expected,) = ref_clip_by_norm([s.view_before], max_norm, total)
    assert_same_bits(s.base, s.expected_base(expected), what="base after clip_grad_norm_")


@dtypes
@shapes
@layouts
def test_clip_grad_norm_out_of_place_every_layout(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    max_norm = 0.4 * ref_norm([s.view])
    out, total = gc.clip_grad_norm(s.view, max_norm)
    assert type(total) is float
    s.assert_untouched()
    assert_norm_close(total, ref_norm([s.view_before]))
    _assert_new_array(out, s)
    (expected,) = ref_clip_by_norm([s.view_before], max_norm, total)
    assert_same_bits(out, expected, what="clip_grad_norm result")


@dtypes
@norm_types
def test_clip_grad_norm_norm_types(dtype, p, rng):
    strided = [Strided(lay, shp, dtype, rng) for lay in LAYOUTS for shp in [(4, 3, 7), (17,)]]
    views = [s.view_before for s in strided]
    max_norm = 0.3 * ref_norm(views, p)
    total = gc.clip_grad_norm_([s.view for s in strided], max_norm, norm_type=p)
    assert_norm_close(total, ref_norm(views, p))
    for s, exp in zip(strided, ref_clip_by_norm(views, max_norm, total)):
        assert_same_bits(s.base, s.expected_base(exp))
    # the out-of-place twin (contiguous copies: the summation order may differ)
    fresh = [s.view_before.copy() for s in strided]
    out, total2 = gc.clip_grad_norm(fresh, max_norm, p)
    assert_norm_close(total2, ref_norm(views, p))
    assert isinstance(out, list) and len(out) == len(fresh)
    for o, exp in zip(out, ref_clip_by_norm(views, max_norm, total2)):
        assert_same_bits(o, exp, what="clip_grad_norm result")


@dtypes
def test_twin_gives_the_in_place_result(dtype, rng):
    # The out-of-place twin computes what clip_grad_norm_ computes, on the same memory:
    # same total, same arrays. (Seen failing by 1 ulp in the total, e.g. when the twin
    # normed its contiguous copies instead of the input: then clip_grad_norm(g,
    # grad_norm(g)) may clip.)
    for trial in range(20):
        views = [Strided(lay, (3, 5), dtype, rng).view for lay in LAYOUTS]
        for frac in (1.0, 0.5):  # not clipping, then clipping
            t_norm = gc.grad_norm(views)
            out, t_twin = gc.clip_grad_norm(views, frac * t_norm)
            assert t_twin == t_norm, f"trial {trial}: clip_grad_norm's total differs from grad_norm's"
            t_inplace = gc.clip_grad_norm_(views, frac * t_norm)
            assert t_inplace == t_norm, f"trial {trial}: clip_grad_norm_'s total differs from grad_norm's"
            for o, v in zip(out, views):
                assert_same_bits(o, v, what="twin vs in-place")


@dtypes
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.25, 3.0])
def test_clip_grad_norm_eps(dtype, eps, rng):
    leaves = [random_values((6, 5), dtype, rng), random_values(11, dtype, rng)]
    before = [x.copy() for x in leaves]
    max_norm = 0.5 * ref_norm(leaves)
    total = gc.clip_grad_norm_(leaves, max_norm, eps=eps)
    for x, exp in zip(leaves, ref_clip_by_norm(before, max_norm, total, eps)):
        assert_same_bits(x, exp)


@dtypes
def test_clip_grad_norm_max_norm_zero(dtype, rng):
    leaves = [random_values((3, 4), dtype, rng), random_values(5, dtype, rng)]
    before = [x.copy() for x in leaves]
    total = gc.clip_grad_norm_(leaves, 0.0)
    assert_norm_close(total, ref_norm(before))
    for x, b in zip(leaves, before):
        assert_same_bits(x, ref_scale(b, 0.0))  # signed zeros


@dtypes
@pytest.mark.parametrize("how", ["above", "equal", "inf"])
def test_clip_grad_norm_not_clipping_leaves_memory_untouched(dtype, how, rng):
    strided = [Strided(lay, (3, 5), dtype, rng) for lay in LAYOUTS]
    views = [s.view for s in strided]
    frozen = Frozen(*views)
    if how == "above":
        max_norm = 1.5 * ref_norm(views)
    elif how == "equal":  # total > max_norm is false when they are equal
        max_norm = gc.clip_grad_norm_(views, math.inf)
        frozen.check()
    else:
        max_norm = math.inf
    total = gc.clip_grad_norm_(views, max_norm)
    assert_norm_close(total, ref_norm(views))
    frozen.check()
    if how == "equal":
        max_norm = gc.clip_grad_norm(views, math.inf)[1]
    out, total2 = gc.clip_grad_norm(views, max_norm)
    assert_norm_close(total2, ref_norm(views))
    frozen.check()
    for o, s in zip(out, strided):
        _assert_new_array(o, s)
        assert_same_bits(o, s.view_before, nan_payload=True)


@dtypes
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=str)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf], ids=lambda p: f"p{p:g}")
def test_clip_grad_norm_nonfinite_total(dtype, bad, p, rng):
    good = [random_values((4, 4), dtype, rng) * 100 for _ in range(2)]
    x = random_values(9, dtype, rng) * 100
    with np.errstate(all="ignore"):
        x[8] = bad
    leaves = [*good, x[::2]]
    frozen = Frozen(*leaves)
    total = gc.clip_grad_norm_(leaves, 1.0, p)
    assert not math.isfinite(total)
    frozen.check()
    out, total2 = gc.clip_grad_norm(leaves, 1.0, p)
    assert not math.isfinite(total2)
    for o, leaf in zip(out, leaves):
        assert_same_bits(o, leaf)
    frozen.check()
    for fn in (gc.clip_grad_norm_, gc.clip_grad_norm):
        with pytest.raises(gc.NonFiniteGradientError, match="non-finite"):
            fn(leaves, 1.0, p, error_if_nonfinite=True)
        frozen.check()


def test_nonfinite_error_class():
    assert issubclass(gc.NonFiniteGradientError, FloatingPointError)
    assert issubclass(gc.NonFiniteGradientError, RuntimeError)


def test_error_if_nonfinite_with_finite_grads_clips(rng):
    leaves = [random_values(20, np.float32, rng)]
    before = leaves[0].copy()
    total = gc.clip_grad_norm_(leaves, 0.5, error_if_nonfinite=True)
    assert_same_bits(leaves[0], ref_clip_by_norm([before], 0.5, total)[0])


@dtypes
def test_clip_grad_norm_mixed_dtypes_in_one_call(dtype, rng):
    # every dtype at once, plus the parametrised one first (so each leads the group once)
    leaves = [random_values((7, 3), dtype, rng)]
    leaves += [random_values(n, d, rng) * (i + 1) for i, d in enumerate(DTYPES) for n in (5, 40)]
    before = [x.copy() for x in leaves]
    for p in (2.0, 1.0, math.inf):
        assert_norm_close(gc.grad_norm(leaves, p), ref_norm(leaves, p))
        assert_norms_close(gc.layer_norms(leaves, p), ref_layer_norms(leaves, p))
    max_norm = 0.25 * ref_norm(leaves)
    total = gc.clip_grad_norm_(leaves, max_norm)
    assert_norm_close(total, ref_norm(before))
    for x, exp in zip(leaves, ref_clip_by_norm(before, max_norm, total)):
        assert x.dtype == exp.dtype
        assert_same_bits(x, exp, what=f"{x.dtype} leaf")


def test_many_small_leaves(rng):
    dts = [np.float32, np.float64, np.float16, BFLOAT16, np.complex64]
    leaves = []
    for i in range(1000):
        n = int(rng.integers(0, 40))
        shape = (n,) if i % 3 else (n // 4 + 1, 3)
        leaves.append(random_values(shape, dts[i % len(dts)], rng, scale=float(rng.uniform(0.1, 3))))
    before = [x.copy() for x in leaves]
    assert_norm_close(gc.grad_norm(leaves), ref_norm(leaves))
    assert_norms_close(gc.layer_norms(leaves), ref_layer_norms(leaves))
    max_norm = 0.5 * ref_norm(leaves)
    total = gc.clip_grad_norm_(leaves, max_norm)
    for i, (x, exp) in enumerate(zip(leaves, ref_clip_by_norm(before, max_norm, total))):
        assert_same_bits(x, exp, what=f"leaf {i}")
    # per layer, on the clipped leaves
    now = [x.copy() for x in leaves]
    ln = gc.clip_grad_norm_per_layer_(leaves, 0.8)
    assert_norms_close(ln, ref_layer_norms(now))
    for i, (x, b, n) in enumerate(zip(leaves, now, ln)):
        assert_same_bits(x, ref_clip_by_norm([b], 0.8, n)[0], what=f"per-layer leaf {i}")
    # by value, on the real leaves
    real = [x for x in leaves if x.dtype.kind != "c"]
    now = [x.copy() for x in real]
    assert gc.clip_grad_value_(real, 0.05) is None
    for i, (x, b) in enumerate(zip(real, now)):
        assert_same_bits(x, ref_clamp(b, 0.05), what=f"value-clipped leaf {i}")


def test_large_leaves_parallel_paths(rng):
    # big enough for the parallel kernels; strided, reversed and half-precision leaves
    a = random_values(1_000_001, np.float32, rng)
    b_base = random_values(2_000_002, np.float32, rng)
    c_base = random_values((700, 1001), np.float64, rng)
    d = random_values(1_000_003, BFLOAT16, rng)
    e_base = random_values(900_000, np.float16, rng)
    leaves = [a, b_base[::2], c_base[:, ::-1], d, e_base[::-3]]
    bases = [a, b_base, c_base, d, e_base]
    bases_before = [x.copy() for x in bases]
    before = [x.copy() for x in leaves]
    assert_norm_close(gc.grad_norm(leaves), ref_norm(before))
    assert_norms_close(gc.layer_norms(leaves, 1.0), ref_layer_norms(before, 1.0))
    max_norm = 0.5 * ref_norm(before)
    total = gc.clip_grad_norm_(leaves, max_norm)
    coef = ref_coef(max_norm, total)
    for i, (x, b) in enumerate(zip(leaves, before)):
        assert_same_bits(x, ref_scale(b, coef), what=f"large leaf {i}")
    assert_same_bits(b_base[1::2], bases_before[1][1::2], what="gaps of b")
    e_gaps = np.ones(e_base.shape, bool)
    e_gaps[::-3] = False
    assert_same_bits(e_base[e_gaps], bases_before[4][e_gaps], what="gaps of e")
    now = [x.copy() for x in leaves]
    gc.clip_grad_value_(leaves, 0.3)
    for i, (x, b) in enumerate(zip(leaves, now)):
        assert_same_bits(x, ref_clamp(b, 0.3), what=f"large leaf {i} (value)")
    d[-1] = np.nan
    c_base[-1, 0] = np.inf  # the last element of the reversed view
    assert gc.all_finite(leaves) is False
    assert gc.zero_nonfinite_(leaves) == 2
    assert gc.all_finite(leaves) is True


def test_argument_types(rng):
    # ints and NumPy scalars as thresholds and norm types
    x = random_values(40, np.float32, rng)
    x0 = x.copy()
    total = gc.clip_grad_norm_(x, 1, 2, eps=0)
    assert_same_bits(x, ref_scale(x0, ref_coef(1.0, total, 0.0)))
    x1 = x.copy()
    gc.clip_grad_norm_(x, np.float32(0.5), norm_type=np.float64(1.0), eps=np.float64(1e-6))
    assert_same_bits(x, ref_scale(x1, ref_coef(0.5, ref_norm([x1], 1.0))))
    x2 = x.copy()
    gc.clip_grad_value_(x, np.float16(0.01))
    assert_same_bits(x, ref_clamp(x2, float(np.float16(0.01))))
    gc.clip_grad_value_(x, 0)
    assert (x == 0).all()


@dtypes
def test_out_of_place_twins_accept_read_only_input(dtype, rng):
    leaves = [random_values((4, 6), dtype, rng), random_values(9, dtype, rng)[::-2]]
    for x in leaves:
        x.flags.writeable = False
    out, total = gc.clip_grad_norm(leaves, 0.5)
    for o, x in zip(out, leaves):
        assert_same_bits(o, ref_scale(x, ref_coef(0.5, total)))
        assert o.flags.writeable
    if dtype.kind != "c":
        out = gc.clip_grad_value(leaves, 0.5)
        for o, x in zip(out, leaves):
            assert_same_bits(o, ref_clamp(x, 0.5))
            assert o.flags.writeable


# --------------------------------------------------------------------------- clip_grads_with_norm_


@dtypes
@shapes
@layouts
def test_clip_grads_with_norm_every_layout(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    assert gc.clip_grads_with_norm_(s.view, 1.0, 10.0) is None
    expected = ref_scale(s.view_before, ref_coef(1.0, 10.0))
    assert_same_bits(s.base, s.expected_base(expected))


@dtypes
@pytest.mark.parametrize(
    "max_norm, total_norm, eps",
    [(1.0, 3.0, 1e-6), (2.5, 7.25, 0.0), (0.3, 0.9, 0.5), (0.0, 1.0, 1e-6), (1.0, 1e30, 1e-6)],
)
def test_clip_grads_with_norm_values(dtype, max_norm, total_norm, eps, rng):
    leaves = [random_values((5, 6), dtype, rng), random_values(13, dtype, rng)[::-3]]
    frozen_before = [x.copy() for x in leaves]
    gc.clip_grads_with_norm_(leaves, max_norm, total_norm, eps=eps)
    coef = ref_coef(max_norm, total_norm, eps)
    for x, b in zip(leaves, frozen_before):
        assert_same_bits(x, ref_scale(b, coef))


@dtypes
@pytest.mark.parametrize("total_norm", [0.5, 1.0, np.nan, np.inf], ids=str)
def test_clip_grads_with_norm_untouched(dtype, total_norm, rng):
    leaves = [random_values((5, 6), dtype, rng) * 10, random_values(13, dtype, rng)[::2]]
    frozen = Frozen(*leaves)
    assert gc.clip_grads_with_norm_(leaves, 1.0, total_norm) is None
    frozen.check()


def test_clip_grads_with_norm_inf_max_norm(rng):
    leaves = [random_values(50, np.float32, rng) * 1e3]
    frozen = Frozen(*leaves)
    gc.clip_grads_with_norm_(leaves, math.inf, 1e30)
    frozen.check()


@pytest.mark.parametrize("dtype, mant, half_ulp", [(np.float16, 10, 11), (BFLOAT16, 7, 8)], ids=["float16", "bfloat16"])
def test_scaling_rounds_once(dtype, mant, half_ulp):
    # x * coef = 1 + 2**-half_ulp + 2**-40: just above the midpoint between 1 and
    # 1 + 2**-mant. One rounding gives 1 + 2**-mant; rounding through float32 first
    # lands on the midpoint and then on 1 (ties to even).
    target = 1 + 2.0**-half_ulp + 2.0**-40
    x = np.array([2.0, -2.0, 4.0], dtype=dtype)
    coef = target / 2  # exact
    gc.clip_grads_with_norm_([x], coef, 1.0, eps=0.0)  # coef = max_norm / total_norm
    expected = ref_scale(np.array([2.0, -2.0, 4.0], dtype=dtype), coef)
    assert float(expected[0]) == 1 + 2.0**-mant  # the reference itself rounds once
    assert_same_bits(x, expected)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=dtype_id)
def test_complex_scaling_is_by_a_real_factor(dtype):
    # SPEC §2: complex leaves are scaled by a real factor, i.e. each part on its own:
    # signed zeros keep their sign and an infinite part does not make the other NaN
    # (multiplying by the complex number coef + 0j does both wrong).
    x = np.array([complex(-0.0, -0.0), complex(0.0, -0.0), complex(-3.0, 0.0), complex(np.inf, 1.0), complex(2.0, -np.inf)], dtype)
    before = x.copy()
    gc.clip_grads_with_norm_(x, 1.0, 2.0, eps=0.0)
    assert_same_bits(x, ref_scale(before, 0.5))


@dtypes
def test_scaling_into_subnormals(dtype):
    # results below the normal range round (RNE) onto the subnormal grid, ties included
    part = {"complex64": np.float32, "complex128": np.float64}.get(dtype.name, dtype)
    tiny = float(ml_dtypes.finfo(part).tiny)  # the smallest normal number
    # values k / 512 (k = 1..2048) times 2 * tiny: results from 2**-8 to 8 times tiny,
    # most of them subnormal, with exact ties between subnormal neighbours
    x = (np.arange(1, 2049, dtype=np.float64) / 512).astype(dtype)
    before = x.copy()
    coef = 2.0 * tiny
    gc.clip_grads_with_norm_(x, coef, 1.0, eps=0.0)
    assert_same_bits(x, ref_scale(before, coef))
    x = before.copy()
    coef = tiny * 0.7123456789  # not a power of two
    gc.clip_grads_with_norm_(x, coef, 1.0, eps=0.0)
    assert_same_bits(x, ref_scale(before, coef))


# --------------------------------------------------------------------------- clip by value


@real_dtypes
@shapes
@layouts
def test_clip_grad_value_inplace_every_layout(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    if s.view.size:
        s.poke(s.last_index(), np.nan)  # NaN stays NaN
    assert gc.clip_grad_value_(s.view, CLIP_VALUE) is None
    expected = ref_clamp(s.view_before, CLIP_VALUE)
    assert_same_bits(s.base, s.expected_base(expected), what="base after clip_grad_value_")
    if s.view.size:
        assert np.isnan(s.view[s.last_index()])


@real_dtypes
@shapes
@layouts
def test_clip_grad_value_out_of_place_every_layout(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    if s.view.size > 1:
        s.poke((0,) * len(shape), np.inf)
    out = gc.clip_grad_value(s.view, CLIP_VALUE)
    s.assert_untouched()
    _assert_new_array(out, s)
    assert_same_bits(out, ref_clamp(s.view_before, CLIP_VALUE))


@real_dtypes
@pytest.mark.parametrize("c", [1e-40, 3e-6, 1e-3, 0.5, 1.0, 2.0, 1e4])
def test_clip_grad_value_thresholds(dtype, c, rng):
    leaves = [random_values((8, 9), dtype, rng, scale=3.0), random_values(40, dtype, rng)[1::3]]
    with np.errstate(all="ignore"):
        leaves[0][0, 0], leaves[0][1, 1], leaves[0][2, 2] = np.inf, -np.inf, -0.0
    before = [x.copy() for x in leaves]
    gc.clip_grad_value_(leaves, c)
    for x, b in zip(leaves, before):
        assert_same_bits(x, ref_clamp(b, c))


@real_dtypes
def test_clip_grad_value_zero(dtype, rng):
    x = random_values(30, dtype, rng)
    x[3] = np.nan
    gc.clip_grad_value_([x], 0.0)
    assert np.isnan(x[3])
    rest = np.delete(x.astype(np.float64), 3)
    assert (rest == 0).all()  # the sign of a zero produced from a clamp to [-0, 0] is free


@real_dtypes
def test_clip_grad_value_inf_never_changes(dtype, rng):
    strided = [Strided(lay, (4, 3, 7), dtype, rng, scale=100.0) for lay in LAYOUTS]
    strided[0].poke((0, 0, 0), np.inf)
    strided[1].poke((1, 2, 3), -np.inf)
    strided[2].poke((3, 2, 6), -0.0)
    gc.clip_grad_value_([s.view for s in strided], math.inf)
    for s in strided:
        s.assert_untouched()
    out = gc.clip_grad_value([s.view for s in strided], math.inf)
    for o, s in zip(out, strided):
        assert_same_bits(o, s.view_before)


@pytest.mark.parametrize(
    "dtype, mant, half_ulp", [(np.float16, 10, 11), (BFLOAT16, 7, 8)], ids=["float16", "bfloat16"]
)
def test_clamp_threshold_rounds_once(dtype, mant, half_ulp):
    # c lies just above the midpoint between 1 and 1 + 2**-mant: clamping to c gives
    # 1 + 2**-mant after one rounding; rounding c through float32 would give 1.
    c = 1 + 2.0**-half_ulp + 2.0**-40
    x = np.array([2.0, -3.0, 1 + 2.0**-mant, 0.5], dtype=dtype)
    before = x.copy()
    gc.clip_grad_value_(x, c)
    expected = ref_clamp(before, c)
    assert float(expected[0]) == 1 + 2.0**-mant
    assert_same_bits(x, expected)
    assert_same_bits(gc.clip_grad_value(before, c), expected)


# --------------------------------------------------------------------------- per layer


@dtypes
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf], ids=lambda p: f"p{p:g}")
def test_clip_grad_norm_per_layer(dtype, p, rng):
    strided = []
    for i, lay in enumerate(LAYOUTS):
        strided.append(Strided(lay, [(3, 5), (17,), (4, 3, 7), ()][i % 4], dtype, rng, scale=0.2 * 2**i))
    strided[3].poke((), np.nan)  # a leaf with a non-finite norm is left untouched
    strided[5].poke((1,), -np.inf)
    views = [s.view_before for s in strided]
    expected_norms = ref_layer_norms(views, p)
    max_norm = float(np.median(expected_norms[np.isfinite(expected_norms)]))
    got = gc.clip_grad_norm_per_layer_([s.view for s in strided], max_norm, p)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert_norms_close(got, expected_norms)
    clipped = 0
    for i, (s, n) in enumerate(zip(strided, got)):
        clipped += ref_should_clip(max_norm, n)
        (exp,) = ref_clip_by_norm([s.view_before], max_norm, float(n))
        assert_same_bits(s.base, s.expected_base(exp), what=f"leaf {i}")
    assert 0 < clipped < len(strided)  # the test exercises both branches


@dtypes
def test_clip_grad_norm_per_layer_eps(dtype, rng):
    leaves = [random_values((4, 5), dtype, rng) * k for k in (0.1, 1.0, 10.0)]
    before = [x.copy() for x in leaves]
    got = gc.clip_grad_norm_per_layer_(leaves, 1.0, eps=0.5)
    for x, b, n in zip(leaves, before, got):
        assert_same_bits(x, ref_clip_by_norm([b], 1.0, float(n), eps=0.5)[0])


@dtypes
@shapes
def test_clip_grad_norm_per_layer_every_shape(dtype, shape, rng):
    strided = [Strided(lay, shape, dtype, rng) for lay in LAYOUTS]
    max_norm = 0.5 * ref_norm([strided[0].view])
    got = gc.clip_grad_norm_per_layer_([s.view for s in strided], max_norm)
    assert_norms_close(got, ref_layer_norms([s.view_before for s in strided]))
    for s, n in zip(strided, got):
        (exp,) = ref_clip_by_norm([s.view_before], max_norm, float(n))
        assert_same_bits(s.base, s.expected_base(exp))


def test_per_layer_empty():
    got = gc.clip_grad_norm_per_layer_([], 1.0)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (0,)


@pytest.mark.parametrize("grads", [[], (), {}, [None]], ids=repr)
def test_clip_functions_on_empty_grads(grads):
    total = gc.clip_grad_norm_(grads, 1.0)
    assert type(total) is float and total == 0.0
    assert gc.clip_grads_with_norm_(grads, 1.0, 2.0) is None
    assert gc.clip_grad_value_(grads, 1.0) is None
    out, total = gc.clip_grad_norm(grads, 1.0)
    assert total == 0.0 and out == grads and type(out) is type(grads)
    assert gc.clip_grad_value(grads, 1.0) == grads
