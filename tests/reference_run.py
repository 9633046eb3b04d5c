"""What a Ray run must end with, computed without Ray: `distgan.train`'s flags parsed as the driver parses them,
the Trainer in `--num-workers` gloo processes (distgan.local.spawn), one thread each like a Ray worker with
one CPU. The Ray adapter adds nothing to the training state, so a Ray run that was interrupted and resumed must
end bitwise equal to this (tests/test_fault_tolerance.py, tests/test_train.py), one Ray run cheaper than
comparing with an uninterrupted Ray run."""

from __future__ import annotations

from pathlib import Path

import torch

from distgan.cli import parse_args
from distgan.cluster import local_nodes, size_workers
from distgan.local import spawn


def _worker(rank: int, argv: list[str], out: Path) -> None:
    from distgan.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    trainer.fit()
    state = trainer.state_dict()  # collective: every rank calls it
    if rank == 0:
        torch.save(state, out)


def trainer_reference(argv, out: Path) -> dict:
    """The final state_dict of `python -m distgan.train *argv` (argv as strings or numbers), without Ray."""
    argv = [str(a) for a in argv]
    # as many workers as a CPU driver starts for these flags (--num-workers auto: the driver decides)
    spawn(_worker, size_workers(parse_args(argv), local_nodes(0), use_gpu=False).num_workers, argv, out)
    return torch.load(out, weights_only=False)
