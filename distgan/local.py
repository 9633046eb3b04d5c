"""`python -m distgan.local [distgan.train's flags]`: the same Trainer in --num-workers processes on this machine,
joined in one gloo group (torch.multiprocessing), with no Ray: no cluster start-up, plain tracebacks, pdb-able.

For development, debugging and recipe studies on one machine. A run writes what a `distgan.train` run writes
(checkpoint_<step>[_resume<step>] directories holding state.pt, metrics.jsonl, samples/, curves.png), to a local
path or a URI, and resumes from the run directory's newest valid checkpoint the way a resubmission does. The
workers are sized as a local `distgan.train` run sizes them (--num-workers / --cpus-per-worker auto), and each
uses --cpus-per-worker torch threads, as a Ray worker does, so the two train the same bits. Ray's retention is
not applied: every checkpoint is kept. CPU only (gloo); `distgan.train` runs on GPUs and clusters.

The first Ctrl-C stops every worker after a checkpoint at the next step; a second one ends the processes.
"""

from __future__ import annotations

import datetime
import functools
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def spawn(fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 300, threads: int = 1) -> None:
    """Runs fn(rank, *args) in `world` new processes (spawned: fn must be importable) joined in one gloo process
    group, `threads` torch threads each (one: what a Ray worker with one CPU gets). A process that fails or dies
    ends the others; the parent raises torch.multiprocessing's ProcessRaisedException / ProcessExitedException."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="distgan-local-") as tmp:
        mp.start_processes(_entry, args=(fn, world, str(Path(tmp) / "rendezvous"), timeout_s, threads, args),
                           nprocs=world, start_method="spawn")


def _entry(rank: int, fn, world: int, rendezvous: str, timeout_s: float, threads: int, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _load_newest(trainer) -> Optional[int]:
    """The run directory's newest checkpoint into the trainer (past bad ones, on a local disk); its step."""
    from distgan import storage, worker
    from distgan.checkpoint import fetch_state, load_latest_valid, newest_checkpoint

    run = worker.run_dir(trainer.cfg)
    newest = newest_checkpoint(storage.list_names(run))
    if newest is None:
        return None
    if storage.is_uri(run):  # only the newest is fetched; a bad one stops the run naming it
        where, state = storage.join(run, newest), fetch_state(storage.join(run, newest))
    else:
        state, where = load_latest_valid(Path(run) / newest, log=lambda m: print(m, flush=True))
    trainer.load_state_dict(state, str(where))
    worker.announce_resume(trainer, str(where))
    return trainer.step


def save_checkpoint(state: dict[str, Any], location: str) -> None:
    """state.pt into a checkpoint directory of a local run directory, or uploaded to a URI one."""
    from distgan import storage
    from distgan.checkpoint import STATE_FILE, save_state

    if not storage.is_uri(location):
        save_state(state, location)
        return
    with tempfile.TemporaryDirectory() as tmp:
        storage.upload(save_state(state, tmp), storage.join(location, STATE_FILE))


def train_worker(rank: int, cfg_dict: dict[str, Any], evaluate: bool) -> None:
    """One training process: what distgan.loop.train_loop_per_worker does, with the run directory in place of
    Ray's checkpoint bookkeeping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into a stop request
    from tqdm import tqdm

    from distgan import storage, worker
    from distgan.checkpoint import checkpoint_dir_name
    from distgan.config import config_from_dict
    from distgan.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    trainer = Trainer(cfg, "cpu", evaluate=evaluate, tracker_factory=worker.tracker_factory(cfg, lambda: trainer))
    if rank == 0:
        print(f"distgan.local: {trainer.world} worker(s) on cpu, precision {trainer.precision}, kernels "
              f"{trainer.kernel_backend}, {int(trainer.total_steps)} steps", flush=True)
    tag = worker.shared_resume_tag(trainer, _load_newest(trainer))

    def report(metrics: dict[str, float], state: Optional[dict[str, Any]]) -> None:
        if rank == 0 and state is not None:
            save_checkpoint(state, storage.join(worker.run_dir(cfg), checkpoint_dir_name(trainer.step, tag)))

    every_s = worker.progress_every_s()  # tqdm's own minimum interval between redraws
    progress = worker.Progress(trainer, functools.partial(tqdm, mininterval=every_s)) if rank == 0 else None
    try:
        result = trainer.fit(report, should_stop=worker.StopRequest(cfg, rank), on_step=progress)
    finally:
        if progress is not None:
            progress.close()
    if rank == 0 and result["stopped"]:
        worker.write_stop_note(cfg, result["stopped"])


def run(cfg) -> dict[str, Any]:
    """Checks the run as distgan.train does before any worker starts, trains, and returns a summary. Raises
    ConfigError for user-fixable problems."""
    from distgan import storage, worker
    from distgan.checkpoint import newest_checkpoint
    from distgan.cluster import local_nodes, size_workers
    from distgan.config import ConfigError, check_execution, check_schedule
    from distgan.data import check_data
    from distgan.metrics import metrics_supported
    from distgan.runs import check_resume, check_same_data, newest_valid_checkpoint
    from distgan.train import StopOnInterrupt

    if cfg.use_gpu:
        raise ConfigError("--use-gpu: distgan.local runs on CPU (gloo); distgan.train runs on GPUs", field="use_gpu")
    data = check_data(cfg)
    check_schedule(cfg, data["images"])
    found = newest_valid_checkpoint(cfg.storage_path, cfg.name)
    check_resume(cfg, found)
    check_same_data(cfg, found, data)
    cfg = size_workers(cfg, local_nodes(0), use_gpu=False, found=found)
    check_execution(cfg, False)
    worker.pop_stop_note(cfg)  # a note left by an earlier run is stale now
    with StopOnInterrupt(cfg) as interrupt:
        spawn(train_worker, cfg.num_workers, cfg.to_dict(), cfg.eval_every > 0 and metrics_supported(cfg)[0],
              timeout_s=cfg.collective_timeout_s, threads=cfg.cpus_per_worker)
    run_dir = worker.run_dir(cfg)
    newest = newest_checkpoint(storage.list_names(run_dir))
    return {"run_dir": run_dir, "checkpoint": storage.join(run_dir, newest) if newest else None,
            "stopped": worker.pop_stop_note(cfg), "interrupted": interrupt.requested}


def main(argv: Optional[list[str]] = None) -> int:
    from distgan.cli import build_parser, parse_args
    from distgan.config import ConfigError

    parser = build_parser("python -m distgan.local", "Train the DCGAN as distgan.train does, in --num-workers "
                          "gloo processes on this machine, without Ray (CPU only; for development and studies).")
    try:
        summary = run(parse_args(sys.argv[1:] if argv is None else argv, parser=parser))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted at once; the last checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as e:  # a worker's failure: torch.multiprocessing carries its traceback
        from distgan.storage import first_line

        print(f"error: training failed: {first_line(e, with_type=True)}", file=sys.stderr)
        return 1
    print(f"run directory  : {summary['run_dir']}\nlast checkpoint: {summary['checkpoint']}\n"
          f"draw samples   : {shlex.join(['python', '-m', 'distgan.sample', '--checkpoint', summary['run_dir']])}")
    if summary["stopped"]:
        print(f"error: training stopped: {summary['stopped']}", file=sys.stderr)
        return 1
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
