"""Recipe sweep: sample quality against training steps and seconds for candidate defaults of the main command.

Each recipe trains exactly as `python -m distgan.train` does (the Trainer in 2 gloo processes, 2 workers,
local BatchNorm, EMA), evaluating the EMA generator every `--eval-every` epochs with the project's metrics,
and records (step, seconds of training, FID, KID, classifier score, coverage). Seconds are this machine's
and depend on its load; steps do not, so the README converts steps to the default run's wall clock with the
throughput that `bench/train.py` measures side by side.

    python bench/recipe.py --recipes seed lr6e-4 --seeds 0 1 --epochs 40
writes bench/results/runs/recipe-<date>.json (git-ignored) unless --output is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distgan.config import TrainConfig  # noqa: E402
from distgan.trainer import Trainer  # noqa: E402

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


class _Curve:
    """A tracker that keeps each evaluation's metrics with the seconds of training so far."""

    def __init__(self, t0: float):
        self.t0, self.points = t0, []

    def log_epoch(self, step, epoch, samples, metrics):
        if metrics:
            self.points.append({"step": step, "epoch": epoch, "seconds": round(time.perf_counter() - self.t0, 1),
                                **{k: metrics[k] for k in ("fid", "kid", "classifier_score", "coverage")}})

    def log_step(self, step, metrics):
        pass

    def finish(self, summary):
        pass


def _worker(rank: int, init: str, cfg_dict: dict, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(minutes=10))
    try:
        curve = _Curve(time.perf_counter())
        trainer = Trainer(TrainConfig(**cfg_dict).validate(), tracker_factory=lambda resumed: curve)
        trainer.fit()
        if rank == 0:
            Path(out).write_text(json.dumps({"precision": trainer.precision, "points": curve.points}))
    finally:
        dist.destroy_process_group()


def run_recipe(name: str, seed: int, epochs: int, eval_every: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**SEED_RECIPE, **RECIPES[name], "seed": seed, "epochs": epochs, "eval_every": eval_every,
               "checkpoint_every": epochs, "storage_path": tmp, "name": "recipe"}
        out = Path(tmp) / "curve.json"
        t0 = time.perf_counter()
        mp.start_processes(_worker, args=(str(Path(tmp) / "pg"), cfg, str(out), threads), nprocs=2,
                           start_method="spawn")
        result = json.loads(out.read_text())
    best = min(result["points"], key=lambda p: p["fid"])
    return {"recipe": name, "seed": seed, "overrides": RECIPES[name], "precision": result["precision"],
            "epochs": epochs, "wall_s": round(time.perf_counter() - t0, 1), "points": result["points"],
            "best": best}


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--plot", nargs="+", type=Path, default=None, metavar="JSON",
                        help="only draw the picture of these result files (next to the first, .png)")
    parser.add_argument("--seconds-per-step", type=float, default=None, help="for --plot's top axis")
    args = parser.parse_args(argv)
    if args.plot:
        records = [r for f in args.plot for r in json.loads(f.read_text())["records"]]
        print(f"wrote {plot(records, args.plot[0].with_suffix('.png'), args.seconds_per_step)}")
        return 0
    out = args.output or Path(__file__).parent / "results" / "runs" / f"recipe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:  # recipes interleaved within a seed, so machine load hits them alike
        for name in args.recipes:
            rec = run_recipe(name, seed, args.epochs, args.eval_every, args.threads)
            records.append(rec)
            b = rec["best"]
            print(f"{name:>16} seed {seed}: best FID {b['fid']:.2f} CS {b['classifier_score']:.2f} "
                  f"coverage {b['coverage']:.3f} at step {b['step']} ({rec['wall_s']:.0f} s)", flush=True)
            out.write_text(json.dumps({"records": records}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
