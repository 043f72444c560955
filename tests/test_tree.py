"""What counts as grads (SPEC §2): single arrays, lists, tuples, generators and other
iterables, nested dict/list/tuple trees with None leaves, NumPy scalars, the same array
object at several positions, and the structure of out-of-place results."""

import math
from collections import OrderedDict, UserDict, defaultdict, deque, namedtuple
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType

import ml_dtypes
import numpy as np
import pytest

import gradclip as gc
from gradclip._tree import MAX_DEPTH
from helpers import (
    DTYPES,
    Frozen,
    assert_norm_close,
    assert_norms_close,
    assert_same_bits,
    assert_same_structure,
    dtype_id,
    random_values,
    raises_with,
    tree_leaves,
)
from reference import ref_clamp, ref_clip_by_norm, ref_coef, ref_layer_norms, ref_norm, ref_scale


def _tree(rng):
    a = random_values((3, 4), np.float32, rng)
    b = random_values(7, np.float64, rng)
    c = random_values((2, 2), np.float16, rng)
    d = random_values(5, np.complex64, rng)
    e = random_values((), ml_dtypes.bfloat16, rng)
    f = random_values((6, 2), np.float32, rng).T
    return {
        "enc": [a, None, (b, c)],
        "dec": {"w": d, "b": None, "deep": [[e], ()]},
        "head": f,
        "none": None,
    }


def test_nested_tree_norms_in_depth_first_order(rng):
    tree = _tree(rng)
    leaves = tree_leaves(tree)
    assert len(leaves) == 6
    frozen = Frozen(*leaves)
    for p in (2.0, 1.0, math.inf):
        assert_norm_close(gc.grad_norm(tree, p), ref_norm(leaves, p))
        assert_norms_close(gc.layer_norms(tree, p), ref_layer_norms(leaves, p))
    assert gc.all_finite(tree) is True
    frozen.check()


def test_nested_tree_in_place(rng):
    tree = _tree(rng)
    leaves = tree_leaves(tree)
    before = [x.copy() for x in leaves]
    max_norm = 0.5 * ref_norm(leaves)
    total = gc.clip_grad_norm_(tree, max_norm)
    assert_norm_close(total, ref_norm(before))
    coef = ref_coef(max_norm, total)
    for x, b in zip(leaves, before):
        assert_same_bits(x, ref_scale(b, coef))

    now = [x.copy() for x in leaves]
    norms = gc.clip_grad_norm_per_layer_(tree, 0.2)
    assert_norms_close(norms, ref_layer_norms(now))
    for x, b, n in zip(leaves, now, norms):
        assert_same_bits(x, ref_clip_by_norm([b], 0.2, n)[0])

    now = [x.copy() for x in leaves]
    gc.clip_grads_with_norm_(tree, 1.0, 4.0)
    for x, b in zip(leaves, now):
        assert_same_bits(x, ref_scale(b, ref_coef(1.0, 4.0)))

    real_tree = {"a": [leaves[0], None, (leaves[1],)], "b": {"c": leaves[2], "d": None}}
    real = tree_leaves(real_tree)
    now = [x.copy() for x in real]
    gc.clip_grad_value_(real_tree, 0.01)
    for x, b in zip(real, now):
        assert_same_bits(x, ref_clamp(b, 0.01))
    leaves[1][2] = np.nan
    assert gc.all_finite(tree) is False
    assert gc.zero_nonfinite_(tree) == 1


def test_out_of_place_structure_and_values(rng):
    tree = _tree(rng)
    leaves = tree_leaves(tree)
    frozen = Frozen(*leaves)
    max_norm = 0.5 * ref_norm(leaves)
    out, total = gc.clip_grad_norm(tree, max_norm)
    frozen.check()
    assert_same_structure(out, tree)
    coef = ref_coef(max_norm, total)
    for o, x in zip(tree_leaves(out), leaves):
        assert_same_bits(o, ref_scale(x, coef))
        assert not np.shares_memory(o, x)

    # nothing clipped: still new arrays, same structure, same values
    out, _ = gc.clip_grad_norm(tree, math.inf)
    assert_same_structure(out, tree)
    for o, x in zip(tree_leaves(out), leaves):
        assert o is not x and not np.shares_memory(o, x)
        assert_same_bits(o, x)

    real_tree = {"a": (leaves[0], None, [leaves[1]]), "b": [leaves[2], {"x": None}], "c": leaves[5]}
    out = gc.clip_grad_value(real_tree, 0.3)
    assert_same_structure(out, real_tree)
    for o, x in zip(tree_leaves(out), tree_leaves(real_tree)):
        assert_same_bits(o, ref_clamp(x, 0.3))
        assert not np.shares_memory(o, x)
    frozen.check()


