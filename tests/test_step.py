import torch

from distgan.config import TrainConfig
from distgan.models import Discriminator, Generator
from distgan.step import EMA, gan_step, make_optimizers


def _setup(seed=0, z_dim=16):
    torch.manual_seed(seed)
    g = Generator(z_dim=z_dim, kernels="eager")
    d = Discriminator()
    opt_g, opt_d = make_optimizers(g, d, TrainConfig())
    return g, d, opt_g, opt_d


def test_adam_takes_the_configured_learning_rates_and_betas():
    g, d, opt_g, opt_d = _setup()
    for opt in (opt_g, opt_d):
        assert opt.defaults["lr"] == TrainConfig().lr_g and opt.defaults["betas"] == (0.5, 0.999)
        assert opt.defaults["fused"] is True
    cfg = TrainConfig(lr_g=1e-3, lr_d=3e-4)
    opt_g, opt_d = make_optimizers(g, d, cfg)
    assert (opt_g.defaults["lr"], opt_d.defaults["lr"]) == (1e-3, 3e-4)


def test_d_phase_runs_one_forward_on_the_concatenated_batch():
    g, d, opt_g, opt_d = _setup()
    batches = []
    d.register_forward_hook(lambda m, inp, out: batches.append(inp[0].shape[0]))
    real = torch.rand(6, 1, 28, 28) * 2 - 1
    gan_step(g, d, opt_g, opt_d, [real], lambda n: torch.randn(n, 16))
    # one D forward of real+fake (12) for the D phase, one of the fakes (6) for the G phase
    assert batches == [12, 6]


def test_g_phase_leaves_discriminator_grads_untouched():
    g, d, opt_g, opt_d = _setup()
    real = torch.rand(4, 1, 28, 28) * 2 - 1
    seen = {}

    def spy_step(*args, **kwargs):
        seen["d_grads"] = [p.grad.clone() for p in d.parameters()]
        return original(*args, **kwargs)

    original = opt_g.step
    opt_g.step = spy_step
    d_params_before_g = {}

    def spy_d_step(*args, **kwargs):
        out = original_d(*args, **kwargs)
        d_params_before_g["grads"] = [p.grad.clone() for p in d.parameters()]
        return out

    original_d = opt_d.step
    opt_d.step = spy_d_step
    gan_step(g, d, opt_g, opt_d, [real], lambda n: torch.randn(n, 16))
    # D's .grad after the G phase is exactly what the D phase left: the G loss computed no D gradient
    for after_g, after_d in zip(seen["d_grads"], d_params_before_g["grads"]):
        assert torch.equal(after_g, after_d)
    assert all(p.requires_grad for p in d.parameters())  # restored for the next D phase
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_n_critic_runs_that_many_d_updates_per_g_update():
    g, d, opt_g, opt_d = _setup()
    counts = {"d": 0, "g": 0}
    for name, opt in (("d", opt_d), ("g", opt_g)):
        step = opt.step

        def counted(*a, _step=step, _name=name, **k):
            counts[_name] += 1
            return _step(*a, **k)

        opt.step = counted
    reals = [torch.rand(4, 1, 28, 28) * 2 - 1 for _ in range(3)]
    out = gan_step(g, d, opt_g, opt_d, reals, lambda n: torch.randn(n, 16))
    assert counts == {"d": 3, "g": 1}
    assert set(out) == {"loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g"}
    assert all(torch.isfinite(v) for v in out.values())
    assert 0 < out["d_real"] < 1 and 0 < out["d_fake"] < 1


def test_losses_are_the_seeds_bce_formulas():
    g, d, opt_g, opt_d = _setup()
    d.eval()  # no dropout, so the losses can be recomputed exactly
    real = torch.rand(5, 1, 28, 28) * 2 - 1
    z = torch.randn(5, 16)
    torch.manual_seed(1)
    g_state = {k: v.clone() for k, v in g.state_dict().items()}
    d_state = {k: v.clone() for k, v in d.state_dict().items()}
    out = gan_step(g, d, opt_g, opt_d, [real], lambda n: z, real_label=0.9)
    g.load_state_dict(g_state)
    d.load_state_dict(d_state)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    fake = g(z)
    lr, lf = d(real), d(fake)
    expected_d = bce(lr, torch.full_like(lr, 0.9)) + bce(lf, torch.zeros_like(lf))
    torch.testing.assert_close(out["loss_d"], expected_d.detach())
    assert abs(out["d_real"] - torch.sigmoid(lr).mean()) < 1e-6


def test_ema_tracks_the_generator_and_copies_buffers():
    g, d, opt_g, opt_d = _setup()
    ema = EMA(g, decay=0.9)
    for _ in range(3):
        gan_step(g, d, opt_g, opt_d, [torch.rand(4, 1, 28, 28) * 2 - 1], lambda n: torch.randn(n, 16))
        ema.update(g)
    p_ema = torch.cat([p.flatten() for p in ema.model.parameters()])
    p_g = torch.cat([p.flatten() for p in g.parameters()])
    assert not torch.equal(p_ema, p_g) and (p_ema - p_g).abs().max() < 0.1
    for b_ema, b in zip(ema.model.buffers(), g.buffers()):
        assert torch.equal(b_ema, b)
    restored = EMA(g, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(restored.model.parameters(), ema.model.parameters()))


def _step_with_scalers(scale: float, poison_d: bool = False):
    g, d, opt_g, opt_d = _setup(seed=5)
    if poison_d:  # an overflowed gradient, as fp16 produces: the fused D step must be skipped
        d.net[-1].weight.register_hook(lambda grad: grad * float("inf"))
    scalers = tuple(torch.amp.GradScaler("cpu", init_scale=scale) for _ in range(2))
    torch.manual_seed(9)
    real = torch.rand(6, 1, 28, 28) * 2 - 1
    out = gan_step(g, d, opt_g, opt_d, [real], lambda n: torch.randn(n, 16), impl="eager", scalers=scalers)
    return g, d, out, scalers


def test_grad_scaler_with_fused_adam_unscales_and_skips_an_overflowed_step():
    # fp16 runs only on CUDA; its scaler logic with the fused optimizers is the same on CPU
    g_ref, d_ref, ref, _ = _step_with_scalers(1.0)
    g, d, out, (scaler_d, scaler_g) = _step_with_scalers(2.0**12)
    for key in ("loss_d", "loss_g", "grad_norm_d", "grad_norm_g"):  # norms are of the unscaled gradients
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-7)
    for p, q in zip([*g.parameters(), *d.parameters()], [*g_ref.parameters(), *d_ref.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert scaler_d.get_scale() == scaler_g.get_scale() == 2.0**12  # no overflow: the scale holds

    g_bad, d_bad, bad, (scaler_d, scaler_g) = _step_with_scalers(2.0**12, poison_d=True)
    untouched = _setup(seed=5)[1]
    assert all(torch.equal(p, q) for p, q in zip(d_bad.parameters(), untouched.parameters()))  # D step skipped
    assert not torch.isfinite(bad["grad_norm_d"])
    assert scaler_d.get_scale() == 2.0**11 and scaler_g.get_scale() == 2.0**12  # D backs off; G stepped
    assert any(not torch.equal(p, q) for p, q in zip(d.parameters(), d_bad.parameters()))  # `d` did step
