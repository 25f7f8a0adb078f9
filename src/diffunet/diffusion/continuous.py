"""What the continuous-time processes (:class:`~diffunet.diffusion.FlowMatching`,
:class:`~diffunet.diffusion.EDM`) share with each other and with
:class:`~diffunet.diffusion.Diffusion`: argument checks, the training batch (times, noise,
conditioning dropout) and the sampling set-up (device, conditioning, guidance, the noise grid,
the starting noise, the progress bar).

A process subclass states its samplers, its default sampler and number of steps, how it draws
training times, the valid range of a time, and the default grid of times a sampler visits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from diffunet.diffusion.denoiser import GuidedModel
from diffunet.diffusion.guidance import dropped_for_training
from diffunet.diffusion.model_protocol import DenoiserTraits, DenoisingModel, traits_of
from diffunet.diffusion.process import Diffusion, draw_noise, training_noise, with_cuda_graph
from diffunet.errors import InvalidTypeError, InvalidValueError
from diffunet.model.validation import check_labels


def check_number(name: str, value: object, expected: str, valid: Callable[[float], bool]) -> float:
    """`value` as a float when it is a real number for which `valid` holds; an error naming
    `name` and saying what was `expected` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(
            f"{name} must be a number ({expected}), got {type(value).__name__} {value!r}"
        )
    if not valid(float(value)):
        raise InvalidValueError(f"{name}={value!r} is invalid: expected {expected}")
    return float(value)


def positive(v: float) -> bool:
    """A finite number above zero."""
    return math.isfinite(v) and v > 0


def finite(v: float) -> bool:
    """A finite number."""
    return math.isfinite(v)


