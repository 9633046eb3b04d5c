"""train_loop_per_worker: the only file that talks to Ray Train.

Ray touchpoints, in order:
  (1) ray.train.get_context()        - rank / world size of this DDP worker
  (2) ray.train.get_checkpoint()     - resume after a restart or a resubmission with the same name
  (3) ray.train.torch.prepare_model  - DDP-wrap G and D separately
  (4) ray.train.torch.prepare_data_loader - move batches to this worker's device
  (5) ray.train.report               - metrics + checkpoint, a barrier across workers
"""

from __future__ import annotations

import copy
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from distgan.checkpoint import (
    capture_rng,
    check_compatible,
    checkpoint_name,
    load_into,
    load_latest_valid,
    load_state,
    restore_rng,
    save_state,
    write_stop_reason,
)
from distgan.config import TrainConfig, config_from_dict
from distgan.data import build_dataset
from distgan.models import build_models
from distgan.step import EMA, gan_step, make_optimizers

NUM_FIXED_SAMPLES = 64  # an 8x8 grid, the same noise every epoch


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch, so a resume skips what was consumed
    without loading it. The order of an epoch depends only on (seed, epoch), as in DistributedSampler."""

    start_index = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def _fault_injection(step: int, rank: int, reals: list[torch.Tensor]) -> None:
    """Test hooks, inert unless DISTGAN_TEST_* is set: SIGKILL this worker, or poison its batch with NaN,
    at a given step, once per marker file (so the restarted run does not repeat the fault)."""
    marker_dir = os.environ.get("DISTGAN_TEST_MARKER_DIR")
    if not marker_dir:
        return
    for kind in ("KILL", "NAN"):
        at = os.environ.get(f"DISTGAN_TEST_{kind}_AT_STEP")
        target_rank = int(os.environ.get(f"DISTGAN_TEST_{kind}_RANK", "1" if kind == "KILL" else "0"))
        if at is None or int(at) != step or rank != target_rank:
            continue
        marker = Path(marker_dir) / f"{kind.lower()}_done"
        if marker.exists():
            continue
        marker.write_text(str(step))
        if kind == "KILL":
            print(f"[distgan test] rank {rank}: SIGKILL at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        reals[0] = reals[0] * float("nan")


def _param_checksum(module: torch.nn.Module) -> torch.Tensor:
    flat = torch.cat([p.detach().double().reshape(-1).cpu() for p in module.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(97).add_(1)
    return torch.stack([flat.sum(), (flat * weights).sum()])


class Worker:
    """State of one DDP rank: models, optimizers, position in the data, the last good snapshot."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        ctx = ray.train.get_context()  # (1)
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        print(f"[rank {self.rank}] of {self.world} on node {ray.get_runtime_context().get_node_id()[:12]} "
              f"({self.device})", flush=True)
        torch.manual_seed(cfg.seed)  # identical init everywhere; DDP also broadcasts rank 0's weights
        self.g, self.d = build_models(cfg)
        self.g.to(self.device)
        self.d.to(self.device)
        self.opt_g, self.opt_d = make_optimizers(self.g, self.d, cfg)
        self.ema = EMA(self.g, cfg.ema_decay) if cfg.ema_decay > 0 and self.rank == 0 else None
        # noise differs per rank (seed + rank); the fixed sample noise is the same for the whole run
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + self.rank + 1)
        self.fixed_noise = torch.randn(NUM_FIXED_SAMPLES, cfg.z_dim,
                                       generator=torch.Generator().manual_seed(cfg.seed))
        self.step = self.epoch = self.pos = 0  # pos = G steps done inside the current epoch
        self.lr_scale, self.rollbacks = 1.0, 0
        self.resumed_from: Optional[str] = None
        self.last_metrics: dict[str, float] = {}
        self.best_fid = math.inf

    # ------------------------------------------------------------------ state
    def state(self, rng_all: list[dict]) -> dict[str, Any]:
        bare_g = getattr(self.g, "module", self.g)
        bare_d = getattr(self.d, "module", self.d)
        state = {
            "format": 1, "config": self.cfg.to_dict(), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.pos, "generator": bare_g.state_dict(), "discriminator": bare_d.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "fixed_noise": self.fixed_noise,
            "rng": rng_all, "world_size": self.world, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
            "sampler": {"seed": self.cfg.seed, "epoch": self.epoch, "start_index": self.sample_offset()},
            "best_fid": self.best_fid,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def restore(self, state: dict[str, Any], where: str) -> None:
        check_compatible(state, self.cfg.to_dict(), where)
        bare_g = getattr(self.g, "module", self.g)
        bare_d = getattr(self.d, "module", self.d)
        load_into(state, where, generator=bare_g, discriminator=bare_d, opt_g=self.opt_g, opt_d=self.opt_d)
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema = EMA(self.g, self.cfg.ema_decay)
        self.step, self.epoch, self.pos = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        self.lr_scale, self.rollbacks = float(state["lr_scale"]), int(state["rollbacks"])
        self.best_fid = float(state.get("best_fid", math.inf))
        self.fixed_noise = state["fixed_noise"]
        self._apply_lr()
        rng = state["rng"]
        if state["world_size"] == self.world and self.rank < len(rng):
            restore_rng(rng[self.rank], self.noise_gen)
        else:
            print(f"WARNING: checkpoint was written by {state['world_size']} workers, this run has {self.world}: "
                  f"RNG streams restart from the seed, so the resume is not bit-exact", flush=True)
            self.noise_gen.manual_seed(self.cfg.seed * 7919 + self.rank + 1 + self.step)

    def _apply_lr(self) -> None:
        for opt, lr in ((self.opt_g, self.cfg.lr_g), (self.opt_d, self.cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * self.lr_scale

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of this rank's state: the rollback target for a non-finite loss."""
        return copy.deepcopy(self.state([capture_rng(self.noise_gen)] * self.world))

    def sample_offset(self) -> int:
        return self.pos * self.cfg.n_critic * self.cfg.per_worker_batch


def _resume(worker: Worker) -> None:
    checkpoint = ray.train.get_checkpoint()  # (2)
    if checkpoint is None:
        return
    local = Path(checkpoint.path) if Path(checkpoint.path).is_dir() else None
    if local is not None:
        state, where = load_latest_valid(local, log=lambda m: print(m, flush=True))
    else:  # remote storage: only the latest is fetched; a bad one stops the run naming it
        with checkpoint.as_directory() as tmp:
            state, where = load_state(tmp), checkpoint.path
    worker.restore(state, str(where))
    worker.resumed_from = str(where)
    print(f"[rank {worker.rank}] resumed from {where} at step {worker.step} (epoch {worker.epoch}, "
          f"batch {worker.pos})", flush=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    for key, value in loop_config.get("env", {}).items():
        os.environ.setdefault(key, value)
    cfg = config_from_dict(loop_config["cfg"])
    score_fid = bool(loop_config.get("score_fid"))
    w = Worker(cfg)
    _resume(w)

    # (3) DDP's default buffer sync copies rank 0's BatchNorm running statistics into every replica at
    # each G forward, so all ranks evaluate alike (--bn local); D has no buffers, so it costs D nothing.
    w.g = ray.train.torch.prepare_model(w.g)
    w.d = ray.train.torch.prepare_model(w.d)

    dataset = build_dataset(cfg, "train")
    sampler = ResumableDistributedSampler(dataset, num_replicas=w.world, rank=w.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
    # The loader's own generator: each iter() draws a base seed, and drawing it from the global RNG would
    # shift dropout masks after a mid-epoch resume (the resumed run starts an iterator the original did not).
    loader = DataLoader(dataset, batch_size=cfg.per_worker_batch, sampler=sampler, drop_last=True,
                        num_workers=0 if isinstance(dataset, torch.utils.data.TensorDataset) else 2,
                        generator=torch.Generator().manual_seed(cfg.seed))
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)  # (4) sampler is ours
    steps_per_epoch = (len(dataset) // w.world // cfg.per_worker_batch) // cfg.n_critic
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} x --n-critic {cfg.n_critic} exceeds the dataset "
                         f"({len(dataset)} images)")
    total_steps = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)

    tracker = evaluator = None
    if w.rank == 0:
        from distgan.tracking import Tracker

        tracker = Tracker(cfg, cfg.run_dir if "://" not in cfg.storage_path else Path("runs") / cfg.name,
                          w.world, resumed=w.resumed_from is not None, kernel_backend=_kernel_backend(cfg, w))
        evaluator = _make_evaluator(cfg, w.device)
    real_label = 1.0 - cfg.label_smoothing
    resumed_at = w.step if w.resumed_from is not None else None
    last_good = w.snapshot()
    bar = tqdm(total=total_steps, initial=w.step, disable=w.rank != 0, desc="steps", dynamic_ncols=True)
    timer, window_images = time.perf_counter(), 0
    stop_reason = None

    def sample_z(n: int) -> torch.Tensor:
        return torch.randn(n, cfg.z_dim, device=w.device, generator=w.noise_gen)

    def checkpoint(extra: dict[str, float]) -> None:
        nonlocal last_good
        _check_replicas(w)
        rng_all = [None] * w.world
        dist.all_gather_object(rng_all, capture_rng(w.noise_gen))
        metrics = {"step": w.step, "epoch": w.epoch, **w.last_metrics, **extra}
        if score_fid:  # Ray keeps the best checkpoints by this; a checkpoint not evaluated never wins
            metrics.setdefault("fid", math.inf)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if w.rank == 0:
                save_state(w.state(rng_all), tmp)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            name = checkpoint_name(w.step, resumed_at)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)  # (5)
        last_good = w.snapshot()

    done = w.step >= total_steps
    while not done and w.epoch < cfg.epochs:
        sampler.set_epoch(w.epoch)
        sampler.start_index = w.sample_offset()
        batches = iter(loader)
        rolled_back = False
        while w.pos < steps_per_epoch and not done:
            reals = [next(batches)[0] for _ in range(cfg.n_critic)]
            _fault_injection(w.step + 1, w.rank, reals)
            t0 = time.perf_counter()
            out = gan_step(w.g, w.d, w.opt_g, w.opt_d, reals, sample_z, real_label, cfg.kernels)
            # One all-reduce per step carries both the logged means and the non-finite flag, so every
            # rank learns of a NaN at the same step and takes the same branch.
            stats = torch.stack([out[k].float() for k in ("loss_d", "loss_g", "d_real", "d_fake",
                                                           "grad_norm_d", "grad_norm_g")])
            flag = (~torch.isfinite(stats)).any().float().reshape(1)
            packed = torch.cat([torch.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0), flag])
            dist.all_reduce(packed)
            values = (packed[:-1] / w.world).tolist()
            if packed[-1].item() > 0:
                print(f"[rank {w.rank}] non-finite loss detected at step {w.step + 1}", flush=True)
                if cfg.nan_policy == "stop" or w.rollbacks >= cfg.max_rollbacks:
                    stop_reason = (f"non-finite loss at step {w.step + 1} (rollbacks used: {w.rollbacks}/"
                                   f"{cfg.max_rollbacks}, --nan-policy {cfg.nan_policy}); last good checkpoint "
                                   f"is at step {last_good['step']}")
                    done = True
                    break
                rollbacks = w.rollbacks + 1
                w.restore(last_good, "in-memory snapshot")
                w.rollbacks, w.lr_scale = rollbacks, w.lr_scale * cfg.rollback_lr_factor
                w._apply_lr()
                last_good = w.snapshot()
                print(f"[rank {w.rank}] rolled back to step {w.step}; learning rates x{w.lr_scale:g} "
                      f"(rollback {w.rollbacks}/{cfg.max_rollbacks})", flush=True)
                bar.n = w.step
                rolled_back = True
                break
            w.step += 1
            w.pos += 1
            bar.update(1)
            if w.ema is not None:
                w.ema.update(w.g)
            window_images += cfg.batch_size * cfg.n_critic
            w.last_metrics = dict(zip(("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g"),
                                      values))
            if tracker is not None and (w.step % cfg.log_every == 0 or w.step == 1):
                elapsed = time.perf_counter() - timer
                tracker.log_step(w.step, {**w.last_metrics, "lr_g": w.opt_g.param_groups[0]["lr"],
                                          "lr_d": w.opt_d.param_groups[0]["lr"],
                                          "images_per_s": window_images / max(elapsed, 1e-9),
                                          "step_time_s": time.perf_counter() - t0, "epoch": w.epoch})
                bar.set_postfix(loss_d=f"{values[0]:.3f}", loss_g=f"{values[1]:.3f}")
                timer, window_images = time.perf_counter(), 0
            done = w.step >= total_steps
            if cfg.checkpoint_every_steps and w.step % cfg.checkpoint_every_steps == 0 and not done:
                checkpoint({})
        if rolled_back:
            continue
        if stop_reason:
            break
        epoch_finished = w.pos >= steps_per_epoch
        if epoch_finished:
            w.epoch, w.pos = w.epoch + 1, 0
        will_checkpoint = done or w.epoch >= cfg.epochs or (epoch_finished and w.epoch % cfg.checkpoint_every == 0)
        evaluate = will_checkpoint or (epoch_finished and cfg.eval_every and w.epoch % cfg.eval_every == 0)
        extra = {}
        if w.rank == 0:
            # Evaluation draws random numbers (KID subsets); forking the RNG keeps training bit-identical
            # whether or not a run stopped and evaluated here.
            with torch.random.fork_rng(devices=[]):
                extra = _end_of_epoch(w, tracker, evaluator if evaluate else None)
        extra = _broadcast_metrics(extra)
        if will_checkpoint:
            checkpoint(extra)
    bar.close()
    if stop_reason:
        print(f"[rank {w.rank}] STOPPING: {stop_reason}", flush=True)
        if w.rank == 0:
            write_stop_reason(cfg.storage_path, cfg.name, stop_reason)
    if tracker is not None:
        tracker.finish({"final_step": w.step, "rollbacks": w.rollbacks, "stopped": stop_reason or "",
                        **w.last_metrics})


