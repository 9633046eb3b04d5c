"""What depends on the hardware, decided in one place: how many workers, how many CPUs (threads) each, and
which precision the GAN step runs in.

Workers and CPUs are decided by looking at the machine or the cluster (`plan_workers`, a pure function of the
counts); precision by a short measurement on the machine itself (`decide_precision`): rank 0 times a few G/D
steps at the run's shapes in each candidate precision and takes the fastest, because a CPU flag does not say
whether bf16 is fast (AVX-512 BF16 without AMX can be slower than fp32). A measurement is cached per machine
(processor, torch version, shapes, threads) in the user's cache directory, so later runs start at once.

No Ray and no torch.distributed here: the driver (distgan/cluster.py) turns a plan into Ray's ScalingConfig;
the Trainer broadcasts rank 0's precision to the other ranks.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from distgan.storage import atomic_write

# The CPU recipe: 2 workers x 32 images (--batch-size 64). With --bn local each worker's batch sets its
# BatchNorm statistics, so the worker count is part of what the recipe trains; auto keeps it on CPU and gives
# the workers the cores as threads instead.
CPU_WORKERS = 2
# Below 16 images a worker, BatchNorm's statistics get noisy enough to cost accuracy (Wu & He, "Group
# Normalization", ECCV 2018, Fig. 1: ImageNet error of BN rises as the per-GPU batch falls from 16 to 2).
# With --bn local, auto uses no more GPUs than keep this many images each.
MIN_LOCAL_BN_IMAGES = 16
# BatchNorm needs two images for a variance (config.validate refuses fewer).
MIN_IMAGES = 2

CPU_CANDIDATES = ("fp32", "bf16")  # fp16 autocast is CUDA's (its GradScaler too)
PROBE_SECONDS = 1.0  # measured time per candidate, split over PROBE_ROUNDS interleaved rounds
PROBE_ROUNDS = 3
PROBE_MAX_STEPS = 50  # a round's steps at most (a tiny model's step is fast; the rounds still bound the time)
# bf16 changes the numerics; it replaces fp32 only when it is faster by more than a probe's noise.
PREFER_FP32_MARGIN = 1.05
CACHE_ENV = "DISTGAN_CACHE_DIR"  # overrides the user's cache directory (tests, read-only homes)
CACHE_FILE = "precision.json"


# -------------------------------------------------------------------- workers and CPUs


@dataclass(frozen=True)
class Node:
    """What one node offers Ray: logical CPUs and GPUs."""

    cpus: int
    gpus: int = 0


@dataclass(frozen=True)
class WorkerPlan:
    """The decided layout. `notes` say what auto chose that a user may not expect (printed by the driver)."""

    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    notes: tuple[str, ...] = ()

    def describe(self, batch_size: int) -> str:
        per = batch_size // self.num_workers
        device = "1 GPU + " if self.use_gpu else ""
        return (f"{self.num_workers} worker(s) x {device}{self.cpus_per_worker} CPU(s) ({self.cpus_per_worker} torch "
                f"thread(s) each), {per} images per worker")


def ray_nodes(nodes: Iterable[Mapping]) -> list[Node]:
    """`ray.nodes()` (alive ones) -> Nodes."""
    return [Node(int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)))
            for n in nodes if n.get("Alive", True)]


def _largest_divisor(batch_size: int, at_most: int) -> int:
    return next(n for n in range(max(at_most, 1), 0, -1) if batch_size % n == 0)


def _fitting_cpus(nodes: Sequence[Node], workers: int, use_gpu: bool) -> int:
    """The most CPUs per worker such that `workers` bundles {CPU: k (, GPU: 1)} fit on the nodes; 1 when not
    even 1 fits (a local Ray instance is given at least one CPU per worker)."""
    most = max((n.cpus for n in nodes), default=1)
    for k in range(most, 0, -1):
        fit = sum(min(n.gpus, n.cpus // k) if use_gpu else n.cpus // k for n in nodes)
        if fit >= workers:
            return k
    return 1


def plan_workers(num_workers: Optional[int], cpus_per_worker: Optional[int], use_gpu: bool, nodes: Sequence[Node],
                 batch_size: int, bn: str = "local", keep_workers: Optional[int] = None) -> WorkerPlan:
    """Decides the worker count and the CPUs per worker. None = auto.

    Args:
        num_workers: --num-workers; auto = every GPU (at most batch_size // MIN_LOCAL_BN_IMAGES with --bn local,
            and a divisor of batch_size), on CPU CPU_WORKERS (1 for a batch too small to split).
        cpus_per_worker: --cpus-per-worker; auto = the most CPUs a worker can have such that all fit on `nodes`.
        use_gpu: whether the workers use GPUs (the flag, else whether there are any).
        nodes: what Ray offers (this machine for a local run, `ray_nodes(ray.nodes())` when joining).
        batch_size: the global batch (images per step).
        keep_workers: a mid-epoch checkpoint's world size; auto keeps it, as the saved data position needs it.
    Raises ValueError (a one-line message naming the flag) for an explicit value that cannot fit a local run.
    """
    notes = []
    gpus = sum(n.gpus for n in nodes)
    if num_workers is not None:
        workers = num_workers
    elif keep_workers is not None:
        workers = keep_workers
        notes.append(f"--num-workers auto: {workers}, as in the checkpoint this run resumes mid-epoch (its data "
                     f"position needs the same worker count)")
    elif use_gpu:
        floor = MIN_LOCAL_BN_IMAGES if bn == "local" else MIN_IMAGES
        cap = max(batch_size // floor, 1)
        workers = _largest_divisor(batch_size, min(max(gpus, 1), cap))
        if gpus == 0:
            notes.append("--num-workers auto: 1 worker, as the cluster has no GPU yet (the autoscaler may add one)")
        elif workers < gpus:
            notes.append(f"--num-workers auto: {workers} of {gpus} GPUs, so that each worker keeps "
                         f"{batch_size // workers} images (--batch-size {batch_size}) for its BatchNorm statistics"
                         + (f" (--bn local: at least {floor})" if bn == "local" else "")
                         + f"; --batch-size {gpus * floor}" + (" or --bn sync" if bn == "local" else "")
                         + f" uses all {gpus}")
    else:  # the recipe's count whatever the batch (an odd one is refused, as for --num-workers 2)
        workers = CPU_WORKERS if batch_size >= CPU_WORKERS * MIN_IMAGES else 1
    if cpus_per_worker is None:
        cpus = _fitting_cpus(nodes, workers, use_gpu)
    else:
        cpus = cpus_per_worker
        if len(nodes) == 1 and workers * cpus > max(nodes[0].cpus, workers):
            raise ValueError(f"--cpus-per-worker {cpus}: {workers} workers x {cpus} CPUs = {workers * cpus}, and this "
                             f"machine has {nodes[0].cpus} CPUs; use auto or at most "
                             f"{max(nodes[0].cpus // workers, 1)}")
    return WorkerPlan(workers, cpus, use_gpu, tuple(notes))


# -------------------------------------------------------------------- the processor


def cpu_model() -> str:
    """The CPU as lscpu names it ("model name" of /proc/cpuinfo) with its vendor family and model numbers,
    which tell generations apart where the name does not (e.g. "AMD EPYC" under KVM)."""
    import platform

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def processor_name(device_type: str, device_index: Optional[int] = None) -> str:
    """The processor a worker computes on: the GPU's name on CUDA, else `cpu_model()`."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name(device_index)
    return cpu_model()


def slug(text: str) -> str:
    """A file-name-safe lower-case form: "AMD EPYC (family 26, model 2)" -> "amd-epyc-family-26-model-2"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# -------------------------------------------------------------------- precision


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
    import torch

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


def cache_dir() -> Path:
    """$DISTGAN_CACHE_DIR, else the user's cache directory (platformdirs: $XDG_CACHE_HOME/distgan or
    ~/.cache/distgan on Linux, ~/Library/Caches/distgan on macOS)."""
    import platformdirs

    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("distgan"))


def cache_path() -> Path:
    """cache_dir()/precision.json: this machine's precision measurements."""
    return cache_dir() / CACHE_FILE


def probe_key(cfg, device_type: str, per_worker_batch: int, processor: str, threads: int) -> str:
    """What a measurement depends on: processor, torch version, device kind, threads, kernels and shapes."""
    import torch

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
    import torch

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
