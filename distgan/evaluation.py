"""Rank 0's work for the Trainer: running a piece of work on rank 0 alone and sharing its result, starting
the tracker and the quality evaluator, and sampling the fixed-noise grid plus the metrics' fakes.

The Trainer runs the services and the sampling through `run_on_rank0`, inside a forked RNG, so nothing here
shifts the training streams; the metrics' noise comes from its own generator (seeds.evaluation). No Ray.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from distgan import seeds
from distgan.config import TrainConfig
from kernels.collectives import collective_device

EVAL_CHUNK = 250  # images per generator forward when sampling the metrics' fakes
# Rank-0-only work (W&B start-up, an evaluation) may take minutes; the other ranks wait for it at a barrier
# of this group, so only a dead peer, never a busy rank 0, trips the process group's --collective-timeout-s.
RANK0_WORK_TIMEOUT = timedelta(hours=2)


def run_on_rank0(work: Callable[[], Any], rank: int, device: torch.device, group: Optional[Any]) -> Any:
    """Runs `work` on rank 0 alone (the others wait at a barrier of `group`, a gloo group with the long
    RANK0_WORK_TIMEOUT; None when no process group is up) and hands every rank its result. The global RNG
    streams (torch CPU and this CUDA device, numpy, random) are forked around it, so it cannot shift them."""
    result = None
    if rank == 0:
        devices = [device] if device.type == "cuda" else []
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=devices):
            result = work()
        np.random.set_state(np_state)
        random.setstate(py_state)
    if group is None:
        return result
    dist.barrier(group=group)
    box = [result]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def start_services(cfg: TrainConfig, device: torch.device, tracker_factory: Optional[Callable[..., Any]],
                   resumed: bool, want_evaluator: bool) -> tuple[Any, Any]:
    """(tracker or None, QualityEvaluator or None). Raises TypeError when the factory's tracker is not a
    distgan.tracking.RunTracker."""
    tracker = evaluator = None
    if tracker_factory is not None:
        from distgan.tracking import RunTracker

        tracker = tracker_factory(resumed=resumed)
        if not isinstance(tracker, RunTracker):
            raise TypeError(f"tracker_factory gave {type(tracker).__name__}, which lacks "
                            f"log_step/log_epoch/finish (distgan.tracking.RunTracker)")
    if want_evaluator:
        from distgan.metrics import QualityEvaluator, reference_images

        evaluator = QualityEvaluator(reference_images(cfg), device=device)
    return tracker, evaluator


@torch.no_grad()
def sample_and_score(g_eval: torch.nn.Module, fixed_noise: torch.Tensor, cfg: TrainConfig, device: torch.device,
                     evaluator: Any, with_metrics: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The fixed-noise grid, (N, C, H, W) float32 on the CPU, and, when asked and an evaluator exists, its
    metrics of cfg.eval_samples fresh fakes ({} otherwise). `g_eval` runs in eval mode and gets its mode back."""
    was_training = g_eval.training
    g_eval.eval()
    samples = g_eval(fixed_noise.to(device)).float().cpu()
    metrics: dict[str, float] = {}
    if with_metrics and evaluator is not None:
        gen = torch.Generator().manual_seed(seeds.evaluation(cfg.seed))
        fakes = [g_eval(torch.randn(min(EVAL_CHUNK, cfg.eval_samples - s), cfg.z_dim, generator=gen).to(device))
                 .float().cpu() for s in range(0, cfg.eval_samples, EVAL_CHUNK)]
        metrics = {k: float(v) for k, v in evaluator.evaluate(torch.cat(fakes)).items()}
    g_eval.train(was_training)
    return samples, metrics


def quality_line(epoch: int, step: int, metrics: dict[str, float], best: bool) -> str:
    """One console line of the headline metrics (needs fid, kid, classifier_score, coverage)."""
    return (f"epoch {epoch} step {step}: FID {metrics['fid']:.2f} KID {metrics['kid']:.3f} "
            f"CS {metrics['classifier_score']:.2f} coverage {metrics['coverage']:.2f}" + (" (best)" if best else ""))
