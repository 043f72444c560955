"""bench/gpu.py --host runs without a GPU and counts what the issue bounds: launches per
``clip_grad_norm_`` (one pass per dtype, the finishing launch, the scaling pass) and the
arguments of each launch. Times are the bench's to report, never asserted here."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_host_cost_bench_counts_three_launches_of_few_arguments():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--host", "--repeats", "2"], capture_output=True, text=True, timeout=600, check=True
    )
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"W[245] ", line)]
    assert [row[0] for row in rows] == ["W2", "W4", "W5"], done.stdout
    for row in rows:
        launches, arguments = int(row[-2]), int(row[-1])
        assert launches == 3  # sumsq, finish, scale: whatever the number of leaves
        assert arguments == 32  # four arrays of 7 (Numba's array ABI) and four scalars
