"""The Ray-free Trainer in 1 process and in 2 gloo processes (torch.multiprocessing): state round trips,
replica agreement, NaN rollback on every rank, checkpoint/evaluation schedule, per-rank seeding, rank-0 work
that outlasts the collective timeout, RNG streams restored across device kinds."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from distgan.config import TrainConfig
from distgan.local import spawn
from distgan.trainer import Trainer

from conftest import TRAINING_STATE, assert_bitwise_equal, assert_same_training_state, requires_gpu
from support import make_cfg, small_dataset, spawn_and_load

# ----------------------------------------------------------------------------------------------- round trip

ROUND_TRIPS = {  # name: (total steps N, stop at k, config overrides)
    "mid-epoch": (12, 5, {}),
    "epoch-boundary": (12, 8, {}),
    "n-critic-2": (6, 3, {"n_critic": 2}),
    # stopped inside the decay the way Ctrl-C or a failure stops a run (the schedule's length unchanged):
    # the resume goes on with the rate where it was
    "lr-decay": (12, 5, {"lr_decay_start": 0.25}),
}


def _round_trip_worker(rank, tmp):
    for name, (n, k, overrides) in ROUND_TRIPS.items():
        # a named precision: with auto, each Trainer that finds no cached measurement times fp32 against bf16,
        # and on a busy machine the reference and the resumed run could choose differently
        overrides = {"precision": "bf16", **overrides}
        reference = Trainer(make_cfg(tmp, max_steps=n, **overrides), dataset=small_dataset())
        reference.fit()
        want = reference.state_dict()
        if "lr_decay_start" in overrides:
            first = Trainer(make_cfg(tmp, max_steps=n, **overrides), dataset=small_dataset())
            first.fit(should_stop=lambda first=first, k=k: first.step >= k)
            assert first.step == k
        else:
            first = Trainer(make_cfg(tmp, max_steps=k, **overrides), dataset=small_dataset())
            first.fit()
        saved = first.state_dict()
        second = Trainer(make_cfg(tmp, max_steps=n, **overrides), dataset=small_dataset())
        second.load_state_dict(saved, "round trip")
        second.fit()
        got = second.state_dict()  # collective: every rank calls it
        if rank == 0:
            torch.save({"want": want, "got": got, "evaluated": first.best_fid}, tmp / f"{name}.pt")


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("round_trip")
    spawn(_round_trip_worker, 2, tmp, timeout_s=300)
    return {name: torch.load(tmp / f"{name}.pt", weights_only=True) for name in ROUND_TRIPS}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_state_round_trip_continues_bit_identically(round_trips, name):
    result = round_trips[name]
    if name != "lr-decay":  # a --max-steps run evaluates at its last step, which must change nothing
        assert result["evaluated"] < float("inf")
    assert_same_training_state(result["got"], result["want"])


# ----------------------------------------------------------------------------------------------- behaviours


class RecordingTracker:
    def __init__(self):
        self.epochs = []

    def log_epoch(self, step, epoch, samples, metrics):
        self.epochs.append((step, epoch, sorted(metrics)))

    def log_step(self, step, metrics):
        pass

    def finish(self, summary):
        pass


def _behaviour_worker(rank, tmp):
    out = {}
    # per-rank seeding: dropout and noise draws differ between ranks
    t = Trainer(make_cfg(tmp, max_steps=1), dataset=small_dataset())
    out["dropout_draw"] = torch.rand(4)
    out["noise_draw"] = t._sample_z(2)

    # schedule: checkpoints every 4 steps and every 2 epochs, one report per step; metrics every 2 epochs
    reports, tracker = [], RecordingTracker()
    t = Trainer(make_cfg(tmp, epochs=2, checkpoint_every_steps=4, eval_every=2, checkpoint_every=2),
                dataset=small_dataset(), tracker_factory=lambda resumed: tracker)
    t.fit(lambda metrics, state: reports.append((metrics["step"], state is not None, "fid" in metrics)))
    out["reports"], out["epochs"] = reports, tracker.epochs
    out["params"] = [p.detach().clone() for p in list(t.g_bare.parameters()) + list(t.d_bare.parameters())]

    # NaN on rank 0 at step 3: both ranks detect it at step 3, roll back to the last checkpoint, halve the LR
    os.environ.update(DISTGAN_TEST_MARKER_DIR=str(tmp / f"marker{rank}"), DISTGAN_TEST_NAN_AT_STEP="3",
                      DISTGAN_TEST_NAN_RANK="0")
    (tmp / f"marker{rank}").mkdir(exist_ok=True)
    t = Trainer(make_cfg(tmp, max_steps=6, checkpoint_every_steps=2, eval_every=0), dataset=small_dataset())
    result = t.fit()
    out["nan"] = (result, t.rollbacks, t.lr_scale, t.opt_g.param_groups[0]["lr"], t.step)
    torch.save(out, tmp / f"behaviour{rank}.pt")


@pytest.fixture(scope="module")
def behaviours(tmp_path_factory):
    return spawn_and_load(_behaviour_worker, tmp_path_factory.mktemp("behaviour"), "behaviour")


def test_every_rank_draws_its_own_dropout_and_noise(behaviours):
    r0, r1 = behaviours
    assert not torch.equal(r0["dropout_draw"], r1["dropout_draw"])
    assert not torch.equal(r0["noise_draw"], r1["noise_draw"])


def test_replicas_hold_identical_parameters_after_training(behaviours):
    for a, b in zip(behaviours[0]["params"], behaviours[1]["params"]):
        assert torch.equal(a, b)


def test_one_report_per_step_at_epoch_ends_and_step_multiples(behaviours):
    reports = behaviours[0]["reports"]
    assert reports == behaviours[1]["reports"]  # every rank reports at the same steps
    steps = [step for step, has_state, _ in reports]
    assert steps == [4, 8, 12, 16] and len(set(steps)) == len(steps)
    assert all(has_state for _, has_state, _ in reports)
    # metrics at the epoch-2 checkpoint (eval_every=2) and the last step (16 = end of epoch 2), not at 4/8/12
    assert [step for step, _, fid in reports if fid] == [16]


def test_sample_grid_every_epoch_metrics_by_schedule(behaviours):
    epochs = behaviours[0]["epochs"]
    assert [(step, epoch) for step, epoch, _ in epochs] == [(8, 1), (16, 2)]
    assert epochs[0][2] == [] and "fid" in epochs[1][2]
    assert behaviours[1]["epochs"] == []  # rank 1 never tracks


def test_nan_is_detected_on_every_rank_and_rolled_back(behaviours):
    for out in behaviours:
        result, rollbacks, lr_scale, lr_g, step = out["nan"]
        assert result["stopped"] is None and step == 6
        assert rollbacks == 1 and lr_scale == 0.5 and lr_g == pytest.approx(TrainConfig().lr_g / 2)


def _slow_rank0_worker(rank, tmp):
    def slow_tracker(resumed):
        time.sleep(8)  # longer than the 3 s process-group timeout: W&B start-up on a slow network
        return RecordingTracker()

    t = Trainer(make_cfg(tmp, max_steps=2, eval_every=0), dataset=small_dataset(), tracker_factory=slow_tracker)
    t.fit()
    (tmp / f"done{rank}").write_text("ok")


def test_rank0_only_work_longer_than_the_collective_timeout_does_not_kill_the_run(tmp_path):
    spawn(_slow_rank0_worker, 2, tmp_path, timeout_s=3)
    assert (tmp_path / "done0").exists() and (tmp_path / "done1").exists()


# ----------------------------------------------------------------------------------------------- one process


def test_linear_decay_sets_each_steps_learning_rates_and_rollback_scales_them(tmp_path):
    t = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=8, eval_every=0, lr_g=4e-3, lr_d=2e-3,
                         lr_decay_start=0.5), dataset=small_dataset())
    seen = []
    t.fit(on_step=lambda step, means: seen.extend((t.opt_g.param_groups[0]["lr"], t.opt_d.param_groups[0]["lr"])))
    factors = [1, 1, 1, 1, 1, 3 / 4, 2 / 4, 1 / 4]  # steps 0-3 constant, then (8 - step) / (8 - 4): never 0
    assert seen == pytest.approx([lr * f for f in factors for lr in (4e-3, 2e-3)], rel=1e-12)
    assert t.lr_factor(8) == t.lr_factor(100) == 1 / 4  # past the end: the last step's rate
    t.lr_scale = 0.5  # what a rollback sets
    t._apply_lr()
    assert t.opt_g.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.5 / 4)
    constant = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=8, eval_every=0),
                       dataset=small_dataset())
    assert [constant.lr_factor(s) for s in range(8)] == [1.0] * 8


def test_single_process_runs_without_a_process_group(tmp_path):
    t = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=3, eval_every=0), dataset=small_dataset())
    out = t.train_step()
    assert set(out) >= {"loss_d", "loss_g"} and all(v.dim() == 0 for v in out.values())
    assert t.fit()["step"] == 3


def test_rng_state_from_another_device_kind_reseeds_with_one_warning(tmp_path):
    cfg = make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0)
    t = Trainer(cfg, dataset=small_dataset())
    t.fit()
    state = t.state_dict()
    # what a CUDA worker saves: a CUDA generator's state has another size than a CPU one
    state["rng"][0]["device_type"] = "cuda"
    state["rng"][0]["noise"] = torch.zeros(16, dtype=torch.uint8)
    fresh = Trainer(cfg, dataset=small_dataset())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(state, "cuda checkpoint")
    messages = [str(w.message) for w in caught if "not bit-exact" in str(w.message)]
    assert len(messages) == 1 and "cuda" in messages[0]
    assert fresh.step == 2
    fresh.train_step()  # the reseeded streams work


def test_discriminator_with_buffers_is_refused(tmp_path, monkeypatch):
    import distgan.trainer as trainer_module

    def build(cfg):
        from distgan.models import build_models

        g, d = build_models(cfg)
        d.net.insert(1, torch.nn.BatchNorm2d(64))
        return g, d

    monkeypatch.setattr(trainer_module, "build_models", build)
    with pytest.raises(ValueError, match="must not have buffers"):
        Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4), dataset=small_dataset())


def _overflow_once(trainer: Trainer, at_d_backward: int) -> None:
    """What an fp16 overflow looks like to the optimizer: the `at_d_backward`-th D backward (counted from the
    hook's registration; the G phase computes no D gradient) leaves a non-finite gradient, once."""
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == at_d_backward else grad

    trainer.d_bare.net[-1].weight.register_hook(hook)


def _scaled(trainer: Trainer, init_scale: float = 2.0**10) -> None:
    # fp16 needs CUDA; GradScaler's skip-and-back-off with the fused Adam is the same on CPU
    trainer.scalers = tuple(torch.amp.GradScaler("cpu", init_scale=init_scale) for _ in range(2))


@pytest.mark.parametrize("scaler", [True, False])
def test_an_overflow_the_grad_scaler_skips_is_not_a_rollback_an_unscaled_one_is(tmp_path, scaler):
    t = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=4, eval_every=0, checkpoint_every_steps=2),
                dataset=small_dataset())
    if scaler:
        _scaled(t)
    _overflow_once(t, at_d_backward=2)
    d_at = {}
    result = t.fit(on_step=lambda step, means: d_at.setdefault(step, [p.clone() for p in t.d_bare.parameters()]))
    assert result["stopped"] is None and t.step == 4
    if scaler:
        assert t.rollbacks == 0 and t.lr_scale == 1.0
        assert all(torch.equal(a, b) for a, b in zip(d_at[1], d_at[2]))  # step 2's D update was skipped
        assert not all(torch.equal(a, b) for a, b in zip(d_at[2], d_at[3]))  # and training went on
        assert [s.get_scale() for s in t.scalers] == [2.0**9, 2.0**10]  # D backed off once; G never overflowed
    else:  # Adam applied an inf gradient: the weights are gone, so the guard rolls back
        assert t.rollbacks == 1 and t.lr_scale == 0.5


