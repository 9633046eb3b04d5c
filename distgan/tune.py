"""`python -m distgan.tune`: a Ray Tune search over distgan's TrainConfig, each trial a `distgan.train` run.

    python -m distgan.tune --grid augment off ada --grid seed 0 1 --scheduler fifo --name aug-study
    python -m distgan.tune --space search.yaml --num-samples 8 --epochs 10 --name lr-search

Every trial is the TorchTrainer that `python -m distgan.train` builds (distgan/train.py), started from a Tune
function trainable (Ray Train's way of running under Tune) whose metrics reach Tune through Ray's
TuneReportCallback. So a trial trains, checkpoints, evaluates and logs bit for bit as that command does, on
this machine or on a cluster (RAY_ADDRESS) unchanged; `--max-concurrent-trials` defaults to what the cluster's
CPUs (GPUs with --use-gpu) hold, one trial at a time on a 2-core machine.

Search space: a YAML file (`--space`) and/or flags, over TrainConfig fields (flag names, - or _):
    lr_g: {loguniform: [1.0e-4, 3.0e-3]}    # also uniform: [lo, hi], randint: [lo, hi] (hi excluded)
    augment: {choice: ["off", ada]}          # one value drawn per sample; quote off/on/yes/no (YAML booleans)
    seed: [0, 1]                             # a list = a grid: every value, times --num-samples
    ema_decay: 0.999                         # a scalar: fixed for the whole search
    recipes:                                 # named override sets, a grid over the names
      default: {}
      slow-ema: {ema_decay: 0.9995}
Flags: --grid FIELD V [V ...], --choice FIELD V [V ...], --uniform/--loguniform/--randint FIELD LO HI. Every
other flag is a `distgan.train` flag: the base config of every trial, checked with the searched values.

ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020) stops trials whose FID
at an evaluation is worse than the better 1/reduction-factor of the trials that reached the same evaluation.
Reports happen only at evaluations (checkpoints every --eval-every epochs, no step- or time-based ones), so
ASHA's time axis is the evaluation count and every report carries an FID. `--scheduler fifo` runs every trial
to the end (a study, not a search).

`--scheduler pbt`: population based training (Jaderberg et al., 2017) over --num-samples trials. Every
--perturbation-interval evaluations, a trial among the worst --quantile-fraction copies one among the best: it
starts a new distgan run, `trial_<id>_x<k>`, forked (--init-from) from that trial's newest checkpoint, with the
searched values mutated (a range x0.8 or x1.2 within its bounds, or resampled; a choice resampled or moved to a
neighbouring value). Only values a run can change between two steps are searched (distgan.pbt). Every exploit is
in results.json and the printed table, and the winner's values over its steps are written to `replay.yaml`, which
`python -m distgan.train --config` trains on its own.

Output: `<storage path>/<name>/` holds Tune's experiment, each trial's distgan run directory (its name is the
trial's), and `results.json`: one row per trial (parameters, best FID, classifier score, KID and coverage at
that evaluation, steps, seconds, status, every evaluation; under pbt, each trial's runs, every exploit and the
replay file). The same rows print as a table. Every trial logs to
one W&B group, the search's name, unless --wandb-group is given.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import shlex
import signal
import sys
import textwrap
import time
from dataclasses import fields, replace
from typing import Any, Optional

import yaml

from distgan import pbt
from distgan.cli import parse_args
from distgan.config import (
    ConfigError,
    TrainConfig,
    check_schedule,
    config_from_dict,
    schedule_text,
)
from distgan.search_space import (
    KINDS,
    RECIPES_KEY,
    check_space,
    param_space,
    parse_space,
    space_text,
)

# Of those, the ones taken as the user gives them: no searched value changes them, and their checks read no other
# field, so an error in one is that flag's own whatever the space holds
AS_GIVEN = ("name", "storage_path", "wandb_group")
RESULTS_FILE = "results.json"
# A trial's own process only waits on its TorchTrainer, whose workers hold the CPUs/GPUs; Tune needs a trial to
# ask for something, and a local instance gets this many logical CPUs extra so that the drivers ask for no core.
TRIAL_DRIVER_CPUS = 1
POINT_KEYS = ("fid", "kid", "classifier_score", "coverage")


def trial_config(base: dict[str, Any], params: dict[str, Any], recipes: dict[str, dict], search: str,
                 trial: str) -> TrainConfig:
    """A trial's TrainConfig: the base, its recipe's overrides, its sampled values; its run directory is
    <storage path>/<search>/<trial>."""
    overrides = {**recipes.get(params.get(RECIPES_KEY), {}), **{k: v for k, v in params.items() if k != RECIPES_KEY}}
    from distgan import storage

    return config_from_dict({**base, **overrides, "name": trial,
                             "storage_path": storage.join(base["storage_path"], search)}).validate()


def total_steps(cfg: TrainConfig) -> int:
    from distgan.data import build_dataset

    per_epoch = check_schedule(cfg, len(build_dataset(cfg, "train")))
    return min(cfg.max_steps or math.inf, cfg.epochs * per_epoch)


# ------------------------------------------------------------------------------------------------ a trial


def _trial(params: dict[str, Any], base: dict[str, Any], recipes: dict[str, dict], search: str, use_gpu: bool,
           env: dict[str, str]) -> None:
    """Runs in a Tune trial: the `distgan.train` TorchTrainer for this trial's config, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distgan.train import build_trainer

    os.environ.update(env)  # what build_trainer forwards to the workers (W&B mode, test hooks)
    # the distgan run directory of trial <id> is <storage path>/<search>/trial_<id>
    cfg = trial_config(base, params, recipes, search, f"trial_{tune.get_context().get_trial_id()}")
    build_trainer(cfg, use_gpu, score_fid=True, callbacks=[TuneReportCallback()]).fit()


