"""Which precision the GAN step runs in, decided once for the whole process group.

--precision wins where given. "auto" is bf16 on CUDA sm_80+ and fp32 on older CUDA; on a CPU it is a short
measurement on the machine itself (`decide_precision`): rank 0 times a few G/D steps at the run's shapes in each
candidate precision and takes the fastest, because a CPU flag does not say whether bf16 is fast (AVX-512 BF16
without AMX can be slower than fp32). A measurement is cached per machine (processor, torch version, shapes,
threads) in the user's cache directory, so later runs start at once. Rank 0's decision is broadcast
(`decide_run_precision`), and on a resume under "auto" the checkpoint's precision is kept (`checkpoint_precision`).
torch.distributed only, no Ray.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from distgan.config import TrainConfig
from distgan.hardware import cache_dir, processor_name
from distgan.storage import atomic_write
from kernels.collectives import collective_device

CPU_CANDIDATES = ("fp32", "bf16")  # fp16 autocast is CUDA's (its GradScaler too)
PROBE_SECONDS = 1.0  # measured time per candidate, split over PROBE_ROUNDS interleaved rounds
PROBE_ROUNDS = 3
PROBE_MAX_STEPS = 50  # a round's steps at most (a tiny model's step is fast; the rounds still bound the time)
# bf16 changes the numerics; it replaces fp32 only when it is faster by more than a probe's noise.
PREFER_FP32_MARGIN = 1.05
CACHE_FILE = "precision.json"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why. `images_per_s`: the probe's figures (one worker, its batch), empty
    when nothing was measured. `source`: flag | cuda | measured | cached | checkpoint."""

    precision: str
    source: str
    reason: str
    images_per_s: Mapping[str, float] = dataclasses.field(default_factory=dict)


def time_candidates(candidates: Sequence[str], run_step: Callable[[str], None],
                    timer: Optional[Callable[[], float]] = None, seconds: float = PROBE_SECONDS,
                    rounds: int = PROBE_ROUNDS, max_steps: int = PROBE_MAX_STEPS) -> dict[str, list[float]]:
    """Seconds per step of each candidate, one figure per round. Two warm-up steps each (the first pays for
    allocations and oneDNN's kernel choices), the second timed to size the rounds so that each candidate gets
    about `seconds` in all; then `rounds` rounds, interleaved and in alternating order, so that load from other
    processes falls on all candidates alike. `run_step(candidate)` must run one step to completion (a host
    sync on an accelerator)."""
    timer = timer or time.perf_counter
    warm = []
    for c in candidates:
        run_step(c)
        t0 = timer()
        run_step(c)
        warm.append(timer() - t0)
    steps = min(max(round(seconds / rounds / max(max(warm), 1e-9)), 1), max_steps)
    out: dict[str, list[float]] = {c: [] for c in candidates}
    for r in range(rounds):
        for c in (candidates if r % 2 == 0 else tuple(reversed(candidates))):
            t0 = timer()
            for _ in range(steps):
                run_step(c)
            out[c].append((timer() - t0) / steps)
    return out


def choose_precision(images_per_s: Mapping[str, float], margin: float = PREFER_FP32_MARGIN) -> str:
    """The fastest candidate; fp32 unless another is faster than it by more than `margin` (x)."""
    best = max(images_per_s, key=images_per_s.get)
    if "fp32" in images_per_s and best != "fp32" and images_per_s[best] <= margin * images_per_s["fp32"]:
        return "fp32"
    return best


