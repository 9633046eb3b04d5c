"""kernels.bce_with_logits / discriminator_loss: Triton (interpreted on CPU) against float64 PyTorch."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels

from conftest import assert_close_to_reference

# The op's module by path: `kernels.bce_with_logits` is the public function.
BCE = importlib.import_module("kernels.bce_with_logits")
BCELimits, limits_override = BCE.BCELimits, BCE.limits_override

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    monkeypatch.setattr(
        BCE,
        "_empty",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


# Several programs, several tiles each, a masked tail.
MANY_PROGRAMS = BCELimits(programs=8, block=4, single_program_max=4)


@pytest.fixture(params=["one_program", "many_programs"])
def programs(request):
    if request.param == "many_programs":
        with limits_override(MANY_PROGRAMS):
            yield request.param
    else:
        yield request.param


def assert_close(actual, expected, dtype, what=""):
    assert_close_to_reference(actual, expected, TOL[dtype], what)


def run(impl, logits, target, reduction, to64=False):
    x = (logits.double() if to64 else logits.clone()).requires_grad_()
    t = target
    if torch.is_tensor(target):
        t = target.double() if to64 else target.clone()
    loss = kernels.bce_with_logits(x, t, reduction, impl=impl)
    weight = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    (loss * weight).sum().backward()  # a non-uniform grad_output for reduction="none"
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", ["tensor", 1.0, 0.0])
@pytest.mark.parametrize("shape", [(5, 3), (1,), (37,)], ids=str)
def test_parity(shape, target, reduction, dtype, programs):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=gen) * 4).to(dtype)
    t = torch.rand(shape, generator=gen).to(dtype) if target == "tensor" else target
    got = run("triton", logits, t, reduction)
    want = run("eager", logits, t, reduction, to64=True)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[0].shape == want[0].shape
    assert_close(got[0], want[0], dtype, "loss")
    assert_close(got[1], want[1], dtype, "grad")


def test_many_programs_plan_has_several_programs():
    assert BCE.plan_for(37, torch.device("cpu"), MANY_PROGRAMS).grid[0] > 1
    assert BCE.plan_for(37, torch.device("cpu")).grid[0] == 1


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", ["tensor", 1.0])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0)], ids=str)
def test_empty_logits_match_pytorch(shape, target, reduction, impl):
    logits = torch.randn(shape)
    t = torch.rand(shape) if target == "tensor" else target
    x, xr = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = kernels.bce_with_logits(x, t, reduction, impl=impl)
    tt = t if torch.is_tensor(t) else torch.full(shape, t)
    want = F.binary_cross_entropy_with_logits(xr, tt, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)  # mean of nothing: nan; sum: 0; none: empty
    got.sum().backward(), want.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_discriminator_loss_of_empty_rows_is_nan_like_pytorch(impl):
    logits = torch.randn(4, 0)
    loss, d_real, d_fake = kernels.discriminator_loss(logits, 2, impl=impl)
    want = F.binary_cross_entropy_with_logits(logits[:2], torch.ones(2, 0)) + F.binary_cross_entropy_with_logits(
        logits[2:], torch.zeros(2, 0))
    torch.testing.assert_close(loss, want, equal_nan=True)
    assert d_real.isnan() and d_fake.isnan()


def test_extreme_logits_are_stable(programs):
    logits = torch.tensor([-1000.0, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1000.0])
    for target in (0.0, 1.0, 0.5):
        got = run("triton", logits, target, "none")
        want = run("eager", logits, target, "none", to64=True)
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
        assert_close(got[0], want[0], torch.float32, "loss")
        assert_close(got[1], want[1], torch.float32, "grad")


def test_target_gradient():
    logits, target = torch.randn(6), torch.rand(6).requires_grad_()
    kernels.bce_with_logits(logits, target, impl="triton").backward()
    ref_t = target.detach().clone().requires_grad_()
    F.binary_cross_entropy_with_logits(logits, ref_t).backward()
    torch.testing.assert_close(target.grad, ref_t.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, num_real", [((10,), 4), ((10, 1), 5), ((7, 3), 2), ((2,), 1)], ids=str)
@pytest.mark.parametrize("real_label", [1.0, 0.9])
def test_discriminator_loss(shape, num_real, real_label, dtype, programs):
    logits = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    x = logits.clone().requires_grad_()
    loss, d_real, d_fake = kernels.discriminator_loss(x, num_real, real_label, 0.0, impl="triton")
    loss.backward()
    ref = logits.double().requires_grad_()
    want = F.binary_cross_entropy_with_logits(
        ref[:num_real], torch.full_like(ref[:num_real], real_label)
    ) + F.binary_cross_entropy_with_logits(ref[num_real:], torch.zeros_like(ref[num_real:]))
    want.backward()
    assert loss.dtype == dtype and loss.dim() == 0
    assert_close(loss.detach(), want.detach(), dtype, "loss")
    assert_close(x.grad, ref.grad, dtype, "grad")
    assert d_real.dtype == torch.float32 and not d_real.requires_grad and not d_fake.requires_grad
    assert_close(d_real, torch.sigmoid(ref[:num_real].detach()).mean(), torch.float32, "d_real")
    assert_close(d_fake, torch.sigmoid(ref[num_real:].detach()).mean(), torch.float32, "d_fake")


def test_discriminator_loss_matches_eager_impl():
    logits = torch.randn(12, 1)
    got = kernels.discriminator_loss(logits, 6, impl="triton")
    want = kernels.discriminator_loss(logits, 6, impl="eager")
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_module():
    logits, target = torch.randn(4, 3), torch.rand(4, 3)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            kernels.BCEWithLogitsLoss(reduction, impl="triton")(logits, target),
            torch.nn.BCEWithLogitsLoss(reduction=reduction)(logits, target),
        )


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_bad_input(impl):
    x = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"Target size \(torch.Size\(\[4, 2\]\)\) must be the same as input size"
    ):
        kernels.bce_with_logits(x, torch.rand(4, 2), impl=impl)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        kernels.bce_with_logits(x, torch.rand(4, 3, dtype=torch.float64), impl=impl)
    with pytest.raises(RuntimeError, match="same device"):
        kernels.bce_with_logits(x, torch.rand(4, 3, device="meta"), impl=impl)
    with pytest.raises(NotImplementedError, match="not implemented for torch.int64"):
        kernels.bce_with_logits(x.long(), 1.0, impl=impl)
    with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
        kernels.bce_with_logits(x, 1.0, "foo", impl=impl)
    with pytest.raises(TypeError, match="target must be a tensor or a float label"):
        kernels.bce_with_logits(x, "1", impl=impl)
    with pytest.raises(ValueError, match="num_real must be an int in"):
        kernels.discriminator_loss(x, 4, impl=impl)
    with pytest.raises(ValueError, match="num_real must be an int in"):
        kernels.discriminator_loss(x, 0, impl=impl)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(importlib.import_module("kernels.batch_norm_leaky_relu"), "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.bce_with_logits(torch.randn(3), 1.0, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.discriminator_loss(torch.randn(4), 2, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [128, 1 << 20])
def test_gpu_parity_and_no_host_sync(m):
    logits = torch.randn(m, device="cuda")
    want = run("eager", logits, 1.0, "mean", to64=True)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward or backward raises
    try:
        got = run("triton", logits, 1.0, "mean")
        loss, _d_real, _d_fake = kernels.discriminator_loss(
            logits.view(-1, 1)[:128].requires_grad_(), 64, impl="triton"
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(got[0], want[0], torch.float32, "loss")
    assert_close(got[1], want[1], torch.float32, "grad")
