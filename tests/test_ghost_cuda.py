"""Ghost norms (gradclip.ghost) on GPU arrays: the CUDA twins on numba-cuda's simulator (set
in conftest.py; unchanged on a GPU with ``NUMBA_ENABLE_CUDASIM=0``), tiles, blocks and
grids patched small so that multi-tile, multi-block and grid-stride paths run.

Against materialised per-example gradients in float64 (reference.py) and against the CPU
functions on the same values. Tolerances: a Gram-route sum is exact but for float64
rounding relative to the sum of its terms' magnitudes (``assert_dense_close``: 1e-12
of that bound, twice it between two devices, each within it of the exact value);
embedding and per-example sums add non-negative squares, so 1e-12 relative to the
result; clip factors are bit-identical (one correctly rounded sqrt and division). On
values whose every product and sum is exact (multiples of 1/8) the devices agree bit for
bit, and repeated launches give the same bits. Results are float64 device arrays of the
input's kind, nothing is read back to the host, launches are counted, and every error
is the CPU's message, raised before anything is launched.
"""

import math

import numpy as np
import pytest

import gradclip as gc
from helpers import (
    ForeignArray,
    OnDevice,
    assert_dense_close,
    assert_same_bits,
    dense_inputs,
    device_array_type,
    device_view,
    raises_with,
    simulated,
    to_device,
    to_host,
)
from reference import BFLOAT16, ref_clip_factor, ref_dense_sq_norms, ref_embedding_sq_norms, widen

cuda = pytest.importorskip("numba.cuda")  # installed by the test extra: never skipped in CI

DeviceArray = device_array_type()
RTOL = 1e-12


@pytest.fixture(autouse=True)
def small_ghost(small_kernels, monkeypatch):
    """Gram tiles of 2 x 2 and blocks of 4 threads. The tile is compiled into the kernels on
    a GPU (and cached on disk), so it is patched on the simulator only."""
    from gradclip._kernels import ghost_cuda

    monkeypatch.setattr(ghost_cuda, "THREADS", 4)
    if simulated():
        monkeypatch.setattr(ghost_cuda, "TILE", 2)
        monkeypatch.setattr(ghost_cuda, "STAGE", (2, 3))
    return ghost_cuda


def _host(x, n=None):
    """A float64 ``(n,)`` device result's values."""
    assert isinstance(x, DeviceArray), f"expected a device array, got {type(x).__name__}"
    assert x.dtype == np.float64 and (n is None or x.shape == (n,)), (x.dtype, x.shape)
    return to_host(x)


# --------------------------------------------------------------------------- dense layers

# (B, T, d_in, d_out), T None: no sequence axis. With 2 x 2 tiles: T = 5 is three tile rows
# (the last one short), 3 to 5 features take two stages (the last one short).
DENSE_SHAPES = [(1, None, 3, 2), (3, None, 5, 2), (1, 1, 3, 2), (1, 5, 3, 4), (2, 4, 5, 3), (2, 3, 1, 1)]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_dense_matches_materialised_gradients_and_the_cpu(rng, shape, bias, launches):
    a, g = dense_inputs(rng, shape)
    got = _host(gc.dense_sq_norms(to_device(a), to_device(g), bias=bias), shape[0])
    assert_dense_close(got, a, g, bias)
    assert_dense_close(got, a, g, bias, other=gc.dense_sq_norms(a, g, bias=bias))
    gram = shape[1] not in (None, 1)
    assert launches == (["dense_gram_cuda", "fold_cuda"] if gram else ["dense_rows_cuda"])


@pytest.mark.parametrize(
    "dtype, g_dtype",
    [(np.float16, None), (BFLOAT16, None), (np.float64, None), (np.float32, BFLOAT16), (np.float16, np.float64)],
    ids=["float16", "bfloat16", "float64", "float32-bfloat16", "float16-float64"],
)
def test_dense_dtypes(rng, dtype, g_dtype):
    a, g = dense_inputs(rng, (2, 3, 3, 2), dtype, g_dtype)
    got = _host(gc.dense_sq_norms(to_device(a), to_device(g), bias=True), 2)
    assert_dense_close(got, a, g, True)
    assert_dense_close(got, a, g, True, other=gc.dense_sq_norms(a, g, bias=True))
    a, g = np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(g[:, 0])  # no sequence axis
    rows = _host(gc.dense_sq_norms(to_device(a), to_device(g), bias=True), 2)
    assert_dense_close(rows, a, g, True)


