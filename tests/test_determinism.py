"""Determinism (SPEC §4): bit-identical results across repeated calls and across
NUMBA_NUM_THREADS=1 and =2. The workload is large enough for the parallel kernels
(> 4 million float32 elements in a few leaves) plus many small leaves of mixed dtypes.

The subprocesses import this module and run ``main()``, which prints a fingerprint:
the repr of every returned norm and a hash of every result array's bytes.
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np

import gradclip as gc
from reference import BFLOAT16


def workload():
    rng = np.random.default_rng(20240611)
    big = [
        (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
        for n in (2_500_001, 1_000_003, 600_017)
    ]
    big.append(rng.standard_normal((700, 1001)).astype(np.float32)[:, ::2])  # strided
    big.append(rng.standard_normal(1_500_007))  # float64
    small_dtypes = [np.float32, np.float64, np.float16, BFLOAT16, np.complex64]
    small = []
    for i in range(400):
        v = rng.standard_normal(int(rng.integers(1, 300))) * rng.uniform(0.01, 5)
        dt = small_dtypes[i % len(small_dtypes)]
        small.append((v + 1j * v[::-1] if dt == np.complex64 else v).astype(dt))
    return big + small


def _h(arrays):
    d = hashlib.sha256()
    for a in arrays:
        d.update(np.ascontiguousarray(a).tobytes())
    return d.hexdigest()


def fingerprint(leaves):
    out = {}
    for p in (2.0, 1.0, 3.0, math.inf):
        out[f"grad_norm p={p}"] = repr(gc.grad_norm(leaves, p))
        out[f"layer_norms p={p}"] = _h([gc.layer_norms(leaves, p)])
    total = gc.grad_norm(leaves)
    clipped, t = gc.clip_grad_norm(leaves, 0.5 * total)
    out["clip_grad_norm"] = (repr(t), _h(clipped))
    work = [x.copy() for x in leaves]
    out["clip_grad_norm_"] = (repr(gc.clip_grad_norm_(work, 0.25 * total)), _h(work))
    work = [x.copy() for x in leaves]
    out["per_layer"] = (_h([gc.clip_grad_norm_per_layer_(work, 1.0)]), _h(work))
    real = [x.copy() for x in leaves if x.dtype.kind != "c"]
    gc.clip_grad_value_(real, 0.5)
    out["clip_grad_value_"] = _h(real)
    work = [x.copy() for x in leaves]
    work[0][-1] = np.nan
    work[3][7, 11] = np.inf
    out["all_finite"] = (gc.all_finite(leaves), gc.all_finite(work))
    out["zero_nonfinite_"] = (int(gc.zero_nonfinite_(work)), _h(work))
    return out


def main():
    leaves = workload()
    first = fingerprint(leaves)
    second = fingerprint(leaves)
    import numba

    print(json.dumps({"first": first, "second": second, "threads": numba.get_num_threads()}))


def _run(threads):
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.abspath(gc.__file__)))
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([here, root, env.get("PYTHONPATH", "")])
    code = "import test_determinism as t; t.main()"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["threads"] == threads
    return result


def test_bit_identical_across_thread_counts():
    one = _run(1)
    two = _run(2)
    for key in one["first"]:
        assert one["first"][key] == one["second"][key], f"{key}: repeated call differs (1 thread)"
        assert two["first"][key] == two["second"][key], f"{key}: repeated call differs (2 threads)"
        assert one["first"][key] == two["first"][key], f"{key}: 1 thread vs 2 threads"
    # the workload is not degenerate
    assert one["first"]["all_finite"] == [True, False]
    assert one["first"]["zero_nonfinite_"][0] == 2


def test_repeated_calls_in_process_are_bit_identical():
    leaves = workload()
    a = fingerprint(leaves)
    b = fingerprint(leaves)
    assert a == b
