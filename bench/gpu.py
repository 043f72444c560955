"""GPU benchmarks and checks: host cost without a GPU, and correctness and speed on one.

``python bench/gpu.py --host`` (no GPU needed; ``make bench`` runs it): the host's cost
of ``clip_grad_norm_`` on W2 (GPT-2 small, 148 leaves), W4 (10,000 x 256) and W5
(100 x 10), float32, on the CUDA simulator's arrays with the kernels not run: every
launch is prepared and its arguments marshalled as on a GPU (numba-cuda's compiled
kernel and the driver's launch stubbed), and counted. Per call: microseconds on the
first call (the plan is made and uploaded) and on later ones (the plan is reused: the
median wall time, and the calling thread's median CPU time, which other jobs on a shared
machine do not inflate), launches, and arguments per launch.

``python bench/gpu.py --quick [--json PATH]`` (a machine with an NVIDIA GPU, CuPy and a
CUDA build of torch; ``make gpu-check`` runs it): one table of

- correctness on torch tensors of every dtype against the CPU path (bit for bit where
  one rounding is involved, norms within 1e-12), on the current stream of a side
  stream, and the interop probes (bfloat16, ``requires_grad``);
- W2, W4, W5 in float32: gradclip on CuPy arrays and on torch tensors against
  ``torch.nn.utils.clip_grad_norm_(foreach=True)`` and ``get_total_norm``, wall time per
  call with the host included (a synchronisation after each call), and GB/s against a
  device-to-device copy (``dst.copy_(src)``, read + write) of the same bytes;
- the cold start: the first ``clip_grad_norm_`` of a fresh process with an empty Numba
  cache (compiling), and of a second one (loading the kernels from the cache);
- a sweep of threads per block and blocks per multiprocessor on W2's norm.

Without a GPU, ``--quick`` prints one line and exits 0.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import gpt2_small_shapes  # noqa: E402

WORKLOADS = {
    "W2": ("GPT-2 small, 148 leaves", gpt2_small_shapes),
    "W4": ("10,000 x 256", lambda: [(256,)] * 10_000),
    "W5": ("100 x 10", lambda: [(10,)] * 100),
}


# ------------------------------------------------------------------ host cost


def host_cost(repeats):
    """Rows of the host-cost table (see the module docstring)."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import numpy as np
    from numba import cuda

    import gradclip
    from gradclip import _cuda

    class Stub:
        """A compiled kernel whose launch does nothing (the driver's call)."""

        def launch(self, stream, grid, threads, shared, args):
            widths.append(len(args))

    widths = []
    _cuda._compiled = lambda kernel, array_dtypes, scalar_types: Stub()

    def launch(self, kernel, grid, threads, arrays, values, types):
        _cuda._LAUNCHES.record(kernel)
        compiled, args = self.marshalled(kernel, arrays, values, types)
        compiled.launch(None, grid, threads, threads * 8, args)

    _cuda._Launcher.launch = launch
    rows = []
    for name, (title, shapes) in WORKLOADS.items():
        leaves = [cuda.to_device(np.ones(shape, np.float32)) for shape in shapes()]
        _cuda._LAUNCHES.names = names = []
        start = time.perf_counter()
        gradclip.clip_grad_norm_(leaves, 0.5)
        first = time.perf_counter() - start
        launches, arguments = len(names), max(widths)
        wall, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.thread_time()
            gradclip.clip_grad_norm_(leaves, 0.5)
            cpu.append(time.thread_time() - start_cpu)
            wall.append(time.perf_counter() - start)
        _cuda._LAUNCHES.names = None
        rows.append((name, title, first, statistics.median(wall), statistics.median(cpu), launches, arguments))
    return rows


def print_host(rows):
    print("host cost of clip_grad_norm_ (float32; kernels not run, launches marshalled and counted)")
    print(f"{'workload':<28} {'first call':>12} {'plan reused':>12} {'its CPU time':>13} {'launches':>9} {'args/launch':>12}")
    for name, title, first, reused, cpu, launches, arguments in rows:
        print(
            f"{name + ' ' + title:<28} {first * 1e6:>10.0f}us {reused * 1e6:>10.1f}us {cpu * 1e6:>11.1f}us"
            f" {launches:>9} {arguments:>12}"
        )


# -------------------------------------------------------------------- the GPU


def gpu_or_exit():
    try:
        import cupy
        import torch

        if cupy.cuda.runtime.getDeviceCount() > 0 and torch.cuda.is_available():
            return cupy, torch
    except Exception as error:  # no CuPy, no torch, no driver, no device: all mean "no GPU here"
        print(f"bench/gpu.py: no CUDA GPU available ({type(error).__name__}: {error}); skipped")
        sys.exit(0)
    print("bench/gpu.py: no CUDA GPU available; skipped")
    sys.exit(0)


def timed(torch, call, after=None, budget=1.0):
    """Median wall seconds per call, the host included, after one warm-up call."""
    call()
    if after:
        after()
    torch.cuda.synchronize()
    samples = []
    while len(samples) < 5 or (len(samples) < 50 and sum(samples) < budget):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
        if after:
            after()
    return statistics.median(samples)


