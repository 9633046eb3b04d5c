"""The data position of a run: a sampler that resumes part-way into an epoch and the loader around it.

An epoch's order depends only on (seed, epoch): the sampler shuffles with them, and the DataLoader's own
generator is reseeded per epoch, so a resumed run reads exactly the batches the original run would have read.
Images held as one uint8 tensor (distgan.prepared.InMemoryImages: prepared datasets, the embedded digits) are
batched in this process by TensorLoader, one gather and one normalisation a batch; other datasets go through a
DataLoader with loader processes. Both draw their batches in the sampler's order, so the data position means the
same for either.
Used by distgan.trainer.Trainer; no Ray, no process group needed (rank and world size are given).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from distgan import seeds
from distgan.config import TrainConfig
from distgan.prepared import InMemoryImages, device_copy


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (`start_index`, in samples of this rank), so
    a resume skips what was consumed without loading it. An epoch's order depends only on (seed, epoch)."""

    start_index = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class TensorLoader:
    """The batches of an InMemoryImages in the order of `sampler`: (float32 (B, C, S, S) in [-1, 1], int64 (B,)),
    incomplete batches dropped, as a DataLoader with this sampler and drop_last would give them. Each batch is one
    gather from the uint8 tensor and one normalisation of the whole batch, in this process; on a GPU with room,
    on the device (distgan.prepared.device_copy). `generator` is there for epoch_batches, which reseeds every
    loader's; nothing here draws from it."""

    def __init__(self, dataset: InMemoryImages, sampler: ResumableDistributedSampler, batch_size: int,
                 device: Optional[torch.device] = None):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.generator = torch.Generator()
        self.device_images = device_copy(dataset.images, device) if device is not None else None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        for index in order[:len(self) * self.batch_size].split(self.batch_size):
            yield self.dataset.batch(index, self.device_images)


def build_loader(dataset: Dataset, cfg: TrainConfig, world: int, rank: int,
                 device: torch.device) -> tuple[ResumableDistributedSampler, DataLoader | TensorLoader]:
    """This rank's shuffled shard of `dataset` in batches of cfg.per_worker_batch (incomplete ones dropped).
    Images held as one uint8 tensor batch in-process (TensorLoader); other in-memory tensors load in-process
    through a DataLoader; files with 2 loader workers."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
    if isinstance(dataset, InMemoryImages):
        return sampler, TensorLoader(dataset, sampler, cfg.per_worker_batch, device)
    loader = DataLoader(dataset, batch_size=cfg.per_worker_batch, sampler=sampler, drop_last=True,
                        num_workers=0 if isinstance(dataset, TensorDataset) else 2, generator=torch.Generator(),
                        pin_memory=device.type == "cuda")
    return sampler, loader


def epoch_batches(sampler: ResumableDistributedSampler, loader: DataLoader | TensorLoader, seed: int, epoch: int,
                  start_index: int) -> Iterator:
    """The batches of `epoch` from `start_index` (samples of this rank already consumed) on."""
    sampler.set_epoch(epoch)
    sampler.start_index = start_index
    # each iter() draws a base seed from the loader's generator: a per-epoch seed keeps a mid-epoch resume
    # (which starts an iterator the original run did not) on the same numbers
    loader.generator.manual_seed(seeds.data_loader(seed, epoch))
    return iter(loader)
