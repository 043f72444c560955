"""Gradients sharded across ranks (SPEC §7): one norm for all shards, one decision for all ranks.

Under FSDP / ZeRO each rank holds a disjoint part of the gradients. Pass a reducer to
`grad_norm`, `clip_grad_norm_`, `clip_grad_norm`, `norm_penalty` or an adaptive clipper's
call, on every rank: each rank reduces its shard to one local norm, a single all-reduce
of ``2 · world_size + 1`` float64 values shares them, and every rank folds them in rank
order. So every rank returns the bit-identical total norm, scales its shard by the same
coefficient, and takes the same decision on a non-finite total (all leave their shards
untouched, or all raise with ``error_if_nonfinite=True``). Leaves that every rank holds
whole (``replicated=``) are counted once, with rank 0's values.

A rank whose call fails before the all-reduce (a bad leaf, a bad argument) still joins
it, so no rank hangs: that rank raises its own error and the others raise
`RemoteRankError`; nothing is written anywhere.

A reducer is any object with ``rank``, ``world_size`` and ``all_reduce(values)``, which
returns the element-wise sum over the ranks of a 1-d float64 NumPy array, the same on
every rank. Two ship here, for mpi4py and for torch.distributed.

Examples
--------
ZeRO-style data parallelism with mpi4py (``mpiexec -n 4 python train.py``)::

    from gradclip.distributed import MPIReducer
    reducer = MPIReducer()                    # MPI.COMM_WORLD
    # shard: this rank's part of the gradients, after the reduce-scatter
    total = gradclip.clip_grad_norm_(shard + biases, 1.0, reducer=reducer, replicated=biases)
"""

import numpy as np

from ._checks import RemoteRankError

__all__ = ["MPIReducer", "RemoteRankError", "TorchReducer"]


class MPIReducer:
    """All-reduces through an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The ranks that share the gradients; ``MPI.COMM_WORLD`` by default.

    Attributes
    ----------
    rank, world_size : int
        This rank and the number of ranks in ``comm``.
    """

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._sum = MPI.SUM
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()

    def all_reduce(self, values):
        """The element-wise sum of ``values`` (1-d float64) over the ranks."""
        reduced = np.empty_like(values)
        self.comm.Allreduce(values, reduced, op=self._sum)
        return reduced

    def __repr__(self):
        return f"MPIReducer(rank={self.rank}, world_size={self.world_size})"


class TorchReducer:
    """All-reduces through a torch.distributed process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The ranks that share the gradients; the default group by default (initialise it
        first with ``torch.distributed.init_process_group``). With the NCCL backend the
        values travel through the current CUDA device.

    Attributes
    ----------
    rank, world_size : int
        This rank within ``group`` and the group's size.
    """

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == dist.Backend.NCCL
        self._device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def all_reduce(self, values):
        """The element-wise sum of ``values`` (1-d float64) over the ranks."""
        tensor = self._torch.tensor(values, dtype=self._torch.float64, device=self._device)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        return tensor.cpu().numpy()

    def __repr__(self):
        return f"TorchReducer(rank={self.rank}, world_size={self.world_size})"
