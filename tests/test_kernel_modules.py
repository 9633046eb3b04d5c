"""kernels' nn.Module drop-ins: nn.BatchNorm parity and state_dict compatibility, the impl switch,
and a few real GAN steps of distgan's models with impl="triton" (interpreted) against impl="eager"."""

import copy
import importlib
import re

import pytest
import torch
from torch import nn

import kernels


def _pair(dims, c, **kw):
    slope = kw.pop("negative_slope", 0.2)
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c, **kw)
    fused = (kernels.BatchNormLeakyReLU1d if dims == 1 else kernels.BatchNormLeakyReLU2d)(
        c, negative_slope=slope, impl="triton", **kw
    )
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    fused.load_state_dict(bn.state_dict())
    return nn.Sequential(bn, nn.LeakyReLU(slope)), fused


def _train_both(ref, fused, shape, steps: int) -> None:
    """`steps` training-mode forwards and backwards of both on the same fresh inputs (shifted each step, so
    the running statistics move); outputs and input gradients must agree at every step."""
    for step in range(steps):
        x = torch.randn(shape) + step
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(shape)
        yr, yf = ref(xr), fused(xf)
        yr.backward(g), yf.backward(g)
        torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "dims, shape, kw",
    [
        (2, (3, 5, 4, 3), {}),
        (2, (3, 5, 4, 3), {"momentum": None}),  # cumulative average over num_batches_tracked
        (1, (6, 7), {"affine": False, "momentum": 0.5}),
        (1, (4, 3, 5), {"track_running_stats": False}),  # (N, C, L) input
        (2, (2, 3, 2, 2), {"negative_slope": 0.0}),
    ],
    ids=["default", "momentum-None", "no-affine", "no-running-stats", "relu"],
)
def test_module_matches_batchnorm_then_leakyrelu(dims, shape, kw):
    ref, fused = _pair(dims, shape[1], **kw)
    _train_both(ref, fused, shape, steps=3)
    for (name, a), b in zip(fused.state_dict().items(), ref[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if fused.weight is not None:
        torch.testing.assert_close(fused.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.bias.grad, ref[0].bias.grad, rtol=1e-4, atol=1e-5)
    ref.eval(), fused.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, bn_cls", [(kernels.BatchNormLeakyReLU1d, nn.BatchNorm1d),
                                         (kernels.BatchNormLeakyReLU2d, nn.BatchNorm2d)], ids=["1d", "2d"])
def test_constructor_is_nn_batchnorms(cls, bn_cls):
    import inspect

    ours = list(inspect.signature(cls.__init__).parameters.values())
    theirs = list(inspect.signature(bn_cls.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs]
    assert {p.name for p in ours[len(theirs):]} == {"negative_slope", "impl", "sync", "process_group"}
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs) - 1:])
    with pytest.raises(TypeError):
        cls(4, 1e-3, 0.01, True, True, None, None, 0.1)  # the extras are keyword-only: never a silent slope


