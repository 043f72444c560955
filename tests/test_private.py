"""Private training (SPEC §9): per-example norms, clipping and the noised clipped sum on
both batch forms, every dtype and layout, against float64 / math.fsum references; noise
placement; QuantileClipNorm; every error path (message, and nothing written)."""

import math

import numba
import numpy as np
import pytest

import gradclip as gc
from gradclip._kernels import cpu as cpu_kernels
from helpers import (
    LAYOUTS,
    NORM_TYPES,
    Frozen,
    Strided,
    assert_norms_close,
    assert_rounded_once,
    assert_same_bits,
    dtypes,
    layouts,
    raises_with,
)
from reference import (
    is_complex,
    ref_clip_factor,
    ref_example_norms,
    ref_layer_norms,
    ref_scale,
    ref_weighted_sum,
)

SHAPES = [(3, 4), (5,), ()]
"""One example's leaves (a stacked batch adds the example axis in front)."""


class Stacked:
    """A stacked batch of ``B`` examples: Strided leaves of shape (B, *shape), in a dict."""

    def __init__(self, B, dtype, layout, rng, shapes=SHAPES, scale=1.0):
        self.leaves = [Strided(layout, (B, *s), dtype, rng, scale) for s in shapes]
        self.B = B

    @property
    def batch(self):
        views = [leaf.view for leaf in self.leaves]
        return {"w": views[0], "rest": views[1:]}

    def cells(self):
        """Per example, its leaves (views) in flattening order."""
        return [[leaf.view[i, ...] for leaf in self.leaves] for i in range(self.B)]

    def leaf_of(self, result, k):
        return [result["w"], *result["rest"]][k]


class Sequence:
    """A gradclip.Examples of ``B`` dicts; leaf k of example i has layout ``layouts(i, k)``."""

    def __init__(self, B, dtype, layout_of, rng, shapes=SHAPES, scale=1.0):
        self.leaves = [[Strided(layout_of(i, k), s, dtype, rng, scale) for k, s in enumerate(shapes)] for i in range(B)]
        self.B = B

    @property
    def batch(self):
        return gc.Examples({"w": ls[0].view, "rest": [leaf.view for leaf in ls[1:]]} for ls in self.leaves)

    def cells(self):
        return [[leaf.view for leaf in ls] for ls in self.leaves]

    def leaf_of(self, result, k):
        return [result["w"], *result["rest"]][k]


_LAYOUT_NAMES = list(LAYOUTS)


def _make(form, B, dtype, layout, rng, **kw):
    if form == "stacked":
        return Stacked(B, dtype, layout, rng, **kw)
    if form == "examples":
        return Sequence(B, dtype, lambda i, k: layout, rng, **kw)
    # examples whose leaves differ in layout from example to example: read through copies
    return Sequence(B, dtype, lambda i, k: _LAYOUT_NAMES[(i + k) % len(_LAYOUT_NAMES)], rng, **kw)


forms = pytest.mark.parametrize("form", ["stacked", "examples", "mixed"])


def _frozen(made):
    if isinstance(made, Stacked):
        return Frozen(*[leaf.base for leaf in made.leaves])
    return Frozen(*[leaf.base for ls in made.leaves for leaf in ls])


def _terms(made):
    return made.B + 2


# --------------------------------------------------------------------------- norms


@dtypes
@layouts
@forms
def test_per_example_norms(form, dtype, layout, rng):
    made = _make(form, 5, dtype, layout, rng)
    got = gc.per_example_norms(made.batch)
    assert got.dtype == np.float64
    assert_norms_close(got, ref_example_norms(made.cells()))


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p:g}")
@forms
def test_per_example_norms_any_p(form, p, rng):
    made = _make(form, 4, np.float32, "step_all", rng)
    assert_norms_close(gc.per_example_norms(made.batch, p), ref_example_norms(made.cells(), p))


def test_per_example_norms_do_not_overflow(rng):
    g = rng.standard_normal((3, 1000)) * 1e200
    g[1] = rng.standard_normal(1000) * 1e-200  # and do not underflow either (squares below 2**-1074)
    expected = ref_example_norms([[x] for x in g])
    assert 0 < expected[1] < 1e-190 and expected[0] > 1e200
    assert_norms_close(gc.per_example_norms(g), expected)
    total, stats = gc.clipped_sum(g, 1.0)
    assert_norms_close(stats.norms, expected)


def test_a_repeated_leaf_counts_once(rng):
    w = rng.standard_normal((4, 6))
    b = rng.standard_normal((4, 2))
    assert_norms_close(gc.per_example_norms([w, b, w]), ref_example_norms([[w[i], b[i]] for i in range(4)]))


