"""The README's quick-start commands, read from the README and run as written in a fresh clone, work and leave
`git status` clean: training writes under ./runs, `distgan.sample` into the run directory, the benchmarks into
git-ignored dated files (tests/test_bench.py)."""

import subprocess
import sys

import pytest

from conftest import REPO, describe
from support import readme_smoke_commands


@pytest.mark.slow
def test_readme_commands_leave_the_clone_clean(ray_cluster, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    # as a user types them: no RAY_ADDRESS, so distgan.train starts its own Ray instance, even though the
    # test cluster (a `ray start` instance) is up on this machine
    env = {k: v for k, v in ray_cluster.client_env(WANDB_MODE="offline", WANDB_SILENT="true").items()
           if not k.startswith("RAY_")}
    # bench/kernels.py writes git-ignored files too: tests/test_bench.py runs it and checks `git check-ignore`
    for command in readme_smoke_commands():
        command = [sys.executable, *command[1:]]
        proc = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{describe(proc)}"
    assert list(clone.glob("runs/*/samples/sample-*.png"))
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True)
    assert status.stdout == "", status.stdout
