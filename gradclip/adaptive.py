"""Adaptive clipping (SPEC §5): clippers whose threshold follows the gradient norm's history,
and unit-wise adaptive gradient clipping (AGC).

The three clippers share one step: read the total L2 norm (validating every leaf, writing
nothing), work out this step's threshold from the statistics, and scale the gradients in
place by ``threshold / (norm + 1e-6)`` iff ``norm > threshold`` — the rule of
`clip_grad_norm_`. A non-finite norm updates no
statistic and no counter, and leaves the gradients untouched.
"""

import bisect
import collections
import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from . import _backend, _batch, _checks, _tree
from ._collective import Collective

_EPS = 1e-6
"""The ``eps`` of the scaling rule, as in `clip_grad_norm_`."""


class ClipStats(NamedTuple):
    """What an adaptive clipper did to one step's gradients.

    Attributes
    ----------
    norm : float
        The total L2 norm before clipping (NaN or inf for a non-finite step).
    threshold : float
        The threshold of this step: the gradients were clipped iff ``norm > threshold``,
        and then scaled to a norm of ``threshold``. ``inf`` while nothing can be clipped
        (a warm-up step); NaN for a non-finite step, which is not compared with anything.
    clipped : bool
        Whether the gradients were scaled.
    finite : bool
        Whether the norm was finite. When it is not, the gradients and the clipper's
        statistics were left untouched: skip the optimiser step.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> stats = gradclip.QuantileClipper()(np.array([3.0, 4.0]))
    >>> stats
    ClipStats(norm=5.0, threshold=5.0, clipped=False, finite=True)
    >>> norm, threshold, clipped, finite = stats
    """

    norm: float
    threshold: float
    clipped: bool
    finite: bool


class _NormClipper:
    """The step and the state dict shared by the clippers.

    A subclass supplies ``_threshold_and_update(norm)`` (this step's threshold, with the
    statistics updated for a finite ``norm``) and ``_restore(state)``. ``_CONFIG`` names
    the constructor arguments and ``_STATISTICS`` the running statistics (held as
    ``self._<name>``); together they make the state dict.
    """

    _CONFIG = ()
    _STATISTICS = ()

    def __call__(self, grads, *, reducer=None, replicated=None):
        """Clip one step's gradients in place and update the statistics.

        Parameters
        ----------
        grads : array, iterable of arrays, or nested dict / list / tuple of arrays
            Writable leaves; ``None`` leaves are skipped, a repeated array is scaled once.
        reducer : optional
            For gradients sharded across ranks: the norm is that of every rank's shard
            together, so the clippers of all ranks see the same norms and keep the same
            statistics (see `clip_grad_norm_`).
        replicated : leaves of ``grads`` in any container, optional
            Leaves every rank holds whole: counted once.

        Returns
        -------
        ClipStats
            The norm before clipping, the threshold, and whether it clipped.

        Raises
        ------
        TypeError, ValueError
            A leaf that is not an array, has an unsupported dtype or is read-only;
            raised before anything is written or any statistic changes.

        Notes
        -----
        GPU leaves: the statistics live on the host, so the norm is read there, one
        device-to-host synchronisation per step; the leaves are scaled on the device.
        """
        with Collective(type(self).__name__, reducer) as collective:
            batch = _batch.collect(grads, type(self).__name__, writes=True, cuda=True)
            norm = collective.total_norm(batch, 2.0, replicated)  # on the host: GPU leaves synchronise
        if not math.isfinite(norm):
            return ClipStats(norm, math.nan, False, False)
        threshold = self._threshold_and_update(norm)
        clipped = norm > threshold
        if clipped:
            _backend.scale_to_max_norm_(batch, threshold, norm, _EPS)
        return ClipStats(norm, threshold, clipped, True)

    def state_dict(self):
        """The constructor arguments and the running statistics.

        Returns
        -------
        dict
            Plain Python values (floats, ints, lists, None), a snapshot that later steps
            do not change. ``load_state_dict`` of any clipper of the same class restores
            it exactly: the restored clipper continues bit for bit as this one would.
        """
        state = {name: getattr(self, name) for name in self._CONFIG}
        for name in self._STATISTICS:
            value = getattr(self, "_" + name)
            state[name] = list(value) if isinstance(value, (list, collections.deque)) else value
        return state

    def load_state_dict(self, state):
        """Restore a ``state_dict()`` of this class: its arguments and its statistics.

        Parameters
        ----------
        state : dict
            As returned by `state_dict` (also after a round trip through JSON).

        Raises
        ------
        ValueError
            Keys missing or unexpected, or a field that `state_dict` cannot have made (of
            the wrong type, out of range, a statistic that is negative or not finite, a
            list too long); the clipper is unchanged.
        TypeError
            ``state`` is not a dict.
        """
        owner = type(self).__name__
        _checks.state_keys(owner, state, self._CONFIG + self._STATISTICS)
        try:
            restored = type(self)(**{name: state[name] for name in self._CONFIG})
        except (TypeError, ValueError) as error:
            raise _checks.saved_argument(owner, error) from None
        restored._restore(state)
        self.__dict__.update(restored.__dict__)

    def __repr__(self):
        config = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._CONFIG)
        return f"{type(self).__name__}({config})"


