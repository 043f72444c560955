"""PyTorch interop (SPEC §2, §6): torch tensors as leaves, zero-copy and in place; the
out-of-place twins return tensors; ``gradclip.torch`` against ``torch.nn.utils``.

Tensors are read back for the references through ``to_numpy`` (an independent copy),
never through gradclip.
"""

import copy
import inspect
import math
import sys
import zlib

import numpy as np
import pytest
import torch

import gradclip as gc
import gradclip.torch as gct
from gradclip import _dispatch, _table
from helpers import assert_norm_close, assert_same_bits, raises_with, tree_leaves
from reference import BFLOAT16, ref_clamp, ref_clip_by_norm, ref_coef, ref_norm, ref_scale

TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
torch_dtypes = pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=lambda d: str(d).removeprefix("torch."))

# A layout: (shape of the base tensor, the view of it handed to gradclip).
LAYOUTS = {
    "contiguous": ((4, 6), lambda b: b),
    "transposed": ((6, 4), lambda b: b.t()),
    "stepped": ((12, 7), lambda b: b[::3, 1::2]),
    "column": ((5, 8), lambda b: b[:, 3]),
    "channels_last": ((2, 3, 4, 5), lambda b: b.permute(0, 2, 3, 1)),
    "0-d": ((3,), lambda b: b[1]),
    "empty": ((3, 4), lambda b: b[:, 2:2]),
}
layouts = pytest.mark.parametrize("layout", list(LAYOUTS))


def to_numpy(tensor):
    """An independent NumPy copy of a CPU tensor (bfloat16 as ml_dtypes')."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16).copy()
    return tensor.numpy().copy()


def random_tensor(shape, dtype, generator, scale=1.0):
    wide = torch.complex128 if dtype.is_complex else torch.float64
    return (torch.randn(shape, generator=generator, dtype=wide) * scale).to(dtype)


@pytest.fixture
def gen(request):
    """A torch generator seeded from the test's id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _base_and_view(layout, dtype, gen):
    shape, view = LAYOUTS[layout]
    base = random_tensor(shape, dtype, gen)
    return base, view(base)


def _expected_base(base_before, layout, new_view_values):
    """The base tensor's values (NumPy) after only the view's elements became ``new``."""
    expected = base_before.copy()
    view = LAYOUTS[layout][1](torch.from_numpy(expected.view(np.int16) if expected.dtype == BFLOAT16 else expected))
    view_np = view.numpy()
    if expected.dtype == BFLOAT16:
        view_np[...] = np.asarray(new_view_values, dtype=BFLOAT16).view(np.int16)
    else:
        view_np[...] = new_view_values
    return expected


# --------------------------------------------------------------------------- leaves


@torch_dtypes
@layouts
def test_tensor_leaf_is_viewed_zero_copy(dtype, layout, gen):
    base, view = _base_and_view(layout, dtype, gen)
    array = _dispatch.as_cpu_array(view, lambda: "grads")
    assert array.shape == tuple(view.shape)
    if view.numel():  # an empty array's strides and address mean nothing
        assert array.strides == tuple(s * view.element_size() for s in view.stride())
        assert array.ctypes.data == view.data_ptr()
    assert array.dtype == (BFLOAT16 if dtype == torch.bfloat16 else to_numpy(view).dtype)


@torch_dtypes
@layouts
def test_clip_grad_norm_in_place_writes_the_tensor(dtype, layout, gen):
    base, view = _base_and_view(layout, dtype, gen)
    before, view_before = to_numpy(base), to_numpy(view)
    pointer = base.data_ptr()
    max_norm = 0.25 * ref_norm([view_before]) if view.numel() else 1.0
    total = gc.clip_grad_norm_([view], max_norm)
    assert_norm_close(total, ref_norm([view_before]))
    (expected_view,) = ref_clip_by_norm([view_before], max_norm, total)
    assert base.data_ptr() == pointer
    assert_same_bits(to_numpy(base), _expected_base(before, layout, expected_view), what="base tensor")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@layouts
def test_clip_grad_value_in_place_writes_the_tensor(dtype, layout, gen):
    base, view = _base_and_view(layout, dtype, gen)
    before, view_before = to_numpy(base), to_numpy(view)
    gc.clip_grad_value_(view, 0.5)
    assert_same_bits(to_numpy(base), _expected_base(before, layout, ref_clamp(view_before, 0.5)), what="base tensor")


