"""The alternating GAN step: pure functions of models, optimizers and batches.

D phase: n_critic updates, each one D forward over cat(real, fake.detach()).
G phase: D's parameters stop requiring grad, so no D gradient is computed (or all-reduced), and the
non-saturating loss BCE(D(G(z)), 1) updates G.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import kernels as fused

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str):
    """torch.autocast for "bf16"/"fp16", a no-op context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


def make_optimizers(g: nn.Module, d: nn.Module, cfg) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and D. fused=True: one kernel for all parameters on CPU and CUDA (the foreach default's
    separate sqrt/div passes showed in a profile of the CPU step); GradScaler supports it."""
    betas = (cfg.beta1, cfg.beta2)
    return (torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=betas, fused=True),
            torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=betas, fused=True))


def unwrap_ddp(module: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wrapper holds (its `.module`); any other module as it is."""
    # The G phase runs D forward-only through its parameters' eyes: going through a DDP wrapper would
    # arm its reducer for gradients that never arrive, so the G phase calls the wrapped module directly.
    return getattr(module, "module", module)


def _grad_norm(module: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _unscaled_step(module: nn.Module, opt: torch.optim.Optimizer, scaler) -> torch.Tensor:
    """The gradient norm (of unscaled gradients), then the optimizer step. Under an enabled GradScaler a
    non-finite gradient makes the scaler skip the step and halve its scale (its normal fp16 overflow
    handling); the norm returned is then inf or NaN while the weights did not move."""
    if scaler is None:
        norm = _grad_norm(module)
        opt.step()
        return norm
    scaler.unscale_(opt)
    norm = _grad_norm(module)
    scaler.step(opt)
    scaler.update()
    return norm


def _backward_and_step(loss: torch.Tensor, module: nn.Module, opt: torch.optim.Optimizer, scaler) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return _unscaled_step(module, opt, scaler)


def gan_step(
    g: nn.Module,
    d: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    reals: Sequence[torch.Tensor],
    sample_z: Callable[[int], torch.Tensor],
    real_label: float = 1.0,
    impl: str = "auto",
    precision: str = "fp32",
    scalers: Optional[tuple[torch.amp.GradScaler, torch.amp.GradScaler]] = None,
    augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """One G step preceded by len(reals) D steps (n_critic). Returns 0-dim fp32 tensors (no host sync):
    loss_d, loss_g, d_real = mean sigmoid D(x), d_fake = mean sigmoid D(G(z)), grad_norm_d, grad_norm_g
    (of the last D step and of the G step; non-finite where fp16's scaler skipped that step).

    precision "bf16"/"fp16" runs the forwards under torch.autocast; the BCE losses take fp32 logits, BatchNorm
    statistics accumulate in fp32 (the fused kernels and nn.BatchNorm do), and the parameters, gradients and
    optimizer state stay fp32. fp16 needs `scalers` (GradScaler for D, for G); other precisions ignore them.

    `augment` (distgan/augment.py) transforms every batch D sees, real and fake, in both phases, differentiably,
    so G's gradient flows through it; with it, the result also holds d_real_sign = mean sign D(x_real) of the
    last D step (ADA's r_t for this step).
    """
    device_type = reals[0].device.type
    scaler_d, scaler_g = scalers or (None, None)
    for i, real in enumerate(reals):
        last = i == len(reals) - 1
        z = sample_z(real.shape[0])
        with autocast(precision, device_type):
            # Only the last fake feeds the G phase; earlier ones need no graph through G.
            with torch.set_grad_enabled(last):
                fake = g(z)
            both = torch.cat([real, fake.detach()])
            logits = d(augment(both) if augment is not None else both)
        loss_d, d_real, d_fake = fused.discriminator_loss(logits.float(), real.shape[0], real_label=real_label,
                                                          fake_label=0.0, impl=impl)
        grad_norm_d = _backward_and_step(loss_d, d, opt_d, scaler_d)

    d_bare = unwrap_ddp(d)
    d_bare.requires_grad_(False)
    try:
        with autocast(precision, device_type):
            logits_g = d_bare(augment(fake) if augment is not None else fake)
        loss_g = fused.bce_with_logits(logits_g.float(), 1.0, impl=impl)
        opt_g.zero_grad(set_to_none=True)
        (scaler_g.scale(loss_g) if scaler_g is not None else loss_g).backward()
    finally:
        d_bare.requires_grad_(True)
    grad_norm_g = _unscaled_step(g, opt_g, scaler_g)
    out = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "d_real": d_real.detach(),
           "d_fake": d_fake.detach(), "grad_norm_d": grad_norm_d, "grad_norm_g": grad_norm_g}
    if augment is not None:
        out["d_real_sign"] = torch.sign(logits[:real.shape[0]].detach().float()).mean()
    return out


class EMA:
    """Exponential moving average of a generator's parameters (buffers copied, not averaged).

    The decay warms up as min(decay, (1 + n) / (10 + n)) so short runs are not dominated by the init.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(unwrap_ddp(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap_ddp(model)
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
