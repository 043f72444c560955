"""all_finite and zero_nonfinite_ (SPEC §3): every dtype and layout, non-finite values in
the last element of a large leaf, in a stepped view's element, and in a gap of a stepped
view (which must not be seen)."""

import numpy as np
import pytest

import gradclip as gc
from helpers import (
    COMPLEX_DTYPES,
    LAYOUTS,
    Frozen,
    Strided,
    assert_same_bits,
    assert_zeroed,
    dtype_id,
    dtypes,
    layouts,
    random_values,
    real_dtypes,
)
from reference import ref_all_finite, ref_nonfinite_mask

FINITE_SHAPES = [(), (0,), (1,), (17,), (3, 5), (4, 3, 7), (100_003,)]
finite_shapes = pytest.mark.parametrize("shape", FINITE_SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")


def _positions(shape, k):
    """k distinct multi-indices into ``shape`` (the last element always among them)."""
    size = int(np.prod(shape))
    if size == 0:
        return []
    flat = sorted({size - 1, 0, size // 2, size // 3})[-k:]
    return [np.unravel_index(i, shape) for i in flat]


@dtypes
@finite_shapes
@layouts
def test_all_finite_every_layout(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    r = gc.all_finite(s.view)
    assert type(r) is bool and r is True
    assert gc.all_finite([s.view]) is True
    for bad in (np.nan, np.inf, -np.inf) if s.view.size else ():
        s.poke(s.last_index(), bad)
        assert gc.all_finite(s.view) is False, f"{bad} in the last element not seen"
        assert gc.all_finite([np.zeros(3, dtype), s.view]) is False
        s.assert_untouched()
        s.poke(s.last_index(), 1.0)


GAPPY_LAYOUTS = ["step3", "step_all", "neg_step", "T_step"]  # views with holes in the base


@dtypes
@pytest.mark.parametrize("layout", GAPPY_LAYOUTS)
def test_all_finite_ignores_gaps(dtype, layout, rng):
    s = Strided(layout, (4, 3, 7), dtype, rng)
    outside = s.outside_mask()
    assert outside.any()
    with np.errstate(all="ignore"):
        s.base[outside] = np.nan
    s.snapshot()
    assert gc.all_finite(s.view) is True
    assert gc.zero_nonfinite_(s.view) == 0
    s.assert_untouched()


@real_dtypes
@finite_shapes
@layouts
def test_zero_nonfinite_every_layout(dtype, shape, layout, rng):
    s = Strided(layout, shape, dtype, rng)
    for idx, bad in zip(_positions(shape, 3), (np.nan, np.inf, -np.inf)):
        s.poke(idx, bad)
    # a non-finite value outside the view (where the layout has gaps) must survive
    outside = s.outside_mask()
    if outside.any():
        with np.errstate(all="ignore"):
            s.base[tuple(np.argwhere(outside)[-1])] = np.nan
        s.snapshot()
    expected_count = int(ref_nonfinite_mask(s.view_before).sum())
    assert expected_count == min(3, s.view.size)
    n = gc.zero_nonfinite_(s.view)
    assert n == expected_count
    assert_zeroed(s.view, s.view_before)
    outside = s.outside_mask()
    assert_same_bits(s.base[outside], s.before[outside], what="memory outside the view")
    assert gc.all_finite(s.view) is True
    assert gc.zero_nonfinite_(s.view) == 0


@pytest.mark.parametrize("dtype", COMPLEX_DTYPES, ids=dtype_id)
@layouts
def test_zero_nonfinite_complex(dtype, layout, rng):
    s = Strided(layout, (4, 3, 7), dtype, rng)
    # each poked element has exactly one non-finite part: the count is unambiguous
    pokes = {(0, 0, 0): complex(np.nan, 1.5), (1, 2, 3): complex(-2.0, np.inf), (3, 2, 6): complex(-np.inf, 0.25)}
    for idx, v in pokes.items():
        s.poke(idx, v)
    assert gc.all_finite(s.view) is False
    n = gc.zero_nonfinite_(s.view)
    assert n == len(pokes)
    view = s.view
    assert np.isfinite(view.real).all() and np.isfinite(view.imag).all()
    for idx, v in pokes.items():
        if not np.isfinite(v.real):
            assert view[idx].real == 0
        if not np.isfinite(v.imag):
            assert view[idx].imag == 0
    # everything else, gaps included, is unchanged
    mask = np.zeros(s.base.shape, dtype=bool)
    mview = s.view_fn(mask)
    for idx in pokes:
        mview[idx] = True
    assert_same_bits(s.base[~mask], s.before[~mask])
    assert gc.all_finite(s.view) is True


@dtypes
def test_nan_in_last_element_of_large_leaf(dtype, rng):
    x = np.zeros(1_000_003, dtype)
    small = [np.ones(5, dtype) for _ in range(20)]
    assert gc.all_finite([*small, x]) is True
    x[-1] = np.nan
    assert gc.all_finite([*small, x]) is False
    assert gc.all_finite(x[::-1]) is False
    assert gc.all_finite(x[:-1]) is True
    if dtype.kind != "c":
        assert gc.zero_nonfinite_([*small, x]) == 1
        assert x[-1] == 0 and gc.all_finite(x) is True


@dtypes
def test_nonfinite_in_stepped_view_element(dtype, rng):
    base = random_values(300, dtype, rng)
    view = base[5::7]
    base[5 + 7 * 20] = np.inf  # element 20 of the view
    base[6] = np.nan  # a gap
    assert gc.all_finite(view) is False
    assert gc.all_finite(base[6:7]) is False
    assert gc.all_finite(base[7::7]) is True
    if dtype.kind != "c":
        before = base.copy()
        assert gc.zero_nonfinite_(view) == 1
        assert base[5 + 7 * 20] == 0
        rest = np.ones(base.shape, dtype=bool)
        rest[5 + 7 * 20] = False
        assert_same_bits(base[rest], before[rest])  # the NaN in the gap is still there


@pytest.mark.parametrize("grads", [[], (), {}, [None], {"a": [None]}], ids=repr)
def test_empty(grads):
    assert gc.all_finite(grads) is True
    assert gc.zero_nonfinite_(grads) == 0


@real_dtypes
def test_zero_nonfinite_many_leaves(dtype, rng):
    leaves = [random_values(int(rng.integers(0, 30)), dtype, rng) for _ in range(300)]
    for x in leaves[::7]:
        if x.size:
            x[rng.integers(0, x.size)] = [np.nan, np.inf, -np.inf][x.size % 3]
    before = [x.copy() for x in leaves]
    expected = sum(int(ref_nonfinite_mask(x).sum()) for x in before)
    assert gc.all_finite(leaves) is ref_all_finite(before)
    assert gc.zero_nonfinite_(leaves) == expected
    for x, b in zip(leaves, before):
        assert_zeroed(x, b)


@dtypes
def test_all_finite_does_not_write(dtype, rng):
    leaves = [Strided(lay, (3, 5), dtype, rng).view for lay in LAYOUTS]
    leaves[2][1, 1] = np.nan
    frozen = Frozen(*leaves)
    assert gc.all_finite(leaves) is False
    frozen.check()
