"""Several Ray nodes on this machine (ray.cluster_utils.Cluster: one raylet per node): workers spread
across them, a node goes away mid-run, and the run resumes from shared storage on a replacement."""

import re
import subprocess
import sys
import time

import pytest
from ray.cluster_utils import Cluster

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
    # the in-process cluster takes this process's RAY_AUTH_* settings (a test before it may have set them), so
    # its driver needs the same; every other RAY_ variable is left out
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_") or k.startswith("RAY_AUTH_")}
    env.update(RAY_ADDRESS=cluster.address, WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "distgan.train", "--num-workers", "2", "--batch-size", "32", "--epochs", "1",
           "--placement-strategy", "STRICT_SPREAD", "--eval-every", "0", "--storage-path", str(storage),
           "--name", name, *map(str, args)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_survives_losing_a_node_and_resumes_on_a_new_one(cluster, tmp_path):
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    proc = _driver(cluster, tmp_path, "node-loss", "--max-steps", 40, "--checkpoint-every-steps", 2,
                   "--max-failures", 3)
    run_dir = tmp_path / "node-loss"
    deadline = time.time() + 240
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # written once Ray has registered a checkpoint
    while not snapshot.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    if not snapshot.exists():
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("no checkpoint registered before the node was removed\n"
                    + describe(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)))
    cluster.remove_node(nodes[0], allow_graceful=False)
    cluster.add_node(num_cpus=1)  # the autoscaler's replacement
    out, err = proc.communicate(timeout=400)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, describe(result)
    log = out + err
    assert "resumed from" in log
    assert summary_of(result)["final"]["step"] == 40
    # STRICT_SPREAD: the last attempt's two workers ran on two different nodes. Its lines are the last of each
    # rank; the first attempt's are not evidence, since a line from the removed node may never reach the driver.
    last = {rank: re.findall(rf"\[rank {rank}\] of 2 on node (\w+)", log)[-1] for rank in (0, 1)}
    assert last[0] != last[1]
