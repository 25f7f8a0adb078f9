"""`FlowMatching`: rectified-flow training and ODE sampling (Liu et al. 2023; Lipman et al. 2023),
with the time distributions and time shift of Stable Diffusion 3 (Esser et al. 2024)."""

from __future__ import annotations

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
from diffunet.errors import InvalidValueError

#: How `FlowMatching.loss` draws t: uniform in [0, 1], or SD3's logit-normal.
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


class FlowMatching(ContinuousProcess):
    """Flow matching on the straight path x_t = (1 − t)·x₀ + t·ε, t ∈ [0, 1] (data at 0, noise at 1).

    The network predicts the velocity v = dx_t/dt = ε − x₀ and receives `t · time_scale` as its
    time input. Training regresses v with a plain MSE at t drawn from `time_distribution`, then
    shifted; sampling integrates dx/dt = v from t = 1 to 0 with Euler or Heun steps.

    Args:
        time_distribution: ``"logit_normal"`` (t = sigmoid(m + s·n), n ~ N(0, 1): SD3's
            best choice, which favours middle times) or ``"uniform"``.
        m, s: location and scale of the logit-normal (SD3's rf/lognorm(0.00, 1.00)).
        shift: SD3's time shift t' = shift·t / (1 + (shift − 1)·t), applied to the training
            times and to the sampling grid alike; above 1 it spends more steps at high noise
            (SD3 uses 3.0 at 1024²); 1.0 leaves t unchanged.
        time_scale: the factor from t to the network's time input (1000, as in diffusers' SD3, so
            a timestep embedding sees the familiar range).
        cond_drop_prob: probability of training a sample unconditionally (labels → null label,
            context and added_cond → zeros) for classifier-free guidance, as in `Diffusion`.
    """

    SAMPLERS = ("euler", "heun")
    DEFAULT_SAMPLER = "euler"
    DEFAULT_STEPS = 28  # diffusers' StableDiffusion3Pipeline
    TIME_NAME = "t"
    TIMES_RANGE = "t in [0, 1]: 0 is data, 1 is noise"

    def __init__(
        self,
        time_distribution: str = "logit_normal",
        *,
        m: float = 0.0,
        s: float = 1.0,
        shift: float = 1.0,
        time_scale: float = 1000.0,
        cond_drop_prob: float = 0.0,
    ) -> None:
        super().__init__(cond_drop_prob)
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise InvalidValueError(
                f"time_distribution={time_distribution!r} is invalid: expected one of "
                f"{TIME_DISTRIBUTIONS} ('logit_normal' is SD3's choice)"
            )
        self.time_distribution = time_distribution
        self.m = check_number(
            "m", m, "a finite number (the logit-normal's location, 0 in SD3)", finite
        )
        self.s = check_number(
            "s", s, "a positive number (the logit-normal's scale, 1 in SD3)", positive
        )
        self.shift = check_number(
            "shift", shift, "a positive number (1.0: no shift; SD3 uses 3.0 at 1024²)", positive
        )
        self.time_scale = check_number(
            "time_scale", time_scale, "a positive number (1000: t in [0, 1000])", positive
        )

    def __repr__(self) -> str:
        return (
            f"FlowMatching(time_distribution={self.time_distribution!r}, m={self.m}, s={self.s}, "
            f"shift={self.shift}, time_scale={self.time_scale}, "
            f"cond_drop_prob={self.cond_drop_prob})"
        )

    # ------------------------------------------------------------------ the path
    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        """SD3's time shift shift·t / (1 + (shift − 1)·t): 0 and 1 stay, the rest moves up for
        shift > 1."""
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def sample_training_times(
        self, batch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`batch` times t ∈ [0, 1] from `time_distribution`, shifted; float32 `(batch,)` on the
        generator's device (the CPU by default)."""
        device = generator.device if generator is not None else torch.device("cpu")
        if self.time_distribution == "uniform":
            u = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
        else:
            n = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
            u = torch.sigmoid(self.m + self.s * n)
        return self.shifted(u)

    def default_grid(self, steps: int) -> torch.Tensor:
        """The `steps + 1` times a sampler visits: t uniform from 1 to 0, shifted (float64)."""
        u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return self.shifted(u)

    def _times_valid(self, times: torch.Tensor) -> bool:
        return bool(((times >= 0) & (times <= 1)).all())

    def _grid_valid(self, grid: torch.Tensor) -> str | None:
        if abs(float(grid[0]) - 1.0) > 1e-6:
            return f"a first value of 1 (pure noise), got {float(grid[0])}"
        return None

    # ------------------------------------------------------------------ training
    def _batch_loss(self, model: DenoisingModel, b: TrainingBatch) -> torch.Tensor:
        """mean ‖F(x_t, t·time_scale) − (ε − x₀)‖² over the batch and every element."""
        t = b.times.reshape(-1, *([1] * (b.x0.ndim - 1)))
        x_t = (1.0 - t) * b.x0 + t * b.noise
        output = call_model_with_time(model, x_t, b.times * self.time_scale, **b.conditioning())
        return per_sample_mse(output, b.noise - b.x0).mean()

    # ------------------------------------------------------------------ sampling
    def _integrate(self, run: SamplingRun, clip_denoised: bool) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from ε at t = 1 down the grid to t = 0.

        ``"euler"`` calls the model once per step; ``"heun"`` takes Heun's second-order step,
        two calls per step, the last one included: the velocity at t = 0 is defined, unlike
        EDM's derivative at σ = 0, and an Euler step to t = 0 from the last, widest-spaced
        point of a uniform grid would cost the method its order. `clip_denoised` clips the
        predicted x̂₀ = x − t·v to [−1, 1] at each step (v then recomputed from it). The
        default grid is `steps` (28) uniform t values from 1 to 0, shifted by `shift`.
        """
        x = run.noise
        batch, device = x.shape[0], x.device

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            # Made on the device: a copy from the host would wait for the GPU to finish.
            time = torch.full((batch,), t * self.time_scale, dtype=torch.float32, device=device)
            v = run.guided(x, time)
            if clip_denoised and t > 0:  # at t = 0 the prediction x̂₀ is x itself
                v = (x - (x - t * v).clamp(-1.0, 1.0)) / t
            return v

        grid_t = run.grid
        for i in run.steps:
            t, t_next = grid_t[i], grid_t[i + 1]
            v = velocity(x, t)
            x_next = x + (t_next - t) * v
            if run.sampler == "heun":
                x_next = x + (t_next - t) * 0.5 * (v + velocity(x_next, t_next))
            x = x_next
        return x