def test_dense_strided_inputs(rng):
    """Stepped, transposed, reversed and broadcast (a zero step) views, read where they lie."""
    a = OnDevice("T_step", (2, 4, 3), np.float32, rng)
    g = OnDevice("neg", (2, 4, 2), np.float64, rng)
    got = _host(gc.dense_sq_norms(a.view, g.view, bias=True), 2)
    assert_dense_close(got, a.host.view, g.host.view, True)
    broadcast = np.broadcast_to(g.host.base[:, :1], (2, 4, 2))  # one position's gradient at every t
    device_g = device_view(g.base, g.host.base, broadcast)
    assert_dense_close(_host(gc.dense_sq_norms(a.view, device_g, bias=True)), a.host.view, broadcast, True)
    rows_a, rows_g = OnDevice("neg_step", (3, 5), np.float16, rng), OnDevice("F", (3, 2), np.float32, rng)
    assert_dense_close(_host(gc.dense_sq_norms(rows_a.view, rows_g.view), 3), rows_a.host.view, rows_g.host.view, False)
    a.assert_base(a.host.view_before)
    g.assert_base(g.host.view_before)


def test_dense_exact_values_equal_the_cpu_bit_for_bit_at_every_launch(rng):
    """Multiples of 1/8: every product and sum is exact in float64, on either device."""
    a = (rng.integers(-16, 17, (2, 4, 3)) / 8).astype(np.float32)
    g = (rng.integers(-16, 17, (2, 4, 2)) / 8).astype(np.float32)
    device_a, device_g = to_device(a), to_device(g)
    first = _host(gc.dense_sq_norms(device_a, device_g, bias=True))
    assert_same_bits(first, gc.dense_sq_norms(a, g, bias=True))
    assert_same_bits(_host(gc.dense_sq_norms(device_a, device_g, bias=True)), first)


def test_dense_same_bits_at_every_launch(rng):
    a, g = dense_inputs(rng, (2, 3, 3, 2))
    device_a, device_g = to_device(a), to_device(g)
    first = _host(gc.dense_sq_norms(device_a, device_g))
    assert_same_bits(_host(gc.dense_sq_norms(device_a, device_g)), first)


def test_dense_zero_gradient_is_zero_not_negative(rng):
    """Σ (a_t·a_s)(g_t·g_s) of a gradient that cancels exactly: 0, never a rounding below it."""
    a, g = dense_inputs(rng, (2, 4, 3, 2))
    a[:, 2:] = a[:, :2]
    g[:, 2:] = -g[:, :2]  # G^T A = 0 and Σ_t g_t = 0
    got = _host(gc.dense_sq_norms(to_device(a), to_device(g), bias=True))
    assert np.all(got >= 0) and np.all(got < 1e-9)


@pytest.mark.filterwarnings("ignore:.*invalid value encountered:RuntimeWarning")  # the simulator's NumPy
def test_dense_nonfinite_stays_in_its_example(rng):  # scalars warn at inf - inf, where a GPU gives NaN silently
    a, g = dense_inputs(rng, (4, 3, 2, 2))
    a[1, 2, 1] = np.nan
    g[2, 0, 0] = np.inf
    got = _host(gc.dense_sq_norms(to_device(a), to_device(g)))
    assert math.isnan(got[1]) and not np.isfinite(got[2])
    assert_dense_close(got[[0, 3]], a[[0, 3]], g[[0, 3]], False)


