"""CUDA kernels of ghost norms: twins of ``kernels/ghost_cpu.py`` (Gram route only).

Imported only when a GPU array reaches a ghost-norm function (``gradclip._ghost_cuda``);
importing it compiles nothing. Each kernel is made once per element type (per pair for
two operands: bfloat16 is decoded from its bits, the others are read natively), compiled
on first use and cached on disk.

Layout contract. Every operand is a 1-d view spanning its memory, with the element
``(i, t, j)`` at ``off + i * sb + t * st + j * sd`` (``off`` and the steps in elements,
any sign: strided, reversed and broadcast inputs are read where they lie). A dense
layer's ``a`` is ``(B, T, d_in)``, ``g`` ``(B, T, d_out)``; an embedding's ``idx``
``(B, T)`` (any integer type), ``g`` ``(B, T, d)``. Results are float64.

Dense layers take the *Gram route*, ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` per example (the
direct route, the CPU's cache-blocking alternative for long sequences, has no twin):
each thread of a block of ``TILE`` x ``TILE`` owns one (t, s) pair of a tile; the block
stages ``TILE`` features of the tile's rows at a time in shared memory (float64), and
each thread sums both dot products; an *item* is one example's row of tiles ``tb`` against the tiles from ``tb``
on (the upper triangle: a tile off the diagonal counts twice), so each item leaves one
partial weight and one bias sum. Without a sequence axis (T = 1) the norm is
``‖a‖²‖g‖²``, one block per example (`dense_rows_cuda`). Embeddings: an item is one
position ``t`` of an example; if no earlier position holds its index, the block sums
the output gradients of every position holding it, feature by feature in position
order (the CPU's run sums), and leaves the squared norm of that row; other items leave
0. `fold_cuda` then adds each example's partials in item order.

No float atomics: each block folds its threads' sums in a fixed tree (``_block_fold``),
and the partials are folded in a fixed order by a second launch: the bits are the same
at every launch. Products and sums are float64; no fastmath (NaN and inf propagate).
"""

import functools
import math

from numba import cuda, float64

from .cuda import _block_fold, _kernel, codec

TILE = 16
"""Rows (and staged features) of a Gram tile, a power of two; a Gram block has TILE x TILE
threads. It is compiled into the kernels (the stage's shape): tests patch it on the
simulator only."""

STAGE = (TILE, TILE + 1)
"""A staged tile in shared memory: one padding column keeps a warp's reads of a column
on distinct banks."""

THREADS = 128
"""Threads of the other kernels' blocks (a power of two, for ``_block_fold``)."""


# ----------------------------------------------------------------- dense layers


def _tile_dots(widen):
    """``tile_dot(...)``: the dot product of rows ``t0 + p`` and ``s0 + q`` of one example
    (rows at or past ``T`` read as zeros), staged ``TILE`` features at a time."""

    @cuda.jit(device=True)
    def tile_dot(x, base, st, sd, T, d, t0, s0, p, q, rows, cols):
        acc = 0.0
        t_in = t0 + p < T
        s_in = s0 + p < T
        for k0 in range(0, d, TILE):
            k = k0 + q
            rows[p, q] = widen(x[base + (t0 + p) * st + k * sd]) if t_in and k < d else 0.0
            cols[p, q] = widen(x[base + (s0 + p) * st + k * sd]) if s_in and k < d else 0.0
            cuda.syncthreads()
            for j in range(TILE):
                acc += float(rows[p, j]) * float(cols[q, j])  # float(): see `fold_cuda`
            cuda.syncthreads()  # the stage is refilled next
        return acc

    return tile_dot


def _dense_gram(name, widen_a, widen_g):
    dot_a, dot_g = _tile_dots(widen_a), _tile_dots(widen_g)

    def dense_gram(a, g, partial, B, T, m, d_in, d_out, a_off, a_sb, a_st, a_sd, g_off, g_sb, g_st, g_sd):
        """``partial[item]`` (weight) and ``partial[B * m + item]`` (bias) of items
        ``item = i * m + tb``: the pairs of tile row ``tb`` with tiles ``tb .. m - 1``."""
        rows = cuda.shared.array(STAGE, float64)
        cols = cuda.shared.array(STAGE, float64)
        thread = cuda.threadIdx.x
        p = thread // TILE
        q = thread - p * TILE
        for item in range(cuda.blockIdx.x, B * m, cuda.gridDim.x):
            i = item // m
            tb = item - i * m
            a_base = a_off + i * a_sb
            g_base = g_off + i * g_sb
            weight = 0.0
            bias = 0.0
            for sb in range(tb, m):
                aa = dot_a(a, a_base, a_st, a_sd, T, d_in, tb * TILE, sb * TILE, p, q, rows, cols)
                gg = dot_g(g, g_base, g_st, g_sd, T, d_out, tb * TILE, sb * TILE, p, q, rows, cols)
                twice = 1.0 if sb == tb else 2.0  # a tile off the diagonal stands for its mirror too
                weight += twice * (aa * gg)
                bias += twice * gg
            weight = _block_fold(weight, False)
            bias = _block_fold(bias, False)
            if thread == 0:
                partial[item] = weight
                partial[B * m + item] = bias

    return _kernel(name, dense_gram)


