"""When things happen in a run: the learning-rate schedule's factor, and "checkpoint or evaluate now?".

Pure functions of the step, the epoch and the flags (plus one clock for --checkpoint-every-minutes), so a
resumed run makes the same decisions at the same steps without saved state.
"""

from __future__ import annotations

import math
import time


def lr_factor(step: int, total: int, decay_start: float) -> float:
    """The multiplier for the step after `step` G steps: 1 until start = floor(decay_start x total), then
    (total - step) / (total - start), down to 1/(total - start) at the last step (pix2pix's linear decay to
    zero; the last step still learns). A step past the end keeps the last step's rate."""
    start = math.floor(decay_start * total)
    step = min(step, total - 1)
    if step < start:
        return 1.0
    return (total - step) / (total - start)


class CheckpointPolicy:
    """Decides, after each G step, whether to checkpoint and whether to evaluate (torchtitan's `_should_save`).

    Checkpoint: at the end of the schedule, on a stop, every --checkpoint-every epochs, every
    --checkpoint-every-steps steps, and when --checkpoint-every-minutes have passed since the last one (rank 0's
    clock; the Trainer shares that flag with every rank in its one all-reduce a step). At most one a step,
    whatever asked for it. Evaluate: at the end, with every epoch checkpoint, and every --eval-every epochs.
    """

    def __init__(self, cfg, rank: int, total_steps: float):
        self.cfg, self.rank, self.total_steps = cfg, rank, total_steps
        self.last_checkpoint = time.perf_counter()

    def time_due(self) -> bool:
        """Rank 0's view of the time trigger (the other ranks learn it from the step's all-reduce)."""
        minutes = self.cfg.checkpoint_every_minutes
        return self.rank == 0 and minutes > 0 and time.perf_counter() - self.last_checkpoint >= 60 * minutes

    def decide(self, step: int, epoch: int, epoch_finished: bool, time_due: bool, stop: bool) -> tuple[bool, bool]:
        """(checkpoint now?, evaluate now?) after G step `step`; `epoch` counts the epochs finished."""
        cfg, done = self.cfg, step >= self.total_steps
        epoch_ckpt = epoch_finished and epoch % cfg.checkpoint_every == 0
        step_ckpt = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0
        checkpoint = done or stop or epoch_ckpt or step_ckpt or time_due
        evaluate = done or epoch_ckpt or (epoch_finished and cfg.eval_every > 0 and epoch % cfg.eval_every == 0)
        return checkpoint, evaluate

    def checkpointed(self) -> None:
        self.last_checkpoint = time.perf_counter()
