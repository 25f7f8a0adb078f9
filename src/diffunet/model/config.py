"""`UNetConfig`: the one validated description of a diffunet U-Net.

Every option of the model is a field here. A config validates itself on construction, so an
invalid one never reaches the model, and it round-trips through a plain dict and JSON so that
checkpoints carry it next to the weights.

Attention placement rule: `attention_resolutions` holds *downsample factors*, as in
guided-diffusion's `UNetModel`: 1 is the resolution after the stem (after patchify when
`pool_factor > 1`), 2 is half of it, and so on; level `i` of `channel_mult` sits at factor
`2**i`. Presets that the seeds state as absolute sizes ("attention at 16 for a 256 input") are
converted with :func:`attention_factors_for_sizes`.

Transformer rule: with `transformer_depth` set, every attention site holds a Stable-Diffusion
transformer block (CompVis `SpatialTransformer`, diffusers `Transformer2DModel`) instead of the
classic attention block. `transformer_depth` is one number for every level or one per level of
`channel_mult` (0 at levels without attention, as SDXL writes `(0, 2, 10)`); the middle block
takes `mid_transformer_depth`, by default the last level's depth (CompVis and diffusers alike).
"""

from __future__ import annotations

import json
import math
import numbers
import types
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from diffunet.errors import InvalidValueError

ATTENTION_TYPES = ("full", "linear", "none")
TIME_EMBED_TYPES = ("timestep", "noise_level")
UPSAMPLE_TYPES = ("nearest_conv", "nearest", "transposed")
DOWNSAMPLE_TYPES = ("conv", "avgpool")
DOWNSAMPLE_PADDINGS = ("symmetric", "asymmetric")
SKIP_TOPOLOGIES = ("per_block", "per_level")


class ConfigError(InvalidValueError):
    """An invalid `UNetConfig`: the message says which field, what was given and what to do."""


