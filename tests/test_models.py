import pytest
import torch
from torch import nn

import kernels
from distgan.models import Discriminator, Dropout, Generator


def test_generator_matches_the_tensorflow_tutorial_layers_at_28x28():
    g = Generator(z_dim=100, image_size=28, channels=1, kernels="eager")
    assert isinstance(g.project, nn.Linear) and g.project.bias is None
    assert (g.project.in_features, g.project.out_features) == (100, 7 * 7 * 256)
    assert isinstance(g.project_act, kernels.BatchNormLeakyReLU1d) and g.project_act.num_features == 7 * 7 * 256
    convs = [m for m in g.body if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.kernel_size[0]) for c in convs] == [
        (256, 128, 1, 5), (128, 64, 2, 5), (64, 1, 2, 5)]
    assert all(c.bias is None for c in convs)
    bns = [m for m in g.body if isinstance(m, kernels.BatchNormLeakyReLU2d)]
    assert [b.num_features for b in bns] == [128, 64]
    assert all(b.negative_slope == 0.2 for b in bns)
    assert isinstance(g.body[-1], nn.Tanh)


def test_discriminator_matches_the_tensorflow_tutorial_layers_at_28x28():
    d = Discriminator(image_size=28, channels=1)
    kinds = [type(m).__name__ for m in d.net]
    assert kinds == ["Conv2d", "LeakyReLU", "Dropout", "Conv2d", "LeakyReLU", "Dropout", "Flatten", "Linear"]
    assert (d.net[0].out_channels, d.net[0].stride[0], d.net[3].out_channels, d.net[3].stride[0]) == (64, 2, 128, 2)
    assert d.net[2].p == 0.3 and d.net[-1].in_features == 128 * 7 * 7 and d.net[-1].out_features == 1


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 1), (64, 3)])
def test_shapes_and_ranges_for_every_supported_size(size, channels):
    torch.manual_seed(size + channels)
    g = Generator(z_dim=16, image_size=size, channels=channels, kernels="eager")
    d = Discriminator(image_size=size, channels=channels)
    x = g(torch.randn(3, 16))
    assert x.shape == (3, channels, size, size)
    assert x.abs().max() <= 1.0 and x.std() > 0
    logits = d(x)
    assert logits.shape == (3,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_zeroes_with_probability_p_and_scales_the_rest(dtype):
    torch.manual_seed(7)
    x = (torch.rand(64, 64, 14, 14) + 0.5).to(dtype).requires_grad_()  # never zero: a zero marks a drop
    drop = Dropout(0.3)
    torch.manual_seed(8)
    y = drop(x)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.005  # 802,816 draws: std of the mean ~0.0005
    scale = torch.tensor(1 / 0.7, dtype=dtype)
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.to(dtype) * scale, rtol=0, atol=0)
    torch.manual_seed(8)  # the mask is a function of the torch seed, like nn.Dropout's
    assert torch.equal(drop(x.detach()) != 0, kept)
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    assert Dropout(0.3)(torch.randn(0, 4)).shape == (0, 4)


def test_leaky_relu_slope_is_configurable():
    g = Generator(z_dim=8, negative_slope=0.05, kernels="eager")
    assert {m.negative_slope for m in g.modules() if isinstance(m, kernels.BatchNormLeakyReLU2d)} == {0.05}
    d = Discriminator(negative_slope=0.05)
    assert {m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)} == {0.05}


def test_unsupported_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size"):
        Generator(image_size=48)


def test_models_module_imports_nothing_distributed():
    import ast
    import inspect

    import distgan.models

    tree = ast.parse(inspect.getsource(distgan.models))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.startswith(("ray", "torch.distributed", "torch.nn.parallel"))}