@pytest.mark.parametrize(
    "a_shape, g_shape, bias, expected, kernels",
    [
        ((0, 3, 3), (0, 3, 2), True, 0, []),
        ((2, 0, 3), (2, 0, 2), True, 2, []),
        ((2, 3, 2), (2, 3, 0), True, 2, []),
        ((2, 3, 0), (2, 3, 2), False, 2, []),
        ((2, 3, 0), (2, 3, 2), True, 2, ["dense_gram_cuda", "fold_cuda"]),  # the bias gradient's norm remains
        ((2, 0), (2, 3), True, 2, ["dense_rows_cuda"]),
    ],
)
def test_dense_empty_axes(rng, a_shape, g_shape, bias, expected, kernels, launches):
    a = rng.standard_normal(a_shape).astype(np.float32)
    g = rng.standard_normal(g_shape).astype(np.float32)
    got = _host(gc.dense_sq_norms(to_device(a), to_device(g), bias=bias), expected)
    np.testing.assert_allclose(got, ref_dense_sq_norms(a, g, bias), rtol=RTOL, atol=0)
    assert launches == kernels


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize(
    "B, T, vocab, d",
    [(1, 1, 3, 2), (1, 6, 2, 3), (3, 5, 3, 5), (2, 4, 1, 2), (2, None, 4, 3)],
)
def test_embedding_matches_materialised_gradients_and_the_cpu(rng, B, T, vocab, d, launches):
    """Repeated indices in every example (few distinct values), one index for all, B = 1,
    more features than threads."""
    lead = (B,) if T is None else (B, T)
    idx = rng.integers(0, vocab, lead)
    g = rng.standard_normal((*lead, d)).astype(np.float32)
    got = _host(gc.embedding_sq_norms(to_device(idx), to_device(g)), B)
    np.testing.assert_allclose(got, ref_embedding_sq_norms(idx, g), rtol=RTOL, atol=0)
    np.testing.assert_allclose(got, gc.embedding_sq_norms(idx, g), rtol=RTOL, atol=0)
    assert launches == ["embedding_cuda", "fold_cuda"]


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float64], ids=lambda d: np.dtype(d).name)
def test_embedding_dtypes(rng, dtype):
    idx = rng.integers(0, 3, (2, 5)).astype(np.int32)
    g = rng.standard_normal((2, 5, 3)).astype(dtype)
    got = _host(gc.embedding_sq_norms(to_device(idx), to_device(g)), 2)
    np.testing.assert_allclose(got, ref_embedding_sq_norms(idx, g), rtol=RTOL, atol=0)


def test_embedding_indices_any_integers_and_layouts(rng):
    """Negative int16 indices in a reversed, stepped view (small random integers: repeats);
    uint8 ones; gradients transposed."""
    g = OnDevice("T", (2, 6, 3), np.float32, rng)
    for idx in (OnDevice("neg_step", (2, 6), np.int16, rng), OnDevice("C", (2, 6), np.uint8, rng)):
        values = idx.host.view.astype(np.int64)
        got = _host(gc.embedding_sq_norms(idx.view, g.view), 2)
        np.testing.assert_allclose(got, ref_embedding_sq_norms(values - values.min(), g.host.view), rtol=RTOL)


def test_embedding_same_bits_at_every_launch(rng):
    idx, g = to_device(rng.integers(0, 3, (2, 6))), to_device(rng.standard_normal((2, 6, 3)))
    first = _host(gc.embedding_sq_norms(idx, g))
    assert_same_bits(_host(gc.embedding_sq_norms(idx, g)), first)


def test_embedding_empty_launches_nothing(launches):
    assert _host(gc.embedding_sq_norms(to_device(np.zeros((0, 3), np.int64)), to_device(np.zeros((0, 3, 2))))).shape == (0,)
    got = _host(gc.embedding_sq_norms(to_device(np.zeros((2, 0), np.int64)), to_device(np.zeros((2, 0, 2)))), 2)
    assert not got.any() and launches == []


# --------------------------------------------------------------------------- materialised route


def test_sq_norms_from_per_example(rng, launches):
    w = OnDevice("T_step", (3, 2, 2), np.float32, rng)
    b = to_device(rng.standard_normal((3, 2)).astype(np.float16))
    c = to_device((rng.standard_normal((3, 2)) + 1j * rng.standard_normal((3, 2))).astype(np.complex64))
    grads = {"w": w.view, "layers": [b, None, c], "again": w.view}  # w given twice counts once
    got = _host(gc.sq_norms_from_per_example(grads), 3)
    host = [w.host.view, to_host(b), to_host(c)]
    expected = [math.fsum(np.concatenate([np.abs(widen(x[i])).ravel() ** 2 for x in host])) for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    np.testing.assert_allclose(got, gc.sq_norms_from_per_example({"w": host[0], "layers": host[1:]}), rtol=RTOL)
    assert launches[-2:] == ["fold_examples_cuda", "square_cuda_"]  # per_example_norms' passes, squared
    w.assert_base(w.host.view_before)


@pytest.mark.parametrize("B", [0, 1])
def test_sq_norms_from_per_example_zero_and_one_example(rng, B):
    w = rng.standard_normal((B, 3)).astype(np.float32)
    got = _host(gc.sq_norms_from_per_example([to_device(w)]), B)
    np.testing.assert_allclose(got, (widen(w) ** 2).sum(axis=1), rtol=RTOL)


# --------------------------------------------------------------------------- clip factors


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64], ids=lambda d: np.dtype(d).name)
def test_clip_factors_equal_the_cpu_bit_for_bit(dtype, launches):
    sq = np.array([16.0, 0.25, 0.0, 1.0, 7.0, 1e4]).astype(dtype)
    for max_norm, eps in ((1.0, 0.0), (2.0, 1e-6), (math.inf, 1e-6), (0.0, 0.0)):
        got = _host(gc.clip_factors(to_device(sq), max_norm, eps=eps), 6)
        assert_same_bits(got, gc.clip_factors(sq, max_norm, eps=eps))
        assert_same_bits(got, np.array([ref_clip_factor(math.sqrt(float(x)), max_norm, eps) for x in sq]))
    assert launches == ["clip_factors_cuda"] * 4


