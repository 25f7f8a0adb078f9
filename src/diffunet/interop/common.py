"""Shared pieces of the weight importers: the error type, safe file reading, assembly."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffunet.errors import InvalidValueError
from diffunet.model.checkpoint import CheckpointError, _build_with_weights, load_state_dict
from diffunet.model.config import ConfigError, UNetConfig

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ConversionError(InvalidValueError):
    """A model that diffunet cannot import exactly; the message names the offending option."""


#: guided-diffusion's `openaimodel.py` ResBlock names (CompVis' fork keeps them) → diffunet's.
OPENAIMODEL_RESBLOCK_RENAMES = (
    (re.compile(r"\.in_layers\.0\."), ".in_norm."),
    (re.compile(r"\.in_layers\.2\."), ".in_conv."),
    (re.compile(r"\.emb_layers\.1\."), ".emb_proj."),
    (re.compile(r"\.out_layers\.0\."), ".out_norm."),
    (re.compile(r"\.out_layers\.3\."), ".out_conv."),
    (re.compile(r"\.skip_connection\."), ".skip."),
)


def unsupported(option: str, given: object, supported: str, fix: str = "") -> ConversionError:
    """A :class:`ConversionError` for one option: what was given, what diffunet supports."""
    message = f"cannot import: {option}={given!r} is not supported (diffunet supports {supported})."
    if fix:
        message += f" {fix}"
    return ConversionError(message)


def check_block_types(
    down: list[str],
    up: list[str],
    levels: int,
    tables: tuple[Mapping[str, object], Mapping[str, object]],
    class_name: str,
    fix: str,
) -> None:
    """Raise :class:`ConversionError` unless a diffusers U-Net has one down and one up block per
    level, each of a type in `tables` (down, up); `fix` says what the other types are."""
    if len(down) != levels or len(up) != levels:
        raise ConversionError(
            f"cannot import: {len(down)} down_block_types and {len(up)} up_block_types for "
            f"{levels} block_out_channels; a {class_name} has one of each per level"
        )
    for name, table, types in zip(("down_block_types", "up_block_types"), tables, (down, up)):
        for block in types:
            if block not in table:
                raise unsupported(name, block, f"{sorted(table)}", fix)


def diffusers_options(
    diffusers_config: Mapping[str, object], defaults: Mapping[str, object], class_name: str
) -> dict[str, Any]:
    """A diffusers model config's options over `defaults` (every option of `class_name`'s
    `__init__`), private `_` keys dropped; an option the importer does not know raises."""
    raw = {k: v for k, v in dict(diffusers_config).items() if not k.startswith("_")}
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ConversionError(
            f"cannot import: unknown {class_name} option(s) {unknown} (this importer knows the "
            "options of diffusers 0.42); they may change the network"
        )
    return {**defaults, **raw}


def diffusers_unet_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `UNetConfig` fields that diffusers' `UNet2DModel` and `UNet2DConditionModel` state
    alike (sizes, widths, norms, dropout, time and class embeddings, resampling), after checking
    that diffunet can express them; `cfg` holds every option (:func:`diffusers_options`)."""
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise unsupported(
            "block_out_channels",
            list(channels),
            "multiples of the first entry (diffunet's model_channels × channel_mult)",
        )
    if cfg["norm_num_groups"] is None:
        raise unsupported("norm_num_groups", None, "an integer number of GroupNorm groups")
    if cfg["downsample_padding"] not in (0, 1):
        raise unsupported(
            "downsample_padding",
            cfg["downsample_padding"],
            "1 (pad 1 on each side) or 0 (pad one row and column at the end)",
        )
    sample = cfg["sample_size"]
    if isinstance(sample, (list, tuple)):
        sample = tuple(int(s) for s in sample)
    return dict(
        dims=2,
        in_channels=int(cfg["in_channels"]),
        out_channels=int(cfg["out_channels"]),
        image_size=sample,
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        norm_groups=int(cfg["norm_num_groups"]),
        norm_eps=float(cfg["norm_eps"]),
        dropout=float(cfg["dropout"]),
        attention_type="full",
        num_classes=cfg["num_class_embeds"],
        time_embed_dim=cfg["time_embedding_dim"],
        flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
        freq_shift=float(cfg["freq_shift"]),
        use_scale_shift_norm=cfg["resnet_time_scale_shift"] == "scale_shift",
        skip_topology="per_block",
        downsample_type="conv",
        upsample_type="nearest_conv",
    )


def converted_config(**fields: Any) -> UNetConfig:
    """`UNetConfig(**fields)`, with an invalid result reported as a :class:`ConversionError`."""
    try:
        return UNetConfig(**fields)
    except ConfigError as err:
        raise ConversionError(
            f"cannot import: the equivalent diffunet config is invalid: {err}"
        ) from err


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


# A Stable Diffusion transformer's tensor names (CompVis and diffusers alike) that differ from
# `SpatialTransformer`'s: the output projection and the feed-forward are no Sequentials here.
_TRANSFORMER_RENAMES = (
    (".to_out.0.", ".to_out."),
    (".ff.net.0.proj.", ".ff.proj."),
    (".ff.net.2.", ".ff.out."),
)


def transformer_key(key: str) -> str:
    """A tensor name inside a CompVis `SpatialTransformer` / diffusers `Transformer2DModel`
    (`transformer_blocks.0.ff.net.2.weight`) as diffunet's `SpatialTransformer` names it."""
    key = "." + key
    for theirs, ours in _TRANSFORMER_RENAMES:
        key = key.replace(theirs, ours)
    return key[1:]


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