IN_PLACE = {
    "clip_grad_norm_": lambda g: gc.clip_grad_norm_(g, max_norm=0.5),
    "clip_grad_norm_per_layer_": lambda g: gc.clip_grad_norm_per_layer_(g, max_norm=0.5),
    "clip_grads_with_norm_": lambda g: gc.clip_grads_with_norm_(g, max_norm=0.5, total_norm=4.0),
    "clip_grad_value_": lambda g: gc.clip_grad_value_(g, 0.1),
    "zero_nonfinite_": lambda g: gc.zero_nonfinite_(g),
    "EMAClipper": lambda g: gc.EMAClipper(warmup=1)(g),
    "adaptive_grad_clip_": lambda g: gc.adaptive_grad_clip_(g, {"b": torch.ones(3), "w": torch.ones(3, 4)}),
}


@pytest.mark.parametrize("name", list(IN_PLACE))
def test_in_place_refuses_a_tensor_that_requires_grad(name, gen):
    """As torch refuses in-place writes into a leaf that requires grad: they would bypass
    autograd (its version counter would not move, and backward would use the new values)."""
    bias = random_tensor((3,), torch.float32, gen)
    param = torch.nn.Parameter(random_tensor((3, 4), torch.float32, gen) * 10)
    param[0, 0].data.fill_(math.nan)
    bias_before, param_before = to_numpy(bias), to_numpy(param)
    with raises_with(ValueError, "grads['w']", "requires grad", name, ".grad", "torch.no_grad()", ".detach()"):
        IN_PLACE[name]({"b": bias, "w": param})
    assert_same_bits(to_numpy(bias), bias_before, what="the other leaf (untouched)")
    assert_same_bits(to_numpy(param), param_before, what="the parameter (untouched)")
    assert param._version == 0


def test_tensor_that_requires_grad_is_read_and_written_as_torch_allows(gen):
    param = torch.nn.Parameter(random_tensor((3, 4), torch.float32, gen))
    param.grad = torch.ones(3, 4)
    before = to_numpy(param)
    assert_norm_close(gc.grad_norm({"w": param}), ref_norm([before]))  # reading is fine
    assert gc.layer_norms([param]).shape == (1,)
    clipped, total = gc.clip_grad_norm({"w": param}, max_norm=0.5)  # so is out of place
    assert_same_bits(to_numpy(clipped["w"]), ref_scale(before, ref_coef(0.5, total)))
    assert_same_bits(to_numpy(param), before, what="parameter (out of place: untouched)")
    with torch.no_grad():  # where torch allows in-place writes, as optimisers make them
        total = gc.clip_grad_norm_({"w": param}, max_norm=0.5)
    assert param.requires_grad and param.is_leaf
    after = ref_scale(before, ref_coef(0.5, total))
    assert_same_bits(to_numpy(param), after, what="parameter")
    total = gc.clip_grad_norm_([param.detach()], max_norm=0.25)  # the same memory, outside autograd
    assert_same_bits(to_numpy(param), ref_scale(after, ref_coef(0.25, total)), what="parameter through detach")
    assert_same_bits(to_numpy(param.grad), np.ones((3, 4), np.float32), what="its .grad (untouched)")


@torch_dtypes
def test_out_of_place_twins_return_tensors_in_the_tree(dtype, gen):
    w, b = random_tensor((3, 5), dtype, gen, 4.0), random_tensor((5,), dtype, gen, 4.0)
    tree = {"layers": [{"w": w, "b": b}, {"w": w.t(), "b": None}], "scale": (b[2],)}
    frozen = [to_numpy(x) for x in tree_leaves(tree)]
    clipped, total = gc.clip_grad_norm(tree, max_norm=1.0)
    assert_norm_close(total, ref_norm(frozen))  # w.t() is another tensor object: counted too
    expected = ref_clip_by_norm(frozen, 1.0, total)
    got = tree_leaves(clipped)
    assert clipped["layers"][1]["b"] is None and isinstance(clipped["scale"], tuple)
    for leaf, original, want in zip(got, tree_leaves(tree), expected):
        assert isinstance(leaf, torch.Tensor) and leaf.dtype == dtype and leaf.device == original.device
        assert leaf.shape == original.shape and not leaf.requires_grad
        assert leaf.data_ptr() != original.data_ptr()
        assert_same_bits(to_numpy(leaf), want)
    for leaf, before in zip(tree_leaves(tree), frozen):
        assert_same_bits(to_numpy(leaf), before, what="input (untouched)")
    if not dtype.is_complex:
        values = gc.clip_grad_value({"w": w, "b": [b]}, 0.5)
        assert isinstance(values["b"][0], torch.Tensor) and values["b"][0].dtype == dtype
        assert_same_bits(to_numpy(values["w"]), ref_clamp(to_numpy(w), 0.5))


