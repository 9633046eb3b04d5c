"""bench/kernels.py's cases: the shapes, dtypes and providers it measures, and the inputs and callables of
one call. Every op comes from `kernels.registry`: its shapes beyond distgan's generator, its inputs, and its eager
provider (a reference in kernels/reference.py, one source of truth) and Triton provider."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import registry

PROVIDERS = ("eager", "compile", "triton")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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
    name: str  # each op's registry entry says which shapes it runs in a preset of this name
    batches: tuple  # generator batch sizes: every op with a module in distgan's generator runs at its layers
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
    "full": Preset("full", (64, 128, 256), ("fp32", "bf16"), PROVIDERS, "all", 1 << 21, 1 << 18, True, (64, 256)),
    # CI-sized: every shape class is present; the interpreter counts the batch-64 generator layers and
    # shapes up to 2**16 elements directly, and models the rest from proxies of the same launch plan. The whole
    # step is counted at batch 64 only: at batch 256 the interpreter runs ~4,500 programs of the split path
    # (minutes on a quiet 2-core CPU, many more on a loaded one); the full preset and --step-batches add it.
    "quick": Preset("quick", (64, 128, 256), ("fp32", "bf16"), PROVIDERS, "g64", 1 << 16, 1 << 16, True, (64,)),
    # bench/gpu_check.sh's share of its 8 minutes: every provider, mode and dtype on the generator's layers
    # at batch 64 and 256 and the ops' gpu-check shapes. On a GPU torch.compile builds each case anew.
    "gpu-check": Preset("gpu-check", (64, 256), ("fp32", "bf16"), PROVIDERS, "g64", 1 << 16, 1 << 16, False),
    # The tests' preset: the generator's layers at batch 4 (one counted, two modelled from proxies), the ops'
    # smoke shapes, both dtypes, no compiler.
    "smoke": Preset("smoke", (4,), ("fp32", "bf16"), ("eager", "triton"), "none", 1 << 15, 1 << 15, False, (4,)),
}


def generator_layers(image_size: int = 28) -> list[tuple[str, str, tuple]]:
    """(op name, layer name, input shape without the batch) of every module of a registered op in distgan's
    generator, read off the model itself."""
    from distgan.models import Generator

    g = Generator(image_size=image_size, kernels="eager")
    found, hooks = [], []
    for op in registry.ops():
        for name, m in g.named_modules():
            if op.modules and isinstance(m, op.modules):
                hook = lambda m, args, op=op.name, name=name: found.append((op, name, tuple(args[0].shape[1:])))
                hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        g(torch.zeros(2, g.z_dim))
    for h in hooks:
        h.remove()
    return found


def build_cases(preset: Preset) -> list[Case]:
    """Per dtype and registered op: the generator's layers that use the op at every batch of the preset, then
    the op's own shapes for this preset."""
    layers = generator_layers()
    cases = []
    for dtype in preset.dtypes:
        for op in registry.ops():
            if op.bench is None:
                continue
            for batch in preset.batches:
                cases += [Case(op.name, (batch,) + shape, dtype, f"G.{name} b{batch}")
                          for name_op, name, shape in layers if name_op == op.name]
            own = op.bench.shapes.get(preset.name, ())
            cases += [Case(op.name, tuple(shape), dtype, label) for shape, label in own]
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
    return case.label.startswith("G.") and case.label.endswith(" b64")


# ---------------------------------------------------------------------------------------------------
# Providers: one callable per (op, provider); inputs are built outside every counted or timed region.


def make_inputs(case: Case, device) -> dict:
    """Tensors for one call; `diff` are those the backward differentiates with respect to."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return registry.get(case.op).bench.inputs(case.shape, DTYPES[case.dtype], device, gen)


def provider_fn(op: str, provider: str):
    bench = registry.get(op).bench
    if provider == "eager":
        return bench.eager
    if provider == "triton":
        return bench.triton
    torch._dynamo.reset()  # a fresh cache per case: no recompilation limit, no reuse across shapes
    return torch.compile(bench.eager, dynamic=False)


def rec(case: Case, mode, provider, metric, value, unit, source, method, **extra) -> dict:
    """One figure: the record every result file holds (`records`), whatever produced it."""
    return dict(op=case.op, shape=list(case.shape), dtype=case.dtype, mode=mode, provider=provider, metric=metric,
                value=value, unit=unit, source=source, method=method, case=case.label, **extra)


def unavailable(case: Case, provider: str, reason: str) -> dict:
    """A (case, provider) that produced no figures, and why (listed under "Not available here")."""
    return {"op": case.op, "shape": list(case.shape), "dtype": case.dtype, "provider": provider, "reason": reason}
