"""One table of every recipe run in the given recipe result files (`bench/recipe.py`'s JSON).

A row per (file, recipe, seed): its overrides of the TensorFlow tutorial's recipe, FID at 1,240 steps (20
epochs at batch 64), the best FID and its step, the last evaluation, and the best evaluation's classifier score
and coverage. Each file's own note (command, machine, conditions) and the commit that added the file are
printed above its rows: the recipe files record no versions or commit of their own, so the commit that
committed a file is the closest record of the code that produced it.

    python bench/recipe_report.py bench/results/recipe-*.json --output bench/results/recipe-study_<where>_<yyyy-mm>.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _results import output_file  # noqa: E402

HALF_BUDGET_STEP = 1240  # 20 epochs of the 4,000 training digits at batch 64: the default run's midpoint


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def added_in(path: Path) -> str:
    """The commit that first added `path` (its short hash and date), or "uncommitted"."""
    lines = _git("log", "--diff-filter=A", "--follow", "--format=%h %cs", "--", str(path)).splitlines()
    return lines[-1] if lines else "uncommitted"


def _at(points: list[dict], step: int) -> str:
    hit = [p for p in points if p["step"] == step]
    return f"{hit[0]['fid']:.1f}" if hit else "-"


def table(files: list[Path]) -> str:
    lines = ["# Recipe study: sample quality against G steps", "",
             f"`python bench/recipe_report.py {' '.join(str(f.relative_to(REPO)) for f in files)}` "
             f"({datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')})", "",
             "Each recipe trains as `python -m distgan.train` does (the Trainer in 2 gloo processes, local "
             "BatchNorm, EMA, batch 64 unless overridden, the precision it records), on top of the TensorFlow "
             "tutorial's recipe (Adam 2e-4, constant rates). Quality per step does not depend on the machine's "
             "load; seconds do.", "",
             f"- tabulated at commit {_git('rev-parse', 'HEAD') or 'unknown'}", ""]
    for f in files:
        data = json.loads(f.read_text())
        lines += [f"## {f.name}", "", f"- note: {data.get('note', '-')}", f"- added in commit {added_in(f)}", "",
                  "| recipe | seed | overrides | precision | FID at 1,240 steps | best FID (step) | last FID (step) "
                  "| classifier score at best FID | coverage at best FID | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["records"]:
            best, last = r["best"], r["points"][-1]
            overrides = ", ".join(f"{k}={v}" for k, v in r.get("overrides", {}).items()) or "-"
            lines.append(f"| {r['recipe']} | {r['seed']} | {overrides} | {r.get('precision', '-')} | "
                         f"{_at(r['points'], HALF_BUDGET_STEP)} | {best['fid']:.1f} ({best['step']}) | "
                         f"{last['fid']:.1f} ({last['step']}) | {best['classifier_score']:.2f} | "
                         f"{best['coverage']:.3f} | {r.get('wall_s') or '-'} |")
            if r.get("command") or r.get("code"):
                lines.append(f"| ↳ {r.get('command') or r.get('code')} |||||||||")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="recipe result files (JSON with `records`)")
    p.add_argument("--output", type=output_file, default=None, metavar="FILE.md",
                   help="write the table here (else print it)")
    args = p.parse_args(argv)
    text = table([f.resolve() for f in args.files])
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
