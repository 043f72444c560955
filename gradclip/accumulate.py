"""Gradient accumulation over micro-batches (SPEC §5).

`GradAccumulator` owns one buffer per leaf, allocated when it first sees the
gradients and reused for every later window. Each micro-batch is added by one
fused kernel per dtype (``accumulate_table`` in ``kernels/cpu.py``) that reads
the grads where they lie, in any layout, and writes the buffers contiguously.

How a buffer is laid out: ``_table.build`` walks a leaf in its own memory order
(``_table.traversal``); element k of that walk is stored at buffer element k. The
result handed back for a leaf is a view of its buffer with the leaf's shape and
strides that follow the same walk (``_table.dense_view``), so a transposed grad
gets a transposed-looking result with every value at its own index.
"""

import numbers

import numpy as np

from . import _backend, _batch, _checks, _table, _tree

_HALF = ("float16", "bfloat16")

_OWNER = "GradAccumulator"
_CONFIG = ("accum_steps", "average", "accumulator_dtype", "skip_nonfinite", "copy_result")
_STATE = ("current_step", "skipped", "structure", "buffers")


class GradAccumulator:
    """Sum (or average) gradients over ``accum_steps`` micro-batches.

    Parameters
    ----------
    accum_steps : int
        Micro-batches per window, ``>= 1``.
    average : bool, default True
        Return the mean: the sum multiplied by ``1 / accum_steps`` (a float64 factor,
        the product rounded once to the accumulator dtype). Otherwise the sum.
    accumulator_dtype : dtype, optional
        The buffers' (and results') dtype. Default: float32 for float16 / bfloat16
        grads, the grads' own dtype otherwise. Complex grads need a complex one.
    skip_nonfinite : bool, default False
        Drop a micro-batch holding any NaN or inf (checked before anything is
        written): it is counted in `skipped` and does not advance the window. When
        false, non-finite values are accumulated like any others.
    copy_result : bool, default True
        What `step` returns at the end of a window. True: new arrays, which later
        steps never change. False (zero-copy): views of the accumulator's own
        buffers, valid until the next call to `step`, `reset` or `load_state_dict`,
        which overwrite or drop them; copy what you keep longer. Results come
        back in the grads' framework (torch tensors, JAX arrays); JAX arrays never
        change, so for them False still copies.

    Notes
    -----
    Each element is accumulated as ``round(float64(buf) + float64(g))`` (complex:
    per part), rounded to the accumulator dtype after every add; the first
    micro-batch of a window writes ``round(g)``. Grads are read in place in any
    layout. The structure (containers, keys, ``None`` positions), shapes and
    dtypes are fixed by the first micro-batch accepted after construction or
    `reset`; the buffers are allocated then, once, and reused by every window. A
    later micro-batch that differs raises ``ValueError`` and changes nothing. A
    leaf whose memory order differs from that first micro-batch's (e.g. transposed
    where it was not) is read through one temporary copy.

    GPU grads (CuPy, Numba device arrays): the buffers live on the grads' device and
    are filled by one fused kernel pass per micro-batch; nothing is allocated on the
    device per micro-batch after the first, and a leaf in another memory order is
    read in place (no copy). Results are device arrays of the grads' kind (CuPy in,
    CuPy out; Numba in, Numba out). Only ``skip_nonfinite=True`` synchronises (the
    finite check reads one count on the host). A window stays on its device: a
    micro-batch on the other one, or one mixing CPU and GPU leaves, raises
    ``ValueError``. `state_dict` copies the buffers to host NumPy arrays (this
    synchronises); after `load_state_dict` the window goes to the device of the next
    micro-batch, GPU or CPU.

    Examples
    --------
    >>> import numpy as np, gradclip
    >>> acc = gradclip.GradAccumulator(2)
    >>> acc.step({"w": np.array([1.0, 2.0])}) is None
    True
    >>> acc.step({"w": np.array([3.0, 6.0])})
    {'w': array([2., 4.])}
    >>> acc.current_step
    0
    """

    def __init__(self, accum_steps, *, average=True, accumulator_dtype=None, skip_nonfinite=False, copy_result=True):
        self._accum_steps = _checks.count("accum_steps", accum_steps, 1)
        self._average = _checks.flag("average", average)
        self._accumulator_dtype = _checks.accumulator_dtype(accumulator_dtype)
        self._skip_nonfinite = _checks.flag("skip_nonfinite", skip_nonfinite)
        self._copy_result = _checks.flag("copy_result", copy_result)
        self._current_step = 0
        self._skipped = 0
        self._window = None  # the _Buffers, from the first accepted micro-batch on

    accum_steps = property(lambda self: self._accum_steps, doc="Micro-batches per window.")
    current_step = property(lambda self: self._current_step, doc="Micro-batches accumulated in this window.")
    skipped = property(
        lambda self: self._skipped,
        doc="Non-finite micro-batches dropped (``skip_nonfinite=True``) since construction or `reset`.",
    )
    average = property(lambda self: self._average)
    accumulator_dtype = property(lambda self: self._accumulator_dtype, doc="As given (None: by the grads' dtype).")
    skip_nonfinite = property(lambda self: self._skip_nonfinite)
    copy_result = property(lambda self: self._copy_result)

    def step(self, grads):
        """Add one micro-batch.

        Parameters
        ----------
        grads : array, iterable of arrays, or nested dict / list / tuple of arrays
            Read only, never written.

        Returns
        -------
        None, or the structure of ``grads``
            None until the ``accum_steps``-th accepted micro-batch of the window; then
            the sum or mean in the accumulator dtype (NumPy-scalar leaves as NumPy
            scalars), and a new window starts.

        Raises
        ------
        ValueError
            Structure, a shape, a dtype or the device differs from the window's, or the
            grads mix CPU and GPU leaves; nothing changed.
        TypeError
            A leaf that is not an array, an unsupported dtype, or complex grads with a
            real ``accumulator_dtype``.
        """
        batch = _batch.collect(grads, "GradAccumulator.step", cuda=True)
        leaves = _backend.position_leaves(batch)
        window = self._window
        if window is None:
            window = _Buffers.plan(batch.treedef, leaves, self._accumulator_dtype)
        buffers = window.place(batch, leaves)
        if self._skip_nonfinite and not buffers.finite(batch, leaves):
            self._skipped += 1
            return None
        self._window = window
        buffers.add(batch, leaves, first=self._current_step == 0)
        if not self._advance():
            return None
        results = buffers.result(self._coef(), self._copy_result, window.shapes)
        originals = [batch.originals[u] for u in batch.unique_of]  # NumPy scalars stay scalars
        positions = np.arange(len(results))
        return _batch.Batch(window.treedef, results, positions, [], originals).rebuild(owned=self._copy_result)

    def _advance(self):
        """Count an accepted micro-batch; whether it ends the window (then a new one starts)."""
        self._current_step += 1
        if self._current_step < self._accum_steps:
            return False
        self._current_step = 0
        return True

    def _coef(self):
        return 1.0 / self._accum_steps if self._average else 1.0

    def reset(self):
        """Drop the window: accumulated values, structure and buffers, and zero `skipped`."""
        self._current_step = 0
        self._skipped = 0
        self._window = None

    def state_dict(self):
        """The configuration, the position in the window, the structure and the buffers.

        Returns
        -------
        dict
            A snapshot (the buffers are copies) that later steps do not change; it
            pickles. `load_state_dict` of a new accumulator continues bit for bit.
        """
        state = {name: getattr(self, name) for name in _CONFIG}
        state.update(current_step=self._current_step, skipped=self._skipped, structure=None, buffers=None)
        if self._window is not None:
            state["structure"], state["buffers"] = self._window.snapshot()
        return state

    def load_state_dict(self, state):
        """Restore a `state_dict`; the accumulator is unchanged if it raises.

        Raises
        ------
        ValueError
            Keys missing or unexpected, or a field that `state_dict` cannot have made: of
            the wrong type or out of range, a structure that is not one `flatten` makes
            (containers, shapes, dtypes, buffer orders), or buffers that do not fit it.
        TypeError
            ``state`` is not a dict.
        """
        _checks.state_keys(_OWNER, state, _CONFIG + _STATE)
        try:
            restored = GradAccumulator(**{name: state[name] for name in _CONFIG})
        except (TypeError, ValueError) as error:
            raise _checks.saved_argument(_OWNER, error) from None
        current = _checks.saved_count(_OWNER, "current_step", state["current_step"], 0, restored.accum_steps)
        skipped = _checks.saved_count(_OWNER, "skipped", state["skipped"], 0)
        structure, buffers = state["structure"], state["buffers"]
        if structure is None:
            if current:
                raise _checks.bad_checkpoint(_OWNER, "structure", "the window's (current_step > 0)", structure)
            if buffers is not None:
                raise _checks.bad_checkpoint(_OWNER, "buffers", "None, as structure is", buffers)
        else:
            restored._window = _Buffers.restore(structure, buffers, restored.accumulator_dtype)
        restored._current_step, restored._skipped = current, skipped
        self.__dict__.update(restored.__dict__)

    def __repr__(self):
        config = ", ".join(f"{name}={getattr(self, name)!r}" for name in _CONFIG)
        return f"GradAccumulator({config})"


