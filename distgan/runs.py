"""One run, one driver, one record: the driver's bookkeeping of a run directory before Ray reads it.

RunClaim keeps a second driver off a run that a live one holds; check_resume refuses flags that would change
what the run's newest checkpoint means; reconcile_run makes Ray's record of the run agree with the checkpoint
directories that exist and validate, and says which one the run resumes from.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from distgan import storage
from distgan.config import ConfigError, LaunchError, TrainConfig, config_from_dict
from distgan.rundir import RANK_METRIC, Found, RunDir, rank_of

# One live driver per run: two would interleave checkpoint names, Ray's snapshot, metrics.jsonl and the stop
# request. The driver holds a claim file in the run directory and rewrites it every CLAIM_HEARTBEAT_S; a
# claim is a dead driver's when its process is gone (same host) or it was not rewritten for CLAIM_STALE_S
# (another host, whose processes this one cannot see).
CLAIM_FILE = "driver_claim.json"
CLAIM_HEARTBEAT_S = 30.0
CLAIM_STALE_S = 150.0  # five missed heartbeats: longer than any pause of a live driver's heartbeat thread


def _process_start(pid: int) -> Optional[str]:
    """The start time of a process in clock ticks since boot (Linux /proc), to tell a live claimant from a new
    process that reuses its pid; None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


