"""`python -m distgan.sample`: which checkpoint of a run it picks, where it writes, and its errors (local
directories; tests/test_storage.py runs the same against an S3 server)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distgan.sample import generate, load_generator, main

from support import make_checkpoint, ray_snapshot

REPO = Path(__file__).resolve().parent.parent


def write_run(run: Path, names: list[str], evals: list[tuple[int, float]] = (), snapshot: dict | None = None) -> Path:
    """A run directory as training leaves it: checkpoints, metrics.jsonl eval rows, Ray's snapshot."""
    for name in names:
        make_checkpoint(run / name, int(name.split("_")[1]))
    rows = [{"kind": "start"}] + [{"kind": "eval", "step": s, "epoch": 1, "fid": f} for s, f in evals]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if snapshot is not None:
        (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return run


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory that must stay empty."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work
    assert not list(work.iterdir()), "distgan.sample wrote into the working directory"


def test_run_dir_uses_the_lowest_fid_from_rays_snapshot(tmp_path, cwd, capsys):
    names = ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]
    # metrics.jsonl disagrees on step 4: the snapshot, which names the directory, wins
    run = write_run(tmp_path / "runs" / "r", names, evals=[(2, 30.0), (4, 99.0)],
                    snapshot=ray_snapshot({"checkpoint_00000002": 30.0, "checkpoint_00000004": 12.3,
                                           "checkpoint_00000006": math.inf}))
    assert main(["--checkpoint", str(run), "--num-samples", "9", "--output", str(tmp_path / "out.npz")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "using checkpoint_00000004 (best FID 12.3 among 2 evaluated of 3 checkpoints)"
    images = np.load(tmp_path / "out.npz")["images"]
    expected = generate(load_generator(run / "checkpoint_00000004"), 9)
    assert images.shape == (9, 28, 28, 1) and images.dtype == np.uint8
    assert np.array_equal(images, ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                          .permute(0, 2, 3, 1).numpy())


def test_without_a_snapshot_the_eval_rows_decide_and_the_last_row_of_a_step_wins(tmp_path, cwd, capsys):
    names = ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]
    # step 4 evaluated twice (a rollback): the later 40.0 counts
    run = write_run(tmp_path / "runs" / "r", names, evals=[(2, 20.0), (4, 10.0), (4, 40.0), (6, 25.0)])
    assert main(["--checkpoint", str(run), "--num-samples", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "using checkpoint_00000002 (best FID 20 of 3 checkpoints)"
    assert out[-1] == f"wrote 4 images to {run}/samples/sample-checkpoint_00000002-seed0.png"


def test_nothing_evaluated_falls_back_to_the_newest_checkpoint(tmp_path, cwd, capsys):
    # at the same step, a resumed attempt's checkpoint is newer than the original's
    names = ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000004_resume00000002"]
    run = write_run(tmp_path / "runs" / "r", names)
    assert main(["--checkpoint", str(run) + "/", "--num-samples", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "using checkpoint_00000004_resume00000002 (newest of 3 checkpoints; none was evaluated)"
    assert (run / "samples" / "sample-checkpoint_00000004_resume00000002-seed3.png").is_file()


def test_default_output_is_the_run_directory_and_output_still_works(tmp_path, cwd, capsys):
    run = write_run(tmp_path / "runs" / "r", ["checkpoint_00000002"])
    assert main(["--checkpoint", str(run / "checkpoint_00000002"), "--num-samples", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    png = run / "samples" / "sample-checkpoint_00000002-seed0.png"
    assert out == ["using checkpoint_00000002", f"wrote 16 images to {png}"]
    assert Image.open(png).size == (4 * 28 + 5 * 2,) * 2  # 16 images: a 4x4 grid with 2 px padding

    assert main(["--checkpoint", str(run / "checkpoint_00000002"), "--num-samples", "4", "--no-ema",
                 "--output", str(tmp_path / "elsewhere" / "g.png")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 4 images to {tmp_path / 'elsewhere' / 'g.png'}"
    assert Image.open(tmp_path / "elsewhere" / "g.png").size == (2 * 28 + 3 * 2,) * 2


@pytest.mark.parametrize("case", ["missing", "no-checkpoints", "a-file", "corrupt"])
def test_bad_checkpoint_paths_are_one_line_errors(tmp_path, cwd, capsys, case):
    target = tmp_path / "runs" / "r"
    if case == "no-checkpoints":
        target.mkdir(parents=True)
        (target / "metrics.jsonl").write_text("")
    elif case == "a-file":
        target.parent.mkdir(parents=True)
        target.write_text("x")
    elif case == "corrupt":
        target = make_checkpoint(tmp_path / "runs" / "r" / "checkpoint_00000002", 2)
        (target / "state.pt").write_bytes(b"torn")
    assert main(["--checkpoint", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --checkpoint") and str(target) in err[0], err
    assert not (tmp_path / "runs" / "r" / "samples").exists()


@pytest.mark.parametrize("location,needle", [
    ("gs://bucket/runs/r", "uses gs://, which distgan does not read or write"),
    ("s3:/bucket/runs/r", "looks like a URI with a slash missing (s3://...)"),
])
def test_a_location_distgan_cannot_read_is_refused_without_touching_storage(cwd, capsys, location, needle):
    assert main(["--checkpoint", location]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --checkpoint: {location!r} {needle}"), err


def test_command_line_error_has_no_traceback(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "distgan.sample", "--checkpoint", str(missing)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: --checkpoint: {missing}: no such checkpoint or run directory"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("evaluated", [False, True])
def test_a_half_written_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, cwd, capsys, evaluated):
    """An upload cut off or a worker killed mid-write: the newest (or best) checkpoint's state.pt is torn, and Ray
    never registered it. sample passes over it as a resume would."""
    names = ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]
    run = write_run(tmp_path / "runs" / "r", names, evals=[(4, 20.0), (6, 10.0)] if evaluated else [])
    torn = run / "checkpoint_00000006" / "state.pt"
    torn.write_bytes(torn.read_bytes()[:1000])
    assert main(["--checkpoint", str(run), "--num-samples", "4", "--output", str(tmp_path / "o.npz")]) == 0
    out, err = capsys.readouterr()
    [warning] = err.strip().splitlines()
    assert warning.startswith(f"WARNING: skipping checkpoint: {torn}: unreadable, truncated or corrupt (")
    used = "checkpoint_00000004"
    assert out.splitlines()[0] == (f"using {used} (best FID 20 among 2 evaluated of 3 checkpoints; 1 invalid skipped)"
                                   if evaluated else f"using {used} (newest of 3 checkpoints; none was evaluated; "
                                                     f"1 invalid skipped)")
    got = np.load(tmp_path / "o.npz")["images"]
    want = generate(load_generator(run / used), 4)
    assert np.array_equal(got, ((want.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_a_run_whose_checkpoints_are_all_invalid_is_one_line_naming_each(tmp_path, cwd, capsys):
    run = write_run(tmp_path / "runs" / "r", ["checkpoint_00000002", "checkpoint_00000004"])
    for name in ("checkpoint_00000002", "checkpoint_00000004"):
        (run / name / "state.pt").write_bytes(b"torn")
    assert main(["--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --checkpoint: {run}: none of its 2 checkpoints is valid: ")
    assert "checkpoint_00000002/state.pt" in err[-1] and "checkpoint_00000004/state.pt" in err[-1]
