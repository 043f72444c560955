"""GradAccumulator (SPEC §5): sums and means against a float64 reference, every dtype and
layout, structure checks, non-finite micro-batches, buffer reuse, result lifetime,
checkpoints, and the serial and parallel kernels agreeing bit for bit."""

import pickle
from collections import OrderedDict, defaultdict

import numpy as np
import pytest

import gradclip as gc
from gradclip import _table
from gradclip._kernels import cpu as kernels
from helpers import DTYPES, LAYOUTS, Strided, assert_same_bits, dtype_id, random_values, raises_with
from reference import BFLOAT16, is_complex, ref_scale, round_to, widen

HALF = (np.dtype(np.float16), BFLOAT16)


def ref_accumulate(micro_batches, accumulator, steps, average=True):
    """Per leaf: the widened micro-batches added in float64, rounded to ``accumulator``
    after every add, then times 1 / steps rounded once (the mean)."""
    total = None
    for g in micro_batches:
        total = round_to(widen(g) if total is None else widen(total) + widen(g), accumulator)
    return ref_scale(total, 1.0 / steps) if average else total


def default_accumulator(dtype):
    return np.dtype(np.float32) if np.dtype(dtype) in HALF else np.dtype(dtype)


def run(acc, micro_batches):
    """Feed every micro-batch; return the results of the steps that returned one."""
    return [r for r in (acc.step(g) for g in micro_batches) if r is not None]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 7)], ids=["3x5", "4x3x7"])
