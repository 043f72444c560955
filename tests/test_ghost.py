"""Ghost norms (gradclip.ghost, gradclip.torch.GhostClipping, examples/ghost_jax.py):
per-example squared gradient norms of dense and embedding layers against materialised
per-example gradients in float64, both dense routes, the materialised route, clip
factors against Optax, GhostClipping against torch.func and Opacus' ghost clipping, any
framework's arrays, determinism, and every error path.
"""

import copy
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numba
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradclip as gc
import gradclip.torch as gct
from gradclip import _ghost_cpu
from gradclip._kernels import ghost_cpu
from helpers import Frozen, assert_dense_close, dense_inputs, raises_with
from reference import BFLOAT16, ref_dense_sq_norms, ref_embedding_sq_norms, widen

RTOL = 1e-12

# (B, T, d_in, d_out); T None: no sequence axis. Past BLOCK (84) rows, features or
# positions the kernels tile; past KC (320) features (Gram) or positions (direct) they chunk.
DENSE_SHAPES = [
    (1, None, 5, 3),
    (7, None, 1, 1),
    (1, 1, 4, 6),
    (1, 9, 4, 6),
    (3, 5, 7, 4),
    (2, 50, 100, 97),
    (3, 130, 33, 52),
    (2, 49, 530, 5),
    (2, 600, 20, 50),
    (4, 17, 1, 1),
]
dense_shapes = pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
routes = pytest.mark.parametrize("gram", [True, False], ids=["gram", "direct"])


def route(a, g, bias, gram):
    """The kernels' route named, on 3-d inputs as `dense_sq_norms` hands them over."""
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    return ghost_cpu.dense_sq_norms(_ghost_cpu._kernel_view(a), _ghost_cpu._kernel_view(g), bias, gram)


# --------------------------------------------------------------------------- dense layers


@dense_shapes
@routes
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_dense_routes_match_materialised_gradients(rng, shape, gram, bias):
    a, g = dense_inputs(rng, shape)
    assert_dense_close(route(a, g, bias, gram), a, g, bias)


@dense_shapes
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_dense_sq_norms_public(rng, shape, bias):
    a, g = dense_inputs(rng, shape)
    frozen = Frozen(a, g)
    got = gc.dense_sq_norms(a, g, bias=bias)
    frozen.check()
    assert_dense_close(got, a, g, bias)


@pytest.mark.parametrize(
    "T, d_in, d_out, gram",
    [(256, 768, 768, True), (2048, 768, 768, False), (767, 768, 768, True), (768, 768, 768, False), (64, 16, 16, False)],
)
def test_dense_route_is_chosen_by_cost(monkeypatch, T, d_in, d_out, gram):
    """The Gram route while T (d_in + d_out) < 2 d_in d_out, else the direct one."""
    chosen = []
    monkeypatch.setattr(ghost_cpu, "dense_sq_norms", lambda a, g, bias, gram: chosen.append(gram) or np.zeros(1))
    gc.dense_sq_norms(np.zeros((1, T, d_in), np.float32), np.zeros((1, T, d_out), np.float32))
    assert chosen == [gram]


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float64], ids=lambda d: np.dtype(d).name)
@routes
def test_dense_dtypes(rng, dtype, gram):
    a, g = dense_inputs(rng, (3, 60, 20, 11), dtype)
    assert_dense_close(route(a, g, True, gram), a, g, True)
    a32 = a.astype(np.float32)  # mixed dtypes
    assert_dense_close(route(a32, g, True, gram), a32, g, True)


@routes
def test_dense_strided_inputs(rng, gram):
    base_a = rng.standard_normal((6, 11, 70)).astype(np.float32)
    base_g = rng.standard_normal((13, 3, 5, 9)).astype(np.float32)
    a = base_a[::2, ::-1, 3:60].transpose(0, 1, 2)  # (3, 11, 57): stepped, reversed
    g = base_g[:, 1, ::2, :].transpose(1, 0, 2)[:, :11][:3]  # (3, 11, 9): transposed
    g = np.broadcast_to(g[:, :1], (3, 11, 9)) if gram else g  # a zero stride, read only
    assert_dense_close(route(a, g, True, gram), a, g, True)


