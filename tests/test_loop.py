"""The Ray adapter's own logic, without Ray: checkpoint names are never reused across resumed attempts."""

from distgan.loop import checkpoint_dir_name, resume_tag


def test_first_attempt_names_checkpoints_by_step_only():
    assert resume_tag([], None) == ""
    assert checkpoint_dir_name(62, "") == "checkpoint_00000062"


def test_a_resumed_attempt_tags_its_checkpoints_with_the_resume_step():
    tag = resume_tag(["checkpoint_00000062", "checkpoint_00000124"], 62)
    assert checkpoint_dir_name(93, tag) == "checkpoint_00000093_resume00000062"


def test_a_second_attempt_resuming_from_the_same_step_never_reuses_a_name():
    # attempt 2 resumed at 62 and wrote 93 (then its 93 was found bad); attempt 3 resumes at 62 again
    existing = ["checkpoint_00000062", "checkpoint_00000093_resume00000062"]
    third = resume_tag(existing, 62)
    assert checkpoint_dir_name(93, third) not in existing
    fourth = resume_tag(existing + [checkpoint_dir_name(93, third)], 62)
    assert len({"resume00000062", third, fourth}) == 3
