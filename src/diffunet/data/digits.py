"""The embedded default data: scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels).

The digits ship inside scikit-learn, so `diffunet train` works offline on a fresh machine.
They are upsampled (bilinear) to the training size; the evaluation network downsamples
generated digits back to 8×8.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffunet.data.dataset import DataError, TensorDataset

DIGITS_SIZE = 8
DIGITS_MAX = 16.0


def _digits_file() -> Path | None:
    """scikit-learn's `digits.csv.gz` (64 grey levels then the label per row), found without
    importing scikit-learn, or None where this install lays its data out otherwise."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _digits_grey_levels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as `(1797, 8, 8)` float64 grey levels and `(1797,)` int64 labels.

    Read from scikit-learn's data file directly: importing scikit-learn takes longer than a
    short training run's steps. Falls back to `sklearn.datasets.load_digits`.
    """
    path = _digits_file()
    if path is not None:
        rows = np.loadtxt(path, delimiter=",")
        if rows.shape == (1797, DIGITS_SIZE * DIGITS_SIZE + 1):
            return rows[:, :-1].reshape(-1, DIGITS_SIZE, DIGITS_SIZE), rows[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as `(1797, 1, 8, 8)` float32 in `[0, 1]` and their `(1797,)` int64 labels."""
    images, labels = _digits_grey_levels()
    return (
        torch.from_numpy(images).float().div_(DIGITS_MAX).unsqueeze(1),
        torch.from_numpy(labels).long(),
    )


def resize_digits(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize `(N, 1, 8, 8)` digits to `size × size` (bilinear up, area down), clamped to [0, 1]."""
    if size == images.shape[-1]:
        return images.clone()
    if size > images.shape[-1]:
        out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    else:
        out = F.interpolate(images, size=(size, size), mode="area")
    return out.clamp_(0.0, 1.0)


def load_digits_dataset(image_size: int | None = None) -> TensorDataset:
    """The digits as a labelled :class:`TensorDataset` at `image_size` (default 16)."""
    size = 16 if image_size is None else image_size
    if not isinstance(size, int) or size < DIGITS_SIZE:
        raise DataError(
            f"--image-size {size} is too small for the digits: they are {DIGITS_SIZE}×{DIGITS_SIZE}; "
            f"use {DIGITS_SIZE} or more (16 is the default)"
        )
    images, labels = digits_arrays()
    return TensorDataset(
        x=resize_digits(images, size),
        labels=labels,
        class_names=[str(i) for i in range(10)],
        source="digits",
        extra={"original_size": [DIGITS_SIZE, DIGITS_SIZE]},
    )
