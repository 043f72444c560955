"""adaptive_grad_clip_ (AGC, Brock et al. 2021; SPEC §5) against an independent
re-implementation of Optax's published ``adaptive_grad_clip``: JAX layouts with Optax's own
unit rule, PyTorch layouts through the transposes, every dtype, strided and DLPack leaves,
and the error paths."""

import math

import numpy as np
import pytest
import torch

import gradclip as gc
from helpers import BFLOAT16, Frozen, Strided, assert_same_bits, dtype_id, raises_with
from reference import round_to, widen

# --------------------------------------------------------------------------- reference


def _fsum_unit_norms(x, axes):
    """2-norms over ``axes`` (kept as length 1), each summed exactly with math.fsum."""
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(x, rest + list(axes))
    rows = moved.reshape(math.prod(moved.shape[: len(rest)]), -1)
    norms = [math.sqrt(math.fsum((abs(v) ** 2 for v in row.tolist()))) for row in rows]
    kept = [1 if a in axes else n for a, n in enumerate(x.shape)]
    return np.array(norms, dtype=np.float64).reshape(kept)


def optax_unitwise_norm(x):
    """``optax.unitwise_norm``: scalars and vectors (after squeezing) are one unit, 2-d
    (in, out) and 3-d kernels reduce axis 0, 4-d HWIO convolutions axes (0, 1, 2)."""
    if np.squeeze(x).ndim <= 1:
        axes = tuple(range(x.ndim))
    elif x.ndim in (2, 3):
        axes = (0,)
    elif x.ndim == 4:
        axes = (0, 1, 2)
    else:
        raise ValueError(f"optax has no unit rule for {x.ndim} dimensions")
    return np.broadcast_to(_fsum_unit_norms(x, axes), x.shape)


def optax_agc(g, p, clipping=0.01, eps=1e-3):
    """``optax.adaptive_grad_clip`` on one leaf, in float64; returns the float64 result
    and the per-element clip mask. ``unitwise_clip``: where ``g_norm < max_norm`` keep
    ``g``, else ``g * (max_norm / max(g_norm, 1e-6))``."""
    g64, p64 = widen(g), widen(p)
    max_norm = clipping * np.maximum(optax_unitwise_norm(p64), eps)
    g_norm = optax_unitwise_norm(g64)
    trigger = g_norm < max_norm
    return np.where(trigger, g64, g64 * (max_norm / np.maximum(g_norm, 1e-6))), ~trigger


def expected_leaf(g, p, clipping=0.01, eps=1e-3, to_jax=None):
    """The leaf after AGC, per Optax, rounded once to its dtype; ``to_jax`` transposes a
    PyTorch-layout leaf into Optax's layout (and back). Returns (leaf, clip mask)."""
    if to_jax is not None:
        back = np.argsort(to_jax)
        result, mask = optax_agc(g.transpose(to_jax), p.transpose(to_jax), clipping, eps)
        result, mask = result.transpose(back), mask.transpose(back)
    else:
        result, mask = optax_agc(g, p, clipping, eps)
    return np.where(mask, round_to(result, g.dtype), g), mask


def clipped_units(mask, unit_axes):
    """The number of units a per-element clip mask covers."""
    return int(np.sum(mask)) // math.prod(mask.shape[a] for a in unit_axes)


def unit_scaled(rng, shape, unit_axes, dtype, scale=0.01):
    """Random gradients whose unit norms spread over two orders of magnitude."""
    per_unit = [1 if a in unit_axes else n for a, n in enumerate(shape)]
    factor = rng.permutation(np.geomspace(0.05, 20.0, math.prod(per_unit))).reshape(per_unit)
    values = rng.standard_normal(shape) * factor * scale
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.standard_normal(shape) * factor * scale
    return np.array(values, dtype=dtype)


# (name, shape, axis for gradclip, Optax-layout transpose for the reference, unit axes)
LAYOUTS = [
    ("jax_dense_in_out", (7, 5), 0, None, (0,)),
    ("jax_multihead", (8, 2, 4), 0, None, (0,)),
    ("jax_conv_hwio", (3, 3, 4, 6), (0, 1, 2), None, (0, 1, 2)),
    ("torch_dense_out_in", (5, 7), None, (1, 0), (1,)),
    ("torch_conv_oihw", (6, 4, 3, 3), None, (2, 3, 1, 0), (1, 2, 3)),
    ("bias", (9,), None, None, (0,)),
    ("bias_axis0", (9,), 0, None, (0,)),
    ("scalar", (), None, None, ()),
    ("scalar_axis0", (), 0, None, ()),
]


