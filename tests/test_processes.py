"""Processes, threads and fork (SPEC §10): no crash and no wrong result whatever the
order of first calls across processes sharing Numba's on-disk cache, in several threads
at once, and in processes forked after a parallel kernel ran.

A process cannot see what the cache entries written by another one do, so most of these
tests run fresh interpreters: ``python tests/test_processes.py check GROUPS`` calls every
public function on the leaves of some *call groups* (a layout, a size and a dtype) and
checks every result against the references (`check_group`); ``... forks`` runs the fork
cases (`forks`). A failed check exits non-zero, a crash with the signal's status.
"""

import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import traceback
import zlib

import numba
import numpy as np
import pytest

import gradclip as gc
from gradclip._kernels import cpu as kernels
from helpers import (
    DTYPES,
    assert_dense_close,
    assert_norm_close,
    assert_norms_close,
    assert_rounded_once,
    assert_same_bits,
    dense_inputs,
    in_background,
    random_values,
)
from reference import (
    is_complex,
    ref_all_finite,
    ref_clamp,
    ref_clip_by_norm,
    ref_clip_factor,
    ref_embedding_sq_norms,
    ref_example_norms,
    ref_layer_norms,
    ref_nonfinite_mask,
    ref_norm,
    ref_weighted_sum,
    round_to,
    widen,
)

SIZES = {
    "small": (40, 7, 1),  # the serial drivers
    "large": (kernels.PARALLEL_MIN + 4_464, 300, 17),  # the parallel ones
}
HALF_LARGE = (1 << 20, 300, 17)
"""Large 16-bit leaves: enough to scale through the lookup table (`_cpu.LOOKUP_MIN`)."""

LAYOUTS = ("plain", "container")
"""A plain list of contiguous arrays (the one-call paths) or a dict of lists, tuples,
None and a strided view (the general path)."""


def group_name(layout, size, dtype):
    return f"{layout}-{size}-{np.dtype(dtype).name}"


def _leaves(layout, size, dtype):
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(group_name(layout, size, dtype).encode()))
    sizes = HALF_LARGE if size == "large" and dtype.itemsize == 2 else SIZES[size]
    if layout == "plain":
        return [random_values(n, dtype, rng) for n in sizes]
    first, middle, last = sizes
    strided = random_values(3 * middle, dtype, rng)[::3]
    return [random_values(first, dtype, rng), strided, random_values(last, dtype, rng)]


def _tree(layout, leaves):
    if layout == "plain":
        return list(leaves)
    return {"w": leaves[0], "rest": [leaves[1], None, (leaves[2],)]}


def _copy(layout, leaves):
    """The leaves copied (a strided leaf stays strided) and their tree."""
    copies = [x.copy() if x.flags.c_contiguous else np.repeat(x, 2)[::2] for x in leaves]
    return copies, _tree(layout, copies)