# --------------------------------------------------------------------------- clipping in place


def _expected_cell(cell, factor):
    if factor == 1.0:
        return np.array(cell, copy=True)
    if factor == 0.0:
        return np.zeros_like(cell)
    return ref_scale(cell, factor)


@dtypes
@layouts
@pytest.mark.parametrize("form", ["stacked", "examples"])
def test_clip_per_example_in_place(form, dtype, layout, rng):
    made = _make(form, 6, dtype, layout, rng)
    cells = made.cells()
    before = [[np.array(c, copy=True) for c in cs] for cs in cells]
    norms = ref_example_norms(cells)
    bound = float(np.median(norms))
    got = gc.clip_per_example_(made.batch, bound)
    assert_norms_close(got, norms)
    for i, cs in enumerate(cells):
        factor = ref_clip_factor(got[i], bound, 1e-6)
        for k, cell in enumerate(cs):
            assert_same_bits(cell, _expected_cell(before[i][k], factor), what=f"example {i} leaf {k}")
    leaves = made.leaves if form == "stacked" else [leaf for ls in made.leaves for leaf in ls]
    for leaf in leaves:  # memory around the views is untouched
        outside = leaf.outside_mask()
        assert_same_bits(leaf.base[outside], leaf.before[outside], what="memory outside the leaf")


def test_clip_per_example_writes_nothing_where_the_factor_is_one(rng):
    g = np.array([[3.0, 4.0], [0.3, 0.4]])
    gc.clip_per_example_(g, 1.0, eps=0.0)
    assert_same_bits(g, np.array([ref_scale(np.array([3.0, 4.0]), 1.0 / 5.0), [0.3, 0.4]]))
    read_only_small = np.array([[0.3, 0.4]])
    read_only_small.flags.writeable = False
    with raises_with(ValueError, "is read-only", "clip_per_example_"):
        gc.clip_per_example_(read_only_small, 1.0)  # refused even though nothing would be written


@forms
def test_clip_per_example_per_layer(form, rng):
    made = _make(form, 5, np.float32, "C", rng)
    cells = made.cells()
    before = [[np.array(c, copy=True) for c in cs] for cs in cells]
    layer = np.array([ref_layer_norms(cs) for cs in cells])
    bounds = [float(np.median(layer[:, k])) for k in range(len(SHAPES))]
    got = gc.clip_per_example_(made.batch, bounds, eps=0.0)
    assert got.shape == (5, len(SHAPES))
    assert_norms_close(got.ravel(), layer.ravel())
    for i, cs in enumerate(cells):
        for k, cell in enumerate(cs):
            factor = ref_clip_factor(got[i, k], bounds[k], 0.0)
            assert_same_bits(cell, _expected_cell(before[i][k], factor), what=f"example {i} leaf {k}")


@pytest.mark.parametrize("form", ["stacked", "examples"])
def test_nonfinite_examples_are_zeroed_and_counted(form, rng):
    made = _make(form, 6, np.float32, "T", rng)
    cells = made.cells()
    cells[2][0][1, 2] = np.nan
    cells[4][1][3] = -np.inf
    before = [[np.array(c, copy=True) for c in cs] for cs in cells]
    total, stats = gc.clipped_sum(made.batch, 1.0)
    assert stats.nonfinite == 2
    assert math.isnan(stats.norms[2]) and stats.norms[4] == math.inf
    assert np.isfinite(np.concatenate([np.ravel(x) for x in (total["w"], *total["rest"])])).all()
    factors = [ref_clip_factor(n, 1.0, 1e-6) for n in stats.norms]
    assert factors[2] == factors[4] == 0.0
    assert stats.clipped == sum(0.0 < f < 1.0 for f in factors)
    for k in range(len(SHAPES)):
        exact, scale = ref_weighted_sum([cs[k] for cs in before], factors)
        assert_rounded_once(made.leaf_of(total, k), exact, scale, _terms(made))
    norms = gc.clip_per_example_(made.batch, 1.0)
    assert math.isnan(norms[2]) and norms[4] == math.inf
    for i in (2, 4):
        for cell in cells[i]:
            assert (np.asarray(cell) == 0).all()