def test_many_tensors_in_one_list(gen):
    """The bulk path for lists of contiguous tensors: mixed dtypes, 0-d and empty ones."""
    shapes = [(7,), (), (0,), (3, 4), (1,), (2, 0, 3)]
    tensors = [random_tensor(shapes[i % 6], TORCH_DTYPES[i % 5], gen, 2.0) for i in range(300)]
    before = [to_numpy(t) for t in tensors]
    clipped, total = gc.clip_grad_norm(tensors, max_norm=1.0)
    assert_norm_close(total, ref_norm(before))
    for got, t, want in zip(clipped, tensors, ref_clip_by_norm(before, 1.0, total)):
        assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and got.shape == t.shape
        assert_same_bits(to_numpy(got), want)
    assert gc.clip_grad_norm_(tensors, max_norm=1.0) == total
    for got, want in zip(tensors, ref_clip_by_norm(before, 1.0, total)):
        assert_same_bits(to_numpy(got), want)
    with raises_with(TypeError, "grads[4]", "complex64"):
        gc.clip_grad_value_(tensors, 0.1)
    tensors[9] = tensors[9].conj()  # complex64
    with raises_with(TypeError, "grads[9]", "conjugate"):
        gc.grad_norm(tensors)


def test_strided_tensors_are_walked_in_one_call(gen, monkeypatch):
    """Lists holding non-contiguous tensors: their NumPy views take the one-call tables
    (no Python walk of each leaf), with the references' bits; views that share memory are
    still named."""
    layouts = [name for name in LAYOUTS if name not in ("0-d", "empty")]
    views = [_base_and_view(layouts[i % len(layouts)], TORCH_DTYPES[i % 4], gen)[1] for i in range(40)]
    assert not all(v.is_contiguous() for v in views)
    before = [to_numpy(v) for v in views]
    for dtype in TORCH_DTYPES[:4]:  # every dtype accepted once, as the one-call paths ask
        gc.grad_norm([torch.ones(1, dtype=dtype)])
    max_norm = 0.5 * ref_norm(before)

    def no_python_walk(*args):
        raise AssertionError("a leaf was walked in Python")

    with monkeypatch.context() as patched:
        patched.setattr(_table, "build", no_python_walk)
        assert_norm_close(gc.grad_norm(views), ref_norm(before))
        total = gc.clip_grad_norm_(views, max_norm)
    assert_norm_close(total, ref_norm(before))
    for got, want in zip(views, ref_clip_by_norm(before, max_norm, total)):
        assert_same_bits(to_numpy(got), want)

    base = random_tensor((8, 6), torch.float32, gen)
    kept = to_numpy(base)
    with raises_with(ValueError, "grads[0]", "grads[1]", "share memory"):
        gc.clip_grad_norm_([base[::2], base[::4]], 0.1)
    assert_same_bits(to_numpy(base), kept, what="untouched base")


def test_repeated_tensor_comes_back_as_one_tensor(gen):
    t = random_tensor((4,), torch.float32, gen)
    clipped, total = gc.clip_grad_norm([t, t], max_norm=0.1)
    assert_norm_close(total, ref_norm([to_numpy(t)]))  # counted once
    assert clipped[0] is clipped[1]


@pytest.fixture
def without_ml_dtypes(monkeypatch):
    """``import ml_dtypes`` fails, as where it is not installed (its torch dtype table forgotten)."""
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    _dispatch._torch_dtypes.cache_clear()
    yield
    _dispatch._torch_dtypes.cache_clear()


@pytest.mark.usefixtures("without_ml_dtypes")
def test_bfloat16_tensor_without_ml_dtypes_names_the_extra():
    grads = [torch.ones(2), torch.ones(2, dtype=torch.bfloat16)]
    with raises_with(ImportError, "grads[1]", "bfloat16", "gradclip[bf16]"):
        gc.clip_grad_norm_(grads, 0.1)
    assert torch.equal(grads[0], torch.ones(2))


def test_conjugate_view_is_refused_naming_the_leaf():
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    with raises_with(TypeError, "grads['z']", "torch.Tensor", "conjugate"):
        gc.grad_norm({"z": z.conj()})


# --------------------------------------------------------------------------- gradclip.torch