class _Buffers:
    """The window's structure, and its buffers (``device``) once a micro-batch places them."""

    def __init__(self, treedef, shapes, dtypes, orders, accumulators):
        self.treedef = treedef
        self.shapes = shapes
        self.dtypes = dtypes
        self.orders = orders  # per position, the `_table.traversal` the buffer follows
        self.accumulators = accumulators
        self.sizes = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
        self.device = None  # the buffers: a ``_cpu.Accumulation`` or a ``_cuda.Accumulation``
        self.saved = None  # restored buffers (host), until a micro-batch places the window

    @classmethod
    def plan(cls, treedef, leaves, accumulator_dtype):
        """The buffers for micro-batches like ``leaves`` (not allocated yet)."""
        accumulators = []
        for position, leaf in enumerate(leaves):
            dtype = leaf.dtype
            acc = _accumulator(dtype, accumulator_dtype)
            if dtype.kind == "c" and acc.kind != "c":
                raise _checks.complex_into_real(_tree.path(treedef, position), dtype, acc)
            accumulators.append(acc)
        orders = [_table.traversal(leaf) for leaf in leaves]
        return cls(treedef, [tuple(leaf.shape) for leaf in leaves], [leaf.dtype for leaf in leaves], orders, accumulators)

    def place(self, batch, leaves):
        """The buffers for ``batch`` (``leaves`` per position): raises, changing nothing, unless
        the micro-batch fits the window; allocates them on its device the first time."""
        if batch.treedef != self.treedef:
            where, expected, got = _tree.difference(self.treedef, batch.treedef)
            raise _checks.accumulation_mismatch(where, "structure", expected, got)
        on_gpu = batch.cuda is not None
        if on_gpu and batch.cuda.mixed:
            on_device = np.isin(batch.unique_of, batch.cuda.unique)
            cpu, gpu = (_tree.path(batch.treedef, int(np.argmax(mask))) for mask in (~on_device, on_device))
            raise _checks.mixed_devices("GradAccumulator.step", cpu, gpu)
        if self.device is not None and on_gpu != self.device.on_gpu:
            devices = ("CPU arrays", "CUDA arrays") if on_gpu else ("CUDA arrays", "CPU arrays")
            raise _checks.accumulation_mismatch("grads", "device", *devices)
        if self.device is None or not self.device.fits(leaves):  # the fast check: same layouts as before
            for what, mine in (("shape", self.shapes), ("dtype", self.dtypes)):
                theirs = [tuple(leaf.shape) if what == "shape" else leaf.dtype for leaf in leaves]
                if theirs != mine:
                    position = next(i for i, (m, t) in enumerate(zip(mine, theirs)) if m != t)
                    raise _checks.accumulation_mismatch(
                        _tree.path(batch.treedef, position), what, mine[position], theirs[position]
                    )
        if self.device is None:
            self.device = _backend.accumulation(batch, self, leaves, self.saved)
            self.saved = None
        return self.device

    def snapshot(self):
        structure = {
            "treedef": self.treedef,
            "shapes": list(self.shapes),
            "dtypes": list(self.dtypes),
            "orders": list(self.orders),
        }
        if self.device is not None:
            return structure, self.device.snapshot()
        return structure, [saved.copy() for saved in self.saved]

    @classmethod
    def restore(cls, structure, buffers, accumulator_dtype):
        """The window of a saved ``structure`` and its ``buffers``, every field checked."""
        fields = {"treedef", "shapes", "dtypes", "orders"}
        if not isinstance(structure, dict) or set(structure) != fields:
            raise _checks.bad_checkpoint(_OWNER, "structure", f"a dict with keys {sorted(fields)}", structure)
        try:
            leaves = _tree.leaf_count(structure["treedef"])
        except ValueError as error:
            where, expected, got = error.args
            raise _checks.bad_checkpoint(_OWNER, f"structure['treedef']{where}", expected, got) from None
        columns = {}
        for field in ("shapes", "dtypes", "orders"):
            column = structure[field]
            if not isinstance(column, (list, tuple)) or len(column) != leaves:
                expected = f"a list of {leaves} (one per leaf)"
                raise _checks.bad_checkpoint(_OWNER, f"structure[{field!r}]", expected, column)
            columns[field] = column
        shapes = [_saved_shape(i, shape) for i, shape in enumerate(columns["shapes"])]
        dtypes = [_saved_dtype(i, dtype) for i, dtype in enumerate(columns["dtypes"])]
        orders = [_saved_order(i, order, shape) for i, (order, shape) in enumerate(zip(columns["orders"], shapes))]
        accumulators = [_accumulator(d, accumulator_dtype) for d in dtypes]
        for i, (dtype, acc) in enumerate(zip(dtypes, accumulators)):
            if dtype.kind == "c" and acc.kind != "c":
                raise _checks.bad_checkpoint(
                    _OWNER, f"structure['dtypes'][{i}]", f"real, as accumulator_dtype {acc} is", dtype
                )
        window = cls(structure["treedef"], shapes, dtypes, orders, accumulators)
        if not isinstance(buffers, (list, tuple)) or len(buffers) != leaves:
            raise _checks.bad_checkpoint(_OWNER, "buffers", f"a list of {leaves} arrays (one per leaf)", buffers)
        for i, (buffer, acc, n) in enumerate(zip(buffers, accumulators, window.sizes.tolist())):
            if not isinstance(buffer, np.ndarray) or buffer.dtype != acc or buffer.size != n:
                raise _checks.bad_checkpoint(_OWNER, f"buffers[{i}]", f"a NumPy array of {n} {acc}", buffer)
        window.saved = [np.array(saved).reshape(-1) for saved in buffers]  # placed by the next micro-batch
        return window


