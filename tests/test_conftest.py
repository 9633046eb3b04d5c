"""The test session's Triton mode on a machine with a GPU (taken here by a CPU machine told to assume one):
CPU tests that run impl="triton" run interpreted when no GPU test is selected, and skip with the reason when
GPU tests are (those need compiled kernels, and one process cannot have both)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ASSUME_GPU_ENV, REPO, TRITON_CPU_SKIP

# two tests that run impl="triton" on CPU tensors (a function, a module), one that runs no kernel
TESTS = ["tests/test_bce_with_logits.py::test_discriminator_loss_matches_eager_impl",
         "tests/test_kernel_modules.py::test_sync_flag_is_local_without_a_process_group",
         "tests/test_kernel_modules.py::test_sync_batchnorm_conversion_leaves_the_fusion_alone"]


def _session(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[ASSUME_GPU_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-rs",
                           "-q", *args, *TESTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_with_gpu_tests_selected_cpu_triton_tests_skip_with_the_reason():
    proc = _session()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b1 passed, 2 skipped\b", proc.stdout), proc.stdout[-3000:]
    assert proc.stdout.count(TRITON_CPU_SKIP) == 2


@pytest.mark.parametrize("markexpr", ["not gpu", "slow or not gpu"])
def test_without_gpu_tests_the_cpu_triton_tests_run_interpreted(markexpr):
    proc = _session("-m", markexpr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b3 passed\b", proc.stdout) and "skipped" not in proc.stdout, proc.stdout[-3000:]
