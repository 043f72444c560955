"""The gradient sets the suite measures: real model shapes filled with seeded noise.

Every workload is a recipe (``Workload``); its arrays are only made by
``Workload.build`` so that the run can build, measure and free one workload at a
time (GPT-2 small in float32 is ~500 MB, twice that with its pristine copy).

Values are standard normal (float32 noise, cast for the 16-bit formats). The
norm clip uses ``max_norm = CLIP_TO * total norm``, so every call halves the
gradients (a fixed ``max_norm`` would scale the big workloads by ~1e-4 and push
float16 into subnormals, timing a corner case instead); about a third of the
elements lie outside ``[-CLIP_VALUE, CLIP_VALUE]``. Each ``GradientSet`` keeps
a pristine copy of its arrays, to undo an in-place clip between timed calls
(outside the timed region), so every call clips the same data.
"""

import math
from dataclasses import dataclass

import numpy as np

SEED = 20240611
CLIP_TO = 0.5
"""``max_norm`` as a fraction of the workload's total norm."""
CLIP_VALUE = 1.0
FRESH_POOL = 5
"""Gradient sets cycled by the fresh-arrays workload (each call gets new array objects)."""

GPT2_SMALL_LEAVES = 148
GPT2_SMALL_ELEMENTS = 124_439_808
RESNET50_LEAVES = 161
RESNET50_ELEMENTS = 25_557_032


def gpt2_small_shapes():
    """The 148 parameter shapes of GPT-2 small (Hugging Face ``GPT2LMHeadModel`` order, tied head)."""
    width, vocab, context, layers = 768, 50257, 1024, 12
    shapes = [(vocab, width), (context, width)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1 weight, bias
            (width, 3 * width), (3 * width,),  # attn.c_attn weight, bias
            (width, width), (width,),  # attn.c_proj weight, bias
            (width,), (width,),  # ln_2 weight, bias
            (width, 4 * width), (4 * width,),  # mlp.c_fc weight, bias
            (4 * width, width), (width,),  # mlp.c_proj weight, bias
        ]  # fmt: skip
    shapes += [(width,), (width,)]  # ln_f weight, bias
    assert len(shapes) == GPT2_SMALL_LEAVES, len(shapes)
    assert sum(math.prod(s) for s in shapes) == GPT2_SMALL_ELEMENTS
    return shapes


def resnet50_shapes():
    """The 161 parameter shapes of torchvision's ResNet-50, derived from the architecture.

    Stem conv 7x7 + batch norm; four stages of [3, 4, 6, 3] bottlenecks (1x1, 3x3,
    1x1 convs, each with a batch norm; widths 64/128/256/512, expansion 4), the first
    block of each stage with a 1x1 downsample conv + batch norm; fc 1000x2048 + bias.
    """
    expansion, classes = 4, 1000

    def conv_bn(out_channels, in_channels, kernel):
        return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]

    shapes = conv_bn(64, 3, 7)
    channels = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            shapes += conv_bn(width, channels, 1) + conv_bn(width, width, 3) + conv_bn(width * expansion, width, 1)
            if block == 0:
                shapes += conv_bn(width * expansion, channels, 1)  # downsample
            channels = width * expansion
    shapes += [(classes, channels), (classes,)]
    assert len(shapes) == RESNET50_LEAVES, len(shapes)
    assert sum(math.prod(s) for s in shapes) == RESNET50_ELEMENTS
    return shapes


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Workload:
    """A recipe for one set of gradients.

    ``family`` groups variants for ``--only`` (``W2`` selects W2, W2-bf16, W2-fp16);
    ``strided``: every leaf is a non-contiguous view (transposed, or every other element
    of a 1-d buffer; with ``row_step``, every ``row_step``-th row of a taller array);
    ``fresh``: every call gets
    new array objects (cycling ``FRESH_POOL`` sets); ``big``: fewer repeats in ``--quick``.
    """

    name: str
    family: str
    title: str
    shapes: tuple
    dtype_name: str = "float32"
    strided: bool = False
    row_step: int = 1
    fresh: bool = False
    big: bool = False

    @property
    def dtype(self):
        return _bfloat16() if self.dtype_name == "bfloat16" else np.dtype(self.dtype_name)

    @property
    def leaves(self):
        return len(self.shapes)

    @property
    def elements(self):
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def nbytes(self):
        """Bytes of one set of gradients (what one read pass moves)."""
        return self.elements * self.dtype.itemsize

    def selected_by(self, tokens):
        return not tokens or self.name.lower() in tokens or self.family.lower() in tokens

    def build(self):
        """The ``GradientSource`` of this workload (allocates and fills its arrays)."""
        rng = np.random.default_rng(SEED)
        sets = [self._gradient_set(rng) for _ in range(FRESH_POOL if self.fresh else 1)]
        return GradientSource(sets, self.fresh)

    def _gradient_set(self, rng):
        arrays = [self._leaf(shape, rng) for shape in self.shapes]
        return GradientSet(arrays, [np.array(a, copy=True) for a in arrays])

    def _leaf(self, shape, rng):
        values = rng.standard_normal(shape, dtype=np.float32)
        if not self.strided:
            return values.astype(self.dtype, copy=False)
        if self.row_step > 1:
            leaf = np.empty((shape[0] * self.row_step, *shape[1:]), self.dtype)[:: self.row_step]
        elif len(shape) == 1:  # every other element of a buffer twice as long
            leaf = np.empty(2 * shape[0], self.dtype)[::2]
        else:  # a transposed view of the reversed shape
            leaf = np.empty(shape[::-1], self.dtype).T
        leaf[...] = values
        return leaf