class EMAClipper(_NormClipper):
    """AdaClip: clip at a multiple of the moving average of the gradient norm.

    The tutorial's rule ``τ_t = α · EMA_β(‖g‖)``: step ``t`` is clipped at ``alpha``
    times the bias-corrected exponential moving average of the previous steps' norms.
    The first ``warmup`` finite steps only gather statistics (nothing is clipped).

    Parameters
    ----------
    alpha : float, default 2.0
        The threshold as a multiple of the average norm; > 0.
    beta : float, default 0.97
        The EMA's decay, in [0, 1): the average forgets with a horizon of about
        ``1 / (1 - beta)`` steps.
    warmup : int, default 25
        Finite steps that only feed the average; >= 1 (the first step has no history).

    Raises
    ------
    ValueError, TypeError
        An argument out of range or of the wrong type.

    Notes
    -----
    (Not the AdaClip of Pichapati et al. 2019, per-coordinate clipping for
    differentially private SGD.) The tutorial (``seeds/gradient_clipping_tutorial.md``)
    gives the rule but no defaults; these are ours. ``beta = 0.97`` and ``warmup = 25``
    are ZClip's published values (Kumar et al. 2025; see `ZScoreClipper`), the published
    clipper that keeps the same statistic, an EMA of the clipped gradient norm. ``alpha = 2.0`` clips a norm
    that doubles against its recent average — a spike — while leaving the ordinary
    step-to-step spread of mini-batch gradient norms alone.

    The average is ``m_t = beta · m_{t-1} + (1 - beta) · min(‖g_t‖, τ_t)``, with
    ``m_0 = 0`` and Adam's bias correction ``m_t / (1 - beta**t)`` (``t`` counts finite
    steps), so that it is a weighted mean of the norms seen from the first step on. It
    takes the *clipped* norm, as ZClip does: a spike would otherwise raise the
    threshold meant to catch the next one. Then the threshold grows by at most a factor
    ``beta + (1 - beta) · alpha`` (1.03 by default) per step.

    Clipping scales every leaf in place by ``τ_t / (‖g_t‖ + 1e-6)`` iff
    ``‖g_t‖ > τ_t`` (see `clip_grad_norm_`). A NaN or infinite norm leaves the
    gradients, the average and the step count untouched.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> clip = gradclip.EMAClipper(alpha=2.0, beta=0.5, warmup=2)
    >>> clip(np.array([2.0]))  # warm-up: statistics only
    ClipStats(norm=2.0, threshold=inf, clipped=False, finite=True)
    >>> _ = clip(np.array([2.0]))
    >>> g = np.array([8.0])
    >>> clip(g)
    ClipStats(norm=8.0, threshold=4.0, clipped=True, finite=True)
    >>> g
    array([3.9999995])
    """

    _CONFIG = ("alpha", "beta", "warmup")
    _STATISTICS = ("ema", "steps")

    def __init__(self, alpha=2.0, beta=0.97, warmup=25):
        self.alpha = _checks.positive("alpha", alpha)
        self.beta = _checks.decay("beta", beta)
        self.warmup = _checks.count("warmup", warmup, 1)
        self._ema = 0.0  # the EMA before bias correction
        self._steps = 0  # finite steps folded into it

    def _threshold_and_update(self, norm):
        if self._steps < self.warmup:
            threshold = math.inf
        else:
            threshold = self.alpha * self._ema / (1.0 - self.beta**self._steps)
        self._ema = self.beta * self._ema + (1.0 - self.beta) * min(norm, threshold)
        self._steps += 1
        return threshold

    def _restore(self, state):
        steps = _checks.saved_count("EMAClipper", "steps", state["steps"], 0)
        ema = _checks.saved_statistic("EMAClipper", "ema", state["ema"])
        if steps == 0 and ema != 0.0:
            raise _checks.bad_checkpoint("EMAClipper", "ema", "0.0 while steps is 0 (nothing averaged yet)", ema)
        self._ema, self._steps = ema, steps


