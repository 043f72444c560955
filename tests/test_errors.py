"""Every error path (SPEC §2, §3): the exception type, the message (which leaf, what was
wrong, the fix where there is one), and that no array changed. The failing leaf comes
after valid leaves that the call would otherwise modify, so the checks must happen
before any write."""

import math
import re
from decimal import Decimal

import numpy as np
import pytest

import gradclip as gc
from helpers import Frozen, assert_same_bits, raises_with, tree_leaves
from reference import ref_scale

FUNCS = {
    "grad_norm": lambda g: gc.grad_norm(g),
    "layer_norms": lambda g: gc.layer_norms(g),
    "clip_grad_norm_": lambda g: gc.clip_grad_norm_(g, 0.01),
    "clip_grad_norm": lambda g: gc.clip_grad_norm(g, 0.01),
    "clip_grads_with_norm_": lambda g: gc.clip_grads_with_norm_(g, 0.01, 100.0),
    "clip_grad_value_": lambda g: gc.clip_grad_value_(g, 0.01),
    "clip_grad_value": lambda g: gc.clip_grad_value(g, 0.01),
    "clip_grad_norm_per_layer_": lambda g: gc.clip_grad_norm_per_layer_(g, 0.01),
    "all_finite": lambda g: gc.all_finite(g),
    "zero_nonfinite_": lambda g: gc.zero_nonfinite_(g),
}
IN_PLACE = [name for name in FUNCS if name.endswith("_")]
TWIN = {"clip_grad_norm_": "clip_grad_norm", "clip_grad_value_": "clip_grad_value"}


def _valid(name, k):
    """k valid leaves that ``name`` would modify (clip or zero) if it ran."""
    out = []
    for i in range(k):
        dt = [np.float32, np.float64, np.float16][i % 3]
        x = np.linspace(-50, 50, 9 + i).astype(dt)
        if name == "zero_nonfinite_":
            x[1] = np.nan
        out.append(x)
    return out


# (builder of grads around the bad leaf, expected path); v = valid leaves
PLACES = {
    "single": (lambda v, bad: bad, "grads"),
    "list": (lambda v, bad: [v[0], bad], "grads[1]"),
    "tuple": (lambda v, bad: (v[0], v[1], bad), "grads[2]"),
    "list_with_none": (lambda v, bad: [v[0], None, bad, v[1]], "grads[2]"),
    "dict": (lambda v, bad: {"a": v[0], "w": bad}, "grads['w']"),
    "nested": (lambda v, bad: {"x": v[0], "enc": [v[1], bad]}, "grads['enc'][1]"),
}
places = pytest.mark.parametrize("place", list(PLACES))
funcs = pytest.mark.parametrize("name", list(FUNCS))


def _assert_suggested_functions_exist(msg):
    """A message that tells the user to call ``name(...)`` names a real gradclip function."""
    for ident in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\(", msg):
        assert hasattr(gc, ident), f"the message suggests {ident}(), which gradclip does not have: {msg!r}"


def _call_and_check(name, place, bad, exc, *fragments, regex=()):
    build, path = PLACES[place]
    valid = _valid(name, 2)
    grads = build(valid, bad)
    frozen = Frozen(*valid, *[x for x in tree_leaves(grads) if isinstance(x, np.ndarray)])
    with raises_with(exc, path, *fragments, regex=regex) as info:
        FUNCS[name](grads)
    frozen.check()
    _assert_suggested_functions_exist(str(info.value))


@funcs
@places
@pytest.mark.parametrize("bad", ["abc", 3, object()], ids=["str", "int", "object"])
def test_non_array_leaf(name, place, bad):
    article = {"str": "a str", "int": "an int", "object": "an object"}[type(bad).__name__]
    _call_and_check(name, place, bad, TypeError, f"is {article};")


UNSUPPORTED = [np.int64, np.int32, np.uint16, np.bool_, np.object_]
if np.dtype(np.longdouble) != np.dtype(np.float64):
    UNSUPPORTED.append(np.longdouble)


@funcs
@places
@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=lambda d: np.dtype(d).name)
def test_unsupported_dtype(name, place, dtype):
    bad = np.ones(4, dtype=dtype)
    _call_and_check(name, place, bad, TypeError, np.dtype(dtype).name)


@pytest.mark.parametrize("name", IN_PLACE)
@places
def test_read_only_leaf(name, place):
    bad = np.linspace(-50, 50, 7).astype(np.float32)
    if name == "zero_nonfinite_":
        bad[0] = np.inf
    bad.flags.writeable = False
    regex = ()
    if name in TWIN:  # the message points to the out-of-place twin
        regex = (rf"{TWIN[name]}(?![\w])",)
    _call_and_check(name, place, bad, ValueError, "read-only", regex=regex)


@pytest.mark.parametrize("name", IN_PLACE)
@pytest.mark.parametrize("scalar", [np.float32(50.0), np.float64(np.inf)], ids=["f32", "f64inf"])
def test_numpy_scalar_to_in_place_function(name, scalar):
    if name == "zero_nonfinite_":
        scalar = np.float64(np.inf)
    _call_and_check(name, "list", scalar, ValueError, "read-only")


@pytest.mark.parametrize("name", ["clip_grad_value_", "clip_grad_value"])
@places
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=["c64", "c128"])
def test_complex_leaf_to_clip_by_value(name, place, dtype):
    bad = (np.linspace(-50, 50, 7) * (1 + 1j)).astype(dtype)
    _call_and_check(name, place, bad, TypeError, "complex")


# --------------------------------------------------------------------------- arguments