@pytest.mark.parametrize(
    "args, kw",
    [
        ((5, 1e-3, 0.01), {}),  # positional: eps, momentum -- not (slope, eps) as before
        ((5, 1e-3, None, True, False), {}),
        ((5,), {"eps": 1e-3, "momentum": 0.3, "affine": True, "track_running_stats": True}),
        ((5,), {"bias": False}),
        ((5, 1e-5, 0.1, False), {"bias": False}),  # no affine: bias=False changes nothing
    ],
    ids=["positional", "positional-no-stats", "keyword", "no-bias", "no-affine-no-bias"],
)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_nn_batchnorm_calls_match_batchnorm_then_leakyrelu(args, kw, impl):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(*args, **kw)
    fused = kernels.BatchNormLeakyReLU2d(*args, **kw, negative_slope=0.1, impl=impl)
    assert (fused.eps, fused.momentum, fused.affine, fused.track_running_stats) == (
        bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    assert list(fused.state_dict()) == list(bn.state_dict())
    assert (fused.bias is None) == (bn.bias is None) and "bias=" in repr(fused)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            if bn.bias is not None:
                bn.bias.normal_()
    fused.load_state_dict(bn.state_dict())
    ref = nn.Sequential(bn, nn.LeakyReLU(0.1))
    _train_both(ref, fused, (4, 5, 3, 3), steps=2)
    for name, p in bn.named_parameters():
        torch.testing.assert_close(getattr(fused, name).grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(fused.state_dict().items(), bn.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_generator_checkpoint_keys_are_unchanged():
    """A checkpoint of distgan's generator keeps its keys (weight, bias, running stats per BN layer) and loads."""
    models = pytest.importorskip("distgan.models")
    g = models.Generator(z_dim=8, kernels="eager")
    keys = [k for k in g.state_dict() if k.startswith("project_act.")]
    assert keys == ["project_act." + k for k in ("weight", "bias", "running_mean", "running_var",
                                                 "num_batches_tracked")]
    models.Generator(z_dim=8, kernels="eager").load_state_dict(g.state_dict())


def test_state_dict_round_trips_with_nn_batchnorm():
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(3, 4, 2, 2))
    fused = kernels.BatchNormLeakyReLU2d(4)
    fused.load_state_dict(bn.state_dict())
    assert list(fused.state_dict()) == list(bn.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(fused.state_dict())
    assert back.num_batches_tracked.item() == 1
    legacy = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}  # pre-1.0 checkpoints
    fused.load_state_dict(legacy)


def test_input_dims_and_repr():
    with pytest.raises(ValueError, match="expected 4D input"):
        kernels.BatchNormLeakyReLU2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        kernels.BatchNormLeakyReLU1d(3)(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.BatchNormLeakyReLU1d(3, impl="fast")
    assert "negative_slope=0.2" in repr(kernels.BatchNormLeakyReLU2d(3))


def test_set_impl_switches_the_path_that_runs(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 3), kernels.BatchNormLeakyReLU1d(3, impl="triton"))
    loss = kernels.BCEWithLogitsLoss(impl="triton")
    calls = []
    for name in ("kernels.batch_norm_leaky_relu", "kernels.bce_with_logits"):
        mod = importlib.import_module(name)
        fn = getattr(mod, name.split(".")[1])
        monkeypatch.setattr(mod, fn.__name__, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    x = torch.randn(4, 2)
    loss(model(x), 1.0)
    assert calls == ["kernels.batch_norm_leaky_relu", "kernels.bce_with_logits"]
    kernels.set_impl(model, "eager"), kernels.set_impl(loss, "eager")
    loss(model(x), 1.0)
    assert len(calls) == 2, "impl='eager' still ran the Triton launchers"
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.set_impl(model, "fast")


def test_sync_batchnorm_conversion_leaves_the_fusion_alone():
    model = nn.Sequential(nn.Linear(2, 3), kernels.BatchNormLeakyReLU1d(3), kernels.BCEWithLogitsLoss())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(
        converted[1], kernels.BatchNormLeakyReLU1d
    )  # not silently swapped (LReLU would be lost)


def test_sync_flag_is_local_without_a_process_group():
    m = kernels.BatchNormLeakyReLU2d(3, sync=True, impl="triton")
    ref = kernels.BatchNormLeakyReLU2d(3, impl="eager")
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(m(x), ref(x))


# Edge shapes: whatever nn.BatchNorm + nn.LeakyReLU do -- output, error, running statistics -- both impls do.
EDGE = [
    (1, (0, 3)), (1, (0, 3, 4)), (1, (2, 3, 0)), (2, (0, 3, 4, 4)), (2, (2, 3, 0, 4)),  # empty: empty output
    (1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)),  # one value per channel: an error while training
    (1, (1, 3, 5)), (2, (1, 3, 2, 3)),  # N = 1 with a spatial extent: ordinary batch statistics
]


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims, shape", EDGE, ids=[str(s) for _, s in EDGE])
def test_edge_shapes_match_batchnorm_then_leakyrelu(dims, shape, training, impl):
    ref, fused = _pair(dims, shape[1])
    fused.impl = impl
    ref.train(training), fused.train(training)
    x, g = torch.randn(shape), torch.randn(shape)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        yr = ref(xr)
    except ValueError as err:
        with pytest.raises(ValueError, match=re.escape(str(err))):
            fused(xf)
        for name in ("running_mean", "running_var"):  # untouched by the refused batch
            torch.testing.assert_close(getattr(fused, name), getattr(ref[0], name), msg=name)
        return
    yf = fused(xf)
    assert yf.shape == yr.shape == x.shape and yf.dtype == yr.dtype
    yr.backward(g), yf.backward(g)
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)  # zeros when empty
    torch.testing.assert_close(fused.bias.grad, ref[0].bias.grad, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(fused.state_dict().items(), ref[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # running stats and num_batches_tracked


# -------------------------------------------------------------------------------------------------
# A few real GAN steps through distgan's models and step function.


def _train(impl, steps=2, batch=4, z_dim=8):
    models = pytest.importorskip("distgan.models")
    step = pytest.importorskip("distgan.step")
    torch.manual_seed(0)
    g = models.Generator(z_dim=z_dim, image_size=28, channels=1, negative_slope=0.2, kernels=impl)
    d = models.Discriminator(image_size=28, channels=1, negative_slope=0.2)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    data = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    history = []
    torch.manual_seed(3)  # dropout masks: same draws in both runs (the kernels use no torch RNG)
    for _ in range(steps):
        real = torch.rand(batch, 1, 28, 28, generator=data) * 2 - 1
        out = step.gan_step(
            g, d, opt_g, opt_d, [real], lambda n: torch.randn(n, z_dim, generator=noise), impl=impl
        )
        history.append({k: v.item() for k, v in out.items()})
    return history, g


def test_gan_steps_triton_match_eager():
    eager_hist, eager_g = _train("eager")
    triton_hist, triton_g = _train("triton")
    for e, t in zip(eager_hist, triton_hist):
        for key in e:
            assert t[key] == pytest.approx(e[key], rel=1e-3, abs=1e-4), key
    for (name, a), b in zip(triton_g.state_dict().items(), eager_g.state_dict().values()):
        # Adam's first steps are ~lr * sign(grad): a float-rounding sign flip of a ~0 gradient moves
        # a weight by up to 2 * lr, so parameters are compared at that scale.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4, msg=name)
