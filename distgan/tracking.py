"""Every rank-0 side effect: W&B, metrics.jsonl, sample grids, curves.png, collapse/divergence warnings.

Only rank 0 constructs a Tracker, and wandb is imported inside it: the other ranks never import wandb.
The local artifacts are written whatever the W&B mode, for users without W&B:

    <run_dir>/metrics.jsonl          one JSON object a line: kind = start | step | eval | alert | finish
    <run_dir>/samples/epoch_NNNN.png the fixed-noise grid of each evaluation (and samples/latest.png)
    <run_dir>/curves.png             losses, D(x) vs D(G(z)), quality metrics over steps
    <run_dir>/wandb/                 the W&B run files (unless WANDB_DIR points elsewhere)

The run directory is a local path or a URI string (`f"{storage_path}/{name}"`, e.g. s3://bucket/prefix/name,
the directory Ray Train writes the checkpoints to). For a URI the files are written to a local staging
directory (distgan.storage.StagedDir: stable per URI, so a restart on the same node finds it) and copied to the URI when
they change: the sample grids when drawn, metrics.jsonl and curves.png at each evaluation and at the end, and
metrics.jsonl at most every UPLOAD_EVERY_S for step rows. A resume reads metrics.jsonl back from the URI.
The W&B files stay in the staging directory (wandb needs a local directory) unless WANDB_DIR says otherwise.
A failing upload never stops training: one warning, a retry at most every UPLOAD_EVERY_S, a last try at the
end, and the files stay in the staging directory.

W&B settings, the first that is set wins:

    mode          --wandb-mode > WANDB_MODE > "online" if WANDB_API_KEY is set, else "offline"
    project       --wandb-project when not left at its default "distgan" > WANDB_PROJECT > "distgan"
    files         WANDB_DIR > <run_dir>
    init timeout  WANDB_INIT_TIMEOUT > 30 s
    run id, name  the run name (--name): resubmitting the same name continues the same W&B run
                  (resume="allow"); an offline resume writes a second offline-run directory with the same id

W&B never stops or slows training: a failing wandb.init (no key, unreachable server, timeout) falls back
to offline, then to no W&B, with one warning line; a failing log call disables W&B with one warning;
finish() waits at most FINISH_TIMEOUT_S for uploads. The API key is never written anywhere: the W&B config
is the TrainConfig plus run facts, and any string holding the key's value is redacted. Console output is
not mirrored into W&B (Ray keeps the worker logs; set WANDB_CONSOLE=wrap to mirror it).

Offline runs upload later with `wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from distgan.plots import D_OUTPUT_KEYS, LOSS_KEYS, plot_curves, save_grid
from distgan.storage import (
    METRICS_FILE,
    StagedDir,
    atomic_write,
    basename,
    drop_torn_line,
    first_line,
    read_metrics,
)

# The logged metric names, one list for the loop, the W&B run and the dashboard (dashboard.py builds its
# panels from these groups, and its test checks them against a real run's keys).
GRAD_NORM_KEYS = ("grad_norm_d", "grad_norm_g")
LR_KEYS = ("lr_d", "lr_g")
THROUGHPUT_KEYS = ("images_per_s", "step_time_s")  # images_per_s is global: all workers together
STEP_KEYS = LOSS_KEYS + D_OUTPUT_KEYS + GRAD_NORM_KEYS + LR_KEYS + THROUGHPUT_KEYS + ("epoch",)
QUALITY_KEYS = ("fid", "kid", "kid_std", "classifier_score", "coverage", "diversity")  # metrics.py
HEALTH_KEYS = ("d_gap",)  # d_real - d_fake at the evaluation
EPOCH_KEYS = QUALITY_KEYS + HEALTH_KEYS
SAMPLES_KEY = "samples"  # the wandb.Image of the fixed-noise grid
BENCH_TABLE_KEY = "bench/kernels"  # the wandb.Table that `bench/kernels.py --wandb` logs

DEFAULT_PROJECT = "distgan"
INIT_TIMEOUT_S = 30.0  # wandb's own default is 90 s: too long to hold up the start of training
FINISH_TIMEOUT_S = 120.0  # after this, finish() returns and the local run files can be synced later
# Collapse / divergence signals, checked at each evaluation:
COVERAGE_COLLAPSE = 0.5  # normalised entropy of predicted digits: 0.48 = three digits equally often
D_WINS_GAP = 0.9  # D(x) - D(G(z)): D separates real from fake outright, G's gradient vanishes
PATIENCE = 3  # consecutive evaluations before warning: early epochs are noisy
# Step rows reach a remote run directory at most this often: an object store cannot append, so each upload
# rewrites the whole metrics.jsonl (~50 kB for the default run); W&B carries the live curves. The same
# interval spaces retries after a failed upload, so an unreachable store costs one timeout a minute.
UPLOAD_EVERY_S = 60.0
# curves.png is redrawn at each evaluation, at the end, and at other epoch ends at most this often: a redraw
# takes ~0.6-1 s of matplotlib on a busy CPU core while the other workers wait at the epoch's barrier (every
# epoch end, that was ~15 s of the default 7-minute CPU run); W&B and metrics.jsonl have every number as it comes.
CURVES_EVERY_S = 60.0


def _warn(message: str) -> None:
    print(f"WARNING: distgan: {message}", file=sys.stderr, flush=True)


@runtime_checkable
class RunTracker(Protocol):
    """What the Trainer calls on rank 0. Tracker is the full implementation (metrics.jsonl, PNGs, W&B);
    studies and tests pass their own, e.g. one that keeps each evaluation's numbers."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_epoch(self, step: int, epoch: int, samples: torch.Tensor, metrics: dict[str, float]) -> Any: ...

    def finish(self, summary: dict) -> None: ...


