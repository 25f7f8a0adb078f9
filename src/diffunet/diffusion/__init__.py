"""The diffusion layer: turns any denoiser (a :class:`diffunet.UNet` or a plain callable) into a
trainable, sampleable diffusion model.

    from diffunet.diffusion import Diffusion
    diffusion = Diffusion(schedule="cosine", prediction="v", min_snr_gamma=5.0)
    loss = diffusion.loss(model, x0)                       # training
    x = diffusion.sample(model, (16, 3, 32, 32), sampler="dpm++", steps=20)

`FlowMatching` (rectified flow, SD3's time sampling) and `EDM` (Karras et al. 2022) are the
continuous-time processes beside it, with the same `loss` and `sample`.
"""

from diffunet.diffusion.denoiser import (
    Denoiser,
    GuidedModel,
    call_model,
    call_model_with_time,
    time_input,
    uses_noise_level,
)
from diffunet.diffusion.edm import EDM
from diffunet.diffusion.flow import TIME_DISTRIBUTIONS, FlowMatching
from diffunet.diffusion.guidance import drop_conditioning, guide
from diffunet.diffusion.model_protocol import (
    ClassConditionalDenoiser,
    ConfiguredDenoiser,
    DenoiserConfig,
    DenoiserTraits,
    DenoisingModel,
    traits_of,
)
from diffunet.diffusion.objective import min_snr_weight, per_sample_gaussian_nll, per_sample_mse
from diffunet.diffusion.parameterization import PREDICTIONS, convert, from_x0_and_eps, x0_and_eps
from diffunet.diffusion.process import Diffusion, draw_noise
from diffunet.diffusion.processes import (
    DEFAULT_PROCESS,
    DEFAULT_SAMPLERS,
    PROCESSES,
    default_steps,
    make_process,
)
from diffunet.diffusion.samplers import SAMPLERS, Step, ddim, ddpm, dpm_solver_pp
from diffunet.diffusion.schedule import (
    SCHEDULES,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    rescale_zero_terminal_snr,
)
from diffunet.diffusion.scheduler_protocol import is_scheduler

__all__ = [
    "DEFAULT_PROCESS",
    "DEFAULT_SAMPLERS",
    "EDM",
    "PREDICTIONS",
    "PROCESSES",
    "SAMPLERS",
    "SCHEDULES",
    "TIMESTEP_SPACINGS",
    "TIME_DISTRIBUTIONS",
    "ClassConditionalDenoiser",
    "ConfiguredDenoiser",
    "Denoiser",
    "DenoiserConfig",
    "DenoiserTraits",
    "DenoisingModel",
    "Diffusion",
    "FlowMatching",
    "GuidedModel",
    "NoiseSchedule",
    "Step",
    "call_model",
    "call_model_with_time",
    "convert",
    "ddim",
    "ddpm",
    "default_steps",
    "dpm_solver_pp",
    "draw_noise",
    "drop_conditioning",
    "from_x0_and_eps",
    "guide",
    "is_scheduler",
    "make_process",
    "min_snr_weight",
    "per_sample_gaussian_nll",
    "per_sample_mse",
    "rescale_zero_terminal_snr",
    "time_input",
    "traits_of",
    "uses_noise_level",
    "x0_and_eps",
]
