"""Every validation gradclip performs, and every message it raises.

Checks run before any memory is touched, so a failed call leaves every array
as it was. Messages say what is wrong, where (the leaf's path), what was
expected, and how to fix it. ``where`` is a callable returning the leaf's path:
it is only worked out when a message is raised.
"""

import math
import numbers

import numpy as np

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")

_accepted = {np.dtype(name) for name in SUPPORTED_DTYPES if name != "bfloat16"}
"""Dtypes already checked (a set lookup; ``dtype.name`` costs microseconds)."""


class NonFiniteGradientError(FloatingPointError, RuntimeError):
    """The total gradient norm is NaN or infinite (raised with ``error_if_nonfinite=True``)."""

    __module__ = "gradclip"  # where users import it from


def with_article(noun):
    """``"an int"``, ``"a str"``: ``noun`` (a type name, mostly) after its indefinite article."""
    return ("an " if noun[:1].lower() in "aeio" else "a ") + noun


def _real(name, value):
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise _beyond_float64(name, value) from None


def _beyond_float64(name, value):
    """An int too large for a float: an error, as in Python and NumPy, rather than inf."""
    return ValueError(
        f"{name} is an int of {len(str(abs(int(value))))} digits, beyond the float64 range (the "
        "largest finite value is 1.8e308); pass math.inf for no limit"
    )


def nonnegative(name, value):
    """``value`` as a float >= 0 (inf allowed); ValueError for negatives and NaN."""
    x = _real(name, value)
    if not x >= 0:
        raise ValueError(f"{name} must be >= 0 (inf is allowed); got {value!r}")
    return x


def norm_type(value):
    """``value`` as a float p > 0 (inf allowed)."""
    p = _real("norm_type", value)
    if not p > 0:
        raise ValueError(f"norm_type must be > 0 or inf; got {value!r}")
    return p


def total_norm(value):
    """A norm computed elsewhere, a real number or a 0-d array (or CPU tensor) of a real
    dtype: >= 0, or non-finite (which means: do not clip)."""
    if type(value) is float or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        x = _real("total_norm", value)
    else:
        try:
            array = None if isinstance(value, (str, bytes)) else np.asarray(value)
        except (TypeError, ValueError, RuntimeError):
            array = None
        if array is None or array.shape != () or array.dtype.kind not in "fiu":
            raise TypeError(
                f"total_norm must be a real number or a 0-d array of a real dtype (a norm, as "
                f"grad_norm returns it); got {type(value).__name__} {value!r}"
            )
        x = float(array)
    if x < 0:
        raise ValueError(f"total_norm must be >= 0 (or NaN/inf to skip clipping); got {x!r}")
    return x


def raise_nonfinite(total):
    raise NonFiniteGradientError(
        f"the total gradient norm is non-finite ({total}); the gradients were left untouched. "
        "Skip this step, or pass error_if_nonfinite=False to get the norm back instead."
    )


class RemoteRankError(RuntimeError):
    """Another rank's call failed, so this rank's call was abandoned with nothing written."""

    __module__ = "gradclip.distributed"  # where users import it from


def reducer(value):
    """``value`` if it has what a reducer needs (see `gradclip.distributed`)."""
    missing = [name for name in ("rank", "world_size", "all_reduce") if not hasattr(value, name)]
    if missing:
        raise TypeError(
            f"reducer must have rank, world_size and all_reduce(values) (as gradclip.distributed."
            f"MPIReducer and TorchReducer do); {type(value).__name__} lacks {', '.join(missing)}"
        )
    return value


def reduced_shape(reducer, expected, got):
    return ValueError(
        f"{type(reducer).__name__}.all_reduce returned shape {got}; expected {expected}, the "
        "element-wise sum over ranks of the array it was given"
    )


def remote_failure(function, ranks, rank):
    names = ", ".join(str(r) for r in ranks)
    return RemoteRankError(
        f"{function} failed on rank{'s' if len(ranks) > 1 else ''} {names} (that rank raised the "
        f"error that says why); rank {rank} wrote nothing. Fix the input on the failing rank."
    )


def not_in_grads(where, leaf):
    return ValueError(
        f"{where()} ({type(leaf).__name__}) is not a leaf of grads; replicated= names leaves of "
        "grads (the same objects) that every rank holds whole"
    )


