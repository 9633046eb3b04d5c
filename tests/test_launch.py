"""How the driver starts or joins Ray and places its workers: a local instance without its dashboard where the
dashboard's packages are missing (a minimal Ray, as on an offline GPU image); an explicit GPU choice on a
cluster whose autoscaler starts GPU nodes on demand (cluster.yaml); a placement probe that asks for what Ray
Train asks. Ray's logical resources stand in for GPUs that this machine does not have."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from distgan import cluster
from distgan.config import ConfigError, TrainConfig

from conftest import REPO, describe, hiding_modules_env

# ray[default]'s dashboard packages that a minimal Ray lacks (pydantic stays: Ray Train itself needs it)
DASHBOARD_PACKAGES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry", "prometheus_client")

START_LOCAL = """
import ray
from distgan import cluster
from distgan.config import TrainConfig

print("dashboard packages:", cluster.dashboard_available())
cluster.connect_ray(TrainConfig(storage_path={storage!r}, num_workers=1))


@ray.remote
def answer():
    return 42


print("task:", ray.get(answer.remote()))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_ray_starts_without_its_dashboard_where_the_dashboard_packages_are_missing(tmp_path):
    assert cluster.dashboard_available()  # this environment has ray[default]: the dashboard starts as before
    env = hiding_modules_env(tmp_path, *DASHBOARD_PACKAGES)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", START_LOCAL.format(storage=str(tmp_path / "runs"))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "dashboard packages: False" in proc.stdout and "task: 42" in proc.stdout, describe(proc)


# ------------------------------------------------------------------ the GPU choice on an autoscaling cluster


def _cluster_config_as_ray_exposes_it(path=REPO / "cluster.yaml"):
    """cluster.yaml's node types as the autoscaler reports them to Ray's GCS (ray._private.state's ClusterConfig)."""
    from ray.core.generated import autoscaler_pb2

    node_types = yaml.safe_load(path.read_text())["available_node_types"]
    return autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name=name, resources={k: int(v) for k, v in spec["resources"].items() if v},
                                       min_count=spec["min_workers"], max_count=spec["max_workers"])
        for name, spec in node_types.items()])


def test_cluster_yaml_offers_gpus_that_no_node_has_yet(monkeypatch, tmp_path):
    import ray._private.state

    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", _cluster_config_as_ray_exposes_it)
    assert cluster.autoscaler_gpu_node_types(bootstrap=tmp_path / "none.yaml") == {"gpu_worker": (1.0, 4)}
    # no autoscaler reported a config: the one `ray up` left on the head node says the same
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)
    assert cluster.autoscaler_gpu_node_types(bootstrap=REPO / "cluster.yaml") == {"gpu_worker": (1.0, 4)}
    assert cluster.autoscaler_gpu_node_types(bootstrap=tmp_path / "none.yaml") == {}


def test_without_a_gpu_flag_a_cluster_that_starts_gpu_nodes_on_demand_needs_an_explicit_choice():
    offered = {"gpu_worker": (1.0, 4)}
    with pytest.raises(ConfigError, match=r"^--use-gpu: this cluster has no GPU up, but its autoscaler starts GPU "
                                          r"nodes on demand \(gpu_worker: 1 GPU each, up to 4\); pass --use-gpu .* "
                                          r"or --no-use-gpu") as caught:
        cluster.check_gpu_choice(None, 0, offered)
    assert "\n" not in str(caught.value)
    cluster.check_gpu_choice(True, 0, offered)  # explicit: the autoscaler starts them
    cluster.check_gpu_choice(False, 0, offered)  # explicit: CPUs
    cluster.check_gpu_choice(None, 1, offered)  # GPUs up: the default takes them
    cluster.check_gpu_choice(None, 0, {})  # a CPU cluster: CPUs, as before


# ------------------------------------------------------------------ the placement probe


@pytest.fixture(scope="module")
def one_gpu_node():
    """A local Ray node with 1 CPU and 1 logical GPU (none physical): a GPU node as Ray schedules it."""
    import ray

    for attempt in range(3):  # Ray gives its raylet 30 s to come up, which a loaded test machine can exceed
        try:
            ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, logging_level="ERROR")
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield ray
    finally:
        ray.shutdown()


def test_the_probe_asks_each_worker_for_what_ray_trains_scaling_config_asks(tmp_path):
    from ray.train import ScalingConfig

    # Ray Train 2.60's defaults: a GPU worker asks for no CPU
    assert cluster.worker_resources(ScalingConfig(num_workers=2, use_gpu=True)) == {"GPU": 1}
    assert cluster.worker_resources(ScalingConfig(num_workers=2, use_gpu=False)) == {"CPU": 1}
    # the run's own ScalingConfig, read the same way
    cfg = TrainConfig(storage_path=str(tmp_path), num_workers=2, cpus_per_worker=3, use_gpu=True).validate()
    assert cluster.worker_resources(cluster.scaling_config(cfg, True)) == {"CPU": 3, "GPU": 1}
    assert cluster.worker_resources(cluster.scaling_config(cfg, False)) == {"CPU": 3}


@pytest.mark.slow
def test_the_probe_places_what_the_run_asks_for_and_names_it_when_it_cannot(one_gpu_node, tmp_path):
    ray = one_gpu_node
    cfg = TrainConfig(storage_path=str(tmp_path), num_workers=1, cpus_per_worker=1, use_gpu=True,
                      placement_timeout_s=30).validate()
    cluster.wait_for_placement(cfg, True)  # 1 x {CPU: 1, GPU: 1} on a node with 1 CPU and 1 (logical) GPU

    @ray.remote(num_cpus=1)
    class Busy:
        def ready(self):
            return True

    busy = Busy.remote()
    ray.get(busy.ready.remote())  # the node's only CPU is taken: the run's workers would not place either
    quick = TrainConfig(storage_path=str(tmp_path), num_workers=1, cpus_per_worker=1, use_gpu=True,
                        placement_timeout_s=2).validate()
    with pytest.raises(cluster.LaunchError, match=r"^--num-workers 1: cannot place 1 workers x \{'CPU': 1, 'GPU': 1\}"):
        cluster.wait_for_placement(quick, True)
    ray.kill(busy)
