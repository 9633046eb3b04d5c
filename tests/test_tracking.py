"""The rank-0 Tracker against real wandb runs (offline, and online against an unreachable server), read back
from their .wandb files with tests/wandb_offline.py."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from distgan import tracking
from distgan.config import TrainConfig
from distgan.rundir import RunDir
from distgan.tracking import EPOCH_KEYS, SAMPLES_KEY, STEP_KEYS, Tracker

from wandb_offline import (
    FAKE_KEY,
    QUALITY,
    isolated_wandb,
    iter_records,
    read_offline_run,
    short_tracker_run,
    step_metrics,
)


@pytest.fixture
def wandb_env(monkeypatch):
    yield from isolated_wandb(monkeypatch)


def assert_key_nowhere(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    leaks = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, f"API key written to {leaks}"


def test_offline_run_records_everything(tmp_path, wandb_env):
    wandb_env.setenv("WANDB_MODE", "offline")  # offline even though a key is set
    tracker = short_tracker_run(tmp_path, "t-offline")
    run_dir = tmp_path / "t-offline"
    run = read_offline_run(run_dir)

    assert run["num_runs"] == 1 and run["run_ids"] == ["t-offline"] and run["name"] == "t-offline"
    assert run["project"] == "distgan" and run["offline"] and tracker.mode == "offline"
    rows = [r for r in run["history"] if "loss_d" in r]
    assert [r["_step"] for r in rows] == [1, 10, 20]
    for row in rows:
        for key in STEP_KEYS:
            assert math.isfinite(row[key]), key
    assert rows[1]["loss_d"] == pytest.approx(0.13)
    assert run["image_keys"] == [SAMPLES_KEY]
    eval_row = next(r for r in run["history"] if SAMPLES_KEY in r)
    assert eval_row["_step"] == 20 and all(math.isfinite(eval_row[k]) for k in EPOCH_KEYS)
    config = run["config"]
    assert config["world_size"] == 2 and config["kernel_backend"] == "eager" and config["per_worker_batch"] == 32
    assert config["batch_size"] == 64 and config["name"] == "t-offline"
    assert config["versions"]["torch"] == torch.__version__ and "ray" in config["versions"]
    assert run["summary"]["final_step"] == 20 and run["summary"]["best_fid"] == 42.0
    assert run["exit_code"] == 0 and run["complete"]

    # the local artifacts, for users without W&B
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["start", "step", "step", "step", "eval", "finish"]
    assert lines[4]["fid"] == 42.0 and lines[4]["samples"] == "samples/epoch_0001.png"
    grid = Image.open(run_dir / "samples" / "epoch_0001.png")
    assert grid.size == (8 * 28 + 9 * 2,) * 2  # 64 images: an 8x8 grid with 2 px padding
    assert (run_dir / "samples" / "latest.png").read_bytes() == (run_dir / "samples" / "epoch_0001.png").read_bytes()
    assert Image.open(run_dir / "curves.png").size[0] > 500
    assert not list(run_dir.rglob("*.tmp"))
    assert_key_nowhere(tmp_path)


def test_unreachable_server_falls_back_to_offline_with_one_warning(tmp_path, wandb_env, capfd):
    wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    wandb_env.setenv("WANDB_INIT_TIMEOUT", "3")
    cfg = TrainConfig(name="t-fallback", storage_path=str(tmp_path), wandb_mode="online").validate()
    t0 = time.perf_counter()
    tracker = Tracker(cfg, RunDir.of(cfg).location, world_size=1, resumed=False, kernel_backend="eager")
    took = time.perf_counter() - t0
    assert took < 20, f"wandb.init fallback took {took:.1f}s"
    assert tracker.mode == "offline"
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("WARNING: distgan")]
    assert len(warnings) == 1 and "online" in warnings[0] and "offline" in warnings[0]
    for step in (1, 2):  # the training-side calls still work
        tracker.log_step(step, step_metrics(step))
    tracker.log_epoch(2, 1, torch.zeros(4, 1, 28, 28), dict(QUALITY))
    tracker.finish({"final_step": 2})
    offline = read_offline_run(next((Path(RunDir.of(cfg).location) / "wandb").glob("offline-run-*")))
    assert offline["run_id"] == "t-fallback" and offline["complete"]
    assert [r["_step"] for r in offline["history"] if "loss_d" in r] == [1, 2]
    assert_key_nowhere(tmp_path)


def test_disabled_mode_writes_local_artifacts_only(tmp_path, wandb_env):
    wandb_env.setenv("WANDB_MODE", "disabled")
    tracker = short_tracker_run(tmp_path, "t-disabled")
    assert tracker.mode == "disabled" and tracker.run is None
    assert not (tmp_path / "t-disabled" / "wandb").exists()
    assert (tmp_path / "t-disabled" / "samples" / "epoch_0001.png").is_file()
    assert (tmp_path / "t-disabled" / "curves.png").is_file()


def test_curves_redrawn_at_evaluations_and_at_most_once_a_minute_between(tmp_path, wandb_env, monkeypatch):
    wandb_env.setenv("WANDB_MODE", "disabled")
    clock = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    cfg = TrainConfig(name="t-curves", storage_path=str(tmp_path)).validate()
    tracker = Tracker(cfg, RunDir.of(cfg).location, world_size=1, resumed=False, kernel_backend="eager")
    drawn = []
    real_plot = tracking.plot_curves
    monkeypatch.setattr(tracking, "plot_curves", lambda rows, path: (drawn.append(len(rows)), real_plot(rows, path)))
    grid = torch.rand(4, 1, 28, 28) * 2 - 1

    def epoch(n, metrics, advance):
        clock[0] += advance
        tracker.log_step(n, step_metrics(n))
        tracker.log_epoch(n, n, grid, metrics)

    epoch(1, {}, 0.0)  # the first epoch end draws: there is no curves.png yet
    epoch(2, {}, 30.0)  # 30 s later, no metrics: not redrawn
    epoch(3, {**QUALITY}, 1.0)  # an evaluation: redrawn at once
    epoch(4, {}, tracking.CURVES_EVERY_S - 1)
    epoch(5, {}, 1.0)  # a minute after the last drawing
    assert len(drawn) == 3 and (tmp_path / "t-curves" / "curves.png").is_file()
    tracker.finish({"final_step": 5, "rollbacks": 0, "stopped": ""})
    assert len(drawn) == 4  # the end always draws: curves.png holds every row
    assert drawn[-1] == len(tracker.history)


def test_resume_with_the_same_name_continues_the_run_id(tmp_path, wandb_env):
    wandb_env.setenv("WANDB_MODE", "offline")
    short_tracker_run(tmp_path, "t-resume", steps=(1, 10))
    short_tracker_run(tmp_path, "t-resume", resumed=True, steps=(11, 20))
    runs = read_offline_run(tmp_path / "t-resume")
    assert runs["num_runs"] == 2 and runs["run_ids"] == ["t-resume"] and all(r["complete"] for r in runs["runs"])
    assert [r["_step"] for r in runs["runs"][1]["history"] if "loss_d" in r] == [11, 20]
    lines = [json.loads(line) for line in (tmp_path / "t-resume" / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed"] for r in lines if r["kind"] == "start"] == [False, True]
    assert [r["step"] for r in lines if r["kind"] == "step"] == [1, 10, 11, 20]


def test_mode_project_and_dir_precedence(tmp_path, wandb_env):
    wandb_env.delenv("WANDB_API_KEY")
    assert tracking.resolve_mode(None) == ("offline", "default (no WANDB_API_KEY)")
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking.resolve_mode(None)[0] == "online"
    wandb_env.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode(None)[0] == "disabled"
    assert tracking.resolve_mode("offline") == ("offline", "--wandb-mode")
    assert tracking.resolve_project(None) == "distgan"
    wandb_env.setenv("WANDB_PROJECT", "from-env")
    assert tracking.resolve_project(None) == "from-env"  # no flag: the environment decides
    assert tracking.resolve_project("distgan") == "distgan"  # an explicit flag wins, even the default name
    assert tracking.resolve_project("mine") == "mine"

    wandb_env.setenv("WANDB_MODE", "offline")
    wandb_env.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    short_tracker_run(tmp_path, "t-wandb-dir", steps=(1,))
    assert not (tmp_path / "t-wandb-dir" / "wandb").exists()
    assert read_offline_run(tmp_path / "elsewhere")["project"] == "from-env"


class StubRun:
    """Stands in for an online wandb Run (no server here): records what the Tracker sends it."""

    def __init__(self):
        self.logged, self.alerts, self.summary, self.finished, self.fail = [], [], {}, False, False
        self.dir = "/nonexistent/files"

    def log(self, data, step):
        if self.fail:
            raise ConnectionError("server went away")
        self.logged.append((step, data))

    def alert(self, title, text, level):
        self.alerts.append(title)

    def finish(self):
        self.finished = True


def stubbed_tracker(tmp_path, name: str) -> tuple[Tracker, StubRun]:
    cfg = TrainConfig(name=name, storage_path=str(tmp_path), wandb_mode="disabled").validate()
    tracker = Tracker(cfg, RunDir.of(cfg).location, world_size=1, resumed=False, kernel_backend="eager")
    tracker.run, tracker.mode = StubRun(), "online"
    return tracker, tracker.run


def test_collapse_and_divergence_warn_once_after_patience(tmp_path, wandb_env, capfd):
    tracker, run = stubbed_tracker(tmp_path, "t-health")
    samples = torch.zeros(4, 1, 28, 28)
    for epoch in range(1, tracking.PATIENCE + 2):
        # D wins outright: the loop's d_gap is absent here, so the tracker derives it from the last step
        tracker.log_step(epoch, {**step_metrics(epoch), "d_real": 0.99, "d_fake": 0.01})
        tracker.log_epoch(epoch, epoch, samples, {**QUALITY, "coverage": 0.1})
    tracker.finish({})
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("WARNING: distgan")]
    assert len(warnings) == 2, warnings
    assert any("mode collapse" in w for w in warnings) and any("discriminator wins" in w for w in warnings)
    assert sorted(run.alerts) == ["distgan: discriminator wins", "distgan: mode collapse"]
    lines = [json.loads(line) for line in (tracker.metrics_path).read_text().splitlines()]
    alerts = [r for r in lines if r["kind"] == "alert"]
    assert [a["epoch"] for a in alerts] == [tracking.PATIENCE] * 2
    assert all(r["d_gap"] == pytest.approx(0.98) for r in lines if r["kind"] == "eval")
    assert run.finished and run.summary["best_fid"] == 42.0


def test_rollbacks_and_wandb_failures_never_reach_training(tmp_path, wandb_env, capfd):
    tracker, run = stubbed_tracker(tmp_path, "t-failures")
    for step in (10, 20, 15, 25):  # 15: the loop rolled back to a snapshot; W&B would drop a step < 20
        tracker.log_step(step, step_metrics(step))
    assert [step for step, _ in run.logged] == [10, 20, 25]
    run.fail = True
    tracker.log_step(30, step_metrics(30))  # the server goes away mid-run: one warning, W&B off
    tracker.log_step(40, step_metrics(40))
    tracker.log_epoch(40, 1, torch.zeros(4, 1, 28, 28), dict(QUALITY))
    tracker.finish({"final_step": 40})
    assert tracker.run is None
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("WARNING: distgan")]
    assert len(warnings) == 1 and "W&B off" in warnings[0]
    steps = [r["step"] for r in map(json.loads, tracker.metrics_path.read_text().splitlines()) if r["kind"] == "step"]
    assert steps == [10, 20, 15, 25, 30, 40]  # the local record keeps everything


def test_non_finite_values_are_strict_json(tmp_path, wandb_env):
    wandb_env.setenv("WANDB_MODE", "disabled")
    cfg = TrainConfig(name="t-json", storage_path=str(tmp_path)).validate()
    tracker = Tracker(cfg, RunDir.of(cfg).location, world_size=1, resumed=False, kernel_backend="eager")
    tracker.log_step(1, {"loss_d": float("nan"), "loss_g": torch.tensor(0.5)})
    tracker.finish({"best_fid": float("inf")})
    rows = [json.loads(line, parse_constant=pytest.fail) for line in tracker.metrics_path.read_text().splitlines()]
    assert rows[1]["loss_d"] is None and rows[1]["loss_g"] == 0.5 and rows[2]["best_fid"] is None


def test_other_ranks_need_not_import_wandb():
    code = "import sys, distgan.tracking; assert 'wandb' not in sys.modules, 'wandb imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_reader_handles_records_spanning_blocks(tmp_path, wandb_env):
    import wandb

    wandb_env.setenv("WANDB_MODE", "offline")
    big = "x" * 100_000  # one config record over three 32 KiB blocks: FIRST, MIDDLE, LAST chunks
    run = wandb.init(project="reader", id="big", dir=str(tmp_path), config={"big": big},
                     settings=wandb.Settings(console="off", quiet=True))
    for step in range(300):
        run.log({"x": float(step), "nested/y": step * 2}, step=step)
    run.finish()
    wandb.teardown()  # waits for wandb-core to write the file out (see Tracker.finish)
    result = read_offline_run(tmp_path)
    assert result["config"]["big"] == big
    assert [r["x"] for r in result["history"]] == [float(s) for s in range(300)]
    assert result["history"][7]["nested/y"] == 14 and result["summary"]["x"] == 299.0

    wandb_file = result["path"]
    data = bytearray(wandb_file.read_bytes())
    data[40_000] ^= 0xFF
    wandb_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        list(iter_records(wandb_file))


def test_a_local_run_dir_given_as_a_string_or_file_uri_is_written_in_place(tmp_path, wandb_env):
    """The trainer passes f"{storage_path}/{name}" (a string): a local one, or a file:// URI, is written directly,
    with no staging copy."""
    wandb_env.setenv("WANDB_MODE", "disabled")
    for name, location in (("t-str", str(tmp_path / "t-str")), ("t-file", f"file://{tmp_path}/t-file")):
        cfg = TrainConfig(name=name, storage_path=str(tmp_path)).validate()
        tracker = Tracker(cfg, location, world_size=1, resumed=False, kernel_backend="eager")
        assert tracker.remote is None and tracker.run_dir == tmp_path / name
        tracker.log_step(1, step_metrics(1))
        tracker.finish({"final_step": 1})
        kinds = [json.loads(line)["kind"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert kinds == ["start", "step", "finish"] and (tmp_path / name / "curves.png").is_file()
