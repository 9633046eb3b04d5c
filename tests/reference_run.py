"""What a Ray run must end with, computed without Ray: `distgan.train`'s flags parsed as the driver parses them,
the Trainer in `--num-workers` gloo processes (torch.multiprocessing), one thread each like a Ray worker with
one CPU. The Ray adapter adds nothing to the training state, so a Ray run that was interrupted and resumed must
end bitwise equal to this (tests/test_fault_tolerance.py, tests/test_train.py), one Ray run cheaper than
comparing with an uninterrupted Ray run."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distgan.config import parse_args


def _worker(rank: int, world: int, argv: list[str], out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out.parent / (out.name + '.pg')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        from distgan.trainer import Trainer

        trainer = Trainer(parse_args(argv))
        trainer.fit()
        state = trainer.state_dict()  # collective: every rank calls it
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def trainer_reference(argv, out: Path) -> dict:
    """The final state_dict of `python -m distgan.train *argv` (argv as strings or numbers), without Ray."""
    argv = [str(a) for a in argv]
    world = parse_args(argv).num_workers
    mp.start_processes(_worker, args=(world, argv, out), nprocs=world, start_method="spawn")
    return torch.load(out, weights_only=False)
