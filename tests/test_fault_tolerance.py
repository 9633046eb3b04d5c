"""Recovery through a real Ray cluster: a SIGKILLed worker, and the README's resubmission, both bitwise equal
to the uninterrupted run under the default schedule's features (evaluation on, epoch checkpoints, EMA).

With --n-critic 2 and with step checkpoints too. The trainer's own state round trips run without Ray
in tests/test_trainer.py; here Ray delivers the checkpoint.
"""

import re

import pytest
import torch

from distgan.checkpoint import load_state

from conftest import TRAINING_STATE, assert_bitwise_equal, describe, run_train

pytestmark = pytest.mark.slow

# 2 workers, 7 steps an epoch (4,000 images / 512), a checkpoint and an evaluation every epoch, 10 steps
RECIPE = ("--num-workers", 2, "--batch-size", 512, "--epochs", 2, "--max-steps", 10, "--checkpoint-every", 1,
          "--eval-every", 1, "--eval-samples", 200, "--seed", 7, "--checkpoint-every-minutes", 0)
LAST_STEP = 10


def train(cluster, storage, name, env=None, extra=()):
    # W&B has its own tests; here it would only add its start-up and shutdown to every run
    return run_train(cluster, *RECIPE, "--storage-path", storage, "--name", name, *extra,
                     env={"WANDB_MODE": "disabled", **(env or {})})


def final_state(storage, name, step=LAST_STEP):
    """The newest checkpoint at that step (a resumed attempt names its checkpoints ..._resume<step>)."""
    dirs = sorted((storage / name).glob(f"checkpoint_{step:08d}*"), key=lambda p: p.stat().st_mtime)
    return load_state(dirs[-1])


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("ft")


@pytest.fixture(scope="module")
def reference(ray_cluster, storage):
    proc = train(ray_cluster, storage, "reference")
    assert proc.returncode == 0, describe(proc)
    return final_state(storage, "reference")


def test_worker_sigkilled_after_a_registered_checkpoint_resumes_bit_exactly(ray_cluster, storage, reference,
                                                                            tmp_path):
    # step 9: two steps after the epoch-1 checkpoint (step 7) was reported, evaluated and registered
    env = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_KILL_AT_STEP": "9", "DISTGAN_TEST_KILL_RANK": "1"}
    proc = train(ray_cluster, storage, "killed", env=env, extra=("--max-failures", 1))
    assert proc.returncode == 0, describe(proc)
    log = proc.stdout + proc.stderr
    assert (tmp_path / "kill_done").exists() and "SIGKILL at step 9" in log
    assert "resumed from" in log and "checkpoint_00000007 at step 7" in log
    got = final_state(storage, "killed")
    assert got["best_fid"] < float("inf")
    for key in TRAINING_STATE:
        assert_bitwise_equal(got[key], reference[key], key)
    # the resumed attempt wrote its own names; every checkpoint directory holds a valid state
    assert (storage / "killed" / "checkpoint_00000010_resume00000007").is_dir()
    for ckpt in (storage / "killed").glob("checkpoint_0*"):
        assert torch.isfinite(load_state(ckpt)["generator"]["project.weight"]).all()


def test_resubmitting_with_the_same_name_continues_bit_exactly(ray_cluster, storage, reference):
    first = train(ray_cluster, storage, "resubmitted", extra=("--max-steps", 8))  # the later flag wins
    assert first.returncode == 0, describe(first)
    second = train(ray_cluster, storage, "resubmitted")
    assert second.returncode == 0, describe(second)
    assert "resumed from" in second.stdout + second.stderr and "at step 8" in second.stdout + second.stderr
    got = final_state(storage, "resubmitted")
    for key in TRAINING_STATE:
        assert_bitwise_equal(got[key], reference[key], key)


# The same SIGKILL with --n-critic 2 (3 G steps an epoch: epoch checkpoints at 3, 6, 9) and with step
# checkpoints (every 4 steps, and the epoch one at 7). Ray registers a reported checkpoint asynchronously, so a
# kill one step after the step-8 report may resume from 8 or from 7; either way the run must end bitwise equal.
VARIANTS = {
    "n-critic-2": (("--n-critic", 2, "--epochs", 4), 8, (6,)),
    "step-checkpoints": (("--checkpoint-every-steps", 4), 9, (7, 8)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_variants_resume_bit_exactly(ray_cluster, storage, tmp_path, variant):
    extra, kill_at, resumes_at = VARIANTS[variant]
    ref = train(ray_cluster, storage, f"{variant}-reference", extra=extra)
    assert ref.returncode == 0, describe(ref)
    env = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_KILL_AT_STEP": str(kill_at),
           "DISTGAN_TEST_KILL_RANK": "1"}
    proc = train(ray_cluster, storage, f"{variant}-killed", env=env, extra=(*extra, "--max-failures", 1))
    assert proc.returncode == 0, describe(proc)
    log = proc.stdout + proc.stderr
    resumed = re.search(r"resumed from \S+checkpoint_(\d{8})\S* at step (\d+)", log)
    assert f"SIGKILL at step {kill_at}" in log and resumed and int(resumed.group(2)) in resumes_at, log[-3000:]
    got, want = final_state(storage, f"{variant}-killed"), final_state(storage, f"{variant}-reference")
    for key in TRAINING_STATE:
        assert_bitwise_equal(got[key], want[key], key)
