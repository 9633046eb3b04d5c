"""One run's directory, on a local disk, NFS or an object store (s3://): where it is, what its checkpoints are
called and in which order they come, the newest one that validates, the driver's stop request and the workers'
stop note, Ray Train's record of the kept checkpoints and the metric it ranks them by.

Every reader and writer of a run directory goes through RunDir; distgan.storage does the I/O. Layout:
    checkpoint_<step>[_resume<step>[.n]]/state.pt   checkpoints (distgan.checkpoint's format)
    checkpoint_manager_snapshot.json                Ray Train's record of the kept checkpoints (RAY_SNAPSHOT)
    stop_requested                                  the driver's stop request; rank 0 polls it
    stopped.json                                    {"reason": ...} when the workers stopped early
    metrics.jsonl, samples/, curves.png, wandb/     the Tracker's (distgan.tracking)
    summary.json                                    the driver's summary at the end (storage.SUMMARY_FILE)
Importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

from distgan import storage

# checkpoint_dir_name(): checkpoint_<step>, plus _resume<step>[.n] in a resumed attempt
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d{8})(?:_resume(\d{8})(?:\.(\d+))?)?")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the kept checkpoints and their metrics
STOP_REQUEST_FILE = "stop_requested"
STOP_FILE = "stopped.json"
STOP_POLL_S = {"local": 0.5, "remote": 5.0}  # a stat is free; an s3:// HEAD request is not

# Ray keeps the best --num-to-keep checkpoints by this metric (order "min"), reported with every checkpoint of
# every run whatever --eval-every was: an evaluated checkpoint's FID, else UNSCORED, worse than any FID and
# finite. Ray ranks a checkpoint that lacks the metric as the best in "min" order, and writes inf or nan to
# its snapshot as JSON null, which it cannot rank when the run resumes.
RANK_METRIC = "fid_rank"
UNSCORED = 1e300


def rank_of(metrics: dict[str, Any]) -> float:
    """RANK_METRIC's value for a checkpoint reported with `metrics`: its FID when finite, else UNSCORED."""
    fid = metrics.get("fid")
    finite = isinstance(fid, (int, float)) and not isinstance(fid, bool) and math.isfinite(fid)
    return float(fid) if finite else UNSCORED


def checkpoint_dir_name(step: int, tag: str) -> str:
    return f"checkpoint_{step:08d}" + (f"_{tag}" if tag else "")


def checkpoint_order(name: str) -> tuple[int, int, int]:
    """Newest last: by step, then a resumed attempt's checkpoint after the original at the same step."""
    m = CHECKPOINT_NAME.fullmatch(name)
    return (int(m[1]), int(m[2]) if m[2] else -1, int(m[3] or 1)) if m else (-1, -1, -1)


def resume_tag(existing: list[str], resumed_at: Optional[int]) -> str:
    """The suffix of a resumed attempt's checkpoint names: `resume<step>`, plus `.<n>` when an earlier attempt
    resumed from the same step (after a fall-back). A name is never reused: Ray's clean-up of an old record
    would delete the new checkpoint that took its name."""
    if resumed_at is None:
        return ""
    tag = f"resume{resumed_at:08d}"
    earlier = {name.split(f"_{tag}", 1)[1].split("_")[0] for name in existing if f"_{tag}" in name}
    n = 1
    while (f".{n}" if n > 1 else "") in earlier:
        n += 1
    return tag + (f".{n}" if n > 1 else "")


class Found(NamedTuple):
    """A checkpoint that validated: its location (a local path or a URI) and its state (distgan.checkpoint)."""
    location: str
    state: dict[str, Any]


class NewestValid(NamedTuple):
    name: Optional[str]  # the newest checkpoint that validates, None when none does
    state: Optional[dict[str, Any]]
    skipped: list[str]  # the newer ones that do not validate, newest first


