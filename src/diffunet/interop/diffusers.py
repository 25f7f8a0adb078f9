"""Import diffusers `UNet2DModel` and `UNet2DConditionModel` checkpoints into the equivalent
diffunet `UNet`.

Every configuration that diffunet's config can express converts exactly (same outputs up to
float rounding); anything else raises a :class:`ConversionError` naming the option. The
`UNet2DConditionModel` config (Stable Diffusion) is read in
:mod:`diffunet.interop.diffusers_condition`; both share the weight mapping, block by block:

=====================================  ==========================================
diffusers                              diffunet
=====================================  ==========================================
`conv_in`                              `input_blocks.0.0` (stem)
`time_embedding.linear_1/2`            `time_embed.linear_1/2`
`class_embedding`                      `label_embed` (+ a zero null-label row)
`down_blocks[l].resnets[j]`            `input_blocks[k].0` (ResBlock)
`down_blocks[l].attentions[j]`         `input_blocks[k].1` (`to_q/k/v` fused to `qkv`;
                                       a `Transformer2DModel` keeps its names)
`add_embedding.linear_1/2`             `added_embed.linear_1/2` (SDXL)
`down_blocks[l].downsamplers.0`        `input_blocks[k].0` (`op` conv or a down ResBlock)
`mid_block.resnets/attentions`         `middle_block.0/1/2`
`up_blocks[L-1-l].resnets/attentions`  `output_blocks[k].0/1`
`up_blocks[L-1-l].upsamplers.0`        `output_blocks[k].-1` (`conv` or an up ResBlock)
`conv_norm_out`, `conv_out`            `out.0`, `out.2`
=====================================  ==========================================

diffusers is only needed to pass a live model; a checkpoint folder (`config.json` +
`diffusion_pytorch_model.safetensors`, or a `.bin` read with `weights_only=True`) is read
directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffunet.errors import InvalidTypeError
from diffunet.interop.common import (
    ConversionError,
    assemble,
    check_block_types,
    converted_config,
    diffusers_options,
    diffusers_unet_fields,
    null_label_row,
    read_weights,
    transformer_key,
    unsupported,
)
from diffunet.interop.diffusers_condition import CLASS_NAME as CONDITION_CLASS
from diffunet.interop.diffusers_condition import config_from_diffusers_condition
from diffunet.model.checkpoint import CheckpointError
from diffunet.model.config import UNetConfig

DIFFUSERS_CONFIG = "config.json"
CLASSES = ("UNet2DModel", CONDITION_CLASS)
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# block type -> (has attention, resampling kind or None = from down/upsample_type)
DOWN_BLOCKS = {
    "DownBlock2D": (False, "conv"),
    "AttnDownBlock2D": (True, None),
    "ResnetDownsampleBlock2D": (False, "resnet"),
}
UP_BLOCKS = {
    "UpBlock2D": (False, "conv"),
    "AttnUpBlock2D": (True, None),
    "ResnetUpsampleBlock2D": (False, "resnet"),
}

# Every UNet2DModel.__init__ option (diffusers 0.42) and the values diffunet accepts
# without translation; the translated ones are handled in `config_from_diffusers`.
_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu", "swish"),
    "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "downsample_type": ("conv", "resnet"),
    "upsample_type": ("conv", "resnet"),
}
_TRANSLATED = {
    "sample_size",
    "in_channels",
    "out_channels",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "dropout",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "add_attention",
    "num_class_embeds",
    "num_train_timesteps",
}
_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}


def _strip_prefix(block_type: str) -> str:
    return block_type[len("UNetRes") :] if block_type.startswith("UNetRes") else block_type


def _resampling(cfg: Mapping[str, Any]) -> tuple[tuple[bool, ...], bool]:
    """Per-level attention flags and whether resampling is done by ResBlocks."""
    down = [_strip_prefix(t) for t in cfg["down_block_types"]]
    up = [_strip_prefix(t) for t in cfg["up_block_types"]]
    levels = len(cfg["block_out_channels"])
    check_block_types(
        down,
        up,
        levels,
        (DOWN_BLOCKS, UP_BLOCKS),
        "UNet2DModel",
        "Cross-attention, skip and K-diffusion blocks have no diffunet equivalent in UNet2DModel "
        "form.",
    )
    attention, kinds = [], set()
    for level in range(levels):
        d_attn, d_kind = DOWN_BLOCKS[down[level]]
        u_attn, u_kind = UP_BLOCKS[up[levels - 1 - level]]
        if d_attn != u_attn:
            raise ConversionError(
                f"cannot import: level {level} has attention on one side only "
                f"(down {down[level]!r}, up {up[levels - 1 - level]!r}); diffunet places attention "
                "at a resolution in both the encoder and the decoder"
            )
        attention.append(d_attn)
        if level < levels - 1:  # every down block but the last one downsamples
            kinds.add(("down", d_kind or cfg["downsample_type"]))
        if level > 0:  # every up block but the last one (level 0) upsamples
            kinds.add(("up", u_kind or cfg["upsample_type"]))
    by_side = {side: {k for s, k in kinds if s == side} for side in ("down", "up")}
    if len(by_side["down"] | by_side["up"]) > 1:
        raise ConversionError(
            f"cannot import: resampling mixes convolutions and ResBlocks (down: "
            f"{sorted(by_side['down'])}, up: {sorted(by_side['up'])}); diffunet's resblock_updown "
            "applies to every level of both paths"
        )
    return tuple(attention), "resnet" in by_side["down"] | by_side["up"]


def config_from_diffusers(diffusers_config: Mapping[str, Any]) -> UNetConfig:
    """The diffunet `UNetConfig` equivalent to a diffusers `UNet2DModel` or (with
    `"_class_name": "UNet2DConditionModel"`, as its `config.json` has) `UNet2DConditionModel`
    config.

    Raises :class:`ConversionError` naming the first option diffunet cannot express.
    """
    class_name = dict(diffusers_config).get("_class_name", "UNet2DModel")
    if class_name == CONDITION_CLASS:
        return config_from_diffusers_condition(diffusers_config)
    if class_name != "UNet2DModel":
        raise unsupported("_class_name", class_name, f"{list(CLASSES)}")
    cfg = diffusers_options(diffusers_config, _DEFAULTS, "UNet2DModel")
    for name, allowed in _FIXED.items():
        if cfg[name] not in allowed:
            raise unsupported(name, cfg[name], f"{list(allowed)}")
    fields = diffusers_unet_fields(cfg)
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    attention, resnet_updown = _resampling(cfg)
    groups = fields["norm_groups"]
    attn_groups = cfg["attn_norm_num_groups"]
    # diffusers builds the middle attention without a GroupNorm in this one case.
    mid_norm = not (cfg["add_attention"] and attn_groups is None and fields["use_scale_shift_norm"])
    if cfg["add_attention"] and attn_groups not in (None, groups):
        raise unsupported(
            "attn_norm_num_groups", attn_groups, f"None or norm_num_groups ({groups})"
        )
    head_dim = cfg["attention_head_dim"]
    any_attention = any(attention) or cfg["add_attention"]
    heads: dict[str, Any] = {"num_heads": 1, "num_head_channels": None}
    if any_attention and head_dim is not None:
        widths = [channels[i] for i, a in enumerate(attention) if a]
        widths += [channels[-1]] if cfg["add_attention"] else []
        bad = sorted({w for w in widths if w % head_dim})
        if bad:
            raise unsupported(
                "attention_head_dim",
                head_dim,
                f"a divisor of every attention width (widths {bad} are not)",
            )
        heads = {"num_heads": 1, "num_head_channels": int(head_dim)}
    asymmetric = cfg["downsample_padding"] == 0 and not resnet_updown
    return converted_config(
        **fields,
        num_res_blocks=int(cfg["layers_per_block"]),
        attention_resolutions=tuple(2**i for i, a in enumerate(attention) if a),
        mid_attention_type=None if cfg["add_attention"] else "none",
        mid_attention_norm=mid_norm,
        **heads,
        resblock_updown=resnet_updown,
        downsample_padding="asymmetric" if asymmetric else "symmetric",
        zero_init=False,
    )


class _Source:
    """The diffusers tensors, consumed as they are mapped (so leftovers can be reported)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = dict(state)
        self.missing: list[str] = []

    def take(self, key: str, *aliases: str) -> torch.Tensor | None:
        for name in (key, *aliases):
            if name in self.state:
                return self.state.pop(name)
        self.missing.append(key)
        return None