class TrainingBatch(NamedTuple):
    """One checked training batch: float32 data, noise and times on the data's device, and the
    conditioning after dropout."""

    x0: torch.Tensor
    noise: torch.Tensor
    times: torch.Tensor
    cond: torch.Tensor | None
    context: torch.Tensor | None
    labels: torch.Tensor | None
    added_cond: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def conditioning(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of :func:`~diffunet.diffusion.denoiser.call_model_with_time`."""
        return {
            "cond": self.cond,
            "context": self.context,
            "labels": self.labels,
            "added_cond": self.added_cond,
            "time_ids": self.time_ids,
        }


class SamplingRun(NamedTuple):
    """What a sampling loop needs: the guided model, the starting noise ε (float32), the grid of
    times it visits (decreasing, ending at 0), the chosen sampler, a source of fresh noise and
    the step indices `0 .. len(grid) − 2` (behind the progress bar)."""

    guided: GuidedModel
    noise: torch.Tensor
    grid: list[float]
    sampler: str
    draw: Callable[[], torch.Tensor]
    steps: Iterable[int]


class ContinuousProcess:
    """Base of the continuous-time processes; see :class:`~diffunet.diffusion.FlowMatching` and
    :class:`~diffunet.diffusion.EDM`."""

    #: The sampler names `sample` accepts, the default one and the default number of steps.
    SAMPLERS: tuple[str, ...] = ()
    DEFAULT_SAMPLER = ""
    DEFAULT_STEPS = 0
    #: What a time is, and its valid range, for messages.
    TIME_NAME = "t"
    TIMES_RANGE = ""

    def __init__(self, cond_drop_prob: float) -> None:
        self.cond_drop_prob = check_number(
            "cond_drop_prob",
            cond_drop_prob,
            "a probability in [0, 1] (0.1 is usual for classifier-free guidance; 0 disables it)",
            lambda v: 0.0 <= v <= 1.0,
        )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        model: DenoisingModel,
        shape: Sequence[int],
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        device: torch.device | str | None = None,
        clip_denoised: bool = False,
        grid: Sequence[float] | torch.Tensor | None = None,
        cuda_graph: bool | str = "auto",
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Draw samples of `shape` = (B, C, *spatial) from `model`, in data space (float32).

        Args:
            sampler: one of the process's `SAMPLERS` (default `DEFAULT_SAMPLER`); what each
                does is in the process's `_integrate`.
            steps: number of steps over the process's default grid (default `DEFAULT_STEPS`).
            guidance: classifier-free guidance scale on the network output, as in
                `Diffusion.sample`.
            cond, context, labels, added_cond, time_ids: as in `Diffusion.sample`.
            null_context, null_added_cond: the unconditional `context` and `added_cond` under
                guidance (default zeros), as in `Diffusion.sample`.
            generator: seeds every random draw, made on its device (CPU by default) and moved.
            progress: show a progress bar.
            device: where to sample (default: the model's device, else `cond`'s, else the CPU).
            clip_denoised: clip the predicted clean data to [−1, 1] at each model evaluation.
            grid: the times to visit instead (decreasing to exactly 0, e.g. a diffusers
                scheduler's `sigmas`); `steps` is then `len(grid) − 1`.
            cuda_graph: as in `Diffusion.sample`.
            eta: DDIM's noise scale, accepted so that every process samples with one call; it
                must be 0 (the stochasticity of these samplers is set elsewhere, if at all).
        """
        run = self._sampling_run(
            model,
            shape,
            eta=eta,
            sampler=self.DEFAULT_SAMPLER if sampler is None else sampler,
            steps=steps,
            grid=grid,
            guidance=guidance,
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
            null_context=null_context,
            null_added_cond=null_added_cond,
            generator=generator,
            progress=progress,
            device=device,
            cuda_graph=cuda_graph,
        )
        return self._integrate(run, clip_denoised)

    def _integrate(self, run: SamplingRun, clip_denoised: bool) -> torch.Tensor:
        """The sampling loop over `run.grid` from `run.noise`; the process defines it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ what a process states
    def sample_training_times(
        self, batch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`batch` training times, float32 `(batch,)`, drawn on the generator's device."""
        raise NotImplementedError

    def default_grid(self, steps: int) -> torch.Tensor:
        """The float64 times a sampler visits in `steps` steps: `steps + 1` values ending at 0."""
        raise NotImplementedError

    def _times_valid(self, times: torch.Tensor) -> bool:
        """Whether every time of a (CPU, float64) tensor lies in the process's range."""
        raise NotImplementedError

    def _grid_valid(self, grid: torch.Tensor) -> str | None:
        """What is wrong with a decreasing float64 grid that ends at 0, or None."""
        return None

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
        noise: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss of `model` on clean data `x0`: a float32 scalar (what it regresses
        is in the class's description).

        `times` (the process's time of each sample, `(B,)`) and `noise` (x0's shape) fix the
        otherwise random draws (times from :meth:`sample_training_times`); `generator` seeds
        them. `added_cond` / `time_ids` are SDXL's added conditioning, as in `Diffusion.loss`.
        Conditioning is dropped with probability `cond_drop_prob`, a dropped context or
        added_cond becoming `null_context` / `null_added_cond` (zeros by default), as in
        `Diffusion.loss`.
        """
        batch = self._training_batch(
            model,
            x0,
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
            generator=generator,
            noise=noise,
            times=times,
            null_context=null_context,
            null_added_cond=null_added_cond,
        )
        return self._batch_loss(model, batch)

    def _batch_loss(self, model: DenoisingModel, b: TrainingBatch) -> torch.Tensor:
        """The loss of one drawn training batch; the process defines it."""
        raise NotImplementedError

    def _training_batch(
        self,
        model: DenoisingModel,
        x0: torch.Tensor,
        *,
        cond: torch.Tensor | None,
        context: torch.Tensor | None,
        labels: torch.Tensor | None,
        generator: torch.Generator | None,
        noise: torch.Tensor | None,
        times: torch.Tensor | None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
    ) -> TrainingBatch:
        """Checks `loss`'s arguments and draws what was not given: times, then noise, then the
        conditioning dropout (the order `Diffusion.loss` draws in; labels, context and
        added_cond of a sample are dropped together)."""
        Diffusion._check_batch(
            x0,
            "x0",
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
        )
        traits = self._check_traits(model)
        if labels is not None:  # the range only on the CPU, or while value checks are on
            check_labels(labels, traits.num_classes)
        batch, device = x0.shape[0], x0.device
        x0 = x0.float()
        if times is None:
            times = self.sample_training_times(batch, generator)
        times = self._check_times(times, batch).to(device)
        noise = training_noise(noise, x0, generator, device)
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
        return TrainingBatch(x0, noise, times, cond, context, labels, added_cond, time_ids)

    def _check_times(self, times: object, batch: int) -> torch.Tensor:
        """`times` as float32 `(batch,)`; the value range checked only on the CPU (elsewhere it
        would wait for the device)."""
        name = type(self).__name__
        if not isinstance(times, torch.Tensor):
            raise InvalidTypeError(
                f"times must be a torch.Tensor of shape ({batch},) with the {self.TIME_NAME} of "
                f"each sample ({self.TIMES_RANGE}), got {type(times).__name__}"
            )
        bad = tuple(times.shape) != (batch,) or times.dtype == torch.bool or times.is_complex()
        if not bad and times.device.type == "cpu":
            bad = not self._times_valid(times.double())
        if bad:
            raise InvalidValueError(
                f"times must be a real tensor of shape ({batch},) holding each sample's "
                f"{self.TIME_NAME} of {name} ({self.TIMES_RANGE}), got {times.dtype} of shape "
                f"{tuple(times.shape)}; leave times=None to draw them"
            )
        return times.float()

    def _check_traits(self, model: DenoisingModel) -> DenoiserTraits:
        traits = traits_of(model)
        if traits.aleatoric:
            raise InvalidValueError(
                f"{type(self).__name__} does not support an aleatoric model (config.aleatoric="
                "True: mean and log-variance outputs); train it with Diffusion, which fits the "
                "Gaussian NLL, or build the model with aleatoric=False"
            )
        return traits

    # ------------------------------------------------------------------ sampling
    def _sampling_run(
        self,
        model: DenoisingModel,
        shape: Sequence[int],
        *,
        sampler: str,
        steps: int | None,
        grid: Sequence[float] | torch.Tensor | None,
        guidance: float,
        cond: torch.Tensor | None,
        context: torch.Tensor | None,
        labels: torch.Tensor | None,
        generator: torch.Generator | None,
        progress: bool,
        device: torch.device | str | None,
        cuda_graph: bool | str,
        eta: float = 0.0,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
    ) -> SamplingRun:
        """Checks `sample`'s arguments (in `Diffusion.sample`'s order) and sets the run up; on a
        GPU the model is accelerated and CUDA-graphed as `Diffusion.sample` does."""
        shape = Diffusion._check_shape(shape)
        name = type(self).__name__
        if eta != 0:
            raise InvalidValueError(
                f"eta={eta!r}: eta is the noise scale of Diffusion's DDIM sampler; {name}'s "
                "samplers take none (pass eta=0)"
            )
        if not isinstance(sampler, str) or sampler not in self.SAMPLERS:
            hint = (
                "; diffusers schedulers drive Diffusion only"
                if not isinstance(sampler, str)
                else ""
            )
            raise InvalidValueError(
                f"unknown sampler {sampler!r} for {name}; expected one of {self.SAMPLERS} "
                f"(default {self.DEFAULT_SAMPLER!r}){hint}"
            )
        times = self._check_grid(steps, grid)
        Diffusion._check_model_shape(model, shape)
        self._check_traits(model)
        device, conditioning = Diffusion._sampling_conditioning(
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
        guided = GuidedModel(model, **conditioning, guidance=guidance)
        noise = draw_noise(shape, generator, device)

        def draw() -> torch.Tensor:
            return draw_noise(shape, generator, device)

        indices = tqdm(
            range(len(times) - 1),
            desc=f"sampling ({name}, {sampler})",
            disable=not progress,
            leave=False,
        )
        return SamplingRun(guided, noise, times, sampler, draw, indices)

    def _check_grid(
        self, steps: int | None, grid: Sequence[float] | torch.Tensor | None
    ) -> list[float]:
        """The grid a sampler visits: the default one of `steps`, or `grid` checked."""
        name = type(self).__name__
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise InvalidValueError(
                f"steps={steps!r} is invalid: expected a positive int (the number of steps; "
                f"{name} defaults to {self.DEFAULT_STEPS})"
            )
        if grid is None:
            return self.default_grid(self.DEFAULT_STEPS if steps is None else steps).tolist()
        try:
            values = torch.as_tensor(grid, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise InvalidTypeError(
                f"grid must be a 1-D sequence or tensor of numbers, got {type(grid).__name__}"
            ) from err
        problem = None
        if values.ndim != 1 or len(values) < 2:
            problem = f"a 1-D grid of at least 2 values, got shape {tuple(values.shape)}"
        elif not bool(torch.isfinite(values).all()):
            problem = "finite values"
        elif not bool((values[1:] < values[:-1]).all()) or values[-1] != 0.0:
            problem = "values decreasing strictly to a last value of exactly 0"
        else:
            problem = self._grid_valid(values)
        if problem is not None:
            raise InvalidValueError(
                f"grid is invalid for {name}: expected {problem} (the {self.TIME_NAME} of each "
                "step, from noise to data), or leave grid=None for the default grid of steps"
            )
        if steps is not None and steps != len(values) - 1:
            raise InvalidValueError(
                f"steps={steps} disagrees with grid, which has {len(values) - 1} steps; pass "
                "one of them, or steps=len(grid) - 1"
            )
        return values.tolist()
