"""Where a collective's tensors must live, decided in one place for distgan/ and kernels/.

NCCL has no CPU backend: a CPU tensor handed to an NCCL process group fails with "No backend type
associated with device type cpu". Gloo takes CPU tensors (and CUDA tensors, through host copies). So every
`all_reduce` / `all_gather` / `broadcast` in this project builds its tensors on `collective_device(group)`
and moves results back to where the caller wants them. A group that mixes backends ("cpu:gloo,cuda:nccl",
what `init_process_group()` without a backend makes) takes CPU tensors too.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _backend_name(group) -> str:
    return str(dist.get_backend(group)).lower()


def collective_device(group=None, backend: str | None = None) -> torch.device:
    """The device whose tensors the process group `group` (default: the world group) accepts.

    NCCL-only backends -> `cuda:<this rank's device>`: the current CUDA device once one is set, else
    `LOCAL_RANK` (set by torchrun and Ray Train), else `cuda:0`. Anything that can take CPU tensors (gloo,
    mpi, a mixed "cpu:gloo,cuda:nccl" group) or no initialised process group -> `cpu`.

    `backend` overrides what the group reports (for tests of the policy without an NCCL group).
    """
    if backend is None:
        if not (dist.is_available() and dist.is_initialized()):
            return torch.device("cpu")
        backend = _backend_name(group)
    backend = backend.lower()
    takes_cpu = ("gloo" in backend or "mpi" in backend or "cpu:" in backend) or "nccl" not in backend
    if takes_cpu:
        return torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def to_collective(t: torch.Tensor, group=None) -> torch.Tensor:
    """`t` on the device the group's backend needs (no copy when it is already there)."""
    return t.to(collective_device(group), non_blocking=False)


# --------------------------------------------------------------------------------------------------
# The synchronised BatchNorm's two collectives, shared by the eager reference and the Triton launchers.
# Tensors go to `collective_device(group)` and results come back to the caller's device.


def all_gather_stats(stats: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather a small (k, C) tensor from every rank into (world, k, C) on stats' device; one collective.

    Every rank must call it, also one whose local batch is empty (its counts are 0): the others wait for it.
    """
    world = dist.get_world_size(group)
    src = to_collective(stats.contiguous(), group)
    out = src.new_empty((world * stats.shape[0],) + tuple(stats.shape[1:]))  # ranks concatenated on dim 0
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10+
    gather(out, src, group=group)
    return out.view((world,) + tuple(stats.shape)).to(stats.device)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """The element-wise sum of `t` over every rank of `group`, returned on t's device (t is not modified)."""
    buf = to_collective(t, group)
    if buf is t:
        buf = t.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)