def _resblock(out: dict, src: _Source, ours: str, theirs: str) -> None:
    for mine, their in (
        ("in_norm", "norm1"),
        ("in_conv", "conv1"),
        ("emb_proj", "time_emb_proj"),
        ("out_norm", "norm2"),
        ("out_conv", "conv2"),
    ):
        for p in ("weight", "bias"):
            out[f"{ours}.{mine}.{p}"] = src.take(f"{theirs}.{their}.{p}")
    if f"{theirs}.conv_shortcut.weight" in src.state:
        for p in ("weight", "bias"):
            out[f"{ours}.skip.{p}"] = src.take(f"{theirs}.conv_shortcut.{p}")


def _attention(out: dict, src: _Source, ours: str, theirs: str, norm: bool = True) -> None:
    for p in ("weight", "bias"):
        if norm:
            out[f"{ours}.self_attn.norm.{p}"] = src.take(f"{theirs}.group_norm.{p}")
        parts = [
            src.take(f"{theirs}.to_{n}.{p}", f"{theirs}.{old}.{p}")
            for n, old in (("q", "query"), ("k", "key"), ("v", "value"))
        ]
        out[f"{ours}.self_attn.qkv.{p}"] = (
            torch.cat(parts) if all(t is not None for t in parts) else None
        )
        out[f"{ours}.self_attn.proj_out.{p}"] = src.take(
            f"{theirs}.to_out.0.{p}", f"{theirs}.proj_attn.{p}"
        )


