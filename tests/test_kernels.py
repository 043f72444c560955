"""The CPU kernel layer itself: half-precision codecs over every bit pattern, rounding
against the references, and the serial and parallel drivers agreeing bit for bit."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import gradclip as gc
from gradclip import _cpu, _table
from gradclip._kernels import cpu as kernels
from helpers import DTYPES, REAL_DTYPES, assert_same_bits, dtype_id, random_values
from reference import BFLOAT16, parts_f64, ref_clamp, ref_nonfinite_mask, ref_scale, round_to

ALL_16_BIT_PATTERNS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _decode(decoder, bits):
    return np.array([decoder(b) for b in bits], dtype=np.float32)


def test_every_float16_value_is_read_exactly():
    values = ALL_16_BIT_PATTERNS.view(np.float16)
    finite = values[np.isfinite(values)]
    got = gc.layer_norms(list(finite.reshape(-1, 1)), np.inf)
    assert_same_bits(got, np.abs(finite.astype(np.float64)))


def test_bfloat16_decoding_is_exact_for_every_bit_pattern():
    got = _decode(kernels._bf16_to_f32, ALL_16_BIT_PATTERNS.view(np.int16))
    assert_same_bits(got, ALL_16_BIT_PATTERNS.view(BFLOAT16).astype(np.float32), nan_payload=False)


@pytest.mark.parametrize("size", [*range(12), 17, 1001, kernels.CHUNK + 3])
def test_bfloat16_sums_of_squares_read_in_pairs_at_any_alignment(size, rng):
    """Contiguous bfloat16 codes are summed two per 32-bit word: the fsum reference at
    every length (tails of 1 to 3 codes), the same bits at an address 2 bytes off a
    4-byte boundary, and inf / NaN anywhere reach the sum."""
    values = random_values(size, BFLOAT16, rng, scale=1e3)
    shifted = np.empty(size + 1, BFLOAT16)[1:]
    shifted[...] = values
    assert size == 0 or (values.ctypes.data % 4, shifted.ctypes.data % 4) == (0, 2)  # empty: no memory
    expected = math.fsum(float(x) ** 2 for x in values.astype(np.float64))
    got = kernels.sumsq_cpu(values.view(np.int16))
    assert got == pytest.approx(expected, rel=1e-13, abs=0.0)
    assert_same_bits(np.float64(kernels.sumsq_cpu(shifted.view(np.int16))), np.float64(got))
    for position in {0, size // 2, size - 1} if size else ():
        for special, check in ((np.inf, math.isinf), (np.nan, math.isnan)):
            poked = shifted.copy()
            poked[position] = special
            assert check(kernels.sumsq_cpu(poked.view(np.int16))), (position, special)


STREAM_SIZES = [kernels.STREAMS_MIN + r for r in range(-1, 4)] + [kernels.CHUNK]


def _codes(values):
    """``values`` as the kernels read them: 16-bit floats as their bit patterns."""
    if values.dtype == np.float16:
        return values.view(np.uint16)
    return values.view(np.int16) if values.dtype == BFLOAT16 else values


@pytest.mark.parametrize("size", STREAM_SIZES)
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != BFLOAT16], ids=dtype_id)
def test_long_sums_of_squares_read_as_four_streams(dtype, size, rng):
    """From STREAMS_MIN elements on, a contiguous view is summed as four quarters side
    by side and a tail of 0 to 3 elements: the fsum reference at every tail length, and
    inf / NaN at the start of each quarter and at the end reach the sum."""
    values = random_values(size, dtype, rng, scale=1e3)
    expected = math.fsum(float(x) ** 2 for part in parts_f64(values) for x in part)
    assert kernels.sumsq_cpu(_codes(values)) == pytest.approx(expected, rel=1e-13, abs=0.0)
    quarter = size // 4
    for position in (0, quarter, 2 * quarter, 3 * quarter, size - 1):
        for special, check in ((np.inf, math.isinf), (np.nan, math.isnan)):
            poked = values.copy()
            poked[position] = special
            assert check(kernels.sumsq_cpu(_codes(poked))), (position, special)


@pytest.mark.parametrize("size", STREAM_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_long_finiteness_checks_read_as_four_streams(dtype, size, rng):
    """The non-finite count of a long view (four quarters side by side and a tail)
    equals the reference's, with NaN / inf scattered and at each quarter's start and
    the end; `all_finite` sees one of them anywhere, contiguous or strided."""
    values = random_values(size, dtype, rng)
    quarter = size // 4
    edges = [0, quarter, 2 * quarter, 3 * quarter, size - 1]
    scattered = values.copy()
    scattered[rng.choice(size, 20, replace=False)] = np.nan
    scattered[edges] = np.inf
    expected = int(ref_nonfinite_mask(scattered).sum())
    assert kernels._nonfinite_quarters(_codes(scattered)) == expected
    assert gc.all_finite([values])
    for position in edges:
        poked = values.copy()
        poked[position] = np.nan
        strided = np.repeat(poked, 2)[::2]
        assert not gc.all_finite([poked]) and not gc.all_finite([strided]), position


HALF_DTYPES = pytest.mark.parametrize("half_dtype", [np.dtype(np.float16), BFLOAT16], ids=dtype_id)


def _kernel_dtype(half_dtype):
    return np.uint16 if half_dtype == np.float16 else np.int16


def _narrowers(half_dtype):
    """The scalar float64 -> code roundings of ``half_dtype`` this machine runs: float16's
    in integer code and, where the CPU has F16C, with its conversion."""
    if half_dtype != np.float16:
        return [kernels._f64_to_bf16]
    return [kernels._f64_to_f16, *([kernels._f64_to_f16_f16c] if kernels._f16c() else [])]


def _hard_float64_values(rng, half_dtype):
    """Values at and around every rounding boundary of ``half_dtype``, plus random ones
    (no NaN): every finite value and its float64 neighbours, every midpoint between
    neighbours (ties, subnormal ones included) and its float64 neighbours, the
    overflow threshold and its neighbours, zeros, infinities, float64's extremes, the
    edges of the ranges the narrowing converts through float32, and random float64s
    of every magnitude and random bit patterns."""
    with np.errstate(invalid="ignore"):  # NaN patterns; dropped below
        halves = ALL_16_BIT_PATTERNS.view(half_dtype).astype(np.float64)
    halves = halves[np.isfinite(halves)]
    ordered = np.unique(halves)
    midpoints = (ordered[:-1] + ordered[1:]) / 2  # exact in float64: ties
    largest = float(ordered[-1])
    threshold = largest + (largest - float(ordered[-2])) / 2  # ties to even: to inf
    edges = np.array(
        [threshold, largest, 2.0**-25, 2.0**-134, 2.0**-140, 2.0**-141, 2.0**-149, 2.0**-150, 2.0**-126, 2.0**-14]
        + [3.4028234663852886e38, 2.0**128, 1e39, 1e300, np.finfo(np.float64).max, np.finfo(np.float64).tiny, 5e-324]
    )
    edges = np.concatenate([edges, -edges])
    wide = rng.standard_normal(100_000) * 10.0 ** rng.uniform(-45, 40, 100_000)
    patterns = rng.integers(0, 1 << 64, 100_000, dtype=np.uint64, endpoint=False).view(np.float64)
    patterns = patterns[~np.isnan(patterns)]
    with np.errstate(over="ignore"):  # float64's largest and its next one up
        values = np.concatenate([halves, midpoints, edges])
        values = np.concatenate([values, np.nextafter(values, np.inf), np.nextafter(values, -np.inf)])
    return np.concatenate([values, wide, patterns, [np.inf, -np.inf, 0.0, -0.0]])


@HALF_DTYPES
def test_rounding_to_half_precision_is_nearest_even_once(half_dtype, rng):
    values = _hard_float64_values(rng, half_dtype)
    for narrow in _narrowers(half_dtype):
        got = np.array([narrow(v) for v in values], dtype=np.uint32).astype(np.uint16).view(half_dtype)
        assert_same_bits(got, round_to(values, half_dtype), narrow.__name__)


@HALF_DTYPES
def test_rounding_in_the_vectorised_kernel_loop(half_dtype, rng):
    """The same values rounded by the kernels' loops, whose vector code is not the
    scalar calls' above: accumulating float64 grads into a half-precision buffer
    rounds each once (``accumulate_cpu_``), and scaling every half value by factors
    that make ties, subnormals and overflows (``scale_cpu_``)."""
    values = _hard_float64_values(rng, half_dtype)
    acc = gc.GradAccumulator(1, average=False, accumulator_dtype=half_dtype)
    assert_same_bits(acc.step(values), round_to(values, half_dtype))
    codes = np.tile(ALL_16_BIT_PATTERNS, 3).view(_kernel_dtype(half_dtype))  # 3 x 65536: full vectors and a tail
    for coef in (1.0, 0.75, 1 / 3, 1 + 2.0**-9 + 2.0**-30, 2.0**-9, 1.37e-5, 0.5**60, 3.0, 1e4, 1e40, -0.3):
        scaled = codes.copy()
        kernels.scale_cpu_(scaled, coef)
        assert_same_bits(scaled.view(half_dtype), ref_scale(codes.view(half_dtype), coef), f"scaled by {coef!r}")


WITHOUT_F16C = """
import math
import numpy as np
import gradclip as gc
from gradclip import _cpu
from gradclip._kernels import cpu as kernels

