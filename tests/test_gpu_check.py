"""bench/gpu_check.sh's CPU mode, dry run and pre-flight (bench/_preflight.py), and bench/make_gpu_bundle.sh's dry
run: what can be shown without a GPU or a network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, hiding_modules_env
from support import load_bench_script

preflight = load_bench_script("_preflight")
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


def test_the_preflight_names_a_directory_without_room(monkeypatch):
    assert preflight.space_problems({"/tmp": 1}) == []
    problems = preflight.space_problems({"/tmp": 1 << 60, "/no/such/dir": 1})
    assert problems[0].startswith("/tmp has ") and "MiB free, the stages need" in problems[0]
    assert problems[1].startswith("cannot read the free space of /no/such/dir")


def test_triton_launcher_needs_a_c_compiler(monkeypatch):
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    problems = preflight.launcher_problems(environ={})
    assert any("no C compiler" in p for p in problems)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    assert not any("C compiler" in p for p in preflight.launcher_problems(environ={}))


@pytest.mark.slow  # the script end to end, four times, each with its pre-flight's imports
@pytest.mark.skipif(not CPU_ONLY, reason="shows the CPU mode; this machine has an NVIDIA device")
def test_cpu_mode_exits_0_saying_there_is_no_gpu_and_the_dry_run_lists_stages_budgets_and_preflight(tmp_path):
    proc = _bash("gpu_check.sh")
    assert proc.returncode == 0 and "no NVIDIA GPU on this machine" in proc.stdout, proc.stdout + proc.stderr
    assert "--rehearse runs every stage's plumbing on this CPU" in proc.stdout
    for budget in (470, 300, 1000):
        proc = _bash("gpu_check.sh", "--dry-run", env={**os.environ, "OUT": str(tmp_path / "out"),
                                                       "GPU_CHECK_BUDGET_S": str(budget)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert any(line.startswith("preflight: ") and "no NVIDIA driver" in line for line in lines), proc.stdout
        listed = [line.split() for line in lines if line.startswith("  ")]
        assert [row[0] for row in listed] == ["versions", "pytest", "kernels", "faults", "train", "report"]
        limits = [int(row[2]) for row in listed]
        assert all(row[1] == "limit" and row[4] == "minimum" for row in listed)
        assert all(limit >= int(row[5]) for limit, row in zip(limits, listed)) or budget < 470
        assert sum(limits) <= budget and f"the limits add up to {sum(limits)} s of the {budget} s budget" in \
            proc.stdout
        assert f"overall budget {budget} s" in proc.stdout and "would exit 0 here" in proc.stdout
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


# ------------------------------------------------------------------ each stage's PASS, fed failing input


def _stage_inputs(logs, work, *, versions=None, pytest_tail=None, kernels=None, faults=None, train=None):
    """A stage's output as bench/gpu_check.sh leaves it: logs/<stage>.log, logs/<bench>.json, work/runs/."""
    import json

    logs.mkdir(parents=True, exist_ok=True)
    if versions is not None:
        (logs / "provenance.json").write_text(json.dumps({"versions": versions}))
    if pytest_tail is not None:
        (logs / "pytest.log").write_text(f"$ python -m pytest ...\n....\n{pytest_tail}\n")
    if kernels is not None:
        (logs / "kernels.json").write_text(json.dumps(kernels))
    if faults is not None:
        log, checkpoint = faults
        (logs / "faults.log").write_text(log)
        if checkpoint:
            (work / "runs" / "gpu-check" / "checkpoint_00000010").mkdir(parents=True)
    if train is not None:
        (logs / "train.json").write_text(json.dumps(train))


TRITON_TIMED = {"op": "bce_with_logits", "shape": [64], "dtype": "fp32", "provider": "triton", "source": "measured"}
KILLED_AND_RESUMED = "[rank 0] SIGKILL at step 25\n[rank 0] resumed from /tmp/w/runs/gpu-check/checkpoint_20\n"


