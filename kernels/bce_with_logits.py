"""BCE-with-logits and the fused discriminator loss: the @triton.jit kernels, the launch plan, the launchers and
the autograd Functions.

`_bce_fwd_kernel` computes, in fp32, the stable loss max(x, 0) - x*t + log(1 + exp(-|x|)) and the gradient
(sigmoid(x) - t) * w (w = 1/M for mean, 1 for sum/none) together; the gradient goes to its own fp32 buffer and
`_bce_bwd_kernel` only scales it by grad_output, read on the device (no host sync).

The same kernel serves the discriminator loss: rows [0, M_FIRST) take label_a and weight w_a, the rest label_b
and w_b, so mean(BCE(real, 1)) + mean(BCE(fake, 0)) over one concatenated batch is one launch, which also sums
sigmoid(x) of each part (D(x), D(G(z)) for logging). Reductions are per-program partial sums (no float atomics):
deterministic.

Input checks (shared with the eager path) are in `_checks.py`. Empty logits take the eager reference, which is
PyTorch's own semantics (mean of nothing is nan, sum is 0): there is nothing to launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._limits import LimitsSource

# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _log1p(e):
    # log(1 + e) accurate for small e (Goldberg): triton.language has no portable log1p.
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _bce_fwd_kernel(X, T, LOSS, GRAD, PART, M, M_FIRST, TILES_PER_PROG, P, label_a, label_b, w_a, w_b,
                    HAS_TARGET: tl.constexpr, STORE_LOSS: tl.constexpr, STORE_GRAD: tl.constexpr,
                    REDUCE: tl.constexpr, WANT_SIGMOID: tl.constexpr, BLOCK: tl.constexpr):
    """Loss and gradient in one pass; PART (3, P): sum(w * loss), sum(w * sigmoid) of each part."""
    pid = tl.program_id(0)
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    sig_a = tl.zeros([BLOCK], dtype=tl.float32)
    sig_b = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(TILES_PER_PROG):
        offs = (pid * TILES_PER_PROG + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        first = offs < M_FIRST
        if HAS_TARGET:
            t = tl.load(T + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            t = tl.where(first, label_a, label_b)
        w = tl.where(first, w_a, w_b)
        e = tl.exp(-tl.abs(x))
        loss = tl.maximum(x, 0.0) - x * t + _log1p(e)
        # sigmoid from the same e: no overflow for either sign of x.
        sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        if STORE_LOSS:
            tl.store(LOSS + offs, loss.to(LOSS.dtype.element_ty), mask=mask)
        if STORE_GRAD:
            tl.store(GRAD + offs, (sig - t) * w, mask=mask)
        if REDUCE:
            loss_acc += tl.where(mask, loss * w, 0.0)
        if WANT_SIGMOID:
            sig_a += tl.where(mask & first, sig, 0.0)
            sig_b += tl.where(mask & (offs >= M_FIRST), sig, 0.0)
    if REDUCE:
        tl.store(PART + pid, tl.sum(loss_acc, axis=0))
    if WANT_SIGMOID:
        # Scaled by w (1 / part size for the D loss): the partials sum straight to the means.
        tl.store(PART + P + pid, tl.sum(sig_a, axis=0) * w_a)
        tl.store(PART + 2 * P + pid, tl.sum(sig_b, axis=0) * w_b)


@triton.jit
def _bce_bwd_kernel(GRAD, GO, DX, M, GO_IS_SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    """dx = grad * grad_output, grad_output a 0-d device tensor (mean/sum) or elementwise (none)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    grad = tl.load(GRAD + offs, mask=mask, other=0.0)
    if GO_IS_SCALAR:
        go = tl.load(GO).to(tl.float32)
    else:
        go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (grad * go).to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launch plan: the grid as a pure function of the logit count. One program loops over everything up to
# `single_program_max` logits (any D batch): its partial is the result, one launch and no second sum. Larger
# inputs get about `programs` programs and one fixed-order sum of their partials.

BLOCK = 1024  # logits per tile: 4 KB fp32, 8 per thread at 4 warps (2 x ld.v4)
SINGLE_PROGRAM_MAX = 16 * BLOCK  # up to here one program loops over everything: one launch, no 2nd sum
PROGRAMS_PER_SM = 4
NUM_WARPS = 4
CPU_TARGET_PROGRAMS = 8  # the interpreter runs programs one after another: few of them


