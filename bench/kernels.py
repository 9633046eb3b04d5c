#!/usr/bin/env python
"""Benchmark the fused kernels against eager PyTorch and torch.compile, side by side in one run.

    python bench/kernels.py [--quick | --gpu-check | --smoke] [--wandb] [--output PATH.json]

Providers: `eager` (the references in kernels/reference.py), `compile` (torch.compile of the same
reference functions), `triton` (the `kernels` ops). Modes: forward, backward, full (= forward +
backward). Ops: BatchNorm+LeakyReLU at every generator layer of the DCGAN (batch 64/128/256) and at
large shapes, BCE-with-logits from 64 to 2**20 logits, and the one-launch discriminator loss; fp32 and
bf16.

On a GPU every provider is timed with triton.testing.do_bench (median, p20, p80; CUDA graphs as well
for launch-bound shapes), against a device-to-device copy measured in the same run (kernel_bench/timing.py).

On a CPU-only machine nothing is timed (the Triton interpreter's speed says nothing about a GPU).
What is reported instead holds on any GPU: bytes each provider moves per call, kernel launches,
bytes saved for backward, the static sm_80/sm_90 compile report (bench/compile_report.py), and, labelled
`modelled`, what those bytes would cost at a named GPU's bandwidth (kernel_bench/counting.py;
kernel_bench/counters.py counts the bytes).

The ops and their shapes come from kernels.registry: an op registered there is benchmarked with no change here.

Writes a new bench/results/runs/kernels-<cpu|gpu>[-<preset>]-<YYYYmmdd-HHMMSS>.{json,md} (git-ignored), or
exactly --output PATH: committed results are refreshed only by naming them. Every figure is one JSON record
with op, shape, dtype, mode, provider, metric, value, unit, source (measured | modelled) and method
(kernel_bench/report.py renders them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The repository before bench/ (this script's directory, already on sys.path): this file would shadow the kernels
# package, here and in the processes it spawns (they inherit sys.path).
sys.path.insert(0, str(REPO))

import kernel_bench  # noqa: E402, F401 -- first: it sets TRITON_INTERPRET (no GPU) before `kernels` is imported
import torch  # noqa: E402
from _results import (  # noqa: E402
    add_output_args,
    add_preset_args,
    int_at_least,
    origin,
    positive_float,
    preset_name,
    write_partial,
    write_result,
)
from kernel_bench.cases import (  # noqa: E402
    DTYPES,
    MODEL_GPU,
    PRESETS,
    PROVIDERS,
    STEP,
    STEP_MIN_BATCH,
    STEP_PROVIDERS,
    build_cases,
    is_g64,
    unavailable,
    work_order,
)
from kernel_bench.counting import (  # noqa: E402
    METHODS,
    cpu_records,
    static_compile_report,
    step_records,
    validate_proxies,
)
from kernel_bench.report import checks, log_wandb, render_markdown  # noqa: E402
from kernel_bench.timing import (  # noqa: E402
    copy_bandwidth_gbps,
    do_bench_graph_quantiles,
    do_bench_quantiles,
    gpu_records,
)

import kernels  # noqa: E402
from distgan import provenance  # noqa: E402
from distgan.storage import first_line  # noqa: E402
from kernels import registry  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preset_args(p, quick="CI-sized run (every shape class, fewer counted directly)",
                    gpu_check="bench/gpu_check.sh's preset (~2-3 min on a GPU)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None, help="default: the preset's")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default: the preset's")
    p.add_argument("--ops", nargs="+", choices=[op.name for op in registry.ops() if op.bench] + [STEP], default=None,
                   help=f"default: all; {STEP}: distgan's whole step, counted on a CPU with the "
                        f"{' and '.join(STEP_PROVIDERS)} kernels of --providers")
    p.add_argument("--step-batches", nargs="+", type=int_at_least(STEP_MIN_BATCH), default=None, metavar="BATCH",
                   help=f"batch sizes of the {STEP} count, each at least {STEP_MIN_BATCH} (BatchNorm in training "
                        "needs two values a channel); default: the preset's")
    p.add_argument("--time-budget-s", type=positive_float, default=None, metavar="SECONDS",
                   help="stop measuring new cases after this many seconds (the rest are listed as not run); "
                        "default: no limit")
    add_output_args(p, "kernels-<cpu|gpu>[-<preset>]")
    p.add_argument("--no-compile-report", action="store_true", help="skip the static sm_80/sm_90 report")
    p.add_argument("--wandb", action="store_true", help="also log the records as a wandb.Table")
    return p


def select_preset(args) -> tuple[str, object]:
    name = preset_name(args)
    preset = PRESETS[name]
    changes = {}
    if args.providers:
        changes["providers"] = tuple(args.providers)
    if args.dtypes:
        changes["dtypes"] = tuple(args.dtypes)
    if args.step_batches:
        changes["step_batches"] = tuple(args.step_batches)
    if args.no_compile_report:
        changes["compile_report"] = False
    return name, dataclasses.replace(preset, **changes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures: the cases x the preset's providers, the training-step count, the compile report."""

    preset_name: str
    preset: object
    device: torch.device
    cases: list
    step_batches: tuple  # empty: no training-step count
    step_providers: tuple
    step_skipped: str | None  # why the training step, asked for by --ops, is not counted

    def describe(self) -> str:
        parts = [f"{len(self.cases)} cases x {', '.join(self.preset.providers)}"] if self.cases else []
        if self.step_batches:
            parts.append(f"{STEP} at batch {', '.join(map(str, self.step_batches))} x "
                         f"{', '.join(self.step_providers)}")
        if self.preset.compile_report:
            parts.append("the static compile report")
        skipped = f"; no {STEP}: {self.step_skipped}" if self.step_skipped else ""
        return f"{' + '.join(parts)} on {self.device} ({self.preset_name} preset){skipped}"


