"""End to end through a real Ray cluster: `python -m distgan.train` with 2 DDP workers on CPU."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_run import trainer_reference

from distgan.checkpoint import load_state
from distgan.tracking import EPOCH_KEYS, STEP_KEYS

from conftest import (
    REPO,
    assert_same_training_state,
    describe,
    run_train,
    summary_of,
)
from support import Background, wait_for
from wandb_offline import FAKE_KEY, read_offline_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, tmp_path_factory):
    # 8 steps an epoch (4,000 images / 500): the epoch checkpoint and the every-4-steps one fall on step 8
    storage = tmp_path_factory.mktemp("runs")
    proc = run_train(ray_cluster, "--num-workers", 2, "--batch-size", 500, "--epochs", 1, "--checkpoint-every", 1,
                     "--checkpoint-every-steps", 4, "--num-to-keep", 1, "--eval-samples", 200, "--log-every", 2,
                     "--storage-path", storage, "--name", "e2e")
    assert proc.returncode == 0, describe(proc)
    return storage / "e2e", summary_of(proc), proc


def test_two_worker_run_trains_with_finite_losses_and_reports_its_outputs(two_worker_run):
    run_dir, summary, _ = two_worker_run
    assert summary["num_workers"] == 2 and summary["final"]["step"] == 8
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss_d" in r]
    assert step_rows and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in step_rows)
    for key in ("checkpoint", "samples", "metrics_jsonl"):
        assert str(run_dir) in summary[key]


def test_checkpoint_holds_the_full_training_state(two_worker_run):
    run_dir, summary, _ = two_worker_run
    state = load_state(summary["checkpoint"])
    assert state["step"] == 8 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert {"generator", "discriminator", "ema", "opt_g", "opt_d", "config"} <= set(state)
    assert state["config"]["num_workers"] == 2


def test_one_checkpoint_per_step_and_every_kept_checkpoint_exists(two_worker_run):
    run_dir, summary, proc = two_worker_run
    # step 8 was due twice (epoch end and every 4 steps): one report; --num-to-keep 1 keeps the evaluated one
    assert [p.name for p in run_dir.glob("checkpoint_0*")] == ["checkpoint_00000008"]
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    kept = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    assert kept == ["checkpoint_00000008"] and all((run_dir / name / "state.pt").is_file() for name in kept)
    assert snapshot["current_report_index"] == 2  # steps 4 and 8: one report each
    assert Path(summary["best_checkpoint"]).is_dir() and Path(summary["checkpoint"]).is_dir()


def test_the_terminal_shows_few_lines_and_one_line_per_evaluation(two_worker_run):
    _, _, proc = two_worker_run
    lines = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
             if line.strip() and "img/s" not in line]  # progress-bar redraws aside
    assert len(lines) < 60, "\n".join(lines)
    assert not any("State API may be temporarily unavailable" in line for line in lines)
    assert not any("Reporting training result" in line for line in lines)  # Ray Train's INFO chatter
    evaluations = [line for line in lines if "epoch 1 step 8: FID" in line]
    assert len(evaluations) == 1, "\n".join(lines)


def test_sample_grid_png_is_written(two_worker_run):
    run_dir, _, _ = two_worker_run
    pngs = sorted((run_dir / "samples").glob("*.png"))
    assert pngs
    image = np.asarray(Image.open(pngs[-1]))
    assert image.ndim >= 2 and image.std() > 0


@pytest.mark.parametrize("suffix", ["npz", "png"])
def test_distgan_sample_loads_the_checkpoint(two_worker_run, tmp_path, suffix):
    _, summary, _ = two_worker_run
    out = tmp_path / f"out.{suffix}"
    proc = subprocess.run([sys.executable, "-m", "distgan.sample", "--checkpoint", summary["checkpoint"],
                           "--num-samples", "10", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if suffix == "npz":
        images = np.load(out)["images"]
        assert images.shape == (10, 28, 28, 1) and images.dtype == np.uint8 and images.std() > 0
    else:
        assert Image.open(out).size[0] > 28


def test_ray_job_submit_runs_the_trainer_and_the_same_submission_resumes_bit_exactly(ray_cluster, tmp_path):
    """The README's job example: submitted twice with an absolute --storage-path, the second job continues to
    the state an uninterrupted run ends with (computed without Ray). The first sets a variable in the job's
    runtime env that distgan also forwards: Ray refuses to merge a repeated key, so its success shows distgan
    reads the job's runtime env from RAY_JOB_CONFIG_JSON_ENV_VAR, the variable that also makes a relative
    --storage-path an error inside a job (tests/test_config.py)."""
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
              "--working-dir", "."]
    env = ray_cluster.client_env(WANDB_MODE="offline")
    # --wandb-mode offline: the node's W&B key would make W&B try its server, unreachable here, for ~30 s per job
    # before falling back to offline (tests/test_tracking.py tests that fallback)
    # --lr-decay-start 1: the two jobs stop at --max-steps 5 and 8, and a decay's length would follow that
    # flag; the SIGKILL test resumes the default decay (tests/test_fault_tolerance.py)
    recipe = ("--epochs", "1", "--batch-size", "32", "--eval-every", "0", "--wandb-mode", "offline",
              "--storage-path", str(tmp_path), "--lr-decay-start", "1")

    def train(*args, job_env=()):
        return subprocess.run([*submit, *job_env, "--", "python", "-m", "distgan.train", *recipe, *args],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    first = train("--max-steps", "5", "--name", "job",
                  job_env=("--runtime-env-json", json.dumps({"env_vars": {"TRITON_INTERPRET": "1"}})))
    assert first.returncode == 0, describe(first)
    assert "succeeded" in first.stdout + first.stderr
    state = load_state(tmp_path / "job" / "checkpoint_00000005")
    assert state["step"] == 5 and torch.isfinite(state["generator"]["project.weight"]).all()
    second = train("--max-steps", "8", "--name", "job")
    assert second.returncode == 0, describe(second)
    assert "resumed from" in second.stdout and "at step 5" in second.stdout
    got = load_state(tmp_path / "job" / "checkpoint_00000008_resume00000005")
    want = trainer_reference((*recipe, "--max-steps", "8", "--name", "reference", "--wandb-mode", "disabled"),
                             tmp_path / "want.pt")
    assert_same_training_state(got, want)


def test_too_many_workers_fails_fast_naming_the_flag(ray_cluster, tmp_path):
    proc = run_train(ray_cluster, "--num-workers", 8, "--batch-size", 64, "--placement-timeout-s", 3,
                     "--storage-path", tmp_path, "--name", "toomany", timeout=120)
    assert proc.returncode == 2
    assert "--num-workers 8: cannot place" in proc.stderr


def test_wandb_offline_run_of_the_two_worker_training(two_worker_run):
    run_dir, _, proc = two_worker_run
    run = read_offline_run(run_dir / "wandb")
    assert run["num_runs"] == 1 and run["complete"] and run["offline"] and run["name"] == "e2e"
    step_rows = [r for r in run["history"] if "loss_d" in r]
    assert [r["_step"] for r in step_rows] == [1, 2, 4, 6, 8]
    for row in step_rows:
        for key in STEP_KEYS:
            assert math.isfinite(row[key]), key
    assert run["image_keys"]
    eval_row = next(r for r in run["history"] if "fid" in r)
    assert all(math.isfinite(eval_row[k]) for k in EPOCH_KEYS)
    assert run["config"]["world_size"] == 2 and run["config"]["kernel_backend"] == "eager"
    assert run["config"]["per_worker_batch"] == 250
    # the workers' environment held a W&B key: nothing the run wrote or printed contains it
    assert FAKE_KEY not in proc.stdout + proc.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_ctrl_c_checkpoints_at_the_interrupted_step_and_the_printed_command_resumes(ray_cluster, tmp_path):
    import os
    import re
    import shlex
    import signal
    import time

    args = ["--batch-size", 32, "--max-steps", 300, "--eval-every", 0, "--checkpoint-every-minutes", 0,
            "--storage-path", tmp_path, "--name", "ctrl-c"]
    env = ray_cluster.client_env(WANDB_MODE="disabled")
    with Background([sys.executable, "-m", "distgan.train", *args], tmp_path / "driver.log", env) as driver:
        driver.wait_for_log("img/s", 180)
        time.sleep(2)  # a few steps in, between checkpoints
        os.killpg(driver.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        driver.proc.wait(timeout=120)
    text = driver.text()
    assert driver.proc.returncode == 130, text[-3000:]
    found = re.search(r"interrupted: checkpoint (\S+) written at step (\d+); to resume: (.+)", text)
    assert found, text[-3000:]
    checkpoint, step, command = Path(found.group(1)), int(found.group(2)), found.group(3)
    assert 0 < step < 300 and checkpoint.name == f"checkpoint_{step:08d}" and checkpoint.is_dir()
    assert load_state(checkpoint)["step"] == step

    # the printed command, as the user would paste it (here with --verbose: Ray's own output comes back)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "distgan.train"]
    resumed = subprocess.run([sys.executable, *argv[1:], "--max-steps", str(step + 3), "--verbose"], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, describe(resumed)
    assert f"at step {step} " in resumed.stdout + resumed.stderr and "resumed from" in resumed.stdout
    assert "Reporting training result" in resumed.stdout + resumed.stderr
    assert summary_of(resumed)["final"]["step"] == step + 3


def _stopped_checkpoint(text: str) -> tuple[Path, int]:
    import re

    found = re.search(r"interrupted: checkpoint (.+?) written at step (\d+); to resume: python -m distgan.train ", text)
    assert found, text[-3000:]
    checkpoint, step = Path(found.group(1)), int(found.group(2))
    assert 0 < step and checkpoint.name == f"checkpoint_{step:08d}" and load_state(checkpoint)["step"] == step
    return checkpoint, step


def test_sigterm_to_the_driver_checkpoints_like_the_first_ctrl_c_and_exits_143(ray_cluster, tmp_path):
    """What `kill`, `timeout`, Kubernetes, SLURM and systemd send: one SIGTERM to the driver process."""
    import os
    import signal

    args = ["--batch-size", 32, "--max-steps", 300, "--eval-every", 0, "--checkpoint-every-minutes", 0,
            "--storage-path", tmp_path, "--name", "term"]
    env = ray_cluster.client_env(WANDB_MODE="disabled")
    with Background([sys.executable, "-m", "distgan.train", *args], tmp_path / "driver.log", env) as driver:
        driver.wait_for_log("img/s", 180)
        os.kill(driver.proc.pid, signal.SIGTERM)
        driver.proc.wait(timeout=120)
    text = driver.text()
    assert driver.proc.returncode == 143, text[-3000:]
    assert "SIGTERM: the workers stop at the next step and write a checkpoint; SIGTERM again to stop at once" in text
    assert "*** SIGTERM received" not in text  # Ray's own handler: a stack dump and exit 134
    _stopped_checkpoint(text)
    assert not (tmp_path / "term" / "driver_claim.json").exists()


# the driver as `python -m distgan.train`, held where it waits for the workers' placement (an autoscaler adding
# nodes can hold it there for minutes): Ray is connected, no worker has started
_HELD_AT_PLACEMENT = """
import sys, time
import distgan.cluster, distgan.train
def hold(cfg, use_gpu):
    print("waiting for placement", flush=True)
    time.sleep(120)
