"""Operand helpers shared by the accelerated convolutions: autocast dtypes, padded channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_output_channels(
    weight: torch.Tensor, bias: torch.Tensor | None, extra: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A convolution's weight and bias with `extra` zero output channels appended."""
    weight = F.pad(weight, [0, 0] * (weight.ndim - 1) + [0, extra])  # F.pad: last axis first
    return weight, None if bias is None else F.pad(bias, [0, extra])


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts a convolution's operands to on `device_type`; None where it is
    off, or for a device autocast does not know (such as "meta")."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # torch raises for devices without autocast
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`x`, `weight` and `bias` cast to autocast's dtype where autocast is on (as it casts a
    convolution's operands), else as they are."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
