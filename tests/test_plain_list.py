"""The one-call paths for plain lists: grad_norm and clip_grad_norm_ (2-norm),
all_finite, zero_nonfinite_ and clip_grad_value_.

A list of distinct contiguous NumPy arrays of one dtype runs as a single compiled call
(``_cpu.plain_list_norm`` and its siblings). Every test checks which path a call takes, then its results:
against the independent references (float64 / exact sums, one rounding per element) and
bit for bit against the general path, which a tuple of the same arrays takes. A call the
one-call path declines must leave every array as it was.
"""

import math

import numpy as np
import pytest

import gradclip as gc
from gradclip import _batch, _cpu
from gradclip._kernels import cpu as kernels
from helpers import (
    DTYPES,
    assert_norm_close,
    assert_same_bits,
    dtype_id,
    dtypes,
    random_values,
    raises_with,
    real_dtypes,
)
from reference import BFLOAT16, is_complex, ref_clamp, ref_clip_by_norm, ref_nonfinite_mask, ref_norm


@pytest.fixture(autouse=True, scope="module")
def every_dtype_accepted():
    """The one-call path takes dtypes that a call has accepted before (as `_batch` does)."""
    for dtype in DTYPES:
        gc.grad_norm(np.zeros(1, dtype))


def one_call(leaves, writes, max_norm=math.inf, eps=1e-6):
    """What the one-call path returns for ``leaves``: the total, or None (declined)."""
    return _cpu.plain_list_norm(leaves, _batch.plain_list(leaves, writes), max_norm, eps)


def leaves_of(dtype, sizes, rng, scale=1.0):
    return [random_values(n, dtype, rng, scale) for n in sizes]


def copies(leaves):
    return [x.copy() for x in leaves]


def assert_same_leaves(actual, expected, what):
    for i, (x, e) in enumerate(zip(actual, expected)):
        assert_same_bits(x, e, what=f"{what} leaf {i}")


SMALL = [10] * 100  # many tiny leaves: the case the path exists for
LARGE = [256] * 300 + [40_000]  # over kernels.PARALLEL_MIN elements: the parallel drivers
WITH_EMPTY = [7, 0, 33, 0, 1]


WIDE = (np.float64, np.complex128)


@pytest.mark.parametrize(
    "dtype, sizes",
    [
        pytest.param(dtype, sizes, id=f"{dtype_id(dtype)}-{name}")
        for dtype in DTYPES
        for name, sizes in [("small", SMALL), ("large", LARGE), ("with-empty", WITH_EMPTY)]
        if not (dtype in WIDE and 0 in sizes)  # a float64 zero sum: the general path (tested below)
    ],
)
def test_clip_takes_one_call_and_matches_references_and_general_path(dtype, sizes, rng):
    assert sum(LARGE) >= kernels.PARALLEL_MIN > sum(SMALL)
    leaves = leaves_of(dtype, sizes, rng)
    before = copies(leaves)
    max_norm = 0.5 * ref_norm(before)

    total = one_call(leaves, writes=True, max_norm=max_norm)
    assert total is not None, "the one-call path declined a plain list"
    assert_norm_close(total, ref_norm(before))
    assert_same_leaves(leaves, ref_clip_by_norm(before, max_norm, total), "clipped")

    general = copies(before)
    assert gc.clip_grad_norm_(tuple(general), max_norm) == total  # bit for bit
    assert_same_leaves(leaves, general, "one-call vs general")

    public = copies(before)
    assert gc.clip_grad_norm_(public, max_norm) == total
    assert_same_leaves(public, general, "public")


@dtypes
def test_grad_norm_takes_one_call_also_for_read_only_leaves(dtype, rng):
    leaves = leaves_of(dtype, SMALL, rng)
    for x in leaves[::3]:
        x.flags.writeable = False
    total = one_call(leaves, writes=False)
    assert total is not None
    assert total == gc.grad_norm(tuple(leaves)) == gc.grad_norm(leaves)
    assert_norm_close(total, ref_norm(leaves))
    assert one_call(leaves, writes=True, max_norm=0.0) is None  # a clip needs them writable