def test_sum_and_mean_match_the_reference_in_every_dtype_and_layout(dtype, layout, shape, rng):
    steps = 3
    views = [Strided(layout, shape, dtype, rng).view for _ in range(2 * steps)]
    results = run(gc.GradAccumulator(steps), views)
    assert len(results) == 2
    for window, result in enumerate(results):
        expected = ref_accumulate(views[window * steps : (window + 1) * steps], default_accumulator(dtype), steps)
        assert_same_bits(result, expected, what=f"window {window}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (17,), (1, 4, 1)], ids=str)
def test_small_empty_and_0d_leaves(dtype, shape, rng):
    batches = [[random_values(shape, dtype, rng)] for _ in range(2)]
    (result,) = run(gc.GradAccumulator(2, average=False), batches)
    assert_same_bits(result[0], ref_accumulate([b[0] for b in batches], default_accumulator(dtype), 2, False))


def test_each_index_of_a_transposed_stepped_reversed_and_fortran_leaf_gets_its_own_sum():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    leaves = {"T": base.T, "step": base[::2, 1::3], "rev": base[::-1, ::-2], "F": np.asfortranarray(base)}
    for copy_result in (True, False):
        result = run(gc.GradAccumulator(2, average=False, copy_result=copy_result), [leaves, leaves])[0]
        for name, leaf in leaves.items():
            assert result[name].shape == leaf.shape
            assert np.array_equal(result[name], 2 * leaf), name


def test_average_false_and_a_float64_accumulator_for_half_precision(rng):
    for dtype in HALF:
        batches = [random_values((40,), dtype, rng) for _ in range(4)]
        acc = gc.GradAccumulator(4, average=False, accumulator_dtype=np.float64)
        (result,) = run(acc, batches)
        assert_same_bits(result, ref_accumulate(batches, np.float64, 4, average=False))


def test_half_precision_accumulates_in_float32_by_default(rng):
    batches = [random_values((5,), np.float16, rng) for _ in range(3)]
    (result,) = run(gc.GradAccumulator(3), batches)
    assert result.dtype == np.float32


def test_a_real_grad_into_a_complex_accumulator(rng):
    batches = [random_values((7,), np.float32, rng) for _ in range(2)]
    (result,) = run(gc.GradAccumulator(2, accumulator_dtype=np.complex64), batches)
    assert_same_bits(result, ref_accumulate(batches, np.complex64, 2))


def test_accum_steps_1_returns_every_micro_batch(rng):
    acc = gc.GradAccumulator(1)
    for _ in range(3):
        g = random_values((3, 4), BFLOAT16, rng)
        assert_same_bits(acc.step(g), ref_accumulate([g], np.float32, 1))
        assert acc.current_step == 0


# --------------------------------------------------------------------------- structure


def test_nested_containers_none_leaves_and_numpy_scalars_keep_their_structure(rng):
    def make():
        return {
            "enc": [random_values((3,), np.float32, rng), None, (random_values((2, 2), np.float64, rng),)],
            "bias": np.float32(rng.standard_normal()),
            "skip": None,
        }

    batches = [make() for _ in range(3)]
    (result,) = run(gc.GradAccumulator(3), batches)
    assert list(result) == ["enc", "bias", "skip"] and result["skip"] is None
    assert isinstance(result["enc"], list) and result["enc"][1] is None
    assert isinstance(result["enc"][2], tuple)
    assert isinstance(result["bias"], np.float32)
    for get in (lambda t: t["enc"][0], lambda t: t["enc"][2][0], lambda t: t["bias"]):
        assert_same_bits(get(result), ref_accumulate([get(b) for b in batches], get(batches[0]).dtype, 3))


def test_the_same_array_at_two_positions_is_added_to_both(rng):
    g = random_values((4, 3), np.float32, rng)
    other = random_values((4, 3), np.float32, rng)
    (result,) = run(gc.GradAccumulator(2, average=False), [[g, g], [g, other]])
    assert_same_bits(result[0], ref_accumulate([g, g], np.float32, 2, False))
    assert_same_bits(result[1], ref_accumulate([g, other], np.float32, 2, False))


def test_a_leaf_whose_layout_changes_between_micro_batches(rng):
    a, b, c = (random_values((5, 6), np.float64, rng) for _ in range(3))
    batches = [[a], [np.asfortranarray(b)], [c.T.copy().T[::-1][::-1]]]
    (result,) = run(gc.GradAccumulator(3), batches)
    assert_same_bits(result[0], ref_accumulate([a, b, c], np.float64, 3))


def test_a_broadcast_leaf_and_empty_structures(rng):
    row = random_values((3,), np.float32, rng)
    leaf = np.broadcast_to(row, (4, 3))
    (result,) = run(gc.GradAccumulator(2, average=False), [[leaf], [leaf]])
    assert_same_bits(result[0], ref_accumulate([leaf, leaf], np.float32, 2, False))
    assert run(gc.GradAccumulator(2), [[], []]) == [[]]
    assert run(gc.GradAccumulator(1), [{"a": None}]) == [{"a": None}]


def _mismatches(rng):
    w = random_values((3, 4), np.float32, rng)
    return [
        ({"w": w, "b": None}, "grads['b']", "structure", "expected an array, got None"),
        ({"w": w}, "grads", "structure", "got keys ['w']"),
        ({"w": [w], "b": w[0]}, "grads['w']", "structure", "a list of 1"),
        ({"w": w[:2], "b": w[0]}, "grads['w']", "shape", "(2, 4)"),
        ({"w": w.astype(np.float64), "b": w[0]}, "grads['w']", "dtype", "float64"),
        ({"w": w, "b": w[0], "c": w}, "grads", "structure", "keys ['w', 'b', 'c']"),
    ]


def test_a_mismatched_micro_batch_raises_and_changes_nothing(rng):
    window = [
        {"w": random_values((3, 4), np.float32, rng), "b": random_values((4,), np.float32, rng)} for _ in range(3)
    ]
    expected = run(gc.GradAccumulator(3), window)[0]
    acc = gc.GradAccumulator(3)
    acc.step(window[0])
    for bad, path, what, got in _mismatches(rng):
        with raises_with(ValueError, path, what, got, "reset()"):
            acc.step(bad)
        assert acc.current_step == 1
    assert acc.step(window[1]) is None
    result = acc.step(window[2])
    for key in expected:
        assert_same_bits(result[key], expected[key])


def test_the_structure_stays_fixed_across_windows_until_reset(rng):
    acc = gc.GradAccumulator(1)
    acc.step([random_values((3,), np.float32, rng)])
    with raises_with(ValueError, "grads[0]", "shape", "(3,)", "(4,)"):
        acc.step([random_values((4,), np.float32, rng)])
    acc.reset()
    assert acc.step([random_values((4,), np.float32, rng)])[0].shape == (4,)


def test_bad_arguments_and_leaves():
    with raises_with(ValueError, "accum_steps", ">= 1"):
        gc.GradAccumulator(0)
    with raises_with(TypeError, "accum_steps", "int"):
        gc.GradAccumulator(2.0)
    with raises_with(TypeError, "accumulator_dtype", "int32"):
        gc.GradAccumulator(2, accumulator_dtype=np.int32)
    for flag in ("average", "skip_nonfinite", "copy_result"):
        for value in ("no", 0, None):  # bool("no") is True: a flag must be a bool
            with raises_with(TypeError, f"{flag} must be True or False", repr(value)):
                gc.GradAccumulator(2, **{flag: value})
    assert gc.GradAccumulator(2, average=np.bool_(False)).average is False
    acc = gc.GradAccumulator(2, accumulator_dtype=np.float64)
    with raises_with(TypeError, "grads[1]", "complex64", "complex accumulator_dtype"):
        acc.step([np.ones(2), np.ones(2, np.complex64)])
    with raises_with(TypeError, "grads[0]", "int64"):
        acc.step([np.ones(2, np.int64)])
    with raises_with(TypeError, "grads['x']", "str"):
        acc.step({"x": "not an array"})
    assert acc.current_step == 0 and acc.state_dict()["structure"] is None


# --------------------------------------------------------------------------- non-finite


def test_skip_nonfinite_drops_and_counts_without_advancing(rng):
    good = [random_values((6,), np.float32, rng) for _ in range(2)]
    bad = good[0].copy()
    bad[3] = np.nan
    inf = good[1].copy()
    inf[0] = np.inf
    acc = gc.GradAccumulator(2, skip_nonfinite=True)
    assert acc.step([bad]) is None  # before the structure was known
    assert acc.step([good[0]]) is None
    assert acc.step([inf]) is None
    assert (acc.current_step, acc.skipped) == (1, 2)
    (result,) = acc.step([good[1]])
    assert_same_bits(result, ref_accumulate(good, np.float32, 2))
    acc.reset()
    assert (acc.current_step, acc.skipped) == (0, 0)


def test_without_skip_nonfinite_nan_and_inf_are_accumulated(rng):
    g = [random_values((4,), np.float64, rng) for _ in range(2)]
    g[0][1], g[1][2] = np.nan, -np.inf
    (result,) = run(gc.GradAccumulator(2), [[x] for x in g])
    assert_same_bits(result[0], ref_accumulate(g, np.float64, 2))


# --------------------------------------------------------------------------- buffers


def test_zero_copy_views_reuse_one_set_of_buffers(rng):
    acc = gc.GradAccumulator(2, copy_result=False)
    batches = [[random_values((3, 5), np.float32, rng).T, random_values((8,), np.float16, rng)] for _ in range(6)]
    results = run(acc, batches)
    pointers = {tuple(r.__array_interface__["data"][0] for r in result) for result in results}
    assert len(pointers) == 1  # the same memory every window
    # the last window's values are the views' current contents
    for i in range(2):
        assert_same_bits(results[-1][i], ref_accumulate([b[i] for b in batches[4:]], np.float32, 2))
    # a later step overwrites them (valid until the next step)
    before = results[-1][0].copy()
    acc.step(batches[0])
    assert not np.array_equal(results[-1][0], before)


def test_copied_results_are_never_changed_by_later_steps(rng):
    acc = gc.GradAccumulator(2)
    batches = [[random_values((3, 5), np.float32, rng)] for _ in range(6)]
    first = acc.step(batches[0]) or acc.step(batches[1])
    kept = first[0].copy()
    run(acc, batches[2:])
    assert_same_bits(first[0], kept)
    acc.reset()
    assert_same_bits(first[0], kept)


def test_no_allocation_per_micro_batch(rng):
    import tracemalloc

    acc = gc.GradAccumulator(1000, average=False)
    grads = [random_values((256, 256), np.float32, rng) for _ in range(4)]
    acc.step(grads)
    acc.step(grads)
    tracemalloc.start()
    try:
        for _ in range(5):
            acc.step(grads)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 256 * 4 // 4  # small bookkeeping only: no buffer of a leaf's size


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BFLOAT16, np.dtype(np.complex128)], ids=dtype_id)
@pytest.mark.parametrize("saved_after", [0, 1, 3, 4, 6])
def test_a_resumed_run_returns_exactly_what_an_uninterrupted_one_does(dtype, saved_after, rng):
    def make():
        return {"a": random_values((5, 4), dtype, rng).T, "b": [None, random_values((), dtype, rng)]}

    batches = [make() for _ in range(8)]
    options = {"average": True, "skip_nonfinite": True}
    straight = run(gc.GradAccumulator(4, **options), batches)
    first = gc.GradAccumulator(4, **options)
    before = run(first, batches[:saved_after])
    state = pickle.loads(pickle.dumps(first.state_dict()))
    run(first, batches[saved_after:])  # the saved state is a snapshot
    resumed = gc.GradAccumulator(1)
    resumed.load_state_dict(state)
    assert (resumed.accum_steps, resumed.current_step) == (4, saved_after % 4)
    after = before + run(resumed, batches[saved_after:])
    assert len(after) == len(straight) == 2
    for got, expected in zip(after, straight):
        assert_same_bits(got["a"], expected["a"])
        assert_same_bits(got["b"][1], expected["b"][1])


