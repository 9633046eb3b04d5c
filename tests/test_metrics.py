"""Sample-quality metrics: the shipped classifier is the recorded one, and the metrics rank real digits,
blurred digits, a single repeated digit and noise the way they must."""

import itertools
import json
import shutil

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from distgan import metrics
from distgan.config import TrainConfig
from distgan.data import mnist5k, to_model_range
from distgan.tracking import QUALITY_KEYS


@pytest.fixture(scope="module")
def evaluator():
    return metrics.QualityEvaluator(metrics.reference_images(TrainConfig()))


@pytest.fixture(scope="module")
def train_digits():
    """1,000 real digits from the TRAIN split (the reference is the disjoint TEST split), shuffled."""
    images, labels = mnist5k("train")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:1000]
    return to_model_range(images)[order], torch.from_numpy(labels)[order]


@pytest.fixture(scope="module")
def real_scores(evaluator, train_digits):
    return evaluator.evaluate(train_digits[0])


def test_classifier_file_matches_its_record():
    record = metrics.classifier_record()
    path = metrics.ASSETS / record["file"]
    assert path.stat().st_size < 1_000_000
    assert metrics.sha256_of(path) == record["sha256"]
    assert record["test_accuracy"] >= 0.97
    # The argmax of one digit in a thousand may flip under a different BLAS; more than that is a mismatch.
    assert metrics.classifier_accuracy(metrics.load_classifier()) == pytest.approx(record["test_accuracy"],
                                                                                   abs=1.5e-3)


def test_tampered_weights_are_refused(tmp_path):
    shutil.copytree(metrics.ASSETS, tmp_path / "assets")
    weights = tmp_path / "assets" / metrics.CLASSIFIER_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(metrics.MetricsError, match="SHA-256.*--rebuild-classifier"):
        metrics.load_classifier(assets=tmp_path / "assets")
    (tmp_path / "assets" / metrics.RECORD_FILE).unlink()
    with pytest.raises(metrics.MetricsError, match="not found"):
        metrics.load_classifier(assets=tmp_path / "assets")


@pytest.mark.slow  # ~5-15 s for one epoch; the full rebuild (12 epochs) takes about a minute
def test_rebuild_writes_weights_that_load(tmp_path):
    record = metrics.rebuild_classifier(tmp_path, epochs=1, log=lambda message: None)
    assert json.loads((tmp_path / metrics.RECORD_FILE).read_text()) == record
    model = metrics.load_classifier(assets=tmp_path)
    assert metrics.classifier_accuracy(model) == pytest.approx(record["test_accuracy"], abs=1.5e-3)


def test_reference_is_the_held_out_split():
    ref = metrics.reference_images(TrainConfig())
    test_images, _ = mnist5k("test")
    assert ref.shape == (1000, 1, 28, 28) and ref.min() >= -1 and ref.max() <= 1
    assert torch.equal(ref, to_model_range(test_images))
    assert metrics.reference_images(TrainConfig(image_size=32)).shape == (1000, 1, 32, 32)


def test_metrics_supported():
    assert metrics.metrics_supported(TrainConfig()) == (True, "")
    assert metrics.metrics_supported(TrainConfig(dataset="mnist", data_root="/x", image_size=64))[0]
    for cfg in (TrainConfig(dataset="fashion-mnist", data_root="/x"), TrainConfig(dataset="cifar10", data_root="/x"),
                TrainConfig(dataset="mnist", data_root="/x", channels=3)):
        ok, note = metrics.metrics_supported(cfg)
        assert not ok and note


def test_real_digits_score_as_real(real_scores):
    print(json.dumps(real_scores))
    assert set(real_scores) == set(QUALITY_KEYS)  # what the tracker and the dashboard expect
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in real_scores.values())
    assert real_scores["fid"] < 5
    assert abs(real_scores["kid"]) < 3 * real_scores["kid_std"] + 0.05
    assert real_scores["coverage"] > 0.99
    assert real_scores["classifier_score"] > 7
    assert real_scores["diversity"] == pytest.approx(1.0, abs=0.1)


def test_noise_and_a_single_digit_score_far_worse(evaluator, train_digits, real_scores):
    images, labels = train_digits
    rng_before = torch.random.get_rng_state()
    noise = evaluator.evaluate(torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # evaluation leaves training's RNG alone
    single = evaluator.evaluate(images[labels == 3][:1].repeat(1000, 1, 1, 1))
    print(json.dumps({"noise": noise, "single_digit": single}))
    for bad in (noise, single):
        assert bad["fid"] > 50 * real_scores["fid"]
        assert bad["kid"] > 10 * (abs(real_scores["kid"]) + real_scores["kid_std"])
        assert bad["coverage"] < 0.05
        assert bad["classifier_score"] < 1.5
    assert single["diversity"] < 0.01


def test_fid_falls_as_blur_falls(evaluator, train_digits, real_scores):
    fids = []
    for sigma in (3.0, 2.0, 1.0, 0.5):
        k = 2 * round(3 * sigma) + 1
        fids.append(evaluator.evaluate(gaussian_blur(train_digits[0], [k, k], [sigma, sigma]))["fid"])
    fids.append(real_scores["fid"])  # sigma 0
    print("FID at sigma 3, 2, 1, 0.5, 0:", [round(f, 2) for f in fids])
    assert all(a > b for a, b in itertools.pairwise(fids))


def test_other_image_sizes_are_resized(evaluator, train_digits):
    images, _ = train_digits
    upsized = torch.nn.functional.interpolate(images[:500], size=(32, 32), mode="bilinear", align_corners=False)
    assert evaluator.evaluate(upsized)["fid"] < 10


def test_evaluation_never_syncs_across_ranks(evaluator):
    # Only rank 0 evaluates: a torchmetrics all-gather there would hang the other workers.
    for metric in (evaluator.fid, evaluator.kid):
        assert metric.sync_on_compute is False and metric.distributed_available_fn() is False
