"""The driver (`python -m distgan.train`) before and after Ray: the runtime env it adds to a Ray job's, the run's
newest checkpoint checked against the flags before Ray starts, and the paths it prints."""

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distgan import storage, train
from distgan.checkpoint import newest_checkpoint_state
from distgan.config import RAY_JOB_CONFIG_ENV, ConfigError, TrainConfig

# ------------------------------------------------------------------ the runtime env inside `ray job submit`


def _job_environ(env_vars: dict, **extra) -> dict:
    # what Ray's job supervisor gives the driver: the job's env vars in its environment and the job config
    return {**env_vars, RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {"env_vars": env_vars}}), **extra}


def test_outside_a_job_the_driver_forwards_triton_interpret_to_the_workers():
    assert train.driver_runtime_env({"TRITON_INTERPRET": "1", "HOME": "/x"}) == {
        "env_vars": {"TRITON_INTERPRET": "1"}}
    assert train.driver_runtime_env({"HOME": "/x"}) is None


@pytest.mark.parametrize("job_env", [{"TRITON_INTERPRET": "1"}, {"TRITON_INTERPRET": "0", "OTHER": "x"}])
def test_inside_a_job_the_driver_never_repeats_a_key_of_the_jobs_runtime_env(job_env):
    from ray.runtime_env.runtime_env import _merge_runtime_env

    environ = _job_environ(job_env)
    ours = train.driver_runtime_env(environ)
    assert not set((ours or {}).get("env_vars", {})) & set(job_env)
    # what ray.init does with it inside the job: Ray's own merge, which returns None on a repeated key
    job = train.job_runtime_env(environ)
    assert _merge_runtime_env(job, ours) is not None
    naive = {"env_vars": {"TRITON_INTERPRET": environ["TRITON_INTERPRET"]}}  # what the driver passed before
    assert _merge_runtime_env(job, naive) is None


def test_inside_a_job_without_the_variable_in_its_runtime_env_the_driver_still_forwards_it():
    environ = _job_environ({"OTHER": "x"}, TRITON_INTERPRET="1")  # e.g. from the head node's environment
    assert train.driver_runtime_env(environ) == {"env_vars": {"TRITON_INTERPRET": "1"}}


# ------------------------------------------------------------------ resubmission vs the newest checkpoint


def _checkpoint(run_dir: Path, step: int, g_steps_into_epoch: int, world_size: int = 2, suffix: str = "",
                **cfg) -> Path:
    config = TrainConfig(name=run_dir.name, storage_path=str(run_dir.parent), num_workers=world_size, **cfg)
    d = run_dir / f"checkpoint_{step:08d}{suffix}"
    d.mkdir(parents=True)
    torch.save({"format": 2, "config": config.to_dict(), "step": step, "epoch": 1,
                "g_steps_into_epoch": g_steps_into_epoch, "world_size": world_size, "generator": {"w": torch.zeros(2)}},
               d / "state.pt")
    return d


def _cfg(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(storage_path=str(tmp_path), name="x", **overrides).validate()


def _check(tmp_path, storage_path=None, **overrides):
    cfg = _cfg(tmp_path, **overrides)
    train.check_resume(cfg, newest_checkpoint_state(storage_path or cfg.storage_path, cfg.name))


@pytest.mark.parametrize("flag,field,saved,now", [
    ("--batch-size", "batch_size", 64, 32),
    ("--seed", "seed", 0, 1),
    ("--n-critic", "n_critic", 1, 2),
    ("--num-workers", "num_workers", 2, 4),
])
def test_changing_what_the_data_position_means_mid_epoch_is_refused_naming_the_flag_and_both_values(
        tmp_path, flag, field, saved, now):
    before = {"batch_size": 64, "seed": 0, "n_critic": 1}
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=5, world_size=saved if field == "num_workers" else 2,
                **{k: (saved if k == field else v) for k, v in before.items()})
    overrides = {field: now, **({"batch_size": 64} if field == "num_workers" else {})}
    with pytest.raises(ConfigError) as e:
        _check(tmp_path, **overrides)
    msg = str(e.value)
    assert msg.startswith(f"{flag}: run x was checkpointed mid-epoch") and "\n" not in msg
    assert f"{field}={saved}" in msg and f"this run has {now}" in msg


@pytest.mark.parametrize("overrides", [dict(batch_size=32), dict(seed=1), dict(n_critic=2), dict(num_workers=4)])
def test_at_an_epoch_boundary_they_may_change(tmp_path, overrides):
    _checkpoint(tmp_path / "x", 62, g_steps_into_epoch=0)
    _check(tmp_path, **overrides)


@pytest.mark.parametrize("g_steps_into_epoch", [0, 5])
@pytest.mark.parametrize("flag,overrides", [
    ("--z-dim", dict(z_dim=64)),
    ("--image-size", dict(image_size=32)),
    ("--dataset", dict(dataset="mnist", data_root="/tmp")),
])
def test_model_shape_changes_are_refused_at_any_position(tmp_path, g_steps_into_epoch, flag, overrides):
    _checkpoint(tmp_path / "x", 62, g_steps_into_epoch=g_steps_into_epoch)
    with pytest.raises(ConfigError, match=f"^{flag}: run x was checkpointed with"):
        _check(tmp_path, **overrides)


def test_channels_compare_by_their_effective_value(tmp_path):
    _checkpoint(tmp_path / "x", 62, g_steps_into_epoch=0)  # channels=None on mnist5k: 1
    _check(tmp_path, channels=1)


