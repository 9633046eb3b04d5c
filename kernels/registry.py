"""The ops: one list that `set_impl`, the static compile report (`bench/compile_report.py`) and the kernel
benchmark (`bench/kernels.py`) loop over, so an op is added here and in its own file, and nowhere else.

An entry (`Op`) names:

    name            the op's name: its public function in `kernels`, and its name in every benchmark record
    short           its name in the benchmark's tables and checks (default: name)
    module          the op's Triton file; the tools ask it for three things by name:
                      LIMITS                                   its planning limits (`_limits.LimitsSource`):
                                                               `.gpu(sms)` for a GPU that is not here,
                                                               `.override(limits)` to plan every launch with them
                      launch_example(shape, dtype, variant, limits)   the launchers, forward and backward once
                      proxy_key(shape, limits)                 what a smaller shape shares with `shape` when its
                                                               counted traffic scales with the element count
    kernel_modules  where its @triton.jit kernels (named `*_kernel`) live, when not in `module`
    modules         its nn.Module drop-ins: `set_impl` switches them, the benchmark finds them in distgan's generator
    compile_cases   what the compile report launches: (label, shape, dtype, variant)
    bench           what the benchmark runs (inputs, eager and Triton calls, shapes), or None

The registry imports no Triton (the eager path runs without it): `Op.load()` imports the op's module when a tool
asks. `register(op)` adds an op at run time, `registered(op)` for the length of a `with` block.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import NamedTuple

import torch

# kernels/__init__.py imports this module last: by then these names are its public functions (impl switch
# included), bound over the op modules' names.
from . import batch_norm_leaky_relu, bce_with_logits, discriminator_loss, reference
from .modules import BatchNormLeakyReLU1d, BatchNormLeakyReLU2d, BCEWithLogitsLoss


class CompileCase(NamedTuple):
    label: str  # the report's "case" column
    shape: tuple
    dtype: torch.dtype
    variant: str  # passed to the op's launch_example


@dataclass(frozen=True)
class Bench:
    """What the kernel benchmark needs of an op. Every call takes `inputs(...)["args"]` and returns one tensor."""

    inputs: Callable[..., dict]  # (shape, dtype, device, torch.Generator) -> {"args": ..., "diff": what backward
    #                              differentiates}; built outside every counted or timed region
    eager: Callable  # the eager reference (kernels.reference): the eager provider, and torch.compile's input
    triton: Callable  # the same call through the Triton kernels
    traffic: tuple[int, int, int]  # least traffic, in input-sized accesses: forward, backward, forward + backward
    shapes: Mapping[str, tuple] = field(default_factory=dict)  # preset name -> ((shape, label), ...) besides the
    #                                                            layers of distgan's generator that use `modules`
    layers_bytes_ratio: float | None = None  # the most bytes Triton may move, relative to eager, over those layers
    #                                          at batch 64, forward + backward (a check of every benchmark run)


@dataclass(frozen=True)
class Op:
    name: str
    module: str
    short: str = ""  # the benchmark tables' name for it (default: name)
    kernel_modules: tuple[str, ...] = ()
    modules: tuple[type, ...] = ()
    compile_cases: tuple[CompileCase, ...] = ()
    bench: Bench | None = None

    @property
    def label(self) -> str:
        return self.short or self.name

    def load(self) -> ModuleType:
        """The op's Triton module (imports triton)."""
        return importlib.import_module(self.module)

    def jit_kernels(self) -> list[tuple[ModuleType, str]]:
        """(module, attribute) of every @triton.jit kernel of the op: the compile report's list, and where a
        recorder stands in for each."""
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        found = []
        for path in self.kernel_modules or (self.module,):
            mod = importlib.import_module(path)
            found += [(mod, name) for name, value in sorted(vars(mod).items())
                      if name.endswith("_kernel") and isinstance(value, JITFunction | InterpretedFunction)]
        return found


# --------------------------------------------------------------------------------------------------
# Fused BatchNorm + LeakyReLU


def _bn_inputs(shape, dtype, device, gen) -> dict:
    # Parameters and running statistics in fp32, as in a model trained under autocast.
    c = shape[1]
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(c, generator=gen)).to(device).requires_grad_()
    b = (0.1 * torch.randn(c, generator=gen)).to(device).requires_grad_()
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    return {"args": (x, w, b, rm, rv), "diff": (x, w, b)}


def _bn_eager(x, w, b, rm, rv):
    return reference.batch_norm_leaky_relu(x, w, b, rm, rv, True, 0.1, 1e-5, 0.2)


def _bn_triton(x, w, b, rm, rv):
    return batch_norm_leaky_relu(x, w, b, rm, rv, True, 0.1, 1e-5, 0.2, impl="triton")


# Beyond the generator: a large (N, C, H, W) map, a large-batch 16x16 map and a wide (N, C) matrix.
LARGE_BN = (((256, 64, 64, 64), "large"), ((1024, 256, 16, 16), "large"), ((16384, 1024), "large"))

