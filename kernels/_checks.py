"""Input checks shared by the eager and the Triton paths: both reject the same inputs, with PyTorch's
exception class and wording where PyTorch has one (plain PyTorch, no Triton import)."""

from __future__ import annotations

import math
import numbers

import torch

_DEVICE_MSG = "Expected all tensors to be on the same device, but found {a} on {da} and {b} on {db}"


def _check_param(name, t, x):
    if t.device != x.device:
        raise RuntimeError(_DEVICE_MSG.format(a="x", da=x.device, b=name, db=t.device))
    c = x.shape[1]
    if t.dim() != 1 or t.numel() != c:
        raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
    if not t.is_floating_point() or t.dtype not in (x.dtype, torch.float32):
        raise RuntimeError(
            f"mixed dtype: expected {name} to have dtype {x.dtype} or torch.float32 (input is {x.dtype}), got {t.dtype}"
        )


def values_per_channel(x: torch.Tensor) -> int:
    """N * prod(spatial): what F.batch_norm calls size_prods."""
    return x.shape[0] * math.prod(x.shape[2:])


def check_batch_norm_inputs(x, weight, bias, running_mean, running_var, training, momentum, num_batches_tracked,
                            process_group):
    """Reject what F.batch_norm rejects, with the same exception class and wording where it has one."""
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise NotImplementedError(f'"batch_norm_leaky_relu" not implemented for {x.dtype}: expected a floating-point '
                                  f'input')
    if x.dim() < 2:
        raise ValueError(f"expected at least 2D input (N, C, *), got {x.dim()}D input")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _check_param(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    # Exactly PyTorch's _verify_batch_size: one value per channel is an error, none (an empty batch) is not.
    # Synchronised BN checks the global count instead (another rank may hold the rest of the batch).
    if training and process_group is None and values_per_channel(x) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if num_batches_tracked is not None and num_batches_tracked.device != x.device:
        raise RuntimeError(_DEVICE_MSG.format(a="x", da=x.device, b="num_batches_tracked",
                                              db=num_batches_tracked.device))
    if process_group is not None and not training:
        raise ValueError("process_group (synchronised BatchNorm) needs training=True")


def check_bce_inputs(logits, target, reduction):
    """Reject what F.binary_cross_entropy_with_logits rejects, same exception class and wording."""
    if not torch.is_tensor(logits):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise NotImplementedError(f'"bce_with_logits" not implemented for {logits.dtype}: expected floating-point '
                                  f'logits')
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if torch.is_tensor(target):
        if target.shape != logits.shape:
            raise ValueError(f"Target size ({target.shape}) must be the same as input size ({logits.shape})")
        if target.device != logits.device:
            raise RuntimeError(_DEVICE_MSG.format(a="logits", da=logits.device, b="target", db=target.device))
        if target.dtype != logits.dtype:
            raise RuntimeError(f"mixed dtype: expected target to have dtype {logits.dtype} like the logits, got "
                               f"{target.dtype} (or pass the label as a Python float)")
    elif not isinstance(target, numbers.Real) or isinstance(target, bool):
        raise TypeError(f"target must be a tensor or a float label, got {type(target).__name__}")


def check_discriminator_inputs(logits, num_real):
    check_bce_inputs(logits, 0.0, "mean")
    if logits.dim() == 0:
        raise ValueError("logits must have a batch dimension")
    if not isinstance(num_real, numbers.Integral) or not 0 < num_real < logits.shape[0]:
        raise ValueError(f"num_real must be an int in [1, {logits.shape[0] - 1}] (the batch holds real then fake "
                         f"rows), got {num_real!r}")
