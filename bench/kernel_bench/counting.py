"""bench/kernels.py on a CPU: what each provider moves, launches and saves per call, counted (see
counters.py for how), the proxy model for shapes too large to count, and the static compile report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter

import torch

import kernels
from distgan.storage import first_line

from . import REPO
from .cases import MODEL_GPU, MODES, STEP, Case, Preset, is_g64, make_inputs, provider_fn, rec
from .counters import SavedCounter, Tally, count_region
from .plans import planned_for_gpu, proxy_key

METHODS = {
    "eager": "dispatch: each ATen op that runs a kernel, charged its input + output tensors once",
    "compile": "inductor: each generated kernel (CPU backend), charged the buffers it reads + writes",
    "triton": "interpreter: every unmasked lane loaded or stored, plus ATen ops around the kernels",
}


def proxy_case(case: Case, limit: int) -> Case | None:
    """A shape of at most `limit` elements with the same launch plan, whose counts scale to `case` by
    element count; None if there is none.

    The candidates halve the first two dimensions (the batch, and the channels where there are any), never the
    rest; the op's `proxy_key` says which keep the counts proportional. Channels shrink first and the batch only
    as far as needed: every per-channel cost (statistics, parameters, running stats) scales with C exactly as the
    data does, but not with N (they are < 0.5 % of the bytes wherever a proxy is needed: H*W >= 49 elements per
    sample and channel).
    """
    want = proxy_key(case)
    shape = case.shape
    ns = [shape[0] >> i for i in range(shape[0].bit_length()) if shape[0] >> i >= 2]
    cs = [shape[1] >> i for i in range(shape[1].bit_length()) if shape[1] >> i >= 1] if len(shape) > 1 else [None]
    best = None
    for n in ns:
        for c in cs:
            cand = (n,) if c is None else (n, c) + tuple(shape[2:])
            proxy = Case(case.op, cand, case.dtype, f"proxy of {list(shape)}")
            if proxy.numel > limit or proxy_key(proxy) != want:
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


def _triton_proxy(case: Case, preset: Preset) -> tuple[Case | None, float, str, str | None]:
    """(proxy or None, bytes scale, source, method) for a Triton count; method None = no proxy found."""
    if case.numel <= preset.measure_max or is_g64(case):
        return None, 1.0, "measured", METHODS["triton"]
    proxy = proxy_case(case, preset.proxy_max)
    if proxy is None:
        return None, 1.0, "modelled", None
    scale = case.numel / proxy.numel
    method = (f"interpreter count at proxy {list(proxy.shape)} (same launch plan), bytes scaled by "
              f"numel ratio {scale:.4g}; launches as the proxy's")
    return proxy, scale, "modelled", method


def _count(case: Case, provider: str, proxy: Case | None) -> dict:
    if provider == "compile":
        return count_compile(case)
    if provider == "triton":
        with planned_for_gpu():
            return count_provider(proxy or case, provider)
    return count_provider(case, provider)


def _mode_records(case: Case, provider: str, counts: dict, scale: float, source: str, method: str) -> list[dict]:
    """bytes, launches and the modelled ms of every mode."""
    out = []
    for mode in MODES:
        t = counts[mode]
        nbytes = round(t.bytes * scale)
        launched = "kernels per call: " + ", ".join(f"{k} x{v}" for k, v in dict(t.ops).items())
        out += [
            rec(case, mode, provider, "bytes", nbytes, "B", source, method,
                read=round(t.read * scale), written=round(t.written * scale)),
            rec(case, mode, provider, "launches", t.launches, "count", source, launched, syncs=t.syncs),
            rec(case, mode, provider, "ms", nbytes / (MODEL_GPU["copy_gbps"] * 1e6), "ms", "modelled",
                f"bytes / {MODEL_GPU['copy_gbps']:.0f} GB/s ({MODEL_GPU['name']} copy bandwidth); "
                f"launch latency not included"),
        ]
    return out


def saved_records(case: Case, provider: str, saved: int, saved_new: int, new_method: str) -> list[dict]:
    """The two activation-memory figures, recorded under the forward."""
    return [
        rec(case, "forward", provider, "saved_bytes", saved, "B", "measured",
            "saved_tensors_hooks: distinct storages saved for backward"),
        rec(case, "forward", provider, "saved_new_bytes", saved_new, "B", "measured", new_method),
    ]


def cpu_records(case: Case, provider: str, preset: Preset, log) -> tuple[list[dict], str | None]:
    """Records for one (case, provider) on CPU, or ([], reason) when the provider cannot run."""
    proxy, scale, source, method = None, 1.0, "measured", METHODS[provider]
    if provider == "triton":
        if not kernels.triton_can_run("cpu"):
            return [], "Triton cannot run on CPU here (TRITON_INTERPRET unset or triton missing)"
        proxy, scale, source, method = _triton_proxy(case, preset)
        if method is None:
            return [], f"no proxy shape of <= {preset.proxy_max} elements with the same launch plan"
    t0 = time.perf_counter()
    try:
        counts = _count(case, provider, proxy)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is reported, not fatal
        return [], first_line(exc, with_type=True)[:200]
    log(
        f"  {case.op:22s} {list(case.shape)!s:22s} {case.dtype} {provider:8s} {time.perf_counter() - t0:6.1f}s"
        + (f"  (proxy {list(proxy.shape)})" if proxy else "")
    )
    out = _mode_records(case, provider, counts, scale, source, method)
    if proxy is None:
        out += saved_records(case, provider, counts["saved"], counts["saved_new"],
                             "saved_tensors_hooks: saved storages other than the op's inputs (activation memory)")
    return out, None


def validate_proxies(records, cases, log) -> list[dict]:
    """Checks of the proxy model: each generator layer counted directly (fp32) is also modelled from a proxy
    at least 4x smaller, and the forward + backward bytes are compared."""
    from .report import index

    idx = index(records)
    out = []
    for case in cases:
        measured = idx.get((case.op, case.shape, case.dtype, "full", "triton", "bytes"))
        if not (case.label.startswith("G.") and case.dtype == "fp32" and measured and measured["source"] == "measured"):
            continue
        proxy = proxy_case(case, min(case.numel // 4, 1 << 16))
        if proxy is None:
            continue
        with planned_for_gpu():
            counts = count_provider(proxy, "triton")
        predicted = counts["full"].bytes * case.numel / proxy.numel
        err = predicted / measured["value"] - 1
        log(f"  proxy model check {list(case.shape)} from {list(proxy.shape)}: {100 * err:+.2f} %")
        out.append({
            "check": f"proxy model: triton bytes of {list(case.shape)} {case.dtype} full, modelled from "
                     f"{list(proxy.shape)}, relative error",
            "value": round(err, 5),
            "limit": 0.02,
            "ok": abs(err) <= 0.02,
            "source": "measured vs modelled",
        })
    return out


# ---------------------------------------------------------------------------------------------------
# distgan's whole training step


class _NoUpdate:
    """Stands in for both optimizers: the step's forward and backward passes are counted, not the update."""

    def __init__(self, module):
        self.params = list(module.parameters())

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