@pytest.mark.parametrize("name", [name for name in gct.__all__ if name != "GhostClipping"])  # the rest: drop-ins
def test_drop_in_signatures_are_pytorchs(name):
    ours = inspect.signature(getattr(gct, name)).parameters
    theirs = inspect.signature(getattr(torch.nn.utils, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 6), torch.nn.Flatten(), torch.nn.Linear(18, 16), torch.nn.Tanh(),
        torch.nn.LayerNorm(16), torch.nn.Linear(16, 11),
    )  # fmt: skip


def _with_grads(seed, frozen=()):
    """A random model and a copy of it, with the same random .grad from one backward pass."""
    model = _model(seed)
    for index in frozen:
        list(model.parameters())[index].requires_grad_(False)
    x = torch.randint(0, 11, (8, 3))
    model(x).logsumexp(dim=1).mul(30.0).sum().backward()
    return model, _copy_with_grads(model)


def _copy_with_grads(model):
    other = copy.deepcopy(model)  # a Parameter's deepcopy drops its .grad
    for mine, theirs in zip(model.parameters(), other.parameters()):
        theirs.grad = None if mine.grad is None else mine.grad.clone()
    return other


def _grads(model):
    return [None if p.grad is None else to_numpy(p.grad) for p in model.parameters()]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf, "inf"], ids=str)