class QuantileClipper(_NormClipper):
    """AutoClip: clip at a quantile of the gradient norms seen so far.

    Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks": each step's norm joins the history, then the threshold is the
    ``quantile`` of the history.

    Parameters
    ----------
    quantile : float, default 0.1
        In [0, 1]; the paper's default percentile ``p = 10``.
    history : int or None, default None
        How many of the last finite norms to keep (>= 1); ``None`` keeps them all, as the
        paper does. The state dict holds the kept norms.

    Raises
    ------
    ValueError, TypeError
        An argument out of range or of the wrong type.

    Notes
    -----
    As in the paper's algorithm (``grad_history.append(norm)`` then
    ``np.percentile(grad_history, p)``), the current norm enters the history *before*
    the threshold is taken, so the first step is never clipped. The quantile
    interpolates linearly between order statistics, as NumPy's default method does, and
    gives the same value as ``np.quantile(history, quantile)``. The history is kept
    sorted, so a step costs O(log n) comparisons and a list insertion rather than a sort.

    Clipping scales every leaf in place by ``threshold / (norm + 1e-6)`` iff
    ``norm > threshold`` (see `clip_grad_norm_`; the paper calls PyTorch's
    ``clip_grad_norm_``, the same rule). A NaN or infinite norm does not enter the
    history and leaves the gradients untouched.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> clip = gradclip.QuantileClipper(quantile=0.5)
    >>> [clip(np.array([n])).clipped for n in (1.0, 3.0, 2.0)]
    [False, True, False]
    >>> g = np.array([10.0])
    >>> clip(g).threshold, g
    (2.5, array([2.49999975]))
    """

    _CONFIG = ("quantile", "history")
    _STATISTICS = ("norms",)

    def __init__(self, quantile=0.1, history=None):
        self.quantile = _checks.quantile(quantile)
        self.history = None if history is None else _checks.count("history", history, 1)
        self._norms = collections.deque()  # the kept norms, oldest first
        self._sorted = []  # the same norms, in ascending order

    def _threshold_and_update(self, norm):
        self._norms.append(norm)
        bisect.insort(self._sorted, norm)
        if self.history is not None and len(self._norms) > self.history:
            del self._sorted[bisect.bisect_left(self._sorted, self._norms.popleft())]
        return _interpolated_quantile(self._sorted, self.quantile)

    def _restore(self, state):
        norms = _checks.saved_statistics("QuantileClipper", "norms", state["norms"], self.history)
        self._norms = collections.deque(norms)
        self._sorted = sorted(norms)


def _interpolated_quantile(ascending, q):
    """The ``q``-quantile of sorted values, NumPy's ``method="linear"`` bit for bit."""
    position = q * (len(ascending) - 1)
    below = math.floor(position)
    fraction = position - below
    low = ascending[below]
    high = ascending[min(below + 1, len(ascending) - 1)]
    if fraction >= 0.5:  # NumPy's two-sided lerp: exact at both ends
        return high - (high - low) * (1.0 - fraction)
    return low + (high - low) * fraction


