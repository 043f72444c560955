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
    """The names of the kernels launched by the test (GPU tests only)."""
    from gradclip import _cuda

    monkeypatch.setattr(_cuda._LAUNCHES, "names", [])
    return _cuda._LAUNCHES.names


@pytest.fixture
def small_kernels(monkeypatch):
    """The CUDA kernels' blocks, chunks and grids patched small, so that multi-block,
    multi-chunk and grid-stride paths run on the small inputs the simulator can take."""
    from gradclip._kernels import cuda as kernels

    monkeypatch.setattr(kernels, "THREADS_PER_BLOCK", 4)
    monkeypatch.setattr(kernels, "CHUNK", 8)
    monkeypatch.setattr(kernels, "BLOCKS_PER_SM", 3)
    monkeypatch.setattr(kernels, "FINISH_THREADS", 8)
    return kernels


def pytest_collection_modifyitems(session, config, items):
    """The tests that wait for background work last, so the rest of the suite runs meanwhile."""
    waits = [hasattr(getattr(item, "module", None), "start_in_background") for item in items]
    items[:] = [item for item, w in zip(items, waits) if not w] + [item for item, w in zip(items, waits) if w]


def pytest_collection_finish(session):
    """Start the selected modules' background work (see helpers.in_background)."""
    if session.config.option.collectonly:
        return
    for module in dict.fromkeys(item.module for item in session.items if getattr(item, "module", None)):
        start = getattr(module, "start_in_background", None)
        if start is not None:
            start()


def pytest_sessionfinish(session):
    from helpers import stop_background

    stop_background()
