"""What the simulator cannot show: every CUDA kernel compiles with NVIDIA's real tools.

tests/ptx.py compiles each kernel, for every element type, to PTX with NVVM and to SASS
with ptxas, for sm_80 (A100) and sm_90 (H100 / H200), in fresh processes (no GPU needed:
both come from PyPI with the test extra), started in the background when collected. The simulator runs kernels as Python, so
typing that only compiled code has (a float16 that stays float16, say) shows only here.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import in_background

CAPABILITIES = ("8.0", "9.0")
MAX_REGISTERS = 128
"""At most 64K / 128 = 512 threads' registers per block: every launch's block fits."""


def _compile_for(cc):
    """tests/ptx.py's report for capability ``cc`` (its PTX and cubins in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix=f"gradclip-sm{cc}-") as out:
        script = Path(__file__).with_name("ptx.py")
        done = subprocess.run([sys.executable, str(script), cc, out], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def start_in_background():
    """Each capability's compilation, beside the rest of the suite (helpers.in_background)."""
    return {cc: in_background(("ptx", cc), _compile_for, cc) for cc in CAPABILITIES}


@pytest.fixture(scope="module")
def reports():
    return {cc: job.result() for cc, job in start_in_background().items()}


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
