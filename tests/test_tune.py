"""distgan.tune: the search space from YAML and flags as the CLI reads it, the results table, and (slow) a
3-trial ASHA search on the test Ray cluster that stops a poor trial early and writes its table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from distgan.config import ConfigError, TrainConfig
from distgan.tune import (
    build_parser,
    format_table,
    main,
    parse,
    result_rows,
    space_example,
)

from conftest import FAST_POLL, REPO, describe
from support import Background


def test_base_flag_needing_a_searched_value_is_checked_with_that_value(tmp_path):
    common = ["--storage-path", str(tmp_path), "--name", "s"]
    _, cfg, space, _ = parse(["--grid", "augment", "translation,cutout", "ada", "--augment-p", "0.25", *common])
    assert (cfg.augment, cfg.augment_p) == ("off", 0.25)
    assert space["augment"] == ("grid", ["translation,cutout", "ada"])
    # a value of the grid the flag does not fit is named, with the flag's own complaint
    with pytest.raises(ConfigError, match=r"search space: augment='off': --augment-p: needs --augment"):
        parse(["--grid", "augment", "off", "ada", "--augment-p", "0.25", *common])
    # a flag wrong whatever the space holds is reported as the flag's own error
    with pytest.raises(ConfigError, match=r"^--lr-g: must be in \(0, 1\)"):
        parse(["--grid", "augment", "off", "ada", "--lr-g", "2", *common])


def test_tuner_reports_at_evaluations_only_and_groups_wandb_by_search(tmp_path):
    args, cfg, space, _ = parse(["--grid", "augment", "off", "ada", "--storage-path", str(tmp_path), "--name", "s",
                                 "--eval-every", "2", "--checkpoint-every-minutes", "5"])
    assert (cfg.checkpoint_every, cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes) == (2, 0, 0)
    assert cfg.wandb_group == "s" and space == {"augment": ("grid", ["off", "ada"])} and args.scheduler == "asha"


@pytest.mark.parametrize("argv, message", [
    (["--grid", "lr_g", "2"], "error: search space: lr_g=2.0: --lr-g: must be in (0, 1)"),
    ([], "error: empty search space"),
    (["--grid", "seed", "0", "--eval-every", "0"], "error: --eval-every: the tuner compares trials by FID"),
    (["--grid", "seed", "0", "--space", "/nonexistent.yaml"], "error: --space: cannot read /nonexistent.yaml"),
    (["--grid", "seed", "0", "--grace-evals", "0"], "error: --grace-evals: must be at least 1, got 0"),
    (["--grid", "seed", "0", "--reduction-factor", "1"],
     "error: --reduction-factor: must be a number above 1 (ASHA keeps the best 1/this), got 1"),
    (["--grid", "seed", "0", "--init-from", "/tmp"], "error: --init-from: a search starts every trial from step 0"),
    # the pre-flight distgan.train runs: the data, and each trial's schedule against it
    (["--grid", "seed", "0", "--dataset", "mnist", "--data-root", "/nonexistent"],
     "error: --data-root: /nonexistent does not exist"),
    (["--grid", "batch_size", "64", "8192"],
     "error: search space: batch_size=8192: --batch-size 8192 x --n-critic 1 needs 8192 images per generator step"),
])
def test_cli_refuses_bad_input_in_one_line_before_ray(tmp_path, capsys, argv, message):
    assert main([*argv, "--storage-path", str(tmp_path), "--name", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--grid", "seed", "0", "1", "--name", "a/b"], "error: --name: 'a/b' must be letters, digits"),
    # a searched value the base flags would fail with, or a bad value in the space itself, is not blamed instead
    (["--grid", "augment", "off", "ada", "--augment-p", "0.5", "--name", "a/b"], "error: --name: 'a/b' must be"),
    (["--grid", "lr_g", "2", "--name", "a/b"], "error: --name: 'a/b' must be"),
    (["--grid", "seed", "0", "1", "--storage-path", "s3://"], "error: --storage-path: 's3://' "),
    (["--grid", "augment", "off", "ada", "--augment-p", "0.5", "--storage-path", "s3://"],
     "error: --storage-path: 's3://' "),
    (["--grid", "seed", "0", "1", "--wandb-group", "a/b"], "error: --wandb-group: 'a/b' must be"),
])
def test_a_bad_name_or_storage_path_is_reported_as_itself_before_the_space(argv, message, capsys):
    # --eval-every 0 is refused too, after these: nothing here can reach Ray
    assert main([*argv, "--eval-every", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_a_base_flag_left_to_the_space_still_gets_a_checked_name_and_storage_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, cfg, _, _ = parse(["--grid", "augment", "translation,cutout", "ada", "--augment-p", "0.25",
                          "--storage-path", "runs"])
    assert cfg.name.startswith("distgan-") and cfg.wandb_group == cfg.name
    assert cfg.storage_path == str(tmp_path / "runs")


def test_the_documented_yaml_space_loads_through_space_and_is_in_the_help(tmp_path):
    example = space_example()
    assert "augment:" in example and "recipes:" in example  # the whole example, not a stray line of it
    path = tmp_path / "space.yaml"
    path.write_text(example)
    _, _, space, recipes = parse(["--space", str(path), "--storage-path", str(tmp_path), "--name", "s"])
    assert space == {"lr_g": ("loguniform", [1e-4, 3e-3]), "augment": ("choice", ["off", "ada"]),
                     "seed": ("grid", [0, 1]), "ema_decay": ("fixed", [0.999])}
    assert recipes == {"default": {}, "slow-ema": {"ema_decay": 0.9995}}
    help_text = build_parser().format_help()
    assert all(line in help_text for line in example.splitlines())
    assert "docstring" not in help_text
    assert "Every `python -m distgan.train` flag is accepted" in help_text
    assert "  --name NAME " in help_text and "  --storage-path PATH " in help_text


def _result(params, reports, error=None):
    return SimpleNamespace(config=params, metrics={"trial_id": f"t{params['lr_g']}"}, path="/x", error=error,
                           metrics_dataframe=pd.DataFrame(reports) if reports else None)


def test_rows_take_the_best_evaluation_and_say_which_trials_were_stopped(tmp_path):
    base = TrainConfig(storage_path=str(tmp_path), name="s", epochs=2).to_dict()  # 62 steps an epoch
    full = [{"step": 62, "time_total_s": 10.0, "fid": 90.0, "classifier_score": 2.0, "kid": 1.0, "coverage": 0.5},
            {"step": 124, "time_total_s": 20.0, "fid": 80.0, "classifier_score": 2.5, "kid": 0.9, "coverage": 0.6}]
    rows = result_rows([_result({"lr_g": 1e-3}, full),
                        _result({"lr_g": 1e-6}, [{**full[0], "fid": 300.0}]),
                        _result({"lr_g": 2e-6}, [], error=RuntimeError("boom\nworker died"))], base, {}, "s")
    done, stopped, failed = rows
    assert (done["best_fid"], done["classifier_score"], done["best_step"], done["steps"], done["seconds"]) == \
        (80.0, 2.5, 124, 124, 20.0)
    assert done["status"] == "complete" and done["total_steps"] == 124 and len(done["points"]) == 2
    assert stopped["status"] == "stopped at step 62" and stopped["best_fid"] == 300.0
    assert failed["status"] == "error: RuntimeError: worker died" and failed["best_fid"] is None
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["trial", "lr_g", "best"]
    assert [line.split()[0] for line in table[1:]] == ["trial_t0.001", "trial_t1e-06", "trial_t2e-06"]
    assert "80.00" in table[1] and "stopped at step 62" in table[2]


@pytest.mark.slow
def test_three_trial_asha_search_stops_a_poor_trial_and_writes_its_table(ray_cluster, tmp_path):
    space = tmp_path / "space.yaml"
    # a G that barely learns (lr_g 1e-6) is far worse than the default at the first evaluation
    space.write_text("lr_g: [1.0e-3, 1.0e-6, 3.0e-6]\nema_decay: 0.99\n")
    env = ray_cluster.client_env(**{"WANDB_MODE": "offline", "WANDB_SILENT": "true", **FAST_POLL})
    proc = subprocess.run([sys.executable, "-m", "distgan.tune", "--space", str(space), "--grace-evals", "1",
                           "--epochs", "2", "--batch-size", "128", "--eval-every", "1", "--eval-samples", "200",
                           "--storage-path", str(tmp_path / "runs"), "--name", "search"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, describe(proc)
    record = json.loads((tmp_path / "runs" / "search" / "results.json").read_text())
    trials = record["trials"]
    assert len(trials) == 3 and record["scheduler"] == "asha"
    assert sorted(t["params"]["lr_g"] for t in trials) == [1e-6, 3e-6, 1e-3]
    assert all(t["params"]["ema_decay"] == 0.99 for t in trials)
    stopped = [t for t in trials if t["status"].startswith("stopped at step")]
    assert stopped and all(t["steps"] < t["total_steps"] for t in stopped)
    best = min(trials, key=lambda t: t["best_fid"])
    assert best["params"]["lr_g"] == 1e-3 and best["status"] == "complete" and best["steps"] == 62
    assert all(math.isfinite(t["best_fid"]) and t["classifier_score"] > 0 and t["seconds"] > 0 for t in trials)
    for t in trials:  # every trial is a distgan run of its own, in the search's directory
        assert (tmp_path / "runs" / "search" / t["trial"] / "metrics.jsonl").exists()
    table = proc.stdout[proc.stdout.index("trial "):]
    assert all(t["trial"] in table for t in trials) and "stopped at step" in table


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_the_search_keeps_what_the_trials_reported_and_says_so(ray_cluster, tmp_path,
                                                                                      signame):
    """Ctrl-C, or SIGTERM from `kill`, `timeout` and schedulers (ray.init's own SIGTERM handler would dump a stack
    and abort): Tune stops the search, and the exit status says it was stopped."""
    import os
    import signal

    signum = signal.Signals[signame]

    env = ray_cluster.client_env(**{"WANDB_MODE": "disabled", **FAST_POLL})
    argv = [sys.executable, "-m", "distgan.tune", "--grid", "seed", "0", "1", "--scheduler", "fifo", "--epochs", 10,
            "--eval-every", 1, "--eval-samples", 200, "--storage-path", tmp_path / "runs", "--name", "search"]
    with Background(argv, tmp_path / "tune.log", env) as search:
        search.wait_for_log("img/s", 300)  # a trial is training
        os.kill(search.proc.pid, signum)
        search.proc.wait(timeout=180)
    text = search.text()
    proc = search.proc
    assert proc.returncode == 128 + signum, text[-3000:]
    assert "*** SIGTERM received" not in text
    assert f"distgan.tune: stopped by {signame}: the table holds what each trial reported" in text
    record = json.loads((tmp_path / "runs" / "search" / "results.json").read_text())
    # the running trial is in the table; the one still waiting never started (one trial at a time here)
    assert record["stopped_by"] == signame and [t["params"] for t in record["trials"]][:1] == [{"seed": 0}]