@pytest.mark.parametrize("kind", [list, tuple])
def test_flat_sequences_keep_their_type(kind, rng):
    grads = kind(random_values(n, np.float32, rng) for n in (3, 0, 8))
    out, _ = gc.clip_grad_norm(grads, 0.1)
    assert_same_structure(out, grads)
    out = gc.clip_grad_value(grads, 0.1)
    assert_same_structure(out, grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_single_array_in_single_array_out(dtype, rng):
    x = random_values((5, 3), dtype, rng)
    frozen = Frozen(x)
    out, total = gc.clip_grad_norm(x, 0.5)
    assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == x.dtype
    assert_same_bits(out, ref_scale(x, ref_coef(0.5, total)))
    if dtype.kind != "c":
        out = gc.clip_grad_value(x, 0.5)
        assert isinstance(out, np.ndarray)
        assert_same_bits(out, ref_clamp(x, 0.5))
    frozen.check()
    assert_norms_close(gc.layer_norms(x), ref_layer_norms([x]))


def test_generators_are_consumed_once(rng):
    leaves = [random_values(n, np.float32, rng) for n in (4, 9, 1)]
    before = [x.copy() for x in leaves]
    consumed = []

    def gen():
        for x in leaves:
            consumed.append(1)
            yield x

    assert_norm_close(gc.grad_norm(gen()), ref_norm(before))
    assert_norms_close(gc.layer_norms(gen()), ref_layer_norms(before))
    assert gc.all_finite(gen()) is True

    consumed.clear()
    max_norm = 0.3 * ref_norm(before)
    total = gc.clip_grad_norm_(gen(), max_norm)
    assert len(consumed) == len(leaves)
    coef = ref_coef(max_norm, total)
    for x, b in zip(leaves, before):
        assert_same_bits(x, ref_scale(b, coef))

    now = [x.copy() for x in leaves]
    norms = gc.clip_grad_norm_per_layer_(gen(), 0.1)
    for x, b, n in zip(leaves, now, norms):
        assert_same_bits(x, ref_scale(b, ref_coef(0.1, n)))

    now = [x.copy() for x in leaves]
    gc.clip_grad_value_(gen(), 0.01)
    for x, b in zip(leaves, now):
        assert_same_bits(x, ref_clamp(b, 0.01))

    frozen = Frozen(*leaves)
    out, total = gc.clip_grad_norm(gen(), 0.001)
    frozen.check()
    out = list(out)  # the container type for a generator input is not specified
    assert len(out) == len(leaves)
    for o, x in zip(out, leaves):
        assert_same_bits(o, ref_scale(x, ref_coef(0.001, total)))


def test_other_iterables(rng):
    leaves = [random_values(n, np.float64, rng) for n in (4, 9)]
    for grads in (deque(leaves), {"a": leaves[0], "b": leaves[1]}.values(), iter(leaves)):
        assert_norm_close(gc.grad_norm(grads), ref_norm(leaves))


# --------------------------------------------------------------------------- duplicates


def test_same_array_counted_once_and_scaled_once(rng):
    a = random_values((4, 5), np.float32, rng)
    b = random_values(6, np.float64, rng)
    a0, b0 = a.copy(), b.copy()
    grads = [a, b, a, {"again": a}]
    for p in (2.0, 1.0, math.inf):
        assert_norm_close(gc.grad_norm(grads, p), ref_norm([a, b], p))
        got = gc.layer_norms(grads, p)
        assert got.shape == (4,)
        assert_norms_close(got, ref_layer_norms([a, b, a, a], p))
        assert got[0] == got[2] == got[3]

    max_norm = 0.5 * ref_norm([a, b])
    total = gc.clip_grad_norm_(grads, max_norm)
    assert_norm_close(total, ref_norm([a0, b0]))
    coef = ref_coef(max_norm, total)
    assert_same_bits(a, ref_scale(a0, coef), what="duplicated leaf (scaled once)")
    assert_same_bits(b, ref_scale(b0, coef))

    a1, b1 = a.copy(), b.copy()
    out, total = gc.clip_grad_norm([a, b, a], 0.25 * ref_norm([a1, b1]))
    coef = ref_coef(0.25 * ref_norm([a1, b1]), total)
    assert_same_bits(out[0], ref_scale(a1, coef))
    assert_same_bits(out[2], ref_scale(a1, coef))
    assert_same_bits(out[1], ref_scale(b1, coef))
    assert_same_bits(a, a1)

    gc.clip_grads_with_norm_([a, a, b], 1.0, 8.0)
    assert_same_bits(a, ref_scale(a1, ref_coef(1.0, 8.0)), what="duplicated leaf (scaled once)")


def test_duplicates_per_layer_clipped_once(rng):
    a = random_values((4, 5), np.float64, rng) * 10
    a0 = a.copy()
    norms = gc.clip_grad_norm_per_layer_([a, a], 1.0)
    assert norms.shape == (2,)
    assert_norms_close(norms, ref_layer_norms([a0, a0]))
    assert_same_bits(a, ref_scale(a0, ref_coef(1.0, norms[0])), what="scaled once")


def test_duplicates_value_and_nonfinite(rng):
    a = random_values(12, np.float32, rng) * 5
    a[3], a[7] = np.nan, -np.inf
    a0 = a.copy()
    assert gc.zero_nonfinite_([a, a, (a,)]) == 2
    a[3] = a[7] = 0.0
    a1 = a.copy()
    gc.clip_grad_value_([a, a], 0.5)
    assert_same_bits(a, ref_clamp(a1, 0.5))
    assert np.isnan(a0[3])


# --------------------------------------------------------------------------- scalars


SCALARS = [
    np.float16(3.0),
    ml_dtypes.bfloat16(-0.75),
    np.float32(3.0),
    np.float64(-4.0),
    np.complex64(3 - 4j),
    np.complex128(1.5 + 2j),
]


@pytest.mark.parametrize("scalar", SCALARS, ids=lambda s: type(s).__name__)
def test_numpy_scalar_leaves(scalar, rng):
    arr = random_values(5, np.float32, rng)
    leaves = [arr, scalar]
    for p in (2.0, 1.0, math.inf):
        assert_norm_close(gc.grad_norm(leaves, p), ref_norm(leaves, p))
        assert_norms_close(gc.layer_norms(leaves, p), ref_layer_norms(leaves, p))
        assert_norm_close(gc.grad_norm(scalar, p), ref_norm([scalar], p))
    assert gc.all_finite(leaves) is True
    max_norm = 0.5 * ref_norm(leaves)
    out, total = gc.clip_grad_norm(leaves, max_norm)
    coef = ref_coef(max_norm, total)
    assert_same_bits(out[0], ref_scale(arr, coef))
    assert_same_bits(np.asarray(out[1]), ref_scale(np.asarray(scalar), coef))
    if np.asarray(scalar).dtype.kind != "c":
        out = gc.clip_grad_value([scalar, arr], 0.5)
        assert_same_bits(np.asarray(out[0]), ref_clamp(np.asarray(scalar), 0.5))
        assert_same_bits(out[1], ref_clamp(arr, 0.5))


def test_numpy_scalar_nonfinite():
    assert gc.all_finite([np.float32(np.nan)]) is False
    assert gc.all_finite(np.float64(-np.inf)) is False
    assert math.isnan(gc.grad_norm([np.float16(np.nan), np.ones(3)]))


def test_zero_d_array_leaf():
    x = np.array(-2.5, dtype=np.float32)
    x0 = x.copy()
    assert_norm_close(gc.grad_norm(x), ref_norm([x0]))
    total = gc.clip_grad_norm_(x, 1.0)
    assert_same_bits(x, ref_scale(x0, ref_coef(1.0, total)))
    x1 = x.copy()
    gc.clip_grad_value_({"x": x}, 0.5)
    assert_same_bits(x, ref_clamp(x1, 0.5))


# --------------------------------------------------------------------------- container zoo (SPEC §10)


class Named(dict):
    """A dict subclass whose constructor takes something else first."""

    def __init__(self, name, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name


class Layers(list):
    def __init__(self, name, items=()):
        super().__init__(items)
        self.name = name


class Pair(tuple):
    """A tuple subclass that takes its items as tuple does."""


class Bounded(tuple):
    """A tuple subclass whose constructor takes something else: gradclip cannot call it."""

    def __new__(cls, low, high):
        return super().__new__(cls, (low, high))


class Frame(Mapping):
    """A read-only mapping of another kind: nothing says how to make one."""

    def __init__(self, data):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


class Uncopyable(dict):
    def __copy__(self):
        raise RuntimeError("no copies of this one")


class Itself(dict):
    def __copy__(self):
        return self


class Bag(MutableMapping):
    """A mutable mapping keeping its items in an attribute: a shallow copy shares them."""

    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __setitem__(self, key, value):
        self._items[key] = value

    def __delitem__(self, key):
        del self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


Point = namedtuple("Point", ["x", "y"])


def _zoo(rng):
    """name -> a container of arrays (and a None); every kind gradclip rebuilds."""
    v = lambda n: random_values(n, np.float64, rng) * 10  # noqa: E731
    ordered = OrderedDict([("z", v(3)), ("a", v(2)), ("none", None)])
    ordered.move_to_end("z")
    default = defaultdict(list, {"w": v(4), "b": v(1)})
    return {
        "dict subclass with its own constructor": Named("enc", {"w": v(3), "b": None, "k": v(2)}),
        "defaultdict": default,
        "OrderedDict": ordered,
        "UserDict": UserDict({"w": v(3), "b": v(2)}),
        "namedtuple": Point(v(3), None),
        "mappingproxy": MappingProxyType({"w": v(3), "b": v(1)}),
        "list subclass with its own constructor": Layers("blocks", [v(2), None, v(3)]),
        "tuple subclass": Pair((v(2), v(3))),
        "nested": Named(
            "outer", {"inner": defaultdict(int, {"p": Point(v(1), Layers("l", [v(2)]))}), "u": UserDict({"q": v(2)})}
        ),
    }


def _assert_rebuilt(result, template):
    """``result`` is ``template`` rebuilt: the same types, attributes, keys in order, defaults."""
    assert type(result) is type(template), f"{type(result).__name__} != {type(template).__name__}"
    if isinstance(template, Mapping):
        assert list(result) == list(template)
        assert getattr(result, "default_factory", None) is getattr(template, "default_factory", None)
        children = [(result[k], template[k]) for k in template]
    elif isinstance(template, (list, tuple)):
        assert len(result) == len(template)
        children = list(zip(result, template))
    else:
        assert template is None or isinstance(result, np.ndarray)
        return
    if hasattr(template, "__dict__") and not isinstance(template, UserDict):
        assert vars(result) == vars(template)
    for r, t in children:
        _assert_rebuilt(r, t)


def _arrays(tree):
    found = []
    _collect(tree, found)
    return found


def _collect(node, found):
    if isinstance(node, np.ndarray):
        found.append(node)
    elif isinstance(node, Mapping):
        for value in node.values():
            _collect(value, found)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _collect(value, found)


ZOO = list(_zoo(np.random.default_rng(0)))


@pytest.mark.parametrize("kind", ZOO)
def test_containers_come_back_as_they_went_in(kind, rng):
    grads = _zoo(rng)[kind]
    leaves = _arrays(grads)
    frozen = Frozen(*leaves)
    max_norm = 0.5 * ref_norm(leaves)
    clipped, total = gc.clip_grad_norm(grads, max_norm)
    _assert_rebuilt(clipped, grads)
    for o, x in zip(_arrays(clipped), leaves):
        assert_same_bits(o, ref_scale(x, ref_coef(max_norm, total)))
    _assert_rebuilt(gc.clip_grad_value(grads, 0.5), grads)
    value, direction = gc.norm_penalty(grads, 0.5 * total, 2.0)
    _assert_rebuilt(direction, grads)
    for d, x in zip(_arrays(direction), leaves):
        assert_same_bits(d, ref_scale(x, 2.0 / total))
    accumulator = gc.GradAccumulator(2)
    assert accumulator.step(grads) is None
    mean = accumulator.step(grads)
    _assert_rebuilt(mean, grads)
    for m, x in zip(_arrays(mean), leaves):
        assert_same_bits(m, x)
    assert_norms_close(gc.layer_norms(grads), ref_layer_norms(leaves))
    frozen.check()
    before = [x.copy() for x in leaves]
    assert_norm_close(gc.clip_grad_norm_(grads, max_norm), ref_norm(before))  # in place: walks them too
    for x, b in zip(leaves, before):
        assert_same_bits(x, ref_scale(b, ref_coef(max_norm, total)))
    params = gc.clip_grad_value(grads, math.inf)  # the same structure: copies of the leaves
    expected = [x.copy() for x in leaves]
    clipped_units = gc.adaptive_grad_clip_(expected, [x.copy() for x in leaves], 0.5)
    assert gc.adaptive_grad_clip_(grads, params, 0.5) == clipped_units > 0
    for x, e in zip(leaves, expected):
        assert_same_bits(x, e)


REFUSED = {
    "tuple subclass with its own constructor": (lambda v: Bounded(v, v[:0]), "Bounded"),
    "read-only mapping of another kind": (lambda v: Frame({"w": v}), "Frame"),
    "dict subclass that cannot be copied": (lambda v: Uncopyable(w=v), "no copies of this one"),
    "tuple subclass with attributes": (lambda v: _with_attribute(Pair((v,))), "Pair"),
    "dict subclass whose copy is itself": (lambda v: Itself(w=v), "the copy shares its items"),
    "mapping whose copy would share its items": (lambda v: Bag({"w": v}), "Bag"),
}


def _with_attribute(container):
    container.note = "kept nowhere"
    return container


@pytest.mark.parametrize("kind", list(REFUSED))
@pytest.mark.parametrize(
    "call", ["clip_grad_norm_", "clip_grad_norm", "grad_norm", "GradAccumulator.step", "norm_penalty"]
)
def test_containers_that_cannot_be_rebuilt_are_refused(kind, call, rng):
    make, fragment = REFUSED[kind]
    valid = random_values(4, np.float64, rng) * 10
    grads = {"ok": valid, "odd": [None, make(random_values(3, np.float64, rng) * 10)]}
    frozen = Frozen(valid, *_arrays(grads))
    calls = {
        "clip_grad_norm_": lambda g: gc.clip_grad_norm_(g, 0.1),
        "clip_grad_norm": lambda g: gc.clip_grad_norm(g, 0.1),
        "grad_norm": gc.grad_norm,
        "GradAccumulator.step": gc.GradAccumulator(1).step,
        "norm_penalty": lambda g: gc.norm_penalty(g, 0.1, 1.0),
    }
    fix = "pass a dict, list, tuple or namedtuple"
    odd = grads["odd"][1]
    items = list(odd.items()) if isinstance(odd, Mapping) else list(odd)
    with raises_with(TypeError, "grads['odd'][1] is", fragment, "cannot rebuild", fix):
        calls[call](grads)
    frozen.check()
    assert (list(odd.items()) if isinstance(odd, Mapping) else list(odd)) == items  # the container too


def test_a_container_inside_itself_is_refused(rng):
    x = random_values(3, np.float64, rng) * 10
    looped = {"w": x, "layers": [x[:1].copy()]}
    looped["layers"].append(looped)
    frozen = Frozen(x)
    for call in (gc.grad_norm, lambda g: gc.clip_grad_norm_(g, 0.1), lambda g: gc.clip_grad_norm(g, 0.1)):
        with raises_with(ValueError, "grads['layers'][1] is a container that holds itself"):
            call(looped)
    frozen.check()
    shared = [x, x]  # the same array twice is no cycle, nor is the same container twice
    assert_norm_close(gc.grad_norm({"a": shared, "b": shared}), ref_norm([x]))


def test_nesting_deeper_than_the_limit_is_refused(rng):
    x = random_values(3, np.float64, rng) * 10

    def nested(depth):
        tree = x
        for level in range(depth):
            tree = [tree] if level % 2 else {"k": tree}
        return tree

    deep = nested(MAX_DEPTH)  # at the limit: works everywhere
    assert_norm_close(gc.grad_norm(deep), ref_norm([x]))
    out, _ = gc.clip_grad_norm(deep, math.inf)
    assert_same_bits(tree_leaves(out)[0], x)
    too_deep = f"[... {MAX_DEPTH - 8} levels more] is nested more than {MAX_DEPTH} containers deep"
    outermost = {MAX_DEPTH + 1: "grads['k'][0]['k'][0]", 498: "grads[0]['k'][0]['k']", 5000: "grads[0]['k']"}
    for depth, outer in outermost.items():
        with raises_with(ValueError, outer, too_deep):
            gc.clip_grad_norm_(nested(depth), 0.1)
    assert_same_bits(x, tree_leaves(deep)[0])
