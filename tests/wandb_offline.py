"""Reads W&B run files (`run-<id>.wandb`) without a server, for tests.

wandb 0.31 ships no Python reader. The file is a LevelDB-style log (the format of wandb's former
sdk/internal/datastore.py, which wandb-core still writes):

    file header   7 bytes: b":W&B", magic 0xBEE1 (uint16 LE), version 0
    blocks        32 KiB each (the first one includes the file header); a chunk never straddles a block,
                  and a block tail shorter than a chunk header is zero padding
    chunk header  7 bytes: CRC-32 of (type byte + data) (uint32 LE), data length (uint16 LE), type
                  (1 full, 2 first, 3 middle, 4 last)
    record        the concatenated chunk data: one wandb.proto.wandb_internal_pb2.Record

History and summary items carry either `key` or `nested_key` (a path: an image logged as "samples" arrives
as samples._type, samples.path, ...); values are JSON. Rows are rebuilt as nested dicts.

Also here, for the tests that need a real run to read: `isolated_wandb` and `short_tracker_run`.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
MEDIA_TYPES = {"image-file", "images/separated"}  # how a logged wandb.Image appears in history
TABLE_TYPES = {"table-file", "partitioned-table", "joined-table"}
_RUN_DIR = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-")


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yields the Record protobufs of one .wandb file, in order. A torn tail (a run still writing, or
    killed mid-write) ends the iteration; a checksum mismatch in a complete chunk raises ValueError."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise ValueError(f"{path}: too short for a W&B run file")
    ident, magic, version = FILE_HEADER.unpack_from(data)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = FILE_HEADER.size, bytearray()
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:  # zero padding to the next block
            pos += room
            continue
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # preallocated or padded space
            pos += room
            continue
        start, end = pos + CHUNK_HEADER.size, pos + CHUNK_HEADER.size + length
        if end > len(data):
            return
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        pos = end
        if kind in (FULL, FIRST):
            pending = bytearray(chunk)
        elif kind in (MIDDLE, LAST):
            pending += chunk
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(bytes(pending))
            yield record


def _items_to_dict(items, into: dict | None = None) -> dict:
    out = {} if into is None else into
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # a scalar replaced by a nested value
                node = {}
        node[path[-1]] = json.loads(item.value_json)
    return out


def _typed_keys(row: dict, types: set[str]) -> set[str]:
    return {k for k, v in row.items() if isinstance(v, dict) and v.get("_type") in types}


def read_wandb_file(path: str | Path) -> dict[str, Any]:
    """One run file -> {path, run_id, name, project, group, config, history, summary, image_keys,
    table_keys, metric_keys, files, exit_code, complete, offline}. history: one dict per logged step, with
    W&B's `_step`, `_runtime`, `_timestamp` beside the logged keys (nested dicts for media). complete: the
    run's exit record is in the file (it finished, and wandb-core wrote everything out)."""
    run: dict[str, Any] = {"path": Path(path), "run_id": None, "name": None, "project": None, "group": None,
                           "config": {}, "history": [], "summary": {}, "files": [], "exit_code": None,
                           "complete": False, "offline": False}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(run_id=r.run_id, name=r.display_name, project=r.project, group=r.run_group or None)
            _items_to_dict(r.config.update, run["config"])
        elif kind == "config":
            _items_to_dict(record.config.update, run["config"])
        elif kind == "history":
            run["history"].append(_items_to_dict(record.history.item))
        elif kind == "summary":
            _items_to_dict(record.summary.update, run["summary"])
            for item in record.summary.remove:
                run["summary"].pop((list(item.nested_key) or [item.key])[0], None)
        elif kind == "files":
            run["files"] += [f.path for f in record.files.files]
        elif kind == "exit":
            run["exit_code"], run["complete"] = record.exit.exit_code, True
        elif kind == "telemetry" and record.telemetry.feature.offline:
            run["offline"] = True
    run["config"].pop("_wandb", None)
    rows = run["history"]
    run["image_keys"] = sorted(set().union(*(_typed_keys(r, MEDIA_TYPES) for r in rows)))
    run["table_keys"] = sorted(set().union(*(_typed_keys(r, TABLE_TYPES) for r in rows)))
    run["metric_keys"] = sorted({k for r in rows for k in r if not k.startswith("_")})
    return run


