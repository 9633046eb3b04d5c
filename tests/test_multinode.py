"""Several Ray nodes on this machine (ray.cluster_utils.Cluster: one raylet per node), workers spread
across them, and a node that goes away mid-run."""

import re
import subprocess
import sys
import time

import pytest
from ray.cluster_utils import Cluster

from distgan.checkpoint import load_state

from conftest import REPO, describe, summary_of

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    # The head has no CPUs, so every training worker lands on a worker node; the controller needs none.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        yield c
    finally:
        c.shutdown()


def _driver(cluster, storage, name, *args):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS=cluster.address, WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "distgan.train", "--num-workers", "2", "--batch-size", "32", "--epochs", "1",
           "--placement-strategy", "STRICT_SPREAD", "--eval-every", "0", "--storage-path", str(storage),
           "--name", name, *map(str, args)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_workers_spread_over_nodes_and_checkpoint_to_shared_storage(cluster, tmp_path):
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    proc = _driver(cluster, tmp_path, "spread", "--max-steps", 4)
    out, err = proc.communicate(timeout=300)
    proc.returncode == 0 or pytest.fail(describe(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)))
    log = out + err
    nodes = {rank: re.search(rf"\[rank {rank}\] of 2 on node (\w+)", log).group(1) for rank in (0, 1)}
    assert nodes[0] != nodes[1]  # two workers, two different nodes
    state = load_state(summary_of(subprocess.CompletedProcess(proc.args, 0, out, err))["checkpoint"])
    assert state["step"] == 4 and state["world_size"] == 2  # the replicas agreed (checked before saving)


def test_run_survives_losing_a_node_and_resumes_on_a_new_one(cluster, tmp_path):
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    proc = _driver(cluster, tmp_path, "node-loss", "--max-steps", 40, "--checkpoint-every-steps", 2,
                   "--max-failures", 3)
    run_dir = tmp_path / "node-loss"
    deadline = time.time() + 240
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # written once Ray has registered a checkpoint
    while not snapshot.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert snapshot.exists(), "no checkpoint registered before the node was removed"
    cluster.remove_node(nodes[0], allow_graceful=False)
    cluster.add_node(num_cpus=1)  # the autoscaler's replacement
    out, err = proc.communicate(timeout=400)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, describe(result)
    assert "resumed from" in out + err
    assert summary_of(result)["final"]["step"] == 40
