"""Sharded gradients across ranks (SPEC §7): the reducer protocol in one process (ranks
as threads), then the real adapters — mpi4py under ``mpiexec -n 2`` and ``-n 4``, and
torch.distributed over gloo with two processes."""

import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import gradclip as gc
import ranks
from gradclip.distributed import MPIReducer, RemoteRankError
from helpers import assert_norm_close, raises_with
from reference import ref_norm

TESTS = Path(__file__).parent
TIMEOUT = 240  # seconds; a rank that hangs fails the test instead of the run


class ThreadGroup:
    """``world`` ranks as threads; ``reducer(r)`` is rank r's reducer.

    ``all_reduce`` sums in rank order behind a barrier, as an MPI all-reduce would;
    it also counts the collectives, and times out rather than waiting for ever.
    """

    def __init__(self, world):
        self.world = world
        self.calls = 0
        self._given = [None] * world
        self._barrier = threading.Barrier(world, timeout=30)

    def reducer(self, rank):
        group = self

        class Reducer:
            def __init__(self):
                self.rank, self.world_size = rank, group.world

            def all_reduce(self, values):
                group._given[rank] = values.copy()
                group._barrier.wait()
                total = sum(group._given)
                if rank == 0:
                    group.calls += 1
                group._barrier.wait()
                return total

        return Reducer()

    def run(self, work):
        """``work(rank, reducer)`` on every rank; each rank's result or exception."""
        results = [None] * self.world

        def target(rank):
            try:
                results[rank] = work(rank, self.reducer(rank))
            except Exception as error:
                results[rank] = error

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a rank hung"
        return results


def sharded(world, rng, dtype=np.float64, n=9):
    """Full gradients and each rank's shard of them: whole leaves dealt round-robin,
    and the rows of one more leaf split across the ranks (as views)."""
    full = [rng.standard_normal(rng.integers(1, 20)).astype(dtype) for _ in range(n)]
    big = rng.standard_normal((2 * world + 1, 5)).astype(dtype)
    blocks = np.array_split(np.arange(big.shape[0]), world)
    shards = [full[r::world] + [big[b[0] : b[-1] + 1]] for r, b in enumerate(blocks)]
    return full + [big], shards


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sharded_norm_is_the_norm_of_the_whole(world, p, dtype, rng):
    full, shards = sharded(world, rng, dtype)
    group = ThreadGroup(world)
    totals = group.run(lambda r, reducer: gc.grad_norm(shards[r], p, reducer=reducer))
    assert group.calls == 1
    assert len({t.hex() for t in totals}) == 1, "ranks disagree on the total"
    assert_norm_close(totals[0], ref_norm(full, p), rtol=1e-14)
    assert_norm_close(totals[0], gc.grad_norm(full, p), rtol=1e-14)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_clips_its_shard_as_one_process_clips_the_whole(world, rng):
    full, shards = sharded(world, rng, np.float32)
    expected = [leaf.copy() for leaf in full]
    group = ThreadGroup(world)
    totals = group.run(lambda r, reducer: gc.clip_grad_norm_(shards[r], 1.0, reducer=reducer))
    assert len(set(totals)) == 1 and totals[0] > 1.0
    gc.clip_grads_with_norm_(expected, 1.0, totals[0])
    for got, want in zip(full, expected):  # the shards are the full leaves and views of them
        np.testing.assert_array_equal(got, want)
    assert_norm_close(gc.grad_norm(full), 1.0, rtol=1e-6)


def test_out_of_place_twin_returns_the_global_total(rng):
    full, shards = sharded(2, rng)
    group = ThreadGroup(2)
    results = group.run(lambda r, reducer: gc.clip_grad_norm(shards[r], 1.0, eps=0.0, reducer=reducer))
    assert results[0][1] == results[1][1]
    assert_norm_close(results[0][1], ref_norm(full), rtol=1e-14)
    clipped = results[0][0] + results[1][0]
    assert_norm_close(gc.grad_norm(clipped), 1.0, rtol=1e-12)


