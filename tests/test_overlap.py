"""Leaves that share memory (SPEC §10): in-place functions refuse two leaves with an
element in common, naming both, before anything is written; the same array object twice
is not an overlap (§2); views that interleave without sharing an element are accepted;
functions that only read accept overlapping leaves.

Whether two views share memory is decided in the tests by enumerating every byte of both
(``reference.ref_share_memory``), never through gradclip.
"""

import itertools

import numpy as np
import pytest
import torch

import gradclip as gc
from gradclip import _batch, _cpu, _overlap, _table
from gradclip._kernels import cpu as kernels
from helpers import LAYOUTS, Frozen, assert_norm_close, assert_norms_close, assert_same_bits, raises_with
from reference import (
    ref_clamp,
    ref_coef,
    ref_layer_norms,
    ref_layout,
    ref_norm,
    ref_scale,
    ref_share_memory,
)


def _like(tree, make):
    """``tree`` with every array leaf ``x`` replaced by ``make(x)``."""
    if isinstance(tree, dict):
        return {key: _like(value, make) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_like(value, make) for value in tree)
    return make(tree)


def _ones(x):
    return None if x is None else np.ones(x.shape)


IN_PLACE = {
    "clip_grad_norm_": lambda g: gc.clip_grad_norm_(g, 0.01),
    "clip_grad_norm_per_layer_": lambda g: gc.clip_grad_norm_per_layer_(g, 0.01),
    "clip_grads_with_norm_": lambda g: gc.clip_grads_with_norm_(g, 0.01, 100.0),
    "clip_grad_value_": lambda g: gc.clip_grad_value_(g, 0.01),
    "zero_nonfinite_": lambda g: gc.zero_nonfinite_(g),
    "EMAClipper": lambda g: gc.EMAClipper(warmup=1)(g),
    "adaptive_grad_clip_": lambda g: gc.adaptive_grad_clip_(g, _like(g, _ones), 1e-3),
}


def _buffer(n, dtype=np.float64):
    """Values every in-place function changes (large, and a NaN for zero_nonfinite_)."""
    values = np.linspace(-40.0, 50.0, n).astype(dtype)
    values[1] = np.nan
    return values


# name -> the two views handed to gradclip, of one buffer
OVERLAPS = {
    "prefix": lambda: (lambda a: (a, a[:5]))(_buffer(12)),
    "partial": lambda: (lambda b: (b[:10], b[5:15]))(_buffer(20)),
    "same_region_twice": lambda: (lambda a: (a[2:8], a[2:8]))(_buffer(12)),
    "reshaped": lambda: (lambda a: (a, a.reshape(3, 4)))(_buffer(12)),
    "transposed": lambda: (lambda m: (m, m.T))(_buffer(12).reshape(3, 4)),
    "strides_that_meet": lambda: (lambda a: (a[::2], a[::3]))(_buffer(13)),
    "one_element": lambda: (lambda m: (m[:, 1], m[2]))(_buffer(20).reshape(4, 5)),
    "reversed": lambda: (lambda a: (a[::-1], a[5:7]))(_buffer(12)),
    "bytes_of_another_dtype": lambda: (lambda a: (a, a.view(np.float32)[3:5]))(_buffer(6)),
}

# name -> (grads around the two views and a valid leaf v, their expected paths)
CONTAINERS = {
    "list": (lambda v, x, y: [v, x, y], ("grads[1]", "grads[2]")),
    "tuple": (lambda v, x, y: (x, v, y), ("grads[0]", "grads[2]")),
    "nested": (lambda v, x, y: {"a": [v, x], "b": None, "c": {"d": y}}, ("grads['a'][1]", "grads['c']['d']")),
}


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("overlap", list(OVERLAPS))
@pytest.mark.parametrize("name", list(IN_PLACE))
def test_in_place_refuses_leaves_that_share_memory(name, overlap, container):
    first, second = OVERLAPS[overlap]()
    assert ref_share_memory(first, second)
    valid = _buffer(7)
    build, (first_path, second_path) = CONTAINERS[container]
    grads = build(valid, first, second)
    frozen = Frozen(valid, first, second)
    with raises_with(ValueError, f"{first_path} and {second_path} share memory", name, "np.array(x)"):
        IN_PLACE[name](grads)
    frozen.check()


