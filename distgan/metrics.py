"""Sample-quality metrics for the MNIST datasets, with no downloads: a small digit classifier the project
trains itself (shipped in distgan/assets/) supplies the features and class probabilities.

    fid               Fréchet distance between classifier features of real and generated images
                      (torchmetrics' FrechetInceptionDistance with our feature network instead of Inception)
    kid, kid_std      kernel (polynomial MMD) distance on the same features, mean and std over subsets
    classifier_score  exp(E_x KL(p(y|x) || p(y))): the Inception Score with the digit classifier; 1..10
    coverage          normalised entropy of the histogram of predicted digits: 1 = all ten digits equally
                      often, 0 = a single digit (mode collapse)
    diversity         mean pairwise feature distance of the batch divided by that of the real reference:
                      ~1 = as varied as real digits, 0 = identical images

The numbers are comparable between distgan runs, not with published Inception-based FIDs.

The classifier: `python -m distgan.metrics --rebuild-classifier` trains it on the mnist5k TRAIN split
(4,000 digits, fixed seed, light affine augmentation, about a minute on two CPU cores), measures it on the
mnist5k TEST split (1,000 held-out digits) and rewrites the weights and their record (SHA-256, accuracy).
Loading checks the SHA-256 against that record and uses torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distgan.storage import atomic_write

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_FILE = "mnist_classifier.pt"
RECORD_FILE = "mnist_classifier.json"
REBUILD_COMMAND = "python -m distgan.metrics --rebuild-classifier"
SUPPORTED_DATASETS = ("mnist5k", "mnist")
CLASSIFIER_SIZE = 28  # the classifier sees 28x28 digits; other image sizes are resized to this
FEATURE_DIM = 128  # penultimate width: small enough for a well-conditioned covariance from 1,000 samples
NUM_CLASSES = 10
KID_SUBSET_SIZE = 500  # half the default eval batch, so the subsets differ; capped by the sample counts
KID_SUBSETS = 20  # 60 kernel matrices of 500x500: ~1 s on two busy CPU cores; their std is kid_std
DIVERSITY_MAX = 1000  # pairwise distances over a fixed random subset of this many images (1000x1000 cdist)
BATCH = 500  # images per classifier forward in evaluation


class MetricsError(RuntimeError):
    """The classifier weights are missing or do not match their record; the message says how to rebuild."""


# ------------------------------------------------------------------ the classifier


class DigitClassifier(nn.Module):
    """LeNet-like: three conv blocks (28 -> 14 -> 7 -> 3), a 128-d penultimate layer, ten logits.
    ~107k parameters, ~430 KB of float32 weights. Input: (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 3 * 3, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (penultimate features (N, 128), logits (N, 10))."""
        feats = self.features(x)
        return feats, self.head(feats)


class FeatureExtractor(nn.Module):
    """The `feature=` module for torchmetrics FID/KID: float (N, 1, 28, 28) in [-1, 1] -> (N, 128).

    torchmetrics reads `num_features` instead of probing with a dummy batch (whose dtype would depend on
    `normalize`), and passes our float images through unchanged because the module is custom. The
    network stays in eval mode whatever .train() the metric calls, so BatchNorm uses its running stats.

    `reuse(x, feats)` lends features already computed for the tensor x, so that FID, KID and the class
    statistics share one classifier forward instead of three."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = FEATURE_DIM
        self._lent: tuple[torch.Tensor, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @contextlib.contextmanager
    def reuse(self, x: torch.Tensor, feats: torch.Tensor):
        self._lent = (x, feats)
        try:
            yield
        finally:
            self._lent = None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._lent is not None and self._lent[0] is x:
            return self._lent[1]
        return self.classifier(x)[0]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def classifier_record(assets: Path = ASSETS) -> dict:
    path = assets / RECORD_FILE
    if not path.is_file():
        raise MetricsError(f"classifier record {path} not found; rebuild it with `{REBUILD_COMMAND}`")
    return json.loads(path.read_text())


def load_classifier(device: torch.device | str = "cpu", assets: Path = ASSETS) -> DigitClassifier:
    """The shipped classifier, in eval mode, after checking its SHA-256 against the record."""
    record = classifier_record(assets)
    path = assets / record["file"]
    if not path.is_file():
        raise MetricsError(f"classifier weights {path} not found; rebuild them with `{REBUILD_COMMAND}`")
    digest = sha256_of(path)
    if digest != record["sha256"]:
        raise MetricsError(f"classifier weights {path} have SHA-256 {digest}, the record "
                           f"{assets / RECORD_FILE} says {record['sha256']}; rebuild with `{REBUILD_COMMAND}`")
    model = DigitClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


# ------------------------------------------------------------------ what the loop calls


def metrics_supported(cfg) -> tuple[bool, str]:
    """Quality metrics need grayscale digits: mnist5k or mnist with one channel (any --image-size; the
    images are resized to 28x28 for the classifier). Anything else: (False, why)."""
    if cfg.dataset not in SUPPORTED_DATASETS:
        return False, (f"quality metrics use an MNIST digit classifier; dataset {cfg.dataset!r} is not "
                       f"one of {', '.join(SUPPORTED_DATASETS)}")
    if cfg.image_channels != 1:
        return False, f"quality metrics need 1-channel digits, this run has {cfg.image_channels} channels"
    return True, ""


def reference_images(cfg) -> torch.Tensor:
    """The real images the metrics compare against: the mnist5k TEST split (1,000 held-out digits, the last
    100 of each class), never trained on by the GAN when --dataset mnist5k, at cfg.image_size in [-1, 1]
    and shape (1000, 1, S, S). For --dataset mnist it is the same 1,000 digits: the embedded sample, so
    the reference needs no data root (they may also occur in torchvision's MNIST training set)."""
    from distgan.data import mnist5k, to_model_range

    images, _ = mnist5k("test")
    return to_model_range(images, cfg.image_size)


def _to_classifier_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images (N, 1, H, W), got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.clamp(-1, 1)


def _mean_pairwise_distance(feats: torch.Tensor) -> float:
    n = feats.shape[0]
    if n < 2:
        return 0.0
    if n > DIVERSITY_MAX:  # a fixed random subset: batches often come sorted by class
        feats = feats[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:DIVERSITY_MAX]]
        n = DIVERSITY_MAX
    feats = feats.double()
    return float(torch.cdist(feats, feats).sum() / (n * (n - 1)))


class QualityEvaluator:
    """Compares generated images with a fixed real reference; the reference's features are computed once.

    Everything runs on this process only: the torchmetrics states never sync across ranks, because only
    rank 0 evaluates and a collective there would hang the other workers."""

    def __init__(self, reference: torch.Tensor, device: torch.device | str = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.device = torch.device(device)
        self.classifier = load_classifier(self.device)
        extractor = FeatureExtractor(self.classifier)
        local_only = {"sync_on_compute": False, "distributed_available_fn": lambda: False}
        self.fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False, **local_only)
        with warnings.catch_warnings():  # "KID stores all features": 1,000 x 128 floats, by design
            warnings.simplefilter("ignore")
            self.kid = KernelInceptionDistance(feature=extractor, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                                               reset_real_features=False, **local_only)
        self.fid.to(self.device)
        self.kid.to(self.device)
        self.extractor = extractor
        self.num_reference = reference.shape[0]
        feats = torch.cat([self._update(chunk, real=True)[0] for chunk in reference.split(BATCH)])
        self.reference_spread = _mean_pairwise_distance(feats)

    @torch.no_grad()
    def _update(self, images: torch.Tensor, real: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = _to_classifier_input(images, self.device)
        feats, logits = self.classifier(x)
        with self.extractor.reuse(x, feats):
            self.fid.update(x, real=real)
            self.kid.update(x, real=real)
        return feats, logits

    @torch.no_grad()
    def evaluate(self, fake: torch.Tensor) -> dict[str, float]:
        """fake: (N, 1, H, W) in [-1, 1], N >= 2. Returns fid, kid, kid_std, classifier_score, coverage,
        diversity as floats."""
        if fake.shape[0] < 2:
            raise ValueError(f"need at least 2 generated images, got {fake.shape[0]}")
        self.fid.reset()  # keeps the reference features (reset_real_features=False)
        self.kid.reset()
        feats, logits = zip(*[self._update(chunk, real=False) for chunk in fake.split(BATCH)])
        feats, logits = torch.cat(feats), torch.cat(logits).double()
        self.kid.subset_size = min(KID_SUBSET_SIZE, fake.shape[0], self.num_reference)
        # KID's subset draws (torch.randperm on the CPU default generator): repeatable, and every training stream
        # untouched. Only the CPU generator is reseeded (and restored): torch.manual_seed would also reseed every
        # CUDA device's generator, which fork_rng(devices=[]) does not restore.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(0)
            kid, kid_std = self.kid.compute()
        fid = self.fid.compute()
        return {"fid": float(fid), "kid": float(kid), "kid_std": float(kid_std),
                **class_statistics(logits),
                "diversity": _mean_pairwise_distance(feats) / max(self.reference_spread, 1e-12)}


def class_statistics(logits: torch.Tensor) -> dict[str, float]:
    """classifier_score = exp(mean KL(p(y|x) || p(y))) and coverage = entropy(argmax histogram) / log(10)."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
    hist = torch.bincount(logits.argmax(dim=1), minlength=NUM_CLASSES).double()
    freq = hist[hist > 0] / hist.sum()
    coverage = float((freq * freq.log()).sum().abs() / math.log(NUM_CLASSES))  # abs: no -0.0 for one class
    return {"classifier_score": float(kl.exp()), "coverage": coverage}


# ------------------------------------------------------------------ rebuilding the classifier

TRAIN_SEED = 0
TRAIN_EPOCHS = 12
TRAIN_BATCH = 128
TRAIN_LR = 3e-3


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine per image: rotation +-12 deg, scale 0.9-1.1, shift +-1.4 px. Done on x + 1 so the
    zero padding of grid_sample is the black background (-1), not mid-grey."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def classifier_accuracy(model: DigitClassifier, split: str = "test") -> float:
    from distgan.data import mnist5k, to_model_range

    images, labels = mnist5k(split)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(x.to(device))[1].argmax(1).cpu() for x in to_model_range(images).split(BATCH)])
    return float((preds == torch.from_numpy(labels)).double().mean())


def rebuild_classifier(assets: Path = ASSETS, epochs: int = TRAIN_EPOCHS, log=print) -> dict:
    """Trains the classifier on the mnist5k train split and writes weights + record into `assets`."""
    from distgan.data import mnist5k, to_model_range

    torch.manual_seed(TRAIN_SEED)
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    images, labels = mnist5k("train")
    x_all, y_all = to_model_range(images), torch.from_numpy(labels)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_all) / TRAIN_BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN_LR, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for idx in order.split(TRAIN_BATCH):
            _, logits = model(_augment(x_all[idx], gen))
            loss = F.cross_entropy(logits, y_all[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x_all):.4f}, held-out accuracy "
            f"{classifier_accuracy(model):.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    assets.mkdir(parents=True, exist_ok=True)
    weights = assets / CLASSIFIER_FILE
    atomic_write(weights, lambda tmp: torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp))
    record = {
        "file": CLASSIFIER_FILE,
        "sha256": sha256_of(weights),
        "bytes": weights.stat().st_size,
        "test_accuracy": classifier_accuracy(model, "test"),
        "test_split": "mnist5k test: 1,000 held-out digits (the last 100 of each class)",
        "train_accuracy": classifier_accuracy(model, "train"),
        "train_split": "mnist5k train: 4,000 digits",
        "architecture": "DigitClassifier (distgan/metrics.py): 3 conv blocks, 128-d penultimate features",
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": TRAIN_SEED, "epochs": epochs, "batch": TRAIN_BATCH, "lr": TRAIN_LR,
        "augmentation": "random affine: rotation +-12 deg, scale 0.9-1.1, shift +-1.4 px",
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "command": REBUILD_COMMAND,
    }
    (assets / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distgan.metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rebuild-classifier", action="store_true",
                   help="retrain the digit classifier and rewrite its weights and record")
    p.add_argument("--epochs", type=int, default=TRAIN_EPOCHS, help="training epochs for --rebuild-classifier")
    p.add_argument("--assets", default=str(ASSETS), help="where the weights and record live")
    args = p.parse_args(argv)
    assets = Path(args.assets)
    try:
        if args.rebuild_classifier:
            record = rebuild_classifier(assets, args.epochs)
        else:
            record = classifier_record(assets)
            accuracy = classifier_accuracy(load_classifier("cpu", assets))
            record["measured_test_accuracy"] = accuracy
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
