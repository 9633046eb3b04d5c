"""distgan.search_space: the space's forms, converted like flags, and the driver-side check of every value a
trial can reach."""

from __future__ import annotations

import pytest

from distgan.config import ConfigError, TrainConfig
from distgan.search_space import check_space, param_space, parse_space


def test_space_forms_convert_like_flags():
    space, recipes = parse_space({"lr-g": {"loguniform": ["1e-4", 3e-3]}, "augment": {"choice": ["off", "ada"]},
                                  "seed": [0, 1], "ema_decay": 0.99, "batch_size": {"randint": [32, 129]},
                                  "recipes": {"plain": {}, "ada": {"augment": "ada", "ada-target": 0.5}}}, "f.yaml")
    assert space == {"lr_g": ("loguniform", [1e-4, 3e-3]), "augment": ("choice", ["off", "ada"]),
                     "seed": ("grid", [0, 1]), "ema_decay": ("fixed", [0.99]), "batch_size": ("randint", [32, 129])}
    assert recipes == {"plain": {}, "ada": {"augment": "ada", "ada_target": 0.5}}
    tune_space = param_space(space, recipes)
    assert tune_space["ema_decay"] == 0.99
    assert tune_space["seed"] == {"grid_search": [0, 1]} and tune_space["recipes"] == {"grid_search": ["plain", "ada"]}
    assert 1e-4 <= tune_space["lr_g"].sample() <= 3e-3


@pytest.mark.parametrize("spec, message", [
    ({"lr_gg": [1e-3]}, "f.yaml: unknown option 'lr_gg'"),
    ({"name": ["a", "b"]}, "name is set by the tuner"),
    ({"lr_g": {"normal": [0, 1]}}, "expected one of grid, choice"),
    ({"lr_g": {"uniform": [3e-3, 1e-3]}}, "uniform takes [low, high] with low < high"),
    ({"lr_g": {"loguniform": [0, 1e-3]}}, "loguniform needs low > 0"),
    ({"lr_g": {"randint": [1, 3]}}, "randint is for integer options"),
    ({"seed": ["zero"]}, "seed: expected an integer"),
    ({"recipes": {"a": 3}}, "recipe 'a' must map options to values"),
])
def test_bad_space_is_refused_naming_file_and_key(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_space(spec, "f.yaml")
    assert message in str(e.value)


def test_every_reachable_value_is_validated_on_the_driver(tmp_path):
    base = TrainConfig(storage_path=str(tmp_path), name="s").validate()
    check_space(base, *parse_space({"lr_g": {"uniform": [1e-4, 1e-2]}}, "f"))
    with pytest.raises(ConfigError, match=r"lr_g=1.5: --lr-g: must be in \(0, 1\)"):
        check_space(base, *parse_space({"lr_g": {"uniform": [1e-4, 1.5]}}, "f"))
    with pytest.raises(ConfigError, match="batch_size=63 .recipe w4.: --batch-size: global batch 63 is not divisible"):
        check_space(base, *parse_space({"batch_size": [64, 63], "recipes": {"w4": {"num_workers": 4}}}, "f"))


def test_fields_of_the_space_are_checked_together(tmp_path):
    base = TrainConfig(storage_path=str(tmp_path), name="s").validate()
    check_space(base, *parse_space({"augment": ["ada", "cutout"], "augment_p": [0.0, 0.5]}, "f"))
    with pytest.raises(ConfigError, match=r"search space: augment_p=1.5: --augment-p: must be in \[0, 1\]"):
        check_space(base, *parse_space({"augment": ["ada"], "augment_p": [0.5, 1.5]}, "f"))
