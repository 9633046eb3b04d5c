"""Recipe sweep: sample quality against training steps and seconds for candidate defaults of the main command,
run through `python -m distgan.tune` (FIFO: every recipe to the end, one trial at a time on this machine).

Each recipe is a named set of TrainConfig overrides on top of SEED_RECIPE (the TensorFlow tutorial's recipe);
each trial trains as `python -m distgan.train` does and evaluates the EMA generator every `--eval-every` epochs
with the project's metrics. The tuner's results.json becomes a records file (recipe, seed, overrides,
precision, each evaluation's step, seconds, FID, KID, classifier score and coverage) that `--plot` and
bench/recipe_report.py read. Seconds depend on the machine's load; steps do not.

    python bench/recipe.py --recipes seed lr6e-4 --seeds 0 1 --epochs 40
    python bench/recipe.py --from-search runs/<search>/results.json --note "..."   # any distgan.tune search
writes bench/results/runs/recipe-<date>.json (git-ignored) unless --output is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _results import output_file  # noqa: E402

from distgan import search_space, tune  # noqa: E402

# Candidate defaults; each is a set of TrainConfig overrides on top of the seed's recipe.
RECIPES = {
    "seed": {"precision": "fp32"},  # configs/seed.yaml: the tutorial's recipe, fp32
    "seed-bf16": {},
    "lr6e-4": {"lr_g": 6e-4, "lr_d": 6e-4},
    "lr4e-4": {"lr_g": 4e-4, "lr_d": 4e-4},
    "ttur": {"lr_g": 2e-4, "lr_d": 8e-4},
    "lr6e-4-b0.9": {"lr_g": 6e-4, "lr_d": 6e-4, "beta2": 0.9},
    "lr6e-4-ema.995": {"lr_g": 6e-4, "lr_d": 6e-4, "ema_decay": 0.995},
    "lr1e-3": {"lr_g": 1e-3, "lr_d": 1e-3},
    "lr8e-4-batch128": {"lr_g": 8e-4, "lr_d": 8e-4, "batch_size": 128},
    "lr1e-3-batch32": {"lr_g": 1e-3, "lr_d": 1e-3, "batch_size": 32},  # twice the G steps per image
    "lr1e-3-decay.5": {"lr_g": 1e-3, "lr_d": 1e-3, "lr_decay_start": 0.5},  # the default: to 0 in the 2nd half
    "lr1e-3-decay.3": {"lr_g": 1e-3, "lr_d": 1e-3, "lr_decay_start": 0.3},
    "lr1e-3-decay.5-ema.9995": {"lr_g": 1e-3, "lr_d": 1e-3, "lr_decay_start": 0.5, "ema_decay": 0.9995},
    "g2e-3-d1e-3-decay.5": {"lr_g": 2e-3, "lr_d": 1e-3, "lr_decay_start": 0.5},  # G the faster learner
    "lr2e-3-decay0": {"lr_g": 2e-3, "lr_d": 2e-3, "lr_decay_start": 0.0},  # linear to 0 from the first step
    "lr1e-3-decay.5-b2.99": {"lr_g": 1e-3, "lr_d": 1e-3, "lr_decay_start": 0.5, "beta2": 0.99},
    "lr1.5e-3-decay.5-batch128": {"lr_g": 1.5e-3, "lr_d": 1.5e-3, "lr_decay_start": 0.5, "batch_size": 128},
}
SEED_RECIPE = dict(num_workers=2, batch_size=64, lr_g=2e-4, lr_d=2e-4, lr_decay_start=1.0, beta1=0.5, beta2=0.999,
                   ema_decay=0.999, precision="auto", wandb_mode="disabled", checkpoint_every_minutes=0,
                   eval_samples=1000)


def search_argv(recipes: list[str], seeds: list[int], epochs: int, eval_every: int, storage: str, name: str,
                 space_file: Path) -> list[str]:
    """`python -m distgan.tune` arguments for the recipes x seeds grid; writes the space to `space_file`."""
    space_file.write_text(yaml.safe_dump({"recipes": {r: RECIPES[r] for r in recipes}, "seed": list(seeds)}))
    base = [f"--{k.replace('_', '-')}={v}" for k, v in SEED_RECIPE.items() if k not in search_space.TUNER_FIELDS]
    return ["--space", str(space_file), "--scheduler", "fifo", *base, f"--epochs={epochs}",
            f"--eval-every={eval_every}", "--storage-path", storage, "--name", name]


def records_from_search(search: dict) -> list[dict]:
    """A distgan.tune results.json -> records (one per trial that evaluated): the recipe is the trial's named
    recipe, else its overrides other than the seed, else the search's base (its replayed schedule, if any)."""
    records = []
    for trial in search["trials"]:
        if not trial["points"]:
            continue
        overrides = {k: v for k, v in trial["overrides"].items() if k != "seed"}
        recipe = trial["params"].get(search_space.RECIPES_KEY) or ", ".join(f"{k}={v}" for k, v in overrides.items())
        # a search over a --config with a schedule (a PBT winner's replay) trains that schedule, not the base recipe
        base = "replayed schedule" if search["base"].get("schedule") else "base"
        records.append({"recipe": recipe or base, "seed": trial["overrides"].get("seed", search["base"]["seed"]),
                        "overrides": overrides, "precision": trial.get("precision"),
                        "epochs": overrides.get("epochs", search["base"]["epochs"]), "wall_s": trial["seconds"],
                        "status": trial["status"], "points": trial["points"],
                        "best": min(trial["points"], key=lambda p: p["fid"])})
    return records


