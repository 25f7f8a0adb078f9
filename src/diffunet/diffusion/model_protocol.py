"""What the diffusion layer needs from a network: the :class:`DenoisingModel` protocol and the
richer ones of a model that describes itself (a :class:`~diffunet.UNet`).

The diffusion layer calls any :class:`DenoisingModel`; what a model states through `config`
(:class:`ConfiguredDenoiser`) or `null_label` (:class:`ClassConditionalDenoiser`) changes how it
is called, and a plain callable gets the :class:`DenoiserTraits` defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import torch


@runtime_checkable
class DenoisingModel(Protocol):
    """A network the diffusion layer trains and samples from.

    Called as `model(x, t, *, cond=None, context=None, labels=None, added_cond=None,
    time_ids=None)` with only the conditioning that is given (and without `t` when its config
    says `use_timestep=False`), so `lambda x, t: ...` is one; it returns a tensor of `x`'s shape (channels doubled for an
    aleatoric model). Every :class:`~diffunet.UNet` is one.
    """

    def __call__(self, x: torch.Tensor, /, *args: Any, **kwargs: Any) -> torch.Tensor: ...


class DenoiserConfig(Protocol):
    """The fields of a model's `config` that the diffusion layer reads.

    :class:`~diffunet.UNetConfig` has them all; another config may have any subset, and a
    missing field counts as its :class:`DenoiserTraits` default.
    """

    @property
    def use_timestep(self) -> bool:
        """Whether the model takes a time input at all."""
        ...

    @property
    def time_embed_type(self) -> str:
        """``"noise_level"`` for a model conditioned on ᾱ; anything else means step indices."""
        ...

    @property
    def aleatoric(self) -> bool:
        """Whether the output is the mean then the log-variance along channels."""
        ...

    @property
    def in_channels(self) -> int:
        """Channels of the data the model denoises."""
        ...

    @property
    def dims(self) -> int:
        """Number of spatial axes."""
        ...

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a class-conditional model (label `num_classes` is the null
        label); None without labels."""
        ...


class ConfiguredDenoiser(DenoisingModel, Protocol):
    """A denoiser that describes itself through `config`, as a :class:`~diffunet.UNet` does."""

    @property
    def config(self) -> DenoiserConfig:
        """The model's configuration (see :class:`DenoiserConfig`)."""
        ...


class ClassConditionalDenoiser(DenoisingModel, Protocol):
    """A denoiser with class labels, whose `null_label` index means "no label"."""

    @property
    def null_label(self) -> int:
        """The label of the unconditional model (classifier-free guidance, label dropout)."""
        ...


class HasParameters(Protocol):
    """A model with parameters (an `nn.Module`): they give its dtype and device."""

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's parameters."""
        ...


@dataclass(frozen=True)
class DenoiserTraits:
    """What the diffusion layer needs to know about a model; a plain callable has the defaults."""

    use_timestep: bool = True
    noise_level: bool = False
    aleatoric: bool = False
    in_channels: int | None = None
    dims: int | None = None
    num_classes: int | None = None


def traits_of(model: DenoisingModel) -> DenoiserTraits:
    """The :class:`DenoiserTraits` that `model.config` states, or the defaults if it has none.

    The attributes are read, not matched by `isinstance` against a runtime protocol: wrappers
    (`torch.compile`, the CUDA-graph model, DDP) forward `config` through `__getattr__`, which
    such a check does not see from Python 3.12, and a config may state only some fields.
    """
    try:
        config: object = cast(ConfiguredDenoiser, model).config
    except AttributeError:
        return DenoiserTraits()
    in_channels = getattr(config, "in_channels", None)
    dims = getattr(config, "dims", None)
    num_classes = getattr(config, "num_classes", None)
    return DenoiserTraits(
        use_timestep=bool(getattr(config, "use_timestep", True)),
        noise_level=getattr(config, "time_embed_type", "timestep") == "noise_level",
        aleatoric=bool(getattr(config, "aleatoric", False)),
        in_channels=in_channels if isinstance(in_channels, int) else None,
        dims=dims if isinstance(dims, int) else None,
        num_classes=(
            num_classes
            if isinstance(num_classes, int) and not isinstance(num_classes, bool)
            else None
        ),
    )


def model_parameters(model: DenoisingModel) -> Iterator[torch.nn.Parameter]:
    """The model's parameters (:class:`HasParameters`); none for a plain callable."""
    try:
        parameters = cast(HasParameters, model).parameters
    except AttributeError:
        return iter(())
    return parameters()
