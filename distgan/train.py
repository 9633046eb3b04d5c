"""`python -m distgan.train`: parse the config, check it, start (or join) Ray, run the TorchTrainer.

Joins the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local one sized to this machine.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import PurePosixPath
from typing import Any, Mapping, Optional

from distgan import storage
from distgan.config import (
    MAX_FAILURES_CLUSTER,
    MAX_FAILURES_LOCAL,
    RAY_JOB_CONFIG_ENV,
    ConfigError,
    TrainConfig,
    check_execution,
    check_schedule,
    config_from_dict,
    parse_args,
)

# Forwarded to the workers through the train-loop config (not the job's runtime env, which the dashboard
# shows): W&B settings that are not secrets, and the test hooks. WANDB_API_KEY is never forwarded.
FORWARDED_ENV_PREFIXES = ("DISTGAN_TEST_", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_BASE_URL",
                          "WANDB_INIT_TIMEOUT", "WANDB_SILENT")
# TRITON_INTERPRET must be in a worker's environment before `kernels` is imported, so it travels in the
# runtime env (it is not a secret).
RUNTIME_ENV_VARS = ("TRITON_INTERPRET",)


class LaunchError(RuntimeError):
    pass


def _forwarded_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k != "WANDB_API_KEY"}
    if env.get("WANDB_DIR"):  # rank 0 runs in a working directory Ray Train chooses: resolve against the user's
        env["WANDB_DIR"] = os.path.abspath(os.path.expanduser(env["WANDB_DIR"]))
    return env


def job_runtime_env(environ: Mapping[str, str] = os.environ) -> Optional[dict[str, Any]]:
    """The runtime env of the `ray job submit` this driver runs in, or None outside a job."""
    raw = environ.get(RAY_JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def driver_runtime_env(environ: Mapping[str, str] = os.environ) -> Optional[dict[str, Any]]:
    """What the driver adds to the workers' runtime env: RUNTIME_ENV_VARS from its environment, except those
    the job's runtime env already sets. Ray refuses to merge a ray.init runtime env that repeats a key of the
    job's (and the job's reaches the workers anyway; the driver's environment holds the same values)."""
    job_vars = (job_runtime_env(environ) or {}).get("env_vars") or {}
    env_vars = {k: environ[k] for k in RUNTIME_ENV_VARS if k in environ and k not in job_vars}
    return {"env_vars": env_vars} if env_vars else None


def default_max_failures(environ: Mapping[str, str] = os.environ) -> int:
    return MAX_FAILURES_CLUSTER if environ.get("RAY_ADDRESS") else MAX_FAILURES_LOCAL


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dashboard_available() -> bool:
    """Whether Ray's dashboard can start in this environment: Ray's own test, an import of the packages it needs
    (aiohttp, aiohttp_cors, grpc, opencensus, opentelemetry, prometheus_client, pydantic; `ray[default]`).
    A minimal Ray (an offline GPU image's) lacks them, and ray.init(include_dashboard=True) then refuses to
    start, so a local run starts Ray without the dashboard there."""
    try:
        importlib.import_module("ray.dashboard.optional_deps")
    except ImportError:
        return False
    return True


def connect_ray(cfg: TrainConfig, extra_cpus: int = 0):
    """Joins RAY_ADDRESS or starts a local instance with this machine's CPUs (+ `extra_cpus` logical ones, for
    processes that only wait, like distgan.tune's trial drivers)."""
    import ray

    runtime_env = driver_runtime_env() or {}
    env_vars = runtime_env.setdefault("env_vars", {})
    job_vars = (job_runtime_env() or {}).get("env_vars") or {}
    # Ray's own chatter stays at warning level unless --verbose; the workers' output (progress bar, evaluation
    # lines, warnings) still reaches this terminal.
    quiet = {} if cfg.verbose else {"logging_level": logging.WARNING}
    # Ray Train's worker print() patch sends each print through a logger as well as stdout (every line twice)
    # and drops it below the log level; plain prints are what the workers mean. Ray propagates this variable
    # from the driver to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's placement-group cleaner (an actor) polls Ray's State API, whose address it discovers from
    # its environment; with two Ray instances on one machine, discovery fails and it logs an error every few
    # seconds. So the run's actors are told which instance is theirs.
    if os.environ.get("RAY_ADDRESS"):
        if "RAY_ADDRESS" not in job_vars:
            env_vars["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
        ray.init(runtime_env=runtime_env, log_to_driver=True, **quiet)
    else:
        # The dashboard process serves the State API (without it every poll logs "State API may be temporarily
        # unavailable"); loopback only. address="local": a new instance of our own, where a bare ray.init()
        # would join any instance that `ray start` left on this machine (and then refuse num_cpus).
        port, dashboard = _free_port(), dashboard_available()
        if dashboard:
            env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # Ray Train's preemption watcher is for cloud nodes; on this machine it only logs a core_worker error.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.num_workers or 1) + extra_cpus,
                 runtime_env=runtime_env,
                 include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port, **quiet)
    return ray


