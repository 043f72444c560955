"""Compile every CUDA kernel for one compute capability, without a GPU; print a JSON report.

``python tests/ptx.py 9.0 OUTDIR`` (run by test_cuda_ptx.py in a fresh process, since the
simulator is chosen when ``numba.cuda`` is first imported): each kernel of every kernel
set, for every element type, goes to PTX through NVIDIA's NVVM (``cuda.compile_ptx``) and
to SASS through ptxas (``-v``, whose register and spill counts are parsed). Device
functions compile for the current device's capability, so the script names one.
"""

import json
import os
import re
import subprocess
import sys
import types as pytypes
from pathlib import Path

DTYPES = ["float16", "bfloat16", "float32", "float64", "complex64", "complex128"]
ACCUMULATORS = {"float16": ["float32", "float64"], "bfloat16": ["float32", "float64"], "complex64": ["complex64", "complex128"]}
"""The accumulator dtypes compiled for leaves of each dtype (their own and the widest otherwise)."""


def jobs():
    """``(name, kernel, signature)`` for every kernel the library launches."""
    import ml_dtypes
    import numpy as np
    from numba.cuda import types
    from numba.cuda.np.numpy_support import from_dtype

    from gradclip._kernels import cuda as kernels
    from gradclip._kernels import private_cuda

    def array(dtype):
        return types.Array(from_dtype(np.dtype(dtype)), 1, "C")

    def element(dtype):
        """The type a leaf of ``dtype`` travels as (bfloat16 as its int16 bits)."""
        return np.dtype(np.int16) if dtype.name == "bfloat16" else dtype

    def pass_signature(data, out=np.float64):
        return (array(data), array(out), array(np.int64), array(np.float64), types.int64, types.float64, types.float64, types.float64)

    i64, f64 = types.int64, types.float64
    keys = (i64,) * 5  # the noise key, packed
    plan = (array(np.int64), array(np.float64))  # the table and scratch the private kernels take first
    for dtype in (np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name) for name in DTYPES):
        kernel_set = kernels.kernels_for(dtype)
        for name, kernel in vars(kernel_set).items():
            if hasattr(kernel, "py_func"):
                out = element(dtype) if name == "copy_cuda" else np.float64
                yield f"{name}[{dtype.name}]", kernel, pass_signature(element(dtype), out)
        private = private_cuda.private_kernels_for(dtype)
        data = array(element(dtype))
        yield f"clip_cells_cuda_[{dtype.name}]", private.clip_cells_cuda_, pass_signature(element(dtype))
        yield f"clip_copy_cuda[{dtype.name}]", private.clip_copy_cuda, pass_signature(element(dtype), element(dtype))
        sum_signature = (*plan, data, data, array(np.int64), i64, i64, i64, i64, f64, f64, i64, *keys)
        yield f"weighted_sum_cuda[{dtype.name}]", private.weighted_sum_cuda, sum_signature
        noise_signature = (*plan, data, array(np.int64), i64, f64, f64, i64, *keys)
        yield f"add_noise_cuda_[{dtype.name}]", private.add_noise_cuda_, noise_signature
        for accumulator in map(np.dtype, ACCUMULATORS.get(dtype.name, [dtype.name, "float64" if dtype.kind == "f" else "complex128"])):
            kernel = kernels.accumulate_for(dtype, accumulator)
            yield f"accumulate_cuda_[{dtype.name}->{accumulator.name}]", kernel, pass_signature(element(dtype), element(accumulator))
    signature = (array(np.int64), array(np.float64), array(np.float64), types.int64, types.float64, types.int64)
    yield "finish_cuda", kernels.finish_cuda, signature
    signature = (*plan, array(np.float64), array(np.float64), i64, i64, i64, f64, f64, f64, i64)
    yield "fold_examples_cuda", private_cuda.fold_examples_cuda, signature


def ptxas():
    import nvidia.cuda_nvcc

    return str(Path(nvidia.cuda_nvcc.__path__[0]) / "bin" / "ptxas")


def main(cc_text, outdir):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # before numba.cuda is first imported
    import numba.cuda.dispatcher
    from numba import cuda

    cc = tuple(int(x) for x in cc_text.split("."))
    numba.cuda.dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)
    outdir = Path(outdir)
    report = []
    for name, kernel, signature in jobs():
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
        path = outdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.sm{cc[0]}{cc[1]}.ptx"
        path.write_text(ptx)
        assembled = subprocess.run(
            [ptxas(), f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(path), "-o", str(path.with_suffix(".cubin"))],
            capture_output=True, text=True, check=True,
        ).stderr
        numbers = lambda pattern: [int(n) for n in re.findall(pattern, assembled)]  # noqa: E731
        report.append({
            "kernel": name,
            "registers": max(numbers(r"Used (\d+) registers")),
            "spill_bytes": sum(numbers(r"(\d+) bytes spill stores")) + sum(numbers(r"(\d+) bytes spill loads")),
            "stack_bytes": max(numbers(r"(\d+) bytes stack frame")),
            "float_atomics": sorted(set(re.findall(r"\b(?:atom|red)\.[\w.]*\.(?:f16|bf16|f32|f64)\b", ptx))),
            "f16_stores": sorted(set(re.findall(r"cvt\.rn\.f16\.f\d\d", ptx))),
        })
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
