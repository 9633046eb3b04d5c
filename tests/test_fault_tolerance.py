"""Failures on a real Ray cluster: SIGKILLed workers, resubmission, bad checkpoints, NaN losses.

All runs share one recipe (2 workers, 8 steps, a checkpoint every 2 steps, fixed seed, CPU), so the
uninterrupted run is the bitwise reference for every recovered one.
"""

import pytest
import torch

from conftest import describe, run_train
from distgan.checkpoint import load_state

pytestmark = pytest.mark.slow

RECIPE = ("--num-workers", 2, "--batch-size", 32, "--epochs", 1, "--checkpoint-every-steps", 2,
          "--eval-every", 0, "--seed", 7)


def train(cluster, storage, name, steps, env=None, extra=()):
    return run_train(cluster, *RECIPE, "--max-steps", steps, "--storage-path", storage, "--name", name,
                     *extra, env=env)


def final_state(storage, name, step=8):
    return load_state(storage / name / f"checkpoint_{step:08d}")


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


@pytest.mark.parametrize("damage", ["truncate", "nan_weight"])
def test_bad_latest_checkpoint_falls_back_to_the_previous_one(ray_cluster, storage, reference, damage):
    name = f"bad-{damage}"
    first = train(ray_cluster, storage, name, 4)
    assert first.returncode == 0, describe(first)
    latest = storage / name / "checkpoint_00000004" / "state.pt"
    if damage == "truncate":
        latest.write_bytes(latest.read_bytes()[:5000])
    else:
        state = torch.load(latest, weights_only=True)
        state["generator"]["project.weight"][0, 0] = float("nan")
        torch.save(state, latest)
    second = train(ray_cluster, storage, name, 8)
    assert second.returncode == 0, describe(second)
    log = second.stdout + second.stderr
    assert "skipping checkpoint" in log and str(latest) in log
    assert ("truncated" in log) if damage == "truncate" else ("non-finite" in log)
    assert "checkpoint_00000002" in log
    assert_same_training_state(final_state(storage, name), reference)


def test_no_valid_checkpoint_exits_nonzero_naming_the_files(ray_cluster, storage):
    name = "all-bad"
    first = train(ray_cluster, storage, name, 4)
    assert first.returncode == 0, describe(first)
    for ckpt in (storage / name).glob("checkpoint_0*"):
        (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    second = train(ray_cluster, storage, name, 8, extra=("--max-failures", 0))
    assert second.returncode == 1, describe(second)
    assert "no valid checkpoint" in second.stderr and "checkpoint_00000004" in second.stderr


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
