"""Tiled inference: run a function on overlapping tiles of a large 1D/2D/3D input and blend.

Tiles have a fixed size (the last tile on each axis is shifted back to end at the border, so no
tile is ever smaller than asked) and overlap their neighbours by at least `overlap` pixels. Each
tile's output is weighted by a separable window that rises as sin² over the `overlap` pixels
facing a neighbour and is 1 elsewhere, including at the image border; the weights never reach
zero, so every pixel is a weighted mean of the tiles covering it. Accumulation is in float64, so
a function that returns its input reproduces it bit for bit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from diffunet.errors import InvalidValueError

TileFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, ...]"]


def _per_axis(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(values) != dims or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise InvalidValueError(
            f"{name}={value!r} is invalid: expected an int or a tuple of {dims} ints (one per "
            "spatial axis)"
        )
    return values


def resolve_tiling(
    spatial: Sequence[int], tile_size: int | Sequence[int], overlap: int | Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-axis tile size (at most the input size) and overlap (default a quarter of the tile)."""
    dims = len(spatial)
    tiles = _per_axis(tile_size, dims, "tile_size")
    if any(t < 1 for t in tiles):
        raise InvalidValueError(f"tile_size={tile_size!r} is invalid: every tile side must be >= 1")
    overlaps = (
        tuple(t // 4 for t in tiles) if overlap is None else _per_axis(overlap, dims, "overlap")
    )
    for t, o in zip(tiles, overlaps):
        if not 0 <= o < t:
            raise InvalidValueError(
                f"overlap={overlap!r} is invalid for tile_size={tile_size!r}: expected 0 <= overlap "
                "< tile size on every axis (a quarter of the tile is a good choice)"
            )
    tiles = tuple(min(t, s) for t, s in zip(tiles, spatial))
    overlaps = tuple(min(o, t - 1) for o, t in zip(overlaps, tiles))
    return tiles, overlaps


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of length `size` (the last one ends at `size`)."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile]


def ramp_window(length: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D blending weights of a tile side: sin² ramps over `overlap` pixels where a neighbour is."""
    window = torch.ones(length, dtype=torch.float64)
    if overlap == 0:
        return window
    i = torch.arange(overlap, dtype=torch.float64)
    ramp = torch.sin(math.pi / 2 * (i + 1) / (overlap + 1)) ** 2
    if rise:
        window[:overlap] *= ramp
    if fall:
        window[length - overlap :] *= ramp.flip(0)
    return window


def blend_window(
    tile: Sequence[int], overlap: Sequence[int], start: Sequence[int], spatial: Sequence[int]
) -> torch.Tensor:
    """Separable weights for the tile at `start`; ramps only on sides that face another tile."""
    window = torch.ones((), dtype=torch.float64)
    for axis, (t, o, s, n) in enumerate(zip(tile, overlap, start, spatial)):
        w = ramp_window(t, o, rise=s > 0, fall=s + t < n)
        window = window.unsqueeze(-1) * w.reshape(*([1] * axis), t)
    return window


def tiled_map(
    fn: TileFn,
    image: torch.Tensor,
    tile_size: int | Sequence[int],
    overlap: int | Sequence[int] | None = None,
    *,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Apply `fn` to overlapping tiles of `image` `(B, C, *spatial)` and blend the results.

    `fn` maps a tile `(B, C, *tile)` to a tensor, or a tuple of tensors, of shape
    `(B, C_out, *tile)`; the result has the same structure at full size, on `image`'s device.
    Only one tile is processed at a time, so memory is bounded by the tile size.
    """
    if not isinstance(image, torch.Tensor) or image.ndim < 3:
        raise InvalidValueError(
            f"image must be a tensor (B, C, *spatial) with 1 to 3 spatial axes, got "
            f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}"
        )
    spatial = tuple(image.shape[2:])
    tiles, overlaps = resolve_tiling(spatial, tile_size, overlap)
    starts = list(
        itertools.product(*(tile_starts(n, t, o) for n, t, o in zip(spatial, tiles, overlaps)))
    )
    sums: list[torch.Tensor] | None = None
    weight = torch.zeros(spatial, dtype=torch.float64)
    single = True
    dtypes: list[torch.dtype] = []
    for start in tqdm(starts, desc="tiles", disable=not progress, leave=False):
        region = tuple(slice(s, s + t) for s, t in zip(start, tiles))
        outputs = fn(image[(slice(None), slice(None), *region)])
        single = isinstance(outputs, torch.Tensor)
        outputs = (outputs,) if single else tuple(outputs)
        for out in outputs:
            if tuple(out.shape[2:]) != tiles or out.shape[0] != image.shape[0]:
                raise InvalidValueError(
                    f"the tile function returned shape {tuple(out.shape)} for a tile of shape "
                    f"{(image.shape[0], image.shape[1], *tiles)}; expected the same batch and "
                    "spatial size"
                )
        if sums is None:
            sums = [torch.zeros((*out.shape[:2], *spatial), dtype=torch.float64) for out in outputs]
            dtypes = [out.dtype for out in outputs]
        window = blend_window(tiles, overlaps, start, spatial)
        weight[region] += window
        for total, out in zip(sums, outputs):
            total[(slice(None), slice(None), *region)] += (
                out.detach().to("cpu", torch.float64) * window
            )
    results = tuple(
        (total / weight).to(device=image.device, dtype=dtype) for total, dtype in zip(sums, dtypes)
    )
    return results[0] if single else results