def test_out_of_place_clip_per_example(rng):
    made = Stacked(4, np.float64, "neg", rng)
    frozen = _frozen(made)
    clipped, norms = gc.clip_per_example(made.batch, 1.0)
    frozen.check()
    for i in range(4):
        factor = ref_clip_factor(norms[i], 1.0, 1e-6)
        for k, leaf in enumerate(made.leaves):
            assert_same_bits(made.leaf_of(clipped, k)[i], _expected_cell(leaf.view[i], factor))
    seq = Sequence(3, np.float32, lambda i, k: "C", rng)
    frozen = _frozen(seq)
    clipped, norms = gc.clip_per_example(seq.batch, 0.5)
    frozen.check()
    assert isinstance(clipped, gc.Examples) and len(clipped) == 3
    for i, cs in enumerate(seq.cells()):
        factor = ref_clip_factor(norms[i], 0.5, 1e-6)
        for k, cell in enumerate(cs):
            assert_same_bits(seq.leaf_of(clipped[i], k), _expected_cell(cell, factor))


# --------------------------------------------------------------------------- the clipped sum


def _memory_rank(view):
    """Each element's rank in ``view``'s memory (lowest address first); for a dense array,
    its position in memory."""
    if view.ndim == 0:
        return np.zeros((), np.int64)
    offsets = sum(np.indices(view.shape) * np.array(view.strides).reshape((-1,) + (1,) * view.ndim))
    return np.argsort(np.argsort(offsets.ravel(), kind="stable")).reshape(view.shape)


def _noise_for(views, draws, std):
    """The noise each element of ``views`` gets: ``draws`` leaf after leaf, each leaf in its
    memory order, two per complex element (real part first)."""
    noise, start = [], 0
    for view in views:
        rank = _memory_rank(view)
        if is_complex(view.dtype):
            noise.append(std * (draws[start + 2 * rank] + 1j * draws[start + 2 * rank + 1]))
        else:
            noise.append(std * draws[start + rank])
        start += view.size * (1 + is_complex(view.dtype))
    return noise


@dtypes
@layouts
@forms
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_clipped_sum(form, dtype, layout, eps, rng):
    made = _make(form, 6, dtype, layout, rng)
    frozen = _frozen(made)
    cells = made.cells()
    norms = ref_example_norms(cells)
    bound = float(np.median(norms))
    total, stats = gc.clipped_sum(made.batch, bound, eps=eps)
    frozen.check()
    assert_norms_close(stats.norms, norms)
    assert_norms_close(stats.layer_norms.ravel(), np.array([ref_layer_norms(cs) for cs in cells]).ravel())
    factors = [ref_clip_factor(n, bound, eps) for n in stats.norms]
    assert stats.clipped == sum(f < 1.0 for f in factors) and stats.nonfinite == 0
    for k, shape in enumerate(SHAPES):
        out = made.leaf_of(total, k)
        assert isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype
        exact, scale = ref_weighted_sum([cs[k] for cs in cells], factors)
        assert_rounded_once(out, exact, scale, _terms(made), what=f"leaf {k}")


