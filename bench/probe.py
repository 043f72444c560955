"""The bandwidth probe: what a memory-bound pass over a workload's bytes costs here.

One contiguous float32 buffer of the workload's total bytes is processed by a
two-pass Numba kernel, the least work a global-norm clip can do: pass 1 sums
the squares in float64 (reads every byte, each block as four streams), pass 2
scales in place (reads and writes every byte). Both split the buffer into
``BLOCKS`` blocks under ``prange`` (each block runs a serial, vectorised loop);
``np.copyto`` between two such buffers is a second read+write reference.

Each pass is timed with all of Numba's threads and with one thread, and the
faster median is the limit. On a quiet machine that is the parallel run; on a
loaded one (2 cores shared with other jobs) a parallel launch can wait
milliseconds for a core, and the probe must stay a bound on what a Numba pass
over these bytes can achieve.
"""

import itertools

import numba
import numpy as np
from numba import njit, prange

from timing import Timed, measure_interleaved

BLOCKS = 64
FAST = {"reassoc", "contract"}


@njit(fastmath=FAST, cache=True)
def block_sum_of_squares(block):
    """The block's four quarters side by side, as gradclip's norm kernels read: on an
    Intel Xeon (Emerald Rapids) a core read 1.2-1.3x faster so than as one stream."""
    q = block.size // 4
    s0 = s1 = s2 = s3 = 0.0
    for i in range(q):
        x0, x1 = np.float64(block[i]), np.float64(block[q + i])
        x2, x3 = np.float64(block[2 * q + i]), np.float64(block[3 * q + i])
        s0 += x0 * x0
        s1 += x1 * x1
        s2 += x2 * x2
        s3 += x3 * x3
    for i in range(4 * q, block.size):
        x = np.float64(block[i])
        s0 += x * x
    return (s0 + s1) + (s2 + s3)


@njit(fastmath=FAST, cache=True)
def _block_scale(block, coef):
    for i in range(block.size):
        block[i] *= coef


@njit(parallel=True, fastmath=FAST, cache=True)
def sum_of_squares(buffer):
    """Pass 1: the sum of squares of ``buffer`` in float64."""
    n = buffer.size
    partial = np.zeros(BLOCKS)
    for block in prange(BLOCKS):
        partial[block] = block_sum_of_squares(buffer[n * block // BLOCKS : n * (block + 1) // BLOCKS])
    return partial.sum()


@njit(parallel=True, fastmath=FAST, cache=True)
def scale_in_place(buffer, coef):
    """Pass 2: ``buffer *= coef``."""
    n = buffer.size
    for block in prange(BLOCKS):
        _block_scale(buffer[n * block // BLOCKS : n * (block + 1) // BLOCKS], coef)


READ, READ_WRITE, COPYTO = "read", "read_write", "copyto"


def measure_probe(nbytes, repeats):
    """Median seconds and GB/s of the probe's passes over ``nbytes`` bytes.

    Returns ``read_s``, ``read_write_s``, ``copyto_s`` (each the faster of the
    all-threads and one-thread medians), ``two_pass_s`` (read + read_write), the
    matching ``*_gbps``, and ``by_threads``: the medians per thread count.
    """
    buffer = np.ones(max(1, nbytes // 4), np.float32)
    destination = np.empty_like(buffer)
    halve_then_double = itertools.cycle(np.float32([0.5, 2.0]))  # exact: the data never drifts
    all_threads = numba.config.NUMBA_NUM_THREADS

    def with_threads(threads, prepare_argument):
        def prepare():
            numba.set_num_threads(threads)
            return prepare_argument()

        return prepare

    def back_to_all_threads(_):
        numba.set_num_threads(all_threads)

    passes = {
        READ: (lambda _: sum_of_squares(buffer), lambda: None),
        READ_WRITE: (lambda coef: scale_in_place(buffer, coef), lambda: next(halve_then_double)),
    }
    items = [
        Timed((name, threads), call, with_threads(threads, argument), back_to_all_threads)
        for name, (call, argument) in passes.items()
        for threads in sorted({all_threads, 1})
    ]
    items.append(Timed((COPYTO, 1), lambda _: np.copyto(destination, buffer)))
    for item in items:  # compile / load from cache, touch the pages
        argument = item.prepare()
        item.call(argument)
        item.finish(argument)
    medians = {key: samples.median for key, samples in measure_interleaved(items, repeats).items()}
    best = {name: min(seconds for (key, _), seconds in medians.items() if key == name) for name in (*passes, COPYTO)}
    return {
        "bytes": buffer.nbytes,
        "read_s": best[READ],
        "read_write_s": best[READ_WRITE],
        "copyto_s": best[COPYTO],
        "two_pass_s": best[READ] + best[READ_WRITE],
        "read_gbps": buffer.nbytes / best[READ] / 1e9,
        "read_write_gbps": 2 * buffer.nbytes / best[READ_WRITE] / 1e9,
        "copyto_gbps": 2 * buffer.nbytes / best[COPYTO] / 1e9,
        "by_threads": {
            f"{name} {threads} thread{'s' * (threads > 1)}": seconds for (name, threads), seconds in medians.items()
        },
    }
