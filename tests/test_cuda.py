"""The CUDA backend on numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``, set in conftest.py).

Threads per block and blocks per leaf are patched small so that multi-block and
grid-stride paths run on small inputs. Results are checked against tests/reference.py:
norms within 1e-12, scaled and clamped values bit for bit, memory outside strided
views untouched. Launches are counted, and ``copy_to_host`` is forbidden inside
``clip_grad_norm_``.
"""

import math
import subprocess
import sys

import numpy as np
import pytest

import gradclip as gc
from helpers import (
    DTYPES,
    REAL_DTYPES,
    assert_norm_close,
    assert_norms_close,
    assert_same_bits,
    assert_zeroed,
    ForeignArray,
    OnDevice,
    device_array_type,
    dtype_id,
    raises_with,
    to_device,
    to_host,
)
from reference import (
    BFLOAT16,
    ref_clamp,
    ref_clip_by_norm,
    ref_layer_norms,
    ref_norm,
    ref_scale,
)

cuda = pytest.importorskip("numba.cuda")  # installed by the test extra: never skipped in CI

from gradclip import _batch, _cuda  # noqa: E402
from gradclip._kernels import cuda as kernels  # noqa: E402

DeviceArray = device_array_type()

pytestmark = pytest.mark.usefixtures("small_kernels")

LAYOUTS = ["C", "T_step"]
SHAPES = [(), (0,), (4,), (13,), (3, 4)]  # on and off the boundaries of TPB = 4 and TPB * BLOCKS = 12
NORM_CASES = [(d, 2.0) for d in DTYPES] + [
    (np.dtype(np.float32), 1.0),
    (np.dtype(np.float32), 3.0),
    (np.dtype(np.float32), math.inf),
    (np.dtype(np.float64), 1.0),
    (np.dtype(np.float64), 0.5),
    (np.dtype(np.complex64), math.inf),
    (BFLOAT16, 3.0),
]


def leaves(dtype, rng, layouts=LAYOUTS, shapes=SHAPES, scale=1.0):
    return [OnDevice(layout, shape, dtype, rng, scale) for layout in layouts for shape in shapes]


host = to_host


# ---------------------------------------------------------------- import and dispatch


def test_import_gradclip_imports_no_cuda_module():
    code = "import sys, gradclip; print(sorted(m for m in sys.modules if m.startswith(('numba.cuda', 'cupy'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_numba_cuda_names_the_extra(monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "numba_cuda", None)  # makes ``import numba_cuda`` fail
    monkeypatch.setattr(_cuda, "_cuda", _cuda._cuda.__wrapped__)  # not the import made before
    leaf = OnDevice("C", (3,), np.float32, rng)
    with raises_with(ImportError, "pip install 'gradclip[cuda]'"):
        gc.grad_norm([leaf.view])


@pytest.mark.parametrize("readonly", [False, True])
def test_foreign_array_with_only_the_interface(rng, readonly):
    leaf = OnDevice("C", (3, 5), np.float32, rng)
    foreign = ForeignArray(leaf.base, readonly=readonly)
    total = gc.grad_norm(foreign)
    assert_norm_close(host(total), ref_norm([leaf.host.view_before]))
    if readonly:
        with raises_with(ValueError, "grads", "read-only", "clip_grad_norm_"):
            gc.clip_grad_norm_(foreign, 1e-3)
        leaf.assert_base(leaf.host.view_before)
    else:
        gc.clip_grad_norm_(foreign, 1e-3)
        assert_norm_close(host(gc.grad_norm(leaf.view)), 1e-3, rtol=1e-6)


# ------------------------------------------------------------------------ norms


@pytest.mark.parametrize("dtype, p", NORM_CASES, ids=lambda x: dtype_id(x) if isinstance(x, np.dtype) else f"p{x:g}")
def test_norms_match_the_reference(rng, dtype, p):
    grads = leaves(dtype, rng, layouts=["C", "F", "neg", "T_step"])
    views = [g.view for g in grads]
    befores = [g.host.view_before for g in grads]
    total = gc.grad_norm(views, norm_type=p)
    assert total.shape == ()
    assert_norm_close(host(total), ref_norm(befores, p))
    assert_norms_close(host(gc.layer_norms(views, norm_type=p)), ref_layer_norms(befores, p))