def _fail(name: str, given: Any, expected: str, fix: str = "") -> None:
    message = f"UNetConfig.{name}={given!r} is invalid: expected {expected}."
    if fix:
        message += f" {fix}"
    raise ConfigError(message)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a :class:`diffunet.UNet`; validated on construction.

    The field names follow guided-diffusion / LDM / diffusers. Derived values (the time
    embedding width, the heads at a given width, the per-level resampling factors) are methods,
    so a config stores only what a user chose.
    """

    # shape of the data
    dims: int = 2
    in_channels: int = 3
    out_channels: int = 3
    image_size: int | tuple[int, ...] | None = None
    # widths and depth
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # attention
    attention_resolutions: tuple[int, ...] = ()
    attention_type: str = "full"
    mid_attention_type: str | None = None
    num_heads: int = 1
    num_head_channels: int | None = None
    context_dim: int | None = None
    mid_attention_norm: bool = True
    """Whether the middle block's attention block normalizes its input; `False` is diffusers'
    `UNet2DModel` with scale-shift ResBlocks, whose middle attention has no GroupNorm."""
    # transformer blocks at the attention sites (Stable Diffusion); None keeps AttentionBlock
    transformer_depth: int | tuple[int, ...] | None = None
    """Transformer blocks (self-attention, cross-attention to `context`, GEGLU feed-forward)
    per attention site, one number or one per level (SDXL: `(0, 2, 10)`); `None` places the
    classic attention block instead."""
    mid_transformer_depth: int | None = None
    """Transformer blocks in the middle block; `None` takes the last level's depth."""
    use_linear_projection: bool = False
    """Project into and out of the transformer blocks with linear layers (SD 2.x, XL) instead
    of 1×1 convolutions (SD 1.x)."""
    upcast_attention: bool = False
    """Compute the transformer blocks' float16 attention in float32 (SD 2.1)."""
    # conditioning
    cond_channels: int = 0
    num_classes: int | None = None
    added_cond_dim: int | None = None
    """Width of a vector added to the time embedding through an MLP, time-id features
    included (SDXL: 2816, a pooled text embedding of 1280 and 6 ids × 256); `None` for none."""
    added_time_embed_dim: int | None = None
    """Sinusoidal features per time id joined to the added vector (SDXL: 256; its ids are the
    original size, crop corner and target size); `None` for no ids."""
    # time / noise-level embedding
    use_timestep: bool = True
    time_embed_type: str = "timestep"
    time_embed_input_dim: int | None = None
    time_embed_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embed_scale: float = 1.0
    use_scale_shift_norm: bool = False
    # topology and resampling
    skip_topology: str = "per_block"
    resblock_updown: bool = False
    upsample_type: str = "nearest_conv"
    downsample_type: str = "conv"
    downsample_padding: str = "symmetric"
    resample_axes: tuple[tuple[int, ...], ...] | None = None
    pool_factor: int = 1
    # output, memory, convenience
    aleatoric: bool = False
    zero_init: bool = True
    use_checkpoint: bool = False
    pad_to_multiple: bool = False

    def __post_init__(self) -> None:
        # Every field is type-checked against its annotation; lists (from JSON/YAML) are stored
        # as tuples, so configs hash and compare cleanly, and ints given for floats as floats.
        hints = _field_types()
        for f in fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if not _accepts(value, hint):
                _fail_type(f.name, value, hint)
            object.__setattr__(self, f.name, _normalized(value, hint))
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def num_levels(self) -> int:
        """Number of resolution levels (`len(channel_mult)`)."""
        return len(self.channel_mult)

    @property
    def conv_resample(self) -> bool:
        """guided-diffusion's switch: True when both resampling directions have learned convs."""
        return self.downsample_type == "conv" and self.upsample_type != "nearest"

    @property
    def has_embedding(self) -> bool:
        """Whether the ResBlocks receive an embedding (time, class and/or added conditioning)."""
        return self.use_timestep or self.num_classes is not None or self.added_cond_dim is not None

    @property
    def uses_transformer(self) -> bool:
        """Whether the attention sites hold transformer blocks (`transformer_depth` is set)."""
        return self.transformer_depth is not None

    @property
    def input_channels(self) -> int:
        """Channels entering the stem: `in_channels` plus the concatenated `cond` channels."""
        return self.in_channels + self.cond_channels

    @property
    def output_channels(self) -> int:
        """Channels the model returns: `out_channels`, doubled for the aleatoric head."""
        return self.out_channels * (2 if self.aleatoric else 1)

    def resolved_time_embed_dim(self) -> int:
        """Width of the embedding fed to every ResBlock (default 4 × model_channels)."""
        return self.time_embed_dim or 4 * self.model_channels

    def resolved_time_embed_input_dim(self) -> int:
        """Width of the sinusoidal features (default model_channels)."""
        return self.time_embed_input_dim or self.model_channels

    def resolved_mid_attention_type(self) -> str:
        """Attention kind of the middle block (defaults to `attention_type`)."""
        return self.mid_attention_type or self.attention_type

    def transformer_depth_at(self, level: int) -> int:
        """Transformer blocks per attention site at `level` (0 without transformer blocks)."""
        depth = self.transformer_depth
        if depth is None:
            return 0
        return depth if isinstance(depth, int) else depth[level]

    def resolved_mid_transformer_depth(self) -> int:
        """Transformer blocks in the middle block's site (default: the last level's depth)."""
        if self.mid_transformer_depth is not None:
            return self.mid_transformer_depth
        return self.transformer_depth_at(self.num_levels - 1)

    def level_channels(self, level: int) -> int:
        """Feature channels at `level`."""
        return self.model_channels * self.channel_mult[level]

    def heads_for(self, channels: int) -> int:
        """Number of attention heads at a width of `channels`."""
        if self.num_head_channels is not None:
            return channels // self.num_head_channels
        return self.num_heads

    def resample_factors(self, transition: int) -> tuple[int, ...]:
        """Per-axis factor (1 or 2) of the resampling between level `transition` and the next."""
        axes = (
            tuple(range(self.dims))
            if self.resample_axes is None
            else self.resample_axes[transition]
        )
        return tuple(2 if axis in axes else 1 for axis in range(self.dims))

    def size_multiple(self) -> tuple[int, ...]:
        """Per-axis multiple that every input size must be divisible by."""
        multiple = [self.pool_factor] * self.dims
        for transition in range(self.num_levels - 1):
            for axis, factor in enumerate(self.resample_factors(transition)):
                multiple[axis] *= factor
        return tuple(multiple)

    def spatial_size(self) -> tuple[int, ...] | None:
        """`image_size` as a per-axis tuple, or None."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, int):
            return (self.image_size,) * self.dims
        return tuple(self.image_size)

    def attention_at(self, level: int) -> bool:
        """Whether encoder/decoder blocks at `level` carry attention."""
        return self.attention_type != "none" and 2**level in self.attention_resolutions

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field and how to fix it."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f.name, value, "a finite number")
        if self.dims not in (1, 2, 3):
            _fail("dims", self.dims, "1, 2 or 3", "Use 1 for signals, 2 for images, 3 for volumes.")
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "a positive integer")
        if not self.channel_mult or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.channel_mult
        ):
            _fail(
                "channel_mult",
                self.channel_mult,
                "a non-empty tuple of positive integers",
                "e.g. (1, 2, 4, 8).",
            )
        if not isinstance(self.cond_channels, int) or self.cond_channels < 0:
            _fail("cond_channels", self.cond_channels, "an integer >= 0 (0 = no cond)")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a probability in [0, 1)")
        if self.norm_eps <= 0:
            _fail("norm_eps", self.norm_eps, "a positive number")
        if self.attention_type not in ATTENTION_TYPES:
            _fail("attention_type", self.attention_type, f"one of {ATTENTION_TYPES}")
        if self.mid_attention_type is not None and self.mid_attention_type not in ATTENTION_TYPES:
            _fail(
                "mid_attention_type",
                self.mid_attention_type,
                f"None (same as attention_type) or one of {ATTENTION_TYPES}",
            )
        if self.time_embed_type not in TIME_EMBED_TYPES:
            _fail("time_embed_type", self.time_embed_type, f"one of {TIME_EMBED_TYPES}")
        if self.upsample_type not in UPSAMPLE_TYPES:
            _fail("upsample_type", self.upsample_type, f"one of {UPSAMPLE_TYPES}")
        if self.downsample_type not in DOWNSAMPLE_TYPES:
            _fail("downsample_type", self.downsample_type, f"one of {DOWNSAMPLE_TYPES}")
        if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
            _fail(
                "downsample_padding",
                self.downsample_padding,
                f"one of {DOWNSAMPLE_PADDINGS}",
                "'asymmetric' pads one row/column at the end before an unpadded strided conv "
                "(LDM, diffusers downsample_padding=0).",
            )
        if self.skip_topology not in SKIP_TOPOLOGIES:
            _fail("skip_topology", self.skip_topology, f"one of {SKIP_TOPOLOGIES}")
        if not isinstance(self.pool_factor, int) or self.pool_factor < 1:
            _fail("pool_factor", self.pool_factor, "an integer >= 1 (1 = no patchify)")
        if self.num_classes is not None and (
            not isinstance(self.num_classes, int) or self.num_classes < 1
        ):
            _fail("num_classes", self.num_classes, "None (no labels) or a positive integer")
        if self.context_dim is not None and (
            not isinstance(self.context_dim, int) or self.context_dim < 1
        ):
            _fail(
                "context_dim", self.context_dim, "None (no cross-attention) or a positive integer"
            )
        if self.use_scale_shift_norm and not self.has_embedding:
            _fail(
                "use_scale_shift_norm",
                True,
                "False when there is no time or class embedding",
                "Set use_timestep=True or num_classes, or turn scale-shift off.",
            )
        for name in ("time_embed_dim", "time_embed_input_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                _fail(name, value, "None (default) or an integer >= 2")
        if self.resolved_time_embed_input_dim() % 2:
            _fail(
                "time_embed_input_dim",
                self.resolved_time_embed_input_dim(),
                "an even width (sine and cosine halves)",
            )
        self._validate_resample_axes()
        self._validate_attention()
        self._validate_transformer()
        self._validate_added_conditioning()
        self._validate_norm_groups()
        self._validate_image_size()

    def _validate_resample_axes(self) -> None:
        if self.resample_axes is None:
            return
        if len(self.resample_axes) != self.num_levels - 1:
            _fail(
                "resample_axes",
                self.resample_axes,
                f"{self.num_levels - 1} entries, one per transition between the "
                f"{self.num_levels} levels of channel_mult",
            )
        for axes in self.resample_axes:
            if (
                not axes
                or any(a not in range(self.dims) for a in axes)
                or len(set(axes)) != len(axes)
            ):
                _fail(
                    "resample_axes",
                    self.resample_axes,
                    f"non-empty tuples of distinct spatial axes in 0..{self.dims - 1}",
                    "e.g. ((1, 2), (1, 2), (0, 1, 2)) keeps depth for the first two levels.",
                )

    def _validate_attention(self) -> None:
        reachable = {2**level for level in range(self.num_levels)}
        for ds in self.attention_resolutions:
            if ds not in reachable:
                _fail(
                    "attention_resolutions",
                    self.attention_resolutions,
                    f"downsample factors from {sorted(reachable)} (1 = stem resolution, "
                    f"2 = half, ...; this config has {self.num_levels} levels)",
                    "For absolute sizes use diffunet.attention_factors_for_sizes(image_size, sizes).",
                )
        if self.num_heads < 1:
            _fail("num_heads", self.num_heads, "a positive integer")
        if self.num_head_channels is not None and self.num_head_channels < 1:
            _fail("num_head_channels", self.num_head_channels, "None or a positive integer")
        widths = [self.level_channels(i) for i in range(self.num_levels) if self.attention_at(i)]
        if self.resolved_mid_attention_type() != "none":
            widths.append(self.level_channels(self.num_levels - 1))
        for width in widths:
            if self.num_head_channels is not None:
                if width % self.num_head_channels:
                    _fail(
                        "num_head_channels",
                        self.num_head_channels,
                        f"a divisor of every attention width (got width {width})",
                    )
            elif width % self.num_heads:
                _fail(
                    "num_heads",
                    self.num_heads,
                    f"a divisor of every attention width (got width {width})",
                )
        if self.context_dim is not None and not widths:
            _fail(
                "context_dim",
                self.context_dim,
                "None when the model has no attention site (cross-attention lives there)",
                "Add attention_resolutions or a middle attention.",
            )
        if not self.mid_attention_norm and self.resolved_mid_attention_type() == "none":
            _fail(
                "mid_attention_norm",
                False,
                "True when the middle block has no attention (it drops that attention's GroupNorm)",
            )

    def _validate_transformer(self) -> None:
        if not self.uses_transformer:
            for name, default in (
                ("mid_transformer_depth", None),
                ("use_linear_projection", False),
                ("upcast_attention", False),
            ):
                if getattr(self, name) != default:
                    _fail(
                        name,
                        getattr(self, name),
                        f"{default} when transformer_depth is None (it configures transformer "
                        "blocks)",
                        "Set transformer_depth (e.g. 1) to place transformer blocks.",
                    )
            return
        depth = self.transformer_depth
        depths = (depth,) if isinstance(depth, int) else depth
        assert depths is not None
        if isinstance(depth, tuple) and len(depth) != self.num_levels:
            _fail(
                "transformer_depth",
                depth,
                f"one number for every level or {self.num_levels} entries, one per level of "
                "channel_mult",
            )
        if any(d < 0 for d in depths) or (isinstance(depth, int) and depth < 1):
            _fail(
                "transformer_depth",
                depth,
                "a positive integer, or per-level integers >= 0 (0 at levels without attention)",
            )
        for level in range(self.num_levels):
            if self.attention_at(level) and self.transformer_depth_at(level) == 0:
                _fail(
                    "transformer_depth",
                    depth,
                    f"at least 1 at level {level}, which has attention (downsample factor "
                    f"{2**level} in attention_resolutions)",
                    "Raise that entry or drop the factor from attention_resolutions.",
                )
        kinds = {self.attention_type, self.resolved_mid_attention_type()} - {"none"}
        if kinds - {"full"}:
            _fail(
                "attention_type" if self.attention_type == "linear" else "mid_attention_type",
                "linear",
                "'full' or 'none' with transformer blocks (their attention is softmax attention)",
            )
        if self.mid_transformer_depth is not None and self.mid_transformer_depth < 1:
            _fail("mid_transformer_depth", self.mid_transformer_depth, "None or an integer >= 1")
        if self.resolved_mid_attention_type() == "none":
            if self.mid_transformer_depth is not None:
                _fail(
                    "mid_transformer_depth",
                    self.mid_transformer_depth,
                    "None when the middle block has no attention (mid_attention_type='none')",
                )
        elif self.resolved_mid_transformer_depth() == 0:
            _fail(
                "mid_transformer_depth",
                None,
                "a depth for the middle block's transformer: by default it takes the last "
                f"level's, which transformer_depth={depth!r} sets to 0",
                "Set mid_transformer_depth, or mid_attention_type='none'.",
            )
        if not self.mid_attention_norm:
            _fail(
                "mid_attention_norm",
                False,
                "True with transformer blocks (their GroupNorm is part of the block)",
            )

    def _validate_added_conditioning(self) -> None:
        if self.added_cond_dim is not None and self.added_cond_dim < 1:
            _fail("added_cond_dim", self.added_cond_dim, "None (no added conditioning) or >= 1")
        width = self.added_time_embed_dim
        if width is None:
            return
        if self.added_cond_dim is None:
            _fail(
                "added_time_embed_dim",
                width,
                "None when added_cond_dim is None (the embedded time ids join the added "
                "conditioning vector)",
                "Set added_cond_dim to the width of that vector (SDXL: 2816).",
            )
        if width < 2 or width % 2:
            _fail("added_time_embed_dim", width, "an even integer >= 2 (sine and cosine halves)")

    def normalized_widths(self) -> list[int]:
        """Every channel count that a GroupNorm normalizes, in construction order."""
        widths: list[int] = []
        ch = self.model_channels
        skip_widths = [ch] if self.skip_topology == "per_block" else []
        for level in range(self.num_levels):
            out = self.level_channels(level)
            for _ in range(self.num_res_blocks):
                widths += [ch, out]
                ch = out
                if self.skip_topology == "per_block":
                    skip_widths.append(ch)
            if self.skip_topology == "per_level":
                skip_widths.append(ch)
            if level < self.num_levels - 1:
                if self.resblock_updown:
                    widths += [ch, ch]
                if self.skip_topology == "per_block":
                    skip_widths.append(ch)
        widths += [ch, ch, ch, ch]
        for level in reversed(range(self.num_levels)):
            out = self.level_channels(level)
            blocks = self.num_res_blocks + (1 if self.skip_topology == "per_block" else 0)
            for i in range(blocks):
                takes_skip = self.skip_topology == "per_block" or i == 0
                in_ch = ch + (skip_widths.pop() if takes_skip else 0)
                widths += [in_ch, out]
                ch = out
            if level > 0 and self.resblock_updown:
                widths += [ch, ch]
        widths.append(ch)
        return widths

    def _validate_norm_groups(self) -> None:
        if not isinstance(self.norm_groups, int) or self.norm_groups < 1:
            _fail("norm_groups", self.norm_groups, "a positive integer")
        bad = sorted({w for w in self.normalized_widths() if w % self.norm_groups})
        if bad:
            _fail(
                "norm_groups",
                self.norm_groups,
                f"a divisor of every normalized width; {bad} are not divisible",
                "Pick model_channels/channel_mult so all widths are multiples of norm_groups, "
                "or lower norm_groups.",
            )

    def _validate_image_size(self) -> None:
        size = self.spatial_size()
        if size is None:
            return
        if len(size) != self.dims or not all(isinstance(s, int) and s >= 1 for s in size):
            _fail(
                "image_size",
                self.image_size,
                f"None, a positive int or a tuple of {self.dims} positive ints",
            )
        multiple = self.size_multiple()
        if any(s % m for s, m in zip(size, multiple)):
            _fail(
                "image_size",
                self.image_size,
                f"sizes divisible by {multiple} (pool_factor × 2 per downsampling)",
                f"Nearest valid: {nearest_valid_sizes(size, multiple)}.",
            )

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (tuples become lists)."""
        data = asdict(self)
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Build a config from `to_dict()` output (or a hand-written dict / YAML mapping).

        Unknown keys raise a :class:`ConfigError` listing the valid ones; guided-diffusion's
        `conv_resample: false` is accepted and means average-pool down and nearest up.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a UNet config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        known = {f.name for f in fields(cls)}
        _expand_conv_resample(data)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown UNetConfig field(s) {unknown}; valid fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize to JSON; also write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> UNetConfig:
        """Parse a config from a JSON string or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> UNetConfig:
        """A copy with `changes` applied (validated)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)} - {"conv_resample"})
        if unknown:
            raise ConfigError(f"unknown UNetConfig field(s) {unknown}")
        _expand_conv_resample(changes)
        return replace(self, **changes)


