"""Named configurations, one per upstream U-Net this model reproduces (`timm`-style registry).

`preset(name, **overrides)` returns a validated :class:`UNetConfig`; `list_presets()` names
them all. Each entry names the upstream model it reproduces and which inconsistency of that
source it resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffunet.model.config import ConfigError, UNetConfig, attention_factors_for_sizes


@dataclass(frozen=True)
class Preset:
    """A named config, its provenance and the dimensionalities it is meant for."""

    name: str
    config: UNetConfig
    source: str
    notes: str
    dims: tuple[int, ...] = (2,)


_PRESETS: dict[str, Preset] = {}


def _register(
    name: str, source: str, notes: str, supports: tuple[int, ...] = (2,), **fields: Any
) -> None:
    _PRESETS[name] = Preset(name, UNetConfig(**fields), source, notes, supports)


def list_presets() -> list[str]:
    """Names of every preset, sorted."""
    return sorted(_PRESETS)


def preset_info(name: str) -> Preset:
    """The :class:`Preset` record of `name` (config, source, notes, dims)."""
    if name not in _PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}; available presets: {', '.join(list_presets())}"
        )
    return _PRESETS[name]


def preset(name: str, **overrides: Any) -> UNetConfig:
    """The config of preset `name` with `overrides` applied, e.g. `preset("ldm", dims=3)`."""
    config = preset_info(name).config
    return config.replace(**overrides) if overrides else config


_register(
    "efficient-unet",
    "EfficientUNetND, a flow-matching/diffusion codebase's 1D/2D/3D U-Net (`src.models.unet`)",
    "Linear attention at the encoder/decoder sites (the original's use_linear_attn=True), full "
    "attention in the middle block, 4 heads, scale-shift (FiLM) norm. `pool_factor` patchifies "
    "with a strided conv (kernel = stride = pool_factor). Works in 1D, 2D and 3D.",
    supports=(1, 2, 3),
    in_channels=4,
    out_channels=4,
    model_channels=256,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(1, 2, 4),
    attention_type="linear",
    mid_attention_type="full",
    num_heads=4,
    use_scale_shift_norm=True,
)

_register(
    "conditional-unet",
    "ConditionalUNet, an image-conditioned U-Net for frame prediction / image translation",
    "One skip per level; attention once per level at 120 and 60 for a 480 input (downsample "
    "factors 4 and 8: levels 3 and 4, as the original's walk-through shows). It states two "
    "defaults (2 in / 1 out at 120², and 6 in / 3 out at 480²); we follow its parameter list "
    "(noisy image + 1 condition channel → 1 output) at 480². Its attention projects Q/K/V twice "
    "(a 1×1 conv, then inside nn.MultiheadAttention); we keep one projection. Read at its "
    "120² defaults (attention at levels 1 and 2) the original has 19,483,137 parameters, ours "
    "19,054,593 (the difference is exactly the second projection); this 480² preset has "
    "19,713,025. Its quantization stubs are replaced by diffunet.interop.quantize's "
    "post-training int8 quantization.",
    in_channels=1,
    cond_channels=1,
    out_channels=1,
    model_channels=64,
    channel_mult=(1, 2, 3, 4),
    num_res_blocks=2,
    attention_resolutions=attention_factors_for_sizes(480, (120, 60)),
    dropout=0.1,
    time_embed_input_dim=256,
    time_embed_dim=1024,
    num_heads=8,
    norm_groups=32,
    skip_topology="per_level",
    upsample_type="nearest_conv",
    downsample_type="conv",
    flip_sin_to_cos=False,
    freq_shift=0.0,
    image_size=480,
    zero_init=False,
)

_register(
    "text-unet",
    "a text-conditioned DDPM U-Net with cross-attention to text-encoder tokens",
    "Attention at 16 and 8 for a 64 input (factors 4 and 8), 8 heads, cross-attention to "
    "768-wide text tokens at every attention site, transposed-conv upsampling, strided-conv "
    "downsampling, one skip per level (the diagram). The listed code pops a skip for blocks that "
    "were built without one and never calls its cross-attention; this is the described "
    "architecture, built correctly.",
    in_channels=3,
    out_channels=3,
    model_channels=128,
    channel_mult=(1, 2, 4, 8),
    num_res_blocks=2,
    attention_resolutions=attention_factors_for_sizes(64, (16, 8)),
    num_heads=8,
    context_dim=768,
    upsample_type="transposed",
    downsample_type="conv",
    skip_topology="per_level",
    dropout=0.1,
    flip_sin_to_cos=False,
    freq_shift=1.0,
    image_size=64,
    zero_init=False,
)

_EMDIFFUSE: dict[str, Any] = dict(
    in_channels=1,
    cond_channels=1,
    out_channels=1,
    model_channels=32,
    channel_mult=(1, 2, 4, 8),
    num_res_blocks=2,
    attention_resolutions=(),
    num_head_channels=32,
    dropout=0.2,
    time_embed_type="noise_level",
    use_scale_shift_norm=True,
    resblock_updown=True,
    flip_sin_to_cos=True,
    freq_shift=0.0,
    time_embed_scale=1.0,
)
_EMDIFFUSE_NOTES = (
    "EMDiffuse-n (guided-diffusion UNet as adapted by Palette/EMDiffuse): condition + noisy "
    "image in, continuous noise-level (gamma) embedding, scale-shift norm, ResBlock up/down, "
    "dropout 0.2. Its config's attn_res=16 is a downsample factor that four levels never reach, "
    "so the only attention is the middle block's, with 32-channel heads: 15,677,345 parameters "
    "as in the original. "
)
_register(
    "emdiffuse",
    "EMDiffuse-n (Lu et al., EMDiffuse, 2024): guided_diffusion_modules/unet.py",
    _EMDIFFUSE_NOTES,
    image_size=256,
    **_EMDIFFUSE,
)
_register(
    "emdiffuse-aleatoric",
    "EMDiffuse's aleatoric U-Net (Lu et al., EMDiffuse, 2024): unet_aleatoric.py",
    _EMDIFFUSE_NOTES + "Adds the variance head (GroupNorm → SiLU → zero-initialised 3×3 conv, "
    "+353 parameters); the output is mean then log-variance.",
    image_size=256,
    aleatoric=True,
    **_EMDIFFUSE,
)
_register(
    "emdiffuse-3d",
    "vEMDiffuse, EMDiffuse's volume model (Lu et al., EMDiffuse, 2024), as a true 3D U-Net",
    _EMDIFFUSE_NOTES + "The original's unet_3d is a 2D network with a slice-index embedding; "
    "this is a true 3D U-Net. For serial-section EM with coarse z, set resample_axes so the "
    "first levels only downsample H and W, e.g. ((1, 2), (1, 2), (0, 1, 2)).",
    supports=(3,),
    dims=3,
    image_size=32,
    **_EMDIFFUSE,
)

_register(
    "ldm",
    "CompVis latent diffusion (Rombach et al. 2022): the `Model` of ldm/modules/diffusionmodules/model.py",
    "ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention at 16 for a 256 input (factor 16), "
    "single-head attention as in LDM's AttnBlock, LDM's asymmetric downsample padding. Set "
    "attention_type to 'linear' or 'none' for LDM's other attn_types (the middle block "
    "follows). LDM's LinAttnBlock has no norm and no residual; ours has both.",
    in_channels=3,
    out_channels=3,
    model_channels=128,
    channel_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    attention_resolutions=attention_factors_for_sizes(256, (16,)),
    num_heads=1,
    dropout=0.0,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1.0,
    downsample_padding="asymmetric",
    image_size=256,
    zero_init=False,
)

_register(
    "ddpm-cifar10",
    "DDPM CIFAR-10 (Ho et al. 2020), as diffusers' UNet2DModel of google/ddpm-cifar10-32",
    "35,746,307 parameters, the same module structure as diffusers' UNet2DModel for "
    "google/ddpm-cifar10-32 (attention at 16×16, i.e. factor 2; downsample_padding=0, i.e. "
    "asymmetric), so its weights import exactly.",
    in_channels=3,
    out_channels=3,
    model_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(2,),
    num_head_channels=None,
    num_heads=1,
    dropout=0.1,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1.0,
    image_size=32,
    downsample_padding="asymmetric",
    zero_init=False,
)

_SD_NOTES = (
    "Transformer blocks (GroupNorm eps 1e-6, proj_in, pre-LayerNorm self-attention, "
    "cross-attention to the text tokens, GEGLU feed-forward, proj_out) at every attention site "
    "and in the middle block; nearest + 3×3 conv upsampling, stride-2 conv downsampling, "
    "one skip per block. Module for module the original, so `from_diffusers` and "
    "`from_stable_diffusion` import its weights exactly. "
)
_register(
    "sd15",
    "Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5): the CompVis UNetModel of "
    "v1-inference.yaml, diffusers UNet2DConditionModel",
    _SD_NOTES + "8 heads at every width, 1×1 convolutional projections, 768-wide CLIP ViT-L "
    "tokens; 64×64×4 latents for 512² images. 859,520,964 parameters.",
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(1, 2, 4),
    num_heads=8,
    context_dim=768,
    transformer_depth=1,
    image_size=64,
)
_register(
    "sd21",
    "Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1): the CompVis UNetModel of "
    "v2-inference-v.yaml, diffusers UNet2DConditionModel",
    _SD_NOTES + "64-channel heads (diffusers writes their counts, [5, 10, 20, 20], as "
    "attention_head_dim), linear projections, 1024-wide OpenCLIP ViT-H tokens, float16 "
    "attention computed in float32 (upcast_attention); 96×96×4 latents for 768² images. The 2.0 / 2.1 "
    "base models are the same network. 865,910,724 parameters.",
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(1, 2, 4),
    num_head_channels=64,
    context_dim=1024,
    transformer_depth=1,
    use_linear_projection=True,
    upcast_attention=True,
    image_size=96,
)
_register(
    "sdxl",
    "Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): the SGM "
    "UNetModel of sd_xl_base.yaml, diffusers UNet2DConditionModel",
    _SD_NOTES + "Three levels, no attention at the first, 2 and 10 transformer blocks at the "
    "others and 10 in the middle; 64-channel heads, linear projections, 2048-wide tokens "
    "(CLIP ViT-L and OpenCLIP ViT-bigG concatenated). The added conditioning: the pooled "
    "OpenCLIP embedding (1280) and 6 size / crop ids of 256 sinusoidal features each "
    "(added_cond_dim 2816), through an MLP into the time embedding: pass "
    "added_cond=(B, 1280) and time_ids=(B, 6). 128×128×4 latents for 1024² images. "
    "2,567,463,684 parameters.",
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attention_resolutions=(2, 4),
    num_head_channels=64,
    context_dim=2048,
    transformer_depth=(0, 2, 10),
    use_linear_projection=True,
    added_cond_dim=2816,
    added_time_embed_dim=256,
    image_size=128,
)