def probe_step_times(cfg, device, per_worker_batch: int, candidates: Sequence[str] = CPU_CANDIDATES,
                     timer: Optional[Callable[[], float]] = None, seconds: float = PROBE_SECONDS,
                     rounds: int = PROBE_ROUNDS) -> dict[str, list[float]]:
    """Seconds per step (one figure per round, `time_candidates`) of distgan's G/D step (distgan.step.gan_step:
    n_critic D updates and one G update) in each candidate precision, at the run's shapes (per-worker batch,
    channels, image size, z_dim) and kernels, on `device`, with this process's threads, on throw-away models and
    random images. The global RNG streams are forked around it, so the run's streams do not move."""
    from distgan import step
    from distgan.models import build_models

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        g, d = build_models(cfg)
        g, d = g.to(device), d.to(device)
        opt_g, opt_d = step.make_optimizers(g, d, cfg)
        shape = (per_worker_batch, cfg.image_channels, cfg.image_size, cfg.image_size)
        reals = [torch.rand(shape, device=device) * 2 - 1 for _ in range(cfg.n_critic)]

        def sample_z(n: int) -> torch.Tensor:
            return torch.randn(n, cfg.z_dim, device=device)

        def run_step(precision: str) -> None:
            out = step.gan_step(g, d, opt_g, opt_d, reals, sample_z, impl=cfg.kernels, precision=precision)
            out["loss_d"].item()  # waits for the step (CUDA is asynchronous)

        return time_candidates(candidates, run_step, timer, seconds=seconds, rounds=rounds)


def probe_precisions(cfg, device, per_worker_batch: int, candidates: Sequence[str] = CPU_CANDIDATES,
                     timer: Optional[Callable[[], float]] = None,
                     seconds: float = PROBE_SECONDS) -> dict[str, list[float]]:
    """Images/s of one worker in each candidate precision, one figure per round: per-worker images (x n_critic)
    over each round's `probe_step_times`."""
    times = probe_step_times(cfg, device, per_worker_batch, candidates, timer, seconds)
    return {c: [per_worker_batch * cfg.n_critic / t for t in ts] for c, ts in times.items()}


def cache_path() -> Path:
    """cache_dir()/precision.json: this machine's precision measurements."""
    return cache_dir() / CACHE_FILE


def probe_key(cfg, device_type: str, per_worker_batch: int, processor: str, threads: int) -> str:
    """What a measurement depends on: processor, torch version, device kind, threads, kernels and shapes."""
    return json.dumps({"processor": processor, "torch": torch.__version__, "device": device_type,
                       "threads": threads, "kernels": cfg.kernels, "batch": per_worker_batch, "n_critic": cfg.n_critic,
                       "channels": cfg.image_channels, "image_size": cfg.image_size, "z_dim": cfg.z_dim},
                      sort_keys=True)


def read_cache(path: Path, key: str) -> Optional[dict]:
    """The cached entry for `key`, or None (no file, another key, or an unreadable file: measured again)."""
    try:
        entry = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("images_per_s"), dict) and entry.get("precision")
    return entry if ok else None


