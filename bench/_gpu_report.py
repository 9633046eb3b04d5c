#!/usr/bin/env python
"""bench/gpu_check.sh's last step: one JSON (the benches' records, with machine, versions, git commit and
each stage's outcome) and one Markdown file, and a one-screen summary with PASS/FAIL per stage.

    python bench/_gpu_report.py --logs DIR --json gpu-<date>.json --md gpu-<date>.md [--wall-s S]

DIR holds stages.tsv (name, status, rc, seconds, limit, detail per line), provenance.json, and the benches'
kernels.json / train.json (with their .md) when those stages wrote them. Exits 1 if any stage failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def read_stages(path: Path) -> list[dict]:
    stages = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, rc, seconds, limit, detail = (line.split("\t") + [""] * 6)[:6]
        stages.append({"stage": name, "status": status, "rc": None if rc == "-" else int(rc),
                       "seconds": int(seconds or 0), "limit_s": int(limit or 0), "detail": detail})
    return stages


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def provenance(logs: Path) -> dict:
    got = _load(logs / "provenance.json")
    if got:
        return got
    sys.path.insert(0, str(REPO))
    from distgan import provenance as prov  # the versions stage failed: ask again, here

    return prov.collect()


def combine(logs: Path, wall_s: float | None) -> dict:
    """The check's result: provenance, stages, and every bench's records tagged with `bench`."""
    benches = {name: _load(logs / f"{name}.json") for name in ("kernels", "train")}
    records, unavailable = [], []
    for name, result in benches.items():
        for r in (result or {}).get("records", []):
            records.append({"bench": name, **r})
        for u in (result or {}).get("unavailable", []):
            unavailable.append({"bench": name, **u})
    kernels = benches["kernels"] or {}
    return {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "bash bench/gpu_check.sh",
        **provenance(logs),
        "stages": read_stages(logs / "stages.tsv"),
        "wall_s": wall_s,
        "copy_gbps": kernels.get("copy_gbps"),
        "checks": kernels.get("checks", []),
        "train_headline": (benches["train"] or {}).get("headline"),
        "records": records,
        "unavailable": unavailable,
    }


def kernel_speedups(records: list[dict]) -> list[str]:
    """triton vs eager and vs compile, full mode, per dtype: geometric mean of median-ms ratios."""
    ms = {(r["op"], tuple(r["shape"]), r["dtype"], r["provider"]): r["value"] for r in records
          if r.get("bench") == "kernels" and r["metric"] == "ms" and r["mode"] == "full" and r["value"]
          and r["source"] == "measured"}  # on a GPU; a CPU run's ms are modelled from bytes
    lines = []
    for dtype in ("fp32", "bf16"):
        for other in ("eager", "compile"):
            ratios = [v / ms[k[:3] + ("triton",)] for k, v in ms.items()
                      if k[2] == dtype and k[3] == other and k[:3] + ("triton",) in ms]
            if ratios:
                gmean = 1.0
                for x in ratios:
                    gmean *= x ** (1 / len(ratios))
                lines.append(f"triton vs {other}, {dtype}, forward+backward: {gmean:.2f}x (geomean of {len(ratios)})")
    return lines


def train_lines(records: list[dict]) -> list[str]:
    return [f"{r['config']} x{r['workers']} {r['kernels']} {r['precision']}: {r['value']:.0f} images/s"
            for r in records if r.get("bench") == "train" and r["metric"] == "images_per_s"]


def summary(result: dict) -> list[str]:
    v = result["versions"]
    lines = ["", "gpu_check summary", "-----------------",
             " | ".join(f"{k} {v.get(k)}" for k in ("gpu", "driver", "cuda", "torch", "triton", "ray")),
             f"git {result['git']['commit']}" + (" (dirty)" if result["git"]["dirty"] else ""), ""]
    for s in result["stages"]:
        lines.append(f"{s['status']:4s}  {s['stage']:9s} {s['seconds']:4d}s / {s['limit_s']}s  {s['detail']}")
    lines.append("")
    if result["copy_gbps"]:
        lines.append(f"copy bandwidth {result['copy_gbps']:.0f} GB/s")
    lines += kernel_speedups(result["records"]) + train_lines(result["records"])
    for c in result["checks"]:
        lines.append(f"{'PASS' if c['ok'] else 'FAIL'}  check: {c['check']} = {c['value']}")
    return lines


def markdown(result: dict, logs: Path) -> str:
    lines = ["# GPU check", "", f"`bash bench/gpu_check.sh` — {result['created']}", "",
             "| stage | status | seconds | limit | detail |", "|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['detail']} |"
              for s in result["stages"]]
    lines += ["", "```", *summary(result), "```", ""]
    for name in ("kernels", "train"):
        md = logs / f"{name}.md"
        if md.is_file():
            text = md.read_text()
            lines += ["#" + text if text.startswith("# ") else text, ""]  # its title one level down
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logs", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--md", type=Path, required=True)
    p.add_argument("--wall-s", type=float, default=None)
    args = p.parse_args(argv)
    result = combine(args.logs, args.wall_s)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.md.write_text(markdown(result, args.logs))
    failed = [s["stage"] for s in result["stages"] if s["status"] != "PASS"]
    print("\n".join(summary(result)))
    print(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'PASS: every stage'}; wrote {args.json} and {args.md}")
    return 1 if failed or not result["stages"] else 0


if __name__ == "__main__":
    sys.exit(main())
