"""nn.Module drop-ins: they own parameters and buffers and call the functional ops.

`BatchNormLeakyReLU1d/2d` have nn.BatchNorm1d/2d's state_dict (weight, bias, running_mean,
running_var, num_batches_tracked), so checkpoints move between the fused and the unfused model.
They derive from `_NormBase`, not `_BatchNorm`, on purpose: `nn.SyncBatchNorm.convert_sync_batchnorm`
swaps every `_BatchNorm` for a plain SyncBatchNorm and would silently drop the LeakyReLU. Use
`sync=True` instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from . import IMPLS, batch_norm_leaky_relu, bce_with_logits


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class _BatchNormLeakyReLU(_NormBase):
    """nn.BatchNorm's constructor, positional order and defaults included (torch 2.x: num_features, eps, momentum,
    affine, track_running_stats, device, dtype), plus keyword-only extras:

    bias            False: no bias parameter (nor state_dict key), the affine transform is a scale only;
                    ignored when affine=False (there are no parameters then)
    negative_slope  the LeakyReLU's slope for x < 0
    impl            "auto" | "triton" | "eager" (see kernels.resolve_impl)
    sync            synchronise the batch statistics over `process_group` (default: the world) while training
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 negative_slope: float = 0.2, impl: str = "auto", sync: bool = False, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.negative_slope = float(negative_slope)
        self.impl = _check_impl(impl)
        self.sync = bool(sync)
        self.process_group = process_group

    def _sync_group(self):
        """The group to synchronise statistics over, or None (local BatchNorm)."""
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # Same mode logic as nn.BatchNorm: batch statistics while training, or whenever no running
        # statistics are kept; running statistics are only updated while training.
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        keep = not self.training or self.track_running_stats
        return batch_norm_leaky_relu(x, self.weight, self.bias, self.running_mean if keep else None,
                                     self.running_var if keep else None, training=use_batch_stats,
                                     momentum=self.momentum, eps=self.eps, negative_slope=self.negative_slope,
                                     impl=self.impl, num_batches_tracked=self.num_batches_tracked if update else None,
                                     process_group=self._sync_group())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}, impl={self.impl!r}" + (
            ", sync=True" if self.sync else ""
        )


class BatchNormLeakyReLU1d(_BatchNormLeakyReLU):
    """`nn.LeakyReLU(negative_slope)(nn.BatchNorm1d(num_features)(x))` for (N, C) or (N, C, L), fused."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class BatchNormLeakyReLU2d(_BatchNormLeakyReLU):
    """`nn.LeakyReLU(negative_slope)(nn.BatchNorm2d(num_features)(x))` for (N, C, H, W), fused."""

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class BCEWithLogitsLoss(nn.Module):
    """`nn.BCEWithLogitsLoss(reduction=...)`; the target may also be a Python float label."""

    def __init__(self, reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.reduction = reduction
        self.impl = _check_impl(impl)

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        return bce_with_logits(logits, target, self.reduction, impl=self.impl)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, impl={self.impl!r}"
