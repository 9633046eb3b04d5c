"""Hardware decisions: worker and CPU sizing asserted on the ScalingConfig the driver builds (local runs with 1 and
8 GPUs, 2 and 16 CPUs; a cluster declared with logical GPUs), the precision probe's choice with a fake timer,
its cache, the broadcast of rank 0's choice, and a resume that keeps the precision its checkpoint was trained in."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

import distgan.step
from distgan import cluster, hardware
from distgan.checkpoint import load_state, save_state
from distgan.cli import parse_args
from distgan.config import ConfigError, TrainConfig
from distgan.hardware import MIN_LOCAL_BN_IMAGES, Node, plan_workers
from distgan.local import spawn
from distgan.trainer import Trainer

from support import make_cfg, small_dataset


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


# ------------------------------------------------------------------------------------------------ precision


class FakeClock:
    """A timer that advances by a per-precision cost each time distgan's G/D step runs (the step itself runs)."""

    def __init__(self, seconds_per_step: dict[str, float]):
        self.cost, self.now, self.steps = seconds_per_step, 0.0, {p: 0 for p in seconds_per_step}

    def __call__(self) -> float:
        return self.now

    def wrap(self, step):
        def timed(*args, precision="fp32", **kwargs):
            out = step(*args, precision=precision, **kwargs)
            self.now += self.cost[precision]
            self.steps[precision] += 1
            return out

        return timed


def fake_probe(monkeypatch, seconds_per_step: dict[str, float]) -> FakeClock:
    """The real probe (real models, real steps) timed by a FakeClock."""
    clock = FakeClock(seconds_per_step)
    monkeypatch.setattr(distgan.step, "gan_step", clock.wrap(distgan.step.gan_step))
    monkeypatch.setattr(hardware, "probe_precisions", functools.partial(hardware.probe_precisions, timer=clock))
    return clock


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(hardware.CACHE_ENV, str(path))
    return path


def test_timing_interleaves_the_candidates_and_reports_each_ones_step_time():
    order, now = [], [0.0]

    def run_step(p):
        order.append(p)
        now[0] += {"fp32": 0.2, "bf16": 0.1}[p]

    times = hardware.time_candidates(("fp32", "bf16"), run_step, timer=lambda: now[0], seconds=1.2, rounds=3)
    assert times == {"fp32": [pytest.approx(0.2)] * 3, "bf16": [pytest.approx(0.1)] * 3}
    # two warm-up steps each; rounds of 0.4 s / 0.2 s per step = 2 steps, in alternating order
    assert order == ["fp32"] * 2 + ["bf16"] * 2 + ["fp32"] * 2 + ["bf16"] * 4 + ["fp32"] * 4 + ["bf16"] * 2


def test_the_fastest_precision_wins_and_fp32_keeps_a_near_tie():
    assert hardware.choose_precision({"fp32": 100.0, "bf16": 160.0}) == "bf16"
    assert hardware.choose_precision({"fp32": 204.0, "bf16": 143.0}) == "fp32"
    assert hardware.choose_precision({"fp32": 100.0, "bf16": 104.0}) == "fp32"


@pytest.mark.parametrize("costs,want", [({"fp32": 0.3, "bf16": 0.2}, "bf16"),  # bf16 faster (this AMD box)
                                        ({"fp32": 0.2, "bf16": 0.3}, "fp32")])  # bf16 slower (AVX-512 BF16, no AMX)
def test_a_trainer_picks_the_precision_the_probe_measured_faster(monkeypatch, cache_dir, tmp_path, costs, want):
    clock = fake_probe(monkeypatch, costs)
    t = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0), dataset=small_dataset())
    assert (t.precision, t.precision_choice.source) == (want, "measured")
    assert clock.steps["fp32"] == clock.steps["bf16"] >= 2 + hardware.PROBE_ROUNDS
    figures = t.precision_choice.images_per_s
    assert figures == {p: pytest.approx(4 / c) for p, c in costs.items()}  # per-worker images / step time
    assert f"fp32 {4 / costs['fp32']:.0f} img/s" in t.precision_choice.reason  # what the start line shows
    # the next run on this machine reads the measurement instead of repeating it
    monkeypatch.setattr(hardware, "probe_precisions", lambda *a, **k: pytest.fail("measured again"))
    again = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0), dataset=small_dataset())
    assert (again.precision, again.precision_choice.source) == (want, "cached")
    assert str(cache_dir / hardware.CACHE_FILE) in again.precision_choice.reason
    # an explicit --precision never measures
    explicit = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0, precision="bf16"),
                       dataset=small_dataset())
    assert (explicit.precision, explicit.precision_choice.source) == ("bf16", "flag")


def test_the_cache_is_keyed_by_what_the_measurement_depends_on(cache_dir):
    cfg = TrainConfig(num_workers=2)
    path = cache_dir / hardware.CACHE_FILE
    key = hardware.probe_key(cfg, "cpu", 32, "AMD EPYC", 1)
    assert hardware.write_cache(path, key, {"precision": "bf16", "images_per_s": {"fp32": 1.0, "bf16": 2.0}}) is None
    assert hardware.read_cache(path, key)["precision"] == "bf16"
    for other in (hardware.probe_key(cfg, "cpu", 32, "AMD EPYC", 2), hardware.probe_key(cfg, "cpu", 16, "AMD EPYC", 1),
                  hardware.probe_key(cfg, "cpu", 32, "Intel Xeon", 1)):
        assert other != key and hardware.read_cache(path, other) is None
    assert json.loads(key)["torch"] == torch.__version__
    path.write_text("{torn")
    assert hardware.read_cache(path, key) is None  # measured again, and the file rewritten whole
    assert hardware.write_cache(path, key, {"precision": "fp32", "images_per_s": {"fp32": 1.0}}) is None
    assert hardware.read_cache(path, key)["precision"] == "fp32"


