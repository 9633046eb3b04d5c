"""Launch plan for BCE-with-logits: the grid as a pure function of the logit count (no Triton, no tensors).

One program loops over everything up to `single_program_max` logits (any D batch): its partial is the result,
one launch and no second sum. Larger inputs get about `programs` programs and one fixed-order sum of their
partials. `limits_override(limits)` makes `device_limits` answer `limits` inside a `with` block (tests, bench).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._limits import LimitsSource
from .batch_norm_leaky_relu_plan import cdiv

BLOCK = 1024  # logits per tile: 4 KB fp32, 8 per thread at 4 warps (2 x ld.v4)
SINGLE_PROGRAM_MAX = 16 * BLOCK  # up to here one program loops over everything: one launch, no 2nd sum
PROGRAMS_PER_SM = 4
NUM_WARPS = 4
CPU_TARGET_PROGRAMS = 8  # the interpreter runs programs one after another: few of them


@dataclass(frozen=True)
class BCELimits:
    programs: int  # grid size target above single_program_max
    block: int = BLOCK
    single_program_max: int = SINGLE_PROGRAM_MAX
    num_warps: int = NUM_WARPS

    def __post_init__(self):
        if self.programs < 1 or self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"programs must be >= 1 and block a power of two: {self}")

    @classmethod
    def gpu(cls, sms: int) -> BCELimits:
        return cls(programs=PROGRAMS_PER_SM * sms)

    @classmethod
    def cpu(cls) -> BCELimits:
        return cls(programs=CPU_TARGET_PROGRAMS)


@dataclass(frozen=True)
class BCEPlan:
    grid: tuple[int]  # forward programs (P partials)
    tiles_per_prog: int
    bwd_grid: tuple[int]  # one program per tile
    block: int
    num_warps: int


def plan(m: int, limits: BCELimits) -> BCEPlan:
    """Grid for M logits (M may be 0)."""
    n_tiles = cdiv(max(m, 1), limits.block)
    p = 1 if m <= limits.single_program_max else min(n_tiles, limits.programs)
    tiles_per_prog = cdiv(n_tiles, p)
    p = cdiv(n_tiles, tiles_per_prog)
    return BCEPlan(grid=(p,), tiles_per_prog=tiles_per_prog, bwd_grid=(cdiv(m, limits.block),), block=limits.block,
                   num_warps=limits.num_warps)


_LIMITS = LimitsSource("bce_limits", BCELimits.gpu, BCELimits.cpu)
limits_override = _LIMITS.override  # `with limits_override(BCELimits(...)):` plans every device with those limits
device_limits = _LIMITS.for_device  # the BCELimits the launchers plan with on a torch.device
