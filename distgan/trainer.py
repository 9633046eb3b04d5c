"""Trainer: every stateful piece of a distgan run, under any torch.distributed group (or none). No Ray here.

The Ray adapter (distgan/loop.py) builds a Trainer, loads a checkpoint into it and calls `fit()` with a
`report` hook; tests drive the same object in 2 gloo processes, and the GPU tests in one NCCL process.

RNG streams, so that a loaded trainer continues bit-identically and nothing but training draws from them:
  * model init: the global RNGs seeded with `seed` on every rank (DDP also broadcasts rank 0's weights);
  * training (D's dropout): the global CPU/CUDA RNGs, reseeded with `seed + rank` once the models exist;
  * latent noise: `noise_gen` on the training device, seeded from (seed, rank);
  * data order: the sampler's (seed, epoch); the DataLoader's own generator is reseeded every epoch;
  * evaluation, sample grids, metrics: local generators or a forked RNG, never the streams above.

Its collaborators: distgan.sampler (data position), distgan.precision, distgan.evaluation (rank 0's work),
distgan.faults (test fault hooks, the replica check).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distgan import seeds
from distgan.augment import SEED_OFFSET as AUGMENT_SEED_OFFSET
from distgan.augment import build_augment
from distgan.checkpoint import FORMAT_VERSION, capture_rng, check_compatible, load_into, restore_rng
from distgan.config import TrainConfig, config_at, config_from_dict, parse_schedule
from distgan.data import build_dataset, dataset_fingerprint
from distgan.evaluation import RANK0_WORK_TIMEOUT, quality_line, run_on_rank0, sample_and_score, start_services
from distgan.faults import check_replicas, inject_test_faults
from distgan.models import build_models
from distgan.precision import checkpoint_precision, decide_run_precision
from distgan.sampler import build_loader, epoch_batches
from distgan.schedule import CheckpointPolicy, lr_factor
from distgan.step import EMA, gan_step, make_optimizers
from kernels import auto_backend
from kernels.collectives import collective_device

NUM_FIXED_SAMPLES = 64  # an 8x8 grid, the same noise every evaluation
STAT_KEYS = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")
# What the NaN guard always checks: a non-finite forward means the weights (or the batch) went bad.
FORWARD_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")

Report = Callable[[dict[str, float], Optional[dict[str, Any]]], None]


def _default_wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP when a process group of more than one rank is up (what Ray's prepare_model does), else the module."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


class Trainer:
    """Models, optimizers, EMA, data position, RNG streams, LR scale, NaN guard, checkpoint/evaluation schedule.

    Args:
        cfg: a validated TrainConfig.
        device: this rank's device (e.g. cuda:<local rank> or cpu).
        wrap_model: how each model is wrapped for data parallelism (Ray passes `prepare_model`);
            default: DDP over the initialised process group when it has more than one rank.
        evaluate: build the quality evaluator on rank 0 (FID etc.); the Ray adapter passes whether the
            metrics apply to this dataset.
        tracker_factory: rank 0 builds its tracker with this (called at the start of `fit()` with
            `resumed=`); None = no tracking (tests).
        dataset: the training images, (image, label) pairs; default `build_dataset(cfg, "train")`.
        data: what the run trains on ({"fingerprint", "images"}, distgan.data.dataset_fingerprint), recorded in
            every checkpoint; the drivers pass what their pre-flight read. Default: computed here, unless
            `dataset` is given (then nothing is recorded).
    Units: `step` counts G steps (each preceded by n_critic D steps); `steps_into_epoch` counts G steps done
    in the current epoch; `samples_into_epoch` is what this rank's sampler skips on a resume.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu",
                 wrap_model: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                 evaluate: bool = True, tracker_factory: Optional[Callable[..., Any]] = None,
                 dataset: Optional[torch.utils.data.Dataset] = None, data: Optional[dict[str, Any]] = None):
        self.cfg = cfg
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # object collectives under NCCL use the current device
        # Under a process group every collective runs, even at world size 1, so a one-GPU run exercises NCCL.
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.num_workers is None:  # a config the driver did not size (tests, scripts): the group's size
            cfg = self.cfg = dataclasses.replace(cfg, num_workers=self.world)
        if cfg.num_workers != self.world:  # the per-worker batch and the data position assume it
            raise ValueError(f"num_workers={cfg.num_workers}, and the process group has {self.world} ranks")
        # self.cfg is what holds for the next step: the flags with --schedule's values up to it (config_at)
        self.flags = cfg
        self._switches = {entry.pop("step"): entry for entry in parse_schedule(cfg.schedule)} if cfg.schedule else {}
        cfg = self.cfg = config_at(cfg, 0)
        self.precision_choice = decide_run_precision(cfg, self.device, self.rank, self.distributed)
        self.precision = self.precision_choice.precision
        self.kernel_backend, self.kernel_reason = (cfg.kernels, "--kernels") if cfg.kernels != "auto" else (
            auto_backend(self.device))

        torch.manual_seed(seeds.model_init(cfg.seed))  # identical init on every rank
        g, d = build_models(cfg)
        if list(d.buffers()):
            # The G phase calls D outside its DDP wrapper, so D's buffers would never be synchronised.
            raise ValueError("the discriminator must not have buffers (BatchNorm, spectral norm): the G phase "
                             "runs it outside DDP and replicas would drift silently")
        self.g_bare, self.d_bare = g.to(self.device), d.to(self.device)
        self.opt_g, self.opt_d = make_optimizers(g, d, cfg)
        fp16 = self.precision == "fp16"
        self.scalers = (torch.amp.GradScaler("cuda", enabled=fp16), torch.amp.GradScaler("cuda", enabled=fp16))
        self.ema = EMA(g, cfg.ema_decay) if cfg.ema_decay > 0 and self.rank == 0 else None
        wrap = wrap_model or (lambda m: _default_wrap(m, self.device))
        self.g, self.d = wrap(g), wrap(d)

        self.dataset = dataset if dataset is not None else build_dataset(cfg, "train")
        # what this run trains on, recorded in every checkpoint (a resume on other data is checked against it)
        self.data = data or (dataset_fingerprint(cfg, self.dataset) if dataset is None else None)
        self.sampler, self.loader = build_loader(self.dataset, cfg, self.world, self.rank, self.device)
        self.steps_per_epoch = cfg.steps_per_epoch(len(self.dataset))
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {cfg.batch_size} x --n-critic {cfg.n_critic} exceeds the dataset "
                             f"({len(self.dataset)} images)")
        self.total_steps = min(cfg.max_steps or math.inf, cfg.epochs * self.steps_per_epoch)

        # Training streams: every rank its own, drawn only by training from here on.
        torch.manual_seed(seeds.training(cfg.seed, self.rank))
        np.random.seed(seeds.training(cfg.seed, self.rank))
        random.seed(seeds.training(cfg.seed, self.rank))
        self.noise_gen = torch.Generator(device=self.device).manual_seed(self._noise_seed())
        # D's input augmentation (None when off): its own per-rank stream, p and ADA state live in checkpoints
        self.augment = build_augment(cfg, self.device, self._noise_seed(AUGMENT_SEED_OFFSET))
        self.fixed_noise = torch.randn(NUM_FIXED_SAMPLES, cfg.z_dim,
                                       generator=torch.Generator().manual_seed(seeds.model_init(cfg.seed)))
        self.step = self.epoch = self.steps_into_epoch = 0
        self.lr_scale, self.rollbacks = 1.0, 0
        self.best_fid = math.inf
        self.last_metrics: dict[str, float] = {}
        self.resumed_from: Optional[str] = None
        self.parent: Optional[dict[str, Any]] = None  # {"checkpoint", "step"} of the checkpoint a fork started from
        self._batches = None
        self._want_evaluator = evaluate and cfg.eval_every > 0
        self._tracker_factory = tracker_factory
        self.tracker = self.evaluator = None
        self._rank0_group = None
        if self.distributed:  # new_group is collective: every rank creates it, here, in the same order
            self._rank0_group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)

    # ------------------------------------------------------------------ precision
    def _keep_checkpoint_precision(self, saved: Optional[str], where: str) -> None:
        """With --precision auto, a resume runs the precision its checkpoint was trained in (so an exact resume
        stays exact), where this device can run it; an explicit --precision wins (distgan.precision)."""
        choice = checkpoint_precision(self.cfg, self.device, self.precision, saved, where)
        if choice is None:
            return
        self.precision, self.precision_choice = saved, choice
        fp16 = saved == "fp16"
        self.scalers = (torch.amp.GradScaler("cuda", enabled=fp16), torch.amp.GradScaler("cuda", enabled=fp16))
        if self.rank == 0:
            print(f"precision {saved} ({self.precision_choice.reason})", flush=True)

    # ------------------------------------------------------------------ state
    def _noise_seed(self, offset: int = 0) -> int:
        return seeds.noise(self.cfg.seed, self.rank, offset)

    @property
    def samples_into_epoch(self) -> int:
        return self.steps_into_epoch * self.cfg.n_critic * self.cfg.per_worker_batch

    def _restore_rng(self, state: dict[str, Any]) -> None:
        if not restore_rng(state, self.noise_gen, self.device):
            warnings.warn(f"checkpoint RNG streams were saved on {state.get('device_type')}, this run trains on "
                          f"{self.device.type}: noise and dropout restart from the seed, so the resume is not "
                          f"bit-exact", stacklevel=3)
            self._reseed_streams()

    def _reseed_streams(self) -> None:
        torch.manual_seed(seeds.reseeded_training(self.cfg.seed, self.rank, self.step))
        self.noise_gen.manual_seed(self._noise_seed(self.step))

    def _all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The complete training state (collective: every rank must call it; each rank's RNG is gathered)."""
        state = {
            "format": FORMAT_VERSION, "config": self.cfg.to_dict(), "step": self.step, "epoch": self.epoch,
            "g_steps_into_epoch": self.steps_into_epoch,
            "generator": self.g_bare.state_dict(), "discriminator": self.d_bare.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "fixed_noise": self.fixed_noise,
            "rng": self._all_gather_objects(capture_rng(self.noise_gen, self.device)), "world_size": self.world,
            "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "best_fid": self.best_fid,
            "precision": self.precision,
            "scalers": [s.state_dict() for s in self.scalers],
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.data is not None:
            state["data"] = self.data
        if self.augment is not None:  # p is the same on every rank; each rank's generator is its own
            state["augment"] = self._all_gather_objects(self.augment.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any], where: str = "state", fork: bool = False) -> None:
        """Restores everything `state_dict()` saved. A checkpoint of another world size or device kind loads,
        but its RNG streams cannot continue: they restart from the seed with one warning. The hyper-parameters in
        force are this run's flags: learning rates (times the schedule at the loaded step), Adam betas, EMA decay.

        `fork`: `state` is another run's checkpoint that this new run starts from (--init-from, distgan.fork). Its
        training state loads as on a resume: weights, optimizer moments, EMA, step, epoch and data position, RNG
        streams, and its fixed noise, so the fork's sample grids stay comparable with its parent's. Augmentation
        state (ADA's p) carries over only under the parent's --augment and --augment-p, and another --seed
        reseeds the noise and dropout streams. The NaN guard's learning-rate scale and rollback count, and the
        best FID, are the new run's own and start afresh."""
        check_compatible(state, self.cfg.to_dict(), where)
        self.cfg = config_at(self.flags, int(state["step"]))  # --schedule's values at the loaded step
        load_into(state, where, generator=self.g_bare, discriminator=self.d_bare, opt_g=self.opt_g, opt_d=self.opt_d)
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
                self.ema.decay = self.cfg.ema_decay  # the decay in force is this run's flag
            else:
                self.ema = EMA(self.g_bare, self.cfg.ema_decay)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.steps_into_epoch = int(state["g_steps_into_epoch"])
        if fork:
            self.lr_scale, self.rollbacks, self.best_fid = 1.0, 0, math.inf
        else:
            self.lr_scale, self.rollbacks = float(state["lr_scale"]), int(state["rollbacks"])
            self.best_fid = float(state.get("best_fid", math.inf))
        self.fixed_noise = state["fixed_noise"]
        self._keep_checkpoint_precision(state.get("precision"), where)
        # fp16's loss scale carries over only between scaled runs (a disabled GradScaler saves {}); bf16/fp32
        # checkpoints load into any precision
        for scaler, saved in zip(self.scalers, state["scalers"]):
            if saved and scaler.is_enabled():
                scaler.load_state_dict(saved)
        for opt in (self.opt_g, self.opt_d):  # Adam's saved param groups carry the betas it was trained with
            for group in opt.param_groups:
                group["betas"] = (self.cfg.beta1, self.cfg.beta2)
        self._apply_lr()
        self._batches = None
        self._load_streams(state, where, fork)
        if fork:
            self.resumed_from, self.parent = None, {"checkpoint": where, "step": self.step}
        else:
            self.resumed_from = where

    def _load_streams(self, state: dict[str, Any], where: str, fork: bool) -> None:
        """The augmentation state and the RNG streams of a loaded checkpoint (load_state_dict)."""
        saved = config_from_dict(state["config"])
        same_seed = saved.seed == self.cfg.seed or not fork
        same_augment = (saved.augment, saved.augment_p) == (self.cfg.augment, self.cfg.augment_p) or not fork
        if self.augment is not None and state.get("augment") and same_augment:  # without it: the start p
            augment = state["augment"]
            same = state["world_size"] == self.world and self.rank < len(augment)
            self.augment.load_state_dict(augment[self.rank] if same else augment[0], with_generator=same and same_seed)
        rng = state["rng"]
        if not same_seed:  # a fork asked for other noise and dropout draws than its parent's
            self._reseed_streams()
        elif state["world_size"] == self.world and self.rank < len(rng):
            self._restore_rng(rng[self.rank])
        else:
            warnings.warn(f"{where} was written by {state['world_size']} workers, this run has {self.world}: "
                          f"RNG streams restart from the seed, so the resume is not bit-exact", stacklevel=3)
            self._reseed_streams()

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier for the step after `step` G steps (distgan.schedule.lr_factor): a resume
        continues it without saved state; one with other --epochs or --max-steps reshapes what is left."""
        return lr_factor(step, self.total_steps, self.cfg.lr_decay_start)

    def _apply_lr(self) -> None:
        factor = self.lr_scale * self.lr_factor(self.step)
        for opt, lr in ((self.opt_g, self.cfg.lr_g), (self.opt_d, self.cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    def _switch_schedule(self) -> None:
        """--schedule's entry at this step takes effect for the next G step: the optimizers' rates and betas and
        the EMA's decay are set here; label smoothing is read from self.cfg where it is used; the augmentation's p
        is set only when the entry names augment_p, so that ADA's adapted p is not reset by another field's switch.
        A resume at this step switches the same way, so a resumed run trains the same bits."""
        before, self.cfg = self.cfg, config_at(self.flags, self.step)
        named = self._switches[self.step]
        self._apply_lr()
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["betas"] = (self.cfg.beta1, self.cfg.beta2)
        if self.ema is not None:
            self.ema.decay = self.cfg.ema_decay
        if self.augment is not None and "augment_p" in named:
            self.augment.p = float(self.cfg.augment_p)
        # a run loaded at this step (a resume, a fork) has these values already: it says nothing
        changes = ", ".join(f"{k} {getattr(before, k)!r} -> {getattr(self.cfg, k)!r}" for k in sorted(named)
                            if getattr(before, k) != getattr(self.cfg, k))
        if self.rank == 0 and changes:
            print(f"schedule: from step {self.step + 1}: {changes}", flush=True)

    # ------------------------------------------------------------------ one step
    def _next_reals(self) -> list[torch.Tensor]:
        if self._batches is None:
            self._batches = epoch_batches(self.sampler, self.loader, self.cfg.seed, self.epoch,
                                          self.samples_into_epoch)
        return [next(self._batches)[0].to(self.device, non_blocking=True) for _ in range(self.cfg.n_critic)]

    def _sample_z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.z_dim, device=self.device, generator=self.noise_gen)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One G step (after n_critic D steps) on this rank's next batches; advances the step counters and
        the EMA. Returns 0-dim device tensors (STAT_KEYS); no host sync."""
        reals = self._next_reals()
        inject_test_faults(self.step + 1, self.rank, reals)
        if self.step in self._switches:
            self._switch_schedule()
        if self.cfg.lr_decay_start < 1:
            self._apply_lr()
        out = gan_step(self.g, self.d, self.opt_g, self.opt_d, reals, self._sample_z,
                       real_label=1.0 - self.cfg.label_smoothing, impl=self.cfg.kernels, precision=self.precision,
                       scalers=self.scalers, augment=self.augment)
        if self.augment is not None:
            self.augment.observe(out["d_real_sign"])
        self.step += 1
        self.steps_into_epoch += 1
        if self.ema is not None:
            self.ema.update(self.g)
        return out

    def _sync_step(self, out: dict[str, torch.Tensor], flags: list[float]) -> tuple[list[float], bool, list[bool]]:
        """One all-reduce per step carries the logged means, the non-finite flag and the schedule flags, so
        every rank takes the same branch at the same step. Returns (means, non-finite?, [flag raised by any]).

        Non-finite means a forward value (FORWARD_KEYS) or a gradient norm that reached the weights. An fp16
        overflow does not: its GradScaler skipped that optimizer step and backed off its scale by design, so a
        gradient norm is checked only where no enabled scaler stands between the gradients and the weights.
        One host sync: the read at the end, after the whole step and its all-reduce are queued; the flags go
        up as fill kernels, not as a host-to-device copy (a blocking one drains the queue like a read)."""
        stats = torch.stack([out[k].float() for k in STAT_KEYS])
        unscaled = [key for key, scaler in (("grad_norm_d", self.scalers[0]), ("grad_norm_g", self.scalers[1]))
                    if not scaler.is_enabled()]
        guarded = torch.stack([out[k].float() for k in (*FORWARD_KEYS, *unscaled)])
        bad = (~torch.isfinite(guarded)).any().float().reshape(1)
        raised = [stats.new_full((1,), float(flag)) for flag in flags]
        packed = torch.cat([torch.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0), bad, *raised])
        if self.distributed:
            packed = packed.to(collective_device())
            dist.all_reduce(packed)
        host = packed.tolist()  # the one host sync of a step: the guard decides before the next step or a checkpoint
        return [v / self.world for v in host[:len(STAT_KEYS)]], host[len(STAT_KEYS)] > 0, \
            [v > 0 for v in host[len(STAT_KEYS) + 1:]]

    def _check_replicas(self) -> None:
        """Before a checkpoint: every replica holds bitwise-identical G and D parameters (D has no buffers;
        G's buffers are rank 0's at every forward, DDP broadcasts them)."""
        if self.distributed:
            check_replicas(self.g_bare, self.d_bare, self.step, self.world)

    # ------------------------------------------------------------------ rank-0 work
    def _rank0_then_share(self, work: Callable[[], Any]) -> Any:
        """`work` on rank 0 alone, its result on every rank, the training RNG streams untouched."""
        return run_on_rank0(work, self.rank, self.device, self._rank0_group if self.distributed else None)

    def _start_rank0_services(self) -> None:
        def start() -> None:
            self.tracker, self.evaluator = start_services(self.cfg, self.device, self._tracker_factory,
                                                          self.resumed_from is not None, self._want_evaluator)

        self._rank0_then_share(start)

    @torch.no_grad()
    def _evaluate_rank0(self, with_metrics: bool) -> dict[str, float]:
        """Rank 0: the fixed-noise sample grid and, when asked, quality metrics of the EMA generator."""
        g_eval = self.ema.model if self.ema is not None else self.g_bare
        samples, metrics = sample_and_score(g_eval, self.fixed_noise, self.cfg, self.device, self.evaluator,
                                            with_metrics)
        if with_metrics and self.evaluator is not None:
            metrics["d_gap"] = self.last_metrics.get("d_real", 0.0) - self.last_metrics.get("d_fake", 0.0)
        if self.tracker is not None:
            self.tracker.log_epoch(self.step, self.epoch, samples, metrics)
        if "fid" in metrics:
            print(quality_line(self.epoch, self.step, metrics, metrics["fid"] < self.best_fid), flush=True)
        return metrics

    # ------------------------------------------------------------------ the loop
    def _log_step(self, t_window: float, steps: int) -> None:
        elapsed = max(time.perf_counter() - t_window, 1e-9)
        self.tracker.log_step(self.step, {**self.last_metrics, "lr_g": self.opt_g.param_groups[0]["lr"],
                                          "lr_d": self.opt_d.param_groups[0]["lr"],
                                          "images_per_s": steps * self.cfg.images_per_g_step / elapsed,
                                          "step_time_s": elapsed / max(steps, 1), "epoch": self.epoch})

    def _rollback(self, last_good: dict[str, Any]) -> None:
        rollbacks = self.rollbacks + 1
        resumed_from = self.resumed_from
        # fp16's loss scale is not rewound: the scale that overflowed since the snapshot would overflow again
        scalers = [scaler.state_dict() for scaler in self.scalers]
        self.load_state_dict(copy.deepcopy(last_good), "in-memory snapshot")
        for scaler, kept in zip(self.scalers, scalers):
            if kept:
                scaler.load_state_dict(kept)
        self.resumed_from = resumed_from
        self.rollbacks, self.lr_scale = rollbacks, self.lr_scale * self.cfg.rollback_lr_factor
        self._apply_lr()
        print(f"[rank {self.rank}] rolled back to step {self.step}; learning rates x{self.lr_scale:g} "
              f"(rollback {self.rollbacks}/{self.cfg.max_rollbacks})", flush=True)

    # ------------------------------------------------------------------ fit() in parts
    def _recover_nonfinite(self) -> Optional[str]:
        """After a non-finite step (every rank sees it at the same step): roll back to the last good state with
        smaller learning rates, or, with --nan-policy stop or the rollbacks used up, the reason to stop."""
        print(f"[rank {self.rank}] non-finite loss detected at step {self.step}", flush=True)
        if self.cfg.nan_policy == "stop" or self.rollbacks >= self.cfg.max_rollbacks:
            return (f"non-finite loss at step {self.step} (rollbacks used: {self.rollbacks}/{self.cfg.max_rollbacks}, "
                    f"--nan-policy {self.cfg.nan_policy}); last good checkpoint is at step {self._last_good['step']}")
        self._rollback(self._last_good)
        self._last_good = copy.deepcopy(self.state_dict())
        return None

    def _record_step(self, values: list[float], on_step: Optional[Callable[[int, dict[str, float]], None]]) -> None:
        """The step's all-reduced means: the progress hook every step, the tracker every --log-every steps."""
        self.last_metrics = dict(zip(STAT_KEYS, values))
        if self.augment is not None:  # reaches W&B, metrics.jsonl and every report
            self.last_metrics["augment_p"] = self.augment.p
        self._window[1] += 1
        if on_step is not None and self.rank == 0:
            on_step(self.step, self.last_metrics)
        if self.tracker is not None and (self.step % self.cfg.log_every == 0 or self.step == 1):
            self._log_step(*self._window)
            self._window = [time.perf_counter(), 0]

    def _roll_epoch(self) -> bool:
        """Starts the next epoch when this one's G steps are done; whether it did."""
        if self.steps_into_epoch < self.steps_per_epoch:
            return False
        self.epoch, self.steps_into_epoch, self._batches = self.epoch + 1, 0, None
        return True

    def _evaluate(self, epoch_finished: bool, with_metrics: bool) -> dict[str, float]:
        """A sample grid at every epoch end, quality metrics when asked (rank 0; every rank gets the numbers)."""
        if not (epoch_finished or with_metrics):
            return {}
        extra = self._rank0_then_share(lambda: self._evaluate_rank0(with_metrics)) or {}
        self.best_fid = min(self.best_fid, extra.get("fid", math.inf))
        return extra

    def _checkpoint(self, report: Report, extra: dict[str, float]) -> None:
        self._check_replicas()
        state = self.state_dict()
        report({"step": self.step, "epoch": self.epoch, **self.last_metrics, **extra}, state)
        self._last_good = copy.deepcopy(state)

    def _finish(self, stop_reason: Optional[str]) -> None:
        if self.rank != 0:
            return
        if stop_reason:
            print(f"[rank {self.rank}] STOPPING: {stop_reason}", flush=True)
        if self.tracker is not None:
            self.tracker.finish({"final_step": self.step, "rollbacks": self.rollbacks, "stopped": stop_reason or "",
                                 **self.last_metrics})

    def fit(self, report: Optional[Report] = None, should_stop: Callable[[], bool] = lambda: False,
            on_step: Optional[Callable[[int, dict[str, float]], None]] = None) -> dict[str, Any]:
        """Trains to the end of the schedule. `report(metrics, state)` is called on every rank at the same
        steps: with `state` (this trainer's `state_dict()`) at a checkpoint. `should_stop()` is polled each
        step on every rank; any rank saying yes makes all stop after a checkpoint. `on_step(step, means)`
        (rank 0) sees every step's logged means. Returns {"step", "stopped": reason or None, "interrupted"}."""
        report = report or (lambda metrics, state: None)
        self._start_rank0_services()
        policy = CheckpointPolicy(self.cfg, self.rank, self.total_steps)
        self._last_good = copy.deepcopy(self.state_dict())  # what a non-finite step rolls back to
        self._window = [time.perf_counter(), 0]  # the logging window: its start, its steps
        stop_reason, interrupted = None, False
        while self.step < self.total_steps:
            # one step; one all-reduce tells every rank its means, a non-finite value, the time trigger, a stop
            out = self.train_step()
            values, nonfinite, (time_due, stop) = self._sync_step(out, [float(policy.time_due()),
                                                                        float(should_stop())])
            # the NaN guard: every rank rolls back together, or all stop
            if nonfinite:
                stop_reason = self._recover_nonfinite()
                if stop_reason:
                    break
                continue
            self._record_step(values, on_step)
            # the epoch's end, then evaluation and checkpoint as the policy says
            epoch_finished = self._roll_epoch()
            checkpoint, evaluate = policy.decide(self.step, self.epoch, epoch_finished, time_due, stop)
            extra = self._evaluate(epoch_finished, evaluate)
            if checkpoint:
                self._checkpoint(report, extra)
                policy.checkpointed()
            if stop:
                interrupted = True
                break
        self._finish(stop_reason)
        return {"step": self.step, "stopped": stop_reason, "interrupted": interrupted}
