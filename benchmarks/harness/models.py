"""What the benchmarks compare: the cases, our model as the library runs it, and the reference
model of identical architecture (diffusers `UNet2DModel` / `UNet2DConditionModel`, MONAI
`DiffusionModelUNet`)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffunet.accel import accelerate, memory_format_for
from diffunet.model.config import UNetConfig
from diffunet.model.presets import preset
from diffunet.model.unet import UNet

MODEL_CASES = ("ddpm-cifar10", "ldm", "3d", "sd15")


# ---------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One benchmark case: our config, the reference library, batch and spatial size."""

    name: str
    config: UNetConfig
    reference: str  # "diffusers" or "monai"
    batch: int
    size: tuple[int, ...]
    unit: str  # "img" or "vol"
    description: str
    context_tokens: int = 0
    """Text tokens per sample (of width `config.context_dim`) both sides cross-attend to; 0
    for a model without cross-attention."""

    @property
    def dims(self) -> int:
        """Spatial dimensionality."""
        return self.config.dims


#: The 3D case, written as our config: MONAI's `DiffusionModelUNet` with channels (64, 128,
#: 256, 256), attention at the last level, 32-channel heads, 2 res blocks, GroupNorm 32 / eps
#: 1e-6, strided-conv down, nearest + conv up, per-block skips and an additive time embedding
#: 64 → 256 has the same modules: 68,585,025 parameters.
UNET_3D = UNetConfig(
    dims=3,
    in_channels=1,
    cond_channels=1,
    out_channels=1,
    model_channels=64,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(8,),
    num_head_channels=32,
    norm_groups=32,
    norm_eps=1e-6,
    zero_init=False,
)


#: The 2D cases: preset → (size, batch) at full scale and in `--quick` mode.
_PRESET_CASES = {"ddpm-cifar10": ((32, 128), (16, 2)), "ldm": ((256, 16), (32, 2))}

#: The Stable Diffusion case: (latent size, batch, context tokens) at full scale (SD 1.5's
#: 64² latents of a 512² image, CLIP's 77 tokens) and in `--quick` mode.
_SD15_CASE = ((64, 8, 77), (16, 2, 8))
#: `--quick`'s SD-like config: the `sd15` topology (four levels, transformer blocks at the
#: first three and in the middle) at a few channels, two heads and 32-wide tokens.
_SD15_QUICK = {"model_channels": 32, "norm_groups": 8, "num_heads": 2, "context_dim": 32}


def build_case(name: str, quick: bool = False) -> Case:
    """The :class:`Case` called `name` (one of ``MODEL_CASES``), tiny when `quick`."""
    if name in _PRESET_CASES:
        size, batch = _PRESET_CASES[name][1 if quick else 0]
        config = preset(name)
        if quick:
            config = config.replace(model_channels=16, norm_groups=8, image_size=size)
        return Case(
            name,
            config,
            "diffusers",
            batch,
            (size, size),
            "img",
            f"{name} preset, {size}², vs diffusers UNet2DModel",
        )
    if name == "sd15":
        size, batch, tokens = _SD15_CASE[1 if quick else 0]
        config = preset("sd15").replace(image_size=size, **(_SD15_QUICK if quick else {}))
        return Case(
            name,
            config,
            "diffusers",
            batch,
            (size, size),
            "img",
            f"sd15 preset, {size}² latents, {tokens} × {config.context_dim} context tokens, "
            "vs diffusers UNet2DConditionModel",
            context_tokens=tokens,
        )
    if name == "3d":
        config = UNET_3D
        if quick:
            config = config.replace(model_channels=16, norm_groups=8, num_head_channels=8)
        size = 16 if quick else 64
        return Case(
            name,
            config,
            "monai",
            1 if quick else 4,
            (size,) * 3,
            "vol",
            f"3D U-Net, {size}³, vs MONAI DiffusionModelUNet",
        )
    raise ValueError(f"unknown benchmark case {name!r}; available: {', '.join(MODEL_CASES)}")


