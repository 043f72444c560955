"""Gaussian noise for private training (SPEC §9): a counter-based generator.

Draw number ``d`` of a stream is a function of the key and ``d`` alone (see
``kernels/private_cpu.py``; the backend, ``_private_cpu``, makes the draws), so the
stream is the same for any thread count and any split into calls: drawing 10 numbers and
then 7 gives the 17 numbers of one call.
The generator only keeps its key and the number of draws made so far.
"""

import os
import threading

import numpy as np

from . import _checks
from . import _private_cpu as _backend

_STATE = ("seed", "draws")


class GaussianNoise:
    """A stream of standard normal draws, reproducible from a seed or keyed by the OS.

    Parameters
    ----------
    seed : int or None, default None
        ``secure=False``: the stream's seed (any int >= 0); None picks one from the
        OS's entropy, readable afterwards as `seed` so that the run can be repeated.
    secure : bool, default False
        Key the stream from ``os.urandom`` (256-bit key, 64-bit nonce) and make it with
        ChaCha20, a cryptographic counter-mode generator: what Opacus' ``secure_mode``
        asks of torchcsprng. Its key never leaves the object (no `seed`, no
        `state_dict`); no run can repeat it.

    Raises
    ------
    TypeError
        ``seed`` is not None or an int >= 0.
    ValueError
        ``secure=True`` with a seed.

    Notes
    -----
    Seeded streams use Philox4x32-10 keyed by ``numpy.random.SeedSequence(seed)``.
    Each pair of draws is made by Box-Muller from 2 x 52 random bits, in float64:
    the largest possible draw is 8.49. Draws go to the gradients in the order of their
    real numbers (leaf by leaf, each in its memory order; a complex element takes two,
    real part first). Secure mode protects the key and the stream, not against attacks
    on floating-point noise itself (Mironov 2012; Jin et al. 2022), which no Gaussian
    sampler in floating point, Opacus' included, fully rules out.

    Examples
    --------
    >>> import gradclip
    >>> a = gradclip.GaussianNoise(seed=7)
    >>> b = gradclip.GaussianNoise(seed=7)
    >>> first, rest = a.standard_normal(2), a.standard_normal(3)
    >>> all(b.standard_normal(5) == [*first, *rest])
    True
    >>> a.draws
    5
    """

    def __init__(self, seed=None, *, secure=False):
        seed = _checks.seed(seed)
        self._secure = bool(secure)
        if self._secure:
            if seed is not None:
                raise _checks.secure_seed()
            self._kind = _backend.private_kernels().CHACHA
            self._key = np.frombuffer(os.urandom(40), dtype=np.uint32).copy()  # 8 key + 2 nonce words
            self._seed = None
        else:
            sequence = np.random.SeedSequence(seed)
            self._kind = _backend.private_kernels().PHILOX
            self._key = sequence.generate_state(2, np.uint32)
            self._seed = int(sequence.entropy)
        self._draws = 0
        self._lock = threading.Lock()  # one draw count, whichever thread takes draws

    secure = property(lambda self: self._secure, doc="Whether the stream is keyed from the OS (ChaCha20).")
    draws = property(lambda self: self._draws, doc="Numbers drawn so far: the next draw's position in the stream.")

    @property
    def seed(self):
        """The seed (None for a secure generator)."""
        return self._seed

    def standard_normal(self, size):
        """The next ``size`` draws, as a float64 array (``size``: an int or a shape)."""
        shape = (size,) if np.ndim(size) == 0 else tuple(size)
        out = np.empty(shape)
        if out.size:
            _backend.normals(out, self, self._take(out.size))
        return out

    def _take(self, n):
        """Reserve the next ``n`` draws; returns the first one's position."""
        with self._lock:
            first = self._draws
            self._draws += int(n)
        return first

    def state_dict(self):
        """``{"seed": ..., "draws": ...}``: enough to continue the stream bit for bit.

        Raises
        ------
        ValueError
            A secure generator (its key never leaves it).
        """
        if self._secure:
            raise _checks.secure_state("state_dict")
        return {"seed": self._seed, "draws": self._draws}

    def load_state_dict(self, state):
        """Continue the stream of a `state_dict`; unchanged if it raises.

        Raises
        ------
        ValueError, TypeError
            Keys missing or unexpected, a seed or draw count that is not an int >= 0,
            or a secure generator.
        """
        if self._secure:
            raise _checks.secure_state("load_state_dict")
        _checks.state_keys("GaussianNoise", state, _STATE)
        restored = GaussianNoise(_checks.count("seed", state["seed"], 0))
        restored._draws = _checks.count("draws", state["draws"], 0)
        self._key, self._seed, self._draws = restored._key, restored._seed, restored._draws

    def __repr__(self):
        if self._secure:
            return f"GaussianNoise(secure=True) with {self._draws} draws made"
        return f"GaussianNoise(seed={self._seed}) with {self._draws} draws made"
