"""distgan/augment.py: the DiffAugment ops (semantics, gradients), ADA's p against a synthetic overfitting signal,
the hook in gan_step (both phases, gradients reaching G), per-rank streams and a bitwise resume of an
`--augment ada` run in 2 gloo processes, and the flags' validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distgan.augment import ADA_INTERVAL, SEED_OFFSET, Augment, augment, build_augment, cutout, translation
from distgan.config import ConfigError, TrainConfig
from distgan.step import gan_step
from distgan.trainer import Trainer

from conftest import TRAINING_STATE, assert_bitwise_equal, requires_gpu
from support import make_cfg, small_dataset, spawn_and_load


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ops", [("color",), ("translation",), ("cutout",), ("color", "translation", "cutout")])
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_ops_are_differentiable(ops, p):
    x = torch.randn(5, 3, 7, 9, dtype=torch.float64, requires_grad=True)  # odd sides, RGB
    # the same draws at every call: gradcheck evaluates the function many times
    assert torch.autograd.gradcheck(lambda t: augment(t, ops, p, _gen(3)), (x,))


def test_translation_shifts_by_whole_pixels_and_fills_zeros():
    x = torch.arange(1.0, 1 + 4 * 2 * 8 * 8).view(4, 2, 8, 8)
    y = translation(x, 1.0, _gen(1))
    for i in range(4):
        matches = []
        for dy in range(-1, 2):  # round(8 / 8) = 1 pixel at most
            for dx in range(-1, 2):
                want = torch.zeros_like(x[i])
                src = x[i][:, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)]
                want[:, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)] = src
                matches.append(torch.equal(y[i], want))
        assert sum(matches) == 1, i


def test_cutout_erases_one_square_of_half_the_side_per_image():
    x = torch.ones(64, 1, 28, 28)
    y = cutout(x, 1.0, _gen(2))
    erased = (y == 0).sum(dim=(1, 2, 3))
    assert (erased > 0).all() and (erased <= 14 * 14).all()
    assert (erased == 14 * 14).any()  # squares fully inside the image


def test_probability_zero_is_the_identity_and_half_touches_about_half():
    x = torch.randn(400, 1, 28, 28)
    assert torch.equal(augment(x, ("color", "translation", "cutout"), 0.0, _gen()), x)
    changed = (cutout(x, 0.5, _gen()) != x).flatten(1).any(1).float().mean()
    assert 0.4 < changed < 0.6


def test_same_seed_same_draws_other_seed_other_draws():
    x = torch.randn(8, 1, 28, 28)
    ops = ("translation", "cutout")
    assert torch.equal(augment(x, ops, 1.0, _gen(5)), augment(x, ops, 1.0, _gen(5)))
    assert not torch.equal(augment(x, ops, 1.0, _gen(5)), augment(x, ops, 1.0, _gen(6)))


@requires_gpu
def test_ops_run_on_cuda_from_a_cuda_generator_and_its_state_round_trips():
    x = torch.randn(6, 3, 9, 7, device="cuda", requires_grad=True)
    a = Augment(("color", "translation", "cutout"), 0.5, torch.device("cuda"), seed=1, adaptive=True)
    y = a(x)
    y.square().sum().backward()
    assert y.device.type == "cuda" and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    b = Augment(("color", "translation", "cutout"), 0.0, torch.device("cuda"), seed=2, adaptive=True)
    assert b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


# ------------------------------------------------------------------------------------------------ ADA's p


def _ada(p=0.0, kimg=10.0, images_per_step=64, target=0.6) -> Augment:
    return Augment(("translation", "cutout"), p, torch.device("cpu"), seed=0, adaptive=True, target=target, kimg=kimg,
                   images_per_step=images_per_step)


def test_ada_raises_p_while_d_is_sure_of_the_reals_and_lowers_it_once_d_is_not():
    ada = _ada()
    step = ADA_INTERVAL * 64 / 10_000  # one update's move at kimg=10
    # a D that memorised its training set: sign D(x_real) = +1 on (almost) every real image
    for _ in range(3 * ADA_INTERVAL):
        ada.observe(torch.tensor(0.95))
    assert ada.p == pytest.approx(3 * step)
    for _ in range(ADA_INTERVAL - 1):  # no move between updates
        ada.observe(torch.tensor(0.95))
    assert ada.p == pytest.approx(3 * step)
    ada.observe(torch.tensor(0.95))
    assert ada.p == pytest.approx(4 * step)
    # augmentation took hold: D is unsure of the reals, p comes down, and never below 0
    for _ in range(10 * ADA_INTERVAL):
        ada.observe(torch.tensor(-0.2))
    assert ada.p == 0.0


def test_ada_averages_r_t_over_the_interval_and_clamps_at_one():
    ada = _ada(p=0.99, target=0.5)
    for value in (0.75, 0.75, 0.25, 0.25):  # mean 0.5 = the target: no move
        ada.observe(torch.tensor(value))
    assert ada.p == 0.99
    for _ in range(ADA_INTERVAL):
        ada.observe(torch.tensor(1.0))
    assert ada.p == 1.0


def test_fixed_policy_never_moves_p():
    aug = Augment(("cutout",), 0.7, torch.device("cpu"), seed=0)
    for _ in range(3 * ADA_INTERVAL):
        aug.observe(torch.tensor(1.0))
    assert aug.p == 0.7


def test_state_round_trip_continues_the_same_draws_and_p():
    a = _ada(p=0.5)
    x = torch.randn(4, 1, 28, 28)
    a(x)
    a.observe(torch.tensor(0.9))
    b = _ada(p=0.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    for aug in (a, b):
        for _ in range(ADA_INTERVAL - 1):
            aug.observe(torch.tensor(0.9))
    assert a.p == b.p > 0.5


# ------------------------------------------------------------------------------------------- the GAN step


class _TinyG(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 1, 4, 4)


def _step_with(augmenter):
    torch.manual_seed(0)
    g, d = _TinyG(), nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.0), torch.optim.SGD(d.parameters(), lr=0.0)
    seen = []

    def spy(x):
        seen.append(x.shape[0])
        return augmenter(x)

    gen = _gen(1)
    out = gan_step(g, d, opt_g, opt_d, [torch.rand(3, 1, 4, 4)], lambda n: torch.randn(n, 4, generator=gen),
                   impl="eager", augment=spy if augmenter is not None else None)
    return out, seen, g.fc.weight.grad.clone(), d[1].weight.grad.clone()


def test_gan_step_augments_real_and_fake_in_both_phases_and_g_learns_through_it():
    plain, _, g_plain, _ = _step_with(None)
    same, seen, g_same, _ = _step_with(lambda x: x)
    assert seen == [6, 3]  # D phase: cat(real, fake); G phase: fake
    assert torch.equal(g_same, g_plain) and "d_real_sign" in same and "d_real_sign" not in plain
    blank, _, g_blank, d_blank = _step_with(lambda x: x * 0)
    assert torch.count_nonzero(g_blank) == 0  # D sees only what the augmentation passes, so G's gradient too
    assert torch.count_nonzero(g_same) > 0
    flipped, _, g_flip, _ = _step_with(lambda x: x.flip(-1))
    assert not torch.equal(g_flip, g_plain)


# ------------------------------------------------------------------------- per-rank streams, bitwise resume

ADA_RUN = dict(augment="ada", augment_p=0.3, ada_kimg=0.05)  # p moves 0.64 per update: visible in 12 steps


def _ada_worker(rank, tmp):
    probe = Trainer(make_cfg(tmp, max_steps=12, **ADA_RUN), dataset=small_dataset())
    draw = probe.augment(torch.ones(4, 1, 28, 28))
    again = build_augment(probe.cfg, probe.device, probe._noise_seed(SEED_OFFSET))(torch.ones(4, 1, 28, 28))
    reference = Trainer(make_cfg(tmp, max_steps=12, **ADA_RUN), dataset=small_dataset())
    p0 = reference.augment.p
    reference.fit()
    want = reference.state_dict()
    first = Trainer(make_cfg(tmp, max_steps=12, **ADA_RUN), dataset=small_dataset())
    first.fit(should_stop=lambda: first.step >= 5)  # mid-way through an ADA interval
    saved = first.state_dict()
    second = Trainer(make_cfg(tmp, max_steps=12, **ADA_RUN), dataset=small_dataset())
    second.load_state_dict(saved, "round trip")
    second.fit()
    got = second.state_dict()
    torch.save({"want": want, "got": got, "draw": draw, "again": again, "p0": p0, "stopped_at": first.step,
                "p_trace": second.last_metrics.get("augment_p")}, tmp / f"ada{rank}.pt")


@pytest.fixture(scope="module")
def ada_runs(tmp_path_factory):
    return spawn_and_load(_ada_worker, tmp_path_factory.mktemp("ada"), "ada")


def test_every_rank_draws_its_own_augmentations_from_its_seeded_stream(ada_runs):
    r0, r1 = ada_runs
    assert not torch.equal(r0["draw"], r1["draw"])
    assert torch.equal(r0["draw"], r0["again"]) and torch.equal(r1["draw"], r1["again"])


def test_resumed_ada_run_is_bitwise_equal_to_an_uninterrupted_one(ada_runs):
    for run in ada_runs:
        assert run["stopped_at"] == 5
        assert ("ema" in run["want"]) == ("ema" in run["got"])  # rank 0 keeps the EMA
        for key in (k for k in (*TRAINING_STATE, "augment", "rng") if k in run["want"]):
            assert_bitwise_equal(run["got"][key], run["want"][key], key)
        ps = [s["p"] for s in run["want"]["augment"]]
        assert ps[0] == ps[1] != run["p0"]  # p moved, identically on both ranks
        assert run["p_trace"] == ps[0]  # what was logged is what was saved


# -------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("overrides, message", [
    ({"augment": "translation,flip"}, "--augment: unknown augmentation 'flip'"),
    ({"augment": "cutout,cutout"}, "names an augmentation twice"),
    ({"augment": "ada:"}, "--augment: unknown augmentation ''"),
    ({"augment_p": 0.5}, "--augment-p: needs --augment"),
    ({"augment": "ada", "augment_p": 1.5}, "--augment-p: must be in [0, 1]"),
    ({"augment": "ada", "ada_target": 1.0}, "--ada-target: must be in (0, 1)"),
    ({"augment": "ada", "ada_kimg": 0.0}, "--ada-kimg: must be positive"),
])
def test_bad_augment_flags_are_refused_naming_the_flag(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(storage_path=str(tmp_path), name="x", **overrides).validate()
    assert message in str(e.value)


def test_default_probabilities():
    cfg = TrainConfig(augment="translation,cutout", name="x")
    assert build_augment(cfg, torch.device("cpu"), 0).p == 1.0
    assert build_augment(TrainConfig(augment="ada:color", name="x"), torch.device("cpu"), 0).p == 0.0
    assert build_augment(TrainConfig(name="x"), torch.device("cpu"), 0) is None