@pytest.mark.parametrize("max_norm", [math.inf, "total", "above"])
def test_no_write_unless_above_max_norm(max_norm, rng):
    leaves = leaves_of(np.float32, SMALL, rng)
    before = copies(leaves)
    total = ref_norm(before)
    limit = {"total": float(np.nextafter(total, math.inf)), "above": 2 * total}.get(max_norm, max_norm)
    got = one_call(leaves, writes=True, max_norm=limit)
    assert got is not None and got <= limit
    assert_same_leaves(leaves, before, "unclipped")


def declined(leaves, writes=True):
    """Assert the one-call path declines ``leaves`` and writes nothing."""
    arrays = [x for x in leaves if isinstance(x, np.ndarray)]
    saved = copies(arrays)
    assert one_call(leaves, writes=writes, max_norm=0.0) is None
    assert_same_leaves(arrays, saved, "declined")


class Subclass(np.ndarray):
    pass


def test_declines_what_is_not_a_plain_list(rng):
    a, b = leaves_of(np.float32, [5, 6], rng)
    declined([])
    declined((a, b))  # not a list
    declined([a, a])  # the same array twice: counted once by the general path
    declined([a, b.astype(np.float64)])  # two dtypes
    declined([a, np.lib.stride_tricks.as_strided(b, (2, 6), (0, 4))])  # repeats its elements
    declined([a, np.ndarray((2,), np.float32, np.arange(8.0, dtype=np.float32), strides=(6,))])  # misaligned
    declined([a, b.view(Subclass)])
    declined([a, [1.0, 2.0]])  # not an array
    declined([a, np.ones(7, np.int64)])  # a dtype never accepted
    declined([a, np.ones(3, ">f4")])  # another byte order
    declined([a, np.frombuffer(bytearray(4 * 3 + 1), np.float32, 3, offset=1)])  # misaligned
    read_only = b.copy()
    read_only.flags.writeable = False
    declined([a, read_only])
    with raises_with(ValueError, "read-only"):
        gc.clip_grad_norm_([a, read_only], 0.0)


STRIDED_VIEWS = [
    lambda x: x[::2],  # every second row
    lambda x: x.T[1:, ::-3],  # transposed, reversed, stepped
    lambda x: x[:, 1::2],  # every second column
    lambda x: x.reshape(-1, 2, x.shape[1] // 2)[::3, :, ::-1],  # three axes
    lambda x: x,  # contiguous
]


def strided_leaves(dtype, side, n, values):
    """``n`` views holding ``values``, each into its own ``side`` x ``side`` base, of every
    kind above in turn."""
    views = [STRIDED_VIEWS[i % len(STRIDED_VIEWS)](np.zeros((side, side), dtype)) for i in range(n)]
    for view, x in zip(views, values):
        view[...] = x
    return views


@pytest.mark.parametrize(
    "dtype, side, n",
    [pytest.param(dtype, side, n, id=f"{dtype_id(dtype)}-{name}") for dtype in DTYPES for name, side, n in
     [("small", 8, 30), ("large", 64, 60)]],
)  # fmt: skip
def test_strided_leaves_take_one_call(dtype, side, n, rng, monkeypatch):
    """Views with any steps take the one-call paths: the references' results, and the bits
    of the general path, which walks each leaf in Python."""
    shapes = [STRIDED_VIEWS[i % len(STRIDED_VIEWS)](np.empty((side, side))).shape for i in range(n)]
    before = [random_values(shape, dtype, rng) for shape in shapes]
    leaves = strided_leaves(dtype, side, n, before)
    assert not leaves[0].flags.c_contiguous
    assert (side == 64) == (sum(x.size for x in leaves) >= kernels.PARALLEL_MIN)
    max_norm = 0.5 * ref_norm(before)
    read = one_call(leaves, writes=False)
    total = one_call(leaves, writes=True, max_norm=max_norm)
    assert total is not None, "the one-call path declined strided leaves"
    assert read == total
    assert_norm_close(total, ref_norm(before))
    assert_same_leaves(leaves, ref_clip_by_norm(before, max_norm, total), "clipped")

    general = strided_leaves(dtype, side, n, before)
    with monkeypatch.context() as patched:
        patched.setattr(_batch, "_collect_plain", lambda *args: None)
        assert gc.clip_grad_norm_(tuple(general), max_norm) == total  # bit for bit
    assert_same_leaves(leaves, general, "one-call vs general")

    poked = copies(before)
    poked[1].flat[0], poked[-2].flat[-1] = np.nan, np.inf
    expected = [zeroed_parts(x) for x in poked]
    poked = strided_leaves(dtype, side, n, poked)
    assert _cpu.plain_list_count_nonfinite(poked, _batch.plain_list(poked, writes=False)) == 2
    assert _cpu.plain_list_zero_nonfinite_(poked, _batch.plain_list(poked, writes=True)) == 2
    assert_same_leaves(poked, expected, "zeroed")
    if not is_complex(dtype):
        clamped = strided_leaves(dtype, side, n, before)
        assert _cpu.plain_list_clamp_(clamped, _batch.plain_list(clamped, writes=True, real_only=True), 0.7)
        assert_same_leaves(clamped, [ref_clamp(x, 0.7) for x in before], "clamped")


def test_strided_views_of_one_array_are_left_to_the_general_path_when_written(rng):
    """Views into one array whose byte ranges meet may share elements: a call that writes
    declines them, and the general path decides exactly (interleaved columns share none;
    every second and every fourth row do)."""
    x = random_values((8, 6), np.float32, rng)
    columns = [x[:, ::2], x[:, 1::2]]
    assert one_call(columns, writes=False) is not None
    declined(columns)
    before = copies(columns)
    total = gc.clip_grad_norm_(columns, 1.0)
    assert_same_leaves(columns, ref_clip_by_norm(before, 1.0, total), "clipped")
    rows = [x[::2], x[::4]]
    declined(rows)
    with raises_with(ValueError, "share memory"):
        gc.clip_grad_norm_(rows, 1.0)


@pytest.mark.parametrize("dtype", WIDE, ids=dtype_id)
def test_declines_float64_sums_that_may_have_underflowed(dtype, rng):
    tiny = leaves_of(dtype, [8, 9], rng, scale=1e-300)  # squares underflow float64
    zero = [random_values(5, dtype, rng), np.zeros(4, dtype)]
    for leaves in (tiny, zero):
        declined(leaves)
        before = copies(leaves)
        max_norm = 0.5 * ref_norm(before)
        total = gc.clip_grad_norm_(leaves, max_norm)  # the general path rescales these leaves
        assert_norm_close(total, ref_norm(before))
        assert_same_leaves(leaves, ref_clip_by_norm(before, max_norm, total), "rescued")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16], ids=["float32", "float16", "bfloat16"])