@dtypes
@pytest.mark.parametrize("form", ["stacked", "mixed"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_clipped_sum_with_noise(form, dtype, per_layer, rng):
    made = _make(form, 5, dtype, "T_step", rng)
    cells = made.cells()
    layer = np.array([ref_layer_norms(cs) for cs in cells])
    bound = [float(np.median(layer[:, k])) for k in range(len(SHAPES))] if per_layer else 1.5
    noise = gc.GaussianNoise(seed=11)
    noise.standard_normal(5)  # the sum starts mid-stream
    total, stats = gc.clipped_sum(made.batch, bound, noise_multiplier=0.7, noise=noise, normalize_by=3.0)
    outs = [made.leaf_of(total, k) for k in range(len(SHAPES))]
    sizes = sum(o.size * (1 + is_complex(o.dtype)) for o in outs)
    assert noise.draws == 5 + sizes
    std = 0.7 * (math.sqrt(sum(b * b for b in bound)) if per_layer else bound)
    stream = gc.GaussianNoise(seed=11)
    stream.standard_normal(5)
    noise_of = _noise_for(outs, stream.standard_normal(sizes), std)
    for k, out in enumerate(outs):
        if per_layer:
            factors = [ref_clip_factor(stats.layer_norms[i, k], bound[k], 1e-6) for i in range(5)]
        else:
            factors = [ref_clip_factor(n, bound, 1e-6) for n in stats.norms]
        exact, scale = ref_weighted_sum([cs[k] for cs in cells], factors, noise_of[k])
        assert_rounded_once(out, exact / 3.0, scale / 3.0, _terms(made) + 1, what=f"leaf {k}")


def test_noise_goes_to_the_result_in_its_memory_order(rng):
    g = np.zeros((2, 3, 4), np.float64)  # zero examples: the result is the noise alone
    for view in (g, g.transpose(0, 2, 1)):
        total, _ = gc.clipped_sum({"w": view}, 1.0, noise_multiplier=2.0, noise=gc.GaussianNoise(seed=3))
        out = total["w"]
        assert out.flags.c_contiguous or out.flags.f_contiguous  # dense: memory rank = position
        expected = 2.0 * gc.GaussianNoise(seed=3).standard_normal(out.size)[_memory_rank(out)]
        assert_same_bits(out, expected)
    assert total["w"].strides == g.transpose(0, 2, 1)[0].strides  # laid out like the examples


@pytest.mark.parametrize("B", [0, 1])
def test_zero_and_one_example(B, rng):
    g = {"w": rng.standard_normal((B, 3, 2)).astype(np.float32), "b": rng.standard_normal((B,))}
    norms = gc.per_example_norms(g)
    assert norms.shape == (B,)
    total, stats = gc.clipped_sum(g, 0.5, eps=0.0)
    assert total["w"].shape == (3, 2) and total["w"].dtype == np.float32 and total["b"].shape == ()
    if B == 0:
        assert (total["w"] == 0).all() and total["b"] == 0 and stats.norms.shape == (0,)
        assert stats.layer_norms.shape == (0, 2) and stats.clipped == stats.nonfinite == 0
        noised, _ = gc.clipped_sum(g, 0.5, noise_multiplier=1.0, noise=gc.GaussianNoise(seed=8))
        draws = 0.5 * gc.GaussianNoise(seed=8).standard_normal(7)
        assert_same_bits(noised["w"], draws[:6].reshape(3, 2).astype(np.float32))
        assert noised["b"] == draws[6]
        assert gc.clip_per_example_(g, 1.0).shape == (0,)
    else:
        factor = ref_clip_factor(norms[0], 0.5, 0.0)
        exact, scale = ref_weighted_sum([g["w"][0]], [factor])
        assert_rounded_once(total["w"], exact, scale, 2)


def test_clip_to_zero_and_infinite_bounds(rng):
    g = rng.standard_normal((3, 5))
    g[1] = 0.0
    total, stats = gc.clipped_sum(g, 0.0, eps=0.0)  # every nonzero example clipped to nothing
    assert (total == 0).all() and stats.clipped == 2
    total, stats = gc.clipped_sum(g, math.inf)
    exact, scale = ref_weighted_sum(list(g), [1.0, 1.0, 1.0])
    assert_rounded_once(total, exact, scale, 4)
    assert stats.clipped == 0


def test_the_same_bits_for_any_thread_count(rng, monkeypatch):
    """The parallel kernels at one thread and at all of them, and the serial ones."""
    threads = numba.config.NUMBA_NUM_THREADS
    assert threads >= 2, "needs NUMBA_NUM_THREADS >= 2"
    # B = 9: the sums of squares' last quad has one example; the strided leaf is read
    # one example at a time.
    strided = rng.standard_normal((9, 400, 300)).astype(np.float32)[:, ::2, ::3]
    g = [rng.standard_normal((9, 300, 500)).astype(np.float32), rng.standard_normal((9, 70_001)), strided]

    def bits():
        total, stats = gc.clipped_sum(g, 20.0, noise_multiplier=1.0, noise=gc.GaussianNoise(seed=4))
        noised = [x.copy() for x in total]
        gc.add_noise_(noised, 0.5, gc.GaussianNoise(seed=5))
        return [*(x.tobytes() for x in (*total, *noised)), stats.norms.tobytes()]

    results = []
    for n in (1, threads, 1):
        numba.set_num_threads(n)
        try:
            results.append(bits())
        finally:
            numba.set_num_threads(threads)
    monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN", 1 << 62)
    results.append(bits())
    assert results[0] == results[1] == results[2] == results[3]


def test_results_in_the_callers_framework(rng):
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    g = rng.standard_normal((4, 3, 2)).astype(np.float32)
    expected, _ = gc.clipped_sum(g, 1.0)
    total, _ = gc.clipped_sum({"w": torch.from_numpy(g)}, 1.0)
    assert isinstance(total["w"], torch.Tensor)
    assert_same_bits(total["w"].numpy(), expected)
    total, _ = gc.clipped_sum(gc.Examples([[jnp.asarray(x)] for x in g]), 1.0)
    assert type(total[0]).__module__.startswith("jax")
    assert_same_bits(np.asarray(total[0]), expected)
    with raises_with(ValueError, "examples[0]: grads[0] is a JAX array", "clip_per_example("):
        gc.clip_per_example_(gc.Examples([[jnp.asarray(x)] for x in g]), 1.0)


def test_extra_memory_is_the_result(rng):
    """What clipped_sum allocates (NumPy's and the kernels' allocations, which tracemalloc
    sees) is the result, O(B) and a fixed scratch per thread: no per-example copy."""
    import tracemalloc

    g = [rng.standard_normal((16, 512, 512)).astype(np.float32), rng.standard_normal((16, 1000)).astype(np.float32)]
    gc.clipped_sum(g, 1.0, noise_multiplier=1.0, noise=gc.GaussianNoise(seed=0))  # compile first
    tracemalloc.start()
    try:
        total, _ = gc.clipped_sum(g, 1.0, noise_multiplier=1.0, noise=gc.GaussianNoise(seed=0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result = sum(t.nbytes for t in total)
    scratch = numba.config.NUMBA_NUM_THREADS * 160 * 1024  # per chunk: accumulator, draws, stages
    assert peak <= 1.1 * result + scratch, (peak, result)


# --------------------------------------------------------------------------- against Optax and Opacus


def test_equals_optax_per_example_global_norm_clip(rng):
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    g = [rng.standard_normal((16, 7, 5)).astype(np.float32), rng.standard_normal((16, 5)).astype(np.float32)]
    bound = float(np.median(ref_example_norms([[x[i] for x in g] for i in range(16)])))
    summed, num_clipped = optax.per_example_global_norm_clip([jnp.asarray(x) for x in g], bound)
    total, stats = gc.clipped_sum(g, bound, eps=0.0)
    assert stats.clipped == int(num_clipped)
    for mine, theirs in zip(total, summed):
        np.testing.assert_allclose(mine, np.asarray(theirs), rtol=2e-6, atol=1e-6)


def _opacus_sum(per_sample, max_grad_norm, per_layer):
    torch = pytest.importorskip("torch")
    optimizers = pytest.importorskip("opacus.optimizers")
    params = [torch.nn.Parameter(torch.zeros(x.shape[1:])) for x in per_sample]
    for param, x in zip(params, per_sample):
        param.grad_sample = torch.from_numpy(x)
    kind = optimizers.DPPerLayerOptimizer if per_layer else optimizers.DPOptimizer
    optimizer = kind(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        expected_batch_size=per_sample[0].shape[0],
    )  # fmt: skip
    optimizer.clip_and_accumulate()
    return [param.summed_grad.numpy() for param in params]


@pytest.mark.parametrize("per_layer", [False, True], ids=["flat", "per_layer"])
def test_equals_opacus_clip_and_accumulate(per_layer, rng):
    g = [rng.standard_normal((32, 10, 6)).astype(np.float32), rng.standard_normal((32, 10)).astype(np.float32)]
    layer = np.array([ref_layer_norms([x[i] for x in g]) for i in range(32)])
    if per_layer:
        bound = [float(np.median(layer[:, k])) for k in range(2)]
    else:
        bound = float(np.median(np.sqrt((layer**2).sum(axis=1))))
    theirs = _opacus_sum(g, bound, per_layer)
    total, _ = gc.clipped_sum(g, bound)  # eps 1e-6: Opacus' factor
    for mine, other in zip(total, theirs):
        np.testing.assert_allclose(mine, other, rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------- add_noise_


@dtypes
@layouts
def test_add_noise_in_memory_order(dtype, layout, rng):
    leaves = [Strided(layout, s, dtype, rng) for s in ((4, 5), (7,), ())]
    noise = gc.GaussianNoise(seed=21)
    gc.add_noise_([leaf.view for leaf in leaves], 0.25, noise)
    sizes = [leaf.view.size * (1 + is_complex(dtype)) for leaf in leaves]
    assert noise.draws == sum(sizes)
    draws = gc.GaussianNoise(seed=21).standard_normal(sum(sizes))
    for leaf, z in zip(leaves, _noise_for([leaf.view for leaf in leaves], draws, 0.25)):
        exact = leaf.view_before.astype(np.complex128 if is_complex(dtype) else np.float64) + z
        assert_rounded_once(leaf.view, exact, np.abs(exact), 0, what=layout)
        outside = leaf.outside_mask()
        assert_same_bits(leaf.base[outside], leaf.before[outside])


@pytest.mark.parametrize("secure", [False, True], ids=["philox", "chacha20"])
def test_add_noise_across_windows_from_odd_draws(secure, rng):
    # Draws are made in windows at multiples of 1,024 in the stream: these leaves start
    # mid-window, a complex one at an odd draw (its elements straddle the windows'
    # edges), a stepped one, and each spans several windows.
    leaves = [
        rng.standard_normal(1023).astype(np.float32),
        (rng.standard_normal(2600) + 1j * rng.standard_normal(2600)).astype(np.complex64),
        (rng.standard_normal(3000) + 1j * rng.standard_normal(3000))[::2],
        rng.standard_normal((50, 61)),
    ]
    before = [leaf.copy() for leaf in leaves]
    noise, stream = (gc.GaussianNoise(secure=secure, seed=None if secure else 33) for _ in range(2))
    stream._key = noise._key.copy()  # the same secure key, to compare the streams
    noise.standard_normal(5)
    gc.add_noise_(leaves, 0.25, noise)  # std z exact: x + std z is rounded once, fused or not
    sizes = [leaf.size * (1 + is_complex(leaf.dtype)) for leaf in leaves]
    stream.standard_normal(5)
    for leaf, old, z in zip(leaves, before, _noise_for(leaves, stream.standard_normal(sum(sizes)), 0.25)):
        exact = old.astype(np.complex128 if is_complex(leaf.dtype) else np.float64) + z
        assert_rounded_once(leaf, exact, np.abs(exact), 0, what="add_noise_")


def test_add_noise_once_per_array_and_nothing_for_zero_std(rng):
    g = rng.standard_normal(6)
    noise = gc.GaussianNoise(seed=2)
    before = g.copy()
    gc.add_noise_([g, g], 0.0, noise)
    assert_same_bits(g, before)
    assert noise.draws == 0
    gc.add_noise_([g, g], 1.0, noise)
    assert noise.draws == 6
    assert_same_bits(g, before + gc.GaussianNoise(seed=2).standard_normal(6))


# --------------------------------------------------------------------------- QuantileClipNorm


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_quantile_clip_norm_converges_to_the_quantile(quantile, rng):
    norms = rng.lognormal(0.0, 1.0, 1000)
    adaptive = gc.QuantileClipNorm(initial=0.1, target_quantile=quantile, learning_rate=0.2)
    history = [adaptive.update(norms) for _ in range(600)]
    low, high = np.quantile(norms, [quantile - 0.02, quantile + 0.02])
    assert low <= np.median(history[-100:]) <= high
    assert adaptive.steps == 600


def test_quantile_clip_norm_moves_the_right_way():
    adaptive = gc.QuantileClipNorm(initial=1.0, target_quantile=0.3, learning_rate=0.5)
    assert adaptive.update([2.0, 3.0, np.nan]) == pytest.approx(math.exp(0.5 * 0.3), rel=1e-15)  # all clipped
    c = adaptive.clip_norm
    assert adaptive.update([0.1, c]) == pytest.approx(c * math.exp(-0.5 * 0.7), rel=1e-15)  # none (<= C)
    c = adaptive.clip_norm
    assert adaptive.update([0.1, 9.0], expected_size=4) == pytest.approx(c * math.exp(-0.5 * (0.25 - 0.3)), rel=1e-15)
    assert adaptive.update([]) == adaptive.clip_norm and adaptive.steps == 3


def test_quantile_clip_norm_count_noise():
    adaptive = gc.QuantileClipNorm(initial=1.0, learning_rate=0.2, count_noise_std=3.0, noise=gc.GaussianNoise(seed=6))
    z = gc.GaussianNoise(seed=6).standard_normal(1)[0]
    expected = math.exp(-0.2 * ((1 + 3.0 * z) / 2 - 0.5))
    assert adaptive.update([0.5, 2.0]) == pytest.approx(expected, rel=1e-15)
    assert isinstance(gc.QuantileClipNorm(count_noise_std=1.0).noise, gc.GaussianNoise)


def test_quantile_clip_norm_state_dict():
    adaptive = gc.QuantileClipNorm(initial=0.5, target_quantile=0.7, learning_rate=0.1)
    for norms in ([0.1, 0.9], [0.3], [1.0, 2.0, 0.2]):
        adaptive.update(norms)
    state = adaptive.state_dict()
    restored = gc.QuantileClipNorm()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.update([0.4, 0.6]) == adaptive.update([0.4, 0.6])


@pytest.mark.parametrize(
    "change, error, fragment",
    [
        ({"clip_norm": 0.0}, ValueError, "clip_norm must be a finite number > 0"),
        ({"clip_norm": math.inf}, ValueError, "clip_norm must be a finite number > 0"),
        ({"clip_norm": math.nan}, ValueError, "clip_norm must be a finite number > 0"),
        ({"clip_norm": "1"}, ValueError, "clip_norm must be a finite number > 0"),
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"target_quantile": 1.5}, ValueError, "quantile must be in [0, 1]"),
        ({"learning_rate": -0.1}, ValueError, "learning_rate must be a finite number >= 0"),
        ({"initial": 0.0}, ValueError, "initial must be a finite number > 0"),
        ({"extra": 1}, ValueError, "unexpected keys ['extra']"),
    ],
)
def test_quantile_clip_norm_bad_state_changes_nothing(change, error, fragment):
    adaptive = gc.QuantileClipNorm(initial=0.5)
    adaptive.update([0.1, 0.2, 3.0])
    before = adaptive.state_dict()
    with raises_with(error, fragment):
        adaptive.load_state_dict({**before, **change})
    assert adaptive.state_dict() == before


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"initial": -1.0}, ValueError, "initial must be a finite number > 0"),
        ({"target_quantile": -0.1}, ValueError, "quantile must be in [0, 1]"),
        ({"learning_rate": math.inf}, ValueError, "learning_rate must be a finite number >= 0"),
        ({"count_noise_std": -1.0}, ValueError, "count_noise_std must be a finite number >= 0"),
        ({"noise": 3}, TypeError, "noise must be a gradclip.GaussianNoise"),
    ],
)
def test_quantile_clip_norm_bad_arguments(kwargs, error, fragment):
    with raises_with(error, fragment):
        gc.QuantileClipNorm(**kwargs)