def test_load_state_dict_rejects_a_bad_state_and_keeps_its_own(rng):
    acc = gc.GradAccumulator(3)
    acc.step([np.ones(3)])
    state = acc.state_dict()
    with raises_with(ValueError, "missing keys ['buffers']"):
        acc.load_state_dict({k: v for k, v in state.items() if k != "buffers"})
    with raises_with(ValueError, "buffers"):
        acc.load_state_dict({**state, "buffers": [np.ones(4)]})
    with raises_with(ValueError, "current_step"):
        acc.load_state_dict({**state, "current_step": 3})
    assert acc.current_step == 1
    assert_same_bits(acc.step([np.ones(3)]) or acc.step([np.ones(3)]), [np.ones(3)])


class Named(dict):
    """A dict subclass whose constructor takes something else first."""

    def __init__(self, name, *args):
        super().__init__(*args)
        self.name = name


def _window(rng):
    """An accumulator in the middle of a window over a small tree, and a micro-batch for it."""
    acc = gc.GradAccumulator(3, skip_nonfinite=True)
    batch = {"w": random_values((4, 5), np.float32, rng).T, "b": [None, random_values(3, np.complex64, rng)]}
    acc.step(batch)
    return acc, batch


def _structure(**changed):
    return lambda state: {**state, "structure": {**state["structure"], **changed}}


