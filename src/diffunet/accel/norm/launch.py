"""How the norm kernels cover a call: the tiles, programs and warps of the streaming (three
kernels each way) and one-kernel launches, from `settings.NORM_LAUNCH` and the call's sizes.
Computed, and tested, without Triton."""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffunet.accel import settings
from diffunet.accel.triton_runtime import sm_count


class LaunchShape(NamedTuple):
    """How one call's kernels cover a (B, C, N) view: tiles of `block_c` channels × `block_n`
    positions, `chunks` programs per sample of `rows` positions each; the backward's reduce
    kernel in `reduction_warps` warps, the others in `num_warps`."""

    block_c: int
    block_n: int
    rows: int
    chunks: int
    num_warps: int
    loop_stages: int
    reduction_warps: int

    def kernel_options(self, reduction: bool = False) -> dict[str, int]:
        """The streaming kernels' tile and loop constexprs, and their warps (those of the
        backward's reduce kernel where `reduction`)."""
        return {
            "BLOCK_C": self.block_c,
            "BLOCK_N": self.block_n,
            "STAGES": self.loop_stages,
            "num_warps": self.reduction_warps if reduction else self.num_warps,
        }


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, as `triton.next_power_of_2` (the launch shapes are
    computed, and tested, without Triton)."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉, as `triton.cdiv`."""
    return -(-a // b)


#: The most per-chunk partials (chunks × channels) a combine kernel loads at once, per buffer.
COMBINE_TILE_ELEMENTS = 2048


def combine_options(chunks: int, per_group: int) -> dict[str, int]:
    """The combine kernels' constexprs: a group's channels (`BLOCK_G`) and how many of a
    sample's chunks each of their loads covers (`BLOCK_K`; all of them, up to the tile)."""
    block_g = next_power_of_2(per_group)
    block_k = min(next_power_of_2(chunks), max(1, COMBINE_TILE_ELEMENTS // block_g))
    return {"BLOCK_G": block_g, "BLOCK_K": block_k}


def launch_shape(x3: torch.Tensor) -> LaunchShape:
    """The `LaunchShape` of a (B, C, N) view under `settings.NORM_LAUNCH`."""
    b, c, n = x3.shape
    launch = settings.NORM_LAUNCH.for_elements(b * c * n)
    block_c = next_power_of_2(c)
    block_n = max(1, min(launch.tile_elements // block_c, next_power_of_2(n)))
    target_programs = launch.programs_per_sm * sm_count(x3.device)
    chunks = max(1, min(cdiv(n, block_n), cdiv(target_programs, b)))
    rows = cdiv(cdiv(n, chunks), block_n) * block_n
    reduction_warps = launch.reduction_warps or launch.num_warps
    return LaunchShape(
        block_c,
        block_n,
        rows,
        cdiv(n, rows),
        launch.num_warps,
        launch.loop_stages,
        reduction_warps,
    )


class OnePassShape(NamedTuple):
    """How the one-kernel forward and backward cover a (B, C, N) view: `slices` programs per
    sample, each owning `groups` whole groups (`channels` channels, the last slice possibly
    fewer), in tiles of `block_c` channels × `block_n` positions; `single_tile` where one tile
    holds all positions, which then stay in registers between the kernels' two passes."""

    groups: int
    channels: int
    slices: int
    block_c: int
    block_n: int
    num_warps: int
    loop_stages: int
    single_tile: bool

    def kernel_options(self) -> dict[str, int]:
        """The one-kernel kernels' tile, group and loop constexprs, and their warps."""
        return {
            "BLOCK_C": self.block_c,
            "BLOCK_N": self.block_n,
            "BLOCK_G": next_power_of_2(self.groups),
            "STAGES": self.loop_stages,
            "SINGLE_TILE": self.single_tile,
            "num_warps": self.num_warps,
        }


def one_pass_shape(x3: torch.Tensor, num_groups: int) -> OnePassShape | None:
    """The `OnePassShape` of a (B, C, N) view under `settings.NORM_LAUNCH`, or None where its
    programs would own more than the configuration's `one_pass_elements`."""
    b, c, n = x3.shape
    launch = settings.NORM_LAUNCH.for_elements(b * c * n)
    per_group = c // num_groups
    groups = 1  # doubled, so that the kernels' (channel, group) indicator has no idle column
    while groups * 2 <= num_groups and groups * per_group < settings.ONE_PASS_MIN_CHANNELS:
        groups *= 2
    channels = groups * per_group
    if channels * n > launch.one_pass_elements:
        return None
    block_c = next_power_of_2(channels)
    block_n = max(1, min(launch.tile_elements // block_c, next_power_of_2(n)))
    return OnePassShape(
        groups,
        channels,
        cdiv(num_groups, groups),
        block_c,
        block_n,
        launch.num_warps,
        launch.loop_stages,
        single_tile=n <= block_n,
    )
