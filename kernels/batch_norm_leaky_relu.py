"""Fused BatchNorm + LeakyReLU: Triton kernels, launchers, autograd Function.

Memory layouts. x of shape (N, C, *) with S = prod(*) is handled as a row-major matrix in one of two
layouts, so that the contiguous axis is always the tile's fast axis (128-bit loads):
  ROWS    (N, C) input, (N, C, 1, 1), or channels_last: an (M = N*S, C) matrix; channel = column.
  PLANES  contiguous NCHW: an (N*C, S) matrix; channel of row r = r % C.
Anything else is made contiguous first (a copy, never a wrong stride).

Forward, training:
  fits one tile  _bnlr_fwd_fused_kernel: one program per channel (block) holds the whole channel in
                 registers: exact two-pass statistics, running-stat update, normalise, one read + one
                 write of x.
  otherwise      _bnlr_fwd_stats_kernel   (C-blocks x P) grid of partial (count, mean, M2) triples
                 [sync: merge locally, all-gather the (3, C) triples]
                 _bnlr_fwd_finalize_kernel Chan-merge the triples, update running stats, fold
                                           weight/bias into per-channel scale/shift
                 _bnlr_fwd_kernel          y = leaky((x - mean) * scale + shift)
Backward: the same shape -- _bnlr_bwd_fused_kernel, or _bnlr_bwd_reduce_kernel (partial sums of h and
h * x_hat, h = leaky'(y) * g with the mask recomputed from x) -> [sync: all-reduce the (2, C) sums] ->
_bnlr_bwd_finalize_kernel -> _bnlr_bwd_kernel (dx). No float atomics: every program writes its own
partial slot, so results are bitwise deterministic.

Saved for backward: x plus five per-channel fp32 vectors (mean, rstd, scale, shift, count).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# --------------------------------------------------------------------------------------------------
# Tuning constants (the launchers' only knobs; the compile report and the tests read them from here).

FUSED_MAX_TILE = 4096  # one channel (block) held in registers: 16 fp32 per thread at 8 warps, no spills
STATS_TILE = 2048  # elements per reduction tile: 8 KB fp32, 16 per thread at 4 warps (4 x ld.v4)
ELEMENTWISE_TILE = 4096  # elements per normalise / dx program: enough bytes in flight per SM
MAX_BLOCK_K = 1024  # longest contiguous strip per tile row; wider rows are tiled along K
ROWS_BLOCK_C = 128  # (N, C) layout: channels per fused program (512 B contiguous per row)
STATS_BLOCK_C = 64  # (N, C) layout: channels per reduction tile
FINALIZE_BLOCK_C = 64  # channels per finalize program
FINALIZE_BLOCK_P = 32  # partials merged per finalize step
PROGRAMS_PER_SM = 4  # split-path reduction grids aim at this many programs per SM (latency hiding)
# The interpreter runs programs one after another at ~10 ms each whatever their size, so on CPU the
# grids are few and the channel blocks wide. Same kernels, other constexprs; the compile report
# checks the GPU ones.
CPU_TARGET_PROGRAMS = 8
CPU_BLOCK_C = 1024


def _num_warps(tile: int) -> int:
    return max(1, min(8, tile // 512))


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan et al.); exact where sum/sum-of-squares cancels."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _leaky(y, slope):
    return tl.where(y > 0, y, y * slope)


@triton.jit
def _bn_affine(x, mean, scale, shift):
    # (x - mean) first: x * scale + (shift - mean * scale) cancels catastrophically when |mean| >> std.
    # Forward and backward call this one helper so the recomputed LeakyReLU mask matches bit for bit.
    return (x - mean) * scale + shift


@triton.jit
def _aligned(K, K_ALIGN: tl.constexpr):
    """K, with its divisibility by K_ALIGN made visible to the compiler.

    triton only knows an int argument is 16-divisible; a 14x14 map (K = 196) is 4-divisible, which
    is what fp32 128-bit loads need (row starts 16-byte aligned, masks constant over 4 elements).
    The value is unchanged: the launcher passes K_ALIGN = gcd(K, 16); the ops fold to a shift pair.
    """
    return (K // K_ALIGN) * K_ALIGN


@triton.jit
def _tile_offsets(
    pid_c,
    t,
    N_ROWS,
    C,
    K,
    ROWS_LAYOUT: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Offsets and mask of reduction tile `t` of channel (block) `pid_c`.

    ROWS: tile t covers rows [t*BLOCK_R, +BLOCK_R) of channels [pid_c*BLOCK_K, +BLOCK_K).
    PLANES: tile t of channel pid_c covers samples n in row block t // KT and spatial block t % KT.
    """
    K = _aligned(K, K_ALIGN)
    if ROWS_LAYOUT:  # K == C
        rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < N_ROWS
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        mask = rmask[:, None] & (cols < K)[None, :]
        count = tl.sum(rmask.to(tl.float32), axis=0)
    else:
        kt = tl.cdiv(K, BLOCK_K)
        n = (t // kt) * BLOCK_R + tl.arange(0, BLOCK_R)
        s = (t % kt) * BLOCK_K + tl.arange(0, BLOCK_K)
        nmask = n < N_ROWS
        smask = s < K
        offs = (n.to(tl.int64) * C + pid_c)[:, None] * K + s[None, :]
        mask = nmask[:, None] & smask[None, :]
        count = tl.sum(nmask.to(tl.float32), axis=0) * tl.sum(smask.to(tl.float32), axis=0)
    return offs, mask, count


@triton.jit
def _reduce_tile(v, ROWS_LAYOUT: tl.constexpr):
    """Per-channel sum of a tile: over rows (ROWS, a vector of channels) or everything (PLANES)."""
    if ROWS_LAYOUT:
        return tl.sum(v, axis=0)
    else:
        return tl.sum(tl.sum(v, axis=1), axis=0)


@triton.jit
def _channels(pid_c, C, ROWS_LAYOUT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Channel index (vector for ROWS, scalar for PLANES) and mask of reduction program pid_c."""
    if ROWS_LAYOUT:
        chan = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
        return chan, chan < C
    else:
        return pid_c, pid_c < C


@triton.jit
def _channel_vector(PTR, pid_c, C, ROWS_LAYOUT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load a per-channel fp32 vector for a reduction tile, broadcastable against it."""
    if ROWS_LAYOUT:
        cols = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
        return tl.load(PTR + cols, mask=cols < C, other=0.0)[None, :]
    else:
        return tl.load(PTR + pid_c)


@triton.jit
def _tile(pid_r, pid_k, TOTAL_ROWS, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows, columns, their masks, the 2-D mask and int64 offsets of elementwise tile (pid_r, pid_k)
    of the (TOTAL_ROWS, K) matrix view (K already passed through _aligned, so loads stay 128-bit)."""
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < TOTAL_ROWS
    kmask = cols < K
    mask = rmask[:, None] & kmask[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    return rows, cols, rmask, kmask, mask, offs


@triton.jit
def _channel_param(PTR, rows, cols, rmask, kmask, C, ROWS_LAYOUT: tl.constexpr):
    """Per-channel fp32 vector for an elementwise tile, broadcastable against it.

    ROWS: channel = column, one value per column. PLANES: channel of row r = r % C, one per row.
    """
    if ROWS_LAYOUT:
        return tl.load(PTR + cols, mask=kmask, other=0.0)[None, :]
    else:
        return tl.load(PTR + rows % C, mask=rmask, other=0.0)[:, None]


@triton.jit
def _finalize_channels(
    chan,
    cmask,
    count,
    mean,
    m2,
    W,
    B,
    RM,
    RV,
    NBT,
    MEAN,
    RSTD,
    SCALE,
    SHIFT,
    momentum,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,
):
    """Per-channel epilogue shared by the fused and the finalize kernels.

    Updates running stats with the unbiased variance (nn.BatchNorm's convention) and folds
    weight/bias into scale/shift; stores what the normalise pass and backward need.
    """
    var = m2 / tl.maximum(count, 1.0)  # count is 0 only in masked-off lanes past C
    rstd = 1.0 / tl.sqrt(var + eps)
    if UPDATE_RUNNING:
        if CUMULATIVE:  # momentum=None: cumulative average; the launcher already incremented NBT
            factor = 1.0 / tl.load(NBT).to(tl.float32)
        else:
            factor = momentum
        rm = tl.load(RM + chan, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(RV + chan, mask=cmask, other=0.0).to(tl.float32)
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        tl.store(RM + chan, (rm + factor * (mean - rm)).to(RM.dtype.element_ty), mask=cmask)
        tl.store(RV + chan, (rv + factor * (unbiased - rv)).to(RV.dtype.element_ty), mask=cmask)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + chan, mask=cmask, other=1.0).to(tl.float32)
    shift = tl.zeros_like(rstd)
    if HAS_B:
        shift = tl.load(B + chan, mask=cmask, other=0.0).to(tl.float32)
    tl.store(MEAN + chan, mean, mask=cmask)
    tl.store(RSTD + chan, rstd, mask=cmask)
    tl.store(SCALE + chan, scale, mask=cmask)
    tl.store(SHIFT + chan, shift, mask=cmask)
    # Returned, not re-read: another thread's global store is not visible without a barrier.
    return scale, shift


@triton.jit
def _bnlr_fwd_fused_kernel(
    X,
    Y,
    W,
    B,
    RM,
    RV,
    NBT,
    MEAN,
    RSTD,
    SCALE,
    SHIFT,
    N_ROWS,
    C,
    K,
    momentum,
    eps,
    slope,
    ROWS_LAYOUT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Training forward when a whole channel (block) fits one tile: one read and one write of x."""
    pid_c = tl.program_id(0)
    offs, mask, count = _tile_offsets(pid_c, 0, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = _reduce_tile(x, ROWS_LAYOUT) / count
    if ROWS_LAYOUT:
        d = tl.where(mask, x - mean[None, :], 0.0)
    else:
        d = tl.where(mask, x - mean, 0.0)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    m2 = _reduce_tile(d * d, ROWS_LAYOUT)
    scale, shift = _finalize_channels(
        chan,
        cmask,
        count,
        mean,
        m2,
        W,
        B,
        RM,
        RV,
        NBT,
        MEAN,
        RSTD,
        SCALE,
        SHIFT,
        momentum,
        eps,
        HAS_W,
        HAS_B,
        UPDATE_RUNNING,
        CUMULATIVE,
    )
    if ROWS_LAYOUT:
        y = _leaky(_bn_affine(x, mean[None, :], scale[None, :], shift[None, :]), slope)
    else:
        y = _leaky(_bn_affine(x, mean, scale, shift), slope)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bnlr_fwd_stats_kernel(
    X,
    PART,
    N_ROWS,
    C,
    K,
    TILES_PER_PROG,
    P,
    ROWS_LAYOUT: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial (count, mean, M2) of channel (block) program_id(0) over tile range program_id(1).

    PART is (3, C, P) fp32; each program owns column p, so the merge is deterministic.
    """
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    if ROWS_LAYOUT:
        n_tiles = tl.cdiv(N_ROWS, BLOCK_R)
        n_acc = 0.0
        mean_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        m2_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    else:
        n_tiles = tl.cdiv(N_ROWS, BLOCK_R) * tl.cdiv(K, BLOCK_K)
        n_acc = 0.0
        mean_acc = 0.0
        m2_acc = 0.0
    for i in range(TILES_PER_PROG):
        t = pid_p * TILES_PER_PROG + i
        offs, mask, count = _tile_offsets(pid_c, t, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
        mask = mask & (t < n_tiles)
        count = tl.where(t < n_tiles, count, 0.0)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        t_mean = _reduce_tile(x, ROWS_LAYOUT) / tl.maximum(count, 1.0)
        if ROWS_LAYOUT:
            d = tl.where(mask, x - t_mean[None, :], 0.0)
        else:
            d = tl.where(mask, x - t_mean, 0.0)
        t_m2 = _reduce_tile(d * d, ROWS_LAYOUT)
        n_acc, mean_acc, m2_acc = _chan_merge(n_acc, mean_acc, m2_acc, count, t_mean, t_m2)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    if ROWS_LAYOUT:
        n_out = tl.zeros([BLOCK_K], dtype=tl.float32) + n_acc
    else:
        n_out = n_acc
    slot = chan.to(tl.int64) * P + pid_p
    tl.store(PART + slot, n_out, mask=cmask)
    tl.store(PART + C * P + slot, mean_acc, mask=cmask)
    tl.store(PART + 2 * C * P + slot, m2_acc, mask=cmask)


@triton.jit
def _bnlr_fwd_finalize_kernel(
    PART,
    P,
    C,
    W,
    B,
    RM,
    RV,
    NBT,
    MEAN,
    RSTD,
    SCALE,
    SHIFT,
    STATS,
    momentum,
    eps,
    TRAINING: tl.constexpr,
    MERGE_ONLY: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Merge P partial triples per channel, then the per-channel epilogue.

    MERGE_ONLY writes the merged (count, mean, M2) to STATS (3, C) and stops: that is the sync split
    point, where the triples of every rank are all-gathered and fed back here with P = world size.
    TRAINING=False (eval) ignores PART and normalises with the running statistics.
    """
    chan = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chan < C
    if TRAINING:
        n_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = cmask[:, None] & (p < P)[None, :]
            slot = chan.to(tl.int64)[:, None] * P + p[None, :]
            n_p = tl.load(PART + slot, mask=mask, other=0.0)
            mean_p = tl.load(PART + C * P + slot, mask=mask, other=0.0)
            m2_p = tl.load(PART + 2 * C * P + slot, mask=mask, other=0.0)
            t_n = tl.sum(n_p, axis=1)
            t_mean = tl.sum(n_p * mean_p, axis=1) / tl.maximum(t_n, 1.0)
            delta = mean_p - t_mean[:, None]
            t_m2 = tl.sum(m2_p, axis=1) + tl.sum(n_p * delta * delta, axis=1)
            n_acc, mean_acc, m2_acc = _chan_merge(n_acc, mean_acc, m2_acc, t_n, t_mean, t_m2)
        if MERGE_ONLY:
            tl.store(STATS + chan, n_acc, mask=cmask)
            tl.store(STATS + C + chan, mean_acc, mask=cmask)
            tl.store(STATS + 2 * C + chan, m2_acc, mask=cmask)
        else:
            _finalize_channels(
                chan,
                cmask,
                n_acc,
                mean_acc,
                m2_acc,
                W,
                B,
                RM,
                RV,
                NBT,
                MEAN,
                RSTD,
                SCALE,
                SHIFT,
                momentum,
                eps,
                HAS_W,
                HAS_B,
                UPDATE_RUNNING,
                CUMULATIVE,
            )
    else:
        mean = tl.load(RM + chan, mask=cmask, other=0.0).to(tl.float32)
        var = tl.load(RV + chan, mask=cmask, other=1.0).to(tl.float32)
        # count = 1 and m2 = var make the shared epilogue compute rstd = 1 / sqrt(var + eps).
        _finalize_channels(
            chan,
            cmask,
            1.0,
            mean,
            var,
            W,
            B,
            RM,
            RV,
            NBT,
            MEAN,
            RSTD,
            SCALE,
            SHIFT,
            momentum,
            eps,
            HAS_W,
            HAS_B,
            False,
            False,
        )


@triton.jit
def _bnlr_fwd_kernel(
    X,
    Y,
    MEAN,
    SCALE,
    SHIFT,
    TOTAL_ROWS,
    C,
    K,
    slope,
    ROWS_LAYOUT: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = leaky((x - mean) * scale + shift) over the (TOTAL_ROWS, K) matrix view of x."""
    K = _aligned(K, K_ALIGN)
    rows, cols, rmask, kmask, mask, offs = _tile(
        tl.program_id(0), tl.program_id(1), TOTAL_ROWS, K, BLOCK_R, BLOCK_K
    )
    mean = _channel_param(MEAN, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    scale = _channel_param(SCALE, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    shift = _channel_param(SHIFT, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = _leaky(_bn_affine(x, mean, scale, shift), slope)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile_terms(x, g, mean, rstd, scale, shift, mask, slope, ROWS_LAYOUT: tl.constexpr):
    """h = dL/d(pre-activation) with the LeakyReLU mask recomputed from x, and x_hat."""
    y = _bn_affine(x, mean, scale, shift)
    h = tl.where(mask, tl.where(y > 0, g, g * slope), 0.0)
    x_hat = (x - mean) * rstd
    return h, x_hat


@triton.jit
def _bnlr_bwd_fused_kernel(
    X,
    G,
    DX,
    MEAN,
    RSTD,
    SCALE,
    SHIFT,
    DW,
    DB,
    N_ROWS,
    C,
    K,
    inv_count,
    slope,
    ROWS_LAYOUT: tl.constexpr,
    TRAINING: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DX: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward when a whole channel (block) fits one tile: one read of x and g, one write of dx."""
    pid_c = tl.program_id(0)
    offs, mask, _count = _tile_offsets(pid_c, 0, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    mean = _channel_vector(MEAN, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    rstd = _channel_vector(RSTD, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    scale = _channel_vector(SCALE, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    shift = _channel_vector(SHIFT, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    h, x_hat = _bwd_tile_terms(x, g, mean, rstd, scale, shift, mask, slope, ROWS_LAYOUT)
    sum_h = _reduce_tile(h, ROWS_LAYOUT)
    sum_hx = _reduce_tile(h * x_hat, ROWS_LAYOUT)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    if HAS_DW:
        tl.store(DW + chan, sum_hx.to(DW.dtype.element_ty), mask=cmask)
    if HAS_DB:
        tl.store(DB + chan, sum_h.to(DB.dtype.element_ty), mask=cmask)
    if HAS_DX:
        if TRAINING:
            if ROWS_LAYOUT:
                dx = scale * (h - (sum_h * inv_count)[None, :] - x_hat * (sum_hx * inv_count)[None, :])
            else:
                dx = scale * (h - sum_h * inv_count - x_hat * (sum_hx * inv_count))
        else:
            dx = scale * h
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bnlr_bwd_reduce_kernel(
    X,
    G,
    MEAN,
    RSTD,
    SCALE,
    SHIFT,
    PART,
    N_ROWS,
    C,
    K,
    TILES_PER_PROG,
    P,
    slope,
    ROWS_LAYOUT: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial per-channel sums of h and h * x_hat; PART is (2, C, P) fp32, one slot per program."""
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    mean = _channel_vector(MEAN, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    rstd = _channel_vector(RSTD, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    scale = _channel_vector(SCALE, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    shift = _channel_vector(SHIFT, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    if ROWS_LAYOUT:
        n_tiles = tl.cdiv(N_ROWS, BLOCK_R)
        sum_h = tl.zeros([BLOCK_K], dtype=tl.float32)
        sum_hx = tl.zeros([BLOCK_K], dtype=tl.float32)
    else:
        n_tiles = tl.cdiv(N_ROWS, BLOCK_R) * tl.cdiv(K, BLOCK_K)
        sum_h = 0.0
        sum_hx = 0.0
    for i in range(TILES_PER_PROG):
        t = pid_p * TILES_PER_PROG + i
        offs, mask, _count = _tile_offsets(pid_c, t, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
        mask = mask & (t < n_tiles)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        h, x_hat = _bwd_tile_terms(x, g, mean, rstd, scale, shift, mask, slope, ROWS_LAYOUT)
        sum_h += _reduce_tile(h, ROWS_LAYOUT)
        sum_hx += _reduce_tile(h * x_hat, ROWS_LAYOUT)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    slot = chan.to(tl.int64) * P + pid_p
    tl.store(PART + slot, sum_h, mask=cmask)
    tl.store(PART + C * P + slot, sum_hx, mask=cmask)


@triton.jit
def _bnlr_bwd_finalize_kernel(
    PART,
    P,
    C,
    RSTD,
    SCALE,
    COUNT,
    DW,
    DB,
    SUMS,
    COEF,
    inv_count,
    TRAINING: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    WRITE_COEF: tl.constexpr,
    COUNT_FROM_PTR: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Sum P partials per channel; write dweight/dbias (local sums), and/or the dx coefficients.

    dx = scale * h + c1 * (x - mean) + c2 with c1 = -scale * rstd * sum(h x_hat) / n and
    c2 = -scale * sum(h) / n. WRITE_SUMS stores the (2, C) sums instead: the sync split point, where
    they are all-reduced and fed back here with P = 1 and the global count.
    """
    chan = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chan < C
    sum_h = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_hx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (p < P)[None, :]
        slot = chan.to(tl.int64)[:, None] * P + p[None, :]
        sum_h += tl.sum(tl.load(PART + slot, mask=mask, other=0.0), axis=1)
        sum_hx += tl.sum(tl.load(PART + C * P + slot, mask=mask, other=0.0), axis=1)
    if HAS_DW:
        tl.store(DW + chan, sum_hx.to(DW.dtype.element_ty), mask=cmask)
    if HAS_DB:
        tl.store(DB + chan, sum_h.to(DB.dtype.element_ty), mask=cmask)
    if WRITE_SUMS:
        tl.store(SUMS + chan, sum_h, mask=cmask)
        tl.store(SUMS + C + chan, sum_hx, mask=cmask)
    if WRITE_COEF:
        if TRAINING:
            if COUNT_FROM_PTR:
                inv_n = 1.0 / tl.load(COUNT + chan, mask=cmask, other=1.0)
            else:
                inv_n = inv_count
            scale = tl.load(SCALE + chan, mask=cmask, other=0.0)
            rstd = tl.load(RSTD + chan, mask=cmask, other=0.0)
            c1 = -scale * rstd * sum_hx * inv_n
            c2 = -scale * sum_h * inv_n
        else:
            c1 = tl.zeros([BLOCK_C], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        tl.store(COEF + chan, c1, mask=cmask)
        tl.store(COEF + C + chan, c2, mask=cmask)


@triton.jit
def _bnlr_bwd_kernel(
    X,
    G,
    DX,
    MEAN,
    SCALE,
    SHIFT,
    COEF,
    TOTAL_ROWS,
    C,
    K,
    slope,
    ROWS_LAYOUT: tl.constexpr,
    K_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx = scale * h + c1 * (x - mean) + c2 over the (TOTAL_ROWS, K) matrix view."""
    K = _aligned(K, K_ALIGN)
    rows, cols, rmask, kmask, mask, offs = _tile(
        tl.program_id(0), tl.program_id(1), TOTAL_ROWS, K, BLOCK_R, BLOCK_K
    )
    mean = _channel_param(MEAN, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    scale = _channel_param(SCALE, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    shift = _channel_param(SHIFT, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    c1 = _channel_param(COEF, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    c2 = _channel_param(COEF + C, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    y = _bn_affine(x, mean, scale, shift)
    h = tl.where(y > 0, g, g * slope)
    dx = scale * h + c1 * (x - mean) + c2
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


INTERPRET = isinstance(_bnlr_fwd_kernel, InterpretedFunction)


# --------------------------------------------------------------------------------------------------
# Planning: block sizes and grids (pure functions of shapes; the compile report reuses them).


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def layout_of(x: torch.Tensor):
    """(x_view, rows_layout, N_ROWS, C, K): the matrix view the kernels use; copies only if needed."""
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if s == 1:
        x2 = x.reshape(n, c)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        return x2, True, n, c, c
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x, True, n * s, c, c
    if not x.is_contiguous():
        x = x.contiguous()
    return x, False, n, c, s


def device_limits(device: torch.device) -> dict:
    """Grid size target and channel-block caps for `device` (see CPU_BLOCK_C)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return {
            "programs": PROGRAMS_PER_SM * sms,
            "rows_block_c": ROWS_BLOCK_C,
            "stats_block_c": STATS_BLOCK_C,
            "finalize_block_c": FINALIZE_BLOCK_C,
        }
    return {
        "programs": CPU_TARGET_PROGRAMS,
        "rows_block_c": CPU_BLOCK_C,
        "stats_block_c": CPU_BLOCK_C,
        "finalize_block_c": min(FINALIZE_BLOCK_C * 16, CPU_BLOCK_C),
    }


def plan(n_rows: int, c: int, k: int, rows_layout: bool, limits: dict) -> dict:
    """Block sizes and grids for one (layout, shape); `fused` says whether a channel fits one tile."""
    target_programs = limits["programs"]
    if rows_layout:
        block_k = min(_np2(c), limits["rows_block_c"])
        fused_r = _np2(n_rows)
        fused_k = min(block_k, max(1, FUSED_MAX_TILE // fused_r))
        fused = fused_r * fused_k <= FUSED_MAX_TILE and fused_r <= FUSED_MAX_TILE
        stats_k = min(_np2(c), limits["stats_block_c"])
        stats_r = min(_np2(n_rows), max(1, STATS_TILE // stats_k))
        c_blocks = triton.cdiv(c, stats_k)
        n_tiles = triton.cdiv(n_rows, stats_r)
        elem_k = min(_np2(k), MAX_BLOCK_K)
        total_rows = n_rows
    else:
        fused_k = _np2(k)
        fused_r = _np2(n_rows)
        fused = fused_r * fused_k <= FUSED_MAX_TILE
        stats_k = min(_np2(k), MAX_BLOCK_K)
        stats_r = min(_np2(n_rows), max(1, STATS_TILE // stats_k))
        c_blocks = c
        n_tiles = triton.cdiv(n_rows, stats_r) * triton.cdiv(k, stats_k)
        elem_k = min(_np2(k), MAX_BLOCK_K)
        total_rows = n_rows * c
    p = max(1, min(n_tiles, target_programs // max(1, c_blocks)))
    tiles_per_prog = triton.cdiv(n_tiles, p)
    p = triton.cdiv(n_tiles, tiles_per_prog)
    elem_r = min(_np2(total_rows), max(1, ELEMENTWISE_TILE // elem_k))
    return {
        "fused": fused,
        "fused_block": (fused_r, fused_k),
        "fused_grid": (triton.cdiv(c, fused_k) if rows_layout else c,),
        "fused_warps": _num_warps(fused_r * fused_k),
        "stats_block": (stats_r, stats_k),
        "stats_grid": (c_blocks, p),
        "tiles_per_prog": tiles_per_prog,
        "stats_warps": _num_warps(stats_r * stats_k),
        "elem_block": (elem_r, elem_k),
        "elem_grid": (triton.cdiv(total_rows, elem_r), triton.cdiv(k, elem_k)),
        "elem_warps": _num_warps(elem_r * elem_k),
        "total_rows": total_rows,
        "k_align": math.gcd(k, 16),  # rows start 16-byte aligned when K is a multiple of 4 (fp32) -> ld.v4
        "finalize_block_c": limits["finalize_block_c"],
        "finalize_grid": (triton.cdiv(c, limits["finalize_block_c"]),),
    }


# --------------------------------------------------------------------------------------------------
# Launchers


def _block_p(p: int) -> int:
    return min(FINALIZE_BLOCK_P, _np2(p))


def _empty(shape, dtype, device):
    """Every kernel output is allocated here (tests swap it for a NaN fill to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like_x(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output shaped and laid out like x (channels_last stays channels_last)."""
    out = _empty(x.shape, dtype or x.dtype, x.device)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = _empty((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), dtype or x.dtype, x.device)
        out = out.permute(0, 3, 1, 2)
    return out


def _like_layout(t: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
    """t (same numel as xv) in xv's exact memory layout, copying only when the strides differ."""
    t = t.reshape(xv.shape) if t.shape != xv.shape else t
    if t.stride() == xv.stride():
        return t
    if xv.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


def check_inputs(
    x, weight, bias, running_mean, running_var, training, momentum, num_batches_tracked, process_group
):
    """Reject what F.batch_norm rejects, with the same exception class and wording where it has one."""
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise NotImplementedError(
            f'"batch_norm_leaky_relu" not implemented for {x.dtype}: expected a floating-point input'
        )
    if x.dim() < 2:
        raise ValueError(f"expected at least 2D input (N, C, *), got {x.dim()}D input")
    c = x.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found x on {x.device} "
                f"and {name} on {t.device}"
            )
        if t.dim() != 1 or t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        if not t.is_floating_point() or t.dtype not in (x.dtype, torch.float32):
            raise RuntimeError(
                f"mixed dtype: expected {name} to have dtype {x.dtype} or torch.float32 "
                f"(input is {x.dtype}), got {t.dtype}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and process_group is None and x.numel() // max(c, 1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if num_batches_tracked is not None and num_batches_tracked.device != x.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found x on {x.device} "
            f"and num_batches_tracked on {num_batches_tracked.device}"
        )
    if process_group is not None and not training:
        raise ValueError("process_group (synchronised BatchNorm) needs training=True")


def batch_norm_leaky_relu_forward(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    negative_slope,
    num_batches_tracked=None,
    process_group=None,
):
    """Launch the forward; returns (y, saved) with saved = what backward needs."""
    xv, rows_layout, n_rows, c, k = layout_of(x)
    dev = x.device
    cfg = plan(n_rows, c, k, rows_layout, device_limits(dev))
    y = _empty_like_x(xv)
    f32 = {"dtype": torch.float32, "device": dev}
    mean, rstd, scale, shift = (_empty((c,), **f32) for _ in range(4))
    count = None
    update = training and running_mean is not None
    if update and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # on device, no host sync; the kernels read it for momentum=None
    cumulative = update and momentum is None
    dummy = mean  # stands in for absent optional pointers (never dereferenced: constexpr-guarded)
    ptrs = {
        "W": weight if weight is not None else dummy,
        "B": bias if bias is not None else dummy,
        "RM": running_mean if running_mean is not None else dummy,
        "RV": running_var if running_var is not None else dummy,
        "NBT": num_batches_tracked if cumulative else dummy,
    }
    flags = {
        "HAS_W": weight is not None,
        "HAS_B": bias is not None,
        "UPDATE_RUNNING": update,
        "CUMULATIVE": cumulative,
    }
    mom = 0.0 if momentum is None else float(momentum)

    if training and cfg["fused"] and process_group is None:
        br, bk = cfg["fused_block"]
        _bnlr_fwd_fused_kernel[cfg["fused_grid"]](
            xv,
            y,
            ptrs["W"],
            ptrs["B"],
            ptrs["RM"],
            ptrs["RV"],
            ptrs["NBT"],
            mean,
            rstd,
            scale,
            shift,
            n_rows,
            c,
            k,
            mom,
            eps,
            negative_slope,
            ROWS_LAYOUT=rows_layout,
            K_ALIGN=cfg["k_align"],
            **flags,
            BLOCK_R=br,
            BLOCK_K=bk,
            num_warps=cfg["fused_warps"],
        )
        return y.view(x.shape) if y.shape != x.shape else y, (mean, rstd, scale, shift, count)

    if training:
        sr, sk = cfg["stats_block"]
        p = cfg["stats_grid"][1]
        part = _empty((3, c, p), **f32)
        _bnlr_fwd_stats_kernel[cfg["stats_grid"]](
            xv,
            part,
            n_rows,
            c,
            k,
            cfg["tiles_per_prog"],
            p,
            ROWS_LAYOUT=rows_layout,
            K_ALIGN=cfg["k_align"],
            BLOCK_R=sr,
            BLOCK_K=sk,
            num_warps=cfg["stats_warps"],
        )
        if process_group is not None:
            # Split point 1 (synchronised BN): merge locally, all-gather every rank's (3, C) triples,
            # and let the finalize kernel Chan-merge them as if they were partials of one grid.
            local = _empty((3, c), **f32)
            _bnlr_fwd_finalize_kernel[cfg["finalize_grid"]](
                part,
                p,
                c,
                dummy,
                dummy,
                dummy,
                dummy,
                dummy,
                dummy,
                dummy,
                dummy,
                dummy,
                local,
                0.0,
                eps,
                TRAINING=True,
                MERGE_ONLY=True,
                HAS_W=False,
                HAS_B=False,
                UPDATE_RUNNING=False,
                CUMULATIVE=False,
                BLOCK_C=cfg["finalize_block_c"],
                BLOCK_P=_block_p(p),
            )
            from .reference import all_gather_stats

            gathered = all_gather_stats(local, process_group)  # (world, 3, C)
            part = gathered.permute(1, 2, 0).contiguous()  # (3, C, world)
            p = part.shape[2]
            count = part[0].sum(1)  # global per-channel count, for the backward coefficients
        _bnlr_fwd_finalize_kernel[cfg["finalize_grid"]](
            part,
            p,
            c,
            ptrs["W"],
            ptrs["B"],
            ptrs["RM"],
            ptrs["RV"],
            ptrs["NBT"],
            mean,
            rstd,
            scale,
            shift,
            dummy,
            mom,
            eps,
            TRAINING=True,
            MERGE_ONLY=False,
            **flags,
            BLOCK_C=cfg["finalize_block_c"],
            BLOCK_P=_block_p(p),
        )
    else:
        _bnlr_fwd_finalize_kernel[cfg["finalize_grid"]](
            dummy,
            0,
            c,
            ptrs["W"],
            ptrs["B"],
            ptrs["RM"],
            ptrs["RV"],
            dummy,
            mean,
            rstd,
            scale,
            shift,
            dummy,
            0.0,
            eps,
            TRAINING=False,
            MERGE_ONLY=False,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            UPDATE_RUNNING=False,
            CUMULATIVE=False,
            BLOCK_C=cfg["finalize_block_c"],
            BLOCK_P=1,
        )
    er, ek = cfg["elem_block"]
    _bnlr_fwd_kernel[cfg["elem_grid"]](
        xv,
        y,
        mean,
        scale,
        shift,
        cfg["total_rows"],
        c,
        k,
        negative_slope,
        ROWS_LAYOUT=rows_layout,
        K_ALIGN=cfg["k_align"],
        BLOCK_R=er,
        BLOCK_K=ek,
        num_warps=cfg["elem_warps"],
    )
    return y.view(x.shape) if y.shape != x.shape else y, (mean, rstd, scale, shift, count)


def batch_norm_leaky_relu_backward(
    g,
    x,
    saved,
    training,
    negative_slope,
    needs=(True, True, True),
    weight_dtype=None,
    bias_dtype=None,
    process_group=None,
):
    """Launch the backward; returns (dx, dweight, dbias), each None where `needs` says so."""
    mean, rstd, scale, shift, count = saved
    xv, rows_layout, n_rows, c, k = layout_of(x)  # x was saved in its kernel layout: no copy here
    g = _like_layout(g, xv)
    dev = x.device
    cfg = plan(n_rows, c, k, rows_layout, device_limits(dev))
    need_dx, need_dw, need_db = needs
    dx = _empty_like_x(xv) if need_dx else None
    dw = _empty((c,), weight_dtype, dev) if need_dw else None
    db = _empty((c,), bias_dtype, dev) if need_db else None
    dummy = mean
    inv_count = 1.0 / (n_rows * (1 if rows_layout else k))

    if cfg["fused"] and process_group is None:
        br, bk = cfg["fused_block"]
        _bnlr_bwd_fused_kernel[cfg["fused_grid"]](
            xv,
            g,
            dx if need_dx else dummy,
            mean,
            rstd,
            scale,
            shift,
            dw if need_dw else dummy,
            db if need_db else dummy,
            n_rows,
            c,
            k,
            inv_count,
            negative_slope,
            ROWS_LAYOUT=rows_layout,
            K_ALIGN=cfg["k_align"],
            TRAINING=training,
            HAS_DW=need_dw,
            HAS_DB=need_db,
            HAS_DX=need_dx,
            BLOCK_R=br,
            BLOCK_K=bk,
            num_warps=cfg["fused_warps"],
        )
    else:
        sr, sk = cfg["stats_block"]
        p = cfg["stats_grid"][1]
        f32 = {"dtype": torch.float32, "device": dev}
        part = _empty((2, c, p), **f32)
        _bnlr_bwd_reduce_kernel[cfg["stats_grid"]](
            xv,
            g,
            mean,
            rstd,
            scale,
            shift,
            part,
            n_rows,
            c,
            k,
            cfg["tiles_per_prog"],
            p,
            negative_slope,
            ROWS_LAYOUT=rows_layout,
            K_ALIGN=cfg["k_align"],
            BLOCK_R=sr,
            BLOCK_K=sk,
            num_warps=cfg["stats_warps"],
        )
        coef = _empty((2, c), **f32)
        common = {"BLOCK_C": cfg["finalize_block_c"], "BLOCK_P": _block_p(p)}
        if process_group is not None:
            # Split point 2 (synchronised BN): dweight/dbias keep the local sums (DDP all-reduces
            # them); the sums that feed dx are all-reduced across the group first.
            import torch.distributed as dist

            sums = _empty((2, c), **f32)
            _bnlr_bwd_finalize_kernel[cfg["finalize_grid"]](
                part,
                p,
                c,
                rstd,
                scale,
                dummy,
                dw if need_dw else dummy,
                db if need_db else dummy,
                sums,
                dummy,
                0.0,
                TRAINING=training,
                HAS_DW=need_dw,
                HAS_DB=need_db,
                WRITE_SUMS=True,
                WRITE_COEF=False,
                COUNT_FROM_PTR=False,
                **common,
            )
            dist.all_reduce(sums, group=process_group)
            if need_dx:
                _bnlr_bwd_finalize_kernel[cfg["finalize_grid"]](
                    sums,
                    1,
                    c,
                    rstd,
                    scale,
                    count,
                    dummy,
                    dummy,
                    dummy,
                    coef,
                    0.0,
                    TRAINING=training,
                    HAS_DW=False,
                    HAS_DB=False,
                    WRITE_SUMS=False,
                    WRITE_COEF=True,
                    COUNT_FROM_PTR=True,
                    BLOCK_C=cfg["finalize_block_c"],
                    BLOCK_P=1,
                )
        else:
            _bnlr_bwd_finalize_kernel[cfg["finalize_grid"]](
                part,
                p,
                c,
                rstd,
                scale,
                dummy,
                dw if need_dw else dummy,
                db if need_db else dummy,
                dummy,
                coef,
                inv_count,
                TRAINING=training,
                HAS_DW=need_dw,
                HAS_DB=need_db,
                WRITE_SUMS=False,
                WRITE_COEF=need_dx,
                COUNT_FROM_PTR=False,
                **common,
            )
        if need_dx:
            er, ek = cfg["elem_block"]
            _bnlr_bwd_kernel[cfg["elem_grid"]](
                xv,
                g,
                dx,
                mean,
                scale,
                shift,
                coef,
                cfg["total_rows"],
                c,
                k,
                negative_slope,
                ROWS_LAYOUT=rows_layout,
                K_ALIGN=cfg["k_align"],
                BLOCK_R=er,
                BLOCK_K=ek,
                num_warps=cfg["elem_warps"],
            )
    if dx is not None and dx.shape != x.shape:
        dx = dx.view(x.shape)
    return dx, dw, db


class BatchNormLeakyReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        negative_slope,
        num_batches_tracked,
        process_group,
    ):
        y, saved = batch_norm_leaky_relu_forward(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            training,
            momentum,
            eps,
            negative_slope,
            num_batches_tracked,
            process_group,
        )
        mean, rstd, scale, shift, count = saved
        # Only x (in its kernel layout) and per-channel vectors: the LeakyReLU mask is recomputed.
        ctx.save_for_backward(layout_of(x)[0], mean, rstd, scale, shift, count)
        ctx.x_shape = x.shape
        ctx.training = training
        ctx.negative_slope = negative_slope
        ctx.process_group = process_group
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, g):
        xv, mean, rstd, scale, shift, count = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        dx, dw, db = batch_norm_leaky_relu_backward(
            g,
            xv,
            (mean, rstd, scale, shift, count),
            ctx.training,
            ctx.negative_slope,
            needs,
            ctx.weight_dtype,
            ctx.bias_dtype,
            ctx.process_group,
        )
        if dx is not None and dx.shape != ctx.x_shape:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None, None, None, None, None, None, None


def batch_norm_leaky_relu(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    training=True,
    momentum=0.1,
    eps=1e-5,
    negative_slope=0.2,
    num_batches_tracked=None,
    process_group=None,
):
    """Triton path of `kernels.batch_norm_leaky_relu` (inputs already checked)."""
    return BatchNormLeakyReLUFunction.apply(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        bool(training),
        momentum,
        float(eps),
        float(negative_slope),
        num_batches_tracked,
        process_group,
    )
