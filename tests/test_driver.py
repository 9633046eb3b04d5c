"""The driver (`python -m distgan.train`) before and after Ray: the runtime env it adds to a Ray job's, the run's
newest checkpoint checked against the flags before Ray starts, and the paths it prints."""

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distgan import cluster, driver, runs, train, worker
from distgan.config import RAY_JOB_CONFIG_ENV, ConfigError, TrainConfig
from distgan.rundir import RunDir

# ------------------------------------------------------------------ the runtime env inside `ray job submit`


def _job_environ(env_vars: dict, **extra) -> dict:
    # what Ray's job supervisor gives the driver: the job's env vars in its environment and the job config
    return {**env_vars, RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {"env_vars": env_vars}}), **extra}


def test_outside_a_job_the_driver_forwards_triton_interpret_to_the_workers():
    assert cluster.driver_runtime_env({"TRITON_INTERPRET": "1", "HOME": "/x"}) == {
        "env_vars": {"TRITON_INTERPRET": "1"}}
    assert cluster.driver_runtime_env({"HOME": "/x"}) is None


@pytest.mark.parametrize("job_env", [{"TRITON_INTERPRET": "1"}, {"TRITON_INTERPRET": "0", "OTHER": "x"}])
def test_inside_a_job_the_driver_never_repeats_a_key_of_the_jobs_runtime_env(job_env):
    from ray.runtime_env.runtime_env import _merge_runtime_env

    environ = _job_environ(job_env)
    ours = cluster.driver_runtime_env(environ)
    assert not set((ours or {}).get("env_vars", {})) & set(job_env)
    # what ray.init does with it inside the job: Ray's own merge, which returns None on a repeated key
    job = cluster.job_runtime_env(environ)
    assert _merge_runtime_env(job, ours) is not None
    naive = {"env_vars": {"TRITON_INTERPRET": environ["TRITON_INTERPRET"]}}  # what the driver passed before
    assert _merge_runtime_env(job, naive) is None


def test_inside_a_job_without_the_variable_in_its_runtime_env_the_driver_still_forwards_it():
    environ = _job_environ({"OTHER": "x"}, TRITON_INTERPRET="1")  # e.g. from the head node's environment
    assert cluster.driver_runtime_env(environ) == {"env_vars": {"TRITON_INTERPRET": "1"}}


# ------------------------------------------------------------------ resubmission vs the newest checkpoint


def _checkpoint(run_dir: Path, step: int, g_steps_into_epoch: int, world_size: int = 2, suffix: str = "",
                data: dict | None = None, **cfg) -> Path:
    config = TrainConfig(name=run_dir.name, storage_path=str(run_dir.parent), num_workers=world_size, **cfg)
    d = run_dir / f"checkpoint_{step:08d}{suffix}"
    d.mkdir(parents=True)
    # the keys load_state requires, so that the driver's validation (reconcile_run) passes it on to check_resume
    torch.save({"format": 2, "config": config.to_dict(), "step": step, "epoch": 1,
                "g_steps_into_epoch": g_steps_into_epoch, "world_size": world_size, "generator": {"w": torch.zeros(2)},
                "discriminator": {}, "opt_g": {}, "opt_d": {}, "fixed_noise": torch.zeros(1), "rng": [],
                "lr_scale": 1.0, "rollbacks": 0, **({"data": data} if data else {})},
               d / "state.pt")
    return d


def _cfg(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(storage_path=str(tmp_path), name="x", **overrides).validate()


def _check(tmp_path, storage_path=None, **overrides):
    cfg = _cfg(tmp_path, **overrides)
    runs.check_resume(cfg, RunDir(storage_path or cfg.storage_path, cfg.name).resume_point())


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
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=0, batch_size=32)
    # a resumed attempt's checkpoint at the same step comes after the original (what the workers resume from)
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=5, suffix="_resume00000020")
    torn = tmp_path / "x" / "checkpoint_00000050"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"PK\x03\x04 torn")
    notes = []
    where, state = RunDir(str(tmp_path), "x").resume_point(log=notes.append)
    assert where.endswith("checkpoint_00000030_resume00000020") and state["g_steps_into_epoch"] == 5
    assert len(notes) == 1 and "skipping checkpoint" in notes[0] and "checkpoint_00000050" in notes[0]
    with pytest.raises(ConfigError, match="^--batch-size: .*batch_size=64; this run has 32"):
        _check(tmp_path, batch_size=32)


