"""--schedule: values that switch at given steps (a PBT search's replay file holds one), checked on the driver in
one line, applied by the Trainer between two steps, and continued exactly by a resume."""

from __future__ import annotations

import pytest
import torch

from distgan.cli import parse_args
from distgan.config import ConfigError, check_schedule, config_at
from distgan.local import spawn
from distgan.train import main
from distgan.trainer import Trainer

from conftest import assert_same_training_state
from support import make_cfg, small_dataset


def test_the_files_list_form_and_the_flags_text_read_alike(tmp_path):
    path = tmp_path / "replay.yaml"
    path.write_text("lr_g: 2.0e-4\nschedule:\n  - {step: 0, lr_d: 3.0e-4}\n  - {step: 310, lr_g: 1.6e-4, "
                    "augment_p: 0.1}\naugment: ada\n")
    from_file = parse_args(["--config", str(path), "--name", "r", "--storage-path", str(tmp_path)])
    typed = parse_args(["--lr-g", "2e-4", "--augment", "ada", "--name", "r", "--storage-path", str(tmp_path),
                        "--schedule", "[{step: 0, lr_d: 3.0e-4}, {step: 310, lr_g: 1.6e-4, augment_p: 0.1}]"])
    assert from_file.schedule == typed.schedule == \
        '[{"step": 0, "lr_d": 0.0003}, {"step": 310, "lr_g": 0.00016, "augment_p": 0.1}]'
    assert (config_at(from_file, 0).lr_g, config_at(from_file, 0).lr_d) == (2e-4, 3e-4)
    assert (config_at(from_file, 309).lr_g, config_at(from_file, 310).lr_g) == (2e-4, 1.6e-4)
    assert config_at(from_file, 10_000).augment_p == 0.1


@pytest.mark.parametrize("schedule, message", [
    ("[{step: 3, lr_g: 2}]", "error: --schedule: step 3: --lr-g: must be in (0, 1), got 2.0"),
    ("[{step: 3, seed: 2}]", "error: --schedule: step 3: seed cannot change mid-run; a schedule changes lr_g, lr_d"),
    ("[{step: 5, lr_g: 0.1}, {step: 5, lr_d: 0.1}]", "error: --schedule: steps must increase, and 5 follows 5"),
    ("[{step: -1, lr_g: 0.1}]", "error: --schedule: step must be a non-negative integer, got -1"),
    ("[{step: 4}]", "error: --schedule: step 4: no values"),
    ("[{step: 4, lr_g: fast}]", "error: --schedule: step 4: lr_g: expected a finite number, got 'fast'"),
    ("[{step: 4, ema_decay: 0}]", "error: --schedule: step 4: ema_decay 0.0: a schedule cannot turn the EMA on"),
    ("[{step: 4, augment_p: 0.5}]", "error: --schedule: step 4: --augment-p: needs --augment"),
    ("{step: 4", "error: --schedule: not valid YAML"),
    ("lr_g", "error: --schedule: expected a list of entries like {step: 310, lr_g: 1.6e-4}, got 'lr_g'"),
])
def test_a_bad_schedule_is_refused_in_one_line_before_ray(tmp_path, capsys, schedule, message):
    assert main(["--schedule", schedule, "--storage-path", str(tmp_path), "--name", "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_a_step_at_or_past_the_runs_end_is_refused_against_the_data(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=12, schedule="[{step: 12, lr_g: 1.0e-4}]")
    with pytest.raises(ConfigError, match=r"^--schedule: step 12 is at or past the run's last step, 12"):
        check_schedule(cfg, 64)
    check_schedule(make_cfg(tmp_path, max_steps=12, schedule="[{step: 11, lr_g: 1.0e-4}]"), 64)


# lr_g and beta1 switch for step 4 on, lr_d and the EMA's decay for step 7 on
SCHEDULE = "[{step: 3, lr_g: 2.0e-4, beta1: 0.3}, {step: 6, lr_d: 5.0e-4, ema_decay: 0.99}]"
TOTAL = 10


def _schedule_worker(rank, tmp):
    def cfg():
        return make_cfg(tmp, max_steps=TOTAL, precision="fp32", schedule=SCHEDULE)

    seen = []
    reference = Trainer(cfg(), dataset=small_dataset())
    reference.fit(on_step=lambda step, means: seen.append(
        (step, reference.opt_g.param_groups[0]["lr"], reference.opt_g.param_groups[0]["betas"][0],
         reference.opt_d.param_groups[0]["lr"], reference.ema.decay if reference.ema else None)))
    out = {"seen": seen, "want": reference.state_dict()}
    for k in (3, 5):  # resumed at the switch's own step, and between two switches
        first = Trainer(cfg(), dataset=small_dataset())
        first.fit(should_stop=lambda first=first, k=k: first.step >= k)
        saved = first.state_dict()
        assert first.step == k and saved["config"]["schedule"] == cfg().schedule  # the checkpoint holds it
        second = Trainer(cfg(), dataset=small_dataset())
        second.load_state_dict(saved, "round trip")
        second.fit()
        out[k] = second.state_dict()
    if rank == 0:
        torch.save(out, tmp / "schedule.pt")


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedule")
    spawn(_schedule_worker, 2, tmp, timeout_s=300)
    return torch.load(tmp / "schedule.pt", weights_only=False)


def test_the_optimizers_take_the_scheduled_values_from_the_step_after_the_entry(scheduled):
    by_step = {step: rest for step, *rest in scheduled["seen"]}
    assert sorted(by_step) == list(range(1, TOTAL + 1))
    for step, (lr_g, beta1, lr_d, ema_decay) in by_step.items():
        assert lr_g == pytest.approx(1e-3 if step <= 3 else 2e-4)
        assert beta1 == (0.5 if step <= 3 else 0.3)
        assert lr_d == pytest.approx(1e-3 if step <= 6 else 5e-4)
        assert ema_decay == (0.999 if step <= 6 else 0.99)


@pytest.mark.parametrize("k", [3, 5])
def test_a_run_with_a_schedule_resumes_bit_exactly(scheduled, k):
    assert_same_training_state(scheduled[k], scheduled["want"])