def test_dense_large_dynamic_range(rng):
    """Rows 1e-3 .. 1e3 apart: both routes agree with the reference to float64 rounding."""
    a, g = dense_inputs(rng, (2, 90, 30, 20))
    a *= 10.0 ** rng.uniform(-3, 3, (2, 90, 1)).astype(np.float32)
    for gram in (True, False):
        assert_dense_close(route(a, g, True, gram), a, g, True)


@routes
def test_dense_zero_gradient_is_zero_not_negative(rng, gram):
    """Σ (a_t·a_s)(g_t·g_s) of a gradient that cancels exactly: 0, never a rounding below it."""
    a, g = dense_inputs(rng, (2, 8, 6, 5))
    a[:, 4:] = a[:, :4]
    g[:, 4:] = -g[:, :4]  # G^T A = 0 and Σ_t g_t = 0
    got = route(a, g, True, gram)
    assert np.all(got >= 0) and np.all(got < 1e-9)


@routes
def test_dense_nonfinite_stays_in_its_example(rng, gram):
    a, g = dense_inputs(rng, (4, 60, 7, 9))
    a[1, 3, 2] = np.nan
    g[2, 5, 0] = np.inf
    got = route(a, g, False, gram)
    assert math.isnan(got[1]) and not np.isfinite(got[2])
    assert_dense_close(got[[0, 3]], a[[0, 3]], g[[0, 3]], False)


@pytest.mark.parametrize(
    "a_shape, g_shape, bias, expected",
    [
        ((0, 5, 3), (0, 5, 2), True, 0),
        ((2, 0, 3), (2, 0, 2), True, 2),
        ((2, 3, 4), (2, 3, 0), True, 2),
        ((2, 3, 0), (2, 3, 4), False, 2),
        ((2, 0), (2, 3), True, 2),
    ],
)
def test_dense_empty_axes(rng, a_shape, g_shape, bias, expected):
    a = rng.standard_normal(a_shape).astype(np.float32)
    g = rng.standard_normal(g_shape).astype(np.float32)
    got = gc.dense_sq_norms(a, g, bias=bias)
    assert got.shape == (expected,)
    np.testing.assert_array_equal(got, ref_dense_sq_norms(a, g, bias))


@routes
def test_dense_deterministic_for_any_thread_count(rng, gram):
    a, g = dense_inputs(rng, (5, 100, 60, 70))
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = route(a, g, True, gram)
        numba.set_num_threads(threads)
        many = route(a, g, True, gram)
    finally:
        numba.set_num_threads(threads)
    assert one.tobytes() == many.tobytes() == route(a, g, True, gram).tobytes()


@pytest.mark.parametrize("B, m, threads", [(32, 4, 2), (1, 4, 2), (5, 3, 2), (7, 5, 4), (3, 2, 8)])
def test_gram_items_are_dealt_by_cost(B, m, threads):
    """Every Gram-route item has one worker, and no worker's tiles exceed another's by more
    than the largest item (row block tb makes m - tb tiles, the first a triangle)."""
    owner = ghost_cpu._gram_owners(B, m, threads)
    cost = np.tile(m - np.arange(m) - 0.5, B)
    assert owner.shape == (B * m,) and set(owner.tolist()) <= set(range(threads))
    load = np.bincount(owner, weights=cost, minlength=threads)
    assert load.sum() == cost.sum()
    assert load.max() - load.min() <= cost.max()
    if (B, m, threads) in ((32, 4, 2), (1, 4, 2)):  # round-robin gave 5 : 3
        assert load[0] == load[1]


