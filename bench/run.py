"""gradclip microbenchmarks: gradclip vs NumPy vs PyTorch, held against a bandwidth probe.

Run ``make bench`` (``BENCH_ARGS="--quick"`` etc.) or ``.venv/bin/python bench/run.py``::

    --quick          W1 at 16M elements, 3 repeats for the big workloads, and the
                     others stop after 3 once an operation has taken QUICK_BUDGET_S
    --only W2,W4     only these workloads or families (W2 = W2, W2-bf16, W2-fp16;
                     WD = the private-training workloads WD1-WD3 and WN; G1..G3 or
                     "ghost": the ghost-norm rows against Opacus, ghost.py)
    --repeats N      repeats for every workload (default 7; see --quick)
    --markdown       print GitHub-markdown tables instead of fixed-width ones
    --plot PATH      bar chart of GB/s (needs matplotlib)
    --no-cold-start  skip the import / first-call / compile timings

For each workload: the probe (``probe.py``) over the same number of bytes, then
each operation with its contenders interleaved (``timing.py``), on the same
arrays. Before timing, every contender is warmed up and checked: the norm it
returns against a float64 reference, and that its clip really changed the
NumPy data. ``clip_grad_norm_`` gets ``max_norm`` = half the total norm,
``clip_grad_value_`` a bound of 1 (see ``workloads.py``); in-place operations
are undone (from a pristine copy, untimed) after every call, so every call
clips the same data.

Threads: Numba and torch use their defaults (all cores). On a busy machine
their parallel launches wait for a free core; the tables then say so, and
``NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1`` gives a single-thread comparison.

Private training (WD1-WD3, WN; ``--only WD``): the sum of clipped per-example
gradients against Opacus and optax, a DP-FedAvg round against Flower, and noise
added in place against NumPy, torch (Opacus' noise) and Flower, each held against
the probe (two read passes; the read+write pass for the noise); see
``measure_private_workload``.

Figures per (workload, operation, contender): median and min seconds per call;
GB/s = gradient bytes x (2 for the clipping operations, which write, else 1) /
median, and for ``accumulate`` (``GradAccumulator.step`` against ``buf += g``)
the gradients read plus the buffers read and written; "of limit" = the probe's
time for the same passes / median (read pass for grad_norm and all_finite, read
+ read-write passes for clip_grad_norm_, the read-write pass for
clip_grad_value_, a single pass; accumulate's bytes at the probe's read-write
rate); ns per leaf; gradclip's
speed-up over torch foreach=True; the norm's relative error. Tables go to
stdout, progress to stderr, every figure to ``bench/results/<UTC time>.json``.
"""

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import time

import gradclip
import numba
import numpy as np

import report
from coldstart import measure_cold_start
from contenders import (
    EPS,
    OPS,
    TORCH_BFLOAT16_NOTE,
    WRITING_OPS,
    accumulator_dtype,
    all_contenders,
    private_contenders,
)
from probe import measure_probe
from timing import Timed, measure_interleaved
from workloads import (
    CLIP_TO,
    CLIP_VALUE,
    NOISE_STD,
    PRIVATE_NOISE_MULTIPLIER,
    all_workloads,
    private_workloads,
    reference_clipped_sum,
    reference_example_norms,
    reference_norm,
)

import ghost  # ghost norms against Opacus (issue 16): their own workloads, table and record entry

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
TORCH_REFERENCE = "torch foreach=True"

PROBE_LIMIT = {  # which probe time bounds each operation from below
    "grad_norm": "read_s",
    "all_finite": "read_s",
    "clip_grad_norm_": "two_pass_s",
    "clip_grad_value_": "read_write_s",
    "accumulate": "read_write_gbps",  # at the probe's read+write rate, for its own traffic
}
QUICK_BUDGET_S = 2.0
"""With --quick, an operation stops repeating after this many seconds (3 repeats at least)."""
CHECK_SAMPLE = 4096
"""Elements of the largest leaf compared before and after a warm-up clip."""
NORM_TOLERANCE = 1e-2
"""A relative norm error above this flags a contender as broken (below, it is just reported)."""

_START = time.perf_counter()


