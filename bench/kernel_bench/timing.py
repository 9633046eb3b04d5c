"""bench/kernels.py on a GPU: every provider timed with triton.testing.do_bench (median, p20, p80; CUDA
graphs as well for launch-bound shapes), GB/s against the copy bandwidth measured in the same run, launches
from the profiler, peak memory. The timer is a parameter, so the tests run this path on CPU tensors."""

from __future__ import annotations

import torch

from kernels import registry

from .cases import DTYPES, LAUNCH_BOUND_BYTES, MODES, Case, make_inputs, provider_fn, rec
from .counters import SavedCounter
from .counting import saved_records


def minimal_bytes(case: Case, mode: str) -> int:
    """The minimal-traffic model: the op's least number of input-sized accesses in `mode` (its registry entry's
    `traffic`: BN+LReLU's forward reads x and writes z, its backward reads x and dz and writes dx; a loss writes
    a scalar), times the input's bytes."""
    traffic = dict(zip(MODES, registry.get(case.op).bench.traffic))
    return traffic[mode] * case.numel * DTYPES[case.dtype].itemsize


def gpu_callables(case: Case, provider: str, device):
    """({mode: zero-argument callable}, {mode: factory of the callable a CUDA graph captures}, inputs, op).

    The backward callable reuses one retained graph. Autograd launches each backward kernel on the stream its
    forward ran on, so the backward a CUDA graph captures needs a forward run on the capture stream: its
    factory runs the forward wherever it is called (the graph timer calls it on that stream)."""
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

    def backward_of_a_forward_here():
        out_here = fn(*inp["args"])
        return lambda: torch.autograd.grad(out_here, inp["diff"], grad, retain_graph=True)

    factories = {"forward": lambda: forward, "backward": backward_of_a_forward_here, "full": lambda: full}
    return {"forward": forward, "backward": backward, "full": full}, factories, inp, fn


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


def _graph_record(case: Case, mode: str, provider: str, make_fn, bench_graph) -> dict:
    try:
        g50, g20, g80 = bench_graph(make_fn)
        return rec(case, mode, provider, "ms_cudagraph", g50, "ms", "measured",
                   "CUDA-graph replay of n calls captured on one stream (as triton.testing.do_bench_cudagraph), "
                   "median of 10 replays", p20=g20, p80=g80)
    except Exception as exc:  # noqa: BLE001 - autograd inside a graph capture may not be capturable
        return rec(case, mode, provider, "ms_cudagraph", None, "ms", "measured",
                   f"not capturable: {type(exc).__name__}")


def _peak_record(case: Case, mode: str, provider: str, fn) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return rec(case, mode, provider, "peak_bytes", torch.cuda.max_memory_allocated() - base, "B", "measured",
               "torch.cuda.max_memory_allocated above the inputs, one call")


def _mode_records(case: Case, mode: str, provider: str, fn, make_fn, device, bench, bench_graph, copy_gbps,
                  launches):
    fn()  # compile / autotune outside the timing
    p50, p20, p80 = bench(fn)
    gbps = minimal_bytes(case, mode) / (p50 * 1e6)
    out = [
        rec(case, mode, provider, "ms", p50, "ms", "measured", "triton.testing.do_bench median", p20=p20, p80=p80),
        rec(case, mode, provider, "gbps", gbps, "GB/s", "measured", "minimal-traffic bytes / median time"),
        rec(case, mode, provider, "pct_copy", 100 * gbps / copy_gbps, "%", "measured",
            f"GB/s over this GPU's measured copy bandwidth ({copy_gbps:.0f} GB/s)"),
    ]
    if bench_graph is not None and minimal_bytes(case, mode) < LAUNCH_BOUND_BYTES:
        out.append(_graph_record(case, mode, provider, make_fn, bench_graph))
    out.append(rec(case, mode, provider, "launches", launches(fn), "count", "measured",
                   "profiler: device kernels + memcpy/memset per call"))
    if device.type == "cuda":
        out.append(_peak_record(case, mode, provider, fn))
    return out


def gpu_records(case: Case, provider: str, device, bench, bench_graph, copy_gbps, launches=count_launches_gpu):
    """Timed records for one (case, provider): ms (p50 with p20/p80), GB/s, % of copy, peak memory,
    launches; `bench(fn) -> [p50, p20, p80]` ms, `bench_graph(make_fn)` the CUDA-graph variant (or None)."""
    calls, factories, inp, op_fn = gpu_callables(case, provider, device)
    out = []
    for mode, fn in calls.items():
        out += _mode_records(case, mode, provider, fn, factories[mode], device, bench, bench_graph, copy_gbps,
                             launches)
    with SavedCounter(inp["args"]) as saved:  # compiled graphs save through the same hooks
        op_fn(*inp["args"])
    return out + saved_records(case, provider, saved.bytes, saved.new_bytes,
                               "saved_tensors_hooks: saved storages other than the op's inputs")


def do_bench_quantiles(fn):
    import triton.testing

    return list(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))


def do_bench_graph_quantiles(make_fn, rep_ms: float = 20.0, replays: int = 10):
    """[p50, p20, p80] ms per call of a CUDA graph of n calls, n sized to ~rep_ms, as
    triton.testing.do_bench_cudagraph does, except that `make_fn()` is called on the capture stream before the
    capture: what it builds (the forward a backward-only timing replays) lives on that stream."""
    import numpy as np

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn = make_fn()
        fn()  # warm-up: compile, autotune, allocate
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end) / 5
        n = max(1, int(rep_ms / estimate_ms)) if estimate_ms > 0 else 1000
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(n):
                fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / n)
    return [float(np.quantile(times, q)) for q in (0.5, 0.2, 0.8)]
