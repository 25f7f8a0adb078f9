"""Image restoration with uncertainty, EMDiffuse style.

A conditional diffusion model (its degraded input goes in `cond`) is sampled several times per
input; the mean of the samples is the restoration and their per-pixel standard deviation is the
uncertainty map. Inputs larger than the training size are restored tile by tile with overlap
blending (:mod:`diffunet.apps.tiling`), in 1D, 2D or 3D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from diffunet.apps.tiling import tiled_map
from diffunet.diffusion import Diffusion
from diffunet.diffusion.process import model_device
from diffunet.errors import InvalidValueError


class Restoration(NamedTuple):
    """The result of :func:`restore`: `mean` and per-pixel `std` across samples, `(B, C, *spatial)`."""

    mean: torch.Tensor
    std: torch.Tensor


def _repeat(value: torch.Tensor | None, times: int, device) -> torch.Tensor | None:
    return None if value is None else value.to(device).repeat_interleave(times, dim=0)


def restore(
    model,
    diffusion: Diffusion,
    image: torch.Tensor,
    num_samples: int = 8,
    *,
    tile_size: int | Sequence[int] | None = None,
    overlap: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    sampler="ddim",
    steps: int = 50,
    eta: float = 0.0,
    guidance: float = 1.0,
    context: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Restoration:
    """Restore `image` (the model's `cond`, `(B, C_cond, *spatial)`) with `num_samples` samples.

    Args:
        num_samples: samples per input; their mean is the restoration and their standard
            deviation (population, ddof 0; 0 for a single sample) the uncertainty.
        tile_size: tile side(s) in pixels. Default: the model's `config.image_size` when the input
            is larger than it on some axis, else no tiling.
        overlap: overlap between neighbouring tiles (default a quarter of the tile).
        batch_size: most samples drawn in one sampler call (default all `B × num_samples`).
        sampler, steps, eta, guidance, context, labels, generator, progress: as in
            :meth:`Diffusion.sample`.
        device: where the model runs (default: its device); the result is on `image`'s device.

    Tiles are restored independently; the blended mean and the blended variance give `mean` and
    `std`, so the uncertainty map has no seams either.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.ndim < 3:
        given = (
            f"{image.dtype} tensor of shape {tuple(image.shape)}"
            if isinstance(image, torch.Tensor)
            else type(image).__name__
        )
        raise InvalidValueError(
            f"image must be a floating-point tensor (B, C, *spatial) with 1 to 3 spatial axes, "
            f"got {given}; add a batch axis with image[None] if needed"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidValueError(f"num_samples={num_samples!r} is invalid: expected an integer >= 1")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidValueError(
            f"batch_size={batch_size!r} is invalid: expected None or an integer >= 1"
        )
    config = getattr(model, "config", None)
    if getattr(config, "cond_channels", None) == 0:
        raise InvalidValueError(
            "restore needs an image-conditioned model (config.cond_channels > 0) that takes the "
            "degraded image as cond; this model has cond_channels=0"
        )
    channels = getattr(config, "in_channels", None) or image.shape[1]
    device = torch.device(device) if device is not None else model_device(model)
    spatial = tuple(image.shape[2:])
    if tile_size is None:
        trained = config.spatial_size() if hasattr(config, "spatial_size") else None
        if trained is not None and any(s > t for s, t in zip(spatial, trained)):
            tile_size = tuple(trained)
    tiled = tile_size is not None

    def restore_region(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, total = region.shape[0], region.shape[0] * num_samples
        cond = _repeat(region, num_samples, device)
        ctx, lab = _repeat(context, num_samples, device), _repeat(labels, num_samples, device)
        chunk = batch_size or total
        samples = []
        for first in range(0, total, chunk):
            part = slice(first, min(first + chunk, total))
            samples.append(
                diffusion.sample(
                    model,
                    (part.stop - part.start, channels, *region.shape[2:]),
                    sampler=sampler,
                    steps=steps,
                    eta=eta,
                    guidance=guidance,
                    cond=cond[part],
                    context=None if ctx is None else ctx[part],
                    labels=None if lab is None else lab[part],
                    generator=generator,
                    progress=progress and not tiled,
                    device=device,
                )
            )
        samples = torch.cat(samples).reshape(batch, num_samples, channels, *region.shape[2:])
        variance, mean = torch.var_mean(samples, dim=1, correction=0)
        return mean, variance

    if tiled:
        mean, variance = tiled_map(restore_region, image, tile_size, overlap, progress=progress)
    else:
        mean, variance = restore_region(image)
    return Restoration(mean.to(image.device), variance.clamp(min=0).sqrt().to(image.device))
