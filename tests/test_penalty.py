"""norm_penalty (SPEC §5): the value and direction of λ·max(0, ‖g‖ − τ), checked against
PyTorch's double backward on a small MLP, plus the kink, non-finite norms, dtypes and
errors."""

import math

import numpy as np
import pytest
import torch

import gradclip as gc
from helpers import BFLOAT16, Frozen, assert_same_bits, dtype_id, random_values, raises_with
from reference import ref_norm, round_to, widen


def mlp_gradients(seed):
    """A 2-layer tanh MLP on random data, float64: parameters θ and g = ∇_θ L with a
    graph, so that g can be differentiated again."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    theta = [
        torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(8, 3, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True),
    ]
    w1, b1, w2, b2 = theta
    loss = ((torch.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2).mean()
    g = torch.autograd.grad(loss, theta, create_graph=True)
    return theta, g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau_fraction", [0.0, 0.5, 0.9])
def test_direction_backpropagates_to_autograd_of_the_penalty(seed, tau_fraction):
    """(a) autograd of λ·relu(‖g‖ − τ) with respect to θ equals (b) the vector-Jacobian
    product of g with gradclip's direction: d/dθ = (∂g/∂θ)ᵀ · d value/d g."""
    theta, g = mlp_gradients(seed)
    lam = 0.37
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    tau = tau_fraction * norm.item()
    penalty = lam * torch.relu(norm - tau)
    expected = torch.autograd.grad(penalty, theta, retain_graph=True)

    value, direction = gc.norm_penalty([gi.detach().numpy() for gi in g], tau, lam)
    assert value == pytest.approx(penalty.item(), rel=1e-13)
    assert value > 0
    got = torch.autograd.grad(g, theta, grad_outputs=[torch.from_numpy(d) for d in direction])
    for e, a in zip(expected, got):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def test_below_tau_the_direction_is_zero():
    theta, g = mlp_gradients(0)
    norm = math.sqrt(sum(float((gi.detach() ** 2).sum()) for gi in g))
    value, direction = gc.norm_penalty([gi.detach().numpy() for gi in g], 2 * norm, 5.0)
    assert value == 0.0
    for d, gi in zip(direction, g):
        assert d.shape == tuple(gi.shape) and d.dtype == np.float64 and not d.any()
    penalty = 5.0 * torch.relu(torch.sqrt(sum((gi**2).sum() for gi in g)) - 2 * norm)
    for e in torch.autograd.grad(penalty, theta):
        assert not e.any()


def test_value_and_direction_against_the_formula(rng):
    grads = {"w": rng.standard_normal((3, 4)), "skip": None, "b": [rng.standard_normal(5)]}
    leaves = [grads["w"], grads["b"][0]]
    frozen = Frozen(*leaves)
    norm = ref_norm(leaves)
    value, direction = gc.norm_penalty(grads, tau=0.5, lam=2.0)
    frozen.check()  # grads are read, never written
    assert value == pytest.approx(2.0 * (norm - 0.5), rel=1e-14)
    assert list(direction) == ["w", "skip", "b"] and direction["skip"] is None
    for d, x in zip([direction["w"], direction["b"][0]], leaves):
        assert d is not x
        np.testing.assert_allclose(d, 2.0 * x / norm, rtol=1e-14, atol=0)


def test_at_the_kink_and_at_zero_the_direction_is_zero():
    """‖g‖ == τ: the derivative from below (as relu'(0) = 0); g = 0 with τ = 0 too."""
    value, direction = gc.norm_penalty(np.array([3.0, 4.0]), tau=5.0, lam=1.0)
    assert value == 0.0 and not direction.any()
    value, direction = gc.norm_penalty([np.zeros(3)], tau=0.0, lam=1.0)
    assert value == 0.0 and not direction[0].any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_norm_gives_nan(bad):
    grads = [np.array([1.0, bad]), np.ones(2, dtype=np.float32)]
    value, direction = gc.norm_penalty(grads, 0.0, 1.0)
    assert math.isnan(value)
    assert all(np.isnan(d).all() for d in direction)
    assert direction[1].dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32, np.complex64], ids=dtype_id)
def test_direction_is_rounded_once_to_each_leaf_dtype(dtype, rng):
    x = random_values(50, dtype, rng)
    other = rng.standard_normal(7)
    norm = gc.grad_norm([x, other])
    _, direction = gc.norm_penalty([x, other], tau=0.1, lam=0.7)
    assert direction[0].dtype == np.dtype(dtype)
    assert_same_bits(direction[0], round_to(widen(x) * (0.7 / norm), dtype))


def test_numpy_scalar_and_repeated_leaves():
    x = np.array([3.0, 4.0])
    value, direction = gc.norm_penalty([x, np.float32(0.0), x], tau=0.0, lam=1.0)
    assert value == 5.0  # the repeated array counts once
    assert direction[1].shape == () and direction[1].dtype == np.float32
    assert_same_bits(direction[0], x * (1.0 / 5.0))  # one factor, as the clip functions scale
    assert direction[2] is direction[0]


@pytest.mark.parametrize(
    "kwargs, exc, fragments",
    [
        ({"tau": -1.0, "lam": 1.0}, ValueError, ["tau must be >= 0", "-1.0"]),
        ({"tau": 1.0, "lam": math.nan}, ValueError, ["lam must be >= 0", "nan"]),
        ({"tau": "1", "lam": 1.0}, TypeError, ["tau must be a real number"]),
    ],
)
def test_bad_arguments(kwargs, exc, fragments):
    with raises_with(exc, *fragments):
        gc.norm_penalty([np.ones(2)], **kwargs)


def test_bad_leaf_names_its_position():
    with raises_with(TypeError, "grads['b'] has dtype int64"):
        gc.norm_penalty({"a": np.ones(2), "b": np.arange(2)}, 0.0, 1.0)