class ZScoreClipper(_NormClipper):
    """ZClip: clip norms that are outliers against an EMA of their mean and variance.

    Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", in its
    default mode (``mode="zscore"``, ``clip_option="adaptive_scaling"``).

    Parameters
    ----------
    alpha : float, default 0.97
        EMA smoothing of the mean and variance, in [0, 1).
    z_thresh : float, default 2.5
        A norm with z-score above this is a spike; > 0.
    warmup : int, default 25
        Finite steps whose norms initialise the mean and variance (ZClip's
        ``warmup_steps``); >= 1.
    max_norm : float or None, default None
        ZClip's ``max_grad_norm``: an absolute cap applied at every step, warm-up
        included, on top of the adaptive threshold; ``None`` for none.
    eps : float, default 1e-6
        Added to the standard deviation in the z-score; > 0.

    Raises
    ------
    ValueError, TypeError
        An argument out of range or of the wrong type.

    Notes
    -----
    The published rule, step by step (defaults from the paper and the reference
    implementation, ``github.com/bluorion-com/ZClip``):

    * Warm-up: the first ``warmup`` finite norms are collected; then ``μ`` is their
      mean and ``σ²`` their (population) variance. Warm-up steps are clipped only at
      ``max_norm``.
    * After: ``z = (‖g‖ - μ) / (σ + eps)``. If ``z > z_thresh`` (a spike) the gradients
      are clipped to ``g* = μ + (z_thresh² / z) · σ`` — the further out the spike, the
      harder the clip — otherwise ``g* = ‖g‖``. Then ``μ ← α·μ + (1-α)·g*`` and
      ``σ² ← α·σ² + (1-α)·(g* - μ)²`` with the new ``μ``: the statistics take the
      *clipped* norm.
    * ``max_norm``: the gradients are clipped at ``min(g*, max_norm)``; the statistics
      still take ``g*``.

    The reference implementation's README gives ``max_grad_norm = None`` as the default
    (its code's signature has used 1.0); the other modes (``"percentile"``,
    ``clip_option="mean"``) and ``clip_factor`` are not offered here.

    `ClipStats.threshold` is ``min(g*, max_norm)`` on a spike, and on other steps the
    norm a spike would have needed, ``min(μ + z_thresh · (σ + eps), max_norm)``
    (``max_norm`` or inf during warm-up); spikes are detected as
    ``‖g‖ > μ + z_thresh · (σ + eps)``, which is ``z > z_thresh`` up to rounding. So
    clipped is ``norm > threshold`` throughout. Clipping scales every leaf in place by
    ``threshold / (norm + 1e-6)``, as ZClip does; a NaN or infinite norm leaves the
    gradients and the statistics untouched and does not count as a warm-up step.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> clip = gradclip.ZScoreClipper(warmup=4)
    >>> for norm in (1.0, 3.0, 1.0, 3.0):  # warm-up: mean 2, standard deviation 1
    ...     _ = clip(np.array([norm]))
    >>> clip(np.array([4.0])).clipped  # z = 2.0
    False
    >>> g = np.array([100.0])  # a spike
    >>> stats = clip(g)
    >>> stats.clipped, round(stats.threshold, 4), g.round(4)
    (True, 2.1291, array([2.1291]))
    """

    _CONFIG = ("alpha", "z_thresh", "warmup", "max_norm", "eps")
    _STATISTICS = ("warmup_norms", "mean", "var")

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, max_norm=None, eps=1e-6):
        self.alpha = _checks.decay("alpha", alpha)
        self.z_thresh = _checks.positive("z_thresh", z_thresh)
        self.warmup = _checks.count("warmup", warmup, 1)
        self.max_norm = None if max_norm is None else _checks.nonnegative("max_norm", max_norm)
        self.eps = _checks.positive("eps", eps)
        self._warmup_norms = []  # emptied when the warm-up ends
        self._mean = None  # None until the warm-up ends
        self._var = None

    def _threshold_and_update(self, norm):
        cap = math.inf if self.max_norm is None else self.max_norm
        if self._mean is None:
            self._warmup_norms.append(norm)
            if len(self._warmup_norms) == self.warmup:
                self._start_statistics()
            return cap
        std = math.sqrt(self._var)
        spike_bound = self._mean + self.z_thresh * (std + self.eps)
        if norm > spike_bound:
            z = (norm - self._mean) / (std + self.eps)
            clipped_norm = self._mean + (self.z_thresh * std) / (z / self.z_thresh)
            threshold = min(clipped_norm, cap)
        else:
            clipped_norm = norm
            threshold = min(spike_bound, cap)
        self._mean = self.alpha * self._mean + (1.0 - self.alpha) * clipped_norm
        deviation = clipped_norm - self._mean
        self._var = self.alpha * self._var + (1.0 - self.alpha) * deviation * deviation
        return threshold

    def _start_statistics(self):
        norms = self._warmup_norms
        self._mean = sum(norms) / len(norms)
        self._var = sum((x - self._mean) * (x - self._mean) for x in norms) / len(norms)
        self._warmup_norms = []

    def _restore(self, state):
        owner = "ZScoreClipper"
        warmup_norms = _checks.saved_statistics(owner, "warmup_norms", state["warmup_norms"], self.warmup - 1)
        mean, var = state["mean"], state["var"]
        if (mean is None) != (var is None):
            raise _checks.bad_checkpoint(
                owner, "mean and var", "both None (during the warm-up) or both numbers", (mean, var)
            )
        if mean is not None:
            mean = _checks.saved_statistic(owner, "mean", mean)
            var = _checks.saved_statistic(owner, "var", var)
            if warmup_norms:
                raise _checks.bad_checkpoint(
                    owner, "warmup_norms", "empty once mean and var are set (after the warm-up)", warmup_norms
                )
        self._warmup_norms, self._mean, self._var = warmup_norms, mean, var


