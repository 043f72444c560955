"""ZeRO-style data parallelism with mpi4py: each rank owns a shard of the optimiser's work.

    .venv/bin/mpiexec -n 4 .venv/bin/python examples/zero_mpi.py

A two-layer network is trained on a regression task. Every rank computes gradients
on its own part of each batch; a reduce-scatter leaves each rank with the summed
gradient of its slice of the flat parameter vector (ZeRO stage 2). The rank clips
that shard with ``clip_grad_norm_(..., reducer=MPIReducer(comm))`` — the norm of all
shards together, the same on every rank — takes an SGD step on its slice, and an
all-gather rebuilds the parameters. Rank 0 then repeats the training in one process
on whole batches and prints how far the two parameter vectors are apart.
"""

import numpy as np
from mpi4py import MPI

import gradclip
from gradclip.distributed import MPIReducer

SHAPES = [(16, 32), (32,), (32, 1), (1,)]  # w1, b1, w2, b2
STEPS, BATCH, LR, MAX_NORM = 60, 64, 0.05, 1.0


def data(step):
    rng = np.random.default_rng(step)
    x = rng.standard_normal((BATCH, 16))
    return x, np.sin(x[:, :1] * 3) + x[:, 1:2] ** 2


def gradients(flat, x, y):
    """The summed squared-error gradient of the batch (x, y), as one flat vector."""
    sizes = np.cumsum([np.prod(s) for s in SHAPES])[:-1]
    w1, b1, w2, b2 = (part.reshape(s) for part, s in zip(np.split(flat, sizes), SHAPES))
    hidden = np.tanh(x @ w1 + b1)
    error = hidden @ w2 + b2 - y
    d_hidden = (error @ w2.T) * (1 - hidden**2)
    parts = (x.T @ d_hidden, d_hidden.sum(0), hidden.T @ error, error.sum(0))
    return np.concatenate([p.ravel() for p in parts]), float((error**2).mean())


def initial():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal(int(np.prod(s))) * 0.5 for s in SHAPES])


def train_sharded(comm):
    rank, world = comm.Get_rank(), comm.Get_size()
    reducer = MPIReducer(comm)
    flat = initial()
    counts = [len(part) for part in np.array_split(flat, world)]
    start = sum(counts[:rank])
    shard_grad = np.empty(counts[rank])
    for step in range(STEPS):
        x, y = data(step)
        grad, loss = gradients(flat, *(np.array_split(a, world)[rank] for a in (x, y)))
        comm.Reduce_scatter(grad / BATCH, shard_grad, recvcounts=counts, op=MPI.SUM)
        total = gradclip.clip_grad_norm_(shard_grad, MAX_NORM, reducer=reducer)
        shard = flat[start : start + counts[rank]] - LR * shard_grad
        comm.Allgatherv(shard, (flat, counts))
    return flat, total


def train_single():
    flat = initial()
    for step in range(STEPS):
        grad, _ = gradients(flat, *data(step))
        grad /= BATCH
        total = gradclip.clip_grad_norm_(grad, MAX_NORM)
        flat = flat - LR * grad
    return flat, total


def main():
    comm = MPI.COMM_WORLD
    flat, total = train_sharded(comm)
    if comm.Get_rank() == 0:
        single, single_total = train_single()
        x, y = data(STEPS)
        before, after = gradients(initial(), x, y)[1], gradients(flat, x, y)[1]
        print(f"{comm.Get_size()} ranks, {STEPS} steps: held-out loss {before:.2f} -> {after:.2f}, "
              f"last gradient norm {total:.6f} (one process: {single_total:.6f})")
        print(f"largest parameter difference from one process: {np.abs(flat - single).max():.2e}")


if __name__ == "__main__":
    main()
