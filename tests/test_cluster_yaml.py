"""cluster.yaml: Ray's own validation (schema + config rules) plus the rules Ray does not check.

Three layers, in the order `ray up` would meet them:
  schema  - the file as written, against ray/autoscaler/ray-schema.json from the installed ray package
            (unknown keys anywhere, incl. inside `docker` and node types; resources: integers >= 0).
  ray     - Ray's own offline steps of `ray up` (ray.autoscaler._private.commands._bootstrap_config):
            prepare_config() (merge with aws/defaults.yaml, merge setup commands, docker check, per-type
            min/max defaults) then validate_config() (schema again on the merged config, head type
            defined, sum of min_workers <= global max_workers). The next step, the AWS provider's
            bootstrap_config, needs boto3 and AWS credentials, so it is not run here.
  distgan - what Ray does not check: per-type min <= max, per-type max <= global max, resources that are
            real ints (the schema's "integer" accepts 1.0), an explicit GPU worker type, no default security
            group (Ray's opens SSH to 0.0.0.0/0), no dashboard ingress, token auth on every node, no
            inline secrets, shared storage, and the Ray pin matching the installed Ray.

No network: a fixture makes any socket connect fail while validating.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
DASHBOARD_PORT = 8265
SHARED_STORAGE = re.compile(r"^s3://[^/\s]+/\S*$|^/mnt/\S+$")  # an object store distgan reads, or a mounted FS


class ClusterConfigError(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(f"[{stage}] {message}")
        self.stage = stage


# ------------------------------------------------------------------------------------------------ layers


def schema_check(cfg: dict) -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(cfg))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<top level>"
        raise ClusterConfigError("schema", f"{where}: {error.message}")


def ray_check(cfg: dict) -> dict:
    """Ray's offline validation, as `ray up` runs it; returns the prepared (defaults-merged) config."""
    try:
        prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, AssertionError, RuntimeError, KeyError) as e:
        msg = e.message if isinstance(e, jsonschema.ValidationError) else str(e)
        raise ClusterConfigError("ray", f"{type(e).__name__}: {msg}") from None
    return prepared


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _commands(cfg: dict, key: str) -> list[str]:
    return list(cfg.get(key) or [])


def _all_strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _all_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_strings(v)


