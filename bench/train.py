#!/usr/bin/env python
"""End-to-end training throughput: what Ray Train and DDP cost, measured side by side in one run.

    python bench/train.py [--quick | --smoke] [--workers 1 2] [--out bench/results]

Configurations, all on the same model (distgan's DCGAN at 28x28), the same global batch, the same data
(mnist5k), the same alternating GAN step (distgan.step.gan_step), eager and fused kernels where they
can run:

    plain     one process, no Ray, no DDP: DataLoader -> gan_step -> one host sync per step (the
              seed's recipe, with distgan's model and step).
    ray xN    `python -m distgan.train --num-workers N`, as a user runs it on one machine: a fresh local
              Ray cluster, a TorchTrainer with N DDP workers (gloo on CPU, NCCL on GPU). EMA, evaluation
              and W&B are off and every step is logged, so both sides do the same work per step.

Each configuration is its own process, started the same way, so "submit -> first step" (process start to
the end of step 1: imports, Ray start-up, worker group, data, model) compares like with like. On CPU the
plain process gets OMP_NUM_THREADS=1, the setting Ray gives each 1-CPU worker.

Images/s is measured over steady-state steps only (the first --warmup steps are excluded): from the
wall-clock stamps of the rank-0 metrics.jsonl rows (one per step) for the Ray runs, and around the same
steps in the plain process. Configurations run --repeats times, interleaved (plain, ray x1, ray x2,
plain, ...) so that load from other processes falls on all of them alike; reported are medians, the
spread, ratios to the plain loop, and the load average before each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

GPU = torch.cuda.is_available()


@dataclass
class Preset:
    warmup: int  # steps excluded from the throughput (allocator, autograd, DDP bucket set-up)
    steps: int  # steady-state steps measured
    repeats: int
    batch_size: int  # global


PRESETS = {
    "full": Preset(warmup=10, steps=50, repeats=5, batch_size=64),
    "quick": Preset(warmup=10, steps=30, repeats=3, batch_size=64),
    "smoke": Preset(warmup=2, steps=3, repeats=1, batch_size=16),
}
CONFIG_NAMES = {"plain": "plain loop (no Ray)", "ray": "distgan (Ray Train + DDP)"}


def fused_unavailable() -> str | None:
    """Why the fused (Triton) kernels cannot be benchmarked in a training loop here, or None."""
    if GPU:
        import kernels

        return None if kernels.triton_can_run("cuda") else "triton is not importable"
    return (
        "n/a on CPU: Triton runs only under its interpreter here (~10 ms per program, minutes per "
        "step), which measures nothing about the kernels"
    )


# Set by main(): a private Ray temp dir. Without RAY_ADDRESS, ray.init() joins any cluster `ray start`
# left on this machine (it reads <temp dir>/ray/ray_current_cluster); an empty temp dir of its own
# makes each distgan run start a fresh local cluster, as on a machine where nothing else runs Ray.
RAY_TMPDIR: str | None = None


def _child_env(**extra) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    env.pop("TRITON_INTERPRET", None)  # neither side may run the interpreter (see fused_unavailable)
    env.pop("RAY_ADDRESS", None)
    if RAY_TMPDIR:
        env["RAY_TMPDIR"] = RAY_TMPDIR
    return env


# ---------------------------------------------------------------------------------------------------
# plain loop: `python bench/train.py --plain-child ...` prints one JSON line


def plain_child(args) -> None:
    """The plain loop itself, in its own process; prints its timings as one JSON line."""
    from torch.utils.data import DataLoader

    from distgan.config import TrainConfig
    from distgan.data import build_dataset
    from distgan.models import build_models
    from distgan.step import gan_step, make_optimizers

    device = torch.device("cuda" if GPU else "cpu")
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=1, kernels=args.kernels, seed=args.seed)
    torch.manual_seed(cfg.seed)  # the trainer's init: same seed, same weights
    g, d = build_models(cfg)
    g.to(device)
    d.to(device)
    opt_g, opt_d = make_optimizers(g, d, cfg)
    loader = DataLoader(
        build_dataset(cfg, "train"),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    noise = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + 1)

    def sample_z(n):
        return torch.randn(n, cfg.z_dim, device=device, generator=noise)

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
        float(out["loss_d"])  # one host sync per step, as the trainer's per-step all-reduce makes
        if first_step is None:
            first_step = time.time()
    elapsed = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "first_step_time": first_step,
                "steady_s": elapsed,
                "threads": torch.get_num_threads(),
                "images_per_s": args.steps * args.batch_size / elapsed,
            }
        )
    )


def plain_run(preset: Preset, kernels_impl: str, seed: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--plain-child",
        "--kernels",
        kernels_impl,
        "--batch-size",
        str(preset.batch_size),
        "--warmup",
        str(preset.warmup),
        "--steps",
        str(preset.steps),
        "--seed",
        str(seed),
    ]
    # Ray gives each 1-CPU worker OMP_NUM_THREADS=1; the plain process gets the same on CPU.
    env = _child_env(**({} if GPU else {"OMP_NUM_THREADS": "1"}))
    t_submit = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "images_per_s": out["images_per_s"],
        "first_step_s": out["first_step_time"] - t_submit,
        "steady_s": out["steady_s"],
        "threads": out["threads"],
        "wall_s": time.time() - t_submit,
    }


# ---------------------------------------------------------------------------------------------------
# distgan through Ray Train


def ray_run(preset: Preset, workers: int, kernels_impl: str, storage: Path, name: str) -> dict:
    """`python -m distgan.train` in a subprocess, like a user; throughput from its metrics.jsonl."""
    total = preset.warmup + preset.steps
    cmd = [
        sys.executable,
        "-m",
        "distgan.train",
        "--num-workers",
        str(workers),
        "--batch-size",
        str(preset.batch_size),
        "--epochs",
        "1",
        "--max-steps",
        str(total),
        "--storage-path",
        str(storage),
        "--name",
        name,
        "--kernels",
        kernels_impl,
        "--eval-every",
        "0",
        "--log-every",
        "1",
        "--ema-decay",
        "0",
        "--wandb-mode",
        "disabled",
    ]
    t_submit = time.time()
    proc = subprocess.run(
        cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=900, check=False
    )
    wall = time.time() - t_submit
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (rc={proc.returncode}):\n{tail}")
    lines = (storage / name / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    steps = {r["step"]: r for r in rows if r.get("kind") == "step"}
    start = next((r for r in rows if r.get("kind") == "start"), None)
    if preset.warmup not in steps or total not in steps or 1 not in steps:
        raise RuntimeError(
            f"{name}: metrics.jsonl lacks the step rows 1, {preset.warmup}, {total} (has {sorted(steps)})"
        )
    # A step row is stamped after its step: steps warmup+1 .. total lie between these two stamps.
    elapsed = steps[total]["time"] - steps[preset.warmup]["time"]
    return {
        "images_per_s": preset.steps * preset.batch_size / elapsed,
        "first_step_s": steps[1]["time"] - t_submit,
        "worker_start_s": (start["time"] - t_submit) if start else None,
        "steady_s": elapsed,
        "wall_s": wall,
    }


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


def _machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.machine(),
        "gpu": torch.cuda.get_device_name() if GPU else None,
        "gpu_count": torch.cuda.device_count() if GPU else 0,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _git() -> dict:
    def git(*args):
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return p.stdout.strip() if p.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", "kernels", "bench", "distgan")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status)}


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def summarise(runs: list[dict], preset: Preset) -> tuple[list[dict], list[dict]]:
    """Per-configuration medians and ratios, as records (one per figure) and as table rows."""
    configs: dict[tuple, list[dict]] = {}
    for r in runs:
        configs.setdefault((r["config"], r["workers"], r["kernels"]), []).append(r)
    plain = {
        k: statistics.median(x["images_per_s"] for x in v) for (c, _, k), v in configs.items() if c == "plain"
    }
    records, rows = [], []
    for (config, workers, impl), rs in configs.items():
        ips = [x["images_per_s"] for x in rs]
        firsts = [x["first_step_s"] for x in rs]
        med = statistics.median(ips)
        base = plain.get(impl)
        common = {
            "op": "gan_step",
            "config": config,
            "workers": workers,
            "kernels": impl,
            "batch_size": preset.batch_size,
            "shape": [preset.batch_size, 1, 28, 28],
            "dtype": "fp32",
            "mode": "full",
            "provider": impl,
            "source": "measured",
            "repeats": len(rs),
        }
        records.append(
            {
                **common,
                "metric": "images_per_s",
                "value": med,
                "unit": "images/s",
                "samples": ips,
                "method": (
                    f"global images over {preset.steps} steady-state steps after {preset.warmup} "
                    f"warm-up steps; median of {len(rs)} runs"
                ),
            }
        )
        records.append(
            {
                **common,
                "metric": "submit_to_first_step_s",
                "value": statistics.median(firsts),
                "unit": "s",
                "samples": firsts,
                "method": "process start to the end of step 1 (wall clock); median",
            }
        )
        if base:
            records.append(
                {
                    **common,
                    "metric": "ratio_vs_plain",
                    "value": med / base,
                    "unit": "x",
                    "samples": [x / base for x in ips],
                    "method": "median images/s over the plain loop's median images/s (same kernels)",
                }
            )
        rows.append(
            {
                "config": config,
                "workers": workers,
                "kernels": impl,
                "median": med,
                "lo": min(ips),
                "hi": max(ips),
                "ratio": med / base if base else None,
                "first": statistics.median(firsts),
                "n": len(rs),
            }
        )
    return records, rows


def render_markdown(result) -> str:
    m, p = result["machine"], result["preset_values"]
    loads = [r["loadavg"] for r in result["runs"] if r.get("loadavg") is not None]
    lines = [
        f"# Training throughput ({result['preset']}, {'GPU: ' + m['gpu'] if m['gpu'] else 'CPU only'})",
        "",
        f"`{result['command']}` — {result['created']}",
        "",
        f"- machine: {m['processor']}, {m['cpu_count']} CPUs" + (f", {m['gpu']}" if m["gpu"] else ", no GPU"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- git: {result['git']['commit']}" + (" (uncommitted changes)" if result["git"]["dirty"] else ""),
        (
            f"- distgan's DCGAN (28×28 MNIST-5k), global batch {p['batch_size']}, {p['steps']} steady-state "
            f"steps after {p['warmup']} warm-up steps, {p['repeats']} repeats interleaved; every figure "
            "**measured**."
        ),
        (
            "- distgan runs: `python -m distgan.train --num-workers N --batch-size "
            f"{p['batch_size']} --eval-every 0 --ema-decay 0 --log-every 1 --wandb-mode disabled`, a fresh "
            "local Ray cluster each."
        ),
    ]
    if not m["gpu"]:
        lines.append(
            "- CPU: every process runs PyTorch with OMP_NUM_THREADS=1 (Ray sets it for each 1-CPU "
            "worker; the plain process gets it too)."
        )
    if loads:
        busy = max(loads) > (m["cpu_count"] or 1)
        lines.append(
            f"- 1-minute load average before the runs: {min(loads):.1f}–{max(loads):.1f} on "
            f"{m['cpu_count']} CPUs"
            + (" — **the machine was busy with other work: figures are noisy**" if busy else "")
        )
    lines += [
        "",
        (
            "| configuration | workers | kernels | images/s (median) | min–max | vs plain | "
            "submit → first step |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.3f}×" if r["ratio"] else "—"
        lines.append(
            f"| {CONFIG_NAMES[r['config']]} | {r['workers']} | {r['kernels']} | {r['median']:.1f} | "
            f"{r['lo']:.1f}–{r['hi']:.1f} | {ratio} | {r['first']:.1f} s |"
        )
    for u in result["unavailable"]:
        lines.append(
            f"| {CONFIG_NAMES[u['config']]} | {u['workers']} | {u['kernels']} | {u['reason']} | | | |"
        )
    if result.get("overhead_pct") is not None:
        lines += [
            "",
            (
                f"Ray + DDP overhead at 1 worker vs the plain loop: **{result['overhead_pct']:.1f} %** of "
                "its images/s (target: within 5 %)."
            ),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU")
    size.add_argument("--smoke", action="store_true", help="the tests' tiny preset")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="Ray worker counts; default 1 and 2 on CPU, 1 and every GPU on a GPU machine",
    )
    p.add_argument(
        "--kernels",
        nargs="+",
        choices=("eager", "triton"),
        default=["eager", "triton"],
        help="kernel paths to compare (triton is n/a on CPU)",
    )
    p.add_argument("--repeats", type=int, default=None, help="default: the preset's")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default=None, help="file stem; default train-<cpu|gpu>[-<preset>]")
    # the plain loop's own process (internal)
    p.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_child:
        args.kernels = args.kernels[0] if isinstance(args.kernels, list) else args.kernels
        plain_child(args)
        return 0
    preset_name = "quick" if args.quick else "smoke" if args.smoke else "full"
    preset = PRESETS[preset_name]
    if args.repeats:
        preset.repeats = args.repeats
    workers = args.workers or ([1, 2] if not GPU else sorted({1, torch.cuda.device_count()}))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    no_fused = fused_unavailable()
    impls = [k for k in args.kernels if not (k == "triton" and no_fused)]
    unavailable = []
    if no_fused and "triton" in args.kernels:
        unavailable = [
            {"config": c, "workers": w, "kernels": "triton", "reason": no_fused}
            for c, w in [("plain", 1)] + [("ray", w) for w in workers]
        ]
    global RAY_TMPDIR
    t_start = time.perf_counter()
    runs = []
    storage = Path(tempfile.mkdtemp(prefix="distgan-bench-"))
    RAY_TMPDIR = tempfile.mkdtemp(prefix="dgb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        for rep in range(preset.repeats):
            for impl in impls:
                for config, n in [("plain", 1)] + [("ray", w) for w in workers]:
                    load = _loadavg()
                    if config == "plain":
                        r = plain_run(preset, impl, seed=0)
                    else:
                        r = ray_run(preset, n, impl, storage, f"bench-w{n}-{impl}-r{rep}")
                        r["teardown_wait_s"] = round(_wait_for_ray_exit(), 1)
                    runs.append(
                        {"config": config, "workers": n, "kernels": impl, "repeat": rep, "loadavg": load, **r}
                    )
                    log(
                        f"  [{rep + 1}/{preset.repeats}] {config} x{n} {impl:6s} {r['images_per_s']:8.1f} images/s, "
                        f"first step after {r['first_step_s']:.1f} s (load {load:.1f})"
                    )
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)
    records, rows = summarise(runs, preset)
    by = {(r["config"], r["workers"], r["kernels"]): r for r in rows}
    base_impl = "eager" if "eager" in impls else impls[0]
    overhead = None
    if ("plain", 1, base_impl) in by and ("ray", 1, base_impl) in by:
        overhead = 100 * (1 - by[("ray", 1, base_impl)]["median"] / by[("plain", 1, base_impl)]["median"])
    result = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": preset_name,
        "preset_values": asdict(preset),
        "device": "cuda" if GPU else "cpu",
        "machine": _machine(),
        "versions": _versions(),
        "git": _git(),
        "workers": workers,
        "threads": None if GPU else "OMP_NUM_THREADS=1 in every process (Ray's setting for a 1-CPU worker)",
        "records": records,
        "rows": rows,
        "runs": runs,
        "unavailable": unavailable,
        "overhead_pct": overhead,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    md = render_markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"train-{'gpu' if GPU else 'cpu'}" + (
        "" if preset_name == "full" else f"-{preset_name}"
    )
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out / stem}.json and .md in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
