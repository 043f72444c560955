"""NormMonitor (SPEC §5): recorded norms, non-finite and spike flags and the summary
against a reference computed here; per-leaf norms; the PNG plot; errors."""

import math
import sys

import numpy as np
import pytest

import gradclip as gc
from helpers import Frozen, raises_with
from reference import ref_layer_norms, ref_norm


def ref_summary(norms, spike_factor=10.0, window=100):
    """A spike: a finite norm above spike_factor × the median of the (up to) ``window``
    finite norms before it; non-finite norms are flagged and kept out of the window."""
    earlier, spikes, nonfinite = [], [], []
    for step, norm in enumerate(norms):
        if not math.isfinite(norm):
            nonfinite.append(step)
            continue
        recent = earlier[-window:]
        if recent and norm > spike_factor * float(np.median(recent)):
            spikes.append(step)
        earlier.append(norm)
    return {
        "count": len(norms),
        "min": min(earlier) if earlier else math.nan,
        "median": float(np.median(earlier)) if earlier else math.nan,
        "max": max(earlier) if earlier else math.nan,
        "last": norms[-1] if norms else math.nan,
        "nonfinite_steps": nonfinite,
        "spike_steps": spikes,
    }


def scripted_norms(seed, steps=150):
    rng = np.random.default_rng(seed)
    norms = (np.exp(rng.normal(size=steps)) * np.linspace(1.0, 0.2, steps)).tolist()
    scripted = {
        0: 3.0, 1: 40.0, 5: math.nan, 20: 0.0, 33: 80.0, 34: 90.0, 35: 100.0,
        60: math.inf, 61: math.nan, 90: 1e3, 120: 25.0, 149: math.nan,
    }  # fmt: skip
    for step, value in scripted.items():
        norms[step] = value
    return norms