_FAILED = object()  # what Tracker._guard returns for a W&B call that raised


def _wandb_image(path: Path, caption: str):
    import wandb

    return wandb.Image(str(path), caption=caption)


def _wandb_alert_level():
    import wandb

    return wandb.AlertLevel.WARN


def resolve_mode(flag: str | None) -> tuple[str, str]:
    """(mode, where it came from): the --wandb-mode flag, then WANDB_MODE, then the API key's presence."""
    if flag:
        return flag, "--wandb-mode"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    aliases = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
               "disabled": "disabled"}
    if env in aliases:
        return aliases[env], "WANDB_MODE"
    if env:
        _warn(f"WANDB_MODE={env!r} is not one of online, offline, disabled; using the default")
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    return "offline", "default (no WANDB_API_KEY)"


def resolve_project(flag: str | None) -> str:
    """--wandb-project > WANDB_PROJECT > "distgan"."""
    return flag or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def _init_timeout() -> float:
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
    except ValueError:
        return INIT_TIMEOUT_S


def versions() -> dict[str, str | None]:
    """Library and accelerator versions for the W&B config (read from package metadata: no imports); the
    benchmarks record the same dict (distgan.provenance)."""
    from distgan import provenance

    return provenance.versions()


def _redact(value: Any) -> Any:
    """Defence in depth: no string that holds the API key's value leaves this module."""
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        return value
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, str) and key in value:
        return value.replace(key, "<redacted>")
    return value