@dataclass(frozen=True)
class BCELimits:
    programs: int  # grid size target above single_program_max
    block: int = BLOCK
    single_program_max: int = SINGLE_PROGRAM_MAX
    num_warps: int = NUM_WARPS

    def __post_init__(self):
        if self.programs < 1 or self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"programs must be >= 1 and block a power of two: {self}")

    @classmethod
    def gpu(cls, sms: int) -> BCELimits:
        return cls(programs=PROGRAMS_PER_SM * sms)

    @classmethod
    def cpu(cls) -> BCELimits:
        return cls(programs=CPU_TARGET_PROGRAMS)


@dataclass(frozen=True)
class BCEPlan:
    grid: tuple[int]  # forward programs (P partials)
    tiles_per_prog: int
    bwd_grid: tuple[int]  # one program per tile
    block: int
    num_warps: int


def plan(m: int, limits: BCELimits) -> BCEPlan:
    """Grid for M logits (M may be 0)."""
    n_tiles = triton.cdiv(max(m, 1), limits.block)
    p = 1 if m <= limits.single_program_max else min(n_tiles, limits.programs)
    tiles_per_prog = triton.cdiv(n_tiles, p)
    p = triton.cdiv(n_tiles, tiles_per_prog)
    return BCEPlan(grid=(p,), tiles_per_prog=tiles_per_prog, bwd_grid=(triton.cdiv(m, limits.block),),
                   block=limits.block, num_warps=limits.num_warps)


LIMITS = LimitsSource("bce_limits", BCELimits.gpu, BCELimits.cpu)
limits_override = LIMITS.override  # `with limits_override(BCELimits(...)):` plans every device with those limits
device_limits = LIMITS.for_device  # the BCELimits the launchers plan with on a torch.device


def plan_for(m: int, device: torch.device, limits: BCELimits | None = None) -> BCEPlan:
    return plan(m, limits if limits is not None else device_limits(device))


# --------------------------------------------------------------------------------------------------
# Launchers


