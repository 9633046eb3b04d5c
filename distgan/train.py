"""`python -m distgan.train`: parse the config, check it, start (or join) Ray, run the TorchTrainer.

Joins the cluster in RAY_ADDRESS (set by `ray job submit`) or starts a local one sized to this machine.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional

from distgan import storage, worker
from distgan.cli import parse_args
from distgan.config import (
    MAX_FAILURES_CLUSTER,
    MAX_FAILURES_LOCAL,
    RAY_JOB_CONFIG_ENV,
    ConfigError,
    TrainConfig,
    check_execution,
    check_schedule,
    config_from_dict,
)

# Forwarded to the workers through the train-loop config (not the job's runtime env, which the dashboard
# shows): W&B settings that are not secrets, and the test hooks. WANDB_API_KEY is never forwarded.
FORWARDED_ENV_PREFIXES = ("DISTGAN_TEST_", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_BASE_URL",
                          "WANDB_INIT_TIMEOUT", "WANDB_SILENT")
# TRITON_INTERPRET must be in a worker's environment before `kernels` is imported, so it travels in the
# runtime env (it is not a secret).
RUNTIME_ENV_VARS = ("TRITON_INTERPRET",)


class LaunchError(RuntimeError):
    pass


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
        port, dashboard = _free_port(), dashboard_available()
        if dashboard:
            env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # Ray Train's preemption watcher is for cloud nodes; on this machine it only logs a core_worker error.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.num_workers or 1) + extra_cpus,
                 runtime_env=runtime_env,
                 include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port, **quiet)
    return ray


# A driver finds its cluster at a GCS address, host:port; Ray's Jobs docs export the dashboard's http:// address
# instead, which only `ray job submit` reads. A dead address makes ray.init retry for minutes in silence.
RAY_ADDRESS_PROBE_S = 5.0


def check_ray_address(environ: Mapping[str, str] = os.environ) -> None:
    """Refuses a RAY_ADDRESS this driver cannot join, in one line naming it, before Ray is started: a dashboard
    URL (http://, https://), a value that is not host:port, or a host:port where nothing accepts a TCP
    connection within RAY_ADDRESS_PROBE_S seconds. Unset, `auto` and `ray://` (Ray Client) are left to Ray."""
    import socket

    address = environ.get("RAY_ADDRESS", "").strip()
    if not address or address == "auto" or address.startswith("ray://"):
        return
    if address.startswith(("http://", "https://")):
        host = address.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        raise LaunchError(f"RAY_ADDRESS={address} is a dashboard (Jobs API) address, which only `ray job submit "
                          f"--address` reads; a driver joins at the cluster's GCS address (`ray status` on the head "
                          f"node prints it, port 6379 by default): RAY_ADDRESS={host}:6379, or run this command "
                          f"with `ray job submit --address {address} -- python -m distgan.train ...`")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"RAY_ADDRESS={address} is not host:port (the cluster's GCS address, e.g. "
                          f"10.0.0.5:6379) nor auto; unset it for a local run on this machine")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_ADDRESS_PROBE_S):
            pass
    except OSError as e:
        raise LaunchError(f"RAY_ADDRESS={address}: nothing answers there ({e.strerror or type(e).__name__}); start "
                          f"the cluster (`ray start --head`), correct the address (`ray status` on the head node "
                          f"prints it), or unset RAY_ADDRESS for a local run on this machine") from None


# One live driver per run: two would interleave checkpoint names, Ray's snapshot, metrics.jsonl and the stop
# request. The driver holds a claim file in the run directory and rewrites it every CLAIM_HEARTBEAT_S; a
# claim is a dead driver's when its process is gone (same host) or it was not rewritten for CLAIM_STALE_S
# (another host, whose processes this one cannot see).
CLAIM_FILE = "driver_claim.json"
CLAIM_HEARTBEAT_S = 30.0
CLAIM_STALE_S = 150.0  # five missed heartbeats: longer than any pause of a live driver's heartbeat thread


def _process_start(pid: int) -> Optional[str]:
    """The start time of a process in clock ticks since boot (Linux /proc), to tell a live claimant from a new
    process that reuses its pid; None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


class RunClaim:
    """The run directory's claim by this driver: `acquire` refuses (LaunchError) while another live driver holds
    it, and takes over a stale one; `release` removes it. Local storage creates the file exclusively (O_EXCL);
    an object store has no exclusive create in pyarrow, so there the claim is written and read back."""

    def __init__(self, cfg: TrainConfig):
        import socket
        import uuid

        self.cfg = cfg
        self.run = storage.join(cfg.storage_path, cfg.name)
        self.path = storage.join(self.run, CLAIM_FILE)
        self.mine = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "boot_id": _boot_id(),
                     "pid": os.getpid(), "pid_start": _process_start(os.getpid()), "started": time.time(),
                     "command": shlex.join(["python", "-m", "distgan.train", *sys.argv[1:]])}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[dict]:
        """The claim in the run directory: None when there is none, {} when it is torn or not a claim (a claim
        nobody can prove is live)."""
        data = storage.read_bytes(self.path)
        if data is None:
            return None
        try:
            claim = json.loads(data.decode())
        except ValueError:
            return {}
        return claim if isinstance(claim, dict) else {}

    def _write(self, exclusive: bool = False) -> None:
        data = json.dumps({**self.mine, "heartbeat": time.time()}).encode()
        if exclusive and not storage.is_uri(self.path):
            Path(self.run).mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # FileExistsError: taken
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return
        storage.write_bytes(self.path, data)  # atomic on a local disk; one PUT on an object store

    def _remove_stale(self) -> bool:
        """Removes a dead driver's claim; False when another taker removed it first. On a local disk it is renamed
        aside first, so that of two takers only one succeeds."""
        if storage.is_uri(self.path):
            return storage.delete(self.path)
        aside = f"{self.path}.stale-{self.mine['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return True

    def live(self, claim: dict) -> bool:
        """Whether the driver that wrote `claim` may still be running."""
        if not claim:
            return False
        same_machine = claim.get("host") == self.mine["host"] and claim.get("boot_id") == self.mine["boot_id"]
        if same_machine and isinstance(claim.get("pid"), int):
            start = _process_start(claim["pid"])
            if start is None:
                try:
                    os.kill(claim["pid"], 0)
                except ProcessLookupError:
                    return False
                except PermissionError:
                    return True
                return True
            return claim.get("pid_start") in (None, start)
        heartbeat = claim.get("heartbeat")
        return isinstance(heartbeat, (int, float)) and time.time() - heartbeat < CLAIM_STALE_S

    def _refuse(self, claim: dict) -> LaunchError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.get("started", 0)))
        return LaunchError(f"run {self.cfg.name} is in use by another driver (pid {claim.get('pid')} on "
                           f"{claim.get('host')}, since {since}; claim {self.path}); let it "
                           f"finish or stop it, or train under another --name")

    def acquire(self) -> "RunClaim":
        try:
            return self._acquire()
        except OSError as e:
            raise LaunchError(f"--storage-path: cannot claim run {self.cfg.name} at {self.run} for this driver "
                              f"({storage.first_line(e)})") from None

    def _acquire(self) -> "RunClaim":
        for _ in range(3):
            claim = self._read()
            if claim is not None and self.live(claim):
                raise self._refuse(claim)
            if claim is not None and not self._remove_stale():
                continue  # another driver took it over first; look again
            try:
                self._write(exclusive=True)
            except FileExistsError:
                continue
            if (self._read() or {}).get("token") == self.mine["token"]:
                break
        else:
            raise self._refuse(self._read() or {})
        self._thread = threading.Thread(target=self._heartbeat, name="run-claim", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(CLAIM_HEARTBEAT_S):
            try:
                self._write()
            except OSError:  # storage briefly unreachable: the next beat tries again
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if (self._read() or {}).get("token") == self.mine["token"]:
                storage.delete(self.path)
        except OSError:
            pass

    def __enter__(self) -> "RunClaim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once. `signum` is the signal (the exit code is 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnInterrupt:
    """The first Ctrl-C (SIGINT) or SIGTERM (`kill`, `timeout`, `ray job stop`, Kubernetes, SLURM, systemd) asks
    the workers to stop at the next step boundary and write a checkpoint (a note in the run directory that rank
    0 polls); a second one stops at once (StopNow). `signum` is the first signal's number, 0 before any."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.signum, self.previous = cfg, 0, {}

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise StopNow(signum)
        self.signum = signum
        what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else f"{signal.Signals(signum).name} again"
        try:
            worker.request_stop(self.cfg)
        except OSError as e:  # storage unreachable: the workers cannot hear us, only a hard stop is left
            print(f"\n{what}: cannot leave the stop request in the run directory ({e}); {again} to stop at once",
                  file=sys.stderr, flush=True)
            return
        print(f"\n{what}: the workers stop at the next step and write a checkpoint; {again} to stop at once",
              file=sys.stderr, flush=True)

    def clear(self) -> None:
        """Removes a request left by an earlier submission (or this one, once served)."""
        try:
            worker.clear_stop_request(self.cfg)
        except OSError:  # unreachable storage: the driver's other reads say so; a stale request cannot be read
            pass

    def __enter__(self) -> "StopOnInterrupt":
        self.clear()
        # Ray's driver installs a SIGTERM handler of its own (in C++: a stack dump, then abort, exit 134), which
        # Python's signal.signal replaces; getsignal cannot return it, so it is not restored afterwards
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.clear()


def fit_in_thread(trainer):
    """`trainer.fit()` off the main thread. Ray Train's fit() installs its own SIGINT handler (abort the run)
    only when called on the main thread; running it on another keeps StopOnInterrupt's graceful stop."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: the main thread must stay free to run the SIGINT handler
    if "error" in box:
        raise box["error"]
    return box["result"]


def resume_command(cfg: TrainConfig, argv: list[str]) -> str:
    """The command that continues this run: the same flags, with --storage-path and --name made explicit."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--name", "--storage-path"):
            skip = True
            continue
        if arg.startswith(("--name=", "--storage-path=")):
            continue
        args.append(arg)
    return shlex.join(["python", "-m", "distgan.train", *args, "--storage-path", cfg.storage_path,
                       "--name", cfg.name])


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
                 log=print) -> TrainConfig:
    """The config with --num-workers and --cpus-per-worker decided (distgan.hardware.plan_workers) for `nodes`
    (what Ray offers), validated again, checked against the checkpoint it resumes; prints the layout."""
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
    check_resume(sized, found)
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


def build_trainer(cfg: TrainConfig, use_gpu: bool, score_fid: bool, callbacks: tuple = ()):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distgan.loop import RANK_METRIC, train_loop_per_worker

    max_failures = cfg.max_failures if cfg.max_failures is not None else default_max_failures()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "env": _forwarded_env(), "score_fid": score_fid},
        scaling_config=scaling_config(cfg, use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.collective_timeout_s),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute=RANK_METRIC,  # every run, so a resubmission may turn evaluation on
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
            callbacks=list(callbacks),  # distgan.tune passes Ray Tune's report callback
        ),
    )


def check_resume(cfg: TrainConfig, found: Optional[tuple[str, dict]]) -> None:
    """Refuses a resubmission whose flags would change what the run's newest checkpoint means: the model's
    shape at any position; the data position's meaning (seed, batch, D steps, workers) mid-epoch. At an
    epoch boundary there is no position to misread, so those may change there."""
    from distgan.checkpoint import POSITION_FIELDS, model_mismatch

    if found is None:
        return
    where, state = found
    saved = config_from_dict(state["config"])
    mismatch = model_mismatch(saved, cfg)  # what the workers' check_compatible compares
    if mismatch:
        key, before, now = mismatch
        raise ConfigError(f"--{key.replace('_', '-')}: run {cfg.name} was checkpointed with {key}={before!r} "
                              f"({where}); this run has {now!r}, which changes the model; resubmit with "
                              f"{before!r} or use a new --name", field=key)
    g_steps_into_epoch = state.get("g_steps_into_epoch", 0)
    if not g_steps_into_epoch:
        return
    for key in POSITION_FIELDS:
        before = state.get("world_size", saved.num_workers) if key == "num_workers" else getattr(saved, key)
        now = getattr(cfg, key)
        if now is not None and before != now:  # None: auto, checked again once decided
            raise ConfigError(f"--{key.replace('_', '-')}: run {cfg.name} was checkpointed mid-epoch (epoch "
                              f"{state.get('epoch')}, G step {g_steps_into_epoch}) with {key}={before!r}; this run has "
                              f"{now!r}, which changes what that data position means; resubmit with {before!r}, "
                              f"or use a new --name", field=key)


def reconcile_run(cfg: TrainConfig, log=print) -> Optional[tuple[str, dict]]:
    """Makes Ray's record of the run (checkpoint_manager_snapshot.json) agree with the run directory before Ray
    reads it; returns (location, state) of the checkpoint the run resumes from, or None for a new run.

    Ray resumes from its record's latest checkpoint, refuses a record that names a missing directory, and
    without a record starts from step 0 and writes over the directories that exist. The two disagree when a
    directory was deleted (a person, a lifecycle rule, a lost disk) or a run ended before Ray registered its
    last checkpoint. So the run resumes from the newest checkpoint directory that exists and validates (the
    workers' load_state); newer ones that do not are skipped with a warning (resumed attempts name their
    checkpoints apart, so none is written over). The record is rewritten, checked against Ray's own schema,
    to name only existing directories, with that checkpoint as the latest and every RANK_METRIC finite.

    Raises LaunchError when the run has checkpoints, on disk or in the record, and none validates: a run is
    never started again from step 0 under its name."""
    from pyarrow.fs import FileType

    from distgan.checkpoint import CheckpointError, fetch_state
    from distgan.loop import RANK_METRIC, rank_of
    from distgan.sample import CHECKPOINT_NAME, RAY_SNAPSHOT, checkpoint_fids, checkpoint_order

    run = storage.join(cfg.storage_path, cfg.name)
    record_path = storage.join(run, RAY_SNAPSHOT)
    try:
        names = sorted((e.base_name for e in storage.entries(run)
                        if e.type == FileType.Directory and CHECKPOINT_NAME.fullmatch(e.base_name)),
                       key=checkpoint_order)
        raw = storage.read_bytes(record_path)
    except (OSError, ValueError) as e:  # unreachable or malformed storage: Ray Train reports it on its own
        log(f"WARNING: cannot list {run} to check its checkpoints before resuming ({storage.first_line(e)})")
        return None
    snapshot = None
    if raw is not None:
        try:
            snapshot = json.loads(raw)
        except ValueError:
            log(f"WARNING: {record_path} is not JSON (torn); rebuilt from the run directory")
    snapshot = snapshot if isinstance(snapshot, dict) else None
    results = list((snapshot or {}).get("checkpoint_results") or [])
    recorded = [r.get("checkpoint_dir_name") for r in results]
    latest = ((snapshot or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")

    skipped: list[str] = []
    target = None
    for name in reversed(names):
        where = storage.join(run, name)
        try:
            state = fetch_state(where if "://" in where else Path(where))
        except CheckpointError as e:
            log(f"WARNING: skipping checkpoint: {e}")
            skipped.append(name)
            continue
        target = name
        break
    if target is None:
        if not names and not recorded:
            return None
        what = (f"none of its {len(names)} checkpoints validates" if names else
                f"Ray's record names {', '.join(map(str, recorded))}, and none of them is in {run}")
        raise LaunchError(f"run {cfg.name}: {what}; a run is not started again from step 0 under its name: "
                          f"restore a checkpoint, or train under another --name")

    # the record's entries that exist and validate (or were not looked at: older than the target), the target
    indices = list((snapshot or {}).get("checkpoint_report_indices") or [])
    if len(indices) != len(results):
        indices = list(range(len(results)))
    current = int((snapshot or {}).get("current_report_index") or 0)
    kept = {r["checkpoint_dir_name"]: (dict(r.get("metrics") or {}), i) for r, i in zip(results, indices)
            if r.get("checkpoint_dir_name") in names and r.get("checkpoint_dir_name") not in skipped}
    if target not in kept:
        kept[target] = ({"step": state.get("step")}, max([current, *indices], default=-1) + 1)
        current = kept[target][1] + 1
    fids = checkpoint_fids(run, list(kept))
    for name, (metrics, _) in kept.items():
        rank = metrics.get(RANK_METRIC)
        if not (isinstance(rank, (int, float)) and math.isfinite(rank)):
            metrics[RANK_METRIC] = rank_of({"fid": fids.get(name)})
    # Ray keeps its list in ascending order of its key, (True, -rank) for "min": worst first, ties by report order
    order = sorted(kept, key=lambda n: (-kept[n][0][RANK_METRIC], kept[n][1]))

    def entry(name: str) -> dict:
        return {"version": 0, "checkpoint_dir_name": name, "metrics": kept[name][0]}

    pending = [(r, spec) for r, spec in zip((snapshot or {}).get("pending_training_results") or [],
                                            (snapshot or {}).get("pending_validation_specs") or [])
               if r.get("checkpoint_dir_name") in kept]
    import ray

    wanted = {
        **(snapshot or {"ray_version": ray.__version__}),
        "checkpoint_results": [entry(n) for n in order],
        "checkpoint_report_indices": [kept[n][1] for n in order],
        "latest_checkpoint_result": entry(target),
        "pending_training_results": [entry(r["checkpoint_dir_name"]) for r, _ in pending],
        "pending_validation_specs": [spec for _, spec in pending],
        "current_report_index": current,
        **{key: [n for n in (snapshot or {}).get(key) or [] if n in kept] for key in (
            "validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
            "failed_validation_checkpoint_dir_names")},
    }
    if wanted != snapshot:
        _write_ray_record(record_path, wanted)
    missing = [n for n in dict.fromkeys([*recorded, latest]) if n and n not in names]
    if snapshot is None:
        why = "Ray's record of the run was missing or torn; rebuilt it from the run directory"
    elif latest == target:
        why = ""
    elif latest in missing:
        why = f"Ray's latest, {latest}, is missing"
    elif latest in skipped:
        why = f"Ray's latest, {latest}, does not validate"
    else:
        why = f"Ray had not registered it (its latest was {latest})"
    others = [n for n in missing if n != latest]
    if others:
        why += f"{'; ' if why else ''}dropped missing {', '.join(others)} from Ray's record"
    if why:
        log(f"run {cfg.name}: resuming from {target}, the newest checkpoint that exists and validates ({why})")
    return storage.join(run, target), state


def _write_ray_record(location: str, record: dict) -> None:
    """Writes Ray Train's checkpoint_manager_snapshot.json after checking it against Ray's own schema (what its
    controller parses on start), so a record Ray cannot read is never left behind."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    _CheckpointManagerState.model_validate(record)
    storage.write_bytes(location, json.dumps(record, allow_nan=False).encode())


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def local_nodes(gpus: int) -> list:
    """This machine as a local run's Ray instance sees it (connect_ray gives it os.cpu_count() CPUs)."""
    from distgan.hardware import Node

    return [Node(os.cpu_count() or 1, gpus)]


def run(cfg: TrainConfig) -> dict:
    """Runs training; returns a summary dict. Raises ConfigError/LaunchError for user-fixable problems.

    Everything the driver can check is checked before Ray starts: values (parse_args), the data and the
    schedule, the run's newest checkpoint against these flags, and, for a local run, the hardware."""
    check_ray_address()
    # torch is imported from here on, not before: a bad flag is reported in a second
    from distgan.data import build_dataset, check_data_root

    check_data_root(cfg)
    check_schedule(cfg, len(build_dataset(cfg, "train")))
    claim = RunClaim(cfg).acquire()
    try:
        return _run_claimed(cfg)
    finally:
        claim.release()


def _run_claimed(cfg: TrainConfig) -> dict:
    """run(), from the moment this driver holds the run directory."""
    from distgan.loop import RANK_METRIC

    found = reconcile_run(cfg)
    check_resume(cfg, found)
    joining = bool(os.environ.get("RAY_ADDRESS"))
    if not joining:  # a local run's cluster is this machine
        gpus = local_gpu_count()
        if cfg.use_gpu and gpus == 0:
            raise ConfigError("--use-gpu: this machine has no CUDA GPU, and a local run uses only this machine "
                              "(set RAY_ADDRESS to join a cluster)", field="use_gpu")
        check_execution(cfg, cfg.use_gpu if cfg.use_gpu is not None else gpus >= 1)
        cfg = size_workers(cfg, local_nodes(gpus), cfg.use_gpu if cfg.use_gpu is not None else gpus >= 1, found)
    from distgan.metrics import metrics_supported

    t_submit = time.perf_counter()
    ray = connect_ray(cfg)
    if joining:  # GPU nodes an autoscaler has not started yet are not in cluster_resources()
        check_gpu_choice(cfg.use_gpu, ray.cluster_resources().get("GPU", 0), autoscaler_gpu_node_types())
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    if joining:  # the cluster's GPUs are known only now; still before any worker starts
        from distgan.hardware import ray_nodes

        check_execution(cfg, use_gpu)
        cfg = size_workers(cfg, ray_nodes(ray.nodes()), use_gpu, found)
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        print("note: --use-gpu and the cluster has no GPU yet; waiting for the autoscaler", flush=True)
    wait_for_placement(cfg, use_gpu)
    score_fid = cfg.eval_every > 0 and metrics_supported(cfg)[0]
    trainer = build_trainer(cfg, use_gpu, score_fid)
    worker.pop_stop_note(cfg)  # a note left by an earlier submission is stale now
    with StopOnInterrupt(cfg) as interrupt:
        result = fit_in_thread(trainer)
    wall = time.perf_counter() - t_submit
    ray.shutdown()  # flushes the workers' last lines now, so nothing prints after the summary
    metrics = result.metrics or {}
    best = None
    if score_fid and result.best_checkpoints:
        finite = [(c, m) for c, m in result.best_checkpoints if math.isfinite(m.get("fid", math.inf))]
        if finite:
            best = min(finite, key=lambda cm: cm[1]["fid"])
    # as the user names them: an s3:// storage path keeps its scheme (Ray's result paths drop it)
    run_dir = storage.join(cfg.storage_path, cfg.name)
    summary = {
        "run_dir": run_dir,
        "checkpoint": storage.join(run_dir, PurePosixPath(result.checkpoint.path).name) if result.checkpoint else None,
        "best_checkpoint": storage.join(run_dir, PurePosixPath(best[0].path).name) if best else None,
        "best_fid": best[1]["fid"] if best else None,
        "samples": storage.join(run_dir, "samples"),
        "metrics_jsonl": storage.join(run_dir, storage.METRICS_FILE),
        "resumed": found is not None,
        "wall_time_s": round(wall, 1),
        "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != RANK_METRIC},
        "num_workers": cfg.num_workers,
        "use_gpu": use_gpu,
        "precision": metrics.get("precision"),
    }
    stopped = worker.pop_stop_note(cfg)
    if stopped:
        summary["stopped"] = stopped
    summary["interrupted"] = interrupt.requested
    if interrupt.requested:
        summary["signal"] = signal.Signals(interrupt.signum).name
    return summary


def _exit_now(code: int) -> None:
    """Exit without waiting for the training thread, which is blocked inside Ray: stop Ray (a local instance's
    processes with it) within a bounded time, then leave."""
    import ray

    stopper = threading.Thread(target=ray.shutdown, daemon=True)
    stopper.start()
    stopper.join(timeout=15)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg = parse_args(argv)
        summary = run(cfg)
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        where = f": {resume_command(cfg, argv)}" if cfg is not None else ""
        print(f"interrupted at once; the last checkpoint is kept; to resume{where}", file=sys.stderr, flush=True)
        _exit_now(128 + getattr(e, "signum", signal.SIGINT))
    except Exception as e:  # Ray's TrainingFailedError and friends: one line, then where to look
        from distgan.checkpoint import CheckpointError

        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        kind = "checkpoint" if isinstance(cause, CheckpointError) else "training"
        msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        print(f"error: {kind} failed: {type(cause).__name__}: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    best = f" (FID {summary['best_fid']:.2f})" if summary["best_fid"] is not None else " (no evaluation ran)"
    print(f"\nrun directory  : {summary['run_dir']}\nsample grids   : {summary['samples']}\n"
          f"last checkpoint: {summary['checkpoint']}\nbest checkpoint: {summary['best_checkpoint'] or '-'}{best}\n"
          f"draw samples   : python -m distgan.sample --checkpoint {summary['run_dir']}")
    final = summary["final"]
    if "fid" in final:
        print(f"quality (EMA G, {summary['final'].get('step')} steps, vs the held-out digits): "
              f"FID {final['fid']:.2f}  KID {final['kid']:.4f}  classifier score {final['classifier_score']:.2f}  "
              f"coverage {final['coverage']:.3f}")
    if summary.get("stopped"):
        print(f"error: training stopped: {summary['stopped']}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        print(f"interrupted: checkpoint {summary['checkpoint']} written at step {final.get('step')}; to resume: "
              f"{resume_command(cfg, argv)}", file=sys.stderr)
        return 128 + signal.Signals[summary["signal"]]
    return 0


if __name__ == "__main__":
    sys.exit(main())
