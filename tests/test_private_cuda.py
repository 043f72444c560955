"""Private training (SPEC §9) on GPU arrays: the CUDA twins on numba-cuda's simulator (set in
conftest.py; unchanged on a GPU with ``NUMBA_ENABLE_CUDASIM=0``), blocks and chunks patched
small.

Against the references and the CPU on the same values: norms within 1e-12, clipped values
bit for bit (one rounding, from the factor of the returned norm), sums rounded once from
the float64 sum, seeded noise on the CPU's stream (each draw within a few units in the
last place: FMA contraction differs between the devices), every dtype, both batch forms
and their layouts, NaN / inf examples, B = 0 and 1, per-layer bounds; launches counted
(one per pass per dtype) and nothing read back to the host; errors with nothing written.
"""

import math

import numpy as np
import pytest

import gradclip as gc
from helpers import (
    DTYPES,
    LAYOUTS,
    ForeignArray,
    OnDevice,
    assert_norms_close,
    assert_rounded_once,
    assert_same_bits,
    device_array_type,
    dtype_id,
    raises_with,
    to_device,
    to_host,
)
from reference import (
    BFLOAT16,
    is_complex,
    ref_clip_factor,
    ref_example_norms,
    ref_layer_norms,
    ref_scale,
    ref_weighted_sum,
    ref_zeroed,
)

cuda = pytest.importorskip("numba.cuda")  # installed by the test extra: never skipped in CI

DeviceArray = device_array_type()
pytestmark = pytest.mark.usefixtures("small_kernels")

SHAPES = [(3, 4), (5,), ()]
"""One example's leaves (a stacked batch adds the example axis in front)."""

ULPS = 4
"""How far a GPU draw may lie from the CPU's, in units in its last place: the same words of
the same generator, through the same polynomials, with multiply-adds fused elsewhere."""

_LAYOUT_NAMES = list(LAYOUTS)


class Stacked:
    """A stacked batch on the device: leaves of shape (B, *shape) in ``layout``, in a dict."""

    def __init__(self, B, dtype, layout, rng, shapes=SHAPES, scale=1.0):
        self.leaves = [OnDevice(layout, (B, *s), dtype, rng, scale) for s in shapes]
        self.B = B

    @property
    def batch(self):
        views = [leaf.view for leaf in self.leaves]
        return {"w": views[0], "rest": views[1:]}

    def cells(self):
        """Per example, its leaves' host values before the call, in flattening order."""
        return [[leaf.host.view_before[i, ...] for leaf in self.leaves] for i in range(self.B)]

    def bases(self):
        return self.leaves

    def assert_cells(self, expected):
        """Every example's leaves hold ``expected[i][k]``, the memory around them untouched."""
        for k, leaf in enumerate(self.leaves):
            leaf.assert_base(np.stack([expected[i][k] for i in range(self.B)]) if self.B else leaf.host.view_before)


class Sequence:
    """A gradclip.Examples of ``B`` dicts on the device; leaf k of example i in ``layout_of(i, k)``."""

    def __init__(self, B, dtype, layout_of, rng, shapes=SHAPES, scale=1.0):
        self.leaves = [
            [OnDevice(layout_of(i, k), s, dtype, rng, scale) for k, s in enumerate(shapes)] for i in range(B)
        ]
        self.B = B

    @property
    def batch(self):
        return gc.Examples({"w": ls[0].view, "rest": [leaf.view for leaf in ls[1:]]} for ls in self.leaves)

    def cells(self):
        return [[leaf.host.view_before for leaf in ls] for ls in self.leaves]

    def bases(self):
        return [leaf for ls in self.leaves for leaf in ls]

    def assert_cells(self, expected):
        for i, ls in enumerate(self.leaves):
            for k, leaf in enumerate(ls):
                leaf.assert_base(expected[i][k], what=f"example {i} leaf {k}")


def _make(form, B, dtype, rng, layout="T_step", **kw):
    if form == "stacked":
        return Stacked(B, dtype, layout, rng, **kw)
    # examples whose leaves differ in layout from example to example: walked in C order
    return Sequence(B, dtype, lambda i, k: _LAYOUT_NAMES[(i + k) % len(_LAYOUT_NAMES)], rng, **kw)


