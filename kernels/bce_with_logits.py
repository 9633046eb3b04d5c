"""BCE-with-logits: Triton kernels, launchers, autograd Function.

One forward kernel computes, in fp32, the stable loss max(x, 0) - x*t + log(1 + exp(-|x|)) and the
gradient (sigmoid(x) - t) * w (w = 1/M for mean, 1 for sum/none) together; the gradient goes to its
own fp32 buffer and backward only scales it by grad_output, read on the device (no host sync).

The same kernel serves the discriminator loss: rows [0, M_FIRST) take label_a and weight w_a, the
rest label_b and w_b, so mean(BCE(real, 1)) + mean(BCE(fake, 0)) over one concatenated batch is one
launch, which also sums sigmoid(x) of each part (D(x), D(G(z)) for logging).
Reductions are per-program partial sums (no float atomics): deterministic. When a single program
covers the input (any D batch up to SINGLE_PROGRAM_MAX logits) its partial is the result.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

BLOCK = 1024  # logits per tile: 4 KB fp32, 8 per thread at 4 warps (2 x ld.v4)
SINGLE_PROGRAM_MAX = 16 * BLOCK  # up to here one program loops over everything: one launch, no 2nd sum
PROGRAMS_PER_SM = 4
NUM_WARPS = 4


@triton.jit
def _log1p(e):
    # log(1 + e) accurate for small e (Goldberg): triton.language has no portable log1p.
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _bce_fwd_kernel(
    X,
    T,
    LOSS,
    GRAD,
    PART,
    M,
    M_FIRST,
    TILES_PER_PROG,
    P,
    label_a,
    label_b,
    w_a,
    w_b,
    HAS_TARGET: tl.constexpr,
    STORE_LOSS: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    REDUCE: tl.constexpr,
    WANT_SIGMOID: tl.constexpr,
    BLOCK: tl.constexpr,
):
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
# Planning and launchers


def plan(m: int, device_type: str = "cuda", sm_count: int = 132) -> dict:
    """Grid for M logits: one program up to SINGLE_PROGRAM_MAX, else ~PROGRAMS_PER_SM per SM."""
    n_tiles = triton.cdiv(max(m, 1), BLOCK)
    if m <= SINGLE_PROGRAM_MAX or device_type != "cuda":
        p = 1 if m <= SINGLE_PROGRAM_MAX else min(n_tiles, 8)
    else:
        p = min(n_tiles, PROGRAMS_PER_SM * sm_count)
    tiles_per_prog = triton.cdiv(n_tiles, p)
    p = triton.cdiv(n_tiles, tiles_per_prog)
    return {"grid": (p,), "tiles_per_prog": tiles_per_prog, "bwd_grid": (n_tiles,), "num_warps": NUM_WARPS}


def _plan_for(m: int, device: torch.device) -> dict:
    if device.type == "cuda":
        return plan(m, "cuda", torch.cuda.get_device_properties(device).multi_processor_count)
    return plan(m, device.type)


def _empty(shape, dtype, device):
    """Every kernel output is allocated here (tests swap it for a NaN fill to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_inputs(logits, target, reduction):
    """Reject what F.binary_cross_entropy_with_logits rejects, same exception class and wording."""
    if not torch.is_tensor(logits):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise NotImplementedError(
            f'"bce_with_logits" not implemented for {logits.dtype}: expected floating-point logits'
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if torch.is_tensor(target):
        if target.shape != logits.shape:
            raise ValueError(f"Target size ({target.shape}) must be the same as input size ({logits.shape})")
        if target.device != logits.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found logits on "
                f"{logits.device} and target on {target.device}"
            )
        if target.dtype != logits.dtype:
            raise RuntimeError(
                f"mixed dtype: expected target to have dtype {logits.dtype} like the logits, "
                f"got {target.dtype} (or pass the label as a Python float)"
            )
    elif not isinstance(target, numbers.Real) or isinstance(target, bool):
        raise TypeError(f"target must be a tensor or a float label, got {type(target).__name__}")


def check_discriminator_inputs(logits, num_real):
    check_inputs(logits, 0.0, "mean")
    if logits.dim() == 0:
        raise ValueError("logits must have a batch dimension")
    if not isinstance(num_real, numbers.Integral) or not 0 < num_real < logits.shape[0]:
        raise ValueError(
            f"num_real must be an int in [1, {logits.shape[0] - 1}] (the batch holds real "
            f"then fake rows), got {num_real!r}"
        )


def bce_forward(
    logits, target, m_first, label_a, label_b, w_a, w_b, store_loss, store_grad, reduce, want_sigmoid
):
    """Launch the forward; returns (loss or None, grad or None, partials (3,) or None)."""
    x = logits.contiguous()
    m = x.numel()
    dev = x.device
    cfg = _plan_for(m, dev)
    p = cfg["grid"][0]
    t = target.contiguous() if torch.is_tensor(target) else None
    loss = _empty(x.shape, x.dtype, dev) if store_loss else None
    grad = _empty(x.shape, torch.float32, dev) if store_grad else None
    part = _empty((3, p), torch.float32, dev) if (reduce or want_sigmoid) else None
    dummy = x
    _bce_fwd_kernel[cfg["grid"]](
        x,
        t if t is not None else dummy,
        loss if store_loss else dummy,
        grad if store_grad else dummy,
        part if part is not None else dummy,
        m,
        m_first,
        cfg["tiles_per_prog"],
        p,
        float(label_a),
        float(label_b),
        float(w_a),
        float(w_b),
        HAS_TARGET=t is not None,
        STORE_LOSS=store_loss,
        STORE_GRAD=store_grad,
        REDUCE=reduce,
        WANT_SIGMOID=want_sigmoid,
        BLOCK=BLOCK,
        num_warps=cfg["num_warps"],
    )
    if part is not None:
        part = part[:, 0] if p == 1 else part.sum(1)  # deterministic: fixed-order sum of P partials
    return loss, grad, part


def bce_backward(grad, grad_output, dtype):
    """dx = grad * grad_output on the device."""
    m = grad.numel()
    dx = _empty(grad.shape, dtype, grad.device)
    go = grad_output.contiguous()
    cfg = _plan_for(m, grad.device)
    _bce_bwd_kernel[cfg["bwd_grid"]](
        grad,
        go,
        dx,
        m,
        GO_IS_SCALAR=go.numel() == 1 and m != 1 or go.dim() == 0,
        BLOCK=BLOCK,
        num_warps=cfg["num_warps"],
    )
    return dx


class BCEWithLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, reduction):
        m = logits.numel()
        reduce = reduction != "none"
        w = 1.0 / m if reduction == "mean" else 1.0
        label = 0.0 if torch.is_tensor(target) else float(target)
        loss, grad, part = bce_forward(
            logits,
            target,
            m,
            label,
            label,
            w,
            w,
            store_loss=not reduce,
            store_grad=ctx.needs_input_grad[0],
            reduce=reduce,
            want_sigmoid=False,
        )
        ctx.reduction = reduction
        ctx.logits_dtype = logits.dtype
        ctx.target_is_tensor = torch.is_tensor(target)
        ctx.w = w
        # The gradient buffer replaces logits and target; logits only if the target needs a gradient.
        ctx.save_for_backward(grad, logits if ctx.needs_input_grad[1] else None)
        if reduce:
            return part[0].to(logits.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, logits = ctx.saved_tensors
        dx = bce_backward(grad, grad_output, ctx.logits_dtype) if ctx.needs_input_grad[0] else None
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
        _, grad, part = bce_forward(
            logits,
            None,
            m_real,
            real_label,
            fake_label,
            1.0 / m_real,
            1.0 / m_fake,
            store_loss=False,
            store_grad=ctx.needs_input_grad[0],
            reduce=True,
            want_sigmoid=True,
        )
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(grad)
        d_real, d_fake = part[1], part[2]  # already means: one launch in all (for P == 1)
        ctx.mark_non_differentiable(d_real, d_fake)
        return part[0].to(logits.dtype), d_real, d_fake

    @staticmethod
    def backward(ctx, grad_output, _d_real, _d_fake):
        (grad,) = ctx.saved_tensors
        return bce_backward(grad, grad_output, ctx.logits_dtype), None, None, None


def bce_with_logits(logits, target, reduction="mean"):
    """Triton path of `kernels.bce_with_logits` (inputs already checked)."""
    if logits.numel() == 0:  # nothing to launch; keep PyTorch's empty-input semantics
        from .reference import bce_with_logits as ref

        return ref(logits, target, reduction)
    return BCEWithLogitsFunction.apply(logits, target, reduction)


def discriminator_loss(logits, num_real, real_label=1.0, fake_label=0.0):
    """Triton path of `kernels.discriminator_loss` (inputs already checked)."""
    return DiscriminatorLossFunction.apply(logits, int(num_real), float(real_label), float(fake_label))