def write_cache(path: Path, key: str, entry: dict) -> Optional[str]:
    """Adds `entry` under `key`; returns why it could not, or None. A cache that cannot be written only costs the
    next run its probe. Concurrent writers (runs, the workers of one machine, test processes) take turns under
    an exclusive lock on a file beside it, each reading what the last one wrote, so no one's entry is lost; the
    file is replaced atomically, so a reader sees one whole file."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(path.read_text())
                data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                data = {}
            data[key] = entry
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))
    except OSError as e:
        return str(e)
    return None


_UNSTEADY = " (its rounds disagreed: a busy machine? delete the cache file to measure again)"


def _figures(images_per_s: Mapping[str, float]) -> str:
    return ", ".join(f"{p} {v:.0f} img/s" for p, v in sorted(images_per_s.items(), key=lambda kv: -kv[1]))


def decide_precision(cfg, device, per_worker_batch: int, threads: int,
                     probe: Optional[Callable[..., dict[str, float]]] = None,
                     cache: Optional[Path] = None, log: Callable[[str], None] = lambda _: None) -> PrecisionChoice:
    """--precision as a worker runs it. Explicit values win (fp16 off CUDA raises ValueError). "auto": bf16 on
    CUDA sm_80+ (tensor cores), fp32 on older CUDA; elsewhere the fastest of CPU_CANDIDATES by `probe` at the
    run's shapes, from the cache when this machine measured them before (`cache`: default `cache_path()`).
    `probe(cfg, device, per_worker_batch)` -> images/s by precision, one figure per round; default
    `probe_precisions`. The median decides; a measurement whose rounds disagree says so."""
    device = torch.device(device)
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ValueError(f"--precision fp16 needs a CUDA device (this worker runs on {device.type}); use bf16 "
                             f"or fp32")
        return PrecisionChoice(cfg.precision, "flag", f"--precision {cfg.precision}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return PrecisionChoice("bf16", "cuda", f"auto: sm_{major}{minor} has bf16 tensor cores")
        return PrecisionChoice("fp32", "cuda", f"auto: sm_{major}{minor} has no bf16 tensor cores (--precision fp16 "
                                               f"to use its fp16 ones)")
    cache = cache if cache is not None else cache_path()
    processor = processor_name(device.type)
    key = probe_key(cfg, device.type, per_worker_batch, processor, threads)
    where = f"{per_worker_batch} images/worker, {threads} thread(s)"
    entry = read_cache(cache, key)
    if entry is not None:
        return PrecisionChoice(entry["precision"], "cached",
                               f"auto: measured on this machine at {where}: {_figures(entry['images_per_s'])}"
                               f"{_UNSTEADY if entry.get('steady') is False else ''}; cached in {cache}",
                               entry["images_per_s"])
    rounds = (probe or probe_precisions)(cfg, device, per_worker_batch)
    figures = {c: statistics.median(v) for c, v in rounds.items()}
    precision = choose_precision(figures)
    # On a machine busy with other work the rounds can disagree. The choice is cached all the same (runs on this
    # machine, and a run and its reference in the tests, must not flip between precisions), and says so.
    steady = all(choose_precision(dict(zip(rounds, r))) == precision for r in zip(*rounds.values()))
    failed = write_cache(cache, key, {"precision": precision, "images_per_s": figures, "processor": processor,
                                      "steady": steady, "measured": datetime.datetime.now(datetime.timezone.utc)
                                      .isoformat(timespec="seconds")})
    if failed:
        log(f"note: cannot cache the precision measurement in {cache} ({failed}); the next run measures again")
    return PrecisionChoice(precision, "measured", f"auto: measured now at {where}: {_figures(figures)}"
                                                  f"{'' if steady else _UNSTEADY}", figures)


# -------------------------------------------------------------------- the process group's decision


def decide_run_precision(cfg: TrainConfig, device: torch.device, rank: int, distributed: bool) -> PrecisionChoice:
    """--precision on this rank: "auto" is rank 0's decision (a measurement when not cached), broadcast, so
    every rank runs the same precision. A failure on rank 0 is raised on every rank. Collective when
    `distributed` and --precision is auto."""
    def decide() -> PrecisionChoice:
        return decide_precision(cfg, device, cfg.per_worker_batch, torch.get_num_threads(),
                                log=lambda m: print(m, flush=True))

    if cfg.precision != "auto" or not distributed:
        return decide()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = decide()
        except Exception as e:  # handed to every rank, which raise it, rather than wait for a choice
            box[0] = e
    dist.broadcast_object_list(box, src=0, device=collective_device())
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def checkpoint_precision(cfg: TrainConfig, device: torch.device, current: str, saved: Optional[str],
                         where: str) -> Optional[PrecisionChoice]:
    """With --precision auto, a resume runs the precision its checkpoint was trained in (so an exact resume
    stays exact), where this device can run it; an explicit --precision wins. Returns the choice to switch to,
    or None to keep `current` (with a warning when an fp16 checkpoint meets a device without CUDA)."""
    if cfg.precision != "auto" or saved in (None, current):
        return None
    if saved == "fp16" and device.type != "cuda":
        warnings.warn(f"{where} was trained in fp16, which needs CUDA; this run continues in {current}",
                      stacklevel=4)
        return None
    return PrecisionChoice(saved, "checkpoint", f"auto: kept from {where} (this machine's choice: "
                                                f"{current}; --precision {current} to switch)")