def plot(records: list[dict], out: Path, seconds_per_step: float | None = None) -> Path:
    """FID and classifier score against G steps, one line per recipe (the mean over its seeds, each seed faint).
    With `seconds_per_step` (the default run's measured pace) a top axis reads the steps as seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["recipe"] for r in records))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(names) > len(colors):  # zip would drop the recipes beyond the default cycle's ten colours
        colors = plt.get_cmap("tab20").colors
    for color, name in zip(colors, names):
        runs = [r for r in records if r["recipe"] == name]
        for ax, key in zip(axes, ("fid", "classifier_score")):
            for r in runs:
                ax.plot([p["step"] for p in r["points"]], [p[key] for p in r["points"]], color=color, alpha=0.25)
            steps = sorted({p["step"] for r in runs for p in r["points"]})
            mean = [sum(p[key] for r in runs for p in r["points"] if p["step"] == s) /
                    sum(1 for r in runs for p in r["points"] if p["step"] == s) for s in steps]
            ax.plot(steps, mean, color=color, label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    for ax, label in zip(axes, ("FID (lower is better)", "classifier score (higher is better)")):
        ax.set_xlabel("G steps (batch 64)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if seconds_per_step:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * seconds_per_step, lambda t: t / seconds_per_step))
            top.set_xlabel("seconds of training at the default run's pace")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["seed-bf16", "lr6e-4"], choices=sorted(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--storage-path", default=None, help="where the search runs (default: a temporary directory)")
    parser.add_argument("--from-search", nargs="+", type=Path, default=None, metavar="RESULTS_JSON",
                        help="convert finished distgan.tune searches (records in one file) instead of running one")
    parser.add_argument("--note", default=None, help="what, where and under which conditions (kept in the file)")
    parser.add_argument("--output", type=output_file, default=None, metavar="FILE.json",
                        help="write the records here (default: a new bench/results/runs/recipe-<date>.json)")
    parser.add_argument("--plot", nargs="+", type=Path, default=None, metavar="JSON",
                        help="only draw the picture of these result files (next to the first, .png)")
    parser.add_argument("--seconds-per-step", type=float, default=None, help="for --plot's top axis")
    args = parser.parse_args(argv)
    if args.plot:
        records = [r for f in args.plot for r in json.loads(f.read_text())["records"]]
        print(f"wrote {plot(records, args.plot[0].with_suffix('.png'), args.seconds_per_step)}")
        return 0
    out = args.output or Path(__file__).parent / "results" / "runs" / f"recipe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args.from_search:
        searches = [json.loads(f.read_text()) for f in args.from_search]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            name = f"recipe-{time.strftime('%Y%m%d-%H%M%S')}"
            storage = args.storage_path or tmp
            code = tune.main(search_argv(args.recipes, args.seeds, args.epochs, args.eval_every, storage, name,
                                         Path(tmp) / "space.yaml"))
            if code:
                return code
            searches = [json.loads((Path(storage) / name / tune.RESULTS_FILE).read_text())]
    out.parent.mkdir(parents=True, exist_ok=True)
    commands = [s["command"] for s in searches]
    record = {"note": args.note or "; ".join(commands), "commands": commands,
              "searches": [{k: s.get(k) for k in ("search", "command", "wall_s", "provenance")} for s in searches],
              "records": [r for s in searches for r in records_from_search(s)]}
    out.write_text(json.dumps(record, indent=1))
    for r in record["records"]:
        b = r["best"]
        print(f"{r['recipe']:>16} seed {r['seed']}: best FID {b['fid']:.2f} CS {b['classifier_score']:.2f} "
              f"coverage {b['coverage']:.3f} at step {b['step']} ({r['wall_s']:.0f} s, {r['status']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
