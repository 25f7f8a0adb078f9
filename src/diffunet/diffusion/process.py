"""`Diffusion`: the Gaussian diffusion process that trains any denoiser and samples from it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from diffunet.diffusion.denoiser import Denoiser, call_model
from diffunet.diffusion.guidance import dropped_for_training
from diffunet.diffusion.model_protocol import DenoisingModel, model_parameters, traits_of
from diffunet.diffusion.objective import min_snr_weight, per_sample_gaussian_nll, per_sample_mse
from diffunet.diffusion.parameterization import check_prediction, from_x0_and_eps
from diffunet.diffusion.samplers import SAMPLERS, ddim, ddpm, dpm_solver_pp, steps_from_timesteps
from diffunet.diffusion.schedule import TIMESTEP_SPACINGS, NoiseSchedule
from diffunet.diffusion.scheduler_protocol import PROTOCOL, is_scheduler, sample_with_scheduler
from diffunet.errors import InvalidTypeError, InvalidValueError
from diffunet.model.unet import split_aleatoric
from diffunet.model.validation import check_labels


def draw_noise(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device (the CPU by default).

    Drawing on the CPU and moving the result makes one seed give the same samples on any device.
    """
    source = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=source, dtype=torch.float32)
    return noise.to(device)


def training_noise(
    noise: object, x0: torch.Tensor, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """The float32 noise of a training batch on `device`: `noise` as given, checked against
    `x0`'s shape, or drawn (by `draw_noise` when a generator is given)."""
    if noise is None:
        noise = (
            draw_noise(x0.shape, generator, device)
            if generator is not None
            else torch.randn_like(x0)
        )
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(x0.shape):
        given = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise InvalidValueError(f"noise has shape {given}, expected x0's shape {tuple(x0.shape)}")
    return noise.to(device=device, dtype=torch.float32)


def with_cuda_graph(
    model: DenoisingModel, cuda_graph: bool | str, device: torch.device
) -> DenoisingModel:
    """`model` wrapped in its (cached) :class:`~diffunet.accel.cuda_graph.CUDAGraphModel` when
    wanted; a `UNet` sampled on a GPU is first accelerated in place (`diffunet.accelerate`)."""
    from diffunet.accel import accelerate
    from diffunet.accel.cuda_graph import CACHE_ATTRIBUTE, CUDAGraphModel
    from diffunet.model.unet import UNet

    if cuda_graph not in (True, False, "auto"):
        raise InvalidValueError(
            f"cuda_graph={cuda_graph!r} is invalid: expected True, False or 'auto'"
        )
    if device.type == "cuda" and isinstance(model, UNet):
        accelerate(model)
    wanted = cuda_graph is True or (cuda_graph == "auto" and isinstance(model, UNet))
    if not wanted or device.type != "cuda" or isinstance(model, CUDAGraphModel):
        return model
    if not isinstance(model, torch.nn.Module):
        raise InvalidValueError("cuda_graph=True needs an nn.Module model; pass cuda_graph=False")
    graphed = model.__dict__.get(CACHE_ATTRIBUTE)
    if graphed is None:
        graphed = CUDAGraphModel(model)
        model.__dict__[CACHE_ATTRIBUTE] = graphed
    return graphed


def model_device(model: DenoisingModel, fallback: torch.device | str = "cpu") -> torch.device:
    """Device of the model's first parameter, else `fallback`."""
    for p in model_parameters(model):
        return p.device
    return torch.device(fallback)


class Diffusion:
    """A variance-preserving Gaussian diffusion: noise schedule, parameterisation, loss, samplers.

    Args:
        schedule: ``"cosine"``, ``"linear"`` or ``"sigmoid"``, or a :class:`NoiseSchedule`.
        timesteps: number of discrete steps T (default 1000; a NoiseSchedule brings its own).
        prediction: what the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        min_snr_gamma: γ of min-SNR loss weighting (5 is usual); None for the plain loss.
        zero_terminal_snr: rescale the schedule so the last step is pure noise (needs ``"v"`` or
            ``"x0"``; ε cannot be turned into x₀ at zero signal).
        cond_drop_prob: probability of training a sample unconditionally (labels → null label,
            context and added_cond → zeros) so classifier-free guidance can be used at sampling
            time.
        clip_denoised: clip predicted x₀ to the data range [−1, 1] while sampling.
        timestep_spacing: which steps a sampler with fewer steps than T visits: ``"trailing"``
            (starts at T−1), ``"leading"`` or ``"linspace"`` (diffusers' names).
    """

    def __init__(
        self,
        schedule: str | NoiseSchedule = "cosine",
        timesteps: int | None = None,
        prediction: str = "eps",
        min_snr_gamma: float | None = None,
        zero_terminal_snr: bool = False,
        cond_drop_prob: float = 0.0,
        *,
        clip_denoised: bool = True,
        timestep_spacing: str = "trailing",
    ) -> None:
        if isinstance(schedule, NoiseSchedule):
            if timesteps is not None and timesteps != len(schedule):
                raise InvalidValueError(
                    f"timesteps={timesteps} disagrees with the given NoiseSchedule of "
                    f"{len(schedule)} steps; leave timesteps=None"
                )
            if zero_terminal_snr and not schedule.has_zero_terminal_snr:
                raise InvalidValueError(
                    "zero_terminal_snr=True with a ready-made NoiseSchedule: build it with "
                    "NoiseSchedule.create(..., zero_terminal_snr=True) instead"
                )
            self.schedule = schedule
        elif isinstance(schedule, str):
            self.schedule = NoiseSchedule.create(
                schedule,
                1000 if timesteps is None else timesteps,
                zero_terminal_snr=zero_terminal_snr,
            )
        else:
            raise InvalidTypeError(
                f"schedule must be a name {('linear', 'cosine', 'sigmoid')} or a NoiseSchedule, "
                f"got {type(schedule).__name__}"
            )
        self.prediction = check_prediction(prediction)
        if self.prediction == "eps" and self.schedule.has_zero_terminal_snr:
            raise InvalidValueError(
                "prediction='eps' cannot be used with a zero-terminal-SNR schedule: at the last "
                "step x_t is pure noise and x₀ = (x_t − sqrt(1−ᾱ) ε) / sqrt(ᾱ) divides by zero. "
                "Use prediction='v' (recommended by Lin et al.) or 'x0'"
            )
        if min_snr_gamma is not None and not (
            isinstance(min_snr_gamma, (int, float)) and min_snr_gamma > 0
        ):
            raise InvalidValueError(
                f"min_snr_gamma={min_snr_gamma!r} is invalid: expected None (no weighting) or a "
                "positive number (5 is the usual choice)"
            )
        if not isinstance(cond_drop_prob, (int, float)) or not 0.0 <= cond_drop_prob <= 1.0:
            raise InvalidValueError(
                f"cond_drop_prob={cond_drop_prob!r} is invalid: expected a probability in [0, 1] "
                "(0.1 is usual for classifier-free guidance; 0 disables it)"
            )
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise InvalidValueError(
                f"timestep_spacing={timestep_spacing!r} is invalid: expected one of "
                f"{TIMESTEP_SPACINGS}"
            )
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self.cond_drop_prob = float(cond_drop_prob)
        self.clip_denoised = bool(clip_denoised)
        self.timestep_spacing = timestep_spacing

    def __repr__(self) -> str:
        return (
            f"Diffusion(schedule={self.schedule.name!r}, timesteps={self.num_timesteps}, "
            f"prediction={self.prediction!r}, min_snr_gamma={self.min_snr_gamma}, "
            f"cond_drop_prob={self.cond_drop_prob}, clip_denoised={self.clip_denoised})"
        )

    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete steps of the schedule."""
        return len(self.schedule)

    # ------------------------------------------------------------------ forward process
    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor | float
    ) -> torch.Tensor:
        """x_t = sqrt(ᾱ) x₀ + sqrt(1 − ᾱ) ε for a float ᾱ or a `(B,)` tensor of them."""
        if isinstance(alpha_bar, torch.Tensor):
            ab = alpha_bar.to(device=x0.device, dtype=torch.float64)
            ab = ab.reshape(-1, *([1] * (x0.ndim - 1)))
            return ab.sqrt().to(x0.dtype) * x0 + (1.0 - ab).sqrt().to(x0.dtype) * noise
        return math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * noise

    # ------------------------------------------------------------------ training
    def loss(
        self,
        model: DenoisingModel,
        x0: torch.Tensor,
        *,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss of `model` on a batch of clean data `x0` (in [−1, 1]): a float32 scalar.

        Draws a step t per sample (uniform; a continuous noise level between steps t−1 and t for
        noise-level models), noises `x0`, and regresses the model's prediction on its target: MSE,
        or the Gaussian NLL for an aleatoric model, optionally min-SNR-weighted. `added_cond`
        `(B, D)` and `time_ids` `(B, n)` are SDXL's added conditioning (see `sample`), passed to
        the model only when given. Conditioning is dropped with probability `cond_drop_prob`:
        labels, context and added_cond of a sample together (time_ids and an image cond stay);
        a dropped context or added_cond becomes `null_context` / `null_added_cond` (zeros by
        default; `(1, ...)` or the batch's shape), as `sample`'s unconditional pass takes them.
        `timesteps` `(B,)` and `noise` (x0's shape) fix the otherwise random draws;
        `generator` seeds them.
        """
        self._check_batch(
            x0,
            "x0",
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
        )
        traits = traits_of(model)
        if labels is not None:  # the range only on the CPU, or while value checks are on
            check_labels(labels, traits.num_classes)
        batch, device = x0.shape[0], x0.device
        x0 = x0.float()
        if timesteps is None:
            timesteps = torch.randint(
                0,
                self.num_timesteps,
                (batch,),
                generator=generator,
                device=generator.device if generator is not None else "cpu",
            )
        timesteps = self._check_timesteps(timesteps, batch).to(device)
        if traits.noise_level:
            alpha_bar = self.schedule.sample_noise_levels(timesteps, generator)
        else:
            alpha_bar = self.schedule.alphas_cumprod_on(device)[timesteps]
        noise = training_noise(noise, x0, generator, device)
        x_t = self.add_noise(x0, noise, alpha_bar)
        context, labels, added_cond = dropped_for_training(
            model,
            self.cond_drop_prob,
            context,
            labels,
            added_cond,
            generator,
            null_context=null_context,
            null_added_cond=null_added_cond,
        )
        output = call_model(
            model,
            x_t,
            timesteps,
            alpha_bar,
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
        )
        target = from_x0_and_eps(self.prediction, x0, noise, alpha_bar)
        if traits.aleatoric:
            mean, log_variance = split_aleatoric(output)
            losses = per_sample_gaussian_nll(mean, log_variance, target)
        else:
            losses = per_sample_mse(output, target)
        if self.min_snr_gamma is not None:
            snr = alpha_bar / (1.0 - alpha_bar)
            weights = min_snr_weight(snr, self.min_snr_gamma, self.prediction)
            losses = losses * weights.to(device=device, dtype=torch.float32)
        return losses.mean()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        model: DenoisingModel,
        shape: Sequence[int],
        *,
        sampler="ddim",
        steps: int = 50,
        eta: float = 0.0,
        guidance: float = 1.0,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
        cuda_graph: bool | str = "auto",
    ) -> torch.Tensor:
        """Draw samples of `shape` = (B, C, *spatial) from `model`, in data space (float32).

        Args:
            sampler: ``"ddpm"``, ``"ddim"``, ``"dpm++"`` or a diffusers-protocol scheduler.
            steps: number of model evaluations (at most T); ``"ddpm"`` with T steps is exact DDPM.
            eta: DDIM noise scale in [0, 1] (0: deterministic); forwarded to a scheduler whose
                `step` accepts it.
            guidance: classifier-free guidance scale s: `uncond + s (cond − uncond)`; 1 is the
                conditional model, 0 the unconditional one. Needs `labels`, `context` or
                `added_cond`; the unconditional pass gets the null label, `null_context` and
                `null_added_cond`, and the same `cond` and `time_ids`.
            cond: fixed image conditioning (image-to-image), `(B, C_cond, *spatial)`.
            context, labels: cross-attention tokens `(B, N, D)` and class indices `(B,)`, in
                `[0, num_classes]` when the model's config states `num_classes` (checked before
                the loop for CPU labels, and for GPU labels while value checks are on).
            added_cond, time_ids: SDXL's added conditioning, `(B, D)` (the pooled text
                embedding) and `(B, n)` (size / crop ids), for a model built with
                `added_cond_dim`; passed to the model only when given.
            null_context, null_added_cond: the unconditional `context` and `added_cond` under
                guidance (default zeros, as `cond_drop_prob` trains), broadcastable to them: e.g.
                Stable Diffusion's empty-prompt (or a negative prompt's) embedding
                `(1, 77, 768)`. Unused at `guidance=1`.
            generator: seeds every random draw; noise is drawn on its device (CPU by default)
                and moved to `device`.
            progress: show a progress bar.
            device: where to sample (default: the model's device, else `cond`'s, else the CPU).
            cuda_graph: replay the network as a CUDA graph (:mod:`diffunet.accel.cuda_graph`) on a GPU:
                ``"auto"`` does for a :class:`~diffunet.UNet` (the recording is kept with the
                model for later calls of the same shape, holding one forward pass's memory:
                :func:`~diffunet.accel.cuda_graph.release_cuda_graphs` frees it), True for any model,
                False never.
        """
        shape = self._check_shape(shape)
        scheduler = sampler if is_scheduler(sampler) else None
        self._check_sampler_arguments(sampler, steps, eta, scheduler is not None)
        self._check_model_shape(model, shape)
        device, conditioning = self._sampling_conditioning(
            model,
            shape,
            device,
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
            null_context=null_context,
            null_added_cond=null_added_cond,
        )
        model = with_cuda_graph(model, cuda_graph, device)
        denoiser = Denoiser(
            model,
            self.prediction,
            **conditioning,
            guidance=guidance,
            clip_denoised=self.clip_denoised,
        )
        x = draw_noise(shape, generator, device)
        batch = shape[0]
        name = sampler if scheduler is None else type(scheduler).__name__

        def bar(iterable):
            return tqdm(iterable, desc=f"sampling ({name})", disable=not progress, leave=False)

        if scheduler is not None:
            return sample_with_scheduler(
                scheduler,
                denoiser.output,
                self.prediction,
                self.schedule,
                x,
                steps,
                generator=generator,
                eta=eta,
                progress=bar,
            ).float()

        def predict(x_t, step):
            # Made on the device: a copy from the host would wait for the GPU to finish.
            t = torch.full((batch,), step.t, dtype=torch.long, device=device)
            alpha_bar = torch.full((batch,), step.alpha_bar, dtype=torch.float64, device=device)
            return denoiser.x0_and_eps(x_t, t, alpha_bar)

        def noise():
            return draw_noise(shape, generator, device)

        timesteps = self.schedule.timesteps_for(steps, self.timestep_spacing)
        plan = bar(steps_from_timesteps(timesteps, self.schedule.alpha_bar))
        if sampler == "ddpm":
            return ddpm(predict, x, plan, noise)
        if sampler == "ddim":
            return ddim(predict, x, plan, noise, eta)
        return dpm_solver_pp(predict, x, plan)

    # ------------------------------------------------------------------ argument checks
    def _check_sampler_arguments(self, sampler, steps, eta, is_protocol: bool) -> None:
        if not is_protocol and (not isinstance(sampler, str) or sampler not in SAMPLERS):
            missing = [a for a in PROTOCOL if not hasattr(sampler, a)]
            detail = f" (it lacks {missing})" if not isinstance(sampler, str) else ""
            raise InvalidValueError(
                f"unknown sampler {sampler!r}{detail}; expected one of {SAMPLERS} or an object "
                f"with the diffusers scheduler protocol {PROTOCOL}. Use sampler='ddim' (default), "
                "'dpm++' for 10-25 steps or 'ddpm' for full ancestral sampling"
            )
        if not is_protocol:
            self.schedule.timesteps_for(steps, self.timestep_spacing)
        if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise InvalidValueError(
                f"eta={eta!r} is invalid: expected a number in [0, 1] (0: deterministic DDIM, "
                "1: DDPM-like noise)"
            )

    @staticmethod
    def _check_shape(shape) -> tuple[int, ...]:
        if isinstance(shape, torch.Size):
            shape = tuple(shape)
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) < 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise InvalidValueError(
                f"shape={shape!r} is invalid: expected a tuple of positive ints (B, C, *spatial), "
                "e.g. (16, 3, 32, 32)"
            )
        return tuple(shape)

    @staticmethod
    def _check_model_shape(model: DenoisingModel, shape: tuple[int, ...]) -> None:
        traits = traits_of(model)
        in_channels, dims = traits.in_channels, traits.dims
        if in_channels is not None and shape[1] != in_channels:
            raise InvalidValueError(
                f"shape={shape} has {shape[1]} channels but the model denoises "
                f"in_channels={in_channels}; pass shape=(B, {in_channels}, *spatial) (an image "
                "cond goes in cond=..., not in the channels)"
            )
        if dims is not None and len(shape) - 2 != dims:
            raise InvalidValueError(
                f"shape={shape} has {len(shape) - 2} spatial axes but the model has dims={dims}; "
                f"pass shape=(B, C{', S' * dims})"
            )

    @staticmethod
    def _check_batch(
        x: torch.Tensor, name: str, *, cond, context, labels, added_cond=None, time_ids=None
    ) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
            given = (
                f"{x.dtype} tensor of shape {tuple(x.shape)}"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            raise InvalidValueError(
                f"{name} must be a floating-point tensor (B, C, *spatial), got {given}"
            )
        Diffusion._check_conditioning(
            x.shape[0],
            tuple(x.shape[2:]),
            name,
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
        )

    @staticmethod
    def _sampling_conditioning(
        model: DenoisingModel,
        shape: tuple[int, ...],
        device: torch.device | str | None,
        **conditioning: torch.Tensor | None,
    ) -> tuple[torch.device, dict[str, torch.Tensor | None]]:
        """A `sample` call's conditioning (`cond`, `context`, `labels`, `added_cond`,
        `time_ids`, `null_context`, `null_added_cond`) checked against `model` and `shape` and
        moved to the sampling device (default: the model's, else `cond`'s, else the CPU): that
        device, and the conditioning as `GuidedModel` takes it (the null inputs are fitted to
        theirs there)."""
        labels, cond = conditioning["labels"], conditioning["cond"]
        if labels is not None:  # the range on the CPU, or while value checks are on
            check_labels(labels, traits_of(model).num_classes)
        Diffusion._check_types(**conditioning)
        if device is None:
            device = model_device(model, cond.device if cond is not None else "cpu")
        device = torch.device(device)
        moved = {
            name: value.to(device) if value is not None else None
            for name, value in conditioning.items()
            if not name.startswith("null_")
        }
        Diffusion._check_conditioning(shape[0], shape[2:], "shape", **moved)
        return device, {**conditioning, **moved}

    @staticmethod
    def _check_types(**values: object) -> None:
        """Each named conditioning argument is a tensor or None."""
        for argument, value in values.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise InvalidTypeError(
                    f"{argument} must be a torch.Tensor or None, got {type(value).__name__}"
                )

    @staticmethod
    def _check_conditioning(
        batch: int,
        spatial: tuple[int, ...],
        name: str,
        *,
        cond,
        context,
        labels,
        added_cond=None,
        time_ids=None,
    ) -> None:
        spatial = tuple(spatial)
        Diffusion._check_types(
            cond=cond, context=context, labels=labels, added_cond=added_cond, time_ids=time_ids
        )
        if cond is not None and (
            cond.ndim != len(spatial) + 2
            or cond.shape[0] != batch
            or tuple(cond.shape[2:]) != spatial
        ):
            raise InvalidValueError(
                f"cond has shape {tuple(cond.shape)} but {name} has batch {batch} and spatial "
                f"size {spatial}; expected "
                f"({batch}, C_cond, {', '.join(map(str, spatial))}): the same batch and spatial "
                "size. Repeat or resize cond to match"
            )
        if context is not None and (context.ndim != 3 or context.shape[0] != batch):
            raise InvalidValueError(
                f"context has shape {tuple(context.shape)}, expected ({batch}, N, context_dim) "
                f"to match the batch of {name}"
            )
        if labels is not None and tuple(labels.shape) != (batch,):
            raise InvalidValueError(
                f"labels has shape {tuple(labels.shape)}, expected ({batch},) to match the batch "
                f"of {name}"
            )
        if added_cond is not None and not added_cond.is_floating_point():
            raise InvalidTypeError(
                f"added_cond must be a floating-point tensor ({batch}, D) (e.g. a pooled text "
                f"embedding), got dtype {added_cond.dtype}"
            )
        if added_cond is not None and (added_cond.ndim != 2 or added_cond.shape[0] != batch):
            raise InvalidValueError(
                f"added_cond has shape {tuple(added_cond.shape)}, expected ({batch}, D) to match "
                f"the batch of {name} (SDXL: the pooled text embedding, D = 1280)"
            )
        if time_ids is not None and (time_ids.dtype == torch.bool or time_ids.is_complex()):
            raise InvalidTypeError(
                f"time_ids must be real numbers ({batch}, n) (sizes and crop offsets), got dtype "
                f"{time_ids.dtype}"
            )
        if time_ids is not None and (time_ids.ndim != 2 or time_ids.shape[0] != batch):
            raise InvalidValueError(
                f"time_ids has shape {tuple(time_ids.shape)}, expected ({batch}, n) to match the "
                f"batch of {name} (SDXL: n = 6 size and crop ids per sample); repeat one row "
                f"with ids.expand({batch}, -1)"
            )

    def _check_timesteps(self, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
        """Shape and dtype always; the value range only on the CPU (elsewhere it would sync)."""
        timesteps = torch.as_tensor(timesteps)
        out_of_range = (
            timesteps.device.type == "cpu"
            and not timesteps.is_floating_point()
            and bool((timesteps < 0).any() | (timesteps >= self.num_timesteps).any())
        )
        if tuple(timesteps.shape) != (batch,) or timesteps.is_floating_point() or out_of_range:
            raise InvalidValueError(
                f"timesteps must be an integer tensor of shape ({batch},) with values in "
                f"[0, {self.num_timesteps - 1}], got {timesteps.dtype} of shape "
                f"{tuple(timesteps.shape)}"
            )
        return timesteps.long()
