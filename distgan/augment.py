"""Differentiable augmentation of everything the discriminator sees, with a fixed or an adaptive probability.

DiffAugment (Zhao, Liu, Lin, Zhu, Han, "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS
2020): the same random, differentiable transforms are applied to real and generated images before D, in the D
phase and in the G phase, so D cannot memorise a small training set and G's gradients flow through the
transforms. The ops and strengths below are the paper's reference implementation (DiffAugment_pytorch.py):
color (brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]), translation (up to 1/8 of the side, zero
padded) and cutout (a square of half the side, zero filled). Zero is mid-grey in the model's [-1, 1] range.

ADA (Karras, Aittala, Hellsten, Laine, Lehtinen, Aila, "Training Generative Adversarial Networks with Limited
Data", NeurIPS 2020): each transform is applied to each image with probability p, and p adapts to keep the
overfitting heuristic r_t = E[sign D(x_real)] near a target (0.6 in the paper): every ADA_INTERVAL steps, p
moves by sign(r_t - target) x (real images seen since the last update) / (ada_kimg x 1000), clamped to [0, 1].
A D that is confident on the real images (r_t above the target) gets more augmentation.

Everything is tensor ops on the images' device (CPU or CUDA); random numbers come from one torch.Generator per
rank on that device, so every DDP rank draws its own augmentations and nothing else draws from that stream.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distgan.config import parse_augment

ADA_INTERVAL = 4  # G steps between p updates (StyleGAN2-ADA's ada_interval)
TRANSLATION_RATIO = 0.125  # DiffAugment's: shift up to 1/8 of the side (3 pixels at 28x28)
CUTOUT_RATIO = 0.5  # DiffAugment's: erase a square of half the side
SEED_OFFSET = 1_000_000_007  # the augmentation stream's seed, apart from the noise stream's (trainer.py)


def _chosen(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) float 0/1: which images this transform applies to. Always draws n numbers, whatever p is."""
    return (torch.rand(n, device=device, generator=gen) < p).float()


