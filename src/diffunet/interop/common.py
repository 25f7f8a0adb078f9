"""Shared pieces of the weight importers: the error type, safe file reading, assembly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from diffunet.errors import InvalidValueError
from diffunet.model.checkpoint import CheckpointError, _build_with_weights, load_state_dict
from diffunet.model.config import UNetConfig

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ConversionError(InvalidValueError):
    """A model that diffunet cannot import exactly; the message names the offending option."""


def unsupported(option: str, given: object, supported: str, fix: str = "") -> ConversionError:
    """A :class:`ConversionError` for one option: what was given, what diffunet supports."""
    message = f"cannot import: {option}={given!r} is not supported (diffunet supports {supported})."
    if fix:
        message += f" {fix}"
    return ConversionError(message)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a PyTorch file loaded with `weights_only=True`.

    Nothing is ever unpickled beyond what `torch.load(weights_only=True)` allows (tensors and
    plain containers). A nested `{"state_dict": {...}}` / `{"model": {...}}` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    if path.suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown weights format {path.suffix!r}; expected .safetensors or a "
            f"PyTorch file ({', '.join(_TORCH_SUFFIXES)})"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for disallowed globals, EOFError when truncated, ...
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{err}); diffunet never fully unpickles files. Re-save it as safetensors."
        ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(data)


def null_label_row(weight: torch.Tensor) -> torch.Tensor:
    """A label table with diffunet's extra null-label row (zeros) appended."""
    return torch.cat([weight, weight.new_zeros(1, weight.shape[1])])


def assemble(
    config: UNetConfig,
    state: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
):
    """Build a `UNet` for `config` holding exactly `state` (checked against the config).

    The model keeps the dtype of `state` unless `dtype` is given.
    """
    from diffunet.model.unet import UNet

    try:
        model = _build_with_weights(UNet, config, state, source)
    except CheckpointError as err:
        raise ConversionError(str(err)) from err
    return model.to(dtype=dtype).eval()
