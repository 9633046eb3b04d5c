"""What several test modules build the same way: small training configs and datasets, the two-rank spawn,
real checkpoints and Ray's record of them, the README's smoke commands. Test modules import from here, never
from one another."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from distgan.checkpoint import capture_rng, save_state
from distgan.config import TrainConfig
from distgan.data import mnist5k, to_model_range
from distgan.local import spawn
from distgan.models import build_models

REPO = Path(__file__).resolve().parent.parent

NUM_IMAGES = 64  # per-worker batch 4 x 2 workers -> 8 G steps an epoch


def small_dataset() -> TensorDataset:
    images, labels = mnist5k("train")
    return TensorDataset(to_model_range(images[:NUM_IMAGES]), torch.from_numpy(labels[:NUM_IMAGES]))


def make_cfg(tmp, **overrides) -> TrainConfig:
    base = dict(num_workers=2, batch_size=8, epochs=3, eval_every=1, checkpoint_every=1, eval_samples=64,
                wandb_mode="disabled", storage_path=str(tmp), name="t", seed=3, checkpoint_every_minutes=0,
                lr_decay_start=1.0)  # these runs stop early with --max-steps: a constant rate keeps their schedule
    return TrainConfig(**{**base, **overrides}).validate()


def spawn_and_load(fn, tmp: Path, stem: str, world: int = 2) -> list:
    """fn(rank, tmp) in `world` gloo processes; what each rank saved to tmp/<stem><rank>.pt."""
    spawn(fn, world, tmp, timeout_s=300)
    return [torch.load(tmp / f"{stem}{r}.pt", weights_only=False) for r in range(world)]


def plain_state(step: int = 3, **overrides) -> dict:
    """A checkpoint state that validates (distgan.checkpoint.load_state), with small tensors that differ by step."""
    torch.manual_seed(step)
    state = {"format": 2, "config": {"z_dim": 100, "image_size": 28}, "step": step, "epoch": 0,
             "g_steps_into_epoch": step, "generator": {"w": torch.randn(4, 3)}, "discriminator": {"w": torch.randn(2)},
             "opt_g": {"state": {}, "param_groups": []}, "opt_d": {"state": {}, "param_groups": []},
             "fixed_noise": torch.randn(2, 3), "rng": [capture_rng(torch.Generator())], "world_size": 1,
             "lr_scale": 1.0, "rollbacks": 0}
    state.update(overrides)
    return state


def make_checkpoint(directory: Path, step: int) -> Path:
    """A real checkpoint of the default models, with weights that differ by step."""
    torch.manual_seed(step)
    cfg = TrainConfig(name="sample-test", storage_path=str(directory.parent.parent), kernels="eager").validate()
    g, d = build_models(cfg)
    ema_g, _ = build_models(cfg)
    opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    state = {"format": 2, "config": cfg.to_dict(), "step": step, "epoch": 0, "g_steps_into_epoch": 0,
             "generator": g.state_dict(), "discriminator": d.state_dict(),
             "ema": {"model": ema_g.state_dict(), "num_updates": step, "decay": 0.999},
             "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "fixed_noise": torch.randn(4, cfg.z_dim),
             "rng": [capture_rng(torch.Generator())], "world_size": 1, "lr_scale": 1.0, "rollbacks": 0}
    save_state(state, directory)
    return directory


def ray_snapshot(fids: dict[str, float]) -> dict:
    """The fields of Ray Train's checkpoint_manager_snapshot.json that matter here (an unevaluated
    checkpoint is reported with fid inf, which Ray's JSON writes as null)."""
    results = [{"version": 0, "checkpoint_dir_name": name,
                "metrics": {"step": int(name.split("_")[1]), "fid": fid if math.isfinite(fid) else None}}
               for name, fid in fids.items()]
    return {"ray_version": "2.x", "checkpoint_results": results, "checkpoint_report_indices": [],
            "latest_checkpoint_result": results[-1], "pending_training_results": [], "current_report_index": 0}


def readme_smoke_commands() -> list[list[str]]:
    """The README's first bash block made only of `python -m distgan.*` commands (the short run and the samples
    drawn from it), one argv a line, comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
        if commands and all(c[:2] == ["python", "-m"] and c[2].startswith("distgan.") for c in commands):
            return commands
    raise AssertionError("README.md has no bash block of `python -m distgan.*` commands")


def run_module(module: str, *args, env: dict | None = None, cwd: Path | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m <module> args` in a child process that imports this checkout, its output captured."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def load_bench_script(name: str):
    """bench/<name>.py as a module (bench/ holds scripts, not a package), imported once a session."""
    import importlib.util

    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def wait_for(predicate, timeout: float, what: str) -> None:
    """Polls `predicate` every half second; AssertionError naming `what` after `timeout` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


class Background:
    """`argv` run in the background in a process group of its own (so a test can signal the whole group, as a
    terminal or `timeout` does), its stdout and stderr in `log`; `wait_for_log(text)` waits until the log says
    `text` or the process ends. A context manager that SIGKILLs the group if it still runs at the end."""

    def __init__(self, argv: list, log: Path, env: dict, cwd: Path = REPO):
        import subprocess

        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([str(a) for a in argv], env=env, cwd=cwd, stdout=self._out,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_log(self, text: str, timeout: float = 240) -> None:
        wait_for(lambda: text in self.text() or self.proc.poll() is not None, timeout, f"{text!r} in {self.log}")

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._out.close()
