"""The driver's Ray side: join RAY_ADDRESS or start a local instance, and size the workers to what Ray offers.

What the workers' runtime env carries, refusing a RAY_ADDRESS a driver cannot join, the cluster's GPU choice,
--num-workers/--cpus-per-worker decided for the nodes (distgan.hardware.plan_workers), Ray Train's ScalingConfig
for them, and a placement probe that fails fast when they cannot be placed. distgan.train, distgan.tune and
distgan.local use these.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Mapping, Optional

from distgan.config import (  # noqa: F401  (LaunchError: raised here, imported from here by the driver)
    MAX_FAILURES_CLUSTER,
    MAX_FAILURES_LOCAL,
    RAY_JOB_CONFIG_ENV,
    ConfigError,
    LaunchError,
    TrainConfig,
)

# Forwarded to the workers through the train-loop config (not the job's runtime env, which the dashboard
# shows): W&B settings that are not secrets, and the test hooks. WANDB_API_KEY is never forwarded.
FORWARDED_ENV_PREFIXES = ("DISTGAN_TEST_", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_BASE_URL",
                          "WANDB_INIT_TIMEOUT", "WANDB_SILENT")
# TRITON_INTERPRET must be in a worker's environment before `kernels` is imported, so it travels in the
# runtime env (it is not a secret).
RUNTIME_ENV_VARS = ("TRITON_INTERPRET",)


# The signals that stop a run gracefully (distgan.driver's StopOnInterrupt). `timeout`, `kill -- -PGID`, a closing
# terminal (SIGHUP), SLURM and systemd send them to every process of the job, not only to the driver: a local Ray
# instance's processes would die at once and leave the driver nothing to stop gracefully. So they are blocked in
# every process of the local instance (a blocked signal stays pending; the mask is inherited across fork and
# exec, as Ray's own block of SIGINT is), and reach the driver alone. SIGKILL cannot be blocked, so the
# instance still dies with a driver that is killed.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The session directory (/tmp/ray/session_*) of the local instance this process started; removed when it stops.
_local_session: Optional[Path] = None


@contextlib.contextmanager
def _stop_signals_blocked():
    """STOP_SIGNALS blocked in this thread, so in the processes it starts and in the threads they start."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _forwarded_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k != "WANDB_API_KEY"}
    if env.get("WANDB_DIR"):  # rank 0 runs in a working directory Ray Train chooses: resolve against the user's
        env["WANDB_DIR"] = os.path.abspath(os.path.expanduser(env["WANDB_DIR"]))
    return env