# Every Ray cluster's head node holds one unit of this resource. PBT takes turns among its trials only when the ones
# that do not run are known to Tune and wait (Tune's max_concurrent_trials would hide them): a PBT trial asks for
# TRIAL_SLOT_SHARE/concurrent of it, so that no more trials than the cluster's CPUs or GPUs hold run at once,
# whatever their Ray Train workers (which Tune does not see) take. The rest stays free: Ray Train places an actor of
# its own per run on the head node with 0.001 of it.
TRIAL_SLOT = "node:__internal_head__"
TRIAL_SLOT_SHARE = 0.9


def pbt_resources(concurrent: int) -> dict[str, float]:
    """A PBT trial's Tune resources: its driver's CPU and its share of TRIAL_SLOT."""
    return {"CPU": TRIAL_DRIVER_CPUS, TRIAL_SLOT: math.floor(10_000 * TRIAL_SLOT_SHARE / concurrent) / 10_000}


def _forward_reports(queue):
    """A Ray Train callback that hands each report (its metrics, and where its checkpoint went) to the trial's own
    process through `queue`, where the trial reports it to Tune with a Tune checkpoint of its own (PBT's exploit
    restores one; Ray's TuneReportCallback passes metrics only)."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            queue.put({**metrics[0], "checkpoint_path": checkpoint.path if checkpoint else None})

    return ForwardReports()


def _report_while_fitting(trainer, queue, report) -> None:
    """trainer.fit() on a thread of its own while this thread hands every item of `queue` to `report` (Tune's
    report must be called from the trial's thread); the fit's error, if any, is raised once every item is out."""
    import threading

    from ray.util.queue import Empty

    box: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised on the trial's thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while True:
        try:
            item = queue.get(timeout=1.0)
        except Empty:
            if thread.is_alive():
                continue
            try:  # the callback's last put happens before fit() returns
                item = queue.get(block=False)
            except Empty:
                break
        report(item)
    if "error" in box:
        raise box["error"]


def _pbt_trial(params: dict[str, Any], base: dict[str, Any], search: str, use_gpu: bool, env: dict[str, str],
               fields: list[str]) -> None:
    """A PBT trial: the distgan run it trains now (distgan.pbt.plan_segment: its first, its own after a pause, or a
    fork from the donor's checkpoint after an exploit), reporting each evaluation to Tune with a Tune checkpoint
    that names the distgan checkpoint."""
    import tempfile
    from pathlib import Path, PurePosixPath

    from ray import tune
    from ray.util.queue import Queue

    from distgan import storage
    from distgan.driver import checked_run
    from distgan.rundir import RunDir
    from distgan.train import build_trainer

    os.environ.update(env)
    trial = f"trial_{tune.get_context().get_trial_id()}"
    restored = None
    if tune.get_checkpoint() is not None:
        with tune.get_checkpoint().as_directory() as directory:
            restored = json.loads((Path(directory) / pbt.TUNE_STATE).read_text())
    previous = pbt.newest_exploit(pbt.read_exploits(base["storage_path"], search), trial) if restored else None
    segment = pbt.plan_segment(trial, params, fields, restored,
                               storage.list_names(storage.join(base["storage_path"], search)), previous)
    overrides = {"schedule": schedule_text(segment.history)} if len(segment.history) > 1 else {}
    if segment.init_from:
        overrides["init_from"] = segment.init_from
    cfg = trial_config(base, {**params, **overrides}, {}, search, segment.run)
    if segment.exploit is not None:
        pbt.write_exploit(base["storage_path"], search, segment.exploit)
        print(f"distgan.tune: {pbt.format_exploits([segment.exploit])}", flush=True)

    def report(item: dict[str, Any]) -> None:
        path = item.pop("checkpoint_path", None)
        metrics = {k: v for k, v in item.items() if isinstance(v, (int, float, str))}
        metrics["run"] = segment.run
        metrics[pbt.LAST_REPORT] = int(int(item["step"]) >= end)
        if path is None:
            tune.report(metrics)
            return
        location = RunDir.of(cfg).join(PurePosixPath(path).name)  # Ray's path drops a URI's scheme
        with tempfile.TemporaryDirectory() as tmp:
            state = pbt.tune_state(trial, segment, location, int(item["step"]))
            (Path(tmp) / pbt.TUNE_STATE).write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    with checked_run(cfg, ray_record=True) as checked:  # the pre-flight of distgan.train: resume, fork, data
        end = min(cfg.max_steps or math.inf, cfg.epochs * cfg.steps_per_epoch(checked.data["images"]))
        if checked.found is not None and checked.found.state["step"] >= end:
            return  # paused at its last report: nothing is left to train
        trainer = build_trainer(cfg, use_gpu, score_fid=True, callbacks=[_forward_reports(queue)], data=checked.data,
                                init_from=checked.parent and checked.parent.location)
        _report_while_fitting(trainer, queue, report)


# ---------------------------------------------------------------------------------------------- the table


def result_rows(results, base: dict[str, Any], recipes: dict[str, dict], search: str) -> list[dict[str, Any]]:
    """One row per trial from Ray Tune's ResultGrid: parameters, the evaluation with the best FID, steps,
    seconds, status ("complete", "stopped at step N" by the scheduler, or the error)."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        reports = [] if frame is None else frame.to_dict("records")
        points = [{"step": int(r["step"]), "seconds": round(float(r["time_total_s"]), 1),
                   **{k: float(r[k]) for k in POINT_KEYS if k in r}}
                  for r in reports if math.isfinite(r.get("fid", math.inf))]
        params = {k: v for k, v in result.config.items()}
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path)
        best = min(points, key=lambda p: p["fid"]) if points else None
        steps = int(reports[-1]["step"]) if reports else 0
        total = total_steps(trial_config(base, params, recipes, search, f"trial_{trial_id}"))
        if result.error is not None:
            status = f"error: {type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:200]}"
        elif steps < total:
            status = f"stopped at step {steps}"
        else:
            status = "complete"
        rows.append({"trial": f"trial_{trial_id}", "params": params,
                     "overrides": {**recipes.get(params.get(RECIPES_KEY), {}),
                                   **{k: v for k, v in params.items() if k != RECIPES_KEY}},
                     "best_fid": best["fid"] if best else None,
                     "classifier_score": best.get("classifier_score") if best else None,
                     "kid": best.get("kid") if best else None, "coverage": best.get("coverage") if best else None,
                     "best_step": best["step"] if best else None, "steps": steps, "total_steps": total,
                     "seconds": round(float(reports[-1]["time_total_s"]), 1) if reports else None,
                     "precision": reports[-1].get("precision") if reports else None,
                     "status": status, "points": points})
    return rows


def pbt_results(rows: list[dict[str, Any]], base: dict[str, Any], space: dict, args: argparse.Namespace,
                storage_path: str, search: str) -> dict[str, Any]:
    """A PBT search's part of results.json: its settings, every exploit (each row gets its trial's runs), and the
    winner's schedule written as the replay file (distgan.pbt.REPLAY_FILE), None when no trial evaluated."""
    from distgan import storage

    exploits = pbt.read_exploits(storage_path, search)
    for row in rows:
        row["runs"] = [row["trial"], *dict.fromkeys(r["run"] for r in exploits if r["trial"] == row["trial"])]
    out = {"pbt": {"perturbation_interval": args.perturbation_interval, "quantile_fraction": args.quantile_fraction,
                   "mutated": args.pbt_fields, "synchronous": args.synch}, "exploits": exploits, "replay": None}
    best = pbt.winner(rows)
    if best is None:
        return out
    run = best["runs"][-1]
    history = pbt.replay_history(run, exploits, {k: best["params"][k] for k in args.pbt_fields})
    fixed = {k: values[0] for k, (kind, values) in space.items() if kind == "fixed"}
    location = storage.join(storage_path, search, pbt.REPLAY_FILE)
    last = best["points"][-1]
    comment = (f"distgan.tune search {search}: the values {best['trial']} trained with over its steps, through its "
               f"exploits\n(its run {run}: FID {last['fid']:.2f} at step {last['step']}). Train with them:\n"
               f"  python -m distgan.train --config {location} --name <name>")
    storage.write_bytes(location, pbt.replay_yaml(pbt.replay_config(base, fixed, history), comment).encode())
    out["replay"] = {"trial": best["trial"], "run": run, "schedule": history, "location": location}
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a plain-text table, best FID first (trials without an evaluation last)."""
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", *keys, "best FID", "CS", "at step", "steps", "seconds", "status"]
    body = []
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in sorted(rows, key=lambda r: (r["best_fid"] is None, r["best_fid"] or 0.0)):
        body.append([r["trial"], *[str(r["params"].get(k, "-")) for k in keys], fmt(r["best_fid"], ".2f"),
                     fmt(r["classifier_score"], ".2f"), fmt(r["best_step"], "d"), str(r["steps"]),
                     fmt(r["seconds"], ".0f"), r["status"]])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


def write_results(storage_path: str, search: str, record: dict[str, Any]) -> str:
    """results.json in the search's directory (local, NFS or s3:// alike); returns its location."""
    from distgan import storage

    location = storage.join(storage_path, search, RESULTS_FILE)
    storage.write_bytes(location, json.dumps(record, indent=1, default=str).encode())
    return location


# ------------------------------------------------------------------------------------------------ the CLI


def space_example() -> str:
    """The YAML example of this module's docstring (the indented lines under "Search space:"): --help shows it, and
    the tests load it through --space, so the example users copy is one the loader takes."""
    lines = __doc__.split("\nSearch space:", 1)[1].splitlines()[1:]
    return textwrap.dedent("\n".join(itertools.takewhile(lambda line: line.startswith("    "), lines)))


def _epilog() -> str:
    shown = {f.name: f.metadata.get("shown", f.default) for f in fields(TrainConfig)}
    return "\n".join([
        "The search space as YAML (--space FILE; the flags above add to it), over TrainConfig fields (flag names,",
        "- or _):",
        textwrap.indent(space_example(), "    "),
        "",
        "Every `python -m distgan.train` flag is accepted too (see its --help): the base config of every trial,",
        "checked with the searched values. Two of them place the search:",
        "  --name NAME          the search's name: its directory <storage path>/NAME/ (a new one) and its trials'",
        f"                       W&B group (default: {shown['name']})",
        "  --storage-path PATH  where that directory goes: a local or NFS path, or s3://bucket/prefix",
        f"                       (default: {shown['storage_path']})",
    ])


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: `--schedule` (a distgan.train flag) must not be taken for `--scheduler`
    p = argparse.ArgumentParser(prog="python -m distgan.tune", description=__doc__.split("\n\n")[0],
                                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--space", default=None, metavar="FILE", help="YAML file of the search space (its form: below)")
    for kind in ("grid", "choice"):
        p.add_argument(f"--{kind}", action="append", nargs="+", default=[], metavar="FIELD VALUE",
                       help=f"{kind} over a field's values (repeatable)")
    for kind in ("uniform", "loguniform", "randint"):
        p.add_argument(f"--{kind}", action="append", nargs=3, default=[], metavar=("FIELD", "LOW", "HIGH"),
                       help=f"{kind} range of a field (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the space (each grid point this many "
                                                              "times) (default: 1)")
    p.add_argument("--scheduler", choices=("asha", "fifo", "pbt"), default="asha",
                   help="asha: stop trials with a poor FID at an evaluation; fifo: run all to the end; pbt: "
                        "population based training, the worst trials copy the best and mutate (default: asha)")
    p.add_argument("--grace-evals", type=int, default=1, help="ASHA: evaluations before a trial can be stopped "
                                                              "(default: 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the best 1/this at each rung "
                                                                       "(default: 2)")
    p.add_argument("--perturbation-interval", type=int, default=1,
                   help="PBT: evaluations between a trial's chances to copy a better one (default: 1)")
    p.add_argument("--quantile-fraction", type=float, default=0.25,
                   help="PBT: the worst this fraction of trials copy the best this fraction, in (0, 0.5] "
                        "(default: 0.25)")
    p.add_argument("--max-concurrent-trials", type=int, default=None,
                   help="default: as many as the cluster's CPUs (GPUs with --use-gpu) hold, at least 1")
    return p


def base_config(train_argv: list[str]) -> tuple[TrainConfig, Optional[ConfigError]]:
    """The base TrainConfig of every trial from `distgan.train` flags, and its validation error if any: perhaps a
    flag that needs a searched value, which check_space decides. A bad --name, --storage-path or --wandb-group
    raises ConfigError here, as that flag's own error: no searched value can change them."""
    try:
        return parse_args(train_argv), None
    except ConfigError as e:
        if e.field in AS_GIVEN:
            raise
        base_error = e
    cfg = parse_args(train_argv, validate=False)
    # validate() stopped at base_error's field, before these: they are checked on their own (every other field at
    # its default), which also fills in the default name and the absolute storage path the search runs under
    given = replace(TrainConfig(), **{name: getattr(cfg, name) for name in AS_GIVEN}).validate()
    return replace(cfg, name=given.name, storage_path=given.storage_path), base_error


def parse(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig, dict, dict]:
    """(tuner options, base TrainConfig, space, recipes). Raises ConfigError (argparse exits 2 by itself). The tuner's
    options and the base config are checked before the space, so an error in them is not blamed on a searched
    value."""
    args, rest = build_parser().parse_known_args(argv)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be at least 1, got {args.num_samples}")
    if args.grace_evals < 1:
        raise ConfigError(f"--grace-evals: must be at least 1, got {args.grace_evals}")
    if not (math.isfinite(args.reduction_factor) and args.reduction_factor > 1):
        raise ConfigError(f"--reduction-factor: must be a number above 1 (ASHA keeps the best 1/this), got "
                          f"{args.reduction_factor:g}")
    if args.max_concurrent_trials is not None and args.max_concurrent_trials < 1:
        raise ConfigError(f"--max-concurrent-trials: must be at least 1, got {args.max_concurrent_trials}")
    cfg, base_error = base_config(rest)
    if cfg.init_from:
        raise ConfigError("--init-from: a search starts every trial from step 0; fork a run with distgan.train",
                          field="init_from")
    if cfg.eval_every <= 0:
        raise ConfigError("--eval-every: the tuner compares trials by FID at evaluations; it must be positive")
    from distgan.metrics import metrics_supported

    ok, why = metrics_supported(cfg)
    if not ok:
        raise ConfigError(f"--dataset: the tuner ranks trials by FID, which {why}")
    space, recipes = search_space(args)
    args.pbt_fields = pbt.check_space(space, recipes, args.num_samples, args.perturbation_interval,
                                      args.quantile_fraction, cfg.schedule) if args.scheduler == "pbt" else []
    # reports (and checkpoints) at evaluations only: each carries an FID, and ASHA counts evaluations
    cfg = replace(cfg, checkpoint_every=cfg.eval_every, checkpoint_every_steps=0, checkpoint_every_minutes=0,
                  wandb_group=cfg.wandb_group or cfg.name)
    check_space(cfg, space, recipes, base_error)
    # then the pre-flight distgan.train runs (distgan.driver.check_inputs): the data once, every trial's schedule
    from distgan.data import check_data  # torch from here on: a bad flag or value is reported first

    check_space(cfg, space, recipes, num_images=check_data(cfg)["images"])
    return args, cfg, space, recipes


def search_space(args: argparse.Namespace) -> tuple[dict[str, tuple[str, list]], dict[str, dict]]:
    """(space, recipes) of --space FILE and the --grid/--choice/... flags. Raises ConfigError."""
    spec: dict[str, Any] = {}
    if args.space:
        try:
            with open(os.path.expanduser(args.space)) as fh:
                spec = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"--space: cannot read {args.space} ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--space: {args.space} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"--space: {args.space} must hold a mapping of option: values")
    space, recipes = parse_space(spec, f"--space {args.space}") if spec else ({}, {})
    for kind in KINDS:
        for field, *values in getattr(args, kind):
            key = field.replace("-", "_")
            if not values:
                raise ConfigError(f"--{kind} {field}: no values")
            parsed, _ = parse_space({key: {kind: values}}, f"--{kind}")
            if key in space:
                raise ConfigError(f"--{kind} {field}: {key} is already in the search space")
            space.update(parsed)
    if not space and not recipes:
        raise ConfigError("empty search space: give --space FILE or --grid/--choice/--uniform/--loguniform/--randint")
    return space, recipes


class StopSearch:
    """Ctrl-C, SIGTERM (`kill`, `timeout`, `ray job stop`, a scheduler) or SIGHUP (the terminal closed) stops the
    search the way Ray Tune's own Ctrl-C does, keeping what the trials reported, and is remembered for the exit
    status; a second one, or one before the search starts, raises KeyboardInterrupt. Tune's SIGINT handler would
    not say a stop happened, so it is turned off and its SIGUSR1 handler (the same stop) is called instead.
    ray.init puts a SIGTERM handler of its own in place first (a stack dump, then abort), which this replaces.
    `signum`: the first signal, 0 before any."""

    def __init__(self):
        self.signum = 0
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read when the search starts
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if self.signum or not callable(tune_stop):
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signum = signum
        tune_stop(signal.SIGUSR1, frame)


def run(args: argparse.Namespace, cfg: TrainConfig, space: dict, recipes: dict) -> dict[str, Any]:
    from distgan import storage
    from distgan.cluster import _forwarded_env, connect_ray, disconnect_ray, size_workers
    from distgan.provenance import collect

    search = cfg.name
    if storage.list_names(storage.join(cfg.storage_path, search)):
        raise ConfigError(f"--name: {storage.join(cfg.storage_path, search)} already exists; a search starts fresh, "
                          f"give a new --name", field="name")
    ray = connect_ray(cfg, extra_cpus=TRIAL_DRIVER_CPUS)
    try:  # however the search ends, the local Ray instance it started goes with it
        stop = StopSearch()
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        from distgan.hardware import ray_nodes

        use_gpu = cfg.uses_gpu(ray.cluster_resources().get("GPU", 0))
        # trials share the machine: a worker takes one CPU unless --cpus-per-worker says more, so trials run side
        # by side
        cfg = size_workers(replace(cfg, cpus_per_worker=cfg.cpus_per_worker or 1), ray_nodes(ray.nodes()), use_gpu)
        base = cfg.to_dict()
        per_trial = "GPU" if use_gpu else "CPU"
        per_trial_count = cfg.num_workers + (TRIAL_DRIVER_CPUS if per_trial == "CPU" else 0)
        concurrent = args.max_concurrent_trials or \
            max(1, int(ray.cluster_resources().get(per_trial, 0)) // per_trial_count)
        # a trial reports every --eval-every epochs and at its last step; ASHA stops whatever reaches max_t reports
        epochs = max([cfg.epochs, *(v for k, (_, vs) in space.items() if k == "epochs" for v in vs),
                      *(r.get("epochs", 0) for r in recipes.values())])
        max_t = max(math.ceil(epochs / cfg.eval_every) + 1, args.grace_evals)
        if args.scheduler == "pbt":
            # epochs, not Tune's iterations: an exploit restores the donor's checkpoint and its epoch with it
            # Trials that take turns are compared when all have reached the perturbation (Ray's synchronous PBT):
            # asynchronously, a trial a turn ahead would be ranked against one a turn behind and win on length alone
            args.synch = concurrent < args.num_samples
            scheduler = pbt.scheduler(
                synch=args.synch, time_attr="epoch", perturbation_interval=args.perturbation_interval * cfg.eval_every,
                hyperparam_mutations=pbt.mutations(space), quantile_fraction=args.quantile_fraction,
                custom_explore_fn=functools.partial(pbt.within_range, space))
            trial_fn = tune.with_parameters(_pbt_trial, base=base, search=search, use_gpu=use_gpu,
                                            env=_forwarded_env(), fields=args.pbt_fields)
        else:
            scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=args.grace_evals,
                                      reduction_factor=args.reduction_factor, max_t=max_t) \
                if args.scheduler == "asha" else FIFOScheduler()
            trial_fn = tune.with_parameters(_trial, base=base, recipes=recipes, search=search, use_gpu=use_gpu,
                                            env=_forwarded_env())
        trainable = tune.with_resources(trial_fn, pbt_resources(concurrent) if args.scheduler == "pbt" else
                                        {"CPU": TRIAL_DRIVER_CPUS})
        print(f"distgan.tune: search {search}: {args.scheduler}, {args.num_samples} sample(s) of "
              f"{space_text(space, recipes)}; {concurrent} trial(s) at a time, {cfg.num_workers} worker(s) each; "
              f"W&B group {cfg.wandb_group}", flush=True)
        t0 = time.perf_counter()
        tuner = tune.Tuner(trainable, param_space=param_space(space, recipes),
                           # a paused trial's process ends, and its Ray Train run with it (PBT pauses trials)
                           tune_config=tune.TuneConfig(metric="fid", mode="min", scheduler=scheduler,
                                                       num_samples=args.num_samples,
                                                       max_concurrent_trials=args.num_samples
                                                       if args.scheduler == "pbt" else concurrent,
                                                       reuse_actors=False),
                           run_config=tune.RunConfig(name=search, storage_path=cfg.storage_path,
                                                     verbose=1 if cfg.verbose else 0))
        results = tuner.fit()
        wall = time.perf_counter() - t0
    finally:
        disconnect_ray()
    rows = result_rows(results, base, recipes, search)
    record = {"search": search, "command": shlex.join(["python", "-m", "distgan.tune", *sys.argv[1:]]),
              "scheduler": args.scheduler, "num_samples": args.num_samples, "space": space_text(space, recipes),
              "recipes": recipes, "base": base, "wall_s": round(wall, 1), "provenance": collect(), "trials": rows,
              "stopped_by": signal.Signals(stop.signum).name if stop.signum else None}
    if args.scheduler == "pbt":
        record.update(pbt_results(rows, base, space, args, cfg.storage_path, search))
    record["location"] = write_results(cfg.storage_path, search, record)
    return record


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, cfg, space, recipes = parse(argv)
        record = run(args, cfg, space, recipes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # before the search started, or a second signal: stopped at once
        print(f"distgan.tune: interrupted ({e or 'SIGINT'}); no results were written", file=sys.stderr)
        return 128 + (signal.Signals[str(e)] if str(e) in ("SIGTERM", "SIGHUP") else signal.SIGINT)
    print(format_table(record["trials"]))
    if record["scheduler"] == "pbt":
        print(f"\nexploits ({len(record['exploits'])}):\n{pbt.format_exploits(record['exploits']) or '(none)'}")
        if record["replay"]:
            print(f"\nreplay of {record['replay']['trial']}: python -m distgan.train --config "
                  f"{record['replay']['location']} --name <name>")
    print(f"\nresults: {record['location']}")
    stopped_by = record["stopped_by"]
    if not stopped_by:
        return 0 if all(not r["status"].startswith("error") for r in record["trials"]) else 1
    print(f"distgan.tune: stopped by {stopped_by}: the table holds what each trial reported until then; a search "
          f"starts fresh, so run it again under a new --name", file=sys.stderr)
    return 128 + signal.Signals[stopped_by]


if __name__ == "__main__":
    sys.exit(main())
