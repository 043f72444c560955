"""The implementations raced against each other, behind one interface.

A contender turns a list of NumPy arrays into its own handle (``prepare``,
untimed; torch wraps the arrays in tensors sharing their memory) and implements
the operations it has on that handle::

    grad_norm(h) -> float            clip_grad_norm_(h, max_norm) -> float
    all_finite(h) -> bool            clip_grad_value_(h, clip_value) -> None
    accumulate(h) -> None            (one micro-batch added into buffers the handle owns)

``ops`` lists the operations a contender has. Every implementation writes into
the same NumPy memory, so the suite can check and restore the data whoever ran.
"""

import math

import numpy as np

import gradclip

OPS = ("grad_norm", "all_finite", "clip_grad_norm_", "clip_grad_value_", "accumulate")
WRITING_OPS = ("clip_grad_norm_", "clip_grad_value_")
EPS = 1e-6
"""The ``eps`` of ``max_norm / (total + eps)``, as in gradclip and torch."""


def accumulator_dtype(dtype):
    """The buffers' dtype of an accumulation: float32 for half precision, else the grads'."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


class GradClip:
    """The library under test. Its handle is ``(arrays, accumulator)``; the
    accumulator (a window that never closes, so every timed ``step`` adds into
    its buffers) carries over to fresh arrays of the same workload."""

    name = "gradclip"
    ops = OPS

    def prepare(self, arrays, previous=None):
        if previous is None:
            accumulator = gradclip.GradAccumulator(2**62, copy_result=False)
            accumulator.step(arrays)  # the first micro-batch of a window only copies
        else:
            accumulator = previous[1]
        return arrays, accumulator

    def grad_norm(self, handle):
        return gradclip.grad_norm(handle[0])

    def all_finite(self, handle):
        return gradclip.all_finite(handle[0])

    def clip_grad_norm_(self, handle, max_norm):
        return gradclip.clip_grad_norm_(handle[0], max_norm, eps=EPS)

    def clip_grad_value_(self, handle, clip_value):
        gradclip.clip_grad_value_(handle[0], clip_value)

    def accumulate(self, handle):
        handle[1].step(handle[0])


class NumPy:
    """The fastest plain-NumPy formulation found, everything inside the timed call.

    Reductions: leaves of at least ``OWN_PASS_MIN`` elements are reduced one by
    one (BLAS ``dot`` on a view, strided or not, for float32/float64; half
    formats are widened to float32 in L2-sized chunks, since NumPy's own half
    ``dot`` accumulates in the half format and overflows); all smaller leaves
    are joined by one ``np.concatenate(..., axis=None)`` and reduced at once,
    which beats a Python loop over thousands of leaves several times over.
    Updates are per leaf and in place: ``g *= coef``, ``np.clip(g, -c, c, out=g)``,
    ``np.add(buf, g, out=buf)``. Per-leaf sums are added in float64. The handle is
    ``(arrays, buffers)``, the buffers carrying over to fresh arrays.
    """

    name = "numpy"
    ops = OPS
    OWN_PASS_MIN = 1 << 16
    WIDEN_CHUNK = 1 << 16

    def prepare(self, arrays, previous=None):
        if previous is None:
            buffers = [g.astype(accumulator_dtype(g.dtype)) for g in arrays]
        else:
            buffers = previous[1]
        return arrays, buffers

    def _split(self, arrays):
        """(large leaves as 1-d views, the small ones joined into one array or None)."""
        large = [g if g.ndim == 1 else g.ravel(order="K") for g in arrays if g.size >= self.OWN_PASS_MIN]
        small = [g for g in arrays if g.size < self.OWN_PASS_MIN]
        return large, np.concatenate(small, axis=None) if small else None

    def _sum_of_squares(self, flat):
        if flat.dtype.itemsize >= 4:
            return float(np.dot(flat, flat))
        total = 0.0
        for start in range(0, flat.size, self.WIDEN_CHUNK):
            wide = flat[start : start + self.WIDEN_CHUNK].astype(np.float32)
            total += float(np.dot(wide, wide))
        return total

    def grad_norm(self, handle):
        large, joined = self._split(handle[0])
        total = sum(self._sum_of_squares(g) for g in large)
        if joined is not None:
            total += self._sum_of_squares(joined)
        return math.sqrt(total)

    def all_finite(self, handle):
        large, joined = self._split(handle[0])
        return all(np.isfinite(g).all() for g in large) and (joined is None or bool(np.isfinite(joined).all()))

    def clip_grad_norm_(self, handle, max_norm):
        total = self.grad_norm(handle)
        if total > max_norm:
            coef = max_norm / (total + EPS)
            for g in handle[0]:
                g *= coef
        return total

    def clip_grad_value_(self, handle, clip_value):
        for g in handle[0]:
            np.clip(g, -clip_value, clip_value, out=g)

    def accumulate(self, handle):
        for buffer, g in zip(handle[1], handle[0]):
            np.add(buffer, g, out=buffer)


TORCH_BFLOAT16_NOTE = (
    "torch on bfloat16: torch.from_numpy knows no ml_dtypes.bfloat16, so the arrays are passed as int16 views "
    "reinterpreted with .view(torch.bfloat16): the same memory, no copy."
)


class Torch:
    """``torch.nn.utils`` on tensors sharing the arrays' memory (``torch.from_numpy``).

    Each array becomes the ``.grad`` of a leaf tensor (``torch.empty``, never
    touched), which is what ``clip_grad_norm_`` and ``clip_grad_value_`` take;
    ``get_total_norm`` takes the gradient tensors themselves. bfloat16 arrays go
    through an int16 view (``from_numpy`` knows no ml_dtypes) reinterpreted as
    ``torch.bfloat16``: the same memory, no copy. torch has no all-finite check
    in ``torch.nn.utils``, so that operation is absent.
    """

    ops = ("grad_norm", "clip_grad_norm_", "clip_grad_value_")

    def __init__(self, torch, foreach):
        self.torch = torch
        self.foreach = foreach
        self.name = f"torch foreach={foreach}"
        nn_utils = torch.nn.utils
        self._get_total_norm = nn_utils.get_total_norm
        self._clip_grad_norm_ = nn_utils.clip_grad_norm_
        self._clip_grad_value_ = nn_utils.clip_grad_value_

    def _tensor(self, array):
        if array.dtype.name == "bfloat16":
            return self.torch.from_numpy(array.view(np.int16)).view(self.torch.bfloat16)
        return self.torch.from_numpy(array)

    def prepare(self, arrays, previous=None):
        """``(parameters, gradient tensors)``; the parameters of ``previous`` are reused."""
        grads = [self._tensor(a) for a in arrays]
        if previous is None:
            params = [self.torch.empty(g.shape, dtype=g.dtype, requires_grad=True) for g in grads]
        else:
            params = previous[0]
        for param, grad in zip(params, grads):
            param.grad = grad
        return params, grads

    def grad_norm(self, handle):
        return float(self._get_total_norm(handle[1], 2.0, foreach=self.foreach))

    def clip_grad_norm_(self, handle, max_norm):
        return float(self._clip_grad_norm_(handle[0], max_norm, foreach=self.foreach))

    def clip_grad_value_(self, handle, clip_value):
        self._clip_grad_value_(handle[0], clip_value, foreach=self.foreach)


class GradClipTorch(Torch):
    """``gradclip.torch``'s drop-ins on the same parameters and tensors as `Torch`.

    Each call reads the tensors as NumPy views (``.grad`` of every parameter, then
    the zero-copy view of each tensor) inside the timed region, and returns the norm
    as a tensor, as a PyTorch user would call it.
    """

    def __init__(self, torch):
        import gradclip.torch as drop_ins

        super().__init__(torch, foreach=None)
        self.name = "gradclip.torch"
        self._get_total_norm = drop_ins.get_total_norm
        self._clip_grad_norm_ = drop_ins.clip_grad_norm_
        self._clip_grad_value_ = drop_ins.clip_grad_value_


def all_contenders():
    """``(contenders, note)``: the note says why torch is missing, else None."""
    contenders = [GradClip(), NumPy()]
    try:
        import torch
    except ImportError as error:
        return contenders, f"torch not importable ({error}): the torch contenders are skipped"
    return contenders + [GradClipTorch(torch), Torch(torch, foreach=True), Torch(torch, foreach=False)], None


# ---------------------------------------------------------------- private training
# A private contender turns a workload's arrays into its handle (``prepare``, untimed)
# and implements the operations it has:
#
#     clipped_sum(h, max_norm) -> (sums, norms or None)       WD1, WD2: per-example grads
#     dp_fedavg(h, max_norm, noise_multiplier) -> (mean, norms or None)   WD3: client updates
#     add_noise_(h, std) -> None                               WN: noise added in place
#
# ``eps`` is the contender's clip-factor rule: ``min(1, max_norm / (norm + eps))``.

PRIVATE_SEED = 20240611


class GradClipPrivate:
    """gradclip's clipped_sum (Opacus' factor on per-example grads, Flower's on client
    updates) and add_noise_ with the seeded (Philox) or ``secure`` (ChaCha20) generator."""

    ops = ("clipped_sum", "dp_fedavg", "add_noise_")
    eps = 1e-6

    def __init__(self, secure=False):
        self.name = "gradclip secure" if secure else "gradclip"
        if secure:
            self.ops = ("add_noise_",)
        self.noise = gradclip.GaussianNoise(secure=True) if secure else gradclip.GaussianNoise(seed=PRIVATE_SEED)

    def prepare(self, batch, form):
        return gradclip.Examples(batch) if form == "examples" else batch

    def clipped_sum(self, handle, max_norm):
        total, stats = gradclip.clipped_sum(handle, max_norm, eps=self.eps)
        return total, stats.norms

    def dp_fedavg(self, handle, max_norm, noise_multiplier):
        total, stats = gradclip.clipped_sum(
            handle, max_norm, eps=0.0, noise_multiplier=noise_multiplier, noise=self.noise, normalize_by=len(handle)
        )
        return total, stats.norms

    def add_noise_(self, handle, std):
        gradclip.add_noise_(handle, std, self.noise)


class Opacus:
    """Opacus' ``DPOptimizer.clip_and_accumulate`` on the arrays as ``p.grad_sample``
    (``torch.from_numpy``, no copy): per-parameter norms, stacked, the factor, then
    ``einsum("i,i...")`` per parameter."""

    name = "opacus clip_and_accumulate"
    ops = ("clipped_sum",)
    eps = 1e-6

    def __init__(self, torch, optimizers):
        self.torch = torch
        self.optimizers = optimizers

    def prepare(self, batch, form):
        params = [self.torch.nn.Parameter(self.torch.zeros(a.shape[1:])) for a in batch]
        optimizer = self.optimizers.DPOptimizer(
            self.torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
            expected_batch_size=batch[0].shape[0],
        )  # fmt: skip
        return optimizer, params, batch

    def clipped_sum(self, handle, max_norm):
        optimizer, params, batch = handle
        optimizer.max_grad_norm = max_norm
        for param, a in zip(params, batch):  # a fresh, unprocessed grad_sample: a few us per parameter
            param.grad_sample = self.torch.from_numpy(a)
            param.summed_grad = None
        optimizer.clip_and_accumulate()
        return [param.summed_grad.numpy() for param in params], None


class Optax:
    """``optax.per_example_global_norm_clip`` under ``jax.jit`` (it returns the sum of the
    clipped examples), on JAX copies of the arrays (made once, untimed)."""

    name = "optax per_example_global_norm_clip (jit)"
    ops = ("clipped_sum",)
    eps = 0.0

    def __init__(self, jax, optax):
        self.jax = jax
        self.clip = jax.jit(optax.per_example_global_norm_clip)

    def prepare(self, batch, form):
        return [self.jax.device_put(a) for a in batch]

    def clipped_sum(self, handle, max_norm):
        sums, _ = self.clip(handle, max_norm)
        return self.jax.block_until_ready(sums), None


class Flower:
    """Flower's server-side fixed clipping (``DifferentialPrivacyServerSideFixedClipping``):
    ``compute_clip_model_update`` per client (here on the update against zero parameters,
    so that it takes the same arrays as the others), FedAvg's ``aggregate``, then the
    noise of ``add_gaussian_noise_to_params`` without its (de)serialisation
    (``add_gaussian_noise_inplace``: NumPy's global generator, float64 draws)."""

    name = "flower"
    ops = ("dp_fedavg", "add_noise_")
    eps = 0.0

    def __init__(self, dp, aggregate):
        self.dp = dp
        self.aggregate = aggregate

    def prepare(self, batch, form):
        if form == "noise":
            return batch
        return batch, [np.zeros_like(a) for a in batch[0]]

    def dp_fedavg(self, handle, max_norm, noise_multiplier):
        updates, zeros = handle
        results = []
        for update in updates:
            params = list(update)  # compute_clip_model_update replaces its entries
            self.dp.compute_clip_model_update(params, zeros, max_norm)
            results.append((params, 1))
        mean = self.aggregate(results)
        self.dp.add_gaussian_noise_inplace(mean, self.dp.compute_stdv(noise_multiplier, max_norm, len(updates)))
        return mean, None

    def add_noise_(self, handle, std):
        self.dp.add_gaussian_noise_inplace(handle, std)


class NumPyNoise:
    """``numpy.random.Generator.standard_normal`` in float32 (ziggurat), scaled and added."""

    name = "numpy Generator.standard_normal"
    ops = ("add_noise_",)

    def __init__(self):
        self.rng = np.random.default_rng(PRIVATE_SEED)

    def prepare(self, batch, form):
        return batch

    def add_noise_(self, handle, std):
        for a in handle:
            z = self.rng.standard_normal(a.shape, dtype=a.dtype)
            z *= std
            a += z


class TorchNoise:
    """Opacus' noise: ``torch.normal(0, std, size, generator=...)`` added to each tensor."""

    name = "torch.normal (opacus)"
    ops = ("add_noise_",)

    def __init__(self, torch):
        self.torch = torch
        self.generator = torch.Generator().manual_seed(PRIVATE_SEED)

    def prepare(self, batch, form):
        return [self.torch.from_numpy(a) for a in batch]

    def add_noise_(self, handle, std):
        for t in handle:
            t.add_(self.torch.normal(0.0, std, size=t.shape, generator=self.generator))


def private_contenders():
    """``(contenders, notes)``: the notes say which contenders are missing and why."""
    contenders = [GradClipPrivate(), GradClipPrivate(secure=True), NumPyNoise()]
    notes = []
    try:
        import torch
        import opacus.optimizers as optimizers
    except ImportError as error:
        notes.append(f"opacus not importable ({error}): its contenders are skipped")
    else:
        contenders += [Opacus(torch, optimizers), TorchNoise(torch)]
    try:
        import jax
        import optax
    except ImportError as error:
        notes.append(f"jax / optax not importable ({error}): the optax contender is skipped")
    else:
        contenders.append(Optax(jax, optax))
    try:
        from flwr.server.strategy.aggregate import aggregate

        try:
            from flwr.supercore import differential_privacy as dp  # flwr >= 1.2x
        except ImportError:
            from flwr.common import differential_privacy as dp
    except ImportError as error:
        notes.append(
            f"flwr not importable ({error}): the Flower contender of WD3 is skipped (it is not in the test "
            "extra: its server stack is heavy); pip install flwr to race it"
        )
    else:
        contenders.append(Flower(dp, aggregate))
    return contenders, notes
