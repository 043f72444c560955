"""Private training (SPEC §9): per-example and per-client clipping, the noised sum of
clipped examples, Gaussian noise and an adaptive clip norm.

DP-SGD (Abadi et al. 2016) and DP-FedAvg (McMahan et al. 2018) clip every example's (or
client's) gradient to a norm bound, sum, and add Gaussian noise. A batch of examples is
either *stacked* (a grads container whose every leaf has the example axis first) or a
`Examples` sequence of separate grads containers. The operations run on the batch's
cells (``_cells``) through the twin of their device (``Cells.twin``: ``_private_cpu`` or
``_private_cuda``); noise added to grads goes through ``_backend``.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from . import _backend, _batch, _cells, _checks, _tree
from .noise import GaussianNoise


class Examples(Sequence):
    """A batch given as a sequence of examples: ``B`` grads containers with the same
    structure, shapes and dtypes (e.g. client updates), read where they lie, never
    stacked into one array.

    Parameters
    ----------
    examples : iterable of grads containers
        Consumed once (a generator is fine).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> clients = gradclip.Examples([{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 1.0])}])
    >>> gradclip.per_example_norms(clients)
    array([5., 1.])
    """

    def __init__(self, examples):
        if isinstance(examples, (dict, np.ndarray)) or not hasattr(examples, "__iter__"):
            raise _checks.not_examples(examples)
        self._examples = list(examples)

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, index):
        return self._examples[index]

    def __repr__(self):
        return f"Examples(<{len(self)} examples>)"


class ExampleStats(NamedTuple):
    """What `clipped_sum` saw of each example.

    On the GPU every field is a float64 device array of the first leaf's kind (the
    counts 0-d), so that nothing waits for the device: ``int(stats.clipped)`` reads one.

    Attributes
    ----------
    norms : numpy.ndarray
        float64 ``(B,)``: each example's global L2 norm before clipping.
    layer_norms : numpy.ndarray
        float64 ``(B, L)``: each example's per-leaf L2 norms, one column per leaf position.
    clipped : int
        Examples scaled down (some factor ``< 1``), the zeroed ones not counted.
    nonfinite : int
        Examples whose norm is NaN or inf: zeroed (factor 0), left out of the sum.
    """

    norms: np.ndarray
    layer_norms: np.ndarray
    clipped: int
    nonfinite: int


def per_example_norms(batch, norm_type=2.0):
    """Each example's global p-norm over all its leaves.

    Parameters
    ----------
    batch : grads container with the example axis first, or `Examples`
    norm_type : float, default 2.0
        ``p > 0`` or ``inf``.

    Returns
    -------
    numpy.ndarray
        float64 ``(B,)``, accumulated in float64 in one read pass (p = 1, 2 and inf;
        other p, and leaves whose sum of squares overflows, take a second, scaled one);
        the same bits for any thread count. For GPU leaves, a device array of the first
        leaf's kind.

    Raises
    ------
    ValueError
        A 0-d leaf or leaves with different ``B`` (stacked); examples that differ in
        structure, shapes or dtypes (`Examples`); a bad ``norm_type``.
    TypeError
        A leaf that is not an array or has an unsupported dtype.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> per_example = {"w": np.array([[3.0, 4.0], [0.0, 2.0]]), "b": np.array([0.0, 0.0])}
    >>> gradclip.per_example_norms(per_example)
    array([5., 2.])
    """
    p = _checks.norm_type(norm_type)
    cells = _prepare(batch, "per_example_norms", writes=False)
    if cells is None:
        return np.zeros(0)
    return cells.twin.example_norms(cells, p)


def clip_per_example_(batch, max_norm, *, eps=1e-6):
    """Clip every example to a norm bound, in place.

    Example ``i`` is scaled by ``f_i = min(1, max_norm / (n_i + eps))``, ``n_i`` its
    global L2 norm; nothing is written where ``f_i = 1``. An example whose norm is NaN or
    inf gets ``f_i = 0``: it is zeroed.

    Parameters
    ----------
    batch : grads container with the example axis first, or `Examples`
        Writable leaves.
    max_norm : float, or a sequence of floats
        ``>= 0``. A sequence with one bound per leaf of an example (in flattening order)
        clips each leaf's per-example norm to its own bound (per-layer clipping); an
        example with a non-finite norm is still zeroed whole.
    eps : float, default 1e-6
        ``>= 0``; 1e-6 is Opacus' rule, 0 optax's and Flower's.

    Returns
    -------
    numpy.ndarray
        The norms compared with the bounds, before clipping: float64 ``(B,)`` for one
        bound, ``(B, L)`` (one column per leaf position) for per-layer bounds. For GPU
        leaves, a device array of the first leaf's kind.

    Raises
    ------
    ValueError
        A read-only leaf, a bad bound or eps, a wrong number of bounds, or a bad batch
        (see `per_example_norms`; in `Examples`, one array in two examples); nothing was
        written.
    TypeError
        A leaf that is not an array or has an unsupported dtype.

    Notes
    -----
    Each element becomes ``x * f_i`` (per-layer: ``f_iu``), the product in float64
    rounded once to the leaf's dtype.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> g = np.array([[3.0, 4.0], [0.3, 0.4]])
    >>> gradclip.clip_per_example_(g, 1.0, eps=0.0)
    array([5. , 0.5])
    >>> g
    array([[0.6, 0.8],
           [0.3, 0.4]])
    """
    eps = _checks.nonnegative("eps", eps)
    cells = _prepare(batch, "clip_per_example_", writes=True)
    if cells is None:
        return np.zeros(0)
    bounds = _bounds(max_norm, cells)
    clipping = cells.twin.clipping(cells, bounds, eps)
    cells.twin.scale_cells_(cells, clipping)
    return _compared(clipping, bounds)


def clip_per_example(batch, max_norm, *, eps=1e-6):
    """Out-of-place `clip_per_example_`: returns ``(clipped, norms)``, ``batch`` untouched.

    ``clipped`` is new arrays in the batch's form: the stacked container, or an
    `Examples` of containers.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> clipped, norms = gradclip.clip_per_example({"w": np.array([[6.0, 8.0]])}, 5.0, eps=0.0)
    >>> clipped, norms
    ({'w': array([[3., 4.]])}, array([10.]))
    """
    eps = _checks.nonnegative("eps", eps)
    cells = _prepare(batch, "clip_per_example", writes=False)
    if cells is None:
        return Examples([]), np.zeros(0)
    bounds = _bounds(max_norm, cells)
    clipping = cells.twin.clipping(cells, bounds, eps)
    clipped = cells.twin.clipped_copy(cells, clipping)
    return (clipped if cells.stacked else Examples(clipped)), _compared(clipping, bounds)


def clipped_sum(batch, max_norm, *, eps=1e-6, noise_multiplier=0.0, noise=None, normalize_by=None):
    """The sum of the clipped examples, plus Gaussian noise: one DP-SGD / DP-FedAvg step.

    ``total = (Σ_i f_i g_i + N(0, σ²)) / normalize_by`` with ``f_i = min(1, max_norm /
    (n_i + eps))`` (0 for a non-finite norm) and ``σ = noise_multiplier · max_norm``.

    Parameters
    ----------
    batch : grads container with the example axis first, or `Examples`
        Only read.
    max_norm : float, or a sequence of floats
        ``>= 0``. One bound per leaf of an example (in flattening order): per-layer
        clipping, each leaf's per-example norm clipped to its own bound, and
        ``σ = noise_multiplier · ‖bounds‖₂`` (Opacus' rule).
    eps : float, default 1e-6
        ``>= 0``: 1e-6 is Opacus' factor, 0 optax's ``per_example_global_norm_clip`` and
        Flower's.
    noise_multiplier : float, default 0.0
        Finite, ``>= 0``; with 0 no noise is drawn.
    noise : GaussianNoise, optional
        The noise stream; None draws from a fresh generator seeded from the OS.
    normalize_by : float, optional
        Finite, ``> 0``: divide the noised sum by it (e.g. the expected batch size).

    Returns
    -------
    total : one example's structure
        The leaves' dtypes, new arrays (of the caller's framework), each laid out like
        the examples' leaf.
    stats : ExampleStats
        ``norms``, ``layer_norms``, ``clipped``, ``nonfinite`` (for GPU leaves, device
        arrays: nothing waits for the GPU).

    Raises
    ------
    ValueError
        A bad bound, eps, noise_multiplier or normalize_by; noise with an infinite bound;
        a bad batch (see `per_example_norms`), or ``Examples([])``, whose result has no
        structure.
    TypeError
        A leaf that is not an array or has an unsupported dtype; ``noise`` that is not a
        `GaussianNoise`.

    Notes
    -----
    Two passes over the examples, whatever their number: one reads them for the norms,
    one reads each example once and writes only the result. Nothing of the size of the
    examples is allocated (except a C-ordered copy of a leaf whose layout differs between
    examples, or that repeats elements). Every element is accumulated in float64, example
    by example in order, and rounded once: the same bits for any thread count. The
    noise takes one draw per real number of the result, leaf after leaf, each leaf in
    its memory order (see `GaussianNoise`).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> per_example = {"w": np.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> total, stats = gradclip.clipped_sum(per_example, 1.0, eps=0.0)
    >>> total
    {'w': array([0.9, 1.2])}
    >>> stats.norms, stats.clipped, stats.nonfinite
    (array([5. , 0.5]), 1, 0)
    """
    eps = _checks.nonnegative("eps", eps)
    noise_multiplier = _checks.finite_nonnegative("noise_multiplier", noise_multiplier)
    if noise is not None and not isinstance(noise, GaussianNoise):
        raise _checks.noise_type(noise)
    divisor = 1.0 if normalize_by is None else _checks.finite_positive("normalize_by", normalize_by)
    cells = _prepare(batch, "clipped_sum", writes=False)
    if cells is None:
        raise _checks.no_examples("clipped_sum")
    bounds = _bounds(max_norm, cells)
    std = 0.0
    if noise_multiplier:
        scale = float(np.sqrt(np.sum(bounds**2))) if bounds.ndim else float(bounds)
        if not math.isfinite(scale):
            raise _checks.noise_needs_finite_bound(max_norm)
        std = noise_multiplier * scale
    clipping = cells.twin.clipping(cells, bounds, eps)
    first_draw = 0
    if std:
        noise = GaussianNoise() if noise is None else noise
        first_draw = noise._take(sum(cells.draw_sizes()))
    outputs = cells.twin.weighted_sum(cells, clipping, std, divisor, noise, first_draw)
    stats = ExampleStats(clipping.norms, clipping.layer_norms, clipping.clipped, clipping.nonfinite)
    return cells.result(outputs), stats


def add_noise_(grads, std, noise):
    """Add N(0, std²) to every element of ``grads`` in place.

    Parameters
    ----------
    grads : array, iterable of arrays, or nested dict / list / tuple of arrays
        Writable leaves; a repeated array gets noise once.
    std : float
        Finite, ``>= 0``; 0 writes nothing and draws nothing.
    noise : GaussianNoise
        The stream; one draw per real number, leaf after leaf, each in its memory order
        (a complex element takes two: real part, imaginary part).

    Notes
    -----
    Each element becomes ``x + std · z``, the sum in float64 rounded once to the leaf's
    dtype; the draws are made where they are added (no array of noise is allocated).

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> g = np.zeros(3)
    >>> noise = gradclip.GaussianNoise(seed=0)
    >>> gradclip.add_noise_(g, 0.5, noise)
    >>> bool((g == 0.5 * gradclip.GaussianNoise(seed=0).standard_normal(3)).all()), noise.draws
    (True, 3)
    """
    std = _checks.finite_nonnegative("std", std)
    if not isinstance(noise, GaussianNoise):
        raise _checks.noise_type(noise)
    batch = _batch.collect(grads, "add_noise_", writes=True, cuda=True)
    if std:
        _backend.add_noise_(batch, std, noise)


class QuantileClipNorm:
    """A clip norm that tracks a quantile of the examples' norms (Andrew et al. 2021,
    "Differentially private learning with adaptive clipping").

    After each step, ``update(norms)`` sets ``C ← C · exp(−η (b̃ − γ))`` where ``b̃`` is
    the (noised) fraction of examples whose norm is **at most** ``C``: the unclipped
    fraction, as in the paper, TF-Privacy and Opacus. Without noise, on a fixed
    distribution of norms, ``C`` converges to its γ-quantile.

    Parameters
    ----------
    initial : float, default 0.1
        The first clip norm; finite, > 0.
    target_quantile : float, default 0.5
        γ, in [0, 1].
    learning_rate : float, default 0.2
        η, finite, >= 0.
    count_noise_std : float, default 0.0
        σ_b, finite, >= 0: the std of the Gaussian noise added to the count of unclipped
        examples (the privacy cost of the adaptation).
    noise : GaussianNoise, optional
        The stream of the count noise; None makes a fresh one (seeded from the OS) when
        ``count_noise_std > 0``.

    Notes
    -----
    ``b̃ = (#{i : n_i <= C} + σ_b z) / m``, ``m`` the number of norms given or, with
    ``expected_size=``, the expected batch size (the paper's choice under Poisson
    sampling, where the batch size itself is private). A NaN or infinite norm counts as
    clipped: its example was zeroed, not passed unclipped. The defaults are the paper's
    (``initial`` 0.1, ``γ`` 0.5, ``η`` 0.2). `state_dict` holds the clip norm and the
    configuration; checkpoint the noise stream (`GaussianNoise.state_dict`) with it.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> adaptive = gradclip.QuantileClipNorm(initial=1.0, target_quantile=0.5, learning_rate=0.2)
    >>> round(adaptive.update(np.array([0.5, 0.8, 0.9, 2.0])), 4)  # 3 of 4 unclipped: C shrinks
    0.9512
    """

    _CONFIG = ("initial", "target_quantile", "learning_rate", "count_noise_std")
    _STATE = ("clip_norm", "steps")

    def __init__(self, initial=0.1, target_quantile=0.5, learning_rate=0.2, count_noise_std=0.0, noise=None):
        self.initial = _checks.finite_positive("initial", initial)
        self.target_quantile = _checks.quantile(target_quantile)
        self.learning_rate = _checks.finite_nonnegative("learning_rate", learning_rate)
        self.count_noise_std = _checks.finite_nonnegative("count_noise_std", count_noise_std)
        if noise is not None and not isinstance(noise, GaussianNoise):
            raise _checks.noise_type(noise)
        self.noise = noise if noise is not None or not self.count_noise_std else GaussianNoise()
        self._clip_norm = self.initial
        self._steps = 0

    clip_norm = property(lambda self: self._clip_norm, doc="The current clip norm C.")
    steps = property(lambda self: self._steps, doc="Updates made so far.")

    def update(self, norms, *, expected_size=None):
        """Move the clip norm after a step whose examples had ``norms``; returns the new one.

        Parameters
        ----------
        norms : 1-d array of float
            The examples' norms before clipping (e.g. ``stats.norms`` of `clipped_sum`); a
            device array is read on the host (which waits for the GPU).
        expected_size : float, optional
            The denominator of the fraction (> 0); default: ``len(norms)``. Nothing
            changes when it is absent and ``norms`` is empty.
        """
        norms = _checks.norms_vector(_backend.host_values(norms))
        size = norms.size if expected_size is None else _checks.finite_positive("expected_size", expected_size)
        if not size:
            return self._clip_norm
        unclipped = float(np.count_nonzero(norms <= self._clip_norm))
        if self.count_noise_std:
            unclipped += self.count_noise_std * float(self.noise.standard_normal(1)[0])
        self._clip_norm *= math.exp(-self.learning_rate * (unclipped / size - self.target_quantile))
        self._steps += 1
        return self._clip_norm

    def state_dict(self):
        """The configuration, the clip norm and the step count (plain Python values)."""
        state = {name: getattr(self, name) for name in self._CONFIG}
        state.update(clip_norm=self._clip_norm, steps=self._steps)
        return state

    def load_state_dict(self, state):
        """Restore a `state_dict`; unchanged if it raises (the noise stream is kept).

        Raises
        ------
        ValueError, TypeError
            Keys missing or unexpected, or a value out of range.
        """
        _checks.state_keys("QuantileClipNorm", state, self._CONFIG + self._STATE)
        restored = QuantileClipNorm(**{name: state[name] for name in self._CONFIG}, noise=self.noise)
        clip_norm = state["clip_norm"]
        if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not 0 < clip_norm < math.inf:
            raise _checks.quantile_state("clip_norm", clip_norm)
        restored._clip_norm = float(clip_norm)
        restored._steps = _checks.count("steps", state["steps"], 0)
        if restored.noise is None and restored.count_noise_std:
            restored.noise = GaussianNoise()
        self.__dict__.update(restored.__dict__)

    def __repr__(self):
        config = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._CONFIG)
        return f"QuantileClipNorm({config}) at clip_norm={self._clip_norm!r}"


# ------------------------------------------------------------------ helpers


def _prepare(batch, function, writes):
    """The cells of ``batch`` (either form); None for ``Examples([])``."""
    if isinstance(batch, Examples):
        return _cells.sequence(batch, function, writes)
    return _cells.stacked(batch, function, writes)


def _bounds(max_norm, cells):
    """One bound (a 0-d float64 array), or one per unique leaf for per-layer clipping."""
    if np.ndim(max_norm) == 0:
        return np.array(_checks.nonnegative("max_norm", max_norm))
    values = list(max_norm)
    positions = cells.unique_of.size
    if len(values) != positions:
        raise _checks.bounds_count(len(values), positions)
    bounds = np.array([_checks.nonnegative(f"max_norm[{k}]", v) for k, v in enumerate(values)])
    per_leaf = bounds[np.unique(cells.unique_of, return_index=True)[1]]  # at each leaf's first position
    differs = np.flatnonzero(per_leaf[cells.unique_of] != bounds)
    if differs.size:
        p = int(differs[0])
        u = int(cells.unique_of[p])
        raise _checks.repeated_leaf_bounds(cells.path(u), _tree.path(cells.treedef, p), per_leaf[u], bounds[p])
    return per_leaf


def _compared(clipping, bounds):
    """The norms compared with the bounds: ``(B,)``, or per-layer ``(B, L)`` by position."""
    return clipping.norms if bounds.ndim == 0 else clipping.layer_norms
