"""The command line and the `--config` YAML file: one flag per TrainConfig field, parsed into a validated
TrainConfig (distgan/config.py holds the dataclass and its checks).

Precedence: a flag typed on the command line > the `--config` YAML file > the dataclass default. Flags and
YAML values go through the same conversions (`convert_value`), so `lr_g: 2e-4` in a file means what
`--lr-g 2e-4` means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import yaml

from distgan.config import _KIND_NAMES, AUTO_FIELDS, ConfigError, TrainConfig, _field_kind, _flag
from distgan.storage import first_line

# -------------------------------------------------------------------- conversions (flags and YAML alike)

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


def convert_value(kind: str, optional: bool, value: Any) -> Any:
    """A flag's text or a YAML value -> the field's type. Raises ValueError with the reason.

    YAML 1.1 reads `2e-4` as a string and `yes`/`off` as booleans; both go through here, so a file means
    what the same text typed as a flag means."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"expected {_KIND_NAMES[kind]}, got null")
    if isinstance(value, str) and optional and kind != "str" and value.strip().lower() in _NONE:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None  # YAML's 1 is "1" typed
        if text in _TRUE + _FALSE:
            return text in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"expected {_KIND_NAMES[kind]}, got {str(value).lower()} (YAML reads unquoted yes, no, "
                         f"on, off as booleans: quote the value)")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected {_KIND_NAMES[kind]}, got {type(value).__name__} {value!r}")
    if kind == "str":
        return value if isinstance(value, str) else str(value)
    try:
        if kind == "int":
            if isinstance(value, float):
                raise ValueError
            return int(value)
        number = float(value)
    except ValueError:
        raise ValueError(f"expected {_KIND_NAMES[kind]}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def convert_field(f: dataclasses.Field, value: Any) -> Any:
    """convert_value for a TrainConfig field; "auto" is None for AUTO_FIELDS."""
    if f.name in AUTO_FIELDS and isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return convert_value(*_field_kind(f), value)


def _flag_type(f: dataclasses.Field):
    kind, _ = _field_kind(f)

    def convert(text: str) -> Any:
        try:
            return convert_field(f, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = kind  # argparse names the type in some messages
    return convert


# -------------------------------------------------------------------- CLI

# --help groups, in order; a field in none of them (config, verbose) is listed with the general options
HELP_GROUPS = (
    ("data", "what the GAN learns from", ("dataset", "data_root", "download", "image_size", "channels",
                                               "alpha_background")),
    ("schedule", "how long", ("epochs", "max_steps", "batch_size")),
    ("optimisation", "the recipe; configs/tf-tutorial.yaml holds the TensorFlow tutorial's", (
        "lr_g", "lr_d", "lr_decay_start", "beta1", "beta2", "n_critic", "label_smoothing", "z_dim", "negative_slope",
        "ema_decay", "seed", "augment", "augment_p", "ada_target", "ada_kimg", "schedule")),
    ("model execution", "where and how the model runs", ("num_workers", "cpus_per_worker", "use_gpu", "kernels", "bn",
                                                          "precision")),
    ("outputs and checkpoints", "a run lives in <storage path>/<name>/; the same pair resumes it", (
        "storage_path", "name", "init_from", "checkpoint_every", "checkpoint_every_steps", "checkpoint_every_minutes",
        "num_to_keep")),
    ("fault tolerance", "failures, non-finite losses, placement", (
        "max_failures", "nan_policy", "max_rollbacks", "rollback_lr_factor", "collective_timeout_s",
        "placement_timeout_s", "placement_strategy")),
    ("tracking and evaluation", "W&B, metrics.jsonl, sample-quality metrics", (
        "log_every", "eval_every", "eval_samples", "wandb_project", "wandb_mode", "wandb_group")),
)
SHORT_FLAGS = {"verbose": "-v"}


def default_text(f: dataclasses.Field) -> str:
    """What a flag's default really is, for --help and docs/usage.md."""
    return f.metadata.get("shown", str(f.default))


class _OneLineErrors(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # `--epoch` must not quietly mean `--epochs`
        # argparse takes `-1e-3` for a flag (its pattern knows -1 and -.5, not exponents), so `--lr-g -1e-3`
        # would say "expected one argument" instead of what is wrong with the value
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str):
        # one line naming the flag, not the 30-line usage block
        self.exit(2, f"error: {message}\n")


TRAIN_DESCRIPTION = "Train the DCGAN with Ray Train + PyTorch DDP."


def build_parser(prog: str = "python -m distgan.train", description: str = TRAIN_DESCRIPTION
                 ) -> argparse.ArgumentParser:
    """One flag per TrainConfig field. Flags not typed are absent from the parsed namespace (SUPPRESS), so
    parse_args knows what was typed, rather than guessing from values equal to their defaults."""
    parser = _OneLineErrors(prog=prog, argument_default=argparse.SUPPRESS, description=description)
    groups = {}
    for title, description, names in HELP_GROUPS:
        group = parser.add_argument_group(title, description)
        groups.update(dict.fromkeys(names, group))
    for f in fields(TrainConfig):
        target = groups.get(f.name, parser)
        flags = [*([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else []), _flag(f.name)]
        help_text = f"{f.metadata.get('help', '')} (default: {default_text(f)})".strip()
        kind, optional = _field_kind(f)
        if kind == "bool":
            target.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            target.add_argument(*flags, dest=f.name, type=_flag_type(f), help=help_text,
                                metavar=f.name.upper())
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    """The file's options, converted like flags; errors name the file and the key."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path}", field="config")
    text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
        top = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML ({first_line(e)})", field="config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option: value", field="config")
    if top is not None:  # None: a file of comments only, which sets nothing
        _refuse_repeated_keys(top, path)
    by_name = {f.name: f for f in fields(TrainConfig)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        raise ConfigError(f"--config: {path} has unknown option(s): {', '.join(unknown)}", field="config")
    if "config" in data:
        raise ConfigError(f"--config: {path}: a config file cannot name another (key config)", field="config")
    out = {}
    for key, value in data.items():
        if key == "schedule" and isinstance(value, list):  # the file's list form: checked when the config is
            value = json.dumps(value, default=str)          # validated, like the flag's text
        try:
            out[key] = convert_field(by_name[key], value)
        except ValueError as e:
            raise ConfigError(f"--config: {path}: {key}: {e}", field="config") from None
    return out


def _refuse_repeated_keys(top: yaml.MappingNode, path: str) -> None:
    """YAML keeps the last of two equal keys, and `lr-g` and `lr_g` name one option: either would let a value
    the user sees in the file be silently overridden by another line."""
    seen: dict[str, tuple[str, int]] = {}
    for key_node, _ in top.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key, line = str(key_node.value), key_node.start_mark.line + 1
        name = key.replace("-", "_")
        if name in seen:
            first, first_line = seen[name]
            spelled = f"as {first} and {key}" if first != key else ""
            raise ConfigError(f"--config: {path}: option {name} is given twice (lines {first_line} and {line}"
                              f"{', ' + spelled if spelled else ''}); keep one", field="config")
        seen[name] = (key, line)


def parse_args(argv: Optional[list[str]] = None, validate: bool = True,
               parser: Optional[argparse.ArgumentParser] = None) -> TrainConfig:
    """Typed flag > YAML file > dataclass default. Raises ConfigError (argparse errors exit 2 by themselves).
    validate=False returns the config unchecked (the tuner checks it once the search space is applied);
    `parser` is build_parser()'s, under another command's name."""
    typed = vars((parser or build_parser()).parse_args(argv))
    from_file = load_yaml(typed["config"]) if typed.get("config") else {}
    if not validate:
        return TrainConfig(**{**from_file, **typed})
    try:
        return TrainConfig(**{**from_file, **typed}).validate()
    except ConfigError as e:
        if e.field in from_file and e.field not in typed:
            raise ConfigError(f"{e} (set in {typed['config']})", field=e.field) from None
        raise
