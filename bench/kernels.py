#!/usr/bin/env python
"""Benchmark the fused kernels against eager PyTorch and torch.compile, side by side in one run.

    python bench/kernels.py [--quick | --smoke] [--wandb] [--out bench/results]

Providers: `eager` (the references in kernels/reference.py), `compile` (torch.compile of the same
reference functions), `triton` (the `kernels` ops). Modes: forward, backward, full (= forward +
backward). Ops: BatchNorm+LeakyReLU at every generator layer of the DCGAN (batch 64/128/256) and at
large shapes, BCE-with-logits from 64 to 2**20 logits, and the one-launch discriminator loss; fp32 and
bf16.

On a GPU every provider is timed with triton.testing.do_bench (median, p20, p80; CUDA graphs as well
for launch-bound shapes), against a device-to-device copy measured in the same run.

On a CPU-only machine nothing is timed (the Triton interpreter's speed says nothing about a GPU).
What is reported instead holds on any GPU: bytes each provider moves per call, kernel launches,
bytes saved for backward, the static sm_80/sm_90 compile report, and, labelled `modelled`, what those
bytes would cost at a named GPU's bandwidth. See bench/_counters.py for how bytes are counted.

Writes bench/results/kernels-<device>[-<preset>].{json,md}; every figure is one JSON record with
op, shape, dtype, mode, provider, metric, value, unit, source (measured | modelled) and method.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

# @triton.jit reads TRITON_INTERPRET when the decorator runs, so it is set before `kernels` is imported:
# without a GPU the interpreter is the only way the Triton kernels run (and are counted).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _counters import SavedCounter, Tally, count_region

import kernels
from kernels import reference

PROVIDERS = ("eager", "compile", "triton")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BN, BCE, DLOSS = "batch_norm_leaky_relu", "bce_with_logits", "discriminator_loss"

# The GPU the CPU-only figures are modelled on. 3.35 TB/s is H100 SXM5's HBM3 peak; a large
# device-to-device copy reaches about 90 % of it, so the model charges every provider's bytes at that.
MODEL_GPU = {"name": "NVIDIA H100 SXM5 80GB", "peak_gbps": 3350.0, "copy_gbps": 3000.0, "sms": 132}
LARGE_BN_SHAPES = [(256, 64, 64, 64), (1024, 256, 16, 16), (16384, 1024)]
BCE_SIZES = [64, 256, 1024, 4096, 1 << 14, 1 << 16, 1 << 18, 1 << 20]
# Below this many bytes a call is launch-bound on a GPU: it is also timed as a CUDA-graph replay.
LAUNCH_BOUND_BYTES = 8 << 20


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: str
    label: str  # where the shape comes from: "G.bn1 b64", "large", "D batch 64", ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Preset:
    batches: tuple  # generator batch sizes
    large: bool  # include LARGE_BN_SHAPES
    bce_sizes: tuple
    dloss_batches: tuple
    dtypes: tuple
    providers: tuple
    compile_cases: str  # which cases torch.compile runs on the CPU: "all" | "g64" | "none"
    measure_max: int  # CPU: Triton counted directly up to this many elements (and the batch-64
    #                   generator layers always), larger shapes modelled from a proxy of <= proxy_max
    proxy_max: int
    compile_report: bool


PRESETS = {
    # The interpreter runs ~10 ms per program and tile: 2**21 elements of BN fwd+bwd take minutes.
    "full": Preset(
        (64, 128, 256),
        True,
        tuple(BCE_SIZES),
        (64, 128, 256),
        ("fp32", "bf16"),
        PROVIDERS,
        "all",
        1 << 21,
        1 << 18,
        True,
    ),
    # CI-sized: every shape class is present; the interpreter counts the batch-64 generator layers and
    # shapes up to 2**16 elements directly, and models the rest from proxies of the same launch plan.
    "quick": Preset(
        (64, 128, 256),
        True,
        tuple(BCE_SIZES),
        (64,),
        ("fp32", "bf16"),
        PROVIDERS,
        "g64",
        1 << 16,
        1 << 16,
        True,
    ),
    # The tests' preset: the generator's layers at batch 4 (one counted, two modelled from proxies), a
    # counted and a modelled BCE size, one D loss, both dtypes, no compiler.
    "smoke": Preset(
        (4,),
        False,
        (256, 1 << 16),
        (4,),
        ("fp32", "bf16"),
        ("eager", "triton"),
        "none",
        1 << 15,
        1 << 15,
        False,
    ),
}


# ---------------------------------------------------------------------------------------------------
# Shapes


def generator_layers(batch: int, image_size: int = 28) -> list[tuple[str, tuple]]:
    """(name, input shape) of every BN+LeakyReLU in distgan's generator, read off the model itself."""
    from distgan.models import Generator

    g = Generator(image_size=image_size, kernels="eager")
    found = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: found.append((name, args[0].shape)))
        for name, m in g.named_modules()
        if isinstance(m, kernels.BatchNormLeakyReLU1d | kernels.BatchNormLeakyReLU2d)
    ]
    with torch.no_grad():
        g(torch.zeros(2, g.z_dim))
    for h in hooks:
        h.remove()
    return [(name, (batch,) + tuple(shape[1:])) for name, shape in found]


