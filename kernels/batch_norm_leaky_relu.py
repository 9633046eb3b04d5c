"""Fused BatchNorm + LeakyReLU: launchers and the autograd Function (the op's entry in `registry.py` points here).

The kernels live in `batch_norm_leaky_relu_kernels.py`, block sizes and grids come from the pure-Python plan in
`batch_norm_leaky_relu_plan.py`, the synchronised BN's collectives from `collectives.py` and the input checks
(shared with the eager path) from `_checks.py`. Every launch passes its arguments by keyword. `LIMITS`,
`launch_example` and `proxy_key` are what the registry's tools (compile report, benchmarks) ask of the op.

Memory layouts. x of shape (N, C, *) with S = prod(*) is handled as a row-major matrix in one of two layouts,
so that the contiguous axis is always the tile's fast axis (128-bit loads):
  ROWS    (N, C) input, (N, C, 1, 1), or channels_last: an (M = N*S, C) matrix; channel = column.
  PLANES  contiguous NCHW: an (N*C, S) matrix; channel of row r = r % C.
Anything else is made contiguous first (a copy, never a wrong stride).

Saved for backward: x (in its kernel layout) plus per-channel fp32 vectors (mean, rstd, scale, shift, and the
global count when synchronised); the LeakyReLU mask is recomputed from x.

Empty input (any dimension 0) behaves as F.batch_norm + F.leaky_relu: an empty output, running statistics
untouched, zero parameter gradients. A synchronised BN rank with an empty batch still joins both collectives.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import batch_norm_leaky_relu_kernels as _kern
from . import collectives
from .batch_norm_leaky_relu_plan import LIMITS as LIMITS  # the op's planning limits, for the registry's tools
from .batch_norm_leaky_relu_plan import DeviceLimits, LaunchPlan, device_limits, plan

INTERPRET = _kern.INTERPRET  # kernels/__init__ reads it to decide whether CPU tensors can run


class Saved(NamedTuple):
    """Per-channel fp32 vectors the forward leaves for the backward."""

    mean: torch.Tensor
    rstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    count: torch.Tensor | None  # global per-channel count (synchronised BN only)


def layout_of(x: torch.Tensor):
    """(x_view, rows_layout, N_ROWS, C, K): the matrix view the kernels use; copies only if needed."""
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if s == 1:
        x2 = x.reshape(n, c)
        return (x2 if x2.is_contiguous() else x2.contiguous()), True, n, c, c
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x, True, n * s, c, c
    return (x if x.is_contiguous() else x.contiguous()), False, n, c, s


def plan_for(x: torch.Tensor, limits: DeviceLimits | None = None) -> LaunchPlan:
    """The launch plan for x on its device (or under `limits`)."""
    _, rows_layout, n_rows, c, k = layout_of(x)
    return plan(n_rows, c, k, rows_layout, limits if limits is not None else device_limits(x.device))


def _empty(shape, dtype, device):
    """Every kernel output is allocated here (tests swap it for a NaN fill to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like_x(x: torch.Tensor) -> torch.Tensor:
    """An output shaped and laid out like x (channels_last stays channels_last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return _empty((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), x.dtype, x.device).permute(0, 3, 1, 2)
    return _empty(x.shape, x.dtype, x.device)


def _like_layout(t: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
    """t (same numel as xv) in xv's exact memory layout, copying only when the strides differ."""
    t = t.reshape(xv.shape) if t.shape != xv.shape else t
    if t.stride() == xv.stride():
        return t
    return t.contiguous() if xv.is_contiguous() else t.contiguous(memory_format=torch.channels_last)


def _or(t, placeholder):
    """An optional pointer argument: absent ones get a placeholder their constexpr flag never dereferences."""
    return t if t is not None else placeholder


def _launch(kernel, grid, **kwargs):
    """kernel[grid](**kwargs), skipped when the grid is empty (zero channels)."""
    if 0 not in grid:
        kernel[grid](**kwargs)


# --------------------------------------------------------------------------------------------------
# Forward


def _batch_statistics(xv, lp: LaunchPlan, process_group):
    """Partial (count, mean, M2) triples (3, C, P) and P; with a group, one slot per rank and the global count."""
    c, dev = lp.c, xv.device
    p = lp.stats.grid[1]
    if lp.empty:  # an empty rank of a synchronised BN: count 0 merges as nothing
        part = torch.zeros((3, c, p), dtype=torch.float32, device=dev)
    else:
        part = _empty((3, c, p), torch.float32, dev)
        _launch(_kern._bnlr_fwd_stats_kernel, lp.stats.grid, X=xv, PART=part, N_ROWS=lp.n_rows, C=c, K=lp.k,
                TILES_PER_PROG=lp.tiles_per_prog, P=p, ROWS_LAYOUT=lp.rows_layout, K_ALIGN=lp.k_align,
                **lp.stats.launch)
    if process_group is None:
        return part, p, None
    # Split point 1 (synchronised BN): merge locally, all-gather every rank's (3, C) triples, and let the
    # apply kernel Chan-merge them as if they were partials of one grid (exact for uneven batches).
    local = _empty((3, c), torch.float32, dev)
    _launch(_kern._bnlr_fwd_finalize_merge_kernel, lp.finalize_grid, PART=part, STATS=local, P=p, C=c,
            BLOCK_C=lp.finalize_block_c, BLOCK_P=lp.block_p(p))
    part = collectives.all_gather_stats(local, process_group).permute(1, 2, 0).contiguous()  # (3, C, world)
    return part, part.shape[2], part[0].sum(1)


def _non_empty(t: torch.Tensor) -> torch.Tensor:
    """t, or a one-element stand-in when t is empty: a kernel whose every x access is masked off (an empty rank
    of a synchronised BN still finalizes) gets a real pointer all the same."""
    return t if t.numel() else torch.empty(1, dtype=t.dtype, device=t.device)


def batch_norm_leaky_relu_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                  negative_slope, num_batches_tracked=None, process_group=None,
                                  limits: DeviceLimits | None = None):
    """Launch the forward; returns (y, Saved). `limits` overrides the device's planning limits.

    Launches: training, one (`fused`) or two (statistics, apply); a synchronised BN adds the local merge before
    its all-gather; eval, two (scale/shift from the running statistics, normalise).
    """
    xv, rows_layout, n_rows, c, k = layout_of(x)
    lp = plan(n_rows, c, k, rows_layout, limits if limits is not None else device_limits(x.device))
    y = _empty_like_x(xv)
    out = y.view(x.shape) if y.shape != x.shape else y
    mean, rstd, scale, shift = (_empty((c,), torch.float32, x.device) for _ in range(4))
    update = training and running_mean is not None
    if update and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # on device, no host sync; the kernels read it for momentum=None
    if lp.empty and process_group is None:  # as F.batch_norm: empty output, running statistics untouched
        return out, Saved(mean, rstd, scale, shift, None)
    params = {"W": _or(weight, mean), "B": _or(bias, mean), "HAS_W": weight is not None, "HAS_B": bias is not None,
              "MEAN": mean, "RSTD": rstd, "SCALE": scale, "SHIFT": shift, "C": c, "eps": eps}
    if not training:
        _launch(_kern._bnlr_fwd_finalize_eval_kernel, lp.finalize_grid, RM=running_mean, RV=running_var,
                BLOCK_C=lp.finalize_block_c, **params)
        _launch(_kern._bnlr_fwd_kernel, lp.elem.grid, X=xv, Y=y, MEAN=mean, SCALE=scale, SHIFT=shift,
                TOTAL_ROWS=lp.total_rows, C=c, K=k, slope=negative_slope, ROWS_LAYOUT=rows_layout,
                K_ALIGN=lp.k_align, **lp.elem.launch)
        return out, Saved(mean, rstd, scale, shift, None)
    cumulative = update and momentum is None
    params.update(RM=_or(running_mean, mean), RV=_or(running_var, mean),
                  NBT=num_batches_tracked if cumulative else mean, UPDATE_RUNNING=update, CUMULATIVE=cumulative,
                  momentum=0.0 if momentum is None else float(momentum), N_ROWS=n_rows, K=k, slope=negative_slope,
                  ROWS_LAYOUT=rows_layout, K_ALIGN=lp.k_align)
    if lp.fused and process_group is None:
        _launch(_kern._bnlr_fwd_fused_kernel, lp.fused_tiles.grid, X=xv, Y=y, **lp.fused_tiles.launch, **params)
        return out, Saved(mean, rstd, scale, shift, None)
    part, p, count = _batch_statistics(xv, lp, process_group)
    _launch(_kern._bnlr_fwd_apply_kernel, lp.stats.grid, X=_non_empty(xv), Y=_non_empty(y), PART=part, P=p,
            TILES_PER_PROG=lp.tiles_per_prog, BLOCK_P=lp.block_p(p), **lp.stats.launch, **params)
    return out, Saved(mean, rstd, scale, shift, count)


