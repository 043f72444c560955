"""Cold-start costs of gradclip, each measured in a fresh interpreter.

- ``import gradclip`` (NumPy and Numba included);
- the first ``clip_grad_norm_`` call on the tiny workload with a warm on-disk
  Numba cache (one unmeasured run fills the cache first);
- the same first call with a cold cache: ``NUMBA_CACHE_DIR`` points at a new,
  empty directory, so every kernel it needs is compiled;
- what Numba alone costs, the floor under the first two: ``import numpy, numba``,
  and the first call of a one-loop ``@njit(cache=True)`` function (the probe's
  block sum) with a warm cache — Numba sets up its typing and target registries on
  the first call of any compiled function in a process.

Every interpreter reads Python bytecode from one cache (``PYTHONPYCACHEPREFIX``, a
temporary folder, filled by an unmeasured first run), as an installed package's are:
with ``PYTHONDONTWRITEBYTECODE`` set, an editable install's modules would be compiled
from source on every import (gradclip's ~30: ~80 ms here), while NumPy's and Numba's
come from the bytecode pip wrote.
"""

import functools
import os
import statistics
import subprocess
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

IMPORT_TIME = """
import time
start = time.perf_counter()
import gradclip
print(time.perf_counter() - start)
"""

FIRST_CALL_TIME = f"""
import sys, time
sys.path.insert(0, {BENCH_DIR!r})
from workloads import all_workloads
import gradclip
grads = next(w for w in all_workloads(quick=True) if w.name == "W5").build().first.arrays
start = time.perf_counter()
gradclip.clip_grad_norm_(grads, max_norm=1.0)  # the norm is ~32: this clips
print(time.perf_counter() - start)
"""

NUMBA_IMPORT_TIME = """
import time
start = time.perf_counter()
import numpy, numba
print(time.perf_counter() - start)
"""

NUMBA_FIRST_CALL_TIME = f"""
import sys, time
sys.path.insert(0, {BENCH_DIR!r})
import numpy as np
import probe
ones = np.ones(10, np.float32)
start = time.perf_counter()
probe.block_sum_of_squares(ones)
print(time.perf_counter() - start)
"""


def _seconds_in_fresh_interpreter(code, bytecode_dir, cache_dir=None):
    env = dict(os.environ, PYTHONPYCACHEPREFIX=bytecode_dir)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last_line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise RuntimeError(f"a fresh interpreter failed: {last_line}")
    return float(done.stdout.split()[-1])


def _figure(samples):
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def measure_cold_start(runs, compile_runs):
    """``{"import", "first_call_warm_cache", "first_call_cold_cache", "numba_import",
    "numba_first_call"}``, each median/min/samples."""
    with tempfile.TemporaryDirectory(prefix="gradclip-bench-bytecode-") as bytecode:
        seconds = functools.partial(_seconds_in_fresh_interpreter, bytecode_dir=bytecode)
        for code in (NUMBA_FIRST_CALL_TIME, FIRST_CALL_TIME):
            seconds(code)  # fill the bytecode cache and Numba's on-disk cache
        warm_codes = {
            "import": IMPORT_TIME,
            "numba_import": NUMBA_IMPORT_TIME,
            "numba_first_call": NUMBA_FIRST_CALL_TIME,
            "first_call_warm_cache": FIRST_CALL_TIME,
        }
        samples = {name: [] for name in warm_codes}
        for _ in range(runs):  # interleaved: a slow spell of the machine falls on all alike
            for name, code in warm_codes.items():
                samples[name].append(seconds(code))
        cold = []
        for _ in range(compile_runs):
            with tempfile.TemporaryDirectory(prefix="gradclip-bench-numba-") as cache_dir:
                cold.append(seconds(FIRST_CALL_TIME, cache_dir=cache_dir))
    return {name: _figure(times) for name, times in samples.items()} | {"first_call_cold_cache": _figure(cold)}
