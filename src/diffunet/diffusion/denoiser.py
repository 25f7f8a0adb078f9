"""How the diffusion layer calls a network: time input, conditioning, dtype, guidance, clipping.

A model is a :class:`DenoisingModel`: anything callable as `model(x, t, cond=..., context=...,
labels=..., added_cond=..., time_ids=...)` (only the conditioning that is given is passed). A
model may describe itself through a `config` (:class:`ConfiguredDenoiser`, as a
:class:`~diffunet.UNet` does): with `config.time_embed_type == "noise_level"` it receives the
continuous noise level ᾱ_t in (0, 1) (EMDiffuse / Palette) instead of the integer step index t;
with `config.use_timestep = False` (a plain U-Net) it receives no time at all; with
`config.aleatoric` its output holds the mean then the log-variance along channels. A
class-conditional model names its "no label" index in `null_label`
(:class:`ClassConditionalDenoiser`).

:class:`GuidedModel` binds a model to its conditioning and guidance for any process, whose time
input it passes as given (:func:`call_model_with_time`); :class:`Denoiser` adds `Diffusion`'s
time input and parameterisation.
"""

from __future__ import annotations

import math

import torch

from diffunet.diffusion.guidance import broadcast_null, guide, null_label_of, unconditional
from diffunet.diffusion.model_protocol import (
    DenoiserTraits,
    DenoisingModel,
    model_parameters,
    traits_of,
)
from diffunet.diffusion.parameterization import check_prediction, x0_and_eps
from diffunet.errors import InvalidValueError
from diffunet.model.unet import split_aleatoric


def uses_noise_level(model: DenoisingModel) -> bool:
    """Whether `model` is conditioned on the noise level ᾱ rather than on the step index."""
    return traits_of(model).noise_level


def is_aleatoric(model: DenoisingModel) -> bool:
    """Whether `model` outputs a mean and a log-variance (an aleatoric head)."""
    return traits_of(model).aleatoric