forms = pytest.mark.parametrize("form", ["stacked", "examples"])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def _leaf(result, k):
    return [result["w"], *result["rest"]][k]


def _host(x):
    assert isinstance(x, DeviceArray), f"expected a device array, got {type(x).__name__}"
    return to_host(x)


def _factors(norms, bound, eps):
    return [ref_clip_factor(float(n), bound, eps) for n in norms]


def _clipped(cell, factor):
    """The cell as clipping by ``factor`` leaves it: as it is (1), zeroed (0), else scaled once."""
    if factor == 1.0:
        return np.array(cell, copy=True)
    if factor == 0.0:
        return ref_zeroed(cell)
    return ref_scale(cell, factor)


def _draws_close(got, expected, what="draws"):
    """``got`` lies within `ULPS` units in the last place of the CPU's ``expected``."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    far = np.abs(got - expected) > ULPS * np.spacing(np.abs(expected))
    assert not far.any(), f"{what}: {int(far.sum())} of {far.size} off the CPU's: {got[far][:3]}, {expected[far][:3]}"


# --------------------------------------------------------------------------- norms


# (every dtype and form: test_clipped_sum_matches_the_cpu, whose norms take the same passes)


def test_per_example_norms_any_p_and_the_same_bits_every_call(rng):
    made = _make("stacked", 3, np.float64, rng)
    for p in (1.0, 3.0, math.inf):
        got = gc.per_example_norms(made.batch, p)
        assert got.shape == (3,) and got.dtype == np.float64
        assert_norms_close(_host(got), ref_example_norms(made.cells(), p))
    first = _host(gc.per_example_norms(made.batch))
    assert_norms_close(first, ref_example_norms(made.cells()))
    assert_same_bits(_host(gc.per_example_norms(made.batch)), first)


def test_per_example_norms_do_not_overflow(rng):
    g = rng.standard_normal((3, 9)) * 1e200
    g[1] = rng.standard_normal(9) * 1e-200
    assert_norms_close(_host(gc.per_example_norms(cuda.to_device(g))), ref_example_norms([[x] for x in g]))


# --------------------------------------------------------------------------- clipping


@dtypes
@forms
def test_clip_per_example_in_place(form, dtype, rng):
    made = _make(form, 4, dtype, rng)
    cells = made.cells()
    bound = float(np.median(ref_example_norms(cells)))
    got = gc.clip_per_example_(made.batch, bound)
    norms = _host(got)
    assert_norms_close(norms, ref_example_norms(cells))
    factors = _factors(norms, bound, 1e-6)
    assert 0 < sum(f < 1.0 for f in factors) < 4
    made.assert_cells([[_clipped(c, f) for c in cs] for cs, f in zip(cells, factors)])


def test_clip_per_example_equals_the_cpu_bit_for_bit(rng):
    """Leaves of eighths: every sum of squares is exact, so both devices find the same norms
    and factors, and round the same products once."""
    values = (rng.integers(-40, 41, size=(6, 4, 3)) / 8).astype(np.float32)
    on_cpu = values.transpose(0, 2, 1).copy().transpose(0, 2, 1)
    device = to_device(values)
    cpu_norms = gc.clip_per_example_(on_cpu, 3.0)
    gpu_norms = gc.clip_per_example_(device, 3.0)
    assert_same_bits(_host(gpu_norms), cpu_norms)
    assert_same_bits(to_host(device), on_cpu)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BFLOAT16, np.dtype(np.complex128)], ids=dtype_id)
@forms
def test_clip_per_example_out_of_place(form, dtype, rng):
    made = _make(form, 3, dtype, rng)
    cells = made.cells()
    clipped, norms = gc.clip_per_example(made.batch, 1.0)
    factors = _factors(_host(norms), 1.0, 1e-6)
    made.assert_cells(cells)  # untouched
    per_example = [[_host(_leaf(clipped, k))[i] for k in range(3)] for i in range(3)] if form == "stacked" else [
        [_host(_leaf(example, k)) for k in range(3)] for example in clipped
    ]
    assert form == "stacked" or isinstance(clipped, gc.Examples)
    for i, (cs, f) in enumerate(zip(cells, factors)):
        for k, cell in enumerate(cs):
            assert_same_bits(per_example[i][k], _clipped(cell, f), what=f"example {i} leaf {k}")


@forms
def test_clip_per_example_per_layer(form, rng):
    made = _make(form, 4, np.float32, rng)
    cells = made.cells()
    layer = np.array([ref_layer_norms(cs) for cs in cells])
    bounds = [float(np.median(layer[:, k])) for k in range(3)]
    got = _host(gc.clip_per_example_(made.batch, bounds, eps=0.0))
    assert got.shape == (4, 3)
    assert_norms_close(got.ravel(), layer.ravel())
    factors = [[ref_clip_factor(got[i, k], bounds[k], 0.0) for k in range(3)] for i in range(4)]
    made.assert_cells([[_clipped(c, f) for c, f in zip(cs, fs)] for cs, fs in zip(cells, factors)])


@pytest.mark.parametrize(
    "form, dtype", [("stacked", np.dtype(np.float32)), ("examples", BFLOAT16), ("stacked", np.dtype(np.complex64))],
    ids=lambda x: dtype_id(x) if isinstance(x, np.dtype) else x,
)
def test_nonfinite_examples_are_zeroed_and_counted(form, dtype, rng):
    made = _make(form, 4, dtype, rng)
    leaves = made.leaves
    infinite = complex(1.0, -np.inf) if is_complex(dtype) else -np.inf  # one part inf, the other finite
    if form == "stacked":
        leaves[0].poke(np.nan, (1, 2, 3))
        leaves[1].poke(infinite, (3, 0))
    else:
        leaves[1][0].poke(np.nan, (2, 3))
        leaves[3][1].poke(infinite, (0,))
    cells = made.cells()
    total, stats = gc.clipped_sum(made.batch, 1.0)
    norms = _host(stats.norms)
    assert math.isnan(norms[1]) and norms[3] == math.inf
    assert _host(stats.nonfinite) == 2 and _host(stats.clipped) == sum(0 < f < 1 for f in _factors(norms, 1.0, 1e-6))
    factors = _factors(norms, 1.0, 1e-6)
    for k in range(3):
        exact, scale = ref_weighted_sum([cs[k] for cs in cells], factors)
        assert_rounded_once(_host(_leaf(total, k)), exact, scale, 6)
    gc.clip_per_example_(made.batch, 1.0)
    made.assert_cells([[_clipped(c, f) for c in cs] for cs, f in zip(cells, factors)])


# --------------------------------------------------------------------------- the clipped sum


@dtypes
@forms
def test_clipped_sum_matches_the_cpu(form, dtype, rng):
    made = _make(form, 5, dtype, rng)
    cells = made.cells()
    bound = float(np.median(ref_example_norms(cells)))
    total, stats = gc.clipped_sum(made.batch, bound, eps=0.0, normalize_by=2.0)
    host_batch = [{"w": cs[0], "rest": list(cs[1:])} for cs in cells]
    cpu_total, cpu_stats = gc.clipped_sum(gc.Examples(host_batch), bound, eps=0.0, normalize_by=2.0)
    norms = _host(stats.norms)
    assert_norms_close(norms, cpu_stats.norms)
    assert_norms_close(_host(stats.layer_norms).ravel(), cpu_stats.layer_norms.ravel())
    assert _host(stats.clipped) == cpu_stats.clipped and _host(stats.nonfinite) == 0
    factors = _factors(norms, bound, 0.0)
    for k, shape in enumerate(SHAPES):
        out = _leaf(total, k)
        assert isinstance(out, DeviceArray) and out.shape == shape and out.dtype == dtype
        exact, scale = ref_weighted_sum([cs[k] for cs in cells], factors)
        assert_rounded_once(_host(out), exact / 2.0, scale / 2.0, 7, what=f"leaf {k}")
    made.assert_cells(cells)  # only read


@pytest.mark.parametrize("B", [0, 1])
def test_zero_and_one_example(B, rng):
    g = {"w": to_device(rng.standard_normal((B, 3, 2)).astype(np.float32)), "b": to_device(rng.standard_normal((B,)))}
    cpu = {k: to_host(v) for k, v in g.items()}
    assert _host(gc.per_example_norms(g)).shape == (B,)
    noise = gc.GaussianNoise(seed=8)
    total, stats = gc.clipped_sum(g, 0.5, noise_multiplier=1.0, noise=noise, normalize_by=3.0)
    cpu_noise = gc.GaussianNoise(seed=8)
    cpu_total, cpu_stats = gc.clipped_sum(cpu, 0.5, noise_multiplier=1.0, noise=cpu_noise, normalize_by=3.0)
    assert noise.draws == 7 and _host(stats.layer_norms).shape == (B, 2)
    assert_norms_close(_host(stats.norms), cpu_stats.norms)
    assert _host(stats.clipped) == cpu_stats.clipped and _host(stats.nonfinite) == 0
    draws = 0.5 * gc.GaussianNoise(seed=8).standard_normal(7)
    for name, z in (("w", draws[:6].reshape(3, 2)), ("b", draws[6])):
        out = _host(total[name])
        assert out.shape == cpu_total[name].shape and out.dtype == cpu_total[name].dtype
        factor = ref_clip_factor(cpu_stats.norms[0], 0.5, 1e-6) if B else 0.0  # B = 0: no example, the noise alone
        exact, scale = ref_weighted_sum([cpu[name][0] if B else np.zeros(out.shape)], [factor], z)
        assert_rounded_once(out, exact / 3.0, scale / 3.0, 3 + ULPS)
    assert _host(gc.clip_per_example_(g, 1.0)).shape == (B,)


def test_clip_to_zero_and_the_same_leaf_twice(rng):
    w = to_device(rng.standard_normal((3, 5)))
    host_w = to_host(w)
    total, stats = gc.clipped_sum([w, w], 0.0, eps=0.0)  # every example clipped to nothing
    assert not _host(total[0]).any() and _host(stats.clipped) == 3
    assert _host(stats.layer_norms).shape == (3, 2)  # one column per position, of one leaf
    assert_same_bits(_host(stats.layer_norms)[:, 0], _host(stats.layer_norms)[:, 1])
    total, _ = gc.clipped_sum([w, w], math.inf)
    exact, scale = ref_weighted_sum(list(host_w), [1.0] * 3)
    assert_rounded_once(_host(total[1]), exact, scale, 4)


# --------------------------------------------------------------------------- noise


def _stream_twins(secure):
    """Two generators of one stream (a secure one's key copied: the test reads the stream twice)."""
    if not secure:
        return gc.GaussianNoise(seed=12), gc.GaussianNoise(seed=12)
    first, second = gc.GaussianNoise(secure=True), gc.GaussianNoise(secure=True)
    second._key = first._key.copy()
    return first, second


@pytest.mark.parametrize("secure", [False, True], ids=["philox", "chacha20"])
def test_draws_follow_the_cpu_stream(secure):
    gpu_noise, cpu_noise = _stream_twins(secure)
    n = 1000 if not secure else 150
    gpu_noise.standard_normal(3)  # both streams mid-block
    cpu = cpu_noise.standard_normal(3 + n)[3:]
    g = to_device(np.zeros(n))
    gc.add_noise_(g, 1.0, gpu_noise)
    assert gpu_noise.draws == 3 + n
    _draws_close(_host(g), cpu)


@dtypes
@pytest.mark.parametrize("layout", ["C", "T_step"])
def test_add_noise_in_memory_order(dtype, layout, rng):
    leaves = [OnDevice(layout, s, dtype, rng) for s in ((4, 3), (5,), ())]
    noise = gc.GaussianNoise(seed=21)
    gc.add_noise_([leaf.view for leaf in leaves], 0.25, noise)
    sizes = [leaf.host.view.size * (1 + is_complex(dtype)) for leaf in leaves]
    assert noise.draws == sum(sizes)
    draws = gc.GaussianNoise(seed=21).standard_normal(sum(sizes))
    start = 0
    for leaf, size in zip(leaves, sizes):
        rank = _memory_rank(leaf.host.view)
        z = draws[start : start + size]
        noise_of = 0.25 * (z[2 * rank] + 1j * z[2 * rank + 1]) if is_complex(dtype) else 0.25 * z[rank]
        exact = leaf.host.view_before.astype(np.complex128 if is_complex(dtype) else np.float64) + noise_of
        got = leaf.values()
        assert_rounded_once(got, exact, np.abs(exact) + 0.25 * 8.5, ULPS, what=layout)
        leaf.assert_base(got)  # and the memory around it untouched
        start += size


def _memory_rank(view):
    """Each element's rank in ``view``'s memory (lowest address first)."""
    if view.ndim == 0:
        return np.zeros((), np.int64)
    offsets = sum(np.indices(view.shape) * np.array(view.strides).reshape((-1,) + (1,) * view.ndim))
    return np.argsort(np.argsort(offsets.ravel(), kind="stable")).reshape(view.shape)


def test_add_noise_on_cpu_and_gpu_leaves_takes_one_stream(rng):
    gpu = to_device(np.zeros(6))
    cpu = np.zeros(4)
    noise = gc.GaussianNoise(seed=5)
    gc.add_noise_([cpu, gpu], 1.0, noise)
    draws = gc.GaussianNoise(seed=5).standard_normal(10)
    assert noise.draws == 10
    assert_same_bits(cpu, draws[:4])
    _draws_close(_host(gpu), draws[4:])
    before = to_host(gpu)
    gc.add_noise_(gpu, 0.0, noise)  # std 0: nothing drawn, nothing written
    assert noise.draws == 10 and np.array_equal(to_host(gpu), before)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.complex128)], ids=dtype_id)
