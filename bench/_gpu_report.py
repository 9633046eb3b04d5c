#!/usr/bin/env python
"""bench/gpu_check.sh's judge and reporter: whether a stage passed, from what it wrote (--check), and the results
(after every stage and at the end): one JSON (the benches' records, with machine, versions, git commit and each
stage's outcome), one Markdown file, and a one-screen summary with PASS/FAIL per stage.

    python bench/_gpu_report.py --check STAGE --logs DIR --work WORK [--rehearse]   # prints why; exit 0 or 1
    python bench/_gpu_report.py --logs DIR --json gpu-<date>.json --md gpu-<date>.md [--wall-s S] [--final]

DIR holds stages.tsv (name, status, rc, seconds, limit, detail per line), each stage's log, provenance.json, and
the benches' kernels.json / train.json (with their .md) when those stages wrote them. With --final it prints
the summary and exits 1 if any stage failed or none ran. --rehearse: a CPU rehearsal's stages, judged by what
a CPU can show (GPU tests collected and skipped, Triton counted under the interpreter).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
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


def combine(logs: Path, wall_s: float | None, rehearse: bool = False) -> dict:
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
        "command": "bash bench/gpu_check.sh" + (" --rehearse" if rehearse else ""),
        **provenance(logs),
        "stages": read_stages(logs / "stages.tsv"),
        "wall_s": wall_s,
        "copy_gbps": kernels.get("copy_gbps"),
        "checks": kernels.get("checks", []),
        "train_headline": (benches["train"] or {}).get("headline"),
        "records": records,
        "unavailable": unavailable,
    }


# ------------------------------------------------------------------ each stage's PASS, from what it wrote


class StageFailed(Exception):
    """Why a stage that exited 0 did not do what its PASS promises."""


def check_versions(logs: Path, work: Path, rehearse: bool) -> str:
    versions = (_load(logs / "provenance.json") or {}).get("versions") or {}
    if not versions.get("torch"):
        raise StageFailed("provenance.json holds no torch version")
    if not rehearse and not versions.get("gpu"):
        raise StageFailed("torch sees no GPU")
    return f"torch {versions['torch']}" + ("" if rehearse else f" on {versions['gpu']}")


def pytest_counts(log: Path) -> dict[str, int]:
    """pytest's closing tally ("3 passed, 2 skipped in 4.1s"), as {"passed": 3, "skipped": 2, ...}."""
    text = log.read_text() if log.is_file() else ""
    tallies = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)
               or "no tests ran" in line]
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)\b", tallies[-1] if tallies else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def check_pytest(logs: Path, work: Path, rehearse: bool) -> str:
    counts = pytest_counts(logs / "pytest.log")
    if not counts:
        raise StageFailed("no pytest tally in the log (collection failed, or no test ran)")
    bad = counts.get("failed", 0) + counts.get("error", 0)
    if bad:
        raise StageFailed(f"{counts.get('failed', 0)} failed, {counts.get('error', 0)} errors")
    if not rehearse and not counts.get("passed"):
        raise StageFailed(f"no GPU test passed ({counts})")
    if rehearse and not counts.get("skipped") and not counts.get("passed"):
        raise StageFailed("no GPU test was collected")
    return ", ".join(f"{n} {what}" for what, n in counts.items())


def check_kernels(logs: Path, work: Path, rehearse: bool) -> str:
    result = _load(logs / "kernels.json")
    if result is None:
        raise StageFailed("bench/kernels.py wrote no kernels.json")
    triton = [r for r in result.get("records", []) if r.get("provider") == "triton"
              and (rehearse or r.get("source") == "measured")]
    if not triton:
        why = [u["reason"] for u in result.get("unavailable", []) if u.get("provider") == "triton"]
        raise StageFailed("no Triton case ran" + (f" (e.g. {why[0]})" if why else ""))
    failed = [c["check"] for c in result.get("checks", []) if not c.get("ok")]
    if failed:
        raise StageFailed(f"{len(failed)} kernel check(s) failed: {failed[0]}")
    cases = {(r["op"], tuple(r["shape"]), r["dtype"]) for r in triton}
    return f"{len(cases)} Triton case(s) {'counted' if rehearse else 'timed'}, {len(result.get('checks', []))} checks"


def check_faults(logs: Path, work: Path, rehearse: bool) -> str:
    log = (logs / "faults.log").read_text() if (logs / "faults.log").is_file() else ""
    if "SIGKILL at step" not in log:
        raise StageFailed("the worker was never killed")
    if "resumed from" not in log:
        raise StageFailed("no 'resumed from' after the kill")
    if not list((work / "runs" / "gpu-check").glob("checkpoint_*")):
        raise StageFailed("no checkpoint written")
    return "killed, resumed from a checkpoint, finished"


def check_train(logs: Path, work: Path, rehearse: bool) -> str:
    result = _load(logs / "train.json")
    if result is None:
        raise StageFailed("bench/train.py wrote no train.json")
    ray = [r for r in result.get("records", []) if r.get("metric") == "images_per_s" and r.get("config") == "ray"]
    if not ray:
        raise StageFailed("no distgan run was measured")
    return f"{len(ray)} distgan run(s) measured" + (", the rest cut by the time budget"
                                                    if result.get("unavailable") else "")


CHECKS = {"versions": check_versions, "pytest": check_pytest, "kernels": check_kernels, "faults": check_faults,
          "train": check_train}


def check(stage: str, logs: Path, work: Path, rehearse: bool) -> tuple[bool, str]:
    """(passed, the line that says why) for a stage whose command exited 0."""
    try:
        return True, CHECKS[stage](logs, work, rehearse)
    except StageFailed as e:
        return False, str(e)


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
    v, git = result.get("versions") or {}, result.get("git") or {}  # what the versions stage could record
    lines = ["", "gpu_check summary", "-----------------",
             " | ".join(f"{k} {v.get(k)}" for k in ("gpu", "driver", "cuda", "torch", "triton", "ray")),
             f"git {git.get('commit')}" + (" (dirty)" if git.get("dirty") else ""), ""]
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
    title = "# GPU check, rehearsed on a CPU" if result.get("rehearsal") else "# GPU check"
    lines = [title, "", f"`{result['command']}` — {result['created']}", "",
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
    p.add_argument("--check", choices=sorted(CHECKS), default=None, help="judge one stage and print why")
    p.add_argument("--work", type=Path, default=None, help="the check's work directory (--check faults)")
    p.add_argument("--rehearse", action="store_true", help="a CPU rehearsal's stages")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--final", action="store_true", help="print the summary; exit 1 if a stage failed")
    args = p.parse_args(argv)
    if args.check:
        ok, why = check(args.check, args.logs, args.work or args.logs.parent, args.rehearse)
        print(why)
        return 0 if ok else 1
    if args.json is None or args.md is None:
        p.error("--json and --md are needed to write the results")
    result = combine(args.logs, args.wall_s, args.rehearse)
    result["rehearsal"] = args.rehearse
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.md.write_text(markdown(result, args.logs))
    if not args.final:
        return 0
    failed = [s["stage"] for s in result["stages"] if s["status"] != "PASS"]
    print("\n".join(summary(result)))
    print(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'PASS: every stage'}; wrote {args.json} and {args.md}")
    return 1 if failed or not result["stages"] else 0


if __name__ == "__main__":
    sys.exit(main())