def build_cases(preset: Preset) -> list[Case]:
    cases = []
    for dtype in preset.dtypes:
        for batch in preset.batches:
            for name, shape in generator_layers(batch):
                cases.append(Case(BN, shape, dtype, f"G.{name} b{batch}"))
        if preset.large:
            cases += [Case(BN, shape, dtype, "large") for shape in LARGE_BN_SHAPES]
        cases += [Case(BCE, (m,), dtype, "G loss" if m <= 256 else "") for m in preset.bce_sizes]
        cases += [Case(DLOSS, (2 * b,), dtype, f"D batch {b}") for b in preset.dloss_batches]
    return cases


# ---------------------------------------------------------------------------------------------------
# Providers: one callable per (op, provider); inputs are built outside every counted region.


def make_inputs(case: Case, device) -> dict:
    """Tensors for one call; `diff` are those the backward differentiates with respect to."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[case.dtype]
    if case.op == BN:
        c = case.shape[1]
        # Parameters and running statistics in fp32, as in a model trained under autocast.
        x = torch.randn(case.shape, generator=gen).to(device, dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(c, generator=gen)).to(device).requires_grad_()
        b = (0.1 * torch.randn(c, generator=gen)).to(device).requires_grad_()
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        return {"args": (x, w, b, rm, rv), "diff": (x, w, b)}
    x = (2 * torch.randn(case.shape, generator=gen)).to(device, dtype).requires_grad_()
    return {"args": (x,), "diff": (x,)}


def _bn_eager(x, w, b, rm, rv):
    return reference.batch_norm_leaky_relu(x, w, b, rm, rv, True, 0.1, 1e-5, 0.2)


def _bn_triton(x, w, b, rm, rv):
    return kernels.batch_norm_leaky_relu(x, w, b, rm, rv, True, 0.1, 1e-5, 0.2, impl="triton")


def _bce_eager(x):
    return reference.bce_with_logits(x, 1.0, "mean")  # the G loss: BCE(D(G(z)), 1)


def _bce_triton(x):
    return kernels.bce_with_logits(x, 1.0, "mean", impl="triton")


def _dloss_eager(x):
    return reference.discriminator_loss(x, x.shape[0] // 2)[0]


def _dloss_triton(x):
    return kernels.discriminator_loss(x, x.shape[0] // 2, impl="triton")[0]


EAGER = {BN: _bn_eager, BCE: _bce_eager, DLOSS: _dloss_eager}
TRITON = {BN: _bn_triton, BCE: _bce_triton, DLOSS: _dloss_triton}


def provider_fn(op: str, provider: str):
    if provider == "eager":
        return EAGER[op]
    if provider == "triton":
        return TRITON[op]
    torch._dynamo.reset()  # a fresh cache per case: no recompilation limit, no reuse across shapes
    return torch.compile(EAGER[op], dynamic=False)


# ---------------------------------------------------------------------------------------------------
# CPU: counting


def _gpu_limits(bn) -> dict:
    """The batch-norm launchers' planning limits on MODEL_GPU (what `device_limits` returns on CUDA)."""
    return {
        "programs": bn.PROGRAMS_PER_SM * MODEL_GPU["sms"],
        "rows_block_c": bn.ROWS_BLOCK_C,
        "stats_block_c": bn.STATS_BLOCK_C,
        "finalize_block_c": bn.FINALIZE_BLOCK_C,
    }


@contextlib.contextmanager
def planned_for_gpu():
    """Launch plans as on MODEL_GPU (grids sized for its SM count, GPU block sizes) while the
    interpreter runs them, so launches and partial-sum traffic are those of the GPU the model names.

    The launchers plan few, wide programs on CPU (the interpreter's cost is per program); the compile
    report records the GPU plan the same way.
    """
    from kernels._compile_report import _op_modules

    bn, bce = _op_modules()
    saved = bn.device_limits, bce._plan_for
    bn.device_limits = lambda device: _gpu_limits(bn)
    bce._plan_for = lambda m, device: bce.plan(m, "cuda", MODEL_GPU["sms"])
    try:
        yield
    finally:
        bn.device_limits, bce._plan_for = saved


def path_signature(case: Case):
    """What decides the Triton launch sequence for a shape: layout, fused/split, spatial extent."""
    from kernels._compile_report import _op_modules

    bn, bce = _op_modules()
    if case.op == BN:
        _, rows, n_rows, c, k = bn.layout_of(torch.empty(case.shape, device="meta"))
        fused = bn.plan(n_rows, c, k, rows, _gpu_limits(bn))["fused"]
        return rows, fused, None if rows else k
    return bce.plan(case.numel, "cuda", MODEL_GPU["sms"])["grid"][0] > 1