def test_dense_any_framework(rng):
    a, g = dense_inputs(rng, (3, 10, 6, 4))
    tensors = torch.from_numpy(a).requires_grad_(), torch.from_numpy(g)
    for pair in (tensors, (jnp.asarray(a), jnp.asarray(g))):
        assert_dense_close(gc.dense_sq_norms(*pair, bias=True), a, g, True)
    bf16 = torch.from_numpy(a).to(torch.bfloat16), torch.from_numpy(g).to(torch.bfloat16)
    assert_dense_close(gc.dense_sq_norms(*bf16, bias=True), *[t.float().numpy() for t in bf16], True)


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize(
    "B, T, vocab, d",
    [(1, 1, 3, 4), (1, 40, 5, 7), (4, 30, 3, 16), (3, 200, 1000, 9), (2, 17, 1, 3), (5, None, 4, 6)],
)
def test_embedding_matches_materialised_gradients(rng, B, T, vocab, d):
    """Repeated indices in every example (few distinct values), one index for all, B = 1."""
    lead = (B,) if T is None else (B, T)
    idx = rng.integers(0, vocab, lead)
    g = rng.standard_normal((*lead, d)).astype(np.float32)
    frozen = Frozen(idx, g)
    got = gc.embedding_sq_norms(idx, g)
    frozen.check()
    assert got.dtype == np.float64 and got.shape == (B,)
    np.testing.assert_allclose(got, ref_embedding_sq_norms(idx, g), rtol=RTOL, atol=0)


def test_embedding_indices_any_integers_and_layouts(rng):
    idx = rng.integers(-3, 3, (6, 40)).astype(np.int32)[::2, ::-1]  # negative, strided, int32
    g = rng.standard_normal((40, 3, 5)).astype(np.float16).transpose(1, 0, 2)  # (3, 40, 5)
    shifted = idx - idx.min()
    np.testing.assert_allclose(gc.embedding_sq_norms(idx, g), ref_embedding_sq_norms(shifted, g), rtol=RTOL)
    t_idx, t_g = torch.from_numpy(shifted.copy()), torch.from_numpy(g.astype(np.float32))
    np.testing.assert_allclose(gc.embedding_sq_norms(t_idx, t_g), ref_embedding_sq_norms(shifted, g), rtol=RTOL)


def test_embedding_equals_pairwise_sum(rng):
    """Σ_{t,s: idx_t = idx_s} g_t·g_s, the issue's formula, summed pair by pair."""
    idx = rng.integers(0, 4, (2, 12))
    g = rng.standard_normal((2, 12, 3))
    expected = [
        math.fsum(float(g[i, t] @ g[i, s]) for t in range(12) for s in range(12) if idx[i, t] == idx[i, s])
        for i in range(2)
    ]
    np.testing.assert_allclose(gc.embedding_sq_norms(idx, g), expected, rtol=RTOL)


def test_embedding_deterministic_for_any_thread_count(rng):
    idx = rng.integers(0, 50, (6, 300))
    g = rng.standard_normal((6, 300, 33)).astype(np.float32)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = gc.embedding_sq_norms(idx, g)
    finally:
        numba.set_num_threads(threads)
    assert one.tobytes() == gc.embedding_sq_norms(idx, g).tobytes()


def test_embedding_empty(rng):
    assert gc.embedding_sq_norms(np.zeros((0, 3), np.int64), np.zeros((0, 3, 2))).shape == (0,)
    np.testing.assert_array_equal(gc.embedding_sq_norms(np.zeros((2, 0), np.int64), np.zeros((2, 0, 2))), [0.0, 0.0])


# --------------------------------------------------------------------------- materialised route


def test_sq_norms_from_per_example(rng):
    w = rng.standard_normal((4, 3, 5)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float16)
    c = (rng.standard_normal((4, 2)) + 1j * rng.standard_normal((4, 2))).astype(np.complex64)
    strided = rng.standard_normal((6, 4)).T[:, ::2]  # (4, 3), not contiguous
    grads = {"w": w, "layers": [b, None, c], "t": strided, "again": w}
    frozen = Frozen(w, b, c, strided)
    got = gc.sq_norms_from_per_example(grads)
    frozen.check()
    expected = [
        math.fsum(np.concatenate([np.abs(widen(x[i])).ravel() ** 2 for x in (w, b, c, strided)]))
        for i in range(4)
    ]  # w given twice counts once
    np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_sq_norms_from_per_example_frameworks(rng):
    w = rng.standard_normal((3, 4)).astype(np.float32)
    expected = (w.astype(np.float64) ** 2).sum(axis=1)
    for leaf in (torch.from_numpy(w), jnp.asarray(w), w[:, None, :]):
        np.testing.assert_allclose(gc.sq_norms_from_per_example([leaf]), expected, rtol=RTOL)


