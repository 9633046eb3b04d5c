"""bench/kernels.py's cases: the shapes, dtypes and providers it measures, and the inputs and callables of
one call. The eager providers are the references in kernels/reference.py (one source of truth)."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# @triton.jit reads TRITON_INTERPRET when the decorator runs, so it is set before `kernels` is imported:
# without a GPU the interpreter is the only way the Triton kernels run (and are counted).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

PROVIDERS = ("eager", "compile", "triton")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BN, BCE, DLOSS = "batch_norm_leaky_relu", "bce_with_logits", "discriminator_loss"
STEP = "training_step"  # distgan's whole GAN step (G and D forward and backward, both losses), counted on a CPU
STEP_PROVIDERS = ("eager", "triton")  # the step's kernels= choices (torch.compile is not one of them)
# The generator's first BatchNorm normalizes its linear layer's output over the batch alone, and BatchNorm in
# training needs more than one value per channel: a step at batch 1 raises inside the model.
STEP_MIN_BATCH = 2

# The GPU the CPU-only figures are modelled on. 3.35 TB/s is H100 SXM5's HBM3 peak; a large
# device-to-device copy reaches about 90 % of it, so the model charges every provider's bytes at that.
# launch_us is the step model's assumed cost of one kernel in a launch-bound step (eager PyTorch's per-op CPU
# dispatch and launch, which a GPU waits on when each kernel runs for less): an assumption the model states,
# not a measurement.
MODEL_GPU = {"name": "NVIDIA H100 SXM5 80GB", "peak_gbps": 3350.0, "copy_gbps": 3000.0, "sms": 132,
             "launch_us": 5.0}
LARGE_BN_SHAPES = ((256, 64, 64, 64), (1024, 256, 16, 16), (16384, 1024))
BCE_SIZES = (64, 256, 1024, 4096, 1 << 14, 1 << 16, 1 << 18, 1 << 20)
# Below this many bytes a call is launch-bound on a GPU: it is also timed as a CUDA-graph replay.
LAUNCH_BOUND_BYTES = 8 << 20


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: str
    label: str  # where the shape comes from: "G.bn1 b64", "large", "D batch 64", ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Preset:
    batches: tuple  # generator batch sizes
    large: tuple  # BN shapes beyond the generator's (from LARGE_BN_SHAPES)
    bce_sizes: tuple
    dloss_batches: tuple
    dtypes: tuple
    providers: tuple
    compile_cases: str  # which cases torch.compile runs on the CPU: "all" | "g64" | "none"
    measure_max: int  # CPU: Triton counted directly up to this many elements (and the batch-64
    #                   generator layers always), larger shapes modelled from a proxy of <= proxy_max
    proxy_max: int
    compile_report: bool
    step_batches: tuple = ()  # CPU: distgan's whole training step counted at these batch sizes


PRESETS = {
    # The interpreter runs ~10 ms per program and tile: 2**21 elements of BN fwd+bwd take minutes.
    "full": Preset((64, 128, 256), LARGE_BN_SHAPES, BCE_SIZES, (64, 128, 256), ("fp32", "bf16"), PROVIDERS,
                   "all", 1 << 21, 1 << 18, True, (64, 256)),
    # CI-sized: every shape class is present; the interpreter counts the batch-64 generator layers and
    # shapes up to 2**16 elements directly, and models the rest from proxies of the same launch plan. The whole
    # step is counted at batch 64 only: at batch 256 the interpreter runs ~4,500 programs of the split path
    # (minutes on a quiet 2-core CPU, many more on a loaded one); the full preset and --step-batches add it.
    "quick": Preset((64, 128, 256), LARGE_BN_SHAPES, BCE_SIZES, (64,), ("fp32", "bf16"), PROVIDERS,
                    "g64", 1 << 16, 1 << 16, True, (64,)),
    # bench/gpu_check.sh's share of its 8 minutes: every provider, mode and dtype on the generator's layers
    # at batch 64 and 256, one large shape per BN layout (channels-split 4D, rows 2D), the G loss at its
    # batch and at 2**20 logits, the D loss at batch 64. On a GPU torch.compile builds each case anew.
    "gpu-check": Preset((64, 256), (LARGE_BN_SHAPES[0], LARGE_BN_SHAPES[2]), (64, 1 << 20), (64,),
                        ("fp32", "bf16"), PROVIDERS, "g64", 1 << 16, 1 << 16, False),
    # The tests' preset: the generator's layers at batch 4 (one counted, two modelled from proxies), a
    # counted and a modelled BCE size, one D loss, both dtypes, no compiler.
    "smoke": Preset((4,), (), (256, 1 << 16), (4,), ("fp32", "bf16"), ("eager", "triton"), "none",
                    1 << 15, 1 << 15, False, (4,)),
}


def generator_layers(batch: int, image_size: int = 28) -> list[tuple[str, tuple]]:
    """(name, input shape) of every BN+LeakyReLU in distgan's generator, read off the model itself."""
    from distgan.models import Generator

    g = Generator(image_size=image_size, kernels="eager")
    found = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: found.append((name, args[0].shape)))
        for name, m in g.named_modules()
        if isinstance(m, kernels.BatchNormLeakyReLU1d | kernels.BatchNormLeakyReLU2d)
    ]
    with torch.no_grad():
        g(torch.zeros(2, g.z_dim))
    for h in hooks:
        h.remove()
    return [(name, (batch,) + tuple(shape[1:])) for name, shape in found]