@pytest.mark.parametrize("name, shape, axis, to_jax, unit_axes", LAYOUTS, ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64], ids=dtype_id)
def test_matches_optax_formula(name, shape, axis, to_jax, unit_axes, dtype, rng):
    p = rng.standard_normal(shape).astype(dtype)
    g = unit_scaled(rng, shape, unit_axes, dtype)
    expected, mask = expected_leaf(g, p, to_jax=to_jax)
    clipped = gc.adaptive_grad_clip_(g, p, axis=axis)
    assert clipped == clipped_units(mask, unit_axes)
    if len(shape) >= 2:
        assert 0 < clipped < math.prod(n for a, n in enumerate(shape) if a not in unit_axes)
    assert_same_bits(g[~mask], expected[~mask], what="units not clipped")
    tol = 4 * np.finfo(dtype).eps  # our pairwise float64 sums vs fsum: an ulp or two
    np.testing.assert_allclose(g, expected, rtol=tol, atol=0)


def test_pytree_of_layouts_float32_params_float64_grads(rng):
    """One call over a pytree mixing layouts under the default axis, with None leaves,
    float32 parameters and float64 gradients; default clipping and eps."""
    shapes = {"conv": (6, 4, 3, 3), "dense": (5, 7), "bias": (5,), "scale": ()}
    to_jax = {"conv": (2, 3, 1, 0), "dense": (1, 0), "bias": None, "scale": None}
    unit_axes = {"conv": (1, 2, 3), "dense": (1,), "bias": (0,), "scale": ()}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = {k: unit_scaled(rng, s, unit_axes[k], np.float64) for k, s in shapes.items()}
    params["frozen"] = np.ones(3, dtype=np.float32)
    grads["frozen"] = None  # a parameter without a gradient is skipped
    expected = {k: expected_leaf(grads[k], params[k], to_jax=to_jax[k]) for k in shapes}
    count = gc.adaptive_grad_clip_(grads, params)
    for k in shapes:
        np.testing.assert_allclose(grads[k], expected[k][0], rtol=1e-15, atol=0)
    assert count == sum(clipped_units(expected[k][1], unit_axes[k]) for k in shapes)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16], ids=dtype_id)
def test_half_precision_rounds_once_bit_for_bit(dtype, rng):
    """Half-precision squares sum exactly in float64, so the norms — and with them the
    factors — are exact on both sides: the result must match bit for bit."""
    p = rng.standard_normal((16, 8)).astype(dtype)
    g = unit_scaled(rng, (16, 8), (1,), dtype)
    expected, mask = expected_leaf(g, p, to_jax=(1, 0))
    assert 0 < mask[:, 0].sum() < 16
    gc.adaptive_grad_clip_(g, p)
    assert_same_bits(g, expected)


def test_edge_units():
    """Zero parameters (the eps floor), zero gradients, NaN and inf gradients, inf
    parameters: non-finite units are left exactly as they were (Optax would write NaN)."""
    p = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [np.inf, 1.0], [3.0, 4.0]])
    g = np.array([[2e-5, 0.0], [0.0, 0.0], [np.nan, 1.0], [np.inf, 1.0], [5.0, 5.0], [0.375, 0.5]])
    before = g.copy()
    assert gc.adaptive_grad_clip_(g, p, clipping=0.01, eps=1e-3) == 2
    assert_same_bits(g[0], before[0] * ((0.01 * 1e-3) / 2e-5))  # capped at 0.01 * eps
    assert_same_bits(g[1:5], before[1:5])
    assert_same_bits(g[5], before[5] * ((0.01 * 5.0) / 0.625))


def test_overflowing_unit_norm_is_rescaled():
    """float64 units whose sum of squares overflows still get their finite norm."""
    g = np.array([[3e200, 4e200], [1e-300, 0.0]])  # norms 5e200 and 1e-300
    p = np.array([[1e200, 1e200], [1.0, 0.0]])  # caps 1.41e198 and 0.01
    assert gc.adaptive_grad_clip_(g, p) == 1
    np.testing.assert_allclose(np.hypot(*g[0]), 0.01 * math.hypot(1e200, 1e200), rtol=1e-14)
    assert g[1, 0] == 1e-300


@pytest.mark.parametrize("layout", ["T", "step_all", "neg_step", "T_step"])
def test_strided_views_are_clipped_in_place(layout, rng):
    grad = Strided(layout, (6, 5), np.float32, rng, scale=0.05)
    p = rng.standard_normal((6, 5)).astype(np.float32)
    expected, _ = expected_leaf(grad.view_before, p, to_jax=(1, 0))
    gc.adaptive_grad_clip_([grad.view], [p])
    np.testing.assert_allclose(grad.view, expected, rtol=4 * np.finfo(np.float32).eps, atol=0)
    outside = grad.outside_mask()
    assert_same_bits(grad.base[outside], grad.before[outside], what="memory outside the view")


