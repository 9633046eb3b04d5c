"""A fork (--init-from): the driver resolves it to one checkpoint and refuses what does not fit, in one line and
before any worker starts; a run with checkpoints of its own resumes them instead; `distgan.local` and
`distgan.train` fork and train, and an unchanged fork ends bitwise equal to its parent continuing. What the Trainer
keeps of the parent's state and takes from its own flags: tests/test_trainer.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distgan import cluster, fork, local, train
from distgan.checkpoint import load_state, save_state
from distgan.config import ConfigError, TrainConfig
from distgan.rundir import Found, RunDir

from conftest import assert_same_training_state, describe, use_s3
from support import plain_state, run_module


def _checkpoint(run_dir: Path, step: int, g_steps_into_epoch: int = 0, **flags) -> Path:
    """A checkpoint that validates, of a run of `flags` on 2 workers, in run_dir/checkpoint_<step>."""
    cfg = TrainConfig(storage_path=str(run_dir.parent), name=run_dir.name, num_workers=2, **flags)
    directory = run_dir / f"checkpoint_{step:08d}"
    save_state(plain_state(step, config=cfg.to_dict(), g_steps_into_epoch=g_steps_into_epoch, world_size=2),
               directory)
    return directory


def _cfg(tmp_path: Path, **flags) -> TrainConfig:
    return TrainConfig(storage_path=str(tmp_path / "runs"), name="child", num_workers=2, **flags).validate()


# ------------------------------------------------------------------ which checkpoint --init-from means


def test_a_checkpoint_directory_is_itself_and_a_run_directory_its_newest_valid_checkpoint(tmp_path):
    parent = tmp_path / "runs" / "parent"
    _checkpoint(parent, 4)
    newest_valid = _checkpoint(parent, 8)
    (parent / "checkpoint_00000012").mkdir()  # a checkpoint torn before its state.pt: skipped
    cfg = _cfg(tmp_path, init_from=str(parent))
    got = fork.parent_checkpoint(cfg, None, log=lambda _: None)
    assert got.location == str(newest_valid) and got.state["step"] == 8
    assert cfg.init_from == str(newest_valid)  # the exact parent, in the config the workers and W&B get
    cfg = _cfg(tmp_path, init_from=str(parent / "checkpoint_00000004"))
    assert fork.parent_checkpoint(cfg, None).state["step"] == 4
    assert fork.parent_checkpoint(_cfg(tmp_path), None) is None  # not a fork


def test_a_run_with_checkpoints_of_its_own_resumes_them_and_ignores_init_from(tmp_path):
    parent = _checkpoint(tmp_path / "runs" / "parent", 8)
    own = _checkpoint(tmp_path / "runs" / "child", 12, init_from=str(parent))
    notes = []
    cfg = _cfg(tmp_path, init_from=str(tmp_path / "runs" / "other"))  # whatever the resubmission says
    assert fork.parent_checkpoint(cfg, Found(str(own), load_state(own)), log=notes.append) is None
    assert notes == [f"note: run child has checkpoints of its own: it resumes from {own} and ignores --init-from"]
    assert cfg.init_from == str(parent)  # the lineage the run recorded when it forked


def test_a_run_directory_in_a_bucket_is_read_there_and_a_uri_into_this_runs_own_directory_refused(
        tmp_path, s3_endpoint, monkeypatch):
    from distgan.storage import upload

    use_s3(monkeypatch, s3_endpoint, "forks")
    local_copy = _checkpoint(tmp_path / "runs" / "parent", 8)
    upload(local_copy / "state.pt", "s3://forks/runs/parent/checkpoint_00000008/state.pt")
    cfg = _cfg(tmp_path, init_from="s3://forks/runs/parent")
    got = fork.parent_checkpoint(cfg, None)
    assert got.location == cfg.init_from == "s3://forks/runs/parent/checkpoint_00000008" and got.state["step"] == 8
    with pytest.raises(ConfigError, match="^--init-from: s3://forks/runs/nope does not exist$"):
        fork.parent_checkpoint(_cfg(tmp_path, init_from="s3://forks/runs/nope"), None)
    own = TrainConfig(storage_path="s3://forks/runs", name="child", init_from="s3://forks/runs/child/").validate()
    with pytest.raises(ConfigError, match="^--init-from: s3://forks/runs/child/ is in this run's own directory"):
        fork.parent_checkpoint(own, None)


# ------------------------------------------------------------------ refused: one line, exit 2, no worker


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name: (the flags, the start of the one error line)."""
    runs = tmp_path / "runs"
    parent = _checkpoint(runs / "parent", 8)
    mid_epoch = _checkpoint(runs / "mid-epoch", 5, g_steps_into_epoch=5, batch_size=8)
    (runs / "empty").mkdir()
    return {
        "missing": (["--init-from", str(runs / "nope")], f"--init-from: {runs / 'nope'} does not exist"),
        "no checkpoint": (["--init-from", str(runs / "empty")],
                          f"--init-from: {runs / 'empty'} holds no checkpoint that validates"),
        "torn checkpoint": (["--init-from", str(runs / "empty" / "checkpoint_00000001")],
                            f"--init-from: {runs / 'empty' / 'checkpoint_00000001' / 'state.pt'}: missing"),
        "model": (["--init-from", str(parent), "--z-dim", "64"],
                  f"--init-from: {parent} was checkpointed with z_dim=100; this run has 64, which changes the "
                  f"model; a fork keeps its parent's --z-dim"),
        "position": (["--init-from", str(mid_epoch), "--n-critic", "2"],
                     f"--init-from: {mid_epoch} was checkpointed mid-epoch (epoch 0, G step 5) with n_critic=1; "
                     f"this run has 2, which changes what that data position means; fork with --n-critic 1"),
        "own directory": (["--init-from", str(runs / "child" / "checkpoint_00000003")],
                          f"--init-from: {runs / 'child' / 'checkpoint_00000003'} is in this run's own directory"),
    }