@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_clipped_sum_noise_is_the_cpu_stream(dtype, per_layer, rng):
    made = _make("stacked", 4, dtype, rng, layout="neg")
    cells = made.cells()
    layer = np.array([ref_layer_norms(cs) for cs in cells])
    bound = [float(np.median(layer[:, k])) for k in range(3)] if per_layer else 1.5
    noise = gc.GaussianNoise(seed=11)
    noise.standard_normal(5)  # mid-stream
    total, stats = gc.clipped_sum(made.batch, bound, noise_multiplier=0.7, noise=noise, normalize_by=3.0)
    outs = [_host(_leaf(total, k)) for k in range(3)]
    sizes = sum(o.size * (1 + is_complex(dtype)) for o in outs)
    assert noise.draws == 5 + sizes
    cpu_noise = gc.GaussianNoise(seed=11)
    cpu_noise.standard_normal(5)
    host_views = [leaf.host.view for leaf in made.leaves]  # the device's layout
    cpu_total, cpu_stats = gc.clipped_sum(host_views, bound, noise_multiplier=0.7, noise=cpu_noise, normalize_by=3.0)
    std = 0.7 * (math.sqrt(sum(b * b for b in bound)) if per_layer else bound)
    stream = gc.GaussianNoise(seed=11)
    draws = stream.standard_normal(5 + sizes)[5:]
    start = 0
    for k, out in enumerate(outs):
        assert _leaf(total, k).strides == cpu_total[k].strides  # laid out as on the CPU: the noise in its order
        size = out.size * (1 + is_complex(dtype))
        rank = _memory_rank(cpu_total[k])
        z = draws[start : start + size]
        noise_k = std * (z[2 * rank] + 1j * z[2 * rank + 1]) if is_complex(dtype) else std * z[rank]
        start += size
        if per_layer:
            factors = [ref_clip_factor(v, bound[k], 1e-6) for v in _host(stats.layer_norms)[:, k]]
        else:
            factors = _factors(_host(stats.norms), bound, 1e-6)
        exact, scale = ref_weighted_sum([cs[k] for cs in cells], factors, noise_k)
        assert_rounded_once(out, exact / 3.0, (scale + std * 8.5) / 3.0, 6 + ULPS, what=f"leaf {k}")
    assert_norms_close(_host(stats.layer_norms).ravel(), cpu_stats.layer_norms.ravel())