def test_plain_list_one_call_declines_and_the_general_path_refuses():
    """The one-call path sees the overlap in its table and declines, writing nothing."""
    a = _buffer(12)
    for leaves in ([a, a[:5]], [a[:5], a], [a[6:], a[:7]], [a.reshape(3, 4)[1], a]):
        frozen = Frozen(*leaves)
        assert _cpu.plain_list_norm(leaves, _batch.plain_list(leaves, writes=True), 0.01, 1e-6) is None
        assert _cpu.plain_list_clamp_(leaves, _batch.plain_list(leaves, writes=True, real_only=True), 0.01) is False
        assert _cpu.plain_list_zero_nonfinite_(leaves, _batch.plain_list(leaves, writes=True)) is None
        frozen.check()
        with raises_with(ValueError, "grads[0] and grads[1] share memory"):
            gc.clip_grad_norm_(leaves, 0.01)
        frozen.check()


def test_torch_views_of_each_other_are_refused():
    base = torch.linspace(-40.0, 50.0, 12)
    other = torch.full((3,), 10.0)
    for first, second in [(base, base.view(3, 4)[1]), (base[:8], base[4:]), (base.view(3, 4).t(), base[5:6])]:
        before = base.clone()
        for name, call in IN_PLACE.items():
            if name == "adaptive_grad_clip_":
                continue  # its params are NumPy here; torch AGC is in test_torch.py
            with raises_with(ValueError, "grads[1] and grads[2] share memory", name):
                call([other, first, second])
            assert torch.equal(base, before) and other.tolist() == [10.0] * 3


def test_same_array_object_twice_is_not_an_overlap():
    a = _buffer(12)
    a[1] = 3.0
    before = a.copy()
    total = gc.clip_grad_norm_([a, a, {"again": a}], 1.0)
    assert_norm_close(total, ref_norm([before]))
    assert_same_bits(a, ref_scale(before, ref_coef(1.0, total)), what="scaled once")


# --------------------------------------------------------------------------- accepted


def _disjoint_views():
    """name -> views of one buffer that share no element (their union, the buffer)."""
    a = np.linspace(-40.0, 50.0, 24)
    m = np.linspace(-40.0, 50.0, 60).reshape(6, 10)
    c = np.linspace(-40.0, 50.0, 2 * 3 * 4).reshape(2, 3, 4)
    return {
        "interleaved": (a, [a[::2], a[1::2]]),
        "interleaved_three": (a, [a[2::3], a[::3], a[1::3]]),
        "adjacent": (a, [a[:5], a[5:]]),
        "adjacent_reversed": (a, [a[12:], a[:12]]),
        "columns": (m, [m[:, j] for j in range(10)]),
        "rows_shuffled": (m, [m[i] for i in (3, 0, 5, 1, 4, 2)]),
        "channels": (c, [c[..., k] for k in range(4)]),
        "checkerboard": (m, [m[::2, ::2], m[1::2, ::2], m[::2, 1::2], m[1::2, 1::2]]),
        "bytes_side_by_side": (a, [a[:3].view(np.float32), a[3:]]),
    }


DISJOINT = list(_disjoint_views())


@pytest.mark.parametrize("views", DISJOINT)
def test_views_that_share_no_element_are_accepted(views):
    buffer, leaves = _disjoint_views()[views]
    assert not any(ref_share_memory(x, y) for x, y in itertools.combinations(leaves, 2))
    assert sum(x.nbytes for x in leaves) == buffer.nbytes
    before = [x.copy() for x in leaves]
    total = gc.clip_grad_norm_(leaves, 1.0)
    assert_norm_close(total, ref_norm(before))
    for x, b in zip(leaves, before):
        assert_same_bits(x, ref_scale(b, ref_coef(1.0, total)))
    now = [x.copy() for x in leaves]
    norms = gc.clip_grad_norm_per_layer_(tuple(leaves), 0.5)
    assert_norms_close(norms, ref_layer_norms(now))
    for x, b, n in zip(leaves, now, norms):
        assert_same_bits(x, ref_scale(b, ref_coef(0.5, n)) if n > 0.5 else b)
    now = [x.copy() for x in leaves]
    gc.clip_grad_value_({"views": leaves}, 0.01)
    for x, b in zip(leaves, now):
        assert_same_bits(x, ref_clamp(b, 0.01))


def test_many_interleaved_columns_are_checked_element_by_element():
    """600 columns of one matrix: every pair of extents meets (180,000 pairs); the group is
    checked by sorting its elements. One shared element among them is still found."""
    m = np.linspace(-1.0, 1.0, 8 * 600).reshape(8, 600)
    columns = [m[:, j] for j in range(600)]
    before = m.copy()
    gc.clip_grad_value_(columns, 0.5)
    assert_same_bits(m, ref_clamp(before, 0.5))
    frozen = Frozen(*columns)
    with raises_with(ValueError, "grads[299] and grads[600] share memory"):
        gc.clip_grad_value_([*columns, m[3, 299:300]], 0.01)
    frozen.check()


