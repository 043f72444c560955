"""What the simulator cannot show: every CUDA kernel compiles with NVIDIA's real tools.

tests/ptx.py compiles each kernel, for every element type, to PTX with NVVM and to SASS
with ptxas, for sm_80 (A100) and sm_90 (H100 / H200), in fresh processes (no GPU needed:
both come from PyPI with the test extra). The simulator runs kernels as Python, so
typing that only compiled code has (a float16 that stays float16, say) shows only here.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CAPABILITIES = ("8.0", "9.0")
MAX_REGISTERS = 128
"""At most 64K / 128 = 512 threads' registers per block: every launch's block fits."""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The report of tests/ptx.py for each capability (both compiled at once)."""
    script = Path(__file__).with_name("ptx.py")

    def compile_for(cc):
        out = tmp_path_factory.mktemp(f"sm{cc}")
        done = subprocess.run([sys.executable, str(script), cc, str(out)], capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    with ThreadPoolExecutor(len(CAPABILITIES)) as pool:
        return dict(zip(CAPABILITIES, pool.map(compile_for, CAPABILITIES)))


@pytest.mark.parametrize("cc", CAPABILITIES)
def test_every_kernel_assembles_without_spills(reports, cc):
    report = reports[cc]
    kernels = {row["kernel"] for row in report}
    assert {"sumsq_cuda[float32]", "scale_cuda_[bfloat16]", "clamp_cuda_[float16]", "finish_cuda"} <= kernels
    assert {"weighted_sum_cuda[complex64]", "add_noise_cuda_[bfloat16]", "fold_examples_cuda"} <= kernels
    assert not any(row["kernel"].startswith("clamp_cuda_[complex") for row in report)  # complex has no order
    for row in report:
        assert row["spill_bytes"] == 0 and row["stack_bytes"] == 0, row
        assert row["registers"] <= MAX_REGISTERS, row


@pytest.mark.parametrize("cc", CAPABILITIES)
def test_no_float_atomics_and_half_precision_rounds_once(reports, cc):
    for row in reports[cc]:
        assert row["float_atomics"] == [], row  # reductions fold in a fixed order
        writes = (
            "scale_cuda_", "clamp_cuda_", "fill_cuda_", "clip_cells_cuda_", "clip_copy_cuda", "weighted_sum_cuda",
            "add_noise_cuda_",
        )  # fmt: skip
        if row["kernel"].endswith("[float16]") and row["kernel"].split("[")[0] in writes:
            assert row["f16_stores"] == ["cvt.rn.f16.f64"], row  # straight from float64: no double rounding
