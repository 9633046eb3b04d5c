"""What a training process does around the Trainer, under Ray (distgan/loop.py) or not (distgan/local.py): the
tracker, the resumed attempt's checkpoint names, the driver's stop request, the stop note, the progress bar.

Files in the run directory besides the checkpoints and the Tracker's:
    stop_requested   written by the driver on the first Ctrl-C; rank 0 polls it and every rank stops after a
                     checkpoint
    stopped.json     {"reason": ...} when the workers stopped early (a NaN the guard could not recover); the
                     driver reads and removes it (Ray Train hands the driver only checkpointed metrics)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from distgan import storage

if TYPE_CHECKING:  # torch is imported by the training processes, not by the driver that reads the stop note
    from distgan.trainer import Trainer

STOP_REQUEST_FILE = "stop_requested"
STOP_FILE = "stopped.json"
STOP_POLL_S = {"local": 0.5, "remote": 5.0}  # a stat is free; an s3:// HEAD request is not


def run_dir(cfg) -> str:
    return storage.join(cfg.storage_path, cfg.name)


def tracker_factory(cfg, trainer: Callable[[], Trainer]) -> Callable[..., Any]:
    """Rank 0's Tracker for the run directory; `trainer()` gives the Trainer, built after this factory."""

    def build(resumed: bool):
        from distgan.tracking import Tracker

        t = trainer()
        # the W&B config records the precision that runs, not "auto"
        return Tracker(dataclasses.replace(cfg, precision=t.precision), run_dir(cfg), t.world, resumed=resumed,
                       kernel_backend=t.kernel_backend)

    return build


def announce_resume(trainer: Trainer, where: str) -> None:
    print(f"[rank {trainer.rank}] resumed from {where} at step {trainer.step} (epoch {trainer.epoch}, "
          f"G step {trainer.steps_into_epoch} of it)", flush=True)


def shared_resume_tag(trainer: Trainer, resumed_at: Optional[int]) -> str:
    """The suffix of this attempt's checkpoint names (checkpoint.resume_tag), listed by rank 0 and shared."""
    import torch.distributed as dist

    from distgan.checkpoint import resume_tag
    from kernels.collectives import collective_device

    box = [resume_tag(storage.list_names(run_dir(trainer.cfg)), resumed_at) if trainer.rank == 0 else None]
    if trainer.distributed:
        dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


class StopRequest:
    """should_stop for Trainer.fit: rank 0 polls the run directory for the driver's stop request (every
    STOP_POLL_S seconds at most); fit() shares the answer with every rank."""

    def __init__(self, cfg, rank: int):
        self.cfg, self.rank, self.last = cfg, rank, 0.0

    def __call__(self) -> bool:
        every = STOP_POLL_S["remote" if storage.is_uri(self.cfg.storage_path) else "local"]
        if self.rank != 0 or time.monotonic() - self.last < every:
            return False
        self.last = time.monotonic()
        try:
            return storage.exists(storage.join(run_dir(self.cfg), STOP_REQUEST_FILE))
        except OSError:
            return False


def request_stop(cfg) -> None:
    storage.write_bytes(storage.join(run_dir(cfg), STOP_REQUEST_FILE), b"stop")


def clear_stop_request(cfg) -> None:
    storage.delete(storage.join(run_dir(cfg), STOP_REQUEST_FILE))


def write_stop_note(cfg, reason: str) -> None:
    storage.write_bytes(storage.join(run_dir(cfg), STOP_FILE), json.dumps({"reason": reason}).encode())


def pop_stop_note(cfg) -> Optional[str]:
    """Reads and removes the stop note (a resubmission must not inherit an old one)."""
    note = storage.join(run_dir(cfg), STOP_FILE)
    data = storage.read_bytes(note)
    if data is None:
        return None
    storage.delete(note)
    return json.loads(data.decode())["reason"]


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
        rate = (step - self.n0) * self.cfg.batch_size * self.cfg.n_critic / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_description(f"loss_d {means['loss_d']:.3f} loss_g {means['loss_g']:.3f} {rate:.0f} img/s")
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
