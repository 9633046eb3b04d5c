"""DDP as Ray Train sets it up: replicas stay identical, and --bn sync makes BatchNorm see the global batch.

The worker functions run inside real Ray Train worker groups (gloo, CPU) on the shared test cluster.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from distgan.config import TrainConfig
from distgan.models import Discriminator, Generator
from distgan.step import gan_step, make_optimizers

if __name__ != "__main__":
    from conftest import describe

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8


def _global_batch():
    gen = torch.Generator().manual_seed(123)
    return torch.rand(GLOBAL_BATCH, 1, 28, 28, generator=gen) * 2 - 1, torch.randn(GLOBAL_BATCH, 16, generator=gen)


def _worker(config):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    real, z = _global_batch()
    per = GLOBAL_BATCH // world
    real, z = real[rank * per:(rank + 1) * per], z[rank * per:(rank + 1) * per]
    results = {}
    if world > 1:
        # one GAN step with DDP, and the same without it (the control: local data makes replicas drift)
        for wrap in (True, False):
            torch.manual_seed(0)
            g, d = Generator(z_dim=16, kernels="eager"), Discriminator()
            d.eval()  # dropout masks differ per rank; this test is about gradient sync
            if wrap:
                g, d = ray.train.torch.prepare_model(g), ray.train.torch.prepare_model(d)
            opt_g, opt_d = make_optimizers(g, d, TrainConfig())
            gan_step(g, d, opt_g, opt_d, [real], lambda n: z)
            bare = [getattr(m, "module", m) for m in (g, d)]
            results[f"params_ddp={wrap}"] = [p.detach().clone() for m in bare for p in m.parameters()]
    for impl in ("eager", "triton"):
        for sync in (True, False):
            torch.manual_seed(0)
            g = Generator(z_dim=16, kernels=impl, sync_bn=sync)
            if world > 1:
                g = ray.train.torch.prepare_model(g)
            out = g(z)
            weights = torch.linspace(-1, 1, out[0].numel()).view_as(out[0])
            # a mean over the global batch: DDP averages the per-rank means into exactly that
            (out * weights).sum(dim=(1, 2, 3)).mean().backward()
            bare = getattr(g, "module", g)
            results[f"{impl}_sync={sync}"] = {
                "out": out.detach().clone(),
                "grads": [p.grad.clone() for p in bare.parameters()],
                "running_var": bare.project_act.running_var.clone(),
            }
    torch.save(results, f"{config['out']}/rank{rank}_world{world}.pt")


def _fit(out_dir, world):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init()  # RAY_ADDRESS and the auth token come from the environment the test gives this process
    try:
        TorchTrainer(_worker, train_loop_config={"out": str(out_dir)},
                     scaling_config=ScalingConfig(num_workers=world),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(storage_path=str(out_dir), name=f"w{world}")).fit()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def results(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    for world in (1, 2):
        # a separate driver process: Ray reads its auth token once per process
        proc = subprocess.run([sys.executable, __file__, str(out), str(world)], env=ray_cluster.client_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, describe(proc)
    return tuple([torch.load(out / f"rank{r}_world{w}.pt") for r in range(w)] for w in (1, 2))


def test_ddp_replicas_hold_identical_g_and_d_after_a_step(results):
    _, (rank0, rank1) = results
    for a, b in zip(rank0["params_ddp=True"], rank1["params_ddp=True"]):
        assert torch.equal(a, b)
    # the control: without DDP the same step on each rank's own half of the batch gives different weights
    assert any(not torch.equal(a, b) for a, b in zip(rank0["params_ddp=False"], rank1["params_ddp=False"]))


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_sync_batch_norm_makes_two_workers_at_b_over_2_equal_one_worker_at_b(results, impl):
    (single,), (rank0, rank1) = results
    ref = single[f"{impl}_sync=True"]
    halves = (rank0[f"{impl}_sync=True"], rank1[f"{impl}_sync=True"])
    torch.testing.assert_close(torch.cat([h["out"] for h in halves]), ref["out"], rtol=1e-4, atol=1e-5)
    for h in halves:  # DDP averaged the gradients, so both ranks hold the global-batch gradient
        for got, want in zip(h["grads"], ref["grads"]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(h["running_var"], ref["running_var"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_local_batch_norm_depends_on_the_worker_count(results, impl):
    (single,), (rank0, rank1) = results
    ref = single[f"{impl}_sync=False"]["out"]
    split = torch.cat([rank0[f"{impl}_sync=False"]["out"], rank1[f"{impl}_sync=False"]["out"]])
    assert (split - ref).abs().max() > 1e-3


if __name__ == "__main__":  # the driver the fixture starts; functions defined here pickle by value
    _fit(Path(sys.argv[1]), int(sys.argv[2]))
