#!/usr/bin/env python
"""End-to-end training throughput: what Ray Train, DDP and bf16 cost or gain, measured side by side in one run.

    python bench/train.py [--quick | --gpu-check | --smoke] [--workers N ...] [--precisions fp32 bf16]
                          [--output PATH.json]

Configurations, all on the same model (distgan's DCGAN at 28x28), the same global batch, the same data
(mnist5k), the same alternating GAN step (distgan.step.gan_step):

    plain     one process, no Ray, no DDP: DataLoader -> gan_step -> one host sync per step (the seed's
              recipe, with distgan's model and step, but the textbook nn.Dropout and torch.optim.Adam in
              place of distgan's CPU dropout mask and fused Adam). On CPU it gets as many threads as the largest
              distgan run has workers, so both sides use the same cores. bf16: torch.autocast around both
              GAN phases' forwards, the logits cast back to fp32, so the BCE losses run in fp32.
    ray xN    `python -m distgan.train --num-workers N --precision P`, as a user runs it on one machine: a
              fresh local Ray cluster, a TorchTrainer with N DDP workers (gloo on CPU, NCCL on GPU). EMA,
              evaluation and W&B are off and every step is logged, so both sides do the same work per step.

Defaults: on CPU, plain vs distgan with 2 workers, fp32 and bf16, eager kernels (Triton only runs under its
interpreter there: n/a); on a GPU, plain vs distgan with 1 GPU worker, eager and Triton kernels, fp32 and
bf16. Each configuration is its own process, started the same way, so "submit -> first step" (process start
to the end of step 1) compares like with like.

Images/s is measured over steady-state steps only (the first warm-up steps are excluded): from the wall-clock
stamps of the rank-0 metrics.jsonl rows (one per step) for the Ray runs, and around the same steps in the
plain process. Configurations run --repeats times, interleaved (plain fp32, ray fp32, plain bf16, ray bf16,
plain fp32, ...) so that load from other processes falls on all of them alike; reported are medians, the
spread, the ratios distgan bf16 / distgan fp32 and distgan (default precision) / plain fp32, and the load
average before each run.

Before the runs, in this process: what `--precision auto` picks here (distgan's own decision: its probe, or this
machine's cached probe) and a longer interleaved fp32/bf16 measurement of the same steps, whose per-round
ratios show the probe's noise.

Writes a new bench/results/runs/train-<preset>_<processor>-<N>c_<YYYY-mm>-<YYYYmmdd-HHMMSS>.{json,md} (git-ignored),
or exactly --output PATH; the processor is named in the results (lscpu's model name, family and model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import _results  # noqa: E402
import torch  # noqa: E402
from _results import add_output_args, add_preset_args, int_at_least, positive_float, write_result  # noqa: E402

from distgan import hardware, provenance, seeds  # noqa: E402
from distgan.storage import read_metrics  # noqa: E402

GPU = torch.cuda.is_available()
PRECISIONS = ("fp32", "bf16")
CONFIG_NAMES = {"plain": "plain loop (no Ray)", "ray": "distgan (Ray Train + DDP)"}


@dataclass(frozen=True)
class Preset:
    warmup: int  # steps excluded from the throughput (allocator, autograd, DDP bucket set-up)
    steps: int  # steady-state steps measured
    repeats: int
    batch_size: int  # global


PRESETS = {
    "full": Preset(warmup=10, steps=50, repeats=5, batch_size=64),
    "quick": Preset(warmup=10, steps=30, repeats=3, batch_size=64),
    # bench/gpu_check.sh: one repeat; on a GPU a step takes milliseconds, Ray's start-up dominates.
    "gpu-check": Preset(warmup=10, steps=40, repeats=1, batch_size=64),
    "smoke": Preset(warmup=2, steps=3, repeats=1, batch_size=16),
}


@dataclass(frozen=True)
class Spec:
    """One configuration to measure."""

    config: str  # "plain" | "ray"
    workers: int
    kernels: str
    precision: str


def fused_unavailable() -> str | None:
    """Why the fused (Triton) kernels cannot be benchmarked in a training loop here, or None."""
    if GPU:
        import kernels

        return None if kernels.triton_can_run("cuda") else "triton is not importable"
    return (
        "n/a on CPU: Triton runs only under its interpreter here (~10 ms per program, minutes per "
        "step), which measures nothing about the kernels"
    )


def precision_probe(preset: Preset, workers: int, rounds: int = 8, seconds: float = 8.0) -> dict:
    """What distgan's `--precision auto` (the default) picks for a run of `workers` workers here, by distgan's own
    decision (distgan.precision.decide_precision: the probe, or this machine's cached probe), and a longer
    measurement of the same steps to show the probe's noise: `rounds` interleaved rounds of fp32 and bf16 in
    this one process, their per-round ratios."""
    import statistics as st

    from distgan.config import TrainConfig
    from distgan.precision import decide_precision, probe_step_times

    per_worker, device = preset.batch_size // workers, "cuda" if GPU else "cpu"
    threads = 1 if GPU else max((os.cpu_count() or 1) // workers, 1)  # --cpus-per-worker auto on one machine
    cfg = TrainConfig(batch_size=preset.batch_size, num_workers=workers, kernels="eager")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        choice = decide_precision(cfg, device, per_worker, threads)
        times = {} if GPU else probe_step_times(cfg, device, per_worker, rounds=rounds, seconds=seconds)
    finally:
        torch.set_num_threads(before)
    out = {"auto_precision": choice.precision, "auto_source": choice.source, "auto_reason": choice.reason,
           "auto_images_per_s": dict(choice.images_per_s), "per_worker_batch": per_worker, "threads": threads}
    if times:
        ratios = [f / b for f, b in zip(times["fp32"], times["bf16"])]  # bf16 speed / fp32 speed, per round
        out["interleaved"] = {
            "rounds": rounds, "seconds_per_candidate": seconds,
            "images_per_s": {p: per_worker / st.median(t) for p, t in times.items()},
            "step_s": times, "bf16_over_fp32": st.median(ratios), "bf16_over_fp32_rounds": ratios,
        }
    return out


# Set by main(): a private Ray temp dir. Without RAY_ADDRESS, ray.init() joins any cluster `ray start`
# left on this machine (it reads <temp dir>/ray/ray_current_cluster); an empty temp dir of its own
# makes each distgan run start a fresh local cluster, as on a machine where nothing else runs Ray.
RAY_TMPDIR: str | None = None
JOIN_CLUSTER = False  # --join-cluster: the distgan runs join RAY_ADDRESS (the tests' cluster) instead


def _child_env(**extra) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    env.pop("TRITON_INTERPRET", None)  # neither side may run the interpreter (see fused_unavailable)
    if not JOIN_CLUSTER:
        env.pop("RAY_ADDRESS", None)
    if RAY_TMPDIR:
        env["RAY_TMPDIR"] = RAY_TMPDIR
    return env


# ---------------------------------------------------------------------------------------------------
# plain loop: `python bench/train.py --plain-child ...` prints one JSON line


class Autocast(torch.nn.Module):
    """Runs the wrapped module's forward under torch.autocast and returns fp32, so what follows (the BCE
    losses) runs in fp32. The inner module is not called `module`: gan_step unwraps `.module` (DDP's) for
    the G phase, which would skip the autocast there."""

    def __init__(self, inner: torch.nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.inner(x)
        return out.float()


def plain_setup(args, device):
    """(g, d, opt_g, opt_d, loader, sample_z, cfg) for the plain loop, initialised as the trainer does."""
    from torch.utils.data import DataLoader

    from distgan.config import TrainConfig
    from distgan.data import build_dataset
    from distgan.models import build_models

    cfg = TrainConfig(batch_size=args.batch_size, num_workers=1, kernels=args.kernels, seed=args.seed)
    torch.manual_seed(cfg.seed)  # the trainer's init: same seed, same weights
    g, d = build_models(cfg)
    g.to(device)
    d.to(device)
    # What a hand-written loop uses: nn.Dropout (a serial bernoulli_ mask on CPU) and torch.optim.Adam in
    # its default implementation. distgan's CPU dropout mask and fused Adam are part of what its rows add.
    textbook = (torch.nn.Dropout(m.p) if isinstance(m, torch.nn.Dropout) else m for m in d.net)
    d.net = torch.nn.Sequential(*textbook)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2))
                    for m, lr in ((g, cfg.lr_g), (d, cfg.lr_d)))
    if args.precision == "bf16":
        g, d = (Autocast(m, device.type, torch.bfloat16) for m in (g, d))
    loader = DataLoader(build_dataset(cfg, "train"), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    noise = torch.Generator(device=device).manual_seed(seeds.noise(cfg.seed, rank=0))

    def sample_z(n):
        return torch.randn(n, cfg.z_dim, device=device, generator=noise)

    return g, d, opt_g, opt_d, loader, sample_z, cfg


def plain_child(args) -> dict:
    """The plain loop itself, in its own process; returns (and prints as one JSON line) its timings."""
    from distgan.step import gan_step

    device = torch.device("cuda" if GPU else "cpu")
    if not GPU:
        torch.set_num_threads(args.threads)
    g, d, opt_g, opt_d, loader, sample_z, cfg = plain_setup(args, device)
    batches = iter(loader)
    first_step = t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0 = time.perf_counter()
        try:
            real = next(batches)[0]
        except StopIteration:
            batches = iter(loader)
            real = next(batches)[0]
        out = gan_step(g, d, opt_g, opt_d, [real.to(device, non_blocking=True)], sample_z, 1.0, cfg.kernels)
        loss = float(out["loss_d"])  # one host sync per step, as the trainer's per-step all-reduce makes
        if first_step is None:
            first_step = time.time()
    elapsed = time.perf_counter() - t0
    result = {"first_step_time": first_step, "steady_s": elapsed, "threads": torch.get_num_threads(),
              "images_per_s": args.steps * args.batch_size / elapsed, "last_loss_d": loss}
    print(json.dumps(result))
    return result


def plain_run(preset: Preset, spec: Spec, threads: int, seed: int = 0, timeout: float = 900) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-child", "--kernels", spec.kernels,
           "--precision", spec.precision, "--threads", str(threads), "--batch-size", str(preset.batch_size),
           "--warmup", str(preset.warmup), "--steps", str(preset.steps), "--seed", str(seed)]
    env = _child_env(**({} if GPU else {"OMP_NUM_THREADS": str(threads)}))
    t_submit = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"images_per_s": out["images_per_s"], "first_step_s": out["first_step_time"] - t_submit,
            "steady_s": out["steady_s"], "threads": out["threads"], "wall_s": time.time() - t_submit}


# ---------------------------------------------------------------------------------------------------
# distgan through Ray Train


def ray_command(preset: Preset, spec: Spec, storage: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "distgan.train", "--num-workers", str(spec.workers),
            "--batch-size", str(preset.batch_size), "--epochs", "1", "--max-steps", str(preset.warmup + preset.steps),
            "--storage-path", str(storage), "--name", name, "--kernels", spec.kernels, "--precision", spec.precision,
            "--eval-every", "0", "--log-every", "1", "--ema-decay", "0", "--wandb-mode", "disabled"]


def throughput_from_metrics(path: Path, preset: Preset, t_submit: float) -> dict:
    """images/s over the steady-state steps, from the step rows' wall-clock stamps in metrics.jsonl."""
    total = preset.warmup + preset.steps
    rows = read_metrics(path)
    steps = {r["step"]: r for r in rows if r.get("kind") == "step"}
    start = next((r for r in rows if r.get("kind") == "start"), None)
    if preset.warmup not in steps or total not in steps or 1 not in steps:
        raise RuntimeError(f"{path}: lacks the step rows 1, {preset.warmup}, {total} (has {sorted(steps)})")
    # A step row is stamped after its step: steps warmup+1 .. total lie between these two stamps.
    elapsed = steps[total]["time"] - steps[preset.warmup]["time"]
    return {"images_per_s": preset.steps * preset.batch_size / elapsed, "first_step_s": steps[1]["time"] - t_submit,
            "worker_start_s": (start["time"] - t_submit) if start else None, "steady_s": elapsed}


def ray_run(preset: Preset, spec: Spec, storage: Path, name: str, timeout: float = 900) -> dict:
    """`python -m distgan.train` in a subprocess, like a user; throughput from its metrics.jsonl."""
    cmd = ray_command(preset, spec, storage, name)
    t_submit = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
    wall = time.time() - t_submit
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (rc={proc.returncode}):\n{tail}")
    return {**throughput_from_metrics(storage / name / "metrics.jsonl", preset, t_submit), "wall_s": wall}


def _wait_for_ray_exit(timeout_s: float = 60.0) -> float:
    """Wait until the processes of the last run's Ray cluster (found by our RAY_TMPDIR in their command
    line) are gone, so that their shutdown does not run alongside the next measurement. Returns the
    seconds waited."""
    t0 = time.time()
    while RAY_TMPDIR and time.time() - t0 < timeout_s:
        alive = False
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if RAY_TMPDIR.encode() in (proc / "cmdline").read_bytes():
                    alive = True
                    break
            except OSError:
                continue
        if not alive:
            break
        time.sleep(0.5)
    return time.time() - t0


# ---------------------------------------------------------------------------------------------------
# Results


def _median_by(runs: list[dict]) -> dict[Spec, float]:
    groups: dict[Spec, list[float]] = {}
    for r in runs:
        groups.setdefault(Spec(r["config"], r["workers"], r["kernels"], r["precision"]), []).append(r["images_per_s"])
    return {k: statistics.median(v) for k, v in groups.items()}


def _figure(common: dict, metric: str, value, unit: str, samples, method: str) -> dict:
    return {**common, "metric": metric, "value": value, "unit": unit, "samples": samples, "method": method}


def spec_records(spec: Spec, rs: list[dict], medians: dict, preset: Preset) -> tuple[list[dict], dict]:
    """One configuration's records (images/s, start-up, ratios) and its table row."""
    ips, firsts = [x["images_per_s"] for x in rs], [x["first_step_s"] for x in rs]
    med = statistics.median(ips)
    plain = medians.get(Spec("plain", 1, spec.kernels, "fp32"))
    fp32 = medians.get(dataclasses.replace(spec, precision="fp32")) if spec.precision != "fp32" else None
    common = {"op": "gan_step", "config": spec.config, "workers": spec.workers, "kernels": spec.kernels,
              "precision": spec.precision, "batch_size": preset.batch_size, "shape": [preset.batch_size, 1, 28, 28],
              "dtype": spec.precision, "mode": "full", "provider": spec.kernels, "source": "measured",
              "repeats": len(rs)}
    steady = f"global images over {preset.steps} steady-state steps after {preset.warmup} warm-up steps"
    records = [
        _figure(common, "images_per_s", med, "images/s", ips, f"{steady}; median of {len(rs)} runs"),
        _figure(common, "submit_to_first_step_s", statistics.median(firsts), "s", firsts,
                "process start to the end of step 1 (wall clock); median"),
    ]
    if plain:
        records.append(_figure(common, "ratio_vs_plain", med / plain, "x", [x / plain for x in ips],
                               "median images/s over the plain fp32 loop's median images/s (same kernels)"))
    if fp32:
        records.append(_figure(common, "ratio_vs_fp32", med / fp32, "x", [x / fp32 for x in ips],
                               "median images/s over the same configuration's fp32 median"))
    row = {"config": spec.config, "workers": spec.workers, "kernels": spec.kernels, "precision": spec.precision,
           "median": med, "lo": min(ips), "hi": max(ips), "ratio": med / plain if plain else None,
           "ratio_fp32": med / fp32 if fp32 else None, "first": statistics.median(firsts), "n": len(rs)}
    return records, row


def summarise(runs: list[dict], preset: Preset) -> tuple[list[dict], list[dict]]:
    """Per-configuration medians and ratios, as records (one per figure) and as table rows."""
    groups: dict[Spec, list[dict]] = {}
    for r in runs:
        groups.setdefault(Spec(r["config"], r["workers"], r["kernels"], r["precision"]), []).append(r)
    medians = _median_by(runs)
    records, rows = [], []
    for spec, rs in groups.items():
        recs, row = spec_records(spec, rs, medians, preset)
        records += recs
        rows.append(row)
    return records, rows


def headline(rows: list[dict], default: str) -> dict:
    """The two ratios the table leads with, per kernel path: distgan bf16 / distgan fp32 and distgan at its
    default precision / plain fp32 (at the largest worker count measured)."""
    out = {}
    for impl in dict.fromkeys(r["kernels"] for r in rows):
        ray = [r for r in rows if r["config"] == "ray" and r["kernels"] == impl]
        if not ray:
            continue
        n = max(r["workers"] for r in ray)
        by = {r["precision"]: r for r in ray if r["workers"] == n}
        plain = next((r for r in rows if r["config"] == "plain" and r["kernels"] == impl
                      and r["precision"] == "fp32"), None)
        out[impl] = {
            "workers": n,
            "distgan_bf16_over_fp32": by["bf16"]["median"] / by["fp32"]["median"] if {"bf16", "fp32"} <= by.keys()
            else None,
            "default_precision": default,
            "distgan_default_over_plain_fp32": by[default]["median"] / plain["median"] if default in by and plain
            else None,
        }
    return out


def _markdown_header(result) -> list[str]:
    m, p = result["machine"], result["preset_values"]
    lines = [
        f"# Training throughput ({result['preset']}, {'GPU: ' + m['gpu'] if m['gpu'] else 'CPU only'})",
        "",
        f"`{result['command']}` — {result['created']}",
        "",
        f"- machine: {result.get('processor', m['processor'])}, {m['cpu_count']} CPUs"
        + (f", {m['gpu']}" if m["gpu"] else ", no GPU"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- git: {result['git']['commit']}" + (" (uncommitted changes)" if result["git"]["dirty"] else ""),
        (
            f"- distgan's DCGAN (28×28 MNIST-5k), global batch {p['batch_size']}, {p['steps']} steady-state "
            f"steps after {p['warmup']} warm-up steps, {p['repeats']} repeats interleaved; every figure "
            "**measured**."
        ),
        (
            "- distgan runs: `python -m distgan.train --num-workers N --precision P --batch-size "
            f"{p['batch_size']} --eval-every 0 --ema-decay 0 --log-every 1 --wandb-mode disabled`, a fresh "
            "local Ray cluster each. Plain bf16: torch.autocast around both GAN phases' forwards, BCE in fp32."
        ),
    ]
    if not m["gpu"]:
        lines.append(
            f"- CPU: each Ray worker gets its share of the {m['cpu_count']} CPUs as Ray CPUs and torch threads "
            f"(`--cpus-per-worker auto`); the plain process gets {result['plain_threads']} threads, the cores the "
            f"largest distgan run uses."
        )
    loads = [r["loadavg"] for r in result["runs"] if r.get("loadavg") is not None]
    if loads:
        lines.append(
            f"- 1-minute load average before the first run {result.get('loadavg_before') or 0:.2f}, before each run "
            f"{min(loads):.1f}–{max(loads):.1f}, on {m['cpu_count']} CPUs"
        )
    return _results.busy_banner(result.get("busy")) + lines


def _markdown_table(result) -> list[str]:
    lines = [
        "",
        "| configuration | workers | kernels | precision | images/s (median) | min–max | vs plain fp32 | "
        "bf16 / fp32 | submit → first step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.3f}×" if r["ratio"] else "—"
        ratio_fp32 = f"{r['ratio_fp32']:.3f}×" if r.get("ratio_fp32") else "—"
        lines.append(
            f"| {CONFIG_NAMES[r['config']]} | {r['workers']} | {r['kernels']} | {r['precision']} | "
            f"{r['median']:.1f} | {r['lo']:.1f}–{r['hi']:.1f} | {ratio} | {ratio_fp32} | {r['first']:.1f} s |"
        )
    for u in result["unavailable"]:
        reason = " ".join(u["reason"].split())[:300]  # a failed run's reason holds its log's tail
        lines.append(f"| {CONFIG_NAMES[u['config']]} | {u['workers']} | {u['kernels']} | {u['precision']} | "
                     f"{reason} | | | | |")
    return lines


def _markdown_ratios(result) -> list[str]:
    lines = []
    for impl, h in result["headline"].items():
        n, default = h["workers"], h["default_precision"]
        if h["distgan_bf16_over_fp32"] is not None:
            lines.append(f"- {impl} kernels, distgan ×{n}: bf16 / fp32 = **{h['distgan_bf16_over_fp32']:.3f}×**")
        if h["distgan_default_over_plain_fp32"] is not None:
            lines.append(f"- {impl} kernels: distgan ×{n} at its default precision ({default}) / plain fp32 loop = "
                         f"**{h['distgan_default_over_plain_fp32']:.3f}×**")
    return ["", *lines] if lines else []


def _markdown_probe(result) -> list[str]:
    p = result.get("precision_probe")
    if not p:
        return []
    lines = ["", f"- `--precision auto` here picks **{p['auto_precision']}** ({p['auto_reason']})."]
    inter = p.get("interleaved")
    if inter:
        r, ips = inter["bf16_over_fp32_rounds"], inter["images_per_s"]
        per_round = inter["seconds_per_candidate"] / inter["rounds"]
        lines.append(
            f"- The same probe, longer ({inter['rounds']} interleaved rounds of ~{per_round:.1f} s per precision in "
            f"one process, {p['per_worker_batch']} images/worker, {p['threads']} thread(s)): fp32 {ips['fp32']:.0f} "
            f"img/s, bf16 {ips['bf16']:.0f} img/s; bf16 / fp32 = **{inter['bf16_over_fp32']:.2f}×** (median of the "
            f"per-round ratios; noise: the rounds span {min(r):.2f}–{max(r):.2f}×).")
    return lines


def render_markdown(result) -> str:
    return "\n".join(_markdown_header(result) + _markdown_table(result) + _markdown_ratios(result)
                     + _markdown_probe(result)) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preset_args(p, quick="a few minutes on a 2-core CPU", gpu_check="bench/gpu_check.sh's preset (one repeat)")
    p.add_argument("--workers", type=int_at_least(1), nargs="+", default=None,
                   help="Ray worker counts; default 2 on CPU, 1 on a GPU machine")
    p.add_argument("--kernels", nargs="+", choices=("eager", "triton"), default=None,
                   help="kernel paths to compare; default eager on CPU (triton is n/a there), eager and triton on GPU")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help=f"default: {' '.join(PRECISIONS)}")
    p.add_argument("--configs", nargs="+", choices=("plain", "ray"), default=["plain", "ray"],
                   help="default: plain ray")
    p.add_argument("--repeats", type=int_at_least(1), default=None, help="default: the preset's")
    p.add_argument("--time-budget-s", type=positive_float, default=None, metavar="SECONDS",
                   help="start no new run after this many seconds (the rest are listed as not run); default: no limit")
    p.add_argument("--join-cluster", action="store_true",
                   help="distgan runs join the cluster in RAY_ADDRESS instead of starting their own Ray instance "
                        "(quicker; start-up times then say nothing of a fresh machine)")
    add_output_args(p, "train-<preset>_<processor>-<N>c_<YYYY-mm>")
    _results.add_load_args(p)
    # the plain loop's own process (internal)
    p.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_specs(args, workers: list[int], impls: list[str]) -> list[Spec]:
    """The configurations of one repeat, in the order they run: per precision (in args.precisions' order; main
    puts the default run's first, so a time budget cuts the other), the plain loop, then distgan at each worker
    count, each with every kernel path."""
    specs = []
    for precision in args.precisions:
        if "plain" in args.configs:
            specs += [Spec("plain", 1, impl, precision) for impl in impls]
        if "ray" in args.configs:
            specs += [Spec("ray", n, impl, precision) for n in workers for impl in impls]
    return specs


def run_one(spec: Spec, preset: Preset, rep: int, storage: Path, threads: int, timeout: float) -> dict:
    load = _results.load_now()
    if spec.config == "plain":
        r = plain_run(preset, spec, threads, seed=0, timeout=timeout)
    else:
        name = f"bench-w{spec.workers}-{spec.kernels}-{spec.precision}-r{rep}"
        r = ray_run(preset, spec, storage, name, timeout=timeout)
        r["teardown_wait_s"] = round(_wait_for_ray_exit(), 1)
    return {**asdict(spec), "repeat": rep, "loadavg": load, **r}


# Seconds a run needs to mean anything: distgan's includes starting Ray and its workers. With less of the time
# budget left, it is not started (and a started one may take all that is left, not more).
MIN_RUN_S = {"plain": 20.0, "ray": 45.0}


def run_all(specs: list[Spec], preset: Preset, threads: int, budget_s: float | None,
            save=None) -> tuple[list, list, list]:
    """Every spec, `preset.repeats` times interleaved; (runs, failed runs, specs skipped because the time
    budget was spent). `save(runs, failed, skipped)` is called after every run."""
    global RAY_TMPDIR
    t0 = time.time()
    runs, failed, skipped = [], [], []
    storage = Path(tempfile.mkdtemp(prefix="distgan-bench-"))
    RAY_TMPDIR = tempfile.mkdtemp(prefix="dgb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        for rep in range(preset.repeats):
            for spec in specs:
                left = None if budget_s is None else budget_s - (time.time() - t0)
                if left is not None and left < MIN_RUN_S[spec.config]:
                    skipped.append(spec)
                    continue
                try:
                    r = run_one(spec, preset, rep, storage, threads, timeout=900 if left is None else left)
                except subprocess.TimeoutExpired as exc:
                    if left is None:  # no budget: a run that hangs is a failure
                        failed.append({**asdict(spec), "repeat": rep, "reason": f"FAILED: {str(exc)[-1500:]}"})
                    else:  # it was cut where the budget ended: not measured, not broken
                        failed.append({**asdict(spec), "repeat": rep,
                                       "reason": f"cut: the time budget ended {left:.0f} s into this run"})
                    print(f"  {spec} stopped: {exc}", file=sys.stderr, flush=True)
                    continue
                except RuntimeError as exc:  # recorded; the other runs go on
                    failed.append({**asdict(spec), "repeat": rep, "reason": f"FAILED: {str(exc)[-1500:]}"})
                    print(f"  {spec} failed: {exc}", file=sys.stderr, flush=True)
                    continue
                runs.append(r)
                print(f"  [{rep + 1}/{preset.repeats}] {spec.config} x{spec.workers} {spec.kernels:6s} "
                      f"{spec.precision} {r['images_per_s']:8.1f} images/s, first step after "
                      f"{r['first_step_s']:.1f} s (load {r['loadavg']})", file=sys.stderr, flush=True)
                if save is not None:
                    save(runs, failed, skipped)
    finally:
        subprocess.run(["rm", "-rf", str(storage), RAY_TMPDIR], check=False)
    return runs, failed, skipped


def unavailable_rows(args, workers, no_fused, failed, skipped, budget_s) -> list[dict]:
    out = list(failed)
    if no_fused and "triton" in args.kernels:
        out += [{**asdict(s), "reason": no_fused} for s in plan_specs(args, workers, ["triton"])]
    for s in dict.fromkeys(skipped):
        if not any(asdict(s).items() <= r.items() for r in out):
            out.append({**asdict(s), "reason": f"not run: less of the time budget of {budget_s:.0f} s was left "
                                               f"than such a run needs ({MIN_RUN_S[s.config]:.0f} s)"})
    return out


def main(argv=None) -> int:
    global JOIN_CLUSTER
    args = parse_args(argv)
    JOIN_CLUSTER = args.join_cluster
    if args.plain_child:
        args.kernels = args.kernels[0] if isinstance(args.kernels, list) else args.kernels
        plain_child(args)
        return 0
    preset_name = _results.preset_name(args)
    preset = PRESETS[preset_name]
    if args.repeats:
        preset = dataclasses.replace(preset, repeats=args.repeats)
    workers = args.workers or ([1] if GPU else [2])
    args.kernels = args.kernels or (["eager", "triton"] if GPU else ["eager"])
    no_fused = fused_unavailable()
    impls = [k for k in args.kernels if not (k == "triton" and no_fused)]
    # the cores the largest distgan run uses: its workers x their --cpus-per-worker auto
    threads = 1 if GPU else max(workers) * max((os.cpu_count() or 1) // max(workers), 1)
    t_start, load_before = time.perf_counter(), _results.load_now()
    probe = precision_probe(preset, max(workers))
    print(f"  precision auto: {probe['auto_precision']} ({probe['auto_reason']})", file=sys.stderr, flush=True)
    default = probe["auto_precision"]
    args.precisions = sorted(args.precisions, key=lambda p: p != default)  # the default run's precision first

    def result_of(runs, failed, skipped) -> dict:
        records, rows = summarise(runs, preset)
        heads = headline(rows, default)
        base = heads.get("eager" if "eager" in heads else next(iter(heads), None)) or {}
        ratio = base.get("distgan_default_over_plain_fp32")
        return {
            "schema": 2,
            **_results.origin("bench/train.py", argv),
            "preset": preset_name,
            "preset_values": asdict(preset),
            "device": "cuda" if GPU else "cpu",
            "processor": hardware.processor_name("cuda" if GPU else "cpu"),
            **provenance.collect(),  # machine, versions, git
            "workers": workers,
            "plain_threads": threads,
            "default_precision": default,
            "precision_probe": probe,
            "records": records,
            "rows": rows,
            "headline": heads,
            "runs": runs,
            "unavailable": unavailable_rows(args, workers, no_fused, failed, skipped, args.time_budget_s),
            "overhead_pct": None if ratio is None else 100 * (1 - ratio),
            "wall_s": round(time.perf_counter() - t_start, 1),
            "loadavg_before": load_before,
            "busy": _results.busy_reason(load_before, [r.get("loadavg") for r in runs], os.cpu_count() or 1),
        }

    def save(runs, failed, skipped) -> None:  # what was measured so far, should the run be killed
        _results.write_partial(result_of(runs, failed, skipped), args.output)

    # the budget counts from this benchmark's start: the precision probe above spent some of it
    budget = None if args.time_budget_s is None else args.time_budget_s - (time.perf_counter() - t_start)
    runs, failed, skipped = run_all(plan_specs(args, workers, impls), preset, threads, budget, save)
    result = result_of(runs, failed, skipped)
    if _results.refuse_busy(result["busy"], args.allow_busy, "bench/train.py"):
        return 3
    md = render_markdown(result)
    where = f"{hardware.slug(result['processor'])}-{result['machine']['cpu_count']}c"
    stem = args.name or f"train-{preset_name}_{where}_{time.strftime('%Y-%m')}"
    path = write_result(result, md, stem, args.output, args.out)
    print(md)
    print(f"wrote {path} and .md in {result['wall_s']} s", file=sys.stderr)
    return 1 if any(f["reason"].startswith("FAILED") for f in failed) or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