def proxy_case(case: Case, limit: int) -> Case | None:
    """A shape of at most `limit` elements with the same launch plan, whose counts scale to `case` by
    element count; None if there is none.

    Channels shrink first: every per-channel cost (statistics, parameters, running stats) scales with C
    exactly as the data does. The batch shrinks only in the (N, C, H, W) layout and only as far as
    needed, since per-channel costs do not scale with N (they are < 0.5 % of the bytes wherever a
    proxy is needed: H*W >= 49 elements per sample and channel). The spatial extent never changes.
    """
    want = path_signature(case)
    shape = case.shape
    rows_layout = case.op == BN and want[0]
    ns = [shape[0] >> i for i in range(shape[0].bit_length()) if shape[0] >> i >= 2]
    if rows_layout:
        ns = ns[:1]
    cs = (
        [shape[1] >> i for i in range(shape[1].bit_length()) if shape[1] >> i >= 1]
        if len(shape) > 1
        else [None]
    )
    best = None
    for n in ns:
        for c in cs:
            cand = (n,) if c is None else (n, c) + tuple(shape[2:])
            proxy = Case(case.op, cand, case.dtype, f"proxy of {list(shape)}")
            if proxy.numel > limit or path_signature(proxy) != want:
                continue
            if best is None or (proxy.numel, proxy.shape[0]) > (best.numel, best.shape[0]):
                best = proxy
    return best


def count_provider(case: Case, provider: str) -> dict:
    """One forward and one backward of `provider` on CPU tensors, counted; returns per-mode Tallies."""
    inp = make_inputs(case, "cpu")
    fn = provider_fn(case.op, provider)
    with count_region(triton=provider == "triton") as fwd, SavedCounter(inp["args"]) as saved:
        out = fn(*inp["args"])
    grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)
    with count_region(triton=provider == "triton") as bwd:
        torch.autograd.grad(out, inp["diff"], grad)
    f, b = fwd(), bwd()
    return {"forward": f, "backward": b, "full": f + b, "saved": saved.bytes, "saved_new": saved.new_bytes}


@contextlib.contextmanager
def _inductor_metrics():
    """Inductor's own per-graph accounting (kernels and the bytes each reads and writes), quietly."""
    import torch._inductor.config as inductor_config
    from torch._inductor import compile_fx

    log = compile_fx.inductor_metrics_log
    saved = log.level, log.propagate, inductor_config.fx_graph_cache
    log.setLevel(logging.INFO)  # count_bytes() only runs when this logger is enabled
    log.propagate = False
    inductor_config.fx_graph_cache = False  # a cache hit skips code generation, and so the count
    try:
        yield
    finally:
        log.setLevel(saved[0])
        log.propagate = saved[1]
        inductor_config.fx_graph_cache = saved[2]


def count_compile(case: Case) -> dict:
    """torch.compile's generated kernels for the forward and the backward graph, from inductor."""
    from torch._inductor import metrics

    def tally():
        nodes = [(node, n) for node, n in metrics.nodes_num_elem if n > 0]
        names = [type(node).__name__ for node, _ in nodes]
        return Tally(read=metrics.num_bytes_accessed, launches=len(nodes), ops=Counter(names))

    inp = make_inputs(case, "cpu")
    fn = provider_fn(case.op, "compile")
    with _inductor_metrics():
        metrics.reset()
        out = fn(*inp["args"])  # compiles the forward (and partitions the joint graph)
        f = tally()
        grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)
        metrics.reset()
        torch.autograd.grad(out, inp["diff"], grad)  # compiles the backward
        b = tally()
    inp = make_inputs(case, "cpu")
    with SavedCounter(inp["args"]) as saved:
        fn(*inp["args"])
    return {"forward": f, "backward": b, "full": f + b, "saved": saved.bytes, "saved_new": saved.new_bytes}


METHODS = {
    "eager": "dispatch: each ATen op that runs a kernel, charged its input + output tensors once",
    "compile": "inductor: each generated kernel (CPU backend), charged the buffers it reads + writes",
    "triton": "interpreter: every unmasked lane loaded or stored, plus ATen ops around the kernels",
}


def is_g64(case: Case) -> bool:
    """A generator layer at batch 64: the shapes of the headline ratio, always counted directly."""
    return case.op == BN and case.label.startswith("G.") and case.label.endswith(" b64")


def rec(case: Case, mode, provider, metric, value, unit, source, method, **extra) -> dict:
    return dict(
        op=case.op,
        shape=list(case.shape),
        dtype=case.dtype,
        mode=mode,
        provider=provider,
        metric=metric,
        value=value,
        unit=unit,
        source=source,
        method=method,
        case=case.label,
        **extra,
    )