def _reusable(grads):
    """``grads``, or the list of its items if it is a one-shot iterator (a generator)."""
    return list(grads) if isinstance(grads, Iterator) else grads


# --------------------------------------------------------------------------- AGC


def adaptive_grad_clip_(grads, params, clipping=0.01, *, eps=1e-3, axis=None):
    """Unit-wise adaptive gradient clipping (AGC), in place.

    Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
    Normalization": each unit's gradient norm is capped at
    ``clipping · max(‖W_unit‖, eps)``, with ``W`` the unit's parameters.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
        Writable leaves. A ``None`` gradient skips its parameter; a repeated array is
        clipped once.
    params : the same structure as ``grads``
        The parameters, leaf for leaf of the same shapes (any supported dtype); read
        only.
    clipping : float, default 0.01
        The largest allowed ratio of gradient norm to parameter norm; >= 0.
    eps : float, default 1e-3
        The parameter norm's floor, so that units whose parameters are zero (at
        initialisation) can still move; >= 0.
    axis : int, tuple of ints, or None
        The axes a unit's norm is taken over, for leaves with 2 or more dimensions.
        ``None``: every axis but 0 — one unit per output row in PyTorch's
        ``(out, in, ...)`` layout. Pass ``axis=0`` for JAX's ``(in, out)`` dense
        kernels and ``axis=(0, 1, 2)`` for its ``(h, w, in, out)`` convolutions (one
        call per layout). 0-d and 1-d leaves are one unit each.

    Returns
    -------
    int
        The number of units clipped.

    Raises
    ------
    ValueError
        ``grads`` and ``params`` differ in structure or in a leaf's shape, a gradient
        and its parameter are on different devices (CPU / GPU), a bad
        ``clipping`` / ``eps`` / ``axis``, or a read-only gradient; checked for every
        leaf before anything is written.
    TypeError
        A leaf that is not an array or has an unsupported dtype.

    Notes
    -----
    The rule is Optax's ``adaptive_grad_clip``: where ``‖G_unit‖ > max_norm`` the unit
    becomes ``G_unit · max_norm / max(‖G_unit‖, 1e-6)``; other units are not written.
    Norms are taken in float64 (complex: ``|z|``), rescaled by the unit's largest
    magnitude where the sum of squares overflows; the product is taken in float64 and
    rounded once, to nearest-even, to the leaf's dtype. A unit whose gradient norm is
    NaN or inf is left as it is (Optax would fill it with NaN), as is one whose
    parameter norm is NaN or inf. Unlike Optax, which squeezes a leaf before choosing
    its rule, the units follow ``axis`` alone: a ``(1, n)`` kernel under ``axis=0`` has
    ``n`` units.

    GPU leaves: every unit of every GPU leaf is one row of a single plan (one launch per
    pass and dtype); the unit norms are read on the host, one synchronisation per call,
    and the units scaled on the device.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> w = np.array([[3.0, 4.0], [0.3, 0.4]])  # two units (rows), norms 5 and 0.5
    >>> g = np.array([[0.3, 0.4], [0.3, 0.4]])  # gradient norms 0.5 and 0.5
    >>> gradclip.adaptive_grad_clip_(g, w, clipping=0.2)  # caps 1.0 and 0.1
    1
    >>> g
    array([[0.3 , 0.4 ],
           [0.06, 0.08]])
    """
    clipping = _checks.nonnegative("clipping", clipping)
    eps = _checks.nonnegative("eps", eps)
    requested_axes = _checks.axis(axis)
    grads, params = _reusable(grads), _reusable(params)
    batch = _batch.collect(grads, "adaptive_grad_clip_", writes=True, cuda=True)
    leaves = _backend.position_leaves(batch)
    grad_units, param_units = [], []
    done = set()  # a repeated gradient is clipped once
    for position, (keys, param) in enumerate(_pair_leaves(grads, params)):
        grad = leaves[position]
        grad_path = lambda keys=keys: _path("grads", keys)  # noqa: E731
        param_path = lambda keys=keys: _path("params", keys)  # noqa: E731
        param = _backend.leaf_like(grad, param, param_path, "adaptive_grad_clip_", grad_path)
        if param.shape != grad.shape:
            raise _checks.shape_mismatch(grad_path(), grad.shape, param_path(), param.shape)
        ndim = len(grad.shape)
        if ndim <= 1:
            unit_axes = tuple(range(ndim))
        elif requested_axes is None:
            unit_axes = tuple(range(1, ndim))
        else:
            unit_axes = _checks.unit_axes(grad_path, requested_axes, ndim)
        if int(batch.unique_of[position]) not in done:
            done.add(int(batch.unique_of[position]))
            grad_units += _backend.units(grad, unit_axes)
            param_units += _backend.units(param, unit_axes)
    if not grad_units:
        return 0
    # each leaf was checked as a whole (writable, sharing no memory with another); its units
    # are disjoint views of it, which may interleave (columns): no need to check them again
    grad_units = _batch.collect(grad_units, "adaptive_grad_clip_", cuda=True)
    param_units = _batch.collect(param_units, "adaptive_grad_clip_", cuda=True)
    clip, coef = _unit_coefs(
        _backend.host_leaf_norms(grad_units, 2.0), _backend.host_leaf_norms(param_units, 2.0), clipping, eps
    )
    if coef is not None:
        _backend.scale_(grad_units, coef)
    return int(np.count_nonzero(clip))