def test_views_of_one_buffer_in_order_take_the_one_call_path():
    """Views cut from one buffer in turn (e.g. a flat gradient buffer) are seen to be
    disjoint in one pass, ascending or descending; so are views of separate arrays."""
    flat = np.linspace(-1.0, 1.0, 1000)
    in_order = [flat[i : i + 10] for i in range(0, 1000, 10)]
    separate = [np.linspace(-1.0, 1.0, 10).view() for _ in range(100)]  # each its own owner
    for leaves in (in_order, in_order[::-1], separate):
        before = [x.copy() for x in leaves]
        max_norm = 0.5 * ref_norm(before)
        total = _cpu.plain_list_norm(leaves, _batch.plain_list(leaves, writes=True), max_norm, 1e-6)
        assert total is not None, "declined"
        assert_norm_close(total, ref_norm(before))
        for x, b in zip(leaves, before):
            assert_same_bits(x, ref_scale(b, ref_coef(max_norm, total)))
    shuffled = [in_order[i] for i in np.random.default_rng(5).permutation(100)]
    before = [x.copy() for x in shuffled]
    max_norm = 0.5 * ref_norm(before)
    assert _cpu.plain_list_norm(shuffled, _batch.plain_list(shuffled, writes=True), max_norm, 1e-6) is None
    total = gc.clip_grad_norm_(shuffled, max_norm)  # the general path: accepted
    for x, b in zip(shuffled, before):
        assert_same_bits(x, ref_scale(b, ref_coef(max_norm, total)))


READ_ONLY = {  # name -> (call, what of its result to compare: arrays or a number)
    "grad_norm": (lambda g: gc.grad_norm(g), lambda r: [r]),
    "layer_norms": (lambda g: gc.layer_norms(g), lambda r: [r]),
    "all_finite": (lambda g: gc.all_finite(g), lambda r: [r]),
    "clip_grad_norm": (lambda g: gc.clip_grad_norm(g, 0.01), lambda r: [*r[0], r[1]]),
    "clip_grad_value": (lambda g: gc.clip_grad_value(g, 0.01), list),
    "norm_penalty": (lambda g: gc.norm_penalty(g, 0.1, 2.0), lambda r: [r[0], *r[1]]),
    "GradAccumulator.step": (lambda g: gc.GradAccumulator(1).step(g), list),
}


@pytest.mark.parametrize("overlap", ["prefix", "partial", "reshaped", "transposed"])
@pytest.mark.parametrize("name", list(READ_ONLY))
def test_functions_that_only_read_accept_leaves_that_share_memory(name, overlap):
    """Each leaf is read as it is: the results are those of copies in memory of their own."""
    first, second = OVERLAPS[overlap]()
    first.flat[1] = 2.0  # finite
    leaves = [first, second]
    copies = [x.copy() for x in leaves]
    frozen = Frozen(*leaves)
    call, parts = READ_ONLY[name]
    got, expected = parts(call(leaves)), parts(call(copies))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_same_bits(np.asarray(g), np.asarray(e), what=name)
    frozen.check()
    assert_norm_close(gc.grad_norm(leaves), ref_norm(copies))  # each leaf counted


# --------------------------------------------------------------------------- the search


def _random_views(buffer, rng, k):
    """``k`` random views of ``buffer`` (1-d): slices with steps (some negative), reshaped,
    transposed, or reinterpreted in a narrower dtype."""
    views = []
    for _ in range(k):
        start = int(rng.integers(0, buffer.size))
        step = int(rng.choice([1, 2, 3, 5, -1, -2]))
        stop = int(rng.integers(start, buffer.size + 1)) if step > 0 else int(rng.integers(-1, start + 1))
        view = buffer[start : (None if stop < 0 else stop) : step]
        kind = rng.integers(0, 4)
        if kind == 1 and view.size % 2 == 0 and view.size:
            view = view.reshape(2, -1)[:, :: int(rng.choice([1, 2]))]
            if rng.random() < 0.5:
                view = view.T
        elif kind == 2 and step == 1 and view.size:
            view = view.view(np.float32)[:: int(rng.choice([1, 3]))]
        views.append(view)
    return views


