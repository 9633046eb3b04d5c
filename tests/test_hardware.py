"""Hardware decisions: worker and CPU sizing asserted on the ScalingConfig the driver builds (local runs with 1 and
8 GPUs, 2 and 16 CPUs; a cluster declared with logical GPUs), the precision probe's choice with a fake timer,
its cache, the broadcast of rank 0's choice, and a resume that keeps the precision its checkpoint was trained in."""

from __future__ import annotations

import pytest

from distgan import cluster, hardware
from distgan.cli import parse_args
from distgan.config import ConfigError, TrainConfig
from distgan.hardware import MIN_LOCAL_BN_IMAGES, Node, plan_workers


def sized(monkeypatch, tmp_path, cpus: int, gpus: int, *flags: str, found=None):
    """A local run's decisions on a machine of `cpus` CPUs and `gpus` GPUs: (the sized config, its ScalingConfig,
    the driver's printed lines), through the driver's own functions."""
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: cpus)
    cfg = parse_args(["--storage-path", str(tmp_path), "--name", "x", *flags])
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus >= 1
    lines: list[str] = []
    out = cluster.size_workers(cfg, cluster.local_nodes(gpus), use_gpu, found, log=lines.append)
    return out, cluster.scaling_config(out, use_gpu), lines


# ------------------------------------------------------------------------------------------------ sizing


def test_one_gpu_workstation_runs_one_worker_with_the_cores(monkeypatch, tmp_path):
    cfg, scaling, lines = sized(monkeypatch, tmp_path, 8, 1)
    assert (scaling.num_workers, scaling.use_gpu) == (1, True)
    assert (scaling.num_cpus_per_worker, scaling.num_gpus_per_worker) == (8, 1)
    assert cfg.per_worker_batch == 64 and lines == ["distgan: 1 worker(s) x 1 GPU + 8 CPU(s) (8 torch thread(s) "
                                                    "each), 64 images per worker"]


def test_eight_gpus_keep_enough_images_per_worker_for_local_batchnorm_and_say_so(monkeypatch, tmp_path):
    cfg, scaling, lines = sized(monkeypatch, tmp_path, 64, 8)
    assert scaling.num_workers == 64 // MIN_LOCAL_BN_IMAGES == 4 and scaling.num_cpus_per_worker == 16
    assert scaling.total_resources == {"CPU": 64, "GPU": 4}
    assert any(line.startswith("note: --num-workers auto: 4 of 8 GPUs") and "--batch-size 128 or --bn sync uses "
               "all 8" in line for line in lines), lines
    for flags in (("--batch-size", "128"), ("--bn", "sync")):  # either way every GPU is used
        _, scaling, lines = sized(monkeypatch, tmp_path, 64, 8, *flags)
        assert (scaling.num_workers, scaling.num_cpus_per_worker, scaling.num_gpus_per_worker) == (8, 8, 1)
        assert not any(line.startswith("note:") for line in lines)


def test_two_cpus_keep_the_recipes_two_workers_of_one_thread(monkeypatch, tmp_path):
    cfg, scaling, _ = sized(monkeypatch, tmp_path, 2, 0)
    assert (scaling.num_workers, scaling.use_gpu, scaling.num_cpus_per_worker) == (2, False, 1)
    assert scaling.total_resources == {"CPU": 2} and cfg.per_worker_batch == 32


def test_sixteen_cpus_give_the_two_workers_eight_threads_each(monkeypatch, tmp_path):
    cfg, scaling, lines = sized(monkeypatch, tmp_path, 16, 0)
    assert (scaling.num_workers, scaling.num_cpus_per_worker) == (2, 8) and scaling.total_resources == {"CPU": 16}
    assert (cfg.num_workers, cfg.cpus_per_worker, cfg.per_worker_batch) == (2, 8, 32)  # what the workers receive
    assert "2 worker(s) x 8 CPU(s) (8 torch thread(s) each)" in lines[0]