# --------------------------------------------------------------------------- launches


def test_one_launch_per_pass_and_dtype_whatever_the_examples(rng, launches, monkeypatch):
    made = Sequence(9, np.float32, lambda i, k: "C" if i % 2 else "step3", rng, shapes=[(3,), (2, 2)])
    extra = [OnDevice("C", (9, 2), np.float16, rng)]
    batch = gc.Examples({"w": ex["w"], "rest": ex["rest"] + [extra[0].view[i]]} for i, ex in enumerate(made.batch))
    monkeypatch.setattr(DeviceArray, "copy_to_host", lambda *a, **k: pytest.fail("read back to the host"))
    gc.per_example_norms(batch)
    assert launches == ["sumsq_cuda"] * 2 + ["finish_cuda", "fold_examples_cuda"]
    launches.clear()
    gc.clipped_sum(batch, 1.0, noise_multiplier=1.0, noise=gc.GaussianNoise(seed=0))
    assert launches == ["sumsq_cuda"] * 2 + ["finish_cuda", "fold_examples_cuda"] + ["weighted_sum_cuda"] * 2
    launches.clear()
    gc.clip_per_example_(batch, 1.0)
    assert launches == ["sumsq_cuda"] * 2 + ["finish_cuda", "fold_examples_cuda"] + ["clip_cells_cuda_"] * 2
    launches.clear()
    gc.add_noise_([leaf.view for leaf in extra] + [made.leaves[0][0].view], 1.0, gc.GaussianNoise(seed=0))
    assert launches == ["add_noise_cuda_"] * 2