def correctness(cupy, torch):
    """Rows: gradclip on torch tensors of every dtype against the CPU path on copies."""
    import numpy as np

    import gradclip

    rows = []
    rng = np.random.default_rng(7)
    shapes = [(5,), (257,), (33, 65), (3, 70000), (16385,), (2, 2), (), (0,)]
    for name in ("float16", "bfloat16", "float32", "float64", "complex64", "complex128"):
        dtype = getattr(torch, name)
        try:
            bases = [torch.from_numpy(rng.standard_normal(s)).to(dtype if not dtype.is_complex else torch.float64) for s in shapes]
            if dtype.is_complex:
                bases = [torch.complex(b, torch.from_numpy(rng.standard_normal(b.shape))).to(dtype) for b in bases]
            views = [lambda t: t, lambda t: t.T if t.dim() == 2 else t, lambda t: t[..., ::2] if t.dim() else t]
            cpu = [views[i % 3](b.clone()) for i, b in enumerate(bases)]
            gpu = [views[i % 3](b.clone().cuda()) for i, b in enumerate(bases)]
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                errors = []
                for p in (2.0, 1.0, math.inf, 3.0):
                    ref, got = gradclip.grad_norm(cpu, p), float(gradclip.grad_norm(gpu, p).item())
                    errors.append(abs(got - ref) / ref)
                layer_ref, layer = gradclip.layer_norms(cpu), gradclip.layer_norms(gpu).cpu().numpy()
                errors.append(float(np.max(np.abs(layer - layer_ref) / np.where(layer_ref, layer_ref, 1))))
                max_norm = 0.5 * gradclip.grad_norm(cpu)
                total = gradclip.clip_grad_norm_(gpu, max_norm)  # the device decides and scales
                gradclip.clip_grads_with_norm_(cpu, max_norm, float(total.item()))  # the CPU, by the same total
                if not dtype.is_complex:
                    gradclip.clip_grad_value_(gpu, 0.3)
                    gradclip.clip_grad_value_(cpu, 0.3)
                for t in (gpu[1], cpu[1]):
                    t.view(-1)[3] = float("nan") if not dtype.is_complex else complex(float("nan"), 1.0)
                changed = int(gradclip.zero_nonfinite_(gpu).item()), gradclip.zero_nonfinite_(cpu)
            torch.cuda.synchronize()
            as_bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
            same = all(torch.equal(as_bits(g.cpu()), as_bits(c)) for g, c in zip(gpu, cpu)) and changed[0] == changed[1]
            ok = max(errors) < 1e-12 and same
            rows.append((f"check torch {name}", f"norm rel.err {max(errors):.1e}", "bits equal" if same else "BITS DIFFER", "", "OK" if ok else "FAIL"))
        except Exception as error:
            rows.append((f"check torch {name}", f"{type(error).__name__}: {str(error)[:60]}", "", "", "ERROR"))
    return rows


def probes(torch):
    """The interop probes: a side stream busy before the gradient is written; bf16; requires_grad."""
    import gradclip

    rows = []
    try:
        g, a, s = torch.zeros(1 << 24, device="cuda"), torch.randn(8192, 8192, device="cuda"), torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            for _ in range(8):
                a = a @ a / 90.5  # work queued on s before g is written
            g.fill_(1.0)
            n = float(gradclip.grad_norm([g]).item())
        rows.append(("probe torch side stream", f"norm {n:.0f} (want 4096)", "", "", "OK" if n == 4096 else "RACE"))
    except Exception as error:
        rows.append(("probe torch side stream", f"{type(error).__name__}: {str(error)[:60]}", "", "", "ERROR"))
    for name, leaf, want in (
        ("torch bf16", torch.ones(4, device="cuda", dtype=torch.bfloat16), 2.0),
        ("torch requires_grad (read)", torch.ones(4, device="cuda", requires_grad=True), 2.0),
    ):
        try:
            n = float(gradclip.grad_norm([leaf]).item())
            rows.append((f"probe {name}", f"norm {n:.1f}", "", "", "OK" if n == want else "FAIL"))
        except Exception as error:
            rows.append((f"probe {name}", f"{type(error).__name__}: {str(error)[:60]}", "", "", "FAIL"))
    try:
        gradclip.clip_grad_norm_([torch.ones(4, device="cuda", requires_grad=True)], 1.0)
        rows.append(("probe torch requires_grad (write)", "written", "", "", "FAIL"))
    except ValueError as error:
        rows.append(("probe torch requires_grad (write)", f"refused: {str(error)[:40]}", "", "", "OK"))
    return rows


def speed(cupy, torch, workloads):
    """Rows: W2/W4/W5 norm and clip for each contender, with the copy probe's GB/s."""
    rows = []
    for name in workloads:
        rows += _speed_of(cupy, torch, name)
    return rows


