"""Samplers: update rules that walk x from pure noise to data along a list of steps.

Every sampler sees the model only through `predict(x, step) -> (x̂₀, ε̂)`, so guidance,
parameterisation and clipping live elsewhere. A :class:`Step` pairs the noise level the model is
evaluated at (ᾱ_t) with the one the update lands on (ᾱ_prev; 1 after the last step, i.e. clean).

- :func:`ddpm`: ancestral sampling with the posterior q(x_prev | x_t, x̂₀) (Ho et al. 2020); with
  fewer steps than the schedule it uses the respaced β of the visited steps (Nichol & Dhariwal).
- :func:`ddim`: DDIM (Song et al. 2021) with noise scale η; η = 0 is deterministic, η = 1 has
  DDPM's posterior variance.
- :func:`dpm_solver_pp`: DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver of
  the probability-flow ODE in data-prediction form; first order on the first and last steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

SAMPLERS = ("ddpm", "ddim", "dpm++")


class Step(NamedTuple):
    """One sampler step: evaluate at step index `t` (noise level ᾱ_t), land on `alpha_bar_prev`."""

    t: int
    alpha_bar: float
    alpha_bar_prev: float


Predict = Callable[[torch.Tensor, Step], tuple[torch.Tensor, torch.Tensor]]
DrawNoise = Callable[[], torch.Tensor]


def steps_from_timesteps(timesteps: list[int], alpha_bar: Callable[[int], float]) -> list[Step]:
    """Pair each visited step with the next one (`-1`, clean data, after the last)."""
    following = [*timesteps[1:], -1]
    return [Step(t, alpha_bar(t), alpha_bar(prev)) for t, prev in zip(timesteps, following)]


def ddpm(
    predict: Predict, x: torch.Tensor, steps: Iterable[Step], noise: DrawNoise
) -> torch.Tensor:
    """Ancestral sampling: x_prev ~ N(μ̃(x_t, x̂₀), β̃) with the posterior mean and variance."""
    for step in steps:
        x0, _ = predict(x, step)
        ab, ab_prev = step.alpha_bar, step.alpha_bar_prev
        beta = 1.0 - ab / ab_prev
        coef_x0 = math.sqrt(ab_prev) * beta / (1.0 - ab)
        coef_xt = math.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab)
        x = coef_x0 * x0 + coef_xt * x
        if ab_prev < 1.0:
            x = x + math.sqrt(beta * (1.0 - ab_prev) / (1.0 - ab)) * noise()
    return x


def ddim(
    predict: Predict, x: torch.Tensor, steps: Iterable[Step], noise: DrawNoise, eta: float = 0.0
) -> torch.Tensor:
    """DDIM: x_prev = sqrt(ᾱ_prev) x̂₀ + sqrt(1 − ᾱ_prev − σ²) ε̂ + σ z, σ scaled by η."""
    for step in steps:
        x0, eps = predict(x, step)
        ab, ab_prev = step.alpha_bar, step.alpha_bar_prev
        sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
        direction = math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0))
        x = math.sqrt(ab_prev) * x0 + direction * eps
        if eta > 0:
            x = x + sigma * noise()
    return x


def dpm_solver_pp(predict: Predict, x: torch.Tensor, steps: Iterable[Step]) -> torch.Tensor:
    """DPM-Solver++(2M): exponential-integrator steps in λ = log(α/σ) on the x̂₀ prediction.

    x_next = (σ_next/σ) x − α_next (e^{−h} − 1) D with h = λ_next − λ and D = x̂₀ (first order) or
    (1 + 1/2r) x̂₀ − (1/2r) x̂₀_prev with r = h_prev / h (second order).
    """
    x0_prev: torch.Tensor | None = None
    h_prev = math.nan
    for step in steps:
        x0, _ = predict(x, step)
        if step.alpha_bar_prev >= 1.0:
            x = x0  # a first-order step to σ = 0 lands exactly on x̂₀
            continue
        alpha, sigma = math.sqrt(step.alpha_bar), math.sqrt(1.0 - step.alpha_bar)
        alpha_next = math.sqrt(step.alpha_bar_prev)
        sigma_next = math.sqrt(1.0 - step.alpha_bar_prev)
        # e^{-h} = (α σ_next) / (σ α_next); zero (h = ∞) when starting from pure noise (α = 0).
        decay = alpha * sigma_next / (sigma * alpha_next)
        h = math.inf if decay == 0.0 else -math.log(decay)
        if x0_prev is None:
            d = x0
        else:
            half_inv_r = 0.5 * h / h_prev  # 1 / (2r); 0 after a step that started at α = 0
            d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
        x = (sigma_next / sigma) * x + alpha_next * (1.0 - decay) * d
        x0_prev, h_prev = x0, h
    return x
