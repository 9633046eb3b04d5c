"""`python -m distgan.train`: parse the config, check it, start (or join) Ray, run the TorchTrainer.

Joins the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local one sized to this machine. This
file holds the run's order of steps and the TorchTrainer; distgan.driver the pre-flight and the stop signals that
every driver shares, distgan.runs the run directory's claim and Ray's record of the run, distgan.cluster
connecting to Ray and sizing the workers.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import PurePosixPath
from typing import Any, Optional

from distgan import cluster, storage, worker
from distgan.cli import parse_args
from distgan.cluster import LaunchError
from distgan.config import ConfigError, TrainConfig, check_execution
from distgan.driver import Checked, StopOnInterrupt, checked_run, say, stop_now
from distgan.rundir import RANK_METRIC, RunDir


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


def build_trainer(cfg: TrainConfig, use_gpu: bool, score_fid: bool, callbacks: tuple = (),
                  data: Optional[dict] = None, init_from: Optional[str] = None):
    """Ray Train's TorchTrainer for the run; `data`: what it trains on (distgan.driver.Checked.data), recorded in
    its checkpoints, None to have the workers read it; `init_from`: the checkpoint a new run forks from
    (distgan.driver.Checked.parent), loaded while Ray has no checkpoint of the run."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distgan.loop import train_loop_per_worker

    max_failures = cfg.max_failures if cfg.max_failures is not None else cluster.default_max_failures()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "env": cluster._forwarded_env(), "score_fid": score_fid,
                           "progress_every_s": worker.progress_every_s(), "data": data, "init_from": init_from},
        scaling_config=cluster.scaling_config(cfg, use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.collective_timeout_s),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute=RANK_METRIC,  # every run, so a resubmission may turn evaluation on
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
            callbacks=list(callbacks),  # distgan.tune passes Ray Tune's report callback
        ),
    )


def run(cfg: TrainConfig) -> dict:
    """Runs training; returns a summary dict. Raises ConfigError/LaunchError for user-fixable problems.

    Everything the driver can check is checked before Ray starts: values (parse_args), RAY_ADDRESS, the
    pre-flight (distgan.driver.checked_run: the data, the schedule, the run's newest checkpoint against these
    flags), and, for a local run, the hardware."""
    cluster.check_ray_address()
    with checked_run(cfg, ray_record=True) as checked:
        return _run_checked(cfg, checked)


def _fit(cfg: TrainConfig, ray, joining: bool, checked: Checked):
    """From a connected Ray to the end of training: the cluster's checks, the workers' placement, fit(). Returns
    (cfg with the workers sized, Ray Train's Result, use_gpu, score_fid, the StopOnInterrupt)."""
    from distgan.metrics import metrics_supported

    # ray.init has just put its own SIGTERM handler in place (a stack dump, then abort, exit 134). Until the
    # workers train there is nothing to checkpoint, so a stop signal now stops at once, like a second Ctrl-C
    for sig in StopOnInterrupt.SIGNALS:
        if sig != signal.SIGINT:  # Ctrl-C keeps Python's KeyboardInterrupt, which stops at once too
            signal.signal(sig, stop_now)
    if joining:  # GPU nodes an autoscaler has not started yet are not in cluster_resources()
        cluster.check_gpu_choice(cfg.use_gpu, ray.cluster_resources().get("GPU", 0),
                                 cluster.autoscaler_gpu_node_types())
    use_gpu = cfg.uses_gpu(ray.cluster_resources().get("GPU", 0))
    if joining:  # the cluster's GPUs are known only now; still before any worker starts
        from distgan.hardware import ray_nodes

        check_execution(cfg, use_gpu)
        cfg = cluster.size_workers(cfg, ray_nodes(ray.nodes()), use_gpu, checked.start, fork=checked.parent is not None)
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        print("note: --use-gpu and the cluster has no GPU yet; waiting for the autoscaler", flush=True)
    cluster.wait_for_placement(cfg, use_gpu)
    score_fid = cfg.eval_every > 0 and metrics_supported(cfg)[0]
    trainer = build_trainer(cfg, use_gpu, score_fid, data=checked.data,
                            init_from=checked.parent and checked.parent.location)
    with StopOnInterrupt(cfg) as interrupt:
        result = fit_in_thread(trainer)
    return cfg, result, use_gpu, score_fid, interrupt


