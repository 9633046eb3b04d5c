"""What a training process does around the Trainer, under Ray (distgan/loop.py) or not (distgan/local.py): the
tracker, the resumed attempt's checkpoint names, the progress bar. The run directory's files, the stop request
and the stop note among them, are distgan.rundir's.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from distgan.rundir import RunDir

if TYPE_CHECKING:  # torch is imported by the training processes, not by the driver that reads the stop note
    from distgan.trainer import Trainer


def tracker_factory(cfg, trainer: Callable[[], Trainer]) -> Callable[..., Any]:
    """Rank 0's Tracker for the run directory; `trainer()` gives the Trainer, built after this factory."""

    def build(resumed: bool):
        from distgan.tracking import Tracker

        t = trainer()
        # the W&B config records the precision that runs, not "auto"
        return Tracker(dataclasses.replace(cfg, precision=t.precision), RunDir.of(cfg).location, t.world,
                       resumed=resumed, kernel_backend=t.kernel_backend, parent=t.parent)

    return build


def announce_resume(trainer: Trainer, where: str, what: str = "resumed") -> None:
    print(f"[rank {trainer.rank}] {what} from {where} at step {trainer.step} (epoch {trainer.epoch}, "
          f"G step {trainer.steps_into_epoch} of it)", flush=True)


def start(trainer: Trainer, resumed: Optional[tuple[dict, str]], init_from: Optional[str]) -> Optional[int]:
    """Where a training process starts: `resumed`, the run's own checkpoint (state, where) when it has one; else,
    for a new run that forks, the checkpoint the driver chose for --init-from (distgan.fork), loaded with this
    run's hyper-parameters (Trainer.load_state_dict(fork=True)). Returns the step a resume starts at, None for a
    new run (forked or not), whose checkpoints are named as a new run's."""
    from distgan.checkpoint import fetch_state

    if resumed is not None:
        state, where = resumed
        trainer.load_state_dict(state, where)
        announce_resume(trainer, where)
        return trainer.step
    if init_from is not None:
        trainer.load_state_dict(fetch_state(init_from), init_from, fork=True)
        announce_resume(trainer, init_from, "forked")
    return None


def shared_resume_tag(trainer: Trainer, resumed_at: Optional[int]) -> str:
    """The suffix of this attempt's checkpoint names (distgan.rundir.resume_tag), listed by rank 0 and shared."""
    import torch.distributed as dist

    from kernels.collectives import collective_device

    box = [RunDir.of(trainer.cfg).resume_tag(resumed_at) if trainer.rank == 0 else None]
    if trainer.distributed:
        dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


# Seconds between progress-bar updates. A terminal redraws one line in place; a log (`ray job submit`, a
# redirect, a scheduler's output file) keeps every update, so it gets one now and then.
PROGRESS_EVERY_S = {"terminal": 1.0, "log": 30.0}


def progress_every_s(stream=None) -> float:
    """PROGRESS_EVERY_S for `stream` (the driver's stderr by default), where the bar is drawn."""
    return PROGRESS_EVERY_S["terminal" if (stream or sys.stderr).isatty() else "log"]


class Progress:
    """Rank 0's progress bar: losses and global images/s. `bar` is a tqdm class (Ray's draws on the driver)."""

    def __init__(self, trainer: Trainer, bar):
        self.bar = bar(total=int(trainer.total_steps), desc="steps", unit="step")
        self.bar.n = trainer.step
        self.t0, self.n0, self.cfg = time.perf_counter(), trainer.step, trainer.cfg

    def __call__(self, step: int, means: dict[str, float]) -> None:
        rate = (step - self.n0) * self.cfg.images_per_g_step / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_description(f"loss_d {means['loss_d']:.3f} loss_g {means['loss_g']:.3f} {rate:.0f} img/s")
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