STEP_METHOD = ("distgan.step.gan_step (one D step, one G step; G and D forward and backward, both losses, the "
               "gradient norms it logs) at 28x28, fp32, optimizers replaced by no-ops; kernels planned as on "
               f"{MODEL_GPU['name']}; D's dropout counted as its CPU path")


def step_model_us(launches: int, nbytes: int) -> float:
    """The launch-bound step model: every kernel costs MODEL_GPU's launch_us, plus its bytes at copy bandwidth."""
    return launches * MODEL_GPU["launch_us"] + nbytes / (MODEL_GPU["copy_gbps"] * 1e3)


def step_records(batch: int, provider: str, log) -> tuple[list[dict], str | None]:
    """Launches and bytes of one training step of distgan's 28x28 DCGAN at `batch` (fp32), with the kernels of
    `provider` ("eager" | "triton"), and the modelled time of a launch-bound GPU step; ([], reason) if it cannot
    run here."""
    from distgan.models import Discriminator, Generator
    from distgan.step import gan_step

    if provider == "triton" and not kernels.triton_can_run("cpu"):
        return [], "Triton cannot run on CPU here (TRITON_INTERPRET unset or triton missing)"
    torch.manual_seed(0)
    g = Generator(z_dim=100, image_size=28, kernels=provider)
    d = Discriminator(image_size=28)
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(batch, 1, 28, 28, generator=gen) * 2 - 1
    z = torch.randn(batch, g.z_dim, generator=gen)  # drawn outside the count: the step's RNG is not the point
    t0 = time.perf_counter()
    with planned_for_gpu(), count_region(triton=provider == "triton") as tally:
        gan_step(g, d, _NoUpdate(g), _NoUpdate(d), [real], lambda n: z[:n], impl=provider)
    t = tally()
    log(f"  {STEP} batch {batch} {provider:8s} {time.perf_counter() - t0:6.1f}s: {t.launches} launches, "
        f"{t.bytes / 1e6:.1f} MB")
    case = Case(STEP, (batch,), "fp32", f"batch {batch}")
    kinds = "kernels per step: " + ", ".join(f"{k} x{v}" for k, v in sorted(t.ops.items(), key=lambda kv: -kv[1]))
    return [
        rec(case, "full", provider, "bytes", t.bytes, "B", "measured", STEP_METHOD, read=t.read, written=t.written),
        rec(case, "full", provider, "launches", t.launches, "count", "measured", kinds, syncs=t.syncs),
        rec(case, "full", provider, "step_model_us", step_model_us(t.launches, t.bytes), "us", "modelled",
            f"launches x {MODEL_GPU['launch_us']:g} us + bytes / {MODEL_GPU['copy_gbps']:.0f} GB/s: a launch-bound "
            f"step on {MODEL_GPU['name']}"),
    ], None


# ---------------------------------------------------------------------------------------------------
# Static compile report (bench/compile_report.py; it needs TRITON_INTERPRET unset: a subprocess)


def static_compile_report(log) -> tuple[list[dict], str | None]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tmp = REPO / "bench" / "results" / "compile_report.json.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compile_report.py"), "--arch", "80", "90", "--json", str(tmp)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return [], f"compile report failed: {tail[0][:200]}"
    rows = json.loads(tmp.read_text())
    tmp.unlink()
    log(f"  static compile report: {len(rows)} kernel x arch rows")
    return rows, None