def _run_checked(cfg: TrainConfig, checked: Checked) -> dict:
    """run(), from the moment this driver holds the run directory and its pre-flight passed."""
    joining = bool(os.environ.get("RAY_ADDRESS"))
    if not joining:  # a local run's cluster is this machine
        gpus = cluster.local_gpu_count()
        if cfg.use_gpu and gpus == 0:
            raise ConfigError("--use-gpu: this machine has no CUDA GPU, and a local run uses only this machine "
                              "(set RAY_ADDRESS to join a cluster)", field="use_gpu")
        use_gpu = cfg.uses_gpu(gpus)
        check_execution(cfg, use_gpu)
        cfg = cluster.size_workers(cfg, cluster.local_nodes(gpus), use_gpu, checked.start,
                                   fork=checked.parent is not None)
    t_submit = time.perf_counter()
    ray = cluster.connect_ray(cfg)
    try:
        cfg, result, use_gpu, score_fid, interrupt = _fit(cfg, ray, joining, checked)
    except KeyboardInterrupt:  # a second signal: main stops Ray within a bounded time (_exit_now)
        raise
    except BaseException:
        cluster.disconnect_ray()
        raise
    wall = time.perf_counter() - t_submit
    cluster.disconnect_ray()  # flushes the workers' last lines now, so nothing prints after the summary
    metrics = result.metrics or {}
    best = None
    if score_fid and result.best_checkpoints:
        finite = [(c, m) for c, m in result.best_checkpoints if math.isfinite(m.get("fid", math.inf))]
        if finite:
            best = min(finite, key=lambda cm: cm[1]["fid"])
    # as the user names them: an s3:// storage path keeps its scheme (Ray's result paths drop it)
    run = RunDir.of(cfg)
    summary = {
        "run_dir": run.location,
        "checkpoint": run.join(PurePosixPath(result.checkpoint.path).name) if result.checkpoint else None,
        "best_checkpoint": run.join(PurePosixPath(best[0].path).name) if best else None,
        "best_fid": best[1]["fid"] if best else None,
        "samples": run.join("samples"),
        "metrics_jsonl": run.join(storage.METRICS_FILE),
        "resumed": checked.found is not None,
        "init_from": cfg.init_from,  # the checkpoint the run forked from (distgan.fork), None for one that did not
        "wall_time_s": round(wall, 1),
        "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != RANK_METRIC},
        "num_workers": cfg.num_workers,
        "use_gpu": use_gpu,
        "precision": metrics.get("precision"),
    }
    stopped = run.pop_stop_note()
    if stopped:
        summary["stopped"] = stopped
    summary["interrupted"] = interrupt.requested
    if interrupt.requested:
        summary["signal"] = signal.Signals(interrupt.signum).name
    return summary


def _exit_now(code: int) -> None:
    """Exit without waiting for the training thread, which is blocked inside Ray: stop Ray (a local instance's
    processes with it) within a bounded time, then leave."""
    stopper = threading.Thread(target=cluster.disconnect_ray, daemon=True)
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
    except KeyboardInterrupt as e:
        where = f": {resume_command(cfg, argv)}" if cfg is not None else ""
        say(f"interrupted at once; the last checkpoint is kept; to resume{where}")
        _exit_now(128 + getattr(e, "signum", signal.SIGINT))
    except Exception as e:  # Ray's TrainingFailedError and friends: one line, then where to look
        from distgan.checkpoint import CheckpointError

        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        # a worker's CheckpointError reaches the driver as text inside Ray's WorkerGroupError
        _, named, text = msg.partition(f"{CheckpointError.__module__}.{CheckpointError.__name__}: ")
        if isinstance(cause, CheckpointError) or named:
            say(f"error: checkpoint failed: {text or msg}")
        else:
            say(f"error: training failed: {type(cause).__name__}: {msg}")
        return 1
    return report(summary, cfg, argv)


def report(summary: dict, cfg: TrainConfig, argv: list[str]) -> int:
    """Writes the summary to the run directory (SUMMARY_FILE, JSON), prints the lines a person reads, and returns
    the exit status: 0, 1 when training stopped on an error, 128 + the signal when a signal stopped it."""
    location = storage.join(summary["run_dir"], storage.SUMMARY_FILE)
    try:
        storage.write_bytes(location, json.dumps(summary, indent=2, default=str).encode())
    except OSError as e:
        say(f"warning: cannot write the run's summary to {location}: {storage.first_line(e)}")
    best = f" (FID {summary['best_fid']:.2f})" if summary["best_fid"] is not None else " (no evaluation ran)"
    lines = [f"\nrun directory  : {summary['run_dir']}", f"sample grids   : {summary['samples']}",
             f"last checkpoint: {summary['checkpoint']}",
             f"best checkpoint: {summary['best_checkpoint'] or '-'}{best}",
             f"draw samples   : {shlex.join(['python', '-m', 'distgan.sample', '--checkpoint', summary['run_dir']])}"]
    final = summary["final"]
    if "fid" in final:
        lines.append(f"quality (EMA G, {summary['final'].get('step')} steps, vs the held-out digits): "
                     f"FID {final['fid']:.2f}  KID {final['kid']:.4f}  classifier score "
                     f"{final['classifier_score']:.2f}  coverage {final['coverage']:.3f}")
    say("\n".join(lines), sys.stdout)
    if summary.get("stopped"):
        say(f"error: training stopped: {summary['stopped']}")
        return 1
    if summary["interrupted"]:
        say(f"interrupted: checkpoint {summary['checkpoint']} written at step {final.get('step')}; to resume: "
            f"{resume_command(cfg, argv)}")
        return 128 + signal.Signals[summary["signal"]]
    return 0


if __name__ == "__main__":
    sys.exit(main())