def test_torch_tensors_are_clipped_in_their_own_memory(rng):
    p = rng.standard_normal((4, 3))
    g = unit_scaled(rng, (4, 3), (1,), np.float64)
    expected, _ = expected_leaf(g, p, to_jax=(1, 0))
    tg = torch.from_numpy(g.copy())
    gc.adaptive_grad_clip_({"w": tg}, {"w": torch.from_numpy(p)})
    np.testing.assert_allclose(tg.numpy(), expected, rtol=1e-15, atol=0)


def test_generators_and_a_repeated_array(rng):
    """Generators are consumed once; an array given twice is clipped and counted once."""
    p = rng.standard_normal((4, 3))
    g = unit_scaled(rng, (4, 3), (1,), np.float64)
    once = g.copy()
    single = gc.adaptive_grad_clip_(once, p)
    assert single > 0
    assert gc.adaptive_grad_clip_((x for x in [g, g]), (w for w in [p, p])) == single
    assert_same_bits(g, once)


def test_nothing_written_when_nothing_clips(rng):
    g = np.full((3, 4), 1e-9)
    p = np.ones((3, 4))
    before = g.copy()
    assert gc.adaptive_grad_clip_(g, p) == 0
    assert_same_bits(g, before)


# --------------------------------------------------------------------------- errors


def _clippable():
    """A gradient/parameter pair that a call would clip (so a late error must come
    before any write)."""
    return np.full(3, 10.0), np.ones(3)  # 1-d: one unit whatever the axis


def _read_only(x):
    x.flags.writeable = False
    return x


ERRORS = [
    # (grads of the bad entry, params of the bad entry, kwargs, exception, fragments)
    ("shape", np.ones((2, 3)), np.ones((3, 2)), {}, ValueError,
     ["grads['bad'] has shape (2, 3)", "params['bad'] has shape (3, 2)"]),
    ("keys", {"x": np.ones(2)}, {"y": np.ones(2)}, {}, ValueError,
     ["grads['bad'] / params['bad']", "keys ['x']", "keys ['y']"]),
    ("length", [np.ones(2), np.ones(2)], [np.ones(2)], {}, ValueError,
     ["grads['bad'] / params['bad']", "a sequence of 2", "a list of 1"]),
    ("param_none", np.ones(2), None, {}, ValueError, ["grads['bad'] / params['bad']", "None"]),
    ("param_container", np.ones(2), [np.ones(2)], {}, ValueError, ["params['bad']", "a list of 1"]),
    ("param_int", np.ones(2), np.arange(2), {}, TypeError, ["params['bad'] has dtype int64"]),
    ("param_str", np.ones(2), "w", {}, TypeError, ["params['bad'] is a str"]),
    ("grad_int", np.arange(2), np.ones(2), {}, TypeError, ["grads['bad'] has dtype int64"]),
    ("grad_read_only", _read_only(np.ones(2)), np.ones(2), {}, ValueError,
     ["grads['bad'] is read-only", "adaptive_grad_clip_"]),
    ("axis_range", np.ones((2, 2)), np.ones((2, 2)), {"axis": 2}, ValueError,
     ["axis (2,) is out of range for grads['bad']", "2 dimensions"]),
    ("axis_twice", np.ones((2, 2)), np.ones((2, 2)), {"axis": (1, -1)}, ValueError,
     ["axis (1, -1) names an axis of grads['bad'] twice"]),
    ("axis_type", np.ones(2), np.ones(2), {"axis": 1.0}, TypeError,
     ["axis must be None, an int or a tuple of ints; got 1.0"]),
    ("clipping", np.ones(2), np.ones(2), {"clipping": -0.1}, ValueError,
     ["clipping must be >= 0", "-0.1"]),
    ("eps", np.ones(2), np.ones(2), {"eps": math.nan}, ValueError, ["eps must be >= 0", "nan"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "case, bad_grad, bad_param, kwargs, exc, fragments", ERRORS, ids=[e[0] for e in ERRORS]
)
def test_errors_name_the_leaf_and_write_nothing(case, bad_grad, bad_param, kwargs, exc, fragments):
    g, p = _clippable()
    frozen = Frozen(g)
    grads = {"ok": g, "bad": bad_grad}
    params = {"ok": p, "bad": bad_param}
    with raises_with(exc, *fragments):
        gc.adaptive_grad_clip_(grads, params, **kwargs)
    frozen.check()


def test_top_level_structure_mismatch():
    fragments = ["grads and params differ in structure at grads / params", "a list of 1"]
    with raises_with(ValueError, *fragments):
        gc.adaptive_grad_clip_({"w": np.ones(2)}, [np.ones(2)])
