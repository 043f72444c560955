"""The total norm of one call, over every rank's shard when a reducer is given (SPEC §7).

Each rank folds its own leaves into one local norm. One all-reduce (a sum) of a small
float64 vector brings every rank the same values: a slot per rank for its local norm,
one slot for the norm of the replicated leaves, which rank 0 alone fills, and a slot
per rank for a "failed" flag. A sum with one non-zero term is exact, so this
all-reduce is an all-gather; every rank then folds the same vector the same way, so
all ranks hold bit-identical totals and take the same decision, and the fold rescales
as the single-process one does (no spurious overflow). NaN and inf travel as they are.

A rank whose call fails before the all-reduce (bad input, bad arguments) still joins
it with its flag up, then raises its own error; the other ranks raise
`RemoteRankError`. No rank waits for ever and none writes.
"""

import numpy as np

from . import _backend, _checks, _cpu, _tree


class Collective:
    """One call's total norm: a context around the call's validation and reduction.

    Use as ``with Collective(function, reducer) as collective:`` around everything
    that may fail before the norm is known, then ``collective.total_norm(...)``.
    """

    __slots__ = ("_function", "_reducer", "_joined")

    def __init__(self, function, reducer):
        self._function = function
        self._reducer = None if reducer is None else _checks.reducer(reducer)
        self._joined = reducer is None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not self._joined and isinstance(error, Exception):
            self._exchange(np.nan, 0.0, failed=True)  # so that no other rank waits for this one
        return False

    def local(self, replicated):
        """Whether the norm is this process's own: no reducer and no ``replicated`` leaves
        to pick out. A GPU call can then keep it in device memory, a CPU call on a plain
        list take the one-call path (either needs the leaf norms on the host otherwise)."""
        return self._reducer is None and replicated is None

    def total_norm(self, batch, p, replicated=None):
        """The p-norm of every leaf of ``batch`` on every rank, as a float.

        ``replicated``: leaves of ``batch`` (the same objects, in any container) that
        every rank holds whole; they count once, with rank 0's values. GPU leaves'
        norms are copied to the host (this synchronises).
        """
        norms = _backend.host_leaf_norms(batch, p)
        shared = None if replicated is None else _replicated_mask(batch, replicated)
        if self._reducer is None:
            return _cpu.total_norm(norms, p)
        if shared is None:
            return self._exchange(_cpu.total_norm(norms, p), 0.0, failed=False, p=p)
        local, replicated_norm = _cpu.total_norm(norms[~shared], p), _cpu.total_norm(norms[shared], p)
        return self._exchange(local, replicated_norm, failed=False, p=p)

    def _exchange(self, local, replicated, *, failed, p=2.0):
        reducer = self._reducer
        self._joined = True
        rank, world = int(reducer.rank), int(reducer.world_size)
        values = np.zeros(2 * world + 1)  # the ranks' norms, the replicated norm, the ranks' flags
        values[rank] = local
        if rank == 0:
            values[world] = replicated
        values[world + 1 + rank] = failed
        reduced = np.asarray(reducer.all_reduce(values), dtype=np.float64)
        if reduced.shape != values.shape:
            raise _checks.reduced_shape(reducer, values.shape, reduced.shape)
        flags = reduced[world + 1 :]
        if not failed and flags.any():
            raise _checks.remote_failure(self._function, np.flatnonzero(flags).tolist(), rank)
        return _cpu.total_norm(reduced[: world + 1], p)


def _replicated_mask(batch, replicated):
    """Per unique leaf of ``batch``: is it one of the ``replicated`` leaves?"""
    unique = {id(original): u for u, original in enumerate(batch.originals)}
    leaves, treedef = _tree.flatten(replicated, "replicated")
    mask = np.zeros(len(batch.originals), dtype=bool)
    for position, leaf in enumerate(leaves):
        u = unique.get(id(leaf))
        if u is None:
            raise _checks.not_in_grads(lambda position=position: _tree.path(treedef, position, "replicated"), leaf)
        mask[u] = True
    return mask