ARGUMENT_CALLS = {
    "max_norm": {
        "clip_grad_norm_": lambda g, v: gc.clip_grad_norm_(g, v),
        "clip_grad_norm": lambda g, v: gc.clip_grad_norm(g, v),
        "clip_grads_with_norm_": lambda g, v: gc.clip_grads_with_norm_(g, v, 100.0),
        "clip_grad_norm_per_layer_": lambda g, v: gc.clip_grad_norm_per_layer_(g, v),
    },
    "clip_value": {
        "clip_grad_value_": lambda g, v: gc.clip_grad_value_(g, v),
        "clip_grad_value": lambda g, v: gc.clip_grad_value(g, v),
    },
    "norm_type": {
        "grad_norm": lambda g, v: gc.grad_norm(g, v),
        "layer_norms": lambda g, v: gc.layer_norms(g, norm_type=v),
        "clip_grad_norm_": lambda g, v: gc.clip_grad_norm_(g, 0.01, v),
        "clip_grad_norm": lambda g, v: gc.clip_grad_norm(g, 0.01, norm_type=v),
        "clip_grad_norm_per_layer_": lambda g, v: gc.clip_grad_norm_per_layer_(g, 0.01, v),
    },
    "eps": {
        "clip_grad_norm_": lambda g, v: gc.clip_grad_norm_(g, 0.01, eps=v),
        "clip_grad_norm": lambda g, v: gc.clip_grad_norm(g, 0.01, eps=v),
        "clip_grads_with_norm_": lambda g, v: gc.clip_grads_with_norm_(g, 0.01, 100.0, eps=v),
        "clip_grad_norm_per_layer_": lambda g, v: gc.clip_grad_norm_per_layer_(g, 0.01, eps=v),
    },
}
BAD_VALUES = {
    "max_norm": [-1.0, -1e-300, math.nan, -math.inf],
    "clip_value": [-0.5, math.nan, -math.inf],
    "norm_type": [0.0, -1.0, math.nan, -math.inf],
    "eps": [-1e-6, math.nan],
}
ARG_CASES = [
    (arg, fn, v)
    for arg, calls in ARGUMENT_CALLS.items()
    for fn in calls
    for v in BAD_VALUES[arg]
]


@pytest.mark.parametrize("arg, name, value", ARG_CASES, ids=[f"{a}-{f}-{v}" for a, f, v in ARG_CASES])
def test_bad_argument(arg, name, value):
    grads = [np.linspace(-50, 50, 9).astype(np.float32), {"b": np.linspace(1, 9, 5)}]
    frozen = Frozen(*tree_leaves(grads))
    with raises_with(ValueError, arg) as info:
        ARGUMENT_CALLS[arg][name](grads, value)
    frozen.check()
    _assert_suggested_functions_exist(str(info.value))


ARGUMENT_CALLS["total_norm"] = {"clip_grads_with_norm_": lambda g, v: gc.clip_grads_with_norm_(g, 0.01, v)}
WRONG_TYPES = ["2", True, np.bool_(True), Decimal("2"), None, [2.0], np.array([2.0]), 2 + 0j]


@pytest.mark.parametrize("arg", list(ARGUMENT_CALLS))
@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
def test_arguments_of_the_wrong_type_are_refused_alike(arg, value):
    """A number is a real number, not a string, a bool, a Decimal or a one-element list, for
    every argument (total_norm also takes a 0-d array, as norm functions return)."""
    grads = [np.linspace(-50, 50, 9).astype(np.float32), {"b": np.linspace(1, 9, 5)}]
    frozen = Frozen(*tree_leaves(grads))
    for name, call in ARGUMENT_CALLS[arg].items():
        with raises_with(TypeError, f"{arg} must be a real number", type(value).__name__):
            call(grads, value)
        frozen.check()


@pytest.mark.parametrize("arg", list(ARGUMENT_CALLS))
def test_an_int_beyond_float64_is_refused(arg):
    """Python and NumPy refuse to round 10**400 to a float (OverflowError); so does gradclip,
    rather than reading it as inf."""
    grads = [np.linspace(-50, 50, 9).astype(np.float32)]
    frozen = Frozen(*grads)
    for name, call in ARGUMENT_CALLS[arg].items():
        with raises_with(ValueError, f"{arg} is an int of 401 digits", "float64 range", "math.inf"):
            call(grads, 10**400)
        frozen.check()


@pytest.mark.parametrize("total", [np.float32(4.0), np.array(4.0), np.array(4, dtype=np.int64), 4])
def test_total_norm_takes_numbers_and_0d_arrays(total):
    g = np.linspace(-1.0, 1.0, 5)
    before = g.copy()
    gc.clip_grads_with_norm_(g, 1.0, total, eps=0.0)
    assert_same_bits(g, ref_scale(before, 0.25))


@pytest.mark.parametrize("arg", ["max_norm", "clip_value"])
def test_infinite_thresholds_are_allowed(arg):
    grads = [np.linspace(-50, 50, 9).astype(np.float32), np.linspace(1, 9, 5)]
    frozen = Frozen(*grads)
    for name, call in ARGUMENT_CALLS[arg].items():
        call(grads, math.inf)
        frozen.check()


def test_error_if_nonfinite_raises_before_writing():
    grads = [np.linspace(-50, 50, 9).astype(np.float32), np.linspace(1, 9, 5), np.array([1.0, np.inf])]
    frozen = Frozen(*grads)
    for fn in (gc.clip_grad_norm_, gc.clip_grad_norm):
        with raises_with(gc.NonFiniteGradientError, "non-finite"):
            fn(grads, 0.01, error_if_nonfinite=True)
        frozen.check()
    # also catchable as the classes PyTorch users catch
    with pytest.raises(RuntimeError):
        gc.clip_grad_norm_(grads, 0.01, error_if_nonfinite=True)
    with pytest.raises(FloatingPointError):
        gc.clip_grad_norm_(grads, 0.01, error_if_nonfinite=True)
    frozen.check()