def _transformer(out: dict, src: _Source, ours: str, theirs: str) -> None:
    """A `Transformer2DModel`: every tensor under `theirs`, renamed as a `SpatialTransformer`'s."""
    prefix = f"{theirs}."
    keys = [k for k in src.state if k.startswith(prefix)]
    if not keys:
        src.missing.append(f"{prefix}*")
    for key in keys:
        out[f"{ours}.{transformer_key(key[len(prefix) :])}"] = src.take(key)


def _pair(out: dict, src: _Source, ours: str, theirs: str) -> None:
    for p in ("weight", "bias"):
        out[f"{ours}.{p}"] = src.take(f"{theirs}.{p}")


def state_dict_from_diffusers(
    config: UNetConfig, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename / fuse a `UNet2DModel` or `UNet2DConditionModel` state dict into diffunet's
    layout for `config`.

    Raises :class:`ConversionError` listing diffusers tensors that are missing or left over.
    """
    src = _Source(state)
    out: dict[str, torch.Tensor | None] = {}
    levels, blocks = config.num_levels, config.num_res_blocks

    def attention(ours: str, theirs: str, norm: bool = True) -> None:
        if config.uses_transformer:
            _transformer(out, src, ours, theirs)
        else:
            _attention(out, src, ours, theirs, norm)

    _pair(out, src, "input_blocks.0.0", "conv_in")
    for i in (1, 2):
        _pair(out, src, f"time_embed.linear_{i}", f"time_embedding.linear_{i}")
        if config.added_cond_dim is not None:
            _pair(out, src, f"added_embed.linear_{i}", f"add_embedding.linear_{i}")
    if config.num_classes is not None:
        weight = src.take("class_embedding.weight")
        out["label_embed.weight"] = None if weight is None else null_label_row(weight)
    k = 1
    for level in range(levels):
        for j in range(blocks):
            _resblock(out, src, f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}")
            if config.attention_at(level):
                attention(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}")
            k += 1
        if level < levels - 1:
            theirs = f"down_blocks.{level}.downsamplers.0"
            if config.resblock_updown:
                _resblock(out, src, f"input_blocks.{k}.0", theirs)
            else:
                _pair(out, src, f"input_blocks.{k}.0.op", f"{theirs}.conv")
            k += 1
    _resblock(out, src, "middle_block.0", "mid_block.resnets.0")
    mid = 1
    if config.resolved_mid_attention_type() != "none":
        attention("middle_block.1", "mid_block.attentions.0", config.mid_attention_norm)
        mid = 2
    _resblock(out, src, f"middle_block.{mid}", "mid_block.resnets.1")
    k = 0
    for level in reversed(range(levels)):
        up = levels - 1 - level
        for j in range(blocks + 1):
            _resblock(out, src, f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}")
            index = 1
            if config.attention_at(level):
                attention(f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}")
                index = 2
            if j == blocks and level > 0:
                theirs = f"up_blocks.{up}.upsamplers.0"
                if config.resblock_updown:
                    _resblock(out, src, f"output_blocks.{k}.{index}", theirs)
                else:
                    _pair(out, src, f"output_blocks.{k}.{index}.conv", f"{theirs}.conv")
            k += 1
    _pair(out, src, "out.0", "conv_norm_out")
    _pair(out, src, "out.2", "conv_out")
    problems = []
    if src.missing:
        problems.append(
            f"missing diffusers tensors {src.missing[:6]}"
            + (f" ... ({len(src.missing)} in all)" if len(src.missing) > 6 else "")
        )
    if src.state:
        left = sorted(src.state)
        problems.append(
            f"unexpected diffusers tensors {left[:6]}"
            + (f" ... ({len(left)} in all)" if len(left) > 6 else "")
        )
    if problems:
        raise ConversionError(
            "cannot import: the weights do not match their config: " + "; ".join(problems)
        )
    return {k: v.detach().clone() for k, v in out.items() if v is not None}


def _locate(path: Path, subfolder: str | None) -> Path:
    if not path.exists():
        raise CheckpointError(f"diffusers model folder {path} does not exist")
    if subfolder:
        path = path / subfolder
    elif not (path / DIFFUSERS_CONFIG).is_file() and (path / "unet" / DIFFUSERS_CONFIG).is_file():
        path = path / "unet"  # a pipeline folder: the model lives in unet/
    if not (path / DIFFUSERS_CONFIG).is_file():
        raise CheckpointError(
            f"{path} has no {DIFFUSERS_CONFIG}; expected a diffusers "
            "UNet2DModel / UNet2DConditionModel folder (or a pipeline folder with unet/)"
        )
    return path


def load_diffusers_folder(
    path: str | Path, subfolder: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config dict and state dict of a saved diffusers U-Net (no diffusers import needed)."""
    folder = _locate(Path(path), subfolder)
    try:
        config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder / DIFFUSERS_CONFIG} is not valid JSON ({err})") from err
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return config, read_weights(folder / name)
    raise CheckpointError(f"{folder} has none of {list(DIFFUSERS_WEIGHTS)}")


