"""CPU kernels of ghost norms: per-example squared gradient norms of dense and embedding
layers from their inputs and output gradients, never forming a per-example gradient.

Layout contract. ``a`` is ``(B, T, d_in)``, ``g`` ``(B, T, d_out)``, ``idx`` ``(B, T)``
(any strides; float16 / bfloat16 as their 16-bit patterns, see ``cpu._widen``); a
per-example batch is a C-contiguous ``(B, n)`` array. Results go to a float64 ``out``
``(B,)`` (or ``(B, 2)``: weight and bias).

Dense layers, example ``i`` with ``A = a[i]``, ``G = g[i]`` and weight gradient ``GᵀA``:

- the *Gram route* sums ``(a_t·a_s)(g_t·g_s)`` over ``t, s`` from tiles of the two
  T x T Gram matrices, ``BLOCK`` x ``BLOCK``, upper triangle only (a tile, or a 6 x 6
  block of a diagonal tile, off the diagonal counts twice); cost
  ``T²(d_in + d_out) / 2`` multiply-adds. A work item is a block of T rows against the
  blocks after it;
- the *direct route* forms ``GᵀA`` in tiles of ``OUT_BLOCK`` output rows x ``BLOCK``
  input columns and sums their squares; cost ``T·d_in·d_out``. A work item is a block
  of output rows against every input column.

Tiles are made by `_dots` from operands packed to float64 in chunks of ``KC`` along
the summed axis (features for the Gram route, T for the direct one), so an item's
scratch is about a megabyte whatever T is (one set per thread, made once per call).
Items are dealt to the threads (the Gram route's by cost, `_gram_owners`; the direct
route's, all alike, round-robin); each writes its own partial, and the partials of an
example are folded in item order: results are bit-identical for any thread count. Products and sums are float64 (float32 products are exact in float64);
a route's only error is float64 rounding in its sums.
"""

import numba
import numpy as np
from numba import njit, prange

from .cpu import FAST, _widen, parallel_allowed, sumsq_cpu

ROWS = 6
"""Rows of `_dots`' register block (its columns: 2); packed operands have a multiple of
ROWS rows."""

BLOCK = 84
"""Rows of a packed operand (T rows for the Gram route, features for the direct route)."""

OUT_BLOCK = 2 * BLOCK
"""Output rows of a direct-route item: each item packs all of A's columns once, so more
rows per item pack A fewer times (its tiles then take OUT_BLOCK x d_in float64)."""

KC = 320
"""Elements of the summed axis per packed chunk: two operands of BLOCK x KC float64 fit in L2."""


@njit(fastmath=FAST, cache=True)
def _dots(x, y, k, out, upper):
    """``out[p, q] += x[p, :k] · y[q, :k]`` for float64 ``x`` (P, KC) and ``y`` (Q, KC), P a
    multiple of 6 and Q of 2: twelve dot products at a time, each ``y`` element loaded once
    for six. The twelve sums, two ``y`` and one ``x`` value fill 15 of AVX2's 16 vector
    registers. On two 84 x 320 operands, one core: 45 GFLOP/s, against 39-43 for 3 x 3
    and 44 for 4 x 3; blocks that need more registers (3 x 4, 2 x 6, 7 x 2, 6 x 3, 4 x 4)
    ran at 19-28. ``upper``: ``y`` is ``x``, and only the blocks from each 6 x 6 block on
    the diagonal rightwards are made (the others are not written)."""
    for p in range(0, x.shape[0], ROWS):
        for q in range(p if upper else 0, y.shape[0], 2):
            s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = s40 = s41 = s50 = s51 = 0.0
            for j in range(k):
                y0, y1 = y[q, j], y[q + 1, j]
                x0, x1, x2 = x[p, j], x[p + 1, j], x[p + 2, j]
                x3, x4, x5 = x[p + 3, j], x[p + 4, j], x[p + 5, j]
                s00 += x0 * y0
                s01 += x0 * y1
                s10 += x1 * y0
                s11 += x1 * y1
                s20 += x2 * y0
                s21 += x2 * y1
                s30 += x3 * y0
                s31 += x3 * y1
                s40 += x4 * y0
                s41 += x4 * y1
                s50 += x5 * y0
                s51 += x5 * y1
            out[p, q] += s00
            out[p, q + 1] += s01
            out[p + 1, q] += s10
            out[p + 1, q + 1] += s11
            out[p + 2, q] += s20
            out[p + 2, q + 1] += s21
            out[p + 3, q] += s30
            out[p + 3, q + 1] += s31
            out[p + 4, q] += s40
            out[p + 4, q + 1] += s41
            out[p + 5, q] += s50
            out[p + 5, q + 1] += s51


