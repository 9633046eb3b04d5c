"""A real single-node Ray cluster on loopback for the tests, started and stopped by its own command.

`ray start --head --block` runs in its own session; stopping it (SIGTERM) shuts down the processes it
started, and anything left in that session is killed, so the tests never touch another Ray cluster.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


class LocalRayCluster:
    def __init__(self, num_cpus: int = 3, node_env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.node_env = node_env or {}  # what a provisioned node's environment holds (e.g. WANDB_API_KEY)
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a limit
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.token = secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver or `ray job submit` client of this cluster (token auth on)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_ADDRESS=self.address, **extra)
        return env

    def start(self, timeout: float = 120) -> "LocalRayCluster":
        env = {**self.client_env(), **self.node_env}
        env.pop("RAY_ADDRESS")
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [ray_bin, "start", "--head", "--block", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(self.temp_dir) / 'ray_start.log').read_text()[-2000:]}")
            if self._job_agent_ready():
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError("local Ray cluster did not come up in time")

    def _job_agent_ready(self) -> bool:
        req = urllib.request.Request(f"{self.dashboard_url}/api/jobs/",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status != 200:
                    return False
        except OSError:
            return False
        # the job agent on the head node answers only once the raylet has registered
        try:
            proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address={self.address}"],
                                  env=self.client_env(), capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: ask again until start()'s deadline
            return False
        return proc.returncode == 0 and "Active" in proc.stdout

    def stop(self) -> None:
        if self.proc is None:
            return
        sid = os.getsid(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:  # whatever has not exited by then is killed below
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None
        self.log.close()