def test_quantile_clip_norm_bad_norms():
    adaptive = gc.QuantileClipNorm()
    for bad in ([[1.0, 2.0]], ["a"], 3.0):
        with raises_with(TypeError, "norms must be a 1-d array of real numbers"):
            adaptive.update(bad)
    assert adaptive.steps == 0 and adaptive.clip_norm == 0.1


# --------------------------------------------------------------------------- errors


def _clippable(rng):
    """Writable leaves of two examples that an in-place call would clip."""
    return [rng.standard_normal((2, 3)) * 10, rng.standard_normal((2,)) * 10]


CALLS = {
    "per_example_norms": lambda b: gc.per_example_norms(b),
    "clip_per_example_": lambda b: gc.clip_per_example_(b, 0.1),
    "clip_per_example": lambda b: gc.clip_per_example(b, 0.1),
    "clipped_sum": lambda b: gc.clipped_sum(b, 0.1),
}
calls = pytest.mark.parametrize("name", list(CALLS))


@calls
def test_leaves_with_different_example_counts(name, rng):
    valid = _clippable(rng)
    frozen = Frozen(*valid)
    with raises_with(ValueError, "grads['b'] holds 3 examples", "grads['w'][0] holds 2", "same length B"):
        CALLS[name]({"w": valid, "b": np.zeros((3, 4))})
    frozen.check()