@njit(fastmath=FAST, cache=True)
def _pack_rows(src, i, r0, n, k0, k, out):
    """``out[r, j] = src[i, r0 + r, k0 + j]`` for ``r < n``, ``j < k`` (rows: T, summed: features).
    Row slices first: indexing ``src`` per element kept the loop from vectorising (3x slower)."""
    for r in range(n):
        source = src[i, r0 + r, k0 : k0 + k]
        row = out[r, :k]
        for j in range(k):
            row[j] = _widen(source[j])


@njit(cache=True)
def _pack_columns(src, i, r0, n, k0, k, out):
    """``out[r, j] = src[i, k0 + j, r0 + r]`` for ``r < n``, ``j < k`` (rows: features, summed: T).
    Writes run along ``out``'s rows: a walk down its columns (KC float64 apart) thrashes L1."""
    for r in range(n):
        for j in range(k):
            out[r, j] = _widen(src[i, k0 + j, r0 + r])


@njit(cache=True)
def _split(n, block):
    """``(blocks, rows)``: ``n`` rows cut into ``blocks`` blocks of ``rows`` (a multiple of
    ROWS, at most ``block``), the last one shorter; even blocks waste less padding than
    full ones."""
    blocks = -(-n // block)
    rows = -(-n // blocks)
    return blocks, -(-rows // ROWS) * ROWS


@njit(cache=True)
def _pack_block(src, i, t0, n, out):
    """Rows ``t0 .. t0 + n`` of ``src[i]``, every feature, as float64 chunks ``out[c]`` of KC."""
    d = src.shape[2]
    for c in range(out.shape[0]):
        _pack_rows(src, i, t0, n, c * KC, min(KC, d - c * KC), out[c])


@njit(cache=True)
def _gram_tile(x, src, i, s0, ns, y, out):
    """``out[p, q] = x_p · src[i, s0 + q]``: ``x`` a row block packed by `_pack_block`, the
    other block packed chunk by chunk into ``y``; ``x`` itself where ``y`` is None, and
    then only the blocks from each 6 x 6 block on the diagonal rightwards (the others
    stay 0)."""
    out[:] = 0.0
    d = src.shape[2]
    for c in range(x.shape[0]):
        k = min(KC, d - c * KC)
        if y is None:
            _dots(x[c], x[c], k, out, True)
        else:
            _pack_rows(src, i, s0, ns, c * KC, k, y)
            _dots(x[c], y, k, out, False)


@njit(cache=True)
def _gram_item(a, g, i, tb, blocks, xa, xg, y, aa, gg):
    """``(weight, bias)`` partial sums of example ``i`` from the Gram tiles of row block
    ``tb`` with blocks ``tb .. blocks - 1``: its part of the upper triangle. The rest:
    one thread's scratch (packed blocks of ``rows`` rows, two tiles)."""
    T, rows = a.shape[1], aa.shape[0]
    t0 = tb * rows
    nt = min(rows, T - t0)
    xa[:, nt:] = 0.0  # padding rows: their dot products are 0
    xg[:, nt:] = 0.0
    _pack_block(a, i, t0, nt, xa)
    _pack_block(g, i, t0, nt, xg)
    weight = 0.0
    bias = 0.0
    for sb in range(tb, blocks):
        s0 = sb * rows
        ns = min(rows, T - s0)
        y[ns:] = 0.0
        if sb == tb:
            _gram_tile(xa, a, i, s0, ns, None, aa)
            _gram_tile(xg, g, i, s0, ns, None, gg)
        else:
            _gram_tile(xa, a, i, s0, ns, y, aa)
            _gram_tile(xg, g, i, s0, ns, y, gg)
        w = 0.0
        b = 0.0
        for p in range(rows):
            for q in range(rows):
                # an entry off the diagonal 6 x 6 blocks stands for its mirror image too
                twice = 1.0 if sb == tb and p // ROWS == q // ROWS else 2.0
                w += twice * aa[p, q] * gg[p, q]
                b += twice * gg[p, q]
        weight += w
        bias += b
    return weight, bias


@njit(cache=True)
def _direct_item(a, g, i, ob, x, y, tiles, column):
    """``(weight, bias)`` partial sums of example ``i`` over block ``ob`` of output rows:
    the squares of the weight gradient's rows ``Σ_t g_t[ob rows] a_tᵀ`` (``tiles``, one
    per block of input rows) and of the bias gradient ``Σ_t g_t`` on the same rows
    (``column``). The arguments after ``ob``: one thread's scratch."""
    T, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    rows_out, rows_in = x.shape[0], y.shape[0]
    o0 = ob * rows_out
    no = min(rows_out, d_out - o0)
    x[no:] = 0.0
    tiles[:] = 0.0
    column[:] = 0.0
    for k0 in range(0, T, KC):
        k = min(KC, T - k0)
        _pack_columns(g, i, o0, no, k0, k, x)
        for r in range(no):
            for j in range(k):
                column[r] += x[r, j]
        for ib in range(tiles.shape[0]):
            i0 = ib * rows_in
            ni = min(rows_in, d_in - i0)
            y[ni:] = 0.0
            _pack_columns(a, i, i0, ni, k0, k, y)
            _dots(x, y, k, tiles[ib], False)
    weight = 0.0
    for ib in range(tiles.shape[0]):
        for p in range(rows_out):
            for q in range(rows_in):
                weight += tiles[ib, p, q] * tiles[ib, p, q]
    bias = 0.0
    for r in range(no):
        bias += column[r] * column[r]
    return weight, bias


@njit(cache=True)
def _gram_owners(B, m, threads):
    """The worker of each Gram-route item (example ``i``, row block ``tb``: item ``i*m + tb``),
    dealt by cost: the longest first, each to the worker with the least work so far. Row
    block ``tb`` makes ``m - tb`` tiles, the first of them a triangle. Dealt round-robin
    with m = 4, one of two workers got blocks 0 and 2 of every example (5 of 8 tiles), and
    two workers ran 1.59x as fast as one; dealt by cost, 1.97x (G1: 59.7 -> 48.4 ms)."""
    owner = np.empty(B * m, np.int64)
    load = np.zeros(threads)
    for tb in range(m):  # by cost: block tb costs m - tb - 1/2 tiles
        for i in range(B):
            t = np.argmin(load)
            owner[i * m + tb] = t
            load[t] += m - tb - 0.5
    return owner


@njit(cache=True)
def _gram_setup(a, g, threads):
    """The Gram route's row blocks ``m``, each worker's scratch (packed blocks of ``rows``
    rows, two tiles), the items' partials and their workers (`_gram_owners`)."""
    B = a.shape[0]
    m, rows = _split(a.shape[1], BLOCK)
    xa = np.empty((threads, -(-a.shape[2] // KC), rows, KC))
    xg = np.empty((threads, -(-g.shape[2] // KC), rows, KC))
    y = np.empty((threads, rows, KC))
    aa = np.empty((threads, rows, rows))
    gg = np.empty((threads, rows, rows))
    return m, xa, xg, y, aa, gg, np.empty((B * m, 2)), _gram_owners(B, m, threads)


@njit(inline="always")
def _gram_worker(t, a, g, m, xa, xg, y, aa, gg, partial, owner):
    """Worker ``t``'s items of the Gram route, into ``partial``."""
    for item in range(owner.size):
        if owner[item] == t:
            w, b = _gram_item(a, g, item // m, item % m, m, xa[t], xg[t], y[t], aa[t], gg[t])
            partial[item, 0] = w
            partial[item, 1] = b


@njit(cache=True, parallel=True)
def _dense_gram_parallel(a, g, threads, out):
    """``out[i] = (weight, bias)`` squared norms by the Gram route; one item per row block,
    the items dealt to ``threads`` workers by `_gram_owners`, each with its own scratch."""
    m, xa, xg, y, aa, gg, partial, owner = _gram_setup(a, g, threads)
    for t in prange(threads):
        _gram_worker(t, a, g, m, xa, xg, y, aa, gg, partial, owner)
    _fold(partial, m, out)


@njit(cache=True)
def _dense_gram_serial(a, g, out):
    """`_dense_gram_parallel` by one worker."""
    m, xa, xg, y, aa, gg, partial, owner = _gram_setup(a, g, 1)
    _gram_worker(0, a, g, m, xa, xg, y, aa, gg, partial, owner)
    _fold(partial, m, out)


@njit(cache=True)
def _direct_setup(a, g, threads):
    """The direct route's blocks of output rows ``m``, each worker's scratch (packed blocks
    of output and input rows, tiles, the bias column) and the items' partials."""
    m, rows_out = _split(g.shape[2], OUT_BLOCK)
    n_in, rows_in = _split(a.shape[2], BLOCK)
    x = np.empty((threads, rows_out, KC))
    y = np.empty((threads, rows_in, KC))
    tiles = np.empty((threads, n_in, rows_out, rows_in))
    column = np.empty((threads, rows_out))
    return m, x, y, tiles, column, np.empty((a.shape[0] * m, 2))


@njit(inline="always")
def _direct_worker(t, threads, a, g, m, x, y, tiles, column, partial):
    """Worker ``t``'s items of the direct route (every ``threads``-th), into ``partial``."""
    for item in range(t, partial.shape[0], threads):
        w, b = _direct_item(a, g, item // m, item % m, x[t], y[t], tiles[t], column[t])
        partial[item, 0] = w
        partial[item, 1] = b


@njit(cache=True, parallel=True)
def _dense_direct_parallel(a, g, threads, out):
    """``out[i] = (weight, bias)`` squared norms by the direct route; one item per block of
    output rows, the items (of equal cost) dealt round-robin to ``threads`` workers, each
    with its own scratch."""
    m, x, y, tiles, column, partial = _direct_setup(a, g, threads)
    for t in prange(threads):
        _direct_worker(t, threads, a, g, m, x, y, tiles, column, partial)
    _fold(partial, m, out)


@njit(cache=True)
def _dense_direct_serial(a, g, out):
    """`_dense_direct_parallel` by one worker."""
    m, x, y, tiles, column, partial = _direct_setup(a, g, 1)
    _direct_worker(0, 1, a, g, m, x, y, tiles, column, partial)
    _fold(partial, m, out)


@njit(cache=True)
def _fold(partial, m, out):
    """``out[i]``: the sums of items ``i*m .. i*m + m - 1`` in order, clamped at 0 (a
    Gram-route sum of a zero gradient may round below it)."""
    for i in range(out.shape[0]):
        for c in range(2):
            s = 0.0
            for item in range(i * m, (i + 1) * m):
                s += partial[item, c]
            out[i, c] = 0.0 if s < 0.0 else s  # NaN stays NaN


@njit(fastmath=FAST, cache=True)
def _row_sumsq(src, i, t):
    s = 0.0
    for j in range(src.shape[2]):
        x = _widen(src[i, t, j])
        s += x * x
    return s


@njit(inline="always")
def _dense_row(a, g, i, out):
    """``out[i] = (‖a_i‖²‖g_i‖², ‖g_i‖²)`` for T = 1: the outer product's squared norm."""
    gg = _row_sumsq(g, i, 0)
    out[i, 0] = _row_sumsq(a, i, 0) * gg
    out[i, 1] = gg


@njit(cache=True, parallel=True)
def _dense_rows_parallel(a, g, out):
    for i in prange(a.shape[0]):
        _dense_row(a, g, i, out)


@njit(cache=True)
def _dense_rows_serial(a, g, out):
    for i in range(a.shape[0]):
        _dense_row(a, g, i, out)


def dense_sq_norms(a, g, bias, gram):
    """Squared per-example norms of a dense layer's weight gradient (plus its bias
    gradient's if ``bias``), float64 ``(B,)``, by the Gram route if ``gram`` else the
    direct route; ``a`` ``(B, T, d_in)``, ``g`` ``(B, T, d_out)``, T, d_in, d_out > 0.
    Serial in a child forked after Numba's thread pool started (see kernels.cpu)."""
    out = np.empty((a.shape[0], 2))
    parallel = parallel_allowed()
    if a.shape[0]:
        if a.shape[1] == 1:
            (_dense_rows_parallel if parallel else _dense_rows_serial)(a, g, out)
        elif parallel:
            (_dense_gram_parallel if gram else _dense_direct_parallel)(a, g, numba.get_num_threads(), out)
        else:
            (_dense_gram_serial if gram else _dense_direct_serial)(a, g, out)
    return out[:, 0] + out[:, 1] if bias else out[:, 0].copy()


def gram_wins(T, d_in, d_out):
    """Whether the Gram route costs fewer multiply-adds: ``T²(d_in + d_out) / 2 < T·d_in·d_out``."""
    return T * (d_in + d_out) < 2 * d_in * d_out


@njit(fastmath=FAST, cache=True)
def _add_row(acc, src, i, t):
    for j in range(acc.size):
        acc[j] += _widen(src[i, t, j])


@njit(fastmath=FAST, cache=True)
def _sumsq(v):
    s = 0.0
    for j in range(v.size):
        s += v[j] * v[j]
    return s


@njit(inline="always")
def _embedding_example(idx, g, i, acc):
    """``Σ_v ‖Σ_{t: idx[i, t] = v} g[i, t]‖²``: the positions of example ``i`` sorted by
    index (stably), each run of equal indices summed in float64 (in ``acc``) in position
    order."""
    T = g.shape[1]
    order = np.argsort(idx[i], kind="mergesort")
    total = 0.0
    start = 0
    while start < T:
        first = order[start]
        end = start + 1
        while end < T and idx[i, order[end]] == idx[i, first]:
            end += 1
        if end == start + 1:
            total += _row_sumsq(g, i, first)
        else:
            acc[:] = 0.0
            for r in range(start, end):
                _add_row(acc, g, i, order[r])
            total += _sumsq(acc)
        start = end
    return total


@njit(cache=True, parallel=True)
def _embedding_parallel(idx, g, out):
    for i in prange(g.shape[0]):
        out[i] = _embedding_example(idx, g, i, np.empty(g.shape[2]))


@njit(cache=True)
def _embedding_serial(idx, g, out):
    acc = np.empty(g.shape[2])
    for i in range(g.shape[0]):
        out[i] = _embedding_example(idx, g, i, acc)


def embedding_sq_norms(idx, g):
    """Squared per-example norms of an embedding's weight gradient, float64 ``(B,)``;
    ``idx`` ``(B, T)`` integers, ``g`` ``(B, T, d)``. Serial in a child forked after
    Numba's thread pool started."""
    out = np.zeros(g.shape[0])
    if g.size:
        (_embedding_parallel if parallel_allowed() else _embedding_serial)(idx, g, out)
    return out


@njit(cache=True, parallel=True)
def _rows_sumsq_parallel(x, out):
    for i in prange(x.shape[0]):
        out[i] += sumsq_cpu(x[i])


@njit(cache=True)
def _rows_sumsq_serial(x, out):
    for i in range(x.shape[0]):
        out[i] += sumsq_cpu(x[i])


def add_per_example_sq_norms(x, out):
    """``out[i] += ‖x[i]‖²`` (float64) for a C-contiguous ``(B, n)`` array ``x``; serial in
    a child forked after Numba's thread pool started."""
    if x.size:
        (_rows_sumsq_parallel if parallel_allowed() else _rows_sumsq_serial)(x, out)
