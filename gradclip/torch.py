"""Drop-ins for ``torch.nn.utils``' gradient clipping, run on gradclip's kernels (SPEC §6).

``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
``clip_grads_with_norm_`` have PyTorch 2.13's signatures and take what PyTorch
takes: a tensor or an iterable of parameters (their ``.grad`` is used, ``None``
skipped) or, for ``get_total_norm``, the gradient tensors themselves. Norms come
back as 0-d tensors of the dtype and device PyTorch returns. The gradients are
read and written in place, zero-copy. CUDA tensors go to gradclip's GPU backend
(``pip install 'gradclip[cuda]'``) as they are, its work on torch's current stream,
and their norm stays on the device.

``import gradclip`` does not import this module; ``import gradclip.torch`` imports torch.

Where the result differs from ``torch.nn.utils``, by design:

- **No write below the threshold.** Gradients are scaled iff ``total > max_norm``
  (by ``max_norm / (total + 1e-6)``, PyTorch's coefficient). PyTorch multiplies by
  ``min(max_norm / (total + 1e-6), 1)`` every time, so for ``total`` in
  ``(max_norm - 1e-6, max_norm]`` it scales by a factor just below 1 where gradclip
  leaves the memory untouched.
- **Non-finite totals.** PyTorch multiplies every gradient by NaN; gradclip
  leaves them untouched and returns the non-finite norm (so the step can be
  skipped). With ``error_if_nonfinite=True`` both raise (gradclip's
  `NonFiniteGradientError` is a ``RuntimeError``) before any gradient changes.
- **float64 accumulation.** Norms accumulate in float64 whatever the dtype and
  are rounded once to the returned tensor's dtype; PyTorch accumulates in the
  gradients' dtype (float32 norms of large models differ in the 4th digit). The
  scale factor is applied in float64 and rounded once per element. No spurious
  overflow (float64 norms near 1e200 stay finite).
- **Repeated tensors count once.** The same gradient tensor given twice is
  counted and scaled once; PyTorch counts and scales it twice.
- **Arguments are checked first.** ``max_norm``, ``clip_value`` < 0 or NaN and
  ``norm_type`` <= 0 (PyTorch's 0 and negative "norms") raise ``ValueError``
  before anything is written.
- ``foreach`` is accepted and ignored: gradclip always runs one fused kernel per dtype.

Examples
--------
>>> import torch, gradclip.torch
>>> model = torch.nn.Linear(2, 1)
>>> model.weight.grad = torch.tensor([[3.0, 0.0]])
>>> model.bias.grad = torch.tensor([4.0])
>>> gradclip.torch.clip_grad_norm_(model.parameters(), max_norm=1.0)
tensor(5.)
>>> gradclip.torch.get_total_norm([p.grad for p in model.parameters()])
tensor(1.0000)
"""

import functools
import math
import types
import warnings

import numpy as np
import torch

from . import _checks, clip, ghost, norms