# --------------------------------------------------------------------------- errors


def _clippable(rng):
    leaves = [OnDevice("C", (2, 3), np.float32, rng, scale=10), OnDevice("C", (2,), np.float32, rng, scale=10)]
    return leaves, [leaf.view for leaf in leaves]


def _untouched(leaves):
    for leaf in leaves:
        leaf.assert_base(leaf.host.view_before)


CALLS = {
    "per_example_norms": lambda b: gc.per_example_norms(b),
    "clip_per_example_": lambda b: gc.clip_per_example_(b, 0.1),
    "clipped_sum": lambda b: gc.clipped_sum(b, 0.1),
}
calls = pytest.mark.parametrize("name", list(CALLS))


@calls
def test_a_batch_on_two_devices(name, rng):
    leaves, views = _clippable(rng)
    host_leaf = rng.standard_normal((2, 4)) * 10
    before = host_leaf.copy()
    with raises_with(ValueError, "grads[2] is a CPU array but grads[0] a CUDA array", "one device"):
        CALLS[name]([*views, host_leaf])
    with raises_with(ValueError, "examples[1] holds CPU arrays but examples[0] CUDA arrays", "one device"):
        CALLS[name](gc.Examples([[views[0][0]], [host_leaf[0, :3]]]))
    _untouched(leaves)
    assert_same_bits(host_leaf, before)


