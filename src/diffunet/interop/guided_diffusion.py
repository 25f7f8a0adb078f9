"""Import guided-diffusion / Palette / EMDiffuse `UNetModel` state dicts.

These networks share diffunet's block layout (`input_blocks` / `middle_block` /
`output_blocks` / `out`, one loop over `channel_mult`), so the import is a renaming plus three
conversions:

* attention `qkv` and `proj_out` are 1×1 `Conv1d`s: their weights lose the trailing axis;
* the legacy head order (`QKVAttentionLegacy`, the default): the `3C` rows of `qkv` are
  `[head 0: q, k, v | head 1: q, k, v | ...]`, diffunet's are `[q: all heads | k | v]`.
  `attention_order="new"` (`use_new_attention_order=True`) is already diffunet's order;
* EMDiffuse / Palette feed `cat([cond, x])` to the stem (condition first), diffunet
  concatenates `cat([x, cond])`: the stem's input channels are permuted (`cond_first`).

The state dict carries no config: pass the diffunet config that describes the network (for
EMDiffuse-n, `preset("emdiffuse")`). Head counts do not show in weight shapes, so they must
match the original's `num_heads` / `num_head_channels`. Files are read from safetensors or with
`torch.load(weights_only=True)`; nothing else is unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from diffunet.errors import InvalidTypeError, InvalidValueError
from diffunet.interop.common import (
    OPENAIMODEL_RESBLOCK_RENAMES,
    ConversionError,
    assemble,
    null_label_row,
    read_weights,
)
from diffunet.model.checkpoint import clean_state_dict
from diffunet.model.config import UNetConfig

ATTENTION_ORDERS = ("legacy", "new")

_RENAMES = (
    (re.compile(r"^(?:time_embed|cond_embed)\.0\."), "time_embed.linear_1."),
    (re.compile(r"^(?:time_embed|cond_embed)\.2\."), "time_embed.linear_2."),
    (re.compile(r"^label_emb\."), "label_embed."),
    (re.compile(r"^out_variance\."), "out_logvar."),  # EMDiffuse's aleatoric head
    *OPENAIMODEL_RESBLOCK_RENAMES,
    (re.compile(r"\.(norm|qkv|proj_out)\.(weight|bias)$"), r".self_attn.\1.\2"),
)
_NETWORK_PREFIX = "denoise_fn."  # Palette / EMDiffuse wrap the UNet in a Network module


def legacy_qkv_to_fused(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder `qkv` rows from `[head: (q, k, v)]` (legacy) to `[(q, k, v): head]` (diffunet)."""
    rows = tensor.shape[0]
    if rows % (3 * heads):
        raise ConversionError(
            f"cannot import: a qkv tensor of {rows} rows does not split into "
            f"3 × {heads} heads; check num_heads / num_head_channels"
        )
    d = rows // (3 * heads)
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 3, d, *rest).transpose(0, 1).reshape(rows, *rest)


def _network_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = clean_state_dict(dict(state))
    if any(k.startswith(_NETWORK_PREFIX) for k in state):
        # The noise-schedule buffers next to denoise_fn are not part of the U-Net.
        state = {
            k[len(_NETWORK_PREFIX) :]: v for k, v in state.items() if k.startswith(_NETWORK_PREFIX)
        }
    return state


def state_dict_from_guided_diffusion(
    config: UNetConfig,
    state: Mapping[str, torch.Tensor],
    *,
    attention_order: str = "legacy",
    cond_first: bool = True,
) -> dict[str, torch.Tensor]:
    """Rename and convert a guided-diffusion-layout state dict into diffunet's for `config`."""
    if attention_order not in ATTENTION_ORDERS:
        raise InvalidValueError(
            f"attention_order={attention_order!r}: expected one of {ATTENTION_ORDERS}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in _network_tensors(state).items():
        new = key
        for pattern, replacement in _RENAMES:
            new = pattern.sub(replacement, new)
        value = value.detach().clone()
        if ".self_attn.qkv." in new or ".self_attn.proj_out." in new:
            if value.ndim == 3 and value.shape[-1] == 1:
                value = value[..., 0]  # Conv1d(kernel 1) weight -> Linear weight
            if ".qkv." in new and attention_order == "legacy":
                value = legacy_qkv_to_fused(value, config.heads_for(value.shape[0] // 3))
        elif new == "label_embed.weight" and config.num_classes is not None:
            value = null_label_row(value)
        elif new == "input_blocks.0.0.weight" and cond_first and config.cond_channels:
            c = config.cond_channels
            if value.shape[1] != config.input_channels:
                raise ConversionError(
                    f"cannot import: the stem takes {value.shape[1]} channels, the config "
                    f"{config.input_channels} (in_channels + cond_channels)"
                )
            value = torch.cat([value[:, c:], value[:, :c]], dim=1)  # [cond, x] -> [x, cond]
        out[new] = value
    return out


def from_guided_diffusion(
    source: str | Path | Mapping[str, torch.Tensor],
    config: UNetConfig,
    *,
    attention_order: str = "legacy",
    cond_first: bool = True,
    dtype: torch.dtype | None = None,
):
    """A diffunet `UNet` with the weights of a guided-diffusion / EMDiffuse `UNetModel`.

    Args:
        source: a state dict, a `.safetensors` file, or a PyTorch file (read with
            `weights_only=True`; a Palette/EMDiffuse `*_Network.pth` works as is).
        config: the diffunet config of the same network (e.g. `preset("emdiffuse")`).
        attention_order: "legacy" (`QKVAttentionLegacy`, the default there) or "new".
        cond_first: the original concatenates the condition before the noisy input
            (EMDiffuse, Palette); set False for models that put `x` first.
        dtype: cast the weights; None keeps the source's dtype.
    """
    if isinstance(source, (str, Path)):
        name, state = str(source), read_weights(source)
    elif isinstance(source, Mapping):
        name, state = "guided-diffusion state dict", dict(source)
    else:
        raise InvalidTypeError(
            f"source must be a path or a state dict, got {type(source).__name__}"
        )
    converted = state_dict_from_guided_diffusion(
        config, state, attention_order=attention_order, cond_first=cond_first
    )
    return assemble(config, converted, name, dtype)