# What a string field may hold, and an example of each list field, for type errors.
_CHOICES = {
    "attention_type": ATTENTION_TYPES,
    "mid_attention_type": ATTENTION_TYPES,
    "time_embed_type": TIME_EMBED_TYPES,
    "upsample_type": UPSAMPLE_TYPES,
    "downsample_type": DOWNSAMPLE_TYPES,
    "downsample_padding": DOWNSAMPLE_PADDINGS,
    "skip_topology": SKIP_TOPOLOGIES,
}
_EXAMPLES = {
    "channel_mult": "[1, 2, 4]",
    "attention_resolutions": "[2, 4]",
    "image_size": "64 or [64, 64]",
    "resample_axes": "[[1, 2], [0, 1, 2]]",
    "transformer_depth": "1 or [0, 2, 10]",
}


@cache
def _field_types() -> dict[str, Any]:
    """`UNetConfig`'s field annotations, resolved from their strings to types."""
    return get_type_hints(UNetConfig)


def _union_members(hint: Any) -> tuple[Any, ...] | None:
    """The members of a `X | Y` / `Optional[X]` annotation, None for any other."""
    if get_origin(hint) in (Union, types.UnionType):
        return get_args(hint)
    return None


def _accepts(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint`: bool is no int, an int is a float, and a
    list is a tuple (JSON and YAML have no tuples)."""
    members = _union_members(hint)
    if members is not None:
        return any(_accepts(value, member) for member in members)
    if hint is type(None):
        return value is None
    if get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_accepts, value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint)


def _normalized(value: Any, hint: Any) -> Any:
    """`value` (which `_accepts`) as the annotation's own types: tuples, ints and floats."""
    members = _union_members(hint)
    if members is not None:
        return _normalized(value, next(m for m in members if _accepts(value, m)))
    if get_origin(hint) is tuple:
        args = get_args(hint)
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
        return tuple(_normalized(item, arg) for item, arg in zip(value, items))
    if hint is int:
        return int(value)
    if hint is float:
        return float(value)
    return value


def _describe(hint: Any, plural: bool = False) -> str:
    """The annotation `hint` in words, as a config file spells it ("a list of ints")."""
    members = _union_members(hint)
    if members is not None:
        words = [_describe(m, plural) for m in sorted(members, key=lambda m: m is not type(None))]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    if hint is type(None):
        return "None"
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _describe(args[0], plural=True)
        else:
            inner = ", ".join(_describe(a) for a in args)
        return f"lists of {inner}" if plural else f"a list of {inner}"
    names = {int: "int", float: "number", bool: "bool", str: "string"}
    name = names.get(hint, getattr(hint, "__name__", str(hint)))
    if plural:
        return name + "s"
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _fail_type(name: str, value: Any, hint: Any) -> None:
    """Raise the :class:`ConfigError` for a field whose value does not fit its annotation."""
    expected = _describe(hint)
    if name in _CHOICES:
        expected += f", one of {_CHOICES[name]}"
    if name in _EXAMPLES:
        expected += f", e.g. {_EXAMPLES[name]}"
    message = f"UNetConfig.{name} must be {expected}; got {type(value).__name__} {value!r}"
    if isinstance(value, str) and (_accepts(1, hint) or _accepts(0.5, hint)):
        try:
            float(value)
        except ValueError:
            pass
        else:
            message += f"; write the number {value} without quotes"
            if "e" in value.lower() and "." not in value:  # YAML 1.1 reads 1e-5 as a string
                message += " (in YAML with a dot, as 1.0e-5: YAML reads 1e-5 as a string)"
    raise ConfigError(message)


def _expand_conv_resample(values: dict[str, Any]) -> None:
    """Translate guided-diffusion's `conv_resample` flag into the two resampling fields."""
    if "conv_resample" in values:
        conv = values.pop("conv_resample")
        values.setdefault("downsample_type", "conv" if conv else "avgpool")
        values.setdefault("upsample_type", "nearest_conv" if conv else "nearest")


def nearest_valid_sizes(
    size: tuple[int, ...], multiple: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The valid sizes just below and just above `size` for per-axis `multiple`."""
    below = tuple(max(m, (s // m) * m) for s, m in zip(size, multiple))
    above = tuple(math.ceil(s / m) * m for s, m in zip(size, multiple))
    return below, above


def attention_factors_for_sizes(image_size: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Convert absolute attention sizes ("attention at 16 for a 256 input") to downsample factors."""
    factors = []
    for size in sizes:
        if size < 1 or image_size % size or (image_size // size) & (image_size // size - 1):
            raise ConfigError(
                f"attention size {size} is not the input size {image_size} divided by a power of two"
            )
        factors.append(image_size // size)
    return tuple(factors)
