import atexit
import os
import shutil
import tempfile

import torch

# A CPU-only machine that takes a GPU machine's decisions below, for the tests of this file.
ASSUME_GPU_ENV = "DISTGAN_TEST_ASSUME_GPU"
# What kernels.resolve_impl says when impl="triton" meets CPU tensors without the interpreter.
TRITON_CPU_ERROR = "cannot run on cpu tensors"
TRITON_CPU_SKIP = ("impl=\"triton\" on CPU tensors needs TRITON_INTERPRET=1, which stays off in a session that "
                   "runs GPU tests (they need compiled kernels); run these with -m \"not gpu\"")


def gpu_present() -> bool:
    return torch.cuda.is_available() or os.environ.get(ASSUME_GPU_ENV) == "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# @triton.jit reads TRITON_INTERPRET when the decorator runs, so it is decided before `kernels` is imported
# anywhere in the session: here, or in pytest_configure (before any test module is collected). Without a GPU
# the interpreter is the only way to run the kernels. With one, it is on only when the session selects no
# GPU test; otherwise the tests that run impl="triton" on CPU tensors skip, saying so (pytest_runtest_makereport).
if not gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# --precision auto caches its measurement in the user's cache directory; the tests (and the drivers, Ray nodes and
# workers they start, which inherit this environment) keep theirs in a directory of this session, removed with it
# (pytest-xdist's workers inherit the directory of the process that made it, which ends last).
if "DISTGAN_CACHE_DIR" not in os.environ:
    os.environ["DISTGAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="distgan-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DISTGAN_CACHE_DIR"], ignore_errors=True)

# pytest-xdist runs one session per core: torch's intra-op threads, one per core in each, would contend for the
# cores with the other session (and with the processes the tests start), and a contended OpenMP barrier costs
# more than the thread gains. One thread each, as a one-CPU Ray worker runs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def requires_gpu(test):
    """A test that needs CUDA: marked `gpu` (what bench/gpu_check.sh selects) and skipped without a CUDA GPU."""
    import pytest

    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ray_local import LocalRayCluster, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _selects_gpu_tests(markexpr: str) -> bool:
    """Whether `-m markexpr` keeps a test marked gpu (and nothing else); True when unsure."""
    if not markexpr:
        return True
    try:
        from _pytest.mark.expression import Expression  # pytest's own -m parser, so every expression reads alike

        return bool(Expression.compile(markexpr).evaluate(lambda name, **kwargs: name == "gpu"))
    except Exception:
        return True


def pytest_configure(config):
    if gpu_present() and "TRITON_INTERPRET" not in os.environ and not _selects_gpu_tests(config.option.markexpr):
        os.environ["TRITON_INTERPRET"] = "1"  # no GPU test here: the CPU tests run the kernels interpreted


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On a GPU machine whose session runs GPU tests, a CPU test that runs impl="triton" (in this process or in
    the processes it starts) reads as skipped with the reason, not as failed."""
    report = yield
    if (report.failed and call.excinfo is not None and not interpreting() and item.get_closest_marker("gpu") is None
            and TRITON_CPU_ERROR in str(report.longrepr)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] + 1, f"Skipped: {TRITON_CPU_SKIP}")
    return report


# Ray Train's controller polls its workers every 2 s by default, so noticing that a run ended (or a worker died)
# costs up to 2 s; the tests' short runs poll faster. The controller reads it from its node's environment.
FAST_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def s3_env(endpoint: str) -> dict[str, str]:
    """S3 client settings for an S3-protocol server at `endpoint` (the tests' moto server); never real credentials.
    Ray Train and pyarrow find a non-AWS server through AWS_ENDPOINT_URL."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


def use_s3(monkeypatch, endpoint: str, bucket: str):
    """This process's S3 client settings for `endpoint` (and none of the user's: profile, session, endpoint),
    with `bucket` created; its pyarrow filesystem."""
    import pyarrow.fs

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
    fs.create_dir(bucket)
    return fs


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
    """The summary `distgan.train` writes to its run directory (storage.SUMMARY_FILE), found through the run
    directory it prints."""
    from distgan import storage

    for line in proc.stdout.splitlines():
        if line.startswith("run directory  : "):
            data = storage.read_bytes(storage.join(line.split(": ", 1)[1], storage.SUMMARY_FILE))
            return json.loads(data)
    raise ValueError("no summary in output")


def hiding_modules_env(tmp_path: Path, *names: str, base: dict | None = None) -> dict[str, str]:
    """An environment for subprocesses (and the processes they start) in which the modules `names` (a package
    with its submodules) cannot be imported, as on a machine that lacks them: bench/_hide.py's sitecustomize."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_hide", REPO / "bench" / "_hide.py")
    hide = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hide)
    site = hide.write(tmp_path / "hide-modules", names).parent
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


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


def assert_close_to_reference(actual, expected, tol: float, what: str = "") -> None:
    """A kernel's output against its float64 reference: no NaN (the outputs are poisoned with NaN before a kernel
    writes them, so a NaN is an element never written), then rtol = tol and atol = tol x the largest |expected|."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element was never written)"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


# the parts of a checkpoint that must match bitwise between a resumed and an uninterrupted run
TRAINING_STATE = ("generator", "discriminator", "ema", "opt_g", "opt_d", "step", "epoch", "g_steps_into_epoch")


def assert_same_training_state(got: dict, want: dict) -> None:
    """Two checkpoint states hold the same bits in every TRAINING_STATE entry."""
    for key in TRAINING_STATE:
        assert_bitwise_equal(got[key], want[key], key)


@contextlib.contextmanager
def one_rank_group(tmp_path: Path, backend: str = "gloo"):
    """A real one-process torch.distributed group (file rendezvous under tmp_path), destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{tmp_path}/pg", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture
def gloo_world(tmp_path):
    with one_rank_group(tmp_path) as group:
        yield group


@pytest.fixture
def nccl_world(tmp_path):
    torch.cuda.set_device(0)
    with one_rank_group(tmp_path, "nccl") as group:
        yield group