def test_replicated_leaves_count_once(rng):
    world = 3
    full, shards = sharded(world, rng)
    bias = rng.standard_normal(5)
    copies = [bias.copy() for _ in range(world)]  # every rank holds its own, equal copy
    group = ThreadGroup(world)
    totals = group.run(
        lambda r, reducer: gc.grad_norm({"w": shards[r], "b": copies[r]}, reducer=reducer, replicated=[copies[r]])
    )
    assert len(set(totals)) == 1
    assert_norm_close(totals[0], ref_norm(full + [bias]), rtol=1e-14)
    counted_thrice = group.run(lambda r, reducer: gc.grad_norm(shards[r] + [copies[r]], reducer=reducer))
    assert_norm_close(counted_thrice[0], ref_norm(full + copies), rtol=1e-14)


def test_replicated_leaves_are_clipped_by_the_same_coefficient(rng):
    full, shards = sharded(2, rng)
    copies = [np.full(4, 3.0), np.full(4, 3.0)]
    expected_total = ref_norm(full + [copies[0]])
    group = ThreadGroup(2)
    totals = group.run(
        lambda r, reducer: gc.clip_grad_norm_(shards[r] + [copies[r]], 1.0, eps=0.0, reducer=reducer, replicated=copies[r])
    )
    assert_norm_close(totals[0], expected_total, rtol=1e-14)
    np.testing.assert_array_equal(copies[0], copies[1])
    assert_norm_close(gc.grad_norm(full + [copies[0]]), 1.0, rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_shard_stops_every_rank(bad, rng):
    full, shards = sharded(3, rng)
    shards[2][0][0] = bad
    before = [leaf.copy() for leaf in full]
    group = ThreadGroup(3)
    totals = group.run(lambda r, reducer: gc.clip_grad_norm_(shards[r], 1.0, reducer=reducer))
    for total in totals:
        assert math.isnan(total) if np.isnan(bad) else total == math.inf
    for got, want in zip(full, before):
        np.testing.assert_array_equal(got, want)
    errors = group.run(lambda r, reducer: gc.clip_grad_norm_(shards[r], 1.0, reducer=reducer, error_if_nonfinite=True))
    assert all(isinstance(e, gc.NonFiniteGradientError) for e in errors)


def test_bad_input_on_one_rank_fails_every_rank_without_hanging(rng):
    full, shards = sharded(3, rng)
    shards[1] = shards[1] + [np.arange(3)]
    before = [leaf.copy() for leaf in full]
    group = ThreadGroup(3)
    errors = group.run(lambda r, reducer: gc.clip_grad_norm_(shards[r], 1.0, reducer=reducer))
    assert isinstance(errors[1], TypeError) and "int64" in str(errors[1])
    for rank in (0, 2):
        assert isinstance(errors[rank], RemoteRankError)
        message = str(errors[rank])
        assert "clip_grad_norm_ failed on rank 1" in message and f"rank {rank} wrote nothing" in message
    for got, want in zip(full, before):
        np.testing.assert_array_equal(got, want)
    assert group.calls == 1
    again = group.run(lambda r, reducer: gc.grad_norm(shards[r][:2], reducer=reducer))  # still in step
    assert len(set(again)) == 1


def test_a_bad_argument_on_one_rank_is_a_failure_too(rng):
    _, shards = sharded(2, rng)
    group = ThreadGroup(2)
    errors = group.run(lambda r, reducer: gc.clip_grad_norm_(shards[r], -1.0 if r else 1.0, reducer=reducer))
    assert isinstance(errors[0], RemoteRankError) and isinstance(errors[1], ValueError)


def test_failures_on_several_ranks_are_all_named(rng):
    _, shards = sharded(4, rng)
    group = ThreadGroup(4)
    errors = group.run(lambda r, reducer: gc.grad_norm(shards[r] + ([None, "x"] if r in (1, 3) else []), reducer=reducer))
    assert isinstance(errors[1], TypeError) and isinstance(errors[3], TypeError)
    assert "failed on ranks 1, 3" in str(errors[0]) and "failed on ranks 1, 3" in str(errors[2])


def test_adaptive_clippers_keep_the_same_statistics_on_every_rank(rng):
    full, shards = sharded(2, rng)
    group = ThreadGroup(2)

    def steps(rank, reducer):
        clipper = gc.EMAClipper(warmup=2)
        stats = []
        for scale in (1.0, 1.2, 0.9, 30.0):
            stats.append(clipper([leaf * scale for leaf in shards[rank]], reducer=reducer))
        return stats, clipper.state_dict()

    (stats0, state0), (stats1, state1) = group.run(steps)
    assert stats0 == stats1 and state0 == state1
    single = gc.EMAClipper(warmup=2)
    for scale, stat in zip((1.0, 1.2, 0.9, 30.0), stats0):
        assert_norm_close(stat.norm, single([leaf * scale for leaf in full]).norm, rtol=1e-14)
    assert stats0[-1].clipped


def test_norm_penalty_with_a_reducer_uses_the_global_norm(rng):
    full, shards = sharded(2, rng)
    group = ThreadGroup(2)
    results = group.run(lambda r, reducer: gc.norm_penalty(shards[r], 1.0, 0.5, reducer=reducer))
    value, _ = gc.norm_penalty(full, 1.0, 0.5)
    assert results[0][0] == results[1][0]
    assert_norm_close(results[0][0], value, rtol=1e-14)


def test_replicated_must_name_leaves_of_grads(rng):
    g = [rng.standard_normal(3)]
    with raises_with(ValueError, "replicated[0]", "not a leaf of grads"):
        gc.grad_norm(g, replicated=[g[0].copy()])
    assert gc.grad_norm(g, replicated=g) == gc.grad_norm(g)  # without a reducer: one rank
    looped = {"w": g[0]}
    looped["again"] = looped
    with raises_with(ValueError, "replicated['again'] is a container that holds itself"):
        gc.grad_norm(g, replicated=looped)


def test_a_reducer_must_have_the_protocol():
    with raises_with(TypeError, "reducer must have rank, world_size and all_reduce", "lacks all_reduce"):
        gc.grad_norm(np.ones(3), reducer=type("R", (), {"rank": 0, "world_size": 1})())


def test_a_reducer_returning_the_wrong_shape_is_refused():
    class Truncating:
        rank, world_size = 0, 1

        def all_reduce(self, values):
            return values[:1]

    with raises_with(ValueError, "Truncating.all_reduce returned shape (1,); expected (3,)"):
        gc.grad_norm(np.ones(3), reducer=Truncating())


# --- real engines, real processes --------------------------------------------------------


def check_ranks(out_dir, world):
    """What every rank of a tests/ranks.py run saw, against one process on the whole."""
    seen = [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(world)]
    sharded_leaves, big, replicated = ranks.full_gradients()
    full = sharded_leaves + [big]
    for key in seen[0]:
        if not key.startswith("clipped_") and key != "bad_input_error":  # those differ by design
            for other in seen[1:]:
                np.testing.assert_array_equal(other[key], seen[0][key], err_msg=f"ranks disagree on {key}")
    ours = seen[0]
    for p in (1.0, 2.0, 3.0, np.inf):
        assert_norm_close(float(ours[f"norm_{p}"]), ref_norm(full + replicated, p), rtol=1e-14)
    assert_norm_close(float(ours["norm_without_replicated"]), ref_norm(full), rtol=1e-14)

    total = float(ours["clip_total"])
    expected = [leaf.copy() for leaf in full + replicated]
    gc.clip_grads_with_norm_(expected, ranks.MAX_NORM, total)
    got_big = []
    for r, rank_seen in enumerate(seen):
        shard = [rank_seen[f"clipped_{i}"] for i in range(int(rank_seen["clipped_count"]))]
        *whole, block, rep0, rep1 = shard
        for leaf, want in zip(whole, expected[r : len(sharded_leaves) : world]):
            np.testing.assert_array_equal(leaf, want)
        np.testing.assert_array_equal(rep0, expected[-2])
        np.testing.assert_array_equal(rep1, expected[-1])
        got_big.append(block)
    np.testing.assert_array_equal(np.concatenate(got_big), expected[len(sharded_leaves)])

    single = gc.ZScoreClipper(warmup=2)
    norms = [single([np.array(leaf * s) for leaf in full]).norm for s in ranks.CLIPPER_SCALES]
    np.testing.assert_allclose(ours["clipper_norms"], norms, rtol=1e-14)

    assert math.isnan(ours["nan_total"]) and all(bool(s["nan_untouched"]) for s in seen)
    assert all(str(s["nan_raise_error"]) == "NonFiniteGradientError" for s in seen)
    assert [str(s["bad_input_error"]) for s in seen] == ["TypeError" if r == 1 else "RemoteRankError" for r in range(world)]
    assert all(bool(s["bad_input_untouched"]) for s in seen)


def run_ranks(commands, envs, out_dir):
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command, env in zip(commands, envs)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output


@pytest.mark.parametrize("world", [2, 4])
def test_mpi_ranks(world, tmp_path):
    mpiexec = Path(sys.executable).with_name("mpiexec")
    command = [str(mpiexec), "-n", str(world), sys.executable, str(TESTS / "ranks.py"), "mpi", str(tmp_path)]
    run_ranks([command], [os.environ], tmp_path)
    check_ranks(tmp_path, world)


def test_torch_distributed_ranks(tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(TESTS / "ranks.py"), "torch", str(tmp_path)]
    envs = [dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_PORT=str(port)) for r in range(2)]
    run_ranks([command, command], envs, tmp_path)
    check_ranks(tmp_path, 2)