@calls
def test_a_0d_leaf_in_a_stacked_batch(name, rng):
    valid = _clippable(rng)
    frozen = Frozen(*valid)
    with raises_with(ValueError, "grads[2] is 0-d", "example axis first", "gradclip.Examples"):
        CALLS[name]([*valid, np.array(1.0)])
    frozen.check()


@calls
@pytest.mark.parametrize(
    "second, fragments",
    [
        (
            {"w": np.zeros(3), "b": np.zeros(2)},
            ["examples[1] differs from examples[0] in structure at grads:", "keys ['w', 'v'], got keys ['w', 'b']"],
        ),
        ({"w": np.zeros((3, 1)), "v": [np.zeros(2)]}, ["in shape at grads['w']", "expected (3,), got (3, 1)"]),
        ({"w": np.zeros(3, np.float32), "v": [np.zeros(2)]}, ["in dtype at grads['w']", "float64, got float32"]),
    ],
    ids=["structure", "shape", "dtype"],
)
def test_examples_that_differ(name, second, fragments, rng):
    first = {"w": rng.standard_normal(3) * 10, "v": [rng.standard_normal(2) * 10]}
    frozen = Frozen(first["w"], *first["v"])
    with raises_with(ValueError, *fragments, "structure, shapes and dtypes of the first"):
        CALLS[name](gc.Examples([first, second]))
    frozen.check()


