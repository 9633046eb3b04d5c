import os

import torch

# @triton.jit reads TRITON_INTERPRET when the decorator runs, so it must be set before `kernels` is
# imported anywhere in the session. Without a GPU the interpreter is the only way to run the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = __import__("pytest").mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ray_local import LocalRayCluster, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# Ray Train's controller polls its workers every 2 s by default, so noticing that a run ended (or a worker died)
# costs up to 2 s; the tests' short runs poll faster. The controller reads it from its node's environment.
FAST_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def s3_env(endpoint: str) -> dict[str, str]:
    """S3 client settings for an S3-protocol server at `endpoint` (the tests' moto server); never real credentials.
    Ray Train and pyarrow find a non-AWS server through AWS_ENDPOINT_URL."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-protocol server (moto) on a loopback port; its URL (clients: `s3_env(url)`)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One real Ray head node on loopback (token auth on) shared by the tests that train (one per pytest-xdist
    worker that runs any)."""
    from wandb_offline import FAKE_KEY

    # Like a provisioned cloud node, the workers' environment holds a W&B key (the tests check it never reaches
    # a file; runs default to offline here: the drivers pass WANDB_MODE) and the object store's settings.
    node_env = {"WANDB_API_KEY": FAKE_KEY, **s3_env(s3_endpoint), **FAST_POLL}
    cluster = LocalRayCluster(num_cpus=3, node_env=node_env).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def run_train(cluster, *args, env=None, timeout=300, cwd=None):
    """`python -m distgan.train ...` as a driver of the test cluster; returns the CompletedProcess."""
    full_env = cluster.client_env(**{"WANDB_MODE": "offline", "WANDB_SILENT": "true", **FAST_POLL, **(env or {})})
    return subprocess.run([sys.executable, "-m", "distgan.train", *map(str, args)], env=full_env, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def summary_of(proc) -> dict:
    """The JSON summary `distgan.train` prints on success."""
    out = proc.stdout
    start = out.index("{\n")
    depth = 0
    for i, ch in enumerate(out[start:], start):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return json.loads(out[start:i + 1])
    raise ValueError("no summary in output")


def describe(proc) -> str:
    return f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def assert_bitwise_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# the parts of a checkpoint that must match bitwise between a resumed and an uninterrupted run
TRAINING_STATE = ("generator", "discriminator", "ema", "opt_g", "opt_d", "step", "epoch", "batch_in_epoch")
