"""Training state on disk: atomic writes, weights_only loads, validation before anything is trusted.

A checkpoint directory holds one file, `state.pt`: plain tensors, numbers, strings and containers only,
so `torch.load(weights_only=True)` can read it without unpickling code.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from distgan import storage
from distgan.storage import atomic_write, first_line

# 2: the data position's key is g_steps_into_epoch (format 1 named it batch_in_epoch; it counts G steps, each of
# which takes n_critic batches). Format-1 files are read (upgrade()).
FORMAT_VERSION = 2
STATE_FILE = "state.pt"
# Config fields that change tensor shapes or what the weights mean: a mismatch is not resumable.
MODEL_FIELDS = ("dataset", "image_size", "channels", "z_dim")
REQUIRED_KEYS = ("format", "config", "step", "epoch", "g_steps_into_epoch", "generator", "discriminator",
                 "opt_g", "opt_d", "fixed_noise", "rng", "world_size", "lr_scale", "rollbacks")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted, or written; the message names the file."""


def write_error(where: str, error: OSError, newest: Optional[str]) -> CheckpointError:
    """The one line for a checkpoint that could not be written to `where` (nothing is left under its name):
    why (a full device is said in words) and `newest`, the newest valid checkpoint, to resume from."""
    full = error.errno == errno.ENOSPC or "No space left on device" in str(error)
    why = "the device is full (no space left)" if full else first_line(error, with_type=True)
    fix = "free space" if full else "fix that"
    then = (f"the newest valid checkpoint is {newest}: {fix}, then run the same command to resume from it" if newest
            else f"there is no earlier checkpoint: {fix}, then run the same command to start again")
    return CheckpointError(f"cannot write checkpoint {where}: {why}; nothing was left under that name; {then}")


# ------------------------------------------------------------------ RNG state as plain tensors


def capture_rng(noise_gen: torch.Generator, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every RNG stream a training rank draws from, as weights_only-loadable values: the global torch CPU
    generator, the training device's CUDA generator (when it is one), the noise generator, numpy, python."""
    device = torch.device(device)
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "device_type": device.type, "torch": torch.get_rng_state(), "noise": noise_gen.get_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], noise_gen: torch.Generator, device: torch.device | str = "cpu") -> bool:
    """Restores what capture_rng saved. Returns False, touching nothing, when the state was captured on another
    device kind (a CPU generator's state does not fit a CUDA generator, nor the reverse)."""
    device = torch.device(device)
    if state.get("device_type", "cuda" if "cuda" in state else "cpu") != device.type:
        return False
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    return True


# ------------------------------------------------------------------ write


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names of floating-point tensors in a nested state that hold NaN or Inf."""
    bad: list[str] = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not torch.isfinite(tree).all():
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            bad += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            bad += nonfinite_tensors(v, f"{prefix}[{i}]")
    return bad


def _nonfinite_weights(state: dict[str, Any]) -> list[str]:
    return nonfinite_tensors({k: state[k] for k in ("generator", "discriminator", "ema", "opt_g", "opt_d")
                              if k in state})


def save_state(state: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Writes state.pt atomically: a crash mid-write leaves the previous file or none, never half a file."""
    bad = _nonfinite_weights(state)
    if bad:
        raise CheckpointError(f"refusing to save non-finite values: {', '.join(bad[:5])}")
    return atomic_write(Path(directory) / STATE_FILE, lambda tmp: torch.save(state, tmp))


# ------------------------------------------------------------------ read


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an older format in the current one (the same dict, keys renamed); others as they are."""
    if state.get("format", 1) == 1 and "batch_in_epoch" in state:
        state["g_steps_into_epoch"] = state.pop("batch_in_epoch")
        state["format"] = FORMAT_VERSION
    return state


def load_state(directory: str | os.PathLike, where: Optional[str] = None) -> dict[str, Any]:
    """Loads and validates state.pt. Raises CheckpointError naming the file (or `where`, the name to show for
    it, e.g. the URI a downloaded copy came from) on anything wrong."""
    path = Path(directory) / STATE_FILE
    name = where or str(path)
    if not path.is_file():
        raise CheckpointError(f"{name}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first paragraph advises weights_only=False, the one thing not to do with this file; what the
        # file holds is in the paragraphs after it, then a pointer to torch's docs
        detail = [" ".join(p.split()) for p in re.split(r"\n\s*\n", str(e))[1:]
                  if p.strip() and not p.strip().startswith("Check the documentation")]
        raise CheckpointError(f"{name}: refused: holds objects other than plain tensors/containers"
                              f"{' (' + ' '.join(detail) + ')' if detail else ''}") from None
    except Exception as e:  # a torn file fails anywhere in the unpickler (EOFError, struct.error, ...)
        reason = re.match(r".+?\.(?=\s|$)", first_line(e))  # the first sentence; torch adds advice after it
        raise CheckpointError(f"{name}: unreadable, truncated or corrupt ({type(e).__name__}: "
                              f"{reason.group(0) if reason else first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: not a distgan checkpoint (top level is {type(state).__name__})")
    state = upgrade(state)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{name}: not a distgan checkpoint (missing {', '.join(missing)})")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{name}: format {state['format']} not supported (expected {FORMAT_VERSION})")
    bad = _nonfinite_weights(state)
    if bad:
        raise CheckpointError(f"{name}: holds non-finite values in {', '.join(bad[:5])}")
    return state


def fetch_state(location: str | os.PathLike) -> dict[str, Any]:
    """load_state for a checkpoint directory given as a local path or a URI (s3://): a URI's state.pt is
    downloaded to a temporary directory first, and errors name the URI. Unreachable storage raises OSError."""
    if not storage.is_uri(location):
        return load_state(location)
    import tempfile

    where = storage.join(location, STATE_FILE)
    with tempfile.TemporaryDirectory(prefix="distgan-checkpoint-") as tmp:
        if not storage.download(where, Path(tmp) / STATE_FILE):
            raise CheckpointError(f"{where}: missing")
        return load_state(tmp, where=where)


def model_mismatch(saved, now) -> Optional[tuple[str, Any, Any]]:
    """(field, saved value, this run's value) of the first MODEL_FIELDS entry on which two TrainConfigs differ,
    compared by effective value (channels unset = the dataset's); None when the weights fit."""
    for key in MODEL_FIELDS:
        before, after = (saved.image_channels, now.image_channels) if key == "channels" else \
            (getattr(saved, key), getattr(now, key))
        if before != after:
            return key, before, after
    return None


def check_compatible(state: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Refuses a checkpoint whose model-shaping fields differ from this run's (model_mismatch)."""
    from distgan.config import config_from_dict

    mismatch = model_mismatch(config_from_dict(state["config"]), config_from_dict(config))
    if mismatch:
        key, before, after = mismatch
        raise CheckpointError(f"{where}: saved with {key}={before!r}, this run has {after!r}; "
                              f"use a new --name to start fresh")


def load_into(state: dict[str, Any], where: str, **targets) -> None:
    """load_state_dict for each target (modules, optimizers); shape or key mismatches name the file."""
    for key, target in targets.items():
        try:
            target.load_state_dict(state[key])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: {key} does not match this model ({first_line(e)})") from None


# ------------------------------------------------------------------------------ what a resumed run must keep

# Fields that fix what the saved data position (epoch, g_steps_into_epoch) means: the sampler's order depends on
# the seed and the world size, and the offset into it on the per-worker batch and D steps per G step.
POSITION_FIELDS = ("seed", "batch_size", "n_critic", "num_workers")