@calls
def test_a_bad_leaf_names_its_example(name, rng):
    first = [rng.standard_normal(3) * 10]
    frozen = Frozen(*first)
    with raises_with(TypeError, "examples[1]: grads[0] has dtype int64"):
        CALLS[name](gc.Examples([first, [np.zeros(3, np.int64)]]))
    frozen.check()


@pytest.mark.parametrize("name", ["clip_per_example_", "clip_per_example", "clipped_sum"])
@pytest.mark.parametrize(
    "bound, error, fragments",
    [
        (-1.0, ValueError, ["max_norm must be >= 0"]),
        (math.nan, ValueError, ["max_norm must be >= 0"]),
        ("1", TypeError, ["max_norm must be a real number"]),
        ([1.0, -2.0], ValueError, ["max_norm[1] must be >= 0"]),
        ([1.0, 2.0, 3.0], ValueError, ["max_norm holds 3 bounds", "one bound per leaf of an example (2,"]),
        ([1.0], ValueError, ["max_norm holds 1 bounds"]),
    ],
)
def test_bad_bounds(name, bound, error, fragments, rng):
    valid = _clippable(rng)
    frozen = Frozen(*valid)
    with raises_with(error, *fragments):
        getattr(gc, name)(valid, bound)
    frozen.check()