def test_norms_are_bit_identical_across_calls(rng):
    views = [g.view for g in leaves(np.float32, rng, layouts=["C", "T_step"])]
    first = host(gc.layer_norms(views))
    assert all(np.array_equal(host(gc.layer_norms(views)), first) for _ in range(2))


def test_float64_near_overflow_stays_finite(rng):
    g = OnDevice("C", (13,), np.float64, rng, scale=1e300)
    assert_norm_close(host(gc.grad_norm(g.view)), ref_norm([g.host.view_before]))
    assert_norm_close(host(gc.grad_norm(g.view, norm_type=7.0)), ref_norm([g.host.view_before], 7.0))


def test_subnormal_complex128_norm_is_the_cpu_twins(rng):
    # the CPU result is checked against an exact one in test_norms.py
    units = rng.integers(-1000, 1001, size=(2, 13))
    leaf = np.empty(13, np.complex128)
    leaf.real, leaf.imag = units * 5e-324  # subnormal, exact
    for p in (1.0, 2.0, 3.0):
        assert host(gc.grad_norm(cuda.to_device(leaf), norm_type=p)) == gc.grad_norm(leaf, p), f"p={p}"


def test_nan_and_inf_reach_the_norm(rng):
    a, b = OnDevice("C", (13,), np.float32, rng), OnDevice("T", (3, 5), np.float32, rng)
    a.poke(np.inf, (4,))
    assert host(gc.grad_norm([a.view, b.view])) == math.inf
    b.poke(np.nan, (1, 2))
    assert math.isnan(host(gc.grad_norm([a.view, b.view])))


def test_the_same_array_twice_counts_once(rng):
    g = OnDevice("C", (5,), np.float32, rng)
    expected = ref_norm([g.host.view_before])
    assert_norm_close(host(gc.grad_norm([g.view, g.view])), expected)
    assert_norms_close(host(gc.layer_norms([g.view, g.view])), [expected, expected])


# --------------------------------------------------------------------- clipping


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_clip_grad_norm_scales_in_place_bit_for_bit(rng, dtype):
    grads = leaves(dtype, rng)
    befores = [g.host.view_before for g in grads]
    total = gc.clip_grad_norm_([g.view for g in grads], max_norm=0.5)
    assert_norm_close(host(total), ref_norm(befores))
    for g, expected in zip(grads, ref_clip_by_norm(befores, 0.5, float(host(total)))):
        g.assert_base(expected, what=f"{g.host!r}")


def test_clip_grad_norm_below_max_norm_or_nonfinite_writes_nothing(rng):
    grads = leaves(np.float32, rng, layouts=["C", "step3"])
    views = [g.view for g in grads]
    gc.clip_grad_norm_(views, max_norm=1e9)
    grads[3].poke(np.nan)
    before = [to_host(g.base) for g in grads]
    assert math.isnan(host(gc.clip_grad_norm_(views, max_norm=1e-3)))
    for g, b in zip(grads, before):
        assert_same_bits(to_host(g.base), b, nan_payload=True)
    with raises_with(gc.NonFiniteGradientError, "non-finite"):
        gc.clip_grad_norm_(views, max_norm=1e-3, error_if_nonfinite=True)


def test_clip_grad_norm_copies_nothing_to_the_host(rng, monkeypatch):
    views = [g.view for g in leaves(np.float32, rng, layouts=["C", "T_step"])]

    def forbidden(*args, **kwargs):
        raise AssertionError("a device -> host copy inside clip_grad_norm_")

    monkeypatch.setattr(DeviceArray, "copy_to_host", forbidden)
    total = gc.clip_grad_norm_(views, max_norm=0.5)
    monkeypatch.undo()
    assert_norm_close(host(gc.grad_norm(views)), 0.5, rtol=1e-5)
    assert host(total) > 0.5


@pytest.mark.parametrize("n", [1, 33, 100])
def test_one_launch_per_pass_whatever_the_number_of_leaves(rng, launches, n):
    grads = [OnDevice("C" if i % 3 else "step3", (1 + i % 4,), np.float32, rng) for i in range(n)]
    views = [g.view for g in grads]
    befores = [g.host.view_before for g in grads]
    total = gc.clip_grad_norm_(views, max_norm=0.5)
    assert launches == ["sumsq_cuda", "finish_cuda", "scale_cuda_"]
    for g, expected in zip(grads, ref_clip_by_norm(befores, 0.5, float(host(total)))):
        g.assert_base(expected)