@dataclass
class GradientSet:
    """One list of gradient arrays and a pristine copy to restore them from."""

    arrays: list
    pristine: list

    def restore(self):
        for array, original in zip(self.arrays, self.pristine):
            np.copyto(array, original)

    def with_new_array_objects(self):
        """The same memory behind new ndarray objects and a new list (a 'fresh' call)."""
        return GradientSet([a.view() for a in self.arrays], self.pristine)


class GradientSource:
    """Hands out the gradient set of each call: always the same one, or (fresh) the
    next of a pool, as new array objects each time."""

    def __init__(self, sets, fresh):
        self.sets = sets
        self.fresh = fresh
        self._calls = 0

    @property
    def first(self):
        return self.sets[0]

    def next(self):
        if not self.fresh:
            return self.sets[0]
        gradient_set = self.sets[self._calls % len(self.sets)]
        self._calls += 1
        return gradient_set.with_new_array_objects()


def reference_norm(arrays, chunk=1 << 16):
    """The total 2-norm to float64 accuracy: float64 chunk dot products, summed exactly."""
    partials = []
    for array in arrays:
        flat = array.reshape(-1)
        for start in range(0, flat.size, chunk):
            wide = flat[start : start + chunk].astype(np.float64)
            partials.append(float(np.dot(wide, wide)))
    return math.sqrt(math.fsum(partials))


def all_workloads(quick):
    """Every workload, in report order; ``quick`` shrinks the one-big leaf to 16M."""
    gpt2 = tuple(gpt2_small_shapes())
    resnet = tuple(resnet50_shapes())
    big_leaf = (16 if quick else 64) * 2**20
    return [
        Workload("W1", "W1", f"one-big {big_leaf // 2**20}M", ((big_leaf,),), big=True),
        Workload("W2", "W2", "gpt2-small", gpt2, big=True),
        Workload("W2-bf16", "W2", "gpt2-small bfloat16", gpt2, dtype_name="bfloat16", big=True),
        Workload("W2-fp16", "W2", "gpt2-small float16", gpt2, dtype_name="float16", big=True),
        Workload("W3", "W3", "resnet50", resnet),
        Workload("W3s", "W3", "resnet50 strided views", resnet, strided=True),
        Workload("W4", "W4", "many-small 10k x 256", ((256,),) * 10_000),
        Workload("W4-fresh", "W4", "many-small, fresh arrays", ((256,),) * 10_000, fresh=True),
        Workload("W5", "W5", "tiny 100 x 10", ((10,),) * 100),
        Workload("W6", "W6", "1k strided: every 2nd row of 64x64", ((32, 64),) * 1000, strided=True, row_step=2),
    ]


# ---------------------------------------------------------------- private training
# Per-example (or per-client) gradients: one example's shapes, B examples of them. The
# norm bound is the median of the examples' norms, so half the examples are clipped.

RESNET18_LEAVES = 62
RESNET18_ELEMENTS = 11_689_512
PRIVATE_NOISE_MULTIPLIER = 1.0
NOISE_STD = 1e-3
"""The std of the noise-only workload (small: the timed calls add noise to the same data
over and over)."""