assert not kernels._f16c()
codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
finite = codes[np.isfinite(codes)]
wide = finite.astype(np.float64)
assert np.array_equal(gc.layer_norms(list(finite.reshape(-1, 1)), np.inf), np.abs(wide))  # every value read exactly
assert gc.grad_norm(finite) == math.sqrt(math.fsum(wide * wide))
tiled = np.tile(codes, _cpu.LOOKUP_MIN // codes.size + 1)
for total in (3.0, 1 / 0.578):
    by_codes, by_element = tiled.copy(), tiled.copy()
    gc.clip_grads_with_norm_(by_codes, 1.0, total, eps=0.0)  # by lookup: no float32 factor without F16C
    _cpu.LOOKUP_MIN = math.inf
    gc.clip_grads_with_norm_(by_element, 1.0, total, eps=0.0)
    _cpu.LOOKUP_MIN = 1 << 20
    assert np.array_equal(by_codes.view(np.uint16), by_element.view(np.uint16))
    with np.errstate(invalid="ignore"):  # NaN codes
        expected = (tiled.astype(np.float64) * (1.0 / total)).astype(np.float16)  # NumPy rounds once
    nan = np.isnan(expected)
    assert np.array_equal(by_codes.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    assert (by_codes.view(np.uint16)[nan] & 0x7FFF == 0x7E00).all()
print("checked")
"""


def test_float16_on_a_cpu_without_f16c(tmp_path):
    """float16 is converted with F16C where the CPU has it; for a CPU without (Numba's
    generic target, which its cache keeps apart), the kernels read codes through a table
    and round in integer code, with the same results: a fresh process on an empty cache."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_FEATURES", None)
    done = subprocess.run([sys.executable, "-W", "error", "-c", WITHOUT_F16C], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "checked", (done.stdout + done.stderr)[-3000:]


@HALF_DTYPES
def test_half_codes_are_clamped_and_checked_by_their_bits(half_dtype):
    """Clamping and the finite checks compare 16-bit codes as integers: every code, in
    a vector loop, against the float64 references; NaN codes keep every bit."""
    values = np.tile(ALL_16_BIT_PATTERNS, 3).view(half_dtype)  # full vectors and a tail
    nonfinite = ref_nonfinite_mask(values)
    nan = np.isnan(values.astype(np.float32))
    for bound in (0.0, 2.0**-30, 1e-8, 0.7, 1.0, 3.5, 65504.0, 65520.0, 1e30, 3.4e38, 3.5e38):
        clamped = values.copy()
        gc.clip_grad_value_(clamped, bound)
        assert_same_bits(clamped, ref_clamp(values, bound), f"clamped to {bound!r}")
        assert (clamped.view(np.uint16)[nan] == values.view(np.uint16)[nan]).all(), "a NaN's bits changed"
    assert kernels.nonfinite_cpu(values.view(_kernel_dtype(half_dtype))) == nonfinite.sum()
    assert gc.all_finite(values) is False and gc.all_finite(values[~nonfinite]) is True
    zeroed = values.copy()
    assert gc.zero_nonfinite_(zeroed) == nonfinite.sum()
    expected = values.view(np.uint16).copy()
    expected[nonfinite] = 0
    assert (zeroed.view(np.uint16) == expected).all()


@HALF_DTYPES
def test_nan_narrows_to_a_quiet_nan(half_dtype):
    """float16: sign | 0x7E00; bfloat16: the float32 NaN's upper half (sign and the
    top of the payload) with the quiet bit set; in a scalar call and in a kernel loop."""
    quiet = [0x7FF8000000000000, 0x7FFC000000000000, 0x7FFFFFFFFFFFFFFF]
    signalling = [0x7FF0000000000001, 0x7FF4000000000000, 0x7FF0200000000000, 0x7FF0000020000000]
    bits = np.array(quiet + signalling, dtype=np.uint64)
    bits = np.concatenate([bits, bits | np.uint64(1 << 63)])
    sign = (bits >> np.uint64(48)) & np.uint64(0x8000)
    if half_dtype == np.float16:
        expected = sign | np.uint64(0x7E00)
    else:
        expected = sign | np.uint64(0x7FC0) | ((bits >> np.uint64(45)) & np.uint64(0x7F))
    expected = expected.astype(np.uint16)
    for narrow in _narrowers(half_dtype):
        assert [int(narrow(v)) for v in bits.view(np.float64)] == expected.tolist(), narrow.__name__
    many = np.tile(bits, 100).view(np.float64)  # long enough for the vector loop
    got = gc.GradAccumulator(1, average=False, accumulator_dtype=half_dtype).step(many)
    assert got.view(np.uint16).tolist() == np.tile(expected, 100).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_serial_and_parallel_drivers_agree_bit_for_bit(dtype, rng, monkeypatch):
    base = random_values((600, 301), dtype, rng)
    leaves = [base, base[::3, ::-2], base.T[5]]

    def everything():
        results = [gc.grad_norm(leaves, p) for p in (1.0, 2.0, 3.0, np.inf)]
        clipped, _ = gc.clip_grad_norm(leaves, 1.0)
        return results, clipped

    serial_norms, serial_clipped = everything()
    monkeypatch.setattr(kernels, "PARALLEL_MIN", 1)
    parallel_norms, parallel_clipped = everything()
    assert serial_norms == parallel_norms
    for s, p in zip(serial_clipped, parallel_clipped):
        assert_same_bits(p, s)


def test_chunks_do_not_depend_on_the_row_order_of_other_leaves(rng):
    # each leaf's partial sums are folded in its own chunk order
    a, b = random_values(50_000, np.float32, rng), random_values((300, 200), np.float32, rng)[:, ::2]
    assert np.array_equal(gc.layer_norms([a, b]), gc.layer_norms([b, a])[::-1])


@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=dtype_id)
def test_clamp_blocks_keep_every_other_bit(dtype):
    """clamp_cpu_ rewrites a block that holds something to clamp whole: the elements it
    does not clamp (NaN with a payload, -0.0, values in range) keep their bits, at and
    across block boundaries; blocks with nothing to clamp come out as they were."""
    block = kernels.CLAMP_BLOCK
    values = np.linspace(-0.9, 0.9, 3 * block + 5).astype(dtype)
    bits = values.view(f"u{values.itemsize}")
    bits[block + 3] = np.array([np.nan], dtype).view(bits.dtype)[0] | 1  # a NaN with a payload
    values[block + 4] = -0.0
    for i, x in ((block - 1, 5.0), (block, -5.0), (3 * block + 4, 7.0)):  # both sides of a boundary, the tail
        values[i] = x
    expected = values.copy()
    expected[[block - 1, 3 * block + 4]] = 1.0
    expected[block] = -1.0
    gc.clip_grad_value_(values, 1.0)
    assert_same_bits(values, expected, nan_payload=True)


@pytest.mark.parametrize("size", STREAM_SIZES)
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=dtype_id)
def test_long_clamps_check_four_blocks_at_once(dtype, size, rng):
    """A long contiguous view is checked a block from each quarter at a time: elements
    beyond the bound at each quarter's edges and in the tail are clamped, every other
    element keeps its bits (a NaN payload, -0.0), in dirty and clean blocks alike."""
    values = rng.uniform(-0.9, 0.9, size).astype(dtype)
    bits = values.view(f"u{values.itemsize}")
    quarter = size // 4
    for k in range(4):
        bits[k * quarter + 3] = np.array([np.nan], dtype).view(bits.dtype)[0] | 1
        values[k * quarter + 4] = -0.0
    expected = values.copy()
    for i in (0, quarter - 1, quarter, 3 * quarter, 4 * quarter - 1, size - 1):
        values[i] = 5.0 if i % 2 else -5.0
        expected[i] = 1.0 if i % 2 else -1.0
    gc.clip_grad_value_(values, 1.0)
    assert_same_bits(values, expected, nan_payload=True)
    untouched = values.copy()
    gc.clip_grad_value_(values, 1.0)  # nothing left to clamp
    assert_same_bits(values, untouched, nan_payload=True)


