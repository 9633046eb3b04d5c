"""Which precision a Trainer runs in: --precision on every rank ("auto" is rank 0's decision, broadcast),
and, on a resume under "auto", the precision the checkpoint was trained in.

The decision itself (the probe, its cache) is distgan.hardware.decide_precision; this module makes it one
decision for the whole process group. torch.distributed only, no Ray.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

from distgan.config import TrainConfig
from distgan.hardware import PrecisionChoice, decide_precision
from kernels.collectives import collective_device


def decide_run_precision(cfg: TrainConfig, device: torch.device, world: int, rank: int,
                         distributed: bool) -> PrecisionChoice:
    """--precision on this rank: "auto" is rank 0's decision (a measurement when not cached), broadcast, so
    every rank runs the same precision. A failure on rank 0 is raised on every rank. Collective when
    `distributed` and --precision is auto."""
    def decide() -> PrecisionChoice:
        return decide_precision(cfg, device, cfg.batch_size // world, torch.get_num_threads(),
                                log=lambda m: print(m, flush=True))

    if cfg.precision != "auto" or not distributed:
        return decide()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = decide()
        except Exception as e:  # handed to every rank, which raise it, rather than wait for a choice
            box[0] = e
    dist.broadcast_object_list(box, src=0, device=collective_device())
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def checkpoint_precision(cfg: TrainConfig, device: torch.device, current: str, saved: Optional[str],
                         where: str) -> Optional[PrecisionChoice]:
    """With --precision auto, a resume runs the precision its checkpoint was trained in (so an exact resume
    stays exact), where this device can run it; an explicit --precision wins. Returns the choice to switch to,
    or None to keep `current` (with a warning when an fp16 checkpoint meets a device without CUDA)."""
    if cfg.precision != "auto" or saved in (None, current):
        return None
    if saved == "fp16" and device.type != "cuda":
        warnings.warn(f"{where} was trained in fp16, which needs CUDA; this run continues in {current}",
                      stacklevel=4)
        return None
    return PrecisionChoice(saved, "checkpoint", f"auto: kept from {where} (this machine's choice: "
                                                f"{current}; --precision {current} to switch)")