def _write_keys(path: str, first: int, count: int) -> None:
    for i in range(first, first + count):
        hardware.write_cache(Path(path), f"key{i}", {"precision": "bf16", "images_per_s": {"bf16": float(i)}})


def test_concurrent_writers_of_the_cache_lose_no_entry(cache_dir):
    """Runs and test processes on one machine measure at the same time; a read-modify-write without a lock let
    the last writer drop the others' entries, and a run measured again (maybe choosing otherwise)."""
    import multiprocessing

    path = cache_dir / hardware.CACHE_FILE
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_keys, args=(str(path), 25 * p, 25)) for p in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert all(proc.exitcode == 0 for proc in procs)
    assert sorted(json.loads(path.read_text()), key=lambda k: int(k[3:])) == [f"key{i}" for i in range(100)]


def test_a_measurement_whose_rounds_disagree_says_so_and_is_kept(cache_dir):
    calls = []

    def probe(cfg, device, batch):
        calls.append(batch)
        return {"fp32": [100.0, 200.0, 100.0], "bf16": [150.0, 100.0, 160.0]}  # round 2 says fp32

    first = hardware.decide_precision(TrainConfig(num_workers=2), "cpu", 32, 1, probe=probe)
    again = hardware.decide_precision(TrainConfig(num_workers=2), "cpu", 32, 1, probe=probe)
    assert (first.precision, first.source, again.precision, again.source) == ("bf16", "measured", "bf16", "cached")
    assert calls == [32] and all("rounds disagreed" in c.reason for c in (first, again))


def test_resume_keeps_the_precision_the_checkpoint_was_trained_in(monkeypatch, tmp_path):
    cfg = make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=4, eval_every=0)
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "machine-a"))
    fake_probe(monkeypatch, {"fp32": 0.3, "bf16": 0.2})
    first = Trainer(dataclasses.replace(cfg, max_steps=2), dataset=small_dataset())
    first.fit()
    assert first.precision == "bf16"
    save_state(first.state_dict(), tmp_path / "ckpt")
    state = load_state(tmp_path / "ckpt")
    assert state["precision"] == "bf16"

    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "machine-b"))  # a machine where fp32 measures faster
    fake_probe(monkeypatch, {"fp32": 0.2, "bf16": 0.3})
    resumed = Trainer(cfg, dataset=small_dataset())
    assert resumed.precision == "fp32"
    resumed.load_state_dict(state, "ckpt")
    assert (resumed.precision, resumed.precision_choice.source) == ("bf16", "checkpoint")
    assert resumed.fit()["step"] == 4 and resumed.state_dict()["precision"] == "bf16"

    explicit = Trainer(dataclasses.replace(cfg, precision="fp32"), dataset=small_dataset())
    explicit.load_state_dict(state, "ckpt")  # an explicit --precision wins over the checkpoint's
    assert (explicit.precision, explicit.precision_choice.source) == ("fp32", "flag")


def _broadcast_worker(rank, tmp):
    # each rank's own measurement would disagree; rank 0's is the one every rank runs
    mp_ = pytest.MonkeyPatch()
    mp_.setenv(hardware.CACHE_ENV, str(tmp / f"cache-{rank}"))
    fake_probe(mp_, {"fp32": 0.3, "bf16": 0.2} if rank == 0 else {"fp32": 0.2, "bf16": 0.3})
    t = Trainer(make_cfg(tmp, num_workers=2, batch_size=8, max_steps=2, eval_every=0), dataset=small_dataset())
    (tmp / f"rank{rank}").write_text(f"{t.precision} {t.precision_choice.source}")
    assert not (tmp / "cache-1").exists()  # rank 1 did not measure


def test_every_rank_runs_rank_zeros_measured_precision(tmp_path):
    spawn(_broadcast_worker, 2, tmp_path, timeout_s=120)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["bf16 measured"] * 2


def test_fp16_off_cuda_is_refused_and_cuda_sm80_keeps_bf16_without_measuring(monkeypatch):
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        hardware.decide_precision(TrainConfig(precision="fp16"), "cpu", 32, 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    choice = hardware.decide_precision(TrainConfig(), "cuda", 32, 1, probe=lambda *a: pytest.fail("measured"))
    assert (choice.precision, choice.source, choice.reason) == ("bf16", "cuda", "auto: sm_90 has bf16 tensor cores")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert hardware.decide_precision(TrainConfig(), "cuda", 32, 1).precision == "fp32"


def test_the_processor_is_named_with_its_family_and_model():
    name = hardware.cpu_model()
    assert name and hardware.slug(name) and "/" not in hardware.slug(name)
    assert hardware.slug("AMD EPYC (family 26, model 2)") == "amd-epyc-family-26-model-2"

