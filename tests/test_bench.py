"""The benchmark machinery: the counters count what they claim, the proxy model and the GPU timing path
produce the records other tools read, results never overwrite committed files unless named, bench/train.py's
pieces (plain loop in fp32 and bf16, summaries and ratios) work on a tiny preset, and bench/gpu_check.sh
exits cleanly without a GPU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels import reference

from support import load_bench_script

REPO = Path(__file__).resolve().parent.parent
# The repository first, as bench/*.py do it: processes spawned later inherit sys.path, and with bench/ first their
# `import kernels` would find bench/kernels.py instead of the kernels package.
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import _gpu_report  # noqa: E402
import _results  # noqa: E402
from kernel_bench import cases as _cases  # noqa: E402
from kernel_bench import counting as _counting  # noqa: E402
from kernel_bench import plans as _plans  # noqa: E402
from kernel_bench import timing as _timing  # noqa: E402
from kernel_bench.counters import DispatchCounter, SavedCounter, TritonCounter, count_region, tensor_bytes  # noqa: E402

BN, BCE, DLOSS = "batch_norm_leaky_relu", "bce_with_logits", "discriminator_loss"

RECORD_FIELDS = {"op", "shape", "dtype", "mode", "provider", "metric", "value", "unit", "source", "method"}


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask), mask=mask)


needs_interpreter = pytest.mark.skipif(
    not isinstance(_copy_kernel, InterpretedFunction),
    reason="the byte counter instruments the Triton interpreter (TRITON_INTERPRET=1)",
)


# ---------------------------------------------------------------------------------------------------
# counters


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_counter_counts_a_copy_kernel_exactly(dtype):
    n, block = 1000, 128  # 8 programs, the last one 104 lanes live: masked-off lanes must not count
    x = torch.randn(n).to(dtype)
    y = torch.empty_like(x)
    with TritonCounter() as counter:
        _copy_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    assert torch.equal(x, y)
    es = x.element_size()
    assert (counter.tally.read, counter.tally.written) == (n * es, n * es)
    assert counter.tally.bytes == 2 * n * es
    assert counter.tally.launches == 1
    assert dict(counter.tally.ops) == {"_copy_kernel": 1}


@needs_interpreter
def test_triton_counter_restores_the_interpreter_and_pauses_dispatch_counting():
    from triton.runtime import interpreter

    before = interpreter.InterpreterBuilder.create_masked_load, interpreter.GridExecutor.__call__
    x = torch.randn(300)
    y = torch.empty_like(x)
    with count_region(triton=True) as tally:
        _copy_kernel[(3,)](x, y, 300, BLOCK=128)
    # The interpreter copies every argument to the host and back around a launch: none of that is the
    # kernel's traffic, so exactly one launch and 2 x 300 x 4 bytes are counted.
    assert tally().as_dict()["launches"] == 1 and tally().bytes == 2 * 300 * 4
    assert (interpreter.InterpreterBuilder.create_masked_load, interpreter.GridExecutor.__call__) == before


def test_dispatch_counter_sees_eager_bn_lrelu_as_its_aten_ops():
    n, c, h, w = 8, 4, 5, 5
    x = torch.randn(n, c, h, w, requires_grad=True)
    weight, bias = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    with count_region() as fwd:
        z = reference.batch_norm_leaky_relu(x, weight, bias, rm, rv, True, 0.1, 1e-5, 0.2)
    dz = torch.randn_like(z)
    with count_region() as bwd:
        torch.autograd.grad(z, (x, weight, bias), dz)
    f, b = fwd(), bwd()
    assert dict(f.ops) == {"aten::native_batch_norm": 1, "aten::leaky_relu": 1}
    assert dict(b.ops) == {"aten::leaky_relu_backward": 1, "aten::native_batch_norm_backward": 1}
    assert (f.launches, b.launches) == (2, 2)
    big, vec = x.numel() * 4, c * 4
    # native_batch_norm: reads x, weight, bias, and updates running_mean/var in place (read + write);
    # writes y, save_mean, save_invstd. leaky_relu: reads y, writes z.
    assert f.read == big + 4 * vec + big
    assert f.written == 2 * vec + big + 2 * vec + big
    # leaky_relu_backward reads dz and y, writes dy; native_batch_norm_backward reads dy, x and the
    # per-channel tensors, writes dx, dweight, dbias: at least 6 full-size tensors in all.
    assert 6 * big <= b.bytes < 6 * big + 16 * vec


def test_dispatch_counter_charges_views_nothing_and_in_place_ops_a_read_and_a_write():
    x = torch.randn(64)
    with DispatchCounter() as counter:
        v = x.view(8, 8).t()
        x.add_(1.0)
        torch.empty(16)
        y = torch.empty(64)
        y.copy_(x)  # copy_ overwrites its destination without reading it
    del v
    t = counter.tally
    assert dict(t.ops) == {"aten::add_": 1, "aten::copy_": 1}
    assert t.read == 64 * 4 + 64 * 4  # add_ reads x; copy_ reads x
    assert t.written == 64 * 4 + 64 * 4


def test_tensor_bytes_counts_a_broadcast_once():
    assert tensor_bytes(torch.zeros(4, 1).expand(4, 1000)) == 4 * 4
    assert tensor_bytes(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30
    assert tensor_bytes(torch.zeros(0, 5)) == 0


def test_saved_counter_separates_the_inputs_from_new_activations():
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    weight, bias = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    with SavedCounter([x, weight, bias, rm, rv]) as saved:
        reference.batch_norm_leaky_relu(x, weight, bias, rm, rv, True, 0.1, 1e-5, 0.2)
    # Eager keeps y (the LeakyReLU input) and the per-channel mean / invstd beyond its inputs.
    assert saved.new_bytes == x.numel() * 4 + 2 * 4 * 4
    assert saved.bytes > saved.new_bytes


# ---------------------------------------------------------------------------------------------------
# bench/kernels.py: cases, CPU counting, GPU timing, report


def test_benches_take_the_eager_providers_from_kernels_reference():
    bn, bce, dloss = (_cases.provider_fn(op, "eager") for op in (BN, BCE, DLOSS))
    x = torch.randn(4, 3, 5, 5)
    w, b, rm, rv = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    want = reference.batch_norm_leaky_relu(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, 0.2)
    assert torch.equal(bn(x, w, b, rm, rv), want)
    logits = torch.randn(8)
    assert torch.equal(bce(logits), reference.bce_with_logits(logits, 1.0, "mean"))
    assert torch.equal(dloss(logits), reference.discriminator_loss(logits, 4)[0])


@pytest.mark.parametrize("argv, message", [
    (["--ops", "training_step", "--step-batches", "-4"], "argument --step-batches: must be at least 2, got -4"),
    (["--ops", "training_step", "--step-batches", "0"], "argument --step-batches: must be at least 2, got 0"),
    (["--step-batches", "1"], "argument --step-batches: must be at least 2, got 1"),
    (["--step-batches", "four"], "argument --step-batches: expected an integer, got 'four'"),
    (["--time-budget-s", "0"], "argument --time-budget-s: must be a positive number, got 0"),
    (["--time-budget-s", "nan"], "argument --time-budget-s: must be a positive number, got nan"),
    (["--ops", "bce_with_logits", "--step-batches", "8"], "--step-batches sizes the training_step count, which --ops"),
    (["--ops", "training_step", "--providers", "compile"], "--ops training_step: nothing to count: it runs with the"),
    (["--ops", "training_step", "--gpu-check"], "--ops training_step: nothing to count: the gpu-check preset counts"),
])
def test_kernels_refuses_bad_flags_before_running_anything(argv, message, capsys, tmp_path):
    km = load_bench_script("kernels")
    with pytest.raises(SystemExit) as e:
        km.main([*argv, "--no-compile-report", "--out", str(tmp_path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f": error: {message}" in last, last
    assert list(tmp_path.iterdir()) == []


def test_the_training_step_needs_the_batch_the_flag_asks_for():
    # the flag's lower bound is what the model needs: one image a batch fails inside BatchNorm, two count
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _counting.step_records(_cases.STEP_MIN_BATCH - 1, "eager", lambda msg: None)
    records, reason = _counting.step_records(_cases.STEP_MIN_BATCH, "eager", lambda msg: None)
    assert reason is None and {r["metric"] for r in records} == {"bytes", "launches", "step_model_us"}


def test_kernels_says_what_it_will_count_for_the_training_step():
    km = load_bench_script("kernels")
    parser, cpu = km.build_parser(), torch.device("cpu")
    step_only = km.plan_run(parser.parse_args(["--smoke", "--ops", "training_step"]), cpu)
    assert step_only.cases == [] and step_only.step_batches == (4,)
    assert step_only.describe() == "training_step at batch 4 x eager, triton on cpu (smoke preset)"
    eager = km.plan_run(parser.parse_args(["--smoke", "--ops", "training_step", "--providers", "eager",
                                           "--step-batches", "2", "8"]), cpu)
    assert eager.describe() == "training_step at batch 2, 8 x eager on cpu (smoke preset)"
    mixed = km.plan_run(parser.parse_args(["--smoke", "--ops", "bce_with_logits", "training_step"]),
                        torch.device("cuda"))
    assert mixed.step_batches == () and {c.op for c in mixed.cases} == {"bce_with_logits"}
    assert mixed.describe() == (f"{len(mixed.cases)} cases x eager, triton on cuda (smoke preset); no training_step: "
                                "it is counted on a CPU only (this run times on cuda)")
    full = km.plan_run(parser.parse_args([]), cpu)
    assert full.describe().startswith(f"{len(full.cases)} cases x eager, compile, triton + training_step at batch "
                                      "64, 256 x eager, triton + the static compile report on cpu (full preset)")


@pytest.mark.parametrize("script", ["kernels", "train"])
def test_bench_help_states_each_default_once_and_tells_output_from_out(script, capsys):
    module = load_bench_script(script)
    with pytest.raises(SystemExit):
        (module.main if script == "kernels" else module.parse_args)(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    assert not re.search(r"default:[^()]*\(default:", help_text), help_text
    assert "--output FILE.json write exactly FILE.json" in help_text
    assert "--out DIR without --output: the directory of a new dated" in help_text


def test_proxy_shapes_keep_the_launch_plan_and_the_spatial_extent():
    for shape in [(256, 64, 64, 64), (1024, 256, 16, 16), (128, 64, 14, 14), (256, 12544), (16384, 1024)]:
        case = _cases.Case(BN, shape, "fp32", "")
        proxy = _counting.proxy_case(case, 1 << 16)
        assert proxy is not None and proxy.numel <= 1 << 16, shape
        assert _plans.proxy_key(proxy) == _plans.proxy_key(case)
        assert proxy.shape[2:] == shape[2:]
        if len(shape) == 2:  # (N, C): per-channel costs only scale with C, so N is kept
            assert proxy.shape[0] == shape[0]
    big = _cases.Case(BCE, (1 << 20,), "fp32", "")
    assert _plans.proxy_key(_counting.proxy_case(big, 1 << 16)) == _plans.proxy_key(big)


def test_gpu_check_preset_has_every_provider_dtype_and_the_shapes_it_promises():
    preset = _cases.PRESETS["gpu-check"]
    cases = _cases.build_cases(preset)
    assert set(preset.providers) == set(_cases.PROVIDERS) and set(preset.dtypes) == {"fp32", "bf16"}
    labels = {c.label for c in cases if c.op == BN and c.dtype == "fp32"}
    assert {lab.split()[-1] for lab in labels if lab.startswith("G.")} == {"b64", "b256"}
    assert sum(c.label == "large" for c in cases if c.dtype == "fp32") == 2


def _stand_in_timer(fn):
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms, ms, ms]


@pytest.mark.parametrize("provider", ["eager", "triton"])
def test_gpu_timing_path_runs_with_a_stand_in_timer(provider):
    """The GPU code path (do_bench + copy bandwidth + records) on CPU tensors, timed by perf_counter:
    checks the plumbing, not the numbers. Triton runs here under the interpreter."""
    import kernels

    if provider == "triton" and not kernels.triton_can_run("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1")
    case = _cases.Case(BN, (4, 3, 5, 5), "fp32", "")
    recs = _timing.gpu_records(
        case, provider, torch.device("cpu"), _stand_in_timer, None, copy_gbps=10.0, launches=lambda fn: 2
    )
    metrics = {(r["mode"], r["metric"]) for r in recs}
    for mode in _cases.MODES:
        assert {(mode, "ms"), (mode, "gbps"), (mode, "pct_copy"), (mode, "launches")} <= metrics
    assert ("forward", "saved_new_bytes") in metrics
    assert all(RECORD_FIELDS <= r.keys() and r["source"] == "measured" for r in recs)
    pct = next(r for r in recs if r["metric"] == "pct_copy" and r["mode"] == "full")
    gbps = next(r for r in recs if r["metric"] == "gbps" and r["mode"] == "full")
    assert pct["value"] == pytest.approx(100 * gbps["value"] / 10.0)
    assert _timing.copy_bandwidth_gbps(_stand_in_timer, torch.device("cpu"), nbytes=1 << 20) > 0


def test_cuda_graph_timing_gets_the_backward_of_a_forward_on_its_own_stream(monkeypatch):
    """The graph timer captures on its stream and autograd runs a backward on its forward's stream, so the
    backward-only callable it captures comes from a factory that runs the forward where it is called."""
    forwards = []
    real = _timing.provider_fn
    monkeypatch.setattr(_timing, "provider_fn", lambda op, p: (lambda *a: forwards.append(1) or real(op, p)(*a)))
    case = _cases.Case(BN, (4, 3, 5, 5), "fp32", "")
    calls, factories, inp, _ = _timing.gpu_callables(case, "eager", torch.device("cpu"))
    before = len(forwards)
    backward = factories["backward"]()  # the timer calls this on its capture stream, before capturing
    assert len(forwards) == before + 1, "the factory must run a forward of its own"
    dx = backward()[0]
    backward()  # the retained graph replays
    torch.testing.assert_close(dx, calls["backward"]()[0])
    assert len(forwards) == before + 1
    graphed = []

    def graph_timer(make_fn):
        graphed.append(1)
        return _stand_in_timer(make_fn())

    recs = _timing.gpu_records(case, "eager", torch.device("cpu"), _stand_in_timer, graph_timer, copy_gbps=10.0,
                               launches=lambda fn: 2)
    graph = {r["mode"]: r for r in recs if r["metric"] == "ms_cudagraph"}
    assert set(graph) == set(_cases.MODES) and all(r["value"] is not None for r in graph.values())


def test_work_order_puts_triton_and_eager_at_the_dcgan_shapes_first_and_compile_last():
    cases = _cases.build_cases(_cases.PRESETS["quick"])
    order = _cases.work_order(cases, _cases.PROVIDERS)
    assert len(order) == len(cases) * len(_cases.PROVIDERS)
    ranks = [(p == "compile", not _cases.is_dcgan(c)) for c, p in order]
    assert ranks == sorted(ranks)
    first = [(c, p) for c, p in order if p != "compile" and _cases.is_dcgan(c)]
    assert {c.dtype for c, _ in first} == {"fp32", "bf16"} and {p for _, p in first} == {"eager", "triton"}
    assert order[: len(first)] == first and all(p == "compile" for _, p in order[-len(cases):])


def test_launch_check_compares_every_generator_layer_each_way():
    from kernel_bench import report as _report

    case = _cases.Case(BN, (4, 3, 5, 5), "fp32", "G.x b4")
    recs = [_cases.rec(case, mode, p, "launches", n, "count", "measured", "")
            for mode in ("forward", "backward") for p, n in (("eager", 2), ("triton", 2 if mode == "forward" else 3))]
    got = next(c for c in _report.checks(recs, [case]) if c["check"].startswith("triton launches"))
    assert not got["ok"] and got["compared"] == 2 and got["violations"] == ["G.x b4 [4, 3, 5, 5] fp32 backward: 3 > 2"]


def test_gpu_report_renders_timings_against_the_copy_bandwidth():
    from kernel_bench import report as _report

    case = _cases.Case(BCE, (64,), "fp32", "G loss")
    eager = _timing.gpu_records(case, "eager", torch.device("cpu"), _stand_in_timer, None, copy_gbps=10.0,
                                launches=lambda fn: 1)
    recs = eager + [{**r, "provider": "triton"} for r in eager]  # stands in for a timed Triton run
    result = {"machine": {"processor": "x", "cpu_count": 2, "gpu": "Fake GPU"}, "versions": {"torch": "t"},
              "git": {"commit": "abc", "dirty": False}, "device": "cuda", "preset": "smoke", "command": "c",
              "created": "now", "copy_gbps": 10.0, "records": recs, "checks": _report.checks(recs, [case]),
              "unavailable": [], "compile_report": []}
    md = _report.render_markdown(result, [case])
    assert "GPU: Fake GPU" in md and "copy bandwidth measured in this run: 10 GB/s" in md
    assert "| op | shape | dtype | mode | eager ms (p20–p80)" in md and "triton vs eager" in md


def _check_kernels_json(result: dict, expect_modelled: bool) -> None:
    assert result["records"], "no records"
    for r in result["records"]:
        missing = RECORD_FIELDS - r.keys()
        assert not missing, f"record lacks {missing}: {r}"
        assert r["op"] in ("batch_norm_leaky_relu", "bce_with_logits", "discriminator_loss", "training_step")
        assert r["mode"] in ("forward", "backward", "full") and r["provider"] in ("eager", "compile", "triton")
        assert r["source"] in ("measured", "modelled") and isinstance(r["shape"], list)
    assert {"machine", "versions", "git", "checks", "unavailable"} <= result.keys()
    assert result["git"]["commit"] and result["versions"]["torch"] and "driver" in result["versions"]
    metrics = {(r["provider"], r["metric"], r["source"]) for r in result["records"]}
    for provider in ("eager", "triton"):
        assert {
            (provider, "bytes", "measured"),
            (provider, "launches", "measured"),
            (provider, "saved_bytes", "measured"),
            (provider, "ms", "modelled"),
        } <= metrics
    if expect_modelled:
        assert ("triton", "bytes", "modelled") in metrics
    # the figures the issue asks to show: never more bytes than eager
    never_more = next(c for c in result["checks"] if c["check"].startswith("triton bytes <= eager"))
    assert never_more["ok"], never_more["violations"]
    launches = next(c for c in result["checks"] if c["check"].startswith("triton launches <= eager"))
    assert launches["ok"] and launches["compared"] > 0, launches
    step = {(r["provider"], r["metric"]): r["value"] for r in result["records"] if r["op"] == "training_step"}
    assert {("eager", "launches"), ("triton", "launches"), ("eager", "step_model_us")} <= step.keys()
    assert step[("triton", "launches")] < step[("eager", "launches")]


def _committed_results() -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted((REPO / "bench" / "results").glob("*.*")) if p.is_file()}


@pytest.mark.slow  # the whole CLI end to end, every op interpreted
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU counting path (a GPU machine times instead)")
def test_bench_kernels_smoke_writes_a_new_ignored_run_and_leaves_committed_results_alone(tmp_path):
    before = _committed_results()
    existing = set(_results.RUNS.glob("*")) if _results.RUNS.is_dir() else set()
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, "bench/kernels.py", "--smoke", "--wandb"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    new = sorted(set(_results.RUNS.glob("*")) - existing)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [p.suffix for p in new] == [".json", ".md"] and new[0].name.startswith("kernels-cpu-smoke-2"), new
        assert _committed_results() == before, "a bench run changed a committed result"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(new[0])], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{new[0]} is not git-ignored"
        assert list((tmp_path / "wandb").glob("offline-run-*")), "--wandb logged no run"
        result = json.loads(new[0].read_text())
        _check_kernels_json(result, expect_modelled=True)
        md = new[1].read_text()
        assert "| op | shape | dtype | mode |" in md and "modelled" in md
        assert "bytes eager" in proc.stdout and "launches triton" in proc.stdout and "whole training step" in md
        assert "cases x eager, triton + training_step at batch 4 x eager, triton on cpu (smoke preset)" in proc.stderr
        # eager BN+LReLU forward at the one directly counted shape is native_batch_norm + leaky_relu
        recs = [r for r in result["records"] if r["op"] == "batch_norm_leaky_relu" and r["provider"] == "eager"
                and r["metric"] == "launches" and r["mode"] == "forward"]
        assert recs and all(r["value"] == 2 for r in recs)
        proxy_checks = [c for c in result["checks"] if c["check"].startswith("proxy model")]
        assert proxy_checks and all(c["ok"] for c in proxy_checks), proxy_checks
    finally:
        for p in new:
            p.unlink()


# ---------------------------------------------------------------------------------------------------
# where results go


def test_results_go_to_a_new_dated_file_unless_a_path_is_named(tmp_path):
    import datetime

    now = datetime.datetime(2026, 11, 30, 12, 34, 56)
    first, md = _results.output_paths("kernels-cpu-quick", out_dir=tmp_path, now=now)
    assert first == tmp_path / "kernels-cpu-quick-20261130-123456.json" and md == first.with_suffix(".md")
    first.write_text("{}")
    second, _ = _results.output_paths("kernels-cpu-quick", out_dir=tmp_path, now=now)
    assert second != first and not second.exists()  # two runs in one second: never the same file
    named = tmp_path / "committed" / "kernels-cpu-quick.json"
    named.parent.mkdir()
    named.write_text("old")
    path = _results.write_result({"records": []}, "# md\n", "ignored-stem", output=named)
    assert path == named and json.loads(named.read_text()) == {"records": [], "complete": True}
    assert named.with_suffix(".md").read_text() == "# md\n"


def test_an_unwritable_result_path_is_refused_as_it_is_parsed_and_a_writable_one_is_left_untouched(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert _results.directory_problem(a_file) == f"{a_file} is not a directory"
    assert _results.directory_problem(Path("/proc/nope")) == \
        "/proc/nope does not exist and cannot be made in /proc (No such file or directory)"
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        _results.output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match=f"cannot write {a_file}/x.json: {a_file} is not a dir"):
        _results.output_file(str(a_file / "x.json"))
    # a directory still to be made is fine, and checking it makes nothing
    assert _results.output_file(str(tmp_path / "new" / "x.json")) == tmp_path / "new" / "x.json"
    assert _results.output_dir(str(tmp_path / "runs")) == tmp_path / "runs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


_WRITERS = {  # each bench script that writes results, with arguments that would otherwise start its run
    "kernels": ["--smoke", "--ops", "training_step", "--providers", "eager", "--no-compile-report"],
    "train": ["--smoke"], "quality": ["--steps", "1"], "default_run": [], "metric_scale": [],
    "recipe": ["--from-search", "x.json"], "recipe_report": ["x.json"], "data": ["--smoke"],
}


@pytest.mark.parametrize("script, flag", [(script, flag) for script in _WRITERS for flag in ("--output", "--out")
                                          if flag == "--output" or script not in ("recipe", "recipe_report")])
def test_every_bench_refuses_an_unwritable_output_before_it_runs(script, flag, tmp_path, capsys):
    module = load_bench_script(script)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as e:
        (module.parse_args if script == "train" else module.main)(
            [*_WRITERS[script], flag, str(a_file / ("x.json" if flag == "--output" else "dir"))])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f": error: argument {flag}: " in last and f"{a_file} is not a directory" in last


def test_the_default_writer_leaves_committed_results_alone_and_its_files_are_ignored():
    before = _committed_results()
    path = _results.write_result({"records": []}, "# md\n", "kernels-cpu-quick")
    try:
        assert path.parent == _results.RUNS and path.name.startswith("kernels-cpu-quick-")
        assert _committed_results() == before
        status = subprocess.run(["git", "status", "--porcelain", "--", "bench/results"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
        assert status == "", status
    finally:
        path.unlink()
        path.with_suffix(".md").unlink()


# ---------------------------------------------------------------------------------------------------
# bench/train.py

TRAIN_FIELDS = {"op", "config", "workers", "kernels", "precision", "metric", "value", "unit", "source", "method",
                "samples"}


def _plain_args(precision: str) -> argparse.Namespace:
    return argparse.Namespace(kernels="eager", precision=precision, threads=2, batch_size=8, warmup=1, steps=2,
                              seed=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plain_loop_runs_in_fp32_and_bf16(precision, capsys):
    bt = load_bench_script("train")
    threads = torch.get_num_threads()
    try:
        out = bt.plain_child(_plain_args(precision))
    finally:
        torch.set_num_threads(threads)
    assert out["images_per_s"] > 0 and math.isfinite(out["last_loss_d"]) and out["threads"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images_per_s"] == out["images_per_s"]


def test_plain_loop_uses_the_textbook_dropout_and_adam():
    from distgan.models import Dropout

    bt = load_bench_script("train")
    g, d, opt_g, opt_d, *_ = bt.plain_setup(_plain_args("fp32"), torch.device("cpu"))
    drops = [m for m in d.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2 and not any(isinstance(m, Dropout) for m in drops) and drops[0].p == 0.3
    assert [type(o) for o in (opt_g, opt_d)] == [torch.optim.Adam] * 2
    assert not any(o.defaults["fused"] for o in (opt_g, opt_d))  # distgan's optimizers are fused
    assert all(o.param_groups[0]["lr"] == 1e-3 for o in (opt_g, opt_d))


def test_plain_bf16_runs_the_forwards_under_autocast_and_the_losses_in_fp32():
    from distgan.config import TrainConfig
    from distgan.models import build_models
    from distgan.step import gan_step, make_optimizers, unwrap_ddp

    bt = load_bench_script("train")
    cfg = TrainConfig(batch_size=4, num_workers=1, kernels="eager")
    g, d = build_models(cfg)
    opt_g, opt_d = make_optimizers(g, d, cfg)
    seen = []
    d.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    wg, wd = (bt.Autocast(m, "cpu", torch.bfloat16) for m in (g, d))
    assert unwrap_ddp(wd) is wd  # the G phase keeps the autocast wrapper
    assert wg(torch.randn(2, cfg.z_dim)).dtype == torch.float32
    out = gan_step(wg, wd, opt_g, opt_d, [torch.randn(4, 1, 28, 28)], lambda n: torch.randn(n, cfg.z_dim),
                   impl="eager")
    assert seen == [torch.bfloat16] * 2  # both of D's forwards ran in bf16: the D phase and the G phase
    assert out["loss_d"].dtype == out["loss_g"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in g.parameters())


def _fake_runs() -> list[dict]:
    runs = []
    for rep, scale in enumerate((1.0, 1.1, 0.9)):
        for config, workers, precision, ips in [("plain", 1, "fp32", 100), ("plain", 1, "bf16", 80),
                                                ("ray", 2, "fp32", 150), ("ray", 2, "bf16", 120)]:
            runs.append({"config": config, "workers": workers, "kernels": "eager", "precision": precision,
                         "repeat": rep, "loadavg": 1.0, "images_per_s": ips * scale, "first_step_s": 5.0})
    return runs


def test_train_summary_carries_precision_and_the_two_ratios():
    bt = load_bench_script("train")
    preset = bt.PRESETS["smoke"]
    records, rows = bt.summarise(_fake_runs(), preset)
    assert all(TRAIN_FIELDS <= r.keys() for r in records)
    by = {(r["config"], r["precision"], r["metric"]): r["value"] for r in records}
    assert by[("ray", "bf16", "ratio_vs_fp32")] == pytest.approx(120 / 150)
    assert by[("ray", "fp32", "ratio_vs_plain")] == pytest.approx(150 / 100)
    assert by[("plain", "bf16", "ratio_vs_fp32")] == pytest.approx(0.8)
    head = bt.headline(rows, "fp32")["eager"]
    assert head["distgan_bf16_over_fp32"] == pytest.approx(0.8)
    assert head["distgan_default_over_plain_fp32"] == pytest.approx(1.5)
    result = {"machine": {"processor": "x", "cpu_count": 2, "gpu": None}, "preset_values": dataclasses.asdict(preset),
              "versions": {"torch": "t"}, "git": {"commit": "abc", "dirty": False}, "preset": "smoke",
              "command": "c", "created": "now", "plain_threads": 2, "runs": _fake_runs(), "rows": rows,
              "unavailable": [{"config": "ray", "workers": 2, "kernels": "triton", "precision": "bf16",
                               "reason": "n/a on CPU"}], "headline": {"eager": head}}
    md = bt.render_markdown(result)
    assert "| precision |" in md and "bf16 / fp32" in md and "0.800×" in md
    assert "bf16 / fp32 = **0.800×**" in md and "default precision (fp32) / plain fp32 loop = **1.500×**" in md
    result["processor"] = "AMD EPYC (family 26, model 2)"
    result["precision_probe"] = {"auto_precision": "bf16", "auto_reason": "auto: measured", "per_worker_batch": 32,
                                 "threads": 1, "interleaved": {"rounds": 4, "seconds_per_candidate": 4.0,
                                                               "images_per_s": {"fp32": 100.0, "bf16": 150.0},
                                                               "bf16_over_fp32": 1.5,
                                                               "bf16_over_fp32_rounds": [1.4, 1.5, 1.5, 1.7]}}
    md = bt.render_markdown(result)
    assert "- machine: AMD EPYC (family 26, model 2), 2 CPUs" in md
    assert "`--precision auto` here picks **bf16** (auto: measured)" in md
    assert "bf16 / fp32 = **1.50×** (median of the per-round ratios; noise: the rounds span 1.40–1.70×)" in md


def test_train_plans_interleave_precisions_and_pass_them_to_distgan(tmp_path):
    bt = load_bench_script("train")
    args = bt.parse_args(["--smoke"])
    specs = bt.plan_specs(args, [2], ["eager"])
    assert [(s.config, s.precision) for s in specs] == [("plain", "fp32"), ("ray", "fp32"), ("plain", "bf16"),
                                                       ("ray", "bf16")]
    cmd = bt.ray_command(bt.PRESETS["smoke"], specs[-1], tmp_path, "n")
    assert cmd[cmd.index("--precision") + 1] == "bf16" and cmd[cmd.index("--num-workers") + 1] == "2"
    from distgan.config import TrainConfig

    assert "precision" in {f for f in TrainConfig.__dataclass_fields__}  # the flag distgan.train accepts


def test_train_throughput_comes_from_the_steady_state_step_stamps(tmp_path):
    bt = load_bench_script("train")
    preset = bt.PRESETS["smoke"]  # 2 warm-up steps, 3 measured, batch 16
    rows = [{"kind": "start", "time": 101.0}]
    rows += [{"kind": "step", "step": s, "time": 100.0 + 2 * s} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = bt.throughput_from_metrics(tmp_path / "metrics.jsonl", preset, t_submit=90.0)
    assert got["images_per_s"] == pytest.approx(3 * 16 / 6.0)
    assert got["first_step_s"] == pytest.approx(12.0) and got["worker_start_s"] == pytest.approx(11.0)


@pytest.mark.slow
def test_bench_train_smoke_measures_plain_and_distgan_in_fp32_and_bf16(ray_cluster, tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run(  # joins the tests' cluster: a Ray start per run would double the time
        # the other test processes share the machine: the figures are noisy, and the file says so
        [sys.executable, "bench/train.py", "--smoke", "--join-cluster", "--allow-busy", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False, env=ray_cluster.client_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    got = {(r["config"], r["precision"], r["metric"]) for r in result["records"]}
    for precision in ("fp32", "bf16"):
        assert {("plain", precision, "images_per_s"), ("ray", precision, "images_per_s")} <= got
    assert ("ray", "bf16", "ratio_vs_fp32") in got and ("ray", "fp32", "ratio_vs_plain") in got
    assert result["git"]["commit"] and result["versions"]["torch"]
    assert "images/s (median)" in proc.stdout and "bf16 / fp32" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# bench/gpu_check.sh


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs for minutes")
def test_gpu_check_says_there_is_no_gpu_and_exits_0_quickly():
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no NVIDIA GPU" in proc.stdout
    assert time.perf_counter() - t0 < 60


def test_gpu_report_combines_stages_and_records_and_fails_on_a_failed_stage(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "stages.tsv").write_text("versions\tPASS\t0\t3\t60\texit 0\nfaults\tFAIL\t1\t40\t120\texit 1\n")
    (logs / "provenance.json").write_text(json.dumps({"machine": {"gpu": "G"}, "git": {"commit": "c", "dirty": False},
                                                     "versions": {"gpu": "G", "torch": "t"}}))
    rec = {"op": "bce_with_logits", "shape": [64], "dtype": "fp32", "mode": "full", "metric": "ms", "unit": "ms",
           "source": "measured", "method": "m"}
    kern = {"copy_gbps": 4000.0, "checks": [], "unavailable": [],
            "records": [{**rec, "provider": "eager", "value": 2.0}, {**rec, "provider": "triton", "value": 1.0}]}
    (logs / "kernels.json").write_text(json.dumps(kern))
    (logs / "kernels.md").write_text("# Kernel benchmark\n\ntable\n")
    rc = _gpu_report.main(["--logs", str(logs), "--json", str(tmp_path / "g.json"), "--md", str(tmp_path / "g.md"),
                           "--final"])
    assert rc == 1
    result = json.loads((tmp_path / "g.json").read_text())
    assert [s["status"] for s in result["stages"]] == ["PASS", "FAIL"]
    assert {r["bench"] for r in result["records"]} == {"kernels"} and result["git"]["commit"] == "c"
    shown = capsys.readouterr().out
    assert "FAIL  faults" in shown and "triton vs eager, fp32, forward+backward: 2.00x" in shown
    md = (tmp_path / "g.md").read_text()
    assert "| faults | FAIL |" in md and "## Kernel benchmark" in md


@pytest.mark.parametrize("before, during, busy", [
    (0.1, [1.9, 2.2], None),                           # the benchmark's own runs keep both CPUs busy: quiet
    (1.3, [1.9], "load average 1.30 before the first run on 2 CPUs (above 0.50)"),
    (0.2, [2.0, 3.6], "load average up to 3.60 during the runs on 2 CPUs (above 3.00)"),
    (None, [None], None),                              # no load average on this platform
])
def test_a_busy_machine_is_named_and_its_comparison_written_only_when_allowed(before, during, busy, capsys):
    from _results import busy_banner, busy_reason, refuse_busy

    reason = busy_reason(before, during, 2)
    assert (reason is None) if busy is None else (busy in reason)
    assert refuse_busy(reason, allowed=False, what="bench/x.py") == (busy is not None)
    assert not refuse_busy(reason, allowed=True, what="bench/x.py")
    if busy:
        assert "not written: the machine was busy" in capsys.readouterr().err
        assert busy_banner(reason)[0].startswith("> **Measured on a busy machine**")
    else:
        assert busy_banner(reason) == []


def test_kernels_starts_no_case_past_its_budget_nor_a_compile_case_without_time_to_compile(monkeypatch):
    km = load_bench_script("kernels")
    plan = km.plan_run(km.build_parser().parse_args(["--smoke"]), torch.device("cpu"))
    case = plan.cases[0]
    clock = {"t": 0.0}
    monkeypatch.setattr(km.time, "perf_counter", lambda: clock["t"])

    def measure_case(case, provider, *args):  # each case takes 20 s of the clock
        clock["t"] += 20.0
        return [{"provider": provider}], []

    monkeypatch.setattr(km, "measure_case", measure_case)
    monkeypatch.setattr(km, "work_order", lambda cases, providers: [(case, "triton"), (case, "eager"),
                                                                     (case, "compile"), (case, "triton"),
                                                                     (case, "eager")])
    saved = []
    records, missing, _ = km.measure([case], plan.preset, "smoke", torch.device("cpu"), budget_s=50.0,
                                     save=lambda r, m, g: saved.append(len(r)))
    # at 40 s, 10 s are left: not enough to compile, enough to start a case that needs no compile
    assert [r["provider"] for r in records] == ["triton", "eager", "triton"] and saved == [1, 2, 3]
    assert missing[0]["provider"] == "compile" and missing[0]["reason"].startswith(
        "not started: a torch.compile case needs about 45 s to compile, 10 s of the time budget were left")
    assert missing[1]["reason"] == "not run: the time budget of 50 s was spent"


def test_a_partial_result_is_marked_incomplete_and_the_last_write_complete(tmp_path):
    from _results import write_partial, write_result

    out = tmp_path / "k.json"
    write_partial({"records": [1]}, out)
    assert json.loads(out.read_text()) == {"records": [1], "complete": False}
    write_partial({"records": [1]}, None)  # no --output: nothing written anywhere
    write_result({"records": [1, 2]}, "# md\n", "k", out)
    assert json.loads(out.read_text()) == {"records": [1, 2], "complete": True}


def test_train_starts_no_run_without_the_time_it_needs_and_saves_after_each(monkeypatch):
    tm = load_bench_script("train")
    clock = {"t": 1000.0}
    monkeypatch.setattr(tm.time, "time", lambda: clock["t"])
    started = []

    def run_one(spec, preset, rep, storage, threads, timeout):
        started.append((spec.config, timeout))
        clock["t"] += 30.0
        return {"images_per_s": 1.0, "first_step_s": 1.0, "loadavg": 0.0}

    monkeypatch.setattr(tm, "run_one", run_one)
    specs = [tm.Spec("plain", 1, "eager", "bf16"), tm.Spec("ray", 1, "eager", "bf16"),
             tm.Spec("plain", 1, "eager", "fp32")]
    saves = []
    runs, failed, skipped = tm.run_all(specs, tm.PRESETS["smoke"], 1, budget_s=70.0,
                                       save=lambda r, f, s: saves.append(len(r)))
    # 70 s: the plain run (20 s needed) starts with 70 left; distgan's (45 s needed) with 40 left does not; the
    # second plain run starts with 40 left and may take all 40, not more
    assert started == [("plain", 70.0), ("plain", 40.0)] and saves == [1, 2]
    assert skipped == [specs[1]] and not failed


# bench/recipe.py


def test_every_recipe_is_a_valid_config_that_changes_the_seed_recipe():
    from distgan.config import TrainConfig

    br = load_bench_script("recipe")
    for name, overrides in br.RECIPES.items():
        cfg = TrainConfig(**{**br.SEED_RECIPE, **overrides}).validate()
        changed = {k for k, v in overrides.items() if br.SEED_RECIPE.get(k, getattr(TrainConfig(), k)) != v}
        assert changed or name == "seed-bf16", name  # seed-bf16 is the seed's recipe under the default precision
        assert all(getattr(cfg, k) == v for k, v in overrides.items()), name


def test_recipe_results_are_committed_and_plot(tmp_path):
    br = load_bench_script("recipe")
    files = sorted((REPO / "bench" / "results").glob("recipe-*.json"))
    assert {"recipe-sweep", "recipe-decay", "recipe-long", "recipe-beta2-batch128"} <= {f.name.split("_")[0]
                                                                                       for f in files}
    for f in files:
        for rec in json.loads(f.read_text())["records"]:
            assert rec["best"]["fid"] == min(p["fid"] for p in rec["points"]), (f.name, rec["recipe"])
    copies = [tmp_path / f.name for f in files]
    for src, dst in zip(files, copies):
        dst.write_text(src.read_text())
    assert br.main(["--plot", *map(str, copies)]) == 0
    assert copies[0].with_suffix(".png").stat().st_size > 10_000


def test_recipe_sweep_is_a_fifo_tune_search_of_named_recipes_over_the_seed_recipe(tmp_path):
    from distgan import tune

    br = load_bench_script("recipe")
    argv = br.search_argv(["seed", "lr6e-4"], [0, 1], 40, 4, str(tmp_path), "sweep", tmp_path / "space.yaml")
    args, cfg, space, recipes = tune.parse(argv)
    assert args.scheduler == "fifo" and space == {"seed": ("grid", [0, 1])}
    assert recipes == {"seed": br.RECIPES["seed"], "lr6e-4": br.RECIPES["lr6e-4"]}
    assert (cfg.lr_g, cfg.lr_decay_start, cfg.epochs, cfg.eval_every, cfg.checkpoint_every) == (2e-4, 1.0, 40, 4, 4)


def test_a_search_becomes_recipe_records():
    br = load_bench_script("recipe")
    points = [{"step": 248, "seconds": 30.0, "fid": 40.0, "kid": 3.0, "classifier_score": 3.0, "coverage": 0.9},
              {"step": 496, "seconds": 60.0, "fid": 30.0, "kid": 2.0, "classifier_score": 3.5, "coverage": 0.95}]
    search = {"base": {"seed": 0, "epochs": 8}, "trials": [
        {"params": {"recipes": "lr6e-4", "seed": 1}, "overrides": {"lr_g": 6e-4, "lr_d": 6e-4, "seed": 1},
         "precision": "bf16", "seconds": 61.0, "status": "complete", "points": points},
        {"params": {"augment": "ada"}, "overrides": {"augment": "ada"}, "precision": "fp32", "seconds": 9.0,
         "status": "stopped at step 248", "points": points[:1]},
        {"params": {"augment": "off"}, "overrides": {"augment": "off"}, "precision": None, "seconds": None,
         "status": "error: RuntimeError: x", "points": []}]}
    named, ada = br.records_from_search(search)
    assert (named["recipe"], named["seed"], named["overrides"], named["best"]) == \
        ("lr6e-4", 1, {"lr_g": 6e-4, "lr_d": 6e-4}, points[1])
    assert (ada["recipe"], ada["seed"], ada["epochs"], ada["best"], ada["status"]) == \
        ("augment=ada", 0, 8, points[0], "stopped at step 248")
    # a search over a seed alone is its base; with a schedule in the base (a PBT winner's replay), that schedule
    seeds = {"base": {"seed": 0, "epochs": 8}, "trials": [
        {"params": {"seed": 2}, "overrides": {"seed": 2}, "precision": "bf16", "seconds": 61.0, "status": "complete",
         "points": points}]}
    assert br.records_from_search(seeds)[0]["recipe"] == "base"
    seeds["base"]["schedule"] = '[{"step": 0, "lr_g": 0.001}, {"step": 496, "lr_g": 0.0012}]'
    assert br.records_from_search(seeds)[0]["recipe"] == "replayed schedule"


# bench/default_run.py and bench/recipe_report.py: the generators of committed results files


def test_default_run_summary_reads_startup_throughput_and_evaluations_from_the_rows():
    dr = load_bench_script("default_run")
    rows = [{"kind": "start", "time": 100.0},
            {"kind": "step", "step": 10, "time": 125.0, "images_per_s": 50.0},  # the warm-up window: left out
            {"kind": "step", "step": 20, "time": 127.0, "images_per_s": 400.0},
            {"kind": "step", "step": 30, "time": 129.0, "images_per_s": 440.0},
            {"kind": "step", "step": 40, "time": 131.0, "images_per_s": 420.0},
            {"kind": "eval", "step": 40, "epoch": 1, "fid": 27.1, "kid": 1.2, "classifier_score": 2.5,
             "coverage": 0.9},
            {"kind": "eval", "step": 40, "epoch": 1},  # a grid without metrics (evaluation off)
            {"kind": "finish", "time": 140.0}]
    s = dr.summarise(rows, started=90.0, ended=151.0)
    assert s == {"wall_s": 61.0, "startup_s": 35.0, "steps": 40, "median_images_per_s": 420.0,
                 "evaluations": [{"step": 40, "epoch": 1, "fid": 27.1, "kid": 1.2, "classifier_score": 2.5,
                                  "coverage": 0.9}]}
    with pytest.raises(ValueError, match="no step"):
        dr.summarise(rows[:1], 0.0, 1.0)
    result = {"command": "python bench/default_run.py", "train_command": "python -m distgan.train",
              "created": "now", "machine": {"processor": "AMD EPYC", "cpu_count": 2, "gpu": None, "loadavg": [0.5]},
              "versions": {"torch": "2"}, "git": {"commit": "abc", "dirty": False},
              "start_line": "distgan: 2 worker(s) on cpu", "summary": s}
    md = dr.markdown(result)
    assert "| 1 min 01 s | 35.0 s | 40 | 420.0 |" in md and "| 40 | 1 | 27.1 | 1.2 | 2.5 | 0.9 |" in md
    assert "AMD EPYC, 2 CPUs" in md and "git: abc" in md


def test_recipe_report_tabulates_every_committed_recipe_record():
    rr = load_bench_script("recipe_report")
    files = sorted((REPO / "bench" / "results").glob("recipe-*.json"))
    text = rr.table(files)
    records = [r for f in files for r in json.loads(f.read_text())["records"]]
    assert text.count("\n| ") - text.count("\n| ↳") - len(files) == len(records)  # one header row a file
    for r in records:
        assert f"| {r['recipe']} | {r['seed']} |" in text and f"{r['best']['fid']:.1f} ({r['best']['step']})" in text


# ---------------------------------------------------------------------------------------------------
# bench/data.py


def test_data_summary_compares_each_source_with_the_embedded_digits_at_its_size():
    bd = load_bench_script("data")
    runs = [{"size": 64, "source": s, "images_per_s": v, "first_step_s": f}
            for s, v, f in [("embedded", 300.0, 5.0), ("embedded", 310.0, 5.5), ("folder", 170.0, 9.0),
                            ("prepared", 305.0, 5.25), ("prepared", 295.0, 5.75)]]
    rows = {r["source"]: r for r in bd.summarise(runs)}
    assert rows["embedded"]["vs_embedded"] == 1.0 and rows["folder"]["vs_embedded"] == round(170 / 305, 3)
    assert rows["prepared"] == {"size": 64, "source": "prepared", "runs": 2, "images_per_s": 300.0, "min": 295.0,
                                "max": 305.0, "vs_embedded": round(300 / 305, 3), "first_step_s": 5.5,
                                "first_step_minus_embedded_s": 0.25, "other_load_max": 0.0}


def test_data_bench_trains_each_source_through_distgan_local_with_the_same_flags(tmp_path):
    bd = load_bench_script("data")
    preset = bd.PRESETS["smoke"]
    commands = {s: bd.train_command(preset, 64, s, tmp_path / s, tmp_path, "n", "auto", 3) for s in bd.SOURCES}
    assert commands["embedded"][2:5] == ["distgan.local", "--dataset", "mnist5k"]
    assert commands["folder"][3:7] == ["--dataset", "folder", "--data-root", str(tmp_path / "folder")]
    assert commands["prepared"][3:7] == ["--dataset", "prepared", "--data-root", str(tmp_path / "prepared")]
    assert commands["embedded"][5:] == commands["folder"][7:] == commands["prepared"][7:]


def test_data_throughput_leaves_out_the_intervals_that_end_an_epoch(tmp_path):
    bd = load_bench_script("data")
    # steps 1-8 a second apart; the end of epoch 0 (after step 3: its grid, the loaders' restart) costs 5 s more
    rows = [{"kind": "step", "step": s, "time": 100.0 + s + 5 * (s >= 4), "epoch": int(s >= 4)} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    preset = bd.Preset(warmup=2, steps=5, repeats=1, batch_size=10, images=1, copies=1)
    assert bd.steady_throughput(tmp_path / "metrics.jsonl", preset, 99.5) == {"images_per_s": 10.0,
                                                                             "first_step_s": 1.5}