def not_an_array(where, leaf):
    return TypeError(
        f"{where()} is {with_article(type(leaf).__name__)}; expected an array (numpy.ndarray, or an object "
        "with __dlpack__ or __cuda_array_interface__), a container of arrays, or None"
    )


def cuda_missing(error):
    return ImportError(
        f"gradclip was handed a CUDA array, and its CUDA backend needs numba-cuda, which could "
        f"not be imported ({error}); install it with: pip install 'gradclip[cuda]'"
    )


def cuda_needs_cupy(where, leaf, error):
    return ImportError(
        f"{where()} ({type(leaf).__module__}.{type(leaf).__name__}) is in CUDA memory and is read "
        f"through DLPack by CuPy, which could not be imported ({error}); install it with: "
        "pip install 'gradclip[cuda]'"
    )


def cpu_only(where, leaf, function):
    return NotImplementedError(
        f"{where()} is a CUDA array ({type(leaf).__module__}.{type(leaf).__name__}) and {function} "
        "works on CPU arrays only; move the gradients to the host first (e.g. cupy.asnumpy, "
        "tensor.cpu())"
    )


def unsupported_device(where, leaf):
    return NotImplementedError(
        f"{where()} ({type(leaf).__module__}.{type(leaf).__name__}) lives on DLPack device "
        f"{tuple(leaf.__dlpack_device__())}; gradclip reads CPU and CUDA memory only"
    )


def dlpack_failed(where, leaf, error):
    return TypeError(
        f"{where()} ({type(leaf).__module__}.{type(leaf).__name__}) could not be viewed as a "
        f"NumPy array through DLPack: {error}"
    )


def jax_traced(where, leaf):
    return TypeError(
        f"{where()} is a JAX tracer ({type(leaf).__name__}), not a concrete array: gradclip runs "
        "eagerly on memory and cannot be called inside jax.jit / jax.grad / jax.vmap; call it on the "
        "gradients outside the traced function (or use optax.clip_by_global_norm inside it)"
    )


def lazy_tensor(where):
    return TypeError(
        f"{where()} is a torch tensor with its conjugate or negative bit set (a lazy view whose "
        "memory holds other values); pass tensor.resolve_conj().resolve_neg()"
    )


def unsupported_torch_dtype(where, dtype):
    return TypeError(
        f"{where()} has dtype {dtype}; expected one of {', '.join(SUPPORTED_DTYPES)} "
        "(convert it, e.g. with .float())"
    )


def container_refused(path, cls, error=None):
    why = f" (copying an empty one failed: {type(error).__name__}: {error})" if error is not None else ""
    return TypeError(
        f"{path} is {with_article(cls.__module__ + '.' + cls.__qualname__)}, a container gradclip "
        f"cannot rebuild faithfully{why}; pass a dict, list, tuple or namedtuple of the arrays "
        "(e.g. dict(x) or list(x))"
    )


def container_cycle(path):
    return ValueError(
        f"{path} is a container that holds itself (a cycle); grads must be a tree: pass the "
        "arrays without the back reference"
    )


def container_too_deep(path, limit):
    return ValueError(
        f"{path} is nested more than {limit} containers deep; pass the arrays in a flatter "
        "structure (e.g. a list of them)"
    )


def masked_array(where):
    return TypeError(
        f"{where()} is a numpy.ma.MaskedArray; gradclip reads every element and would ignore "
        "the mask; pass x.filled(0) (masked entries as zeros) or x.data (the values underneath)"
    )


def tensor_without_memory(where, what):
    return TypeError(
        f"{where()} is {what}, which has no dense memory for gradclip to read; "
        "pass a dense tensor with values (e.g. tensor.to_dense() for a sparse one)"
    )


def requires_grad(where, function):
    return ValueError(
        f"{where()} is a torch tensor that requires grad, and {function} would write into it "
        "behind autograd's back (torch refuses in-place writes into such tensors); pass its .grad "
        "if you meant the gradient, or to change the tensor itself call inside torch.no_grad() "
        "(as optimisers do) or pass tensor.detach()"
    )


def total_norm_shape(shape):
    return ValueError(f"total_norm is a device array of shape {shape}; expected one element (a 0-d array)")


def total_norm_dtype(dtype):
    return TypeError(
        f"total_norm is a device array of dtype {dtype}; expected a floating dtype (convert it, "
        "e.g. with .astype(np.float64))"
    )


