"""UNet: one dimension-agnostic diffusion U-Net, built from a :class:`UNetConfig`.

stem → encoder (`input_blocks`) → `middle_block` → decoder (`output_blocks`) → head.
The encoder and decoder are built in one loop over `channel_mult`, guided-diffusion style;
attention, conditioning, resampling and skip topology are all placed by the config. An
attention site holds an `AttentionBlock`, or a `SpatialTransformer` when `transformer_depth` is
set (Stable Diffusion); the module names follow CompVis' `openaimodel.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffunet.errors import InvalidTypeError, InvalidValueError
from diffunet.model.checkpoint import PretrainedMixin
from diffunet.model.config import UNetConfig, nearest_valid_sizes
from diffunet.model.layers.attention import AttentionBlock
from diffunet.model.layers.embedding import AddedConditionEmbedding, TimestepEmbedding
from diffunet.model.layers.ops import conv_nd, conv_transpose_nd, normalization, zero_module
from diffunet.model.layers.resample import Downsample, Upsample
from diffunet.model.layers.resblock import ResBlock
from diffunet.model.layers.transformer import SpatialTransformer
from diffunet.model.validation import check_added_conditioning, check_finite, check_labels

#: The layers of an `EmbedSequential` that receive the context tokens.
CONTEXT_LAYERS = (AttentionBlock, SpatialTransformer)


class EmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks receive the embedding, attention and transformer blocks
    the context."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run every layer in order on `x`."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, CONTEXT_LAYERS):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(PretrainedMixin, nn.Module):
    """The diffunet U-Net for 1D signals, 2D images and 3D volumes.

    `forward(x, t, *, cond=None, context=None, labels=None, added_cond=None, time_ids=None)`
    predicts a tensor shaped like `x` with `config.output_channels` channels (mean then
    log-variance for the aleatoric head).
    `save_pretrained`, `from_pretrained` and `push_to_hub` come from `PretrainedMixin`.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise InvalidTypeError(
                f"UNet expects a UNetConfig, got {type(config).__name__}; "
                "build one with UNetConfig(...) or diffunet.preset(name)"
            )
        self.config = config
        c = config
        emb_dim = c.resolved_time_embed_dim() if c.has_embedding else None
        self.time_embed = None
        if c.use_timestep and emb_dim is not None:
            self.time_embed = TimestepEmbedding(
                c.resolved_time_embed_input_dim(),
                emb_dim,
                flip_sin_to_cos=c.flip_sin_to_cos,
                freq_shift=c.freq_shift,
                scale=c.time_embed_scale,
            )
        # One extra row: the null label, for classifier-free guidance.
        self.label_embed = None
        if c.num_classes and emb_dim is not None:
            self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim)
        # SDXL: a pooled text embedding and embedded size / crop ids, added like the labels.
        self.added_embed = None
        if c.added_cond_dim is not None and emb_dim is not None:
            self.added_embed = AddedConditionEmbedding(
                c.added_cond_dim,
                emb_dim,
                time_id_dim=c.added_time_embed_dim,
                flip_sin_to_cos=c.flip_sin_to_cos,
                freq_shift=c.freq_shift,
            )

        def res(ch: int, out: int, resample: str | None = None, factors=None) -> ResBlock:
            return ResBlock(
                c.dims,
                ch,
                out,
                emb_dim,
                dropout=c.dropout,
                use_scale_shift_norm=c.use_scale_shift_norm,
                resample=resample,
                factors=factors,
                norm_groups=c.norm_groups,
                norm_eps=c.norm_eps,
                zero_init=c.zero_init,
            )

        def attn(ch: int, kind: str, depth: int, norm: bool = True) -> nn.Module:
            if c.uses_transformer:
                return SpatialTransformer(
                    c.dims,
                    ch,
                    c.heads_for(ch),
                    depth,
                    context_dim=c.context_dim,
                    norm_groups=c.norm_groups,
                    use_linear_projection=c.use_linear_projection,
                    upcast_attention=c.upcast_attention,
                    zero_init=c.zero_init,
                )
            return AttentionBlock(
                ch,
                kind,
                c.heads_for(ch),
                context_dim=c.context_dim,
                norm_groups=c.norm_groups,
                norm_eps=c.norm_eps,
                zero_init=c.zero_init,
                norm=norm,
            )

        def down(ch: int, transition: int) -> nn.Module:
            factors = c.resample_factors(transition)
            if c.resblock_updown:
                return res(ch, ch, "down", factors)
            return Downsample(
                c.dims,
                ch,
                factors,
                use_conv=c.downsample_type == "conv",
                padding=c.downsample_padding,
            )

        def up(ch: int, transition: int) -> nn.Module:
            factors = c.resample_factors(transition)
            if c.resblock_updown:
                return res(ch, ch, "up", factors)
            return Upsample(c.dims, ch, factors, mode=c.upsample_type)

        per_block = c.skip_topology == "per_block"
        mc, levels = c.model_channels, c.num_levels
        if c.pool_factor == 1:
            stem = conv_nd(c.dims, c.input_channels, mc, 3, padding=1)
        else:
            stem = conv_nd(c.dims, c.input_channels, mc, c.pool_factor, stride=c.pool_factor)

        self.input_blocks = nn.ModuleList([EmbedSequential(stem)])
        emits_skip = [per_block]
        skip_channels = [mc] if per_block else []
        ch = mc
        for level in range(levels):
            out = c.level_channels(level)
            attention = [c.attention_type] if c.attention_at(level) else []
            depth = c.transformer_depth_at(level)
            if per_block:
                for _ in range(c.num_res_blocks):
                    self.input_blocks.append(
                        EmbedSequential(res(ch, out), *[attn(out, k, depth) for k in attention])
                    )
                    ch = out
                    emits_skip.append(True)
                    skip_channels.append(ch)
            else:
                blocks = [res(ch if i == 0 else out, out) for i in range(c.num_res_blocks)]
                self.input_blocks.append(
                    EmbedSequential(*blocks, *[attn(out, k, depth) for k in attention])
                )
                ch = out
                emits_skip.append(True)
                skip_channels.append(ch)
            if level < levels - 1:
                self.input_blocks.append(EmbedSequential(down(ch, level)))
                emits_skip.append(per_block)
                if per_block:
                    skip_channels.append(ch)

        mid_kind = c.resolved_mid_attention_type()
        mid_attention = (
            [attn(ch, mid_kind, c.resolved_mid_transformer_depth(), c.mid_attention_norm)]
            if mid_kind != "none"
            else []
        )
        self.middle_block = EmbedSequential(res(ch, ch), *mid_attention, res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            out = c.level_channels(level)
            attention = [c.attention_type] if c.attention_at(level) else []
            depth = c.transformer_depth_at(level)
            upsample = [up(out, level - 1)] if level > 0 else []
            if per_block:
                for i in range(c.num_res_blocks + 1):
                    layers = [
                        res(ch + skip_channels.pop(), out),
                        *[attn(out, k, depth) for k in attention],
                    ]
                    if i == c.num_res_blocks:
                        layers += upsample
                    self.output_blocks.append(EmbedSequential(*layers))
                    ch = out
            else:
                blocks = [
                    res(ch + skip_channels.pop() if i == 0 else out, out)
                    for i in range(c.num_res_blocks)
                ]
                self.output_blocks.append(
                    EmbedSequential(*blocks, *[attn(out, k, depth) for k in attention], *upsample)
                )
                ch = out
        self._emits_skip = tuple(emits_skip)

        self.out = self._head(ch, c.out_channels)
        self.out_logvar = self._head(ch, c.out_channels) if c.aleatoric else None

    def _head(self, channels: int, out_channels: int) -> nn.Sequential:
        c = self.config
        if c.pool_factor == 1:
            conv = conv_nd(c.dims, channels, out_channels, 3, padding=1)
        else:
            conv = conv_transpose_nd(
                c.dims, channels, out_channels, c.pool_factor, stride=c.pool_factor
            )
        if c.zero_init:
            zero_module(conv)
        return nn.Sequential(normalization(channels, c.norm_groups, c.norm_eps), nn.SiLU(), conv)

    # ------------------------------------------------------------------ public helpers
    @property
    def null_label(self) -> int:
        """The label index that means "no label" (for classifier-free guidance)."""
        if self.config.num_classes is None:
            raise InvalidValueError("this model has no class labels (config.num_classes is None)")
        return self.config.num_classes

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those that require grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @staticmethod
    def split_aleatoric(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split an aleatoric output into `(mean, log_variance)` along channels."""
        return split_aleatoric(output)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int | None = None,
        *,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise `x` at timestep / noise level `t`.

        Args:
            x: `(B, in_channels, *spatial)` with `dims` spatial axes.
            t: `(B,)` or a scalar: integer timesteps, or continuous noise levels when
                `config.time_embed_type == "noise_level"`. Required iff `config.use_timestep`.
            cond: `(B, cond_channels, *spatial)`, concatenated to `x` on channels.
            context: `(B, N, context_dim)` tokens for cross-attention.
            labels: `(B,)` integer class indices; `model.null_label` means unconditional.
            added_cond: `(B, D)` vector conditioning added to the time embedding through an MLP
                (`config.added_cond_dim`; SDXL: the pooled text embedding, D = 1280).
            time_ids: `(B, n)` scalar ids embedded sinusoidally and joined to `added_cond`
                (`config.added_time_embed_dim`; SDXL: original height and width, crop top
                and left, target height and width, n = 6).

        Floating-point `x`, `cond`, `context` and `added_cond` of another dtype than the
        model's parameters (float64 data, a float16 batch for a float32 model) are cast to the
        parameters' dtype here, so the output comes back in the model's dtype (under autocast
        in autocast's, which then casts the operations as usual). Integer or bool `x` / `cond` /
        `context` raise :class:`~diffunet.errors.InvalidTypeError`: nothing guesses their
        scale. Labels outside `[0, num_classes]` raise
        :class:`~diffunet.errors.InvalidValueError`, checked on the CPU always and on a GPU only
        while value checks are on (:mod:`diffunet.model.validation`)."""
        x, t, cond, context, added_cond = self._prepare_inputs(
            x, t, cond, context, labels, added_cond, time_ids
        )
        pads = self._padding(tuple(x.shape[2:]))
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        if pads is not None:
            x = F.pad(x, pads, mode="replicate")
        emb = self.embed(t, labels, added_cond, time_ids)

        skips = []
        h = x
        for block, emits_skip in zip(self.input_blocks, self._emits_skip):
            h = self._run(block, h, emb, context)
            if emits_skip:
                skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)

        out = self.out(h)
        if self.out_logvar is not None:
            out = torch.cat([out, self.out_logvar(h)], dim=1)
        if pads is not None:
            out = F.pad(out, [-amount for amount in pads])  # crop back
        return out

    def embed(
        self,
        t: torch.Tensor | None,
        labels: torch.Tensor | None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The SiLU-activated sum of the time, label and added-conditioning embeddings (None if
        the model uses none of them)."""
        emb = None
        if self.time_embed is not None:
            emb = self.time_embed(t)
        if self.label_embed is not None:
            label_emb = self.label_embed(labels)
            emb = label_emb if emb is None else emb + label_emb
        if self.added_embed is not None:
            added_emb = self.added_embed(added_cond, time_ids)
            emb = added_emb if emb is None else emb + added_emb
        return None if emb is None else F.silu(emb)

    def _run(
        self,
        block: nn.Module,
        *args: torch.Tensor | tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor:
        """`block(*args)`, recomputed in backward when `config.use_checkpoint` while training."""
        if self.config.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _padding(self, spatial: tuple[int, ...]) -> list[int] | None:
        """`F.pad` amounts that bring `spatial` to the size multiple when `pad_to_multiple`
        (zero on axes already there: no branch on the size, so one compiled graph fits all);
        None when the size is already valid; an error otherwise."""
        multiple = self.config.size_multiple()
        if self.config.pad_to_multiple:
            return self.pads(spatial, multiple)
        if any(s % m for s, m in zip(spatial, multiple)):
            below, above = nearest_valid_sizes(spatial, multiple)
            raise InvalidValueError(
                f"input spatial size {spatial} is not divisible by {multiple} "
                f"(pool_factor × 2 per downsampling); nearest valid sizes: {below} or {above}. "
                "Resize or crop the input, or set pad_to_multiple=True in the config to pad "
                "and crop back automatically."
            )
        return None

    @staticmethod
    def pads(spatial: tuple[int, ...], multiple: tuple[int, ...]) -> list[int]:
        """`F.pad` amounts (last axis first) that round each axis up to its multiple."""
        pads: list[int] = []
        for s, m in zip(reversed(spatial), reversed(multiple)):
            pads += [0, (s + m - 1) // m * m - s]
        return pads

    def _prepare_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int | None,
        cond: torch.Tensor | None,
        context: torch.Tensor | None,
        labels: torch.Tensor | None,
        added_cond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> tuple[
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
    ]:
        """`forward`'s arguments checked (shared with the accelerated forward) and `x`, `cond`,
        `context` and `added_cond` cast to the parameters' dtype; returns them with the `(B,)`
        float32 time input, as `(x, t, cond, context, added_cond)`."""
        t = self._check_inputs(x, t, cond, context, labels)
        check_added_conditioning(
            added_cond,
            time_ids,
            batch=x.shape[0],
            added_cond_dim=self.config.added_cond_dim,
            added_time_embed_dim=self.config.added_time_embed_dim,
        )
        if added_cond is not None:
            check_finite(added_cond, "added_cond")
        # Always, autocast or not: autocast leaves float64 alone, and it casts the parameters'
        # dtype as it would the caller's float32 / float16 / bfloat16.
        dtype = self._parameter_dtype()
        x = x.to(dtype)
        cond = None if cond is None else cond.to(dtype)
        context = None if context is None else context.to(dtype)
        added_cond = None if added_cond is None else added_cond.to(dtype)
        return x, t, cond, context, added_cond

    def _parameter_dtype(self) -> torch.dtype:
        """The dtype of the stem convolution's weight: the dtype the model computes in."""
        entry = self.input_blocks[0]
        assert isinstance(entry, EmbedSequential)
        weight = entry[0].weight
        assert isinstance(weight, torch.Tensor)
        return weight.dtype

    def _check_inputs(self, x, t, cond, context, labels) -> torch.Tensor | None:
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise InvalidTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InvalidTypeError(
                f"x must be a floating-point tensor, got dtype {x.dtype}; convert it with "
                "x.float() (scaled to the range the model was trained on, e.g. [-1, 1])"
            )
        for name, value in (("cond", cond), ("context", context)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise InvalidTypeError(
                    f"{name} must be a torch.Tensor or None, got {type(value).__name__}"
                )
        if cond is not None and not cond.is_floating_point():
            raise InvalidTypeError(
                f"cond must be a floating-point tensor, got dtype {cond.dtype}; convert it "
                "with cond.float() (scaled as in training)"
            )
        if context is not None and not context.is_floating_point():
            raise InvalidTypeError(
                f"context must be floating-point embeddings (B, N, context_dim), e.g. a text "
                f"encoder's hidden states, not token ids; got dtype {context.dtype}. Run the "
                "tokens through the encoder first"
            )
        layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, D, H, W)"}[c.dims]
        if x.ndim != c.dims + 2:
            raise InvalidValueError(
                f"x has shape {tuple(x.shape)} ({x.ndim} dims) but this is a dims={c.dims} model "
                f"expecting {layout}; build the model with dims={x.ndim - 2} or reshape the input"
            )
        if x.shape[1] != c.in_channels:
            hint = (
                " (pass the conditioning image as cond=..., not concatenated to x)"
                if x.shape[1] == c.input_channels and c.cond_channels
                else ""
            )
            raise InvalidValueError(
                f"x has {x.shape[1]} channels but the model expects in_channels={c.in_channels}"
                f"{hint}"
            )
        batch, spatial = x.shape[0], tuple(x.shape[2:])
        if c.cond_channels:
            if cond is None:
                raise InvalidValueError(
                    f"this model concatenates a cond input of {c.cond_channels} channel(s); "
                    f"pass cond=Tensor{(batch, c.cond_channels, *spatial)}"
                )
            expected = (batch, c.cond_channels, *spatial)
            if tuple(cond.shape) != expected:
                raise InvalidValueError(f"cond has shape {tuple(cond.shape)}, expected {expected}")
        elif cond is not None:
            raise InvalidValueError(
                "cond was given but the model has cond_channels=0; build it with "
                "cond_channels=<channels of cond> to use image conditioning"
            )
        if c.context_dim is not None:
            if context is None:
                raise InvalidValueError(
                    f"this model cross-attends to context tokens; pass context of shape "
                    f"(B={batch}, N, {c.context_dim})"
                )
            if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != c.context_dim:
                raise InvalidValueError(
                    f"context has shape {tuple(context.shape)}, expected ({batch}, N, {c.context_dim})"
                )
        elif context is not None:
            raise InvalidValueError(
                "context was given but the model has context_dim=None; build it with "
                "context_dim=<token width> to use cross-attention"
            )
        if c.num_classes is not None:
            if labels is None:
                raise InvalidValueError(
                    f"this model is class-conditional (num_classes={c.num_classes}); pass labels "
                    f"of shape ({batch},), using model.null_label={c.num_classes} for unconditional"
                )
            if isinstance(labels, torch.Tensor) and tuple(labels.shape) != (batch,):
                raise InvalidValueError(
                    f"labels has shape {tuple(labels.shape)}, expected ({batch},)"
                )
            check_labels(labels, c.num_classes)
        elif labels is not None:
            raise InvalidValueError(
                "labels were given but the model has num_classes=None; build it with "
                "num_classes=<number of classes> to use class conditioning"
            )
        for name, value in (("x", x), ("cond", cond), ("context", context)):
            if value is not None:  # NaN / inf only while value checks are on
                check_finite(value, name)
        if not c.use_timestep:
            if t is not None:
                raise InvalidValueError(
                    "t was given but the model has use_timestep=False (a plain U-Net)"
                )
            return None
        if t is None:
            raise InvalidValueError(
                f"t is required: pass timesteps of shape ({batch},) or a scalar"
            )
        if not isinstance(t, torch.Tensor):
            if not isinstance(t, (int, float)):
                raise InvalidTypeError(f"t must be a tensor or a number, got {type(t).__name__}")
            t = torch.full((batch,), float(t), device=x.device)
        elif t.ndim == 0:
            t = t.to(x.device).expand(batch)
        elif tuple(t.shape) != (batch,):
            raise InvalidValueError(
                f"t has shape {tuple(t.shape)} but x has batch {batch}; pass t of shape "
                f"({batch},) or a scalar"
            )
        return t.float()


def split_aleatoric(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an aleatoric model's output into `(mean, log_variance)` along channels."""
    if output.shape[1] % 2:
        raise InvalidValueError(
            f"an aleatoric output has an even number of channels (mean + log-variance), "
            f"got {output.shape[1]}"
        )
    mean, log_variance = output.chunk(2, dim=1)
    return mean, log_variance
