"""BCE-with-logits and the fused discriminator loss: launchers and autograd Functions.

Kernels in `bce_with_logits_kernels.py`, the grid from `bce_with_logits_plan.py`, input checks (shared with the
eager path) in `_checks.py`. Empty logits take the eager reference, which is PyTorch's own semantics (mean of
nothing is nan, sum is 0): there is nothing to launch.
"""

from __future__ import annotations

import torch

from . import bce_with_logits_kernels as _kern
from .bce_with_logits_plan import BCELimits, BCEPlan, device_limits, plan


def plan_for(m: int, device: torch.device, limits: BCELimits | None = None) -> BCEPlan:
    return plan(m, limits if limits is not None else device_limits(device))


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
    _kern._bce_fwd_kernel[lp.grid](
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
    _kern._bce_bwd_kernel[lp.bwd_grid](GRAD=grad, GO=go, DX=dx, M=m,
                                        GO_IS_SCALAR=go.numel() == 1 and m != 1 or go.dim() == 0, BLOCK=lp.block,
                                        num_warps=lp.num_warps)
    return dx


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
