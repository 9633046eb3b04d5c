"""train_loop_per_worker: the Ray adapter around distgan.trainer.Trainer, and the only file that talks to Ray
Train from inside a worker.

Ray touchpoints, in order:
  (1) ray.train.get_context() / ray.train.torch.get_device() - rank, world size and device of this worker
  (2) ray.train.torch.prepare_model  - DDP-wrap G and D separately (the trainer calls it as `wrap_model`)
  (3) ray.train.get_checkpoint()     - resume after a restart or a resubmission with the same name
  (4) ray.train.report               - metrics + checkpoint, a barrier across workers
The trainer moves its batches to the device itself, so prepare_data_loader is not needed.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch

from distgan import storage, worker
from distgan.checkpoint import STATE_FILE, load_state, save_state, write_error
from distgan.config import config_from_dict
from distgan.rundir import RANK_METRIC, RunDir, StopRequest, checkpoint_dir_name, rank_of
from distgan.trainer import Trainer


def _load_checkpoint(trainer: Trainer, init_from: Optional[str]) -> Optional[int]:
    """Ray's latest checkpoint into the trainer; its step, None for a new run. On a (re)submission that is the one
    the driver chose (distgan.runs.reconcile_run made Ray's record name it); after a worker failure, the last
    one this run registered. While Ray has none, a new run that forks loads `init_from` (distgan.fork)."""
    checkpoint = ray.train.get_checkpoint()  # (3)
    if checkpoint is None:
        return worker.start(trainer, None, init_from)
    # Ray's path drops a URI's scheme; the name shown is in the user's storage path
    where = RunDir.of(trainer.cfg).join(Path(checkpoint.path).name)
    with checkpoint.as_directory() as directory:  # local storage: the directory itself; remote: a download
        return worker.start(trainer, (load_state(directory, where), where), init_from)


def persist_checkpoint(cfg) -> Callable[[ray.train.Checkpoint, str], ray.train.Checkpoint]:
    """Ray Train's checkpoint_upload_fn: copies a checkpoint's state.pt into the run directory as
    `<checkpoint dir name>/state.pt`, under a temporary name renamed when whole (local disks, NFS; an object
    store shows an object only once it is whole). A failed write (a full device, a lost mount) leaves nothing
    under the checkpoint's name and raises CheckpointError naming it and the newest valid checkpoint."""

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        run = ray.train.get_context().get_storage()
        fs, dest = run.storage_filesystem, f"{run.experiment_fs_path}/{dir_name}"
        src = Path(checkpoint.path) / STATE_FILE
        try:
            fs.create_dir(dest, recursive=True)
            if isinstance(fs, pyarrow.fs.LocalFileSystem):
                free = shutil.disk_usage(dest).free
                if free < src.stat().st_size:  # refused before a byte is written
                    raise OSError(errno.ENOSPC, f"{free} bytes free, the checkpoint needs {src.stat().st_size}")
                storage.atomic_write(Path(dest) / STATE_FILE, lambda tmp: shutil.copyfile(src, tmp))
            else:
                with open(src, "rb") as fh, fs.open_output_stream(f"{dest}/{STATE_FILE}") as out:
                    shutil.copyfileobj(fh, out, 8 << 20)
        except OSError as e:
            try:
                fs.delete_dir(dest)
            except OSError:
                pass
            run = RunDir.of(cfg)
            newest = run.resume_point(log=lambda message: None)
            raise write_error(run.join(dir_name), e, newest and newest.location) from None
        return ray.train.Checkpoint(dest, filesystem=fs)

    return upload


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    for key, value in loop_config.get("env", {}).items():
        os.environ.setdefault(key, value)
    cfg = config_from_dict(loop_config["cfg"])
    if not cfg.verbose:
        # Ray Train logs every report at INFO on every rank ("Reporting training result ..."), through a logger
        # named after its file, i.e. the root logger's handlers: the workers' INFO stays out of the terminal.
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        # Ray Train logs a traceback for any error a training function raises; a CheckpointError's one line
        # says all there is (the driver prints it), so its traceback stays out of the terminal
        logging.getLogger("ray.train.v2._internal.util").addFilter(
            lambda record: "CheckpointError: " not in record.getMessage())
    if cfg.cpus_per_worker:  # the worker's Ray CPUs (OMP_NUM_THREADS from the user's environment would not be)
        torch.set_num_threads(cfg.cpus_per_worker)
    ctx = ray.train.get_context()  # (1)
    rank, device = ctx.get_world_rank(), ray.train.torch.get_device()
    print(f"[rank {rank}] of {ctx.get_world_size()} on node {ray.get_runtime_context().get_node_id()[:12]} "
          f"({device})", flush=True)

    score_fid = bool(loop_config.get("score_fid"))
    trainer = Trainer(cfg, device, wrap_model=ray.train.torch.prepare_model,  # (2)
                      evaluate=score_fid, tracker_factory=worker.tracker_factory(cfg, lambda: trainer),
                      data=loop_config.get("data"))
    if rank == 0:
        print(f"distgan: {trainer.world} worker(s) on {device}, precision {trainer.precision} "
              f"({trainer.precision_choice.reason}), kernels {trainer.kernel_backend} ({trainer.kernel_reason}), "
              f"{int(trainer.total_steps)} steps", flush=True)
    tag = worker.shared_resume_tag(trainer, _load_checkpoint(trainer, loop_config.get("init_from")))

    def report(metrics: dict[str, float], state: Optional[dict[str, Any]]) -> None:
        metrics[RANK_METRIC] = rank_of(metrics)
        metrics["precision"] = trainer.precision  # reaches the driver's summary
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if trainer.rank == 0 and state is not None:
                save_state(state, tmp)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint,  # (4)
                             checkpoint_dir_name=checkpoint_dir_name(trainer.step, tag),
                             checkpoint_upload_fn=persist_checkpoint(cfg))

    if rank == 0:  # drawn by the driver, not by a worker's stdout
        from ray.experimental.tqdm_ray import tqdm

        every_s = float(loop_config.get("progress_every_s", tqdm.DEFAULT_FLUSH_INTERVAL_SECONDS))
        progress = worker.Progress(trainer, functools.partial(tqdm, flush_interval_s=every_s))
    try:
        result = trainer.fit(report, should_stop=StopRequest(RunDir.of(cfg), rank),
                             on_step=progress if rank == 0 else None)
    finally:
        if rank == 0:
            progress.close()
    if rank == 0 and result["stopped"]:
        RunDir.of(cfg).write_stop_note(result["stopped"])
