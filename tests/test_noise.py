"""GaussianNoise (SPEC §9): the generators against their published test vectors and
independent Python implementations, the Box-Muller transform against NumPy's functions,
the distribution of the draws, and the stream's independence of threads and of how the
draws are split into calls."""

import math

import numba
import numpy as np
import pytest
import scipy.stats

import gradclip as gc
from gradclip._kernels import private_cpu as kernels
from helpers import raises_with
from reference import (
    CHACHA_CONSTANTS,
    ref_chacha20_block,
    ref_chacha_draws,
    ref_philox4x32_10,
    ref_philox_draws,
)

# Random123's known-answer vectors (kat_vectors, "philox4x32 10"): counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _u32(values):
    return np.array(values, dtype=np.uint32)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert kernels.philox4x32_10(_u32(counter), _u32(key)).tolist() == list(expected)
    assert ref_philox4x32_10(counter, key) == list(expected)


def test_philox_matches_the_reference_on_random_inputs(rng):
    for _ in range(200):
        counter = rng.integers(0, 2**32, 4)
        key = rng.integers(0, 2**32, 2)
        assert kernels.philox4x32_10(_u32(counter), _u32(key)).tolist() == ref_philox4x32_10(counter, key)


# RFC 8439: §2.3.2 (the block function) and Appendix A.1 test vectors 1 and 2.
_RFC_KEY = [int.from_bytes(bytes(range(4 * i, 4 * i + 4)), "little") for i in range(8)]
CHACHA_VECTORS = [
    (
        _RFC_KEY, 1, (0x09000000, 0x4A000000, 0x00000000),
        "e4e7f110 15593bd1 1fdd0f50 c47120a3 c7f4d1c7 0368c033 9aaa2204 4e6cd4c3 "
        "466482d2 09aa9f07 05d7c214 a2028bd9 d19c12b5 b94e16de e883d0cb 4e3c50a2",
    ),
    (
        [0] * 8, 0, (0, 0, 0),
        "ade0b876 903df1a0 e56a5d40 28bd8653 b819d2bd 1aed8da0 ccef36a8 c70d778b "
        "7c5941da 8d485751 3fe02477 374ad8b8 f4b8436a 1ca11815 69b687c3 8665eeb2",
    ),
    (
        [0] * 8, 1, (0, 0, 0),
        "bee7079f 7a385155 7c97ba98 0d082d73 a0290fcb 6965e348 3e53c612 ed7aee32 "
        "7621b729 434ee69c b03371d5 d539d874 281fed31 45fb0a51 1f0ae1ac 6f4d794b",
    ),
]  # fmt: skip


@pytest.mark.parametrize("key, counter, nonce, expected", CHACHA_VECTORS, ids=["2.3.2", "A.1-1", "A.1-2"])
def test_chacha20_rfc8439_vectors(key, counter, nonce, expected):
    words = [int(w, 16) for w in expected.split()]
    # The kernel's layout: a 64-bit counter in words 12-13, a 64-bit nonce in words 14-15.
    # RFC 8439's 96-bit nonce puts its first word where the counter's high word is.
    got = kernels.chacha20_block(_u32([*key, nonce[1], nonce[2]]), counter, nonce[0])
    assert got.tolist() == words
    assert ref_chacha20_block([*CHACHA_CONSTANTS, *key, counter, *nonce]) == words


def test_chacha20_matches_the_reference_on_random_inputs(rng):
    for _ in range(50):
        key = rng.integers(0, 2**32, 10)
        lo, hi = (int(x) for x in rng.integers(0, 2**32, 2))
        expected = ref_chacha20_block([*CHACHA_CONSTANTS, *key[:8], lo, hi, *key[8:]])
        assert kernels.chacha20_block(_u32(key), lo, hi).tolist() == expected


def test_log_and_sincos_within_two_ulps_of_numpy(rng):
    @numba.njit
    def evaluate(u, t):
        log, sin, cos = np.empty(u.size), np.empty(t.size), np.empty(t.size)
        for i in range(u.size):
            log[i] = kernels.log_unit(u[i])
        for i in range(t.size):
            sin[i], cos[i] = kernels.sincos_turns(t[i])
        return log, sin, cos

    edges = [2.0**-52, 0.5, math.sqrt(0.5), np.nextafter(math.sqrt(0.5), 1.0), 0.75, 1.0 - 2.0**-52, 1.0]
    u = np.concatenate([rng.random(200_000) * (1 - 2.0**-52) + 2.0**-52, np.exp(-rng.random(50_000) * 36), edges])
    t = np.concatenate([np.arange(2**12) / 2**12, rng.random(200_000), [0.125, 0.375, 1 - 2.0**-52]])
    log, sin, cos = evaluate(u, t)
    exact = np.log(u)
    ulp = np.spacing(np.abs(exact))
    assert (np.abs(log - exact) <= 2 * np.maximum(ulp, 2.0**-1074)).all()
    assert log[-1] == 0.0
    # 2πt is one rounding away from the exact angle; the error is in absolute terms
    assert np.abs(sin - np.sin(2 * np.pi * t)).max() < 2e-15
    assert np.abs(cos - np.cos(2 * np.pi * t)).max() < 2e-15