def _treedef(change):
    return lambda state: _structure(treedef=change(state["structure"]["treedef"]))(state)


# name -> (what to damage in a state of `_window`, the field named in the message)
CORRUPT = {
    "accum_steps 0": (lambda s: {**s, "accum_steps": 0}, "accum_steps"),
    "accum_steps str": (lambda s: {**s, "accum_steps": "3"}, "accum_steps"),
    "accum_steps float": (lambda s: {**s, "accum_steps": 3.0}, "accum_steps"),
    "average str": (lambda s: {**s, "average": "no"}, "average"),
    "average int": (lambda s: {**s, "average": 0}, "average"),
    "skip_nonfinite None": (lambda s: {**s, "skip_nonfinite": None}, "skip_nonfinite"),
    "copy_result str": (lambda s: {**s, "copy_result": "False"}, "copy_result"),
    "accumulator_dtype unknown": (lambda s: {**s, "accumulator_dtype": "foo"}, "accumulator_dtype"),
    "accumulator_dtype int": (lambda s: {**s, "accumulator_dtype": np.int32}, "accumulator_dtype"),
    "accumulator_dtype real for complex grads": (lambda s: {**s, "accumulator_dtype": np.float64}, "structure['dtypes'][1]"),
    "current_step negative": (lambda s: {**s, "current_step": -1}, "current_step"),
    "current_step = accum_steps": (lambda s: {**s, "current_step": 3}, "current_step"),
    "current_step float": (lambda s: {**s, "current_step": 1.0}, "current_step"),
    "current_step bool": (lambda s: {**s, "current_step": True}, "current_step"),
    "current_step without a structure": (lambda s: {**s, "structure": None, "buffers": None}, "structure"),
    "skipped negative": (lambda s: {**s, "skipped": -1}, "skipped"),
    "skipped str": (lambda s: {**s, "skipped": "0"}, "skipped"),
    "buffers without a structure": (lambda s: {**s, "current_step": 0, "structure": None}, "buffers"),
    "structure not a dict": (lambda s: {**s, "structure": [1, 2]}, "structure"),
    "structure keys": (lambda s: {**s, "structure": {**s["structure"], "extra": 1}}, "structure"),
    "treedef not one": (_treedef(lambda t: "tree"), "structure['treedef']"),
    "treedef kind": (_treedef(lambda t: (set, t[1], t[2])), "structure['treedef'][0]"),
    "treedef kind not a type": (_treedef(lambda t: ("dict", t[1], t[2])), "structure['treedef'][0]"),
    "treedef keys of a dict": (_treedef(lambda t: (dict, None, t[2])), "structure['treedef'][1]"),
    "treedef keys too few": (_treedef(lambda t: (dict, t[1][:1], t[2])), "structure['treedef'][1]"),
    "treedef keys repeated": (_treedef(lambda t: (dict, [t[1][0]] * 2, t[2])), "structure['treedef'][1]"),
    "treedef keys of a list": (_treedef(lambda t: (dict, t[1], [t[2][0], (list, ["x", "y"], t[2][1][2])])),
                               "structure['treedef'][2][1][1]"),
    "treedef children": (_treedef(lambda t: (dict, t[1], tuple(t[2]))), "structure['treedef'][2]"),
    "treedef one leaf more": (_treedef(lambda t: (dict, t[1], [t[2][0], (list, None, [*t[2][1][2], t[2][0]])])),
                              "structure['shapes']"),
    "treedef a leaf less": (_treedef(lambda t: (dict, t[1], [t[2][0], (list, None, t[2][1][2][:1])])),
                            "structure['shapes']"),
    "shapes length": (lambda s: _structure(shapes=s["structure"]["shapes"][:1])(s), "structure['shapes']"),
    "shape negative": (_structure(shapes=[(5, -4), (3,)]), "structure['shapes'][0]"),
    "shape float": (_structure(shapes=[(5, 4.0), (3,)]), "structure['shapes'][0]"),
    "shape str": (_structure(shapes=["5x4", (3,)]), "structure['shapes'][0]"),
    "shape of other buffers": (_structure(shapes=[(4, 4), (3,)], orders=[((0, False), (1, False)), ((0, False),)]), "buffers[0]"),
    "dtype unknown": (lambda s: _structure(dtypes=[s["structure"]["dtypes"][0], "foo"])(s), "structure['dtypes'][1]"),
    "dtype int": (lambda s: _structure(dtypes=[np.dtype(np.int64), s["structure"]["dtypes"][1]])(s), "structure['dtypes'][0]"),
    "dtype None": (lambda s: _structure(dtypes=[None, s["structure"]["dtypes"][1]])(s), "structure['dtypes'][0]"),
    "dtype of other buffers": (lambda s: _structure(dtypes=[np.dtype(np.float64), s["structure"]["dtypes"][1]])(s), "buffers[0]"),
    "order with an axis twice": (_structure(orders=[((0, False), (0, False)), ((0, False),)]), "structure['orders'][0]"),
    "order without an axis": (_structure(orders=[((0, False),), ((0, False),)]), "structure['orders'][0]"),
    "order out of range": (_structure(orders=[((0, False), (2, False)), ((0, False),)]), "structure['orders'][0]"),
    "order flipped str": (_structure(orders=[((0, "no"), (1, False)), ((0, False),)]), "structure['orders'][0]"),
    "order not pairs": (_structure(orders=[(0, 1), ((0, False),)]), "structure['orders'][0]"),
    "orders length": (_structure(orders=[((0, False), (1, False))]), "structure['orders']"),
    "buffers length": (lambda s: {**s, "buffers": s["buffers"][:1]}, "buffers"),
    "buffer dtype": (lambda s: {**s, "buffers": [s["buffers"][0].astype(np.float64), s["buffers"][1]]}, "buffers[0]"),
    "buffer size": (lambda s: {**s, "buffers": [s["buffers"][0][:-1], s["buffers"][1]]}, "buffers[0]"),
    "buffer a list": (lambda s: {**s, "buffers": [s["buffers"][0].tolist(), s["buffers"][1]]}, "buffers[0]"),
    "buffers None": (lambda s: {**s, "buffers": None}, "buffers"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupted_checkpoint_is_refused_and_the_accumulator_is_unchanged(case, rng):
    acc, batch = _window(rng)
    twin, _ = _window(np.random.default_rng(0))
    twin.load_state_dict(acc.state_dict())
    state = acc.state_dict()
    damage, field = CORRUPT[case]
    with raises_with(ValueError, "GradAccumulator.load_state_dict", field, "state_dict()", "unchanged"):
        acc.load_state_dict(damage(pickle.loads(pickle.dumps(state))))
    after = acc.state_dict()
    assert {k: v for k, v in after.items() if k != "buffers"} == {k: v for k, v in state.items() if k != "buffers"}
    for got, saved in zip(after["buffers"], state["buffers"]):
        assert_same_bits(got, saved)
    for _ in range(2):  # the window carries on as it would have
        got, expected = acc.step(batch), twin.step(batch)
    for g, e in zip((got["w"], got["b"][1]), (expected["w"], expected["b"][1])):
        assert_same_bits(g, e)


def test_a_valid_checkpoint_of_any_container_round_trips(rng):
    """Containers rebuilt from a copy (a dict subclass with its own constructor, a
    defaultdict) pickle with the structure and come back as they went in."""
    def batch():
        def v(shape):
            return random_values(shape, np.float64, rng)

        return Named("net", {"w": v(3), "d": defaultdict(list, {"b": v(2)}), "o": OrderedDict(z=v(()))})

    batches = [batch() for _ in range(4)]
    straight = run(gc.GradAccumulator(4), batches)[0]
    first = gc.GradAccumulator(4)
    run(first, batches[:2])
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = gc.GradAccumulator(1)
    resumed.load_state_dict(state)
    result = run(resumed, batches[2:])[0]
    assert type(result) is Named and result.name == "net" and list(result) == ["w", "d", "o"]
    assert type(result["d"]) is defaultdict and result["d"].default_factory is list
    assert type(result["o"]) is OrderedDict
    assert_same_bits(result["w"], straight["w"])
    assert_same_bits(result["d"]["b"], straight["d"]["b"])
    assert_same_bits(result["o"]["z"], straight["o"]["z"])


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_serial_and_parallel_drivers_agree_bit_for_bit(dtype, rng, monkeypatch):
    def results(parallel_min):
        monkeypatch.setattr(kernels, "PARALLEL_MIN", parallel_min)
        local = np.random.default_rng(7)
        base = [random_values((600, 301), dtype, local) for _ in range(3)]
        batches = [[b, b[::3, ::-2], b.T[5]] for b in base]
        return run(gc.GradAccumulator(3), batches)[0]

    serial, parallel = results(1 << 62), results(1)
    assert sum(r.size for r in serial) > 65536
    for s, p in zip(serial, parallel):
        assert_same_bits(p, s)


def test_dense_views_follow_the_tables_walk(rng):
    """Rows of `_runs` placed by `dense_offsets` land where `dense_view` shows each index."""
    checked = 0
    for _ in range(200):
        nd = int(rng.integers(1, 5))
        shape = tuple(int(n) for n in rng.integers(1, 5, nd))
        base = np.arange(np.prod([3 * n for n in shape]), dtype=np.float64).reshape([3 * n for n in shape])
        steps = tuple(slice(None, None, int(rng.choice([1, 2, 3, -1, -2]))) for _ in shape)
        leaf = base[steps][tuple(slice(0, n) for n in shape)].transpose(rng.permutation(nd))
        if leaf.flags.c_contiguous or leaf.flags.f_contiguous:
            continue
        starts, count, step = _table._runs(leaf)
        dense = np.full(leaf.size, np.nan)
        for start, offset in zip(starts, _table.dense_offsets(leaf)):
            first = (start - base.ctypes.data) // base.itemsize
            dense[offset : offset + count] = base.ravel()[first : first + count * step : step]
        assert np.array_equal(_table.dense_view(dense, 0, leaf.shape, _table.traversal(leaf)), leaf)
        checked += 1
    assert checked > 100


def test_repr_and_properties():
    acc = gc.GradAccumulator(4, average=False, accumulator_dtype=np.float64)
    assert (acc.accum_steps, acc.current_step, acc.skipped, acc.average) == (4, 0, 0, False)
    assert acc.accumulator_dtype == np.float64 and acc.copy_result and not acc.skip_nonfinite
    assert repr(acc).startswith("GradAccumulator(accum_steps=4, average=False")
    assert not is_complex(acc.accumulator_dtype)
