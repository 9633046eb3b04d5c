"""`python -m distgan.local`: distgan.train's flags, the Trainer in gloo processes without Ray. A run trains and
checkpoints; a run whose worker is SIGKILLed fails, and the same command resumes it from the run directory and
ends bitwise equal to the uninterrupted run (the Ray runs are compared with the same processes:
tests/reference_run.py)."""


import pytest

from distgan.checkpoint import load_state

from conftest import assert_same_training_state, describe
from support import run_module

ARGS = ("--max-steps", 20, "--num-workers", 2, "--batch-size", 32, "--checkpoint-every-steps", 5, "--eval-every", 0,
        "--seed", 4, "--checkpoint-every-minutes", 0, "--wandb-mode", "disabled")


def local(*args, env=None):
    return run_module("distgan.local", *args, env=env)


@pytest.mark.slow
def test_a_killed_local_run_resumes_from_its_run_directory_bit_exactly(tmp_path):
    full = local(*ARGS, "--storage-path", tmp_path, "--name", "full")
    assert full.returncode == 0, describe(full)
    assert f"last checkpoint: {tmp_path}/full/checkpoint_00000020" in full.stdout
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint_*")) == \
        [f"checkpoint_{s:08d}" for s in (5, 10, 15, 20)]
    assert (tmp_path / "full" / "metrics.jsonl").is_file()

    kill = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_KILL_AT_STEP": "13", "DISTGAN_TEST_KILL_RANK": "1"}
    killed = local(*ARGS, "--storage-path", tmp_path, "--name", "killed", env=kill)
    assert killed.returncode == 1 and "error: training failed" in killed.stderr, describe(killed)
    resumed = local(*ARGS, "--storage-path", tmp_path, "--name", "killed", env=kill)  # the marker: no second kill
    assert resumed.returncode == 0, describe(resumed)
    assert f"resumed from {tmp_path}/killed/checkpoint_00000010 at step 10" in resumed.stdout
    got = load_state(tmp_path / "killed" / "checkpoint_00000020_resume00000010")
    want = load_state(tmp_path / "full" / "checkpoint_00000020")
    assert_same_training_state(got, want)


def test_bad_flags_are_one_line_before_any_worker_starts(tmp_path):
    proc = local("--num-workers", 0, "--storage-path", tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --num-workers"), describe(proc)
    proc = local("--use-gpu", "--storage-path", tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == \
        ["error: --use-gpu: distgan.local runs on CPU (gloo); distgan.train runs on GPUs"], describe(proc)


@pytest.mark.slow
def test_a_resumed_run_drops_a_row_torn_mid_write_and_loses_none_of_its_own(tmp_path):
    """A process killed mid-write leaves metrics.jsonl's last line without its newline; the resumed run used to
    append its start row to that fragment, and every reader lost it."""
    import json

    args = [*ARGS, "--storage-path", tmp_path, "--name", "torn", "--num-workers", 1]
    first = local(*[a if a != 20 else 10 for a in args])
    assert first.returncode == 0, describe(first)
    metrics = tmp_path / "torn" / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole + b'{"kind": "step", "step": 11, "loss_d": 0.5, "grad_nor')  # the torn write
    resumed = local(*args)
    assert resumed.returncode == 0, describe(resumed)
    text = metrics.read_text()
    assert text.startswith(whole.decode()) and text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line parses: no fragment left
    starts = [r for r in rows if r["kind"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True]
    assert max(r.get("step", 0) for r in rows) == 20
