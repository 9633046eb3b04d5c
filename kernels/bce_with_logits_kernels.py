"""BCE-with-logits: the @triton.jit kernels (no launch logic here).

`_bce_fwd_kernel` computes, in fp32, the stable loss max(x, 0) - x*t + log(1 + exp(-|x|)) and the gradient
(sigmoid(x) - t) * w (w = 1/M for mean, 1 for sum/none) together; the gradient goes to its own fp32 buffer and
`_bce_bwd_kernel` only scales it by grad_output, read on the device (no host sync).

The same kernel serves the discriminator loss: rows [0, M_FIRST) take label_a and weight w_a, the rest label_b
and w_b, so mean(BCE(real, 1)) + mean(BCE(fake, 0)) over one concatenated batch is one launch, which also sums
sigmoid(x) of each part (D(x), D(G(z)) for logging). Reductions are per-program partial sums (no float atomics):
deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