def _assert_leaves(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_same_bits(a, e, what=f"{what} leaf {i}")


def _ref_zero_nonfinite(x):
    """Every non-finite part replaced by 0 (complex: part by part)."""
    out = widen(x)
    parts = [out.real, out.imag] if is_complex(x.dtype) else [out]
    for part in parts:
        part[~np.isfinite(part)] = 0
    return round_to(out, x.dtype)


def check_group(layout, size, dtype):
    """Every public function on one call group, each result against the references."""
    leaves = _leaves(layout, size, dtype)
    tree = _tree(layout, leaves)
    what = group_name(layout, size, dtype)
    norm = {p: ref_norm(leaves, p) for p in (2.0, 1.0, 3.0, math.inf)}
    layer_norms = ref_layer_norms(leaves)

    for p, expected in norm.items():
        assert_norm_close(gc.grad_norm(tree, p), expected, what=f"{what} grad_norm p={p}")
    assert_norms_close(gc.layer_norms(tree), layer_norms, what=f"{what} layer_norms")

    max_norm = 0.5 * norm[2.0]
    copies, copied = _copy(layout, leaves)
    total = gc.clip_grad_norm_(copied, max_norm)
    assert_norm_close(total, norm[2.0], what=f"{what} clip_grad_norm_ total")
    clipped_by_norm = ref_clip_by_norm(leaves, max_norm, total)
    _assert_leaves(copies, clipped_by_norm, f"{what} clip_grad_norm_")
    clipped, out_of_place_total = gc.clip_grad_norm(tree, max_norm)
    assert out_of_place_total == total, f"{what} clip_grad_norm total"
    _assert_leaves(_flat(layout, clipped), clipped_by_norm, f"{what} clip_grad_norm")
    copies, copied = _copy(layout, leaves)
    gc.clip_grads_with_norm_(copied, max_norm, total)
    _assert_leaves(copies, clipped_by_norm, f"{what} clip_grads_with_norm_")

    copies, copied = _copy(layout, leaves)
    norms = gc.clip_grad_norm_per_layer_(copied, 0.5)
    assert_norms_close(norms, layer_norms, what=f"{what} clip_grad_norm_per_layer_ norms")
    _assert_leaves(copies, [ref_clip_by_norm([x], 0.5, n)[0] for x, n in zip(leaves, norms)],
                   f"{what} clip_grad_norm_per_layer_")  # fmt: skip

    if not is_complex(dtype):
        clamped = [ref_clamp(x, 0.5) for x in leaves]
        copies, copied = _copy(layout, leaves)
        assert gc.clip_grad_value_(copied, 0.5) is None
        _assert_leaves(copies, clamped, f"{what} clip_grad_value_")
        _assert_leaves(_flat(layout, gc.clip_grad_value(tree, 0.5)), clamped, f"{what} clip_grad_value")

    assert gc.all_finite(tree) is True
    copies, copied = _copy(layout, leaves)
    copies[0][3] = np.nan
    copies[-1][-1] = -np.inf
    poked = [x.copy() for x in copies]
    assert gc.all_finite(copied) is ref_all_finite(poked) is False, f"{what} all_finite"
    changed = gc.zero_nonfinite_(copied)
    assert changed == sum(int(ref_nonfinite_mask(x).sum()) for x in poked), f"{what} zero_nonfinite_ count"
    _assert_leaves(copies, [_ref_zero_nonfinite(x) for x in poked], f"{what} zero_nonfinite_")

    _check_stateful(layout, leaves, norm[2.0], layer_norms, what)


def _flat(layout, tree):
    """The leaves of a result in the structure of `_tree`."""
    return [tree["w"], tree["rest"][0], tree["rest"][2][0]] if layout == "container" else tree


def _check_stateful(layout, leaves, total, layer_norms, what):
    """The stateful classes, one or two steps each."""
    accumulator = gc.GradAccumulator(2, average=False)
    assert accumulator.step(_tree(layout, leaves)) is None
    summed = _flat(layout, accumulator.step(_tree(layout, leaves)))
    acc_dtype = np.float32 if leaves[0].itemsize == 2 else leaves[0].dtype
    _assert_leaves(summed, [round_to(2 * widen(x), acc_dtype) for x in leaves], f"{what} GradAccumulator")

    for clipper in (gc.EMAClipper(warmup=1), gc.QuantileClipper(), gc.ZScoreClipper(warmup=1)):
        _, copied = _copy(layout, leaves)
        assert_norm_close(clipper(copied).norm, total, what=f"{what} {type(clipper).__name__}")
    monitor = gc.NormMonitor(per_leaf=True)
    assert_norm_close(monitor.record(_tree(layout, leaves)), total, what=f"{what} NormMonitor")
    assert_norms_close(monitor.leaf_norms[0], layer_norms, what=f"{what} NormMonitor leaf norms")


def check(groups):
    """`check_group` on every ``(layout, size, dtype name)`` of ``groups``, in order."""
    for layout, size, dtype in groups:
        check_group(layout, size, _dtype(dtype))


def _dtype(name):
    return next(d for d in DTYPES if d.name == name)


def _dtype_group(name):
    dtype = _dtype(name)
    return "16-bit" if dtype.itemsize == 2 else "complex" if is_complex(dtype) else "real"


# ------------------------------------------------------------ Numba's cache histories
# Numba caches each compiled function on its own, and a cached function that calls
# another records what it needs of its callee as the process that compiled it saw it: a
# callee compiled in the same process, or loaded from the cache. Each order below
# compiles the call groups one (layout, size) at a time, each in a fresh process, on an
# empty cache. Three more fresh processes then call everything, loading what the first
# ones wrote, each in another order: what a process loads first can matter (numba/numba#8578
# crashed only a process whose first parallel call loaded the damaged entry). Between
# them the orders compile every dtype once, one of each group (16-bit, real, complex)
# per order.

ORDERS = {
    # the general path compiles the parallel drivers alone, then the one-call paths
    # compile against them as loaded from the cache
    "containers-large-first": (
        [("container", "large"), ("container", "small"), ("plain", "large"), ("plain", "small")],
        ("float32", "bfloat16", "complex128"),
    ),
    # the one-call paths compile the serial drivers, then the parallel ones with them
    # loaded; the general path finds both in the cache
    "plain-small-first": (
        [("plain", "small"), ("plain", "large"), ("container", "small"), ("container", "large")],
        ("float64", "float16", "complex64"),
    ),
}
WARM_PROCESSES = 3
PROCESS_TIMEOUT = 600  # seconds; a cold process compiles for a minute or two on 2 cores


def _processes(stages, dtypes):
    """The call groups of each process of an order: one stage per process, then every
    stage in each warm process, the stages reversed in every other one and the dtypes
    rotated, so that each dtype and both large stages come first somewhere."""
    processes = [[(layout, size, dtype) for dtype in dtypes] for layout, size in stages]
    for k in range(WARM_PROCESSES):
        rotated = dtypes[k:] + dtypes[:k]
        ordered = stages[::-1] if k % 2 else stages
        processes.append([(layout, size, dtype) for layout, size in ordered for dtype in rotated])
    return processes


def _run_fresh(args, cache_dir=None):
    """``python tests/test_processes.py ARGS`` in a fresh interpreter: ``(status, output)``."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    done = subprocess.run(
        [sys.executable, "-W", "error", __file__, *args],
        env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )  # fmt: skip
    return done.returncode, (done.stdout + done.stderr)[-3000:]


def _run_order(name):
    """The processes of one order, in turn, on a new empty cache; the first failure."""
    processes = _processes(*ORDERS[name])
    with tempfile.TemporaryDirectory(prefix="gradclip-numba-cache-") as cache_dir:
        for i, groups in enumerate(processes):
            status, output = _run_fresh(["check", json.dumps(groups)], cache_dir)
            if status != 0:
                return f"process {i + 1} of {len(processes)} ({groups}) exited with status {status}:\n{output}"
    return None


def start_in_background():
    """Every order, one process at a time beside the rest of the suite (helpers.in_background)."""
    return {name: in_background(("cache order", name), _run_order, name) for name in ORDERS}


@pytest.mark.parametrize("order", list(ORDERS))
def test_no_order_of_first_calls_across_processes_crashes_or_errs(order):
    failure = start_in_background()[order].result()
    assert failure is None, failure


def test_the_orders_cover_every_dtype_and_call_group():
    assert sorted(d for _, dtypes in ORDERS.values() for d in dtypes) == sorted(d.name for d in DTYPES)
    groups = {(layout, size) for layout in LAYOUTS for size in SIZES}
    for stages, dtypes in ORDERS.values():
        assert sorted(stages) == sorted(groups)
        assert sorted(map(_dtype_group, dtypes)) == ["16-bit", "complex", "real"]
        warm = _processes(stages, dtypes)[len(stages) :]
        assert len(warm) == WARM_PROCESSES
        assert all(sorted(w) == sorted((*g, d) for g in groups for d in dtypes) for w in warm)
        first_large = {next(g for g in w if g[1] == "large")[0] for w in warm}
        assert first_large == set(LAYOUTS) and {w[0][2] for w in warm} == set(dtypes)


# -------------------------------------------------------------------------- fork


def _in_child(work):
    """Run ``work()`` in a child made by a bare ``os.fork``; its exit status."""
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            work()
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _check_one(group):
    check([group])
    return group


FORK_GROUPS = [("plain", "large", "float32"), ("container", "large", "float64"), ("plain", "large", "complex64")]


def _pool_started():
    try:
        numba.threading_layer()
    except ValueError:
        return False
    return True


DENSE_SHAPES = {"rows": (8, None, 24, 12), "gram": (8, 6, 24, 12), "direct": (8, 40, 24, 12)}
"""A dense layer's (B, T, d_in, d_out) for each route `dense_sq_norms` takes (T None: no sequence)."""


def _per_example_inputs():
    """Parallel-sized inputs of private training and ghost norms (the same at every call)."""
    rng = np.random.default_rng(7)
    stacked = [rng.standard_normal((16, 6000)).astype(np.float32), rng.standard_normal((16, 30, 20))]
    dense = {route: dense_inputs(rng, shape) for route, shape in DENSE_SHAPES.items()}
    return stacked, dense, rng.integers(0, 9, (8, 40))


def per_example_results():
    """Every per-example function (SPEC §9 and the ghost norms) on `_per_example_inputs`, by
    name; the parallel kernels run unless this process was forked after its pool started."""
    stacked, dense, idx = _per_example_inputs()
    noised = np.zeros(1 << 17)
    gc.add_noise_([noised], 1.0, gc.GaussianNoise(seed=5))
    total, _ = gc.clipped_sum(stacked, 1.0)
    return {
        "per_example_norms": gc.per_example_norms(stacked),
        **{f"clipped_sum[{k}]": leaf for k, leaf in enumerate(total)},
        "add_noise_": noised,
        "standard_normal": gc.GaussianNoise(seed=5).standard_normal(noised.size),
        **{f"dense_sq_norms {route}": gc.dense_sq_norms(a, g, bias=True) for route, (a, g) in dense.items()},
        "embedding_sq_norms": gc.embedding_sq_norms(idx, dense["direct"][1]),
        "sq_norms_from_per_example": gc.sq_norms_from_per_example(stacked),
    }


def check_per_example(results):
    """`per_example_results` against the references."""
    stacked, dense, idx = _per_example_inputs()
    norms = ref_example_norms([[leaf[i] for leaf in stacked] for i in range(16)])
    assert_norms_close(results["per_example_norms"], norms, what="per_example_norms")
    factors = [ref_clip_factor(n, 1.0, 1e-6) for n in norms]
    for k, leaf in enumerate(stacked):
        exact, scale = ref_weighted_sum(list(leaf), factors)
        assert_rounded_once(results[f"clipped_sum[{k}]"], exact, scale, 18, what=f"clipped_sum[{k}]")
    assert results["add_noise_"].tobytes() == results["standard_normal"].tobytes(), "add_noise_"
    assert abs(results["add_noise_"].std() - 1.0) < 0.01
    for route, (a, g) in dense.items():
        assert_dense_close(results[f"dense_sq_norms {route}"], a, g, True)
    expected = ref_embedding_sq_norms(idx, dense["direct"][1])
    np.testing.assert_allclose(results["embedding_sq_norms"], expected, rtol=1e-12)
    assert_norms_close(results["sq_norms_from_per_example"], norms**2, what="sq_norms_from_per_example")


def _same_per_example_results(expected):
    """`per_example_results` here equal ``expected`` bit for bit (the parent's, made in parallel)."""
    for name, value in per_example_results().items():
        assert value.tobytes() == expected[name].tobytes(), f"{name} differs from the parent's"


def forks():
    """Children forked before and after this process started Numba's thread pool."""
    assert not _pool_started()

    def starts_its_own_pool():
        check(FORK_GROUPS[:1])
        assert _pool_started()

    assert _in_child(starts_its_own_pool) == 0, "a child forked before the pool started"
    check(FORK_GROUPS)  # the parallel kernels run here: the pool starts
    assert _pool_started()
    expected = per_example_results()
    check_per_example(expected)
    assert _in_child(lambda: check(FORK_GROUPS)) == 0, "a child forked after the pool started"
    assert _in_child(lambda: _same_per_example_results(expected)) == 0, "per-example functions in a forked child"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        done = pool.map_async(_check_one, FORK_GROUPS * 2).get(timeout=PROCESS_TIMEOUT // 2)
    assert done == FORK_GROUPS * 2
    check(FORK_GROUPS)  # and the parent's pool still works


def test_forked_children_and_a_fork_pool_after_a_parallel_kernel():
    status, output = _run_fresh(["forks"])
    assert status == 0, output
    assert output.strip().endswith("checked"), output


# ----------------------------------------------------------------------- threads


def test_eight_threads_at_once_on_million_element_leaves(rng):
    """Eight threads call the parallel paths at once; every result is checked afterwards."""
    threads = 8
    grads = [
        [random_values(1 << 20, dtype, rng), random_values(1000, dtype, rng)]
        for dtype in [np.float32, np.float64] * (threads // 2)
    ]
    barrier = threading.Barrier(threads, timeout=60)
    results = [None] * threads

    def work(i):
        g = grads[i]
        clipped, clamped, zeroed = ([x.copy() for x in g] for _ in range(3))
        zeroed[0][5] = np.nan
        barrier.wait()
        results[i] = {
            "norm": gc.grad_norm(g),  # one call (a plain list)
            "layer_norms": gc.layer_norms({"a": g[0], "b": g[1]}, 1.0),  # the general path
            "clip total": gc.clip_grad_norm_(clipped, 1.0),
            "finite": (gc.all_finite(g), gc.all_finite(zeroed)),
            "zeroed count": gc.zero_nonfinite_(zeroed),
            "clamp result": gc.clip_grad_value_(clamped, 0.5),
        }
        results[i].update(clipped=clipped, clamped=clamped, zeroed=zeroed)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in pool)
    for i, (g, got) in enumerate(zip(grads, results)):
        what = f"thread {i}"
        assert got is not None, f"{what} failed"
        assert_norm_close(got["norm"], ref_norm(g), what=f"{what} grad_norm")
        assert_norms_close(got["layer_norms"], ref_layer_norms(g, 1.0), what=f"{what} layer_norms")
        assert got["clip total"] == got["norm"], what
        _assert_leaves(got["clipped"], ref_clip_by_norm(g, 1.0, got["norm"]), f"{what} clip_grad_norm_")
        assert got["clamp result"] is None
        _assert_leaves(got["clamped"], [ref_clamp(x, 0.5) for x in g], f"{what} clip_grad_value_")
        assert got["finite"] == (True, False), what
        assert got["zeroed count"] == 1, what
        expected = [x.copy() for x in g]
        expected[0][5] = 0
        _assert_leaves(got["zeroed"], expected, f"{what} zero_nonfinite_")


def main():
    command, *args = sys.argv[1:]
    if command == "check":
        check(json.loads(args[0]))
    else:
        forks()
    print("checked")


if __name__ == "__main__":
    main()
