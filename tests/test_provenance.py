"""distgan.provenance: one record of machine, versions and git commit for the tracker and the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from distgan import provenance, tracking

REPO = Path(__file__).resolve().parent.parent
KEYS = {"python", "torch", "torchvision", "triton", "ray", "wandb", "cuda", "gpu", "driver"}


def test_versions_name_every_library_and_the_accelerator():
    v = provenance.versions()
    assert set(v) == KEYS
    assert v["torch"] == torch.__version__ and v["cuda"] == torch.version.cuda
    if not torch.cuda.is_available():
        assert v["gpu"] is None and v["driver"] is None


def test_the_tracker_records_the_same_versions():
    assert tracking.versions() == provenance.versions()


def test_collecting_imports_neither_ray_nor_wandb():
    code = ("import sys, json; from distgan import provenance; p = provenance.collect(); "
            "print(json.dumps([p['versions']['ray'], 'ray' in sys.modules, 'wandb' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True)
    ray_version, ray_imported, wandb_imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not ray_imported and not wandb_imported
    assert ray_version  # read from the package metadata instead


def test_git_names_the_commit_and_whether_sources_changed(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "op.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("a\n")
    git("add", ".")
    git("commit", "-qm", "init")
    clean = provenance.git(tmp_path)
    assert clean["commit"] == git("rev-parse", "HEAD") and clean["dirty"] is False
    (tmp_path / "notes.txt").write_text("b\n")  # outside the measured sources: still clean
    assert provenance.git(tmp_path)["dirty"] is False
    (tmp_path / "kernels" / "op.py").write_text("x = 2\n")
    dirty = provenance.git(tmp_path)
    assert dirty["dirty"] is True and dirty["dirty_files"] == [" M kernels/op.py"]


def test_outside_a_checkout_git_is_unknown_not_an_error(tmp_path):
    assert provenance.git(tmp_path)["commit"] is None


def test_machine_and_the_command_line():
    m = provenance.machine()
    assert m["cpu_count"] and m["processor"] and m["gpu_count"] == torch.cuda.device_count()
    proc = subprocess.run([sys.executable, "-m", "distgan.provenance"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
    assert set(json.loads(proc.stdout)) == {"machine", "versions", "git"}


def test_a_copy_without_git_reads_the_commit_its_gpu_bundle_was_built_from(tmp_path, monkeypatch):
    """A device machine gets the working tree without .git: results then name the bundle's commit."""
    manifest = tmp_path / ".gpu-bundle" / "manifest.json"
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    monkeypatch.setattr(provenance, "BUNDLE_MANIFEST", manifest)
    assert provenance.git(tmp_path)["commit"] is None  # no .git, no bundle: nothing to say
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"git": {"commit": "a2c0ce7", "dirty": False}}))
    assert provenance.git(tmp_path) == {"commit": "a2c0ce7", "dirty": False, "dirty_files": [], "source": "bundle"}