def _saved_shape(position, shape):
    if isinstance(shape, (list, tuple)) and all(
        isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_)) and n >= 0 for n in shape
    ):
        return tuple(int(n) for n in shape)
    raise _checks.bad_checkpoint(_OWNER, f"structure['shapes'][{position}]", "a tuple of ints >= 0", shape)


def _saved_dtype(position, dtype):
    try:
        found = None if dtype is None else _checks.accumulator_dtype(dtype)
    except TypeError:
        found = None
    if found is None:
        expected = f"one of {', '.join(_checks.SUPPORTED_DTYPES)}"
        raise _checks.bad_checkpoint(_OWNER, f"structure['dtypes'][{position}]", expected, dtype)
    return found


def _saved_order(position, order, shape):
    """A buffer order (`_table.traversal`) that a leaf of ``shape`` can have."""
    valid = _table.as_traversal(order, shape)
    if valid is None:
        raise _checks.bad_checkpoint(
            _OWNER,
            f"structure['orders'][{position}]",
            f"a traversal of shape {shape}: (axis, flipped) pairs, each axis of length other than 1 once",
            order,
        )
    return valid


def _accumulator(dtype, requested):
    """The buffers' dtype for grads of ``dtype``: ``requested``, else float32 for half precision."""
    return requested or (np.dtype(np.float32) if dtype.name in _HALF else dtype)