# ---------------------------------------------------------------------------------- ours
def build_ours(config: UNetConfig, device: torch.device | str = "cpu") -> UNet:
    """Our `UNet` for `config`, built on `device` and accelerated (`diffunet.accel.accelerate`)
    as the library runs it on a GPU. Every script builds the model it measures here."""
    with torch.device(device):
        model = UNet(config)
    return accelerate(model)


# ---------------------------------------------------------------------------------- references
class ReferenceUnavailable(RuntimeError):
    """The reference library (diffusers or MONAI) is not installed or cannot be imported."""


class Reference(nn.Module):
    """A reference model called as ours is, `model(x, t, cond=..., context=...)`: the
    condition is concatenated to the input (as our model does), the context tokens are
    diffusers' `encoder_hidden_states`, diffusers' output unwrapped (its `.sample`)."""

    def __init__(self, model: nn.Module, library: str) -> None:
        super().__init__()
        self.model = model
        self.library = library

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reference model's prediction for `x` (and `cond`, `context`) at timesteps `t`."""
        if cond is not None:
            x = torch.cat([x, cond], dim=1)
        if self.library == "diffusers":
            if context is not None:  # UNet2DConditionModel
                return self.model(x, t, encoder_hidden_states=context, return_dict=False)[0]
            return self.model(x, t, return_dict=False)[0]
        if context is not None:
            raise ValueError(f"the {self.library} reference takes no context tokens")
        return self.model(x, t)


def implementation(model: nn.Module) -> str:
    """The implementation a record names: `diffunet` for ours, else the reference's library."""
    return model.library if isinstance(model, Reference) else "diffunet"