@calls
def test_bad_gpu_batches(name, rng):
    leaves, views = _clippable(rng)
    with raises_with(ValueError, "grads[1] holds 3 examples", "grads[0] holds 2"):
        CALLS[name]([views[0], to_device(np.zeros((3, 4)))])
    with raises_with(ValueError, "grads[2] is 0-d", "example axis first"):
        CALLS[name]([*views, to_device(np.array(1.0))])
    with raises_with(ValueError, "examples[1] differs from examples[0] in shape at grads[0]", "(3,), got (2,)"):
        CALLS[name](gc.Examples([[views[0][0]], [views[1]]]))
    with raises_with(ValueError, "examples[1] differs from examples[0] in dtype at grads[0]", "float32, got float64"):
        CALLS[name](gc.Examples([[views[1]], [to_device(np.zeros(2))]]))
    _untouched(leaves)


def test_bad_bounds_and_read_only_leaves_write_nothing(rng):
    leaves, views = _clippable(rng)
    for bound, fragment in (([1.0, 2.0, 3.0], "max_norm holds 3 bounds"), (-1.0, "max_norm must be >= 0")):
        with raises_with(ValueError, fragment):
            gc.clip_per_example_(views, bound)
    read_only = ForeignArray(leaves[0].base, readonly=True)
    with raises_with(ValueError, "grads[1] is read-only", "clip_per_example_"):
        gc.clip_per_example_([views[1], read_only], 0.1)
    with raises_with(ValueError, "grads[0] is read-only", "add_noise_"):
        gc.add_noise_([read_only], 1.0, noise := gc.GaussianNoise(seed=1))
    assert noise.draws == 0
    with raises_with(ValueError, "examples[1] holds the same array as examples[0]"):
        gc.clip_per_example_(gc.Examples([[views[1]], [views[1]]]), 0.1)
    _untouched(leaves)


def test_quantile_clip_norm_reads_device_norms(rng):
    made = _make("stacked", 6, np.float32, rng)
    _, stats = gc.clipped_sum(made.batch, 1.0)
    adaptive, twin = gc.QuantileClipNorm(initial=1.0), gc.QuantileClipNorm(initial=1.0)
    assert adaptive.update(stats.norms) == twin.update(_host(stats.norms))
