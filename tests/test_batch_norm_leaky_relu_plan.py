"""kernels.batch_norm_leaky_relu_plan: the launch plan as pure Python (no Triton, no tensors)."""

import dataclasses
import math

import pytest

from kernels.batch_norm_leaky_relu_plan import DeviceLimits, device_limits, limits_override, next_power_of_2, plan

H100 = DeviceLimits.gpu(132)
CPU = DeviceLimits.cpu()
TINY = DeviceLimits(programs=3, rows_block_c=4, stats_block_c=4, finalize_block_c=4, finalize_block_p=2,
                    fused_max_tile=0, stats_tile=16, elementwise_tile=32)


def _pow2(n):
    return n >= 1 and n & (n - 1) == 0


def assert_respects(p, limits):
    """Every tile within the limits, every extent a power of two, and the grids cover the matrix view."""
    for tiles in (p.fused_tiles, p.stats, p.elem):
        assert _pow2(tiles.block_r) and _pow2(tiles.block_k), tiles
        assert 1 <= tiles.num_warps <= (16 if tiles is p.fused_tiles else 8)
    if p.fused:
        # unaligned rows (scalar loads, one address per element) get half the tile
        cap = limits.fused_max_tile if p.k_align % 4 == 0 else limits.fused_max_tile // 2
        assert p.fused_tiles.block_r * p.fused_tiles.block_k <= cap
        assert p.fused_tiles.block_r * p.fused_tiles.block_k // (32 * p.fused_tiles.num_warps) <= 32  # per thread
        assert p.fused_tiles.block_r >= p.n_rows  # one tile holds the whole channel (block)
        assert p.fused_tiles.block_k >= (1 if p.rows_layout else p.k)
        assert p.fused_tiles.grid[0] * (p.fused_tiles.block_k if p.rows_layout else 1) >= p.c
    assert p.stats.block_r * p.stats.block_k <= max(limits.stats_tile, p.stats.block_k)
    assert p.elem.block_r * p.elem.block_k <= max(limits.elementwise_tile, p.elem.block_k)
    assert p.stats.block_k <= (limits.stats_block_c if p.rows_layout else limits.max_block_k)
    assert p.elem.block_k <= limits.max_block_k and p.finalize_block_c == limits.finalize_block_c
    c_blocks, programs = p.stats.grid
    assert c_blocks * programs <= max(limits.programs, c_blocks)  # the target, unless channels alone exceed it
    n_tiles = math.ceil(p.n_rows / p.stats.block_r) * (1 if p.rows_layout else math.ceil(p.k / p.stats.block_k))
    assert (programs - 1) * p.tiles_per_prog < max(n_tiles, 1) <= programs * p.tiles_per_prog  # no idle program
    assert p.elem.grid[0] * p.elem.block_r >= p.total_rows and p.elem.grid[1] * p.elem.block_k >= p.k
    assert p.finalize_grid[0] * p.finalize_block_c >= p.c
    assert 16 % p.k_align == 0 and p.k % p.k_align == 0


SHAPES = [  # (n_rows, c, k, rows_layout)
    (1, 1, 1, True), (2, 13, 13, True), (64, 12544, 12544, True), (64 * 28 * 28, 64, 64, True),
    (3, 7, 25, False), (64, 128, 49, False), (64, 64, 196, False), (256, 64, 784, False),
    (1 << 20, 3, 1 << 20, False), (1 << 24, 1 << 10, 1 << 10, True),  # huge: int64 offsets, capped tiles
]


@pytest.mark.parametrize("limits", [H100, CPU, TINY], ids=["h100", "cpu", "tiny"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plan_respects_limits(shape, limits):
    assert_respects(plan(*shape, limits=limits), limits)


def test_dcgan_layers_take_the_documented_paths_on_an_h100():
    for batch in (64, 128, 256):  # G.project: 128 (batch 64, 128) or 64 (batch 256) channels a program
        assert plan(batch, 12544, 12544, True, H100).fused
    fused = plan(64, 64, 196, False, H100)  # G.bn2 14x14 at batch 64: 64 x 256 at 16 warps, 128-bit loads
    assert fused.fused and fused.fused_tiles.num_warps == 16 and fused.k_align == 4
    assert plan(64, 128, 49, False, H100).fused and plan(128, 128, 49, False, H100).fused  # G.bn1 7x7
    for shape in ((256, 128, 49), (128, 64, 196), (256, 64, 196)):  # beyond one tile: two launches a direction
        split = plan(*shape, False, H100)
        assert not split.fused and split.stats.grid[0] * split.stats.grid[1] <= H100.programs
    assert plan(128, 64, 196, False, H100).stats.grid == (64, 8)


@pytest.mark.parametrize("shape", [(0, 3, 16, False), (0, 3, 3, True), (2, 3, 0, False), (4, 0, 0, True),
                                   (0, 0, 0, False)], ids=str)
@pytest.mark.parametrize("limits", [H100, CPU, TINY], ids=["h100", "cpu", "tiny"])
def test_zero_size_shapes_plan_as_empty(shape, limits):
    p = plan(*shape, limits=limits)  # used to be a ZeroDivisionError
    assert p.empty and p.count == (shape[0] * (1 if shape[3] else shape[2]))
    assert all(g >= 0 for g in p.stats.grid + p.elem.grid + p.finalize_grid)


def test_fused_max_tile_zero_forces_the_split_path():
    assert plan(4, 3, 25, False, CPU).fused
    assert not plan(4, 3, 25, False, dataclasses.replace(CPU, fused_max_tile=0)).fused


def test_block_p_and_helpers():
    p = plan(8, 4, 9, False, TINY)
    assert p.block_p(1) == 1 and p.block_p(3) == 2 and p.block_p(1000) == TINY.finalize_block_p
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 1000)] == [1, 1, 2, 4, 1024]


def test_limits_are_validated_and_frozen():
    with pytest.raises(ValueError, match="powers of two"):
        DeviceLimits(programs=4, stats_tile=100)
    with pytest.raises(ValueError, match="programs must be >= 1"):
        DeviceLimits(programs=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        H100.programs = 1


def test_limits_override_is_scoped():
    class Cpu:
        type = "cpu"

    assert device_limits(Cpu()) == CPU
    with limits_override(TINY):
        assert device_limits(Cpu()) == TINY
    assert device_limits(Cpu()) == CPU