def test_clip_factors_reproduce_optax_per_example_clip(rng):
    """Σ_i f_i g_i with eps = 0 is optax.per_example_global_norm_clip's sum."""
    grads = [rng.standard_normal((6, 3, 2)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)]
    grads[0][2] *= 100.0
    factors = gc.clip_factors(gc.sq_norms_from_per_example(grads), max_norm=1.5, eps=0.0)
    summed, clipped = optax.per_example_global_norm_clip([jnp.asarray(x) for x in grads], 1.5)
    for leaf, expected in zip(grads, summed):
        got = np.tensordot(factors, leaf.astype(np.float64), axes=1)
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert int(clipped) == int((factors < 1).sum())


def test_clip_factors_values():
    sq = np.array([16.0, 0.25, 0.0, np.nan, np.inf, 1.0])
    np.testing.assert_array_equal(gc.clip_factors(sq, 1.0, eps=0.0), [0.25, 1.0, 1.0, 0.0, 0.0, 1.0])
    got = gc.clip_factors(torch.tensor(sq), 2.0)
    expected = np.minimum(1.0, 2.0 / (np.sqrt(sq) + 1e-6))
    np.testing.assert_array_equal(got[:3], expected[:3])
    np.testing.assert_array_equal(gc.clip_factors(sq[:3], math.inf), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(gc.clip_factors(np.zeros(2), 0.0, eps=0.0), [1.0, 1.0])
    assert gc.clip_factors(np.array([4, 9]), 1.0, eps=0.0).tolist() == [0.5, 1 / 3]


# --------------------------------------------------------------------------- errors


class CudaStub:
    """Looks like a CUDA array to gradclip's dispatch (only the interface's presence counts)."""

    __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (0, False), "version": 3}


