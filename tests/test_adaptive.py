"""The adaptive clippers (SPEC §5): EMAClipper (AdaClip), QuantileClipper (AutoClip) and
ZScoreClipper (ZClip), each checked step by step against an independent re-implementation
of its published rule, over scripted norms with spikes, NaN and inf; checkpoints; errors."""

import json
import math
import statistics

import numpy as np
import pytest
import torch

import gradclip as gc
from helpers import Frozen, assert_same_bits, raises_with
from reference import ref_clip_by_norm, ref_coef

EPS = 1e-6  # the clip rule's eps (clip_grad_norm_'s default)


# --------------------------------------------------------------------------- references
#
# Each takes the list of norms seen at every step and returns, per step, the threshold
# the rule uses (NaN for a non-finite step) and whether the step is clipped.


def ref_adaclip(norms, alpha=2.0, beta=0.97, warmup=25):
    """τ_t = α · EMA_β of the earlier clipped norms, bias-corrected: written as the
    weighted mean with weights β^age (no running sums); warm-up: no clipping."""
    kept, out = [], []
    for norm in norms:
        if not math.isfinite(norm):
            out.append((math.nan, False))
            continue
        if len(kept) < warmup:
            threshold = math.inf
        else:
            weights = [beta ** (len(kept) - 1 - k) for k in range(len(kept))]
            threshold = alpha * math.fsum(w * x for w, x in zip(weights, kept)) / math.fsum(weights)
        kept.append(min(norm, threshold))
        out.append((threshold, norm > threshold))
    return out


def ref_autoclip(norms, quantile=0.1, history=None):
    """The paper's code: ``grad_history.append(norm)``,
    ``clip_value = np.percentile(grad_history, p)``, PyTorch's clip_grad_norm_."""
    grad_history, out = [], []
    for norm in norms:
        if not math.isfinite(norm):
            out.append((math.nan, False))
            continue
        grad_history.append(norm)
        kept = grad_history if history is None else grad_history[-history:]
        clip_value = float(np.percentile(kept, 100 * quantile))
        out.append((clip_value, norm > clip_value))
    return out


def ref_zclip(norms, alpha=0.97, z_thresh=2.5, warmup=25, max_norm=None, eps=1e-6):
    """Kumar et al. 2025, Algorithm 1 (mode "zscore", adaptive scaling), with the
    reference code's max_grad_norm. Returns (threshold, clipped, spike) per step, the
    threshold being the norm clipped to (spikes) or the norm needed for a spike."""
    cap = math.inf if max_norm is None else max_norm
    buffer, mean, var, out = [], None, None, []
    for g in norms:
        if not math.isfinite(g):
            out.append((math.nan, False, False))
            continue
        if mean is None:
            buffer.append(g)
            if len(buffer) == warmup:
                mean = statistics.fmean(buffer)
                var = statistics.pvariance(buffer)
            out.append((cap, g > cap, False))
            continue
        sigma = math.sqrt(var)
        z = (g - mean) / (sigma + eps)
        spike = z > z_thresh
        g_star = mean + (z_thresh**2 / z) * sigma if spike else g
        threshold = min(g_star if spike else mean + z_thresh * (sigma + eps), cap)
        out.append((threshold, g > threshold, spike))
        mean = alpha * mean + (1 - alpha) * g_star
        var = alpha * var + (1 - alpha) * (g_star - mean) ** 2
    return out


# --------------------------------------------------------------------------- scripted norms


def scripted_norms(seed=0, steps=90):
    """Norms drifting around 1 with spikes, NaN and inf — inside and after warm-up."""
    rng = np.random.default_rng(seed)
    norms = (1.0 + 0.3 * rng.random(steps) + np.linspace(0, 1, steps)).tolist()
    for step, value in {
        3: math.nan, 7: 30.0, 12: math.inf, 26: 40.0, 27: 55.0, 30: math.nan,
        31: 0.0, 40: 500.0, 41: math.inf, 42: 3.5, 50: 1e4, 51: 2e4, 52: 3e4,
        60: math.nan, 61: 0.2, 70: 8.0,
    }.items():  # fmt: skip
        norms[step] = value
    return norms


