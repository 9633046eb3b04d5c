#!/usr/bin/env python
"""The data paths side by side: the embedded digits in memory, an image folder, and that folder prepared.

    python bench/data.py [--quick | --smoke] [--sizes 28 64] [--scale-images 200000] [--output PATH.json]

The same images three ways at each of --sizes (1 channel): the 4,000 embedded training digits (mnist5k, one uint8
tensor); a folder of those digits as PNGs at the training size, each written --copies times (20,000 files by
default); and that folder prepared by `python -m distgan.prepare`. Measured:

  preparation    the wall clock of `python -m distgan.prepare` (Ray's start included), and the images/s it reports
                 from Ray's start to the last shard;
  training       images/s of the whole training step, from the steady-state step stamps of metrics.jsonl (the
                 intervals that hold an epoch's end, its sample grid and the loaders' restart, left out: the embedded
                 digits end an epoch every 62 steps, 20,000 files every 312), and the command-to-first-step time
                 (the driver's data check, the workers' loading, the first step) of `python -m distgan.local`:
                 the Trainer in 2 gloo processes
                 with the loaders a Ray run uses, without Ray, whose start-up (the same for every source) would
                 only blur the comparison;
  at scale       with --scale-images N: a folder of N files prepared, and the command-to-first-step time of
                 training on it against the embedded digits (the data check reads checksums, not images).

Training runs are interleaved (embedded, folder, prepared at each size, then again in a rotated order, --repeats
times) so that other load and the machine's drift fall on all alike; each run records the CPU that other
processes used while it ran (the machine's busy time from /proc/stat less this benchmark's children's, in cores),
the measure of how undisturbed it was. An unmeasured run at each size first lets --precision auto measure and
cache its choice, so that no measured run pays for it.

Writes a new bench/results/runs/data-<preset>_<processor>-<N>c_<yyyy-mm>-<stamp>.{json,md} (git-ignored), or
exactly --output PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
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
import numpy as np  # noqa: E402
import train as bench_train  # noqa: E402  (bench/train.py: its child environment, the wait for Ray's exit)
from _results import add_output_args, add_preset_args, int_at_least  # noqa: E402

from distgan import hardware, provenance  # noqa: E402
from distgan.config import IMAGE_SIZES, TrainConfig  # noqa: E402
from distgan.storage import read_metrics  # noqa: E402

SOURCES = ("embedded", "folder", "prepared")


@dataclass(frozen=True)
class Preset:
    warmup: int  # steps excluded from the throughput (allocator, autograd, the loaders' first batches)
    steps: int  # steady-state steps measured
    repeats: int
    batch_size: int  # global, over 2 workers
    images: int  # embedded digits written to the folder
    copies: int  # times each is written (the folder holds images x copies files)


PRESETS = {
    "full": Preset(warmup=5, steps=40, repeats=3, batch_size=64, images=4000, copies=5),
    "quick": Preset(warmup=5, steps=20, repeats=2, batch_size=64, images=4000, copies=2),
    "smoke": Preset(warmup=1, steps=2, repeats=1, batch_size=16, images=64, copies=1),
}


def steps_at(preset: Preset, size: int) -> Preset:
    """The preset with the steps measured at `size`: a step below 64 px is about 2.5x faster, so it measures 3x
    the steps, for a window of comparable seconds (a few seconds of steps are at the mercy of any other load)."""
    return dataclasses.replace(preset, steps=preset.steps * (3 if size < 64 else 1))


class OtherLoad:
    """The cores that processes other than this one's children used between start() and stop(): the machine's
    busy CPU time (/proc/stat) less this process's waited-for children's (getrusage), over the wall clock."""

    def start(self) -> "OtherLoad":
        self.t0, self.busy0, self.ours0 = time.time(), *self._cpu()
        return self

    def stop(self) -> float:
        busy, ours = self._cpu()
        return round(max(0.0, (busy - self.busy0) - (ours - self.ours0)) / max(time.time() - self.t0, 1e-9), 2)

    @staticmethod
    def _cpu() -> tuple[float, float]:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def write_folder(root: Path, size: int, count: int, copies: int) -> int:
    """The first `count` embedded training digits at `size` (as training resizes them) as grayscale PNGs under
    root/<digit>/, each `copies` times; returns the number of files."""
    from PIL import Image

    from distgan.data import build_dataset

    digits = build_dataset(TrainConfig(image_size=size).validate())
    images, labels = digits.images[:count, 0].numpy(), digits.labels[:count].numpy()
    for label in np.unique(labels):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        for copy in range(copies):
            Image.fromarray(pixels, "L").save(root / str(label) / f"{i:05d}-{copy}.png")
    return len(images) * copies


def prepare(folder: Path, output: Path, size: int, timeout: float = 1800) -> dict:
    """`python -m distgan.prepare` of `folder`, timed; its images/s once Ray was up, as it reports them."""
    cmd = [sys.executable, "-m", "distgan.prepare", "--data-root", str(folder), "--image-size", str(size),
           "--channels", "1", "--output", str(output)]
    load, t0, other = _results.load_now(), time.time(), OtherLoad().start()
    proc = subprocess.run(cmd, cwd=REPO, env=bench_train._child_env(), capture_output=True, text=True,
                          timeout=timeout)
    wall, other_load = time.time() - t0, other.stop()
    found = re.search(r"prepared (\d+) images .*: (\d+) images/s once Ray was up", proc.stdout)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    bench_train._wait_for_ray_exit()
    return {"size": size, "images": int(found.group(1)), "wall_s": round(wall, 2),
            "images_per_s": int(found.group(2)), "wall_images_per_s": round(int(found.group(1)) / wall, 1),
            "loadavg_1m": load, "other_load": other_load}


def train_command(preset: Preset, size: int, source: str, root: Path | None, storage: Path, name: str,
                  precision: str, steps: int) -> list[str]:
    data = ["--dataset", "mnist5k"] if source == "embedded" else \
        ["--dataset", "folder" if source == "folder" else "prepared", "--data-root", str(root)]
    return [sys.executable, "-m", "distgan.local", *data, "--image-size", str(size), "--channels", "1",
            "--num-workers", "2", "--batch-size", str(preset.batch_size), "--epochs", "1000", "--max-steps",
            str(steps), "--storage-path", str(storage), "--name", name, "--precision", precision, "--eval-every",
            "0", "--log-every", "1", "--ema-decay", "0", "--checkpoint-every-minutes", "0", "--wandb-mode",
            "disabled"]


def train(preset: Preset, size: int, source: str, root: Path | None, storage: Path, name: str, precision: str,
          timeout: float = 1800) -> dict:
    """One `python -m distgan.local` run: steady-state images/s and command-to-first-step seconds."""
    preset = steps_at(preset, size)
    cmd = train_command(preset, size, source, root, storage, name, precision, preset.warmup + preset.steps)
    load, t_submit, other = _results.load_now(), time.time(), OtherLoad().start()
    proc = subprocess.run(cmd, cwd=REPO, env=bench_train._child_env(), capture_output=True, text=True,
                          timeout=timeout)
    other_load = other.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    figures = steady_throughput(storage / name / "metrics.jsonl", preset, t_submit)
    return {"size": size, "source": source, "images_per_s": round(figures["images_per_s"], 1),
            "first_step_s": round(figures["first_step_s"], 2), "wall_s": round(time.time() - t_submit, 1),
            "loadavg_1m": load, "other_load": other_load}


def steady_throughput(path: Path, preset: Preset, t_submit: float) -> dict:
    """{"images_per_s" over steps warmup+1 .. warmup+steps, without the intervals that end an epoch (a step row
    carries its epoch: the next row's is one more), "first_step_s" from `t_submit` (time.time())}."""
    steps = {r["step"]: r for r in read_metrics(path) if r.get("kind") == "step"}
    window = range(preset.warmup + 1, preset.warmup + preset.steps + 1)
    if 1 not in steps or any(s not in steps for s in (preset.warmup, *window)):
        raise RuntimeError(f"{path}: lacks step rows of 1 and {preset.warmup}-{window[-1]} (has {sorted(steps)})")
    kept = [steps[s]["time"] - steps[s - 1]["time"] for s in window if steps[s]["epoch"] == steps[s - 1]["epoch"]]
    return {"images_per_s": preset.batch_size * len(kept) / sum(kept), "first_step_s": steps[1]["time"] - t_submit}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (size, source): medians, spread, and the ratio to the embedded digits at that size."""
    rows = []
    for size in sorted({r["size"] for r in runs}):
        by = {s: [r for r in runs if r["size"] == size and r["source"] == s] for s in SOURCES}
        base = statistics.median(r["images_per_s"] for r in by["embedded"]) if by["embedded"] else None
        base_first = statistics.median(r["first_step_s"] for r in by["embedded"]) if by["embedded"] else None
        for source, rs in by.items():
            if not rs:
                continue
            rate = statistics.median(r["images_per_s"] for r in rs)
            first = statistics.median(r["first_step_s"] for r in rs)
            rows.append({"size": size, "source": source, "runs": len(rs), "images_per_s": round(rate, 1),
                         "min": min(r["images_per_s"] for r in rs), "max": max(r["images_per_s"] for r in rs),
                         "vs_embedded": round(rate / base, 3) if base else None, "first_step_s": round(first, 2),
                         "first_step_minus_embedded_s": round(first - base_first, 2) if base_first else None,
                         "other_load_max": max(r.get("other_load", 0.0) for r in rs)})
    return rows


def render_markdown(result: dict) -> str:
    m, p = result["machine"], result["preset_values"]
    lines = [*_results.busy_banner(result.get("busy")),
             "# Data paths: embedded digits, an image folder, the folder prepared", "",
             f"`{result['command']}` ({result['created']})", "",
             f"- machine: {m['processor']}, {m['cpu_count']} CPUs; 1-minute load average before the first run "
             f"{result['loadavg_before']:.2f}; CPU used by other processes during the runs: median "
             f"{result['other_load_median']} cores, most {result['other_load_max']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
             f"- git: {result['git']['commit']}" + (" (uncommitted changes)" if result["git"]["dirty"] else ""),
             f"- training: `python -m distgan.local`, 2 workers, global batch {p['batch_size']}, 1 channel, "
             f"--precision {result['precision']}; images/s over steps {p['warmup'] + 1}-{p['warmup'] + p['steps']}"
             f" at 64 px ({p['warmup'] + 1}-{p['warmup'] + 3 * p['steps']} below), median of {p['repeats']} "
             f"interleaved runs; folder: {p['images']} digits x {p['copies']} = {p['images'] * p['copies']} PNGs", "",
             "| size | source | images/s (median) | min-max | vs embedded | command to first step (s) | "
             "minus embedded (s) | other load, most (cores) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['size']} | {r['source']} | {r['images_per_s']} | {r['min']}-{r['max']} | "
                     f"{r['vs_embedded']} | {r['first_step_s']} | {r['first_step_minus_embedded_s']} | "
                     f"{r['other_load_max']} |")
    lines += ["", "| preparing | images | command wall clock (s) | images/s from Ray's start | images/s of the "
                  "whole command |", "|---|---|---|---|---|"]
    for r in result["preparation"]:
        lines.append(f"| {r['size']}x{r['size']} PNGs | {r['images']} | {r['wall_s']} | {r['images_per_s']} | "
                     f"{r['wall_images_per_s']} |")
    for s in result["scale"]:
        lines += ["", f"At scale: {s['images']} images prepared at {s['size']}x{s['size']} in {s['prepare']['wall_s']}"
                      f" s ({s['prepare']['images_per_s']} images/s from Ray's start); command to first step "
                      f"{s['prepared_first_step_s']} s against {s['embedded_first_step_s']} s for the embedded "
                      f"digits ({s['prepared_first_step_s'] - s['embedded_first_step_s']:+.2f} s)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_preset_args(p, quick="2 repeats of 20 steps, 8,000 files", gpu_check="not available: CPU only")
    p.add_argument("--sizes", type=int, nargs="+", choices=IMAGE_SIZES, default=[28, 64], help="image sides")
    p.add_argument("--repeats", type=int_at_least(1), default=None, help="override the preset's repeats")
    p.add_argument("--scale-images", type=int_at_least(0), default=0, metavar="N",
                   help="also prepare a folder of N files at the largest size and time the first step on it "
                        "(default: off; 200000 for the committed result)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="every run's --precision")
    add_output_args(p, "data-<preset>_<processor>-<N>c_<yyyy-mm>")
    _results.add_load_args(p)
    args = p.parse_args(argv)
    if args.gpu_check:
        p.error("--gpu-check: bench/data.py measures the CPU data paths (distgan.local is CPU only)")
    return args


def measure(preset: Preset, args, tmp: Path) -> tuple[list, list, list]:
    """(preparations, training runs, at-scale figures), every run in its own process."""
    folders, preps, runs = {}, [], []
    for size in args.sizes:
        folders[size] = tmp / f"folder-{size}"
        write_folder(folders[size], size, preset.images, preset.copies)
        preps.append(prepare(folders[size], tmp / f"prepared-{size}", size))
        # unmeasured: --precision auto measures and caches its choice for this size here
        train(preset, size, "embedded", None, tmp / "runs", f"warm-{size}", args.precision)
    for rep in range(preset.repeats):
        for size in args.sizes:
            for source in SOURCES[rep % 3:] + SOURCES[:rep % 3]:  # each source first, second and last in turn
                root = {"embedded": None, "folder": folders[size], "prepared": tmp / f"prepared-{size}"}[source]
                runs.append(train(preset, size, source, root, tmp / "runs", f"{source}-{size}-{rep}", args.precision))
                print(f"  {runs[-1]}", file=sys.stderr, flush=True)
    scale = [measure_scale(preset, args, tmp, max(args.sizes))] if args.scale_images else []
    return preps, runs, scale


def measure_scale(preset: Preset, args, tmp: Path, size: int) -> dict:
    """A folder of --scale-images files prepared, and the command-to-first-step time of training on it against the
    embedded digits (medians of --repeats interleaved runs)."""
    folder, prepared = tmp / f"folder-{size}-scale", tmp / f"prepared-{size}-scale"
    write_folder(folder, size, preset.images, -(-args.scale_images // preset.images))
    prep = prepare(folder, prepared, size)
    first: dict[str, list[float]] = {"embedded": [], "prepared": []}
    for rep in range(preset.repeats):
        for source, root in (("embedded", None), ("prepared", prepared)):
            run = train(preset, size, source, root, tmp / "runs", f"scale-{source}-{rep}", args.precision)
            first[source].append(run["first_step_s"])
    return {"size": size, "images": prep["images"], "prepare": prep,
            "embedded_first_step_s": round(statistics.median(first["embedded"]), 2),
            "prepared_first_step_s": round(statistics.median(first["prepared"]), 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    preset_name = _results.preset_name(args)
    preset = PRESETS[preset_name]
    if args.repeats:
        preset = Preset(**{**asdict(preset), "repeats": args.repeats})
    t0, before = time.perf_counter(), _results.load_now()
    with tempfile.TemporaryDirectory(prefix="distgan-bench-data-") as tmp:
        bench_train.RAY_TMPDIR = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # the prepare runs' own Ray
        preps, runs, scale = measure(preset, args, Path(tmp))
    others = [r["other_load"] for r in preps + runs]
    result = {
        **_results.origin("bench/data.py", argv), "preset": preset_name, "preset_values": asdict(preset),
        "precision": args.precision, "processor": hardware.processor_name("cpu"), **provenance.collect(),
        "loadavg_before": before, "other_load_median": round(statistics.median(others), 2),
        "other_load_max": max(others), "rows": summarise(runs), "preparation": preps,
        "scale": scale, "runs": runs, "wall_s": round(time.perf_counter() - t0, 1),
        "busy": _results.busy_reason(before, [r["loadavg_1m"] for r in preps + runs], os.cpu_count() or 1),
    }
    if _results.refuse_busy(result["busy"], args.allow_busy, "bench/data.py"):
        return 3
    where = f"{hardware.slug(result['processor'])}-{result['machine']['cpu_count']}c"
    path = _results.write_result(result, render_markdown(result),
                                 args.name or f"data-{preset_name}_{where}_{time.strftime('%Y-%m')}", args.output,
                                 args.out)
    print(render_markdown(result))
    print(f"wrote {path} and .md in {result['wall_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
