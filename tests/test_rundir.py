import json
import os

import pytest

from distgan import storage
from distgan.checkpoint import save_state
from distgan.config import TrainConfig
from distgan.rundir import RANK_METRIC, UNSCORED, RunDir, StopRequest, checkpoint_dir_name, rank_of, resume_tag

from support import plain_state


def _run(tmp_path, steps=(2, 4, 6)) -> RunDir:
    run = RunDir(str(tmp_path), "r")
    for step in steps:
        save_state(plain_state(step), run.checkpoint(step))
    return run


def test_the_newest_valid_checkpoint_is_chosen_past_a_torn_one_with_a_warning(tmp_path):
    run = _run(tmp_path)
    with open(os.path.join(run.checkpoint(6), "state.pt"), "wb") as fh:
        fh.write(b"\x00" * 10)
    logged = []
    found = run.resume_point(log=logged.append)
    assert found.state["step"] == 4 and found.location == run.checkpoint(4)
    assert len(logged) == 1 and "checkpoint_00000006" in logged[0]
    assert run.newest_valid(run.checkpoint_names(), log=lambda m: None).skipped == ["checkpoint_00000006"]


def test_no_valid_checkpoint_is_no_resume_point_and_every_one_is_named(tmp_path):
    run = _run(tmp_path, steps=())
    for step in (2, 4):
        os.makedirs(run.checkpoint(step))
        with open(os.path.join(run.checkpoint(step), "state.pt"), "wb") as fh:
            fh.write(b"junk")
    logged = []
    assert run.resume_point(log=logged.append) is None
    assert ["checkpoint_00000004" in logged[0], "checkpoint_00000002" in logged[1]] == [True, True]


def test_a_resumed_attempts_checkpoint_at_the_same_step_comes_after_the_original(tmp_path):
    run = _run(tmp_path, steps=())
    save_state(plain_state(4, epoch=1), run.checkpoint(4, "resume00000002"))
    save_state(plain_state(4), run.checkpoint(4))  # written later: the order is by name, not by write time
    assert run.checkpoint_names() == ["checkpoint_00000004", "checkpoint_00000004_resume00000002"]
    found = run.resume_point()
    assert found.location.endswith("checkpoint_00000004_resume00000002") and found.state["epoch"] == 1
    assert run.newest_checkpoint() == found.location


def test_a_new_run_has_no_checkpoints_and_no_resume_point(tmp_path):
    run = RunDir(str(tmp_path), "never-ran")
    assert run.checkpoint_names() == [] and run.newest_checkpoint() is None and run.resume_point() is None


def test_first_attempt_names_checkpoints_by_step_only():
    assert resume_tag([], None) == ""
    assert checkpoint_dir_name(62, "") == "checkpoint_00000062"


def test_a_resumed_attempt_tags_its_checkpoints_with_the_resume_step(tmp_path):
    run = _run(tmp_path, steps=(62, 124))
    assert run.checkpoint(93, run.resume_tag(62)) == run.join("checkpoint_00000093_resume00000062")


def test_a_second_attempt_resuming_from_the_same_step_never_reuses_a_name():
    # attempt 2 resumed at 62 and wrote 93 (then its 93 was found bad); attempt 3 resumes at 62 again
    existing = ["checkpoint_00000062", "checkpoint_00000093_resume00000062"]
    third = resume_tag(existing, 62)
    assert checkpoint_dir_name(93, third) not in existing
    fourth = resume_tag(existing + [checkpoint_dir_name(93, third)], 62)
    assert len({"resume00000062", third, fourth}) == 3


@pytest.mark.parametrize("storage_path,expected", [
    ("s3://bucket/prefix/", "s3://bucket/prefix/x/checkpoint_00000006"),
    ("s3://bucket/p?endpoint_override=localhost:9000&scheme=http",
     "s3://bucket/p/x/checkpoint_00000006?endpoint_override=localhost:9000&scheme=http"),
    ("s3://b", "s3://b/x/checkpoint_00000006"),
])
def test_run_paths_under_a_uri(storage_path, expected):
    run = RunDir.of(TrainConfig(storage_path=storage_path, name="x").validate())
    assert run.remote and run.checkpoint(6) == expected
    assert RunDir.at(run.location).location == run.location


def test_run_paths_under_a_local_directory(tmp_path):
    run = RunDir.of(TrainConfig(storage_path=str(tmp_path), name="x").validate())
    assert not run.remote and run.location == str(tmp_path / "x")
    assert run.checkpoint(6) == os.path.join(tmp_path, "x", "checkpoint_00000006")


def test_the_stop_request_is_seen_by_rank_0_only_and_the_stop_note_is_read_once(tmp_path):
    run = RunDir(str(tmp_path), "r")
    rank0, rank1 = StopRequest(run, 0), StopRequest(run, 1)
    assert not rank0()
    run.request_stop()
    rank0.last = 0.0  # past the poll interval
    assert rank0() and not rank1()
    run.clear_stop_request()
    rank0.last = 0.0
    assert not rank0()
    run.write_stop_note("NaN")
    assert run.pop_stop_note() == "NaN" and run.pop_stop_note() is None


def test_fids_come_from_rays_record_then_from_the_metrics_rows(tmp_path):
    run = _run(tmp_path, steps=(2, 4, 6))
    names = run.checkpoint_names()
    storage.write_bytes(run.ray_snapshot, json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": names[0], "metrics": {"fid": 40.0}},
        {"checkpoint_dir_name": names[1], "metrics": {"fid": None}}]}).encode())
    storage.write_bytes(run.join(storage.METRICS_FILE), b'{"kind": "eval", "step": 6, "fid": 12.5}\n')
    assert run.checkpoint_fids(names) == {names[0]: 40.0, names[2]: 12.5}


def test_a_checkpoint_without_a_finite_fid_ranks_worst_but_finite():
    assert rank_of({"fid": 3.5}) == 3.5
    assert rank_of({}) == rank_of({"fid": float("nan")}) == rank_of({"fid": True}) == UNSCORED
    assert RANK_METRIC == "fid_rank"
