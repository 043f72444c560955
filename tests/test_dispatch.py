"""Dispatch by array type (SPEC §2): NumPy as is, DLPack producers zero-copy (CUDA arrays:
tests/test_cuda.py)."""

import subprocess
import sys

import numpy as np
import pytest

import gradclip as gc
from helpers import raises_with
from reference import ref_norm


class DLPackOnly:
    """Exposes a NumPy array through the DLPack protocol alone."""

    def __init__(self, array, device=(1, 0)):
        self._array = array
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device


def test_dlpack_leaf_is_read_and_written_in_place(rng):
    owner = rng.standard_normal((6, 5)).astype(np.float32)
    before = owner.copy()
    leaf = DLPackOnly(owner)
    assert gc.grad_norm([leaf]) == pytest.approx(ref_norm([before]), rel=1e-12)
    total = gc.clip_grad_norm_([leaf], max_norm=1.0)
    assert total == pytest.approx(ref_norm([before]), rel=1e-12)
    assert gc.grad_norm(owner) == pytest.approx(1.0, rel=1e-6)  # the owner's memory changed


def test_read_only_dlpack_leaf_is_refused_in_place(rng):
    owner = rng.standard_normal(5)
    owner.flags.writeable = False
    with raises_with(ValueError, "grads[0]", "read-only", "clip_grad_norm"):
        gc.clip_grad_norm_([DLPackOnly(owner)], max_norm=1e-3)
    clipped, _ = gc.clip_grad_norm([DLPackOnly(owner)], max_norm=1e-3)
    assert gc.grad_norm(clipped) == pytest.approx(1e-3, rel=1e-5)


def test_dlpack_export_failure_names_the_leaf():
    class Broken(DLPackOnly):
        def __dlpack__(self, **kwargs):
            raise BufferError("no export today")

    with raises_with(TypeError, "grads['w']", "DLPack", "no export today"):
        gc.grad_norm({"w": Broken(np.ones(2))})


def test_import_gradclip_imports_no_framework():
    """Frameworks are recognised through sys.modules, never imported to decide."""
    code = (
        "import sys, numpy as np, gradclip\n"
        "gradclip.clip_grad_norm({'w': np.ones(3)}, 1.0)\n"
        "print(sorted(m for m in ('torch', 'jax', 'gradclip.torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