__all__ = ["GhostClipping", "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Clip the total norm of the parameters' gradients in place; ``torch.nn.utils.clip_grad_norm_``.

    Parameters
    ----------
    parameters : torch.Tensor or iterable of torch.Tensor
        Parameters whose ``.grad`` is clipped (``None`` grads are skipped).
    max_norm : float
        ``>= 0``; ``inf`` never clips.
    norm_type : float or str, default 2.0
        ``p > 0``, or ``inf`` / ``'inf'``.
    error_if_nonfinite : bool, default False
        Raise if the total norm is NaN or inf (nothing is written).
    foreach : bool or None
        Ignored (accepted for PyTorch's signature).

    Returns
    -------
    torch.Tensor
        The total norm before clipping, 0-d, of the gradients' dtype (promoted
        as PyTorch does over mixed dtypes) and the first gradient's device;
        ``torch.tensor(0.0)`` when there are no gradients.

    Raises
    ------
    NonFiniteGradientError
        A non-finite total with ``error_if_nonfinite=True`` (a ``RuntimeError``).
    ValueError, TypeError
        Bad arguments or gradients; checked before anything is written.

    Notes
    -----
    Gradients are scaled by ``max_norm / (total + 1e-6)`` iff ``total > max_norm``
    and is finite; otherwise nothing is written (see the module notes).

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> w.grad = torch.tensor([6.0, 8.0])
    >>> gradclip.torch.clip_grad_norm_(w, max_norm=5.0)
    tensor(10.)
    >>> w.grad
    tensor([3.0000, 4.0000])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)  # a generator is read once
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in parameters]
    total = clip.clip_grad_norm_(
        grads, float(max_norm), float(norm_type), eps=_EPS, error_if_nonfinite=error_if_nonfinite
    )
    return _norm_tensor(total, grads)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The total norm of ``tensors`` (the gradients themselves); ``torch.nn.utils.get_total_norm``.

    Parameters
    ----------
    tensors : torch.Tensor or iterable of torch.Tensor
        ``None`` entries are skipped.
    norm_type : float or str, default 2.0
        ``p > 0``, or ``inf`` / ``'inf'``.
    error_if_nonfinite : bool, default False
        Raise if the norm is NaN or inf.
    foreach : bool or None
        Ignored.

    Returns
    -------
    torch.Tensor
        0-d, accumulated in float64 and rounded to the dtype PyTorch returns.

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> gradclip.torch.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5.)
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    total = norms.grad_norm(tensors, float(norm_type))
    if error_if_nonfinite and not math.isfinite(float(total)):  # a device norm: this synchronises
        _checks.raise_nonfinite(total)
    return _norm_tensor(total, tensors)


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """Scale the parameters' gradients given a total norm computed elsewhere; ``torch.nn.utils.clip_grads_with_norm_``.

    Parameters
    ----------
    parameters : torch.Tensor or iterable of torch.Tensor
        Parameters whose ``.grad`` is scaled (``None`` grads are skipped).
    max_norm : float
    total_norm : torch.Tensor or float
        E.g. from `get_total_norm`, or all-reduced across ranks.
    foreach : bool or None
        Ignored.

    Notes
    -----
    Scales by ``max_norm / (total_norm + 1e-6)`` iff ``total_norm > max_norm``; a
    NaN or infinite ``total_norm`` writes nothing.

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> w.grad = torch.tensor([1.0, 2.0])
    >>> gradclip.torch.clip_grads_with_norm_([w], max_norm=1.0, total_norm=torch.tensor(4.0))
    >>> w.grad
    tensor([0.2500, 0.5000])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip.clip_grads_with_norm_([p.grad for p in parameters], float(max_norm), total_norm, eps=_EPS)


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp the parameters' gradients in place to ``[-clip_value, clip_value]``; ``torch.nn.utils.clip_grad_value_``.

    Parameters
    ----------
    parameters : torch.Tensor or iterable of torch.Tensor
        Parameters whose ``.grad`` is clamped (``None`` grads are skipped).
    clip_value : float
        ``>= 0``. NaN gradients stay NaN.
    foreach : bool or None
        Ignored.

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> w.grad = torch.tensor([-3.0, 0.5, 2.0])
    >>> gradclip.torch.clip_grad_value_(w, 1.0)
    >>> w.grad
    tensor([-1.0000,  0.5000,  1.0000])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip.clip_grad_value_([p.grad for p in parameters], float(clip_value))


_EPS = 1e-6
"""PyTorch's constant in ``max_norm / (total + 1e-6)``."""


