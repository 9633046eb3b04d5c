"""The GPU check's pre-flight: one line, in seconds, before any stage spends device time, naming what the later
stages would fail on. Checks every module they import, the NVIDIA driver the installed torch build needs, what
Triton needs to build its launcher (a C compiler, Python's headers), and free space in /tmp and /dev/shm.

    python bench/_preflight.py      # from the project root with the project on PYTHONPATH; exit 0 or 1
    python bench/_preflight.py --rehearse   # bench/gpu_check.sh --rehearse, on a CPU machine: no driver check

Prints `preflight: OK (...)` or `preflight: FAIL: <each missing piece>; ...`.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional

# What the stages import (pytest's GPU tests, bench/kernels.py, the faults run through Ray, bench/train.py),
# the lazy imports inside functions included: importing the project's modules alone would not reach those.
MODULES = (
    "torch", "torchvision", "torchvision.utils", "triton", "triton.testing", "numpy", "yaml", "pyarrow",
    "pyarrow.fs", "pytest", "mlxtend", "matplotlib.figure", "matplotlib.backends.backend_agg",
    "torchmetrics.image.fid", "torchmetrics.image.kid",
    "ray", "ray.train", "ray.train.torch", "ray.experimental.tqdm_ray", "ray.util.placement_group",
    "distgan.train", "distgan.loop", "distgan.trainer", "distgan.hardware", "distgan.metrics", "distgan.tracking",
    "distgan.provenance",
    "kernels",
)

# NVIDIA's minor-version compatibility: a build for CUDA major X runs on any driver from this version on
# (docs.nvidia.com/deploy/cuda-compatibility, "Minor Version Compatibility", table 1 and its note on 11.x).
MIN_DRIVER = {11: (450, 80, 2), 12: (525,), 13: (580,)}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _lacking(error: Optional[BaseException]) -> Optional[str]:
    """The module an ImportError comes down to, through the errors it was raised from (Ray re-raises a missing
    dependency as "Can't import ray.train as some dependencies are missing")."""
    while error is not None:
        if isinstance(error, ImportError) and getattr(error, "name", None):
            return error.name
        error = error.__cause__ or error.__context__
    return None


def missing_modules(modules=MODULES) -> list[str]:
    """Each module that does not import, as `name`, `name (needs <the module it lacks>)` or `name (<why>)`."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            lacks = _lacking(e)
            if lacks == name:
                missing.append(name)
            else:
                missing.append(f"{name} (needs {lacks})" if lacks else f"{name} ({str(e).splitlines()[0]})")
        except Exception as e:  # a module that imports but breaks on import is as missing for the stages
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return missing


def driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version, from nvidia-smi or /proc; None without a driver."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        match = re.search(r"Kernel Module\s+(\d+(?:\.\d+)+)", Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def driver_problem(cuda: Optional[str], driver: Optional[str]) -> Optional[str]:
    """Why the torch build (built for CUDA `cuda`, e.g. "12.8"; None for a CPU build) cannot use this driver."""
    if cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if driver is None:
        return f"no NVIDIA driver found (torch is built for CUDA {cuda})"
    need = MIN_DRIVER.get(int(cuda.split(".")[0]))
    if need is not None and _version(driver) < need:
        return (f"NVIDIA driver {driver} is older than {'.'.join(map(str, need))}, the oldest that runs torch's "
                f"CUDA {cuda} build")
    return None


def launcher_problems(environ=os.environ) -> list[str]:
    """What Triton lacks to compile its launcher: the compiler it looks for (CC, else clang, else gcc) and the
    Python.h of the include directory it passes (triton/runtime/build.py)."""
    problems = []
    cc = environ.get("CC")
    if not (cc and shutil.which(cc)) and not shutil.which("clang") and not shutil.which("gcc"):
        problems.append("no C compiler for Triton's launcher (set CC, or install gcc or clang)")
    include = sysconfig.get_paths(scheme=sysconfig.get_default_scheme())["include"]
    if not Path(include, "Python.h").is_file():
        problems.append(f"no Python.h in {include} for Triton's launcher (install the python3-dev package)")
    return problems


# Room the stages need: /tmp holds the runs' checkpoints (~40 MB each), Ray's session, Triton's and inductor's
# caches and the logs; /dev/shm holds Ray's object store and NCCL's buffers (Docker's default of 64 MB is
# too small for either).
MIN_FREE = {"/tmp": 2 << 30, "/dev/shm": 512 << 20}


def space_problems(minimum=MIN_FREE) -> list[str]:
    """Each directory of `minimum` with less free space than it needs, with what it has."""
    problems = []
    for where, need in minimum.items():
        try:
            free = shutil.disk_usage(where).free
        except OSError as e:
            problems.append(f"cannot read the free space of {where} ({e.strerror})")
            continue
        if free < need:
            problems.append(f"{where} has {free / 2**20:.0f} MiB free, the stages need {need / 2**20:.0f} MiB")
    return problems


def preflight(rehearse: bool = False) -> tuple[bool, str]:
    """(everything there?, the one line to print). A rehearsal on a CPU machine checks all but the driver."""
    problems = []
    missing = missing_modules()
    if missing:
        problems.append("missing modules: " + ", ".join(missing)
                        + " (bench/make_gpu_bundle.sh packs them: EXTRA='<pip names>' for those it lacks)")
    cuda = driver = None
    if "torch" not in missing:
        import torch

        cuda, driver = torch.version.cuda, driver_version()
        problem = None if rehearse else driver_problem(cuda, driver)
        if problem:
            problems.append(problem)
    problems += launcher_problems() + space_problems()
    if problems:
        return False, "preflight: FAIL: " + "; ".join(problems)
    cc = os.environ.get("CC") or shutil.which("clang") or shutil.which("gcc")
    room = ", ".join(f"{w} {shutil.disk_usage(w).free / 2**30:.1f} GiB free" for w in MIN_FREE)
    return True, (f"preflight: OK (python {sys.version.split()[0]}, {len(MODULES)} modules, torch CUDA {cuda}, "
                  f"driver {'not checked (rehearsal)' if rehearse else driver}, C compiler {cc}, {room})")


def main() -> int:
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script, bench/ comes first, and bench/kernels.py would shadow the package
    ok, line = preflight(rehearse="--rehearse" in sys.argv[1:])
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
