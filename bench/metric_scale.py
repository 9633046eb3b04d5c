"""The scale of distgan's quality metrics: what real digits, noise and one repeated digit score.

Each set is compared, as a run's generated images are, with the 1,000 held-out mnist5k digits:
    real digits     1,000 digits of the training split (disjoint from the reference), seed-0 shuffle
    blurred digits  the same digits under a 5x5 Gaussian blur (sigma 1.5)
    one digit       the first 3 of those digits, repeated 1,000 times (mode collapse)
    noise           1,000 images of uniform noise in [-1, 1] (seed 1)
The figures depend only on the data and the shipped classifier, not on the machine's speed.

    python bench/metric_scale.py --output bench/results/metric-scale_<where>_<yyyy-mm>.json
writes the JSON and a Markdown table beside it, with the machine, versions and commit.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torchvision.transforms.functional import gaussian_blur

# the repository first: processes spawned later inherit sys.path, and bench/kernels.py must not shadow `kernels`
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import _results  # noqa: E402

from distgan import metrics, provenance  # noqa: E402
from distgan.config import TrainConfig  # noqa: E402
from distgan.data import mnist5k, to_model_range  # noqa: E402

KEYS = ("fid", "kid", "classifier_score", "coverage", "diversity")


def image_sets() -> dict[str, torch.Tensor]:
    images, labels = mnist5k("train")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:1000]
    real, labels = to_model_range(images)[order], torch.from_numpy(labels)[order]
    return {
        "real digits": real,
        "blurred digits": gaussian_blur(real, kernel_size=5, sigma=1.5),
        "one digit repeated": real[labels == 3][:1].repeat(1000, 1, 1, 1),
        "noise": torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1,
    }


def markdown(result: dict) -> str:
    lines = ["# The scale of the quality metrics", "",
             f"`{result['command']}` ({result['created']})", "",
             f"- machine: {result['machine']['processor']}, {result['machine']['cpu_count']} CPUs, "
             f"gpu {result['machine']['gpu']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"- git: {result['git']['commit']}" + (" (uncommitted changes)" if result["git"]["dirty"] else ""),
             "- reference: the 1,000 held-out mnist5k digits; classifier: distgan/assets/mnist_classifier.pt", "",
             "| images | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for name, scores in result["sets"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[k]:.3g}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _results.add_output_args(p, "metric-scale")
    args = p.parse_args(argv)
    evaluator = metrics.QualityEvaluator(metrics.reference_images(TrainConfig()))
    result = {
        "command": "python bench/metric_scale.py" + (f" --output {args.output}" if args.output else ""),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance.collect(),
        "sets": {name: evaluator.evaluate(images) for name, images in image_sets().items()},
    }
    _results.publish(result, markdown(result), "metric-scale", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