def _norm_tensor(total, grads):
    """``total`` as the 0-d tensor PyTorch returns: the promoted (real) dtype of the
    gradients' norms, on the first gradient's device."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.tensor(total)
    dtype = functools.reduce(torch.promote_types, [d.to_real() for d in {g.dtype for g in grads}])
    if not isinstance(total, float):  # a 0-d device array (CUDA gradients): it stays there
        return torch.as_tensor(total, device=grads[0].device).to(dtype)
    return torch.tensor(total, dtype=dtype, device=grads[0].device)


# --------------------------------------------------------------------------- ghost clipping


class GhostClipping:
    """Per-example gradient norms of a model by ghost clipping, and the loss weights that
    clip each example's gradient to ``max_norm`` (DP-SGD, SPEC §9).

    Forward hooks record, for every module with trainable parameters of its own, its
    inputs and output. `factors` takes the per-example losses, reads the gradient of
    their sum with respect to those outputs (one pass of ``torch.autograd.grad``: no
    parameter gradient is formed), and adds up each example's squared norm layer by
    layer: `gradclip.dense_sq_norms` for ``nn.Linear``, `gradclip.embedding_sq_norms` for
    ``nn.Embedding``, and for any other layer its per-example gradients
    (``torch.func.vmap`` over ``torch.func.vjp``) through
    `gradclip.sq_norms_from_per_example`. A second backward pass of
    ``(factors * losses).sum()`` then leaves ``Σ_i f_i ∇loss_i``, the clipped sum, in
    each parameter's ``.grad`` (as Opacus' ``GradSampleModuleFastGradientClipping``).

    Parameters
    ----------
    model : torch.nn.Module
        Examples on axis 0 of every layer's inputs (batch first).
    max_norm : float
        The per-example norm bound, ``>= 0``.
    eps : float, default 1e-6
        As in `gradclip.clip_factors`.

    Attributes
    ----------
    norms : torch.Tensor or None
        float64, each example's gradient norm from the last `factors` call.

    Raises
    ------
    ValueError
        A trainable parameter shared by two modules (tied weights).
    NotImplementedError
        A layer whose per-example gradients are not defined by its own inputs:
        batch norm (it mixes examples), ``nn.Embedding(scale_grad_by_freq=True)``.

    Notes
    -----
    A module called several times in one forward pass (a layer shared across time
    steps) counts once, with the gradients of all its calls: its calls' sequences are
    joined for the ghost norms, its per-example gradients summed otherwise. Every
    forward call made with gradients enabled is recorded until `factors` reads it, so
    run other passes (evaluation) under ``torch.no_grad()``, or call `remove`. CPU
    tensors only for now (the array functions' GPU kernels are not there yet).

    Examples
    --------
    >>> import torch, gradclip.torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1))
    >>> ghost = gradclip.torch.GhostClipping(model, max_norm=1.0)
    >>> tokens, targets = torch.tensor([[1, 2, 2], [3, 4, 5]]), torch.zeros(2, 3, 1)
    >>> losses = ((model(tokens) - targets) ** 2).mean(dim=(1, 2))
    >>> factors = ghost.factors(losses)
    >>> (factors * losses).sum().backward()  # each example's gradient clipped to norm 1, summed
    >>> ghost.norms.shape, bool((factors <= 1).all())
    (torch.Size([2]), True)
    """

    def __init__(self, model, max_norm, *, eps=1e-6):
        _checks.ghost_model(model)
        self.max_norm = _checks.nonnegative("max_norm", max_norm)
        self.eps = _checks.nonnegative("eps", eps)
        self.norms = None
        self._layers = _layers(model)
        self._recording = True
        self._handles = [
            layer.module.register_forward_hook(functools.partial(self._record, layer), with_kwargs=True)
            for layer in self._layers
        ]

    def _record(self, layer, module, args, kwargs, output):
        if not self._recording or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor):
            raise _checks.ghost_output(layer.name, output)
        inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        layer.calls.append((inputs, kwargs, output, output._version))

    def factors(self, losses):
        """Each example's clip factor ``min(1, max_norm / (n_i + eps))`` from the forward
        pass recorded since the last call; sets `norms`.

        Parameters
        ----------
        losses : torch.Tensor
            ``(B,)``: each example's loss (e.g. a criterion with ``reduction='none'``,
            averaged over a sequence per example), still attached to the graph.

        Returns
        -------
        torch.Tensor
            ``(B,)``, of ``losses``' dtype and device; 0 for an example whose norm is not
            finite. The graph is kept for the second backward pass.
        """
        _checks.ghost_losses(losses)
        batch = losses.shape[0]
        recorded = [layer for layer in self._layers if layer.calls]
        if not recorded:
            raise _checks.ghost_no_forward()
        for layer in self._layers:
            if not layer.calls:
                raise _checks.ghost_not_run(layer.name, layer.module)
            for inputs, _, output, version in layer.calls:
                for x in inputs:
                    if isinstance(x, torch.Tensor) and (x.ndim == 0 or x.shape[0] != batch):
                        raise _checks.ghost_batch(layer.name, tuple(x.shape), batch)
                if output._version != version:
                    raise _checks.ghost_modified(layer.name)
        outputs = [output for layer in self._layers for _, _, output, _ in layer.calls]
        grads = iter(torch.autograd.grad(losses.sum(), outputs, retain_graph=True, allow_unused=True))
        sq_norms = np.zeros(batch)
        for layer in self._layers:
            calls = [(inputs, kwargs, next(grads)) for inputs, kwargs, _, _ in layer.calls]
            calls = [(inputs, kwargs, g) for inputs, kwargs, g in calls if g is not None]
            if calls:
                sq_norms += self._sq_norms(layer, calls, batch)
        for layer in self._layers:
            layer.calls.clear()
        self.norms = torch.from_numpy(np.sqrt(sq_norms))
        return torch.from_numpy(ghost.clip_factors(sq_norms, self.max_norm, self.eps)).to(losses.device, losses.dtype)

    def _sq_norms(self, layer, calls, batch):
        """``(B,)`` float64: the squared per-example norms of ``layer``'s trainable parameters."""
        module, params = layer.module, layer.params
        kind = _ghost_kind(module)
        firsts, grads = [inputs[0] for inputs, _, _ in calls], [g for _, _, g in calls]
        if kind is torch.nn.Linear and "weight" in params:
            a, g = _joined(firsts, grads, batch)
            return ghost.dense_sq_norms(a, g, bias="bias" in params)
        if kind is torch.nn.Linear:  # a frozen weight: the bias gradient Σ_t g_t alone
            g = _joined(firsts, grads, batch)[1]
            return ghost.sq_norms_from_per_example(g.reshape(batch, -1, g.shape[-1]).sum(dim=1))
        if kind is torch.nn.Embedding:
            idx, g = _joined(firsts, grads, batch, indices=True)
            if module.padding_idx is not None:  # that row is never trained
                g = g.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
            return ghost.embedding_sq_norms(idx, g)
        self._recording = False  # the layer's own forward runs again below
        try:
            per_example = [_per_example_grads(module, params, inputs, kwargs, g) for inputs, kwargs, g in calls]
        finally:
            self._recording = True
        return ghost.sq_norms_from_per_example([sum(grads) for grads in zip(*per_example)])

    def remove(self):
        """Remove the hooks (the model runs as before) and drop anything recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers:
            layer.calls.clear()


class _Layer:
    """A module with trainable parameters of its own, and its calls recorded this step."""

    def __init__(self, name, module, params):
        self.name, self.module, self.params = name, module, params
        self.calls = []  # (inputs, kwargs, output, output's version) per forward call


def _layers(model):
    layers, owner = [], {}
    for name, module in model.named_modules():
        name = f"model.{name}" if name else "model"
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not params:
            continue
        for n, p in params.items():
            if id(p) in owner:
                raise _checks.ghost_tied(f"{name}.{n}", owner[id(p)], name)
            owner[id(p)] = name
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise _checks.ghost_unsupported(name, module, "normalises over the batch, so it mixes examples")
        if _ghost_kind(module) is torch.nn.Embedding and module.scale_grad_by_freq:
            raise _checks.ghost_unsupported(name, module, "scales its gradient by the batch's index counts")
        layers.append(_Layer(name, module, params))
    return layers


def _ghost_kind(module):
    """``nn.Linear`` or ``nn.Embedding`` for a module that runs their forward, else None."""
    for kind in (torch.nn.Linear, torch.nn.Embedding):
        if isinstance(module, kind) and type(module).forward is kind.forward:
            return kind
    return None


def _joined(inputs, grads, batch, indices=False):
    """One layer's calls as one: ``(inputs, grads)`` with the examples on axis 0 and every
    call's positions, in order, on axis 1 (as they are for one call without a sequence
    axis). ``indices``: the inputs are an embedding's, without a feature axis."""
    if len(grads) == 1 and grads[0].ndim == 2:
        return inputs[0], grads[0]

    def join(arrays, features):
        shaped = [x.reshape(batch, -1, *x.shape[-1:][:features]) for x in arrays]
        return shaped[0] if len(shaped) == 1 else torch.cat(shaped, dim=1)

    return join(inputs, 0 if indices else 1), join(grads, 1)


def _per_example_grads(module, params, inputs, kwargs, grad):
    """The gradients of ``module``'s ``params`` for each example alone (``torch.func``)."""
    names = list(params)
    values = tuple(params[n].detach() for n in names)

    def one(example_inputs, example_grad):
        def forward(*values):
            batched = tuple(x.unsqueeze(0) for x in example_inputs)
            return torch.func.functional_call(module, dict(zip(names, values)), batched, kwargs)

        _, vjp = torch.func.vjp(forward, *values)
        return vjp(example_grad.unsqueeze(0))

    return torch.func.vmap(one)(inputs, grad)