def _speed_of(cupy, torch, name):
    import gradclip

    rows, results = [], {}
    tensors = [torch.randn(shape, device="cuda") for shape in WORKLOADS[name][1]()]
    arrays = [cupy.from_dlpack(t) for t in tensors]
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t
    nbytes = 4 * sum(t.numel() for t in tensors)
    m = 0.5 * float(torch.nn.utils.get_total_norm(tensors))  # halves every call; undone (untimed)
    src, dst = torch.empty(nbytes // 4, device="cuda"), torch.empty(nbytes // 4, device="cuda")
    copy = 2 * nbytes / timed(torch, lambda: dst.copy_(src))
    undo = lambda: torch._foreach_mul_(tensors, 2.0)  # noqa: E731
    runs = {
        "norm": (1, {
            "gradclip cupy": lambda: gradclip.grad_norm(arrays),
            "gradclip torch": lambda: gradclip.grad_norm(tensors),
            "torch foreach": lambda: torch.nn.utils.get_total_norm(tensors, foreach=True),
        }),
        "clip": (3, {
            "gradclip cupy": lambda: gradclip.clip_grad_norm_(arrays, m),
            "gradclip torch": lambda: gradclip.clip_grad_norm_(tensors, m),
            "torch foreach": lambda: torch.nn.utils.clip_grad_norm_(params, m, foreach=True),
        }),
    }
    for op, (passes, contenders) in runs.items():
        for who, call in contenders.items():
            try:
                seconds = timed(torch, call, undo if op == "clip" else None)
                gbs = passes * nbytes / seconds
                results[f"{op} {who}"] = seconds
                rows.append((f"{name} {op}", who, f"{seconds * 1e3:.3f} ms", f"{gbs / 1e9:.0f} GB/s", f"{gbs / copy:.0%} of copy"))
            except Exception as error:
                rows.append((f"{name} {op}", who, f"{type(error).__name__}: {str(error)[:40]}", "", "ERROR"))
        ours, theirs = results.get(f"{op} gradclip torch"), results.get(f"{op} torch foreach")
        if ours and theirs:
            rows.append((f"{name} {op}", "gradclip torch vs torch foreach", f"{theirs / ours:.2f}x", "", ""))
    return rows


COLD = """
import time, torch, gradclip
g = [torch.randn(1 << 20, device="cuda") for _ in range(4)]
torch.cuda.synchronize()
start = time.perf_counter()
gradclip.clip_grad_norm_(g, 1.0)
torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


def cold_start():
    """Rows: the first clip of a fresh process, with an empty Numba cache and then with it filled."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for what in ("empty cache (compiles)", "cache filled (loads)"):
            done = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, env=env, timeout=300)
            if done.returncode:
                rows.append(("first clip_grad_norm_", what, done.stderr.strip().splitlines()[-1][:60], "", "ERROR"))
            else:
                rows.append(("first clip_grad_norm_", what, f"{float(done.stdout.split()[-1]):.2f} s", "", ""))
    return rows


def sweep(torch):
    """Rows: W2's norm for threads per block x blocks per multiprocessor."""
    import gradclip
    from gradclip import _cuda
    from gradclip._kernels import cuda as kernels

    tensors = [torch.randn(shape, device="cuda") for shape in gpt2_small_shapes()]
    nbytes = 4 * sum(t.numel() for t in tensors)
    rows = []
    defaults = kernels.THREADS_PER_BLOCK, kernels.BLOCKS_PER_SM
    for threads in (128, 256, 512):
        for blocks in (4, 8, 16):
            kernels.THREADS_PER_BLOCK, kernels.BLOCKS_PER_SM = threads, blocks
            _cuda._PLANS.clear()
            seconds = timed(torch, lambda: gradclip.grad_norm(tensors))
            rows.append(("sweep W2 norm", f"{threads} threads x {blocks} blocks/SM", f"{seconds * 1e3:.3f} ms", f"{nbytes / seconds / 1e9:.0f} GB/s", ""))
    kernels.THREADS_PER_BLOCK, kernels.BLOCKS_PER_SM = defaults
    _cuda._PLANS.clear()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="store_true", help="host cost without a GPU")
    parser.add_argument("--quick", action="store_true", help="correctness, speed and cold start on a GPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.host:
        print_host(host_cost(args.repeats))
        return
    cupy, torch = gpu_or_exit()
    device = torch.cuda.get_device_properties(0)
    rows = [("device", device.name, f"{device.multi_processor_count} SMs", f"torch {torch.__version__}", f"cupy {cupy.__version__}")]
    sections = [lambda: correctness(cupy, torch), lambda: probes(torch), lambda: speed(cupy, torch, WORKLOADS)]
    if args.quick:
        sections += [cold_start, lambda: sweep(torch)]
    for section in sections:
        try:
            rows += section()
        except Exception as error:
            rows.append(("section", getattr(section, "__name__", "?"), f"{type(error).__name__}: {str(error)[:60]}", "", "ERROR"))
        print("\n".join(f"{r[0]:<34} {r[1]:<40} {r[2]:<14} {r[3]:<12} {r[4]}" for r in rows), flush=True)
        printed, rows = rows, []
        if args.json:
            existing = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else []
            Path(args.json).write_text(json.dumps(existing + [list(r) for r in printed], indent=1))


if __name__ == "__main__":
    main()
