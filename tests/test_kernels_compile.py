"""Static GPU soundness without a GPU: every kernel, at the block sizes the launchers choose for
representative DCGAN shapes, compiles for sm_80 and sm_90; no spills (STACK 0, LOCAL 0 in the cubin);
128-bit global loads where pointers and rows are 16-byte aligned.

conftest sets TRITON_INTERPRET=1 (interpreted kernels cannot be compiled), so the report
(bench/compile_report.py, over every op of kernels.registry) runs in a subprocess with it removed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "bench/compile_report.py", "--arch", "90", "80", "--json", str(out)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def _all_kernels():
    from kernels import registry

    per_op = {op.name: [name for _, name in op.jit_kernels()] for op in registry.ops()}
    assert all(per_op.values()) and len(per_op["batch_norm_leaky_relu"]) == 10, per_op  # the kernels are found
    return {name for names in per_op.values() for name in names}


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    for arch in (80, 90):
        compiled = {r["kernel"] for r in report if r["arch"] == arch}
        assert compiled == _all_kernels(), f"sm_{arch}: missing {_all_kernels() - compiled}"


def test_no_register_spills(report):
    spilled = [
        (r["kernel"], r["case"], r["arch"], r["stack"], r["local"])
        for r in report
        if r["stack"] or r["local"]
    ]
    assert not spilled, f"STACK/LOCAL bytes (spills) in: {spilled}"
    assert all(0 < r["regs"] <= 255 for r in report)


def test_contiguous_paths_use_128_bit_loads(report):
    aligned = [r for r in report if r["streams"] and r["aligned"]]
    assert {r["kernel"] for r in aligned} == {k for k in _all_kernels() if "finalize" not in k}
    scalar = [(r["kernel"], r["case"], r["arch"]) for r in aligned if r["v4_loads"] == 0]
    assert not scalar, f"no ld.global.v4 despite 16-byte aligned rows: {scalar}"


def test_bf16_and_both_layouts_are_covered(report):
    cases = {r["case"] for r in report}
    assert any("bf16" in c for c in cases) and any("channels_last" in c for c in cases)
    assert any(r["dtype"] == "bf16" and r["v4_loads"] for r in report)


def test_shared_memory_is_what_triton_launches_with(report):
    # Cross-warp reductions need scratch: Triton's metadata gives the dynamic amount (the cubin's static
    # figure does not include it). Every amount fits the smaller of the two architectures' per-block limits.
    assert any(r["shared"] > 0 for r in report)
    assert all(0 <= r["shared"] <= 163 * 1024 for r in report)


def test_the_largest_fused_tiles_are_compiled(report):
    big = {(r["kernel"], r["case"]) for r in report if r["num_warps"] == 16}
    for kernel in ("_bnlr_fwd_fused_kernel", "_bnlr_bwd_fused_kernel"):
        assert (kernel, "G.bn2 (64,64,14,14)") in big and (kernel, "G.bn1 (128,128,7,7)") in big
