"""Import the U-Net of an original Stable Diffusion single-file checkpoint (CompVis SD 1.x /
Stability SD 2.x `.ckpt` / `.safetensors`, SGM SDXL `.safetensors`).

The U-Net's tensors are the `model.diffusion_model.*` entries of the file (the VAE and text
encoders next to them are not read). CompVis' `UNetModel` has diffunet's block layout
(`input_blocks` / `middle_block` / `output_blocks` / `out`, the same indices), so the import is
a renaming:

==========================================  =====================================
CompVis / SGM                               diffunet
==========================================  =====================================
`time_embed.0`, `time_embed.2`              `time_embed.linear_1`, `.linear_2`
`label_emb.0.0`, `label_emb.0.2` (SDXL)     `added_embed.linear_1`, `.linear_2`
ResBlock `in_layers.0` / `.2`               `in_norm` / `in_conv`
ResBlock `emb_layers.1`                     `emb_proj`
ResBlock `out_layers.0` / `.3`              `out_norm` / `out_conv`
ResBlock `skip_connection`                  `skip`
transformer `attn*.to_out.0`                `attn*.to_out`
transformer `ff.net.0.proj`, `ff.net.2`     `ff.proj`, `ff.out`
==========================================  =====================================

The file carries no config. The sd15 / sd21 / sdxl preset is recognised from the width of the
text tokens (768 / 1024 / 2048), with the input and output channels read from the weights
(inpainting models take 9 channels); any other network needs its `config`. Head counts do not
show in weight shapes: a config must state the original's. Files are read with safetensors or
`torch.load(weights_only=True)`; nothing else is unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from diffunet.errors import InvalidTypeError
from diffunet.interop.common import (
    OPENAIMODEL_RESBLOCK_RENAMES,
    ConversionError,
    assemble,
    null_label_row,
    read_weights,
    transformer_key,
)
from diffunet.model.checkpoint import CheckpointError
from diffunet.model.config import UNetConfig
from diffunet.model.presets import preset

#: The prefix of the U-Net's tensors in a Stable Diffusion checkpoint.
UNET_PREFIX = "model.diffusion_model."
#: The prefix of the flattened EMA copies in CompVis training checkpoints.
EMA_PREFIX = "model_ema."
#: The preset of each width of the text tokens.
PRESET_BY_CONTEXT = {768: "sd15", 1024: "sd21", 2048: "sdxl"}

_RENAMES = (
    (re.compile(r"^time_embed\.0\."), "time_embed.linear_1."),
    (re.compile(r"^time_embed\.2\."), "time_embed.linear_2."),
    (re.compile(r"^label_emb\.0\.0\."), "added_embed.linear_1."),
    (re.compile(r"^label_emb\.0\.2\."), "added_embed.linear_2."),
    (re.compile(r"^label_emb\.weight$"), "label_embed.weight"),
    *OPENAIMODEL_RESBLOCK_RENAMES,
)


def _read_unet_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file (a safetensors file: only the U-Net's and the EMA copies)."""
    if path.suffix != ".safetensors":
        return read_weights(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            unet = [n for n in names if n.startswith((UNET_PREFIX, EMA_PREFIX))]
            # Without the prefix, the file is a bare U-Net state dict.
            return {name: handle.get_tensor(name) for name in unet or names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err


def unet_tensors(state: Mapping[str, torch.Tensor], ema: bool = False) -> dict[str, torch.Tensor]:
    """The U-Net's tensors of a Stable Diffusion checkpoint, without their prefix.

    `ema` takes CompVis' EMA copies (`model_ema.diffusion_modelinput_blocks00weight`) instead
    of the trained weights. A state dict that is already the bare U-Net is returned as it is.
    """
    names = [k for k in state if k.startswith(UNET_PREFIX)]
    if not names:
        if "input_blocks.0.0.weight" in state:
            if ema:
                raise ConversionError("cannot import EMA weights: the file is a bare U-Net")
            return dict(state)
        raise ConversionError(
            f"cannot import: no {UNET_PREFIX}* tensors (nor a bare U-Net's input_blocks.0.0) "
            "in the file; is it a Stable Diffusion checkpoint?"
        )
    if not ema:
        return {k[len(UNET_PREFIX) :]: state[k] for k in names}
    out = {}
    for key in names:
        flat = EMA_PREFIX + "".join(key.split(".")[1:])
        if flat not in state:
            raise ConversionError(
                f"cannot import EMA weights: the file has no {flat} (it holds no EMA copy, or "
                "only the EMA weights already); use ema=False"
            )
        out[key[len(UNET_PREFIX) :]] = state[flat]
    return out


def infer_config(state: Mapping[str, torch.Tensor]) -> UNetConfig:
    """The sd15 / sd21 / sdxl preset whose network the U-Net tensors `state` belong to."""
    widths = sorted({v.shape[1] for k, v in state.items() if k.endswith(".attn2.to_k.weight")})
    name = PRESET_BY_CONTEXT.get(widths[0]) if len(widths) == 1 else None
    if name is None or (name == "sdxl") != ("label_emb.0.0.weight" in state):
        raise ConversionError(
            f"cannot tell which Stable Diffusion U-Net this is (text-token widths {widths}; "
            f"known: {PRESET_BY_CONTEXT}); pass config= (a preset name such as 'sd15', or a "
            "UNetConfig describing the network)"
        )
    config = preset(name)
    stem, head = state.get("input_blocks.0.0.weight"), state.get("out.2.weight")
    if stem is not None and head is not None:
        config = config.replace(in_channels=stem.shape[1], out_channels=head.shape[0])
    return config


def _check_projections(config: UNetConfig, state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if key.endswith(".proj_in.weight"):
            linear = value.ndim == 2
            if config.uses_transformer and linear != config.use_linear_projection:
                kind = "linear layers (SD 2.x, XL)" if linear else "1×1 convolutions (SD 1.x)"
                raise ConversionError(
                    f"cannot import: the checkpoint's transformer projections are {kind}, the "
                    f"config has use_linear_projection={config.use_linear_projection}"
                )
            return


def state_dict_from_stable_diffusion(
    config: UNetConfig, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a CompVis / SGM U-Net state dict (prefix removed) into diffunet's for `config`."""
    _check_projections(config, state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in _RENAMES:
            new = pattern.sub(replacement, new)
        new = transformer_key(new)
        value = value.detach().clone()
        if new == "label_embed.weight" and config.num_classes is not None:
            value = null_label_row(value)
        out[new] = value
    return out


def from_stable_diffusion(
    source: str | Path | Mapping[str, torch.Tensor],
    config: UNetConfig | str | None = None,
    *,
    ema: bool = False,
    dtype: torch.dtype | None = None,
):
    """A diffunet `UNet` with the U-Net weights of a Stable Diffusion single-file checkpoint.

    Args:
        source: a `.safetensors` file, a `.ckpt` / `.pt` file (read with
            `torch.load(weights_only=True)`), or the checkpoint's state dict.
        config: a preset name (`"sd15"`, `"sd21"`, `"sdxl"`) or the `UNetConfig` of the
            network; None recognises the three presets from the weights.
        ema: take the EMA copy of a CompVis training checkpoint instead of the weights.
        dtype: cast the weights; None keeps the file's dtype.

    Returns the model in eval mode, on the CPU. It is called as
    `model(latents, t, context=text_tokens)`, and for SDXL with `added_cond=pooled` and
    `time_ids=size_and_crop_ids`.
    """
    if isinstance(source, (str, Path)):
        name, state = str(source), _read_unet_tensors(Path(source))
    elif isinstance(source, Mapping):
        name, state = "Stable Diffusion state dict", dict(source)
    else:
        raise InvalidTypeError(
            f"source must be a path or a state dict, got {type(source).__name__}"
        )
    unet = unet_tensors(state, ema=ema)
    if config is None:
        config = infer_config(unet)
    elif isinstance(config, str):
        config = preset(config)
    elif not isinstance(config, UNetConfig):
        raise InvalidTypeError(
            f"config must be a preset name, a UNetConfig or None, got {type(config).__name__}"
        )
    return assemble(config, state_dict_from_stable_diffusion(config, unet), name, dtype)
