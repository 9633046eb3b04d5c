"""How the driver starts Ray on this machine: a local instance with its dashboard when Ray's dashboard packages
are there, without it where they are not (a minimal Ray, as on an offline GPU image)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distgan import train

from conftest import REPO, describe, hiding_modules_env

# ray[default]'s dashboard packages that a minimal Ray lacks (pydantic stays: Ray Train itself needs it)
DASHBOARD_PACKAGES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry", "prometheus_client")

START_LOCAL = """
import ray
from distgan import train
from distgan.config import TrainConfig

print("dashboard packages:", train.dashboard_available())
train.connect_ray(TrainConfig(storage_path={storage!r}, num_workers=1))


@ray.remote
def answer():
    return 42


print("task:", ray.get(answer.remote()))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_ray_starts_without_its_dashboard_where_the_dashboard_packages_are_missing(tmp_path):
    assert train.dashboard_available()  # this environment has ray[default]: the dashboard starts as before
    env = hiding_modules_env(tmp_path, *DASHBOARD_PACKAGES)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", START_LOCAL.format(storage=str(tmp_path / "runs"))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "dashboard packages: False" in proc.stdout and "task: 42" in proc.stdout, describe(proc)