@pytest.mark.parametrize(
    "call, error, fragments",
    [
        (lambda a, g: gc.dense_sq_norms(a, g[:, :, :2][:1]), ValueError, ["activations has shape (2, 3, 4)", "(1, 3, 2)"]),
        (lambda a, g: gc.dense_sq_norms(a[0, 0], g[0, 0]), ValueError, ["(B, d_in)", "has shape (4,)"]),
        (lambda a, g: gc.dense_sq_norms(a[:, :2], g), ValueError, ["same batch (and sequence) axes"]),
        (lambda a, g: gc.dense_sq_norms(a.astype(np.int32), g), TypeError, ["activations has dtype int32", "float32"]),
        (lambda a, g: gc.dense_sq_norms(a, g.astype(np.complex64)), TypeError, ["output_grads has dtype complex64"]),
        (lambda a, g: gc.dense_sq_norms(a, g.astype(">f4")), TypeError, ["native byte order"]),
        (lambda a, g: gc.dense_sq_norms(a, [1.0]), TypeError, ["output_grads is a list"]),
        (lambda a, g: gc.dense_sq_norms(CudaStub(), g), ValueError, ["output_grads is a CPU array but activations a CUDA array", "dense_sq_norms reads its inputs on one device"]),
        (lambda a, g: gc.embedding_sq_norms(np.zeros((2, 3)), g), TypeError, ["indices has dtype float64", "integer"]),
        (lambda a, g: gc.embedding_sq_norms(np.zeros((2, 4), np.int64), g), ValueError, ["indices has shape (2, 4)", "(B, T, d)"]),
        (lambda a, g: gc.embedding_sq_norms(np.zeros((2, 3), np.int64), g.astype(np.int16)), TypeError, ["output_grads has dtype int16"]),
        (lambda a, g: gc.embedding_sq_norms(np.zeros((2, 3), np.int64), CudaStub()), ValueError, ["indices is a CPU array but output_grads a CUDA array", "embedding_sq_norms reads"]),
        (lambda a, g: gc.sq_norms_from_per_example({"w": a, "b": np.float32(1)}), ValueError, ["grads['b'] is 0-d"]),
        (lambda a, g: gc.sq_norms_from_per_example([a, g[:1]]), ValueError, ["grads[1] has 1 examples", "first leaf has 2"]),
        (lambda a, g: gc.sq_norms_from_per_example([a, a.astype(np.int8)]), TypeError, ["grads[1] has dtype int8"]),
        (lambda a, g: gc.sq_norms_from_per_example([None]), ValueError, ["grads holds no arrays"]),
        (lambda a, g: gc.sq_norms_from_per_example([a, None, CudaStub()]), ValueError, ["grads[0] is a CPU array but grads[2] a CUDA array", "sq_norms_from_per_example reads"]),
        (lambda a, g: gc.clip_factors(np.ones((2, 2)), 1.0), ValueError, ["sq_norms has shape (2, 2)", "1-d"]),
        (lambda a, g: gc.clip_factors(np.array([1.0, -0.5]), 1.0), ValueError, ["sq_norms[1] is -0.5", ">= 0"]),
        (lambda a, g: gc.clip_factors(np.ones(2), -1.0), ValueError, ["max_norm must be >= 0"]),
        (lambda a, g: gc.clip_factors(np.ones(2), 1.0, eps=math.nan), ValueError, ["eps must be >= 0"]),
        (lambda a, g: gc.clip_factors(np.ones(2, np.complex64), 1.0), ValueError, ["dtype complex64"]),
    ],
)
def test_errors(rng, call, error, fragments):
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    g = rng.standard_normal((2, 3, 5)).astype(np.float32)
    frozen = Frozen(a, g)
    with raises_with(error, *fragments):
        call(a, g)
    frozen.check()


# --------------------------------------------------------------------------- gradclip.torch.GhostClipping

class TokenNet(nn.Module):
    """Embedding -> Linear -> tanh -> LayerNorm -> mean over the sequence -> Linear: ghost
    norms for the embedding and both linears (with and without a sequence axis), the
    materialised route for the layer norm; ``shared`` runs one Linear twice."""

    def __init__(self, vocab=23, d=8, h=16, classes=3, padding_idx=None, shared=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.fc1 = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, classes)
        self.shared = nn.Linear(h, h) if shared else None

    def forward(self, idx):
        x = self.norm(torch.tanh(self.fc1(self.emb(idx))))
        if self.shared is not None:
            x = self.shared(torch.tanh(self.shared(x)))
        return self.fc2(x.mean(dim=1))


def token_batch(rng, B=6, T=7, vocab=23, classes=3):
    idx = torch.from_numpy(rng.integers(0, vocab, (B, T)))
    idx[:, 3] = idx[:, 1]  # repeated indices in every example
    return idx, torch.from_numpy(rng.integers(0, classes, B))


