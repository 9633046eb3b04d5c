"""What depends on the hardware: how many workers and how many CPUs (threads) each, decided by looking at the
machine or the cluster (`plan_workers`, a pure function of the counts); the processor's name; the user's cache
directory. The precision the GAN step runs in is distgan.precision's.

No Ray and no torch.distributed here: the driver (distgan/cluster.py) turns a plan into Ray's ScalingConfig.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

# The CPU recipe: 2 workers x 32 images (--batch-size 64). With --bn local each worker's batch sets its
# BatchNorm statistics, so the worker count is part of what the recipe trains; auto keeps it on CPU and gives
# the workers the cores as threads instead.
CPU_WORKERS = 2
# Below 16 images a worker, BatchNorm's statistics get noisy enough to cost accuracy (Wu & He, "Group
# Normalization", ECCV 2018, Fig. 1: ImageNet error of BN rises as the per-GPU batch falls from 16 to 2).
# With --bn local, auto uses no more GPUs than keep this many images each.
MIN_LOCAL_BN_IMAGES = 16
# BatchNorm needs two images for a variance (config.validate refuses fewer).
MIN_IMAGES = 2

CACHE_ENV = "DISTGAN_CACHE_DIR"  # overrides the user's cache directory (tests, read-only homes)


# -------------------------------------------------------------------- workers and CPUs


@dataclass(frozen=True)
class Node:
    """What one node offers Ray: logical CPUs and GPUs."""

    cpus: int
    gpus: int = 0


@dataclass(frozen=True)
class WorkerPlan:
    """The decided layout. `notes` say what auto chose that a user may not expect (printed by the driver)."""

    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    notes: tuple[str, ...] = ()

    def describe(self, batch_size: int) -> str:
        per = batch_size // self.num_workers
        device = "1 GPU + " if self.use_gpu else ""
        return (f"{self.num_workers} worker(s) x {device}{self.cpus_per_worker} CPU(s) ({self.cpus_per_worker} torch "
                f"thread(s) each), {per} images per worker")


def ray_nodes(nodes: Iterable[Mapping]) -> list[Node]:
    """`ray.nodes()` (alive ones) -> Nodes."""
    return [Node(int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)))
            for n in nodes if n.get("Alive", True)]


def _largest_divisor(batch_size: int, at_most: int) -> int:
    return next(n for n in range(max(at_most, 1), 0, -1) if batch_size % n == 0)


def _fitting_cpus(nodes: Sequence[Node], workers: int, use_gpu: bool) -> int:
    """The most CPUs per worker such that `workers` bundles {CPU: k (, GPU: 1)} fit on the nodes; 1 when not
    even 1 fits (a local Ray instance is given at least one CPU per worker)."""
    most = max((n.cpus for n in nodes), default=1)
    for k in range(most, 0, -1):
        fit = sum(min(n.gpus, n.cpus // k) if use_gpu else n.cpus // k for n in nodes)
        if fit >= workers:
            return k
    return 1


def plan_workers(num_workers: Optional[int], cpus_per_worker: Optional[int], use_gpu: bool, nodes: Sequence[Node],
                 batch_size: int, bn: str = "local", keep_workers: Optional[int] = None) -> WorkerPlan:
    """Decides the worker count and the CPUs per worker. None = auto.

    Args:
        num_workers: --num-workers; auto = every GPU (at most batch_size // MIN_LOCAL_BN_IMAGES with --bn local,
            and a divisor of batch_size), on CPU CPU_WORKERS (1 for a batch too small to split).
        cpus_per_worker: --cpus-per-worker; auto = the most CPUs a worker can have such that all fit on `nodes`.
        use_gpu: whether the workers use GPUs (the flag, else whether there are any).
        nodes: what Ray offers (this machine for a local run, `ray_nodes(ray.nodes())` when joining).
        batch_size: the global batch (images per step).
        keep_workers: a mid-epoch checkpoint's world size; auto keeps it, as the saved data position needs it.
    Raises ValueError (a one-line message naming the flag) for an explicit value that cannot fit a local run.
    """
    notes = []
    gpus = sum(n.gpus for n in nodes)
    if num_workers is not None:
        workers = num_workers
    elif keep_workers is not None:
        workers = keep_workers
        notes.append(f"--num-workers auto: {workers}, as in the checkpoint this run resumes mid-epoch (its data "
                     f"position needs the same worker count)")
    elif use_gpu:
        floor = MIN_LOCAL_BN_IMAGES if bn == "local" else MIN_IMAGES
        cap = max(batch_size // floor, 1)
        workers = _largest_divisor(batch_size, min(max(gpus, 1), cap))
        if gpus == 0:
            notes.append("--num-workers auto: 1 worker, as the cluster has no GPU yet (the autoscaler may add one)")
        elif workers < gpus:
            notes.append(f"--num-workers auto: {workers} of {gpus} GPUs, so that each worker keeps "
                         f"{batch_size // workers} images (--batch-size {batch_size}) for its BatchNorm statistics"
                         + (f" (--bn local: at least {floor})" if bn == "local" else "")
                         + f"; --batch-size {gpus * floor}" + (" or --bn sync" if bn == "local" else "")
                         + f" uses all {gpus}")
    else:  # the recipe's count whatever the batch (an odd one is refused, as for --num-workers 2)
        workers = CPU_WORKERS if batch_size >= CPU_WORKERS * MIN_IMAGES else 1
    if cpus_per_worker is None:
        cpus = _fitting_cpus(nodes, workers, use_gpu)
    else:
        cpus = cpus_per_worker
        if len(nodes) == 1 and workers * cpus > max(nodes[0].cpus, workers):
            raise ValueError(f"--cpus-per-worker {cpus}: {workers} workers x {cpus} CPUs = {workers * cpus}, and this "
                             f"machine has {nodes[0].cpus} CPUs; use auto or at most "
                             f"{max(nodes[0].cpus // workers, 1)}")
    return WorkerPlan(workers, cpus, use_gpu, tuple(notes))


# -------------------------------------------------------------------- the processor


def cpu_model() -> str:
    """The CPU as lscpu names it ("model name" of /proc/cpuinfo) with its vendor family and model numbers,
    which tell generations apart where the name does not (e.g. "AMD EPYC" under KVM)."""
    import platform

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def processor_name(device_type: str, device_index: Optional[int] = None) -> str:
    """The processor a worker computes on: the GPU's name on CUDA, else `cpu_model()`."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name(device_index)
    return cpu_model()


def slug(text: str) -> str:
    """A file-name-safe lower-case form: "AMD EPYC (family 26, model 2)" -> "amd-epyc-family-26-model-2"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# -------------------------------------------------------------------- the user's cache


def cache_dir() -> Path:
    """$DISTGAN_CACHE_DIR, else the user's cache directory (platformdirs: $XDG_CACHE_HOME/distgan or
    ~/.cache/distgan on Linux, ~/Library/Caches/distgan on macOS)."""
    import platformdirs

    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("distgan"))
