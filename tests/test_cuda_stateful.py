"""The stateful tools on GPU leaves, on numba-cuda's simulator (see test_cuda.py).

Each tool runs on device arrays and, side by side, on the same values in host memory:
results must agree bit for bit where the CPU rounds once (the norms themselves within
1e-12 of tests/reference.py). Inputs are small: the simulator runs kernels as Python.
"""

import math
import pickle

import numpy as np
import pytest

import gradclip as gc
from helpers import (
    ForeignArray,
    assert_norm_close,
    assert_norms_close,
    assert_same_bits,
    device_view,
    raises_with,
    to_device,
    to_host,
)
from reference import BFLOAT16, ref_layer_norms, ref_norm, ref_scale, round_to, widen

cuda = pytest.importorskip("numba.cuda")  # installed by the test extra: never skipped in CI

from gradclip import _cuda  # noqa: E402

pytestmark = pytest.mark.usefixtures("small_kernels")


@pytest.fixture
def allocations(monkeypatch):
    """Device allocations (``cuda.device_array`` / ``to_device`` calls), counted."""
    counted = []
    for name in ("device_array", "to_device", "device_array_like"):
        original = getattr(cuda, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            counted.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cuda, name, counting)
    return counted


host = to_host


def on_device(tree):
    """``tree`` with every host array copied to the device, in the same layout: the array
    it views is copied, and the device view has the same offset and strides."""
    if isinstance(tree, dict):
        return {k: on_device(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_device(v) for v in tree)
    if tree is None:
        return None
    root = tree
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert root.flags.c_contiguous or root.flags.f_contiguous
    return device_view(to_device(root), root, tree)


def micro_batches(rng, dtype, count, transposed=False):
    """``count`` micro-batches: a (3, 5) matrix (transposed views if asked), a stepped 1-d
    slice of 13, a 0-d leaf and an empty one, in a dict with a None leaf."""
    batches = []
    for _ in range(count):
        w = (rng.standard_normal((5, 3)).T if transposed else rng.standard_normal((3, 5))).astype(dtype)
        batches.append({"w": w, "b": [rng.standard_normal(26).astype(dtype)[::2], None], "s": np.array(1.5, dtype), "e": np.zeros(0, dtype)})
    return batches


def host_tree(tree):
    if isinstance(tree, dict):
        return {k: host_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_tree(v) for v in tree)
    return None if tree is None else host(tree)


def assert_same_tree(actual, expected):
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for k in expected:
            assert_same_tree(actual[k], expected[k])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_tree(a, e)
    elif expected is None:
        assert actual is None
    else:
        assert_same_bits(host(actual), expected)


def run_both(batches, **config):
    """Step a CPU and a GPU accumulator through ``batches``; each step's results (host)."""
    cpu, gpu = gc.GradAccumulator(**config), gc.GradAccumulator(**config)
    results = []
    for batch in batches:
        expected, actual = cpu.step(batch), gpu.step(on_device(batch))
        assert (expected is None) == (actual is None)
        if expected is not None:
            assert_same_tree(actual, expected)
            results.append(expected)
    assert (gpu.current_step, gpu.skipped) == (cpu.current_step, cpu.skipped)
    return cpu, gpu, results


# ------------------------------------------------------------------ GradAccumulator


@pytest.mark.parametrize(
    "dtype, accumulator, average",
    [
        (np.float32, None, True),
        (np.float16, None, False),  # into float32 buffers
        (BFLOAT16, None, True),
        (np.complex64, np.complex128, True),
        (np.float32, np.float16, False),  # rounded to half after every add
    ],
    ids=["f32-mean", "f16-sum", "bf16-mean", "c64-into-c128", "f32-into-f16"],
)
def test_accumulator_windows_match_the_cpu(rng, dtype, accumulator, average):
    batches = micro_batches(rng, np.dtype(dtype), 5)
    _, gpu, results = run_both(batches, accum_steps=2, average=average, accumulator_dtype=accumulator)
    assert len(results) == 2 and gpu.current_step == 1
    # the first window against the reference: round(round(g1) + g2), times 1/2 if average
    acc = np.dtype(accumulator or (np.float32 if np.dtype(dtype).name in ("float16", "bfloat16") else dtype))
    g1, g2 = batches[0]["w"], batches[1]["w"]
    total = round_to(widen(round_to(widen(g1), acc)) + widen(g2), acc)
    assert_same_bits(results[0]["w"], ref_scale(total, 0.5) if average else total)


def test_accumulator_reads_a_layout_other_than_the_windows(rng):
    """The window follows the first micro-batch's memory order; a transposed later one is
    walked in that order (negative and permuted steps in the plan)."""
    batches = micro_batches(rng, np.dtype(np.float32), 4)
    batches[1]["w"] = np.asfortranarray(batches[1]["w"])
    batches[2]["w"] = batches[2]["w"][::-1, ::-1].copy()[::-1, ::-1]
    batches[3]["b"][0] = batches[3]["b"][0][::-1].copy()[::-1]
    run_both(batches, accum_steps=2, average=True)


@pytest.mark.parametrize("copy_result", [True, False])
def test_accumulator_allocates_nothing_per_micro_batch(rng, allocations, copy_result):
    batches = micro_batches(rng, np.dtype(np.float32), 6)
    device = [on_device(b) for b in batches]
    acc = gc.GradAccumulator(2, copy_result=copy_result, skip_nonfinite=True)
    acc.step(device[0])
    assert allocations, "the first micro-batch allocates the buffers"
    first = acc.step(device[1])
    allocations.clear()
    for batch in device[2:5]:
        acc.step(batch)
    result = acc.step(device[5])
    if copy_result:
        assert set(allocations) == {"device_array"}  # the new result arrays only
        assert host(result["w"]) is not host(first["w"])
    else:
        assert allocations == []
        assert _cuda._interface(result["w"])["data"][0] == _cuda._interface(first["w"])["data"][0]  # the same buffer
    expected = ref_scale(round_to(widen(batches[4]["w"]) + widen(batches[5]["w"]), np.float32), 0.5)
    assert_same_bits(host(result["w"]), expected)


def test_accumulator_skips_nonfinite_micro_batches(rng):
    batches = micro_batches(rng, np.dtype(np.float16), 5)
    batches[1]["b"][0][3] = np.nan
    batches[3]["w"][0, 0] = np.inf
    cpu, gpu, results = run_both(batches, accum_steps=2, skip_nonfinite=True)
    assert gpu.skipped == 2 and len(results) == 1 and gpu.current_step == 1


def test_accumulator_mismatch_mid_window_changes_nothing(rng):
    batches = micro_batches(rng, np.dtype(np.float32), 3)
    acc = gc.GradAccumulator(3)
    acc.step(on_device(batches[0]))
    before = acc.state_dict()
    bad_shape = on_device(batches[1]) | {"w": cuda.to_device(np.ones((5, 3), np.float32))}
    bad_dtype = on_device(batches[1]) | {"s": cuda.to_device(np.array(1.0))}
    with raises_with(ValueError, "grads['w']", "shape", "(3, 5)", "(5, 3)"):
        acc.step(bad_shape)
    with raises_with(ValueError, "grads['s']", "dtype", "float32", "float64"):
        acc.step(bad_dtype)
    with raises_with(ValueError, "device", "expected CUDA arrays, got CPU arrays"):
        acc.step(batches[1])
    with raises_with(ValueError, "GradAccumulator.step", "grads['b'][0] is a CPU array", "grads['w'] a CUDA array"):
        acc.step(on_device(batches[1]) | {"b": [batches[1]["b"][0], None]})
    after = acc.state_dict()
    assert after["current_step"] == before["current_step"] == 1
    for a, b in zip(after["buffers"], before["buffers"]):
        assert_same_bits(a, b)
    _, _, results = run_both(batches, accum_steps=3)
    acc.step(on_device(batches[1]))
    assert_same_tree(acc.step(on_device(batches[2])), results[0])


@pytest.mark.parametrize("resume_on", ["gpu", "cpu"])
def test_accumulator_state_dict_round_trip(rng, resume_on):
    batches = micro_batches(rng, BFLOAT16, 3)
    reference = gc.GradAccumulator(3, accumulator_dtype=BFLOAT16)
    for batch in batches[:-1]:
        reference.step(on_device(batch))
    state = pickle.loads(pickle.dumps(reference.state_dict()))
    assert all(isinstance(b, np.ndarray) and b.dtype == BFLOAT16 for b in state["buffers"] if b is not None)
    resumed = gc.GradAccumulator(1)
    resumed.load_state_dict(state)
    expected = reference.step(on_device(batches[-1]))
    if resume_on == "gpu":
        assert_same_tree(resumed.step(on_device(batches[-1])), host_tree(expected))
    else:
        for a, e in zip(gc._tree.flatten(resumed.step(batches[-1]))[0], gc._tree.flatten(expected)[0]):
            assert_same_bits(a, host(e))


# -------------------------------------------------------------------- the clippers

# Leaves whose norms are exact (integers: 13 * s), so the CPU and the GPU see the same
# norms, bit for bit, and every statistic must agree exactly.
SCALES = [1.0, 2.0, 1.0, 3.0, 2.0, 40.0, math.nan, 2.0, 1.0]


def exact_leaves(s):
    w = np.array([[3.0, 4.0, 0.0]], np.float32) * s
    return [w.T, np.array([12.0]) * s]  # a transposed float32 leaf and a float64 one


@pytest.mark.parametrize(
    "make",
    [
        lambda: gc.EMAClipper(alpha=1.5, beta=0.5, warmup=2),
        lambda: gc.QuantileClipper(quantile=0.5, history=4),
        lambda: gc.ZScoreClipper(alpha=0.5, z_thresh=1.5, warmup=3, max_norm=30.0),
    ],
    ids=["ema", "quantile", "zscore"],
)
def test_clippers_match_the_cpu(make):
    cpu, gpu = make(), make()
    clipped_any = False
    for s in SCALES:
        host_leaves = exact_leaves(s)
        device_leaves = on_device(host_leaves)
        expected, stats = cpu(host_leaves), gpu(device_leaves)
        assert type(stats.norm) is float
        assert stats == expected or (math.isnan(s) and not stats.finite and not expected.finite)
        for a, e in zip(device_leaves, host_leaves):
            assert_same_bits(host(a), e)
        clipped_any |= stats.clipped
    assert clipped_any, "the spike is clipped"
    assert gpu.state_dict() == cpu.state_dict()


def test_clipper_norm_is_read_within_the_reference(rng):
    leaves = [rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(13)]
    stats = gc.QuantileClipper()(on_device(leaves))
    assert_norm_close(stats.norm, ref_norm(leaves))


def test_clipper_refuses_a_read_only_leaf_before_touching_anything(rng):
    leaf = rng.standard_normal(6).astype(np.float32)
    clip = gc.EMAClipper(warmup=1)
    readonly = ForeignArray(cuda.to_device(leaf), readonly=True)
    with raises_with(ValueError, "grads[1]", "read-only"):
        clip([on_device(leaf), readonly])
    assert clip.state_dict()["steps"] == 0


# --------------------------------------------------------------------------- AGC


def agc_leaves(rng):
    grads = {
        "w": rng.standard_normal((40, 3)).astype(np.float32),  # 40 units
        "t": rng.standard_normal((3, 5)).astype(np.float32).T,
        "b": rng.standard_normal(6).astype(np.float32),
        "s": np.array(0.5, np.float32),
    }
    params = {k: (v * rng.uniform(0.5, 30.0, v.shape)).astype(np.float32) for k, v in grads.items()}
    return grads, params


@pytest.mark.parametrize("axis", [None, 0])
def test_agc_matches_the_cpu_in_one_launch_a_pass(rng, launches, axis):
    grads, params = agc_leaves(rng)
    device = on_device(grads)
    expected_count = gc.adaptive_grad_clip_(grads, params, 0.05, axis=axis)
    launches.clear()
    count = gc.adaptive_grad_clip_(device, on_device(params), 0.05, axis=axis)
    assert count == expected_count and 0 < count
    for k in grads:
        assert_same_bits(host(device[k]), grads[k])
    # grad norms, param norms, scaling: one launch a pass, whatever the number of units
    assert launches == ["sumsq_cuda", "finish_cuda"] * 2 + ["scale_cuda_"]


def test_agc_refuses_a_gradient_and_parameter_on_different_devices(rng):
    grads, params = agc_leaves(rng)
    device = on_device(grads)
    with raises_with(ValueError, "grads['b'] is a CUDA array but params['b'] a CPU array"):
        gc.adaptive_grad_clip_(device, on_device(params) | {"b": params["b"]}, 0.0)
    for k in grads:
        assert_same_bits(host(device[k]), grads[k])


# ------------------------------------------------------------------ norm_penalty


@pytest.mark.parametrize("tau", [0.5, 100.0, "nan"])
def test_norm_penalty_matches_the_cpu(rng, tau):
    leaves = [rng.standard_normal((3, 5)).astype(np.float16).T, rng.standard_normal(7).astype(np.complex64)]
    if tau == "nan":
        leaves[1][2] = np.nan
        tau = 0.5
    expected_value, expected = gc.norm_penalty(leaves, tau, 3.0)
    value, direction = gc.norm_penalty(on_device(leaves), tau, 3.0)
    assert value == expected_value or (math.isnan(value) and math.isnan(expected_value))
    for a, e in zip(direction, expected):
        assert_same_bits(host(a), e)
    if not math.isnan(value):
        assert_norm_close(value, 3.0 * max(0.0, ref_norm(leaves) - tau) if value else 0.0, rtol=1e-9)


# -------------------------------------------------------------------- NormMonitor


def test_monitor_records_gpu_grads(rng):
    cpu, gpu = gc.NormMonitor(per_leaf=True, spike_factor=3.0), gc.NormMonitor(per_leaf=True, spike_factor=3.0)
    for s in SCALES:
        leaves = exact_leaves(s)
        assert gpu.record(on_device(leaves)) == cpu.record(leaves) or math.isnan(s)
    assert gpu.summary() == cpu.summary() or math.isnan(gpu.summary()["last"])
    leaves = [rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(13)]
    assert_norm_close(gpu.record(on_device(leaves)), ref_norm(leaves))
    assert_norms_close(gpu.leaf_norms[-1], ref_layer_norms(leaves))
    assert gpu.spike_steps == cpu.spike_steps == [5] and gpu.nonfinite_steps == [6]
