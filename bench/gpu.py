"""GPU microbenchmarks: gradclip on CuPy arrays vs a CuPy loop vs torch CUDA ``clip_grad_norm_``.

Run ``.venv/bin/python bench/gpu.py [--quick] [--repeats N]`` on a machine with an NVIDIA
GPU and ``pip install -e '.[cuda,torch]'`` (a CUDA build of torch). Without a GPU it
prints one line and exits 0.

Workloads W1-W5 of ``workloads.py`` in float32 and float16 (CuPy has no bfloat16;
the strided variants are left out), copied to the device once. For each workload:
the copy probe (``cupy.copyto`` between two buffers of the workload's bytes: read +
write), then ``grad_norm`` and ``clip_grad_norm_`` for each contender on the same
device memory. A sample is the mean of ``inner`` calls between two stream
synchronisations; the table shows the median over repeats, GB/s (gradient bytes,
x2 for clipping, which reads for the norm then reads and writes) and the fraction
of the probe's GB/s. In-place clipping is undone (untimed) after every call.
"""

import argparse
import statistics
import sys
import time

from workloads import CLIP_TO, all_workloads, reference_norm

INNER = 20


def gpu_or_exit():
    """CuPy with at least one device, or print why not and exit 0."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception as error:  # no CuPy, no driver, no device: all mean "no GPU here"
        print(f"bench/gpu.py: no CUDA GPU available ({type(error).__name__}: {error}); skipped")
        sys.exit(0)
    print("bench/gpu.py: no CUDA GPU available; skipped")
    sys.exit(0)


def contenders(cupy):
    import gradclip

    def cupy_norm(leaves):
        return cupy.sqrt(sum((g.astype(cupy.float64) ** 2).sum() for g in leaves))

    def cupy_clip(leaves, max_norm):
        total = cupy_norm(leaves)
        coef = cupy.minimum(max_norm / (total + 1e-6), 1.0)
        for g in leaves:
            g *= coef.astype(g.dtype)
        return total

    found = {
        "gradclip": (gradclip.grad_norm, lambda leaves, m: gradclip.clip_grad_norm_(leaves, m)),
        "cupy loop": (cupy_norm, cupy_clip),
    }
    try:
        import torch

        if torch.cuda.is_available():

            def as_parameters(leaves):
                """Parameters whose ``.grad`` shares the leaves' memory (as torch reads them)."""
                parameters = []
                for g in leaves:
                    parameter = torch.nn.Parameter(torch.empty(g.shape, dtype=torch.float32, device="cuda"))
                    parameter.grad = torch.as_tensor(g, device="cuda")
                    parameters.append(parameter)
                return parameters

            found["torch"] = (
                lambda parameters: torch.nn.utils.get_total_norm([p.grad for p in parameters]),
                lambda parameters, max_norm: torch.nn.utils.clip_grad_norm_(parameters, max_norm),
                as_parameters,
            )
    except ImportError:
        print("torch is not installed: no torch column", file=sys.stderr)
    return found


def timed(cupy, call, arg, inner, after=None):
    """Seconds per call: ``inner`` calls between stream synchronisations (``after`` untimed)."""
    stream = cupy.cuda.get_current_stream()
    total = 0.0
    for _ in range(inner):
        stream.synchronize()
        start = time.perf_counter()
        call(arg)
        stream.synchronize()
        total += time.perf_counter() - start
        if after is not None:
            after()
    return total / inner


def copy_probe(cupy, nbytes, repeats):
    """GB/s (read + write) of ``cupy.copyto`` between two buffers of ``nbytes``."""
    src = cupy.empty(nbytes, cupy.uint8)
    dst = cupy.empty_like(src)
    seconds = statistics.median(timed(cupy, lambda _: cupy.copyto(dst, src), None, INNER) for _ in range(repeats))
    return 2 * nbytes / seconds / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller W1, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    cupy = gpu_or_exit()
    repeats = args.repeats or (3 if args.quick else 7)
    racers = contenders(cupy)
    device = cupy.cuda.Device()
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(device.id)['name'].decode()}")
    print(f"{'workload':<34} {'operation':<16} {'contender':<10} {'median':>10} {'GB/s':>8} {'of copy':>8}")
    for workload in all_workloads(args.quick):
        if workload.strided or workload.dtype_name == "bfloat16":
            continue
        host = workload.build().first().arrays
        leaves = [cupy.asarray(a) for a in host]
        pristine = [g.copy() for g in leaves]
        expected = reference_norm(host)
        copy_gbps = copy_probe(cupy, workload.nbytes, repeats)

        def restore():
            for g, p in zip(leaves, pristine):
                g[...] = p

        for name, (norm, clip, *wrap) in racers.items():
            handle = wrap[0](leaves) if wrap else leaves
            got = float(norm(handle))
            error = abs(got - expected) / expected
            for op, call, passes, after in (
                ("grad_norm", lambda h: norm(h), 1, None),
                ("clip_grad_norm_", lambda h: clip(h, CLIP_TO * expected), 2, restore),
            ):
                call(handle)  # warm up: compile, allocate
                if after:
                    after()
                median = statistics.median(timed(cupy, call, handle, INNER, after) for _ in range(repeats))
                gbps = passes * workload.nbytes / median / 1e9
                print(
                    f"{workload.name + ' ' + workload.title:<34} {op:<16} {name:<10} "
                    f"{median * 1e3:>8.3f}ms {gbps:>8.1f} {gbps / copy_gbps:>7.0%}"
                    + (f"  norm error {error:.1e}" if op == "grad_norm" else "")
                )
    print(f"copy probe: cupy.copyto, GB/s of read + write bytes; {INNER} calls per sample, median of {repeats}")


if __name__ == "__main__":
    main()
