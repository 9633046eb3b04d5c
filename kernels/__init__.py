"""Fused training hot-path ops for distgan, with one switch between Triton and the eager reference.

    impl="triton"  Triton kernels; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set
                   before `kernels` was imported. Anything else is an error, never a silent fallback.
    impl="eager"   the PyTorch reference in `kernels.reference`.
    impl="auto"    Triton on CUDA tensors of a GPU the kernels are compiled and tested for (sm_80 and newer),
                   eager otherwise; `auto_backend(device)` says which, and why, in one line.

`kernels.registry` lists the ops (what `set_impl`, the compile report and the benchmarks loop over). See
kernels/README.md for what is fused, the memory traffic and the tolerances.
"""

from __future__ import annotations

import functools

import torch

from . import reference
from ._checks import check_batch_norm_inputs, check_bce_inputs, check_discriminator_inputs

# The op modules share their names with the public functions below, so they are imported first and
# the functions bound afterwards (a later `import kernels.<op>` must not shadow the function).
try:
    from . import batch_norm_leaky_relu as _bnlr
    from . import bce_with_logits as _bce

    _TRITON_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # triton is a Linux-only dependency; the eager path must still work
    _bnlr = _bce = None
    _TRITON_IMPORT_ERROR = exc

IMPLS = ("auto", "triton", "eager")


def triton_can_run(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on tensors of `device` in this process."""
    if _TRITON_IMPORT_ERROR is not None:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _bnlr.INTERPRET)


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp32 accumulation covers these, not fp64
# The oldest GPU architecture "auto" takes the kernels on: the compile report checks sm_80 and sm_90 (registers,
# spills, 128-bit loads) and the launch plans' tile sizes are chosen for their register files.
MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of CUDA device `index` (cached: resolve_impl runs on every call)."""
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def auto_backend(device: torch.device | str) -> tuple[str, str]:
    """What impl="auto" runs on tensors of `device`: ("triton" | "eager", a one-line reason).

    Triton on a CUDA GPU of compute capability >= MIN_CAPABILITY with triton importable; eager anywhere else
    (a CPU, an older GPU, no triton). Float64 and integer tensors take eager whatever this says.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "eager", f"{device.type} tensors (the Triton kernels run on CUDA GPUs)"
    if _TRITON_IMPORT_ERROR is not None:
        return "eager", f"triton is not importable: {_TRITON_IMPORT_ERROR}"
    name, (major, minor) = _gpu(device.index if device.index is not None else torch.cuda.current_device())
    arch = f"sm_{major}{minor}"
    if (major, minor) < MIN_CAPABILITY:
        return "eager", (f"{name} is {arch}; the Triton kernels are compiled and tested for "
                         f"sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} and newer")
    return "triton", f"{name}, {arch}"


def resolve_impl(impl: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """Map impl ("auto" | "triton" | "eager") and a tensor's device and dtype to the path that will run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if impl == "eager" or not dtype.is_floating_point:  # the op's own check names the bad dtype
        return "eager"
    if impl == "auto":
        return "triton" if dtype in TRITON_DTYPES and auto_backend(device)[0] == "triton" else "eager"
    if dtype not in TRITON_DTYPES:
        raise TypeError(f'impl="triton" supports {", ".join(str(d) for d in TRITON_DTYPES)}; got {dtype} '
                        f'(the kernels accumulate in fp32). Use impl="eager" or "auto" for it.')
    if triton_can_run(device):
        return "triton"
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f'impl="triton" needs the triton package: {_TRITON_IMPORT_ERROR}')
    raise RuntimeError(
        f'impl="triton" cannot run on {device.type} tensors: Triton needs CUDA tensors, or CPU tensors '
        f'with TRITON_INTERPRET=1 set before `kernels` is imported. Use impl="auto" or "eager".'
    )


def batch_norm_leaky_relu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    negative_slope: float = 0.2,
    impl: str = "auto",
    *,
    num_batches_tracked: torch.Tensor | None = None,
    process_group=None,
) -> torch.Tensor:
    """`F.leaky_relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps),
    negative_slope)` for x of shape (N, C, *), fused.

    num_batches_tracked: optional int64 counter, incremented in place when training with running
        statistics (as nn.BatchNorm does); `momentum=None` then means the cumulative average.
    process_group: synchronised BatchNorm (training only): statistics and the backward sums are
        reduced over this torch.distributed group; dweight/dbias stay local (DDP sums them).
    """
    check_batch_norm_inputs(x, weight, bias, running_mean, running_var, training, momentum, num_batches_tracked,
                            process_group)
    if resolve_impl(impl, x.device, x.dtype) == "triton":
        return _bnlr.batch_norm_leaky_relu(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                           negative_slope, num_batches_tracked, process_group)
    if process_group is not None:
        return reference.sync_batch_norm_leaky_relu(x, weight, bias, running_mean, running_var, momentum, eps,
                                                    negative_slope, num_batches_tracked, process_group)
    return reference.batch_norm_leaky_relu(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                           negative_slope, num_batches_tracked)


def bce_with_logits(logits: torch.Tensor, target, reduction: str = "mean", impl: str = "auto") -> torch.Tensor:
    """`F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)`; target may be a float."""
    check_bce_inputs(logits, target, reduction)
    if resolve_impl(impl, logits.device, logits.dtype) == "triton":
        return _bce.bce_with_logits(logits, target, reduction)
    return reference.bce_with_logits(logits, target, reduction)


def discriminator_loss(
    logits: torch.Tensor, num_real: int, real_label: float = 1.0, fake_label: float = 0.0, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D loss over one concatenated batch whose first `num_real` rows are real, in one launch.

    Returns (loss, d_real, d_fake): loss = mean BCE(real rows, real_label) + mean BCE(fake rows,
    fake_label) (DCGAN's errD_real + errD_fake); d_real / d_fake = mean sigmoid of each part, detached
    0-d float32 tensors for logging (no host sync).
    """
    check_discriminator_inputs(logits, num_real)
    if resolve_impl(impl, logits.device, logits.dtype) == "triton":
        return _bce.discriminator_loss(logits, num_real, real_label, fake_label)
    return reference.discriminator_loss(logits, num_real, real_label, fake_label)


# Last: the modules call the functions above, and the registry lists both.
from . import registry  # noqa: E402
from .modules import BatchNormLeakyReLU1d, BatchNormLeakyReLU2d, BCEWithLogitsLoss  # noqa: E402


def set_impl(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Set `impl` on every module of a registered op inside `model` (the trainer's --kernels switch)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    classes = registry.module_classes()
    for m in model.modules():
        if isinstance(m, classes):
            m.impl = impl
    return model


__all__ = ["IMPLS", "MIN_CAPABILITY", "BCEWithLogitsLoss", "BatchNormLeakyReLU1d", "BatchNormLeakyReLU2d",
           "auto_backend", "batch_norm_leaky_relu", "bce_with_logits", "discriminator_loss", "reference",
           "registry", "resolve_impl", "set_impl", "triton_can_run"]