def test_mpi_reducer_on_a_single_rank():
    mpi = MPIReducer()  # a singleton MPI world in this process
    assert (mpi.rank, mpi.world_size) == (0, 1)
    assert repr(mpi) == "MPIReducer(rank=0, world_size=1)"
    assert gc.grad_norm([np.array([3.0, 4.0])], reducer=mpi) == 5.0


def test_the_zero_example_trains_as_one_process_does():
    mpiexec = Path(sys.executable).with_name("mpiexec")
    example = TESTS.parent / "examples" / "zero_mpi.py"
    done = subprocess.run(
        [str(mpiexec), "-n", "3", sys.executable, str(example)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    difference = float(done.stdout.rsplit(":", 1)[1])
    assert difference <= 1e-12, done.stdout
    assert "3 ranks" in done.stdout


def test_gpu_shards_take_the_global_norm(rng):
    """GPU leaves with a reducer: leaf norms come to the host for the all-reduce, the
    total goes back to the device, and the shard is scaled there (simulator)."""
    from numba import cuda

    full, shards = sharded(2, rng, np.float32)
    other = np.zeros(5)
    other[1] = gc.grad_norm(shards[1])  # rank 1's local norm, in its slot

    class RankZero:
        rank, world_size = 0, 2

        def all_reduce(self, values):
            return values + other

    expected = [leaf.copy() for leaf in shards[0]]
    on_device = [cuda.to_device(leaf) for leaf in shards[0]]
    norm = gc.grad_norm(on_device, reducer=RankZero())
    total = gc.clip_grad_norm_(on_device, 0.5, reducer=RankZero())
    for result in (norm, total):
        assert hasattr(result, "__cuda_ndarray__") and result.shape == ()
        assert_norm_close(float(result.copy_to_host()), ref_norm(full), rtol=1e-14)
    gc.clip_grads_with_norm_(expected, 0.5, float(total.copy_to_host()))
    for got, want in zip(on_device, expected):
        np.testing.assert_array_equal(got.copy_to_host(), want)