def find_run_files(directory: str | Path) -> list[Path]:
    """Every run-*.wandb under a directory, oldest first (by the run directory's timestamp)."""
    files = [p for p in Path(directory).rglob("run-*.wandb") if p.is_file()]

    def started(p: Path) -> tuple[str, float]:
        m = _RUN_DIR.match(p.parent.name)
        return (m.group(1) if m else "", p.stat().st_mtime)

    return sorted(files, key=started)


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """A .wandb file, a run directory, or any directory holding runs (e.g. <run_dir>/wandb).

    Returns the newest run's fields (see read_wandb_file) plus `num_runs` (run files found), `run_ids`
    (distinct ids, in order) and `runs` (every run file's fields, oldest first)."""
    path = Path(path)
    files = [path] if path.is_file() else find_run_files(path)
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {path}")
    runs = [read_wandb_file(f) for f in files]
    ids = list(dict.fromkeys(r["run_id"] for r in runs))
    return {**runs[-1], "num_runs": len(runs), "run_ids": ids, "runs": runs}


# ---------------------------------------------------------------------- producing runs to read

FAKE_KEY = "distganFAKEkey0123456789abcdef0123456789"  # 40 characters like a real key, easy to grep for
WANDB_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_BASE_URL", "WANDB_INIT_TIMEOUT", "WANDB_CONSOLE",
             "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME", "WANDB_RUN_GROUP")
QUALITY = {"fid": 42.0, "kid": 0.5, "kid_std": 0.05, "classifier_score": 6.5, "coverage": 0.9, "diversity": 0.8}


def isolated_wandb(monkeypatch, mode: str | None = None, api_key: str = FAKE_KEY):
    """Fixture body (`yield from isolated_wandb(monkeypatch)`): no W&B settings from the caller's
    environment, and a fake API key that must never reach a file. wandb reads its environment once per
    process, when it first sets up; tearing that down before and after lets each test's variables count,
    as they would in a fresh Ray worker."""
    for var in WANDB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", api_key)
    if mode is not None:
        monkeypatch.setenv("WANDB_MODE", mode)
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    yield monkeypatch
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def step_metrics(step: int) -> dict[str, float]:
    """What the training loop passes to Tracker.log_step."""
    return {"loss_d": 1.3 / step, "loss_g": 0.7 + 0.01 * step, "d_real": 0.6, "d_fake": 0.4,
            "grad_norm_g": 2.0, "grad_norm_d": 1.5, "lr_g": 2e-4, "lr_d": 2e-4, "images_per_s": 512.0,
            "step_time_s": 0.125, "epoch": step // 10}


def short_tracker_run(storage: Path, name: str, resumed: bool = False, steps=(1, 10, 20), **cfg_overrides):
    """A Tracker driven as the loop drives it: log_step at `steps`, one log_epoch, finish. Returns it;
    its files are under storage/name."""
    import torch

    from distgan.config import TrainConfig
    from distgan.rundir import RunDir
    from distgan.tracking import Tracker

    cfg = TrainConfig(name=name, storage_path=str(storage), **cfg_overrides).validate()
    tracker = Tracker(cfg, RunDir.of(cfg).location, world_size=2, resumed=resumed, kernel_backend="eager")
    for step in steps:
        tracker.log_step(step, step_metrics(step))
    samples = torch.linspace(-1, 1, 64 * 28 * 28).reshape(64, 1, 28, 28)
    tracker.log_epoch(steps[-1], 1, samples, {**QUALITY, "d_gap": 0.2})
    tracker.finish({"final_step": steps[-1], "rollbacks": 0, "stopped": ""})
    return tracker
