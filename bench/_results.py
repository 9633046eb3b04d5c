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