class StopOnInterrupt:
    """The first Ctrl-C asks the workers to stop at the next step boundary and write a checkpoint (a note in the
    run directory that rank 0 polls); a second one stops at once (KeyboardInterrupt)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.requested, self.previous = cfg, False, None

    def _request(self) -> str:
        from distgan.loop import STOP_REQUEST_FILE

        return storage.join(self.cfg.storage_path, self.cfg.name, STOP_REQUEST_FILE)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        try:
            storage.write_bytes(self._request(), b"stop")
        except OSError as e:  # storage unreachable: the workers cannot hear us, only a hard stop is left
            print(f"\ninterrupt: cannot leave the stop request in the run directory ({e}); Ctrl-C again to stop "
                  f"at once", file=sys.stderr, flush=True)
            return
        print("\ninterrupt: the workers stop at the next step and write a checkpoint; Ctrl-C again to stop at once",
              file=sys.stderr, flush=True)

    def clear(self) -> None:
        """Removes a request left by an earlier submission (or this one, once served)."""
        try:
            storage.delete(self._request())
        except OSError:  # unreachable storage: the driver's other reads say so; a stale request cannot be read
            pass

    def __enter__(self) -> "StopOnInterrupt":
        self.clear()
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)
        self.clear()


def fit_in_thread(trainer):
    """`trainer.fit()` off the main thread. Ray Train's fit() installs its own SIGINT handler (abort the run)
    only when called on the main thread; running it on another keeps StopOnInterrupt's graceful stop."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: the main thread must stay free to run the SIGINT handler
    if "error" in box:
        raise box["error"]
    return box["result"]


def resume_command(cfg: TrainConfig, argv: list[str]) -> str:
    """The command that continues this run: the same flags, with --storage-path and --name made explicit."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--name", "--storage-path"):
            skip = True
            continue
        if arg.startswith(("--name=", "--storage-path=")):
            continue
        args.append(arg)
    return shlex.join(["python", "-m", "distgan.train", *args, "--storage-path", cfg.storage_path,
                       "--name", cfg.name])


def wait_for_placement(cfg: TrainConfig, use_gpu: bool) -> None:
    """Fail fast (with the cluster's numbers) when the workers cannot be placed, instead of waiting forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = worker_bundle(cfg, use_gpu)
    pg = placement_group([bundle] * cfg.num_workers, strategy=cfg.placement_strategy)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            have = ray.cluster_resources()
            raise LaunchError(
                f"--num-workers {cfg.num_workers}: cannot place {cfg.num_workers} workers x {bundle} "
                f"({cfg.placement_strategy}) within {cfg.placement_timeout_s}s; the cluster has "
                f"CPU={have.get('CPU', 0):g} GPU={have.get('GPU', 0):g} on {len(ray.nodes())} node(s)")
    finally:
        remove_placement_group(pg)


def size_workers(cfg: TrainConfig, nodes: list, use_gpu: bool, found: Optional[tuple[str, dict]] = None,
                 log=print) -> TrainConfig:
    """The config with --num-workers and --cpus-per-worker decided (distgan.hardware.plan_workers) for `nodes`
    (what Ray offers), validated again, checked against the checkpoint it resumes; prints the layout."""
    import dataclasses

    from distgan.hardware import plan_workers

    keep = None
    if found is not None and found[1].get("batch_in_epoch"):
        keep = found[1].get("world_size")
    try:
        plan = plan_workers(cfg.num_workers, cfg.cpus_per_worker, use_gpu, nodes, cfg.batch_size, cfg.bn, keep)
    except ValueError as e:
        raise ConfigError(str(e), field="cpus_per_worker") from None
    sized = dataclasses.replace(cfg, num_workers=plan.num_workers, cpus_per_worker=plan.cpus_per_worker).validate()
    check_resume(sized, found)
    log(f"distgan: {plan.describe(cfg.batch_size)}")
    for note in plan.notes:
        log(f"note: {note}")
    return sized


def worker_bundle(cfg: TrainConfig, use_gpu: bool) -> dict[str, int]:
    """One worker's Ray resources in a sized config: {CPU: --cpus-per-worker (, GPU: 1)}."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def scaling_config(cfg: TrainConfig, use_gpu: bool):
    """Ray Train's ScalingConfig for a sized config: --num-workers workers of `worker_bundle`. Ray sets each
    worker's OMP_NUM_THREADS to its CPUs; the loop sets torch's threads to them too."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=worker_bundle(cfg, use_gpu),
                         placement_strategy=cfg.placement_strategy)


