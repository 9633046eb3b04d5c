"""distgan.sampler: images held as one uint8 tensor are batched in-process (TensorLoader) in exactly the order, and
to exactly the values, a DataLoader over the same images gives, from any data position."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distgan.config import TrainConfig
from distgan.data import build_dataset, to_model_range
from distgan.prepared import InMemoryImages
from distgan.sampler import ResumableDistributedSampler, TensorLoader, build_loader, epoch_batches


def images(n=37, channels=3, size=5):
    g = torch.Generator().manual_seed(0)
    return InMemoryImages(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                          torch.arange(n) % 4)


@pytest.mark.parametrize("start", [0, 6])
@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_batches_are_the_data_loaders_from_any_position(rank, start):
    ds = images()
    cfg = TrainConfig(num_workers=2, batch_size=6, seed=5)
    sampler, loader = build_loader(ds, cfg, world=2, rank=rank, device=torch.device("cpu"))
    assert isinstance(loader, TensorLoader)
    # the reference: a DataLoader over the same images as floats, with its own sampler in the same position
    floats = TensorDataset(to_model_range(ds.images, 5), ds.labels)
    ref_sampler = ResumableDistributedSampler(floats, num_replicas=2, rank=rank, shuffle=True, seed=5, drop_last=True)
    ref_loader = DataLoader(floats, batch_size=3, sampler=ref_sampler, drop_last=True, generator=torch.Generator())
    for epoch in (0, 1):
        got = list(epoch_batches(sampler, loader, 5, epoch, start))
        want = list(epoch_batches(ref_sampler, ref_loader, 5, epoch, start))
        assert len(got) == len(want) == (18 - start) // 3
        for (x, y), (wx, wy) in zip(got, want):
            assert x.dtype == torch.float32 and torch.equal(x, wx) and torch.equal(y, wy)


def test_the_embedded_digits_are_one_uint8_tensor_with_the_values_they_had_as_floats():
    from distgan.data import mnist5k

    ds = build_dataset(TrainConfig().validate())
    assert isinstance(ds, InMemoryImages) and ds.images.dtype == torch.uint8 and ds.images.shape == (4000, 1, 28, 28)
    assert torch.equal(ds[7][0], to_model_range(mnist5k("train")[0][7:8])[0])
    big = build_dataset(TrainConfig(image_size=64).validate())  # resized once, rounded to 8 bits
    want = to_model_range(mnist5k("train")[0][:3], 64)
    assert (big.batch(torch.arange(3))[0] - want).abs().max() <= 0.5 / 127.5 + 1e-6


def test_a_device_copy_of_the_images_is_where_batches_are_gathered(monkeypatch):
    """On a GPU with room, distgan.prepared.device_copy puts the uint8 tensor on the device; the loader then gathers
    from that copy (here a stand-in on the CPU, zeroed so its batches tell it apart)."""
    import distgan.sampler

    ds = images()
    assert distgan.sampler.device_copy(ds.images, torch.device("cpu")) is None  # a CPU run keeps the one tensor
    monkeypatch.setattr(distgan.sampler, "device_copy", lambda x, device: torch.zeros_like(x))
    _, loader = build_loader(ds, TrainConfig(num_workers=1, batch_size=4), world=1, rank=0,
                             device=torch.device("cpu"))
    x, y = next(iter(loader))
    assert torch.equal(x, torch.full((4, 3, 5, 5), -1.0)) and y.dtype == torch.int64
