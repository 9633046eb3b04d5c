"""distgan.precision: the probe and its cache, the choice, rank 0's decision for the group, a resume's precision."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

import distgan.step
from distgan import precision
from distgan.checkpoint import load_state, save_state
from distgan.config import TrainConfig
from distgan.hardware import CACHE_ENV
from distgan.local import spawn
from distgan.trainer import Trainer

from support import make_cfg, small_dataset


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
    monkeypatch.setattr(precision, "probe_precisions", functools.partial(precision.probe_precisions, timer=clock))
    return clock


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


def test_timing_interleaves_the_candidates_and_reports_each_ones_step_time():
    order, now = [], [0.0]

    def run_step(p):
        order.append(p)
        now[0] += {"fp32": 0.2, "bf16": 0.1}[p]

    times = precision.time_candidates(("fp32", "bf16"), run_step, timer=lambda: now[0], seconds=1.2, rounds=3)
    assert times == {"fp32": [pytest.approx(0.2)] * 3, "bf16": [pytest.approx(0.1)] * 3}
    # two warm-up steps each; rounds of 0.4 s / 0.2 s per step = 2 steps, in alternating order
    assert order == ["fp32"] * 2 + ["bf16"] * 2 + ["fp32"] * 2 + ["bf16"] * 4 + ["fp32"] * 4 + ["bf16"] * 2


def test_the_fastest_precision_wins_and_fp32_keeps_a_near_tie():
    assert precision.choose_precision({"fp32": 100.0, "bf16": 160.0}) == "bf16"
    assert precision.choose_precision({"fp32": 204.0, "bf16": 143.0}) == "fp32"
    assert precision.choose_precision({"fp32": 100.0, "bf16": 104.0}) == "fp32"


@pytest.mark.parametrize("costs,want", [({"fp32": 0.3, "bf16": 0.2}, "bf16"),  # bf16 faster (this AMD box)
                                        ({"fp32": 0.2, "bf16": 0.3}, "fp32")])  # bf16 slower (AVX-512 BF16, no AMX)
def test_a_trainer_picks_the_precision_the_probe_measured_faster(monkeypatch, cache_dir, tmp_path, costs, want):
    clock = fake_probe(monkeypatch, costs)
    t = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0), dataset=small_dataset())
    assert (t.precision, t.precision_choice.source) == (want, "measured")
    assert clock.steps["fp32"] == clock.steps["bf16"] >= 2 + precision.PROBE_ROUNDS
    figures = t.precision_choice.images_per_s
    assert figures == {p: pytest.approx(4 / c) for p, c in costs.items()}  # per-worker images / step time
    assert f"fp32 {4 / costs['fp32']:.0f} img/s" in t.precision_choice.reason  # what the start line shows
    # the next run on this machine reads the measurement instead of repeating it
    monkeypatch.setattr(precision, "probe_precisions", lambda *a, **k: pytest.fail("measured again"))
    again = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0), dataset=small_dataset())
    assert (again.precision, again.precision_choice.source) == (want, "cached")
    assert str(cache_dir / precision.CACHE_FILE) in again.precision_choice.reason
    # an explicit --precision never measures
    explicit = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0, precision="bf16"),
                       dataset=small_dataset())
    assert (explicit.precision, explicit.precision_choice.source) == ("bf16", "flag")


def test_the_cache_is_keyed_by_what_the_measurement_depends_on(cache_dir):
    cfg = TrainConfig(num_workers=2)
    path = cache_dir / precision.CACHE_FILE
    key = precision.probe_key(cfg, "cpu", 32, "AMD EPYC", 1)
    assert precision.write_cache(path, key, {"precision": "bf16", "images_per_s": {"fp32": 1.0, "bf16": 2.0}}) is None
    assert precision.read_cache(path, key)["precision"] == "bf16"
    for other in (precision.probe_key(cfg, "cpu", 32, "AMD EPYC", 2),
                  precision.probe_key(cfg, "cpu", 16, "AMD EPYC", 1),
                  precision.probe_key(cfg, "cpu", 32, "Intel Xeon", 1)):
        assert other != key and precision.read_cache(path, other) is None
    assert json.loads(key)["torch"] == torch.__version__
    path.write_text("{torn")
    assert precision.read_cache(path, key) is None  # measured again, and the file rewritten whole
    assert precision.write_cache(path, key, {"precision": "fp32", "images_per_s": {"fp32": 1.0}}) is None
    assert precision.read_cache(path, key)["precision"] == "fp32"


def _write_keys(path: str, first: int, count: int) -> None:
    for i in range(first, first + count):
        precision.write_cache(Path(path), f"key{i}", {"precision": "bf16", "images_per_s": {"bf16": float(i)}})


def test_concurrent_writers_of_the_cache_lose_no_entry(cache_dir):
    """Runs and test processes on one machine measure at the same time; a read-modify-write without a lock let
    the last writer drop the others' entries, and a run measured again (maybe choosing otherwise)."""
    import multiprocessing

    path = cache_dir / precision.CACHE_FILE
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

    first = precision.decide_precision(TrainConfig(num_workers=2), "cpu", 32, 1, probe=probe)
    again = precision.decide_precision(TrainConfig(num_workers=2), "cpu", 32, 1, probe=probe)
    assert (first.precision, first.source, again.precision, again.source) == ("bf16", "measured", "bf16", "cached")
    assert calls == [32] and all("rounds disagreed" in c.reason for c in (first, again))


def test_resume_keeps_the_precision_the_checkpoint_was_trained_in(monkeypatch, tmp_path):
    cfg = make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=4, eval_every=0)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine-a"))
    fake_probe(monkeypatch, {"fp32": 0.3, "bf16": 0.2})
    first = Trainer(dataclasses.replace(cfg, max_steps=2), dataset=small_dataset())
    first.fit()
    assert first.precision == "bf16"
    save_state(first.state_dict(), tmp_path / "ckpt")
    state = load_state(tmp_path / "ckpt")
    assert state["precision"] == "bf16"

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine-b"))  # a machine where fp32 measures faster
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
    mp_.setenv(CACHE_ENV, str(tmp / f"cache-{rank}"))
    fake_probe(mp_, {"fp32": 0.3, "bf16": 0.2} if rank == 0 else {"fp32": 0.2, "bf16": 0.3})
    t = Trainer(make_cfg(tmp, num_workers=2, batch_size=8, max_steps=2, eval_every=0), dataset=small_dataset())
    (tmp / f"rank{rank}").write_text(f"{t.precision} {t.precision_choice.source}")
    assert not (tmp / "cache-1").exists()  # rank 1 did not measure


def test_every_rank_runs_rank_zeros_measured_precision(tmp_path):
    spawn(_broadcast_worker, 2, tmp_path, timeout_s=120)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["bf16 measured"] * 2


def test_fp16_off_cuda_is_refused_and_cuda_sm80_keeps_bf16_without_measuring(monkeypatch):
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        precision.decide_precision(TrainConfig(precision="fp16"), "cpu", 32, 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    choice = precision.decide_precision(TrainConfig(), "cuda", 32, 1, probe=lambda *a: pytest.fail("measured"))
    assert (choice.precision, choice.source, choice.reason) == ("bf16", "cuda", "auto: sm_90 has bf16 tensor cores")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert precision.decide_precision(TrainConfig(), "cuda", 32, 1).precision == "fp32"