def test_object_addresses_are_their_ids():
    """The header readers take every object's address from a list's own item pointers,
    or from an object array of them; a list that grew, shrank or was emptied is read as
    it is now."""
    a = np.ones(3)
    objects = [a, [a, a], (1, 2), {"x": a}, None, 3.0, np.float32(2), a[::2]]
    assert kernels._list_layout_confirmed()
    assert kernels.object_ids(objects).tolist() == [id(x) for x in objects]
    assert kernels.object_ids(tuple(objects[:2])).tolist() == [id(a), id(objects[1])]
    for change in (lambda: objects.extend([np.zeros(2)] * 100), lambda: objects.pop(0), objects.clear):
        change()
        assert kernels.object_ids(objects).tolist() == [id(x) for x in objects]
    assert kernels.object_ids(objects).size == 0 and kernels.object_ids([]).size == 0


def test_distinct_addresses_are_told_from_repeats(rng):
    """The duplicate check (a hash set) on address patterns that collide under plain
    masking: one stride of a large power of two, runs of neighbours, random ones."""
    patterns = [
        np.arange(1, 5001, dtype=np.int64) << 30,
        (1 << 40) + 16 * np.arange(20_000, dtype=np.int64),
        rng.integers(1, 1 << 47, 50_000),
        np.array([8], dtype=np.int64),
        np.zeros(0, dtype=np.int64),
    ]
    for addresses in patterns:
        assert kernels._distinct(addresses) == (np.unique(addresses).size == addresses.size)
        if addresses.size > 1:
            for i, j in ((0, addresses.size - 1), (addresses.size // 2, addresses.size // 3)):
                repeated = addresses.copy()
                repeated[i] = repeated[j]
                assert not kernels._distinct(repeated)


def test_many_leaves_with_one_repeat_far_apart_count_once(rng):
    """A repeat among thousands of leaves is found: counted once, scaled once."""
    leaves = [random_values(8, np.float64, rng) for _ in range(3000)]
    expected = math.sqrt(math.fsum(float(x) ** 2 for leaf in leaves for x in leaf))
    assert gc.grad_norm([*leaves, leaves[17]]) == pytest.approx(expected, rel=1e-14)
    once = [leaf.copy() for leaf in leaves]
    repeated = [leaf.copy() for leaf in leaves]
    assert gc.clip_grad_norm_(once, 1.0) == gc.clip_grad_norm_([*repeated, repeated[17]], 1.0)
    for a, b in zip(repeated, once):
        assert_same_bits(a, b)


FLOAT32_FACTORS = {
    # 1 / total: the codes a factor that `float32_factor` finds gives their exact results:
    # "all", "most" (the others, small ones, looked up by block) or "none" (all looked up)
    "float16": {2.0: "all", 3.0: "all", 1001.0: "all", 2.0**20: "all", 1e300: "all", 1 / 0.3: "most"},
    "bfloat16": {
        2.0: "all", 3.0: "all", 1001.0: "all", 2.0**20: "all", 1e300: "most",
        1 / 0.17857187817437192: "most", 2 / (1 - 1e-9): "most",
    },
}  # fmt: skip


@pytest.mark.parametrize(
    "half_dtype, total, codes_in_float32",
    [
        pytest.param(dtype, total, which, id=f"{dtype_id(dtype)}-{total:.6g}")
        for dtype in (np.dtype(np.float16), BFLOAT16)
        for total, which in FLOAT32_FACTORS[dtype.name].items()
    ],
)
def test_scaling_many_half_precision_elements_by_one_coefficient_equals_scaling_each(
    half_dtype, total, codes_in_float32, monkeypatch
):
    """Large half-precision leaves scaled by one coefficient go by every code's exact
    result: in float32 with a factor checked on all 65,536 codes, by lookup for the blocks
    that hold codes the factor misses (near float64 ties; bfloat16 results that are
    subnormal, where the float32 product rounds twice; zero factors). Either way the same
    bits, NaN payloads included, as rounding each product, for every code, in contiguous
    and strided leaves, with coefficients that make ties, subnormals and zeros."""
    codes = ALL_16_BIT_PATTERNS.view(half_dtype)
    tiled = np.tile(codes, _cpu.LOOKUP_MIN // codes.size + 1)

    def scaled():  # one table of more than LOOKUP_MIN elements: contiguous, stepped, reversed
        leaves = [tiled.copy(), np.tile(codes, 3)[::3], codes.copy()[::-1]]
        gc.clip_grads_with_norm_(leaves, 1.0, total, eps=0.0)
        return leaves

    factors = []
    scale_codes_table = kernels.scale_codes_table
    monkeypatch.setattr(kernels, "scale_codes_table", lambda *args: factors.append(args[2:]) or scale_codes_table(*args))
    by_codes = scaled()
    assert len(factors) == 1
    factor, below = factors[0]
    if not kernels.scales_in_float32(_table.witness(half_dtype)):
        codes_in_float32 = "none"
    assert math.isnan(factor) == (codes_in_float32 == "none")
    assert (below == 1) == (codes_in_float32 == "all")
    monkeypatch.setattr(_cpu, "LOOKUP_MIN", math.inf)
    by_element = scaled()
    assert len(factors) == 1
    for a, b in zip(by_codes, by_element):
        assert_same_bits(a, b, nan_payload=True)
    assert not np.array_equal(by_codes[0].view(np.uint16), tiled.view(np.uint16))  # it did scale


@HALF_DTYPES
def test_a_float32_factor_is_used_only_where_it_gives_every_code_its_exact_result(half_dtype):
    """Where the nearest float32 to the coefficient misses a code's exact result, of it
    and its neighbours the one is taken whose missed codes are the smallest in magnitude,
    and ``below`` bounds them tightly: every code of magnitude 0 or from ``below`` on gets
    its exact result, and one of magnitude ``below - 1`` does not."""
    codes = ALL_16_BIT_PATTERNS.view(_kernel_dtype(half_dtype))
    if not kernels.scales_in_float32(_table.witness(half_dtype)):
        assert not kernels._f16c() and half_dtype == np.float16
        return
    magnitude = ALL_16_BIT_PATTERNS.astype(np.int64) & 0x7FFF

    def missed_below(factor):  # 1 + the largest magnitude of a code ``factor`` misses (1: none)
        got = codes.copy()
        kernels.scale32_cpu_(got, factor)
        return int(magnitude[got != exact].max(initial=0)) + 1, got

    cases = {"float16": [0.3, 0.578, 0.551], "bfloat16": [0.17857187817437192, 0.545, 0.5 * (1 - 1e-9)]}
    for coef in cases[half_dtype.name]:
        exact = kernels.scaled_codes(codes, coef)
        nearest = np.float32(coef)
        assert missed_below(nearest)[0] > 1, coef  # the check is needed
        factor, below = kernels.float32_factor(codes, exact, coef, _cpu.FACTOR_TRIES)
        assert abs(factor - coef) <= 3 * np.spacing(nearest), coef
        assert missed_below(factor)[0] == below, coef
        got = missed_below(factor)[1]
        kept = (magnitude == 0) | (magnitude >= below)
        assert np.array_equal(got[kept], exact[kept]), coef
        up, down = np.nextafter(nearest, np.float32(np.inf)), np.nextafter(nearest, np.float32(-np.inf))
        neighbours = [nearest, up, down, np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))]
        assert below == min(missed_below(f)[0] for f in neighbours), coef