def diffusers_kwargs(config: UNetConfig) -> dict[str, Any]:
    """`UNet2DModel` keyword arguments for the architecture of our 2D `config`.

    Raises ValueError for options `UNet2DModel` cannot express (scale-shift norm, one skip
    per level, linear attention, non-default embedding widths, ...).
    """
    c = config
    unsupported = {
        "dims != 2": c.dims != 2,
        "use_scale_shift_norm": c.use_scale_shift_norm,
        "skip_topology != per_block": c.skip_topology != "per_block",
        "resblock_updown": c.resblock_updown,
        "attention_type != full": c.attention_type != "full",
        "mid_attention_type": c.resolved_mid_attention_type() != "full",
        "context_dim": c.context_dim is not None,
        "num_classes": c.num_classes is not None,
        "cond_channels": c.cond_channels > 0,
        "time_embed_input_dim": c.resolved_time_embed_input_dim() != c.model_channels,
        "time_embed_dim": c.resolved_time_embed_dim() != 4 * c.model_channels,
        "time_embed_type": c.time_embed_type != "timestep",
        "pool_factor": c.pool_factor != 1,
        "downsample_type": c.downsample_type != "conv",
        "upsample_type": c.upsample_type != "nearest_conv",
        "aleatoric": c.aleatoric,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"UNet2DModel cannot express this config: {', '.join(bad)}")
    widths = [c.level_channels(level) for level in range(c.num_levels)]
    attn_widths = {w for level, w in enumerate(widths) if c.attention_at(level)} | {widths[-1]}
    if c.num_head_channels is not None:
        head_dim: int | None = c.num_head_channels
    elif c.num_heads == 1:
        head_dim = None  # UNet2DModel: one head as wide as the block
    else:
        dims = {w // c.num_heads for w in attn_widths}
        if len(dims) != 1:
            raise ValueError("UNet2DModel needs one head width for every attention site")
        head_dim = dims.pop()
    down = tuple(
        "AttnDownBlock2D" if c.attention_at(level) else "DownBlock2D"
        for level in range(c.num_levels)
    )
    up = tuple(
        "AttnUpBlock2D" if c.attention_at(level) else "UpBlock2D"
        for level in reversed(range(c.num_levels))
    )
    return {
        "sample_size": (c.spatial_size() or (None,))[0],
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": tuple(widths),
        "layers_per_block": c.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": int(c.freq_shift) if float(c.freq_shift).is_integer() else c.freq_shift,
        "attention_head_dim": head_dim,
        "dropout": c.dropout,
        # 0 pads one row/column at the end, then an unpadded strided conv (LDM, google's
        # ddpm-cifar10-32); 1 is a symmetric 'same' padding. Same parameters and FLOPs.
        "downsample_padding": 0 if c.downsample_padding == "asymmetric" else 1,
    }


def diffusers_condition_kwargs(config: UNetConfig) -> dict[str, Any]:
    """`UNet2DConditionModel` keyword arguments for the architecture of our 2D `config` with
    transformer blocks and cross-attention (Stable Diffusion 1.x / 2.x style).

    The inverse of `diffunet.interop.diffusers_condition.config_from_diffusers_condition`.
    Raises ValueError for options `UNet2DConditionModel` cannot express, and for SDXL's added
    conditioning, whose inputs the benchmark does not pass.
    """
    c = config
    levels = c.num_levels
    mid_depth = c.resolved_mid_transformer_depth() if c.uses_transformer else 0
    unsupported = {
        "dims != 2": c.dims != 2,
        "context_dim is None": c.context_dim is None,
        "transformer_depth is None": not c.uses_transformer,
        "mid_attention_type": c.resolved_mid_attention_type() != "full",
        "attention_type != full": c.attention_type != "full",
        "mid_transformer_depth != the last level's": c.uses_transformer
        and c.attention_at(levels - 1)
        and mid_depth != c.transformer_depth_at(levels - 1),
        "skip_topology != per_block": c.skip_topology != "per_block",
        "resblock_updown": c.resblock_updown,
        "cond_channels": c.cond_channels > 0,
        "added_cond_dim (the benchmark passes no added conditioning)": c.added_cond_dim is not None,
        "use_timestep": not c.use_timestep,
        "time_embed_input_dim": c.resolved_time_embed_input_dim() != c.model_channels,
        "time_embed_type": c.time_embed_type != "timestep",
        "time_embed_scale": c.time_embed_scale != 1.0,
        "pool_factor": c.pool_factor != 1,
        "downsample_type": c.downsample_type != "conv",
        "upsample_type": c.upsample_type != "nearest_conv",
        "resample_axes": c.resample_axes is not None,
        "aleatoric": c.aleatoric,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"UNet2DConditionModel cannot express this config: {', '.join(bad)}")
    widths = [c.level_channels(level) for level in range(levels)]
    attention = [c.attention_at(level) for level in range(levels)]
    # diffusers' `attention_head_dim` is the number of heads per level (its old name).
    heads: int | tuple[int, ...] = (
        tuple(max(w // c.num_head_channels, 1) for w in widths)
        if c.num_head_channels is not None
        else c.num_heads
    )
    # Transformer blocks per level where it cross-attends; the middle block takes the last
    # entry (a level without attention ignores its own).
    depths = [c.transformer_depth_at(level) if attention[level] else 1 for level in range(levels)]
    if not attention[-1]:
        depths[-1] = mid_depth
    return {
        "sample_size": (c.spatial_size() or (None,))[0],
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": tuple(widths),
        "layers_per_block": c.num_res_blocks,
        "down_block_types": tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention
        ),
        "up_block_types": tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)
        ),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else tuple(depths),
        "use_linear_projection": c.use_linear_projection,
        "upcast_attention": c.upcast_attention,
        "num_class_embeds": c.num_classes,
        "time_embedding_dim": c.time_embed_dim,
        "resnet_time_scale_shift": "scale_shift" if c.use_scale_shift_norm else "default",
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": int(c.freq_shift) if float(c.freq_shift).is_integer() else c.freq_shift,
        "dropout": c.dropout,
        "downsample_padding": 0 if c.downsample_padding == "asymmetric" else 1,
    }


