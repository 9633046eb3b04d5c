"""A fork: a new run, under its own --name, that starts from another run's checkpoint (--init-from) with this
run's hyper-parameters. The driver resolves --init-from here, before any worker starts, to the one checkpoint the
workers load; what a fork keeps of it and what it takes from its own flags is Trainer.load_state_dict(fork=True),
and whether it fits this run's flags is distgan.runs.check_resume(fork=True).

Importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Optional

from distgan import storage
from distgan.config import ConfigError, TrainConfig, config_from_dict
from distgan.rundir import CHECKPOINT_NAME, Found, RunDir


def parent_checkpoint(cfg: TrainConfig, found: Optional[Found], log=print) -> Optional[Found]:
    """The checkpoint this run forks from, None when it does not fork. `found` is the run's own checkpoint: a run
    that has one resumes from it and ignores --init-from (said in one line), so that resubmitting a fork after a
    crash resumes the fork instead of forking again.

    --init-from is a checkpoint directory, or a run directory for its newest valid checkpoint (RunDir.resume_point).
    Sets cfg.init_from to the chosen checkpoint's location, so the run's config, its W&B run and its checkpoints name
    the exact parent; on a resume, to what the run recorded when it forked. Raises ConfigError naming --init-from
    for a location in this run's own directory, one that does not exist, or one without a checkpoint that
    validates."""
    typed = cfg.init_from
    own = RunDir.of(cfg).location
    if typed is not None and storage.within(typed, own):
        raise ConfigError(f"--init-from: {typed} is in this run's own directory ({own}); a fork is a new run: give "
                          f"it another --name (the same --name resumes)", field="init_from")
    if found is not None:
        if typed is not None:
            log(f"note: run {cfg.name} has checkpoints of its own: it resumes from {found.location} and ignores "
                f"--init-from")
        cfg.init_from = config_from_dict(found.state["config"]).init_from
        return None
    if typed is None:
        return None
    try:
        parent = _read_parent(typed, log)
    except OSError as e:  # unreachable storage, missing credentials
        raise ConfigError(f"--init-from: cannot read {typed} ({storage.first_line(e)})", field="init_from") from None
    cfg.init_from = parent.location
    return parent


def _read_parent(location: str, log) -> Found:
    from distgan.checkpoint import STATE_FILE, CheckpointError, fetch_state

    if CHECKPOINT_NAME.fullmatch(storage.basename(location)) or storage.exists(storage.join(location, STATE_FILE)):
        try:
            return Found(location, fetch_state(location))
        except CheckpointError as e:
            raise ConfigError(f"--init-from: {e}", field="init_from") from None
    if not storage.exists(location):
        raise ConfigError(f"--init-from: {location} does not exist", field="init_from")
    parent = RunDir.at(location).resume_point(log)
    if parent is None:
        raise ConfigError(f"--init-from: {location} holds no checkpoint that validates (give a checkpoint directory, "
                          f"which holds {STATE_FILE}, or a run directory, which holds checkpoint_<step> "
                          f"directories)", field="init_from")
    return parent
