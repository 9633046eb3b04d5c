"""Recovery through a real Ray cluster, in an S3 bucket: a SIGKILLed worker's run resumes from the bucket and ends
bitwise equal to the uninterrupted run, with every artifact in the bucket and s3:// in every printed path.

The uninterrupted run is computed without Ray (tests/reference_run.py: the Trainer in 2 gloo processes, what a
Ray run trains bit for bit), so the case costs one Ray run. It has the default schedule's features (evaluation
on, epoch checkpoints, EMA) with --n-critic 2 and step checkpoints on top, so the restart resumes mid-epoch.
The trainer's own state round trips (mid-epoch, epoch boundary, --n-critic 2) run in tests/test_trainer.py;
the README's resubmission, through local storage, is tested bitwise in tests/test_train.py (`ray job submit`).
"""

import json
import re

import pyarrow.fs
import pytest
from reference_run import trainer_reference

from distgan.checkpoint import fetch_state

from conftest import assert_same_training_state, describe, run_train, s3_env

pytestmark = pytest.mark.slow

# 2 workers, 4,000 images / 512 = 7 batches an epoch; with 2 D steps per G step, 3 G steps an epoch: epoch
# checkpoints (each evaluated) at 3, 6, 9 and step checkpoints at 4, 8. The default --lr-decay-start 0.5 decays
# both learning rates from step 5 on, so the restart continues a decay.
RECIPE = ("--num-workers", 2, "--batch-size", 512, "--epochs", 4, "--max-steps", 10, "--n-critic", 2,
          "--checkpoint-every", 1, "--checkpoint-every-steps", 4, "--eval-every", 1, "--eval-samples", 200,
          "--seed", 7, "--checkpoint-every-minutes", 0)
LAST_STEP = 10
# Killed during step 9, the restart resumes mid-epoch from the step-8 checkpoint. Ray registers a reported
# checkpoint asynchronously, so a kill soon after a report may resume from the one before (6); either way the run
# must end bitwise equal.
KILL_AT, RESUMES_AT = 9, (6, 8)


def test_worker_sigkilled_mid_run_resumes_from_the_bucket_bit_exactly(ray_cluster, s3_endpoint, tmp_path,
                                                                      monkeypatch):
    for key, value in s3_env(s3_endpoint).items():  # this process reads the bucket too
        monkeypatch.setenv(key, value)
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True)
    s3.create_dir("ft-bucket")
    want = trainer_reference((*RECIPE, "--storage-path", tmp_path, "--name", "reference", "--wandb-mode", "disabled"),
                             tmp_path / "want.pt")

    # W&B has its own tests; here it would only add its start-up and shutdown to the run
    env = {**s3_env(s3_endpoint), "WANDB_MODE": "disabled",
           "DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_KILL_AT_STEP": str(KILL_AT),
           "DISTGAN_TEST_KILL_RANK": "1"}
    proc = run_train(ray_cluster, *RECIPE, "--storage-path", "s3://ft-bucket/exp", "--name", "killed",
                     "--max-failures", 1, env=env)
    assert proc.returncode == 0, describe(proc)
    log = proc.stdout + proc.stderr
    assert (tmp_path / "kill_done").exists() and f"SIGKILL at step {KILL_AT}" in log
    run = "s3://ft-bucket/exp/killed"
    resumed = re.search(rf"resumed from {run}/checkpoint_(\d{{8}}) at step (\d+)", log)
    assert resumed and int(resumed.group(2)) in RESUMES_AT, log[-3000:]
    last = f"checkpoint_{LAST_STEP:08d}_resume{int(resumed.group(2)):08d}"  # the resumed attempt's own names
    assert f"last checkpoint: {run}/{last}" in proc.stdout

    got = fetch_state(f"{run}/{last}")
    assert got["best_fid"] < float("inf")
    assert_same_training_state(got, want)
    names = {info.base_name for info in s3.get_file_info(pyarrow.fs.FileSelector("ft-bucket/exp/killed"))}
    assert {last, "metrics.jsonl", "samples", "curves.png", "checkpoint_manager_snapshot.json"} <= names
    # every checkpoint Ray registered has its state in the bucket (a kill may leave an unregistered one torn)
    with s3.open_input_stream("ft-bucket/exp/killed/checkpoint_manager_snapshot.json") as fh:
        registered = [c["checkpoint_dir_name"] for c in json.loads(fh.read())["checkpoint_results"]]
    assert last in registered
    for name in registered:
        assert s3.get_file_info(f"ft-bucket/exp/killed/{name}/state.pt").type == pyarrow.fs.FileType.File, name