# --------------------------------------------------------------------------------------------------
# Backward


def _split_backward(xv, g, saved: Saved, lp: LaunchPlan, training, negative_slope, dx, dw, db, process_group):
    """Reduce -> apply (dweight / dbias, dx); synchronised, reduce -> local sums -> all-reduce -> apply (dx)."""
    c, dev = lp.c, xv.device
    p = lp.stats.grid[1]
    part = _empty((2, c, p), torch.float32, dev)
    per_channel = {"MEAN": saved.mean, "RSTD": saved.rstd, "SCALE": saved.scale, "SHIFT": saved.shift}
    tiles = {"N_ROWS": lp.n_rows, "C": c, "K": lp.k, "TILES_PER_PROG": lp.tiles_per_prog, "slope": negative_slope,
             "ROWS_LAYOUT": lp.rows_layout, "K_ALIGN": lp.k_align, **lp.stats.launch}
    _launch(_kern._bnlr_bwd_reduce_kernel, lp.stats.grid, X=xv, G=g, PART=part, P=p, **per_channel, **tiles)
    grads = {"DW": _or(dw, saved.mean), "DB": _or(db, saved.mean), "HAS_DW": dw is not None, "HAS_DB": db is not None}
    sync = process_group is not None
    if sync:
        # Split point 2 (synchronised BN): dweight/dbias keep the local sums (DDP all-reduces them); the sums
        # that feed dx are all-reduced across the group first.
        sums = _empty((2, c), torch.float32, dev)
        _launch(_kern._bnlr_bwd_finalize_sums_kernel, lp.finalize_grid, PART=part, SUMS=sums, P=p, C=c,
                BLOCK_C=lp.finalize_block_c, BLOCK_P=lp.block_p(p), **grads)
        if dx is None:
            return
        part, p = collectives.all_reduce_sum(sums, process_group).view(2, c, 1), 1
    # Without dx only program 0 of each channel (block) has work (dweight / dbias): one program per block.
    grid = lp.stats.grid if dx is not None else (lp.stats.grid[0], 1)
    _launch(_kern._bnlr_bwd_apply_kernel, grid, X=xv, G=g, DX=_or(dx, xv), PART=part, P=p,
            COUNT=saved.count if sync else saved.mean, inv_count=1.0 / lp.count, TRAINING=training, SYNC=sync,
            HAS_DX=dx is not None, BLOCK_P=lp.block_p(p), **grads, **per_channel, **tiles)


