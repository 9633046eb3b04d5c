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


# -------------------------------------------------------------------------------------------------
# The synchronised BN's collectives under a real (one-process) gloo group: results come back where the input was.


def test_all_gather_stats_and_all_reduce_sum_under_gloo(gloo_world):
    from kernels.collectives import all_gather_stats, all_reduce_sum

    stats = torch.arange(6.0).view(3, 2)
    gathered = all_gather_stats(stats, gloo_world)
    assert gathered.shape == (1, 3, 2) and torch.equal(gathered[0], stats)
    sums = torch.ones(2, 4)
    reduced = all_reduce_sum(sums, gloo_world)
    assert torch.equal(reduced, sums) and reduced is not sums  # a new tensor: the input is left alone
    empty = all_gather_stats(torch.zeros(3, 0), gloo_world)  # zero channels still make the collective
    assert empty.shape == (1, 3, 0)


@requires_gpu
@pytest.mark.gpu
def test_sync_bn_collectives_under_nccl_take_and_return_cuda_tensors(tmp_path):
    import torch.distributed as dist

    from kernels.collectives import all_gather_stats, all_reduce_sum

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for device in ("cuda", "cpu"):  # a CPU input goes to the GPU for NCCL and comes back
            stats = torch.arange(6.0, device=device).view(3, 2)
            gathered = all_gather_stats(stats, dist.group.WORLD)
            assert gathered.device == stats.device and torch.equal(gathered[0], stats)
            reduced = all_reduce_sum(stats, dist.group.WORLD)
            assert reduced.device == stats.device and torch.equal(reduced, stats)
    finally:
        dist.destroy_process_group()