def test_seeded_stream_is_philox_then_box_muller():
    noise = gc.GaussianNoise(seed=1234)
    draws = noise.standard_normal(1000)
    expected = ref_philox_draws(noise._key, 0, 500)
    np.testing.assert_allclose(draws, expected, rtol=0, atol=2e-14)


def test_secure_stream_is_chacha20_then_box_muller():
    noise = gc.GaussianNoise(secure=True)
    skip = noise.standard_normal(13)  # the next draws start inside a block
    draws = noise.standard_normal(51)
    expected = ref_chacha_draws(noise._key, 0, 8)
    np.testing.assert_allclose(np.concatenate([skip, draws]), expected[:64], rtol=0, atol=2e-14)


@pytest.mark.parametrize("secure", [False, True], ids=["philox", "chacha20"])
def test_distribution_of_a_million_draws(secure):
    noise = gc.GaussianNoise(secure=True) if secure else gc.GaussianNoise(seed=20240611)
    z = noise.standard_normal(1_000_000)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2 / n)
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(scipy.stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(scipy.stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert np.abs(z).max() < 8.5  # sqrt(-2 ln 2**-52) = 8.49


def test_the_same_bits_for_any_thread_count():
    threads = numba.config.NUMBA_NUM_THREADS
    assert threads >= 2, "needs NUMBA_NUM_THREADS >= 2"
    results = []
    for n in (1, threads):
        numba.set_num_threads(n)
        try:
            results.append(gc.GaussianNoise(seed=5).standard_normal(300_001))
        finally:
            numba.set_num_threads(threads)
    assert results[0].tobytes() == results[1].tobytes()


@pytest.mark.parametrize("secure", [False, True], ids=["philox", "chacha20"])
def test_the_stream_does_not_depend_on_how_draws_are_split(secure):
    one = gc.GaussianNoise(seed=9) if not secure else gc.GaussianNoise(secure=True)
    other = gc.GaussianNoise(seed=9) if not secure else gc.GaussianNoise(secure=True)
    other._key = one._key.copy()  # the same secure key, to compare the streams
    whole = one.standard_normal(40_017)
    parts = [other.standard_normal(n) for n in (1, 2, 7, 16_384, 3, 23_620)]
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert one.draws == other.draws == 40_017


def test_seeds_and_runs():
    a = gc.GaussianNoise(seed=1).standard_normal(100)
    assert a.tobytes() == gc.GaussianNoise(seed=1).standard_normal(100).tobytes()
    assert not np.array_equal(a, gc.GaussianNoise(seed=2).standard_normal(100))
    assert not np.array_equal(a, gc.GaussianNoise(seed=2**64 + 1).standard_normal(100))
    fresh = gc.GaussianNoise()  # seeded from the OS; the seed is readable, so the run repeats
    assert fresh.seed is not None
    assert fresh.standard_normal(10).tobytes() == gc.GaussianNoise(seed=fresh.seed).standard_normal(10).tobytes()
    assert gc.GaussianNoise(seed=3).standard_normal((2, 3)).shape == (2, 3)
    assert gc.GaussianNoise(seed=3).standard_normal(0).size == 0


def test_secure_mode_is_not_reproducible():
    a, b = gc.GaussianNoise(secure=True), gc.GaussianNoise(secure=True)
    assert a.secure and a.seed is None
    assert not np.array_equal(a.standard_normal(64), b.standard_normal(64))
    with raises_with(ValueError, "takes no seed", "os.urandom"):
        gc.GaussianNoise(seed=1, secure=True)
    for method in ("state_dict", "load_state_dict"):
        with raises_with(ValueError, f"GaussianNoise.{method}", "never leaves"):
            getattr(a, method)(*([] if method == "state_dict" else [{"seed": 1, "draws": 0}]))


def test_state_dict_continues_the_stream():
    noise = gc.GaussianNoise(seed=77)
    noise.standard_normal(12_345)
    state = noise.state_dict()
    assert state == {"seed": 77, "draws": 12_345}
    expected = noise.standard_normal(100)
    restored = gc.GaussianNoise(seed=1)
    restored.load_state_dict(state)
    assert restored.standard_normal(100).tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    "state, error, fragment",
    [
        ({"seed": 1}, ValueError, "missing keys ['draws']"),
        ({"seed": 1, "draws": 0, "x": 1}, ValueError, "unexpected keys ['x']"),
        ({"seed": -1, "draws": 0}, ValueError, "seed must be >= 0"),
        ({"seed": 1.5, "draws": 0}, TypeError, "seed must be an int"),
        ({"seed": None, "draws": 0}, TypeError, "seed must be an int"),
        ({"seed": 1, "draws": -3}, ValueError, "draws must be >= 0"),
        ([1, 2], TypeError, "expects a dict"),
    ],
)
def test_bad_state_changes_nothing(state, error, fragment):
    noise = gc.GaussianNoise(seed=5)
    noise.standard_normal(3)
    with raises_with(error, fragment):
        noise.load_state_dict(state)
    assert noise.state_dict() == {"seed": 5, "draws": 3}


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_bad_seed(seed):
    with raises_with(TypeError, "seed must be None or an int >= 0"):
        gc.GaussianNoise(seed=seed)