def shared_memory(first, second, function):
    return ValueError(
        f"{first} and {second} share memory (views of one buffer with elements in common), so "
        f"{function} would write those elements twice; pass each element once: the buffer itself, "
        "views that do not overlap, or copies (np.array(x))"
    )


def bfloat16_needs_ml_dtypes(where):
    return ImportError(
        f"{where()} is a bfloat16 tensor, which gradclip reads as an ml_dtypes.bfloat16 NumPy array, "
        "and ml_dtypes could not be imported; install it with: pip install 'gradclip[bf16]'"
    )


def accepted(dtype):
    """Whether ``dtype`` has passed `check_dtype` before."""
    return dtype in _accepted


def check_dtype(where, dtype):
    if dtype in _accepted:
        return
    if dtype.name not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where()} has dtype {dtype}; expected one of {', '.join(SUPPORTED_DTYPES)} "
            "(convert it, e.g. with .astype(np.float32))"
        )
    if not dtype.isnative:
        raise TypeError(
            f"{where()} has non-native byte order ({dtype.str}); convert it with "
            ".astype(dtype.newbyteorder('='))"
        )
    _accepted.add(dtype)  # bfloat16 from ml_dtypes, known by name


def check_real(where, dtype, function):
    if dtype.kind == "c":
        raise TypeError(
            f"{where()} has dtype {dtype}; {function} clamps real values and complex numbers have "
            "no order (clip by norm instead, or clamp .real and .imag yourself)"
        )


_OUT_OF_PLACE_TWIN = {"clip_grad_norm_": "clip_grad_norm", "clip_grad_value_": "clip_grad_value"}


def check_writable(where, array, function, owner=None):
    """``owner`` says why the leaf cannot be written (e.g. it is a JAX array), if it is known."""
    if not array.flags.writeable:
        raise_read_only(where, function, owner)


def raise_read_only(where, function, owner=None):
    twin = _OUT_OF_PLACE_TWIN.get(function)
    hint = f"use {twin}(...), the out-of-place twin" if twin else "pass a writable copy"
    what = f"is {owner}" if owner else "is read-only"
    raise ValueError(f"{where()} {what} and {function} writes in place; {hint}")


def check_aligned(where, array):
    if not array.flags.aligned:
        raise_unaligned(where, array.dtype)


def raise_unaligned(where, dtype):
    raise ValueError(
        f"{where()} is not aligned to its {dtype} elements; pass an aligned copy "
        "(np.array(x)) instead"
    )


def check_layout(where, array):
    if any(s % array.itemsize for s in array.strides):
        raise ValueError(
            f"{where()} has strides {array.strides} that are not multiples of its itemsize "
            f"{array.itemsize}; pass a copy (np.array(x)) instead"
        )


def check_no_overlap(where, array, function):
    if any(s == 0 and n > 1 for n, s in zip(array.shape, array.strides)):
        raise ValueError(
            f"{where()} repeats elements (a zero stride, e.g. from broadcasting), so {function} "
            "would update them more than once; pass a copy (np.array(x)) instead"
        )


# --------------------------------------------------------------------------- stateful tools


def positive(name, value):
    """``value`` as a float > 0 (inf allowed)."""
    x = _real(name, value)
    if not x > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return x


def decay(name, value):
    """An EMA decay factor: a float in [0, 1)."""
    x = _real(name, value)
    if not 0 <= x < 1:
        raise ValueError(
            f"{name} must be in [0, 1) (the weight the moving average keeps on its past); "
            f"got {value!r}"
        )
    return x


def quantile(value):
    """A quantile level: a float in [0, 1]."""
    x = _real("quantile", value)
    if not 0 <= x <= 1:
        raise ValueError(
            f"quantile must be in [0, 1] (e.g. 0.1 for the 10th percentile); got {value!r}"
        )
    return x


def count(name, value, minimum):
    """``value`` as an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return int(value)


def state_keys(owner, state, expected):
    """``state`` is a dict with exactly the keys ``expected`` (``owner.state_dict()``'s)."""
    if not isinstance(state, dict):
        raise TypeError(
            f"{owner}.load_state_dict expects a dict; got {type(state).__name__}. "
            f"Pass the dict returned by {owner}.state_dict()."
        )
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{owner}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
            f"pass the dict returned by {owner}.state_dict()"
        )