def run_checked(clipper, norms, expected, *, sign_seed=1):
    """Feed one-element gradients with exactly ``norms`` and check every step against
    the ``expected`` (threshold, clipped, ...) of the reference."""
    signs = np.random.default_rng(sign_seed).choice([-1.0, 1.0], size=len(norms))
    for step, (norm, sign, (threshold, clipped, *_)) in enumerate(zip(norms, signs, expected)):
        g = np.array([sign * norm])
        before = g.copy()
        stats = clipper(g)
        where = f"step {step}, norm {norm}"
        assert isinstance(stats, gc.ClipStats)
        assert stats.finite is math.isfinite(norm), where
        assert stats.norm == norm or (math.isnan(norm) and math.isnan(stats.norm)), where
        if math.isfinite(threshold):
            assert stats.threshold == pytest.approx(threshold, rel=1e-12, abs=0), where
        else:  # inf (nothing clips) or NaN (a non-finite step)
            assert repr(stats.threshold) == repr(threshold), where
        assert stats.clipped is clipped, where
        # the grads: scaled by the factor of the threshold reported, bit for bit ...
        expected_g = before
        if clipped:
            expected_g = ref_clip_by_norm([before], stats.threshold, stats.norm, EPS)[0]
        assert_same_bits(g, expected_g, what=where)
        # ... which is the reference's threshold, to rounding
        if clipped:
            assert g[0] == pytest.approx(sign * threshold * norm / (norm + EPS), rel=1e-12), where


CLIPPERS = {
    "ema": (gc.EMAClipper, ref_adaclip),
    "quantile": (gc.QuantileClipper, ref_autoclip),
    "zscore": (gc.ZScoreClipper, ref_zclip),
}
CONFIGS = [
    ("ema", {}),
    ("ema", {"alpha": 1.5, "beta": 0.9, "warmup": 5}),
    ("ema", {"alpha": 3.0, "beta": 0.0, "warmup": 1}),
    ("quantile", {}),
    ("quantile", {"quantile": 0.5, "history": 7}),
    ("quantile", {"quantile": 0.9, "history": 1}),
    ("quantile", {"quantile": 0.0}),
    ("quantile", {"quantile": 1.0, "history": 20}),
    ("zscore", {}),
    ("zscore", {"alpha": 0.9, "z_thresh": 2.0, "warmup": 5}),
    ("zscore", {"max_norm": 1.8}),
    ("zscore", {"warmup": 1, "max_norm": 0.0}),
]