def progress(message):
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="W1 at 16M, 3 repeats for big workloads, a time budget per operation"
    )
    parser.add_argument("--only", default="", help="comma-separated workloads or families, e.g. W2,W4")
    parser.add_argument("--repeats", type=int, help="repeats for every workload")
    parser.add_argument("--markdown", action="store_true", help="GitHub-markdown tables on stdout")
    parser.add_argument("--plot", metavar="PATH", help="save a bar chart of GB/s to PATH")
    parser.add_argument("--no-cold-start", action="store_true", help="skip the cold-start subprocesses")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return parser, args


def selected_workloads(parser, args):
    """``(workloads, private workloads, ghost workloads)`` selected by ``--only``."""
    tokens = {token.strip().lower() for token in args.only.split(",") if token.strip()}
    workloads, private = all_workloads(args.quick), private_workloads()
    known = {name for w in workloads + private for name in (w.name.lower(), w.family.lower())} | ghost.names()
    if tokens - known:
        parser.error(f"unknown workload(s) {sorted(tokens - known)}; choose from {sorted(known)}")
    return (
        [w for w in workloads if w.selected_by(tokens)],
        [w for w in private if w.selected_by(tokens)],
        ghost.selected(tokens or {"ghost"}),
    )


def repeats_for(workload, args):
    if args.repeats is not None:
        return args.repeats
    return 3 if args.quick and workload.big else 7


# ---------------------------------------------------------------- checks


def _sample_of_largest_leaf(arrays):
    largest = max(arrays, key=lambda a: a.size)
    return np.asarray(largest.flat[:CHECK_SAMPLE], dtype=np.float64)


def warm_up_and_check(op, contender, handle, gradient_set, reference, arguments):
    """Run ``op`` untimed (compiling whatever it needs); returns ``(relative error or None, problems)``.

    A returned norm is compared with ``reference``; a clip must have changed the
    sample of the largest leaf as the contender's own norm says it should. The
    data is restored afterwards.
    """
    method = getattr(contender, op)
    problems = []
    relative_error = None
    rounding = 1e-2 if gradient_set.arrays[0].dtype.itemsize < 4 else 1e-5  # of one product, 16-bit: coarse
    before = _sample_of_largest_leaf(gradient_set.pristine)
    if op == "grad_norm":
        relative_error = abs(method(handle) - reference) / reference
    elif op == "all_finite":
        if not method(handle):
            problems.append("all_finite said False on finite data")
    elif op == "clip_grad_norm_":
        total = method(handle, *arguments)  # the norm before clipping
        relative_error = abs(total - reference) / reference
        expected = before * (arguments[0] / (total + EPS))
        if not np.allclose(_sample_of_largest_leaf(gradient_set.arrays), expected, rtol=rounding, atol=0):
            problems.append("clip_grad_norm_ did not scale the NumPy data as expected")
    elif op == "accumulate":
        method(handle, *arguments)  # adds into the contender's buffers; the grads are only read
    else:
        method(handle, *arguments)
        expected = np.clip(before, -CLIP_VALUE, CLIP_VALUE)
        if not np.allclose(_sample_of_largest_leaf(gradient_set.arrays), expected, rtol=rounding, atol=0):
            problems.append("clip_grad_value_ did not clamp the NumPy data as expected")
    if relative_error is not None and relative_error > NORM_TOLERANCE:
        problems.append(f"{op} is off by {relative_error:.1e} (relative)")
    gradient_set.restore()
    return relative_error, problems


# --------------------------------------------------------------- timing


def timed_call(op, contender, source, handles, arguments):
    """A ``Timed`` running ``op(handle, *arguments)`` of ``contender`` on the gradients ``source`` hands out."""
    method = getattr(contender, op)

    def prepare():
        gradient_set = source.next()
        if source.fresh:  # new array objects: the contender wraps them anew, untimed
            return gradient_set, contender.prepare(gradient_set.arrays, previous=handles[contender.name])
        return gradient_set, handles[contender.name]

    def call(prepared):
        return method(prepared[1], *arguments)

    if op in WRITING_OPS:
        return Timed(contender.name, call, prepare, finish=lambda prepared: prepared[0].restore())
    return Timed(contender.name, call, prepare)