def flag(name, value):
    """``value`` as a bool; it must be one (``bool`` or ``numpy.bool_``), not a truthy string."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return bool(value)


# --------------------------------------------------------------------------- checkpoints


def _shown(value):
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, np.dtype):
        return f"dtype {value}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def bad_checkpoint(owner, field, expected, got):
    """A field of a state dict that `state_dict` cannot have made."""
    return ValueError(
        f"{owner}.load_state_dict: {field} must be {expected}; got {_shown(got)}. Pass the dict "
        f"returned by {owner}.state_dict() (the {owner} is unchanged)"
    )


def saved_argument(owner, error):
    """A constructor argument of a state dict that the constructor refused with ``error``."""
    return ValueError(
        f"{owner}.load_state_dict: {error}. Pass the dict returned by {owner}.state_dict() (the "
        f"{owner} is unchanged)"
    )


def saved_count(owner, field, value, low, high=None):
    """``value`` as an int in ``[low, high)`` (no upper bound if ``high`` is None)."""
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise bad_checkpoint(owner, field, expected, value)
    if value < low or (high is not None and value >= high):
        raise bad_checkpoint(owner, field, expected, value)
    return int(value)


def saved_statistic(owner, field, value):
    """A norm statistic (a norm, a mean of norms, a variance): a finite float >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise bad_checkpoint(owner, field, "a finite number >= 0", value)
    try:
        x = float(value)
    except OverflowError:  # an int beyond float64
        x = math.inf
    if not (math.isfinite(x) and x >= 0):
        raise bad_checkpoint(owner, field, "a finite number >= 0", value)
    return x


def saved_statistics(owner, field, values, most):
    """A list (or tuple) of at most ``most`` norm statistics (any number if ``most`` is None)."""
    if not isinstance(values, (list, tuple)):
        raise bad_checkpoint(owner, field, "a list of finite numbers >= 0", values)
    if most is not None and len(values) > most:
        raise bad_checkpoint(owner, field, f"a list of at most {most} numbers", values)
    return [saved_statistic(owner, f"{field}[{i}]", value) for i, value in enumerate(values)]


def axis(value):
    """``None``, or the axes of ``value`` (an int or a tuple of ints) as a tuple."""
    if value is None:
        return None
    axes = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"axis must be None, an int or a tuple of ints; got {value!r}")
    return tuple(int(a) for a in axes)


def unit_axes(where, axes, ndim):
    """``axes`` normalised to ``0 <= a < ndim`` for the leaf ``where()``."""
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(
            f"axis {axes} is out of range for {where()}, which has {ndim} dimensions; "
            "pass axes that every leaf with 2 or more dimensions has"
        )
    normalised = tuple(a % ndim for a in axes)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"axis {axes} names an axis of {where()} twice")
    return normalised


def params_mismatch(grads_path, params_path, detail):
    return ValueError(
        f"grads and params differ in structure at {grads_path} / {params_path}: {detail}; "
        "params must have the containers, keys and lengths of grads (a None gradient skips its "
        "parameter)"
    )


def agc_devices(grads_path, params_path, grad_on_gpu):
    grad, param = ("CUDA", "CPU") if grad_on_gpu else ("CPU", "CUDA")
    return ValueError(
        f"{grads_path} is a {grad} array but {params_path} a {param} array; each gradient and "
        "its parameter must be on the same device"
    )


def shape_mismatch(grads_path, grad_shape, params_path, param_shape):
    return ValueError(
        f"{grads_path} has shape {grad_shape} but {params_path} has shape {param_shape}; "
        "each gradient must have the shape of its parameter"
    )


def recorded_norm(value):
    """A norm given to NormMonitor.record: >= 0, or NaN / inf (a non-finite step)."""
    try:
        x = float(value)
    except OverflowError:
        raise _beyond_float64("a recorded norm", value) from None
    if x < 0:
        raise ValueError(f"a recorded norm must be >= 0 (or NaN / inf); got {value!r}")
    return x


def recorded_threshold(value):
    """A clip threshold given to NormMonitor.record: >= 0, inf, or NaN (none this step)."""
    x = _real("threshold", value)
    if x < 0:
        raise ValueError(
            f"threshold must be >= 0, inf (nothing clips) or NaN (no threshold this step); "
            f"got {value!r}"
        )
    return x