@pytest.mark.parametrize("frozen", [(), (0, 3)], ids=["all-grads", "None-grads"])
def test_clip_grad_norm_matches_torch_on_a_model(norm_type, frozen):
    ours, theirs = _with_grads(seed=len(frozen) + 7, frozen=frozen)
    before = [g for g in _grads(ours) if g is not None]
    exact = ref_norm(before, float(norm_type))
    max_norm = 0.3 * exact
    total = gct.clip_grad_norm_(ours.parameters(), max_norm, norm_type)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type)
    assert total.dtype == torch_total.dtype == torch.float32 and total.shape == () and total.device == torch_total.device
    assert float(total) == float(np.float32(exact))  # float64 accumulation, rounded once
    assert float(total) == pytest.approx(float(torch_total), rel=1e-5)
    coef = ref_coef(max_norm, exact)
    assert [g is None for g in _grads(ours)] == [g is None for g in _grads(theirs)] == [i in frozen for i in range(7)]
    clipped = [g for g in _grads(ours) if g is not None]
    for got, was, want in zip(clipped, before, [g for g in _grads(theirs) if g is not None]):
        np.testing.assert_allclose(got, ref_scale(was, coef), rtol=2.4e-7, atol=0)  # 1 float32 ulp
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_get_total_norm_and_clip_grads_with_norm_match_torch():
    ours, theirs = _with_grads(seed=3)
    grads, torch_grads = [p.grad for p in ours.parameters()], [p.grad for p in theirs.parameters()]
    for p in (1.0, 2.0, 3.0, math.inf):
        total = gct.get_total_norm(grads, p)
        assert total.dtype == torch.float32
        assert float(total) == float(np.float32(ref_norm(_grads(ours), p)))
        assert float(total) == pytest.approx(float(torch.nn.utils.get_total_norm(torch_grads, p)), rel=1e-5)
    total = torch.nn.utils.get_total_norm(torch_grads)
    before = _grads(ours)
    gct.clip_grads_with_norm_(ours.parameters(), 0.5, total)
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 0.5, total)
    coef = ref_coef(0.5, float(total))
    for got, was, want in zip(_grads(ours), before, _grads(theirs)):
        assert_same_bits(got, ref_scale(was, coef))
        np.testing.assert_allclose(got, want, rtol=2.4e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_clip_grad_value_matches_torch_bit_for_bit(dtype, gen):
    grads = [random_tensor(s, dtype, gen, 3.0) for s in [(5, 7), (3,), ()]]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = copy.deepcopy(ours)
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    ours[1].grad = theirs[1].grad = None
    gct.clip_grad_value_(ours, 1.25)
    torch.nn.utils.clip_grad_value_(theirs, 1.25)
    for a, b in zip(ours, theirs):
        if a.grad is None:
            assert b.grad is None
            continue
        assert_same_bits(to_numpy(a.grad), to_numpy(b.grad))
    assert (grads[0].abs() > 1.25).any()  # something was clamped


def test_mixed_dtypes_give_torchs_norm_dtype(gen):
    cases = [
        [torch.float32, torch.float64, torch.bfloat16],
        [torch.bfloat16, torch.float32],
        [torch.float16, torch.bfloat16],
        [torch.bfloat16],
        [torch.complex64, torch.float16],
    ]
    for dtypes in cases:
        tensors = [random_tensor((40,), d, gen, 5.0) for d in dtypes]
        ours = gct.get_total_norm(tensors)
        theirs = torch.nn.utils.get_total_norm(tensors)
        assert ours.dtype == theirs.dtype, dtypes
        exact = ref_norm([to_numpy(t) for t in tensors])
        assert_norm_close(float(ours), float(torch.tensor(exact, dtype=ours.dtype)), what=str(dtypes))
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
        for param, tensor in zip(params, tensors):
            param.grad = tensor.clone()
        total = gct.clip_grad_norm_(params, max_norm=1.0)
        assert total.dtype == theirs.dtype
        coef = ref_coef(1.0, exact)
        for param, tensor in zip(params, tensors):
            np.testing.assert_allclose(  # the float64 total rounds to the dtype: one rounding of x * coef at most 1 ulp off
                to_numpy(param.grad).astype(np.complex128),
                ref_scale(to_numpy(tensor), coef).astype(np.complex128),
                rtol=2 ** -7,
                atol=0,
            )


def test_no_gradients_give_torchs_zero():
    ours, theirs = gct.get_total_norm([]), torch.nn.utils.get_total_norm([])
    assert ours.dtype == theirs.dtype and float(ours) == float(theirs) == 0.0
    param = torch.nn.Parameter(torch.ones(3))
    assert float(gct.clip_grad_norm_([param], 1.0)) == 0.0 and param.grad is None
    with pytest.warns(UserWarning, match="empty generator"):
        gct.clip_grad_norm_((p for p in []), 1.0)


def test_tied_parameters_count_once_as_in_torch():
    embedding = torch.nn.Embedding(7, 4)
    head = torch.nn.Linear(4, 7, bias=False)
    head.weight = embedding.weight  # weight tying: one parameter, two uses
    model = torch.nn.Sequential(embedding, head)
    model(torch.tensor([1, 2, 3])).square().sum().mul(10).backward()
    other = _copy_with_grads(model)
    assert len(list(model.parameters())) == 1
    total = gct.clip_grad_norm_(model.parameters(), 0.1)
    torch_total = torch.nn.utils.clip_grad_norm_(other.parameters(), 0.1)
    assert float(total) == pytest.approx(float(torch_total), rel=1e-6)
    np.testing.assert_allclose(to_numpy(model[0].weight.grad), to_numpy(other[0].weight.grad), rtol=1e-5)


def test_a_parameter_listed_twice_counts_once(gen):
    """A documented difference: PyTorch counts and scales a repeated parameter twice."""
    param = torch.nn.Parameter(torch.zeros(6))
    param.grad = random_tensor((6,), torch.float32, gen, 3.0)
    before = to_numpy(param.grad)
    total = gct.clip_grad_norm_([param, param], max_norm=0.5)
    assert float(total) == float(np.float32(ref_norm([before])))
    np.testing.assert_allclose(ref_norm([to_numpy(param.grad)]), 0.5, rtol=1e-5)


def test_error_if_nonfinite_raises_before_writing(gen):
    ours, theirs = _with_grads(seed=5)
    for model in (ours, theirs):
        list(model.parameters())[1].grad[0, 0] = math.nan
    before = _grads(ours)
    with raises_with(RuntimeError, "non-finite"):
        gct.clip_grad_norm_(ours.parameters(), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, error_if_nonfinite=True)
    with pytest.raises(gc.NonFiniteGradientError):
        gct.get_total_norm([p.grad for p in ours.parameters()], error_if_nonfinite=True)
    for got, was in zip(_grads(ours), before):
        assert_same_bits(got, was)
    # Without the error: gradclip leaves the gradients as they are, PyTorch fills them with NaN.
    total = gct.clip_grad_norm_(ours.parameters(), 1.0)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    assert math.isnan(float(total)) and math.isnan(float(torch_total))
    for got, was in zip(_grads(ours), before):
        assert_same_bits(got, was)
    assert all(np.isnan(g).all() for g in _grads(theirs))


def test_drop_ins_check_arguments_before_writing(gen):
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = random_tensor((4,), torch.float32, gen, 3.0)
    before = to_numpy(param.grad)
    with raises_with(ValueError, "max_norm", ">= 0"):
        gct.clip_grad_norm_([param], -1.0)
    with raises_with(ValueError, "norm_type", "> 0"):
        gct.clip_grad_norm_([param], 1.0, norm_type=0)
    with raises_with(ValueError, "clip_value", ">= 0"):
        gct.clip_grad_value_([param], -0.5)
    with raises_with(ValueError, "total_norm", ">= 0"):
        gct.clip_grads_with_norm_([param], 1.0, torch.tensor(-2.0))
    assert_same_bits(to_numpy(param.grad), before)


def test_a_training_run_follows_torchs_trajectory():
    """Same model, data and seed; one run clipped by torch, one by gradclip.torch.

    Clipping is active on most steps. Per step the two clip coefficients differ only by
    torch's float32 accumulation of the norm (~1e-7 relative for a few hundred
    elements) and by where the product is rounded, so each update differs by about one
    float32 ulp; over 40 SGD steps with momentum these add up to a few ulps of the
    parameters (measured: at most 5e-7 absolute, on parameters of size 0.01-1). The
    tolerance, 1e-5 absolute, leaves a 20x margin for other CPUs' summation orders in
    torch, and is a million times below how far the unclipped run drifts (~30).
    """
    torch.manual_seed(0)
    data, target = torch.randn(64, 10), torch.randn(64, 1)
    base = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    runs = {name: copy.deepcopy(base) for name in ("torch", "gradclip", "unclipped")}
    clippers = {
        "torch": torch.nn.utils.clip_grad_norm_,
        "gradclip": gct.clip_grad_norm_,
        "unclipped": lambda params, max_norm: None,
    }
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) for name, model in runs.items()}
    clipped_steps = 0
    for step in range(40):
        for name, model in runs.items():
            optimizers[name].zero_grad()
            torch.nn.functional.mse_loss(model(data * (1 + step % 3)), target * 30).backward()
            total = clippers[name](model.parameters(), 1.0)
            if name == "gradclip":
                clipped_steps += float(total) > 1.0
            optimizers[name].step()
        ours, theirs = (torch.cat([p.detach().ravel() for p in runs[n].parameters()]) for n in ("gradclip", "torch"))
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), f"step {step}: {(ours - theirs).abs().max()}"
    assert clipped_steps >= 30  # clipping was in effect
    unclipped = torch.cat([p.detach().ravel() for p in runs["unclipped"].parameters()])
    assert (ours - unclipped).abs().max() > 1.0