def _same(a, b):
    """Equal, or both NaN."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize(
    "kwargs", [{}, {"spike_factor": 3.0, "window": 10}, {"spike_factor": 1.5, "window": 1}]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_summary_matches_the_reference(kwargs, seed):
    """Steps recorded from gradients (one-element arrays of exactly the norm) and from
    plain floats, alternately."""
    norms = scripted_norms(seed)
    monitor = gc.NormMonitor(**kwargs)
    for step, norm in enumerate(norms):
        if step % 2:
            assert _same(monitor.record(norm), norm)
        else:
            assert _same(monitor.record([np.array([-norm])]), norm)
    summary = monitor.summary()
    expected = ref_summary(norms, **kwargs)
    assert summary.keys() == expected.keys()
    for key in expected:
        assert _same(summary[key], expected[key]), key
    assert summary["spike_steps"] and summary["nonfinite_steps"] == [5, 60, 61, 149]
    np.testing.assert_array_equal(monitor.norms, np.array(norms))
    assert monitor.spike_steps == expected["spike_steps"]
    assert monitor.nonfinite_steps == expected["nonfinite_steps"]


def test_empty_summary():
    summary = gc.NormMonitor().summary()
    assert summary["count"] == 0 and summary["nonfinite_steps"] == summary["spike_steps"] == []
    assert all(math.isnan(summary[k]) for k in ("min", "median", "max", "last"))


def test_total_and_per_leaf_norms(rng):
    monitor = gc.NormMonitor(per_leaf=True)
    frozen_leaves = []
    for _ in range(3):
        grads = {"w": rng.standard_normal((4, 3)).astype(np.float32), "skip": None,
                 "layers": [rng.standard_normal(7), np.float64(-2.5)]}  # fmt: skip
        leaves = [grads["w"], *grads["layers"]]
        frozen_leaves.append(Frozen(grads["w"], grads["layers"][0]))
        norm = monitor.record(grads)
        assert norm == pytest.approx(ref_norm(leaves), rel=1e-12)
        np.testing.assert_allclose(monitor.leaf_norms[-1], ref_layer_norms(leaves), rtol=1e-12)
    for frozen in frozen_leaves:
        frozen.check()  # record reads, never writes
    monitor.record(1.0)
    assert monitor.leaf_norms[-1] is None
    assert gc.NormMonitor().record([np.ones(4)]) == 2.0
    plain = gc.NormMonitor()
    plain.record([np.ones(4)])
    assert plain.leaf_norms == [None]


def test_repeated_array_counts_once_and_generators_work():
    monitor = gc.NormMonitor(per_leaf=True)
    x = np.array([3.0, 4.0])
    assert monitor.record([x, x]) == 5.0
    np.testing.assert_array_equal(monitor.leaf_norms[0], [5.0, 5.0])
    assert monitor.record(a for a in [x, np.array([12.0])]) == 13.0


def test_thresholds_are_stored_with_nan_for_none():
    monitor = gc.NormMonitor()
    monitor.record(2.0, threshold=1.0)
    monitor.record(np.float64(3.0))
    monitor.record(np.float32(-4.0), threshold=math.inf)  # a NumPy float32 is a 0-d leaf
    monitor.record(5.0, threshold=math.nan)
    np.testing.assert_array_equal(monitor.norms, [2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(monitor.thresholds, [1.0, np.nan, np.inf, np.nan])


def test_with_a_clipper():
    """The intended loop: clip, then record the stats."""
    clipper = gc.QuantileClipper(quantile=0.5)
    monitor = gc.NormMonitor()
    for norm in (1.0, 2.0, 30.0, math.nan):
        stats = clipper(np.array([norm]))
        monitor.record(stats.norm, threshold=stats.threshold)
    np.testing.assert_array_equal(monitor.thresholds, [1.0, 1.5, 2.0, np.nan])
    assert monitor.summary()["spike_steps"] == [2] and monitor.nonfinite_steps == [3]


@pytest.mark.parametrize(
    "call, exc, fragments",
    [
        (lambda m: m.record(-1.0), ValueError, ["a recorded norm must be >= 0", "-1.0"]),
        (lambda m: m.record(1.0, threshold=-2.0), ValueError, ["threshold must be >= 0", "-2.0"]),
        (lambda m: m.record(1.0, threshold="1"), TypeError, ["threshold must be a real number"]),
        (lambda m: m.record({"a": np.ones(2), "b": np.arange(3)}), TypeError,
         ["grads['b'] has dtype int64"]),
        (lambda m: m.record([np.ones(2), "x"]), TypeError, ["grads[1] is a str"]),
        (lambda m: m.record(True), TypeError, ["grads is a bool"]),
    ],
    ids=["negative_norm", "negative_threshold", "threshold_type", "int_leaf", "str_leaf", "bool"],
)
def test_bad_records_store_nothing(call, exc, fragments):
    monitor = gc.NormMonitor()
    monitor.record(1.0)
    with raises_with(exc, *fragments):
        call(monitor)
    assert monitor.summary()["count"] == 1 and len(monitor.thresholds) == 1


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        ({"spike_factor": 0.0}, ValueError, "spike_factor must be > 0"),
        ({"spike_factor": math.nan}, ValueError, "spike_factor must be > 0"),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"window": 2.0}, TypeError, "window must be an int"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, fragment):
    with raises_with(exc, fragment):
        gc.NormMonitor(**kwargs)


# --------------------------------------------------------------------------- plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 10  # lines, text and markers, not a blank canvas
    return pixels


def test_plot_writes_a_real_png(tmp_path):
    monitor = gc.NormMonitor(spike_factor=3.0, window=10)
    clipper = gc.QuantileClipper(quantile=0.9, history=20)
    for norm in scripted_norms(0):
        stats = clipper(np.array([norm]))
        monitor.record(stats.norm, threshold=stats.threshold)
    assert monitor.spike_steps and monitor.nonfinite_steps
    path = tmp_path / "norms.png"
    monitor.plot(path)
    _check_png(path)
    monitor.plot(str(tmp_path / "again.png"))  # a str path too
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "norms", [[], [math.nan, math.inf], [0.0, 0.0], [1.0]], ids=["empty", "nonfinite", "zeros", "one"]
)
def test_plot_degenerate_records_without_warnings(norms, tmp_path):
    """Nothing a log scale can show: still a PNG, and no matplotlib warning (which the
    test configuration turns into errors)."""
    monitor = gc.NormMonitor()
    for norm in norms:
        monitor.record(norm)
    monitor.plot(tmp_path / "degenerate.png")
    assert (tmp_path / "degenerate.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_leaves_the_pyplot_backend_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    monitor = gc.NormMonitor()
    monitor.record(1.0)
    monitor.plot(tmp_path / "x.png")
    assert matplotlib.get_backend() == backend


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    monitor = gc.NormMonitor()
    monitor.record(1.0)
    fragments = ["NormMonitor.plot needs matplotlib", "pip install 'gradclip[plot]'"]
    with raises_with(ImportError, *fragments):
        monitor.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
