"""Failures on a real Ray cluster: SIGKILLed workers, resubmission, bad checkpoints, NaN losses.

All runs share one recipe (2 workers, 8 steps, a checkpoint every 2 steps, fixed seed, CPU), so the
uninterrupted run is the bitwise reference for every recovered one.
"""

import re

import pytest
import torch

from distgan.checkpoint import load_state

from conftest import describe, run_train

pytestmark = pytest.mark.slow

RECIPE = ("--num-workers", 2, "--batch-size", 32, "--epochs", 1, "--checkpoint-every-steps", 2,
          "--eval-every", 0, "--seed", 7)


def train(cluster, storage, name, steps, env=None, extra=()):
    # W&B has its own tests; here it would only add its start-up and shutdown to every run
    return run_train(cluster, *RECIPE, "--max-steps", steps, "--storage-path", storage, "--name", name,
                     *extra, env={"WANDB_MODE": "disabled", **(env or {})})


def final_state(storage, name, step=8):
    """The newest checkpoint at that step (a resumed attempt names its checkpoints ..._resume<step>)."""
    dirs = sorted((storage / name).glob(f"checkpoint_{step:08d}*"), key=lambda p: p.stat().st_mtime)
    return load_state(dirs[-1])


def assert_bitwise_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_same_training_state(a, b):
    for key in ("generator", "discriminator", "ema", "opt_g", "opt_d"):
        assert_bitwise_equal(a[key], b[key], key)
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"])


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("ft")


@pytest.fixture(scope="module")
def reference(ray_cluster, storage):
    proc = train(ray_cluster, storage, "reference", 8)
    assert proc.returncode == 0, describe(proc)
    return final_state(storage, "reference")


def test_sigkilled_worker_is_restarted_and_resumes_bit_exactly(ray_cluster, storage, reference, tmp_path):
    env = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_KILL_AT_STEP": "5", "DISTGAN_TEST_KILL_RANK": "1"}
    proc = train(ray_cluster, storage, "killed", 8, env=env)
    assert proc.returncode == 0, describe(proc)
    log = proc.stdout + proc.stderr
    assert (tmp_path / "kill_done").exists() and "SIGKILL at step 5" in log
    assert "resumed from" in log and "checkpoint_00000004" in log
    assert_same_training_state(final_state(storage, "killed"), reference)


def test_resubmitting_with_the_same_name_continues_bit_exactly(ray_cluster, storage, reference):
    first = train(ray_cluster, storage, "resubmitted", 4)
    assert first.returncode == 0, describe(first)
    second = train(ray_cluster, storage, "resubmitted", 8)
    assert second.returncode == 0, describe(second)
    assert "resumed from" in second.stdout + second.stderr
    assert_same_training_state(final_state(storage, "resubmitted"), reference)


def test_bad_latest_checkpoints_fall_back_to_the_previous_one_then_fail_when_none_is_left(
        ray_cluster, storage, reference):
    name = "bad-checkpoints"
    run = storage / name
    first = train(ray_cluster, storage, name, 4)
    assert first.returncode == 0, describe(first)

    # a truncated latest checkpoint: resume from the one before it, with a warning naming the file
    truncated = run / "checkpoint_00000004" / "state.pt"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    second = train(ray_cluster, storage, name, 6)
    assert second.returncode == 0, describe(second)
    log = second.stdout + second.stderr
    assert "skipping checkpoint" in log and str(truncated) in log and "truncated" in log
    assert "resumed from" in log and "checkpoint_00000002 at step 2" in log

    # a NaN weight in the latest checkpoint: the same, and the run still ends bit-identical to the reference
    poisoned = run / "checkpoint_00000006_resume00000002" / "state.pt"  # the second attempt resumed at step 2
    state = torch.load(poisoned, weights_only=True)
    state["generator"]["project.weight"][0, 0] = float("nan")
    torch.save(state, poisoned)
    third = train(ray_cluster, storage, name, 8)
    assert third.returncode == 0, describe(third)
    log = third.stdout + third.stderr
    assert "skipping checkpoint" in log and str(poisoned) in log and "non-finite" in log
    assert re.search(r"checkpoint_00000004_resume00000002 at step 4", log)
    assert_same_training_state(final_state(storage, name), reference)

    # nothing valid left: a non-zero exit naming the files, never a silent restart from step 0
    for ckpt in run.glob("checkpoint_0*"):
        (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    fourth = train(ray_cluster, storage, name, 10, extra=("--max-failures", 0))
    assert fourth.returncode == 1, describe(fourth)
    assert "no valid checkpoint" in fourth.stderr and "checkpoint_00000008" in fourth.stderr


def test_nan_loss_is_caught_on_every_rank_and_rolled_back(ray_cluster, storage, tmp_path):
    env = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_NAN_AT_STEP": "3", "DISTGAN_TEST_NAN_RANK": "0"}
    proc = train(ray_cluster, storage, "nan-rollback", 8, env=env)
    assert proc.returncode == 0, describe(proc)
    log = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] non-finite loss detected at step 3" in log
        assert f"[rank {rank}] rolled back to step 2" in log
    state = final_state(storage, "nan-rollback")
    assert state["rollbacks"] == 1 and state["lr_scale"] == 0.5
    assert state["opt_g"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    for ckpt in sorted((storage / "nan-rollback").glob("checkpoint_0*")):
        load_state(ckpt)  # validates: every saved tensor is finite


def test_nan_loss_with_stop_policy_exits_nonzero_with_a_clear_message(ray_cluster, storage, tmp_path):
    env = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_NAN_AT_STEP": "3"}
    proc = train(ray_cluster, storage, "nan-stop", 8, env=env, extra=("--nan-policy", "stop"))
    assert proc.returncode == 1, describe(proc)
    assert "training stopped: non-finite loss at step 3" in proc.stderr
    assert sorted(p.name for p in (storage / "nan-stop").glob("checkpoint_0*")) == ["checkpoint_00000002"]
