"""What every driver (distgan.train on Ray, distgan.local without it) does before and around its workers: the
checks that run before any worker starts, in one order, and the stop signals.

checked_run is the pre-flight: the data and the schedule, the run directory's claim, the checkpoint the run resumes
or forks from (the driver chooses it and hands it to the workers) and the flags and data against it. What depends
on where the workers run (the cluster's GPUs, the workers' sizing) is checked by each driver once it knows.
distgan.tune runs the same checks of the data once and of the schedule for every trial it can reach.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator, NamedTuple, Optional

from distgan import fork, runs
from distgan.cluster import STOP_SIGNALS
from distgan.config import TrainConfig, check_schedule
from distgan.rundir import Found, RunDir


class Checked(NamedTuple):
    data: dict  # distgan.data.dataset_fingerprint's: what the run trains on
    found: Optional[Found]  # the checkpoint the run resumes from, None for a new run
    parent: Optional[Found] = None  # the checkpoint a new run forks from (--init-from, distgan.fork)

    @property
    def start(self) -> Optional[Found]:
        """The checkpoint the workers load: the run's own, else the one it forks from."""
        return self.found or self.parent


def check_inputs(cfg: TrainConfig) -> dict:
    """The data (readable, decodable, or a prepared dataset's manifest and checksums) and the schedule against its
    size; returns what the run trains on (distgan.data.check_data). Raises ConfigError (DataError) naming the flag."""
    from distgan.data import check_data  # torch is imported from here on, not before: a bad flag is reported fast

    data = check_data(cfg)
    check_schedule(cfg, data["images"])
    return data


@contextlib.contextmanager
def checked_run(cfg: TrainConfig, ray_record: bool) -> Iterator[Checked]:
    """The pre-flight of one run, holding the run directory's claim (distgan.runs.RunClaim) for the block: the
    inputs (check_inputs); the checkpoint the run resumes from, the newest that validates (`ray_record`: Ray
    Train's record of the run is mended to name it, distgan.runs.reconcile_run; else RunDir.resume_point); for a
    new run, the checkpoint it forks from (--init-from, distgan.fork.parent_checkpoint); the flags and the data
    against the checkpoint the workers load (check_resume, check_same_data). A stop note left by an earlier run is
    removed. Raises ConfigError / LaunchError before any worker starts."""
    data = check_inputs(cfg)
    with runs.RunClaim(cfg):
        found = runs.reconcile_run(cfg) if ray_record else RunDir.of(cfg).resume_point()
        checked = Checked(data, found, fork.parent_checkpoint(cfg, found))
        runs.check_resume(cfg, checked.start, fork=checked.parent is not None)
        runs.check_same_data(cfg, checked.start, data, fork=checked.parent is not None)
        RunDir.of(cfg).pop_stop_note()  # a note left by an earlier run is stale now
        yield checked


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once. `signum` is the signal (the exit code is 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnInterrupt:
    """The first Ctrl-C (SIGINT), SIGTERM (`kill`, `timeout`, `ray job stop`, Kubernetes, SLURM, systemd) or SIGHUP
    (the terminal or SSH session closed) asks the workers to stop at the next step boundary and write a checkpoint
    (a note in the run directory that rank 0 polls); a second one stops at once (StopNow). `signum` is the first
    signal's number, 0 before any. A signal sent to every process of the job reaches the driver alone: a local
    Ray instance's processes block these signals (distgan.cluster.STOP_SIGNALS)."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.signum, self.previous = cfg, 0, {}

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise StopNow(signum)
        self.signum = signum
        what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else f"{signal.Signals(signum).name} again"
        try:
            RunDir.of(self.cfg).request_stop()
        except OSError as e:  # storage unreachable: the workers cannot hear us, only a hard stop is left
            say(f"\n{what}: cannot leave the stop request in the run directory ({e}); {again} to stop at once")
            return
        say(f"\n{what}: the workers stop at the next step and write a checkpoint; {again} to stop at once")

    def clear(self) -> None:
        """Removes a request left by an earlier submission (or this one, once served)."""
        try:
            RunDir.of(self.cfg).clear_stop_request()
        except OSError:  # unreachable storage: the driver's other reads say so; a stale request cannot be read
            pass

    def __enter__(self) -> "StopOnInterrupt":
        self.clear()
        # Ray's driver installs a SIGTERM handler of its own (in C++: a stack dump, then abort, exit 134), which
        # Python's signal.signal replaces; getsignal cannot return it, so it is not restored afterwards
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.clear()


def say(text: str, stream=None) -> None:
    """print() to stderr (or `stream`) that outlives its terminal: after SIGHUP the terminal may be gone, and a
    write to it fails (EIO), which must not end the graceful stop or lose the exit code."""
    try:
        print(text, file=stream or sys.stderr, flush=True)
    except OSError:
        pass


def stop_now(signum, frame) -> None:
    """A signal handler: stop at once (before the workers train there is nothing to checkpoint)."""
    raise StopNow(signum)