def distgan_problems(cfg: dict) -> list[str]:
    """Rules Ray does not enforce. Runs on the file as written (not the defaults-merged config)."""
    problems: list[str] = []
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    global_max = cfg.get("max_workers")

    # -- node types and counts
    if head is None:
        problems.append("head_node_type must be set explicitly (Ray would silently use its default name)")
    elif head not in types:
        problems.append(f"head_node_type {head!r} is not in available_node_types")
    if not _is_int(global_max) or global_max < 0:
        problems.append(f"global max_workers must be set to an integer >= 0, got {global_max!r}")
    for name, nt in types.items():
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers")
        if name == head:
            if lo != 0 or hi not in (None, 0):
                problems.append(f"{name}: the head type takes min_workers/max_workers 0 (got {lo}/{hi})")
            continue
        if not (_is_int(lo) and lo >= 0):
            problems.append(f"{name}: min_workers must be an integer >= 0, got {lo!r}")
        if not (_is_int(hi) and hi >= 0):
            problems.append(f"{name}: max_workers must be set to an integer >= 0, got {hi!r}")
        elif _is_int(lo) and lo > hi:
            problems.append(f"{name}: min_workers {lo} > max_workers {hi}")
        if _is_int(hi) and _is_int(global_max) and hi > global_max:
            problems.append(f"{name}: max_workers {hi} > global max_workers {global_max} (never reachable)")

    # -- resources: real non-negative ints, written out (not left to instance-type autodetection)
    for name, nt in types.items():
        res = nt.get("resources") or {}
        for key in ("CPU", "GPU"):
            if key not in res:
                problems.append(f"{name}: resources.{key} must be set explicitly")
        for key, value in res.items():
            if not _is_int(value) or value < 0:
                problems.append(f"{name}: resources.{key} = {value!r} must be a non-negative integer "
                                "(whole GPUs only)")
    gpu_types = [n for n, nt in types.items() if n != head and _is_int((nt.get("resources") or {}).get("GPU"))
                 and nt["resources"]["GPU"] >= 1 and _is_int(nt.get("max_workers")) and nt["max_workers"] >= 1]
    if not gpu_types:
        problems.append("no worker node type with GPU >= 1 and max_workers >= 1")

    # -- network exposure
    for name, nt in types.items():
        if not (nt.get("node_config") or {}).get("SecurityGroupIds"):
            problems.append(f"{name}: node_config.SecurityGroupIds missing: Ray would create its default "
                            "security group, which allows SSH from 0.0.0.0/0")
    for rule in ((cfg.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []:
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        if rule.get("IpProtocol") in ("-1", -1) or lo == -1 or lo <= DASHBOARD_PORT <= hi:
            problems.append(f"provider.security_group opens port {DASHBOARD_PORT} (or all ports): {rule}")
        for rng in (rule.get("IpRanges") or []) + (rule.get("Ipv6Ranges") or []):
            cidr = rng.get("CidrIp") or rng.get("CidrIpv6") or ""
            if cidr in ("0.0.0.0/0", "::/0"):
                problems.append(f"provider.security_group allows {cidr}: {rule}")
    meta = ((cfg.get("metadata") or {}).get("distgan") or {})
    cidr = str(meta.get("ssh_ingress_cidr", ""))
    try:
        if ipaddress.ip_network(cidr, strict=False).prefixlen == 0:
            problems.append("metadata.distgan.ssh_ingress_cidr must not be the whole internet")
    except ValueError:
        if not cidr.startswith("YOUR"):  # the placeholder the user fills in
            problems.append(f"metadata.distgan.ssh_ingress_cidr {cidr!r} is neither a CIDR nor the placeholder")

    # -- token auth on every node, token provisioned by file_mounts
    mounts = cfg.get("file_mounts") or {}
    if "~/.ray/auth_token" not in mounts:
        problems.append("file_mounts must provision ~/.ray/auth_token (the Ray token) on every node")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in _commands(cfg, key) if "ray start" in c]
        if not starts:
            problems.append(f"{key}: no `ray start` command")
        for c in starts:
            if "RAY_AUTH_MODE=token" not in c:
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token: {c!r}")

    # -- secrets: W&B key only via the mode-600 env file sourced by the start commands
    if "~/.distgan/wandb.env" not in mounts:
        problems.append("file_mounts must provision ~/.distgan/wandb.env (W&B key file)")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for c in _commands(cfg, key):
            if "ray start" in c and ". ~/.distgan/wandb.env" not in c:
                problems.append(f"{key}: `ray start` does not source ~/.distgan/wandb.env: {c!r}")
    if not any(re.search(r"chmod 600 [^;&|]*~/\.distgan/wandb\.env", c) for c in _commands(cfg, "setup_commands")):
        problems.append("setup_commands must chmod 600 ~/.distgan/wandb.env")
    for s in _all_strings({k: v for k, v in cfg.items() if k != "metadata"}):
        if re.search(r"WANDB_API_KEY\s*=\s*[\"']?[A-Za-z0-9_\-]", s) or "--runtime-env" in s:
            problems.append(f"secret passed inline (or via a job runtime env): {s!r}")

    # -- shared storage for multi-node checkpoints
    storage = str(meta.get("storage_path", ""))
    if not SHARED_STORAGE.match(storage):
        problems.append(f"metadata.distgan.storage_path {storage!r} is not shared storage (s3:// "
                        "or an NFS/EFS mount under /mnt)")

    # -- the cluster's Ray must match the client's Ray
    pins = {m for c in _commands(cfg, "setup_commands") for m in re.findall(r"ray\[[^\]]*\]==([\w.]+)", c)}
    if pins != {ray.__version__}:
        problems.append(f"setup_commands pin Ray {sorted(pins) or 'nowhere'}; the installed Ray is {ray.__version__}")
    return problems


def check_cluster_config(cfg: dict) -> dict:
    """All three layers; raises ClusterConfigError naming the first failing layer. Returns Ray's config."""
    schema_check(cfg)
    prepared = ray_check(cfg)
    problems = distgan_problems(cfg)
    if problems:
        raise ClusterConfigError("distgan", "; ".join(problems))
    return prepared


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during offline validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


# ------------------------------------------------------------------------------------------------ the file


def test_cluster_yaml_passes_all_layers(cluster_cfg, no_network):
    original = copy.deepcopy(cluster_cfg)
    prepared = check_cluster_config(cluster_cfg)
    assert cluster_cfg == original, "validation must not modify the config"
    # what Ray made of it: our node types only, head pinned at 0 workers, commands merged per role
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker"}
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert prepared["head_setup_commands"][-1] == 'pip install "boto3>=1.26"'
    assert prepared["worker_setup_commands"] == cluster_cfg["setup_commands"]
    assert prepared["docker"] == {}  # from aws/defaults.yaml: empty = no container


def test_every_top_level_key_is_set_explicitly(cluster_cfg):
    """fillout_defaults merges top-level keys from aws/defaults.yaml: any key we leave out silently takes
    Ray's default (e.g. its setup_commands install a nightly Ray wheel). Leave out only `docker`."""
    schema_keys = set(json.loads(RAY_SCHEMA.read_text())["properties"])
    defaults = yaml.safe_load((Path(ray.autoscaler.__file__).parent / "aws" / "defaults.yaml").read_text())
    missing = sorted((set(defaults) & schema_keys) - set(cluster_cfg) - {"docker"})
    assert not missing, f"cluster.yaml relies on Ray's defaults for {missing}"


def test_file_mounts_ship_what_pip_install_needs_and_not_the_venv(cluster_cfg):
    """`ray up` hashes every mounted local path in full (rsync excludes do not apply to the hash), so
    mounting the repo root would read .venv on every run. Mount exactly what `pip install` needs."""
    import tomllib

    root = CLUSTER_YAML.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"], *pyproject["tool"]["setuptools"]["packages"]}
    repo_mounts = {remote: local for remote, local in cluster_cfg["file_mounts"].items()
                   if not local.startswith("~")}
    for remote, local in repo_mounts.items():
        assert (root / local).resolve() != root, f"{remote}: mounts the whole repo (and its .venv)"
        assert remote == f"~/distgan-src/{local}", f"{remote}: the repo layout must be kept under ~/distgan-src"
    assert set(repo_mounts.values()) == needed
    for local in needed - {pyproject["project"]["readme"]}:  # the README is being written separately
        assert (root / local).exists(), f"file_mounts source {local} does not exist"
    assert "pip install ~/distgan-src" in cluster_cfg["setup_commands"]


def test_raw_file_has_no_secret_looking_values():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"\b[0-9a-f]{40}\b", text), "a 40-hex-digit string (W&B key format) is in cluster.yaml"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is in cluster.yaml"
    assert "8265" not in re.sub(r"#.*", "", text), "nothing in the config may mention the dashboard port"