def _empty(shape, dtype, device):
    """Every kernel output is allocated here (tests swap it for a NaN fill to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def bce_forward(logits, target, m_first, label_a, label_b, w_a, w_b, store_loss, store_grad, reduce, want_sigmoid,
                limits: BCELimits | None = None):
    """Launch the forward; returns (loss or None, grad or None, partials (3,) or None)."""
    x = logits.contiguous()
    m = x.numel()
    dev = x.device
    lp = plan_for(m, dev, limits)
    p = lp.grid[0]
    t = target.contiguous() if torch.is_tensor(target) else None
    loss = _empty(x.shape, x.dtype, dev) if store_loss else None
    grad = _empty(x.shape, torch.float32, dev) if store_grad else None
    part = _empty((3, p), torch.float32, dev) if (reduce or want_sigmoid) else None
    placeholder = x  # absent optional pointers: never dereferenced (constexpr-guarded)
    _bce_fwd_kernel[lp.grid](
        X=x, T=t if t is not None else placeholder, LOSS=loss if store_loss else placeholder,
        GRAD=grad if store_grad else placeholder, PART=part if part is not None else placeholder, M=m, M_FIRST=m_first,
        TILES_PER_PROG=lp.tiles_per_prog, P=p, label_a=float(label_a), label_b=float(label_b), w_a=float(w_a),
        w_b=float(w_b), HAS_TARGET=t is not None, STORE_LOSS=store_loss, STORE_GRAD=store_grad, REDUCE=reduce,
        WANT_SIGMOID=want_sigmoid, BLOCK=lp.block, num_warps=lp.num_warps)
    if part is not None:
        part = part[:, 0] if p == 1 else part.sum(1)  # deterministic: fixed-order sum of P partials
    return loss, grad, part


def bce_backward(grad, grad_output, dtype, limits: BCELimits | None = None):
    """dx = grad * grad_output on the device."""
    m = grad.numel()
    dx = _empty(grad.shape, dtype, grad.device)
    go = grad_output.contiguous()
    lp = plan_for(m, grad.device, limits)
    _bce_bwd_kernel[lp.bwd_grid](GRAD=grad, GO=go, DX=dx, M=m, GO_IS_SCALAR=go.numel() == 1 and m != 1 or go.dim() == 0,
                                 BLOCK=lp.block, num_warps=lp.num_warps)
    return dx


# --------------------------------------------------------------------------------------------------
# Autograd


class BCEWithLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, reduction):
        m = logits.numel()
        reduce = reduction != "none"
        w = 1.0 / m if reduction == "mean" else 1.0
        label = 0.0 if torch.is_tensor(target) else float(target)
        ctx.limits = device_limits(logits.device)
        loss, grad, part = bce_forward(logits, target, m, label, label, w, w, store_loss=not reduce,
                                       store_grad=ctx.needs_input_grad[0], reduce=reduce, want_sigmoid=False,
                                       limits=ctx.limits)
        ctx.reduction = reduction
        ctx.logits_dtype = logits.dtype
        ctx.target_is_tensor = torch.is_tensor(target)
        ctx.w = w
        # The gradient buffer replaces logits and target; logits only if the target needs a gradient.
        ctx.save_for_backward(grad, logits if ctx.needs_input_grad[1] else None)
        return part[0].to(logits.dtype) if reduce else loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, logits = ctx.saved_tensors
        dx = bce_backward(grad, grad_output, ctx.logits_dtype, ctx.limits) if ctx.needs_input_grad[0] else None
        dt = None
        if ctx.target_is_tensor and ctx.needs_input_grad[1]:  # d loss / d t = -x * w (rare: eager)
            dt = (-logits.float() * ctx.w * grad_output.float()).to(logits.dtype)
        return dx, dt, None


class DiscriminatorLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, num_real, real_label, fake_label):
        per_row = logits.numel() // logits.shape[0]
        m_real = num_real * per_row
        m_fake = logits.numel() - m_real
        ctx.limits = device_limits(logits.device)
        _, grad, part = bce_forward(logits, None, m_real, real_label, fake_label, 1.0 / m_real, 1.0 / m_fake,
                                    store_loss=False, store_grad=ctx.needs_input_grad[0], reduce=True,
                                    want_sigmoid=True, limits=ctx.limits)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(grad)
        d_real, d_fake = part[1], part[2]  # already means: one launch in all (for P == 1)
        ctx.mark_non_differentiable(d_real, d_fake)
        return part[0].to(logits.dtype), d_real, d_fake

    @staticmethod
    def backward(ctx, grad_output, _d_real, _d_fake):
        (grad,) = ctx.saved_tensors
        return bce_backward(grad, grad_output, ctx.logits_dtype, ctx.limits), None, None, None


def bce_with_logits(logits, target, reduction="mean"):
    """Triton path of `kernels.bce_with_logits` (inputs already checked by kernels._checks)."""
    if logits.numel() == 0:  # nothing to launch; PyTorch's empty-input semantics (mean: nan, sum: 0)
        from .reference import bce_with_logits as ref

        return ref(logits, target, reduction)
    return BCEWithLogitsFunction.apply(logits, target, reduction)


def discriminator_loss(logits, num_real, real_label=1.0, fake_label=0.0):
    """Triton path of `kernels.discriminator_loss` (inputs already checked by kernels._checks)."""
    if logits.numel() == 0:  # (N, 0) logits: empty parts, as the eager reference (nan means)
        from .reference import discriminator_loss as ref

        return ref(logits, num_real, real_label, fake_label)
    return DiscriminatorLossFunction.apply(logits, int(num_real), float(real_label), float(fake_label))


# --------------------------------------------------------------------------------------------------
# For the registry's tools (the compile report, the benchmarks)


def launch_example(shape, dtype, variant: str, limits: BCELimits) -> None:
    """Launch the forward and the backward once, as a call on logits of `shape` and `dtype` would under `limits`,
    on uninitialised CPU tensors: the compile report swaps the kernels for recorders first. `variant`: a reduction
    ("mean", "sum", "none") with a float label, "target" (mean against a target tensor), or "discriminator" (the D
    loss, real rows first)."""
    x = torch.empty(shape, dtype=dtype)
    m = x.numel()
    if variant == "discriminator":
        half = m // 2
        bce_forward(x, None, half, 1.0, 0.0, 1 / half, 1 / (m - half), False, True, True, True, limits=limits)
        bce_backward(torch.empty(shape), torch.empty(()), dtype, limits=limits)
        return
    target = torch.empty_like(x) if variant == "target" else 1.0
    reduce = variant != "none"
    bce_forward(x, target, m, 1.0, 1.0, 1.0 / m, 1.0 / m, not reduce, True, reduce, False, limits=limits)
    bce_backward(torch.empty(shape), torch.empty(()) if reduce else torch.empty(shape), dtype, limits=limits)


def proxy_key(shape, limits: BCELimits) -> bool:
    """What a smaller input must share with `shape` for its counted traffic to scale with the element count: one
    program, or several and a sum of their partials."""
    return plan(math.prod(shape), limits).grid[0] > 1
