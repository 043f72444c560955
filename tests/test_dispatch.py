"""Dispatch by array type (SPEC §2): NumPy as is, DLPack producers zero-copy (CUDA arrays:
tests/test_cuda.py)."""

import subprocess
import sys

import numpy as np
import pytest

import gradclip as gc
from helpers import raises_with
from reference import ref_coef, ref_norm, ref_scale


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


# --------------------------------------------------------------------------- meaning (SPEC §10)

ALL_CALLS = {
    "grad_norm": lambda g: gc.grad_norm(g),
    "layer_norms": lambda g: gc.layer_norms(g),
    "all_finite": lambda g: gc.all_finite(g),
    "clip_grad_norm_": lambda g: gc.clip_grad_norm_(g, 0.01),
    "clip_grad_norm": lambda g: gc.clip_grad_norm(g, 0.01),
    "clip_grad_value_": lambda g: gc.clip_grad_value_(g, 0.01),
    "clip_grad_value": lambda g: gc.clip_grad_value(g, 0.01),
    "zero_nonfinite_": lambda g: gc.zero_nonfinite_(g),
    "norm_penalty": lambda g: gc.norm_penalty(g, 0.1, 1.0),
    "GradAccumulator.step": lambda g: gc.GradAccumulator(1).step(g),
}


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_masked_arrays_are_refused_naming_the_leaf(name):
    """The norm of a masked array would count its masked values, and a result would drop
    the mask: gradclip refuses it rather than ignore what the mask means."""
    valid = np.linspace(-50.0, 50.0, 6)
    masked = np.ma.masked_array([1.0, 1e6, 3.0], mask=[False, True, False])
    frozen = (valid.copy(), masked.data.copy())
    with raises_with(TypeError, "grads['m'] is a numpy.ma.MaskedArray", ".filled(0)", ".data"):
        ALL_CALLS[name]({"v": valid, "m": masked})
    assert np.array_equal(valid, frozen[0]) and np.array_equal(masked.data, frozen[1])
    assert masked.mask.tolist() == [False, True, False]


def test_matrix_leaves_come_back_as_matrices():
    """np.matrix decides what * means: an ndarray in its place would change the caller's
    arithmetic. It holds nothing but its type, so results are matrix views of new arrays."""
    m = np.array([[3.0, 4.0], [0.0, 0.0]]).view(np.matrix)  # np.matrix() warns of its deprecation
    before = np.array(m)
    clipped, total = gc.clip_grad_norm({"w": m}, 1.0, eps=0.0)
    assert total == 5.0 and type(clipped["w"]) is np.matrix
    assert np.array_equal(np.asarray(clipped["w"]), ref_scale(before, ref_coef(1.0, 5.0, 0.0)))
    assert type(gc.clip_grad_value([m], 1.0)[0]) is np.matrix
    assert type(gc.norm_penalty([m], 1.0, 1.0)[1][0]) is np.matrix
    acc = gc.GradAccumulator(2)
    acc.step([m])
    mean = acc.step([m])[0]
    assert type(mean) is np.matrix and np.array_equal(np.asarray(mean), before)
    assert np.array_equal(np.asarray(m), before)  # out of place: untouched
    gc.clip_grad_norm_(m, 1.0, eps=0.0)  # in place: into the matrix's memory
    assert np.array_equal(np.asarray(m), ref_scale(before, ref_coef(1.0, 5.0, 0.0)))
