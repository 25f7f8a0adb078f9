"""Random aligned crops: the same window, flips and 90° turns in arrays that belong together.

Restoration learns a pixel-to-pixel mapping, so its training samples are windows cut at native
resolution (resizing would change the noise and the detail being restored), and an input and
its target must be cut at the same place and turned the same way. Every draw comes from the
`numpy.random.Generator` passed in, so a seed fixes the crops exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

#: How many training samples cropping aims for (EMDiffuse-style data sets hold thousands).
CROP_SAMPLES = 4096
#: At most this many bytes of float32 crops (inputs and targets together) are kept in memory.
CROP_MEMORY_BYTES = 1 << 30


def random_window(
    arrays: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
    dims: int,
    augment: bool = True,
) -> list[np.ndarray]:
    """One random `size`-sided window of the last `dims` axes, the same in each of `arrays`.

    The arrays share their last `dims` axes (at least `size` long each); leading axes, such as
    channels, are kept. With `augment`, the window is turned by a random multiple of 90° in the
    last two axes (for `dims` ≥ 2) and randomly mirrored along the last axis, identically in
    every array. The draws, in order: one offset per axis, the turn, the mirror.
    """
    spatial = arrays[0].shape[-dims:]
    corner = [int(rng.integers(0, s - size + 1)) for s in spatial]
    window = (Ellipsis, *(slice(c, c + size) for c in corner))
    crops = [array[window] for array in arrays]
    if augment:
        if dims >= 2:
            turns = int(rng.integers(4))
            crops = [np.rot90(crop, k=turns, axes=(-2, -1)) for crop in crops]
        if rng.integers(2):
            crops = [crop[..., ::-1] for crop in crops]
    return crops


def aligned_crops(
    arrays: Sequence[np.ndarray],
    size: int,
    count: int,
    rng: np.random.Generator,
    dims: int,
    augment: bool = True,
) -> list[np.ndarray]:
    """`count` aligned windows of `arrays` (see :func:`random_window`), stacked per array."""
    windows = [random_window(arrays, size, rng, dims, augment) for _ in range(count)]
    return [np.stack([window[i] for window in windows]) for i in range(len(arrays))]


def crops_per_source(sources: int, size: int, dims: int, channels: int) -> int:
    """How many crops to cut from each of `sources` images so the set holds about
    :data:`CROP_SAMPLES` samples of `channels` float32 channels (at least one per source),
    within :data:`CROP_MEMORY_BYTES`."""
    fit = CROP_MEMORY_BYTES // (4 * channels * size**dims)
    return max(1, math.ceil(min(CROP_SAMPLES, fit) / sources))


def crop_pairs(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    sources: int,
    size: int,
    dims: int,
    seed: int,
    augment: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Aligned crops of each of the `sources` `(input, target)` pairs, `(C, *spatial)` each.

    Every pair gives the same number of crops (:func:`crops_per_source`, from the first pair's
    channels); returns the input crops and the target crops, one `(k, C, *size)` array per
    pair, and k. `pairs` may be a generator, so that only one pair is held at a time.
    """
    rng = np.random.default_rng(seed)
    conds, xs, per_pair = [], [], 0
    for cond, x in pairs:
        if not per_pair:
            per_pair = crops_per_source(sources, size, dims, cond.shape[0] + x.shape[0])
        cond_crops, x_crops = aligned_crops([cond, x], size, per_pair, rng, dims, augment)
        conds.append(cond_crops)
        xs.append(x_crops)
    return conds, xs, per_pair