def test_the_checkpoint_is_read_through_a_uri_as_well(tmp_path):
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=5)
    uri = f"file://{tmp_path}"
    where, _ = RunDir(uri, "x").resume_point()
    assert where.endswith("x/checkpoint_00000030")
    with pytest.raises(ConfigError, match="^--seed: "):
        _check(tmp_path, storage_path=uri, seed=5)


def test_a_new_run_or_unreachable_storage_is_not_refused(tmp_path):
    assert RunDir(str(tmp_path), "never-ran").resume_point() is None
    (tmp_path / "x").mkdir()
    assert RunDir(str(tmp_path), "x").resume_point() is None
    notes = []
    assert RunDir("nosuchscheme://bucket/p", "x").resume_point(log=notes.append) is None
    assert notes and "cannot list" in notes[0]


def test_an_incompatible_resubmission_exits_2_before_ray_starts(tmp_path, monkeypatch, capsys):
    _checkpoint(tmp_path / "x", 30, g_steps_into_epoch=5)

    def no_ray(cfg):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(cluster, "connect_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = train.main(["--storage-path", str(tmp_path), "--name", "x", "--batch-size", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --batch-size: run x was checkpointed mid-epoch")
    assert "batch_size=64" in err and "this run has 32" in err and len(err.splitlines()) == 1


def _image_folder(root: Path, per_class: int = 6) -> Path:
    from PIL import Image

    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 20 * i + c, np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("g_steps_into_epoch", [0, 3])
def test_a_resume_on_changed_data_is_refused_mid_epoch_and_noted_at_an_epoch_boundary(
        tmp_path, monkeypatch, capsys, g_steps_into_epoch):
    from distgan.data import dataset_fingerprint

    images = _image_folder(tmp_path / "images")
    flags = dict(dataset="folder", data_root=str(images), batch_size=4)
    trained_on = dataset_fingerprint(TrainConfig(**flags).validate())
    _checkpoint(tmp_path / "runs" / "x", 6, g_steps_into_epoch=g_steps_into_epoch, data=trained_on, **flags)
    for i in range(2):  # what a user's cleanup does between two submissions
        (images / "a" / f"{i}.png").unlink()
        (images / "b" / f"{i}.png").unlink()

    def stop_at_ray(cfg, *a, **k):
        raise cluster.LaunchError("stopped where Ray would start")

    monkeypatch.setattr(cluster, "connect_ray", stop_at_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = train.main(["--storage-path", str(tmp_path / "runs"), "--name", "x", "--dataset", "folder", "--data-root",
                     str(images), "--batch-size", "4", "--num-workers", "2"])
    out, err = capsys.readouterr()
    if g_steps_into_epoch:
        assert rc == 2 and err.startswith("error: --data-root: run x was checkpointed mid-epoch (epoch 1, G step 3; ")
        assert f"on other data than {images} holds now (12 training images then, 8 now)" in err
        assert len(err.strip().splitlines()) == 1
    else:
        assert err.strip() == "error: stopped where Ray would start"  # it went on, up to starting Ray
        assert f"note: run x: the data in {images} changed since" in out and "(12 training images then, 8 now)" in out


def test_a_resume_on_the_same_data_or_from_a_checkpoint_without_a_fingerprint_is_not_refused(tmp_path):
    from distgan.data import dataset_fingerprint

    images = _image_folder(tmp_path / "images")
    cfg = TrainConfig(dataset="folder", data_root=str(images), storage_path=str(tmp_path), name="x").validate()
    now = dataset_fingerprint(cfg)
    notes = []
    for data in (None, now):
        shutil.rmtree(tmp_path / "x", ignore_errors=True)
        _checkpoint(tmp_path / "x", 6, g_steps_into_epoch=3, data=data, dataset="folder", data_root=str(images))
        runs.check_same_data(cfg, RunDir(str(tmp_path), "x").resume_point(), now, log=notes.append)
    (images / "a" / "0.png").write_bytes((images / "a" / "1.png").read_bytes())  # same count, other contents
    with pytest.raises(ConfigError, match="12 training images then and now, but other files or contents"):
        runs.check_same_data(cfg, RunDir(str(tmp_path), "x").resume_point(), dataset_fingerprint(cfg))
    assert notes == []


def test_a_local_run_asking_for_a_gpu_the_machine_lacks_exits_2_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cluster, "connect_ray", lambda cfg: pytest.fail("Ray must not start"))
    monkeypatch.setattr(cluster, "local_gpu_count", lambda: 0)
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
    monkeypatch.setattr(cluster, "connect_ray", lambda cfg: fake_ray)
    monkeypatch.setattr(cluster, "wait_for_placement", lambda cfg, use_gpu: None)
    monkeypatch.setattr(train, "build_trainer",
                        lambda cfg, use_gpu, score_fid, **kw: SimpleNamespace(fit=lambda: result))
    monkeypatch.setattr(runs, "reconcile_run", lambda cfg: None)  # no S3 here
    monkeypatch.setattr(RunDir, "pop_stop_note", lambda self: None)
    monkeypatch.setattr(driver.StopOnInterrupt, "clear", lambda self: None)  # would wait out S3 region lookups
    monkeypatch.setattr(runs, "RunClaim", lambda cfg: contextlib.nullcontext())  # likewise
    monkeypatch.setattr(cluster, "check_ray_address", lambda: None)  # no cluster: connect_ray is replaced
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    summary = train.run(cfg)
    assert summary["run_dir"] == "s3://bucket/prefix/x"
    assert summary["checkpoint"] == "s3://bucket/prefix/x/checkpoint_00000006"
    assert summary["best_checkpoint"] == "s3://bucket/prefix/x/checkpoint_00000003" and summary["best_fid"] == 40.0
    assert summary["samples"] == "s3://bucket/prefix/x/samples"
    assert summary["metrics_jsonl"] == "s3://bucket/prefix/x/metrics.jsonl"