@pytest.mark.parametrize("stage, given, rehearse, passes, says", [
    ("versions", dict(versions={"torch": "2.11", "gpu": "H100"}), False, True, "torch 2.11 on H100"),
    ("versions", dict(versions={"torch": "2.11", "gpu": None}), False, False, "torch sees no GPU"),
    ("versions", dict(versions={"torch": "2.14", "gpu": None}), True, True, "torch 2.14"),
    ("versions", dict(), False, False, "provenance.json holds no torch version"),
    ("pytest", dict(pytest_tail="12 passed in 30.1s"), False, True, "12 passed"),
    ("pytest", dict(pytest_tail="11 passed, 1 failed in 30.1s"), False, False, "1 failed, 0 errors"),
    ("pytest", dict(pytest_tail="12 skipped in 3.0s"), False, False, "no GPU test passed"),
    ("pytest", dict(pytest_tail="12 skipped in 3.0s"), True, True, "12 skipped"),
    ("pytest", dict(pytest_tail="1 error in 1.0s"), True, False, "0 failed, 1 errors"),
    ("pytest", dict(pytest_tail="ERROR collecting tests/test_x.py"), True, False, "no pytest tally"),
    ("kernels", dict(kernels={"records": [TRITON_TIMED], "checks": [{"check": "c", "ok": True}]}), False, True,
     "1 Triton case(s) timed, 1 checks"),
    ("kernels", dict(kernels={"records": [{**TRITON_TIMED, "provider": "eager"}],
                              "unavailable": [{"provider": "triton", "reason": "CompilationError: ..."}]}),
     False, False, "no Triton case ran (e.g. CompilationError: ...)"),
    ("kernels", dict(kernels={"records": [{**TRITON_TIMED, "source": "counted"}]}), False, False,
     "no Triton case ran"),
    ("kernels", dict(kernels={"records": [{**TRITON_TIMED, "source": "counted"}]}), True, True, "counted"),
    ("kernels", dict(kernels={"records": [TRITON_TIMED], "checks": [{"check": "bytes", "ok": False}]}), False,
     False, "1 kernel check(s) failed: bytes"),
    ("kernels", dict(), False, False, "wrote no kernels.json"),
    ("faults", dict(faults=(KILLED_AND_RESUMED, True)), False, True, "killed, resumed"),
    ("faults", dict(faults=("[rank 0] step 40\n", True)), False, False, "the worker was never killed"),
    ("faults", dict(faults=("[rank 0] SIGKILL at step 25\n", True)), False, False, "no 'resumed from'"),
    ("faults", dict(faults=(KILLED_AND_RESUMED, False)), False, False, "no checkpoint written"),
    ("train", dict(train={"records": [{"metric": "images_per_s", "config": "ray"}]}), False, True,
     "1 distgan run(s) measured"),
    ("train", dict(train={"records": [{"metric": "images_per_s", "config": "plain"}]}), False, False,
     "no distgan run was measured"),
    ("train", dict(), False, False, "wrote no train.json"),
])
def test_each_stage_passes_only_on_what_its_pass_promises(tmp_path, stage, given, rehearse, passes, says):
    report = load_bench_script("_gpu_report")
    logs, work = tmp_path / "logs", tmp_path / "work"
    _stage_inputs(logs, work, **given)
    ok, why = report.check(stage, logs, work, rehearse)
    assert ok == passes and says in why, why


def test_a_check_cut_short_or_with_a_skipped_stage_fails_the_report(tmp_path, capsys):
    report = load_bench_script("_gpu_report")
    logs = tmp_path / "logs"
    _stage_inputs(logs, tmp_path, versions={"torch": "2.11", "gpu": "H100"})
    (logs / "stages.tsv").write_text("versions\tPASS\t0\t3\t20\ttorch 2.11 on H100\n"
                                     "train\tSKIP\t-\t0\t12\tskipped: 12 s of the 470 s budget left\n")
    argv = ["--logs", str(logs), "--json", str(tmp_path / "g.json"), "--md", str(tmp_path / "g.md")]
    assert report.main(argv) == 0 and not capsys.readouterr().out  # between stages: written, quietly
    assert report.main([*argv, "--final"]) == 1
    assert "FAIL: train" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not CPU_ONLY, reason="the rehearsal is for a CPU machine; this one has an NVIDIA device")
def test_the_rehearsal_runs_every_stage_on_this_cpu_and_everything_comes_back(tmp_path):
    """bash bench/gpu_check.sh --rehearse: the stages, budgets and $OUT files of the GPU check, in the GPU
    image's environment (what it lacks hidden, Ray without its dashboard), on this CPU."""
    import json
    import re
    import tarfile

    out = tmp_path / "out"
    # Twice the GPU's budget: CPU stages beside another test process run at half speed or worse, and what this
    # checks is the stages' plumbing; the GPU budget's own arithmetic is the dry-run test's.
    budget = 2 * 470
    proc = _bash("gpu_check.sh", "--rehearse", env={**os.environ, "OUT": str(out),
                                                     "GPU_CHECK_BUDGET_S": str(budget)}, timeout=budget + 300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    # what a device machine returns: at most 8 files, at most two folders down, plain names
    assert 0 < len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.relative_to(out).parts)
    result = json.loads(next(out.glob("gpu-*.json")).read_text())
    assert result["rehearsal"] and [s["stage"] for s in result["stages"]] == \
        ["versions", "pytest", "kernels", "faults", "train"]
    assert all(s["status"] == "PASS" for s in result["stages"]), result["stages"]
    assert sum(s["limit_s"] for s in result["stages"]) <= budget
    with tarfile.open(next(out.glob("gpu-*-logs.tar.gz"))) as archive:
        names = set(archive.getnames())
    assert {f"logs/{stage}.log" for stage in ("versions", "pytest", "kernels", "faults", "train")} <= names
    assert {"logs/kernels.json", "logs/train.json", "logs/provenance.json"} <= names
    assert "State API" not in proc.stdout + proc.stderr