def plan_run(args, device: torch.device) -> Plan:
    name, preset = select_preset(args)
    cases = [c for c in build_cases(preset) if args.ops is None or c.op in args.ops]
    batches, providers, skipped = (), (), None
    if args.ops is None or STEP in args.ops:
        providers = tuple(p for p in STEP_PROVIDERS if p in preset.providers)
        if device.type != "cpu":
            skipped = f"it is counted on a CPU only (this run times on {device.type})"
        elif not providers:
            skipped = f"it runs with the {' or '.join(STEP_PROVIDERS)} kernels, and --providers has neither"
        elif not preset.step_batches:
            skipped = f"the {name} preset counts none (give --step-batches)"
        else:
            batches = preset.step_batches
        if args.ops is None and not args.step_batches:
            skipped = None  # not asked for by name: no count is no news
    return Plan(name, preset, device, cases, batches, providers if batches else (), skipped)


def check_plan(parser: argparse.ArgumentParser, args, plan: Plan) -> None:
    """Flags that would measure nothing, or be ignored, are refused before anything runs (argparse's exit 2)."""
    if args.step_batches and args.ops is not None and STEP not in args.ops:
        parser.error(f"--step-batches sizes the {STEP} count, which --ops leaves out")
    if plan.step_skipped and (args.step_batches or not plan.cases):
        parser.error(f"{'--step-batches' if args.step_batches else '--ops ' + STEP}: nothing to count: "
                     f"{plan.step_skipped}")


def skip_compile_on_cpu(case, preset, preset_name: str) -> str | None:
    """Why torch.compile is not run on this case on a CPU (inductor compiles each shape), or None.
    The quick preset compiles the headline shapes and the two losses at batch 64, fp32."""
    if preset.compile_cases == "all":
        return None
    g64 = is_g64(case) or case.label == "D batch 64" or (case.label == "G loss" and case.numel == 64)
    if preset.compile_cases == "g64" and g64 and case.dtype == "fp32":
        return None
    return (f"not run in the {preset_name} preset (inductor compiles each shape: ~5-30 s on this CPU); "
            "the full run covers every shape")


def measure_case(case, provider, preset, preset_name, device, copy_gbps) -> tuple[list[dict], list[dict]]:
    """(records, unavailable) of one (case, provider): timed on a GPU, counted on a CPU."""
    if device.type == "cuda":
        try:
            recs = gpu_records(case, provider, device, do_bench_quantiles, do_bench_graph_quantiles, copy_gbps)
        except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on
            return [], [unavailable(case, provider, first_line(exc, with_type=True)[:200])]
        log(f"  {case.op} {list(case.shape)} {case.dtype} {provider} timed")
        return recs, []
    if provider == "compile":
        reason = skip_compile_on_cpu(case, preset, preset_name)
        if reason:
            return [], [unavailable(case, provider, reason)]
    recs, reason = cpu_records(case, provider, preset, log)
    if reason:
        log(f"  {case.op} {list(case.shape)} {case.dtype} {provider}: n/a ({reason})")
        return recs, [unavailable(case, provider, reason)]
    return recs, []