def traffic_bytes(workload, op):
    """Bytes an operation moves: the grads read (and written, by the clips); accumulation
    also reads and writes its buffers."""
    if op == "accumulate":
        widening = accumulator_dtype(workload.dtype).itemsize / workload.dtype.itemsize
        return workload.nbytes * (1 + 2 * widening)
    return workload.nbytes * (2 if op in WRITING_OPS else 1)


def figures(workload, op, samples, probe, relative_error, problems):
    median = samples.median
    traffic = traffic_bytes(workload, op)
    limit_s = traffic / (probe["read_write_gbps"] * 1e9) if op == "accumulate" else probe[PROBE_LIMIT[op]]
    return {
        "median_s": median,
        "min_s": samples.min,
        "samples_s": samples.seconds,
        "calls_per_sample": samples.inner,
        "gbps": traffic / median / 1e9,
        "of_limit": limit_s / median,
        "ns_per_leaf": median / workload.leaves * 1e9,
        "relative_error": relative_error,
        "problems": problems,
    }


def measure_workload(workload, contenders, repeats, budget_s):
    """Every figure of one workload; its arrays are freed on return."""
    label = f"{workload.name} ({workload.title}, {workload.dtype_name}, {workload.nbytes / 1e6:.1f} MB)"
    progress(f"{label}: probe, {repeats} repeats")
    probe = measure_probe(workload.nbytes, repeats)
    progress(f"{label}: building {workload.leaves} leaves")
    source = workload.build()
    reference = reference_norm(source.first.arrays)
    arguments = {
        "grad_norm": (),
        "all_finite": (),
        "clip_grad_norm_": (CLIP_TO * reference,),
        "clip_grad_value_": (CLIP_VALUE,),
        "accumulate": (),
    }
    handles, operations = {}, {}
    for op in OPS:
        racing = [c for c in contenders if op in c.ops]
        # (Re)bind every contender to the first set: timing a fresh workload leaves them on another.
        handles = {c.name: c.prepare(source.first.arrays, previous=handles.get(c.name)) for c in racing}
        progress(f"{label}: {op}, {len(racing)} contenders x {repeats} repeats")
        checks = {
            c.name: warm_up_and_check(op, c, handles[c.name], source.first, reference, arguments[op]) for c in racing
        }
        for name, (_, problems) in checks.items():
            for problem in problems:
                progress(f"  WARNING {workload.name} {name}: {problem}")
        items = [timed_call(op, c, source, handles, arguments[op]) for c in racing]
        samples = measure_interleaved(items, repeats, budget_s)
        rows = {c.name: figures(workload, op, samples[c.name], probe, *checks[c.name]) for c in racing}
        torch_row = rows.get(TORCH_REFERENCE)
        for name, row in rows.items():
            if torch_row and name.startswith("gradclip"):  # on NumPy arrays, and through gradclip.torch
                row["speedup_vs_torch_foreach"] = torch_row["median_s"] / row["median_s"]
        operations[op] = rows
    return {
        "name": workload.name,
        "title": workload.title,
        "dtype": workload.dtype_name,
        "leaves": workload.leaves,
        "elements": workload.elements,
        "bytes": workload.nbytes,
        "strided": workload.strided,
        "fresh_arrays": workload.fresh,
        "repeats": repeats,
        "reference_norm": reference,
        "max_norm": arguments["clip_grad_norm_"][0],
        "clip_value": CLIP_VALUE,
        "probe": probe,
        "operations": operations,
    }


# ---------------------------------------------------------- private training
# WD1, WD2: the sum of clipped per-example gradients (no noise; Opacus adds its noise in
# another step); WD3: a DP-FedAvg round (clip each client's update, average, add noise);
# WN: noise added in place. The limit is two read passes of the probe for the sums (the
# norms, then the weighted sum, which writes only the result) and its read+write pass for
# the noise. Each contender is checked once before timing: its sum (WD3: without noise)
# against a float64 one with its own clip factor, its per-example norms if it returns
# them, and (WN) the std of the noise it added.

PRIVATE_LIMIT = {"clipped_sum": "two_reads", "dp_fedavg": "two_reads", "add_noise_": "read_write_s"}


def _private_op(workload):
    return {"stacked": "clipped_sum", "examples": "dp_fedavg", "noise": "add_noise_"}[workload.form]


