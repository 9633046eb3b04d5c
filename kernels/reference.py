"""Eager PyTorch references: the `impl="eager"` path, and the ground truth for tests and benchmarks.

Everything here is plain PyTorch so that one source of truth serves the eager fallback, the parity
tests (run in float64) and `bench/kernels.py`. The synchronised BatchNorm reference is an explicit
autograd Function because `nn.SyncBatchNorm` refuses CPU tensors (so it cannot run under gloo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collectives import all_gather_stats, all_reduce_sum


def _momentum_factor(momentum, num_batches_tracked, training, has_running):
    """The running-stats weight nn.BatchNorm uses; `momentum=None` is the cumulative average 1/n.

    Increments `num_batches_tracked` in place exactly when nn.BatchNorm does (training with running
    statistics). The float() for the cumulative average is a host sync, as in nn.BatchNorm.
    """
    if not (training and has_running):
        return 0.0 if momentum is None else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        return 1.0 / float(num_batches_tracked)
    return momentum


def batch_norm_leaky_relu(x, weight=None, bias=None, running_mean=None, running_var=None, training=True, momentum=0.1,
                          eps=1e-5, negative_slope=0.2, num_batches_tracked=None):
    """`F.leaky_relu(F.batch_norm(...))`, plus nn.BatchNorm's num_batches_tracked bookkeeping."""
    factor = _momentum_factor(momentum, num_batches_tracked, training, running_mean is not None)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps)
    return F.leaky_relu(y, negative_slope)


def bce_with_logits(logits, target, reduction="mean"):
    """`F.binary_cross_entropy_with_logits`, also accepting a Python float label as the target."""
    if not torch.is_tensor(target):
        target = torch.full_like(logits, float(target))
    return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)


def discriminator_loss(logits, num_real, real_label=1.0, fake_label=0.0):
    """D loss over one concatenated batch: mean BCE of the real rows + mean BCE of the fake rows.

    Returns (loss, d_real, d_fake) with d_* the mean sigmoid of each part (detached, for logging).
    The sum of the two per-part means is the DCGAN convention (errD = errD_real + errD_fake).
    """
    real, fake = logits[:num_real], logits[num_real:]
    loss = bce_with_logits(real, real_label) + bce_with_logits(fake, fake_label)
    with torch.no_grad():
        d_real = torch.sigmoid(real.float()).mean()
        d_fake = torch.sigmoid(fake.float()).mean()
    return loss, d_real, d_fake


# --------------------------------------------------------------------------------------------------
# Synchronised BatchNorm (eager): the same two collectives the Triton path makes.


def merge_welford(count, mean, m2, dim=0):
    """Chan's parallel merge of (count, mean, M2) triples along `dim`; numerically sound in any dtype.

    Raw sum / sum-of-squares cancels catastrophically when |mean| >> std; merging centred M2
    with the between-group term n_i * (mean_i - mean)^2 does not.
    """
    total = count.sum(dim)
    safe = total.clamp_min(1)
    merged_mean = (count * mean).sum(dim) / safe
    delta = mean - merged_mean.unsqueeze(dim)
    merged_m2 = m2.sum(dim) + (count * delta * delta).sum(dim)
    return total, merged_mean, merged_m2


class _SyncBatchNormLeakyReLU(torch.autograd.Function):
    """Eager synchronised BN + LeakyReLU; statistics and backward sums are reduced over `group`.

    Forward: local (count, mean, M2) per channel -> all-gather -> Chan merge. Backward: local sums of h and
    h * x_hat -> all-reduce -> dx; dweight/dbias stay local so DDP's gradient all-reduce sums them exactly once.

    Accumulates in fp32 (float64 for float64 input, which is how the tests use it as the reference): each rank's
    M2 is centred on its own mean (two passes over x) and ranks are merged with Chan's formula, so nothing
    cancels when |mean| >> std. fp64 arithmetic runs at 1/32-1/64 of fp32's rate on most data-centre GPUs.

    One value per channel over the whole group is an error, checked without a host sync in the usual case: the
    global count is at least this rank's, so only a rank holding <= 1 value per channel looks at the gathered
    counts (and then every rank does, since a global count <= 1 means every local one is).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, negative_slope, num_batches_tracked,
                group):
        import torch.distributed as dist

        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, c] + [1] * (x.dim() - 2)
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        n_local = x.numel() // c
        mean_l = xa.mean(dims) if n_local else xa.new_zeros(c)
        m2_l = ((xa - mean_l.view(shape)) ** 2).sum(dims)
        stats = torch.stack([xa.new_full((c,), float(n_local)), mean_l, m2_l])
        gathered = all_gather_stats(stats, group)
        count, mean, m2 = merge_welford(gathered[:, 0], gathered[:, 1], gathered[:, 2])
        if n_local <= 1 and bool((count <= 1).any()):
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape} on "
                             f"each of {dist.get_world_size(group)} ranks")
        var = m2 / count
        rstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            factor = _momentum_factor(momentum, num_batches_tracked, True, True)
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(factor * mean.to(running_mean.dtype))
                unbiased = m2 / (count - 1).clamp_min(1)
                running_var.mul_(1 - factor).add_(factor * unbiased.to(running_var.dtype))
        x_hat = (xa - mean.view(shape)) * rstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.to(acc).view(shape)
        if bias is not None:
            y = y + bias.to(acc).view(shape)
        ctx.save_for_backward(x, weight, bias, mean, rstd, count)
        ctx.negative_slope = negative_slope
        ctx.group = group
        return F.leaky_relu(y, negative_slope).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd, count = ctx.saved_tensors
        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, c] + [1] * (x.dim() - 2)
        acc = mean.dtype
        x_hat = (x.to(acc) - mean.view(shape)) * rstd.view(shape)
        w = weight.to(acc).view(shape) if weight is not None else 1.0
        y = x_hat * w + (bias.to(acc).view(shape) if bias is not None else 0.0)
        ga = g.to(acc)
        h = torch.where(y > 0, ga, ga * ctx.negative_slope)
        sums = torch.stack([h.sum(dims), (h * x_hat).sum(dims)])
        dweight = sums[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sums[0].to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        sums = all_reduce_sum(sums, ctx.group)
        mean_h = (sums[0] / count).view(shape)
        mean_hx = (sums[1] / count).view(shape)
        dx = (w * rstd.view(shape)) * (h - mean_h - x_hat * mean_hx)
        return dx.to(x.dtype), dweight, dbias, None, None, None, None, None, None, None


def sync_batch_norm_leaky_relu(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, negative_slope=0.2,
                               num_batches_tracked=None, group=None):
    """Training-mode BN + LeakyReLU with statistics over every rank of `group` (eager reference)."""
    return _SyncBatchNormLeakyReLU.apply(x, weight, bias, running_mean, running_var, momentum, eps, negative_slope,
                                         num_batches_tracked, group)
