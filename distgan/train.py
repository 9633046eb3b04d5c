"""`python -m distgan.train`: parse the config, check it, start (or join) Ray, run the TorchTrainer.

Joins the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local one sized to this machine.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from distgan.checkpoint import pop_stop_reason
from distgan.config import ConfigError, TrainConfig, parse_args

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
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k != "WANDB_API_KEY"}


def connect_ray(cfg: TrainConfig):
    import ray

    runtime_env = {"env_vars": {k: os.environ[k] for k in RUNTIME_ENV_VARS if k in os.environ}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, cfg.num_workers), runtime_env=runtime_env,
                 include_dashboard=False)
    return ray


def wait_for_placement(cfg: TrainConfig, use_gpu: bool) -> None:
    """Fail fast (with the cluster's numbers) when the workers cannot be placed, instead of waiting forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": 1, **({"GPU": 1} if use_gpu else {})}
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


def build_trainer(cfg: TrainConfig, use_gpu: bool, score_fid: bool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distgan.loop import train_loop_per_worker

    # On a cluster, preemptions are expected: restart the worker group from the last checkpoint. A local
    # run's failures are bugs or bad input, and retrying them only delays the error.
    max_failures = cfg.max_failures if cfg.max_failures is not None else (2 if os.environ.get("RAY_ADDRESS") else 0)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "env": _forwarded_env(), "score_fid": score_fid},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.collective_timeout_s),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="fid" if score_fid else None,
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def run(cfg: TrainConfig) -> dict:
    """Runs training; returns a summary dict. Raises ConfigError/LaunchError for user-fixable problems."""
    from distgan.data import build_dataset, check_data_root

    check_data_root(cfg)
    num_images = len(build_dataset(cfg, "train"))
    if num_images // cfg.batch_size < cfg.n_critic:
        raise ConfigError(f"--batch-size {cfg.batch_size} x --n-critic {cfg.n_critic} needs more images than the "
                          f"training split has ({num_images})")
    from distgan.metrics import metrics_supported

    t_submit = time.perf_counter()
    ray = connect_ray(cfg)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        print("note: --use-gpu and the cluster has no GPU yet; waiting for the autoscaler", flush=True)
    wait_for_placement(cfg, use_gpu)
    score_fid = cfg.eval_every > 0 and metrics_supported(cfg)[0]
    trainer = build_trainer(cfg, use_gpu, score_fid)
    resumed = (Path(cfg.run_dir) / "checkpoint_manager_snapshot.json").exists() if "://" not in cfg.storage_path \
        else None
    pop_stop_reason(cfg.storage_path, cfg.name)  # a note left by an earlier submission is stale now
    result = trainer.fit()
    wall = time.perf_counter() - t_submit
    metrics = result.metrics or {}
    best = None
    if score_fid and result.best_checkpoints:
        finite = [(c, m) for c, m in result.best_checkpoints if math.isfinite(m.get("fid", math.inf))]
        if finite:
            best = min(finite, key=lambda cm: cm[1]["fid"])
    summary = {
        "run_dir": result.path,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": best[0].path if best else None,
        "best_fid": best[1]["fid"] if best else None,
        "samples": str(Path(result.path) / "samples"),
        "metrics_jsonl": str(Path(result.path) / "metrics.jsonl"),
        "resumed": resumed,
        "wall_time_s": round(wall, 1),
        "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "num_workers": cfg.num_workers,
        "use_gpu": use_gpu,
    }
    stopped = pop_stop_reason(cfg.storage_path, cfg.name)
    if stopped:
        summary["stopped"] = stopped
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg = parse_args(argv)
        summary = run(cfg)
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resubmit with the same --storage-path and --name to resume", file=sys.stderr)
        return 130
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
    print(f"\nrun directory : {summary['run_dir']}\nsamples       : {summary['samples']}\n"
          f"last checkpoint: {summary['checkpoint']}\nbest checkpoint: {summary['best_checkpoint']} "
          f"(FID {summary['best_fid']})\nsample images : python -m distgan.sample --checkpoint "
          f"{summary['checkpoint']} --num-samples 64 --output samples.png")
    final = summary["final"]
    if "fid" in final:
        print(f"quality (EMA G, {summary['final'].get('step')} steps, vs the held-out digits): "
              f"FID {final['fid']:.2f}  KID {final['kid']:.4f}  classifier score {final['classifier_score']:.2f}  "
              f"coverage {final['coverage']:.3f}")
    if summary.get("stopped"):
        print(f"error: training stopped: {summary['stopped']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
