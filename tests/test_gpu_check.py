"""bench/gpu_check.sh's CPU mode, dry run and pre-flight (bench/_preflight.py), and bench/make_gpu_bundle.sh's dry
run: what can be shown without a GPU or a network."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, hiding_modules_env


def _preflight_module():
    spec = importlib.util.spec_from_file_location("gpu_preflight", REPO / "bench" / "_preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preflight = _preflight_module()
CPU_ONLY = shutil.which("nvidia-smi") is None and not any(p.startswith("nvidia") for p in os.listdir("/dev"))


def _bash(script: str, *args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("cuda,driver,problem", [
    ("12.8", "520.61.05", "older than 525"),
    ("12.8", "525.60.13", None),
    ("13.0", "575.57.08", "older than 580"),
    ("13.0", "580.95.05", None),
    ("11.8", "450.80.01", "older than 450.80.2"),
    ("12.8", None, "no NVIDIA driver"),
    (None, "580.95.05", "CPU-only build"),
])
def test_the_driver_must_be_one_the_torch_build_runs_on(cuda, driver, problem):
    got = preflight.driver_problem(cuda, driver)
    assert (got is None) if problem is None else (problem in got and ("older" not in problem or driver in got))


def test_triton_launcher_needs_a_c_compiler(monkeypatch):
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    problems = preflight.launcher_problems(environ={})
    assert any("no C compiler" in p for p in problems)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    assert not any("C compiler" in p for p in preflight.launcher_problems(environ={}))


@pytest.mark.skipif(not CPU_ONLY, reason="shows the CPU mode; this machine has an NVIDIA device")
def test_cpu_mode_exits_0_saying_there_is_no_gpu_and_the_dry_run_lists_stages_budgets_and_preflight(tmp_path):
    proc = _bash("gpu_check.sh")
    assert proc.returncode == 0 and "no NVIDIA GPU on this machine" in proc.stdout, proc.stdout + proc.stderr
    proc = _bash("gpu_check.sh", "--dry-run", env={**os.environ, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("preflight: ") and "no NVIDIA driver" in line for line in lines), proc.stdout
    listed = [line.split()[:4] for line in lines if line.startswith("  ")]
    assert listed == [[name, "limit", limit, "s"] for name, limit in
                      [("versions", "60"), ("pytest", "150"), ("kernels", "150"), ("faults", "120"), ("train", "150")]]
    assert "overall budget 470 s" in proc.stdout and "would exit 0 here" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_on_a_gpu_machine_a_missing_module_fails_the_preflight_before_any_stage(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # a driver new enough for any torch build: the module is what fails
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 580.95.05\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    env = hiding_modules_env(tmp_path, "pyarrow")
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", OUT=str(tmp_path / "out"))
    proc = _bash("gpu_check.sh", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("preflight: "))
    assert line.startswith("preflight: FAIL: missing modules: pyarrow,"), line
    assert "ray.train (needs pyarrow)" in line and "distgan.loop (needs pyarrow" in line, line
    assert "driver" not in line  # the fake driver passed
    assert "FAIL before any stage ran" in proc.stdout and "== versions" not in proc.stdout
    assert not (tmp_path / "out").exists()


def test_the_bundle_dry_run_names_what_it_would_fetch_and_writes_nothing():
    proc = _bash("make_gpu_bundle.sh", "--dry-run", env={**os.environ, "EXTRA": "pyarrow", "PYVER": "3.12"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "would run:" in line]
    assert len(runs) == 2 and all("--python-version 3.12" in r and "--no-deps" in r for r in runs)
    from importlib import metadata

    import ray

    assert runs[0].endswith(f"ray=={ray.__version__}")
    fetched = runs[1].split()
    # pinned to what imports together here: pydantic-core is the one this pydantic requires
    for name in ("pydantic", "pydantic-core", "mlxtend"):
        assert f"{name}=={metadata.version(name)}" in fetched, name
    assert "pyarrow" in fetched and not any(w.startswith("wandb") for w in fetched)
    assert not (REPO / ".gpu-bundle").exists() or (REPO / ".gpu-bundle" / "activate.sh").exists()


def test_the_product_points_at_its_own_bundle_script():
    for path in ("bench/gpu_check.sh", "docs/development.md"):
        text = (REPO / path).read_text()
        assert "bench/make_gpu_bundle.sh" in text and "../shared" not in text, path


def _tests_that_use_cuda() -> list[str]:
    """`file::function` of every test whose code puts something on CUDA (device="cuda", .cuda(), .to("cuda"))."""
    import ast
    import re

    uses_cuda = re.compile(r"""device=["']cuda|\.cuda\(\)|\.to\(["']cuda""")
    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and \
                    uses_cuda.search(ast.get_source_segment(source, node) or ""):
                found.append(f"{path.name}::{node.name}")
    return found


def test_every_test_that_puts_something_on_cuda_is_marked_gpu():
    """What `-m gpu` selects (bench/gpu_check.sh's pytest stage) holds every test that needs CUDA."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-o", "addopts=",
                           "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
    selected = {line.split("[")[0].removeprefix("tests/") for line in proc.stdout.splitlines() if "::" in line}
    needed = _tests_that_use_cuda()
    assert needed and not [t for t in needed if t not in selected], proc.stdout[-2000:]