def _dense_rows(name, widen_a, widen_g):
    def dense_rows(a, g, out, B, d_in, d_out, a_off, a_sb, a_sd, g_off, g_sb, g_sd, bias):
        """``out[i] = ‖a_i‖²‖g_i‖²`` (``+ ‖g_i‖²`` if ``bias``): no sequence axis."""
        thread = cuda.threadIdx.x
        threads = cuda.blockDim.x
        for i in range(cuda.blockIdx.x, B, cuda.gridDim.x):
            sa = 0.0
            for j in range(thread, d_in, threads):
                x = widen_a(a[a_off + i * a_sb + j * a_sd])
                sa += x * x
            sg = 0.0
            for j in range(thread, d_out, threads):
                y = widen_g(g[g_off + i * g_sb + j * g_sd])
                sg += y * y
            sa = _block_fold(sa, False)
            sg = _block_fold(sg, False)
            if thread == 0:
                out[i] = sa * sg + sg if bias != 0 else sa * sg

    return _kernel(name, dense_rows)


@cuda.jit(cache=True)
def fold_cuda(partial, out, B, m, parts):
    """``out[i]``: the sum over ``c < parts`` of ``partial[c * B * m + i * m + k]`` summed
    over ``k`` in order, each clamped at 0 (a Gram sum of a zero gradient may round
    below it; NaN stays NaN). One thread per example.

    ``float()`` of a float64 element is a no-op on the GPU; on the simulator it makes the
    NumPy scalar a Python float, whose inf - inf is NaN without a warning, as on a GPU."""
    i = cuda.grid(1)
    if i < B:
        total = 0.0
        for c in range(parts):
            s = 0.0
            start = c * B * m + i * m
            for k in range(start, start + m):
                s += float(partial[k])
            total += 0.0 if s < 0.0 else s
        out[i] = total


# -------------------------------------------------------------------- embeddings


def _embedding(name, widen):
    def embedding(idx, g, partial, B, T, d, x_off, x_sb, x_st, g_off, g_sb, g_st, g_sd):
        """``partial[i * T + t]``: the squared norm of ``Σ_{s: idx_s = idx_t} g_s`` if ``t``
        is the first position of example ``i`` holding its index, else 0."""
        thread = cuda.threadIdx.x
        threads = cuda.blockDim.x
        for item in range(cuda.blockIdx.x, B * T, cuda.gridDim.x):
            i = item // T
            t = item - i * T
            x_base = x_off + i * x_sb
            g_base = g_off + i * g_sb
            index = idx[x_base + t * x_st]
            first = True
            for s in range(t):  # the same loads in every thread: uniform, no fold needed
                if idx[x_base + s * x_st] == index:
                    first = False
                    break
            total = 0.0
            if first:
                for j in range(thread, d, threads):
                    row = 0.0
                    for s in range(t, T):
                        if idx[x_base + s * x_st] == index:
                            row += widen(g[g_base + s * g_st + j * g_sd])
                    total += row * row
            total = _block_fold(total, False)
            if thread == 0:
                partial[item] = total

    return _kernel(name, embedding)


# ----------------------------------------------------------------- small passes


def _clip_factors(name, widen):
    def clip_factors(sq, out, n, off, step, max_norm, eps):
        """``out[k] = min(1, max_norm / (√sq[k] + eps))``: 1 where ``√sq[k] + eps = 0``, 0
        where the norm is NaN or inf (a negative ``sq[k]`` gives a NaN norm)."""
        for k in range(cuda.grid(1), n, cuda.gridsize(1)):
            x = widen(sq[off + k * step])
            norm = math.sqrt(x) if x >= 0.0 else math.nan
            if not math.isfinite(norm):
                f = 0.0
            elif norm + eps == 0.0:
                f = 1.0
            else:
                r = max_norm / (norm + eps)
                f = r if r < 1.0 else 1.0
            out[k] = f

    return _kernel(name, clip_factors)


@cuda.jit(cache=True)
def square_cuda_(x, n):
    """``x[k] = x[k]²`` in place (float64)."""
    for k in range(cuda.grid(1), n, cuda.gridsize(1)):
        x[k] = x[k] * x[k]


# ------------------------------------------------------------------- kernel sets


class DenseKernels:
    """The dense-layer kernels of one pair of codecs (activations, output gradients)."""

    def __init__(self, ca, cg):
        self.dense_gram_cuda = _dense_gram("dense_gram_cuda", ca.widen, cg.widen)
        self.dense_rows_cuda = _dense_rows("dense_rows_cuda", ca.widen, cg.widen)


def dense_kernels_for(a_dtype, g_dtype):
    """The `DenseKernels` of activations of ``a_dtype`` and gradients of ``g_dtype``."""
    return _dense_set(codec(a_dtype), codec(g_dtype))


@functools.cache
def _dense_set(ca, cg):
    return DenseKernels(ca, cg)


def embedding_for(g_dtype):
    """``embedding_cuda`` for output gradients of ``g_dtype`` (indices of any integer type)."""
    return _embedding_of(codec(g_dtype))


@functools.cache
def _embedding_of(c):
    return _embedding("embedding_cuda", c.widen)


def clip_factors_for(dtype):
    """``clip_factors_cuda`` for squared norms of ``dtype`` (a real float or integer type)."""
    return _clip_factors_of(codec(dtype))


@functools.cache
def _clip_factors_of(c):
    return _clip_factors("clip_factors_cuda", c.widen)