def job_runtime_env(environ: Mapping[str, str] = os.environ) -> Optional[dict[str, Any]]:
    """The runtime env of the `ray job submit` this driver runs in, or None outside a job."""
    raw = environ.get(RAY_JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def driver_runtime_env(environ: Mapping[str, str] = os.environ) -> Optional[dict[str, Any]]:
    """What the driver adds to the workers' runtime env: RUNTIME_ENV_VARS from its environment, except those
    the job's runtime env already sets. Ray refuses to merge a ray.init runtime env that repeats a key of the
    job's (and the job's reaches the workers anyway; the driver's environment holds the same values)."""
    job_vars = (job_runtime_env(environ) or {}).get("env_vars") or {}
    env_vars = {k: environ[k] for k in RUNTIME_ENV_VARS if k in environ and k not in job_vars}
    return {"env_vars": env_vars} if env_vars else None


def default_max_failures(environ: Mapping[str, str] = os.environ) -> int:
    return MAX_FAILURES_CLUSTER if environ.get("RAY_ADDRESS") else MAX_FAILURES_LOCAL


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dashboard_available() -> bool:
    """Whether Ray's dashboard can start in this environment: Ray's own test, an import of the packages it needs
    (aiohttp, aiohttp_cors, grpc, opencensus, opentelemetry, prometheus_client, pydantic; `ray[default]`).
    A minimal Ray (an offline GPU image's) lacks them, and ray.init(include_dashboard=True) then refuses to
    start, so a local run starts Ray without the dashboard there."""
    try:
        importlib.import_module("ray.dashboard.optional_deps")
    except ImportError:
        return False
    return True


def connect_ray(cfg: TrainConfig, extra_cpus: int = 0):
    """Joins RAY_ADDRESS or starts a local instance with this machine's CPUs (+ `extra_cpus` logical ones, for
    processes that only wait, like distgan.tune's trial drivers)."""
    import ray

    runtime_env = driver_runtime_env() or {}
    env_vars = runtime_env.setdefault("env_vars", {})
    job_vars = (job_runtime_env() or {}).get("env_vars") or {}
    # Ray's own chatter stays at warning level unless --verbose; the workers' output (progress bar, evaluation
    # lines, warnings) still reaches this terminal.
    quiet = {} if cfg.verbose else {"logging_level": logging.WARNING}
    if not cfg.verbose:  # Ray's notice that token authentication is on (a token in ~/.ray) is Ray's, not the run's
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    # Ray Train's worker print() patch sends each print through a logger as well as stdout (every line twice)
    # and drops it below the log level; plain prints are what the workers mean. Ray propagates this variable
    # from the driver to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's placement-group cleaner (an actor) polls Ray's State API, whose address it discovers from
    # its environment; with two Ray instances on one machine, discovery fails and it logs an error every few
    # seconds. So the run's actors are told which instance is theirs.
    if os.environ.get("RAY_ADDRESS"):
        if "RAY_ADDRESS" not in job_vars:
            env_vars["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
        ray.init(runtime_env=runtime_env, log_to_driver=True, **quiet)
    else:
        # The dashboard process serves the State API (without it every poll logs "State API may be temporarily
        # unavailable"); loopback only. address="local": a new instance of our own, where a bare ray.init()
        # would join any instance that `ray start` left on this machine (and then refuse num_cpus).
        # The State API's address is named even without a dashboard: left to discover it, the cleaner scans the
        # machine's Ray processes and, with another instance running, warns on every poll that it found several.
        port, dashboard = _free_port(), dashboard_available()
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        if not dashboard:
            runtime_env["worker_process_setup_hook"] = "distgan.cluster.without_state_api"
        # Ray Train's preemption watcher is for cloud nodes; on this machine it only logs a core_worker error.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        global _local_session
        with _stop_signals_blocked():
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.num_workers or 1) + extra_cpus,
                     runtime_env=runtime_env,
                     include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port, **quiet)
        _local_session = Path(ray._private.worker._global_node.get_session_dir_path())
    return ray


# The thread in which Ray Train's placement-group cleaner polls the State API (ray/train/v2, PlacementGroupCleaner)
PLACEMENT_GROUP_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def without_state_api() -> None:
    """Ray's worker_process_setup_hook for a local instance started without its dashboard (an offline GPU image's
    minimal Ray). Ray Train's placement-group cleaner polls the State API, which the dashboard serves: it would
    warn every few seconds that it is unavailable, and a query it does not expect to fail can end its thread with
    a traceback. Its one job, removing the placement group of a controller that died, ends with this instance
    anyway, so both stay out of the run's output."""
    import threading

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    default = threading.excepthook

    def excepthook(args) -> None:
        if args.thread is None or args.thread.name != PLACEMENT_GROUP_CLEANER_THREAD:
            default(args)

    threading.excepthook = excepthook


def disconnect_ray() -> None:
    """ray.shutdown(); for a local instance this process started, its processes stop with it and its session
    directory (logs, sockets, spilled objects) is removed, so runs leave nothing of Ray behind."""
    import ray

    global _local_session
    ray.shutdown()
    session, _local_session = _local_session, None
    if session is None:
        return
    for link in session.parent.iterdir():  # session_latest and Ray's other links into the session
        if link.is_symlink() and session.name in Path(os.readlink(link)).parts:
            link.unlink(missing_ok=True)
    shutil.rmtree(session, ignore_errors=True)


# A driver finds its cluster at a GCS address, host:port; Ray's Jobs docs export the dashboard's http:// address
# instead, which only `ray job submit` reads. A dead address makes ray.init retry for minutes in silence.
RAY_ADDRESS_PROBE_S = 5.0


def resolve_auto_address() -> tuple[Optional[str], str]:
    """What Ray's RAY_ADDRESS=auto means on this machine, found as ray.init finds it: the address that the last
    `ray start` recorded (Ray's ray_current_cluster file), else a running GCS process's. Returns (host:port or
    None, where it was found)."""
    from ray._private import services, utils

    recorded = services.find_bootstrap_address(None)
    if recorded:
        return recorded, f"the address `ray start` recorded in {utils.get_ray_address_file(None)}"
    running = sorted(services.find_gcs_addresses())
    return (running[0], "a running Ray GCS process") if running else (None, "")