def test_clip_factors_nonfinite_and_negative_norms_drop_the_example(rng):
    """NaN and inf as on the CPU; a negative squared norm, which the CPU refuses after reading
    it, gives the factor 0 on the GPU (nothing is read back there)."""
    sq = np.array([np.nan, np.inf, 4.0, -1.0])
    got = _host(gc.clip_factors(to_device(sq), 1.0, eps=0.0), 4)
    assert_same_bits(got[:3], gc.clip_factors(sq[:3], 1.0, eps=0.0))
    assert got[3] == 0.0
    base = np.array([9.0, -5.0, 1.0, -5.0])
    for view in (base[::2], base[-2::-2]):  # stepped, reversed: the negative values in between unread
        got = _host(gc.clip_factors(device_view(to_device(base), base, view), 1.5, eps=0.0))
        assert_same_bits(got, gc.clip_factors(view, 1.5, eps=0.0))
    assert _host(gc.clip_factors(to_device(np.zeros(0)), 1.0), 0).size == 0


# --------------------------------------------------------------------------- kinds, launches, host reads


def test_results_stay_on_the_device(rng, launches, monkeypatch):
    """Every function's result is a new device array; nothing is copied back to the host."""
    a, g = dense_inputs(rng, (2, 3, 2, 2))
    idx = rng.integers(0, 2, (2, 3))
    device = [to_device(x) for x in (a, g, idx)]
    monkeypatch.setattr(DeviceArray, "copy_to_host", lambda *x, **k: pytest.fail("read back to the host"))
    sq = gc.dense_sq_norms(*device[:2], bias=True)
    emb = gc.embedding_sq_norms(device[2], device[1])
    per_example = gc.sq_norms_from_per_example(device[1])
    factors = gc.clip_factors(sq, 1.0)
    for result in (sq, emb, per_example, factors):
        assert isinstance(result, DeviceArray) and result.shape == (2,) and result.dtype == np.float64
    per_example_passes = ["sumsq_cuda", "finish_cuda", "fold_examples_cuda", "square_cuda_"]
    assert launches == ["dense_gram_cuda", "fold_cuda", "embedding_cuda", "fold_cuda", *per_example_passes, "clip_factors_cuda"]


def test_foreign_arrays_give_device_arrays(rng):
    """Inputs that expose only __cuda_array_interface__: read as they are, results in Numba
    device arrays."""
    a, g = dense_inputs(rng, (2, 3, 2, 2))
    got = gc.dense_sq_norms(ForeignArray(to_device(a)), ForeignArray(to_device(g)))
    assert_dense_close(_host(got, 2), a, g, False)
    idx = rng.integers(0, 2, (2, 3))
    np.testing.assert_allclose(
        _host(gc.embedding_sq_norms(ForeignArray(to_device(idx)), ForeignArray(to_device(g))), 2),
        ref_embedding_sq_norms(idx, g), rtol=RTOL,
    )  # fmt: skip
    factors = gc.clip_factors(ForeignArray(to_device(np.array([4.0, 0.25]))), 1.0, eps=0.0)
    assert_same_bits(_host(factors, 2), np.array([0.5, 1.0]))


# --------------------------------------------------------------------------- errors