BATCH_NORM_LEAKY_RELU = Op(
    name="batch_norm_leaky_relu",
    module="kernels.batch_norm_leaky_relu",
    short="BN+LReLU",
    kernel_modules=("kernels.batch_norm_leaky_relu_kernels",),
    modules=(BatchNormLeakyReLU1d, BatchNormLeakyReLU2d),
    # The generator's layers of the 28x28 DCGAN at batch 64, 128 and 256 (the fused path at its largest tiles,
    # aligned and not; the split path in both layouts), bf16, eval and sync.
    compile_cases=(
        CompileCase("G.project (64,12544)", (64, 12544), torch.float32, "train"),
        CompileCase("G.project (256,12544)", (256, 12544), torch.float32, "train"),
        CompileCase("G.bn1 (64,128,7,7)", (64, 128, 7, 7), torch.float32, "train"),
        CompileCase("G.bn1 (128,128,7,7)", (128, 128, 7, 7), torch.float32, "train"),
        CompileCase("G.bn1 (256,128,7,7)", (256, 128, 7, 7), torch.float32, "train"),
        CompileCase("G.bn2 (64,64,14,14)", (64, 64, 14, 14), torch.float32, "train"),
        CompileCase("G.bn2 (128,64,14,14)", (128, 64, 14, 14), torch.float32, "train"),
        CompileCase("G.bn2 (64,64,14,14) bf16", (64, 64, 14, 14), torch.bfloat16, "train"),
        CompileCase("G.bn2 (128,64,14,14) bf16", (128, 64, 14, 14), torch.bfloat16, "train"),
        CompileCase("G.bn1 (128,128,7,7) bf16", (128, 128, 7, 7), torch.bfloat16, "train"),
        CompileCase("G.project (256,12544) bf16", (256, 12544), torch.bfloat16, "train"),
        CompileCase("(256,64,28,28) channels_last", (256, 64, 28, 28), torch.float32, "channels_last"),
        CompileCase("G.bn2 (128,64,14,14) eval", (128, 64, 14, 14), torch.float32, "eval"),
        CompileCase("G.bn2 (64,64,14,14) sync", (64, 64, 14, 14), torch.float32, "sync"),
    ),
    bench=Bench(
        inputs=_bn_inputs, eager=_bn_eager, triton=_bn_triton,
        traffic=(2, 3, 5),  # forward reads x, writes y; backward reads x and dy, writes dx
        # gpu-check: one large shape per layout (planes, rows); smoke: the generator's layers only
        shapes={"full": LARGE_BN, "quick": LARGE_BN, "gpu-check": (LARGE_BN[0], LARGE_BN[2]), "smoke": ()},
        layers_bytes_ratio=0.55,
    ),
)


# --------------------------------------------------------------------------------------------------
# BCE-with-logits (the G loss) and the discriminator loss: one Triton file, two ops


def _logits(shape, dtype, device, gen) -> dict:
    x = (2 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_()
    return {"args": (x,), "diff": (x,)}


def _bce_eager(x):
    return reference.bce_with_logits(x, 1.0, "mean")  # the G loss: BCE(D(G(z)), 1)


def _bce_triton(x):
    return bce_with_logits(x, 1.0, "mean", impl="triton")


def _dloss_eager(x):
    return reference.discriminator_loss(x, x.shape[0] // 2)[0]


def _dloss_triton(x):
    return discriminator_loss(x, x.shape[0] // 2, impl="triton")[0]


def _sizes(*sizes) -> tuple:
    return tuple(((m,), "G loss" if m <= 256 else "") for m in sizes)  # G loss: one logit per generated image


def _d_batches(*batches) -> tuple:
    return tuple(((2 * b,), f"D batch {b}") for b in batches)  # real and fake rows of one batch


BCE_SIZES = (64, 256, 1024, 4096, 1 << 14, 1 << 16, 1 << 18, 1 << 20)
BCE_WITH_LOGITS = Op(
    name="bce_with_logits",
    module="kernels.bce_with_logits",
    modules=(BCEWithLogitsLoss,),
    compile_cases=(
        CompileCase("G loss (64,)", (64,), torch.float32, "mean"),
        CompileCase("bce none (64,)", (64,), torch.float32, "none"),
        CompileCase("bce mean (1<<20,) bf16", (1 << 20,), torch.bfloat16, "target"),
    ),
    bench=Bench(
        inputs=_logits, eager=_bce_eager, triton=_bce_triton,
        traffic=(1, 2, 2),  # forward reads the logits (writes a scalar); backward reads them, writes dlogits
        shapes={"full": _sizes(*BCE_SIZES), "quick": _sizes(*BCE_SIZES), "gpu-check": _sizes(64, 1 << 20),
                "smoke": _sizes(256, 1 << 16)},
    ),
)
DISCRIMINATOR_LOSS = Op(
    name="discriminator_loss",
    module="kernels.bce_with_logits",
    compile_cases=(CompileCase("D loss (128,)", (128,), torch.float32, "discriminator"),),
    bench=Bench(
        inputs=_logits, eager=_dloss_eager, triton=_dloss_triton, traffic=(1, 2, 2),
        shapes={"full": _d_batches(64, 128, 256), "quick": _d_batches(64), "gpu-check": _d_batches(64),
                "smoke": _d_batches(4)},
    ),
)

_OPS: list[Op] = [BATCH_NORM_LEAKY_RELU, BCE_WITH_LOGITS, DISCRIMINATOR_LOSS]


# --------------------------------------------------------------------------------------------------
# The list


def ops() -> tuple[Op, ...]:
    """Every registered op, in registration order."""
    return tuple(_OPS)


def get(name: str) -> Op:
    for op in _OPS:
        if op.name == name:
            return op
    raise KeyError(f"no op {name!r} in the registry (registered: {', '.join(o.name for o in _OPS)})")


def module_classes() -> tuple[type, ...]:
    """Every op's nn.Module drop-ins (what `kernels.set_impl` switches)."""
    return tuple(cls for op in _OPS for cls in op.modules)


def register(op: Op) -> Op:
    """Add `op` to the list; its name must be new."""
    if any(o.name == op.name for o in _OPS):
        raise ValueError(f"an op named {op.name!r} is registered already")
    _OPS.append(op)
    return op


def unregister(name: str) -> None:
    _OPS.remove(get(name))


@contextlib.contextmanager
def registered(*new: Op):
    """The ops in `new` registered for the length of the block."""
    added = []
    try:
        for op in new:
            added.append(register(op))
        yield new
    finally:
        for op in added:
            unregister(op.name)