# ------------------------------------------------------------------ through a real `ray job submit`


# ------------------------------------------------------------------ RAY_ADDRESS values a driver cannot join


@pytest.mark.parametrize("address,needle", [
    ("http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard (Jobs API) address, which only "
                              "`ray job submit --address` reads; a driver joins at the cluster's GCS address"),
    ("127.0.0.1:{port}", "RAY_ADDRESS=127.0.0.1:{port}: nothing answers there (Connection refused); start the "
                         "cluster (`ray start --head`)"),
    ("head-node", "RAY_ADDRESS=head-node is not host:port"),
    ("ray://127.0.0.1:{port}", "RAY_ADDRESS=ray://127.0.0.1:{port}: nothing answers there (Connection refused)"),
])
def test_a_ray_address_the_driver_cannot_join_is_one_line_exit_2(tmp_path, address, needle):
    """Through the command line: ray.init would print a list of fixes without the address (dashboard URL) or retry
    silently for minutes (nothing listening); the timeout is what the old behaviour hit."""
    import subprocess
    import sys

    from ray_local import free_port

    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": address.format(port=port), "PYTHONPATH": str(Path(train.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "distgan.train", "--storage-path", str(tmp_path), "--max-steps", "1"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith(f"error: {needle.format(port=port)}") and "\n" not in err, err
    assert not (tmp_path.exists() and any(tmp_path.iterdir()))  # refused before anything was written


def test_ray_address_auto_with_a_killed_clusters_address_left_behind_is_one_line_within_seconds(tmp_path):
    """`ray start --head` killed rather than stopped leaves its address in Ray's ray_current_cluster file, which
    `auto` reads first: ray.init retried that dead address for minutes."""
    import subprocess
    import sys

    from ray_local import free_port

    port = free_port()
    ray_tmp = tmp_path / "raytmp"
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    env = {**os.environ, "RAY_ADDRESS": "auto", "RAY_TMPDIR": str(ray_tmp),
           "PYTHONPATH": str(Path(train.__file__).parents[1])}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distgan.train", "--storage-path", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - started < 30, proc.stderr
    assert proc.stderr.strip() == (
        f"error: RAY_ADDRESS=auto (resolved to 127.0.0.1:{port}, from the address `ray start` recorded in "
        f"{ray_tmp}/ray/ray_current_cluster): nothing answers there (Connection refused) (a cluster that was killed "
        f"rather than stopped leaves its address behind); start the cluster (`ray start --head`), correct the "
        f"address (`ray status` on the head node prints it), or unset RAY_ADDRESS for a local run on this machine")
    assert not (tmp_path / "runs").exists()


