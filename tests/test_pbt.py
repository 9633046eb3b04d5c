"""distgan.tune --scheduler pbt: what PBT may mutate and how, each trial's runs and the record of its exploits,
the winner's schedule rebuilt from a synthetic exploit history and written as a file distgan.train reads, and
(slow) a real two-trial PBT search on the test Ray cluster that exploits and writes that file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distgan import pbt
from distgan.cli import parse_args
from distgan.config import TrainConfig, config_at
from distgan.rundir import RunDir
from distgan.tune import main, parse

from conftest import FAST_POLL, REPO, describe

COMMON = ["--scheduler", "pbt", "--num-samples", "2"]


def test_ranges_are_perturbed_within_their_bounds_choices_move_among_their_values_fixed_never():
    space = {"lr_g": ("loguniform", [1e-4, 1e-3]), "label_smoothing": ("choice", [0.0, 0.1, 0.2]),
             "lr_d": ("uniform", [1e-4, 5e-4]), "ema_decay": ("fixed", [0.99])}
    from ray.tune.search.sample import Float

    mutations = pbt.mutations(space)
    assert set(mutations) == {"lr_g", "lr_d", "label_smoothing"}
    assert isinstance(mutations["lr_g"], Float) and (mutations["lr_g"].lower, mutations["lr_g"].upper) == (1e-4, 1e-3)
    assert mutations["label_smoothing"] == [0.0, 0.1, 0.2]
    # Ray's factors (x1.2, x0.8) can leave a range; the explore hook puts the value back on its bound
    assert pbt.within_range(space, {"lr_g": 1.2e-3, "lr_d": 0.8e-4, "label_smoothing": 0.2, "ema_decay": 0.99}) == \
        {"lr_g": 1e-3, "lr_d": 1e-4, "label_smoothing": 0.2, "ema_decay": 0.99}


def test_parse_returns_the_mutated_fields(tmp_path):
    args, _, space, _ = parse([*COMMON, "--loguniform", "lr_g", "1e-4", "1e-3", "--choice", "augment_p", "0", "0.2",
                               "--augment", "translation", "--space", _write(tmp_path, "ema_decay: 0.99\n"),
                               "--storage-path", str(tmp_path), "--name", "s"])
    assert args.pbt_fields == ["augment_p", "lr_g"] and args.quantile_fraction == 0.25
    assert args.perturbation_interval == 1 and space["ema_decay"] == ("fixed", [0.99])


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--grid", "lr_g", "1e-4", "1e-3"], "error: search space: lr_g: a grid runs every value, and PBT's population"),
    (["--choice", "seed", "0", "1"], "error: search space: seed: PBT changes searched values mid-run, and seed fixes "
                                     "the data order"),
    (["--choice", "batch_size", "32", "64"], "error: search space: batch_size: PBT changes searched values mid-run, "
                                             "and batch_size fixes"),
    (["--choice", "z_dim", "64", "100"], "error: search space: z_dim: PBT changes searched values mid-run, and z_dim "
                                         "shapes the model"),
    (["--choice", "augment", "off", "ada"], "error: search space: augment: PBT changes searched values mid-run, and a "
                                            "run can change only lr_g, lr_d"),
    (["--grid", "seed", "0"], "error: search space: seed: a grid runs every value"),
    (["--choice", "lr_g", "1e-3", "--num-samples", "1"], "error: --num-samples: PBT needs a population of 2"),
    (["--choice", "lr_g", "1e-3", "--perturbation-interval", "0"],
     "error: --perturbation-interval: must be at least 1 evaluation, got 0"),
    (["--choice", "lr_g", "1e-3", "--quantile-fraction", "0.6"], "error: --quantile-fraction: must be in (0, 0.5]"),
    (["--choice", "lr_g", "1e-3", "--quantile-fraction", "0"], "error: --quantile-fraction: must be in (0, 0.5]"),
    (["--choice", "lr_g", "1e-3", "--schedule", "[{step: 5, lr_d: 1.0e-4}]"],
     "error: --schedule: under PBT each trial's schedule is what its exploits make it"),
    (["--grid", "schedule", "x"], "error: --grid: schedule is not searched"),
])
def test_pbt_refuses_what_it_cannot_run_in_one_line_before_ray(tmp_path, capsys, argv, message):
    assert main([*COMMON, *argv, "--storage-path", str(tmp_path), "--name", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_pbt_refuses_recipes_and_a_space_with_nothing_to_mutate(tmp_path, capsys):
    recipes = _write(tmp_path, "recipes:\n  a: {}\n  b: {lr_g: 1.0e-4}\n")
    assert main([*COMMON, "--space", recipes, "--storage-path", str(tmp_path), "--name", "s"]) == 2
    assert capsys.readouterr().err.startswith("error: recipes: PBT mutates single values mid-run")
    fixed = _write(tmp_path, "lr_g: 1.0e-4\n")
    assert main([*COMMON, "--space", fixed, "--storage-path", str(tmp_path), "--name", "s"]) == 2
    assert capsys.readouterr().err.startswith("error: search space: nothing for PBT to mutate")


# ---------------------------------------------------------------------------------------------- runs and exploits

FIELDS = ["lr_g", "lr_d"]


def _state(trial, run, step, history, checkpoint=None):
    return {"trial": trial, "run": run, "checkpoint": checkpoint or f"/s/{run}/checkpoint_{step:08d}", "step": step,
            "history": history}


def test_a_trial_starts_resumes_itself_and_forks_a_new_run_on_each_exploit():
    first = pbt.plan_segment("trial_a", {"lr_g": 1e-3, "lr_d": 1e-3, "seed": 0}, FIELDS, None, [])
    assert first == ("trial_a", [{"step": 0, "lr_g": 1e-3, "lr_d": 1e-3}], None, None)
    # Tune paused trial_a and resumed it: its own state, its own run again
    own = _state("trial_a", "trial_a_x2", 62, [{"step": 0, "lr_g": 1e-3, "lr_d": 1e-3}])
    assert pbt.plan_segment("trial_a", {"lr_g": 5e-4, "lr_d": 1e-3}, FIELDS, own, ["trial_a", "trial_a_x2"]) == \
        ("trial_a_x2", own["history"], None, None)
    # trial_a copies trial_b's run at step 124 with lr_g perturbed: a new run, numbered after trial_a's others
    donor = _state("trial_b", "trial_b", 124, [{"step": 0, "lr_g": 2e-4, "lr_d": 1e-3}])
    segment = pbt.plan_segment("trial_a", {"lr_g": 2.4e-4, "lr_d": 1e-3}, FIELDS, donor,
                               ["trial_a", "trial_a_x1", "trial_a_x2", "trial_b", "trial_ab_x7"])
    assert segment.run == "trial_a_x3" and segment.init_from == donor["checkpoint"]
    assert segment.history == [{"step": 0, "lr_g": 2e-4, "lr_d": 1e-3}, {"step": 124, "lr_g": 2.4e-4}]
    record = segment.exploit
    assert {k: record[k] for k in ("trial", "run", "donor_trial", "donor_run", "checkpoint", "step", "old", "new")} == \
        {"trial": "trial_a", "run": "trial_a_x3", "donor_trial": "trial_b", "donor_run": "trial_b",
         "checkpoint": donor["checkpoint"], "step": 124, "old": {"lr_g": 2e-4, "lr_d": 1e-3},
         "new": {"lr_g": 2.4e-4, "lr_d": 1e-3}}
    # the run's config: the history as its --schedule, which holds the new values from the exploit's step on
    cfg = TrainConfig(lr_g=2.4e-4, schedule=json.dumps(segment.history), name="x").validate()
    assert (config_at(cfg, 0).lr_g, config_at(cfg, 123).lr_g, config_at(cfg, 124).lr_g) == (2e-4, 2e-4, 2.4e-4)
    # paused again before its new run reported: Tune restores the donor's state again, and that run is reused
    again = pbt.plan_segment("trial_a", {"lr_g": 2.4e-4, "lr_d": 1e-3}, FIELDS, donor,
                             ["trial_a", "trial_a_x3", "trial_b"], previous=record)
    assert again == ("trial_a_x3", segment.history, donor["checkpoint"], None)
    text = pbt.format_exploits([record])
    assert text == "trial_a copied trial_b at step 124 into trial_a_x3: lr_g 0.0002 -> 0.00024"


def _record(trial, run, donor_run, step, old, new, t):
    return {"trial": trial, "run": run, "donor_trial": donor_run.split("_x")[0], "donor_run": donor_run,
            "checkpoint": f"/s/{donor_run}/checkpoint_{step:08d}", "step": step, "old": old, "new": new, "time": t}


# trial_a starts at 1e-3, trial_b at 2e-4; b copies a at 62 (lr_g x0.8), a copies b's new run at 124 (lr_d x1.2),
# b copies a's at 186 without a change, and a dead-end exploit of trial_c is not in the winner's line
HISTORY = [
    _record("trial_b", "trial_b_x1", "trial_a", 62, {"lr_g": 1e-3, "lr_d": 1e-3}, {"lr_g": 8e-4, "lr_d": 1e-3}, 1),
    _record("trial_c", "trial_c_x1", "trial_a", 62, {"lr_g": 1e-3, "lr_d": 1e-3}, {"lr_g": 1.2e-3, "lr_d": 1e-3}, 2),
    _record("trial_a", "trial_a_x1", "trial_b_x1", 124, {"lr_g": 8e-4, "lr_d": 1e-3}, {"lr_g": 8e-4, "lr_d": 1.2e-3},
            3),
    _record("trial_b", "trial_b_x2", "trial_a_x1", 186, {"lr_g": 8e-4, "lr_d": 1.2e-3},
            {"lr_g": 8e-4, "lr_d": 1.2e-3}, 4),
]


def test_the_winners_schedule_is_rebuilt_through_its_exploits():
    assert [r["run"] for r in pbt.lineage("trial_b_x2", HISTORY)] == ["trial_b_x1", "trial_a_x1", "trial_b_x2"]
    assert pbt.replay_history("trial_b_x2", HISTORY, {"lr_g": 8e-4, "lr_d": 1.2e-3}) == [
        {"step": 0, "lr_g": 1e-3, "lr_d": 1e-3}, {"step": 62, "lr_g": 8e-4}, {"step": 124, "lr_d": 1.2e-3}]
    # a trial that never copied anyone trained with its own values throughout
    assert pbt.replay_history("trial_c", HISTORY, {"lr_g": 3e-4, "lr_d": 1e-3}) == \
        [{"step": 0, "lr_g": 3e-4, "lr_d": 1e-3}]
    assert pbt.newest_exploit(HISTORY, "trial_b")["run"] == "trial_b_x2"
    with pytest.raises(ValueError, match="do not form a chain"):
        pbt.lineage("trial_b_x2", [*HISTORY[:3], {**HISTORY[3], "step": 100}])


def test_the_replay_file_is_a_config_distgan_train_reads_with_its_schedule(tmp_path):
    base = TrainConfig(storage_path=str(tmp_path), name="s", num_workers=2, cpus_per_worker=1, epochs=4,
                       eval_every=2, checkpoint_every=2, wandb_group="s").validate().to_dict()
    history = pbt.replay_history("trial_b_x2", HISTORY, {"lr_g": 8e-4, "lr_d": 1.2e-3})
    options = pbt.replay_config(base, {"ema_decay": 0.99}, history)
    assert not set(options) & {"name", "storage_path", "wandb_group", "checkpoint_every", "init_from"}
    path = tmp_path / "replay.yaml"
    path.write_text(pbt.replay_yaml(options, "the schedule of trial_b\nline two"))
    assert path.read_text().startswith("# the schedule of trial_b\n# line two\n")
    cfg = parse_args(["--config", str(path), "--name", "replay", "--storage-path", str(tmp_path)])
    assert (cfg.epochs, cfg.eval_every, cfg.num_workers, cfg.ema_decay) == (4, 2, 2, 0.99)
    assert [(s, config_at(cfg, s).lr_g, config_at(cfg, s).lr_d) for s in (0, 62, 124)] == \
        [(0, 1e-3, 1e-3), (62, 8e-4, 1e-3), (124, 8e-4, 1.2e-3)]


def test_the_winner_is_the_best_last_evaluation_of_a_completed_trial():
    def row(trial, fids, status="complete"):
        return {"trial": trial, "status": status, "points": [{"step": i, "fid": f} for i, f in enumerate(fids)]}

    rows = [row("a", [5.0, 30.0]), row("b", [20.0, 10.0]), row("c", [9.0], "stopped at step 62"), row("d", [])]
    assert pbt.winner(rows)["trial"] == "b"
    assert pbt.winner([row("c", [9.0], "error: X")])["trial"] == "c" and pbt.winner([row("d", [])]) is None


# ---------------------------------------------------------------------------------------------- a real search


def test_a_trials_last_report_is_never_exploited():
    """An exploit at a run's last step would fork a run with nothing left to train: PBT lets that trial end."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    scheduler = pbt.scheduler(time_attr="epoch", perturbation_interval=1, hyperparam_mutations={"lr_g": [1e-4, 1e-3]})
    scheduler.set_search_properties(metric="fid", mode="min", config={})
    trial = Trial("distgan_trial", config={"lr_g": 1e-4}, stub=True)  # as Ray's own scheduler tests make one
    tuner = SimpleNamespace(search_alg=None, get_trials=lambda: [trial], get_live_trials=lambda: [trial])
    scheduler.on_trial_add(tuner, trial)
    decision = scheduler.on_trial_result(tuner, trial, {"epoch": 3, "fid": 90.0, pbt.LAST_REPORT: 1})
    assert decision == TrialScheduler.CONTINUE and scheduler._trial_state[trial].last_perturbation_time == 0
    # any other report at a perturbation goes on to PBT's own decision, which marks the perturbation
    scheduler.on_trial_result(tuner, trial, {"epoch": 2, "fid": 90.0, pbt.LAST_REPORT: 0})
    assert scheduler._trial_state[trial].last_perturbation_time == 2