def plot_needs_matplotlib(error):
    return ImportError(
        f"NormMonitor.plot needs matplotlib, which could not be imported ({error}); install it "
        "with: pip install 'gradclip[plot]'"
    )


def accumulator_dtype(value):
    """``None``, or ``value`` as a supported NumPy dtype for GradAccumulator's buffers."""
    if value is None:
        return None
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.name not in SUPPORTED_DTYPES or not dtype.isnative:
        raise TypeError(
            f"accumulator_dtype must be None or one of {', '.join(SUPPORTED_DTYPES)} (native byte "
            f"order); got {value!r}"
        )
    return dtype


def complex_into_real(where, dtype, accumulator):
    return TypeError(
        f"{where} has dtype {dtype} but the accumulator dtype is {accumulator}, which cannot hold "
        "complex values; pass a complex accumulator_dtype (e.g. np.complex128) or leave it None"
    )


def mixed_devices(function, cpu, gpu):
    return ValueError(
        f"{function}: {cpu} is a CPU array and {gpu} a CUDA array; the buffers live on one "
        "device: pass the gradients of one device per call (one accumulator per device)"
    )


def accumulation_mismatch(where, what, expected, got):
    return ValueError(
        f"{where} differs from the accumulation window in {what}: expected {expected}, got {got}; "
        "every micro-batch must have the structure, shapes and dtypes of the first (the "
        "accumulated state is unchanged; call reset() to accumulate different gradients)"
    )


# --------------------------------------------------------------------------- private training


def finite_nonnegative(name, value):
    """``value`` as a finite float >= 0."""
    x = _real(name, value)
    if not 0 <= x < np.inf:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return x


def finite_positive(name, value):
    """``value`` as a finite float > 0."""
    x = _real(name, value)
    if not 0 < x < np.inf:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return x


def no_example_axis(where):
    return ValueError(
        f"{where} is 0-d, but every leaf of a stacked batch has the example axis first (shape (B, ...)); "
        "stack the per-example gradients along axis 0, or pass gradclip.Examples([...]) of separate examples"
    )


def example_counts_differ(first, n, where, m):
    return ValueError(
        f"{where} holds {m} examples (its first axis) but {first} holds {n}; every leaf of a stacked batch "
        "has the example axis first, with the same length B"
    )


def in_example(index, error):
    """``error`` (raised for one example of a gradclip.Examples) with the example named."""
    return type(error)(f"examples[{index}]: {error}")


def example_differs(index, where, what, expected, got):
    return ValueError(
        f"examples[{index}] differs from examples[0] in {what} at {where}: expected {expected}, got {got}; "
        "every example must have the structure, shapes and dtypes of the first"
    )


def examples_on_two_devices(cpu_where, gpu_where):
    return ValueError(
        f"{cpu_where} is a CPU array but {gpu_where} a CUDA array; a batch of examples lives on one "
        "device: move its leaves to one (e.g. tensor.cuda(), cupy.asarray)"
    )


def example_on_other_device(index, on_gpu):
    here, there = ("CUDA", "CPU") if on_gpu else ("CPU", "CUDA")
    return ValueError(
        f"examples[{index}] holds {here} arrays but examples[0] {there} arrays; a batch of examples lives "
        "on one device: move every example to one"
    )


def example_shares_array(first, second, where, function):
    return ValueError(
        f"examples[{second}] holds the same array as examples[{first}] at {where}; {function} scales each "
        "example in place and would scale that memory twice; pass separate arrays (e.g. copies)"
    )


def no_examples(function):
    return ValueError(
        f"{function} was given gradclip.Examples([]), and takes the structure of its result from the "
        "examples; pass at least one example (a stacked batch with B = 0 is fine)"
    )


def not_examples(value):
    return TypeError(
        f"Examples takes a sequence of examples (each a grads container); got {type(value).__name__}"
    )


def bounds_count(got, expected):
    return ValueError(
        f"max_norm holds {got} bounds; per-layer clipping takes one bound per leaf of an example "
        f"({expected}, in flattening order), or pass one number to clip each example's global norm"
    )


def repeated_leaf_bounds(first, where, bound, other):
    return ValueError(
        f"{where} is the same array as {first} but has bound {other} where {first} has {bound}; "
        "a repeated leaf is clipped once: give it one bound"
    )