def per_example_reference(model, idx, y):
    """Each example's gradient of its own loss, by torch.func over the whole model."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p, idx_i, y_i):
        return F.cross_entropy(torch.func.functional_call(model, p, (idx_i[None],)), y_i[None])

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, idx, y)


def ghost_step(model, idx, y, max_norm):
    ghost = gct.GhostClipping(model, max_norm)
    losses = F.cross_entropy(model(idx), y, reduction="none")
    factors = ghost.factors(losses)
    (factors * losses).sum().backward()
    return ghost, factors


@pytest.mark.parametrize(
    "options", [{}, {"padding_idx": 2}, {"shared": True}], ids=["plain", "padding_idx", "shared_layer"]
)
def test_ghost_clipping_matches_per_example_gradients_in_float64(rng, options):
    torch.manual_seed(0)
    model = TokenNet(**options).double()
    idx, y = token_batch(rng)
    idx[0, :3] = 2  # padding positions (when there is a padding index)
    per_example = per_example_reference(model, idx, y)
    sq = sum((g.reshape(len(y), -1) ** 2).sum(dim=1) for g in per_example.values()).numpy()
    max_norm = float(np.median(np.sqrt(sq)))
    ghost, factors = ghost_step(model, idx, y, max_norm)
    np.testing.assert_allclose(ghost.norms.numpy(), np.sqrt(sq), rtol=1e-10)
    expected = np.minimum(1.0, max_norm / (np.sqrt(sq) + 1e-6))
    np.testing.assert_allclose(factors.numpy(), expected, rtol=1e-10)
    assert (expected < 1).any() and (expected == 1).any()
    for name, p in model.named_parameters():
        clipped_sum = torch.tensordot(torch.from_numpy(expected), per_example[name], dims=1)
        np.testing.assert_allclose(p.grad.numpy(), clipped_sum.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # Opacus' hooks on the embedding
def test_ghost_clipping_matches_opacus(rng):
    """Opacus' grad_sample_mode="ghost" on the same model and batch: per-example norms to
    float32 rounding, and the clipped, summed gradient after the second backward."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    torch.manual_seed(1)
    model = TokenNet()
    theirs = copy.deepcopy(model)
    idx, y = token_batch(rng, B=8, T=9)
    probe_model = copy.deepcopy(model)
    probe = gct.GhostClipping(probe_model, 1.0)
    probe.factors(F.cross_entropy(probe_model(idx), y, reduction="none"))
    max_norm = float(probe.norms.median())

    ghost, factors = ghost_step(model, idx, y, max_norm)

    wrapped = GradSampleModuleFastGradientClipping(
        theirs, max_grad_norm=max_norm, use_ghost_clipping=True, loss_reduction="sum"
    )
    losses = F.cross_entropy(wrapped(idx), y, reduction="none")
    losses.sum().backward(retain_graph=True)
    coef = wrapped.get_clipping_coef()
    for p in theirs.parameters():
        p.grad = None
    wrapped.disable_hooks()
    (coef * losses).sum().backward()

    np.testing.assert_allclose(ghost.norms.numpy(), wrapped.per_sample_gradient_norms.double().numpy(), rtol=2e-6)
    np.testing.assert_allclose(factors.numpy(), coef.numpy(), rtol=2e-6)
    assert (coef < 1).any() and (coef == 1).any()
    for (name, mine), other in zip(model.named_parameters(), theirs.parameters()):
        np.testing.assert_allclose(mine.grad.numpy(), other.grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


def test_ghost_clipping_frozen_weight_and_no_sequence_axis(rng):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].weight.requires_grad_(False)  # its bias alone is trained
    x, y = torch.from_numpy(rng.standard_normal((5, 5))), torch.from_numpy(rng.integers(0, 3, 5))
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    per_example = torch.func.vmap(
        torch.func.grad(lambda p, x_i, y_i: F.cross_entropy(torch.func.functional_call(model, p, (x_i[None],)), y_i[None])),
        in_dims=(None, 0, 0),
    )(params, x, y)
    sq = sum((g.reshape(5, -1) ** 2).sum(dim=1) for g in per_example.values())
    ghost = gct.GhostClipping(model, 0.1)
    ghost.factors(F.cross_entropy(model(x), y, reduction="none"))
    np.testing.assert_allclose(ghost.norms.numpy(), sq.sqrt().numpy(), rtol=1e-10)


def test_ghost_clipping_errors_leave_the_recording(rng):
    model = TokenNet()
    idx, y = token_batch(rng)
    ghost = gct.GhostClipping(model, 1.0)
    with raises_with(RuntimeError, "no forward pass was recorded"):
        ghost.factors(torch.zeros(6, requires_grad=True))
    losses = F.cross_entropy(model(idx), y, reduction="none")
    for bad, fragment in [
        (losses.sum(), "1-d tensor"),
        (losses.detach(), "requires_grad=False"),
        (np.zeros(6), "got ndarray"),
    ]:
        with raises_with(ValueError, fragment):
            ghost.factors(bad)
    with raises_with(ValueError, "model.emb got an input of shape (6, 7)", "losses has 4 examples"):
        ghost.factors(losses[:4])
    factors = ghost.factors(losses)  # the recording survived the refused calls
    assert factors.shape == (6,)
    with raises_with(RuntimeError, "no forward pass was recorded"):
        ghost.factors(losses)  # a recording is used once
    ghost.remove()
    model(idx)
    with raises_with(RuntimeError, "no forward pass was recorded"):
        ghost.factors(F.cross_entropy(model(idx), y, reduction="none"))