@pytest.mark.slow
def test_a_two_trial_pbt_search_exploits_logs_it_and_writes_a_replay_distgan_train_reads(ray_cluster, tmp_path):
    env = ray_cluster.client_env(**{"WANDB_MODE": "offline", "WANDB_SILENT": "true", **FAST_POLL})
    runs = tmp_path / "runs"
    # with 2 trials taking turns and a quantile of 0.5, the worse copies the better at every evaluation but the last
    proc = subprocess.run([sys.executable, "-m", "distgan.tune", "--scheduler", "pbt", "--num-samples", "2",
                           "--loguniform", "lr_g", "1e-5", "1e-3", "--perturbation-interval", "1",
                           "--quantile-fraction", "0.5", "--epochs", "3", "--batch-size", "256", "--eval-every", "1",
                           "--eval-samples", "100", "--ema-decay", "0.99", "--storage-path", str(runs),
                           "--name", "pbt"], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, describe(proc)
    record = json.loads((runs / "pbt" / "results.json").read_text())
    assert record["scheduler"] == "pbt" and record["pbt"]["mutated"] == ["lr_g"] and len(record["trials"]) == 2
    assert record["pbt"]["synchronous"]  # the 3-CPU cluster runs one trial at a time: they take turns
    exploits = record["exploits"]
    assert exploits, describe(proc)
    assert all(t["status"] == "complete" for t in record["trials"])
    assert all(e["step"] < record["trials"][0]["total_steps"] for e in exploits)  # none at the last report
    for e in exploits:  # a new run of the trial, forked from the donor's checkpoint, in the search's directory
        assert e["run"].startswith(f"{e['trial']}_x") and e["donor_trial"] != e["trial"]
        assert e["checkpoint"].startswith(str(runs / "pbt" / e["donor_run"] / "checkpoint_"))
        assert 1e-5 <= e["new"]["lr_g"] <= 1e-3
        start = json.loads((runs / "pbt" / e["run"] / "metrics.jsonl").read_text().splitlines()[0])
        assert (start["init_from"], start["init_from_step"]) == (e["checkpoint"], e["step"])
        # its config (every checkpoint's, and its W&B run's) names the donor's checkpoint and holds its values over
        # its steps, the exploit's change last
        newest = RunDir.at(str(runs / "pbt" / e["run"])).resume_point()
        config = newest.state["config"] if newest else None
        if config is None:  # paused before its first checkpoint, and never resumed
            continue
        assert config["init_from"] == e["checkpoint"] and config["name"] == e["run"]
        if e["new"] != e["old"]:
            assert json.loads(config["schedule"])[-1] == {"step": e["step"], "lr_g": e["new"]["lr_g"]}
    assert all(t["runs"][0] == t["trial"] for t in record["trials"])
    assert "exploits (" in proc.stdout and " copied " in proc.stdout
    replay = record["replay"]
    assert replay and replay["location"] == str(runs / "pbt" / "replay.yaml")
    cfg = parse_args(["--config", replay["location"], "--name", "replay", "--storage-path", str(tmp_path)])
    assert cfg.schedule and json.loads(cfg.schedule) == replay["schedule"]
    assert (cfg.epochs, cfg.batch_size, cfg.eval_every, cfg.ema_decay) == (3, 256, 1, 0.99)