def test_a_rollback_keeps_the_loss_scale_it_has_learned(tmp_path, monkeypatch):
    # step 2: an fp16 overflow (D's scale 2^10 -> 2^9, no rollback); step 2 is checkpointed; step 3: a NaN batch
    # (the scaler skips D again: 2^8) makes D's loss NaN, a real failure, so the run rolls back to step 2
    monkeypatch.setenv("DISTGAN_TEST_MARKER_DIR", str(tmp_path))
    monkeypatch.setenv("DISTGAN_TEST_NAN_AT_STEP", "3")
    t = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=4, eval_every=0, checkpoint_every_steps=2),
                dataset=small_dataset())
    _scaled(t)
    _overflow_once(t, at_d_backward=2)
    result = t.fit()
    assert result["stopped"] is None and t.step == 4 and t.rollbacks == 1
    # the snapshot held 2^9; rewinding to it would retry the scale that just overflowed
    assert [s.get_scale() for s in t.scalers] == [2.0**8, 2.0**10]
    saved = t.state_dict()["scalers"]
    fresh = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=4, eval_every=0),
                    dataset=small_dataset())
    _scaled(fresh, init_scale=2.0**16)
    fresh.load_state_dict(t.state_dict(), "scaled checkpoint")  # a scaled run resumes with the saved scale
    assert [s.get_scale() for s in fresh.scalers] == [saved[0]["scale"], saved[1]["scale"]] == [2.0**8, 2.0**10]


