"""Noise schedules: the table of ᾱ_t (`alphas_cumprod`) that defines a variance-preserving diffusion.

`x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε` for the discrete steps `t = 0 .. T-1`; ᾱ decreases from
close to 1 (almost clean) to close to 0 (almost pure noise). Tables are float64 so that the
coefficients the samplers derive from them are exact to float32 precision.

Four families:

- ``linear``: DDPM (Ho et al. 2020), β linear from 1e-4 to 0.02 at T = 1000. For other T the
  endpoints are scaled by 1000 / T (improved DDPM's convention) so the noise reached at the last
  step does not depend on T.
- ``scaled-linear``: Latent / Stable Diffusion's, √β linear from √0.00085 to √0.012 at
  T = 1000 (diffusers' "scaled_linear"), endpoints scaled by 1000 / T like ``linear``'s.
- ``cosine``: improved DDPM (Nichol & Dhariwal 2021), ᾱ(u) = cos²((u + s) / (1 + s) · π/2)
  normalised to ᾱ(0) = 1, with s = 0.008 and β capped at 0.999.
- ``sigmoid``: Chen 2023 ("On the importance of noise scheduling"), ᾱ(u) = (σ(end/τ) −
  σ((u (end − start) + start)/τ)) / (σ(end/τ) − σ(start/τ)) with start −3, end 3, τ 1, built like
  the cosine table. (Not diffusers' "sigmoid", which is GeoDiff's sigmoid-shaped β.)

Continuous noise levels (EMDiffuse / Palette / SR3 "gamma"): :meth:`NoiseSchedule.sample_noise_levels`
draws ᾱ uniformly between the table values of adjacent steps, so a noise-level model trains on
a continuum of noise levels and is sampled at the table's values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffunet.errors import InvalidValueError

SCHEDULES = ("linear", "scaled-linear", "cosine", "sigmoid")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
MAX_BETA = 0.999


def linear_alphas_cumprod(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """ᾱ of the DDPM linear-β schedule (endpoints given for T = 1000, scaled by 1000 / T)."""
    scale = 1000.0 / timesteps
    betas = torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas.clamp(max=MAX_BETA), dim=0)


def scaled_linear_alphas_cumprod(
    timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """ᾱ of Stable Diffusion's schedule: √β linear between the square roots of the endpoints
    (given for T = 1000, scaled by 1000 / T as in :func:`linear_alphas_cumprod`)."""
    scale = 1000.0 / timesteps
    roots = torch.linspace(
        math.sqrt(beta_start * scale), math.sqrt(beta_end * scale), timesteps, dtype=torch.float64
    )
    return torch.cumprod(1.0 - (roots**2).clamp(max=MAX_BETA), dim=0)


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Continuous ᾱ(u), u ∈ [0, 1], of the improved-DDPM cosine schedule."""
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def sigmoid_alpha_bar(
    u: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """Continuous ᾱ(u), u ∈ [0, 1], of Chen's (2023) sigmoid schedule."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)


def alphas_cumprod_from_alpha_bar(
    alpha_bar: Callable[[torch.Tensor], torch.Tensor], timesteps: int, max_beta: float = MAX_BETA
) -> torch.Tensor:
    """Discretise a continuous ᾱ(u) into T steps: β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta)."""
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    values = alpha_bar(u)
    betas = (1.0 - values[1:] / values[:-1]).clamp(0.0, max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ) so the last step has ᾱ = 0 (SNR 0) and the first keeps its value.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


class NoiseSchedule:
    """A discrete variance-preserving noise schedule: `alphas_cumprod[t]` = ᾱ_t for t = 0 .. T-1."""

    def __init__(self, alphas_cumprod: torch.Tensor, name: str = "custom") -> None:
        values = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if values.ndim != 1 or values.numel() < 1:
            raise InvalidValueError(
                f"alphas_cumprod must be a non-empty 1-D sequence, got shape {tuple(values.shape)}"
            )
        if not (values[0] < 1.0 and values.min() >= 0.0):
            raise InvalidValueError(
                "alphas_cumprod must lie in [0, 1) (ᾱ_0 < 1: step 0 already adds some noise); got "
                f"range [{values.min().item():.6g}, {values.max().item():.6g}]"
            )
        if (values[1:] > values[:-1]).any():
            raise InvalidValueError(
                "alphas_cumprod must be non-increasing (later steps are noisier)"
            )
        self.alphas_cumprod = values
        self.name = name
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def create(
        cls, name: str, timesteps: int = 1000, *, zero_terminal_snr: bool = False
    ) -> NoiseSchedule:
        """The named schedule (`linear`, `scaled-linear`, `cosine` or `sigmoid`) with
        `timesteps` steps."""
        if name not in SCHEDULES:
            raise InvalidValueError(
                f"unknown noise schedule {name!r}; expected one of {SCHEDULES}. Use 'cosine' "
                "(a good default), 'linear' (DDPM), 'scaled-linear' (Stable Diffusion) or "
                "'sigmoid', or pass a NoiseSchedule"
            )
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 2:
            raise InvalidValueError(
                f"timesteps={timesteps!r} is invalid: expected an integer >= 2 (the number of "
                "discrete diffusion steps T; 1000 is usual)"
            )
        if name == "linear":
            alphas_cumprod = linear_alphas_cumprod(timesteps)
        elif name == "scaled-linear":
            alphas_cumprod = scaled_linear_alphas_cumprod(timesteps)
        elif name == "cosine":
            alphas_cumprod = alphas_cumprod_from_alpha_bar(cosine_alpha_bar, timesteps)
        else:
            alphas_cumprod = alphas_cumprod_from_alpha_bar(sigmoid_alpha_bar, timesteps)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
            name += "+zero_terminal_snr"
        return cls(alphas_cumprod, name)

    def __len__(self) -> int:
        return self.alphas_cumprod.numel()

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, timesteps={len(self)})"

    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete steps."""
        return len(self)

    @property
    def betas(self) -> torch.Tensor:
        """β_t = 1 − ᾱ_t / ᾱ_{t−1} (with ᾱ_{−1} = 1)."""
        previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / previous

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ / (1 − ᾱ) per step."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise level in the variance-exploding view, σ = sqrt((1 − ᾱ) / ᾱ) per step."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def has_zero_terminal_snr(self) -> bool:
        """Whether the last step is pure noise (ᾱ_{T−1} = 0)."""
        return bool(self.alphas_cumprod[-1] == 0.0)

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t for one step index; `t = -1` (before the first step, clean data) gives 1."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at (possibly fractional) step indices `t`, linearly interpolated; float64, t's shape."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        table = self._padded_on(torch.device("cpu"))
        position = (t + 1.0).clamp(0.0, float(len(self)))
        low = position.floor().long().clamp(max=len(self) - 1)
        frac = position - low
        return table[low] * (1.0 - frac) + table[(low + 1).clamp(max=len(self))] * frac

    def alphas_cumprod_on(self, device: torch.device | str) -> torch.Tensor:
        """`alphas_cumprod` on `device`, copied there once.

        A host → GPU copy waits for the GPU to finish its queued work; the training loss needs
        the table every step, so it is cached per device (with the padded table below).
        """
        return self._tables_on(torch.device(device))[0]

    def _padded_on(self, device: torch.device) -> torch.Tensor:
        """`[1, *alphas_cumprod]` (ᾱ before the first step is 1) on `device`, cached."""
        return self._tables_on(device)[1]

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
            self._on_device[device] = (self.alphas_cumprod.to(device), padded.to(device))
        return self._on_device[device]

    def sample_noise_levels(
        self, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Continuous ᾱ drawn uniformly between ᾱ_t and ᾱ_{t−1} (Palette / EMDiffuse training).

        `t` holds integer step indices; the result is float64 with `t`'s shape and device. The
        uniform draw comes from `generator` (on its device), else from `t`'s device's RNG.
        """
        t = t.long()
        table = self._padded_on(t.device)
        upper, lower = table[t], table[t + 1]
        source = generator.device if generator is not None else t.device
        u = torch.rand(t.shape, generator=generator, dtype=torch.float64, device=source)
        if u.device != t.device and t.is_cuda:  # a CPU generator's draws: copy without waiting
            u = u.pin_memory().to(t.device, non_blocking=True)
        return lower + (upper - lower) * u.to(t.device)

    def timesteps_for(self, steps: int, spacing: str = "trailing") -> list[int]:
        """The descending step indices a `steps`-step sampler visits.

        ``trailing`` starts at the last step T−1 and strides T / steps (recommended by Lin et al.;
        required with zero terminal SNR); ``leading`` is diffusers' default for DDIM
        (0, T//steps, ... reversed); ``linspace`` spreads steps evenly over [0, T−1].
        """
        total = len(self)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
            raise InvalidValueError(
                f"steps={steps!r} is invalid: expected an integer in [1, {total}] (this schedule "
                f"has {total} steps). Use e.g. steps=50 for DDIM, 20 for dpm++, or {total} for "
                "full DDPM; or build the Diffusion with more timesteps"
            )
        if spacing == "trailing":
            ratio = total / steps
            return [round(total - i * ratio) - 1 for i in range(steps)]
        if spacing == "leading":
            ratio = total // steps
            return [i * ratio for i in reversed(range(steps))]
        if spacing == "linspace":
            if steps == 1:
                return [total - 1]
            return [round(i * (total - 1) / (steps - 1)) for i in reversed(range(steps))]
        raise InvalidValueError(
            f"unknown timestep_spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}"
        )