def test_zero_leaves_of_narrow_types_stay_on_one_call(dtype, rng):
    leaves = [random_values(5, dtype, rng), np.zeros(4, dtype), random_values(3, dtype, rng, 1e-30)]
    before = copies(leaves)
    max_norm = 0.5 * ref_norm(before)
    total = one_call(leaves, writes=True, max_norm=max_norm)
    assert total is not None
    assert_norm_close(total, ref_norm(before))
    assert_same_leaves(leaves, ref_clip_by_norm(before, max_norm, total), "clipped")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_declines_nonfinite_elements(bad, rng):
    leaves = leaves_of(np.float32, [6, 6, 6], rng)
    leaves[1][2] = bad
    declined(leaves)
    before = copies(leaves)
    total = gc.clip_grad_norm_(leaves, 0.1)
    assert math.isnan(total) if math.isnan(bad) else total == math.inf
    assert_same_leaves(leaves, before, "non-finite total")
    with raises_with(RuntimeError, "non-finite"):
        gc.clip_grad_norm_(leaves, 0.1, error_if_nonfinite=True)
    assert_same_leaves(leaves, before, "after the error")


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16], ids=["float16", "bfloat16"])
def test_many_16_bit_elements_to_scale_go_by_table(dtype, rng):
    leaves = leaves_of(dtype, [_cpu.LOOKUP_MIN // 2, _cpu.LOOKUP_MIN // 2], rng)
    declined(leaves)  # to scale: the general path's table
    before = copies(leaves)
    assert one_call(leaves, writes=False) == gc.grad_norm(tuple(before))  # nothing to scale: one call
    max_norm = 0.5 * ref_norm(before)
    total = gc.clip_grad_norm_(leaves, max_norm)
    assert_same_leaves(leaves, ref_clip_by_norm(before, max_norm, total), "by table")


def test_other_norm_types_and_reducers_take_the_general_path(rng, monkeypatch):
    calls = []
    monkeypatch.setattr(_cpu, "plain_list_norm", lambda *args, **kwargs: calls.append(args))
    leaves = leaves_of(np.float32, [4, 5], rng)
    gc.grad_norm(leaves, 1.0)
    gc.clip_grad_norm_(leaves, 1.0, norm_type=math.inf)
    gc.grad_norm(leaves, replicated=leaves[:1])
    assert calls == []
    gc.grad_norm(leaves)
    gc.clip_grad_norm_(leaves, 1.0)
    assert len(calls) == 2


# ------------------------------------------------ all_finite, zero_nonfinite_, clip_grad_value_

sizes_by_name = pytest.mark.parametrize("sizes", [SMALL, LARGE], ids=["small", "large"])


def with_nonfinite(dtype, sizes, rng):
    """Leaves with NaN and inf scattered over a few of them (complex: in either part)."""
    leaves = leaves_of(dtype, sizes, rng)
    for i in range(0, len(leaves), 37):
        x = leaves[i].reshape(-1)
        for value, where in ((np.nan, 0), (-np.inf, x.size - 1), (np.inf, x.size // 2)):
            x[where] = complex(1.0, value) if is_complex(dtype) and where else value
    return leaves


def zeroed_parts(x):
    """``x`` with every non-finite real or imaginary part set to 0."""
    out = x.copy()
    parts = (out.real, out.imag) if is_complex(x.dtype) else (out,)
    for part in parts:
        with np.errstate(invalid="ignore"):
            part[~np.isfinite(part.astype(np.float64))] = 0
    return out


@dtypes
@sizes_by_name
def test_all_finite_and_zero_nonfinite_take_one_call(dtype, sizes, rng):
    leaves = with_nonfinite(dtype, sizes, rng)
    expected_count = sum(int(ref_nonfinite_mask(x).sum()) for x in leaves)
    assert expected_count > 0
    plain = _batch.plain_list(leaves, writes=False)
    assert _cpu.plain_list_count_nonfinite(leaves, plain) == expected_count
    assert gc.all_finite(leaves) is False and gc.all_finite(tuple(leaves)) is False
    before = copies(leaves)
    general = copies(leaves)

    assert _cpu.plain_list_zero_nonfinite_(leaves, _batch.plain_list(leaves, writes=True)) == expected_count
    assert_same_leaves(leaves, [zeroed_parts(x) for x in before], "zeroed")
    assert gc.zero_nonfinite_(tuple(general)) == expected_count
    assert_same_leaves(leaves, general, "one-call vs general")
    assert _cpu.plain_list_count_nonfinite(leaves, plain) == 0
    assert gc.all_finite(leaves) is True
    assert gc.zero_nonfinite_(leaves) == 0


@real_dtypes
@sizes_by_name
def test_clip_grad_value_takes_one_call(dtype, sizes, rng):
    leaves = leaves_of(dtype, sizes, rng, scale=2.0)
    before = copies(leaves)
    assert _cpu.plain_list_clamp_(leaves, _batch.plain_list(leaves, writes=True, real_only=True), 0.7)
    assert_same_leaves(leaves, [ref_clamp(x, 0.7) for x in before], "clamped")
    general = copies(before)
    gc.clip_grad_value_(tuple(general), 0.7)
    assert_same_leaves(leaves, general, "one-call vs general")
    public = copies(before)
    gc.clip_grad_value_(public, 0.7)
    assert_same_leaves(public, general, "public")


def test_clip_grad_value_declines_complex_read_only_and_infinite_bounds(rng, monkeypatch):
    complex_leaves = leaves_of(np.complex64, [4, 5], rng)
    assert _batch.plain_list(complex_leaves, writes=True, real_only=True) is None
    with raises_with(TypeError, "complex"):
        gc.clip_grad_value_(complex_leaves, 1.0)
    a, b = leaves_of(np.float32, [4, 5], rng, scale=3.0)
    b.flags.writeable = False
    saved = copies([a, b])
    assert not _cpu.plain_list_clamp_([a, b], _batch.plain_list([a, b], writes=True, real_only=True), 0.1)
    assert_same_leaves([a, b], saved, "declined")
    with raises_with(ValueError, "read-only"):
        gc.clip_grad_value_([a, b], 0.1)
    calls = []
    monkeypatch.setattr(_cpu, "plain_list_clamp_", lambda *args: calls.append(args))
    gc.clip_grad_value_([a], math.inf)  # never clips: the general path, which writes nothing
    assert calls == []