def build_trainer(cfg: TrainConfig, use_gpu: bool, score_fid: bool, callbacks: tuple = ()):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distgan.loop import train_loop_per_worker

    max_failures = cfg.max_failures if cfg.max_failures is not None else default_max_failures()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "env": _forwarded_env(), "score_fid": score_fid},
        scaling_config=scaling_config(cfg, use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.collective_timeout_s),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="fid" if score_fid else None,
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
            callbacks=list(callbacks),  # distgan.tune passes Ray Tune's report callback
        ),
    )


def check_resume(cfg: TrainConfig, found: Optional[tuple[str, dict]]) -> None:
    """Refuses a resubmission whose flags would change what the run's newest checkpoint means: the model's
    shape at any position; the data position's meaning (seed, batch, D steps, workers) mid-epoch. At an
    epoch boundary there is no position to misread, so those may change there."""
    from distgan.checkpoint import POSITION_FIELDS, model_mismatch

    if found is None:
        return
    where, state = found
    saved = config_from_dict(state["config"])
    mismatch = model_mismatch(saved, cfg)  # what the workers' check_compatible compares
    if mismatch:
        key, before, now = mismatch
        raise ConfigError(f"--{key.replace('_', '-')}: run {cfg.name} was checkpointed with {key}={before!r} "
                              f"({where}); this run has {now!r}, which changes the model; resubmit with "
                              f"{before!r} or use a new --name", field=key)
    g_steps_into_epoch = state.get("g_steps_into_epoch", 0)
    if not g_steps_into_epoch:
        return
    for key in POSITION_FIELDS:
        before = state.get("world_size", saved.num_workers) if key == "num_workers" else getattr(saved, key)
        now = getattr(cfg, key)
        if now is not None and before != now:  # None: auto, checked again once decided
            raise ConfigError(f"--{key.replace('_', '-')}: run {cfg.name} was checkpointed mid-epoch (epoch "
                              f"{state.get('epoch')}, G step {g_steps_into_epoch}) with {key}={before!r}; this run has "
                              f"{now!r}, which changes what that data position means; resubmit with {before!r}, "
                              f"or use a new --name", field=key)


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def stop_reason(cfg: TrainConfig) -> Optional[str]:
    """Reads and removes the note the workers leave when they stop early (a resubmission must not inherit it)."""
    from distgan.loop import STOP_FILE

    note = storage.join(cfg.storage_path, cfg.name, STOP_FILE)
    data = storage.read_bytes(note)
    if data is None:
        return None
    storage.delete(note)
    return json.loads(data.decode())["reason"]


def local_nodes(gpus: int) -> list:
    """This machine as a local run's Ray instance sees it (connect_ray gives it os.cpu_count() CPUs)."""
    from distgan.hardware import Node

    return [Node(os.cpu_count() or 1, gpus)]