class HostSyncCounter(TorchFunctionMode):
    """Records the calls that, on a CUDA tensor, make the host wait for the device queue to drain: reads of
    device values, and blocking uploads of host data (`torch.tensor(data, device=...)`, `.to(...)` without
    non_blocking). On CPU nothing waits, but the same calls are made, so a CPU step counts its GPU syncs."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "nonzero",
             "masked_select", "unique", "equal", "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        upload = name in ("tensor", "as_tensor") and "device" in kwargs and not isinstance(args[0], torch.Tensor)
        blocking_move = name == "to" and not kwargs.get("non_blocking", False) and not (
            len(args) > 1 and isinstance(args[1], torch.dtype))
        if name in self.READS or upload or blocking_move:
            caller = traceback.extract_stack(limit=2)[0]
            self.syncs.append(f"{name} at {Path(caller.filename).name}:{caller.lineno} ({caller.name})")
        return func(*args, **kwargs)


def test_a_training_step_syncs_with_the_host_once_at_its_end(tmp_path):
    t = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=4, eval_every=0), dataset=small_dataset())
    t.train_step()  # the loader starts
    with HostSyncCounter() as counter:  # one iteration of fit()'s loop between checkpoints
        out = t.train_step()
        t._sync_step(out, [0.0, 1.0])
    assert len(counter.syncs) == 1 and counter.syncs[0].startswith("tolist") and "_sync_step" in counter.syncs[0], \
        counter.syncs
    with HostSyncCounter() as counter:  # the counter sees what it is meant to see
        torch.tensor([1.0], device="cpu").item()
    assert [s.split()[0] for s in counter.syncs] == ["tensor", "item"]


# ----------------------------------------------------------------------------------------------- one GPU, NCCL


def _checkpoint_and_resume_exactly(tmp_path, device: torch.device, kernels: str, precision: str) -> None:
    # 64 images at batch 16: 4 steps an epoch. Checkpoints at 3 (every 3 steps) and 6 (the end); epoch
    # checkpoints every 2 epochs would first come at step 8. The epoch end at step 4 evaluates without one.
    cfg = make_cfg(tmp_path, num_workers=1, batch_size=16, max_steps=6, eval_every=1, eval_samples=64,
                   checkpoint_every=2, checkpoint_every_steps=3, kernels=kernels, precision=precision)
    reports = []
    reference = Trainer(cfg, device, dataset=small_dataset())
    assert reference.precision == precision and reference.kernel_backend == kernels
    # a state holds the live parameters: copied when reported, as the Ray adapter writes it out then
    reference.fit(lambda metrics, state: reports.append((metrics, copy.deepcopy(state))))
    assert [m["step"] for m, _ in reports] == [3, 6]
    assert all(torch.isfinite(torch.tensor([m["loss_d"], m["loss_g"]])).all() for m, _ in reports)
    saved = reports[0][1]  # the step-3 checkpoint, as Ray would hand it back
    assert saved["rng"][0]["device_type"] == device.type
    resumed = Trainer(cfg, device, dataset=small_dataset())
    resumed.load_state_dict(saved, "step-3 checkpoint")
    resumed.fit()
    want, got = reference.state_dict(), resumed.state_dict()
    assert_same_training_state(got, want)


def test_trainer_in_a_one_rank_group_checkpoints_and_resumes_exactly(tmp_path, gloo_world):
    # the GPU test's schedule and resume on CPU, so that its logic is known to hold before a GPU runs it
    _checkpoint_and_resume_exactly(tmp_path, torch.device("cpu"), "eager", "fp32")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "eager"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trainer_on_one_gpu_under_nccl_checkpoints_and_resumes_exactly(tmp_path, nccl_world, monkeypatch, kernels,
                                                                       precision):
    # Two runs of the same steps are bitwise equal only if every kernel is deterministic: cuDNN may pick
    # convolution backward algorithms that accumulate with atomics (and benchmark mode picks by timing), so
    # the test asks for its deterministic ones. cuBLAS is deterministic on one stream; the Triton kernels
    # write per-program partials merged in a fixed order. Training itself keeps cuDNN's defaults: the README
    # promises bit-identical resumes on CPU.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _checkpoint_and_resume_exactly(tmp_path, torch.device("cuda", 0), kernels, precision)


@requires_gpu
@pytest.mark.gpu
def test_a_training_step_syncs_with_the_host_once_on_gpu(tmp_path, nccl_world):
    cfg = make_cfg(tmp_path, num_workers=1, batch_size=16, max_steps=4, eval_every=0, kernels="triton",
                   precision="bf16")
    t = Trainer(cfg, torch.device("cuda", 0), dataset=small_dataset())
    t._sync_step(t.train_step(), [0.0, 0.0])  # warm-up: Triton compiles, the loader starts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in out.values())
    # the whole step as fit() runs it: the NaN guard's read at the end is its only sync
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            t._sync_step(t.train_step(), [0.0, 1.0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_an_fp32_checkpoint_loads_into_a_bf16_trainer_and_trains(tmp_path):
    fp32 = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=2, eval_every=0, precision="fp32"),
                   dataset=small_dataset())
    fp32.fit()
    bf16 = Trainer(make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=4, eval_every=0, precision="bf16"),
                   dataset=small_dataset())
    bf16.load_state_dict(fp32.state_dict(), "fp32 checkpoint")
    assert bf16.fit()["step"] == 4
    # master weights, optimizer state and EMA stay fp32 under autocast
    state = bf16.state_dict()
    assert all(t.dtype == torch.float32 for t in state["generator"].values() if t.is_floating_point())
    assert all(t.dtype == torch.float32 for t in state["ema"]["model"].values() if t.is_floating_point())
    assert state["opt_g"]["state"][0]["exp_avg"].dtype == torch.float32
    assert torch.isfinite(state["generator"]["project.weight"]).all()


# ----------------------------------------------------------------------------------------------- a fork (--init-from)


def _parent_states(cfg: TrainConfig) -> tuple[Trainer, dict[int, dict]]:
    """A one-process run of `cfg` and the state it reported at each checkpoint, by step."""
    parent, states = Trainer(cfg, dataset=small_dataset()), {}

    def report(metrics, state):
        if state is not None:  # the state's tensors are the live weights: copied as a checkpoint would be
            states[metrics["step"]] = copy.deepcopy(state)

    parent.fit(report)
    return parent, states


def test_a_fork_with_unchanged_flags_trains_the_same_bits_as_its_parent_continuing(tmp_path):
    # 16 steps an epoch: the fork starts mid-epoch, before the decay (from step 6) and goes through it
    cfg = make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=12, eval_every=0, checkpoint_every_steps=5,
                   precision="fp32", lr_decay_start=0.5, augment="ada", augment_p=0.3)
    parent, states = _parent_states(cfg)
    fork = Trainer(dataclasses.replace(cfg, name="fork"), dataset=small_dataset())
    fork.load_state_dict(states[5], "parent/checkpoint_00000005", fork=True)
    assert (fork.step, fork.epoch, fork.steps_into_epoch) == (5, 0, 5)
    assert fork.parent == {"checkpoint": "parent/checkpoint_00000005", "step": 5} and fork.resumed_from is None
    fork.fit()
    got, want = fork.state_dict(), parent.state_dict()
    for key in (*TRAINING_STATE, "rng", "augment", "fixed_noise"):
        assert_bitwise_equal(got[key], want[key], key)


def test_a_fork_takes_its_own_hyper_parameters_and_continues_its_parents_position(tmp_path):
    cfg = make_cfg(tmp_path, num_workers=1, batch_size=4, max_steps=6, eval_every=0, checkpoint_every_steps=5,
                   precision="fp32", augment="ada", augment_p=0.3)
    _, states = _parent_states(cfg)
    state = states[5]
    state["lr_scale"], state["rollbacks"] = 0.25, 2  # what two rollbacks leave in the parent
    flags = dict(name="fork", max_steps=20, lr_g=3e-3, beta1=0.3, ema_decay=0.99, augment_p=0.5, seed=cfg.seed + 1)
    fork = Trainer(dataclasses.replace(cfg, **flags), dataset=small_dataset())
    fork.load_state_dict(copy.deepcopy(state), "parent", fork=True)
    assert (fork.step, fork.epoch, fork.steps_into_epoch) == (state["step"], state["epoch"],
                                                               state["g_steps_into_epoch"])
    # this run's learning rates (its own NaN guard: no inherited rollback scale), betas, EMA decay, start p
    assert [fork.opt_g.param_groups[0]["lr"], fork.opt_d.param_groups[0]["lr"]] == [3e-3, cfg.lr_d]
    assert fork.opt_g.param_groups[0]["betas"] == fork.opt_d.param_groups[0]["betas"] == (0.3, cfg.beta2)
    assert (fork.lr_scale, fork.rollbacks, fork.ema.decay, fork.augment.p) == (1.0, 0, 0.99, 0.5)
    # the parent's weights, optimizer moments and sample-grid noise; another seed's noise stream
    assert_bitwise_equal(fork.g_bare.state_dict(), state["generator"], "generator")
    assert_bitwise_equal(fork.opt_g.state_dict()["state"], state["opt_g"]["state"], "opt_g")
    assert torch.equal(fork.fixed_noise, state["fixed_noise"])
    assert not torch.equal(fork.noise_gen.get_state(), state["rng"][0]["noise"])
    fork.train_step()
    assert fork.step == state["step"] + 1
    # a resume, unlike a fork, keeps the NaN guard's scale; the flags' betas hold for both
    resumed = Trainer(dataclasses.replace(cfg, beta1=0.3), dataset=small_dataset())
    resumed.load_state_dict(copy.deepcopy(state), "own")
    assert (resumed.lr_scale, resumed.rollbacks) == (0.25, 2) and resumed.opt_g.param_groups[0]["lr"] == cfg.lr_g / 4
    assert resumed.opt_g.param_groups[0]["betas"] == (0.3, cfg.beta2) and resumed.augment.p == state["augment"][0]["p"]
