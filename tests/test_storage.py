"""A run directory in an S3 bucket: the Tracker's files, `distgan.sample` and the driver's look at a run before it
resumes, against a local S3-protocol server (conftest's `s3_endpoint`). A Ray run in a bucket, killed and resumed
from it: tests/test_fault_tolerance.py."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
import torch
from PIL import Image

from distgan import storage
from distgan.config import TrainConfig
from distgan.rundir import RunDir
from distgan.sample import main as sample_main
from distgan.storage import read_metrics, upload
from distgan.tracking import Tracker

from conftest import s3_env, use_s3
from ray_local import free_port
from support import make_checkpoint, ray_snapshot
from wandb_offline import QUALITY, step_metrics

REPO = Path(__file__).resolve().parent.parent




def test_names_go_into_the_path_before_a_uris_query():
    q = "s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(q, "r", "state.pt") == "s3://b/runs/r/state.pt?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.basename(storage.join(q, "r")) == "r" and storage.parent(storage.join(q, "r")) == q
    assert storage.suffix(storage.join(q, "x.npz")) == ".npz" and storage.suffix("/a?b/x.png") == ".png"
    assert storage.join("/data/runs/", "r") == "/data/runs/r" and storage.basename(Path("/a/b")) == "b"


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(target, b"old")

    def torn(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.atomic_write(target, torn)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_metrics_rows_skip_a_torn_line_from_the_file_or_its_run_directory(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start"}\n\n{"kind": "step", "step": 1}\n{"kind": "st')
    want = [{"kind": "start"}, {"kind": "step", "step": 1}]
    assert storage.read_metrics(tmp_path) == want and storage.read_metrics(tmp_path / "metrics.jsonl") == want
    assert storage.read_metrics(f"file://{tmp_path}") == want and storage.read_metrics(tmp_path / "none") == []


def test_first_line_of_an_exception():
    assert storage.first_line(ValueError("bad\nmore")) == "bad"
    assert storage.first_line(ValueError("bad\nmore"), with_type=True) == "ValueError: bad"
    assert storage.first_line(EOFError()) == "EOFError" == storage.first_line(EOFError(), with_type=True)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path, request):
    """A fresh bucket; the S3 client settings in the environment; staging directories under tmp_path."""
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    name = "bucket-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    use_s3(monkeypatch, s3_endpoint, name)
    return name


def s3() -> pyarrow.fs.FileSystem:
    return pyarrow.fs.FileSystem.from_uri("s3://any")[0]


def read(path: str) -> bytes:
    with s3().open_input_stream(path) as fh:
        return fh.read()


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in read(path).decode().splitlines()]


@pytest.mark.parametrize("query", [False, True])
def test_tracker_writes_every_artifact_to_the_bucket(bucket, s3_endpoint, tmp_path, capsys, query):
    # the client settings in the environment, or in pyarrow's URI query (a non-AWS server named in the URI)
    options = f"?endpoint_override={s3_endpoint.removeprefix('http://')}&scheme=http" if query else ""
    cfg = TrainConfig(name="t-s3", storage_path=f"s3://{bucket}/runs{options}", wandb_mode="disabled").validate()
    run = f"{bucket}/runs/t-s3"
    tracker = Tracker(cfg, RunDir.of(cfg).location, world_size=2, resumed=False, kernel_backend="eager")
    assert tracker.location == f"s3://{run}{options}" and tracker.run_dir.is_relative_to(tmp_path / "tmp")
    assert [r["kind"] for r in rows(f"{run}/metrics.jsonl")] == ["start"]  # uploaded at once
    for step in (1, 10, 20):
        tracker.log_step(step, step_metrics(step))
    # step rows wait for the next evaluation (or UPLOAD_EVERY_S): one PUT per row would cost more than the step
    assert [r["kind"] for r in rows(f"{run}/metrics.jsonl")] == ["start"]
    samples = torch.linspace(-1, 1, 64 * 28 * 28).reshape(64, 1, 28, 28)
    tracker.log_epoch(20, 1, samples, {**QUALITY, "d_gap": 0.2})
    assert [r["kind"] for r in rows(f"{run}/metrics.jsonl")] == ["start", "step", "step", "step", "eval"]
    tracker.finish({"final_step": 20})

    lines = rows(f"{run}/metrics.jsonl")
    assert [r["kind"] for r in lines] == ["start", "step", "step", "step", "eval", "finish"]
    assert lines[4]["fid"] == 42.0 and lines[4]["samples"] == "samples/epoch_0001.png"
    assert read(f"{run}/metrics.jsonl") == tracker.metrics_path.read_bytes()
    grid = read(f"{run}/samples/epoch_0001.png")
    assert read(f"{run}/samples/latest.png") == grid
    (tmp_path / "grid.png").write_bytes(grid)
    assert Image.open(tmp_path / "grid.png").size == (8 * 28 + 9 * 2,) * 2
    (tmp_path / "curves.png").write_bytes(read(f"{run}/curves.png"))
    assert Image.open(tmp_path / "curves.png").size[0] > 500
    assert "WARNING" not in capsys.readouterr().err


def test_a_resumed_tracker_appends_to_the_buckets_metrics(bucket, tmp_path, monkeypatch):
    cfg = TrainConfig(name="t-resume", storage_path=f"s3://{bucket}/runs", wandb_mode="disabled").validate()
    uri = f"{cfg.storage_path}/{cfg.name}"
    first = Tracker(cfg, uri, world_size=2, resumed=False, kernel_backend="eager")
    for step in (1, 10):
        first.log_step(step, step_metrics(step))
    first.log_epoch(10, 1, torch.zeros(4, 1, 28, 28), dict(QUALITY))
    first.finish({"final_step": 10})

    # another node: nothing staged there, the rows come from the bucket
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node2"))
    (tmp_path / "node2").mkdir()
    second = Tracker(cfg, uri, world_size=2, resumed=True, kernel_backend="eager")
    assert second.run_dir != first.run_dir
    assert [r["kind"] for r in second.history] == ["start", "step", "step", "eval", "finish", "start"]
    for step in (11, 20):
        second.log_step(step, step_metrics(step))
    second.finish({"final_step": 20})
    lines = rows(f"{bucket}/runs/t-resume/metrics.jsonl")
    assert [r["resumed"] for r in lines if r["kind"] == "start"] == [False, True]
    assert [r["step"] for r in lines if r["kind"] == "step"] == [1, 10, 11, 20]
    assert [r["kind"] for r in lines].count("finish") == 2

    # the same node after a crash: rows staged but not yet uploaded are kept, not replaced by the bucket's
    third = Tracker(cfg, uri, world_size=2, resumed=True, kernel_backend="eager")
    third.log_step(21, step_metrics(21))  # within UPLOAD_EVERY_S: staged only; then the process dies
    fourth = Tracker(cfg, uri, world_size=2, resumed=True, kernel_backend="eager")
    assert fourth.run_dir == third.run_dir
    fourth.finish({"final_step": 21})
    assert [r["step"] for r in rows(f"{bucket}/runs/t-resume/metrics.jsonl") if r["kind"] == "step"] == \
        [1, 10, 11, 20, 21]


def test_sample_reads_checkpoints_from_the_bucket_and_writes_next_to_them(bucket, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    local = tmp_path / "local" / "r"
    for step in (4, 6):
        make_checkpoint(local / f"checkpoint_{step:08d}", step)
    (local / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        ray_snapshot({"checkpoint_00000004": 21.5, "checkpoint_00000006": 30.0})))
    for path in local.rglob("*"):
        if path.is_file():
            upload(path, f"s3://{bucket}/runs/r/{path.relative_to(local)}")
    run = f"s3://{bucket}/runs/r"

    assert sample_main(["--checkpoint", f"{run}/checkpoint_00000006", "--num-samples", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["using checkpoint_00000006", f"wrote 4 images to {run}/samples/sample-checkpoint_00000006-seed0.png"]
    (tmp_path / "s.png").write_bytes(read(f"{bucket}/runs/r/samples/sample-checkpoint_00000006-seed0.png"))
    assert Image.open(tmp_path / "s.png").size == (2 * 28 + 3 * 2,) * 2

    # a run directory: the best checkpoint by FID; the same images as the local copy gives
    assert sample_main(["--checkpoint", run, "--num-samples", "5", "--output", str(tmp_path / "s3.npz")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "using checkpoint_00000004 (best FID 21.5 of 2 checkpoints)"
    assert sample_main(["--checkpoint", str(local), "--num-samples", "5", "--output", str(tmp_path / "l.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "s3.npz")["images"], np.load(tmp_path / "l.npz")["images"])
    assert not list(work.iterdir())

    assert sample_main(["--checkpoint", f"{run}/checkpoint_00000009"]) == 2
    assert sample_main(["--checkpoint", f"s3://{bucket}/runs/nothing-here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --checkpoint: {run}/checkpoint_00000009: no such checkpoint or run directory",
                   f"error: --checkpoint: s3://{bucket}/runs/nothing-here: no such checkpoint or run directory"]


def test_an_unreachable_endpoint_is_one_line_for_sample_and_a_warning_for_training(tmp_path, monkeypatch, capfd):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, **s3_env(dead), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "distgan.sample", "--checkpoint", "s3://bkt/runs/r"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --checkpoint s3://bkt/runs/r: cannot read the storage"), err
    assert not list(tmp_path.iterdir())

    for key, value in {**s3_env(dead), "WANDB_MODE": "disabled"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = TrainConfig(name="t-dead", storage_path="s3://bkt/runs", wandb_mode="disabled").validate()
    t0 = time.monotonic()
    tracker = Tracker(cfg, "s3://bkt/runs/t-dead", world_size=1, resumed=False, kernel_backend="eager")
    for step in (1, 2, 3):  # within UPLOAD_EVERY_S of the failure: no further attempt, no waiting
        tracker.log_step(step, step_metrics(step))
    tracker.log_epoch(3, 1, torch.zeros(4, 1, 28, 28), dict(QUALITY))
    tracker.finish({"final_step": 3})
    took = time.monotonic() - t0
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("WARNING: distgan")]
    # reading the old rows, the first upload, and the last try at the end: one timeout each, then it gives up
    assert len(warnings) == 3, warnings
    assert "could not read" in warnings[0] and "could not upload" in warnings[1]
    assert "not uploaded" in warnings[2] and str(tracker.run_dir) in warnings[2]
    assert took < 3 * 30 + 20, f"{took:.0f}s"
    assert [r["kind"] for r in read_metrics(tracker.metrics_path)] == \
        ["start", "step", "step", "step", "eval", "finish"]
    assert (tracker.run_dir / "samples" / "epoch_0001.png").is_file() and (tracker.run_dir / "curves.png").is_file()


def test_the_driver_finds_the_newest_checkpoint_in_the_bucket_and_refuses_a_changed_model(bucket, tmp_path):
    """What a resubmission with an s3:// --storage-path does before Ray starts (distgan.runs.check_resume)."""
    from distgan.config import ConfigError
    from distgan.runs import check_resume

    for step in (3, 5):
        local = make_checkpoint(tmp_path / f"c{step}", step=step)
        upload(local / "state.pt", f"s3://{bucket}/runs/r/checkpoint_{step:08d}/state.pt")
        time.sleep(1.1)  # S3 modification times have a resolution of a second
    where, state = RunDir(f"s3://{bucket}/runs", "r").resume_point()
    assert where.endswith("runs/r/checkpoint_00000005") and state["step"] == 5
    cfg = TrainConfig(**{**state["config"], "storage_path": f"s3://{bucket}/runs", "name": "r"})
    check_resume(cfg, (where, state))  # the same flags resume
    with pytest.raises(ConfigError, match="^--z-dim: run r was checkpointed with z_dim=100 .*checkpoint_00000005"):
        check_resume(TrainConfig(**{**state["config"], "name": "r", "z_dim": 64}), (where, state))