def time_input(
    model: DenoisingModel, t: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor | None:
    """The time tensor `model` expects, shape `(B,)`: ᾱ in float32, or the step index, or None.

    `t` holds step indices (integers, or fractional ones from some external schedulers) and
    `alpha_bar` the matching ᾱ; both `(B,)`.
    """
    return _time_input(traits_of(model), t, alpha_bar)


def _time_input(
    traits: DenoiserTraits, t: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor | None:
    if not traits.use_timestep:
        return None
    if traits.noise_level:
        return alpha_bar.to(torch.float32)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        return t.to(torch.float32)
    return t.long()


def parameter_dtype(model: DenoisingModel) -> torch.dtype | None:
    """dtype of the model's first floating-point parameter (None for plain callables)."""
    for p in model_parameters(model):
        if p.is_floating_point():
            return p.dtype
    return None


def call_model(
    model: DenoisingModel,
    x: torch.Tensor,
    t: torch.Tensor,
    alpha_bar: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    added_cond: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `model` on `x` at steps `t` / noise levels `alpha_bar` (both `(B,)`); float32 output.

    Raises a ValueError when the output does not have `x`'s shape (with doubled channels for an
    aleatoric model).
    """
    time = _time_input(traits_of(model), t.to(x.device), alpha_bar.to(x.device))
    return call_model_with_time(
        model,
        x,
        time,
        cond=cond,
        context=context,
        labels=labels,
        added_cond=added_cond,
        time_ids=time_ids,
    )


def call_model_with_time(
    model: DenoisingModel,
    x: torch.Tensor,
    time: torch.Tensor | None,
    *,
    cond: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    added_cond: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `model` on `x` with its time input `time` given as is; float32 output.

    `time` is `(B,)`, or None for a model without a time input (`config.use_timestep=False`),
    which never receives one. Only the conditioning that is given is passed, so a model without
    `added_cond` / `time_ids` arguments works as long as they are not given. `x`, `context` and
    `added_cond` are cast to the model's parameter dtype. Raises a ValueError when the output
    does not have `x`'s shape (with doubled channels for an aleatoric model).
    """
    dtype = parameter_dtype(model)
    if dtype is not None and dtype != x.dtype:
        x = x.to(dtype)

        def cast(value: torch.Tensor | None) -> torch.Tensor | None:
            return value.to(dtype) if value is not None and value.is_floating_point() else value

        context, added_cond = cast(context), cast(added_cond)
    conditioning = {
        "cond": cond,
        "context": context,
        "labels": labels,
        "added_cond": added_cond,
        "time_ids": time_ids,
    }
    kwargs = {name: value for name, value in conditioning.items() if value is not None}
    traits = traits_of(model)
    if time is not None and traits.use_timestep:
        output = model(x, time.to(x.device), **kwargs)
    else:
        output = model(x, **kwargs)
    channels = x.shape[1] * (2 if traits.aleatoric else 1)
    expected = (x.shape[0], channels, *x.shape[2:])
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        given = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise InvalidValueError(
            f"the model returned {given} for an input x of shape {tuple(x.shape)}; expected "
            f"{expected} (x's shape{', channels doubled: mean then log-variance' if channels != x.shape[1] else ''}). "
            "Make the model's out_channels equal its in_channels (the data channels)"
        )
    return output.float()


class GuidedModel:
    """A model bound to fixed conditioning and a classifier-free guidance scale: its float32
    output (the mean for an aleatoric model) at `(x, time)`, for any process.

    `model` is any :class:`DenoisingModel`; guiding labels needs a
    :class:`ClassConditionalDenoiser`. Guidance removes `labels`, `context` and `added_cond`
    (:func:`~diffunet.diffusion.guidance.unconditional`): the unconditional pass gets the null
    label, `null_context` and `null_added_cond` (zeros by default; tensors that broadcast to
    `context` / `added_cond`, e.g. Stable Diffusion's empty-prompt embedding `(1, 77, 768)`),
    and the same `cond` and `time_ids`. With `guidance != 1` the conditional and unconditional
    passes run as one batch of twice the size; `guidance == 0` runs only the unconditional pass.
    """

    def __init__(
        self,
        model: DenoisingModel,
        *,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        guidance: float = 1.0,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.cond, self.context, self.labels = cond, context, labels
        self.added_cond, self.time_ids = added_cond, time_ids
        numeric = isinstance(guidance, (int, float)) and not isinstance(guidance, bool)
        if not numeric or not math.isfinite(guidance):
            raise InvalidValueError(
                f"guidance={guidance!r} is invalid: expected a finite number (1.0: conditional "
                "model, 0.0: unconditional, 3-7: typical classifier-free guidance)"
            )
        self.guidance = float(guidance)
        self.aleatoric = is_aleatoric(model)
        self.null_context = broadcast_null("null_context", null_context, "context", context)
        self.null_added_cond = broadcast_null(
            "null_added_cond", null_added_cond, "added_cond", added_cond
        )
        guided = self.guidance != 1.0
        if guided and context is None and labels is None and added_cond is None:
            raise InvalidValueError(
                f"guidance={guidance} needs a conditional model and its conditioning, but neither "
                "labels nor context nor added_cond was given (an image cond and time_ids are "
                "never dropped, so they cannot be guided). Pass labels=..., context=... or "
                "added_cond=..., or use guidance=1.0"
            )
        self.null_label = null_label_of(model) if guided and labels is not None else None

    def __call__(self, x: torch.Tensor, time: torch.Tensor | None) -> torch.Tensor:
        """The guided model output at `x` with time input `time` (`(B,)` or None)."""
        if self.guidance == 1.0:
            return self._mean(
                call_model_with_time(
                    self.model,
                    x,
                    time,
                    cond=self.cond,
                    context=self.context,
                    labels=self.labels,
                    added_cond=self.added_cond,
                    time_ids=self.time_ids,
                )
            )
        uncond_context, uncond_labels, uncond_added_cond = unconditional(
            self.context,
            self.labels,
            self.null_label,
            added_cond=self.added_cond,
            null_context=self.null_context,
            null_added_cond=self.null_added_cond,
        )
        if self.guidance == 0.0:
            return self._mean(
                call_model_with_time(
                    self.model,
                    x,
                    time,
                    cond=self.cond,
                    context=uncond_context,
                    labels=uncond_labels,
                    added_cond=uncond_added_cond,
                    time_ids=self.time_ids,
                )
            )

        def both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None or b is None else torch.cat([a, b], dim=0)

        out = call_model_with_time(
            self.model,
            torch.cat([x, x], dim=0),
            both(time, time),
            cond=both(self.cond, self.cond),
            context=both(self.context, uncond_context),
            labels=both(self.labels, uncond_labels),
            added_cond=both(self.added_cond, uncond_added_cond),
            time_ids=both(self.time_ids, self.time_ids),
        )
        cond_out, uncond_out = self._mean(out).chunk(2, dim=0)
        return guide(cond_out, uncond_out, self.guidance)

    def _mean(self, output: torch.Tensor) -> torch.Tensor:
        return split_aleatoric(output)[0] if self.aleatoric else output


class Denoiser(GuidedModel):
    """A model bound to fixed conditioning and guidance: its float32 prediction at (x_t, t) of the
    discrete process (:class:`~diffunet.diffusion.Diffusion`), whose time input is the step index
    or the noise level ᾱ (see :func:`time_input`).

    Conditioning and guidance are :class:`GuidedModel`'s.
    """

    def __init__(
        self,
        model: DenoisingModel,
        prediction: str,
        *,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        guidance: float = 1.0,
        null_context: torch.Tensor | None = None,
        null_added_cond: torch.Tensor | None = None,
        clip_denoised: bool = True,
    ) -> None:
        self.prediction = check_prediction(prediction)
        super().__init__(
            model,
            cond=cond,
            context=context,
            labels=labels,
            added_cond=added_cond,
            time_ids=time_ids,
            guidance=guidance,
            null_context=null_context,
            null_added_cond=null_added_cond,
        )
        self.clip_denoised = clip_denoised

    def output(self, x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The guided model output (the mean for an aleatoric model) at `x`; `t`, ᾱ are `(B,)`."""
        time = _time_input(traits_of(self.model), t.to(x.device), alpha_bar.to(x.device))
        return self(x, time)

    def x0_and_eps(
        self, x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted clean data and noise at `x` (x₀ clipped to [−1, 1] when `clip_denoised`).

        After clipping, ε is recomputed from the clipped x₀ so the two stay consistent with x_t.
        """
        x0, eps = x0_and_eps(self.prediction, self.output(x, t, alpha_bar), x, alpha_bar)
        if self.clip_denoised:
            x0, eps = x0_and_eps("x0", x0.clamp(-1.0, 1.0), x, alpha_bar)
        return x0, eps
