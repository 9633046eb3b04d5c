"""Launch plan for the fused BatchNorm + LeakyReLU: block sizes and grids as pure functions of the shape.

No Triton and no tensors here, so the plan is testable on its own and the compile report, the benchmarks and
the tests can ask for the plan of any device: `plan(n_rows, c, k, rows_layout, limits=DeviceLimits.gpu(132))`.

`DeviceLimits` holds every tuning knob; `device_limits(device)` picks them for a torch device (GPU: grids
sized by its SM count; CPU under the interpreter: few, wide programs). `limits_override(limits)` makes
`device_limits` answer `limits` inside a `with` block -- how the tests force the split path with tiny tiles
through the public API, and how the benchmarks run the interpreter with a GPU's plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._limits import LimitsSource

# GPU tuning constants (DeviceLimits' defaults; the compile report checks them for spills and 128-bit loads).
# One channel (block) held in registers, 32 fp32 per thread at 16 warps; the backward holds x and g. Rows that are
# not 16-byte aligned load element by element, each with its own 64-bit address, so those tiles are capped at half
# (16 per thread). Both are the largest sizes the compile report finds free of spills on sm_80 and sm_90.
FUSED_MAX_TILE = 16384
FUSED_PER_THREAD = 32  # tile elements per thread on the fused path at FUSED_MAX_TILE
MAX_WARPS = 16
STATS_TILE = 2048  # elements per reduction tile: 8 KB fp32, 16 per thread at 4 warps (4 x ld.v4)
ELEMENTWISE_TILE = 4096  # elements per normalise / dx program: enough bytes in flight per SM
MAX_BLOCK_K = 1024  # longest contiguous strip per tile row; wider rows are tiled along K
ROWS_BLOCK_C = 128  # (N, C) layout: channels per fused program (512 B contiguous per row)
STATS_BLOCK_C = 64  # (N, C) layout: channels per reduction tile
FINALIZE_BLOCK_C = 64  # channels per finalize program
FINALIZE_BLOCK_P = 32  # partials merged per step by the finalize and apply kernels (a 64 x 32 merge of the
#                       (N, C) layout is the largest register user at 4 warps: the compile report finds no spills)
PROGRAMS_PER_SM = 4  # split-path reduction grids aim at this many programs per SM (latency hiding)
# The interpreter runs programs one after another at ~10 ms each whatever their size, so on CPU the grids are
# few and the channel blocks wide. Same kernels, other constexprs; the compile report checks the GPU ones.
CPU_TARGET_PROGRAMS = 8
CPU_BLOCK_C = 1024


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (tl.arange extents must be powers of two)."""
    return 1 << (max(1, int(n)) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_warps(tile: int) -> int:
    """Warps for a split-path tile of `tile` elements: 512 per warp (16 fp32 per thread), between 1 and 8."""
    return max(1, min(8, tile // 512))


def fused_num_warps(tile: int, max_tile: int) -> int:
    """Warps for a fused tile: 16 elements per thread as on the split path up to 8 warps; beyond, the warps
    grow with the tile so that the largest allowed tile (`max_tile`) gets 16 (one program holds a whole
    channel, so more warps keep more of it in flight; 16 warps leave 128 registers per thread)."""
    if tile <= 8 * 512:
        return num_warps(tile)
    return max(8, min(MAX_WARPS, MAX_WARPS * tile // max(max_tile, 1)))


@dataclass(frozen=True)
class DeviceLimits:
    """What the planner may use on one device: the grid-size target and the tile / block caps.

    Every field but `programs` and `fused_max_tile` is a power of two (they become tl.arange extents).
    `fused_max_tile=0` turns the single-tile fused path off (the tests use it to force the split path).
    """

    programs: int  # split-path reduction grids aim at about this many programs
    rows_block_c: int = ROWS_BLOCK_C
    stats_block_c: int = STATS_BLOCK_C
    finalize_block_c: int = FINALIZE_BLOCK_C
    finalize_block_p: int = FINALIZE_BLOCK_P
    fused_max_tile: int = FUSED_MAX_TILE
    stats_tile: int = STATS_TILE
    elementwise_tile: int = ELEMENTWISE_TILE
    max_block_k: int = MAX_BLOCK_K

    def __post_init__(self):
        if self.programs < 1 or self.fused_max_tile < 0:
            raise ValueError(f"programs must be >= 1 and fused_max_tile >= 0: {self}")
        pow2 = ("rows_block_c", "stats_block_c", "finalize_block_c", "finalize_block_p", "stats_tile",
                "elementwise_tile", "max_block_k")
        bad = [name for name in pow2 if not _is_pow2(getattr(self, name))]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be powers of two: {self}")

    @classmethod
    def gpu(cls, sms: int) -> DeviceLimits:
        """The GPU block sizes, reduction grids sized for `sms` streaming multiprocessors."""
        return cls(programs=PROGRAMS_PER_SM * sms)

    @classmethod
    def cpu(cls) -> DeviceLimits:
        """Interpreter: few programs, wide channel blocks (its cost is per program, not per element)."""
        return cls(programs=CPU_TARGET_PROGRAMS, rows_block_c=CPU_BLOCK_C, stats_block_c=CPU_BLOCK_C,
                   finalize_block_c=min(FINALIZE_BLOCK_C * 16, CPU_BLOCK_C))


@dataclass(frozen=True)
class Tiles:
    """One kernel's tile (BLOCK_R x BLOCK_K elements), grid and warps."""

    block_r: int
    block_k: int
    grid: tuple[int, ...]
    num_warps: int

    @property
    def launch(self) -> dict:
        """The launch keywords these tiles fix: BLOCK_R, BLOCK_K and num_warps."""
        return {"BLOCK_R": self.block_r, "BLOCK_K": self.block_k, "num_warps": self.num_warps}


@dataclass(frozen=True)
class LaunchPlan:
    """Block sizes and grids of every kernel for one (layout, shape) on one device.

    fused      a channel (block) fits one tile: `fused_tiles` serve the one-kernel forward and backward.
    stats      the split path's kernels, reduction and apply alike (forward statistics then normalise, backward
               sums then dx): a (C-blocks x P) grid, `tiles_per_prog` tiles each; P = stats.grid[1] partials
               per channel, merged `block_p(P)` at a time by every apply program.
    elem       the eval forward's elementwise kernel over the (total_rows, k) matrix view.
    finalize   per-channel kernels (eval scale/shift, the synchronised BN's local merges): `finalize_block_c`
               channels per program, `block_p(p)` partials a step.
    """

    rows_layout: bool
    n_rows: int
    c: int
    k: int
    total_rows: int
    k_align: int  # gcd(k, 16): rows start 16-byte aligned when k is a multiple of 4 (fp32) -> ld.v4
    fused: bool
    fused_tiles: Tiles
    stats: Tiles
    tiles_per_prog: int
    elem: Tiles
    finalize_block_c: int
    finalize_grid: tuple[int]
    finalize_block_p: int

    @property
    def empty(self) -> bool:
        """Zero elements: nothing to launch over x (no kernel runs with an empty grid)."""
        return self.n_rows * self.c * self.k == 0

    @property
    def count(self) -> int:
        """Elements per channel (the batch-statistics count)."""
        return self.n_rows * (1 if self.rows_layout else self.k)

    def block_p(self, p: int) -> int:
        """Partials a finalize step merges when there are `p` of them."""
        return min(self.finalize_block_p, next_power_of_2(p))


def plan(n_rows: int, c: int, k: int, rows_layout: bool, limits: DeviceLimits) -> LaunchPlan:
    """The launch plan of an (n_rows, c, k) matrix view (see `layout_of`); any dimension may be 0."""
    np2 = next_power_of_2
    elem_k = min(np2(k), limits.max_block_k)
    k_align = math.gcd(k, 16)
    # fp32 rows 16-byte aligned (128-bit loads) or not: the unaligned tile needs twice the address registers.
    max_tile = limits.fused_max_tile if k_align % 4 == 0 else limits.fused_max_tile // 2
    if rows_layout:
        fused_r = np2(n_rows)
        fused_k = min(np2(c), limits.rows_block_c, max(1, max_tile // fused_r))  # the channel block that fits
        fused_grid = cdiv(c, fused_k)
        stats_k = min(np2(c), limits.stats_block_c)
        c_blocks = cdiv(c, stats_k)
        stats_r = min(np2(n_rows), max(1, limits.stats_tile // stats_k))
        n_tiles = cdiv(n_rows, stats_r)
        total_rows = n_rows
    else:
        fused_r, fused_k, fused_grid = np2(n_rows), np2(k), c
        stats_k = min(np2(k), limits.max_block_k)
        c_blocks = c
        stats_r = min(np2(n_rows), max(1, limits.stats_tile // stats_k))
        n_tiles = cdiv(n_rows, stats_r) * cdiv(k, stats_k)
        total_rows = n_rows * c
    fused = fused_r * fused_k <= max_tile
    p = max(1, min(n_tiles, limits.programs // max(1, c_blocks)))
    tiles_per_prog = max(1, cdiv(n_tiles, p))
    p = max(1, cdiv(n_tiles, tiles_per_prog))
    elem_r = min(np2(total_rows), max(1, limits.elementwise_tile // elem_k))
    return LaunchPlan(
        rows_layout=rows_layout, n_rows=n_rows, c=c, k=k, total_rows=total_rows, k_align=k_align,
        fused=fused,
        fused_tiles=Tiles(fused_r, fused_k, (fused_grid,), fused_num_warps(fused_r * fused_k, max_tile)),
        stats=Tiles(stats_r, stats_k, (c_blocks, p), num_warps(stats_r * stats_k)),
        tiles_per_prog=tiles_per_prog,
        elem=Tiles(elem_r, elem_k, (cdiv(total_rows, elem_r), cdiv(k, elem_k)), num_warps(elem_r * elem_k)),
        finalize_block_c=limits.finalize_block_c, finalize_grid=(cdiv(c, limits.finalize_block_c),),
        finalize_block_p=limits.finalize_block_p,
    )


LIMITS = LimitsSource("bnlr_limits", DeviceLimits.gpu, DeviceLimits.cpu)
limits_override = LIMITS.override  # `with limits_override(DeviceLimits(...)):` plans every device with those limits
device_limits = LIMITS.for_device  # the DeviceLimits the launchers plan with on a torch.device