def test_one_launch_per_pass_and_dtype(rng, launches):
    dtypes = [np.float16, BFLOAT16, np.float32, np.complex64]
    grads = [OnDevice(layout, (3, 4), dtype, rng) for dtype in dtypes for layout in ("C", "T_step")]
    befores = [g.host.view_before for g in grads]
    total = gc.clip_grad_norm_([g.view for g in grads], max_norm=0.5)
    assert launches == ["sumsq_cuda"] * 4 + ["finish_cuda"] + ["scale_cuda_"] * 4
    for g, expected in zip(grads, ref_clip_by_norm(befores, 0.5, float(host(total)))):
        g.assert_base(expected)


def test_float64_redoes_only_the_leaves_whose_sum_over_or_underflowed(rng, launches):
    tiny, huge, plain = (OnDevice("C", (9,), np.float64, rng, scale=s) for s in (1e-170, 1e200, 1.0))
    views = [tiny.view, huge.view, plain.view]
    befores = [g.host.view_before for g in (tiny, huge, plain)]
    total = gc.grad_norm(views)
    assert launches == ["sumsq_cuda", "finish_cuda", "maxabs_cuda", "finish_cuda", "sumpow_cuda", "finish_cuda"]
    assert_norm_close(host(total), ref_norm(befores))
    assert_norms_close(host(gc.layer_norms(views)), ref_layer_norms(befores))


@pytest.mark.parametrize("size", [8, 9, 100, 1000])  # one chunk, two, several, many (CHUNK = 8)
def test_leaves_of_many_chunks_fold_their_partials_in_order(rng, size):
    grads = [OnDevice(layout, (size,), np.float32, rng) for layout in ("C", "step3", "neg")]
    views = [g.view for g in grads]
    befores = [g.host.view_before for g in grads]
    first = host(gc.layer_norms(views))
    assert_norms_close(first, ref_layer_norms(befores))
    for _ in range(2):  # the tickets are ready again for the next call: the same bits
        assert_same_bits(host(gc.layer_norms(views)), first)
    plan = _cuda._PLANS.find(views, 0)
    tickets = plan.table.copy_to_host()[plan.host_table[kernels.H_TICKETS] :][: plan.nrows]
    assert not tickets.any()


# ------------------------------------------------------------------------ plans


@pytest.fixture
def allocations(monkeypatch):
    """Device allocations and host-to-device copies, counted by name."""
    counted = []
    for name in ("device_array", "to_device", "device_array_like"):
        original = getattr(cuda, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            counted.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cuda, name, counting)
    original_copy = DeviceArray.copy_to_device

    def copy_to_device(self, *args, **kwargs):
        counted.append("copy_to_device")
        return original_copy(self, *args, **kwargs)

    monkeypatch.setattr(DeviceArray, "copy_to_device", copy_to_device)
    return counted


def test_a_second_call_on_the_same_leaves_copies_nothing_to_the_device(rng, allocations):
    grads = leaves(np.float32, rng, layouts=["C", "T_step"])
    views = [g.view for g in grads]
    gc.clip_grad_norm_(views, max_norm=1e9)
    assert "to_device" in allocations  # the first call uploads its plan
    allocations.clear()
    for _ in range(2):
        total = gc.clip_grad_norm_(views, max_norm=0.5)
    assert allocations == ["device_array"] * 2  # each call's result, nothing else
    assert_norm_close(host(total), 0.5, rtol=1e-5)  # the first scaled to 0.5, the second left it


def test_a_plan_dies_with_its_leaves_and_never_serves_others(rng):
    a = OnDevice("C", (13,), np.float32, rng)
    assert_norm_close(host(gc.grad_norm([a.view])), ref_norm([a.host.view_before]))
    plan = _cuda._PLANS.find([a.view], 0)
    assert plan is not None and plan.alive
    del a
    assert not plan.alive
    b = OnDevice("T_step", (3, 4), np.float32, rng)  # may land at a dead leaf's identity
    assert_norm_close(host(gc.grad_norm([b.view])), ref_norm([b.host.view_before]))


def test_a_torch_tensor_given_new_memory_is_planned_again():
    torch = pytest.importorskip("torch")  # installed by the test extra: never skipped in CI
    tensors = [torch.zeros(4), torch.zeros(3)]
    plan = _cuda.Plan.__new__(_cuda.Plan)
    plan.alive = True
    _cuda._PLANS.keep(plan, tensors, 0)
    assert _cuda._PLANS.find(tensors, 0) is plan
    tensors[1].set_(torch.zeros(3))  # the same object, other memory
    assert _cuda._PLANS.find(tensors, 0) is None


