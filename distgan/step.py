"""The alternating GAN step: pure functions of models, optimizers and batches.

D phase: n_critic updates, each one D forward over cat(real, fake.detach()).
G phase: D's parameters stop requiring grad, so no D gradient is computed (or all-reduced), and the
non-saturating loss BCE(D(G(z)), 1) updates G.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

import kernels as fused


def make_optimizers(g: nn.Module, d: nn.Module, cfg) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    betas = (cfg.beta1, cfg.beta2)
    return (torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=betas),
            torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=betas))


def _bare(module: nn.Module) -> nn.Module:
    # The G phase runs D forward-only through its parameters' eyes: going through a DDP wrapper would
    # arm its reducer for gradients that never arrive, so the G phase calls the wrapped module directly.
    return getattr(module, "module", module)


def _grad_norm(module: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def gan_step(
    g: nn.Module,
    d: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    reals: Sequence[torch.Tensor],
    sample_z: Callable[[int], torch.Tensor],
    real_label: float = 1.0,
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """One G step preceded by len(reals) D steps (n_critic). Returns 0-dim tensors (no host sync):
    loss_d, loss_g, d_real = mean sigmoid D(x), d_fake = mean sigmoid D(G(z)), grad_norm_d, grad_norm_g."""
    for i, real in enumerate(reals):
        last = i == len(reals) - 1
        z = sample_z(real.shape[0])
        # Only the last fake feeds the G phase; earlier ones need no graph through G.
        with torch.set_grad_enabled(last):
            fake = g(z)
        logits = d(torch.cat([real, fake.detach()]))
        loss_d, d_real, d_fake = fused.discriminator_loss(logits, real.shape[0], real_label=real_label,
                                                          fake_label=0.0, impl=impl)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        grad_norm_d = _grad_norm(d)
        opt_d.step()

    d_bare = _bare(d)
    d_bare.requires_grad_(False)
    try:
        loss_g = fused.bce_with_logits(d_bare(fake), 1.0, impl=impl)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
    finally:
        d_bare.requires_grad_(True)
    grad_norm_g = _grad_norm(g)
    opt_g.step()
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "d_real": d_real.detach(),
            "d_fake": d_fake.detach(), "grad_norm_d": grad_norm_d, "grad_norm_g": grad_norm_g}


class EMA:
    """Exponential moving average of a generator's parameters (buffers copied, not averaged).

    The decay warms up as min(decay, (1 + n) / (10 + n)) so short runs are not dominated by the init.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(_bare(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = _bare(model)
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