BAD = ("missing", "no checkpoint", "torn checkpoint", "model", "position", "own directory")


@pytest.mark.parametrize("case", BAD)
def test_a_bad_init_from_is_one_line_and_exit_2_before_any_worker_starts(tmp_path, monkeypatch, capsys, case):
    flags, error = _bad_inputs(tmp_path)[case]
    if case == "own directory":  # refused, not taken for a resume, though the run has that checkpoint
        _checkpoint(tmp_path / "runs" / "child", 3, batch_size=8)
    monkeypatch.setattr(local, "spawn", lambda *a, **k: pytest.fail("a worker must not start"))
    rc = local.main(["--storage-path", str(tmp_path / "runs"), "--name", "child", "--num-workers", "2",
                     "--batch-size", "8", "--eval-every", "0", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {error}"), err


def test_the_ray_driver_refuses_it_before_ray_starts(tmp_path, monkeypatch, capsys):
    flags, error = _bad_inputs(tmp_path)["model"]
    monkeypatch.setattr(cluster, "connect_ray", lambda cfg: pytest.fail("Ray must not start"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert train.main(["--storage-path", str(tmp_path / "runs"), "--name", "child", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {error}") and len(err.splitlines()) == 1


@pytest.mark.parametrize("value,error", [
    ("", "--init-from: give a checkpoint directory or a run directory"),
    ("s3:/bucket/run", "--init-from: 's3:/bucket/run' looks like a URI with a slash missing"),
])
def test_a_malformed_location_is_refused_with_the_other_flags(tmp_path, value, error):
    with pytest.raises(ConfigError, match=f"^{error}"):
        _cfg(tmp_path, init_from=value)


def test_a_relative_location_is_resolved_where_it_was_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cfg(tmp_path, init_from="runs/parent").init_from == str(tmp_path / "runs" / "parent")


# ------------------------------------------------------------------ what the driver hands the workers


def test_the_driver_hands_the_parent_to_the_workers_and_a_resubmission_its_own_checkpoint(tmp_path, monkeypatch):
    parent = _checkpoint(tmp_path / "runs" / "parent", 8)
    handed = []
    monkeypatch.setattr(local, "spawn", lambda fn, world, *args, **k: handed.append(args))
    argv = ["--storage-path", str(tmp_path / "runs"), "--name", "child", "--num-workers", "2", "--batch-size", "8",
            "--eval-every", "0", "--init-from", str(tmp_path / "runs" / "parent")]
    assert local.main(argv) == 0
    cfg_dict, _, resume_from, _, init_from = handed[-1]
    assert (resume_from, init_from, cfg_dict["init_from"]) == (None, str(parent), str(parent))
    own = _checkpoint(tmp_path / "runs" / "child", 10, init_from=str(parent))  # what the fork wrote, then crashed
    assert local.main(argv) == 0
    cfg_dict, _, resume_from, _, init_from = handed[-1]
    assert (resume_from, init_from, cfg_dict["init_from"]) == (str(own), None, str(parent))
    assert RunDir(str(tmp_path / "runs"), "child").resume_point().state["step"] == 10


# ------------------------------------------------------------------ training: distgan.local and distgan.train

ARGS = ("--max-steps", 20, "--num-workers", 2, "--batch-size", 32, "--checkpoint-every-steps", 5, "--eval-every", 0,
        "--seed", 4, "--checkpoint-every-minutes", 0, "--wandb-mode", "disabled", "--precision", "fp32")


def _start_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "start"]


@pytest.mark.slow
def test_an_unchanged_fork_killed_and_resubmitted_ends_bitwise_equal_to_its_parent_continuing(tmp_path):
    parent = run_module("distgan.local", *ARGS, "--storage-path", tmp_path, "--name", "parent")
    assert parent.returncode == 0, describe(parent)
    # mid-epoch (125 steps an epoch); the fork is killed after its own checkpoint at step 15
    fork_args = (*ARGS, "--storage-path", tmp_path, "--name", "child", "--init-from",
                 tmp_path / "parent" / "checkpoint_00000010")
    kill = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_KILL_AT_STEP": "17"}
    killed = run_module("distgan.local", *fork_args, env=kill)
    assert killed.returncode == 1 and "error: training failed" in killed.stderr, describe(killed)
    assert f"forked from {tmp_path}/parent/checkpoint_00000010 at step 10" in killed.stdout
    resumed = run_module("distgan.local", *fork_args, env=kill)  # the same command; the marker: no second kill
    assert resumed.returncode == 0, describe(resumed)
    assert f"resumed from {tmp_path}/child/checkpoint_00000015 at step 15" in resumed.stdout
    assert "note: run child has checkpoints of its own" in resumed.stdout and "forked from" not in resumed.stdout
    got = load_state(tmp_path / "child" / "checkpoint_00000020_resume00000015")
    want = load_state(tmp_path / "parent" / "checkpoint_00000020")
    assert_same_training_state(got, want)
    assert got["config"]["init_from"] == str(tmp_path / "parent" / "checkpoint_00000010")
    starts = _start_rows(tmp_path / "child")
    assert [(s["resumed"], s.get("init_from"), s.get("init_from_step")) for s in starts] == [
        (False, str(tmp_path / "parent" / "checkpoint_00000010"), 10), (True, None, None)]


@pytest.mark.slow
def test_distgan_train_forks_a_run_with_another_learning_rate(tmp_path, monkeypatch):
    """Through Ray Train, on a Ray instance the driver starts: the parent's run directory is forked at its newest
    checkpoint, with another --lr-g, and trains to its end."""
    args = ("--num-workers", 2, "--batch-size", 32, "--checkpoint-every-steps", 2, "--eval-every", 0,
            "--checkpoint-every-minutes", 0, "--lr-decay-start", 1, "--wandb-mode", "disabled", "--precision", "fp32",
            "--storage-path", tmp_path)
    parent = run_module("distgan.local", *args, "--max-steps", 4, "--name", "parent")  # no second Ray start for it
    assert parent.returncode == 0, describe(parent)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # as a user types it: distgan.train starts a Ray of its own
    forked = run_module("distgan.train", *args, "--max-steps", 6, "--lr-g", 3e-4, "--name", "child",
                        "--init-from", tmp_path / "parent")
    assert forked.returncode == 0, describe(forked)
    assert f"forked from {tmp_path}/parent/checkpoint_00000004 at step 4" in forked.stdout + forked.stderr
    state = load_state(tmp_path / "child" / "checkpoint_00000006")
    assert state["step"] == 6 and state["config"]["lr_g"] == 3e-4 and state["opt_g"]["param_groups"][0]["lr"] == 3e-4
    summary = json.loads((tmp_path / "child" / "summary.json").read_text())
    assert summary["init_from"] == str(tmp_path / "parent" / "checkpoint_00000004") and not summary["resumed"]
    assert _start_rows(tmp_path / "child")[0]["init_from_step"] == 4