def check_ray_address(environ: Mapping[str, str] = os.environ) -> None:
    """Refuses a RAY_ADDRESS this driver cannot join, in one line naming it (and what `auto` resolved to), before
    Ray is started: a dashboard URL (http://, https://), a value that is not host:port, `auto` with no cluster on
    this machine, or an address (host:port, ray://host:port, or auto's) where nothing accepts a TCP connection
    within RAY_ADDRESS_PROBE_S seconds; ray.init would retry such an address for minutes in silence."""
    import socket

    address = environ.get("RAY_ADDRESS", "").strip()
    if not address:
        return
    named, target = f"RAY_ADDRESS={address}", address
    if address == "auto":
        target, found_in = resolve_auto_address()
        if target is None:
            raise LaunchError("RAY_ADDRESS=auto: no Ray cluster runs on this machine (no address recorded by "
                              "`ray start`, no GCS process); start one (`ray start --head`), set RAY_ADDRESS to "
                              "the cluster's host:port, or unset RAY_ADDRESS for a local run on this machine")
        named = f"RAY_ADDRESS=auto (resolved to {target}, from {found_in})"
    elif address.startswith(("http://", "https://")):
        host = address.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        raise LaunchError(f"RAY_ADDRESS={address} is a dashboard (Jobs API) address, which only `ray job submit "
                          f"--address` reads; a driver joins at the cluster's GCS address (`ray status` on the head "
                          f"node prints it, port 6379 by default): RAY_ADDRESS={host}:6379, or run this command "
                          f"with `ray job submit --address {address} -- python -m distgan.train ...`")
    host, _, port = target.removeprefix("ray://").split("/", 1)[0].rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"{named} is not host:port (the cluster's GCS address, e.g. 10.0.0.5:6379) nor auto; "
                          f"unset it for a local run on this machine")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_ADDRESS_PROBE_S):
            pass
    except OSError as e:
        stale = " (a cluster that was killed rather than stopped leaves its address behind)" if address == "auto" \
            else ""
        raise LaunchError(f"{named}: nothing answers there ({e.strerror or type(e).__name__}){stale}; start "
                          f"the cluster (`ray start --head`), correct the address (`ray status` on the head node "
                          f"prints it), or unset RAY_ADDRESS for a local run on this machine") from None


def worker_resources(scaling_config) -> dict[str, float]:
    """What Ray Train's placement group asks for each worker of `scaling_config` (a ray.train.ScalingConfig): its
    fixed scaling policy takes `ScalingConfig._resources_per_worker_not_none`, which in Ray 2.60 is
    `resources_per_worker` when given, else {"GPU": 1} with use_gpu (no CPU: nodes have more CPUs than GPUs,
    so asking none avoids contention) and {"CPU": 1} without."""
    return dict(scaling_config._resources_per_worker_not_none)