def resnet18_shapes():
    """The 62 parameter shapes of torchvision's ResNet-18: stem conv 7x7 + batch norm; four
    stages of two basic blocks (two 3x3 convs, each with a batch norm; widths 64/128/256/512),
    the first block of stages 2-4 with a 1x1 downsample conv + batch norm; fc 1000x512 + bias."""

    def conv_bn(out_channels, in_channels, kernel):
        return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]

    shapes = conv_bn(64, 3, 7)
    channels = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            shapes += conv_bn(width, channels, 3) + conv_bn(width, width, 3)
            if block == 0 and width != channels:
                shapes += conv_bn(width, channels, 1)  # downsample
            channels = width
    shapes += [(1000, 512), (1000,)]
    assert len(shapes) == RESNET18_LEAVES, len(shapes)
    assert sum(math.prod(s) for s in shapes) == RESNET18_ELEMENTS
    return shapes


def mnist_mlp_shapes():
    """A 784-128-10 MLP in PyTorch's (out, in) layout: 101,770 parameters."""
    return [(128, 784), (128,), (10, 128), (10,)]


def cifar_cnn_shapes():
    """A CIFAR-10 CNN of 1,203,338 parameters: two 5x5 convs (32, 64 channels), dense
    1600-640-192-10."""
    return [(32, 3, 5, 5), (32,), (64, 32, 5, 5), (64,), (640, 1600), (640,), (192, 640), (192,), (10, 192), (10,)]


@dataclass(frozen=True)
class PrivateWorkload:
    """A private-training workload: ``examples`` per-example gradients of ``shapes``
    (float32), ``stacked`` (the example axis first in every leaf) or as separate lists
    (``form="examples"``, client updates); or ``form="noise"``: one set of ``shapes`` that
    noise is added to."""

    name: str
    title: str
    shapes: tuple
    examples: int
    form: str
    family: str = "WD"
    dtype_name: str = "float32"

    @property
    def elements(self):
        """Elements of all examples together."""
        return self.examples * sum(math.prod(shape) for shape in self.shapes)

    @property
    def nbytes(self):
        return self.elements * 4

    @property
    def leaves(self):
        return len(self.shapes)

    def selected_by(self, tokens):
        return not tokens or self.name.lower() in tokens or self.family.lower() in tokens

    def build(self):
        """The arrays: a list of (B, ...) leaves, a list of B lists of leaves, or (noise) a list."""
        rng = np.random.default_rng(SEED)
        if self.form == "stacked":
            return [rng.standard_normal((self.examples, *shape), dtype=np.float32) for shape in self.shapes]
        return [
            [rng.standard_normal(shape, dtype=np.float32) for shape in self.shapes] for _ in range(self.examples)
        ]  # fmt: skip


def private_workloads():
    """WD1-WD3 (clipped sums) and WN (noise), in report order."""
    return [
        PrivateWorkload("WD1", "ResNet-18, B = 32", tuple(resnet18_shapes()), 32, "stacked"),
        PrivateWorkload("WD2", "784-128-10 MLP, B = 1,024", tuple(mnist_mlp_shapes()), 1024, "stacked"),
        PrivateWorkload("WD3", "CIFAR CNN, 100 clients", tuple(cifar_cnn_shapes()), 100, "examples"),
        PrivateWorkload("WN", "gpt2-small noise", tuple(gpt2_small_shapes()), 1, "noise"),
    ]


def reference_example_norms(batch, stacked):
    """Each example's 2-norm to float64 accuracy (see `reference_norm`)."""
    examples = range(batch[0].shape[0]) if stacked else range(len(batch))
    return np.array([reference_norm([g[i] for g in batch] if stacked else batch[i]) for i in examples])


def reference_clipped_sum(batch, stacked, factors):
    """``Σ_i factors[i] g_i`` per leaf in float64 (example by example, float64 products)."""
    leaves = len(batch) if stacked else len(batch[0])
    sums = []
    for k in range(leaves):
        cells = batch[k] if stacked else [example[k] for example in batch]
        total = np.zeros(cells[0].shape)
        for f, cell in zip(factors, cells):
            total += f * cell.astype(np.float64)
        sums.append(total)
    return sums
