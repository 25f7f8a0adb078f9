"""How good a restoration is, given the clean image: PSNR, SSIM and the uncertainty's worth.

Everything compares arrays in the [0, 1] units the restoration models work in (data range 1),
2D images or 3D volumes alike. :func:`quality` scores an estimate (the noisy input or the
restoration) against the clean image; :func:`uncertainty_quality` scores how well a per-pixel
standard deviation finds the restoration's errors; :func:`restoration_metrics` gathers both,
as `diffunet restore --target` and `benchmarks/restoration_quality.py` report them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffunet.errors import InvalidValueError

#: The shares of the total absolute error held by the most uncertain 10, 25 and 50 % of pixels.
TOP_PERCENTS = (10, 25, 50)


def _ssim_window(shape: tuple[int, ...]) -> int | None:
    """scikit-image's 7-pixel SSIM window, shrunk (odd) for inputs smaller than it; None below 3."""
    window = min(7, min(shape))
    window -= 1 - window % 2  # SSIM windows are odd
    return window if window >= 3 else None


def quality(clean: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of `estimate` against `clean`, both in [0, 1] (`estimate` is clipped).

    `skimage.metrics` with data range 1. PSNR is `inf` for an exact estimate; SSIM is NaN for
    inputs with a side under 3 pixels (too small for its window).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    estimate = np.clip(estimate, 0.0, 1.0).astype(np.float64)
    clean = np.asarray(clean, dtype=np.float64)
    if np.array_equal(clean, estimate):
        psnr = math.inf  # skimage would divide by a zero error
    else:
        psnr = float(peak_signal_noise_ratio(clean, estimate, data_range=1.0))
    window = _ssim_window(clean.shape)
    ssim = (
        math.nan
        if window is None
        else float(structural_similarity(clean, estimate, data_range=1.0, win_size=window))
    )
    return {"psnr": psnr, "ssim": ssim}


def uncertainty_quality(
    clean: np.ndarray, estimate: np.ndarray, std: np.ndarray
) -> dict[str, float]:
    """How well the per-pixel uncertainty `std` ranks the absolute error of `estimate`.

    Returns Spearman's ρ between `std` and |estimate − clean| (`spearman`; 1: the most uncertain
    pixels are the worst, 0: unrelated), the share of the total absolute error held by the 10,
    25 and 50 % most uncertain pixels (`top10_error_share`, ...; equal to the percentage if
    unrelated), the mean `std` and the RMSE. ρ is NaN when `std` or the error is constant (a
    single sample gives std 0); the shares are NaN when `std` is constant or there is no error.
    """
    from scipy.stats import spearmanr

    error = np.abs(np.clip(estimate, 0, 1).astype(np.float64) - clean).ravel()
    std = np.asarray(std, dtype=np.float64).ravel()
    ranked = np.ptp(std) > 0  # a constant map ranks nothing
    rho = float(spearmanr(std, error).statistic) if ranked and np.ptp(error) > 0 else math.nan
    order = np.argsort(-std, kind="stable")
    total = error.sum()
    shares = {
        f"top{percent}_error_share": (
            float(error[order[: max(1, len(std) * percent // 100)]].sum() / total)
            if ranked and total > 0
            else math.nan
        )
        for percent in TOP_PERCENTS
    }
    return {
        "spearman": rho,
        **shares,
        "mean_std": float(std.mean()),
        "rmse": float(np.sqrt(np.mean(error**2))),
    }


def restoration_metrics(
    clean: np.ndarray, noisy: np.ndarray, restored: np.ndarray, std: np.ndarray
) -> dict[str, dict[str, float]]:
    """The scores of one restoration against its clean target, all in [0, 1] units.

    `{"input": quality of the noisy input, "restored": quality of the restoration,
    "uncertainty": uncertainty_quality of std}`; every array has the clean image's shape.
    """
    for name, array in (("noisy", noisy), ("restored", restored), ("std", std)):
        if np.shape(array) != np.shape(clean):
            raise InvalidValueError(
                f"{name} has shape {np.shape(array)} but the clean image has "
                f"{np.shape(clean)}; every array must have the same shape"
            )
    return {
        "input": quality(clean, noisy),
        "restored": quality(clean, restored),
        "uncertainty": uncertainty_quality(clean, restored, std),
    }


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float (inf PSNR, NaN ρ) as None, so it is strict JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = [
    "TOP_PERCENTS",
    "json_ready",
    "quality",
    "restoration_metrics",
    "uncertainty_quality",
]
