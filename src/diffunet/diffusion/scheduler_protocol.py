"""Sampling with any object that speaks the diffusers scheduler protocol, without importing diffusers.

The protocol: `set_timesteps(steps, device=...)`, `timesteps`, `init_noise_sigma`,
`scale_model_input(x, t)` and `step(model_output, t, x, ...).prev_sample`. The scheduler decides
the update; we supply the model output, converted to the scheduler's `prediction_type` when it
differs from the model's, and our generator (so the scheduler's noise comes from the same seed).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from diffunet.diffusion.parameterization import convert
from diffunet.diffusion.schedule import NoiseSchedule
from diffunet.errors import InvalidValueError

PROTOCOL = ("set_timesteps", "scale_model_input", "step", "init_noise_sigma")
_PREDICTION_NAMES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def is_scheduler(obj) -> bool:
    """Whether `obj` has every attribute of the diffusers scheduler protocol."""
    return not isinstance(obj, str) and all(hasattr(obj, name) for name in PROTOCOL)


def scheduler_prediction(scheduler) -> str | None:
    """The scheduler's prediction type in our names ('eps', 'x0', 'v'), or None if unstated."""
    name = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if name is None:
        return None
    if name not in _PREDICTION_NAMES:
        raise InvalidValueError(
            f"the scheduler's prediction_type {name!r} is not one of {tuple(_PREDICTION_NAMES)}"
        )
    return _PREDICTION_NAMES[name]


def scheduler_alphas_cumprod(scheduler, schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule the scheduler noises with: its own `alphas_cumprod` if it has one, else ours.

    Warns when the scheduler's table differs from the model's training schedule.
    """
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        return schedule
    table = torch.as_tensor(table, dtype=torch.float64).cpu()
    if table.shape != schedule.alphas_cumprod.shape:
        raise InvalidValueError(
            f"the scheduler has {table.numel()} training timesteps but this Diffusion has "
            f"{len(schedule)}; build the scheduler with num_train_timesteps={len(schedule)}"
        )
    if (table - schedule.alphas_cumprod).abs().max() > 1e-4:
        warnings.warn(
            "the scheduler's alphas_cumprod differ from this Diffusion's schedule "
            f"({schedule.name}); samples will not match the training noise levels. Build the "
            "scheduler with trained_betas=diffusion.schedule.betas",
            stacklevel=3,
        )
    if bool(table[0] >= 1.0):
        return schedule
    return NoiseSchedule(table, "scheduler")


def sample_with_scheduler(
    scheduler,
    output: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    prediction: str,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    progress: Callable = iter,
) -> torch.Tensor:
    """Run `scheduler` from `noise` (standard normal) for `steps` steps.

    `output(x, t, alpha_bar)` is the (guided) model output of kind `prediction` for `(B,)` step
    indices and noise levels; `progress` wraps the timestep iterable (e.g. a tqdm bar).
    """
    total = getattr(getattr(scheduler, "config", None), "num_train_timesteps", len(schedule))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise InvalidValueError(
            f"steps={steps!r} is invalid for this scheduler: expected an integer in [1, {total}]"
        )
    device = noise.device
    if "device" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(steps, device=device)
    else:
        scheduler.set_timesteps(steps)
    table = scheduler_alphas_cumprod(scheduler, schedule)
    target = scheduler_prediction(scheduler) or prediction
    step_parameters = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "generator" in step_parameters:
        step_kwargs["generator"] = generator
    if "eta" in step_parameters:
        step_kwargs["eta"] = eta
    x = noise * scheduler.init_noise_sigma
    batch = x.shape[0]
    for t in progress(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        t_batch = torch.as_tensor(t).reshape(1).expand(batch).cpu()
        alpha_bar = table.alpha_bar_at(t_batch.double())
        out = output(model_input, t_batch, alpha_bar)
        out = convert(out, prediction, target, model_input, alpha_bar)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x