def _largest_error(got, expected):
    """The largest error of ``got`` (arrays) against ``expected``, relative to the largest |value|."""
    worst = max(float(np.max(np.abs(e))) for e in expected) or 1.0
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - e))) for g, e in zip(got, expected)) / worst


def check_private(op, contender, handle, batch, workload, reference, max_norm):
    """``(norm error, sum or noise error)`` of one untimed call, on a copy where it writes."""
    if op == "add_noise_":
        largest = max(range(len(batch)), key=lambda k: batch[k].size)
        before = batch[largest].astype(np.float64)
        contender.add_noise_(handle, NOISE_STD)
        observed = float(np.std(batch[largest].astype(np.float64) - before)) / NOISE_STD
        return None, abs(observed - 1.0)
    stacked = workload.form == "stacked"
    if op == "clipped_sum":
        sums, norms = contender.clipped_sum(handle, max_norm)
    else:
        sums, norms = contender.dp_fedavg(handle, max_norm, 0.0)
    eps = contender.eps if op == "clipped_sum" else 0.0
    factors = np.minimum(1.0, max_norm / (reference + eps))
    expected = reference_clipped_sum(batch, stacked, factors)
    if op == "dp_fedavg":
        expected = [e / workload.examples for e in expected]
    norm_error = None if norms is None else float(np.max(np.abs(norms - reference) / reference))
    return norm_error, _largest_error(sums, expected)


def private_memory(op, contender, handle, max_norm):
    """gradclip's peak traced allocation over one call, and the result's bytes."""
    import tracemalloc

    tracemalloc.start()
    try:
        result, _ = contender.clipped_sum(handle, max_norm) if op == "clipped_sum" else contender.dp_fedavg(
            handle, max_norm, PRIVATE_NOISE_MULTIPLIER
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"peak_bytes": peak, "result_bytes": sum(np.asarray(r).nbytes for r in result)}


def measure_private_workload(workload, contenders, repeats, budget_s):
    """Every figure of one private-training workload; its arrays are freed on return."""
    op = _private_op(workload)
    racing = [c for c in contenders if op in c.ops]
    label = f"{workload.name} ({workload.title}, {workload.nbytes / 1e6:.1f} MB)"
    progress(f"{label}: probe, {repeats} repeats")
    probe = measure_probe(workload.nbytes, repeats)
    progress(f"{label}: building")
    batch = workload.build()
    arrays = batch[0] if workload.form == "noise" else batch
    handles = {c.name: c.prepare(arrays, workload.form) for c in racing}
    reference, max_norm, arguments = None, None, (NOISE_STD,)
    if op != "add_noise_":
        progress(f"{label}: float64 references")
        reference = reference_example_norms(batch, workload.form == "stacked")
        max_norm = float(np.median(reference))
        arguments = (max_norm,) if op == "clipped_sum" else (max_norm, PRIVATE_NOISE_MULTIPLIER)
    progress(f"{label}: {op}, {len(racing)} contenders x {repeats} repeats")
    checks = {c.name: check_private(op, c, handles[c.name], arrays, workload, reference, max_norm) for c in racing}
    items = [Timed(c.name, lambda _, c=c: getattr(c, op)(handles[c.name], *arguments)) for c in racing]
    samples = measure_interleaved(items, repeats, budget_s)
    limit_s = 2 * probe["read_s"] if PRIVATE_LIMIT[op] == "two_reads" else probe[PRIVATE_LIMIT[op]]
    ours = samples["gradclip"].median
    rows = {}
    for c in racing:
        median = samples[c.name].median
        rows[c.name] = {
            "median_s": median,
            "min_s": samples[c.name].min,
            "samples_s": samples[c.name].seconds,
            "of_limit": limit_s / median,
            "gbps": 2 * workload.nbytes / median / 1e9,  # two reads, or a read and a write
            "samples_per_s": workload.elements / median if op == "add_noise_" else None,
            "gradclip_speedup": median / ours,
            "norm_error": checks[c.name][0],
            "error": checks[c.name][1],
        }
    memory = None
    if op != "add_noise_":
        gradclip_contender = next(c for c in racing if c.name == "gradclip")
        memory = private_memory(op, gradclip_contender, handles["gradclip"], max_norm)
    return {
        "name": workload.name,
        "title": workload.title,
        "operation": op,
        "examples": workload.examples,
        "leaves": workload.leaves,
        "elements": workload.elements,
        "bytes": workload.nbytes,
        "repeats": repeats,
        "max_norm": max_norm,
        "noise_multiplier": PRIVATE_NOISE_MULTIPLIER if op == "dp_fedavg" else None,
        "noise_std": NOISE_STD if op == "add_noise_" else None,
        "probe": probe,
        "limit_s": limit_s,
        "memory": memory,
        "rows": rows,
    }


