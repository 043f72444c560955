"""NormMonitor: a per-step record of gradient norms, with non-finite and spike flags (SPEC §5)."""

import collections
import math
import statistics

import numpy as np

from . import _backend, _batch, _checks, _cpu


class NormMonitor:
    """Record the gradient norm of every step; flag non-finite steps and spikes; plot.

    The tutorial's monitoring loop (keep the norm of each step, look at it on a log
    scale to see explosions) as an object.

    Parameters
    ----------
    per_leaf : bool, default False
        Also keep each leaf's norm (`layer_norms`) at every step.
    spike_factor : float, default 10.0
        A finite norm above ``spike_factor`` times the median of the last ``window``
        finite norms is a spike; > 0.
    window : int, default 100
        How many of the last finite norms the median is taken over; >= 1.

    Raises
    ------
    ValueError, TypeError
        An argument out of range or of the wrong type.

    Notes
    -----
    A spike needs at least one earlier finite norm; the median of up to ``window`` of
    them (fewer at the start) makes the reference robust to the spikes themselves,
    which stay in the window as ordinary norms. The tutorial defines no spike, so the
    defaults are ours: an order of magnitude above the recent median is the signature
    of an exploding gradient (pass a smaller ``spike_factor`` for a more sensitive
    flag), and 100 steps is a recent history that a slow drift of the norm over
    training does not distort. Non-finite steps (NaN or inf) are flagged on their own
    and do not enter the window.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> monitor = gradclip.NormMonitor()
    >>> for g in ([np.array([3.0, 4.0])], [np.array([6.0, 8.0])], [np.array([np.nan])]):
    ...     _ = monitor.record(g)
    >>> monitor.record(100.0, threshold=1.0)  # a norm computed elsewhere, and its clip threshold
    100.0
    >>> summary = monitor.summary()
    >>> summary["count"], summary["median"], summary["nonfinite_steps"], summary["spike_steps"]
    (4, 10.0, [2], [3])
    """

    def __init__(self, per_leaf=False, spike_factor=10.0, window=100):
        self.per_leaf = bool(per_leaf)
        self.spike_factor = _checks.positive("spike_factor", spike_factor)
        self.window = _checks.count("window", window, 1)
        self._norms = []
        self._thresholds = []
        self._leaf_norms = []
        self._recent = collections.deque(maxlen=self.window)  # the last finite norms
        self._nonfinite_steps = []
        self._spike_steps = []

    def record(self, grads, *, threshold=None):
        """Store one step's total norm (and leaf norms, with ``per_leaf``).

        Parameters
        ----------
        grads : array, iterable of arrays, nested dict / list / tuple of arrays, or float
            The gradients, read and never written; or a Python ``float`` / ``int``
            (``numpy.float64`` included): a norm computed elsewhere, e.g. returned by
            `clip_grad_norm_` or in `ClipStats.norm`. Such a step has no leaf norms.
            GPU arrays are accepted: their norms are read on the host, one
            device-to-host synchronisation per step.
            For gradients sharded across ranks, record the norm that
            ``clip_grad_norm_(..., reducer=...)`` returns.
        threshold : float, optional
            The clip threshold of this step (e.g. `ClipStats.threshold`), drawn by
            `plot`; >= 0, inf, or NaN for none.

        Returns
        -------
        float
            The step's total L2 norm.

        Raises
        ------
        ValueError, TypeError
            A negative norm or threshold, a leaf that is not an array or has an
            unsupported dtype; nothing is recorded.
        """
        if isinstance(grads, (int, float)) and not isinstance(grads, bool):
            norm = _checks.recorded_norm(grads)
            leaf_norms = None
        else:
            batch = _batch.collect(grads, "NormMonitor.record", cuda=True)
            # one pass for both results; GPU leaves' norms are read on the host (synchronises)
            unique_norms = _backend.host_leaf_norms(batch, 2.0)
            norm = _cpu.total_norm(unique_norms, 2.0)
            leaf_norms = unique_norms[batch.unique_of] if self.per_leaf else None
        threshold = math.nan if threshold is None else _checks.recorded_threshold(threshold)
        step = len(self._norms)
        if not math.isfinite(norm):
            self._nonfinite_steps.append(step)
        else:
            if self._recent and norm > self.spike_factor * statistics.median(self._recent):
                self._spike_steps.append(step)
            self._recent.append(norm)
        self._norms.append(norm)
        self._thresholds.append(threshold)
        self._leaf_norms.append(leaf_norms)
        return norm

    @property
    def norms(self):
        """numpy.ndarray: the total norm of every step, float64."""
        return np.array(self._norms, dtype=np.float64)

    @property
    def thresholds(self):
        """numpy.ndarray: the threshold recorded at every step, NaN where none was."""
        return np.array(self._thresholds, dtype=np.float64)

    @property
    def leaf_norms(self):
        """list: per step, the leaf norms (float64 array) or None (``per_leaf`` off, or a
        step recorded as a plain norm)."""
        return list(self._leaf_norms)

    @property
    def nonfinite_steps(self):
        """list of int: the steps whose norm was NaN or inf."""
        return list(self._nonfinite_steps)

    @property
    def spike_steps(self):
        """list of int: the steps flagged as spikes."""
        return list(self._spike_steps)

    def summary(self):
        """The record at a glance.

        Returns
        -------
        dict
            ``count`` (steps recorded); ``min``, ``median``, ``max`` over the finite
            norms (NaN if there are none); ``last`` (the last norm, finite or not; NaN
            before the first step); ``nonfinite_steps`` and ``spike_steps`` (lists of
            step indices, counted from 0).
        """
        finite = [norm for norm in self._norms if math.isfinite(norm)]
        return {
            "count": len(self._norms),
            "min": min(finite, default=math.nan),
            "median": statistics.median(finite) if finite else math.nan,
            "max": max(finite, default=math.nan),
            "last": self._norms[-1] if self._norms else math.nan,
            "nonfinite_steps": list(self._nonfinite_steps),
            "spike_steps": list(self._spike_steps),
        }

    def plot(self, path):
        """Draw the norm over the steps on a log scale, as a PNG file.

        The recorded clip thresholds are drawn as a line, spikes are circled and
        non-finite steps are marked with vertical lines. No pyplot state is touched
        (the figure is drawn with matplotlib's Agg renderer, whatever backend is set).

        Parameters
        ----------
        path : str or os.PathLike
            Where to write the PNG (overwritten).

        Raises
        ------
        ImportError
            matplotlib is not installed (``pip install 'gradclip[plot]'``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise _checks.plot_needs_matplotlib(error) from None
        figure = Figure(figsize=(8, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        steps = np.arange(len(self._norms))
        norms = self.norms
        thresholds = self.thresholds
        drawable = np.isfinite(norms) & (norms > 0)  # what a log scale can show
        axes.plot(steps[drawable], norms[drawable], lw=1, color="tab:blue", label="gradient norm")
        threshold_drawable = np.isfinite(thresholds) & (thresholds > 0)
        if threshold_drawable.any():
            axes.plot(
                steps,
                np.where(threshold_drawable, thresholds, np.nan),
                lw=1,
                color="tab:green",
                label="clip threshold",
            )
        spikes = np.array(self._spike_steps, dtype=np.int64)
        if spikes.size:
            axes.plot(spikes, norms[spikes], "o", mfc="none", color="tab:orange", label="spike")
        for i, step in enumerate(self._nonfinite_steps):
            label = "non-finite" if i == 0 else None
            axes.axvline(step, color="tab:red", lw=1, alpha=0.5, label=label)
        if drawable.any() or threshold_drawable.any():
            axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel("gradient norm (L2)")
        axes.grid(True, which="both", alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        figure.savefig(path, format="png", dpi=100)
