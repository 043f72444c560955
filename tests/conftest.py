"""Fixtures shared by the gradclip tests. Helpers live in helpers.py, references in
reference.py."""

import os
import zlib

# The GPU tests run on numba-cuda's simulator; it is chosen when numba.cuda is first
# imported, which only the GPU tests do.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "gradclip",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("gradclip")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def launches(monkeypatch):
    """Kernel launches, counted where the CUDA simulator runs them (GPU tests only)."""
    from numba.cuda.simulator import kernel as sim_kernel

    counted = []
    call = sim_kernel.FakeCUDAKernel.__call__

    def counting(self, *args):
        if not self._device and sim_kernel._get_kernel_context() is None:
            counted.append(self.fn.__name__)
        return call(self, *args)

    monkeypatch.setattr(sim_kernel.FakeCUDAKernel, "__call__", counting)
    return counted
