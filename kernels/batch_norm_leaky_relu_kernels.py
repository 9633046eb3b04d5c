"""Fused BatchNorm + LeakyReLU: the @triton.jit kernels and their jit helpers (no launch logic here).

x of shape (N, C, *) is read as a row-major matrix in one of two layouts (chosen by the launcher):
  ROWS_LAYOUT   an (N_ROWS, C) matrix -- (N, C), (N, C, 1, 1), channels_last; channel = column.
  PLANES        an (N * C, K) matrix -- contiguous NCHW, K = H * W; channel of row r = r % C.

Training, one launch each way when a channel (block) fits one register tile: `_bnlr_fwd_fused_kernel`,
`_bnlr_bwd_fused_kernel`. Otherwise two each way, on one (channel blocks x P) grid:
  forward   `_bnlr_fwd_stats_kernel` (partial (count, mean, M2) triples) -> `_bnlr_fwd_apply_kernel` (every
            program Chan-merges its channels' P partials itself, program 0 of a channel stores the running
            stats and the saved vectors, and each normalises the tiles it reduced);
  backward  `_bnlr_bwd_reduce_kernel` (partial sums of h and h * x_hat) -> `_bnlr_bwd_apply_kernel` (sums the
            partials, dweight / dbias from program 0, dx over its tiles).
Synchronised BN adds one kernel before each collective: `_bnlr_fwd_finalize_merge_kernel` (this rank's (3, C)
triples, all-gathered and passed to the apply kernel as the partials) and `_bnlr_bwd_finalize_sums_kernel`
(dweight / dbias and the (2, C) sums that are all-reduced). Eval: `_bnlr_fwd_finalize_eval_kernel` (running
stats -> scale/shift) -> `_bnlr_fwd_kernel` (normalise + LeakyReLU).

No float atomics: every program writes its own partial slot and every merge runs in a fixed order, so results
are bitwise deterministic, and every program of a channel computes the same statistics from the same partials.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# --------------------------------------------------------------------------------------------------
# Helpers


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
def _tile_offsets(pid_c, t, N_ROWS, C, K, ROWS_LAYOUT: tl.constexpr, K_ALIGN: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets, mask and element count of reduction tile `t` of channel (block) `pid_c`.

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
def _tile_m2(x, mask, mean, ROWS_LAYOUT: tl.constexpr):
    """Centred sum of squares of a tile about its per-channel mean (masked lanes contribute 0)."""
    if ROWS_LAYOUT:
        d = tl.where(mask, x - mean[None, :], 0.0)
    else:
        d = tl.where(mask, x - mean, 0.0)
    return _reduce_tile(d * d, ROWS_LAYOUT)


@triton.jit
def _per_channel(v, ROWS_LAYOUT: tl.constexpr):
    """A per-channel reduction result, broadcastable against the tile it came from."""
    if ROWS_LAYOUT:
        return v[None, :]
    else:
        return v


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
def _finalize_channels(chan, cmask, store, count, mean, m2, W, B, RM, RV, NBT, MEAN, RSTD, SCALE, SHIFT, momentum,
                       eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                       CUMULATIVE: tl.constexpr):
    """Per-channel epilogue shared by the fused, apply and eval kernels; returns (scale, shift).

    Updates running stats with the unbiased variance (nn.BatchNorm's convention) and folds weight/bias into
    scale/shift; stores what the normalise pass and backward need where `store` (one program per channel:
    every other program of the channel computes the same values and only uses them).
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
        tl.store(RM + chan, (rm + factor * (mean - rm)).to(RM.dtype.element_ty), mask=store)
        tl.store(RV + chan, (rv + factor * (unbiased - rv)).to(RV.dtype.element_ty), mask=store)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + chan, mask=cmask, other=1.0).to(tl.float32)
    shift = tl.zeros_like(rstd)
    if HAS_B:
        shift = tl.load(B + chan, mask=cmask, other=0.0).to(tl.float32)
    tl.store(MEAN + chan, mean, mask=store)
    tl.store(RSTD + chan, rstd, mask=store)
    tl.store(SCALE + chan, scale, mask=store)
    tl.store(SHIFT + chan, shift, mask=store)
    # Returned, not re-read: another thread's global store is not visible without a barrier.
    return scale, shift