def test_ray_address_auto_with_no_cluster_on_the_machine_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from ray._private import services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no address file
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: set())  # and no GCS process, whatever else runs
    rc = train.main(["--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: RAY_ADDRESS=auto: no Ray cluster runs on this machine") and \
        "unset RAY_ADDRESS for a local run" in err and "\n" not in err


# ------------------------------------------------------------------ one live driver per run


def _claim(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / runs.CLAIM_FILE
    path.write_text(json.dumps({"token": "other", "started": time.time(), "heartbeat": time.time(), **fields}))
    return path


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_driver_on_a_live_run_is_refused_naming_the_run_and_the_holder(tmp_path, monkeypatch, capsys):
    import socket

    monkeypatch.setattr(cluster, "connect_ray", lambda cfg: pytest.fail("Ray must not start"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    me = {"host": socket.gethostname(), "boot_id": runs._boot_id(), "pid": os.getpid(),
          "pid_start": runs._process_start(os.getpid())}
    claim = _claim(tmp_path / "x", **me)  # this test's process stands for the live driver
    assert train.main(["--storage-path", str(tmp_path), "--name", "x", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run x is in use by another driver (pid {os.getpid()} on {me['host']}, since ")
    assert f"claim {claim})" in err and "\n" not in err
    assert json.loads(claim.read_text())["token"] == "other"  # untouched
    # a driver on another host that rewrote its claim a minute ago is live as well
    _claim(tmp_path / "y", host="elsewhere", pid=1, heartbeat=time.time() - 60)
    with pytest.raises(runs.LaunchError, match="^run y is in use by another driver .pid 1 on elsewhere"):
        runs.RunClaim(TrainConfig(storage_path=str(tmp_path), name="y").validate()).acquire()


def test_a_run_refused_after_its_claim_leaves_no_empty_directory_and_keeps_an_existing_one(tmp_path, monkeypatch,
                                                                                            capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(train.cluster, "local_gpu_count", lambda: 0)  # what this check needs: a machine without
    fresh = tmp_path / "new" / "runs"  # neither directory exists yet
    assert train.main(["--storage-path", str(fresh), "--name", "x", "--use-gpu"]) == 2
    assert "--use-gpu: this machine has no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # a run directory that was there before is left as it was, claim gone, contents kept
    kept = tmp_path / "old" / "x"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    for where in ("old", "empty"):
        assert train.main(["--storage-path", str(tmp_path / where), "--name", "x", "--use-gpu"]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    assert (tmp_path / "empty" / "x").is_dir()


@pytest.mark.parametrize("holder", ["dead-pid", "pid-reused", "silent-host", "torn"])
def test_a_dead_drivers_claim_does_not_block_a_resume(tmp_path, holder):
    import socket

    here = {"host": socket.gethostname(), "boot_id": runs._boot_id()}
    if holder == "dead-pid":  # Ctrl-C twice, SIGKILL, a crashed machine: the pid is gone
        _claim(tmp_path / "x", **here, pid=_dead_pid(), pid_start="1")
    elif holder == "pid-reused":  # the pid now belongs to another process, started later
        _claim(tmp_path / "x", **here, pid=os.getpid(), pid_start="1")
    elif holder == "silent-host":  # another host's driver stopped rewriting its claim
        _claim(tmp_path / "x", host="elsewhere", pid=1, heartbeat=time.time() - runs.CLAIM_STALE_S - 1)
    else:
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / runs.CLAIM_FILE).write_text('{"tok')
    cfg = TrainConfig(storage_path=str(tmp_path), name="x").validate()
    claim = runs.RunClaim(cfg).acquire()
    try:
        assert json.loads((tmp_path / "x" / runs.CLAIM_FILE).read_text())["token"] == claim.mine["token"]
        with pytest.raises(runs.LaunchError, match="^run x is in use by another driver"):  # and it is held now
            runs.RunClaim(cfg).acquire()
    finally:
        claim.release()
    assert not (tmp_path / "x" / runs.CLAIM_FILE).exists()


def test_a_claim_in_a_bucket_is_taken_over_only_when_stale(s3_endpoint, monkeypatch):
    import pyarrow.fs

    from conftest import use_s3

    s3 = use_s3(monkeypatch, s3_endpoint, "claims")

    def put(name, heartbeat):
        with s3.open_output_stream(f"claims/runs/{name}/{runs.CLAIM_FILE}") as fh:
            fh.write(json.dumps({"token": "other", "host": "elsewhere", "pid": 7, "started": heartbeat,
                                 "heartbeat": heartbeat}).encode())

    put("live", time.time())
    with pytest.raises(runs.LaunchError, match="^run live is in use by another driver .pid 7 on elsewhere"):
        runs.RunClaim(TrainConfig(storage_path="s3://claims/runs", name="live").validate()).acquire()
    put("stale", time.time() - runs.CLAIM_STALE_S - 1)
    claim = runs.RunClaim(TrainConfig(storage_path="s3://claims/runs", name="stale").validate()).acquire()
    with s3.open_input_stream(f"claims/runs/stale/{runs.CLAIM_FILE}") as fh:
        assert json.loads(fh.read())["token"] == claim.mine["token"]
    claim.release()
    assert s3.get_file_info(f"claims/runs/stale/{runs.CLAIM_FILE}").type == pyarrow.fs.FileType.NotFound


# ------------------------------------------------------------------ Ray's record of the run vs the run directory


def _ray_manager(storage: Path, name: str, num_to_keep: int = 3):
    """Ray Train's own checkpoint manager, loading the run's record as the controller does when the run starts."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    from distgan.rundir import RANK_METRIC

    config = CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute=RANK_METRIC,
                              checkpoint_score_order="min")
    return CheckpointManager(config, StorageContext(str(storage), experiment_dir_name=name))


def _record(run: Path, names: list[str], metrics: dict[str, dict], latest: str) -> None:
    """A checkpoint_manager_snapshot.json as Ray Train 2.60 writes it."""
    import ray

    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": metrics[n]} for n in names]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": ray.__version__, "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[names.index(latest)], "pending_training_results": [],
        "pending_validation_specs": [], "current_report_index": len(names), "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))


def _run_with(tmp_path, steps: list[int]) -> Path:
    from support import make_checkpoint

    run = tmp_path / "sample-test"
    for step in steps:
        make_checkpoint(run / f"checkpoint_{step:08d}", step)
    return run


def test_a_deleted_latest_checkpoint_resumes_from_the_newest_that_exists(tmp_path):
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    run = _run_with(tmp_path, [2, 4])
    names = ["checkpoint_00000002", "checkpoint_00000004"]
    _record(run, names, {n: {"step": int(n[-2:])} for n in names}, latest="checkpoint_00000004")
    shutil.rmtree(run / "checkpoint_00000004")  # a person, a lifecycle rule, a lost disk
    with pytest.raises(CheckpointManagerInitializationError, match="does not exist anymore"):
        _ray_manager(tmp_path, run.name)  # what Ray does with the record as it is
    notes = []
    cfg = TrainConfig(storage_path=str(tmp_path), name=run.name).validate()
    where, state = runs.reconcile_run(cfg, log=notes.append)
    assert where == str(run / "checkpoint_00000002") and state["step"] == 2
    assert notes == [f"run {run.name}: resuming from checkpoint_00000002, the newest checkpoint that exists and "
                     f"validates (Ray's latest, checkpoint_00000004, is missing)"]
    manager = _ray_manager(tmp_path, run.name)
    assert Path(manager.latest_checkpoint_result.checkpoint.path).name == "checkpoint_00000002"
    assert runs.reconcile_run(cfg, log=notes.append)[0] == where and len(notes) == 1  # agreed now: no rewrite


def test_checkpoints_ray_never_registered_are_resumed_and_torn_ones_skipped(tmp_path):
    """A run that ended before Ray registered its last checkpoint (registration is asynchronous), one whose
    newest is torn, and one whose record is gone: each resumes from its newest valid checkpoint."""
    run = _run_with(tmp_path, [2, 4, 6])
    _record(run, ["checkpoint_00000002"], {"checkpoint_00000002": {"step": 2}}, latest="checkpoint_00000002")
    torn = run / "checkpoint_00000006" / "state.pt"
    torn.write_bytes(torn.read_bytes()[:500])
    notes = []
    cfg = TrainConfig(storage_path=str(tmp_path), name=run.name).validate()
    where, _ = runs.reconcile_run(cfg, log=notes.append)
    assert where == str(run / "checkpoint_00000004")
    assert notes[0].startswith(f"WARNING: skipping checkpoint: {torn}: unreadable, truncated or corrupt")
    assert notes[1].endswith("(Ray had not registered it (its latest was checkpoint_00000002))")
    manager = _ray_manager(tmp_path, run.name)
    assert Path(manager.latest_checkpoint_result.checkpoint.path).name == "checkpoint_00000004"

    (run / "checkpoint_manager_snapshot.json").unlink()
    notes.clear()
    assert runs.reconcile_run(cfg, log=notes.append)[0] == where
    assert "Ray's record of the run was missing or torn; rebuilt it from the run directory" in notes[-1]
    assert Path(_ray_manager(tmp_path, run.name).latest_checkpoint_result.checkpoint.path).name == \
        "checkpoint_00000004"


def test_a_run_whose_checkpoints_are_all_gone_or_invalid_is_never_restarted_from_step_0(tmp_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.setattr(cluster, "connect_ray", lambda cfg: pytest.fail("Ray must not start"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = _run_with(tmp_path, [2])
    (run / "checkpoint_00000002" / "state.pt").write_bytes(b"torn")
    assert train.main(["--storage-path", str(tmp_path), "--name", run.name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: run {run.name}: none of its 1 checkpoints validates; a run is not started again "
                       f"from step 0 under its name: restore a checkpoint, or train under another --name")
    shutil.rmtree(run / "checkpoint_00000002")
    _record(run, ["checkpoint_00000002"], {"checkpoint_00000002": {"step": 2}}, latest="checkpoint_00000002")
    assert train.main(["--storage-path", str(tmp_path), "--name", run.name]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"error: run {run.name}: Ray's record names checkpoint_00000002, and none of them is in {run}")


def test_every_checkpoint_score_survives_the_records_json_and_unscored_ones_rank_worst(tmp_path):
    """Records written before: evaluation off (no fid: Ray ranks a missing score best in "min" order) and step
    checkpoints reported with fid inf (written as null: Ray's ranking fails on None when the run resumes)."""
    from ray.train._checkpoint import Checkpoint
    from ray.train._internal.session import _TrainingResult

    from distgan.rundir import RANK_METRIC, UNSCORED

    run = _run_with(tmp_path, [2, 4, 6, 8])
    names = [f"checkpoint_{s:08d}" for s in (2, 4, 6, 8)]
    metrics = {names[0]: {"step": 2}, names[1]: {"step": 4, "fid": None}, names[2]: {"step": 6, "fid": 30.5},
               names[3]: {"step": 8, "fid": None}}
    _record(run, names, metrics, latest=names[3])
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 4, "fid": 40.0}) + "\n")
    with pytest.raises(TypeError, match="NoneType"):  # what the old record does to Ray's ranking
        _ray_manager(tmp_path, run.name)._get_checkpoint_score(
            _TrainingResult(checkpoint=None, metrics={**metrics[names[1]], RANK_METRIC: None}))
    cfg = TrainConfig(storage_path=str(tmp_path), name=run.name).validate()
    where, _ = runs.reconcile_run(cfg, log=lambda m: None)
    assert where.endswith(names[3])
    record = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    ranks = {r["checkpoint_dir_name"]: r["metrics"][RANK_METRIC] for r in record["checkpoint_results"]}
    assert ranks == {names[0]: UNSCORED, names[1]: 40.0, names[2]: 30.5, names[3]: UNSCORED}
    # Ray's order: worst first (unscored, oldest first), best last
    assert [r["checkpoint_dir_name"] for r in record["checkpoint_results"]] == [names[0], names[3], names[1], names[2]]
    manager = _ray_manager(tmp_path, run.name, num_to_keep=2)
    new = _TrainingResult(checkpoint=Checkpoint(str(run / names[3])), metrics={RANK_METRIC: 12.0})
    assert all(manager._get_checkpoint_score(r) < manager._get_checkpoint_score(new)
               for r in manager._checkpoint_results)
    assert manager.best_checkpoint_result.metrics[RANK_METRIC] == 30.5


def test_the_progress_bar_updates_a_log_now_and_then_and_a_terminal_every_second(tmp_path):
    """A terminal redraws the bar in place; a log (`ray job submit`, a redirect) keeps every update."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert worker.progress_every_s(Terminal()) == 1.0
    assert worker.progress_every_s(io.StringIO()) == 30.0
    cfg = TrainConfig(storage_path=str(tmp_path), name="p", num_workers=2, cpus_per_worker=1).validate()
    loop_config = train.build_trainer(cfg, use_gpu=False, score_fid=False).train_loop_config
    assert loop_config["progress_every_s"] == worker.progress_every_s()  # what rank 0's tqdm_ray is given
