"""The TensorFlow tutorial's recipe as a plain loop (one process, eager, no Ray, no EMA) on the same data and step
budget as a distgan run, scored with the same quality metrics, so the two can be compared side by side.

    python bench/quality.py --run runs/<name>            # the budget and the distgan figures come from that run
    python bench/quality.py --steps 1240 --batch-size 64  # or give the budget directly

Writes a new bench/results/runs/quality-<YYYYmmdd-HHMMSS>.json (git-ignored), or exactly --output PATH (the
committed bench/results/quality-tf-tutorial_<where>_<yyyy-mm>.json is refreshed only by naming it), and prints a
table. The plain loop uses every core this process is given (torch's default threads); the comparison is of sample
quality at equal steps, not of speed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _results import add_output_args, int_at_least, write_result  # noqa: E402

from distgan import seeds  # noqa: E402
from distgan.config import MIN_EVAL_SAMPLES, TrainConfig  # noqa: E402
from distgan.data import build_dataset  # noqa: E402
from distgan.metrics import QualityEvaluator, reference_images  # noqa: E402
from distgan.models import build_models  # noqa: E402
from distgan.step import gan_step, make_optimizers  # noqa: E402
from distgan.storage import read_metrics  # noqa: E402

QUALITY = ("fid", "kid", "classifier_score", "coverage", "diversity")


def plain_loop(cfg: TrainConfig, steps: int, eval_samples: int) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    g, d = build_models(cfg)
    opt_g, opt_d = make_optimizers(g, d, cfg)
    train = build_dataset(cfg, "train")
    images = train.batch(torch.arange(len(train)))[0]  # every image in [-1, 1]
    gen = torch.Generator().manual_seed(cfg.seed)
    done, t0 = 0, time.perf_counter()
    while done < steps:
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            real = images[order[start:start + cfg.batch_size]]
            gan_step(g, d, opt_g, opt_d, [real], lambda n: torch.randn(n, cfg.z_dim), impl="eager")
            done += 1
            if done == steps:
                break
    seconds = time.perf_counter() - t0
    g.eval()
    with torch.no_grad():
        z = torch.randn(eval_samples, cfg.z_dim, generator=torch.Generator().manual_seed(seeds.evaluation(cfg.seed)))
        fake = torch.cat([g(chunk) for chunk in z.split(250)])
    metrics = QualityEvaluator(reference_images(cfg)).evaluate(fake)
    return {**metrics, "steps": steps, "train_seconds": round(seconds, 1)}


def last_evaluation(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "fid" in r]
    steps = max((r.get("step", 0) for r in rows), default=0)
    if not evals:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no evaluation rows")
    return {**evals[-1], "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a distgan run directory to compare against")
    p.add_argument("--steps", type=int_at_least(1), help="G steps (default: the run's)")
    # BatchNorm in training needs two values a channel; FID and KID two generated images (a covariance)
    p.add_argument("--batch-size", type=int_at_least(2), default=64)
    p.add_argument("--eval-samples", type=int_at_least(MIN_EVAL_SAMPLES), default=1000)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    add_output_args(p, "quality")
    args = p.parse_args(argv)
    distgan = last_evaluation(args.run) if args.run else None
    steps = args.steps or (distgan or {}).get("steps")
    if not steps:
        p.error("give --run or --steps")
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=1, seed=args.seed, kernels="eager").validate()
    plain = plain_loop(cfg, steps, args.eval_samples)
    rows = [("plain eager loop, no EMA", plain)] + ([("distgan (Ray+DDP, EMA G)", distgan)] if distgan else [])
    print(f"{'recipe':28s} {'steps':>6s} " + " ".join(f"{k:>16s}" for k in QUALITY))
    for label, m in rows:
        print(f"{label:28s} {m['steps']:6d} " + " ".join(f"{m.get(k, float('nan')):16.4f}" for k in QUALITY))
    result = {"machine": platform.platform(), "torch": torch.__version__, "plain_eager_no_ema": plain,
              "distgan": distgan, "distgan_run": str(args.run) if args.run else None}
    print(f"wrote {write_result(result, None, args.name or 'quality', args.output, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
