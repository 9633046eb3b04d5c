"""The options every benchmark shares (its preset, where it writes) and the argparse types that check numbers and
paths as they are parsed, so a bad value stops a run before it starts. A run writes a new dated file under
bench/results/runs/ (git-ignored) unless given a path.

The committed results (bench/results/<what>_<where>_<yyyy-mm>.json, .md) are what the docs cite; a run
refreshes one only when asked to, by naming it:
`python bench/kernels.py --quick --output bench/results/kernels-quick_<where>_<yyyy-mm>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
from pathlib import Path

from distgan.storage import directory_problem

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
RUNS = RESULTS / "runs"  # .gitignore: /bench/results/runs/


def add_output_args(p: argparse.ArgumentParser, what: str) -> None:
    """--output FILE, --out DIR and --name STEM, the same in every benchmark. The paths are checked as they are
    parsed (`output_file`, `output_dir`): a run that could not write its result fails before it starts."""
    p.add_argument("--output", type=output_file, default=None, metavar="FILE.json",
                   help="write exactly FILE.json (and its FILE.md report, where the benchmark writes one), "
                        "replacing them: the way to refresh a committed result (--out and --name are then unused)")
    p.add_argument("--out", type=output_dir, default=RUNS, metavar="DIR",
                   help="without --output: the directory of a new dated <name>-<YYYYmmdd-HHMMSS>.json and .md, "
                        f"never overwriting a file (default: {RUNS.relative_to(REPO)}/, git-ignored)")
    p.add_argument("--name", default=None, metavar="STEM", help=f"without --output: the dated file's stem (default: "
                                                                f"{what})")


# A comparison of timings means something only on a machine that runs nothing else (on a busy 2-core machine a
# plain loop measured 79 images/s that runs 740 idle). The 1-minute load average is read before the first run and
# before each run; the benchmark's own runs count in the second, at most one a CPU. Above either threshold the
# machine was busy with other work: a benchmark then writes its comparison only when told to (--allow-busy),
# and the file says so at its top.
BUSY_BEFORE_PER_CPU = 0.25  # before the first run: a quarter of every CPU already busy (0.5 on 2 CPUs)
BUSY_DURING_PER_CPU = 1.5  # before a run: the benchmark's own work on every CPU, and half as much again


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-busy", action="store_true",
                   help=f"write the comparison even when the load average says other work shared the machine "
                        f"(above {BUSY_BEFORE_PER_CPU} a CPU before the first run, or {BUSY_DURING_PER_CPU} before "
                        f"any run); the file then says so at its top. Default: refuse, exit 3")


def load_now() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy_reason(before: float | None, during: list[float], cpus: int) -> str | None:
    """Why the load average says other work shared the machine (see BUSY_*), or None."""
    cpus = max(cpus, 1)
    if before is not None and before > BUSY_BEFORE_PER_CPU * cpus:
        return (f"1-minute load average {before:.2f} before the first run on {cpus} CPUs (above "
                f"{BUSY_BEFORE_PER_CPU * cpus:.2f})")
    peak = max((x for x in during if x is not None), default=None)
    if peak is not None and peak > BUSY_DURING_PER_CPU * cpus:
        return f"1-minute load average up to {peak:.2f} during the runs on {cpus} CPUs (above " \
               f"{BUSY_DURING_PER_CPU * cpus:.2f})"
    return None


def refuse_busy(reason: str | None, allowed: bool, what: str) -> bool:
    """True (after saying why on stderr) when a comparison must not be written: the machine was busy and
    --allow-busy was not given."""
    if reason is None or allowed:
        return False
    print(f"{what}: not written: the machine was busy with other work ({reason}), so its ratios would mean "
          f"nothing; run it again on a quiet machine, or pass --allow-busy to write it marked as such",
          file=sys.stderr)
    return True


def busy_banner(reason: str | None) -> list[str]:
    """The lines a results file opens with when it was measured on a busy machine."""
    return [f"> **Measured on a busy machine** ({reason}): the figures and ratios below are noisy, not a "
            f"comparison.", ""] if reason else []


def origin(script: str, argv: list[str] | None) -> dict[str, str]:
    """The fields every result file opens with: "created" (UTC, ISO 8601) and the "command" that wrote it
    (`script` run with `argv`, sys.argv's when None)."""
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])}


def output_file(text: str) -> Path:
    """argparse type of a result file to write: its directory exists or can be made, and is writable."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file's path")
    try:
        output_dir(str(path.parent))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {e}") from None
    return path


def output_dir(text: str) -> Path:
    """argparse type of a directory to write results in: it exists or can be made, and is writable."""
    path = Path(text).expanduser()
    problem = directory_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return path


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def int_at_least(low: int):
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_preset_args(p: argparse.ArgumentParser, quick: str, gpu_check: str) -> None:
    """--quick | --gpu-check | --smoke (else the full preset), the same in every benchmark; preset_name() reads
    them back. `quick`, `gpu_check`: what the preset costs, for --help."""
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=quick)
    size.add_argument("--gpu-check", action="store_true", help=gpu_check)
    size.add_argument("--smoke", action="store_true", help="the tests' tiny preset")


def preset_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "gpu-check" if args.gpu_check else "smoke" if args.smoke else "full"


def stamp(now: datetime.datetime | None = None) -> str:
    return (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")


def output_paths(stem: str, output: Path | None = None, out_dir: Path = RUNS,
                 now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """(json, md): `output` itself when given; else a dated name under `out_dir` that no file holds yet."""
    if output is not None:
        path = output if output.suffix == ".json" else output.with_name(output.name + ".json")
        return path, path.with_suffix(".md")
    base = f"{stem}-{stamp(now)}"
    path = out_dir / f"{base}.json"
    n = 1
    while path.exists() or path.with_suffix(".md").exists():  # two runs in one second
        n += 1
        path = out_dir / f"{base}-{n}.json"
    return path, path.with_suffix(".md")


def write_result(result: dict, markdown: str | None, stem: str, output: Path | None = None,
                 out_dir: Path = RUNS) -> Path:
    """Writes result as JSON (and markdown as .md) where output_paths() says; returns the JSON path."""
    path, md = output_paths(stem, output, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "complete": True}, indent=1) + "\n")
    if markdown is not None:
        md.write_text(markdown)
    return path


def write_partial(result: dict, output: Path | None) -> None:
    """The result so far, as JSON at `output` (--output; nothing without it), marked "complete": false and
    rewritten whole after each case or run: a benchmark killed at its time limit (bench/gpu_check.sh's stages)
    still leaves what it measured. The last write, write_result's, says "complete": true."""
    if output is None:
        return
    path, _ = output_paths("", output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**result, "complete": False}, indent=1) + "\n")
    os.replace(tmp, path)


def publish(result: dict, markdown: str, default_stem: str, args: argparse.Namespace) -> Path:
    """write_result() with the --output/--out/--name that add_output_args() parsed, then prints the markdown and
    where it went; returns the JSON path."""
    path = write_result(result, markdown, args.name or default_stem, args.output, args.out)
    print(markdown + f"\nwrote {path}")
    return path
