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
        # No rank leaves while another is still inside a collective with it: a rank that finishes first and exits
        # closes its connections, and a peer still completing one (a new_group's handshake on a busy machine)
        # fails with "Connection closed by peer".
        dist.barrier()
    finally:
        dist.destroy_process_group()


def save_checkpoint(state: dict[str, Any], location: str) -> None:
    """state.pt into a checkpoint directory of a local run directory, or uploaded to a URI one."""
    from distgan import storage
    from distgan.checkpoint import STATE_FILE, save_state

    if not storage.is_uri(location):
        save_state(state, location)
        return
    with tempfile.TemporaryDirectory() as tmp:
        storage.upload(save_state(state, tmp), storage.join(location, STATE_FILE))


def train_worker(rank: int, cfg_dict: dict[str, Any], evaluate: bool, resume_from: Optional[str],
                 data: dict[str, Any], init_from: Optional[str] = None) -> None:
    """One training process: what distgan.loop.train_loop_per_worker does, with the run directory in place of
    Ray's checkpoint bookkeeping; `resume_from` is the checkpoint the driver chose (None for a new run), `data`
    what the run trains on (distgan.driver.Checked.data), `init_from` the checkpoint a new run forks from."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into a stop request
    from tqdm import tqdm

    from distgan import worker
    from distgan.checkpoint import fetch_state
    from distgan.config import config_from_dict
    from distgan.rundir import RunDir, StopRequest
    from distgan.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    trainer = Trainer(cfg, "cpu", evaluate=evaluate, tracker_factory=worker.tracker_factory(cfg, lambda: trainer),
                      data=data)
    if rank == 0:
        print(f"distgan.local: {trainer.world} worker(s) on cpu, precision {trainer.precision}, kernels "
              f"{trainer.kernel_backend}, {int(trainer.total_steps)} steps", flush=True)
    run = RunDir.of(cfg)
    resumed = (fetch_state(resume_from), resume_from) if resume_from else None  # the checkpoint the driver chose
    tag = worker.shared_resume_tag(trainer, worker.start(trainer, resumed, init_from))

    def report(metrics: dict[str, float], state: Optional[dict[str, Any]]) -> None:
        if rank == 0 and state is not None:
            save_checkpoint(state, run.checkpoint(trainer.step, tag))

    every_s = worker.progress_every_s()  # tqdm's own minimum interval between redraws
    progress = worker.Progress(trainer, functools.partial(tqdm, mininterval=every_s)) if rank == 0 else None
    try:
        result = trainer.fit(report, should_stop=StopRequest(run, rank), on_step=progress)
    finally:
        if progress is not None:
            progress.close()
    if rank == 0 and result["stopped"]:
        run.write_stop_note(result["stopped"])


def run(cfg) -> dict[str, Any]:
    """Checks the run as distgan.train does before any worker starts, trains, and returns a summary. Raises
    ConfigError for user-fixable problems."""
    from distgan.cluster import local_nodes, size_workers
    from distgan.config import ConfigError, check_execution
    from distgan.driver import StopOnInterrupt, checked_run
    from distgan.metrics import metrics_supported
    from distgan.rundir import RunDir

    if cfg.use_gpu:
        raise ConfigError("--use-gpu: distgan.local runs on CPU (gloo); distgan.train runs on GPUs", field="use_gpu")
    with checked_run(cfg, ray_record=False) as checked:
        cfg = size_workers(cfg, local_nodes(0), use_gpu=False, found=checked.start, fork=checked.parent is not None)
        check_execution(cfg, False)
        with StopOnInterrupt(cfg) as interrupt:
            spawn(train_worker, cfg.num_workers, cfg.to_dict(), cfg.eval_every > 0 and metrics_supported(cfg)[0],
                  checked.found and checked.found.location, checked.data, checked.parent and checked.parent.location,
                  timeout_s=cfg.collective_timeout_s, threads=cfg.cpus_per_worker)
    run = RunDir.of(cfg)
    return {"run_dir": run.location, "checkpoint": run.newest_checkpoint(), "stopped": run.pop_stop_note(),
            "interrupted": interrupt.requested}


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