# ------------------------------------------------------------- machine


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision():
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def machine_info(git_revision, load_at_start):
    """What the run ran on; ``numba_threading_layer`` is known once a parallel kernel ran."""
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "gradclip": gradclip.__version__,
        "git": git_revision,
        "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS,
        "NUMBA_NUM_THREADS_env": os.environ.get("NUMBA_NUM_THREADS"),
        "numba_threading_layer": numba.threading_layer(),
        "torch": None,
        "torch_threads": None,
        "load_average_at_start": load_at_start,
        "load_average": os.getloadavg(),
    }
    if sys.modules.get("torch") is not None:
        torch = sys.modules["torch"]
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


def main(argv=None):
    parser, args = parse_args(argv)
    workloads, private, ghost_workloads = selected_workloads(parser, args)
    contenders, torch_note = all_contenders()
    if torch_note:
        progress(torch_note)
    privates, private_notes = private_contenders() if private else ([], [])
    for note in private_notes:
        progress(note)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = os.getloadavg()
    git_revision = _git_revision()  # of the gradclip imported now, should the tree change during the run
    budget_s = QUICK_BUDGET_S if args.quick else math.inf
    results = [measure_workload(w, contenders, repeats_for(w, args), budget_s) for w in workloads]
    private_results = [
        measure_private_workload(w, privates, args.repeats or (3 if args.quick else 7), budget_s) for w in private
    ]
    ghost_repeats = args.repeats or (ghost.QUICK_REPEATS if args.quick else ghost.REPEATS)
    ghost_results = [ghost.measure(w, ghost_repeats, progress) for w in ghost_workloads]
    cold_start, cold_start_failure = None, None
    if not args.no_cold_start:
        progress("cold start: fresh interpreters")
        try:
            cold_start = measure_cold_start(runs=2 if args.quick else 9, compile_runs=1 if args.quick else 3)
        except RuntimeError as error:  # keep the figures measured so far
            cold_start_failure = f"Cold start not measured: {error}"
            progress(cold_start_failure)
    notes = [note for note in (torch_note, *private_notes, cold_start_failure) if note]
    if not torch_note and any(w.dtype_name == "bfloat16" for w in workloads):
        notes.append(TORCH_BFLOAT16_NOTE)
    cpus = os.cpu_count() or 1
    if load_at_start[0] >= cpus / 2:
        notes.append(
            f"The machine was busy before the run (1-minute load average {load_at_start[0]:.1f} on {cpus} CPUs): "
            "multi-threaded launches (Numba's, torch's OpenMP) wait for a free core, so gradclip and torch read "
            "slower than on a quiet machine, numpy (one thread) less so."
        )
    record = {
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - _START,
        "arguments": vars(args),
        "settings": {
            "max_norm": f"{CLIP_TO} x the workload's total norm",
            "clip_value": CLIP_VALUE,
            "contenders": [c.name for c in contenders],
        },
        "notes": notes,
        "machine": machine_info(git_revision, load_at_start),
        "workloads": results,
        "private": private_results,
        "cold_start": cold_start,
        "ghost": ghost_results,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, started.strftime("%Y%m%dT%H%M%SZ") + ".json")
    report.write_json(record, path)
    if results or private_results or not ghost_results:
        print(report.render(record, markdown=args.markdown))
    else:
        print(report.machine_summary(record))
    if ghost_results:
        print("\n" + ghost.render(ghost_results, markdown=args.markdown))
    if args.plot:
        print(report.plot(record, args.plot))
    progress(f"done; every figure is in {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