distgan.cluster.wait_for_placement = hold
sys.exit(distgan.train.main(sys.argv[1:]))
"""


def test_sigterm_before_training_starts_stops_at_once_without_rays_stack_dump(ray_cluster, tmp_path):
    import os
    import signal

    args = ["--max-steps", 20, "--storage-path", tmp_path, "--name", "early-term"]
    env = ray_cluster.client_env(WANDB_MODE="disabled")
    with Background([sys.executable, "-c", _HELD_AT_PLACEMENT, *args], tmp_path / "driver.log", env) as driver:
        driver.wait_for_log("waiting for placement", 120)  # connected to Ray, no worker started
        os.kill(driver.proc.pid, signal.SIGTERM)
        driver.proc.wait(timeout=60)
    text = driver.text()
    assert driver.proc.returncode == 143, text[-3000:]
    assert "*** SIGTERM received" not in text  # Ray's own handler: a stack dump and exit 134
    assert "interrupted at once; the last checkpoint is kept; to resume: python -m distgan.train" in text
    assert not (tmp_path / "early-term" / "driver_claim.json").exists()


def test_ray_job_stop_checkpoints_before_the_job_ends(ray_cluster, tmp_path):
    """`ray job stop` sends SIGTERM to the job's processes, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by
    default): the job's runtime env raises it to leave time for the checkpoint (docs/fault-tolerance.md)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = ray_cluster.client_env(WANDB_MODE="disabled")
    address = ("--address", ray_cluster.dashboard_url)
    runtime_env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "90"}})
    submit = subprocess.run([ray_bin, "job", "submit", *address, "--no-wait", "--working-dir", ".",
                             "--runtime-env-json", runtime_env, "--", "python", "-m", "distgan.train",
                             "--batch-size", "32", "--max-steps", "300", "--eval-every", "0",
                             "--checkpoint-every-minutes", "0", "--wandb-mode", "disabled", "--storage-path",
                             str(tmp_path), "--name", "stopped-job"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, describe(submit)
    import re

    job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)

    def job(*what) -> str:
        proc = subprocess.run([ray_bin, "job", *what, *address, job_id], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        return proc.stdout + proc.stderr

    wait_for(lambda: "img/s" in job("logs") or "FAILED" in job("status"), 240, "the job to train")
    stop = subprocess.run([ray_bin, "job", "stop", *address, job_id], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=150)
    assert stop.returncode == 0, describe(stop)
    try:
        wait_for(lambda: "was stopped" in job("status"), 120, "the job to stop")
    except AssertionError:
        raise AssertionError(f"{describe(stop)}\n{job('status')}\n{job('logs')[-3000:]}") from None
    text = job("logs")
    assert "SIGTERM: the workers stop at the next step and write a checkpoint" in text, text[-3000:]
    _stopped_checkpoint(text)


# ------------------------------------------------------------------ Ray's record of the run vs the run directory

# 4,000 images / 500 = 8 steps an epoch; no evaluation unless a test turns it on
SHORT = ("--num-workers", 2, "--batch-size", 500, "--epochs", 2, "--checkpoint-every-steps", 2, "--eval-every", 0,
         "--checkpoint-every-minutes", 0, "--lr-decay-start", 1)


def test_a_deleted_latest_checkpoint_resumes_from_the_newest_on_disk_and_writes_over_nothing(ray_cluster, tmp_path):
    first = run_train(ray_cluster, *SHORT, "--max-steps", 4, "--storage-path", tmp_path, "--name", "lost")
    assert first.returncode == 0, describe(first)
    run = tmp_path / "lost"
    shutil.rmtree(run / "checkpoint_00000004")
    kept = (run / "checkpoint_00000002" / "state.pt").read_bytes()
    second = run_train(ray_cluster, *SHORT, "--max-steps", 6, "--storage-path", tmp_path, "--name", "lost")
    assert second.returncode == 0, describe(second)
    log = second.stdout + second.stderr
    assert ("run lost: resuming from checkpoint_00000002, the newest checkpoint that exists and validates (Ray's "
            "latest, checkpoint_00000004, is missing)") in log
    assert f"resumed from {run}/checkpoint_00000002 at step 2 " in log
    summary = summary_of(second)
    assert summary["resumed"] and summary["final"]["step"] == 6
    assert (run / "checkpoint_00000002" / "state.pt").read_bytes() == kept  # not written over
    assert load_state(run / "checkpoint_00000006_resume00000002")["step"] == 6


def test_turning_evaluation_on_keeps_the_evaluated_checkpoints_and_the_run_resumes_again(ray_cluster, tmp_path):
    """First submitted with --eval-every 0 (no score), resubmitted with evaluation on (step checkpoints between
    evaluations have no FID), then resubmitted again."""
    keep = ("--num-to-keep", 2, "--storage-path", tmp_path, "--name", "evals")
    first = run_train(ray_cluster, *SHORT, "--max-steps", 4, *keep)
    assert first.returncode == 0, describe(first)
    evaluate = ("--eval-every", 1, "--checkpoint-every", 1, "--eval-samples", 200)
    second = run_train(ray_cluster, *SHORT, *evaluate, "--max-steps", 8, *keep)
    assert second.returncode == 0, describe(second)
    assert "Result dict has no key" not in second.stdout + second.stderr
    run = tmp_path / "evals"
    # kept: the evaluated step 8 and the newest unscored one; the unscored 2 and 4 of the first submission go
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == [
        "checkpoint_00000006_resume00000004", "checkpoint_00000008_resume00000004"]
    assert summary_of(second)["best_checkpoint"] == str(run / "checkpoint_00000008_resume00000004")
    third = run_train(ray_cluster, *SHORT, *evaluate, "--max-steps", 12, *keep)
    assert third.returncode == 0, describe(third)
    assert summary_of(third)["final"]["step"] == 12
    record = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    assert all(isinstance(r["metrics"]["fid_rank"], float) for r in record["checkpoint_results"])


def _local_run_env(**extra) -> dict[str, str]:
    """The environment of `python -m distgan.train` run as a user runs it: no RAY_ADDRESS, so it starts a local
    Ray instance of its own."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_to_every_process_of_a_local_run_checkpoints_and_leaves_nothing_of_ray(tmp_path, signame,
                                                                                            code):
    """`timeout`, `kill -- -PGID`, SLURM and systemd signal every process of the job, and a closing terminal sends
    SIGHUP to its foreground group: the local Ray instance's processes get the signal as well as the driver. The
    run still stops at the next step with a checkpoint, and its Ray session directory is gone afterwards. The
    storage path holds a space and a non-ASCII letter: every command the run prints pastes into a shell."""
    import os
    import signal
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    import shlex

    storage_path = tmp_path / "my runs" / "ü dir"
    args = ["--batch-size", 32, "--epochs", 40, "--eval-every", 0, "--checkpoint-every-minutes", 0,
            "--num-workers", 2, "--storage-path", storage_path, "--name", "group"]
    token = tmp_path / "auth_token"  # a token on the machine (as after any `ray start` with token auth): Ray
    token.write_text("0123456789abcdef" * 4)  # turns token auth on for a local instance, and says so
    env = _local_run_env(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_TOKEN_PATH=str(token))
    try:
        with Background([sys.executable, "-m", "distgan.train", *args], tmp_path / "driver.log", env) as driver:
            driver.wait_for_log("img/s", 240)
            assert any(ray_tmp.glob("ray/session_*")), "the run's local Ray instance lives under RAY_TMPDIR"
            os.killpg(driver.proc.pid, getattr(signal, signame))  # the driver, Ray's processes and the workers
            driver.proc.wait(timeout=120)
        text = driver.text()
        assert driver.proc.returncode == code, text[-3000:]
        assert f"{signame}: the workers stop at the next step and write a checkpoint" in text, text[-3000:]
        assert "Token authentication" not in text  # the default output holds distgan's lines
        _, step = _stopped_checkpoint(text)
        # the terminal gets the summary's lines; the whole summary is a file in the run directory
        assert not any(line.startswith(("{", "}")) for line in text.splitlines()), text[-3000:]
        assert json.loads((storage_path / "group" / "summary.json").read_text())["final"]["step"] == step
        resume = text.split("; to resume: ", 1)[1].splitlines()[0]
        assert shlex.split(resume)[-4:] == ["--storage-path", str(storage_path), "--name", "group"]
        sample = text.split("draw samples   : ", 1)[1].splitlines()[0]
        drawn = subprocess.run(["bash", "-c", sample.replace("python", shlex.quote(sys.executable), 1) +
                                " --num-samples 4"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert drawn.returncode == 0 and f"to {storage_path}/group/samples/" in drawn.stdout, describe(drawn)
        assert not list((ray_tmp / "ray").iterdir()), "the local Ray instance's session is left behind"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MB filesystem (tmpfs): room for one checkpoint of the default model (~40 MB), not for two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_it_and_the_checkpoint_to_resume_from(small_disk):
    args = ["--max-steps", 40, "--checkpoint-every-steps", 10, "--checkpoint-every-minutes", 0, "--eval-every", 0,
            "--storage-path", small_disk, "--name", "full"]
    proc = subprocess.run([sys.executable, "-m", "distgan.train", *map(str, args)], env=_local_run_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    run = small_disk / "full"
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip() and "img/s" not in line]
    assert proc.returncode == 1 and lines == [
        f"error: checkpoint failed: cannot write checkpoint {run}/checkpoint_00000020: the device is full (no space "
        f"left); nothing was left under that name; the newest valid checkpoint is {run}/checkpoint_00000010: free "
        f"space, then run the same command to resume from it"], describe(proc)
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000010"]  # no partial file anywhere
    assert [p.name for p in (run / "checkpoint_00000010").iterdir()] == ["state.pt"]
    assert load_state(run / "checkpoint_00000010")["step"] == 10


def test_a_local_run_without_rays_dashboard_trains_end_to_end_quietly(tmp_path, ray_cluster):
    """What a minimal Ray (an offline GPU image's) gives: no dashboard, so no State API, which Ray Train's
    placement-group cleaner polls; the run trains, checkpoints and ends with distgan's lines only. Another
    instance on the machine, recorded by `ray start` as the latest, does not draw the cleaner's polls to it."""
    import tempfile

    from conftest import hiding_modules_env

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a limit
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(ray_cluster.address + "\n")
    env = hiding_modules_env(tmp_path, "ray.dashboard.optional_deps", base=_local_run_env(RAY_TMPDIR=str(ray_tmp)))
    args = ["--max-steps", 200, "--eval-every", 0, "--storage-path", tmp_path / "runs", "--name", "nodash"]
    proc = subprocess.run([sys.executable, "-m", "distgan.train", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, describe(proc)
    assert (tmp_path / "runs" / "nodash" / "checkpoint_00000200").is_dir()
    noise = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip() and "img/s" not in line]
    assert noise == [], noise
    shutil.rmtree(ray_tmp, ignore_errors=True)
