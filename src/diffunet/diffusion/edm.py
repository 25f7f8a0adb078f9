"""`EDM`: the preconditioned denoiser, training and samplers of Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models" (Table 1, Algorithms 1 and 2)."""

from __future__ import annotations

import math

import torch

from diffunet.diffusion.continuous import (
    ContinuousProcess,
    SamplingRun,
    TrainingBatch,
    check_number,
    finite,
    positive,
)
from diffunet.diffusion.denoiser import call_model_with_time
from diffunet.diffusion.model_protocol import DenoisingModel
from diffunet.diffusion.objective import per_sample_mse


class EDM(ContinuousProcess):
    """The variance-exploding process x = x₀ + σ·ε with Karras et al.'s preconditioning.

    The denoiser is D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)), F the network:
    c_skip = σ_d² / (σ² + σ_d²), c_out = σ·σ_d / sqrt(σ² + σ_d²), c_in = 1 / sqrt(σ² + σ_d²) and
    c_noise = ¼·ln σ, the network's time input. Training draws ln σ ~ N(P_mean, P_std²) and
    minimises λ(σ)·‖D(x₀ + σε; σ) − x₀‖², λ(σ) = (σ² + σ_d²) / (σ·σ_d)², which makes the
    network's own target unit-variance at every σ. Sampling solves dx/dσ = (x − D(x; σ)) / σ over
    Karras's σ grid.

    Args:
        sigma_data: σ_d, the standard deviation of the data (0.5 for data in [−1, 1]).
        P_mean, P_std: the log-normal training distribution of σ (the paper's −1.2, 1.2).
        sigma_min, sigma_max, rho: the sampling grid σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) −
            σ_max^(1/ρ)))^ρ, i < N, then σ_N = 0 (the paper's 0.002, 80, 7).
        S_churn, S_min, S_max, S_noise: the stochastic sampler of Algorithm 2: at each σ_i in
            [S_min, S_max], noise is added to raise σ by the factor 1 + min(S_churn/N, √2 − 1),
            scaled by S_noise. S_churn = 0 (the default) is the deterministic Algorithm 1.
        cond_drop_prob: probability of training a sample unconditionally (labels → null label,
            context and added_cond → zeros) for classifier-free guidance, as in `Diffusion`.
    """

    SAMPLERS = ("heun", "euler")
    DEFAULT_SAMPLER = "heun"
    DEFAULT_STEPS = 18  # the paper's CIFAR-10 setting: 35 network evaluations with Heun
    TIME_NAME = "sigma"
    TIMES_RANGE = "sigma > 0"

    def __init__(
        self,
        sigma_data: float = 0.5,
        *,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        S_churn: float = 0.0,
        S_min: float = 0.0,
        S_max: float = math.inf,
        S_noise: float = 1.0,
        cond_drop_prob: float = 0.0,
    ) -> None:
        super().__init__(cond_drop_prob)
        self.sigma_data = check_number(
            "sigma_data", sigma_data, "a positive number (0.5 for data in [-1, 1])", positive
        )
        self.P_mean = check_number("P_mean", P_mean, "a finite number (the paper's -1.2)", finite)
        self.P_std = check_number("P_std", P_std, "a positive number (the paper's 1.2)", positive)
        self.sigma_min = check_number(
            "sigma_min", sigma_min, "a positive number (the paper's 0.002)", positive
        )
        self.sigma_max = check_number(
            "sigma_max",
            sigma_max,
            f"a number above sigma_min={self.sigma_min} (the paper's 80)",
            lambda v: math.isfinite(v) and v > self.sigma_min,
        )
        self.rho = check_number("rho", rho, "a positive number (the paper's 7)", positive)
        self.S_churn = check_number(
            "S_churn", S_churn, "a finite number >= 0 (0: deterministic sampling)", _non_negative
        )
        self.S_min = check_number("S_min", S_min, "a number >= 0", lambda v: v >= 0)
        self.S_max = check_number(
            "S_max",
            S_max,
            f"a number >= S_min={self.S_min} (inf: no bound)",
            lambda v: v >= self.S_min,
        )
        self.S_noise = check_number(
            "S_noise", S_noise, "a finite number >= 0 (1: the paper's default)", _non_negative
        )

    def __repr__(self) -> str:
        return (
            f"EDM(sigma_data={self.sigma_data}, P_mean={self.P_mean}, P_std={self.P_std}, "
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho}, "
            f"S_churn={self.S_churn}, S_min={self.S_min}, S_max={self.S_max}, "
            f"S_noise={self.S_noise}, cond_drop_prob={self.cond_drop_prob})"
        )

    # ------------------------------------------------------------------ the denoiser
    def preconditioning(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) at `sigma` (Karras et al. 2022, Table 1), elementwise."""
        var = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / var
        c_out = sigma * self.sigma_data / var.sqrt()
        c_in = var.rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_d²) / (σ·σ_d)², elementwise."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_training_times(
        self, batch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`batch` noise levels σ with ln σ ~ N(P_mean, P_std²); float32 `(batch,)` on the
        generator's device (the CPU by default)."""
        device = generator.device if generator is not None else torch.device("cpu")
        n = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
        return torch.exp(self.P_mean + self.P_std * n)

    def default_grid(self, steps: int) -> torch.Tensor:
        """Karras's `steps` noise levels from σ_max down to σ_min, then 0 (float64)."""
        if steps == 1:
            return torch.tensor([self.sigma_max, 0.0], dtype=torch.float64)
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigmas = (hi + i / (steps - 1) * (lo - hi)) ** self.rho
        return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])

    def _times_valid(self, times: torch.Tensor) -> bool:
        return bool((torch.isfinite(times) & (times > 0)).all())

    # ------------------------------------------------------------------ training
    def _batch_loss(self, model: DenoisingModel, b: TrainingBatch) -> torch.Tensor:
        """The mean over the batch of λ(σ)·mean‖D(x₀ + σε; σ) − x₀‖²."""
        sigma = b.times.reshape(-1, *([1] * (b.x0.ndim - 1)))
        x = b.x0 + sigma * b.noise
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        output = call_model_with_time(model, c_in * x, c_noise.flatten(), **b.conditioning())
        denoised = c_skip * x + c_out * output
        return (self.loss_weight(b.times) * per_sample_mse(denoised, b.x0)).mean()

    # ------------------------------------------------------------------ sampling
    def _integrate(self, run: SamplingRun, clip_denoised: bool) -> torch.Tensor:
        """Follow dx/dσ = (x − D(x; σ)) / σ from σ_0·ε down the σ grid to 0, adding noise first
        at each step when `S_churn > 0` (Algorithm 2).

        ``"heun"`` is Algorithm 1: a second-order correction on every step but the last, to
        σ = 0 (2·steps − 1 model calls); ``"euler"`` calls the model once per step.
        `clip_denoised` clips D(x; σ) to [−1, 1] at each evaluation. The default grid is
        `steps` (18) σ values of the Karras grid of `sigma_min`, `sigma_max`, `rho`, then 0.
        """
        sigmas = run.grid
        x = sigmas[0] * run.noise
        batch, device = x.shape[0], x.device
        steps_taken = len(sigmas) - 1

        def derivative(x: torch.Tensor, sigma: float) -> torch.Tensor:
            """(x − D(x; σ)) / σ."""
            c_skip, c_out, c_in, c_noise = (
                float(c) for c in self.preconditioning(torch.tensor(sigma, dtype=torch.float64))
            )
            # Made on the device: a copy from the host would wait for the GPU to finish.
            time = torch.full((batch,), c_noise, dtype=torch.float32, device=device)
            denoised = c_skip * x + c_out * run.guided(c_in * x, time)
            if clip_denoised:
                denoised = denoised.clamp(-1.0, 1.0)
            return (x - denoised) / sigma

        for i in run.steps:
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            gamma = (
                min(self.S_churn / steps_taken, math.sqrt(2.0) - 1.0)
                if self.S_churn > 0 and self.S_min <= sigma <= self.S_max
                else 0.0
            )
            sigma_hat = sigma * (1.0 + gamma)
            if gamma > 0:
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * self.S_noise * run.draw()
            d = derivative(x, sigma_hat)
            x_next = x + (sigma_next - sigma_hat) * d
            if run.sampler == "heun" and sigma_next > 0:
                x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + derivative(x_next, sigma_next))
            x = x_next
        return x


def _non_negative(v: float) -> bool:
    return math.isfinite(v) and v >= 0
