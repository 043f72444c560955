"""The fast path for plain lists of arrays agrees with the general path, and hands
anything unusual to it."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradclip as gc
from gradclip import _batch, _cpu, _table
from gradclip._kernels import cpu as kernels
from helpers import DTYPES, assert_same_bits, dtype_id, random_values


def _run_everything(leaves):
    work = [x.copy() for x in leaves]
    total = gc.clip_grad_norm_(work, 0.5 * gc.grad_norm(leaves))
    per_layer = gc.clip_grad_norm_per_layer_([x.copy() for x in leaves], 0.1)
    norms = [gc.grad_norm(leaves, p) for p in (1.0, 3.0, np.inf)]
    return total, per_layer, norms, work


STRIDED_VIEWS = [
    lambda x: x[::2],  # every second row
    lambda x: x[1::3, ::-2],  # rows stepped, columns reversed and stepped
    lambda x: x.T[:, 2:5],  # a transposed slice
    lambda x: x[::-1, :0],  # empty
    lambda x: x.reshape(4, 5, 6)[:, 1:, ::2].transpose(2, 0, 1),  # three axes, none of them merging
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fast_path_matches_general_path(dtype, rng, monkeypatch):
    leaves = [random_values(shape, dtype, rng) for shape in [(5, 7), (0,), (), (1000,), (3, 4, 5)]]
    leaves.append(np.asfortranarray(random_values((6, 9), dtype, rng)))
    leaves += [view(random_values((12, 10), dtype, rng)) for view in STRIDED_VIEWS]
    fast = _run_everything(leaves)
    monkeypatch.setattr(_batch, "_collect_plain", lambda *args: None)
    monkeypatch.setattr(_cpu, "plain_list_norm", lambda *args: None)
    general = _run_everything(leaves)
    assert fast[0] == general[0]
    assert_same_bits(fast[1], general[1])
    assert fast[2] == general[2]
    for a, b in zip(fast[3], general[3]):
        assert_same_bits(a, b)


@pytest.mark.parametrize(
    "make_leaves",
    [
        lambda x: [x, x],  # the same array twice
        lambda x: [x, np.broadcast_to(x, (2, 6))],  # a zero stride
        lambda x: [x, x.astype(x.dtype.newbyteorder())],  # byte-swapped dtype
        lambda x: [x, np.ma.masked_array(x)],  # a subclass
        lambda x: [np.ndarray((2,), np.complex128, x, strides=(24,))],  # a stride no multiple of the itemsize
    ],
    ids=["duplicate", "broadcast", "byteswapped", "subclass", "stride-between-items"],
)
def test_unusual_leaves_take_the_general_path(make_leaves, monkeypatch):
    x = np.arange(6.0)
    leaves = make_leaves(x)
    assert _batch._collect_plain(leaves, None, False, False) is None


def test_strided_leaves_and_leaves_sharing_memory_are_read_on_the_fast_path():
    x = np.arange(24.0).reshape(4, 6)
    for leaves in ([x, x[::2]], [x[:, ::2], x[:, 1::2]], [x.T, x[::-1, ::3]]):
        assert _batch._collect_plain(leaves, None, False, False) is not None
    assert _batch._collect_plain([x[:, ::2], x[:, 1::2]], None, True, False) is None  # writes: decided by the general path


@st.composite
def layouts(draw):
    """A view of a random array: up to four axes, each sliced with a random step (negative
    ones included), then the axes permuted."""
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    base = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    index = tuple(slice(None, None, draw(st.sampled_from([1, 2, 3, -1, -2]))) for _ in shape)
    return base[(..., *index)].transpose(draw(st.permutations(range(len(shape)))))  # 0-d: an array


@given(st.lists(layouts(), min_size=1, max_size=4))
def test_compiled_rows_are_the_rows_of_the_table_builder(views):
    """`kernels.array_rows` walks arrays as `_table.build` does: the same rows, in the same
    order, and the same byte ranges."""
    headers = kernels.plain_headers(views, 0)
    assert headers is not None
    data, size, descr, flags, *_ = headers
    addr, count, step, seg_leaf, lo, hi = kernels.array_rows(views, data, size, flags, np.full(len(views), 4))
    table = _table.build(np.dtype(np.float32), views, list(range(len(views))))
    built = sorted(zip(table.seg_leaf.tolist(), range(table.seg_leaf.size)))  # by leaf, rows in order
    rows = [(table.addr[r], table.count[r], table.step[r], leaf) for leaf, r in built]
    assert list(zip(addr.tolist(), count.tolist(), step.tolist(), seg_leaf.tolist())) == rows
    assert (lo.tolist(), hi.tolist()) == tuple(x.tolist() for x in _table.extents([table], len(views)))


def test_read_only_and_complex_leaves_take_the_general_path():
    x = np.arange(4.0)
    x.flags.writeable = False
    assert _batch._collect_plain([x], None, writes=True, real_only=False) is None
    assert _batch._collect_plain([x], None, writes=False, real_only=False) is not None
    z = np.ones(3, np.complex64)
    assert _batch._collect_plain([z], None, writes=False, real_only=True) is None


@pytest.mark.parametrize(
    "make_view",
    [
        lambda x: np.broadcast_to(x, (5, x.size)),
        lambda x: np.broadcast_to(x[:, None], (x.size, 4))[::-1],
        lambda x: np.broadcast_to(x[0], (3, 4)),  # every axis repeats one element
    ],
    ids=["rows", "columns-reversed", "scalar"],
)
def test_broadcast_leaves_are_read_with_their_repeats(make_view, rng):
    view = make_view(random_values(7, np.float32, rng))
    expected = np.ascontiguousarray(view)
    for p in (1.0, 2.0, np.inf):  # other rows, so other partial sums: equal to rounding
        assert gc.grad_norm(view, p) == pytest.approx(gc.grad_norm(expected, p), rel=1e-14)
    assert gc.all_finite(view)