def batch_norm_leaky_relu_backward(g, x, saved: Saved, training, negative_slope, needs=(True, True, True),
                                   weight_dtype=None, bias_dtype=None, process_group=None,
                                   limits: DeviceLimits | None = None):
    """Launch the backward; returns (dx, dweight, dbias), each None where `needs` says so.

    `x` is the forward's input in its kernel layout (what the Function saves); `limits` must be the forward's.
    Launches: one (`fused`) or two (reduce, apply); a synchronised BN adds the local sums before its all-reduce.
    """
    xv, rows_layout, n_rows, c, k = layout_of(x)  # x was saved in its kernel layout: no copy here
    g = _like_layout(g, xv)
    dev = x.device
    lp = plan(n_rows, c, k, rows_layout, limits if limits is not None else device_limits(dev))
    need_dx, need_dw, need_db = needs
    dx = _empty_like_x(xv) if need_dx else None
    if lp.empty:  # PyTorch's gradients of an empty batch: dx empty, dweight = dbias = 0
        dw = torch.zeros((c,), dtype=weight_dtype, device=dev) if need_dw else None
        db = torch.zeros((c,), dtype=bias_dtype, device=dev) if need_db else None
        if process_group is not None:  # the other ranks wait for this rank's (zero) sums
            collectives.all_reduce_sum(torch.zeros((2, c), dtype=torch.float32, device=dev), process_group)
        return dx, dw, db
    dw = _empty((c,), weight_dtype, dev) if need_dw else None
    db = _empty((c,), bias_dtype, dev) if need_db else None
    if lp.fused and process_group is None:
        _launch(_kern._bnlr_bwd_fused_kernel, lp.fused_tiles.grid, X=xv, G=g, DX=_or(dx, saved.mean),
                MEAN=saved.mean, RSTD=saved.rstd, SCALE=saved.scale, SHIFT=saved.shift, DW=_or(dw, saved.mean),
                DB=_or(db, saved.mean), N_ROWS=n_rows, C=c, K=k, inv_count=1.0 / lp.count, slope=negative_slope,
                ROWS_LAYOUT=rows_layout, TRAINING=training, HAS_DW=need_dw, HAS_DB=need_db, HAS_DX=need_dx,
                K_ALIGN=lp.k_align, **lp.fused_tiles.launch)
    else:
        _split_backward(xv, g, saved, lp, training, negative_slope, dx, dw, db, process_group)
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Autograd


class BatchNormLeakyReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, negative_slope,
                num_batches_tracked, process_group):
        limits = device_limits(x.device)  # planned once: the backward launches with the same limits
        y, saved = batch_norm_leaky_relu_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                                 negative_slope, num_batches_tracked, process_group, limits)
        # Only x (in its kernel layout) and per-channel vectors: the LeakyReLU mask is recomputed.
        ctx.save_for_backward(layout_of(x)[0], *saved)
        ctx.x_shape = x.shape
        ctx.training = training
        ctx.negative_slope = negative_slope
        ctx.process_group = process_group
        ctx.limits = limits
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, g):
        xv, *saved = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        dx, dw, db = batch_norm_leaky_relu_backward(g, xv, Saved(*saved), ctx.training, ctx.negative_slope, needs,
                                                    ctx.weight_dtype, ctx.bias_dtype, ctx.process_group, ctx.limits)
        if dx is not None and dx.shape != ctx.x_shape:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None, None, None, None, None, None, None


def batch_norm_leaky_relu(x, weight=None, bias=None, running_mean=None, running_var=None, training=True, momentum=0.1,
                          eps=1e-5, negative_slope=0.2, num_batches_tracked=None, process_group=None):
    """Triton path of `kernels.batch_norm_leaky_relu` (inputs already checked by kernels._checks)."""
    return BatchNormLeakyReLUFunction.apply(x, weight, bias, running_mean, running_var, bool(training), momentum,
                                            float(eps), float(negative_slope), num_batches_tracked, process_group)


# --------------------------------------------------------------------------------------------------
# For the registry's tools


def launch_example(shape, dtype, variant: str, limits: DeviceLimits) -> None:
    """Launch the forward and the backward once, as a call on x of `shape` and `dtype` would under `limits`, on
    uninitialised CPU tensors: the compile report swaps the kernels for recorders first. `variant`: "train",
    "channels_last" (training on a channels_last x), "eval", or "sync" (training with a process group; the caller
    stands in for its two collectives)."""
    c = shape[1]
    x = torch.empty(shape, dtype=dtype)
    if variant == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(c), torch.zeros(c)
    rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long)
    training = variant != "eval"
    group = object() if variant == "sync" else None
    _, saved = batch_norm_leaky_relu_forward(x, w, b, rm, rv, training, 0.1, 1e-5, 0.2, nbt, group, limits=limits)
    xv = layout_of(x)[0]
    batch_norm_leaky_relu_backward(torch.empty_like(xv), xv, saved, training, 0.2, (True, True, True), w.dtype,
                                   b.dtype, group, limits=limits)


def proxy_key(shape, limits: DeviceLimits):
    """What a smaller shape must share with `shape` for its counted traffic to scale with the element count: the
    layout, fused or split, and the spatial extent (PLANES) or the row count (ROWS, where the per-channel vectors
    are a large share of the bytes and scale with C, not with the rows)."""
    lp = plan_for(torch.empty(shape, device="meta"), limits)
    return lp.rows_layout, lp.fused, lp.n_rows if lp.rows_layout else lp.k
