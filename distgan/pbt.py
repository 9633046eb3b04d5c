"""Population Based Training for `distgan.tune --scheduler pbt` (Jaderberg et al., "Population Based Training of
Neural Networks", 2017, through Ray Tune's PopulationBasedTraining): which searched fields PBT may change mid-run
and how it mutates them; each trial's runs, one per exploit; the record of every exploit; and the winner's
schedule, replayed by `python -m distgan.train --config <replay file>`.

A trial is a chain of distgan runs. Its first is `trial_<id>`; each exploit starts a new one, `trial_<id>_x<k>`,
that forks (--init-from) from the donor's newest checkpoint with the new values. Every run's values over steps are
its history: [{step: 0, <starting values>}, {step: S, <values changed at S>}, ...], the donor's history plus the
exploit's step; a run that forked trains with that history as its --schedule, so its config (in its checkpoints,
its W&B run and metrics.jsonl) holds where every value came from, and its --init-from names the donor's checkpoint.
Each report hands Tune a tiny checkpoint holding the reporting run's TUNE_STATE (the distgan checkpoint, its step,
the history); on an exploit Tune restores the donor's, which is how a trial learns what to fork from.

Importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, NamedTuple, Optional

from distgan import storage
from distgan.checkpoint import MODEL_FIELDS, POSITION_FIELDS
from distgan.config import SCHEDULE_FIELDS, ConfigError

TUNE_STATE = "distgan_run.json"  # the file in each Tune checkpoint of a PBT trial
EXPLOITS_DIR = "exploits"  # <search>/exploits/<run>.json: one record per exploit, written by the trial
REPLAY_FILE = "replay.yaml"  # <search>/replay.yaml: the winner's schedule for distgan.train --config
LAST_REPORT = "last_report"  # 1 in a trial's report at its run's last step, else 0
RUN_NAME = re.compile(r"(trial_.+?)(?:_x(\d+))?")
# What the replay file leaves out of the search's base config: where and under which name a run lives, and what
# the tuner set only to compare trials (checkpoints at evaluations) is the replay's own choice
NOT_REPLAYED = ("name", "storage_path", "config", "init_from", "schedule", "wandb_group", "checkpoint_every",
                "checkpoint_every_steps", "checkpoint_every_minutes")


def scheduler(**options: Any):
    """Ray Tune's PopulationBasedTraining (`options` are its own), except that a report marked LAST_REPORT
    continues: an exploit there would fork a run with nothing left to train, so the trial ends as it stands."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class UntilTheLastStep(PopulationBasedTraining):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if result.get(LAST_REPORT):
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return UntilTheLastStep(**options)


# ---------------------------------------------------------------------------------------------- the space


def check_space(space: dict[str, tuple[str, list]], recipes: dict[str, dict], num_samples: int,
                perturbation_interval: int, quantile_fraction: float, schedule: Optional[str]) -> list[str]:
    """The fields PBT mutates (every searched one), after refusing, in one line, what it cannot run: a population
    under 2, an interval under 1 evaluation, a quantile fraction outside (0, 0.5], recipes, a base --schedule, a
    grid, and a searched field that a run cannot change between two steps."""
    if num_samples < 2:
        raise ConfigError(f"--num-samples: PBT needs a population of 2 at least (a trial copies another), got "
                          f"{num_samples}")
    if perturbation_interval < 1:
        raise ConfigError(f"--perturbation-interval: must be at least 1 evaluation, got {perturbation_interval}")
    if not (math.isfinite(quantile_fraction) and 0 < quantile_fraction <= 0.5):
        raise ConfigError(f"--quantile-fraction: must be in (0, 0.5] (the worst this fraction copies the best this "
                          f"fraction), got {quantile_fraction:g}")
    if recipes:
        raise ConfigError("recipes: PBT mutates single values mid-run, not named sets of them; search the fields "
                          "themselves")
    if schedule is not None:
        raise ConfigError("--schedule: under PBT each trial's schedule is what its exploits make it", field="schedule")
    mutable = []
    for key, (kind, _) in space.items():
        if kind == "fixed":
            continue
        if kind == "grid":
            raise ConfigError(f"search space: {key}: a grid runs every value, and PBT's population is --num-samples "
                              f"trials that each draw their start: give {key} as a choice (the values PBT resamples "
                              f"or steps to a neighbour of)")
        if key in MODEL_FIELDS:
            raise ConfigError(f"search space: {key}: PBT changes searched values mid-run, and {key} shapes the model "
                              f"that a checkpoint holds; fix it for the search")
        if key in POSITION_FIELDS:
            raise ConfigError(f"search space: {key}: PBT changes searched values mid-run, and {key} fixes the data "
                              f"order or a step's images, so a run's position in its epoch and its step count would "
                              f"mean another thing after the change; fix it for the search")
        if key not in SCHEDULE_FIELDS:
            raise ConfigError(f"search space: {key}: PBT changes searched values mid-run, and a run can change only "
                              f"{', '.join(SCHEDULE_FIELDS)}; fix {key} for the search")
        mutable.append(key)
    if not mutable:
        raise ConfigError(f"search space: nothing for PBT to mutate: search one of {', '.join(SCHEDULE_FIELDS)} with "
                          f"--uniform, --loguniform or --choice")
    return mutable