def noise_needs_finite_bound(bound):
    return ValueError(
        f"noise_multiplier > 0 needs finite bounds (the noise std is noise_multiplier times the bound); "
        f"got max_norm {bound}"
    )


def noise_type(value):
    return TypeError(
        f"noise must be a gradclip.GaussianNoise (or None for a fresh one seeded from the OS); "
        f"got {type(value).__name__}"
    )


def seed(value):
    """``value`` (a GaussianNoise seed) as an int >= 0, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise TypeError(f"seed must be None or an int >= 0; got {type(value).__name__} {value!r}")
    return int(value)


def secure_seed():
    return ValueError(
        "GaussianNoise(secure=True) takes no seed: its key comes from the OS's entropy (os.urandom), so "
        "that no run can repeat it; drop seed=, or pass secure=False for a reproducible stream"
    )


def secure_state(method):
    return ValueError(
        f"GaussianNoise.{method}: a secure generator's key never leaves it and no key can be put in; "
        "after a restart create a new GaussianNoise(secure=True)"
    )


def norms_vector(value):
    """``value`` as a 1-d float64 array of norms."""
    norms = np.asarray(value)
    if norms.ndim != 1 or norms.dtype.kind not in "fiu":
        raise TypeError(
            f"norms must be a 1-d array of real numbers, one per example (e.g. stats.norms of "
            f"clipped_sum); got {type(value).__name__} with shape {norms.shape} and dtype {norms.dtype}"
        )
    return norms.astype(np.float64)


def quantile_state(name, value):
    return ValueError(f"QuantileClipNorm.load_state_dict: {name} must be a finite number > 0; got {value!r}")


def dp_accounting_missing(error):
    return ImportError(
        f"gradclip.privacy uses Google's dp-accounting, which could not be imported ({error}); install "
        "it with: pip install 'gradclip[dp]'"
    )


def accountant(value):
    if value not in ("rdp", "pld"):
        raise ValueError(f"accountant must be 'rdp' or 'pld'; got {value!r}")
    return value


def open_unit(name, value, closed_above=False):
    """``value`` as a float in (0, 1) (or (0, 1] if ``closed_above``)."""
    x = _real(name, value)
    if not (0 < x < 1 or (closed_above and x == 1)):
        raise ValueError(f"{name} must be in (0, 1{']' if closed_above else ')'}; got {value!r}")
    return x


_OUT_OF_PLACE_TWIN["clip_per_example_"] = "clip_per_example"  # named by raise_read_only


# --------------------------------------------------------------------------- ghost norms

GHOST_DTYPES = ("float16", "bfloat16", "float32", "float64")


def ghost_cuda(name, array, function):
    return NotImplementedError(
        f"{name} is a CUDA array ({type(array).__module__}.{type(array).__name__}) and {function} "
        "has CPU kernels only for now; pass host arrays (e.g. tensor.cpu(), cupy.asnumpy(x), "
        "jax.device_get(x))"
    )


def ghost_dtype(name, dtype, function):
    """``dtype`` (of ``name``) is one of `GHOST_DTYPES`, native."""
    if dtype.name not in GHOST_DTYPES or not dtype.isnative:
        raise TypeError(
            f"{name} has dtype {dtype}; {function} expects a real floating dtype, one of "
            f"{', '.join(GHOST_DTYPES)} in native byte order (convert it, e.g. with .astype(np.float32))"
        )


def ghost_indices_dtype(dtype):
    if dtype.kind not in "iu":
        raise TypeError(
            f"indices has dtype {dtype}; embedding_sq_norms expects integer token indices "
            "(convert them, e.g. with .astype(np.int64))"
        )


def dense_shapes(activations, output_grads):
    """``activations`` / ``output_grads`` shapes are (B, d_in) / (B, d_out) or
    (B, T, d_in) / (B, T, d_out)."""
    if len(activations) not in (2, 3) or len(output_grads) != len(activations) or (
        activations[:-1] != output_grads[:-1]
    ):
        raise ValueError(
            f"activations has shape {activations} and output_grads {output_grads}; expected "
            "(B, d_in) and (B, d_out), or (B, T, d_in) and (B, T, d_out): the layer's input and the "
            "gradient of the loss with respect to its output, with the same batch (and sequence) axes"
        )


def embedding_shapes(indices, output_grads):
    """``indices`` / ``output_grads`` shapes are (B,) / (B, d) or (B, T) / (B, T, d)."""
    if len(indices) not in (1, 2) or len(output_grads) != len(indices) + 1 or indices != output_grads[:-1]:
        raise ValueError(
            f"indices has shape {indices} and output_grads {output_grads}; expected (B,) and "
            "(B, d), or (B, T) and (B, T, d): the embedding's input indices and the gradient of the "
            "loss with respect to its output"
        )


def per_example_leaf(where, shape, batch):
    """A stacked per-example leaf: at least one axis, of length ``batch`` (None: the first leaf's)."""
    if not shape:
        raise ValueError(
            f"{where()} is 0-d; per-example gradients are stacked on axis 0 (shape (B, ...)), "
            "one row per example"
        )
    if batch is not None and shape[0] != batch:
        raise ValueError(
            f"{where()} has {shape[0]} examples on axis 0 (shape {shape}) but the first leaf has "
            f"{batch}; every leaf must stack the same examples"
        )


def no_per_example_leaves():
    return ValueError(
        "grads holds no arrays; expected per-example gradients stacked on axis 0, e.g. from "
        "torch.func.vmap(torch.func.grad(f)) or jax.vmap(jax.grad(f))"
    )


def sq_norms(shape, dtype):
    """``sq_norms`` is a 1-d real array."""
    if len(shape) != 1 or dtype.kind not in "fiu":
        raise ValueError(
            f"sq_norms has shape {shape} and dtype {dtype}; expected a 1-d array of real squared "
            "norms, one per example (e.g. from dense_sq_norms)"
        )


def negative_sq_norm(position, value):
    return ValueError(
        f"sq_norms[{position}] is {value!r}; squared norms are >= 0 (NaN and inf are allowed: "
        "such an example gets the factor 0)"
    )


def ghost_model(model):
    if not hasattr(model, "modules") or not hasattr(model, "register_forward_hook"):
        raise TypeError(f"GhostClipping takes a torch.nn.Module; got {type(model).__name__}")


def ghost_tied(parameter_name, first, second):
    return ValueError(
        f"parameter {parameter_name} belongs to both {first} and {second}; ghost norms need each "
        "trainable parameter in one module (a tied weight's per-example norm has cross terms): "
        "untie it, or freeze it with requires_grad_(False)"
    )


def ghost_unsupported(name, module, why):
    return NotImplementedError(
        f"{name} ({type(module).__name__}) {why}; GhostClipping cannot give its per-example "
        "gradient norms: replace the layer, or freeze its parameters with requires_grad_(False)"
    )


def ghost_losses(losses):
    """``losses`` is a 1-d tensor of per-example losses that requires grad."""
    import torch

    if not isinstance(losses, torch.Tensor) or losses.ndim != 1 or not losses.requires_grad:
        what = (
            f"a tensor of shape {tuple(losses.shape)}, requires_grad={losses.requires_grad}"
            if isinstance(losses, torch.Tensor)
            else type(losses).__name__
        )
        raise ValueError(
            f"losses must be a 1-d tensor of per-example losses that requires grad (e.g. "
            f"loss_fn(model(x), y) with reduction='none'); got {what}"
        )


def ghost_no_forward():
    return RuntimeError(
        "GhostClipping.factors: no forward pass was recorded; call the model (with gradients "
        "enabled) on the batch first, then pass its per-example losses"
    )


def ghost_not_run(name, module):
    return RuntimeError(
        f"{name} ({type(module).__name__}) has trainable parameters but its forward did not run "
        "in this step, so its gradient norms would be missing (a parent module may use its "
        "weights directly, as nn.MultiheadAttention does with out_proj); freeze it with "
        "requires_grad_(False), or remove it if it is unused"
    )


def ghost_batch(name, shape, batch):
    return ValueError(
        f"{name} got an input of shape {shape}, but losses has {batch} examples; every layer "
        "must see the examples on axis 0 of its inputs (batch_first) and the same B"
    )


def ghost_modified(name):
    return RuntimeError(
        f"the output of {name} was modified in place after the layer ran (e.g. by "
        "ReLU(inplace=True)), so its output gradient cannot be read; make that operation "
        "out of place"
    )


def ghost_output(name, output):
    return NotImplementedError(
        f"{name} returned {type(output).__name__}; GhostClipping reads per-example gradients of "
        "layers that return one tensor"
    )