def from_diffusers(
    model_or_path: Any, *, subfolder: str | None = None, dtype: torch.dtype | None = None
):
    """A diffunet `UNet` with the weights of a diffusers `UNet2DModel` or
    `UNet2DConditionModel` (same outputs).

    A `UNet2DConditionModel`'s `encoder_hidden_states` is diffunet's `context`; SDXL's
    `added_cond_kwargs={"text_embeds": ..., "time_ids": ...}` are `added_cond=` and `time_ids=`.

    Args:
        model_or_path: a diffusers model, or a folder saved by its `save_pretrained` (a
            pipeline folder with a `unet/` subfolder also works).
        subfolder: the model's subfolder inside `model_or_path`, if not found automatically.
        dtype: cast the weights; None keeps the source's dtype.

    Returns the model in eval mode, on the CPU.
    """
    if isinstance(model_or_path, (str, Path)):
        diffusers_config, state = load_diffusers_folder(model_or_path, subfolder)
        source = str(model_or_path)
    elif hasattr(model_or_path, "config") and hasattr(model_or_path, "state_dict"):
        name = type(model_or_path).__name__
        if name not in CLASSES:
            raise unsupported("model class", name, " or ".join(f"diffusers.{c}" for c in CLASSES))
        diffusers_config = {"_class_name": name, **dict(model_or_path.config)}
        state = {k: v.detach().cpu() for k, v in model_or_path.state_dict().items()}
        source = f"diffusers {name}"
    else:
        raise InvalidTypeError(
            f"from_diffusers expects a UNet2DModel, a UNet2DConditionModel or a folder path, got "
            f"{type(model_or_path).__name__}"
        )
    config = config_from_diffusers(diffusers_config)
    return assemble(config, state_dict_from_diffusers(config, state), source, dtype)