def test_work_goes_on_the_stream_of_the_leaves(rng, monkeypatch):
    stream = cuda.stream()
    base = cuda.to_device(rng.standard_normal(10).astype(np.float32)).bind(stream)
    total = gc.grad_norm([base])
    plan = _cuda._PLANS.find([base], _cuda.call_stream(base))
    assert plan is not None and plan.stream == _cuda._stream_of(_cuda.describe(base, None)) != 0
    assert_norm_close(host(total), ref_norm([base.copy_to_host()]))


def test_leaves_on_other_streams_are_joined_both_ways(rng, monkeypatch):
    joined = []
    monkeypatch.setattr(_cuda._Launcher, "wait_for", lambda self, handle: joined.append(("wait for", handle)))
    monkeypatch.setattr(_cuda._Launcher, "then", lambda self, handle: joined.append(("then", handle)))
    first, second = cuda.stream(), cuda.stream()
    a = cuda.to_device(rng.standard_normal(6).astype(np.float32)).bind(first)
    b = cuda.to_device(rng.standard_normal(5).astype(np.float32)).bind(second)
    expected = ref_norm([a.copy_to_host(), b.copy_to_host()])
    total = gc.clip_grad_norm_([a, b], max_norm=1e9)
    other = _cuda._stream_of(_cuda.describe(b, None))
    assert joined == [("wait for", other), ("then", other)] * 2  # the norm, then the scaling
    assert_norm_close(host(total), expected)


def test_declared_streams_of_foreign_producers_are_used(rng):
    device = cuda.to_device(rng.standard_normal(7).astype(np.float32))
    foreign = ForeignArray(device)
    foreign.__cuda_array_interface__["stream"] = 1  # the legacy default stream's handle
    batch = _batch.collect([foreign], "grad_norm", cuda=True)
    assert batch.cuda.plan.stream == 1
    assert_norm_close(host(gc.grad_norm([foreign])), ref_norm([device.copy_to_host()]))


def test_in_place_functions_refuse_gpu_leaves_that_share_memory(rng):
    base = to_device(rng.standard_normal(20).astype(np.float32))
    before = to_host(base)
    prefix, interleaved = base[:10], base[5:15]
    assert_norm_close(host(gc.grad_norm([prefix, interleaved])), ref_norm([before[:10], before[5:15]]))  # reading is fine
    for call in (
        lambda: gc.clip_grad_norm_([prefix, interleaved], 1e-3),  # a plan made by the read above: not reused for a write
        lambda: gc.clip_grad_value_({"a": prefix, "b": interleaved}, 0.1),
        lambda: gc.zero_nonfinite_([interleaved, prefix]),
    ):
        with raises_with(ValueError, "share memory", "grads"):
            call()
    assert_same_bits(to_host(base), before)
    evens, odds = base[::2], base[1::2]  # interleaved without a common element
    gc.clip_grad_norm_([evens, odds], 1e-3)
    assert_norm_close(host(gc.grad_norm([evens, odds])), 1e-3, rtol=1e-5)


def test_threads_sharing_the_same_leaves_get_the_same_results(rng):
    import threading

    grads = leaves(np.float32, rng, layouts=["C", "T_step"])
    views = [g.view for g in grads]
    expected = host(gc.layer_norms(views))
    results = [None] * 4

    def work(i):
        results[i] = host(gc.layer_norms(views))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        assert_same_bits(result, expected)


@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=dtype_id)
def test_out_of_place_twins_return_device_arrays_and_leave_the_input(rng, dtype):
    grads = leaves(dtype, rng, layouts=["neg", "T_step"])
    befores = [g.host.view_before for g in grads]
    tree = {"a": [g.view for g in grads[:3]], "b": tuple(g.view for g in grads[3:])}
    clipped, total = gc.clip_grad_norm(tree, max_norm=0.5)
    out = clipped["a"] + list(clipped["b"])
    for g, o, expected in zip(grads, out, ref_clip_by_norm(befores, 0.5, float(host(total)))):
        assert o.shape == g.view.shape and o.dtype == g.view.dtype
        assert_same_bits(host(o), expected)
        g.assert_base(g.host.view_before)
    for g, o in zip(grads, gc.clip_grad_value([g.view for g in grads], 0.5)):
        assert_same_bits(host(o), ref_clamp(g.host.view_before, 0.5))
        g.assert_base(g.host.view_before)


