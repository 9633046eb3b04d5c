"""The DCGAN of the TensorFlow MNIST tutorial, in plain PyTorch (no torch.distributed, no Ray).

At 28x28x1 the layers are exactly the tutorial's:
  G: Linear(z, 7*7*256, no bias) BN LReLU -> ConvT 256->128 k5 s1 (no bias) BN LReLU
     -> ConvT 128->64 k5 s2 (no bias) BN LReLU -> ConvT 64->C k5 s2 (no bias) tanh
  D: Conv C->64 k5 s2, LReLU, Dropout .3 -> Conv 64->128 k5 s2, LReLU, Dropout .3 -> Flatten -> Linear -> 1 logit
32 and 64 pixels start from a 4x4 map and add stride-2 layers, halving channels down to 32.
Every BatchNorm+LeakyReLU pair goes through `kernels`, so `kernels=` picks the fused Triton op or eager.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels as fused

# (start side, number of stride-2 upsamplings) per output size; 28 is the tutorial's 7 -> 14 -> 28.
_GENERATOR_PLAN = {28: (7, 2), 32: (4, 3), 64: (4, 4)}


def _conv_t(c_in: int, c_out: int, stride: int) -> nn.ConvTranspose2d:
    # padding 2 + output_padding (stride - 1) is Keras' padding="same" for a 5x5 kernel
    return nn.ConvTranspose2d(c_in, c_out, 5, stride=stride, padding=2, output_padding=stride - 1, bias=False)


class Generator(nn.Module):
    def __init__(self, z_dim: int = 100, image_size: int = 28, channels: int = 1, negative_slope: float = 0.2,
                 kernels: str = "auto", sync_bn: bool = False):
        super().__init__()
        if image_size not in _GENERATOR_PLAN:
            raise ValueError(f"image_size must be one of {sorted(_GENERATOR_PLAN)}, got {image_size}")
        side, n_up = _GENERATOR_PLAN[image_size]
        self.z_dim, self.image_size, self.channels = z_dim, image_size, channels
        self.start = (256, side, side)
        bn_args = dict(negative_slope=negative_slope, impl=kernels, sync=sync_bn)
        self.project = nn.Linear(z_dim, 256 * side * side, bias=False)
        self.project_act = fused.BatchNormLeakyReLU1d(256 * side * side, **bn_args)
        layers: list[nn.Module] = [_conv_t(256, 128, 1), fused.BatchNormLeakyReLU2d(128, **bn_args)]
        width = 128
        for _ in range(n_up - 1):
            out = max(width // 2, 32)
            layers += [_conv_t(width, out, 2), fused.BatchNormLeakyReLU2d(out, **bn_args)]
            width = out
        layers += [_conv_t(width, channels, 2), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        _init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project_act(self.project(z))
        return self.body(h.view(-1, *self.start))


class Dropout(nn.Dropout):
    """nn.Dropout (zero with probability p, scale the rest by 1/(1-p)); on CPU the mask comes from torch.rand.

    CPU `bernoulli_` draws one mt19937 number per element serially: in a torch.profiler profile of one
    worker's step (one thread, bf16) D's two dropouts were the largest cost after the convolutions; torch.rand
    fills the mask vectorised (`python bench/train.py` compares the whole step with the textbook loop's
    nn.Dropout). Same distribution and state_dict; other
    devices keep F.dropout's fused kernel. Input: any shape, floating dtype; output: same shape and dtype.
    Dropout: Srivastava et al., JMLR 2014 (inverted scaling as in nn.Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


class Discriminator(nn.Module):
    def __init__(self, image_size: int = 28, channels: int = 1, negative_slope: float = 0.2, dropout: float = 0.3):
        super().__init__()
        side = -(-image_size // 4)  # two stride-2 "same" convolutions
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 5, stride=2, padding=2),
            nn.LeakyReLU(negative_slope),
            Dropout(dropout),
            nn.Conv2d(64, 128, 5, stride=2, padding=2),
            nn.LeakyReLU(negative_slope),
            Dropout(dropout),
            nn.Flatten(),
            nn.Linear(128 * side * side, 1),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def _init_weights(module: nn.Module) -> None:
    # Keras' defaults, which the tutorial trains with: Glorot-uniform kernels, zero biases.
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_models(cfg) -> tuple[Generator, Discriminator]:
    g = Generator(cfg.z_dim, cfg.image_size, cfg.image_channels, cfg.negative_slope, cfg.kernels,
                  sync_bn=cfg.bn == "sync")
    d = Discriminator(cfg.image_size, cfg.image_channels, cfg.negative_slope)
    return g, d
