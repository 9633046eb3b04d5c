"""kernels.registry: the one list of ops that set_impl, the compile report and the kernel benchmark loop over.

A third op, defined in this file and registered for the length of each test (an op's own file and its registry
entry, nothing else), is switched by set_impl, recorded and compiled by the compile report, and cased, counted and
reported by bench/kernels.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from torch import nn

import kernels
from kernels import registry
from kernels._limits import LimitsSource

from support import load_bench_script

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # the repository first: bench/kernels.py would shadow `kernels`

# ---------------------------------------------------------------------------------------------------
# The op: y = alpha * x. Its file would be kernels/scale.py; here it is this module.


@triton.jit
def _scale_fwd_kernel(X, Y, M, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (alpha * x).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _scale_bwd_kernel(GRAD, DX, M, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    g = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (alpha * g).to(DX.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class ScaleLimits:
    block: int

    @classmethod
    def gpu(cls, sms: int) -> ScaleLimits:
        return cls(block=1024)

    @classmethod
    def cpu(cls) -> ScaleLimits:
        return cls(block=128)


LIMITS = LimitsSource("scale_limits", ScaleLimits.gpu, ScaleLimits.cpu)


def _launch(kernel, src, out, alpha, limits):
    block = (limits or LIMITS.for_device(src.device)).block
    kernel[(triton.cdiv(src.numel(), block),)](src, out, src.numel(), alpha, BLOCK=block)
    return out


class ScaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return _launch(_scale_fwd_kernel, x.contiguous(), torch.empty_like(x), alpha, None)

    @staticmethod
    def backward(ctx, g):
        return _launch(_scale_bwd_kernel, g.contiguous(), torch.empty_like(g), ctx.alpha, None), None


class Scale(nn.Module):
    def __init__(self, alpha: float = 2.0, impl: str = "auto"):
        super().__init__()
        self.alpha, self.impl = alpha, impl

    def forward(self, x):
        if kernels.resolve_impl(self.impl, x.device, x.dtype) == "triton":
            return ScaleFunction.apply(x, self.alpha)
        return self.alpha * x


def launch_example(shape, dtype, variant, limits):
    x = torch.empty(shape, dtype=dtype)
    _launch(_scale_fwd_kernel, x, torch.empty_like(x), 2.0, limits)
    _launch(_scale_bwd_kernel, torch.empty_like(x), torch.empty_like(x), 2.0, limits)


def proxy_key(shape, limits):
    return ()  # one launch each way whatever the size: every smaller shape scales


def _inputs(shape, dtype, device, gen):
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    return {"args": (x,), "diff": (x,)}


# Its registry entry.
SCALE = registry.Op(
    name="scale",
    module=__name__,
    modules=(Scale,),
    compile_cases=(registry.CompileCase("scale (4096,)", (4096,), torch.float32, "train"),),
    bench=registry.Bench(inputs=_inputs, eager=lambda x: 2.0 * x, triton=lambda x: ScaleFunction.apply(x, 2.0),
                         traffic=(2, 2, 4), shapes={"smoke": (((256,), ""),)}),
)


@pytest.fixture
def scale_registered():
    with registry.registered(SCALE):
        yield SCALE


# ---------------------------------------------------------------------------------------------------
# The list itself


def test_the_registry_lists_the_ops_and_refuses_a_second_op_of_a_name():
    names = [op.name for op in registry.ops()]
    assert names[:3] == ["batch_norm_leaky_relu", "bce_with_logits", "discriminator_loss"]
    assert all(callable(getattr(kernels, name)) for name in names[:3])
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.BCE_WITH_LOGITS)
    with pytest.raises(KeyError, match="no op 'scale'"):
        registry.get("scale")
    with registry.registered(SCALE):
        assert registry.get("scale") is SCALE and registry.ops()[-1] is SCALE
    assert [op.name for op in registry.ops()] == names


def test_set_impl_switches_the_modules_of_every_registered_op(scale_registered):
    model = nn.Sequential(nn.Linear(2, 3), kernels.BatchNormLeakyReLU1d(3, impl="triton"), Scale(impl="triton"))
    kernels.set_impl(model, "eager")
    assert model[1].impl == "eager" and model[2].impl == "eager"
    x = torch.randn(8, 5)
    torch.testing.assert_close(Scale(impl="triton")(x), 2 * x)


def test_set_impl_leaves_an_unregistered_module_alone():
    model = nn.Sequential(kernels.BatchNormLeakyReLU1d(3, impl="triton"), Scale(impl="triton"))
    kernels.set_impl(model, "eager")
    assert (model[0].impl, model[1].impl) == ("eager", "triton")


# ---------------------------------------------------------------------------------------------------
# The compile report


def test_the_compile_report_records_every_registered_op(scale_registered):
    import compile_report

    assert [name for _, name in SCALE.jit_kernels()] == ["_scale_bwd_kernel", "_scale_fwd_kernel"]
    recorded = compile_report.record_launches()
    kernel_names = {fn.__name__ for _, fn, _, _, _ in recorded}
    assert {"_scale_fwd_kernel", "_scale_bwd_kernel", "_bce_fwd_kernel", "_bnlr_fwd_fused_kernel"} <= kernel_names
    ours = [(label, grid, kwargs) for label, fn, grid, _, kwargs in recorded if fn.__name__.startswith("_scale")]
    assert ours == [("scale (4096,)", (4,), {"BLOCK": 1024})] * 2  # planned for a GPU (LIMITS.gpu), not this CPU


def test_the_compile_report_compiles_a_registered_op_for_sm90():
    script = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'bench')!r}, {str(Path(__file__).parent)!r}]\n"
        "import compile_report\n"
        "from kernels import registry\n"
        f"op = __import__({__name__!r}).SCALE\n"
        "with registry.registered(op):\n"
        "    print(json.dumps(compile_report.compile_report((90,), [registry.get('scale')])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(r["kernel"] for r in rows) == ["_scale_bwd_kernel", "_scale_fwd_kernel"]
    for r in rows:
        assert r["arch"] == 90 and r["case"] == "scale (4096,)" and 0 < r["regs"] <= 255
        assert r["stack"] == r["local"] == 0 and r["streams"] and r["aligned"] and r["v4_loads"] > 0, r


# ---------------------------------------------------------------------------------------------------
# The kernel benchmark


def test_the_benchmark_cases_a_registered_op_and_counts_it(scale_registered, tmp_path):
    from kernel_bench import cases, counting, plans

    smoke = cases.PRESETS["smoke"]
    ours = [c for c in cases.build_cases(smoke) if c.op == "scale"]
    assert [(c.shape, c.dtype) for c in ours] == [((256,), "fp32"), ((256,), "bf16")]
    assert plans.proxy_key(ours[0]) == ()
    records, reason = counting.cpu_records(ours[0], "triton", smoke, lambda msg: None)
    assert reason is None
    got = {(r["mode"], r["metric"]): r["value"] for r in records}
    assert got[("forward", "launches")] == got[("backward", "launches")] == 1
    assert got[("forward", "bytes")] == got[("backward", "bytes")] == 2 * 256 * 4  # read and write, fp32

    km = load_bench_script("kernels")
    out = tmp_path / "scale.json"
    assert km.main(["--smoke", "--ops", "scale", "--no-compile-report", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["op"] for r in result["records"]} == {"scale"} and not result["unavailable"]
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    assert "| scale | 256 | fp32 | forward |" in out.with_suffix(".md").read_text()


def test_an_unregistered_op_is_not_benchmarked():
    from kernel_bench import cases

    assert all(c.op != "scale" for c in cases.build_cases(cases.PRESETS["smoke"]))