def wait_for_placement(cfg: TrainConfig, use_gpu: bool) -> None:
    """Fail fast (with the cluster's numbers) when the workers cannot be placed, instead of waiting forever.
    The probe asks for exactly the bundles Ray Train will ask for: those of the trainer's ScalingConfig
    (`scaling_config`), read the way Ray Train reads them, so it refuses nothing that the run would place."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    scaling = scaling_config(cfg, use_gpu)
    bundle = worker_resources(scaling)
    pg = placement_group([bundle] * cfg.num_workers, strategy=scaling.placement_strategy)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            have = ray.cluster_resources()
            raise LaunchError(
                f"--num-workers {cfg.num_workers}: cannot place {cfg.num_workers} workers x {bundle} "
                f"({scaling.placement_strategy}) within {cfg.placement_timeout_s}s; the cluster has "
                f"CPU={have.get('CPU', 0):g} GPU={have.get('GPU', 0):g} on {len(ray.nodes())} node(s)")
    finally:
        remove_placement_group(pg)


def size_workers(cfg: TrainConfig, nodes: list, use_gpu: bool, found: Optional[tuple[str, dict]] = None,
                 log=print, fork: bool = False) -> TrainConfig:
    """The config with --num-workers and --cpus-per-worker decided (distgan.hardware.plan_workers) for `nodes`
    (what Ray offers), validated again, checked against the checkpoint it resumes (`fork`: the one a new run forks
    from, distgan.runs.check_resume); prints the layout."""
    import dataclasses

    from distgan.hardware import plan_workers

    keep = None
    if found is not None and found[1].get("g_steps_into_epoch"):
        keep = found[1].get("world_size")
    try:
        plan = plan_workers(cfg.num_workers, cfg.cpus_per_worker, use_gpu, nodes, cfg.batch_size, cfg.bn, keep)
    except ValueError as e:
        raise ConfigError(str(e), field="cpus_per_worker") from None
    sized = dataclasses.replace(cfg, num_workers=plan.num_workers, cpus_per_worker=plan.cpus_per_worker).validate()
    from distgan.runs import check_resume

    check_resume(sized, found, fork=fork)
    log(f"distgan: {plan.describe(cfg.batch_size)}")
    for note in plan.notes:
        log(f"note: {note}")
    return sized


def worker_bundle(cfg: TrainConfig, use_gpu: bool) -> dict[str, int]:
    """One worker's Ray resources in a sized config: {CPU: --cpus-per-worker (, GPU: 1)}."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def scaling_config(cfg: TrainConfig, use_gpu: bool):
    """Ray Train's ScalingConfig for a sized config: --num-workers workers of `worker_bundle`. Ray sets each
    worker's OMP_NUM_THREADS to its CPUs; the loop sets torch's threads to them too."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=worker_bundle(cfg, use_gpu),
                         placement_strategy=cfg.placement_strategy)


# Where `ray up` leaves the autoscaler's config on the head node (Ray's own `--autoscaling-config`), which is
# where `ray job submit` runs this driver.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def autoscaler_gpu_node_types(bootstrap: Path = BOOTSTRAP_CONFIG) -> dict[str, tuple[float, int]]:
    """The node types the joined cluster's autoscaler can start that have GPUs: {name: (GPUs per node, most
    nodes of the type; -1 = no limit)}. Read from the cluster config Ray exposes (ray._private.state, which Ray
    Train's own resource check reads), else from the `ray up` config on this head node; {} when there is
    neither (a local instance, a cluster started by hand)."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # not connected, or a Ray without the accessor: as if no autoscaler reported a config
        config = None
    if config is not None and config.node_group_configs:
        return {group.name: (float(group.resources.get("GPU", 0)), int(group.max_count))
                for group in config.node_group_configs if group.resources.get("GPU", 0) > 0 and group.max_count}
    path = bootstrap.expanduser()
    if not path.is_file():
        return {}
    import yaml

    try:
        node_types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return {name: (float((spec.get("resources") or {}).get("GPU", 0)), int(spec.get("max_workers", -1)))
            for name, spec in node_types.items()
            if isinstance(spec, dict) and (spec.get("resources") or {}).get("GPU", 0) and spec.get("max_workers", -1)}


def check_gpu_choice(use_gpu: Optional[bool], cluster_gpus: float,
                     gpu_node_types: Mapping[str, tuple[float, int]]) -> None:
    """Without --use-gpu/--no-use-gpu the run takes GPUs when the cluster has some up. A cluster whose
    autoscaler starts GPU nodes on demand has none up before a run asks for them, so that choice would train on
    CPUs; there the choice must be explicit (ConfigError naming the flag)."""
    if use_gpu is not None or cluster_gpus >= 1 or not gpu_node_types:
        return
    offered = ", ".join(f"{name}: {gpus:g} GPU each, up to {'any number' if most < 0 else most}"
                        for name, (gpus, most) in sorted(gpu_node_types.items()))
    raise ConfigError(f"--use-gpu: this cluster has no GPU up, but its autoscaler starts GPU nodes on demand "
                      f"({offered}); pass --use-gpu to train on them or --no-use-gpu to train on CPUs",
                      field="use_gpu")


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def local_nodes(gpus: int) -> list:
    """This machine as a local run's Ray instance sees it (connect_ray gives it os.cpu_count() CPUs)."""
    from distgan.hardware import Node

    return [Node(os.cpu_count() or 1, gpus)]