def test_the_newest_checkpoint_decides_and_unreadable_ones_are_skipped(tmp_path):
    _checkpoint(tmp_path / "x", 40, g_steps_into_epoch=0, batch_size=32)
    time.sleep(0.01)
    # written later by a resumed attempt that fell back to step 20: its step is lower, it is still the newest
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=5, suffix="_resume00000020")
    time.sleep(0.01)
    torn = tmp_path / "x" / "checkpoint_00000050"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"PK\x03\x04 torn")
    where, state = newest_checkpoint_state(str(tmp_path), "x")
    assert where.endswith("checkpoint_00000030_resume00000020") and state["g_steps_into_epoch"] == 5
    with pytest.raises(ConfigError, match="^--batch-size: .*batch_size=64; this run has 32"):
        _check(tmp_path, batch_size=32)


def test_the_checkpoint_is_read_through_a_uri_as_well(tmp_path):
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=5)
    uri = f"file://{tmp_path}"
    where, _ = newest_checkpoint_state(uri, "x")
    assert where.endswith("x/checkpoint_00000030")
    with pytest.raises(ConfigError, match="^--seed: "):
        _check(tmp_path, storage_path=uri, seed=5)


def test_a_new_run_or_unreachable_storage_is_not_refused(tmp_path):
    assert newest_checkpoint_state(str(tmp_path), "never-ran") is None
    (tmp_path / "x").mkdir()
    assert newest_checkpoint_state(str(tmp_path), "x") is None
    notes = []
    assert newest_checkpoint_state("nosuchscheme://bucket/p", "x", log=notes.append) is None
    assert notes and "cannot list" in notes[0]


def test_an_incompatible_resubmission_exits_2_before_ray_starts(tmp_path, monkeypatch, capsys):
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=5)

    def no_ray(cfg):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(train, "connect_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = train.main(["--storage-path", str(tmp_path), "--name", "x", "--batch-size", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --batch-size: run x was checkpointed mid-epoch")
    assert "batch_size=64" in err and "this run has 32" in err and len(err.splitlines()) == 1


def test_a_local_run_asking_for_a_gpu_the_machine_lacks_exits_2_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "connect_ray", lambda cfg: pytest.fail("Ray must not start"))
    monkeypatch.setattr(train, "local_gpu_count", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert train.main(["--storage-path", str(tmp_path), "--use-gpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --use-gpu: this machine has no CUDA GPU")
    assert train.main(["--storage-path", str(tmp_path), "--precision", "fp16"]) == 2
    assert capsys.readouterr().err.startswith("error: --precision: fp16 is CUDA only")


# ------------------------------------------------------------------ the printed summary keeps the URI scheme


def test_summary_paths_keep_the_storage_uri_scheme(monkeypatch):
    cfg = TrainConfig(storage_path="s3://bucket/prefix", name="x").validate()
    result = SimpleNamespace(
        path="bucket/prefix/x",  # what Ray's Result gives: the scheme is gone
        checkpoint=SimpleNamespace(path="bucket/prefix/x/checkpoint_00000006"),
        best_checkpoints=[(SimpleNamespace(path="bucket/prefix/x/checkpoint_00000003"), {"fid": 40.0}),
                          (SimpleNamespace(path="bucket/prefix/x/checkpoint_00000006"), {"fid": 50.0})],
        metrics={"step": 6})
    fake_ray = SimpleNamespace(cluster_resources=lambda: {"CPU": 2}, shutdown=lambda: None,
                               nodes=lambda: [{"Alive": True, "Resources": {"CPU": 2}}])
    monkeypatch.setattr(train, "connect_ray", lambda cfg: fake_ray)
    monkeypatch.setattr(train, "wait_for_placement", lambda cfg, use_gpu: None)
    monkeypatch.setattr(train, "build_trainer", lambda cfg, use_gpu, score_fid: SimpleNamespace(fit=lambda: result))
    monkeypatch.setattr("distgan.checkpoint.newest_checkpoint_state", lambda *a, **k: None)  # no S3 here
    monkeypatch.setattr(train, "stop_reason", lambda cfg: None)
    monkeypatch.setattr(train.StopOnInterrupt, "clear", lambda self: None)  # would wait out S3 region lookups
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    summary = train.run(cfg)
    assert summary["run_dir"] == "s3://bucket/prefix/x"
    assert summary["checkpoint"] == "s3://bucket/prefix/x/checkpoint_00000006"
    assert summary["best_checkpoint"] == "s3://bucket/prefix/x/checkpoint_00000003" and summary["best_fid"] == 40.0
    assert summary["samples"] == "s3://bucket/prefix/x/samples"
    assert summary["metrics_jsonl"] == "s3://bucket/prefix/x/metrics.jsonl"


@pytest.mark.parametrize("storage_path,expected", [
    ("s3://bucket/prefix/", "s3://bucket/prefix/x/checkpoint_00000006"),
    ("s3://bucket/p?endpoint_override=localhost:9000&scheme=http",
     "s3://bucket/p/x/checkpoint_00000006?endpoint_override=localhost:9000&scheme=http"),
    ("gs://b", "gs://b/x/checkpoint_00000006"),
])
def test_run_paths_under_a_uri(storage_path, expected):
    cfg = TrainConfig(storage_path=storage_path, name="x").validate()
    assert storage.join(cfg.run_dir, "checkpoint_00000006") == expected


def test_run_paths_under_a_local_directory(tmp_path):
    cfg = TrainConfig(storage_path=str(tmp_path), name="x").validate()
    assert cfg.run_dir == str(tmp_path / "x")
    assert storage.join(cfg.run_dir, "checkpoint_00000006") == os.path.join(tmp_path, "x", "checkpoint_00000006")


# ------------------------------------------------------------------ through a real `ray job submit`
