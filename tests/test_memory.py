"""Memory safety: leaves carved out of one byte buffer (views at offsets, gaps between
them, guard bytes around, stepped and negative-stride views whose gaps lie inside the
buffer). After every function, every byte outside the leaves' elements is unchanged and
the leaves hold the reference result. Gaps are filled with NaN bit patterns (0xFF bytes)
or random bytes, so a kernel that reads a gap sees a non-finite value."""

import math

import numpy as np
import pytest

import gradclip as gc
from helpers import assert_norm_close, assert_norms_close, assert_same_bits, assert_zeroed, dtypes, random_values
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

GUARD = 64


def _addr(a):
    return a.__array_interface__["data"][0]


class Carved:
    """Leaves of one dtype living in ``self.buf`` (a uint8 array), with gaps and guards."""

    def __init__(self, dtype, rng, fill):
        dtype = np.dtype(dtype)
        it = dtype.itemsize
        specs = [  # (base shape, view function)
            ((37,), lambda b: b),
            ((60,), lambda b: b[::3]),  # gaps inside
            ((6, 9), lambda b: b[::-2, 1::3]),  # negative stride, gaps
            ((), lambda b: b),
            ((5, 4), lambda b: b.T),
            ((4, 3, 6), lambda b: b[:, ::-1, ::2].transpose(2, 0, 1)),
            ((1,), lambda b: b),
            ((25,), lambda b: b[24:0:-4]),
        ]
        sizes = [int(np.prod(s)) * it for s, _ in specs]
        gaps = [int(rng.integers(1, 5)) * it for _ in specs]
        total = GUARD + sum(sizes) + sum(gaps) + GUARD
        self.buf = np.empty(total, dtype=np.uint8)
        if fill == "nan":
            self.buf[...] = 0xFF  # NaN in every float format, at every alignment
        else:
            self.buf[...] = rng.integers(0, 256, total, dtype=np.uint8)
        self.leaves = []
        pos = GUARD
        for (shape, view), size, gap in zip(specs, sizes, gaps):
            base = np.ndarray(shape, dtype=dtype, buffer=self.buf, offset=pos)
            leaf = view(base)
            with np.errstate(all="ignore"):
                leaf[...] = random_values(leaf.shape, dtype, rng, scale=3.0)
            self.leaves.append(leaf)
            pos += size + gap
        self.mask = np.zeros(total, dtype=bool)  # True on the leaves' element bytes
        start = _addr(self.buf)
        for leaf in self.leaves:
            idx = np.asarray(_addr(leaf) - start)
            for n, st in zip(leaf.shape, leaf.strides):
                idx = idx[..., None] + np.arange(n) * st
            idx = idx[..., None] + np.arange(it)
            self.mask[idx.ravel()] = True
        assert not self.mask[:GUARD].any() and not self.mask[-GUARD:].any()
        self.snapshot()

    def snapshot(self):
        self.buf_before = self.buf.copy()
        self.before = [leaf.copy() for leaf in self.leaves]

    def check_outside(self):
        changed = np.flatnonzero((self.buf != self.buf_before) & ~self.mask)
        assert changed.size == 0, f"{changed.size} bytes outside the leaves changed, first at {changed[:8]}"

    def check_leaves(self, expected):
        for i, (leaf, exp) in enumerate(zip(self.leaves, expected)):
            assert_same_bits(leaf, exp, what=f"leaf {i}")


FILLS = pytest.mark.parametrize("fill", ["nan", "random"])


@dtypes
@FILLS
def test_reading_functions_do_not_write_or_see_gaps(dtype, fill, rng):
    c = Carved(dtype, rng, fill)
    for p in (2.0, 1.0, math.inf, 0.5):
        assert_norm_close(gc.grad_norm(c.leaves, p), ref_norm(c.before, p))
        assert_norms_close(gc.layer_norms(c.leaves, p), ref_layer_norms(c.before, p))
    assert gc.all_finite(c.leaves) is True
    out, _ = gc.clip_grad_norm(c.leaves, 0.1)
    if not is_complex(dtype):
        gc.clip_grad_value(c.leaves, 0.1)
    assert (c.buf == c.buf_before).all()


@dtypes
@FILLS
def test_clip_grad_norm_(dtype, fill, rng):
    c = Carved(dtype, rng, fill)
    max_norm = 0.3 * ref_norm(c.before)
    total = gc.clip_grad_norm_(c.leaves, max_norm)
    assert_norm_close(total, ref_norm(c.before))
    c.check_outside()
    c.check_leaves([ref_scale(b, ref_coef(max_norm, total)) for b in c.before])


@dtypes
@FILLS
def test_clip_grads_with_norm_(dtype, fill, rng):
    c = Carved(dtype, rng, fill)
    gc.clip_grads_with_norm_(c.leaves, 1.0, 5.0)
    c.check_outside()
    c.check_leaves([ref_scale(b, ref_coef(1.0, 5.0)) for b in c.before])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@FILLS
def test_clip_grad_value_(dtype, fill, rng):
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    c = Carved(dt, rng, fill)
    gc.clip_grad_value_(c.leaves, 0.6)
    c.check_outside()
    c.check_leaves([ref_clamp(b, 0.6) for b in c.before])


@dtypes
@FILLS
def test_clip_grad_norm_per_layer_(dtype, fill, rng):
    c = Carved(dtype, rng, fill)
    norms = ref_layer_norms(c.before)
    max_norm = float(np.median(norms))
    got = gc.clip_grad_norm_per_layer_(c.leaves, max_norm)
    assert_norms_close(got, norms)
    c.check_outside()
    c.check_leaves([ref_clip_by_norm([b], max_norm, n)[0] for b, n in zip(c.before, got)])


@dtypes
@FILLS
def test_zero_nonfinite_(dtype, fill, rng):
    c = Carved(dtype, rng, fill)
    with np.errstate(all="ignore"):
        c.leaves[1][-1] = np.nan  # stepped view, last element
        c.leaves[2][0, 0] = np.inf  # negative strides: the element at the highest address
        c.leaves[3][()] = -np.inf  # 0-d
        c.leaves[5][2, 1, 0] = np.nan
    c.snapshot()
    assert gc.all_finite(c.leaves) is False
    n = gc.zero_nonfinite_(c.leaves)
    assert n == 4
    c.check_outside()
    if not is_complex(dtype):
        for i, (leaf, b) in enumerate(zip(c.leaves, c.before)):
            assert_zeroed(leaf, b, what=f"leaf {i}")
    assert gc.all_finite(c.leaves) is True
