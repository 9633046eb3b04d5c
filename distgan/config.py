"""TrainConfig: one dataclass, its validation, and the driver's checks of it against the data and the hardware.

Everything here runs before Ray starts, so a bad value costs the user a second, not a cluster spin-up. The
command line and the `--config` YAML file that fill a TrainConfig in are distgan/cli.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from distgan import storage

DATASETS = ("mnist5k", "mnist", "fashion-mnist", "cifar10", "folder", "prepared")
DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10")  # what torchvision can fetch; mnist5k is embedded
IMAGE_SIZES = (28, 32, 64)
KERNEL_IMPLS = ("auto", "triton", "eager")
BN_POLICIES = ("local", "sync")
WANDB_MODES = ("online", "offline", "disabled")
NAN_POLICIES = ("rollback", "stop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENT_OPS = ("color", "translation", "cutout")  # DiffAugment's ops (distgan/augment.py)
ADA_POLICY = ("translation", "cutout")  # what plain `--augment ada` adapts: DiffAugment's pick for small data
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# On a cluster, preemptions are expected: restart the worker group from the last checkpoint. A local run's
# failures are bugs or bad input, and retrying them only delays the error. cluster.default_max_failures applies these.
MAX_FAILURES_LOCAL, MAX_FAILURES_CLUSTER = 0, 2
# Fields whose value may be "auto" (stored as None until the driver decides it; distgan.hardware)
AUTO_FIELDS = ("num_workers", "cpus_per_worker")
# numpy seeds each rank with seed + rank, and numpy takes seeds below 2**32
SEED_LIMIT = 2**32
# FID and KID need two generated images at least (a covariance); fewer would fail in rank 0 mid-run
MIN_EVAL_SAMPLES = 2
# W&B refuses these in a project name; a refused wandb.init would silently fall back to offline
WANDB_NAME_FORBIDDEN = set("/\\#?%:")
WANDB_NAME_MAX = 128
# What a schedule may switch mid-run: values the Trainer can change between two steps without rebuilding anything
# (the optimizers' rates and betas, the EMA's decay, the label, the augmentation probability). What shapes the
# model, the data position or the run's length stays fixed for a run.
SCHEDULE_FIELDS = ("lr_g", "lr_d", "beta1", "beta2", "ema_decay", "label_smoothing", "augment_p")
# `ray job submit` hands the job's config (runtime env included) to the driver in this variable
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _is_colour(value: str) -> bool:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(value)
    except ValueError:
        return False
    return True


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line and exits 2.

    `field` is the TrainConfig field the message names (when it names one), so a caller can say where the
    value came from."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class LaunchError(RuntimeError):
    """A run that cannot start for a reason outside its values (Ray unreachable, the run held by another driver,
    its checkpoints all invalid); the CLI prints it as one line and exits 2, before any worker starts."""


class DataError(ConfigError):
    """A dataset that cannot be read; the message names the path."""


def _opt(default: Any, help: str, shown: Optional[str] = None) -> Any:
    """A field with its --help text; `shown` describes the default when the literal is not the whole truth
    (None that means "decided at run time", a relative path resolved later)."""
    return field(default=default, metadata={"help": help, **({"shown": shown} if shown else {})})


@dataclass
class TrainConfig:
    # --- data
    dataset: str = _opt("mnist5k", f"one of {', '.join(DATASETS)}")
    data_root: Optional[str] = _opt(None, "dataset directory (not for mnist5k); a prepared dataset's may be s3://",
                                    "none")
    download: bool = _opt(False, f"let torchvision download {'/'.join(DOWNLOADABLE)}")
    image_size: int = _opt(28, f"square image side, one of {IMAGE_SIZES}")
    channels: Optional[int] = _opt(None, "1 or 3", "from the dataset: 3 for cifar10, folder and prepared, else 1")
    alpha_background: str = _opt("white", "colour that transparent pixels of folder images are composited over "
                                          "(a colour name or #rrggbb)")
    # --- schedule
    epochs: int = _opt(38, "passes over the training split")
    max_steps: Optional[int] = _opt(None, "stop after this many G steps", "none (all --epochs)")
    batch_size: int = _opt(64, "GLOBAL batch, split evenly across workers")
    # --- optimisation (configs/tf-tutorial.yaml keeps the TensorFlow tutorial's recipe one flag away)
    lr_g: float = _opt(1e-3, "generator Adam learning rate (the TensorFlow tutorial's: 2e-4)")
    lr_d: float = _opt(1e-3, "discriminator Adam learning rate (the TensorFlow tutorial's: 2e-4)")
    lr_decay_start: float = _opt(0.5, "fraction of the run after which both learning rates decay linearly toward "
                                      "0, reached just after the last step (pix2pix/CycleGAN's schedule); 1 = "
                                      "constant (the TensorFlow tutorial's)")
    beta1: float = _opt(0.5, "Adam beta1 (both optimizers)")
    beta2: float = _opt(0.999, "Adam beta2 (both optimizers)")
    n_critic: int = _opt(1, "D steps per G step")
    label_smoothing: float = _opt(0.0, "one-sided: real label = 1 - this")
    z_dim: int = _opt(100, "latent noise dimension")
    negative_slope: float = _opt(0.2, "LeakyReLU slope")
    ema_decay: float = _opt(0.999, "EMA of G for samples and metrics; 0 = off")
    seed: int = _opt(0, "init, data order and noise (noise uses seed + rank)")
    # --- augmentation of what D sees (distgan/augment.py)
    augment: str = _opt("off", "off; a DiffAugment policy of comma-separated ops from color, translation, cutout "
                               "(e.g. translation,cutout); or ada (adaptive p over translation,cutout; ada:<ops> "
                               "for others)")
    augment_p: Optional[float] = _opt(None, "probability each op applies to an image (ada: the starting p)",
                                      "1 for a policy, 0 for ada")
    ada_target: float = _opt(0.6, "ada: the target of r_t = E[sign D(real)] (StyleGAN2-ADA's 0.6)")
    ada_kimg: float = _opt(100.0, "ada: thousands of real images over which p can move from 0 to 1")
    # --- hyper-parameters that change at given steps (a PBT search's replay file writes one)
    schedule: Optional[str] = _opt(None, "values that switch at given G steps, as YAML/JSON: [{step: 310, lr_g: "
                                         "1.6e-4}, ...] (in a --config file, a list); each entry holds from the "
                                         "step after `step` on; fields: " + ", ".join(SCHEDULE_FIELDS),
                                    "none")
    # --- model execution
    num_workers: Optional[int] = _opt(None, "Ray Train workers (DDP ranks); auto: every GPU, as many as keep 16 "
                                            "images a worker for --bn local's BatchNorm statistics; on CPU 2 "
                                            "(the recipe's 32 images a worker)", "auto")
    cpus_per_worker: Optional[int] = _opt(None, "Ray CPUs per worker, and its torch threads",
                                          "auto: the node's CPUs shared among its workers")
    use_gpu: Optional[bool] = _opt(None, "one GPU per worker, NCCL; --no-use-gpu: CPU, gloo",
                                   "use GPUs when the cluster has them")
    kernels: str = _opt("auto", "triton (fused kernels; on CPU only with TRITON_INTERPRET=1), eager, or auto "
                                "(triton on CUDA, else eager)")
    bn: str = _opt("local", "BatchNorm statistics: local (per worker) or sync")
    precision: str = _opt("auto", "auto (bf16 on CUDA sm_80+; elsewhere the faster of fp32 and bf16, measured "
                                  "on this machine at the run's shapes and cached), fp32, bf16, or fp16 (CUDA only)")
    # --- outputs and checkpoints
    storage_path: str = _opt("./runs", "Ray storage path (local dir, NFS or s3://); inside `ray job submit` "
                                       "it must be absolute or a URI")
    name: Optional[str] = _opt(None, "run name; same name = resume", "distgan-<date>-<time>-<6 hex digits>")
    init_from: Optional[str] = _opt(None, "fork: start this new run from another run's checkpoint (a checkpoint "
                                          "directory, or a run directory for its newest valid one; local or "
                                          "s3://), with this run's hyper-parameters; ignored once the run has "
                                          "checkpoints of its own", "none")
    checkpoint_every: int = _opt(10, "epochs between checkpoints (each is also evaluated)")
    checkpoint_every_steps: int = _opt(0, "also checkpoint every N steps; 0 = off")
    checkpoint_every_minutes: float = _opt(3.0, "also checkpoint when this many minutes passed since the "
                                                "last; 0 = off")
    num_to_keep: int = _opt(3, "checkpoints kept (best by FID when measured)")
    # --- fault tolerance
    max_failures: Optional[int] = _opt(None, "worker-group restarts; -1 = forever",
                                       f"{MAX_FAILURES_LOCAL} for a local run, {MAX_FAILURES_CLUSTER} when "
                                       f"joining a cluster (RAY_ADDRESS)")
    nan_policy: str = _opt("rollback", "on a non-finite loss: rollback or stop")
    max_rollbacks: int = _opt(3, "rollbacks before giving up")
    rollback_lr_factor: float = _opt(0.5, "LR multiplier applied on each rollback")
    collective_timeout_s: int = _opt(120, "process-group timeout: dead peer -> failure")
    placement_timeout_s: int = _opt(60, "give up when workers cannot be placed")
    placement_strategy: str = _opt("PACK", "PACK or SPREAD workers over nodes (or STRICT_PACK, STRICT_SPREAD)")
    # --- tracking and evaluation
    log_every: int = _opt(10, "steps between metric logs")
    eval_every: int = _opt(10, "epochs between quality evaluations; 0 = off")
    eval_samples: int = _opt(1000, f"generated images per evaluation (at least {MIN_EVAL_SAMPLES})")
    wandb_project: Optional[str] = _opt(None, "W&B project", "WANDB_PROJECT, else distgan")
    wandb_mode: Optional[str] = _opt(None, f"one of {', '.join(WANDB_MODES)}",
                                     "WANDB_MODE, else online when WANDB_API_KEY is set, else offline")
    wandb_group: Optional[str] = _opt(None, "W&B group, e.g. for a sweep", "none")
    # --- general
    config: Optional[str] = _opt(None, "YAML file whose keys (flag names) override the defaults; typed flags "
                                       "override the file", "none")
    verbose: bool = _opt(False, "show Ray's full output")

    # ---------------------------------------------------------------- derived
    @property
    def per_worker_batch(self) -> int:
        if self.num_workers is None:
            raise ValueError("per_worker_batch: --num-workers auto is decided by the driver (distgan.hardware)")
        return self.batch_size // self.num_workers

    def uses_gpu(self, gpus: float) -> bool:
        """Whether the workers run on GPUs: --use-gpu when given, else whether the machine or cluster has `gpus`."""
        return self.use_gpu if self.use_gpu is not None else gpus >= 1

    @property
    def images_per_g_step(self) -> int:
        """Real images D sees per G step over all ranks: the global batch, once per D step."""
        return self.batch_size * self.n_critic

    def steps_per_epoch(self, num_images: int) -> int:
        """G steps in one epoch of `num_images` training images (every rank draws an equal share of whole
        batches: DistributedSampler with drop_last)."""
        return num_images // self.images_per_g_step

    @property
    def image_channels(self) -> int:
        if self.channels is not None:
            return self.channels
        return 3 if self.dataset in ("cifar10", "folder", "prepared") else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Checks every value's type, range and combination; raises ConfigError naming the flag. Fills in
        derived defaults (name, absolute storage path). Checks that need the data or the hardware are
        `check_schedule` and `check_execution`."""

        def bad(flag: str, why: str) -> ConfigError:
            return ConfigError(f"{_flag(flag)}: {why}", field=flag)

        for f in fields(self):
            kind, optional = _field_kind(f)
            if not _has_type(getattr(self, f.name), kind, optional):
                raise bad(f.name, f"expected {_KIND_NAMES[kind]}{' or none' if optional else ''}, "
                                  f"got {getattr(self, f.name)!r}")
        if self.dataset not in DATASETS:
            raise bad("dataset", f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.image_size not in IMAGE_SIZES:
            raise bad("image_size", f"{self.image_size} not supported; choose one of {IMAGE_SIZES}")
        if self.channels not in (None, 1, 3):
            raise bad("channels", f"must be 1 or 3, got {self.channels}")
        if not _is_colour(self.alpha_background):
            raise bad("alpha_background", f"{self.alpha_background!r} is not a colour; give a name (white, black) "
                                          f"or #rrggbb")
        for name in AUTO_FIELDS:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise bad(name, f"must be a positive integer or auto, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "n_critic", "z_dim", "checkpoint_every",
                     "num_to_keep", "log_every", "eval_samples", "collective_timeout_s", "placement_timeout_s"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise bad("max_steps", f"must be a positive integer, got {self.max_steps!r}")
        for name in ("checkpoint_every_steps", "eval_every", "max_rollbacks", "seed"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be a non-negative integer, got {getattr(self, name)!r}")
        workers = self.num_workers or 1  # auto is checked again once decided
        if self.seed + workers > SEED_LIMIT:
            raise bad("seed", f"must be at most 2**32 - --num-workers = {SEED_LIMIT - workers} (numpy "
                              f"seeds each rank with seed + rank), got {self.seed}")
        if self.max_failures is not None and self.max_failures < -1:
            raise bad("max_failures", f"must be >= -1 (-1 = retry forever), got {self.max_failures!r}")
        for name in ("lr_g", "lr_d"):
            if not 0 < getattr(self, name) < 1:
                raise bad(name, f"must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "ema_decay", "label_smoothing", "negative_slope"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, f"must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.lr_decay_start <= 1:
            raise bad("lr_decay_start", f"must be in [0, 1] (1 = constant), got {self.lr_decay_start!r}")
        if not 0 < self.rollback_lr_factor <= 1:
            raise bad("rollback_lr_factor", f"must be in (0, 1], got {self.rollback_lr_factor!r}")
        if self.checkpoint_every_minutes < 0:
            raise bad("checkpoint_every_minutes", f"must be >= 0 (0 = off), got {self.checkpoint_every_minutes!r}")
        if self.batch_size % workers:
            raise bad("batch_size", f"global batch {self.batch_size} is not divisible by "
                                    f"--num-workers {self.num_workers}")
        if self.batch_size // workers < 2:
            raise bad("batch_size", "each worker needs at least 2 images for BatchNorm statistics")
        if self.eval_every and self.eval_samples < MIN_EVAL_SAMPLES:
            raise bad("eval_samples", f"FID and KID need at least {MIN_EVAL_SAMPLES} generated images, got "
                                      f"{self.eval_samples} (or --eval-every 0 to turn evaluation off)")
        for name, choices in (("kernels", KERNEL_IMPLS), ("bn", BN_POLICIES), ("precision", PRECISIONS),
                              ("nan_policy", NAN_POLICIES), ("placement_strategy", PLACEMENT_STRATEGIES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"unknown {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        if self.precision == "fp16" and self.use_gpu is False:
            raise bad("precision", "fp16 is CUDA only (autocast fp16 and its GradScaler), and --no-use-gpu "
                                   "runs on CPU; use bf16 or fp32")
        self._validate_augment(bad)
        self._validate_schedule()
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise bad("wandb_mode", f"unknown {self.wandb_mode!r}; choose one of {', '.join(WANDB_MODES)}")
        for name in ("wandb_project", "wandb_group"):
            value = getattr(self, name)
            if value is not None and (not value or len(value) > WANDB_NAME_MAX
                                      or WANDB_NAME_FORBIDDEN & set(value)):
                raise bad(name, f"{value!r} must be 1-{WANDB_NAME_MAX} characters without "
                                f"{' '.join(sorted(WANDB_NAME_FORBIDDEN))}")
        for check in (self._validate_data_and_name, self._validate_storage_path, self._validate_init_from):
            check(bad)
        return self

    def _validate_augment(self, bad) -> None:
        try:
            adaptive, ops = parse_augment(self.augment)
        except ValueError as e:
            raise bad("augment", str(e)) from None
        if self.augment_p is not None:
            if not ops:
                raise bad("augment_p", "needs --augment (a policy or ada); --augment is off")
            if not 0 <= self.augment_p <= 1:
                raise bad("augment_p", f"must be in [0, 1], got {self.augment_p!r}")
        if not 0 < self.ada_target < 1:
            raise bad("ada_target", f"must be in (0, 1) (r_t is a mean of signs), got {self.ada_target!r}")
        if self.ada_kimg <= 0:
            raise bad("ada_kimg", f"must be positive, got {self.ada_kimg!r}")

    def _validate_schedule(self) -> None:
        """Every entry of --schedule parses and, applied over the flags and the entries before it, makes a valid
        config; the text is rewritten in its one canonical form (JSON), which checkpoints and W&B record."""
        if self.schedule is None:
            return
        entries = parse_schedule(self.schedule)
        values: dict[str, Any] = {}
        for entry in entries:
            step, changes = entry["step"], {k: v for k, v in entry.items() if k != "step"}
            if "ema_decay" in changes and (changes["ema_decay"] == 0) != (self.ema_decay == 0):
                raise ConfigError(f"--schedule: step {step}: ema_decay {changes['ema_decay']!r}: a schedule "
                                  f"cannot turn the EMA on or off (--ema-decay {self.ema_decay!r})",
                                  field="schedule")
            values.update(changes)
            try:
                dataclasses.replace(self, schedule=None, **values).validate()
            except ConfigError as e:
                raise ConfigError(f"--schedule: step {step}: {e}", field="schedule") from None
        self.schedule = schedule_text(entries)

    def _validate_data_and_name(self, bad) -> None:
        if self.dataset == "mnist5k":
            if self.data_root is not None:
                raise bad("data_root", "mnist5k is embedded in the package and takes no data root")
            if self.image_channels != 1:
                raise bad("channels", "mnist5k is grayscale: channels must be 1")
        elif self.data_root is None:
            raise bad("data_root", f"dataset {self.dataset!r} needs --data-root DIR")
        elif storage.is_uri(self.data_root):  # a prepared dataset in a bucket (python -m distgan.prepare)
            if self.dataset != "prepared":
                raise bad("data_root", f"{self.data_root!r}: only a prepared dataset (--dataset prepared) is read "
                                       f"from a URI; give {self.dataset} a local directory")
            problem = storage.location_problem(self.data_root)
            if problem:
                raise bad("data_root", f"{self.data_root!r} {problem}")
        else:
            # Ray Train runs every worker in a working directory of its own: a relative root would be looked up
            # there, so it is resolved here, against the directory the user typed it in
            self.data_root = str(Path(self.data_root).expanduser().resolve())
        if self.download and self.dataset not in DOWNLOADABLE:
            raise bad("download", f"dataset {self.dataset!r} cannot be downloaded (only "
                                  f"{', '.join(DOWNLOADABLE)})")
        if self.name is None:
            self.name = default_run_name()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", self.name):
            raise bad("name", f"{self.name!r} must be letters, digits, '.', '_' or '-' (no path separators)")

    def _validate_storage_path(self, bad) -> None:
        problem = storage.location_problem(self.storage_path)
        if problem:
            raise bad("storage_path", f"{self.storage_path!r} {problem}")
        if storage.is_uri(self.storage_path):
            return
        if not Path(self.storage_path).expanduser().is_absolute() and inside_ray_job():
            # `ray job submit --working-dir .` runs the driver in a temporary copy of the directory: a run
            # stored there is deleted with it, and the next submission would start again from step 0.
            raise bad("storage_path", f"{self.storage_path!r} is relative, and inside a Ray job it would resolve "
                                      f"into the job's temporary working directory ({os.getcwd()}), so a "
                                      f"resubmission could not resume; pass an absolute path every node can "
                                      f"reach (NFS) or a URI (s3://bucket/prefix)")
        self.storage_path = str(Path(self.storage_path).expanduser().resolve())
        problem = storage.directory_problem(Path(self.storage_path))
        if problem:
            raise bad("storage_path", problem)

    def _validate_init_from(self, bad) -> None:
        """The location's form only; whether it holds a checkpoint that fits this run is the driver's pre-flight
        (distgan.fork.parent_checkpoint)."""
        if self.init_from is None:
            return
        if not self.init_from.strip():
            raise bad("init_from", "give a checkpoint directory or a run directory")
        problem = storage.location_problem(self.init_from)
        if problem:
            raise bad("init_from", f"{self.init_from!r} {problem}")
        if not storage.is_uri(self.init_from):  # resolved where the user typed it, as --data-root is
            self.init_from = str(Path(self.init_from).expanduser().resolve())


def default_run_name() -> str:
    """`distgan-<date>-<time>-<6 hex digits>`: the random suffix keeps two runs started in the same second (a
    sweep loop, a job array, the hour repeated when clocks go back) out of each other's run directory, where
    the same name would mean "resume"."""
    return f"{time.strftime('distgan-%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def inside_ray_job(environ: Mapping[str, str] = os.environ) -> bool:
    """True in the driver of `ray job submit` (Ray's job supervisor sets this variable for it alone)."""
    return RAY_JOB_CONFIG_ENV in environ


def parse_augment(text: str) -> tuple[bool, tuple[str, ...]]:
    """`--augment` text -> (adaptive?, ops). "off" -> (False, ()); "translation,cutout" -> (False, ops);
    "ada" -> (True, ADA_POLICY); "ada:color,translation" -> (True, those ops). Raises ValueError naming
    the unknown or repeated op."""
    text = text.strip()
    if text == "off":
        return False, ()
    adaptive = text == "ada" or text.startswith("ada:")
    if text == "ada":
        return True, ADA_POLICY
    ops = tuple(op.strip() for op in (text[4:] if adaptive else text).split(","))
    unknown = [op for op in ops if op not in AUGMENT_OPS]
    if unknown or not ops:
        raise ValueError(f"unknown augmentation {', '.join(map(repr, unknown)) or repr(text)}; use off, ada, "
                         f"ada:<ops> or comma-separated ops from {', '.join(AUGMENT_OPS)}")
    if len(set(ops)) != len(ops):
        raise ValueError(f"{text!r} names an augmentation twice")
    return adaptive, ops


# -------------------------------------------------------------------- --schedule

def parse_schedule(text: Any) -> list[dict[str, Any]]:
    """--schedule's entries, [{"step": int, field: value, ...}] with steps strictly increasing, from its text (YAML
    or JSON) or an already-parsed list; values converted like flags. Raises ConfigError naming --schedule."""
    import yaml

    def bad(why: str) -> ConfigError:
        return ConfigError(f"--schedule: {why}", field="schedule")

    if isinstance(text, str):
        try:
            text = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise bad(f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(text, list) or not text:
        raise bad(f"expected a list of entries like {{step: 310, lr_g: 1.6e-4}}, got {text!r}")
    entries, last = [], -1
    for raw in text:
        if not isinstance(raw, dict) or "step" not in raw:
            raise bad(f"each entry needs a step and the values that change there, got {raw!r}")
        step = raw["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad(f"step must be a non-negative integer, got {step!r}")
        if step <= last:
            raise bad(f"steps must increase, and {step} follows {last}")
        last = step
        changes = {str(k).replace("-", "_"): v for k, v in raw.items() if k != "step"}
        if not changes:
            raise bad(f"step {step}: no values")
        entry: dict[str, Any] = {"step": step}
        for key, value in changes.items():
            if key not in SCHEDULE_FIELDS:
                raise bad(f"step {step}: {key} cannot change mid-run; a schedule changes "
                          f"{', '.join(SCHEDULE_FIELDS)}")
            entry[key] = _schedule_number(value)
            if entry[key] is None:
                raise bad(f"step {step}: {key}: expected a finite number, got {value!r}")
        entries.append(entry)
    return entries


def _schedule_number(value: Any) -> Optional[float]:
    """A schedule's value as a float (YAML 1.1 reads 1.6e-4 as text); None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def schedule_text(entries: list[dict[str, Any]]) -> str:
    """The canonical --schedule text of parsed entries (JSON, which YAML reads too)."""
    import json

    return json.dumps(entries, separators=(", ", ": "))


def schedule_values(cfg: TrainConfig, step: int) -> dict[str, Any]:
    """The values --schedule has set by the time `step` G steps are done: every entry at `step` or before, later
    ones winning; {} without a schedule."""
    values: dict[str, Any] = {}
    for entry in parse_schedule(cfg.schedule) if cfg.schedule else []:
        if entry["step"] <= step:
            values.update({k: v for k, v in entry.items() if k != "step"})
    return values


def config_at(cfg: TrainConfig, step: int) -> TrainConfig:
    """The config in force for the G step after `step`: the flags with --schedule's values up to `step`."""
    values = schedule_values(cfg, step)
    return dataclasses.replace(cfg, **values) if values else cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -------------------------------------------------------------------- driver checks beyond the values


def check_schedule(cfg: TrainConfig, num_images: int) -> int:
    """Checks the schedule against the training split's size; returns the G steps per epoch."""
    steps_per_epoch = cfg.steps_per_epoch(num_images)
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size} x --n-critic {cfg.n_critic} needs "
                          f"{cfg.images_per_g_step} images per generator step, and the training split has "
                          f"{num_images}", field="batch_size")
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None and cfg.max_steps > total:
        # the run would silently stop at the end of --epochs, short of the steps asked for
        raise ConfigError(f"--max-steps {cfg.max_steps}: --epochs {cfg.epochs} ends the run at step {total} "
                          f"({steps_per_epoch} steps an epoch); raise --epochs to "
                          f"{math.ceil(cfg.max_steps / steps_per_epoch)} or lower --max-steps", field="max_steps")
    if cfg.schedule:
        last = parse_schedule(cfg.schedule)[-1]["step"]
        end = min(cfg.max_steps or math.inf, total)
        if last >= end:
            raise ConfigError(f"--schedule: step {last} is at or past the run's last step, {end}: nothing would "
                              f"train with its values", field="schedule")
    return steps_per_epoch


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def check_execution(cfg: TrainConfig, use_gpu: bool, environ: Mapping[str, str] = os.environ,
                    triton_installed: Optional[bool] = None) -> None:
    """Checks what depends on where the workers run: `use_gpu` is what the run will use (the flag, else
    whether the cluster has GPUs). `environ` is what reaches the workers (the driver's, which inside a Ray
    job holds the job's runtime env)."""
    if cfg.precision == "fp16" and not use_gpu:
        raise ConfigError("--precision: fp16 is CUDA only and this run's workers use CPUs; use bf16 or fp32",
                          field="precision")
    if cfg.kernels == "triton":
        if triton_installed is None:
            triton_installed = importlib.util.find_spec("triton") is not None
        if not triton_installed:
            raise ConfigError("--kernels: triton needs the triton package, which is not installed; use auto or "
                              "eager", field="kernels")
        if not use_gpu and not _truthy(environ.get("TRITON_INTERPRET")):
            raise ConfigError("--kernels: triton on CPU workers needs TRITON_INTERPRET=1 in the environment "
                              "(the interpreter: slow, for testing); use auto or eager", field="kernels")


# -------------------------------------------------------------------- field kinds (distgan.cli converts by them)

_KIND_NAMES = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}


def _field_kind(f: dataclasses.Field) -> tuple[str, bool]:
    """("int" | "float" | "str" | "bool", optional) from the annotation (a string: postponed evaluation)."""
    t = str(f.type)
    optional = t.startswith("Optional[")
    kind = t.removeprefix("Optional[").removesuffix("]") if optional else t
    if kind not in _KIND_NAMES:
        raise TypeError(f"TrainConfig.{f.name}: unsupported type {t}")
    return kind, optional


def _has_type(value: Any, kind: str, optional: bool) -> bool:
    if value is None:
        return optional
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str)


# -------------------------------------------------------------------- a saved config (checkpoints, workers)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})