def test_a_repeated_leaf_takes_one_bound(rng):
    w = rng.standard_normal((2, 3)) * 10
    frozen = Frozen(w)
    with raises_with(ValueError, "grads[1] is the same array as grads[0]", "give it one bound"):
        gc.clip_per_example_([w, w], [1.0, 2.0])
    frozen.check()
    gc.clip_per_example_([w, w], [1.0, 1.0])
    assert_norms_close(gc.per_example_norms(w), [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"eps": -1.0}, ValueError, ["eps must be >= 0"]),
        ({"noise_multiplier": -0.5}, ValueError, ["noise_multiplier must be a finite number >= 0"]),
        ({"noise_multiplier": math.inf}, ValueError, ["noise_multiplier must be a finite number >= 0"]),
        ({"normalize_by": 0.0}, ValueError, ["normalize_by must be a finite number > 0"]),
        ({"noise": np.random.default_rng(0)}, TypeError, ["noise must be a gradclip.GaussianNoise", "Generator"]),
        ({"max_norm": math.inf, "noise_multiplier": 1.0}, ValueError, ["needs finite bounds", "got max_norm inf"]),
    ],
)
def test_bad_sum_arguments(kwargs, error, fragments, rng):
    valid = _clippable(rng)
    frozen = Frozen(*valid)
    kwargs = {"max_norm": 1.0, **kwargs}
    with raises_with(error, *fragments):
        gc.clipped_sum(valid, **kwargs)
    frozen.check()


def test_no_examples():
    with raises_with(ValueError, "clipped_sum was given gradclip.Examples([])", "at least one example"):
        gc.clipped_sum(gc.Examples([]), 1.0)
    assert gc.per_example_norms(gc.Examples([])).shape == (0,)
    assert gc.clip_per_example_(gc.Examples([]), 1.0).shape == (0,)
    with raises_with(TypeError, "Examples takes a sequence of examples"):
        gc.Examples(np.zeros((2, 3)))


def test_in_place_refuses_an_array_in_two_examples(rng):
    shared = rng.standard_normal(4) * 10
    other = rng.standard_normal(4) * 10
    frozen = Frozen(shared, other)
    with raises_with(ValueError, "examples[2] holds the same array as examples[0] at grads['w']", "twice"):
        gc.clip_per_example_(gc.Examples([{"w": shared}, {"w": other}, {"w": shared}]), 0.1)
    frozen.check()
    total, _ = gc.clipped_sum(gc.Examples([{"w": shared}, {"w": shared}]), math.inf)  # reading is fine
    assert_same_bits(total["w"], 2 * shared)


def test_read_only_leaf_in_place(rng):
    valid = _clippable(rng)
    ro = rng.standard_normal((2, 5))
    ro.flags.writeable = False
    frozen = Frozen(*valid, ro)
    with raises_with(ValueError, "grads[2] is read-only", "clip_per_example_ writes in place", "clip_per_example("):
        gc.clip_per_example_([*valid, ro], 0.1)
    frozen.check()


@pytest.mark.parametrize(
    "std, noise, error, fragment",
    [
        (-1.0, "ok", ValueError, "std must be a finite number >= 0"),
        (math.nan, "ok", ValueError, "std must be a finite number >= 0"),
        (1.0, None, TypeError, "noise must be a gradclip.GaussianNoise"),
    ],
)
def test_add_noise_bad_arguments(std, noise, error, fragment, rng):
    g = rng.standard_normal(5)
    frozen = Frozen(g)
    generator = gc.GaussianNoise(seed=1) if noise == "ok" else noise
    with raises_with(error, fragment):
        gc.add_noise_(g, std, generator)
    frozen.check()
    ro = rng.standard_normal(3)
    ro.flags.writeable = False
    noise = gc.GaussianNoise(seed=1)
    with raises_with(ValueError, "grads[1] is read-only", "add_noise_"):
        gc.add_noise_([g, ro], 1.0, noise)
    frozen.check()
    assert noise.draws == 0
