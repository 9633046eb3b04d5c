"""Faults, made and caught: test hooks that kill a worker or poison its batch at a given step, and the
replica check that every rank holds bitwise-identical weights before a checkpoint.

Used by distgan.trainer.Trainer under any torch.distributed group (or none); no Ray.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from kernels.collectives import collective_device


def inject_test_faults(step: int, rank: int, reals: list[torch.Tensor]) -> None:
    """Test hooks, inert unless DISTGAN_TEST_MARKER_DIR is set: SIGKILL this worker, or poison its batch with
    NaN, at a given step, once per marker file (so the restarted run does not repeat the fault).

    Environment: DISTGAN_TEST_{KILL,NAN}_AT_STEP (the G step, counted from 1) and DISTGAN_TEST_{KILL,NAN}_RANK
    (default 1 for KILL, 0 for NAN). NAN replaces `reals[0]`, in the list, with an all-NaN batch."""
    marker_dir = os.environ.get("DISTGAN_TEST_MARKER_DIR")
    if not marker_dir:
        return
    for kind in ("KILL", "NAN"):
        at = os.environ.get(f"DISTGAN_TEST_{kind}_AT_STEP")
        target_rank = int(os.environ.get(f"DISTGAN_TEST_{kind}_RANK", "1" if kind == "KILL" else "0"))
        marker = Path(marker_dir) / f"{kind.lower()}_done"
        if at is None or int(at) != step or rank != target_rank or marker.exists():
            continue
        marker.write_text(str(step))
        if kind == "KILL":
            print(f"[distgan test] rank {rank}: SIGKILL at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        reals[0] = reals[0] * float("nan")


def checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Two float64 sums that differ when any element differs (order-weighted), computed on the CPU; shape (2,)."""
    flat = torch.cat([t.detach().double().reshape(-1).cpu() for t in tensors])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(97).add_(1)
    return torch.stack([flat.sum(), (flat * weights).sum()])


def check_replicas(g: torch.nn.Module, d: torch.nn.Module, step: int, world: int) -> None:
    """Collective over the initialised process group: every replica holds bitwise-identical G and D parameters
    (D has no buffers; G's buffers are rank 0's at every forward, DDP broadcasts them). Raises RuntimeError
    naming the first rank that differs from rank 0."""
    local = torch.cat([checksum(g.parameters()), checksum(d.parameters())])
    local = local.to(collective_device())
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"replicas diverged at step {step}: rank {r} holds different G/D parameters "
                               f"than rank 0 (checksums {other.tolist()} vs {gathered[0].tolist()})")