def _check_replicas(w: Worker) -> None:
    """Before a checkpoint: every replica must hold bitwise-identical G and D parameters."""
    local = torch.cat([_param_checksum(w.g), _param_checksum(w.d)])
    gathered = [torch.empty_like(local) for _ in range(w.world)]
    dist.all_gather(gathered, local)
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"replicas diverged at step {w.step}: rank {r} holds different G/D parameters "
                               f"than rank 0 (checksums {other.tolist()} vs {gathered[0].tolist()})")


def _broadcast_metrics(extra: dict[str, float]) -> dict[str, float]:
    box = [extra]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _kernel_backend(cfg: TrainConfig, w: Worker) -> str:
    if cfg.kernels != "auto":
        return cfg.kernels
    return "triton" if w.device.type == "cuda" else "eager"


def _make_evaluator(cfg: TrainConfig, device: torch.device):
    if cfg.eval_every == 0:
        return None
    from distgan.metrics import QualityEvaluator, metrics_supported, reference_images

    ok, note = metrics_supported(cfg)
    if not ok:
        print(f"quality metrics skipped: {note}", flush=True)
        return None
    return QualityEvaluator(reference_images(cfg), device=device)


@torch.no_grad()
def _end_of_epoch(w: Worker, tracker, evaluator) -> dict[str, float]:
    """Rank 0: the fixed-noise sample grid and, when given an evaluator, quality metrics (EMA weights)."""
    cfg = w.cfg
    g_eval = w.ema.model if w.ema is not None else getattr(w.g, "module", w.g)
    was_training = g_eval.training
    g_eval.eval()
    samples = g_eval(w.fixed_noise.to(w.device)).cpu()
    metrics: dict[str, float] = {}
    if evaluator is not None:
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        fakes = []
        for start in range(0, cfg.eval_samples, 250):
            z = torch.randn(min(250, cfg.eval_samples - start), cfg.z_dim, generator=gen).to(w.device)
            fakes.append(g_eval(z).cpu())
        metrics = {k: float(v) for k, v in evaluator.evaluate(torch.cat(fakes)).items()}
        metrics["d_gap"] = w.last_metrics.get("d_real", 0.0) - w.last_metrics.get("d_fake", 0.0)
        w.best_fid = min(w.best_fid, metrics.get("fid", math.inf))
    g_eval.train(was_training)
    tracker.log_epoch(w.step, w.epoch, samples, metrics)
    return metrics
