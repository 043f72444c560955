"""The fast path for plain lists of contiguous arrays agrees with the general path,
and hands anything unusual to it."""

import numpy as np
import pytest

import gradclip as gc
from gradclip import _batch
from helpers import DTYPES, assert_same_bits, dtype_id, random_values


def _run_everything(leaves):
    work = [x.copy() for x in leaves]
    total = gc.clip_grad_norm_(work, 0.5 * gc.grad_norm(leaves))
    per_layer = gc.clip_grad_norm_per_layer_([x.copy() for x in leaves], 0.1)
    norms = [gc.grad_norm(leaves, p) for p in (1.0, 3.0, np.inf)]
    return total, per_layer, norms, work


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fast_path_matches_general_path(dtype, rng, monkeypatch):
    leaves = [random_values(shape, dtype, rng) for shape in [(5, 7), (0,), (), (1000,), (3, 4, 5)]]
    leaves.append(np.asfortranarray(random_values((6, 9), dtype, rng)))
    fast = _run_everything(leaves)
    monkeypatch.setattr(_batch, "_collect_plain", lambda *args: None)
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
        lambda x: [x, x[::2]],  # strided
        lambda x: [x, x.astype(x.dtype.newbyteorder())],  # byte-swapped dtype
        lambda x: [x, np.ma.masked_array(x)],  # a subclass
    ],
    ids=["duplicate", "strided", "byteswapped", "subclass"],
)
def test_unusual_leaves_take_the_general_path(make_leaves, monkeypatch):
    x = np.arange(6.0)
    leaves = make_leaves(x)
    assert _batch._collect_plain(leaves, None, False, False) is None


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
