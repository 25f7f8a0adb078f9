"""Sample grids as PNG files, and samples as `.npy` arrays.

Samples are `(N, C, *spatial)` tensors in `[0, 1]`. Images are tiled into a grid; 3D volumes
show their middle slice along depth; 1D signals are drawn as line plots. One or three channels
become a grey or RGB image; other channel counts show the first channel.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffunet.errors import InvalidValueError
from diffunet.model.checkpoint import atomic_write_bytes

SIGNAL_HEIGHT = 48
SIGNAL_MIN_WIDTH = 128


def to_image_tiles(samples: torch.Tensor) -> torch.Tensor:
    """`(N, C, *spatial)` in [0, 1] → `(N, C', H, W)` image tiles (C' = 1 or 3)."""
    if samples.ndim == 5:  # volumes: the middle slice along depth
        samples = samples[:, :, samples.shape[2] // 2]
    if samples.ndim == 3:
        samples = _plot_signals(samples)
    if samples.ndim != 4:
        raise InvalidValueError(
            f"samples must be (N, C, *spatial) with 1-3 spatial axes, got {tuple(samples.shape)}"
        )
    if samples.shape[1] not in (1, 3):
        samples = samples[:, :1]
    return samples.clamp(0.0, 1.0)


def _plot_signals(signals: torch.Tensor) -> torch.Tensor:
    """Draw each `(C, L)` signal (first channel) as a white line on black, `SIGNAL_HEIGHT` tall.

    Short signals are stretched (linear interpolation) to at least `SIGNAL_MIN_WIDTH` pixels.
    """
    values = signals[:, :1].float().clamp(0.0, 1.0)
    if values.shape[-1] < SIGNAL_MIN_WIDTH:
        width = values.shape[-1] * math.ceil(SIGNAL_MIN_WIDTH / values.shape[-1])
        values = F.interpolate(values, size=width, mode="linear", align_corners=True)
    values = values[:, 0]
    n, length = values.shape
    rows = ((1.0 - values) * (SIGNAL_HEIGHT - 1)).round().long()  # (N, L)
    canvas = torch.zeros(n, 1, SIGNAL_HEIGHT, length)
    for i in range(length):  # connect consecutive points with vertical segments
        lo = torch.minimum(rows[:, i], rows[:, max(i - 1, 0)])
        hi = torch.maximum(rows[:, i], rows[:, max(i - 1, 0)])
        ys = torch.arange(SIGNAL_HEIGHT)
        canvas[:, 0, :, i] = ((ys[None] >= lo[:, None]) & (ys[None] <= hi[:, None])).float()
    return canvas


def make_grid(
    samples: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1
) -> np.ndarray:
    """Tile samples into one `uint8` image `(H, W)` or `(H, W, 3)`; `nrow` tiles per row."""
    tiles = to_image_tiles(samples.detach().float().cpu())
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = tiles.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    grid = torch.zeros(c, ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for index in range(n):
        r, col = divmod(index, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = tiles[index]
    array = (grid * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if c == 1 else array


def save_grid(
    samples: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    scale: int = 1,
    column_titles: Sequence[str] | None = None,
) -> Path:
    """Write samples as a PNG grid to `path` (atomically).

    `column_titles` label the columns in a strip above the grid, repeated across the row
    (`["input", "restored", "target"]` over six columns labels both triples).
    """
    from PIL import Image

    image = Image.fromarray(make_grid(samples, nrow=nrow, scale=scale))
    if column_titles:
        image = _with_titles(image, samples, nrow, scale, column_titles)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return Path(path)


def _with_titles(image, samples: torch.Tensor, nrow: int | None, scale: int, titles):
    """`image` (a grid of `make_grid`) below a strip with `titles` centred over its columns."""
    from PIL import Image, ImageDraw, ImageFont

    padding, strip = 2, 14
    width = to_image_tiles(samples).shape[-1] * scale
    columns = nrow or math.ceil(math.sqrt(len(samples)))
    titled = Image.new(
        image.mode,
        (image.width, image.height + strip),
        255 if image.mode == "L" else (255, 255, 255),
    )
    titled.paste(image, (0, strip))
    draw, font = ImageDraw.Draw(titled), ImageFont.load_default()
    for column in range(columns):
        text = titles[column % len(titles)]
        left = padding + column * (width + padding)
        text_width = draw.textlength(text, font=font)
        draw.text((left + (width - text_width) / 2, 1), text, fill=0, font=font)
    return titled


def save_array(samples: torch.Tensor, path: str | Path) -> Path:
    """Write samples as a float32 `.npy` array `(N, C, *spatial)` in [0, 1] (atomically)."""
    array = samples.detach().float().clamp(0.0, 1.0).cpu().numpy().astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return Path(path)