class RunDir:
    """The run directory `<storage_path>/<name>` (distgan.storage.join keeps a URI's ?query last)."""

    def __init__(self, storage_path: str, name: str):
        self.storage_path, self.name = storage_path, name
        self.location = storage.join(storage_path, name)

    @classmethod
    def of(cls, cfg) -> "RunDir":
        """The run directory of a TrainConfig (its storage_path and name)."""
        return cls(cfg.storage_path, cfg.name)

    @classmethod
    def at(cls, location: str) -> "RunDir":
        """The run directory at `location`, a local path or a URI."""
        return cls(storage.parent(location), storage.basename(location))

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    @property
    def remote(self) -> bool:
        return storage.is_uri(self.location)

    def join(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, tag: str = "") -> str:
        """The location of the checkpoint directory of `step` in an attempt whose names end in `tag`."""
        return self.join(checkpoint_dir_name(step, tag))

    def checkpoint_names(self) -> list[str]:
        """The checkpoint directory names, oldest first (checkpoint_order); [] when the run directory does not
        exist. Unreachable or malformed storage raises OSError or ValueError."""
        from pyarrow.fs import FileType

        return sorted((e.base_name for e in storage.entries(self.location)
                       if e.type == FileType.Directory and CHECKPOINT_NAME.fullmatch(e.base_name)),
                      key=checkpoint_order)

    def newest_checkpoint(self) -> Optional[str]:
        """The location of the newest checkpoint directory, validated or not; None when there is none."""
        names = [n for n in storage.list_names(self.location) if CHECKPOINT_NAME.fullmatch(n)]
        return self.join(max(names, key=checkpoint_order)) if names else None

    def resume_tag(self, resumed_at: Optional[int]) -> str:
        """resume_tag() against the names already in this run directory."""
        return resume_tag(storage.list_names(self.location), resumed_at)

    def newest_valid(self, names: list[str], log=print) -> NewestValid:
        """The walk every resume takes: the newest of `names` (checkpoint_names) whose state validates
        (distgan.checkpoint.fetch_state), warning about each newer one skipped."""
        from distgan.checkpoint import CheckpointError, fetch_state

        skipped: list[str] = []
        for name in sorted(names, key=checkpoint_order, reverse=True):
            try:
                state = fetch_state(self.join(name) if self.remote else Path(self.join(name)))
            except CheckpointError as e:
                log(f"WARNING: skipping checkpoint: {e}")
                skipped.append(name)
                continue
            return NewestValid(name, state, skipped)
        return NewestValid(None, None, skipped)

    def resume_point(self, log=print) -> Optional[Found]:
        """The checkpoint a run resumes from: the newest that validates; None for a new run, a run with no valid
        checkpoint, or storage that cannot be listed (warned: the workers report it)."""
        try:
            names = self.checkpoint_names()
        except (OSError, ValueError) as e:
            log(f"WARNING: cannot list {self.location} to check its checkpoints before resuming "
                f"({storage.first_line(e)})")
            return None
        found = self.newest_valid(names, log)
        return Found(self.join(found.name), found.state) if found.name else None

    # ------------------------------------------------------------------ the driver's stop request, the workers' note

    def request_stop(self) -> None:
        storage.write_bytes(self.join(STOP_REQUEST_FILE), b"stop")

    def clear_stop_request(self) -> None:
        storage.delete(self.join(STOP_REQUEST_FILE))

    def stop_requested(self) -> bool:
        return storage.exists(self.join(STOP_REQUEST_FILE))

    def write_stop_note(self, reason: str) -> None:
        storage.write_bytes(self.join(STOP_FILE), json.dumps({"reason": reason}).encode())

    def pop_stop_note(self) -> Optional[str]:
        """Reads and removes the stop note (a resubmission must not inherit an old one)."""
        note = self.join(STOP_FILE)
        data = storage.read_bytes(note)
        if data is None:
            return None
        storage.delete(note)
        return json.loads(data.decode())["reason"]

    # ------------------------------------------------------------------ Ray Train's record and the ranking

    @property
    def ray_snapshot(self) -> str:
        return self.join(RAY_SNAPSHOT)

    def checkpoint_fids(self, names: list[str]) -> dict[str, float]:
        """FID of each evaluated checkpoint among `names`. First Ray's snapshot, which holds the metrics reported
        with each kept checkpoint, by directory name (an unevaluated one has fid inf); then, for checkpoints it
        does not name, the run's metrics.jsonl eval rows at the checkpoint's step (the last row of a step wins: a
        rollback or resume evaluates the same step again)."""
        fids: dict[str, float] = {}
        try:
            snapshot = json.loads(storage.read_bytes(self.ray_snapshot) or "{}")
        except json.JSONDecodeError:
            snapshot = {}  # a snapshot from another Ray version or torn: metrics.jsonl still has the FIDs
        if isinstance(snapshot, dict):
            results = list(snapshot.get("checkpoint_results") or []) + [snapshot.get("latest_checkpoint_result")]
            for result in filter(None, results):
                fid = _finite((result.get("metrics") or {}).get("fid"))
                if fid is not None and result.get("checkpoint_dir_name") in names:
                    fids[result["checkpoint_dir_name"]] = fid
        by_step = {}
        for row in storage.read_metrics(self.location):
            if row.get("kind") == "eval" and isinstance(row.get("step"), int) and _finite(row.get("fid")) is not None:
                by_step[row["step"]] = row["fid"]
        for name in names:
            step = checkpoint_order(name)[0]
            if name not in fids and step in by_step:
                fids[name] = by_step[step]
        return fids


def _finite(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class StopRequest:
    """should_stop for Trainer.fit: rank 0 polls the run directory for the driver's stop request (every
    STOP_POLL_S seconds at most); fit() shares the answer with every rank."""

    def __init__(self, run: RunDir, rank: int):
        self.run, self.rank, self.last = run, rank, 0.0

    def __call__(self) -> bool:
        every = STOP_POLL_S["remote" if self.run.remote else "local"]
        if self.rank != 0 or time.monotonic() - self.last < every:
            return False
        self.last = time.monotonic()
        try:
            return self.run.stop_requested()
        except OSError:
            return False
