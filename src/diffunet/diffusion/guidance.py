"""Classifier-free guidance (Ho & Salimans 2022): conditioning dropout in training, guided sampling.

The unconditional model is the same network with its conditioning removed: class labels become
`model.null_label`, cross-attention context becomes zeros and an added vector conditioning
(SDXL's pooled text embedding, `added_cond`) becomes zeros, unless the caller gives the
unconditional context / added conditioning explicitly (`null_context`, `null_added_cond`: e.g.
Stable Diffusion's empty-prompt embedding, or a negative prompt's). An image `cond`
(image-to-image diffusion) and SDXL's size / crop `time_ids` are part of the task, not of the
guidance, and are never dropped.
"""

from __future__ import annotations

from typing import cast

import torch

from diffunet.diffusion.model_protocol import ClassConditionalDenoiser, DenoisingModel
from diffunet.errors import InvalidTypeError, InvalidValueError


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
    context: torch.Tensor | None,
    labels: torch.Tensor | None,
    null_label: int | None,
    *,
    added_cond: torch.Tensor | None = None,
    null_context: torch.Tensor | None = None,
    null_added_cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The conditioning of the unconditional model, as `(context, labels, added_cond)`:
    `null_context` (default zeros) for the context, null labels, and `null_added_cond`
    (default zeros) for the added conditioning; each only where the conditional one is given.

    `null_context` / `null_added_cond` must already have the shape of `context` /
    `added_cond` (see :func:`broadcast_null`).
    """
    if context is not None:
        context = torch.zeros_like(context) if null_context is None else null_context
    if labels is not None:
        labels = null_labels(labels, null_label)
    if added_cond is not None:
        added_cond = torch.zeros_like(added_cond) if null_added_cond is None else null_added_cond
    return context, labels, added_cond


def broadcast_null(
    name: str, null: object, conditional_name: str, conditional: torch.Tensor | None
) -> torch.Tensor | None:
    """`null` (the unconditional counterpart of `conditional`, e.g. `null_context` of `context`)
    broadcast to `conditional`'s shape, dtype and device; None when `null` is None.

    Raises when `null` is given without `conditional`, is not a floating-point tensor, or does
    not broadcast (a batch of 1 or of B, the same trailing sizes).
    """
    if null is None:
        return None
    if not isinstance(null, torch.Tensor) or not null.is_floating_point():
        given = f"dtype {null.dtype}" if isinstance(null, torch.Tensor) else type(null).__name__
        raise InvalidTypeError(
            f"{name} must be a floating-point tensor (the unconditional {conditional_name}), "
            f"got {given}"
        )
    if conditional is None:
        raise InvalidValueError(
            f"{name} was given without {conditional_name}: it replaces {conditional_name} in "
            f"classifier-free guidance's unconditional pass; pass {conditional_name}=... too, "
            f"or leave {name}=None"
        )
    try:
        fits = torch.broadcast_shapes(null.shape, conditional.shape) == conditional.shape
    except RuntimeError:
        fits = False
    if not fits:
        shape = tuple(conditional.shape)
        raise InvalidValueError(
            f"{name} has shape {tuple(null.shape)}, which does not broadcast to "
            f"{conditional_name}'s shape {shape}; expected (1, {', '.join(map(str, shape[1:]))}) "
            f"for one unconditional input shared by the batch, or {shape}"
        )
    null = null.to(device=conditional.device, dtype=conditional.dtype)
    return null.expand_as(conditional).contiguous()


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
    model. :func:`drop_guided_conditioning` also drops an added conditioning.
    """
    context, labels, _ = drop_guided_conditioning(
        context, labels, None, prob, null_label, generator
    )
    return context, labels


def drop_guided_conditioning(
    context: torch.Tensor | None,
    labels: torch.Tensor | None,
    added_cond: torch.Tensor | None,
    prob: float,
    null_label: int | None,
    generator: torch.Generator | None = None,
    *,
    null_context: torch.Tensor | None = None,
    null_added_cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`drop_conditioning` of `(context, labels, added_cond)`: each sample's context and
    added conditioning become their unconditional versions and its label the null label, all
    together, with probability `prob`.

    The unconditional context and added conditioning are zeros unless `null_context` /
    `null_added_cond` give them (already broadcast to `context` / `added_cond`'s shape, see
    :func:`broadcast_null`), as guidance's unconditional pass takes them (:func:`unconditional`):
    e.g. Stable Diffusion's empty-prompt embedding. One uniform number per sample is drawn (on
    the generator's device, the CPU by default) when `prob > 0` and any of the three is given;
    nothing is drawn otherwise.
    """
    given = [v for v in (labels, context, added_cond) if v is not None]
    if prob <= 0.0 or not given:
        return context, labels, added_cond
    batch = given[0].shape[0]
    device = generator.device if generator is not None else "cpu"
    drop = torch.rand(batch, generator=generator, device=device) < prob

    def dropped(value: torch.Tensor, null: torch.Tensor | None) -> torch.Tensor:
        mask = drop.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
        return torch.where(mask, torch.zeros_like(value) if null is None else null, value)

    if context is not None:
        context = dropped(context, null_context)
    if added_cond is not None:
        added_cond = dropped(added_cond, null_added_cond)
    if labels is not None:
        labels = torch.where(drop.to(labels.device), null_labels(labels, null_label), labels)
    return context, labels, added_cond


def dropped_for_training(
    model: DenoisingModel,
    prob: float,
    context: torch.Tensor | None,
    labels: torch.Tensor | None,
    added_cond: torch.Tensor | None,
    generator: torch.Generator | None,
    *,
    null_context: object = None,
    null_added_cond: object = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A training batch's `(context, labels, added_cond)` after conditioning dropout with
    probability `prob` (:func:`drop_guided_conditioning`), the unconditional inputs checked
    and broadcast (:func:`broadcast_null`) and the null label read from `model` where needed."""
    null_context = broadcast_null("null_context", null_context, "context", context)
    null_added_cond = broadcast_null("null_added_cond", null_added_cond, "added_cond", added_cond)
    null = null_label_of(model) if prob > 0 and labels is not None else None
    return drop_guided_conditioning(
        context,
        labels,
        added_cond,
        prob,
        null,
        generator,
        null_context=null_context,
        null_added_cond=null_added_cond,
    )


def guide(cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: float) -> torch.Tensor:
    """`uncond + scale · (cond − uncond)`: scale 1 is the conditional prediction, 0 the unconditional."""
    return uncond_output + scale * (cond_output - uncond_output)