@pytest.mark.parametrize("kind, kwargs", CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scripted_norms_match_the_published_rule(kind, kwargs, seed):
    cls, reference = CLIPPERS[kind]
    norms = scripted_norms(seed)
    run_checked(cls(**kwargs), norms, reference(norms, **kwargs))


def test_the_scripts_exercise_every_branch():
    """The scripted norms clip after warm-up, spike (ZClip), and skip non-finite steps."""
    norms = scripted_norms(0)
    for expected in (ref_adaclip(norms), ref_autoclip(norms), ref_zclip(norms)):
        clipped = [step for step, (_, c, *_) in enumerate(expected) if c]
        assert len(clipped) >= 4
    spikes = [step for step, (_, _, s) in enumerate(ref_zclip(norms)) if s]
    assert spikes[0] == 27  # steps 3 and 12 are not finite: warm-up ends at step 26
    assert {40, 50, 51} <= set(spikes)
    assert ref_adaclip(norms)[7] == (math.inf, False)  # a warm-up spike passes


def test_quantile_threshold_is_numpy_quantile_bit_for_bit(rng):
    """The sorted history with NumPy's two-sided lerp reproduces np.quantile exactly."""
    for q in (0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 1.0):
        clipper = gc.QuantileClipper(quantile=q, history=37)
        norms = list(rng.lognormal(size=120))
        norms[50:55] = [norms[10]] * 5  # ties
        for step, norm in enumerate(norms):
            stats = clipper(np.array([norm]))
            assert stats.threshold == np.quantile(norms[max(0, step - 36) : step + 1], q)


def test_non_finite_steps_change_nothing():
    """A NaN or inf norm leaves the grads, the statistics and the step counters as they
    were: the state dict is the same before and after."""
    clippers = (gc.EMAClipper(warmup=2), gc.QuantileClipper(history=3), gc.ZScoreClipper(warmup=2))
    for clipper in clippers:
        for norm in (1.0, 2.0, 1.5):
            clipper(np.array([norm]))
        for bad in ([np.array([np.nan, 1e30])], {"a": np.array([1.0]), "b": np.array([-np.inf])}):
            state = clipper.state_dict()
            frozen = Frozen(*[x for x in (bad if isinstance(bad, list) else bad.values())])
            stats = clipper(bad)
            assert stats.finite is False and stats.clipped is False
            assert math.isnan(stats.threshold)
            frozen.check()
            assert clipper.state_dict() == state


@pytest.mark.parametrize("kind", list(CLIPPERS))
def test_every_leaf_of_a_pytree_is_scaled_by_one_factor(kind, rng):
    """Nested dicts / lists with None leaves and mixed dtypes: the total norm is the
    library's, and every leaf is scaled like clip_grads_with_norm_ scales it."""
    cls = CLIPPERS[kind][0]
    clipper = cls(**({"quantile": 0.0} if kind == "quantile" else {"warmup": 1}))
    clipper([np.array([0.5])])  # a small first norm: the next step clips
    grads = {
        "enc": [rng.standard_normal((3, 4)).astype(np.float32), None],
        "dec": (rng.standard_normal(5), {"b": np.array(2.0)}),
        "frozen": None,
    }
    leaves = [grads["enc"][0], grads["dec"][0], grads["dec"][1]["b"]]
    before = [x.copy() for x in leaves]
    stats = clipper(grads)
    assert stats.norm == gc.grad_norm(before)
    assert stats.clipped and stats.threshold < stats.norm
    for leaf, expected in zip(leaves, ref_clip_by_norm(before, stats.threshold, stats.norm, EPS)):
        assert_same_bits(leaf, expected)
    assert gc.grad_norm(leaves) == pytest.approx(stats.threshold, rel=1e-5)  # float32 leaf


@pytest.mark.parametrize("kind", list(CLIPPERS))
def test_a_generator_is_consumed_once_and_clipped(kind):
    cls = CLIPPERS[kind][0]
    clipper = cls(**({"quantile": 0.0} if kind == "quantile" else {"warmup": 1}))
    clipper(np.array([1.0]))
    a, b = np.array([30.0]), np.array([40.0])
    stats = clipper(x for x in (a, b))
    assert stats.norm == 50.0 and stats.clipped
    coef = ref_coef(stats.threshold, 50.0)
    assert (a[0], b[0]) == (30.0 * coef, 40.0 * coef)


def test_repeated_array_is_scaled_once():
    clipper = gc.QuantileClipper(quantile=0.0)
    clipper(np.array([1.0]))
    g = np.array([3.0, 4.0])
    stats = clipper([g, g])
    assert stats.norm == 5.0 and stats.threshold == 1.0
    assert_same_bits(g, np.array([3.0, 4.0]) * ref_coef(1.0, 5.0))


def test_torch_tensors_are_clipped_in_their_own_memory():
    clipper = gc.QuantileClipper(quantile=0.0)
    clipper(np.array([1.0]))
    t = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert clipper([t]).clipped
    assert t.tolist() == [3.0 * ref_coef(1.0, 5.0), 4.0 * ref_coef(1.0, 5.0)]


# --------------------------------------------------------------------------- defaults


def test_published_defaults():
    z = gc.ZScoreClipper()
    assert (z.alpha, z.z_thresh, z.warmup, z.max_norm, z.eps) == (0.97, 2.5, 25, None, 1e-6)
    q = gc.QuantileClipper()
    assert (q.quantile, q.history) == (0.1, None)  # AutoClip: p = 10, the whole history
    e = gc.EMAClipper()
    assert (e.alpha, e.beta, e.warmup) == (2.0, 0.97, 25)
    assert repr(q) == "QuantileClipper(quantile=0.1, history=None)"


def test_autoclip_first_step_is_never_clipped():
    """The current norm joins the history before the quantile is taken."""
    stats = gc.QuantileClipper()(np.array([1e6]))
    assert stats == gc.ClipStats(1e6, 1e6, False, True)


def test_ema_warmup_never_clips_and_counts_finite_steps_only():
    clipper = gc.EMAClipper(warmup=3)
    for norm in (1.0, np.nan, 100.0, np.inf, 1.0):
        stats = clipper(np.array([norm]))
        assert not stats.clipped
    assert clipper.state_dict()["steps"] == 3
    assert clipper(np.array([1e3])).clipped


def test_zscore_max_norm_caps_warmup_and_later_steps():
    clipper = gc.ZScoreClipper(warmup=2, max_norm=1.0)
    g = np.array([4.0])
    assert clipper(g) == gc.ClipStats(4.0, 1.0, True, True)
    assert g[0] == 4.0 * ref_coef(1.0, 4.0)
    clipper(np.array([0.5]))  # warm-up over: mean 2.25, std 1.75
    g = np.array([3.0])  # no spike (z < 2.5), but above max_norm
    stats = clipper(g)
    assert stats.clipped and stats.threshold == 1.0
    # the statistics took the norm itself (3.0), not the capped 1.0
    assert clipper.state_dict()["mean"] == pytest.approx(0.97 * 2.25 + 0.03 * 3.0, rel=1e-15)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind, kwargs", CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("split", [0, 2, 4, 26, 45, 89])
def test_restored_clipper_continues_bit_identically(kind, kwargs, split):
    """Save mid-run (through JSON: plain values), restore into a clipper built with the
    defaults, and continue: the same stats and the same gradient bits as a run that
    was never interrupted."""
    cls = CLIPPERS[kind][0]
    norms = scripted_norms(3)

    def steps(clipper, part):
        out = []
        for norm in part:
            g = np.array([norm, -0.5 * norm])
            out.append((clipper(g), g))
        return out

    uninterrupted = cls(**kwargs)
    reference = steps(uninterrupted, norms)

    first = cls(**kwargs)
    head = steps(first, norms[:split])
    saved = json.loads(json.dumps(first.state_dict()))
    restored = cls()
    restored.load_state_dict(saved)
    assert restored.state_dict() == first.state_dict()
    tail = steps(restored, norms[split:])

    for step, ((want, want_g), (got, got_g)) in enumerate(zip(reference, head + tail)):
        assert repr(got) == repr(want), f"step {step}"  # NaN-safe, exact floats
        assert_same_bits(got_g, want_g, what=f"step {step}")
    assert restored.state_dict() == uninterrupted.state_dict()


def test_state_dict_is_a_snapshot_of_plain_values():
    clipper = gc.QuantileClipper(history=3)
    clipper(np.array([1.0]))
    state = clipper.state_dict()
    clipper(np.array([2.0]))
    assert state == {"quantile": 0.1, "history": 3, "norms": [1.0]}
    z = gc.ZScoreClipper(warmup=2)
    assert z.state_dict() == {
        "alpha": 0.97, "z_thresh": 2.5, "warmup": 2, "max_norm": None, "eps": 1e-6,
        "warmup_norms": [], "mean": None, "var": None,
    }  # fmt: skip
    z(np.array([1.0]))
    z(np.array([3.0]))
    assert z.state_dict()["warmup_norms"] == [] and z.state_dict()["var"] == 1.0


def test_quantile_restore_keeps_only_history_norms():
    clipper = gc.QuantileClipper(history=2)
    clipper.load_state_dict({"quantile": 0.5, "history": 2, "norms": [1.0, 9.0]})
    assert clipper(np.array([5.0])).threshold == 7.0  # history [9, 5]


@pytest.mark.parametrize("kind", list(CLIPPERS))
def test_bad_state_dict_leaves_the_clipper_unchanged(kind):
    cls = CLIPPERS[kind][0]
    clipper = cls()
    clipper(np.array([1.0]))
    state = clipper.state_dict()
    missing = {k: v for k, v in state.items() if k != next(iter(state))}
    with raises_with(ValueError, f"{cls.__name__}.load_state_dict", "missing keys", "state_dict()"):
        clipper.load_state_dict(missing)
    with raises_with(ValueError, "unexpected keys ['extra']"):
        clipper.load_state_dict({**state, "extra": 1})
    first = next(iter(state))
    with pytest.raises((ValueError, TypeError), match=first):
        clipper.load_state_dict({**state, first: -1})
    with raises_with(TypeError, "expects a dict"):
        clipper.load_state_dict([("a", 1)])
    assert clipper.state_dict() == state


# Corrupted checkpoints (SPEC §10): every field of every clipper's state, each kind of
# damage: (class, the constructor's arguments, norms seen, field, bad values).
CORRUPT = [
    ("ema", {"warmup": 2}, [2.0, 3.0, 4.0], "alpha", ["2", math.nan, -1.0, 0.0, True, None]),
    ("ema", {"warmup": 2}, [2.0, 3.0, 4.0], "beta", [1.5, -0.1, math.nan, "0.9", [0.9]]),
    ("ema", {"warmup": 2}, [2.0, 3.0, 4.0], "warmup", [0, -3, 2.5, "25", True, None]),
    ("ema", {"warmup": 2}, [2.0, 3.0, 4.0], "ema", [-1.0, math.nan, math.inf, -math.inf, "2", None, True, [1.0], 10**400]),
    ("ema", {"warmup": 2}, [2.0, 3.0, 4.0], "steps", [-1, 2.5, "3", True, None, math.nan]),
    ("ema", {"warmup": 2}, [], "ema", [1.0]),  # steps 0: nothing averaged yet
    ("quantile", {"history": 3}, [2.0, 3.0], "quantile", [1.5, -0.5, math.nan, "0.1", True]),
    ("quantile", {"history": 3}, [2.0, 3.0], "history", [0, -1, 2.5, "3", True]),
    ("quantile", {"history": 3}, [2.0, 3.0], "norms",
     [[1.0, math.nan], [1.0, -1.0], [math.inf], [1.0] * 4, ["1.0"], [True], "1,2", None, 3.0, {"a": 1.0}]),
    ("zscore", {"warmup": 3}, [2.0, 3.0], "alpha", [1.0, -0.1, "0.97", math.nan]),
    ("zscore", {"warmup": 3}, [2.0, 3.0], "z_thresh", [0.0, -1.0, math.nan, "2.5"]),
    ("zscore", {"warmup": 3}, [2.0, 3.0], "warmup", [0, 1.5, "3", False]),
    ("zscore", {"warmup": 3}, [2.0, 3.0], "max_norm", [-1.0, math.nan, "1"]),
    ("zscore", {"warmup": 3}, [2.0, 3.0], "eps", [0.0, -1e-6, math.nan, "1e-6"]),
    ("zscore", {"warmup": 3}, [2.0, 3.0], "warmup_norms", [[math.nan], [-1.0], [1.0, 2.0, 3.0], "x", ["1"], None]),
    ("zscore", {"warmup": 3}, [2.0, 3.0], "mean", [1.0, -2.0]),  # var is None during the warm-up
    ("zscore", {"warmup": 3}, [2.0, 3.0, 4.0, 5.0], "mean", [-2.0, math.nan, math.inf, "2", True, None]),
    ("zscore", {"warmup": 3}, [2.0, 3.0, 4.0, 5.0], "var", [-1.0, math.nan, math.inf, "1", None]),
    ("zscore", {"warmup": 3}, [2.0, 3.0, 4.0, 5.0], "warmup_norms", [[2.0]]),  # the warm-up is over
]  # fmt: skip


@pytest.mark.parametrize(
    "kind, kwargs, norms, field, bad",
    [pytest.param(*case[:4], bad, id=f"{case[0]}-{case[3]}-{bad!r}"[:60]) for case in CORRUPT for bad in case[4]],
)
def test_a_corrupted_checkpoint_is_refused_and_the_clipper_is_unchanged(kind, kwargs, norms, field, bad):
    cls = CLIPPERS[kind][0]
    clipper, twin = cls(**kwargs), cls(**kwargs)
    for norm in norms:
        clipper(np.array([norm]))
        twin(np.array([norm]))
    state = clipper.state_dict()
    with raises_with(ValueError, f"{cls.__name__}.load_state_dict", field, "state_dict()", "unchanged"):
        clipper.load_state_dict({**state, field: bad})
    assert clipper.state_dict() == state
    for norm in (6.0, 0.5, 30.0):  # and it carries on as if nothing happened
        assert repr(clipper(np.array([norm]))) == repr(twin(np.array([norm])))


@pytest.mark.parametrize("kind, kwargs, norms", [(k, a, n) for k, a, n, *_ in CORRUPT[::3]])
def test_a_checkpoint_of_numpy_numbers_round_trips(kind, kwargs, norms):
    """Numbers as NumPy scalars (e.g. read back from an .npz) are as good as Python's."""
    cls = CLIPPERS[kind][0]
    clipper = cls(**kwargs)
    for norm in norms:
        clipper(np.array([norm]))
    state = clipper.state_dict()
    as_numpy = {
        key: [np.float64(x) for x in value] if isinstance(value, list)
        else np.int64(value) if isinstance(value, int) and not isinstance(value, bool)
        else np.float64(value) if isinstance(value, float) else value
        for key, value in state.items()
    }  # fmt: skip
    restored = cls()
    restored.load_state_dict(as_numpy)
    assert restored.state_dict() == state
    assert repr(restored(np.array([9.0]))) == repr(clipper(np.array([9.0])))


# --------------------------------------------------------------------------- errors

BAD_ARGS = [
    (gc.EMAClipper, {"alpha": 0.0}, ValueError, "alpha must be > 0"),
    (gc.EMAClipper, {"alpha": math.nan}, ValueError, "alpha must be > 0"),
    (gc.EMAClipper, {"beta": 1.0}, ValueError, "beta must be in [0, 1)"),
    (gc.EMAClipper, {"beta": -0.1}, ValueError, "beta must be in [0, 1)"),
    (gc.EMAClipper, {"warmup": 0}, ValueError, "warmup must be >= 1"),
    (gc.EMAClipper, {"warmup": 2.5}, TypeError, "warmup must be an int"),
    (gc.EMAClipper, {"alpha": "2"}, TypeError, "alpha must be a real number"),
    (gc.QuantileClipper, {"quantile": 10}, ValueError, "quantile must be in [0, 1] (e.g. 0.1"),
    (gc.QuantileClipper, {"quantile": math.nan}, ValueError, "quantile must be in [0, 1]"),
    (gc.QuantileClipper, {"history": 0}, ValueError, "history must be >= 1"),
    (gc.QuantileClipper, {"history": True}, TypeError, "history must be an int"),
    (gc.ZScoreClipper, {"alpha": 1.0}, ValueError, "alpha must be in [0, 1)"),
    (gc.ZScoreClipper, {"z_thresh": 0.0}, ValueError, "z_thresh must be > 0"),
    (gc.ZScoreClipper, {"warmup": 0}, ValueError, "warmup must be >= 1"),
    (gc.ZScoreClipper, {"max_norm": -1.0}, ValueError, "max_norm must be >= 0"),
    (gc.ZScoreClipper, {"eps": 0.0}, ValueError, "eps must be > 0"),
]


@pytest.mark.parametrize("cls, kwargs, exc, fragment", BAD_ARGS, ids=lambda v: str(v))
def test_bad_constructor_arguments(cls, kwargs, exc, fragment):
    value = repr(next(iter(kwargs.values())))
    with raises_with(exc, fragment, value):
        cls(**kwargs)


def _read_only():
    x = np.ones(3)
    x.flags.writeable = False
    return x


@pytest.mark.parametrize("kind", list(CLIPPERS))
@pytest.mark.parametrize(
    "make_bad, exc, fragments",
    [
        (lambda: np.arange(3), TypeError, ["grads['b'][1]", "int64"]),
        (lambda: "x", TypeError, ["grads['b'][1]", "str"]),
        (_read_only, ValueError, ["grads['b'][1]", "read-only"]),
    ],
    ids=["int", "str", "readonly"],
)
def test_bad_leaf_is_reported_before_anything_changes(kind, make_bad, exc, fragments):
    """The failing leaf comes after one the clipper would scale: nothing is written,
    and the statistics do not move."""
    bad = make_bad()
    clipper = CLIPPERS[kind][0](**({"quantile": 0.0} if kind == "quantile" else {"warmup": 1}))
    clipper(np.array([0.1]))
    state = clipper.state_dict()
    big = np.full(4, 100.0)
    frozen = Frozen(big)
    with raises_with(exc, *fragments):
        clipper({"a": big, "b": [None, bad]})
    frozen.check()
    assert clipper.state_dict() == state
