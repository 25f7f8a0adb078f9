"""The diffunet config of a diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x / XL).

The weights map as those of a `UNet2DModel` do (:mod:`diffunet.interop.diffusers`), each
`Transformer2DModel` becoming a `SpatialTransformer` and `add_embedding` the added-conditioning
MLP. Two readings of the config need care:

* `attention_head_dim` holds the number of heads per level, not their width (diffusers keeps
  the old name for compatibility): SD 1.x's 8 is 8 heads at every width, SD 2.x's
  `[5, 10, 20, 20]` is 64-channel heads. A list that is neither one count nor one width is
  refused.
* `transformer_layers_per_block` applies at the levels with cross-attention; the middle block
  takes its last entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffunet.interop.common import (
    ConversionError,
    check_block_types,
    converted_config,
    diffusers_options,
    diffusers_unet_fields,
    unsupported,
)
from diffunet.model.config import UNetConfig

CLASS_NAME = "UNet2DConditionModel"
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_BLOCK = "UNetMidBlock2DCrossAttn"

# Every UNet2DConditionModel.__init__ option (diffusers 0.42) and its default.
_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# The options diffunet takes only at these values; the others are translated below
# (`addition_embed_type_num_heads` only matters for addition_embed_type="text").
_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}


def _per_level(name: str, value: Any, levels: int) -> list[Any]:
    """An option given once or once per level, as a per-level list."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        return [value] * levels
    if len(value) != levels:
        raise unsupported(name, list(value), f"one value or one per level ({levels} levels)")
    return list(value)


def _uniform(name: str, value: Any, levels: int) -> Any:
    """An option diffunet takes once for the whole network."""
    values = _per_level(name, value, levels)
    if len(set(values)) > 1:
        raise unsupported(name, list(value), "the same value at every level")
    return values[0]


def _attention_levels(cfg: Mapping[str, Any], levels: int) -> list[bool]:
    """Which levels cross-attend."""
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    check_block_types(
        down,
        up,
        levels,
        (DOWN_BLOCKS, UP_BLOCKS),
        CLASS_NAME,
        "Simple, skip, K-diffusion and resnet-resampling blocks have no diffunet equivalent.",
    )
    attention = []
    for level in range(levels):
        d, u = DOWN_BLOCKS[down[level]], UP_BLOCKS[up[levels - 1 - level]]
        if d != u:
            raise ConversionError(
                f"cannot import: level {level} cross-attends on one side only (down "
                f"{down[level]!r}, up {up[levels - 1 - level]!r}); diffunet places attention at "
                "a resolution in both the encoder and the decoder"
            )
        attention.append(d)
    if cfg["mid_block_type"] != MID_BLOCK:
        raise unsupported(
            "mid_block_type",
            cfg["mid_block_type"],
            f"{MID_BLOCK!r}",
            "diffunet's middle block is two ResBlocks around its attention; diffusers builds "
            "one ResBlock for 'UNetMidBlock2D' and none for None.",
        )
    return attention


def _heads(
    cfg: Mapping[str, Any], channels: tuple[int, ...], sites: list[int]
) -> dict[str, int | None]:
    """`num_heads` or `num_head_channels` from diffusers' per-level head counts."""
    counts = _per_level("attention_head_dim", cfg["attention_head_dim"], len(channels))
    pairs = [(channels[level], counts[level]) for level in sites]
    if any(not isinstance(h, int) or h < 1 or w % h for w, h in pairs):
        raise unsupported(
            "attention_head_dim",
            cfg["attention_head_dim"],
            "head counts dividing each attention width (diffusers reads attention_head_dim as "
            f"the number of heads; widths {[w for w, _ in pairs]})",
        )
    if len({h for _, h in pairs}) == 1:
        return {"num_heads": pairs[0][1], "num_head_channels": None}
    if len({w // h for w, h in pairs}) == 1:
        return {"num_heads": 1, "num_head_channels": pairs[0][0] // pairs[0][1]}
    raise unsupported(
        "attention_head_dim",
        cfg["attention_head_dim"],
        "one head count at every attention width (SD 1.x: 8) or head counts that give one "
        "head width (SD 2.x / XL: [5, 10, 20] for 64-channel heads)",
    )


def _depths(
    cfg: Mapping[str, Any], attention: list[bool]
) -> tuple[int | tuple[int, ...], int | None]:
    """`transformer_depth` (0 at levels without attention) and `mid_transformer_depth` (the
    middle block takes the last entry)."""
    value = cfg["transformer_layers_per_block"]
    levels = len(attention)
    given = _per_level("transformer_layers_per_block", value, levels)
    if any(not isinstance(d, int) or d < 1 for d in given):
        raise unsupported(
            "transformer_layers_per_block",
            value,
            "a positive integer or one per level (per-layer lists are not supported)",
        )
    depths = tuple(d if a else 0 for d, a in zip(given, attention))
    if len({d for d in depths if d} | {given[-1]}) == 1:
        return given[-1], None
    return depths, (given[-1] if depths[-1] != given[-1] else None)


def config_from_diffusers_condition(diffusers_config: Mapping[str, Any]) -> UNetConfig:
    """The diffunet `UNetConfig` equivalent to a diffusers `UNet2DConditionModel` config.

    Raises :class:`ConversionError` naming the first option diffunet cannot express.
    """
    cfg = diffusers_options(diffusers_config, _DEFAULTS, CLASS_NAME)
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    levels = len(channels)
    cfg["only_cross_attention"] = _uniform(
        "only_cross_attention", cfg["only_cross_attention"], levels
    )
    for name, allowed in _FIXED.items():
        if cfg[name] not in allowed:
            raise unsupported(name, cfg[name], f"{list(allowed)}")
    fields = diffusers_unet_fields(cfg)
    attention = _attention_levels(cfg, levels)
    sites = [level for level in range(levels) if attention[level]] + [levels - 1]  # + middle
    depth, mid_depth = _depths(cfg, attention)
    added: dict[str, int | None] = {"added_cond_dim": None, "added_time_embed_dim": None}
    if cfg["addition_embed_type"] == "text_time":
        width, ids = cfg["projection_class_embeddings_input_dim"], cfg["addition_time_embed_dim"]
        if width is None or ids is None:
            raise ConversionError(
                "cannot import: addition_embed_type='text_time' needs "
                "projection_class_embeddings_input_dim and addition_time_embed_dim"
            )
        added = {"added_cond_dim": int(width), "added_time_embed_dim": int(ids)}
    return converted_config(
        **fields,
        num_res_blocks=int(_uniform("layers_per_block", cfg["layers_per_block"], levels)),
        attention_resolutions=tuple(2**i for i, a in enumerate(attention) if a),
        **_heads(cfg, channels, sites),
        context_dim=int(_uniform("cross_attention_dim", cfg["cross_attention_dim"], levels)),
        transformer_depth=depth,
        mid_transformer_depth=mid_depth,
        use_linear_projection=bool(cfg["use_linear_projection"]),
        upcast_attention=bool(cfg["upcast_attention"]),
        **added,
        downsample_padding="asymmetric" if cfg["downsample_padding"] == 0 else "symmetric",
    )
