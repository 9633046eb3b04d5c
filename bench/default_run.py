"""The default run, measured: `python -m distgan.train` as the README's quick start types it, timed end to end,
with what its metrics.jsonl says about start-up, throughput and sample quality.

    python bench/default_run.py --output bench/results/default-run_<where>_<yyyy-mm>.json
    python bench/default_run.py --max-steps 100          # flags after the options go to distgan.train

The run goes to a temporary --storage-path (removed afterwards) under its own --name; neither changes what it
trains. Reported: the wall clock from start to exit (what `/usr/bin/time` would say), the seconds from start
to the first logged step, the median of the logged images/s (global, all workers), the start line (workers,
device, precision, kernels, steps) and every evaluation. Writes JSON and a Markdown table beside it with the
machine, versions and commit; without --output, a new dated file under bench/results/runs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the repository first: processes spawned later inherit sys.path, and bench/kernels.py must not shadow `kernels`
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import _results  # noqa: E402

from distgan import provenance  # noqa: E402
from distgan.storage import read_metrics  # noqa: E402

QUALITY = ("fid", "kid", "classifier_score", "coverage")
RUN_NAME = "default-run"


def summarise(rows: list[dict], started: float, ended: float) -> dict:
    """The figures of one run from its metrics.jsonl rows; `started`/`ended`: the command's start and exit
    (time.time()). Raises ValueError when the run logged no step."""
    steps = [r for r in rows if r.get("kind") == "step"]
    if not steps:
        raise ValueError("the run logged no step: nothing to measure")
    rates = [r["images_per_s"] for r in steps[1:] or steps if r.get("images_per_s")]  # the first window warms up
    evals = [{k: r.get(k) for k in ("step", "epoch", *QUALITY)} for r in rows
             if r.get("kind") == "eval" and r.get("fid") is not None]
    return {
        "wall_s": round(ended - started, 1),
        "startup_s": round(steps[0]["time"] - started, 1),
        "steps": steps[-1]["step"],
        "median_images_per_s": round(statistics.median(rates), 1) if rates else None,
        "evaluations": evals,
    }


def markdown(result: dict) -> str:
    m, s = result["machine"], result["summary"]
    minutes, seconds = divmod(round(s["wall_s"]), 60)
    load = f"{m['loadavg'][0]:.1f}" if m.get("loadavg") else "-"
    lines = ["# The default run", "", f"`{result['command']}` ({result['created']})", "",
             f"- trains: `{result['train_command']}`",
             f"- machine: {m['processor']}, {m['cpu_count']} CPUs, gpu {m['gpu']}; 1-minute load average before "
             f"the run: {load}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"- git: {result['git']['commit']}" + (" (uncommitted changes)" if result["git"]["dirty"] else ""),
             f"- start line: {result['start_line'] or '-'}", "",
             "| wall clock | start to first step | G steps | median images/s |", "|---|---|---|---|",
             f"| {minutes} min {seconds:02d} s | {s['startup_s']} s | {s['steps']} | {s['median_images_per_s']} |",
             "", "| step | epoch | " + " | ".join(QUALITY) + " |", "|---|---|" + "---|" * len(QUALITY)]
    for e in s["evaluations"]:
        lines.append(f"| {e['step']} | {e['epoch']} | " + " | ".join(f"{e[k]:.3g}" for k in QUALITY) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    # no abbreviations: every other flag belongs to distgan.train
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    _results.add_output_args(p, "default-run")
    args, train_args = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="distgan-default-run-") as storage:
        command = [sys.executable, "-m", "distgan.train", *train_args, "--storage-path", storage,
                   "--name", RUN_NAME]
        before = provenance.collect()
        started = time.time()
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        ended = time.time()
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            print(f"error: distgan.train exited with {proc.returncode}; nothing written", file=sys.stderr)
            return 1
        rows = read_metrics(Path(storage) / RUN_NAME / "metrics.jsonl")
    # the worker's line, without Ray's "(RayTrainWorker pid=...)" prefix and its colour codes
    start_line = next((line[line.index("distgan:"):] for line in proc.stdout.splitlines()
                       if "distgan:" in line and " worker(s) on " in line), None)
    result = {
        **_results.origin("bench/default_run.py", argv),
        "train_command": shlex.join(["python", "-m", "distgan.train", *train_args]),
        **before, "start_line": start_line, "summary": summarise(rows, started, ended),
    }
    _results.publish(result, markdown(result), "default-run", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
