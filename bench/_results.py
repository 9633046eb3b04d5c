"""The options every benchmark shares (its preset, where it writes). A run writes a new dated file under
bench/results/runs/ (git-ignored) unless given a path.

The committed results (bench/results/<what>_<where>_<yyyy-mm>.json, .md) are what the docs cite; a run
refreshes one only when asked to, by naming it:
`python bench/kernels.py --quick --output bench/results/kernels-quick_<where>_<yyyy-mm>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
RUNS = RESULTS / "runs"  # .gitignore: /bench/results/runs/


def add_output_args(p: argparse.ArgumentParser, what: str) -> None:
    """--output PATH, --out DIR and --name STEM, the same in every benchmark."""
    p.add_argument("--output", type=Path, default=None,
                   help="write exactly this JSON file (and its .md beside it), replacing it if it exists; "
                        "the way to refresh a committed result")
    p.add_argument("--out", type=Path, default=RUNS,
                   help="otherwise: directory for a new <name>-<YYYYmmdd-HHMMSS>.json + .md (never overwritten)")
    p.add_argument("--name", default=None, help=f"file stem under --out; default {what}")


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
    path.write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        md.write_text(markdown)
    return path


def publish(result: dict, markdown: str, default_stem: str, args: argparse.Namespace) -> Path:
    """write_result() with the --output/--out/--name that add_output_args() parsed, then prints the markdown and
    where it went; returns the JSON path."""
    path = write_result(result, markdown, args.name or default_stem, args.output, args.out)
    print(markdown + f"\nwrote {path}")
    return path