def test_accumulation_returns_tensors():
    acc = gc.GradAccumulator(2, average=False, copy_result=False)
    assert acc.step([torch.ones(3, dtype=torch.bfloat16), torch.ones(2)]) is None
    summed = acc.step([torch.full((3,), 2.0, dtype=torch.bfloat16), torch.full((2,), 5.0)])
    assert [type(s) for s in summed] == [torch.Tensor, torch.Tensor]
    assert [s.dtype for s in summed] == [torch.float32, torch.float32]  # half precision accumulates in float32
    assert summed[0].tolist() == [3.0, 3.0, 3.0] and summed[1].tolist() == [6.0, 6.0]


def test_misaligned_tensors_are_refused_naming_the_leaf():
    misaligned = torch.frombuffer(bytearray(40), dtype=torch.float32, offset=2, count=8)
    other = torch.full((3,), 10.0)
    with raises_with(ValueError, "grads[1]", "not aligned"):
        gc.clip_grad_norm_([other, misaligned], 1.0)
    assert other.tolist() == [10.0, 10.0, 10.0]


WITHOUT_MEMORY = {
    "sparse_coo": (lambda: torch.ones(3).to_sparse(), ("sparse torch tensor", "torch.sparse_coo", ".to_dense()")),
    "sparse_csr": (lambda: torch.eye(3).to_sparse_csr(), ("sparse torch tensor", "torch.sparse_csr", ".to_dense()")),
    "meta": (lambda: torch.ones(3, device="meta"), ("torch tensor on the meta device",)),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
@pytest.mark.parametrize("kind", list(WITHOUT_MEMORY))
@pytest.mark.parametrize("call", ["grad_norm", "clip_grad_norm_", "clip_grad_value"])
def test_tensors_without_dense_memory_are_refused_naming_the_leaf(kind, call):
    make, fragments = WITHOUT_MEMORY[kind]
    other = torch.full((3,), 10.0)
    grads = {"a": other, "b": [None, make()]}
    with raises_with(TypeError, "grads['b'][1]", *fragments):
        {"grad_norm": gc.grad_norm, "clip_grad_norm_": lambda g: gc.clip_grad_norm_(g, 1.0),
         "clip_grad_value": lambda g: gc.clip_grad_value(g, 1.0)}[call](grads)  # fmt: skip
    assert other.tolist() == [10.0, 10.0, 10.0]
