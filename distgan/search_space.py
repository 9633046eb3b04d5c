"""The search space of distgan.tune: YAML-shaped specs and --grid/--choice/... values over TrainConfig fields,
converted like flags, checked on the driver against every value a trial can reach, and given to Ray Tune.

A space is {field: (kind, values)}: kind is one of KINDS (grid: every value; choice: one drawn per sample;
uniform/loguniform/randint: [low, high]) or "fixed"; recipes are named override sets searched as a grid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields, replace
from typing import Any, Optional

from distgan.cli import convert_value
from distgan.config import ConfigError, TrainConfig, _field_kind, check_schedule

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
RECIPES_KEY = "recipes"
# what the tuner decides for every trial: where the run lives, and reports only at evaluations
TUNER_FIELDS = ("name", "storage_path", "config", "checkpoint_every", "checkpoint_every_steps",
                "checkpoint_every_minutes", "wandb_group", "eval_every")


def _convert(name: str, value: Any, where: str) -> Any:
    by_name = {f.name: f for f in fields(TrainConfig)}
    if name not in by_name:
        raise ConfigError(f"{where}: unknown option {name!r} (a TrainConfig field, e.g. lr_g)")
    if name in TUNER_FIELDS:
        raise ConfigError(f"{where}: {name} is set by the tuner for every trial, not searched")
    if name == "schedule":
        raise ConfigError(f"{where}: schedule is not searched: every trial follows the base --schedule (under "
                          f"--scheduler pbt, the one its exploits make)")
    try:
        return convert_value(*_field_kind(by_name[name]), value)
    except ValueError as e:
        raise ConfigError(f"{where}: {name}: {e}") from None


def parse_space(spec: dict[str, Any], where: str) -> tuple[dict[str, tuple[str, list]], dict[str, dict]]:
    """A YAML-shaped space -> ({field: (kind, values)}, {recipe name: overrides}). Values are converted like
    flags; a scalar is ("fixed", [value]). Raises ConfigError naming `where` and the key."""
    space: dict[str, tuple[str, list]] = {}
    recipes: dict[str, dict] = {}
    for raw_key, value in spec.items():
        key = str(raw_key).replace("-", "_")
        if key == RECIPES_KEY:
            if not isinstance(value, dict) or not value:
                raise ConfigError(f"{where}: recipes must map names to option overrides")
            for name, overrides in value.items():
                if not isinstance(overrides, dict):
                    raise ConfigError(f"{where}: recipe {name!r} must map options to values")
                recipes[str(name)] = {str(k).replace("-", "_"): _convert(str(k).replace("-", "_"), v,
                                                                         f"{where}: recipe {name}")
                                      for k, v in overrides.items()}
            continue
        if isinstance(value, list):
            kind, values = "grid", value
        elif isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in KINDS:
                raise ConfigError(f"{where}: {key}: expected one of {', '.join(KINDS)} (e.g. {{grid: [a, b]}}), "
                                  f"got {value!r}")
            kind, values = next(iter(value.items()))
            if not isinstance(values, list):
                raise ConfigError(f"{where}: {key}: {kind} takes a list, got {values!r}")
        else:
            kind, values = "fixed", [value]
        values = [_convert(key, v, where) for v in values]
        if not values:
            raise ConfigError(f"{where}: {key}: no values")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not values[0] < values[1]:
                raise ConfigError(f"{where}: {key}: {kind} takes [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: {key}: loguniform needs low > 0, got {values[0]!r}")
            if kind == "randint" and _field_kind(next(f for f in fields(TrainConfig) if f.name == key))[0] != "int":
                raise ConfigError(f"{where}: {key}: randint is for integer options")
        space[key] = (kind, values)
    return space, recipes


# check_space validates every combination of the probed values up to this many, and beyond it each probed
# value with the other fields at their first
MAX_CHECKED_COMBINATIONS = 4096


def _combinations(space: dict[str, tuple[str, list]]) -> list[dict[str, Any]]:
    probes = {key: (values if kind != "randint" else [values[0], values[1] - 1])
              for key, (kind, values) in space.items()}
    if math.prod(len(v) for v in probes.values()) <= MAX_CHECKED_COMBINATIONS:
        return [dict(zip(probes, combo)) for combo in itertools.product(*probes.values())]
    first = {key: values[0] for key, values in probes.items()}
    return [{**first, key: value} for key, values in probes.items() for value in values]


def check_space(base: TrainConfig, space: dict[str, tuple[str, list]], recipes: dict[str, dict],
                base_error: Optional[ConfigError] = None, num_images: Optional[int] = None) -> None:
    """Every value the search can reach (each listed value; both ends of a range) makes a valid config with
    the base and each recipe, checked on the driver: a bad value fails here, not in a trial an hour later.
    Fields are checked together, so a base flag that needs a searched value (--augment-p with a grid over
    --augment) is valid when every trial's value allows it. `base_error` is the base's own validation error, if
    any: raised as it is when a trial would meet it too (the flag itself is wrong, not the space). `num_images`:
    the training split's size, against which each trial's schedule is checked too (config.check_schedule)."""
    first_bad, only_base_error = None, True
    for recipe, overrides in (recipes or {"": {}}).items():
        for combo in _combinations(space):
            try:
                trial = replace(base, **{**overrides, **combo}).validate()
                if num_images is not None:
                    check_schedule(trial, num_images)
                only_base_error = False
            except ConfigError as e:
                same = base_error is not None and e.field == base_error.field and str(base_error).startswith(str(e))
                only_base_error &= same
                first_bad = first_bad or (recipe, combo, e)
    if first_bad is None:
        return
    if base_error is not None and only_base_error:  # no trial escapes it: the flag itself is wrong
        raise base_error
    recipe, combo, e = first_bad
    named = {e.field: combo[e.field]} if e.field in combo else combo
    where = " ".join(filter(None, [", ".join(f"{k}={v!r}" for k, v in named.items()),
                                   f"(recipe {recipe})" if recipe else ""]))
    raise ConfigError(f"search space: {where or f'recipe {recipe}'}: {e}")


def param_space(space: dict[str, tuple[str, list]], recipes: dict[str, dict]) -> dict[str, Any]:
    """Ray Tune's param_space for the parsed space."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, (kind, values) in space.items():
        if kind == "fixed":
            out[key] = values[0]
        elif kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        else:
            out[key] = getattr(tune, kind)(*values)
    if recipes:
        out[RECIPES_KEY] = tune.grid_search(list(recipes))
    return out


def space_text(space: dict[str, tuple[str, list]], recipes: dict[str, dict]) -> str:
    parts = [f"{k}={kind}{values}" if kind != "fixed" else f"{k}={values[0]}" for k, (kind, values) in space.items()]
    if recipes:
        parts.append(f"recipes={list(recipes)}")
    return ", ".join(parts)