def cpu_records(case: Case, provider: str, preset: Preset, log) -> tuple[list[dict], str | None]:
    """Records for one (case, provider) on CPU, or ([], reason) when the provider cannot run."""
    scale, proxy, source = 1.0, None, "measured"
    method = METHODS[provider]
    if provider == "triton":
        if not kernels.triton_can_run("cpu"):
            return [], "Triton cannot run on CPU here (TRITON_INTERPRET unset or triton missing)"
        if case.numel > preset.measure_max and not is_g64(case):
            proxy = proxy_case(case, preset.proxy_max)
            if proxy is None:
                return [], f"no proxy shape of <= {preset.proxy_max} elements with the same launch plan"
            scale, source = case.numel / proxy.numel, "modelled"
            method = (
                f"interpreter count at proxy {list(proxy.shape)} (same launch plan), bytes scaled by "
                f"numel ratio {scale:.4g}; launches as the proxy's"
            )
    t0 = time.perf_counter()
    try:
        if provider == "compile":
            counts = count_compile(case)
        elif provider == "triton":
            with planned_for_gpu():
                counts = count_provider(proxy or case, provider)
        else:
            counts = count_provider(case, provider)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is reported, not fatal
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return [], reason
    log(
        f"  {case.op:22s} {list(case.shape)!s:22s} {case.dtype} {provider:8s} {time.perf_counter() - t0:6.1f}s"
        + (f"  (proxy {list(proxy.shape)})" if proxy else "")
    )
    out = []
    for mode in MODES:
        t = counts[mode]
        nbytes = round(t.bytes * scale)
        ops = dict(t.ops)
        out.append(
            rec(
                case,
                mode,
                provider,
                "bytes",
                nbytes,
                "B",
                source,
                method,
                read=round(t.read * scale),
                written=round(t.written * scale),
            )
        )
        out.append(
            rec(
                case,
                mode,
                provider,
                "launches",
                t.launches,
                "count",
                source,
                "kernels per call: " + ", ".join(f"{k} x{v}" for k, v in ops.items()),
                syncs=t.syncs,
            )
        )
        out.append(
            rec(
                case,
                mode,
                provider,
                "ms",
                nbytes / (MODEL_GPU["copy_gbps"] * 1e6),
                "ms",
                "modelled",
                f"bytes / {MODEL_GPU['copy_gbps']:.0f} GB/s ({MODEL_GPU['name']} copy bandwidth); "
                f"launch latency not included",
            )
        )
    if proxy is None:
        out.append(
            rec(
                case,
                "forward",
                provider,
                "saved_bytes",
                counts["saved"],
                "B",
                "measured",
                "saved_tensors_hooks: distinct storages saved for backward",
            )
        )
        out.append(
            rec(
                case,
                "forward",
                provider,
                "saved_new_bytes",
                counts["saved_new"],
                "B",
                "measured",
                "saved_tensors_hooks: saved storages other than the op's inputs (activation memory)",
            )
        )
    return out, None


# ---------------------------------------------------------------------------------------------------
# GPU: timing


def minimal_bytes(case: Case, mode: str) -> int:
    """The minimal-traffic model: forward reads x and writes z; backward reads x and dz, writes dx.
    The losses write a scalar: forward reads the logits; backward reads the logits, writes dlogits."""
    es = DTYPES[case.dtype].itemsize
    n = case.numel * es
    if case.op == BN:
        return {"forward": 2 * n, "backward": 3 * n, "full": 5 * n}[mode]
    return {"forward": n, "backward": 2 * n, "full": 2 * n}[mode]


def gpu_callables(case: Case, provider: str, device):
    """(forward, backward, full) zero-argument callables; backward reuses one retained graph."""
    inp = make_inputs(case, device)
    if provider == "compile":
        # AOTAutograd donates saved buffers to the backward unless told otherwise, and a donated
        # backward refuses retain_graph=True, which timing the backward alone needs.
        torch._functorch.config.donated_buffer = False
    fn = provider_fn(case.op, provider)
    out = fn(*inp["args"])
    grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)

    def forward():
        return fn(*inp["args"])

    def backward():
        return torch.autograd.grad(out, inp["diff"], grad, retain_graph=True)

    def full():
        return torch.autograd.grad(fn(*inp["args"]), inp["diff"], grad)

    return {"forward": forward, "backward": backward, "full": full}, inp, fn


