"""Where a result came from: the machine, the library versions, the git commit. One helper for the tracker
(W&B config) and the benchmarks (their JSON), so every figure names its origin the same way.

    python -m distgan.provenance      # prints the three as JSON (bench/gpu_check.sh starts with it)

Versions are read from package metadata (importlib.metadata), never by importing the package: importing
ray or wandb costs seconds and, for wandb, may start a service process. torch is already imported by every
caller; it answers the CUDA questions (toolkit, GPU name).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "torchvision", "triton", "ray", "wandb")
# What the benchmarks measure: an uncommitted change under these makes a result "dirty".
SOURCE_DIRS = ("kernels", "bench", "distgan")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version, or None without one. /proc is read first: it needs no binary
    and cannot hang; nvidia-smi is the fallback (containers often hide /proc/driver/nvidia)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        words = text.split("Kernel Module", 1)[1].split()
        if words:
            return words[0]
    except (OSError, IndexError):
        pass
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def versions() -> dict[str, str | None]:
    """python, torch, torchvision, triton, ray, wandb (None when not installed), the CUDA toolkit torch was
    built with, the GPU's name and the driver (None without a GPU)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    out.update({name: _dist_version(name) for name in PACKAGES})
    out["torch"] = torch.__version__  # the running torch, even where its metadata is absent (source builds)
    gpu = torch.cuda.is_available()
    out["cuda"] = torch.version.cuda
    out["gpu"] = torch.cuda.get_device_name() if gpu else None
    out["driver"] = driver_version() if gpu else None
    return out


def machine() -> dict:
    """Platform, CPU model and count, load, and the GPUs torch sees."""
    gpu = torch.cuda.is_available()
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# Written by bench/make_gpu_bundle.sh: the commit the bundle was built from, for a copy of the tree without .git
BUNDLE_MANIFEST = REPO / ".gpu-bundle" / "manifest.json"


def git(repo: Path = REPO) -> dict:
    """HEAD's commit and whether tracked files under SOURCE_DIRS differ from it. A copy of the tree without .git
    (a GPU machine's) reads the commit its GPU bundle was built from, with "source": "bundle"; None when neither
    says."""

    def run(*args):
        try:
            proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.rstrip() if proc.returncode == 0 else None  # porcelain lines start with a space

    head = run("rev-parse", "HEAD")
    if head is None and repo == REPO and BUNDLE_MANIFEST.is_file():
        try:
            built = json.loads(BUNDLE_MANIFEST.read_text())["git"]
        except (OSError, ValueError, KeyError):
            built = {}
        return {"commit": built.get("commit"), "dirty": bool(built.get("dirty")), "dirty_files": [],
                "source": "bundle"}
    status = run("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_DIRS)
    return {"commit": head, "dirty": bool(status), "dirty_files": (status or "").splitlines()}


def collect() -> dict:
    """{"machine", "versions", "git"}: what every result file carries."""
    return {"machine": machine(), "versions": versions(), "git": git()}


if __name__ == "__main__":
    print(json.dumps(collect(), indent=1))