def _cases(a, g):
    """``(call, error)``: bad calls on inputs ``a`` (2, 3, 4) and ``g`` (2, 3, 5) of one device."""
    index = g[:, :, 0].astype(np.int64) if isinstance(g, np.ndarray) else to_device(np.zeros((2, 3), np.int64))
    bad = {k: (v if isinstance(g, np.ndarray) else to_device(v)) for k, v in _bad_arrays().items()}
    return [
        (lambda: gc.dense_sq_norms(a, bad["g_short"]), ValueError),
        (lambda: gc.dense_sq_norms(bad["a_int"], g), TypeError),
        (lambda: gc.dense_sq_norms(a, bad["g_complex"]), TypeError),
        (lambda: gc.dense_sq_norms(a, [1.0]), TypeError),
        (lambda: gc.embedding_sq_norms(bad["idx_float"], g), TypeError),
        (lambda: gc.embedding_sq_norms(bad["idx_wide"], g), ValueError),
        (lambda: gc.embedding_sq_norms(index, bad["g_int"]), TypeError),
        (lambda: gc.sq_norms_from_per_example({"w": a, "b": bad["zero_d"]}), ValueError),
        (lambda: gc.sq_norms_from_per_example([a, None, bad["g_short"]]), ValueError),
        (lambda: gc.sq_norms_from_per_example([a, bad["int8"]]), TypeError),
        (lambda: gc.clip_factors(bad["square"], 1.0), ValueError),
        (lambda: gc.clip_factors(bad["complex"], 1.0), ValueError),
        (lambda: gc.clip_factors(bad["ones"], -1.0), ValueError),
        (lambda: gc.clip_factors(bad["ones"], 1.0, eps=math.nan), ValueError),
    ]


def _bad_arrays():
    return {
        "g_short": np.zeros((1, 3, 2), np.float32),
        "a_int": np.zeros((2, 3, 4), np.int32),
        "g_complex": np.zeros((2, 3, 5), np.complex64),
        "idx_float": np.zeros((2, 3)),
        "idx_wide": np.zeros((2, 4), np.int64),
        "g_int": np.zeros((2, 3, 5), np.int16),
        "zero_d": np.array(1.0, np.float32),
        "int8": np.zeros((2, 3), np.int8),
        "square": np.ones((2, 2)),
        "complex": np.ones(2, np.complex64),
        "ones": np.ones(2),
    }


def test_errors_are_the_cpus_and_launch_nothing(rng, launches):
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    g = rng.standard_normal((2, 3, 5)).astype(np.float32)
    device_a, device_g = to_device(a), to_device(g)
    for k, ((cpu_call, cpu_error), (gpu_call, gpu_error)) in enumerate(zip(_cases(a, g), _cases(device_a, device_g))):
        with pytest.raises(cpu_error) as on_cpu:
            cpu_call()
        with pytest.raises(gpu_error) as on_gpu:
            gpu_call()
        assert str(on_gpu.value) == str(on_cpu.value), k
    assert launches == []
    assert_same_bits(to_host(device_a), a)
    assert_same_bits(to_host(device_g), g)


@pytest.mark.parametrize(
    "call, fragments",
    [
        (lambda a, g, x: gc.dense_sq_norms(a, x), ["output_grads is a CPU array but activations a CUDA array"]),
        (lambda a, g, x: gc.dense_sq_norms(x, g), ["activations is a CPU array but output_grads a CUDA array"]),
        (lambda a, g, x: gc.embedding_sq_norms(x[:, :, 0].astype(np.int64), g), ["indices is a CPU array"]),
        (lambda a, g, x: gc.sq_norms_from_per_example({"w": a, "b": None, "c": x}), ["grads['c'] is a CPU array but grads['w'] a CUDA"]),
    ],
)
def test_inputs_on_two_devices_are_refused(rng, call, fragments, launches):
    a = to_device(rng.standard_normal((2, 3, 4)).astype(np.float32))
    g = to_device(rng.standard_normal((2, 3, 5)).astype(np.float32))
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    with raises_with(ValueError, *fragments, "reads its inputs on one device", "tensor.cuda()"):
        call(a, g, x)
    assert launches == []


def test_torch_integer_tensors_are_described_as_integers():
    """An embedding's indices as a torch tensor: described with their NumPy integer dtype (a
    CUDA tensor goes through the same code, which a CPU tensor exercises here); a bool one
    is refused, naming it."""
    torch = pytest.importorskip("torch")  # installed by the test extra
    from gradclip import _cuda

    tensor = torch.arange(12, dtype=torch.int32).reshape(3, 4)[:, ::2]
    leaf = _cuda.describe(tensor, lambda: "indices")
    assert (leaf.dtype, leaf.shape, leaf.strides, leaf.ptr) == (np.dtype(np.int32), (3, 2), (16, 8), tensor.data_ptr())
    with raises_with(TypeError, "indices has dtype torch.bool"):
        _cuda.describe(torch.zeros(2, dtype=torch.bool), lambda: "indices")
