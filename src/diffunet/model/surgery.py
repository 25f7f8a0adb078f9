"""Model surgery: change a trained model's interface without losing what it learned."""

from __future__ import annotations

import torch

from diffunet.errors import InvalidValueError
from diffunet.model.unet import UNet


def widen_input_channels(
    model: UNet, in_channels: int | None = None, cond_channels: int | None = None
) -> UNet:
    """A copy of `model` that takes more `x` and/or `cond` channels.

    The weights of the new input channels start at zero, so the widened model computes exactly
    what the original did until fine-tuning teaches it to use them (e.g. to add a conditioning
    image to an unconditional model). Existing channels keep their weights and order.
    """
    config = model.config
    in_channels = config.in_channels if in_channels is None else in_channels
    cond_channels = config.cond_channels if cond_channels is None else cond_channels
    if in_channels < config.in_channels or cond_channels < config.cond_channels:
        raise InvalidValueError(
            f"widen_input_channels only adds channels: got in_channels={in_channels}, "
            f"cond_channels={cond_channels} for a model with in_channels={config.in_channels}, "
            f"cond_channels={config.cond_channels}"
        )
    widened = UNet(config.replace(in_channels=in_channels, cond_channels=cond_channels))
    state = model.state_dict()
    stem_key = "input_blocks.0.0.weight"
    old = state[stem_key]
    new = torch.zeros(old.shape[0], in_channels + cond_channels, *old.shape[2:], dtype=old.dtype)
    new[:, : config.in_channels] = old[:, : config.in_channels]
    new[:, in_channels : in_channels + config.cond_channels] = old[:, config.in_channels :]
    state[stem_key] = new
    widened.load_state_dict(state)
    return widened.to(device=old.device)