def build_cases(preset: Preset) -> list[Case]:
    cases = []
    for dtype in preset.dtypes:
        for batch in preset.batches:
            for name, shape in generator_layers(batch):
                cases.append(Case(BN, shape, dtype, f"G.{name} b{batch}"))
        cases += [Case(BN, shape, dtype, "large") for shape in preset.large]
        cases += [Case(BCE, (m,), dtype, "G loss" if m <= 256 else "") for m in preset.bce_sizes]
        cases += [Case(DLOSS, (2 * b,), dtype, f"D batch {b}") for b in preset.dloss_batches]
    return cases


def is_dcgan(case: Case) -> bool:
    """A shape of distgan's DCGAN: a generator layer or a loss at a training batch size."""
    return case.label.startswith(("G.", "D batch", "G loss"))


def work_order(cases, providers) -> list[tuple[Case, str]]:
    """Every (case, provider), the rows that matter most first, so that a time budget cuts the least useful:
    triton and eager at the DCGAN's shapes (both dtypes), then at the other shapes, then torch.compile (it
    compiles every shape anew, the slowest by far) in the same order."""
    def rank(item):
        case, provider = item
        return (provider == "compile", not is_dcgan(case))

    return sorted(((c, p) for c in cases for p in providers), key=rank)  # stable: case order within a rank


def is_g64(case: Case) -> bool:
    """A generator layer at batch 64: the shapes of the headline ratio, always counted directly."""
    return case.op == BN and case.label.startswith("G.") and case.label.endswith(" b64")


# ---------------------------------------------------------------------------------------------------
# Providers: one callable per (op, provider); inputs are built outside every counted or timed region.


def make_inputs(case: Case, device) -> dict:
    """Tensors for one call; `diff` are those the backward differentiates with respect to."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[case.dtype]
    if case.op == BN:
        c = case.shape[1]
        # Parameters and running statistics in fp32, as in a model trained under autocast.
        x = torch.randn(case.shape, generator=gen).to(device, dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(c, generator=gen)).to(device).requires_grad_()
        b = (0.1 * torch.randn(c, generator=gen)).to(device).requires_grad_()
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        return {"args": (x, w, b, rm, rv), "diff": (x, w, b)}
    x = (2 * torch.randn(case.shape, generator=gen)).to(device, dtype).requires_grad_()
    return {"args": (x,), "diff": (x,)}


def _bn_eager(x, w, b, rm, rv):
    return reference.batch_norm_leaky_relu(x, w, b, rm, rv, True, 0.1, 1e-5, 0.2)


def _bn_triton(x, w, b, rm, rv):
    return kernels.batch_norm_leaky_relu(x, w, b, rm, rv, True, 0.1, 1e-5, 0.2, impl="triton")


def _bce_eager(x):
    return reference.bce_with_logits(x, 1.0, "mean")  # the G loss: BCE(D(G(z)), 1)


def _bce_triton(x):
    return kernels.bce_with_logits(x, 1.0, "mean", impl="triton")


def _dloss_eager(x):
    return reference.discriminator_loss(x, x.shape[0] // 2)[0]


def _dloss_triton(x):
    return kernels.discriminator_loss(x, x.shape[0] // 2, impl="triton")[0]


EAGER = {BN: _bn_eager, BCE: _bce_eager, DLOSS: _dloss_eager}
TRITON = {BN: _bn_triton, BCE: _bce_triton, DLOSS: _dloss_triton}


def provider_fn(op: str, provider: str):
    if provider == "eager":
        return EAGER[op]
    if provider == "triton":
        return TRITON[op]
    torch._dynamo.reset()  # a fresh cache per case: no recompilation limit, no reuse across shapes
    return torch.compile(EAGER[op], dynamic=False)


def rec(case: Case, mode, provider, metric, value, unit, source, method, **extra) -> dict:
    """One figure: the record every result file holds (`records`), whatever produced it."""
    return dict(op=case.op, shape=list(case.shape), dtype=case.dtype, mode=mode, provider=provider, metric=metric,
                value=value, unit=unit, source=source, method=method, case=case.label, **extra)


def unavailable(case: Case, provider: str, reason: str) -> dict:
    """A (case, provider) that produced no figures, and why (listed under "Not available here")."""
    return {"op": case.op, "shape": list(case.shape), "dtype": case.dtype, "provider": provider, "reason": reason}