def _unit_coefs(grad_norms, param_norms, clipping, eps):
    """Which units to clip, and every unit's coefficient (1 for the others; None if none clips)."""
    max_norms = clipping * np.maximum(param_norms, eps)
    clip = np.isfinite(grad_norms) & np.isfinite(max_norms) & (grad_norms > max_norms)
    if not clip.any():
        return clip, None
    coef = np.ones_like(max_norms)
    np.divide(max_norms, np.maximum(grad_norms, 1e-6), out=coef, where=clip)
    return clip, coef


def _pair_leaves(grads, params):
    """``(keys, parameter)`` for each gradient leaf, in leaf order (``None`` skipped)."""
    pairs = []
    _pair(grads, params, (), pairs)
    return pairs


def _pair(grads, params, keys, pairs):
    if grads is None:
        return  # a parameter without a gradient
    mine = _tree.entries(grads)
    if mine is None:
        if params is None or _tree.entries(params) is not None:
            raise _mismatch(keys, params, "an array")
        pairs.append((keys, params))
        return
    grad_keys, grad_values = mine
    theirs = None if params is None else _tree.entries(params)
    if grad_keys is not None:
        if theirs is None or theirs[0] is None or set(theirs[0]) != set(grad_keys):
            raise _mismatch(keys, params, f"a mapping with keys {grad_keys}")
        by_key = dict(zip(*theirs))
        for key, grad in zip(grad_keys, grad_values):
            _pair(grad, by_key[key], (*keys, key), pairs)
    else:
        if theirs is None or theirs[0] is not None or len(theirs[1]) != len(grad_values):
            raise _mismatch(keys, params, f"a sequence of {len(grad_values)}")
        for index, (grad, param) in enumerate(zip(grad_values, theirs[1])):
            _pair(grad, param, (*keys, index), pairs)


def _mismatch(keys, params, expected):
    entries = None if params is None else _tree.entries(params)
    if params is None:
        found = "None"
    elif entries is None:
        found = _checks.with_article(type(params).__name__)
    elif entries[0] is not None:
        found = f"a mapping with keys {entries[0]}"
    else:
        found = f"{_checks.with_article(type(params).__name__)} of {len(entries[1])}"
    detail = f"grads has {expected} there, params has {found}"
    return _checks.params_mismatch(_path("grads", keys), _path("params", keys), detail)


def _path(root, keys):
    """``root['enc'][1]``: the same notation as the library's other messages."""
    return root + "".join(f"[{key!r}]" for key in keys)