def test_out_of_place_clip_copies_when_nothing_clips(rng):
    g = OnDevice("T_step", (3, 5), np.complex64, rng)
    g.poke(complex(np.inf, 1.0), (0, 1))
    (clipped,), total = gc.clip_grad_norm([g.view], max_norm=1.0)
    assert host(total) == math.inf
    assert_same_bits(host(clipped), g.values())


@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=dtype_id)
def test_clip_grad_value_clamps_in_place(rng, dtype):
    grads = leaves(dtype, rng, layouts=["step3", "T_step"])
    grads[3].poke(np.nan)
    gc.clip_grad_value_([g.view for g in grads], clip_value=0.3)
    for g in grads:
        g.assert_base(ref_clamp(g.host.view_before, 0.3))


def test_clip_grad_value_refuses_complex_before_writing(rng):
    a, b = OnDevice("C", (5,), np.float32, rng, scale=10), OnDevice("C", (5,), np.complex64, rng)
    with raises_with(TypeError, "grads[1]", "complex64", "clip_grad_value_"):
        gc.clip_grad_value_([a.view, b.view], 1.0)
    a.assert_base(a.host.view_before)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_clip_per_layer_clips_each_leaf_on_its_own_norm(rng, dtype):
    big, small = OnDevice("T", (3, 5), dtype, rng, scale=10), OnDevice("step3", (5,), dtype, rng, scale=0.01)
    norms = gc.clip_grad_norm_per_layer_([big.view, small.view, big.view], max_norm=1.0)
    expected = ref_layer_norms([big.host.view_before, small.host.view_before, big.host.view_before])
    assert_norms_close(host(norms), expected)
    big.assert_base(ref_scale(big.host.view_before, 1.0 / (expected[0] + 1e-6)))
    small.assert_base(small.host.view_before)


def test_clip_grads_with_norm_reads_a_device_total(rng, monkeypatch):
    g = OnDevice("C", (13,), np.float32, rng)
    total = gc.grad_norm(g.view)
    monkeypatch.setattr(DeviceArray, "copy_to_host", lambda *a, **k: pytest.fail("copied to the host"))
    gc.clip_grads_with_norm_(g.view, max_norm=0.5, total_norm=total)
    monkeypatch.undo()
    g.assert_base(ref_scale(g.host.view_before, 0.5 / (ref_norm([g.host.view_before]) + 1e-6)))


# ------------------------------------------------------------------- finiteness


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_finite_and_zero_nonfinite(rng, dtype):
    grads = leaves(dtype, rng, layouts=["C", "T_step"], shapes=[(5,), (3, 4)])
    views = [g.view for g in grads]
    assert gc.all_finite(views) is True
    grads[1].poke(np.inf)
    grads[3].poke(np.nan, (2, 1))
    assert gc.all_finite(views) is False
    changed = gc.zero_nonfinite_(views)
    expected = sum(int((~np.isfinite(np.asarray(g.host.view_before, dtype=np.complex128))).sum()) for g in grads)
    assert host(changed) == expected > 0
    if dtype.kind != "c":
        for g in grads:
            assert_zeroed(g.values(), g.host.view_before)
    assert gc.all_finite(views) is True


# ---------------------------------------------------------------- mixed CPU + GPU


def test_mixed_cpu_and_gpu_leaves_combine_on_the_host(rng):
    gpu = OnDevice("T_step", (3, 5), np.float32, rng)
    cpu = rng.standard_normal(7)
    expected = ref_norm([cpu, gpu.host.view_before])
    assert gc.grad_norm([cpu, gpu.view]) == pytest.approx(expected, rel=1e-12)  # a float: first leaf on the CPU
    assert_norm_close(host(gc.grad_norm([gpu.view, cpu])), expected)  # on the device of the first leaf
    cpu_before = cpu.copy()
    total = gc.clip_grad_norm_([cpu, gpu.view], max_norm=0.5)
    expected_cpu, expected_gpu = ref_clip_by_norm([cpu_before, gpu.host.view_before], 0.5, total)
    assert_same_bits(cpu, expected_cpu)
    gpu.assert_base(expected_gpu)