def mutations(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """Ray's hyperparam_mutations: a range (uniform, loguniform) as its Tune domain, which Ray perturbs by its
    factors (x0.8, x1.2) or resamples; a choice as its list, which Ray resamples or moves to a neighbouring value.
    A fixed value is not mutated."""
    from ray import tune

    return {key: getattr(tune, kind)(*values) if kind in ("uniform", "loguniform") else list(values)
            for key, (kind, values) in space.items() if kind != "fixed"}


def within_range(space: dict[str, tuple[str, list]], config: dict[str, Any]) -> dict[str, Any]:
    """Ray's custom_explore_fn: a perturbed range value clipped back into its [low, high], every value of which the
    driver checked before the search started (Ray's factors alone would leave it)."""
    for key, (kind, values) in space.items():
        if kind in ("uniform", "loguniform") and key in config:
            config[key] = min(max(config[key], values[0]), values[1])
    return config


# ---------------------------------------------------------------------------------------------- a trial's runs


def values_at(history: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The values a history holds for the step after `step`."""
    values: dict[str, Any] = {}
    for entry in history:
        if entry["step"] <= step:
            values.update({k: v for k, v in entry.items() if k != "step"})
    return values


class Segment(NamedTuple):
    """One distgan run of a trial: its name, its history, the checkpoint it forks from (None: it starts at step
    0, or resumes itself), and the record of the exploit that started it (None when no exploit did)."""
    run: str
    history: list[dict[str, Any]]
    init_from: Optional[str]
    exploit: Optional[dict[str, Any]]


def plan_segment(trial: str, params: dict[str, Any], fields: list[str], restored: Optional[dict[str, Any]],
                 runs: list[str], previous: Optional[dict[str, Any]] = None) -> Segment:
    """The run a trial trains now. `restored`: the TUNE_STATE Tune restored (None at the start); `runs`: the run
    names in the search's directory; `previous`: the record of this trial's newest exploit, if any.

    Nothing restored: the trial's first run. Its own state restored (Tune paused and resumed it): the run that
    wrote it, which resumes from its own checkpoints. Another trial's (an exploit): a new run `<trial>_x<k>` that
    forks from that state's checkpoint, its history the donor's plus the values that changed; when the trial's
    newest exploit is this same one (the trial was paused before its new run reported), that run again."""
    values = {k: params[k] for k in fields}
    if restored is None:
        return Segment(trial, [{"step": 0, **values}], None, None)
    if restored["trial"] == trial:
        return Segment(restored["run"], restored["history"], None, None)
    step = int(restored["step"])
    old = values_at(restored["history"], step)
    changed = {k: v for k, v in values.items() if old.get(k) != v}
    history = [*restored["history"], *([{"step": step, **changed}] if changed else [])]
    if previous is not None and previous["checkpoint"] == restored["checkpoint"] and previous["new"] == values:
        return Segment(previous["run"], history, restored["checkpoint"], None)
    taken = [int(m[2]) for name in runs if (m := RUN_NAME.fullmatch(name)) and m[1] == trial and m[2]]
    run = f"{trial}_x{max(taken, default=0) + 1}"
    record = {"trial": trial, "run": run, "donor_trial": restored["trial"], "donor_run": restored["run"],
              "checkpoint": restored["checkpoint"], "step": step, "old": {k: old.get(k) for k in fields},
              "new": values, "time": time.time()}
    return Segment(run, history, restored["checkpoint"], record)


def tune_state(trial: str, segment: Segment, checkpoint: str, step: int) -> dict[str, Any]:
    """What a trial's Tune checkpoint holds: who wrote it, the distgan checkpoint it stands for, the history."""
    return {"trial": trial, "run": segment.run, "checkpoint": checkpoint, "step": step, "history": segment.history}


# ---------------------------------------------------------------------------------------------- the record


def write_exploit(storage_path: str, search: str, record: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(storage_path, search, EXPLOITS_DIR, f"{record['run']}.json"),
                        json.dumps(record).encode())


def read_exploit(storage_path: str, search: str, run: str) -> Optional[dict[str, Any]]:
    data = storage.read_bytes(storage.join(storage_path, search, EXPLOITS_DIR, f"{run}.json"))
    return json.loads(data) if data is not None else None


def read_exploits(storage_path: str, search: str) -> list[dict[str, Any]]:
    """Every exploit of the search, oldest first."""
    where = storage.join(storage_path, search, EXPLOITS_DIR)
    records = [json.loads(storage.read_bytes(storage.join(where, name)))
               for name in storage.list_names(where) if name.endswith(".json")]
    return sorted(records, key=lambda r: r["time"])


def newest_exploit(records: list[dict[str, Any]], trial: str) -> Optional[dict[str, Any]]:
    mine = [r for r in records if r["trial"] == trial]
    return max(mine, key=lambda r: r["time"]) if mine else None


def format_exploits(records: list[dict[str, Any]]) -> str:
    """One line an exploit: who copied whom at which step, each value old -> new."""
    lines = []
    for r in records:
        changes = ", ".join(f"{k} {r['old'][k]:.4g} -> {v:.4g}" if isinstance(v, float) and
                            isinstance(r["old"].get(k), float) else f"{k} {r['old'].get(k)} -> {v}"
                            for k, v in r["new"].items() if r["old"].get(k) != v)
        lines.append(f"{r['trial']} copied {r['donor_run']} at step {r['step']} into {r['run']}: "
                     f"{changes or 'no value changed'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the replay


def lineage(run: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The exploits that made `run`, oldest first: its own, then its donor run's, back to a trial's first run."""
    by_run = {r["run"]: r for r in records}
    chain: list[dict[str, Any]] = []
    while run in by_run:
        record = by_run[run]
        if record in chain or (chain and record["step"] > chain[-1]["step"]):
            raise ValueError(f"the exploit records of {run} do not form a chain back to a trial's first run")
        chain.append(record)
        run = record["donor_run"]
    return chain[::-1]


def replay_history(run: str, records: list[dict[str, Any]], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The values `run` trained with over its steps (PopulationBasedTrainingReplay's idea, from the exploit
    records): [{step: 0, <the first run's values>}, {step: S, <what changed at S>}, ...]. `values`: the run's
    values now, which are its only ones when no exploit made it."""
    chain = lineage(run, records)
    if not chain:
        return [{"step": 0, **values}]
    history = [{"step": 0, **chain[0]["old"]}]
    current = dict(chain[0]["old"])
    for record in chain:
        changed = {k: v for k, v in record["new"].items() if current.get(k) != v}
        current.update(record["new"])
        if changed:
            history.append({"step": record["step"], **changed})
    return history


def replay_config(base: dict[str, Any], fixed: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The replay file's options: the search's base config where it differs from the defaults (less NOT_REPLAYED),
    the fixed values of the space, and `schedule`: the history."""
    from distgan.config import TrainConfig

    defaults = TrainConfig().to_dict()
    options = {k: v for k, v in base.items() if k not in NOT_REPLAYED and v != defaults.get(k)}
    return {**options, **fixed, "schedule": history}


def replay_yaml(options: dict[str, Any], comment: str) -> str:
    """The replay file's text: `comment` as comment lines, then the options, schedule entries one a line."""
    import yaml

    schedule = options.get("schedule", [])
    head = {k: v for k, v in options.items() if k != "schedule"}
    lines = [f"# {line}" for line in comment.splitlines()]
    lines.append(yaml.safe_dump(head, sort_keys=False, default_flow_style=False).rstrip())
    lines.append("schedule:")
    lines += [f"  - {json.dumps(entry)}" for entry in schedule]
    return "\n".join(lines) + "\n"


def winner(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The trial PBT ends with the best model: the lowest FID at its last evaluation (an exploit can leave a trial's
    best FID behind in a run it gave up), among trials that completed, else among all that evaluated."""
    evaluated = [r for r in rows if r["points"]]
    done = [r for r in evaluated if r["status"] == "complete"] or evaluated
    return min(done, key=lambda r: r["points"][-1]["fid"]) if done else None
