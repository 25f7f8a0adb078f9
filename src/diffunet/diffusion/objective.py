"""Training objectives: per-sample regression errors and their SNR weighting."""

from __future__ import annotations

import torch

from diffunet.errors import InvalidValueError


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for a batch of signal-to-noise ratios.

    The weight makes every parameterisation equivalent to an x₀ loss weighted by min(SNR, γ):
    ``eps`` → min(SNR, γ) / SNR, ``x0`` → min(SNR, γ), ``v`` → min(SNR, γ) / (SNR + 1).
    """
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        # min(SNR, γ) / SNR written as min(1, γ / SNR), which stays finite as SNR → 0.
        return (gamma / snr).clamp(max=1.0)
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1.0)
    raise InvalidValueError(f"unknown prediction {prediction!r}; expected 'eps', 'x0' or 'v'")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch axis: shape `(B,)`."""
    return (prediction - target).square().flatten(1).mean(dim=1)


def per_sample_gaussian_nll(
    mean: torch.Tensor, log_variance: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Gaussian negative log-likelihood per sample (constant ½·log 2π dropped): shape `(B,)`.

    ½ (exp(−log σ²) (target − mean)² + log σ²), averaged over every non-batch axis; minimised by
    the mean at the conditional expectation and σ² at the conditional variance.
    """
    nll = 0.5 * (torch.exp(-log_variance) * (target - mean).square() + log_variance)
    return nll.flatten(1).mean(dim=1)