@pytest.mark.parametrize("mode", ["cheapest", "pairs", "elements", "solver_gives_up", "solver_unbounded"])
def test_first_overlap_agrees_with_enumerating_every_byte(mode, monkeypatch, rng):
    if mode != "cheapest":  # force one way of checking a group
        monkeypatch.setattr(_overlap, "_PAIR_COST", 1 << 40 if mode == "elements" else 0)
    if mode.startswith("solver"):  # as if each pair needed more than MAX_WORK
        solve = np.shares_memory

        def bounded(a, b, max_work=None):
            if max_work is not None:
                raise np.exceptions.TooHardError("exceeded max_work")
            return solve(a, b)

        monkeypatch.setattr(np, "shares_memory", bounded)
        if mode == "solver_unbounded":  # too many elements to list: the solver without a bound
            monkeypatch.setattr(_overlap, "_ELEMENTS_LIMIT", 0)
    buffer = np.zeros(48)
    found = 0
    for _ in range(300):
        views = _random_views(buffer, rng, int(rng.integers(2, 6)))
        layouts = [ref_layout(v) for v in views]
        extents = [_overlap.extent(*layout) for layout in layouts]
        lo, hi = (np.array(column, np.int64) for column in zip(*extents))
        pairs = itertools.combinations(range(len(views)), 2)
        shared = {(i, j) for i, j in pairs if ref_share_memory(views[i], views[j])}
        pair = _overlap.first_overlap(lo, hi, layouts.__getitem__)
        assert (pair is None) == (not shared), (pair, shared, layouts)
        if pair is not None:
            assert pair in shared
            found += 1
    assert 50 < found < 250  # both outcomes well exercised


def test_first_overlap_reads_no_memory():
    """Layouts of memory that is not there (as GPU leaves' are, seen from the host)."""
    far = 1 << 46
    layouts = [(far, (100,), (16,), 8), (far + 8, (100,), (16,), 8), (far + 1600, (3, 4), (8, 24), 8)]
    extents = [_overlap.extent(*layout) for layout in layouts]
    lo, hi = (np.array(column, np.int64) for column in zip(*extents))
    assert _overlap.first_overlap(lo, hi, layouts.__getitem__) is None
    layouts[2] = (far + 1584, (3, 4), (8, 24), 8)  # its first element is the last of layouts[0]
    lo[2], hi[2] = _overlap.extent(*layouts[2])
    assert _overlap.first_overlap(lo, hi, layouts.__getitem__) == (0, 2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (2, 3, 4)], ids=str)
def test_extents_are_numpy_byte_bounds(layout, shape):
    base_shape, order, view = LAYOUTS[layout](shape)
    a = view(np.zeros(base_shape, order=order, dtype=np.float32))
    expected = (0, 0) if a.size == 0 else np.lib.array_utils.byte_bounds(a)
    assert _overlap.extent(*ref_layout(a)) == tuple(expected)
    lo, hi = _table.extents(_batch.tables([np.zeros(3), a]), 2)
    assert (int(lo[1]), int(hi[1])) == tuple(expected)


def _brute_disjoint(lo, hi):
    return all(
        not max(lo[i], lo[j]) < min(hi[i], hi[j]) for i, j in itertools.combinations(range(len(lo)), 2)
    )


def test_disjoint_and_address_order_agree_with_every_pair(rng):
    for trial in range(2000):
        n = int(rng.integers(0, 40))
        lo = rng.integers(0, 400, n).astype(np.int64)
        hi = lo + rng.integers(0, 12, n)  # some empty
        arrangement = trial % 4
        if arrangement:  # mostly in address order: sorted, then a few swapped
            order = np.argsort(lo, kind="stable")
            if arrangement == 2:
                order = order[::-1]
            lo, hi = lo[order], hi[order]
            if arrangement == 3 and n > 1:
                i, j = rng.integers(0, n, 2)
                lo[[i, j]], hi[[i, j]] = lo[[j, i]], hi[[j, i]]
        expected = _brute_disjoint(lo, hi)
        assert _overlap.disjoint(lo, hi) == expected
        if kernels.in_address_order(lo, hi):
            assert expected


def test_address_order_is_one_pass_over_large_tables():
    size = np.full(100_000, 64, np.int64)
    lo = np.cumsum(size + 8) - size
    assert kernels.in_address_order(lo, lo + size)
    assert kernels.in_address_order(lo[::-1].copy(), (lo + size)[::-1].copy())
    lo[50_000] = lo[50_001] - 1  # meets its neighbour
    assert not kernels.in_address_order(lo, lo + size) and not _overlap.disjoint(lo, lo + size)
    lo[50_000] = -10**9  # far away, out of order: disjoint, found by sorting
    assert not kernels.in_address_order(lo, lo + size) and _overlap.disjoint(lo, lo + size)