def monai_kwargs(config: UNetConfig) -> dict[str, Any]:
    """MONAI `DiffusionModelUNet` keyword arguments for the architecture of our `config`."""
    c = config
    unsupported = {
        "use_scale_shift_norm": c.use_scale_shift_norm,
        "skip_topology != per_block": c.skip_topology != "per_block",
        "attention_type != full": c.attention_type != "full",
        "context_dim": c.context_dim is not None,
        "time_embed_input_dim": c.resolved_time_embed_input_dim() != c.model_channels,
        "time_embed_dim": c.resolved_time_embed_dim() != 4 * c.model_channels,
        "pool_factor": c.pool_factor != 1,
        "downsample_type": c.downsample_type != "conv",
        "upsample_type": c.upsample_type != "nearest_conv",
        "resample_axes": c.resample_axes is not None,
        "dropout": c.dropout != 0.0,
        "aleatoric": c.aleatoric,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"DiffusionModelUNet cannot express this config: {', '.join(bad)}")
    widths = tuple(c.level_channels(level) for level in range(c.num_levels))
    head_channels = c.num_head_channels or widths[-1] // c.num_heads
    return {
        "spatial_dims": c.dims,
        "in_channels": c.input_channels,
        "out_channels": c.out_channels,
        "channels": widths,
        "attention_levels": tuple(c.attention_at(level) for level in range(c.num_levels)),
        "num_res_blocks": c.num_res_blocks,
        "num_head_channels": head_channels,
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "resblock_updown": c.resblock_updown,
        "num_class_embeds": c.num_classes,
    }


def reference_kwargs(config: UNetConfig, library: str) -> dict[str, Any]:
    """The reference model's keyword arguments for `config`: `UNet2DConditionModel`'s for a
    config with context tokens, `UNet2DModel`'s for another diffusers one, MONAI's."""
    if library == "diffusers":
        if config.context_dim is not None:
            return diffusers_condition_kwargs(config)
        return diffusers_kwargs(config)
    if library == "monai":
        return monai_kwargs(config)
    raise ValueError(f"unknown reference library {library!r}")


def library_version(name: str) -> str | None:
    """Version of an installed distribution (read from its metadata, not imported), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_reference(
    config: UNetConfig, library: str, device: torch.device | str = "cpu"
) -> Reference:
    """The reference model (diffusers or MONAI) of the same architecture as `config`, built on
    `device`; raises :class:`ReferenceUnavailable` when the library cannot be imported."""
    if library == "diffusers":
        kwargs = reference_kwargs(config, library)
        try:
            from diffusers import UNet2DConditionModel, UNet2DModel
        except Exception as err:
            raise ReferenceUnavailable(
                f"diffusers is not importable ({type(err).__name__}: {err}); "
                "install it (pip install diffusers) or carry its wheel to the device"
            ) from err
        cls = UNet2DModel if config.context_dim is None else UNet2DConditionModel
        with torch.device(device):
            return Reference(cls(**kwargs), "diffusers")
    if library == "monai":
        try:
            from monai.networks.nets import DiffusionModelUNet
        except Exception as err:
            raise ReferenceUnavailable(
                f"MONAI is not importable ({type(err).__name__}: {err}); install monai "
                "(and einops) or carry the monai wheel to the device"
            ) from err
        with torch.device(device):
            return Reference(DiffusionModelUNet(**monai_kwargs(config)), "monai")
    raise ValueError(f"unknown reference library {library!r}")


def build_model(which: str, case: Case, device: torch.device | str) -> nn.Module:
    """`"ours"` or `"ref"` for `case`, on `device`, ready to measure (:func:`prepare_model`)."""
    if which == "ours":
        model: nn.Module = build_ours(case.config, device)
    else:
        model = build_reference(case.config, case.reference, device)
    return prepare_model(model, case.dims, device)


# ---------------------------------------------------------------------------------- both
def num_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


def randomize_zero_weights(model: nn.Module, std: float = 0.02) -> None:
    """Give every all-zero weight matrix/kernel small random values.

    Zero-initialised output convs make parts of the network compute on zeros, which can time
    faster than real data; both sides of a comparison get the same treatment.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, std)


def prepare_model(model: nn.Module, dims: int, device: torch.device | str) -> nn.Module:
    """`model` with no all-zero weights, on `device` in the channels-last layout of `dims`."""
    randomize_zero_weights(model)
    return model.to(device=device, memory_format=memory_format_for(dims))
