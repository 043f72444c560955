"""JAX interop (SPEC §2, §6): ``jax.Array`` leaves are read zero-copy, the out-of-place
functions return ``jax.Array`` pytrees equal to Optax's clipping, in-place functions
refuse them (immutable), and a training step with an Optax optimizer runs on them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip as gc
from gradclip import _dispatch
from helpers import assert_norm_close, assert_norms_close, assert_same_bits, raises_with, tree_leaves
from reference import BFLOAT16, ref_clamp, ref_clip_by_norm, ref_layer_norms, ref_norm

JAX_DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
jax_dtypes = pytest.mark.parametrize("dtype", JAX_DTYPES, ids=lambda d: np.dtype(d).name)


def flax_params(rng, dtype=jnp.float32, scale=1.0):
    """A Flax-style ``{'params': {module: {'kernel', 'bias'}}}`` tree of jax.Arrays."""
    shapes = {"Dense_0": ((5, 8), (8,)), "Dense_1": ((8, 3), (3,)), "LayerNorm_0": ((3,), (3,))}
    params = {}
    for name, (kernel, bias) in shapes.items():
        leaves = [jnp.asarray(rng.standard_normal(s) * scale, dtype=dtype) for s in (kernel, bias)]
        params[name] = dict(zip(("scale", "bias") if name.startswith("LayerNorm") else ("kernel", "bias"), leaves))
    return {"params": params}


def to_numpy(leaf):
    """An independent NumPy copy of a jax.Array."""
    return np.array(jax.device_get(leaf), copy=True)


def test_jax_leaf_is_viewed_zero_copy_and_read_only(rng):
    for dtype in JAX_DTYPES:
        x = jnp.asarray(rng.standard_normal((6, 7)), dtype=dtype)
        array = _dispatch.as_cpu_array(x, lambda: "grads")
        assert array.ctypes.data == x.unsafe_buffer_pointer()
        assert array.dtype == (BFLOAT16 if dtype == jnp.bfloat16 else np.dtype(dtype))
        assert not array.flags.writeable


@jax_dtypes
def test_norms_of_a_pytree(dtype, rng):
    params = flax_params(rng, dtype)
    leaves = [to_numpy(x) for x in tree_leaves(params)]
    for p in (1.0, 2.0, 3.0, math.inf):
        assert_norm_close(gc.grad_norm(params, p), ref_norm(leaves, p))
    assert_norms_close(gc.layer_norms(params), ref_layer_norms(leaves))


@jax_dtypes
def test_clip_grad_norm_returns_a_jax_pytree(dtype, rng):
    params = flax_params(rng, dtype, scale=3.0)
    before = [to_numpy(x) for x in tree_leaves(params)]
    clipped, total = gc.clip_grad_norm(params, max_norm=1.0)
    assert_norm_close(total, ref_norm(before))
    assert jax.tree_util.tree_structure(clipped) == jax.tree_util.tree_structure(params)
    for got, original, want in zip(tree_leaves(clipped), tree_leaves(params), ref_clip_by_norm(before, 1.0, total)):
        assert isinstance(got, jax.Array) and got.dtype == original.dtype and got.devices() == original.devices()
        assert_same_bits(to_numpy(got), want)
    for leaf, was in zip(tree_leaves(params), before):
        assert_same_bits(to_numpy(leaf), was, what="input (untouched)")


@pytest.mark.parametrize("max_norm", [0.5, 4.0, 1e3])
def test_clip_grad_norm_equals_optax_clip_by_global_norm(max_norm, rng):
    grads = flax_params(rng, scale=2.0)
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    ours, total = gc.clip_grad_norm(grads, max_norm, eps=0.0)  # optax divides by the norm itself
    assert float(optax.tree.norm(grads)) == pytest.approx(total, rel=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=3e-7, atol=0)  # 2 float32 ulps


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_clip_grad_value_equals_optax_clip(dtype, rng):
    grads = flax_params(rng, dtype, scale=2.0)
    ours = gc.clip_grad_value(grads, 1.5)
    theirs, _ = optax.clip(1.5).update(grads, optax.EmptyState())
    leaves = jax.tree_util.tree_leaves  # keys sorted, the same order for the three trees
    for got, want, original in zip(leaves(ours), leaves(theirs), leaves(grads)):
        assert isinstance(got, jax.Array) and got.dtype == dtype
        assert_same_bits(to_numpy(got), to_numpy(want))
        assert_same_bits(to_numpy(got), ref_clamp(to_numpy(original), 1.5))


@pytest.mark.parametrize(
    "call, twin",
    [
        (lambda g: gc.clip_grad_norm_(g, 0.1), "clip_grad_norm(...)"),
        (lambda g: gc.clip_grad_value_(g, 0.1), "clip_grad_value(...)"),
        (lambda g: gc.zero_nonfinite_(g), "pass a writable copy"),
    ],
    ids=["clip_grad_norm_", "clip_grad_value_", "zero_nonfinite_"],
)
def test_in_place_functions_refuse_jax_arrays(call, twin, rng):
    writable = rng.standard_normal(4)
    grads = {"np": writable, "params": flax_params(rng)["params"]}
    before = writable.copy()
    with raises_with(ValueError, "grads['params']['Dense_0']['kernel']", "JAX array", "immutable", twin):
        call(grads)
    assert_same_bits(writable, before, what="the NumPy leaf (untouched)")


def test_mixed_frameworks_come_back_in_their_own(rng):
    import torch

    grads = {"jax": jnp.ones(3), "torch": torch.ones(4, dtype=torch.bfloat16), "numpy": np.ones(2, np.float16)}
    clipped, total = gc.clip_grad_norm(grads, max_norm=1.0)
    assert total == 3.0
    assert isinstance(clipped["jax"], jax.Array) and clipped["jax"].dtype == jnp.float32
    assert isinstance(clipped["torch"], torch.Tensor) and clipped["torch"].dtype == torch.bfloat16
    assert isinstance(clipped["numpy"], np.ndarray) and clipped["numpy"].dtype == np.float16
    assert float(clipped["torch"][0]) == pytest.approx(1 / 3, rel=2**-8)


def test_inside_jit_the_message_says_to_call_outside(rng):
    @jax.jit
    def traced(grads):
        return gc.grad_norm(grads)

    with raises_with(TypeError, "grads['w']", "JAX tracer", "jax.jit", "outside"):
        traced({"w": jnp.ones(3)})


def _mlp(params, x):
    hidden = jnp.tanh(x @ params["params"]["Dense_0"]["kernel"] + params["params"]["Dense_0"]["bias"])
    return hidden @ params["params"]["Dense_1"]["kernel"] + params["params"]["Dense_1"]["bias"]


def test_a_training_step_with_an_optax_optimizer_follows_optax_clipping(rng):
    """gradclip outside jit between jax.grad and an Adam update, against the same Adam
    chained after optax.clip_by_global_norm. The two clipped gradients differ by float32
    rounding only (one ulp; Adam divides by the gradient's own scale, so an ulp stays an
    ulp); after 20 steps the parameters agree to 1e-5."""
    params = flax_params(rng)
    params["params"].pop("LayerNorm_0")
    x, y = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32), jnp.asarray(rng.standard_normal((32, 3)) * 20)
    grad_fn = jax.jit(jax.grad(lambda p: jnp.mean((_mlp(p, x) - y) ** 2)))
    adam = optax.adam(1e-2)
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    ours, theirs = params, params
    our_state, their_state = adam.init(ours), reference.init(theirs)
    clipped_steps = 0
    for _ in range(20):
        grads = grad_fn(ours)
        clipped, total = gc.clip_grad_norm(grads, max_norm=1.0, eps=0.0)
        clipped_steps += total > 1.0
        updates, our_state = adam.update(clipped, our_state, ours)
        ours = optax.apply_updates(ours, updates)
        updates, their_state = reference.update(grad_fn(theirs), their_state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    assert clipped_steps == 20
    for got, want, start in zip(tree_leaves(ours), tree_leaves(theirs), tree_leaves(params)):
        assert isinstance(got, jax.Array)
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=0, atol=1e-5)
        assert np.abs(to_numpy(got) - to_numpy(start)).max() > 1e-2  # training moved the parameters


@pytest.mark.parametrize("copy_result", [True, False])
def test_accumulated_jax_arrays_never_change(copy_result):
    acc = gc.GradAccumulator(2, copy_result=copy_result)
    windows = [[jnp.full(4096, float(v)), jnp.full(3, float(v), jnp.bfloat16)] for v in (1, 3, 10, 30)]
    first = acc.step(windows[0]) or acc.step(windows[1])
    second = acc.step(windows[2]) or acc.step(windows[3])
    assert all(isinstance(x, jax.Array) for x in first + second)
    assert [x.dtype for x in first] == [jnp.float32, jnp.float32]  # half precision accumulates in float32
    assert [float(x[0]) for x in first + second] == [2.0, 2.0, 20.0, 20.0]  # the first window's results kept