def test_ghost_clipping_refuses_models_it_cannot_measure(rng):
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with raises_with(ValueError, "model.1.weight belongs to both model.0 and model.1", "untie"):
        gct.GhostClipping(tied, 1.0)
    with raises_with(NotImplementedError, "model.1 (BatchNorm1d)", "mixes examples"):
        gct.GhostClipping(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), 1.0)
    with raises_with(NotImplementedError, "model (Embedding)", "index counts"):
        gct.GhostClipping(nn.Embedding(5, 2, scale_grad_by_freq=True), 1.0)
    with raises_with(TypeError, "takes a torch.nn.Module"):
        gct.GhostClipping([nn.Linear(2, 2)], 1.0)
    with raises_with(ValueError, "max_norm must be >= 0"):
        gct.GhostClipping(nn.Linear(2, 2), -1.0)

    inplace = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    ghost = gct.GhostClipping(inplace, 1.0)
    with raises_with(RuntimeError, "output of model.0 was modified in place"):
        ghost.factors(inplace(torch.ones(2, 3)).sum(dim=1))

    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    gct.GhostClipping(attention.out_proj, 1.0)  # a Linear subclass that keeps Linear's forward: a ghost norm
    ghost = gct.GhostClipping(attention, 1.0)
    x = torch.ones(2, 3, 4)
    with raises_with(NotImplementedError, "model returned tuple", "one tensor"):
        attention(x, x, x)
    ghost.remove()

    spare = nn.ModuleDict({"used": nn.Linear(3, 1), "spare": nn.Linear(3, 1)})
    ghost = gct.GhostClipping(spare, 1.0)
    with raises_with(RuntimeError, "model.spare (Linear) has trainable parameters but its forward did not run"):
        ghost.factors(spare["used"](torch.ones(2, 3)).sum(dim=1))


def test_jax_example_matches_per_example_gradients():
    """examples/ghost_jax.py: ghost norms and the clipped sum equal jax.vmap(jax.grad)'s
    (it asserts 1e-12), and DP-SGD steps lower the loss."""
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "ghost_jax.py")
    proc = subprocess.run([sys.executable, "-W", "error", example], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = proc.stdout.splitlines()[-1].split(": mean loss ")[1].split(" -> ")
    assert float(last) < float(first)


def test_ghost_clipping_gives_clipped_sum_and_its_noise(rng):
    """The second backward's gradients equal SPEC §9's clipped_sum of the materialised
    per-example gradients (same factors, same norms), and add_noise_ on them equals
    clipped_sum's noise drawn from the same stream."""
    torch.manual_seed(3)
    model = TokenNet().double()
    idx, y = token_batch(rng)
    per_example = per_example_reference(model, idx, y)
    max_norm = 0.5
    total, stats = gc.clipped_sum(dict(per_example), max_norm)
    ghost, _ = ghost_step(model, idx, y, max_norm)
    np.testing.assert_allclose(ghost.norms.numpy(), stats.norms, rtol=1e-10)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), total[name].numpy(), rtol=1e-9, atol=1e-12, err_msg=name)

    noisy, _ = gc.clipped_sum(dict(per_example), max_norm, noise_multiplier=1.3, noise=gc.GaussianNoise(7))
    grads = {name: p.grad for name, p in model.named_parameters()}
    gc.add_noise_(grads, 1.3 * max_norm, gc.GaussianNoise(7))
    for name in grads:
        np.testing.assert_allclose(grads[name].numpy(), noisy[name].numpy(), rtol=1e-9, atol=1e-9, err_msg=name)
