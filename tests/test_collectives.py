"""The collective-device policy: NCCL gets the rank's GPU, anything that takes CPU tensors gets the CPU."""

import pytest
import torch

from kernels.collectives import collective_device

from conftest import requires_gpu


@pytest.mark.parametrize("backend", ["gloo", "GLOO", "mpi", "cpu:gloo,cuda:nccl"])
def test_backends_that_take_cpu_tensors_get_the_cpu(backend):
    assert collective_device(backend=backend) == torch.device("cpu")


def test_nccl_gets_the_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert collective_device(backend="nccl") == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert collective_device(backend="nccl") == torch.device("cuda", 0)


def test_nccl_follows_the_current_cuda_device_once_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert collective_device(backend="nccl") == torch.device("cuda", 5)


def test_no_process_group_means_cpu():
    assert collective_device() == torch.device("cpu")


@requires_gpu
@pytest.mark.gpu
def test_real_nccl_collectives_take_the_tensors_the_helper_places(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        device = collective_device()
        assert device.type == "cuda"
        t = torch.arange(4.0, device=device)
        dist.all_reduce(t)
        out = [torch.empty_like(t)]
        dist.all_gather(out, t)
        dist.broadcast(t, src=0)
        assert torch.equal(out[0].cpu(), torch.arange(4.0))
        box = [{"fid": 1.0}]
        dist.broadcast_object_list(box, src=0, device=device)
        assert box == [{"fid": 1.0}]
    finally:
        dist.destroy_process_group()