def _plain(value: Any) -> Any:
    """A JSON-friendly number: tensors become floats, non-finite floats become None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """run_dir: the run directory, a local path or a URI string. `run_dir` (the attribute) is always the
    local directory the files are written to; `location` is where they end up (the URI, or run_dir). `parent`:
    {"checkpoint", "step"} of the checkpoint a fork started from (distgan.fork), recorded in its start row and its
    W&B config."""

    def __init__(self, cfg, run_dir: str | os.PathLike, world_size: int, resumed: bool, kernel_backend: str,
                 run_id: str | None = None, parent: dict[str, Any] | None = None):
        self.cfg = cfg
        self.staged = StagedDir(run_dir, every_s=UPLOAD_EVERY_S)
        self.location, self.remote, self.run_dir = self.staged.location, self.staged.remote, self.staged.local
        self.samples_dir = self.run_dir / "samples"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.curves_path = self.run_dir / "curves.png"
        self.world_size, self.resumed, self.kernel_backend = world_size, resumed, kernel_backend
        self.parent = parent
        self._last_curves = -math.inf  # time.monotonic() of the last curves.png
        if self.remote is not None:
            print(f"distgan: run files go to {self.location} (staged in {self.run_dir}, where the W&B files "
                  f"stay)", flush=True)
            self.staged.restore(METRICS_FILE)
        # Earlier rows (a resume, a restart) stay in the file; curves keep the last row of each step. A row torn
        # by a crash mid-write is dropped, so that this run's rows start on lines of their own.
        if drop_torn_line(self.metrics_path):
            self.staged.mark(METRICS_FILE)
        self.history = read_metrics(self.metrics_path)
        self.last_step_metrics: dict[str, Any] = {}
        self.streaks = {"coverage": 0, "d_gap": 0}
        self.run = None
        self.mode = "disabled"
        self._wandb_floor = 0  # W&B drops steps below its last one (resumes, rollbacks); jsonl keeps them
        self._noted: set[str] = set()
        self._finished = False
        self.run_id = run_id or cfg.name or basename(self.location)
        self._init_wandb()
        self._append({"kind": "start", "time": time.time(), "resumed": resumed, "world_size": world_size,
                      "kernel_backend": kernel_backend, "wandb_mode": self.mode, "wandb_id": self.run_id,
                      **({"init_from": parent["checkpoint"], "init_from_step": parent["step"]} if parent else {})})
        self._sync("eval")  # the start row at once: an unreachable store shows up before the first step

    # ------------------------------------------------------------------ W&B
    def wandb_config(self) -> dict[str, Any]:
        cfg = self.cfg.to_dict()
        return _redact({**cfg, "world_size": self.world_size,
                        "per_worker_batch": cfg["batch_size"] // max(self.world_size, 1),
                        "kernel_backend": self.kernel_backend, "versions": versions(),
                        **({"init_from_step": self.parent["step"]} if self.parent else {})})

    def _init_wandb(self) -> None:
        mode, source = resolve_mode(self.cfg.wandb_mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError as e:
            _warn(f"W&B off: cannot import wandb ({e}); local metrics.jsonl and PNGs are still written")
            return
        settings = {"init_timeout": _init_timeout(),
                    # quiet also skips the "logged in as" banner, whose user lookup has its own ~10 s
                    # timeout that init_timeout does not bound
                    "quiet": True}
        if "WANDB_CONSOLE" not in os.environ:
            settings["console"] = "off"
        kwargs = {"project": resolve_project(self.cfg.wandb_project), "name": self.cfg.name or self.run_id,
                  "id": self.run_id, "resume": "allow", "group": self.cfg.wandb_group, "job_type": "train",
                  "config": self.wandb_config(), "reinit": "finish_previous"}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(self.run_dir)
        failures = []
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            t0 = time.perf_counter()
            try:
                self.run = wandb.init(mode=attempt, settings=wandb.Settings(**settings), **kwargs)
                self.mode = attempt
                break
            except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
                failures.append(f"{attempt} init failed after {time.perf_counter() - t0:.0f}s: "
                                f"{first_line(e, with_type=True)}")
                # the failed run keeps its id registered in the wandb service; free it for the retry
                with contextlib.suppress(Exception):
                    wandb.teardown()
        if self.run is None:
            _warn(f"W&B off ({'; '.join(failures)}); local metrics.jsonl and PNGs are still written")
            return
        if failures:
            sync = shlex.join(["wandb", "sync", str(Path(self.run.dir).parent)])
            _warn(f"W&B {mode} mode ({source}) unavailable ({'; '.join(failures)}); logging offline "
                  f"to {self.run.dir}: upload later with `{sync}`")
        self._wandb_floor = int(getattr(self.run, "starting_step", 0) or 0)
        if self.mode == "online":
            print(f"W&B run: {self.run.url}", flush=True)

    def _wandb_log(self, data: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        if step < self._wandb_floor:
            self._note("floor", f"W&B already holds steps up to {self._wandb_floor}; step {step} (a resume "
                                f"or rollback) is kept in metrics.jsonl only until the run passes it")
            return
        if self._guard("log", lambda: self.run.log(data, step=step), disable=True) is not _FAILED:
            self._wandb_floor = step

    def _guard(self, what: str, call: Callable[[], Any], then: str = "", disable: bool = False) -> Any:
        """Every W&B call after init goes through here: a failure is one warning line, never an exception (W&B
        must not stop training), and with `disable` W&B is off for the rest of the run. Returns the call's
        value, or _FAILED."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
            off = "; W&B off for the rest of this run" if disable else ""
            _warn(f"W&B {what} failed ({first_line(e, with_type=True)}){then}{off}")
            if disable:
                self.run = None
            return _FAILED

    def _note(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            print(f"distgan: {message}", flush=True)

    # ------------------------------------------------------------------ what the loop calls
    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        values = {k: _plain(v) for k, v in metrics.items()}
        self.last_step_metrics = values
        self._append({"kind": "step", "step": step, "time": time.time(), **values})
        self._wandb_log(values, step)
        self._sync("step")

    def log_epoch(self, step: int, epoch: int, samples: torch.Tensor, metrics: dict[str, float]) -> Path:
        path = self.save_grid(samples, epoch)
        values = {k: _plain(v) for k, v in metrics.items()}
        if "d_gap" not in values and {"d_real", "d_fake"} <= self.last_step_metrics.keys():
            values["d_gap"] = self.last_step_metrics["d_real"] - self.last_step_metrics["d_fake"]
        self._append({"kind": "eval", "step": step, "epoch": epoch, "time": time.time(),
                      "samples": str(path.relative_to(self.run_dir)), **values})
        self._check_health(step, epoch, values)
        if metrics or time.monotonic() - self._last_curves >= CURVES_EVERY_S:
            self.plot_curves()
        self._sync("eval")
        if self.run is not None:
            image = self._guard("image", lambda: _wandb_image(path, f"epoch {epoch}, step {step}"),
                                then=f"; the grid is still at {path}")
            self._wandb_log({**({SAMPLES_KEY: image} if image is not _FAILED else {}), "epoch": epoch, **values},
                            step)
            fids = [r["fid"] for r in self.history if r.get("kind") == "eval" and r.get("fid") is not None]
            if fids and self.run is not None:
                self._guard("summary", lambda: self.run.summary.__setitem__("best_fid", min(fids)))
        return path

    def finish(self, summary: dict) -> None:
        """Final summary, curves and W&B finish. Never raises; waits at most FINISH_TIMEOUT_S for W&B."""
        if self._finished:
            return
        self._finished = True
        values = _redact({k: _plain(v) for k, v in summary.items()})
        try:
            self._append({"kind": "finish", "time": time.time(), **values})
            self.plot_curves()
        except Exception as e:  # noqa: BLE001
            _warn(f"could not write the final metrics ({type(e).__name__}: {e})")
        self._sync("finish")
        run, self.run = self.run, None
        if run is None:
            return
        self._guard("summary", lambda: run.summary.update(values))

        def finish_and_teardown() -> None:
            import wandb

            run.finish()
            # wandb 0.31 can return from finish() before wandb-core has written out the run file;
            # teardown waits for the service to exit, which closes it. Nothing else uses W&B here.
            wandb.teardown()

        def finish_quietly() -> None:
            self._guard("finish", finish_and_teardown, then="; local files are complete")

        worker = threading.Thread(target=finish_quietly, name="wandb-finish", daemon=True)
        worker.start()
        worker.join(FINISH_TIMEOUT_S)
        if worker.is_alive():
            _warn(f"W&B still uploading after {FINISH_TIMEOUT_S:.0f}s; not waiting. The run files are in "
                  f"{run.dir}: `{shlex.join(['wandb', 'sync', str(Path(run.dir).parent)])}` uploads what is missing")

    # ------------------------------------------------------------------ local artifacts
    def _append(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.staged.mark(METRICS_FILE)

    def _sync(self, when: str) -> None:
        # metrics.jsonl last: an eval row names its sample grid, which should be there when the row is
        self.staged.sync(when, last=(METRICS_FILE,))

    def save_grid(self, samples: torch.Tensor, epoch: int) -> Path:
        """samples (N, C, H, W) in [-1, 1] -> samples/epoch_NNNN.png and samples/latest.png, ~square grid."""
        path = self.samples_dir / f"epoch_{epoch:04d}.png"
        atomic_write(path, lambda tmp: save_grid(samples, tmp))
        atomic_write(self.samples_dir / "latest.png", lambda tmp: shutil.copyfile(path, tmp))
        self.staged.mark(f"samples/{path.name}", "samples/latest.png")
        return path

    def _check_health(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        signals = {
            "coverage": (lambda v: v < COVERAGE_COLLAPSE, "mode collapse",
                         f"coverage below {COVERAGE_COLLAPSE} (few distinct digits generated)"),
            "d_gap": (lambda v: v > D_WINS_GAP, "discriminator wins",
                      f"D(x) - D(G(z)) above {D_WINS_GAP} (the generator gets no useful gradient)"),
        }
        for key, (bad, title, what) in signals.items():
            value = values.get(key)
            self.streaks[key] = self.streaks[key] + 1 if value is not None and bad(value) else 0
            if self.streaks[key] != PATIENCE:
                continue
            text = f"{title} at step {step} (epoch {epoch}): {what} for {PATIENCE} evaluations in a row, " \
                   f"{key} = {value:.3f}"
            _warn(text)
            self._append({"kind": "alert", "step": step, "epoch": epoch, "time": time.time(), "title": title,
                          "text": text})
            if self.run is not None and self.mode == "online":
                self._guard("alert", lambda title=title, text=text: self.run.alert(
                    title=f"distgan: {title}", text=text, level=_wandb_alert_level()))

    def plot_curves(self) -> None:
        """Rewrites curves.png from the history (the last row of each step wins). A plotting failure only
        warns: the numbers are in metrics.jsonl."""
        self._last_curves = time.monotonic()
        try:
            atomic_write(self.curves_path, lambda tmp: plot_curves(self.history, tmp))
            self.staged.mark("curves.png")
        except Exception as e:  # noqa: BLE001
            _warn(f"curves.png not written ({type(e).__name__}: {e})")