@pytest.mark.slow
def test_a_run_and_sample_with_a_query_string_uri_keep_every_artifact_in_the_bucket(bucket, ray_cluster,
                                                                                   s3_endpoint, capsys):
    """pyarrow's URI form for an S3-protocol server that is not AWS: the run name goes into the path, before the
    ?query, for Ray's checkpoints, the Tracker's files and distgan.sample alike."""
    from conftest import describe, run_train, summary_of

    query = f"endpoint_override={s3_endpoint.removeprefix('http://')}&scheme=http"
    storage_path = f"s3://{bucket}/runs?{query}"
    proc = run_train(ray_cluster, "--num-workers", 2, "--batch-size", 500, "--epochs", 1, "--checkpoint-every", 1,
                     "--eval-samples", 200, "--storage-path", storage_path, "--name", "q",
                     env={**s3_env(s3_endpoint), "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, describe(proc)
    assert "not uploaded" not in proc.stderr and "could not" not in proc.stderr, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert summary["run_dir"] == f"s3://{bucket}/runs/q?{query}"
    assert summary["checkpoint"] == f"s3://{bucket}/runs/q/checkpoint_00000008?{query}"

    assert sample_main(["--checkpoint", summary["run_dir"], "--num-samples", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"wrote 4 images to s3://{bucket}/runs/q/samples/sample-checkpoint_00000008-seed0.png?{query}"
    run = f"{bucket}/runs/q"
    listing = s3().get_file_info(pyarrow.fs.FileSelector(run, recursive=True))
    names = {info.path.removeprefix(f"{run}/") for info in listing}
    assert {"metrics.jsonl", "curves.png", "samples/epoch_0001.png", "samples/latest.png",
            "samples/sample-checkpoint_00000008-seed0.png", "checkpoint_00000008/state.pt",
            "checkpoint_manager_snapshot.json"} <= names, names
    kinds = [r["kind"] for r in rows(f"{run}/metrics.jsonl")]
    assert kinds[0] == "start" and "eval" in kinds and kinds[-1] == "finish"


@pytest.mark.parametrize("content, kept", [
    (b"", b""), (b'{"a": 1}\n', b'{"a": 1}\n'), (b'{"a": 1}\n{"b": 2', b'{"a": 1}\n'), (b'{"b": 2', b""),
    (b'{"a": 1}\n' + b"x" * 200_000, b'{"a": 1}\n'),  # a fragment longer than one block read
])
def test_drop_torn_line_cuts_after_the_last_newline(tmp_path, content, kept):
    from distgan.storage import drop_torn_line

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    assert drop_torn_line(path) == len(content) - len(kept)
    assert path.read_bytes() == kept
    assert drop_torn_line(tmp_path / "none.jsonl") == 0