# ------------------------------------------------------------------------------------------------ mutations


def _at(path: str, change: Callable[[dict, str], None]) -> Callable[[dict], None]:
    """A mutation of the config's dotted `path`: change(the parent mapping, the leaf key)."""
    *parents, leaf = path.split(".")

    def mutate(cfg: dict) -> None:
        node = cfg
        for p in parents:
            node = node[p]
        change(node, leaf)

    return mutate


def _set(path: str, value: Any) -> Callable[[dict], None]:
    return _at(path, lambda node, leaf: node.__setitem__(leaf, value))


def _delete(path: str) -> Callable[[dict], None]:
    return _at(path, lambda node, leaf: node.__delitem__(leaf))


def _both(*fns: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        for fn in fns:
            fn(cfg)

    return mutate


def _edit_start(key: str, old: str, new: str) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        cfg[key] = [c.replace(old, new) for c in cfg[key]]

    return mutate


W = "available_node_types.gpu_worker"
MUTATIONS = [
    # (id, mutation, layer that must reject it, message pattern)
    ("unknown-top-level-key", _set("storage_path", "s3://b/distgan"), "schema", "Additional properties"),
    ("unknown-node-type-key", _set(f"{W}.min_worker", 1), "schema", "Additional properties"),
    ("unknown-docker-key", _set("docker", {"image": "rayproject/ray:2.60.0-gpu", "container_name": "ray",
                                           "gpus": "all"}), "schema", "Additional properties"),
    ("fractional-gpu", _set(f"{W}.resources.GPU", 0.5), "schema", "is not of type 'integer'"),
    ("negative-cpu", _set(f"{W}.resources.CPU", -1), "schema", "less than the minimum"),
    ("head-type-not-defined", _delete("available_node_types.head"), "ray", "head_node_type"),
    ("head-node-type-key-missing", _delete("head_node_type"), "ray", "head_node_type"),
    ("sum-of-minimums-over-global-max",
     _both(_set("max_workers", 2), _set(f"{W}.min_workers", 3), _set(f"{W}.max_workers", 3)),
     "ray", "sum of `min_workers`"),
    ("float-gpu-1.0", _set(f"{W}.resources.GPU", 1.0), "distgan", "non-negative integer"),
    ("min-over-max", _both(_set(f"{W}.min_workers", 3), _set(f"{W}.max_workers", 2)), "distgan",
     "min_workers 3 > max_workers 2"),
    ("type-max-over-global-max", _set(f"{W}.max_workers", 8), "distgan", "never reachable"),
    ("no-gpu-worker", _set(f"{W}.resources.GPU", 0), "distgan", "no worker node type with GPU"),
    ("autodetected-resources", _set(f"{W}.resources", {}), "distgan", "resources.GPU must be set"),
    ("default-security-group", _delete(f"{W}.node_config.SecurityGroupIds"), "distgan", "0.0.0.0/0"),
    ("dashboard-ingress", _set("provider.security_group", {"GroupName": "distgan", "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
     "distgan", "opens port 8265"),
    ("ssh-from-anywhere", _set("metadata.distgan.ssh_ingress_cidr", "0.0.0.0/0"), "distgan", "whole internet"),
    ("worker-without-token-auth", _edit_start("worker_start_ray_commands", "export RAY_AUTH_MODE=token &&", ""),
     "distgan", "without RAY_AUTH_MODE=token"),
    ("token-not-provisioned", lambda cfg: cfg["file_mounts"].pop("~/.ray/auth_token"), "distgan", "auth_token"),
    ("inline-wandb-key", _set("worker_setup_commands", ["echo 'export WANDB_API_KEY=0123abc' >> ~/.bashrc"]),
     "distgan", "secret passed inline"),
    ("key-file-not-sourced", _edit_start("head_start_ray_commands", "set -a && . ~/.distgan/wandb.env && set +a && ",
                                         ""), "distgan", "does not source"),
    ("node-local-storage", _set("metadata.distgan.storage_path", "./runs"), "distgan", "not shared storage"),
    ("ray-version-drift", _set("setup_commands", [c.replace(f"=={ray.__version__}", "==2.40.0") for c in
                                                  yaml.safe_load(CLUSTER_YAML.read_text())["setup_commands"]]),
     "distgan", "the installed Ray is"),
]


@pytest.mark.parametrize("mutate, stage, pattern", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_broken_config_is_rejected(cluster_cfg, no_network, mutate, stage, pattern):
    cfg = copy.deepcopy(cluster_cfg)
    mutate(cfg)
    with pytest.raises(ClusterConfigError) as info:
        check_cluster_config(cfg)
    assert info.value.stage == stage, str(info.value)
    assert pattern in str(info.value), str(info.value)


@pytest.mark.parametrize("mutate", [_set("storage_path", "s3://b/distgan"), _set(f"{W}.resources.GPU", 0.5),
                                    _delete("available_node_types.head")],
                         ids=["unknown-key", "fractional-gpu", "missing-head-type"])
def test_rays_own_validation_rejects_the_core_mutations(cluster_cfg, no_network, mutate):
    """The three mutations the issue names fail in Ray's validation by itself, not only in our rules."""
    cfg = copy.deepcopy(cluster_cfg)
    mutate(cfg)
    with pytest.raises(ClusterConfigError) as info:
        ray_check(cfg)
    assert info.value.stage == "ray"
