"""Classifier-free guidance (Ho & Salimans 2022): conditioning dropout in training, guided sampling.

The unconditional model is the same network with its conditioning removed: class labels become
`model.null_label` and cross-attention context becomes zeros. An image `cond` (image-to-image
diffusion) is part of the task, not of the guidance, and is never dropped.
"""

from __future__ import annotations

from typing import cast

import torch

from diffunet.diffusion.model_protocol import ClassConditionalDenoiser, DenoisingModel
from diffunet.errors import InvalidValueError


def null_label_of(model: DenoisingModel) -> int:
    """The model's "no label" index (`model.null_label`), with a clear error when it has none.

    The attribute is read (not matched by `isinstance`) so that wrappers that forward it, and a
    `null_label` property that raises for a model without classes, behave alike.
    """
    try:
        null = cast(ClassConditionalDenoiser, model).null_label
    except (AttributeError, ValueError) as err:
        raise InvalidValueError(
            "labels were given for classifier-free guidance or conditioning dropout, but the model "
            "has no null label (model.null_label): build it with num_classes=<classes> (diffunet "
            "reserves index num_classes as the null label) or drop the labels / guidance"
        ) from err
    return int(null)


def unconditional(
    context: torch.Tensor | None, labels: torch.Tensor | None, null_label: int | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The conditioning of the unconditional model: zero context, null labels."""
    if context is not None:
        context = torch.zeros_like(context)
    if labels is not None:
        labels = null_labels(labels, null_label)
    return context, labels


def null_labels(labels: torch.Tensor, null_label: int | None) -> torch.Tensor:
    """`labels` replaced by the null label, which must be known."""
    if null_label is None:
        raise InvalidValueError(
            "labels cannot be made unconditional without the model's null label (model.null_label)"
        )
    return torch.full_like(labels, null_label)


def drop_conditioning(
    context: torch.Tensor | None,
    labels: torch.Tensor | None,
    prob: float,
    null_label: int | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Replace the conditioning of each sample by the unconditional one with probability `prob`.

    Labels and context of a sample are dropped together, so the network learns one unconditional
    model.
    """
    reference = labels if labels is not None else context
    if prob <= 0.0 or reference is None:
        return context, labels
    batch = reference.shape[0]
    device = generator.device if generator is not None else "cpu"
    drop = (torch.rand(batch, generator=generator, device=device) < prob).to(reference.device)
    if context is not None:
        mask = drop.reshape(-1, *([1] * (context.ndim - 1)))
        context = torch.where(mask, torch.zeros_like(context), context)
    if labels is not None:
        labels = torch.where(drop, null_labels(labels, null_label), labels)
    return context, labels


def guide(cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: float) -> torch.Tensor:
    """`uncond + scale · (cond − uncond)`: scale 1 is the conditional prediction, 0 the unconditional."""
    return uncond_output + scale * (cond_output - uncond_output)