@triton.jit
def _merge_partials(PART, P, C, chan, cmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Chan-merge the P (count, mean, M2) partials of each channel in PART (3, C, P), BLOCK_P at a time."""
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
    return n_acc, mean_acc, m2_acc


@triton.jit
def _sum_partials(PART, P, C, chan, cmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-channel sums of the P (sum h, sum h * x_hat) partials in PART (2, C, P), in a fixed order."""
    sum_h = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_hx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (p < P)[None, :]
        slot = chan.to(tl.int64)[:, None] * P + p[None, :]
        sum_h += tl.sum(tl.load(PART + slot, mask=mask, other=0.0), axis=1)
        sum_hx += tl.sum(tl.load(PART + C * P + slot, mask=mask, other=0.0), axis=1)
    return sum_h, sum_hx


@triton.jit
def _merge_partials_one(PART, P, C, chan, BLOCK_P: tl.constexpr):
    """`_merge_partials` for one channel (a scalar `chan`, the PLANES layout): scalar (count, mean, M2)."""
    n_acc = 0.0
    mean_acc = 0.0
    m2_acc = 0.0
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = p < P
        slot = chan.to(tl.int64) * P + p
        n_p = tl.load(PART + slot, mask=mask, other=0.0)
        mean_p = tl.load(PART + C * P + slot, mask=mask, other=0.0)
        m2_p = tl.load(PART + 2 * C * P + slot, mask=mask, other=0.0)
        t_n = tl.sum(n_p, axis=0)
        t_mean = tl.sum(n_p * mean_p, axis=0) / tl.maximum(t_n, 1.0)
        delta = mean_p - t_mean
        t_m2 = tl.sum(m2_p, axis=0) + tl.sum(n_p * delta * delta, axis=0)
        n_acc, mean_acc, m2_acc = _chan_merge(n_acc, mean_acc, m2_acc, t_n, t_mean, t_m2)
    return n_acc, mean_acc, m2_acc


@triton.jit
def _sum_partials_one(PART, P, C, chan, BLOCK_P: tl.constexpr):
    """`_sum_partials` for one channel (a scalar `chan`, the PLANES layout)."""
    sum_h = 0.0
    sum_hx = 0.0
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = p < P
        slot = chan.to(tl.int64) * P + p
        sum_h += tl.sum(tl.load(PART + slot, mask=mask, other=0.0), axis=0)
        sum_hx += tl.sum(tl.load(PART + C * P + slot, mask=mask, other=0.0), axis=0)
    return sum_h, sum_hx


@triton.jit
def _channel_partials(PART, P, C, pid_c, ROWS_LAYOUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Merged (count, mean, M2) of reduction program pid_c's channels: a vector (ROWS) or a scalar (PLANES)."""
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    if ROWS_LAYOUT:
        return _merge_partials(PART, P, C, chan, cmask, BLOCK_K, BLOCK_P)
    else:
        return _merge_partials_one(PART, P, C, chan, BLOCK_P)


@triton.jit
def _channel_sums(PART, P, C, pid_c, ROWS_LAYOUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Summed (sum h, sum h * x_hat) of reduction program pid_c's channels: vectors (ROWS) or scalars (PLANES)."""
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    if ROWS_LAYOUT:
        return _sum_partials(PART, P, C, chan, cmask, BLOCK_K, BLOCK_P)
    else:
        return _sum_partials_one(PART, P, C, chan, BLOCK_P)


@triton.jit
def _n_tiles(N_ROWS, K, ROWS_LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Reduction tiles per channel (block): row blocks (ROWS), or row blocks x spatial blocks (PLANES)."""
    if ROWS_LAYOUT:
        return tl.cdiv(N_ROWS, BLOCK_R)
    else:
        return tl.cdiv(N_ROWS, BLOCK_R) * tl.cdiv(K, BLOCK_K)


@triton.jit
def _store_param_grads(DW, DB, chan, cmask, sum_h, sum_hx, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr):
    """dweight = sum(h * x_hat), dbias = sum(h): this rank's sums (DDP all-reduces parameter grads)."""
    if HAS_DW:
        tl.store(DW + chan, sum_hx.to(DW.dtype.element_ty), mask=cmask)
    if HAS_DB:
        tl.store(DB + chan, sum_h.to(DB.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_tile_terms(x, g, mean, rstd, scale, shift, mask, slope):
    """h = dL/d(pre-activation) with the LeakyReLU mask recomputed from x, and x_hat."""
    y = _bn_affine(x, mean, scale, shift)
    h = tl.where(mask, tl.where(y > 0, g, g * slope), 0.0)
    x_hat = (x - mean) * rstd
    return h, x_hat


# --------------------------------------------------------------------------------------------------
# Forward kernels


@triton.jit
def _bnlr_fwd_fused_kernel(X, Y, W, B, RM, RV, NBT, MEAN, RSTD, SCALE, SHIFT, N_ROWS, C, K, momentum, eps, slope,
                           ROWS_LAYOUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, K_ALIGN: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Training forward when a whole channel (block) fits one tile: one read and one write of x."""
    pid_c = tl.program_id(0)
    offs, mask, count = _tile_offsets(pid_c, 0, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = _reduce_tile(x, ROWS_LAYOUT) / count
    m2 = _tile_m2(x, mask, mean, ROWS_LAYOUT)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    scale, shift = _finalize_channels(chan, cmask, cmask, count, mean, m2, W, B, RM, RV, NBT, MEAN, RSTD, SCALE,
                                      SHIFT, momentum, eps, HAS_W, HAS_B, UPDATE_RUNNING, CUMULATIVE)
    y = _bn_affine(x, _per_channel(mean, ROWS_LAYOUT), _per_channel(scale, ROWS_LAYOUT),
                   _per_channel(shift, ROWS_LAYOUT))
    tl.store(Y + offs, _leaky(y, slope).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bnlr_fwd_stats_kernel(X, PART, N_ROWS, C, K, TILES_PER_PROG, P, ROWS_LAYOUT: tl.constexpr,
                           K_ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (count, mean, M2) of channel (block) program_id(0) over tile range program_id(1).

    PART is (3, C, P) fp32; each program owns column p, so the merge is deterministic.
    """
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    n_tiles = _n_tiles(N_ROWS, K, ROWS_LAYOUT, BLOCK_R, BLOCK_K)
    if ROWS_LAYOUT:
        mean_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        m2_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    else:
        mean_acc = 0.0
        m2_acc = 0.0
    n_acc = 0.0
    for i in range(TILES_PER_PROG):
        t = pid_p * TILES_PER_PROG + i
        offs, mask, count = _tile_offsets(pid_c, t, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
        mask = mask & (t < n_tiles)
        count = tl.where(t < n_tiles, count, 0.0)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        t_mean = _reduce_tile(x, ROWS_LAYOUT) / tl.maximum(count, 1.0)
        t_m2 = _tile_m2(x, mask, t_mean, ROWS_LAYOUT)
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
def _bnlr_fwd_apply_kernel(X, Y, PART, W, B, RM, RV, NBT, MEAN, RSTD, SCALE, SHIFT, N_ROWS, C, K, TILES_PER_PROG, P,
                           momentum, eps, slope, ROWS_LAYOUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, K_ALIGN: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Training, split path, second of two launches, on the statistics kernel's grid and tiles: merge the
    channel's P partial triples (programs, or ranks when synchronised), then y = leaky((x - mean) * scale + shift)
    over the tiles this program reduced. Program 0 of each channel (block) updates the running statistics and
    stores mean / rstd / scale / shift for the backward; the others compute the same values from the same
    partials in the same order, so every program normalises with identical bits."""
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    count, mean, m2 = _channel_partials(PART, P, C, pid_c, ROWS_LAYOUT, BLOCK_K, BLOCK_P)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    scale, shift = _finalize_channels(chan, cmask, cmask & (pid_p == 0), count, mean, m2, W, B, RM, RV, NBT, MEAN,
                                      RSTD, SCALE, SHIFT, momentum, eps, HAS_W, HAS_B, UPDATE_RUNNING, CUMULATIVE)
    mean = _per_channel(mean, ROWS_LAYOUT)
    scale = _per_channel(scale, ROWS_LAYOUT)
    shift = _per_channel(shift, ROWS_LAYOUT)
    n_tiles = _n_tiles(N_ROWS, K, ROWS_LAYOUT, BLOCK_R, BLOCK_K)
    for i in range(TILES_PER_PROG):
        t = pid_p * TILES_PER_PROG + i
        offs, mask, _count = _tile_offsets(pid_c, t, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
        mask = mask & (t < n_tiles)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, _leaky(_bn_affine(x, mean, scale, shift), slope).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bnlr_fwd_finalize_merge_kernel(PART, STATS, P, C, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Synchronised BN, split point 1: this rank's merged (count, mean, M2) per channel into STATS (3, C),
    to be all-gathered and merged across ranks by `_bnlr_fwd_apply_kernel`."""
    chan = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chan < C
    count, mean, m2 = _merge_partials(PART, P, C, chan, cmask, BLOCK_C, BLOCK_P)
    tl.store(STATS + chan, count, mask=cmask)
    tl.store(STATS + C + chan, mean, mask=cmask)
    tl.store(STATS + 2 * C + chan, m2, mask=cmask)


@triton.jit
def _bnlr_fwd_finalize_eval_kernel(W, B, RM, RV, MEAN, RSTD, SCALE, SHIFT, C, eps, HAS_W: tl.constexpr,
                                   HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Eval: scale/shift from the running statistics (nothing is updated)."""
    chan = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chan < C
    mean = tl.load(RM + chan, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(RV + chan, mask=cmask, other=1.0).to(tl.float32)
    # count = 1 and m2 = var make the shared epilogue compute rstd = 1 / sqrt(var + eps).
    _finalize_channels(chan, cmask, cmask, 1.0, mean, var, W, B, RM, RV, RM, MEAN, RSTD, SCALE, SHIFT, 0.0, eps,
                       HAS_W, HAS_B, False, False)


@triton.jit
def _bnlr_fwd_kernel(X, Y, MEAN, SCALE, SHIFT, TOTAL_ROWS, C, K, slope, ROWS_LAYOUT: tl.constexpr,
                     K_ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = leaky((x - mean) * scale + shift) over the (TOTAL_ROWS, K) matrix view of x."""
    K = _aligned(K, K_ALIGN)
    rows, cols, rmask, kmask, mask, offs = _tile(tl.program_id(0), tl.program_id(1), TOTAL_ROWS, K, BLOCK_R, BLOCK_K)
    mean = _channel_param(MEAN, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    scale = _channel_param(SCALE, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    shift = _channel_param(SHIFT, rows, cols, rmask, kmask, C, ROWS_LAYOUT)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = _leaky(_bn_affine(x, mean, scale, shift), slope)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Backward kernels


@triton.jit
def _bnlr_bwd_fused_kernel(X, G, DX, MEAN, RSTD, SCALE, SHIFT, DW, DB, N_ROWS, C, K, inv_count, slope,
                           ROWS_LAYOUT: tl.constexpr, TRAINING: tl.constexpr, HAS_DW: tl.constexpr,
                           HAS_DB: tl.constexpr, HAS_DX: tl.constexpr, K_ALIGN: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward when a whole channel (block) fits one tile: one read of x and g, one write of dx."""
    pid_c = tl.program_id(0)
    offs, mask, _count = _tile_offsets(pid_c, 0, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    mean = _channel_vector(MEAN, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    rstd = _channel_vector(RSTD, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    scale = _channel_vector(SCALE, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    shift = _channel_vector(SHIFT, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    h, x_hat = _bwd_tile_terms(x, g, mean, rstd, scale, shift, mask, slope)
    sum_h = _reduce_tile(h, ROWS_LAYOUT)
    sum_hx = _reduce_tile(h * x_hat, ROWS_LAYOUT)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    _store_param_grads(DW, DB, chan, cmask, sum_h, sum_hx, HAS_DW, HAS_DB)
    if HAS_DX:
        if TRAINING:
            mean_h = _per_channel(sum_h * inv_count, ROWS_LAYOUT)
            mean_hx = _per_channel(sum_hx * inv_count, ROWS_LAYOUT)
            dx = scale * (h - mean_h - x_hat * mean_hx)
        else:
            dx = scale * h
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bnlr_bwd_reduce_kernel(X, G, MEAN, RSTD, SCALE, SHIFT, PART, N_ROWS, C, K, TILES_PER_PROG, P, slope,
                            ROWS_LAYOUT: tl.constexpr, K_ALIGN: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """Partial per-channel sums of h and h * x_hat; PART is (2, C, P) fp32, one slot per program."""
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    mean = _channel_vector(MEAN, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    rstd = _channel_vector(RSTD, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    scale = _channel_vector(SCALE, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    shift = _channel_vector(SHIFT, pid_c, C, ROWS_LAYOUT, BLOCK_K)
    n_tiles = _n_tiles(N_ROWS, K, ROWS_LAYOUT, BLOCK_R, BLOCK_K)
    if ROWS_LAYOUT:
        sum_h = tl.zeros([BLOCK_K], dtype=tl.float32)
        sum_hx = tl.zeros([BLOCK_K], dtype=tl.float32)
    else:
        sum_h = 0.0
        sum_hx = 0.0
    for i in range(TILES_PER_PROG):
        t = pid_p * TILES_PER_PROG + i
        offs, mask, _count = _tile_offsets(pid_c, t, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
        mask = mask & (t < n_tiles)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        h, x_hat = _bwd_tile_terms(x, g, mean, rstd, scale, shift, mask, slope)
        sum_h += _reduce_tile(h, ROWS_LAYOUT)
        sum_hx += _reduce_tile(h * x_hat, ROWS_LAYOUT)
    chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
    slot = chan.to(tl.int64) * P + pid_p
    tl.store(PART + slot, sum_h, mask=cmask)
    tl.store(PART + C * P + slot, sum_hx, mask=cmask)


@triton.jit
def _bnlr_bwd_finalize_sums_kernel(PART, DW, DB, SUMS, P, C, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Synchronised BN, split point 2: dweight/dbias from this rank's sums, and the (2, C) sums into SUMS
    for the all-reduce that precedes `_bnlr_bwd_apply_kernel`."""
    chan = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chan < C
    sum_h, sum_hx = _sum_partials(PART, P, C, chan, cmask, BLOCK_C, BLOCK_P)
    _store_param_grads(DW, DB, chan, cmask, sum_h, sum_hx, HAS_DW, HAS_DB)
    tl.store(SUMS + chan, sum_h, mask=cmask)
    tl.store(SUMS + C + chan, sum_hx, mask=cmask)


@triton.jit
def _bnlr_bwd_apply_kernel(X, G, DX, PART, COUNT, MEAN, RSTD, SCALE, SHIFT, DW, DB, N_ROWS, C, K, TILES_PER_PROG, P,
                           inv_count, slope, ROWS_LAYOUT: tl.constexpr, TRAINING: tl.constexpr, SYNC: tl.constexpr,
                           HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, HAS_DX: tl.constexpr, K_ALIGN: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Backward, split path, second of two launches, on the reduce kernel's grid and tiles: sum the channel's
    P partials of (sum h, sum h * x_hat), then dx = scale * h + c1 * (x - mean) + c2 over this program's tiles,
    c1 = -scale * rstd * sum(h x_hat) / n and c2 = -scale * sum(h) / n (both 0 in eval, where the statistics
    are constants). Program 0 of each channel (block) stores dweight = sum(h x_hat) and dbias = sum(h).

    SYNC: PART holds the all-reduced (2, C) sums (P = 1), n is the global per-channel COUNT, and dweight /
    dbias were stored from the local sums by `_bnlr_bwd_finalize_sums_kernel`.
    """
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    sum_h, sum_hx = _channel_sums(PART, P, C, pid_c, ROWS_LAYOUT, BLOCK_K, BLOCK_P)
    if not SYNC:
        chan, cmask = _channels(pid_c, C, ROWS_LAYOUT, BLOCK_K)
        _store_param_grads(DW, DB, chan, cmask & (pid_p == 0), sum_h, sum_hx, HAS_DW, HAS_DB)
    if HAS_DX:
        mean = _channel_vector(MEAN, pid_c, C, ROWS_LAYOUT, BLOCK_K)
        rstd = _channel_vector(RSTD, pid_c, C, ROWS_LAYOUT, BLOCK_K)
        scale = _channel_vector(SCALE, pid_c, C, ROWS_LAYOUT, BLOCK_K)
        shift = _channel_vector(SHIFT, pid_c, C, ROWS_LAYOUT, BLOCK_K)
        if SYNC:
            inv_n = 1.0 / tl.maximum(_channel_vector(COUNT, pid_c, C, ROWS_LAYOUT, BLOCK_K), 1.0)
        else:
            inv_n = inv_count
        c1 = -scale * rstd * _per_channel(sum_hx, ROWS_LAYOUT) * inv_n
        c2 = -scale * _per_channel(sum_h, ROWS_LAYOUT) * inv_n
        n_tiles = _n_tiles(N_ROWS, K, ROWS_LAYOUT, BLOCK_R, BLOCK_K)
        for i in range(TILES_PER_PROG):
            t = pid_p * TILES_PER_PROG + i
            offs, mask, _count = _tile_offsets(pid_c, t, N_ROWS, C, K, ROWS_LAYOUT, K_ALIGN, BLOCK_R, BLOCK_K)
            mask = mask & (t < n_tiles)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            h = tl.where(_bn_affine(x, mean, scale, shift) > 0, g, g * slope)
            if TRAINING:
                dx = scale * h + c1 * (x - mean) + c2
            else:
                dx = scale * h
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# True when @triton.jit produced interpreter functions (TRITON_INTERPRET=1 at import): CPU tensors can run.
INTERPRET = isinstance(_bnlr_fwd_apply_kernel, InterpretedFunction)
