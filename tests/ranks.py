"""One rank of a multi-process run, for tests/test_distributed.py.

    mpiexec -n N python tests/ranks.py mpi OUT_DIR
    RANK=r WORLD_SIZE=N MASTER_PORT=p python tests/ranks.py torch OUT_DIR

Every rank builds the same full gradients from a fixed seed (`full_gradients`), keeps its
shard (`shard_of`), runs the scenarios below with the reducer of the chosen engine and
writes what it saw to OUT_DIR/rank<r>.npz. The test compares the ranks with each other
and with a single process working on the full gradients.
"""

import os
import sys

import numpy as np

SEED = 20261123
MAX_NORM = 0.5
CLIPPER_SCALES = (1.0, 1.25, 0.8, 1.1, 20.0)
"""The adaptive clipper's steps: the shards scaled by these; the last one a spike."""


def full_gradients():
    """Sharded leaves (the rows of ``big`` are split across ranks) and replicated ones."""
    rng = np.random.default_rng(SEED)
    sharded = [rng.standard_normal(shape).astype(dtype) for shape, dtype in (
        ((5, 3), np.float32), ((11,), np.float64), ((2, 2, 3), np.float32), ((7,), np.float32),
        ((), np.float64), ((4, 6), np.float64), ((9,), np.float32),
    )]
    big = rng.standard_normal((13, 8)).astype(np.float32)
    replicated = [rng.standard_normal(4).astype(np.float32), rng.standard_normal((3, 2))]
    return sharded, big, replicated


def shard_of(rank, world):
    """This rank's leaves: every world-th sharded leaf, a block of rows of ``big``
    (a view), and its own copies of the replicated leaves."""
    sharded, big, replicated = full_gradients()
    rows = np.array_split(np.arange(big.shape[0]), world)[rank]
    return sharded[rank::world] + [big[rows[0] : rows[-1] + 1] if rows.size else big[:0]], replicated


def run(reducer, out_dir):
    import gradclip
    from gradclip.distributed import RemoteRankError

    rank, world = reducer.rank, reducer.world_size
    seen = {}

    def outcome(name, call):
        try:
            seen[name] = call()
        except Exception as error:  # recorded by class, checked by the test
            seen[name + "_error"] = np.array(type(error).__name__)

    shard, replicated = shard_of(rank, world)
    for p in (1.0, 2.0, 3.0, np.inf):
        seen[f"norm_{p}"] = gradclip.grad_norm(shard + replicated, p, reducer=reducer, replicated=replicated)
    seen["norm_without_replicated"] = gradclip.grad_norm(shard, reducer=reducer)

    seen["clip_total"] = gradclip.clip_grad_norm_(shard + replicated, MAX_NORM, reducer=reducer, replicated=replicated)
    seen["clipped_count"] = len(shard + replicated)
    for i, leaf in enumerate(shard + replicated):
        seen[f"clipped_{i}"] = leaf

    clipper = gradclip.ZScoreClipper(warmup=2)
    steps = ([np.array(leaf * scale) for leaf in shard_of(rank, world)[0]] for scale in CLIPPER_SCALES)
    stats = [clipper(g, reducer=reducer) for g in steps]
    seen["clipper_norms"] = np.array([s.norm for s in stats])
    seen["clipper_state"] = np.array([clipper.state_dict()["mean"], clipper.state_dict()["var"]])

    # a NaN on the last rank: every rank sees a NaN total and writes nothing
    shard, replicated = shard_of(rank, world)
    if rank == world - 1:
        shard[0].flat[0] = np.nan
    before = [leaf.copy() for leaf in shard]
    seen["nan_total"] = gradclip.clip_grad_norm_(shard, MAX_NORM, reducer=reducer)
    seen["nan_untouched"] = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(shard, before))
    outcome("nan_raise", lambda: gradclip.clip_grad_norm_(shard, MAX_NORM, reducer=reducer, error_if_nonfinite=True))

    # bad input on rank 1 (an integer leaf): that rank raises TypeError, the others
    # RemoteRankError, and nobody waits for ever or writes
    shard, _ = shard_of(rank, world)
    before = [leaf.copy() for leaf in shard]
    given = shard + [np.arange(3)] if rank == 1 else shard
    outcome("bad_input", lambda: gradclip.clip_grad_norm_(given, MAX_NORM, reducer=reducer))
    seen["bad_input_untouched"] = all(np.array_equal(a, b) for a, b in zip(shard, before))
    assert "bad_input_error" in seen and issubclass(RemoteRankError, RuntimeError)

    # still in step afterwards: one more collective succeeds everywhere
    seen["after"] = gradclip.grad_norm(shard_of(rank, world)[0], reducer=reducer)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **seen)


def main(engine, out_dir):
    if engine == "mpi":
        from gradclip.distributed import MPIReducer

        run(MPIReducer(), out_dir)
    else:
        import torch.distributed as dist

        from gradclip.distributed import TorchReducer

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
        try:
            run(TorchReducer(), out_dir)
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
