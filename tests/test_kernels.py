"""The CPU kernel layer itself: half-precision codecs over every bit pattern, rounding
against the references, and the serial and parallel drivers agreeing bit for bit."""

import numpy as np
import pytest

import gradclip as gc
from gradclip._kernels import cpu as kernels
from helpers import DTYPES, REAL_DTYPES, assert_same_bits, dtype_id, random_values
from reference import BFLOAT16, round_to

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


def _hard_float64_values(rng, half_dtype):
    """Values at and around every rounding boundary of ``half_dtype``, plus random ones."""
    with np.errstate(invalid="ignore"):  # NaN patterns; dropped below
        halves = ALL_16_BIT_PATTERNS.view(half_dtype).astype(np.float64)
    halves = halves[np.isfinite(halves)]
    ordered = np.unique(halves)
    midpoints = (ordered[:-1] + ordered[1:]) / 2  # exact in float64: ties
    nudged = np.concatenate([np.nextafter(midpoints, np.inf), np.nextafter(midpoints, -np.inf)])
    wide = rng.standard_normal(20_000) * 10.0 ** rng.uniform(-45, 40, 20_000)
    return np.concatenate([halves, midpoints, nudged, wide, [np.inf, -np.inf, 0.0, -0.0, 1e300]])


@pytest.mark.parametrize("half_dtype", [np.dtype(np.float16), BFLOAT16], ids=dtype_id)
def test_rounding_to_half_precision_is_nearest_even_once(half_dtype, rng):
    values = _hard_float64_values(rng, half_dtype)
    # scaling by 1.0 is the identity on the float64 values, so the leaf receives round(values)
    as_leaf = np.zeros(values.size, half_dtype)
    kernel_dtype = np.uint16 if half_dtype == np.float16 else np.int16
    narrow = kernels._f64_to_f16 if half_dtype == np.float16 else kernels._f64_to_bf16
    got = np.array([narrow(v) for v in values], dtype=np.uint32)
    as_leaf.view(kernel_dtype)[:] = got.astype(np.uint16).view(kernel_dtype)
    assert_same_bits(as_leaf, round_to(values, half_dtype))


def test_nan_stays_nan_when_narrowed():
    for narrow in (kernels._f64_to_f16, kernels._f64_to_bf16):
        bits = int(narrow(np.nan))
        exponent_all_ones = 0x7C00 if narrow is kernels._f64_to_f16 else 0x7F80
        assert bits & exponent_all_ones == exponent_all_ones and bits & ~(exponent_all_ones | 0x8000)


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


def test_object_addresses_are_their_ids():
    """The header readers take every object's address from an object array of them."""
    a = np.ones(3)
    objects = [a, [a, a], (1, 2), {"x": a}, None, 3.0, np.float32(2), a[::2]]
    assert kernels._addresses(objects).tolist() == [id(x) for x in objects]
    assert kernels._addresses(tuple(objects[:2])).tolist() == [id(a), id(objects[1])]
    assert kernels._addresses([]).size == 0
