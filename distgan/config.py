"""TrainConfig: one dataclass, the CLI generated from it, YAML overrides, validation on the driver.

Everything here runs before Ray starts, so a bad value costs the user a second, not a cluster spin-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

DATASETS = ("mnist5k", "mnist", "fashion-mnist", "cifar10", "folder")
IMAGE_SIZES = (28, 32, 64)
KERNEL_IMPLS = ("auto", "triton", "eager")
BN_POLICIES = ("local", "sync")
WANDB_MODES = ("online", "offline", "disabled")
NAN_POLICIES = ("rollback", "stop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line and exits 2."""


@dataclass
class TrainConfig:
    # --- data
    dataset: str = field(default="mnist5k", metadata={"help": f"one of {', '.join(DATASETS)}"})
    data_root: Optional[str] = field(default=None, metadata={"help": "dataset directory (not for mnist5k)"})
    download: bool = field(default=False, metadata={"help": "let torchvision download mnist/fashion-mnist/cifar10"})
    image_size: int = field(default=28, metadata={"help": f"square image side, one of {IMAGE_SIZES}"})
    channels: Optional[int] = field(default=None, metadata={"help": "1 or 3; default from the dataset"})
    # --- schedule
    epochs: int = field(default=20, metadata={"help": "passes over the training split"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many G steps"})
    batch_size: int = field(default=64, metadata={"help": "GLOBAL batch, split evenly across workers"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: Optional[bool] = field(default=None, metadata={"help": "default: use GPUs when the cluster has them"})
    # --- optimisation (the seed's recipe)
    lr_g: float = field(default=2e-4, metadata={"help": "generator Adam learning rate"})
    lr_d: float = field(default=2e-4, metadata={"help": "discriminator Adam learning rate"})
    beta1: float = field(default=0.5, metadata={"help": "Adam beta1 (both optimizers)"})
    beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (both optimizers)"})
    n_critic: int = field(default=1, metadata={"help": "D steps per G step"})
    label_smoothing: float = field(default=0.0, metadata={"help": "one-sided: real label = 1 - this"})
    z_dim: int = field(default=100, metadata={"help": "latent noise dimension"})
    negative_slope: float = field(default=0.2, metadata={"help": "LeakyReLU slope"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of G for samples and metrics; 0 = off"})
    seed: int = field(default=0, metadata={"help": "init, data order and noise (noise uses seed + rank)"})
    # --- model execution
    kernels: str = field(default="auto", metadata={"help": f"one of {', '.join(KERNEL_IMPLS)}"})
    bn: str = field(default="local", metadata={"help": "BatchNorm statistics: local (per worker) or sync"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the hardware runs it fast, else "
                                                             "fp32), fp32, bf16, or fp16 (CUDA only)"})
    # --- outputs and checkpoints
    storage_path: str = field(default="./runs", metadata={"help": "Ray storage path (local dir, NFS or s3://)"})
    name: Optional[str] = field(default=None, metadata={"help": "run name; same name = resume"})
    checkpoint_every: int = field(default=5, metadata={"help": "epochs between checkpoints (each is also evaluated)"})
    checkpoint_every_steps: int = field(default=0, metadata={"help": "also checkpoint every N steps; 0 = off"})
    checkpoint_every_minutes: float = field(default=3.0, metadata={"help": "also checkpoint when this many "
                                                                           "minutes passed since the last; 0 = off"})
    num_to_keep: int = field(default=3, metadata={"help": "checkpoints kept (best by FID when measured)"})
    # --- fault tolerance
    max_failures: Optional[int] = field(default=None, metadata={"help": "worker-group restarts; default 2"})
    nan_policy: str = field(default="rollback", metadata={"help": "on a non-finite loss: rollback or stop"})
    max_rollbacks: int = field(default=3, metadata={"help": "rollbacks before giving up"})
    rollback_lr_factor: float = field(default=0.5, metadata={"help": "LR multiplier applied on each rollback"})
    collective_timeout_s: int = field(default=120, metadata={"help": "process-group timeout: dead peer -> failure"})
    placement_timeout_s: int = field(default=60, metadata={"help": "give up when workers cannot be placed"})
    placement_strategy: str = field(default="PACK", metadata={"help": "PACK or SPREAD workers over nodes"})
    # --- tracking and evaluation
    log_every: int = field(default=10, metadata={"help": "steps between metric logs"})
    eval_every: int = field(default=5, metadata={"help": "epochs between quality evaluations; 0 = off"})
    eval_samples: int = field(default=1000, metadata={"help": "generated images per evaluation"})
    wandb_project: Optional[str] = field(default=None, metadata={"help": "W&B project; default WANDB_PROJECT, "
                                                                      "else distgan"})
    wandb_mode: Optional[str] = field(default=None, metadata={"help": "online/offline/disabled; default offline "
                                                                      "unless WANDB_API_KEY is set"})
    wandb_group: Optional[str] = field(default=None, metadata={"help": "W&B group, e.g. for a sweep"})
    config: Optional[str] = field(default=None, metadata={"help": "YAML file whose keys override the defaults"})

    # ---------------------------------------------------------------- derived
    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.num_workers

    @property
    def image_channels(self) -> int:
        if self.channels is not None:
            return self.channels
        return 3 if self.dataset in ("cifar10", "folder") else 1

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Checks every value; raises ConfigError naming the flag. Fills in derived defaults."""

        def bad(flag: str, why: str) -> ConfigError:
            return ConfigError(f"--{flag.replace('_', '-')}: {why}")

        if self.dataset not in DATASETS:
            raise bad("dataset", f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.image_size not in IMAGE_SIZES:
            raise bad("image_size", f"{self.image_size} not supported; choose one of {IMAGE_SIZES}")
        if self.channels not in (None, 1, 3):
            raise bad("channels", f"must be 1 or 3, got {self.channels}")
        for name in ("epochs", "batch_size", "num_workers", "n_critic", "z_dim", "checkpoint_every",
                     "num_to_keep", "log_every", "eval_samples", "collective_timeout_s", "placement_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, f"must be a positive integer, got {value!r}")
        for name in ("max_steps",):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise bad(name, f"must be a positive integer, got {value!r}")
        for name in ("checkpoint_every_steps", "eval_every", "max_rollbacks", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, f"must be a non-negative integer, got {value!r}")
        if self.max_failures is not None and (not isinstance(self.max_failures, int) or self.max_failures < -1):
            raise bad("max_failures", f"must be >= -1 (-1 = retry forever), got {self.max_failures!r}")
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise bad(name, f"must be in (0, 1), got {value!r}")
        for name in ("beta1", "beta2", "ema_decay", "label_smoothing"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise bad(name, f"must be in [0, 1), got {value!r}")
        if not (isinstance(self.rollback_lr_factor, (int, float)) and 0 < self.rollback_lr_factor <= 1):
            raise bad("rollback_lr_factor", f"must be in (0, 1], got {self.rollback_lr_factor!r}")
        if not (isinstance(self.negative_slope, (int, float)) and 0 <= self.negative_slope < 1):
            raise bad("negative_slope", f"must be in [0, 1), got {self.negative_slope!r}")
        if self.batch_size % self.num_workers:
            raise bad("batch_size", f"global batch {self.batch_size} is not divisible by "
                                    f"--num-workers {self.num_workers}")
        if self.batch_size // self.num_workers < 2:
            raise bad("batch_size", "each worker needs at least 2 images for BatchNorm statistics")
        if self.kernels not in KERNEL_IMPLS:
            raise bad("kernels", f"unknown {self.kernels!r}; choose one of {', '.join(KERNEL_IMPLS)}")
        if self.bn not in BN_POLICIES:
            raise bad("bn", f"unknown {self.bn!r}; choose one of {', '.join(BN_POLICIES)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"unknown {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not (isinstance(self.checkpoint_every_minutes, (int, float)) and 0 <= self.checkpoint_every_minutes):
            raise bad("checkpoint_every_minutes", f"must be >= 0, got {self.checkpoint_every_minutes!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise bad("nan_policy", f"unknown {self.nan_policy!r}; choose one of {', '.join(NAN_POLICIES)}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise bad("placement_strategy", f"unknown {self.placement_strategy!r}")
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise bad("wandb_mode", f"unknown {self.wandb_mode!r}; choose one of {', '.join(WANDB_MODES)}")
        if self.dataset == "mnist5k":
            if self.data_root is not None:
                raise bad("data_root", "mnist5k is embedded in the package and takes no data root")
            if self.image_channels != 1:
                raise bad("channels", "mnist5k is grayscale: channels must be 1")
        elif self.data_root is None:
            raise bad("data_root", f"dataset {self.dataset!r} needs --data-root DIR")
        if self.name is None:
            self.name = time.strftime("distgan-%Y%m%d-%H%M%S")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", self.name):
            raise bad("name", f"{self.name!r} must be letters, digits, '.', '_' or '-' (no path separators)")
        if "://" not in self.storage_path:
            self.storage_path = str(Path(self.storage_path).expanduser().resolve())
            parent = Path(self.storage_path)
            while not parent.exists():
                parent = parent.parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise bad("storage_path", f"{self.storage_path} is not writable")
        return self


# -------------------------------------------------------------------- CLI

_TYPES = {"int": int, "float": float, "str": str}


def _field_type(f: dataclasses.Field) -> str:
    t = str(f.type).replace("Optional[", "").rstrip("]")
    return t


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):
        # one line naming the flag, not the 30-line usage block
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="python -m distgan.train",
        description="Train the DCGAN with Ray Train + PyTorch DDP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", " ")
        kind = _field_type(f)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=_TYPES[kind], default=f.default, help=help_text,
                                metavar=f.name.upper())
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config: {path} has unknown option(s): {', '.join(unknown)}")
    return data


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """CLI > YAML > dataclass defaults. Raises ConfigError (argparse errors exit 2 by themselves)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    if args.config:
        overrides = load_yaml(args.config)
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for key, value in overrides.items():
            if values[key] == defaults[key]:  # the command line wins over the file
                values[key] = value
    return TrainConfig(**values).validate()


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})
