"""What a reducer costs per call: run under MPI with 1, 2, 4 ... ranks.

    .venv/bin/mpiexec -n 2 .venv/bin/python bench/distributed.py
    .venv/bin/mpiexec -n 4 .venv/bin/python bench/distributed.py

Each rank holds its shard of two workloads — W5 (100 leaves of 10, dealt round-robin:
the call is all overhead) and GPT-2 small (each of the 148 leaves split on its first
axis, as FSDP2 shards parameters) — and
times the same call with and without ``reducer=``; also a bare ``Allreduce`` of the
``2 · ranks + 1`` doubles gradclip sends. The ranks share the machine's cores, so each
runs its kernels on ``cores // ranks`` threads. Rank 0 prints medians
over the ranks' slowest (a collective finishes when its last rank does).
"""

import os
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent))

import gradclip  # noqa: E402
from gradclip.distributed import MPIReducer  # noqa: E402
from workloads import gpt2_small_shapes  # noqa: E402

REPEATS = 31


def timed(comm, call, repeats):
    """Median over repeats of the slowest rank's seconds for ``call()``."""
    samples = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        call()
        elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        samples.append(elapsed)
    return statistics.median(samples)


def main():
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    numba.set_num_threads(max(1, os.cpu_count() // world))  # the ranks share this machine's cores
    reducer = MPIReducer(comm)
    rng = np.random.default_rng(rank)
    tiny = [rng.standard_normal(10).astype(np.float32) for _ in range(100)][rank::world]
    gpt2 = [np.full(shape, 1e-3, np.float32) for shape in gpt2_small_shapes()]
    gpt2 = [np.array_split(leaf, world)[rank] for leaf in gpt2]  # dim-0 shards, as FSDP2 keeps them
    vector = np.zeros(2 * world + 1)
    rows = [
        ("Allreduce of the vector alone", lambda: comm.Allreduce(vector, np.empty_like(vector)), None, 1e6, "µs"),
        ("W5 shard grad_norm", lambda: gradclip.grad_norm(tiny), lambda: gradclip.grad_norm(tiny, reducer=reducer), 1e6, "µs"),
        (
            "GPT-2 shard clip_grad_norm_",
            lambda: gradclip.clip_grad_norm_(gpt2, np.inf),
            lambda: gradclip.clip_grad_norm_(gpt2, np.inf, reducer=reducer),
            1e3,
            "ms",
        ),
    ]
    for _, alone, shared, _, _ in rows:  # compile and warm up
        alone()
        if shared:
            shared()
    results = []
    for name, alone, shared, scale, unit in rows:
        repeats = REPEATS if unit == "µs" else 7
        t_alone = timed(comm, alone, repeats)
        t_shared = timed(comm, shared, repeats) if shared else None
        results.append((name, t_alone * scale, None if t_shared is None else t_shared * scale, unit))
    if rank == 0:
        elements = sum(a.size for a in gpt2)
        print(f"{world} rank(s); rank 0 holds {len(gpt2)} GPT-2 leaves, {elements:,} elements")
        print(f"{'call (medians of the slowest rank)':36} {'alone':>11} {'reducer=':>11} {'overhead':>11}")
        for name, t_alone, t_shared, unit in results:
            line = f"{name:36} {t_alone:8.1f} {unit}"
            if t_shared is not None:
                line += f" {t_shared:8.1f} {unit} {t_shared - t_alone:+8.1f} {unit}"
            print(line)


if __name__ == "__main__":
    main()