def run(cfg: TrainConfig) -> dict:
    """Runs training; returns a summary dict. Raises ConfigError/LaunchError for user-fixable problems.

    Everything the driver can check is checked before Ray starts: values (parse_args), the data and the
    schedule, the run's newest checkpoint against these flags, and, for a local run, the hardware."""
    # torch is imported from here on, not before: a bad flag is reported in a second
    from distgan.checkpoint import newest_checkpoint_state
    from distgan.data import build_dataset, check_data_root

    check_data_root(cfg)
    check_schedule(cfg, len(build_dataset(cfg, "train")))
    found = newest_checkpoint_state(cfg.storage_path, cfg.name)
    check_resume(cfg, found)
    joining = bool(os.environ.get("RAY_ADDRESS"))
    if not joining:  # a local run's cluster is this machine
        gpus = local_gpu_count()
        if cfg.use_gpu and gpus == 0:
            raise ConfigError("--use-gpu: this machine has no CUDA GPU, and a local run uses only this machine "
                              "(set RAY_ADDRESS to join a cluster)", field="use_gpu")
        check_execution(cfg, cfg.use_gpu if cfg.use_gpu is not None else gpus >= 1)
        cfg = size_workers(cfg, local_nodes(gpus), cfg.use_gpu if cfg.use_gpu is not None else gpus >= 1, found)
    from distgan.metrics import metrics_supported

    t_submit = time.perf_counter()
    ray = connect_ray(cfg)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    if joining:  # the cluster's GPUs are known only now; still before any worker starts
        from distgan.hardware import ray_nodes

        check_execution(cfg, use_gpu)
        cfg = size_workers(cfg, ray_nodes(ray.nodes()), use_gpu, found)
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        print("note: --use-gpu and the cluster has no GPU yet; waiting for the autoscaler", flush=True)
    wait_for_placement(cfg, use_gpu)
    score_fid = cfg.eval_every > 0 and metrics_supported(cfg)[0]
    trainer = build_trainer(cfg, use_gpu, score_fid)
    stop_reason(cfg)  # a note left by an earlier submission is stale now
    with StopOnInterrupt(cfg) as interrupt:
        result = fit_in_thread(trainer)
    wall = time.perf_counter() - t_submit
    ray.shutdown()  # flushes the workers' last lines now, so nothing prints after the summary
    metrics = result.metrics or {}
    best = None
    if score_fid and result.best_checkpoints:
        finite = [(c, m) for c, m in result.best_checkpoints if math.isfinite(m.get("fid", math.inf))]
        if finite:
            best = min(finite, key=lambda cm: cm[1]["fid"])
    # as the user names them: an s3:// storage path keeps its scheme (Ray's result paths drop it)
    run_dir = storage.join(cfg.storage_path, cfg.name)
    summary = {
        "run_dir": run_dir,
        "checkpoint": storage.join(run_dir, PurePosixPath(result.checkpoint.path).name) if result.checkpoint else None,
        "best_checkpoint": storage.join(run_dir, PurePosixPath(best[0].path).name) if best else None,
        "best_fid": best[1]["fid"] if best else None,
        "samples": storage.join(run_dir, "samples"),
        "metrics_jsonl": storage.join(run_dir, storage.METRICS_FILE),
        "resumed": found is not None,
        "wall_time_s": round(wall, 1),
        "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "num_workers": cfg.num_workers,
        "use_gpu": use_gpu,
        "precision": metrics.get("precision"),
    }
    stopped = stop_reason(cfg)
    if stopped:
        summary["stopped"] = stopped
    summary["interrupted"] = interrupt.requested
    return summary


def _exit_now(code: int) -> None:
    """Exit without waiting for the training thread, which is blocked inside Ray: stop Ray (a local instance's
    processes with it) within a bounded time, then leave."""
    import ray

    stopper = threading.Thread(target=ray.shutdown, daemon=True)
    stopper.start()
    stopper.join(timeout=15)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg = parse_args(argv)
        summary = run(cfg)
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f": {resume_command(cfg, argv)}" if cfg is not None else ""
        print(f"interrupted at once; the last checkpoint is kept; to resume{where}", file=sys.stderr, flush=True)
        _exit_now(130)
    except Exception as e:  # Ray's TrainingFailedError and friends: one line, then where to look
        from distgan.checkpoint import CheckpointError

        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        kind = "checkpoint" if isinstance(cause, CheckpointError) else "training"
        msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        print(f"error: {kind} failed: {type(cause).__name__}: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    best = f" (FID {summary['best_fid']:.2f})" if summary["best_fid"] is not None else " (no evaluation ran)"
    print(f"\nrun directory  : {summary['run_dir']}\nsample grids   : {summary['samples']}\n"
          f"last checkpoint: {summary['checkpoint']}\nbest checkpoint: {summary['best_checkpoint'] or '-'}{best}\n"
          f"draw samples   : python -m distgan.sample --checkpoint {summary['run_dir']}")
    final = summary["final"]
    if "fid" in final:
        print(f"quality (EMA G, {summary['final'].get('step')} steps, vs the held-out digits): "
              f"FID {final['fid']:.2f}  KID {final['kid']:.4f}  classifier score {final['classifier_score']:.2f}  "
              f"coverage {final['coverage']:.3f}")
    if summary.get("stopped"):
        print(f"error: training stopped: {summary['stopped']}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        print(f"interrupted: checkpoint {summary['checkpoint']} written at step {final.get('step')}; to resume: "
              f"{resume_command(cfg, argv)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