# Seconds a torch.compile case needs before its first timing: inductor compiles the forward and the backward
# (~10-30 s a shape on a GPU, with Triton's autotuning). With less of the time budget left it is not started.
COMPILE_NEEDS_S = 45.0


def measure(cases, preset, preset_name, device, budget_s=None, save=None) -> tuple[list[dict], list[dict],
                                                                                   float | None]:
    """Every (case, provider) of the preset, most useful first (`work_order`); (records, unavailable, copy GB/s
    or None). With `budget_s`, no case starts after it is spent, nor a torch.compile case with less than
    COMPILE_NEEDS_S of it left. `save(records, unavailable, copy GB/s)` is called after every case."""
    t0 = time.perf_counter()
    records, missing, copy_gbps = [], [], None
    if device.type == "cuda":
        copy_gbps = copy_bandwidth_gbps(do_bench_quantiles, device)
        log(f"  copy bandwidth: {copy_gbps:.0f} GB/s")
    for case, provider in work_order(cases, preset.providers):
        left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            missing.append(unavailable(case, provider, f"not run: the time budget of {budget_s:.0f} s was spent"))
            continue
        if left is not None and provider == "compile" and left < COMPILE_NEEDS_S:
            missing.append(unavailable(case, provider, f"not started: a torch.compile case needs about "
                                                       f"{COMPILE_NEEDS_S:.0f} s to compile, {left:.0f} s of the "
                                                       f"time budget were left"))
            continue
        recs, miss = measure_case(case, provider, preset, preset_name, device, copy_gbps)
        records += recs
        missing += miss
        if save is not None:
            save(records, missing, copy_gbps)
    return records, missing, copy_gbps


def build_result(argv, preset_name, device, records, missing, copy_gbps, report) -> dict:
    gpu = device.type == "cuda"
    return {
        "schema": 1,
        **origin("bench/kernels.py", argv),
        "preset": preset_name,
        "device": device.type,
        **provenance.collect(),  # machine, versions, git
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "model_gpu": None if gpu else MODEL_GPU,
        "copy_gbps": copy_gbps,
        "methods": METHODS,
        "records": records,
        "unavailable": missing,
        "compile_report": report,
        "wall_s": None,
        "checks": [],
    }


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_run(args, device)
    check_plan(parser, args, plan)
    preset_name, preset, cases = plan.preset_name, plan.preset, plan.cases
    t_start = time.perf_counter()
    log(f"bench/kernels.py: {plan.describe()}")
    def save(records, missing, copy_gbps):  # what was measured so far, should the run be killed
        write_partial(build_result(argv, preset_name, device, records, missing, copy_gbps, []), args.output)

    records, missing, copy_gbps = measure(cases, preset, preset_name, device, args.time_budget_s, save)
    for batch in plan.step_batches:
        for provider in plan.step_providers:
            recs, reason = step_records(batch, provider, log)
            records += recs
            if reason:
                missing.append({"op": STEP, "shape": [batch], "dtype": "fp32", "provider": provider,
                                "reason": reason})
    report = []
    if preset.compile_report:
        report, report_err = static_compile_report(log)
        if report_err:
            missing.append({"op": "*", "shape": [], "dtype": "*", "provider": "triton", "reason": report_err})
    result = build_result(argv, preset_name, device, records, missing, copy_gbps, report)
    result["checks"] = checks(records, cases)
    if device.type == "cpu" and "triton" in preset.providers and kernels.triton_can_run("cpu"):
        result["checks"] += validate_proxies(records, cases, log)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    md = render_markdown(result, cases)
    stem = args.name or f"kernels-{'gpu' if device.type == 'cuda' else 'cpu'}" + (
        "" if preset_name == "full" else f"-{preset_name}"
    )
    path = write_result(result, md, stem, args.output, args.out)
    print(md)
    log(f"wrote {path} and .md in {result['wall_s']} s")
    if args.wandb:
        log_wandb(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