def test_explicit_values_win_and_one_that_cannot_fit_this_machine_is_refused(monkeypatch, tmp_path):
    _, scaling, _ = sized(monkeypatch, tmp_path, 16, 0, "--num-workers", "4")
    assert (scaling.num_workers, scaling.num_cpus_per_worker) == (4, 4)
    _, scaling, _ = sized(monkeypatch, tmp_path, 16, 8, "--num-workers", "2", "--cpus-per-worker", "3")
    assert (scaling.num_workers, scaling.num_cpus_per_worker, scaling.num_gpus_per_worker) == (2, 3, 1)
    _, scaling, _ = sized(monkeypatch, tmp_path, 16, 8, "--no-use-gpu")
    assert (scaling.num_workers, scaling.use_gpu, scaling.num_cpus_per_worker) == (2, False, 8)
    _, scaling, _ = sized(monkeypatch, tmp_path, 2, 0, "--num-workers", "4")  # today's meaning: 4 x 1 CPU
    assert (scaling.num_workers, scaling.num_cpus_per_worker) == (4, 1)
    with pytest.raises(ConfigError, match=r"^--cpus-per-worker 3: 2 workers x 3 CPUs = 6, and this machine has 2"):
        sized(monkeypatch, tmp_path, 2, 0, "--cpus-per-worker", "3")
    with pytest.raises(ConfigError, match="--batch-size: global batch 64 is not divisible by --num-workers 3"):
        sized(monkeypatch, tmp_path, 16, 0, "--num-workers", "3")


def test_auto_keeps_a_mid_epoch_checkpoints_worker_count(monkeypatch, tmp_path):
    found = ("ckpt", {"config": TrainConfig(num_workers=4).to_dict(), "g_steps_into_epoch": 5, "world_size": 4})
    _, scaling, lines = sized(monkeypatch, tmp_path, 16, 0, found=found)
    assert (scaling.num_workers, scaling.num_cpus_per_worker) == (4, 4) and "mid-epoch" in lines[-1]
    at_boundary = ("ckpt", {**found[1], "g_steps_into_epoch": 0})
    assert sized(monkeypatch, tmp_path, 16, 0, found=at_boundary)[1].num_workers == 2


def test_cpus_per_worker_fit_the_nodes_not_just_the_total():
    # 6 CPUs in all, but 3 each does not fit on a 4-CPU and a 2-CPU node
    assert plan_workers(None, None, False, [Node(4), Node(2)], 64).cpus_per_worker == 2
    # GPU workers: each bundle takes a GPU and its CPUs from the same node
    plan = plan_workers(None, None, True, [Node(8, 0), Node(16, 2), Node(12, 2)], 64, "sync")
    assert (plan.num_workers, plan.cpus_per_worker) == (4, 6)
    assert plan_workers(None, None, True, [Node(8, 0)], 64).notes[0].startswith("--num-workers auto: 1 worker, as the")


def test_config_takes_auto_on_the_command_line_and_in_yaml(tmp_path):
    assert (TrainConfig().num_workers, TrainConfig().cpus_per_worker) == (None, None)  # auto
    cfg = parse_args(["--num-workers", "auto", "--cpus-per-worker", "4", "--storage-path", str(tmp_path)])
    assert (cfg.num_workers, cfg.cpus_per_worker) == (None, 4)
    f = tmp_path / "c.yaml"
    f.write_text("num_workers: 2\ncpus-per-worker: auto\n")
    assert (lambda c: (c.num_workers, c.cpus_per_worker))(parse_args(["--config", str(f)])) == (2, None)
    with pytest.raises(ConfigError, match="^--cpus-per-worker: must be a positive integer or auto"):
        parse_args(["--cpus-per-worker", "0"])


@pytest.mark.slow
def test_a_cluster_declaring_eight_logical_gpus_places_the_planned_workers(monkeypatch, tmp_path):
    """Ray's logical resources stand in for a GPU node: the plan, the ScalingConfig and a real placement."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=16, num_gpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        for flags, want in (((), (4, 4)), (("--batch-size", "128"), (8, 2))):
            cfg = parse_args(["--storage-path", str(tmp_path), "--name", "x", "--placement-timeout-s", "20", *flags])
            cfg = cluster.size_workers(cfg, hardware.ray_nodes(ray.nodes()), True, log=lambda _: None)
            scaling = cluster.scaling_config(cfg, True)
            assert (scaling.num_workers, scaling.num_cpus_per_worker) == want
            cluster.wait_for_placement(cfg, True)  # raises LaunchError when the bundles do not fit
    finally:
        ray.shutdown()


def test_the_processor_is_named_with_its_family_and_model():
    name = hardware.cpu_model()
    assert name and hardware.slug(name) and "/" not in hardware.slug(name)
    assert hardware.slug("AMD EPYC (family 26, model 2)") == "amd-epyc-family-26-model-2"

