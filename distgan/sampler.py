"""The data position of a run: a sampler that resumes part-way into an epoch and the loader around it.

An epoch's order depends only on (seed, epoch): the sampler shuffles with them, and the DataLoader's own
generator is reseeded per epoch, so a resumed run reads exactly the batches the original run would have read.
Used by distgan.trainer.Trainer; no Ray, no process group needed (rank and world size are given).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from distgan import seeds
from distgan.config import TrainConfig


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (`start_index`, in samples of this rank), so
    a resume skips what was consumed without loading it. An epoch's order depends only on (seed, epoch)."""

    start_index = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def build_loader(dataset: Dataset, cfg: TrainConfig, world: int, rank: int,
                 device: torch.device) -> tuple[ResumableDistributedSampler, DataLoader]:
    """This rank's shuffled shard of `dataset` in batches of cfg.per_worker_batch (incomplete ones dropped).
    In-memory tensors load in-process; other datasets with 2 loader workers."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.per_worker_batch, sampler=sampler, drop_last=True,
                        num_workers=0 if isinstance(dataset, TensorDataset) else 2, generator=torch.Generator(),
                        pin_memory=device.type == "cuda")
    return sampler, loader


def steps_per_epoch(dataset_size: int, cfg: TrainConfig, world: int) -> int:
    """G steps in one epoch (each takes n_critic batches of every rank). Raises ValueError when not one fits."""
    steps = dataset_size // world // cfg.per_worker_batch // cfg.n_critic
    if steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} x --n-critic {cfg.n_critic} exceeds the dataset "
                         f"({dataset_size} images)")
    return steps


def epoch_batches(sampler: ResumableDistributedSampler, loader: DataLoader, seed: int, epoch: int,
                  start_index: int) -> Iterator:
    """The batches of `epoch` from `start_index` (samples of this rank already consumed) on."""
    sampler.set_epoch(epoch)
    sampler.start_index = start_index
    # each iter() draws a base seed from the loader's generator: a per-epoch seed keeps a mid-epoch resume
    # (which starts an iterator the original run did not) on the same numbers
    loader.generator.manual_seed(seeds.data_loader(seed, epoch))
    return iter(loader)