def copy_bandwidth_gbps(bench, device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of `nbytes`: reads + writes / median time, the ceiling for every row."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))[0]
    return 2 * nbytes / (ms * 1e6)


def count_launches_gpu(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def gpu_records(
    case: Case, provider: str, device, bench, bench_graph, copy_gbps, launches=count_launches_gpu
):
    """Timed records for one (case, provider): ms (p50 with p20/p80), GB/s, % of copy, peak memory,
    launches; `bench(fn) -> [p50, p20, p80]` ms, `bench_graph` the CUDA-graph variant (or None)."""
    calls, inp, op_fn = gpu_callables(case, provider, device)
    out = []
    for mode, fn in calls.items():
        fn()  # compile / autotune outside the timing
        p50, p20, p80 = bench(fn)
        gbps = minimal_bytes(case, mode) / (p50 * 1e6)
        out.append(
            rec(
                case,
                mode,
                provider,
                "ms",
                p50,
                "ms",
                "measured",
                "triton.testing.do_bench median",
                p20=p20,
                p80=p80,
            )
        )
        out.append(
            rec(case, mode, provider, "gbps", gbps, "GB/s", "measured", "minimal-traffic bytes / median time")
        )
        out.append(
            rec(
                case,
                mode,
                provider,
                "pct_copy",
                100 * gbps / copy_gbps,
                "%",
                "measured",
                f"GB/s over this GPU's measured copy bandwidth ({copy_gbps:.0f} GB/s)",
            )
        )
        if bench_graph is not None and minimal_bytes(case, mode) < LAUNCH_BOUND_BYTES:
            try:
                g50, g20, g80 = bench_graph(fn)
                out.append(
                    rec(
                        case,
                        mode,
                        provider,
                        "ms_cudagraph",
                        g50,
                        "ms",
                        "measured",
                        "triton.testing.do_bench_cudagraph median",
                        p20=g20,
                        p80=g80,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - autograd inside a graph capture may not be capturable
                out.append(
                    rec(
                        case,
                        mode,
                        provider,
                        "ms_cudagraph",
                        None,
                        "ms",
                        "measured",
                        f"not capturable: {type(exc).__name__}",
                    )
                )
        out.append(
            rec(
                case,
                mode,
                provider,
                "launches",
                launches(fn),
                "count",
                "measured",
                "profiler: device kernels + memcpy/memset per call",
            )
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            out.append(
                rec(
                    case,
                    mode,
                    provider,
                    "peak_bytes",
                    torch.cuda.max_memory_allocated() - base,
                    "B",
                    "measured",
                    "torch.cuda.max_memory_allocated above the inputs, one call",
                )
            )
    with SavedCounter(inp["args"]) as saved:  # compiled graphs save through the same hooks
        op_fn(*inp["args"])
    out.append(
        rec(
            case,
            "forward",
            provider,
            "saved_bytes",
            saved.bytes,
            "B",
            "measured",
            "saved_tensors_hooks: distinct storages saved for backward",
        )
    )
    out.append(
        rec(
            case,
            "forward",
            provider,
            "saved_new_bytes",
            saved.new_bytes,
            "B",
            "measured",
            "saved_tensors_hooks: saved storages other than the op's inputs",
        )
    )
    return out


def do_bench_quantiles(fn):
    import triton.testing

    return list(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))


def do_bench_graph_quantiles(fn):
    import triton.testing

    return list(triton.testing.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8]))


# ---------------------------------------------------------------------------------------------------
# Static compile report (kernels/_compile_report.py; it needs TRITON_INTERPRET unset: a subprocess)


def static_compile_report(log) -> tuple[list[dict], str | None]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tmp = REPO / "bench" / "results" / "compile_report.json.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "kernels._compile_report", "--arch", "80", "90", "--json", str(tmp)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return [], f"compile report failed: {tail[0][:200]}"
    rows = json.loads(tmp.read_text())
    tmp.unlink()
    log(f"  static compile report: {len(rows)} kernel x arch rows")
    return rows, None


# ---------------------------------------------------------------------------------------------------
# Reporting


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "numpy", "ray"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def git_info() -> dict:
    def git(*args):
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", "kernels", "bench", "distgan")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status),
        "dirty_files": (status or "").splitlines(),
    }


def index(records) -> dict:
    return {
        (r["op"], tuple(r["shape"]), r["dtype"], r["mode"], r["provider"], r["metric"]): r for r in records
    }


def validate_proxies(records, cases, log) -> list[dict]:
    """Checks of the proxy model: each BN shape counted directly (fp32) is also modelled from a proxy
    at least 4x smaller, and the forward + backward bytes are compared."""
    idx = index(records)
    out = []
    for case in cases:
        measured = idx.get((case.op, case.shape, case.dtype, "full", "triton", "bytes"))
        if not (case.op == BN and case.dtype == "fp32" and measured and measured["source"] == "measured"):
            continue
        proxy = proxy_case(case, min(case.numel // 4, 1 << 16))
        if proxy is None:
            continue
        with planned_for_gpu():
            counts = count_provider(proxy, "triton")
        predicted = counts["full"].bytes * case.numel / proxy.numel
        err = predicted / measured["value"] - 1
        log(f"  proxy model check {list(case.shape)} from {list(proxy.shape)}: {100 * err:+.2f} %")
        out.append(
            {
                "check": f"proxy model: triton bytes of {list(case.shape)} {case.dtype} full, modelled from "
                f"{list(proxy.shape)}, relative error",
                "value": round(err, 5),
                "limit": 0.02,
                "ok": abs(err) <= 0.02,
                "source": "measured vs modelled",
            }
        )
    return out


def checks(records, cases) -> list[dict]:
    """The issue's acceptance figures, computed from the records themselves."""
    idx = index(records)
    out = []
    for dtype in DTYPES:
        layers = [
            c
            for c in cases
            if c.op == BN and c.dtype == dtype and c.label.startswith("G.") and c.label.endswith(" b64")
        ]
        got = [
            (
                idx.get((BN, c.shape, dtype, "full", "triton", "bytes")),
                idx.get((BN, c.shape, dtype, "full", "eager", "bytes")),
            )
            for c in layers
        ]
        if layers and all(t and e for t, e in got):
            ratio = sum(t["value"] for t, _ in got) / sum(e["value"] for _, e in got)
            sources = sorted({t["source"] for t, _ in got})
            out.append(
                {
                    "check": f"generator BN+LReLU layers at batch 64, {dtype}, forward+backward: "
                    f"triton bytes / eager bytes",
                    "value": round(ratio, 4),
                    "limit": 0.65,
                    "ok": ratio <= 0.65,
                    "source": "/".join(sources),
                }
            )
    worse = []
    for key, r in idx.items():
        op, shape, dtype, mode, provider, metric = key
        if provider == "triton" and metric == "bytes":
            e = idx.get((op, shape, dtype, mode, "eager", "bytes"))
            if e is not None and r["value"] > e["value"]:
                worse.append(f"{op} {list(shape)} {dtype} {mode}: {r['value']} > {e['value']}")
    out.append(
        {
            "check": "triton bytes <= eager bytes at every shape, dtype and mode",
            "value": len(worse),
            "limit": 0,
            "ok": not worse,
            "violations": worse,
        }
    )
    return out


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_ms(ms) -> str:
    if ms is None:
        return "—"
    return f"{ms * 1e3:.3g} µs" if ms < 1 else f"{ms:.3g} ms"


def table_cpu(records, cases, providers) -> list[str]:
    idx = index(records)
    cols = (
        ["op", "shape", "dtype", "mode"]
        + [f"bytes {p}" for p in providers]
        + ["triton/eager"]
        + [f"launches {p}" for p in providers]
        + [f"saved {p}" for p in providers]
        + [f"model µs {p}" for p in providers]
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in cases:
        for mode in MODES:

            def get(p, metric, m=mode, c=c):
                return idx.get((c.op, c.shape, c.dtype, m, p, metric))

            if not any(get(p, "bytes") for p in providers):
                continue
            row = [
                c.op.replace("batch_norm_leaky_relu", "bn_lrelu"),
                "×".join(map(str, c.shape)) + (f" ({c.label})" if c.label else ""),
                c.dtype,
                mode,
            ]
            for p in providers:
                r = get(p, "bytes")
                row.append(fmt_bytes(r["value"]) + ("*" if r["source"] == "modelled" else "") if r else "n/a")
            t, e = get("triton", "bytes"), get("eager", "bytes")
            row.append(f"{t['value'] / e['value']:.2f}" if t and e else "—")
            for p in providers:
                r = get(p, "launches")
                row.append(str(r["value"]) + ("*" if r["source"] == "modelled" else "") if r else "n/a")
            for p in providers:
                r = get(p, "saved_new_bytes", "forward") if mode != "backward" else None
                row.append(fmt_bytes(r["value"]) if r else "—")
            for p in providers:
                r = get(p, "ms")
                row.append(f"{r['value'] * 1e3:.3g}" if r else "—")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def table_gpu(records, cases, providers) -> list[str]:
    idx = index(records)
    cols = (
        ["op", "shape", "dtype", "mode"]
        + [f"{p} ms (p20–p80)" for p in providers]
        + [f"{p} GB/s (% copy)" for p in providers]
        + ["triton vs eager", "triton vs compile"]
        + [f"launches {p}" for p in providers]
        + [f"peak {p}" for p in providers]
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in cases:
        for mode in MODES:

            def get(p, metric, m=mode, c=c):
                return idx.get((c.op, c.shape, c.dtype, m, p, metric))

            if not any(get(p, "ms") for p in providers):
                continue
            row = [
                c.op.replace("batch_norm_leaky_relu", "bn_lrelu"),
                "×".join(map(str, c.shape)),
                c.dtype,
                mode,
            ]
            for p in providers:
                r = get(p, "ms")
                g = get(p, "ms_cudagraph")
                cell = f"{fmt_ms(r['value'])} ({fmt_ms(r['p20'])}–{fmt_ms(r['p80'])})" if r else "n/a"
                if g and g["value"] is not None:
                    cell += f"; graph {fmt_ms(g['value'])}"
                row.append(cell)
            for p in providers:
                r, pc = get(p, "gbps"), get(p, "pct_copy")
                row.append(f"{r['value']:.0f} ({pc['value']:.0f}%)" if r else "n/a")
            t = get("triton", "ms")
            for other in ("eager", "compile"):
                o = get(other, "ms")
                row.append(f"{o['value'] / t['value']:.2f}×" if t and o else "—")
            for p in providers:
                r = get(p, "launches")
                row.append(str(r["value"]) if r else "n/a")
            for p in providers:
                r = get(p, "peak_bytes")
                row.append(fmt_bytes(r["value"]) if r else "n/a")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def table_compile_report(rows) -> list[str]:
    lines = [
        "| kernel | case | sm | warps | regs | spills (stack + local B) | ld.v4 / ld.global |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['arch']} | {r['num_warps']} | {r['regs']} | "
            f"{r.get('stack', 0) + r.get('local', 0)} | {r.get('v4_loads', '?')} / {r.get('loads', '?')} |"
        )
    return lines


def render_markdown(result, cases) -> str:
    m, v, g = result["machine"], result["versions"], result["git"]
    gpu = result["device"] == "cuda"
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in result["records"])]
    lines = [
        f"# Kernel benchmark ({result['preset']}, {'GPU: ' + m['gpu'] if gpu else 'CPU only'})",
        "",
        f"`{result['command']}` — {result['created']}",
        "",
        f"- machine: {m['processor']}, {m['cpu_count']} CPUs" + (f", {m['gpu']}" if gpu else ", no GPU"),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- git: {g['commit']}"
        + (" (with uncommitted changes in kernels/ bench/ distgan/)" if g["dirty"] else ""),
        "",
    ]
    if gpu:
        lines += [
            (
                f"Timed with triton.testing.do_bench (median, p20–p80); copy bandwidth measured in this run: "
                f"{result['copy_gbps']:.0f} GB/s. GB/s uses the minimal-traffic model (forward reads x and "
                "writes z; backward reads x and dz, writes dx). Everything here is **measured**."
            ),
            "",
        ]
        lines += table_gpu(result["records"], cases, providers)
    else:
        lines += [
            (
                "No GPU: nothing is timed. **Measured** here = counted in this run: bytes each provider moves "
                "per call, kernel launches, bytes saved for backward (`saved` = beyond the op's inputs)."
            ),
            "",
            (
                "- eager bytes: every ATen op dispatched, charged its inputs + outputs once (a lower bound: "
                "batch_norm reads x twice and is charged once)."
            ),
            (
                "- compile bytes: inductor's count of the buffers each generated kernel reads + writes (CPU "
                "backend; on a GPU inductor emits different, Triton kernels)."
            ),
            (
                "- triton bytes: every unmasked lane the interpreter loads or stores, launch plan as on "
                f"{MODEL_GPU['name']} ({MODEL_GPU['sms']} SMs), plus the ATen ops around the kernels."
            ),
            (
                "- `*` = **modelled**: counted at a smaller proxy shape with the same launch plan and scaled "
                "by element count."
            ),
            (
                f"- `model µs` is **modelled**: bytes / {MODEL_GPU['copy_gbps']:.0f} GB/s, the copy bandwidth of "
                f"an {MODEL_GPU['name']} (~90 % of its {MODEL_GPU['peak_gbps']:.0f} GB/s peak); launch latency "
                "not included."
            ),
            "",
        ]
        lines += table_cpu(result["records"], cases, providers)
    lines += ["", "## Checks", ""]
    for c in result["checks"]:
        lines.append(
            f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']} = {c['value']} (limit {'±' if 'relative' in c['check'] else ''}{c['limit']})"
            + (f" [{c['source']}]" if c.get("source") else "")
        )
        for v_ in c.get("violations", [])[:20]:
            lines.append(f"  - {v_}")
    if result["unavailable"]:
        lines += ["", "## Not available here", ""]
        seen = set()
        for u in result["unavailable"]:
            key = (u["provider"], u["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {u['provider']}: {u['reason']} (first: {u['op']} {u['shape']} {u['dtype']})")
    if result["compile_report"]:
        lines += [
            "",
            "## Static compile report (sm_80 / sm_90, no GPU needed: `python -m kernels._compile_report`)",
            "",
        ]
        lines += table_compile_report(result["compile_report"])
    return "\n".join(lines) + "\n"


def log_wandb(result) -> None:
    """The records as one wandb.Table under distgan's key for it (the dashboard reads it there)."""
    import wandb

    try:
        from distgan.tracking import BENCH_TABLE_KEY
    except ImportError:
        BENCH_TABLE_KEY = "bench/kernels"

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "distgan"),
        job_type="bench-kernels",
        mode=mode,
        config={k: result[k] for k in ("preset", "device", "machine", "versions", "git")},
    )
    cols = ["op", "shape", "dtype", "mode", "provider", "metric", "value", "unit", "source", "method", "case"]
    table = wandb.Table(
        columns=cols,
        data=[[json.dumps(r[c]) if c == "shape" else r[c] for c in cols] for r in result["records"]],
    )
    run.log({BENCH_TABLE_KEY: table})
    run.summary.update({c["check"]: c["value"] for c in result["checks"]})
    run.finish()


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized run (< 5 min on a 2-core CPU)")
    size.add_argument("--smoke", action="store_true", help="the tests' tiny preset")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None, help="default: the preset's")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default: the preset's")
    p.add_argument("--ops", nargs="+", choices=[BN, BCE, DLOSS], default=None, help="default: all")
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results", help="directory for JSON + Markdown"
    )
    p.add_argument("--name", default=None, help="file stem; default kernels-<cpu|gpu>[-<preset>]")
    p.add_argument("--no-compile-report", action="store_true", help="skip the static sm_80/sm_90 report")
    p.add_argument("--wandb", action="store_true", help="also log the records as a wandb.Table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset_name = "quick" if args.quick else "smoke" if args.smoke else "full"
    preset = PRESETS[preset_name]
    if args.providers:
        preset.providers = tuple(args.providers)
    if args.dtypes:
        preset.dtypes = tuple(args.dtypes)
    if args.no_compile_report:
        preset.compile_report = False
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cases = [c for c in build_cases(preset) if args.ops is None or c.op in args.ops]
    t_start = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"bench/kernels.py: {len(cases)} cases x {preset.providers} on {device} ({preset_name})")
    records, unavailable = [], []
    copy_gbps = None
    if gpu:
        copy_gbps = copy_bandwidth_gbps(do_bench_quantiles, device)
        log(f"  copy bandwidth: {copy_gbps:.0f} GB/s")
    # torch.compile in the quick preset: the headline shapes and the two losses at batch 64, fp32.
    g64 = {c for c in cases if is_g64(c) or c.label in ("D batch 64",) or (c.op == BCE and c.numel == 64)}
    for case in cases:
        for provider in preset.providers:
            if gpu:
                try:
                    records += gpu_records(
                        case, provider, device, do_bench_quantiles, do_bench_graph_quantiles, copy_gbps
                    )
                    log(f"  {case.op} {list(case.shape)} {case.dtype} {provider} timed")
                except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on
                    unavailable.append(
                        {
                            "op": case.op,
                            "shape": list(case.shape),
                            "dtype": case.dtype,
                            "provider": provider,
                            "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                        }
                    )
                continue
            if provider == "compile" and (
                preset.compile_cases == "none"
                or (preset.compile_cases == "g64" and (case not in g64 or case.dtype != "fp32"))
            ):
                unavailable.append(
                    {
                        "op": case.op,
                        "shape": list(case.shape),
                        "dtype": case.dtype,
                        "provider": provider,
                        "reason": f"not run in the {preset_name} preset (inductor compiles each shape: "
                        f"~5-30 s on this CPU); the full run covers every shape",
                    }
                )
                continue
            recs, reason = cpu_records(case, provider, preset, log)
            records += recs
            if reason:
                unavailable.append(
                    {
                        "op": case.op,
                        "shape": list(case.shape),
                        "dtype": case.dtype,
                        "provider": provider,
                        "reason": reason,
                    }
                )
                log(f"  {case.op} {list(case.shape)} {case.dtype} {provider}: n/a ({reason})")
    report, report_err = ([], None)
    if preset.compile_report:
        report, report_err = static_compile_report(log)
        if report_err:
            unavailable.append(
                {"op": "*", "shape": [], "dtype": "*", "provider": "triton", "reason": report_err}
            )
    result = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": preset_name,
        "device": device.type,
        "machine": machine_info(),
        "versions": versions(),
        "git": git_info(),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "model_gpu": None if gpu else MODEL_GPU,
        "copy_gbps": copy_gbps,
        "methods": METHODS,
        "records": records,
        "unavailable": unavailable,
        "compile_report": report,
        "wall_s": None,
        "checks": [],
    }
    result["checks"] = checks(records, cases)
    if not gpu and "triton" in preset.providers and kernels.triton_can_run("cpu"):
        result["checks"] += validate_proxies(records, cases, log)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    md = render_markdown(result, cases)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"kernels-{'gpu' if gpu else 'cpu'}" + (
        "" if preset_name == "full" else f"-{preset_name}"
    )
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out / stem}.json and .md in {result['wall_s']} s")
    if args.wandb:
        log_wandb(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