def color(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, saturation, contrast (DiffAugment's rand_brightness/saturation/contrast), each applied to an
    image with probability p. x: (N, C, H, W) float in [-1, 1]; returns the same shape, differentiable in x."""
    n, dev = x.shape[0], x.device

    def rand() -> torch.Tensor:
        return torch.rand(n, 1, 1, 1, device=dev, generator=gen, dtype=x.dtype)

    # torch.where, not a blend with 0/1: an image left alone stays bit-identical
    on = _chosen(n, p, gen, dev).view(n, 1, 1, 1) > 0
    x = torch.where(on, x + (rand() - 0.5), x)
    on = _chosen(n, p, gen, dev).view(n, 1, 1, 1) > 0
    mean = x.mean(dim=1, keepdim=True)
    x = torch.where(on, (x - mean) * (rand() * 2) + mean, x)
    on = _chosen(n, p, gen, dev).view(n, 1, 1, 1) > 0
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(on, (x - mean) * (rand() + 0.5) + mean, x)


def translation(x: torch.Tensor, p: float, gen: torch.Generator, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shifts each chosen image by an integer offset in [-round(ratio x side), +round(ratio x side)] per axis,
    zero-filling what enters (DiffAugment's rand_translation). x: (N, C, H, W); same shape out; a gather, so
    the gradient reaches every input pixel that stays in view."""
    n, _, h, w = x.shape
    dev = x.device
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    on = _chosen(n, p, gen, dev).long()
    dy = torch.randint(-sh, sh + 1, (n,), device=dev, generator=gen) * on
    dx = torch.randint(-sw, sw + 1, (n,), device=dev, generator=gen) * on
    # output pixel (i, j) reads input (i + dy, j + dx), i.e. padded (i + dy + 1, j + dx + 1) with a 1-pixel zero
    # border that every out-of-range index is clamped onto
    rows = (torch.arange(h, device=dev).view(1, h) + dy.view(n, 1) + 1).clamp_(0, h + 1)
    cols = (torch.arange(w, device=dev).view(1, w) + dx.view(n, 1) + 1).clamp_(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    index = (rows.view(n, 1, h, 1) * (w + 2) + cols.view(n, 1, 1, w)).expand(n, x.shape[1], h, w)
    return padded.flatten(2).gather(2, index.reshape(n, x.shape[1], h * w)).view_as(x)


def cutout(x: torch.Tensor, p: float, gen: torch.Generator, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zeroes a square of round(ratio x side) pixels centred anywhere in each chosen image (DiffAugment's
    rand_cutout; the square may hang over the border). x: (N, C, H, W); same shape out; gradient 0 inside."""
    n, _, h, w = x.shape
    dev = x.device
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    on = _chosen(n, p, gen, dev).view(n, 1, 1)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=dev, generator=gen)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=dev, generator=gen)
    ys = torch.arange(h, device=dev).view(1, h, 1) - (cy - ch // 2)
    xs = torch.arange(w, device=dev).view(1, 1, w) - (cx - cw // 2)
    inside = ((ys >= 0) & (ys < ch) & (xs >= 0) & (xs < cw)).to(x.dtype)
    return x * (1 - on * inside).unsqueeze(1)


_FUNCTIONS = {"color": color, "translation": translation, "cutout": cutout}


def augment(x: torch.Tensor, ops: tuple[str, ...], p: float, gen: torch.Generator) -> torch.Tensor:
    """Applies `ops` in the order given, each to each image with probability p, drawing from `gen` (which must
    live on x's device). x: (N, C, H, W) float; returns the same shape and dtype, differentiable in x."""
    for op in ops:
        x = _FUNCTIONS[op](x, p, gen)
    return x


class Augment:
    """The augmentation D's inputs go through, and its state: the ops, p, this rank's generator, and (adaptive)
    ADA's running sum of sign D(x_real).

    Args:
        ops: transforms from distgan.config.AUGMENT_OPS, applied in this order.
        p: probability each transform applies to an image (the starting value when adaptive).
        device: where the images and the generator live.
        seed: this rank's seed (differs per rank).
        adaptive: adapt p with ADA's heuristic (`observe` once per G step).
        target: ADA's r_t target (0.6 in the paper).
        kimg: thousands of real images over which p can move from 0 to 1 (ADA's speed).
        images_per_step: real images D sees per G step over all ranks (global batch x n_critic).
    """

    def __init__(self, ops: tuple[str, ...], p: float, device: torch.device, seed: int, adaptive: bool = False,
                 target: float = 0.6, kimg: float = 100.0, images_per_step: int = 64):
        self.ops, self.p, self.adaptive = tuple(ops), float(p), adaptive
        self.target, self.kimg, self.images_per_step = target, kimg, images_per_step
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._sign_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._steps = 0  # G steps observed since the last p update

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return images
        return augment(images, self.ops, self.p, self.generator)

    def observe(self, real_sign_mean: torch.Tensor) -> None:
        """Adaptive only: accumulates this step's mean sign D(x_real) (a 0-dim tensor, no host sync), and every
        ADA_INTERVAL steps averages it over the ranks (one all-reduce, collective: every rank calls this at the
        same steps, and a host read of its two numbers) and moves p. A no-op for a fixed p."""
        if not self.adaptive:
            return
        self._sign_sum += real_sign_mean.detach().to(torch.float64)
        self._steps += 1
        if self._steps < ADA_INTERVAL:
            return
        totals = torch.stack([self._sign_sum, torch.tensor(float(self._steps), dtype=torch.float64,
                                                            device=self.device)])
        if dist.is_available() and dist.is_initialized():
            from kernels.collectives import collective_device

            totals = totals.to(collective_device())
            dist.all_reduce(totals)
        sign_sum, steps = totals.tolist()
        self.p = self.update_p(self.p, sign_sum / steps, self.target, self.images_per_step * self._steps, self.kimg)
        self._sign_sum.zero_()
        self._steps = 0

    @staticmethod
    def update_p(p: float, r_t: float, target: float, images: int, kimg: float) -> float:
        """ADA's rule: p + sign(r_t - target) x images / (kimg x 1000), clamped to [0, 1]."""
        step = math.copysign(images / (kimg * 1000), r_t - target) if r_t != target else 0.0
        return min(max(p + step, 0.0), 1.0)

    def state_dict(self) -> dict[str, Any]:
        """p, the ADA accumulator and this rank's generator state (a uint8 tensor on the CPU)."""
        return {"p": self.p, "sign_sum": self._sign_sum.cpu(), "steps": self._steps,
                "generator": self.generator.get_state(), "device_type": self.device.type}

    def load_state_dict(self, state: dict[str, Any], with_generator: bool = True) -> bool:
        """Restores p and the accumulator, and the generator when `with_generator` and it was saved on this
        device kind. Returns whether the generator was restored (else it continues from its seed)."""
        self.p = float(state["p"])
        self._sign_sum = state["sign_sum"].to(self.device, torch.float64).clone()
        self._steps = int(state["steps"])
        if with_generator and state.get("device_type") == self.device.type:
            self.generator.set_state(state["generator"])
            return True
        return False


def build_augment(cfg, device: torch.device, seed: int) -> Optional[Augment]:
    """The run's Augment from a validated TrainConfig (None for `--augment off`): a fixed policy applies with
    probability --augment-p (default 1, DiffAugment's); ada starts from --augment-p (default 0, ADA's)."""
    adaptive, ops = parse_augment(cfg.augment)
    if not ops:
        return None
    p = cfg.augment_p if cfg.augment_p is not None else (0.0 if adaptive else 1.0)
    return Augment(ops, p, device, seed, adaptive=adaptive, target=cfg.ada_target, kimg=cfg.ada_kimg,
                   images_per_step=cfg.images_per_g_step)