class RunClaim:
    """The run directory's claim by this driver: `acquire` refuses (LaunchError) while another live driver holds
    it, and takes over a stale one; `release` removes it. Local storage creates the file exclusively (O_EXCL);
    an object store has no exclusive create in pyarrow, so there the claim is written and read back."""

    def __init__(self, cfg: TrainConfig):
        import socket
        import uuid

        self.cfg = cfg
        self.run = RunDir.of(cfg).location
        self.path = storage.join(self.run, CLAIM_FILE)
        self.mine = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "boot_id": _boot_id(),
                     "pid": os.getpid(), "pid_start": _process_start(os.getpid()), "started": time.time(),
                     "command": shlex.join(["python", "-m", "distgan.train", *sys.argv[1:]])}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._made: Optional[Path | bool] = None

    def _read(self) -> Optional[dict]:
        """The claim in the run directory: None when there is none, {} when it is torn or not a claim (a claim
        nobody can prove is live)."""
        data = storage.read_bytes(self.path)
        if data is None:
            return None
        try:
            claim = json.loads(data.decode())
        except ValueError:
            return {}
        return claim if isinstance(claim, dict) else {}

    def _write(self, exclusive: bool = False) -> None:
        data = json.dumps({**self.mine, "heartbeat": time.time()}).encode()
        if exclusive and not storage.is_uri(self.path):
            if self._made is None:  # the outermost directory this claim creates, removed with it while empty
                made = [p for p in (Path(self.run), *Path(self.run).parents) if not p.exists()]
                self._made = made[-1] if made else False
            Path(self.run).mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # FileExistsError: taken
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return
        storage.write_bytes(self.path, data)  # atomic on a local disk; one PUT on an object store

    def _remove_stale(self) -> bool:
        """Removes a dead driver's claim; False when another taker removed it first. On a local disk it is renamed
        aside first, so that of two takers only one succeeds."""
        if storage.is_uri(self.path):
            return storage.delete(self.path)
        aside = f"{self.path}.stale-{self.mine['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return True

    def live(self, claim: dict) -> bool:
        """Whether the driver that wrote `claim` may still be running."""
        if not claim:
            return False
        same_machine = claim.get("host") == self.mine["host"] and claim.get("boot_id") == self.mine["boot_id"]
        if same_machine and isinstance(claim.get("pid"), int):
            start = _process_start(claim["pid"])
            if start is None:
                try:
                    os.kill(claim["pid"], 0)
                except ProcessLookupError:
                    return False
                except PermissionError:
                    return True
                return True
            return claim.get("pid_start") in (None, start)
        heartbeat = claim.get("heartbeat")
        return isinstance(heartbeat, (int, float)) and time.time() - heartbeat < CLAIM_STALE_S

    def _refuse(self, claim: dict) -> LaunchError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.get("started", 0)))
        return LaunchError(f"run {self.cfg.name} is in use by another driver (pid {claim.get('pid')} on "
                           f"{claim.get('host')}, since {since}; claim {self.path}); let it "
                           f"finish or stop it, or train under another --name")

    def acquire(self) -> "RunClaim":
        try:
            return self._acquire()
        except OSError as e:
            raise LaunchError(f"--storage-path: cannot claim run {self.cfg.name} at {self.run} for this driver "
                              f"({storage.first_line(e)})") from None

    def _acquire(self) -> "RunClaim":
        for _ in range(3):
            claim = self._read()
            if claim is not None and self.live(claim):
                raise self._refuse(claim)
            if claim is not None and not self._remove_stale():
                continue  # another driver took it over first; look again
            try:
                self._write(exclusive=True)
            except FileExistsError:
                continue
            if (self._read() or {}).get("token") == self.mine["token"]:
                break
        else:
            raise self._refuse(self._read() or {})
        self._thread = threading.Thread(target=self._heartbeat, name="run-claim", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(CLAIM_HEARTBEAT_S):
            try:
                self._write()
            except OSError:  # storage briefly unreachable: the next beat tries again
                pass

    def release(self) -> None:
        """Removes the claim, and the directories acquire created if nothing else was written in them (a run
        refused before training leaves no empty run directory behind)."""
        self._stop.set()
        try:
            if (self._read() or {}).get("token") == self.mine["token"]:
                storage.delete(self.path)
        except OSError:
            pass
        if self._made:
            for directory in (Path(self.run), *Path(self.run).parents):
                try:
                    directory.rmdir()  # only an empty directory: anything written since is kept
                except OSError:
                    break
                if directory == self._made:
                    break

    def __enter__(self) -> "RunClaim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_resume(cfg: TrainConfig, found: Optional[Found], fork: bool = False) -> None:
    """Refuses a resubmission whose flags would change what the run's newest checkpoint means: the model's
    shape at any position; the data position's meaning (seed, batch, D steps, workers) mid-epoch. At an
    epoch boundary there is no position to misread, so those may change there. `fork`: `found` is the checkpoint
    a new run starts from (--init-from, distgan.fork), held to the same rules."""
    from distgan.checkpoint import POSITION_FIELDS, model_mismatch

    if found is None:
        return
    where, state = found
    saved = config_from_dict(state["config"])
    mismatch = model_mismatch(saved, cfg)  # what the workers' check_compatible compares
    if mismatch:
        key, before, now = mismatch
        if fork:
            raise ConfigError(f"--init-from: {where} was checkpointed with {key}={before!r}; this run has {now!r}, "
                              f"which changes the model; a fork keeps its parent's --{key.replace('_', '-')}",
                              field="init_from")
        raise ConfigError(f"--{key.replace('_', '-')}: run {cfg.name} was checkpointed with {key}={before!r} "
                              f"({where}); this run has {now!r}, which changes the model; resubmit with "
                              f"{before!r} or use a new --name", field=key)
    g_steps_into_epoch = state.get("g_steps_into_epoch", 0)
    if not g_steps_into_epoch:
        return
    position = f"mid-epoch (epoch {state.get('epoch')}, G step {g_steps_into_epoch})"
    for key in POSITION_FIELDS:
        before = state.get("world_size", saved.num_workers) if key == "num_workers" else getattr(saved, key)
        now = getattr(cfg, key)
        flag = f"--{key.replace('_', '-')}"
        if now is None or before == now:  # None: auto, checked again once decided
            continue
        if fork:
            raise ConfigError(f"--init-from: {where} was checkpointed {position} with {key}={before!r}; this run "
                              f"has {now!r}, which changes what that data position means; fork with {flag} "
                              f"{before!r}, or from a checkpoint at an epoch's end", field="init_from")
        raise ConfigError(f"{flag}: run {cfg.name} was checkpointed {position} with {key}={before!r}; this run has "
                          f"{now!r}, which changes what that data position means; resubmit with {before!r}, "
                          f"or use a new --name", field=key)


def check_same_data(cfg: TrainConfig, found: Optional[Found], data: dict, log=print, fork: bool = False) -> None:
    """Refuses to resume mid-epoch on other data than the newest checkpoint trained on (its data position would
    index another set of images); at an epoch boundary the run goes on with the data as it is, with a note.
    `data` is distgan.data.dataset_fingerprint's; a checkpoint that does not record its data is not checked.
    `fork`: `found` is the checkpoint a new run starts from (--init-from)."""
    if found is None or not found[1].get("data"):
        return
    where, state = found
    saved = state["data"]
    if saved["fingerprint"] == data["fingerprint"]:
        return
    flag = "--data-root" if cfg.data_root else "--dataset"
    source = cfg.data_root or cfg.dataset
    if saved["images"] != data["images"]:
        what = f"{saved['images']} training images then, {data['images']} now"
    else:
        what = f"{data['images']} training images then and now, but other files or contents"
    g_steps_into_epoch = state.get("g_steps_into_epoch", 0)
    if g_steps_into_epoch and fork:
        raise ConfigError(f"--init-from: {where} was checkpointed mid-epoch (epoch {state.get('epoch')}, G step "
                          f"{g_steps_into_epoch}) on other data than {source} holds ({what}), so its data position "
                          f"means nothing here; fork from a checkpoint at an epoch's end, or train on its data",
                          field="init_from")
    if g_steps_into_epoch:
        raise ConfigError(f"{flag}: run {cfg.name} was checkpointed mid-epoch (epoch {state.get('epoch')}, G step "
                          f"{g_steps_into_epoch}; {where}) on other data than {source} holds now ({what}), so its "
                          f"data position means nothing here; restore the data it trained on, or use a new --name",
                          field="data_root" if cfg.data_root else "dataset")
    if fork:
        log(f"note: --init-from: {where} trained on other data than {source} holds ({what}); that checkpoint ends "
            f"an epoch, so the fork trains on the data as it is now")
        return
    log(f"note: run {cfg.name}: the data in {source} changed since {where} ({what}); that checkpoint ends an "
        f"epoch, so training goes on with the data as it is now")


def reconcile_run(cfg: TrainConfig, log=print) -> Optional[Found]:
    """Makes Ray's record of the run (checkpoint_manager_snapshot.json) agree with the run directory before Ray
    reads it; returns (location, state) of the checkpoint the run resumes from, or None for a new run.

    Ray resumes from its record's latest checkpoint, refuses a record that names a missing directory, and
    without a record starts from step 0 and writes over the directories that exist. The two disagree when a
    directory was deleted (a person, a lifecycle rule, a lost disk) or a run ended before Ray registered its
    last checkpoint. So the run resumes from the newest checkpoint directory that exists and validates (the
    workers' load_state); newer ones that do not are skipped with a warning (resumed attempts name their
    checkpoints apart, so none is written over). The record is rewritten, checked against Ray's own schema,
    to name only existing directories, with that checkpoint as the latest and every RANK_METRIC finite.

    Raises LaunchError when the run has checkpoints, on disk or in the record, and none validates: a run is
    never started again from step 0 under its name."""
    run = RunDir.of(cfg)
    record_path = run.ray_snapshot
    listed = _read_run(run, log)
    if listed is None:
        return None
    names, snapshot = listed
    recorded = [r.get("checkpoint_dir_name") for r in (snapshot or {}).get("checkpoint_results") or []]
    latest = ((snapshot or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    target, state, skipped = run.newest_valid(names, log)
    if target is None:
        if not names and not recorded:
            return None
        what = (f"none of its {len(names)} checkpoints validates" if names else
                f"Ray's record names {', '.join(map(str, recorded))}, and none of them is in {run.location}")
        raise LaunchError(f"run {cfg.name}: {what}; a run is not started again from step 0 under its name: "
                          f"restore a checkpoint, or train under another --name")
    kept, current = _kept_entries(run, snapshot, names, skipped, target, state)
    wanted = _rebuilt_record(snapshot, kept, current, target)
    if wanted != snapshot:
        _write_ray_record(record_path, wanted)
    why = _resume_reason(snapshot, names, recorded, latest, target, skipped)
    if why:
        log(f"run {cfg.name}: resuming from {target}, the newest checkpoint that exists and validates ({why})")
    return Found(run.join(target), state)


def _read_run(run: RunDir, log) -> Optional[tuple[list[str], Optional[dict]]]:
    """The run's checkpoint directory names, oldest first, and Ray's record of the run (None when it is missing
    or torn); None when the run directory cannot be read."""
    record_path = run.ray_snapshot
    try:
        names = run.checkpoint_names()
        raw = storage.read_bytes(record_path)
    except (OSError, ValueError) as e:  # unreachable or malformed storage: Ray Train reports it on its own
        log(f"WARNING: cannot list {run.location} to check its checkpoints before resuming ({storage.first_line(e)})")
        return None
    snapshot = None
    if raw is not None:
        try:
            snapshot = json.loads(raw)
        except ValueError:
            log(f"WARNING: {record_path} is not JSON (torn); rebuilt from the run directory")
    return names, snapshot if isinstance(snapshot, dict) else None


def _kept_entries(run: RunDir, snapshot: Optional[dict], names: list[str], skipped: list[str], target: str,
                  state: dict) -> tuple[dict[str, tuple[dict, int]], int]:
    """The record's entries that exist and validate (or were not looked at: older than the target), and the
    target: {name: (metrics with a finite RANK_METRIC, report index)}, and the record's next report index."""
    results = list((snapshot or {}).get("checkpoint_results") or [])
    indices = list((snapshot or {}).get("checkpoint_report_indices") or [])
    if len(indices) != len(results):
        indices = list(range(len(results)))
    current = int((snapshot or {}).get("current_report_index") or 0)
    kept = {r["checkpoint_dir_name"]: (dict(r.get("metrics") or {}), i) for r, i in zip(results, indices)
            if r.get("checkpoint_dir_name") in names and r.get("checkpoint_dir_name") not in skipped}
    if target not in kept:
        kept[target] = ({"step": state.get("step")}, max([current, *indices], default=-1) + 1)
        current = kept[target][1] + 1
    fids = run.checkpoint_fids(list(kept))
    for name, (metrics, _) in kept.items():
        rank = metrics.get(RANK_METRIC)
        if not (isinstance(rank, (int, float)) and math.isfinite(rank)):
            metrics[RANK_METRIC] = rank_of({"fid": fids.get(name)})
    return kept, current


def _rebuilt_record(snapshot: Optional[dict], kept: dict[str, tuple[dict, int]], current: int, target: str) -> dict:
    """Ray's record naming only the `kept` checkpoints, with `target` as the latest; the rest of `snapshot` kept."""
    import ray

    # Ray keeps its list in ascending order of its key, (True, -rank) for "min": worst first, ties by report order
    order = sorted(kept, key=lambda n: (-kept[n][0][RANK_METRIC], kept[n][1]))

    def entry(name: str) -> dict:
        return {"version": 0, "checkpoint_dir_name": name, "metrics": kept[name][0]}

    pending = [(r, spec) for r, spec in zip((snapshot or {}).get("pending_training_results") or [],
                                            (snapshot or {}).get("pending_validation_specs") or [])
               if r.get("checkpoint_dir_name") in kept]
    return {
        **(snapshot or {"ray_version": ray.__version__}),
        "checkpoint_results": [entry(n) for n in order],
        "checkpoint_report_indices": [kept[n][1] for n in order],
        "latest_checkpoint_result": entry(target),
        "pending_training_results": [entry(r["checkpoint_dir_name"]) for r, _ in pending],
        "pending_validation_specs": [spec for _, spec in pending],
        "current_report_index": current,
        **{key: [n for n in (snapshot or {}).get(key) or [] if n in kept] for key in (
            "validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
            "failed_validation_checkpoint_dir_names")},
    }


def _resume_reason(snapshot: Optional[dict], names: list[str], recorded: list, latest: Optional[str], target: str,
                   skipped: list[str]) -> str:
    """Why the run resumes from `target` rather than from Ray's latest, and what was dropped from Ray's record;
    "" when Ray's record already agreed."""
    missing = [n for n in dict.fromkeys([*recorded, latest]) if n and n not in names]
    if snapshot is None:
        why = "Ray's record of the run was missing or torn; rebuilt it from the run directory"
    elif latest == target:
        why = ""
    elif latest in missing:
        why = f"Ray's latest, {latest}, is missing"
    elif latest in skipped:
        why = f"Ray's latest, {latest}, does not validate"
    else:
        why = f"Ray had not registered it (its latest was {latest})"
    others = [n for n in missing if n != latest]
    if others:
        why += f"{'; ' if why else ''}dropped missing {', '.join(others)} from Ray's record"
    return why


def _write_ray_record(location: str, record: dict) -> None:
    """Writes Ray Train's checkpoint_manager_snapshot.json after checking it against Ray's own schema (what its
    controller parses on start), so a record Ray cannot read is never left behind."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    _CheckpointManagerState.model_validate(record)
    storage.write_bytes(location, json.dumps(record, allow_nan=False).encode())
