"""Fast forwards of the model's modules: subclasses that `accelerate` swaps in.

Each class computes what its plain base computes, with the same parameters (so the same
state-dict keys), through the accelerator's pieces: GroupNorm + FiLM + SiLU in one kernel
(`norm`), convolutions that keep cuDNN's layout under `torch.compile` (`conv`), nearest
upsampling folded into the next convolution (`upsample`), a decoder entry that never keeps the
concatenation of `h` and its skip (`decoder_entry`), channels-last activations (`layout`), and
linear layers of one input as one GEMM in compiled graphs (`projections`: every block's
embedding projection under `settings.BATCHED_FILM`, an attention's queries, keys and values
under `settings.BATCHED_QKV`), and spatial attention over heads wider than the fused kernels
take by GEMMs (`attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.accel import decoder_entry, settings
from diffunet.accel.attention import attention
from diffunet.accel.conv import convolve, convolve_split_bias
from diffunet.accel.layout import to_cuda_layout
from diffunet.accel.norm import norm_act
from diffunet.accel.projections import batchable, project_all
from diffunet.accel.upsample import (
    upsample_convolve,
    upsample_convolve_split_bias,
    upsample_nearest,
)
from diffunet.model.layers.attention import CrossAttention, SelfAttention
from diffunet.model.layers.resample import Downsample, Upsample
from diffunet.model.layers.resblock import ResBlock
from diffunet.model.layers.transformer import Attention
from diffunet.model.unet import CONTEXT_LAYERS, EmbedSequential, UNet


class FusedGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` through the fused kernels (the pre-norm of attention blocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize `x`."""
        return norm_act(self, x, act=False)


class AcceleratedDownsample(Downsample):
    """`Downsample` whose convolution keeps cuDNN's layout under `torch.compile`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample `x`."""
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return convolve(self.op, x)


class AcceleratedUpsample(Upsample):
    """`Upsample` whose nearest upsampling + conv runs as one folded transposed convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample `x`."""
        if self.mode == "transposed":
            return self.conv(x)
        if self.mode == "nearest":
            return upsample_nearest(x, self.factors)
        return upsample_convolve(self.conv, x, self.factors)


class _AttendsWideHeadsByGEMMs:
    """An attention module's `attend` by `attention`: heads wider than the fused kernels take
    by GEMMs, under `settings.EXPLICIT_ATTENTION`."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ / √d) v per head, explicitly where that pays."""
        return attention(q, k, v)


class AcceleratedSelfAttention(_AttendsWideHeadsByGEMMs, SelfAttention):
    """`SelfAttention` that attends heads wider than the fused kernels take by GEMMs."""


class AcceleratedCrossAttention(_AttendsWideHeadsByGEMMs, CrossAttention):
    """`CrossAttention` that attends heads wider than the fused kernels take by GEMMs."""


class AcceleratedAttention(Attention):
    """A transformer block's `Attention` whose projections of one input run as one GEMM in
    graphs that `torch.compile` traces (`settings.BATCHED_QKV`): queries, keys and values of
    self-attention, keys and values of cross-attention. Eager calls keep the three layers,
    whose weights autocast casts once per region, where the concatenation would be cast per
    call."""

    def project(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`Attention.project`, by one GEMM per input where that applies."""
        if not settings.BATCHED_QKV or not torch.compiler.is_compiling():
            return super().project(x, context)
        if context is None and batchable([self.to_q, self.to_k, self.to_v]):
            q, k, v = project_all(x, [self.to_q, self.to_k, self.to_v])
            return q, k, v
        if context is not None and batchable([self.to_k, self.to_v]):
            k, v = project_all(context, [self.to_k, self.to_v])
            return self.to_q(x), k, v
        return super().project(x, context)


class AcceleratedResBlock(ResBlock):
    """`ResBlock` with fused norms, the embedding added inside the norm, a folded upsampling,
    and (as a decoder's first block) `h` and the encoder's skip taken apart."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block to `x` (or to `cat([x, skip], 1)`) given the activated embedding,
        or the embedding's `projection` by `emb_proj` where the caller computed it."""
        # One name for the main branch's tensor, rebound at each step: a second reference would
        # keep a float32 SiLU output that the next convolution's bf16 copy replaces.
        h, x, residual = self._entry(x, skip)
        if self.emb_proj is not None and projection is None:
            projection = self.emb_proj(emb)
        if projection is None:
            h = norm_act(self.out_norm, self._in_conv(h))
        elif self.use_scale_shift_norm:
            scale, shift = projection.chunk(2, dim=1)
            h = norm_act(self.out_norm, self._in_conv(h), scale=scale, shift=shift)
        else:
            # The embedding and the convolution's bias are both constant over positions: the
            # norm adds them in its own passes, so `h + emb` is never written out.
            h, bias = (
                upsample_convolve_split_bias(self.in_conv, h, self.upsample_factors)
                if self.upsample_factors
                else convolve_split_bias(self.in_conv, h)
            )
            h = norm_act(self.out_norm, h, add=projection if bias is None else projection + bias)
        h = convolve(self.out_conv, self.dropout(h))
        return (convolve(self.skip, x) if residual is None else residual) + h

    def _entry(
        self, x: torch.Tensor, skip: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the normalized, resampled input of the main branch; the input of the skip
        projection; that projection where it is made before the main branch, else None)."""
        if (
            skip is not None
            and self.resample is None
            and decoder_entry.takes_pair(self.in_norm, self.skip)
            and decoder_entry.concat_fused_wanted(x, skip)
        ):
            h, residual = decoder_entry.norm_act_and_project(self.in_norm, self.skip, x, skip)
            return h, None, residual
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        h = norm_act(self.in_norm, x)
        if self.resample is not None:
            x = self.resample(x)
            # An up block's upsampling of `h` is folded into its first convolution.
            h = h if self.upsample_factors else self.resample(h)
        # Eager autograd runs backward in reverse order of creation: made before the main
        # branch, the skip is reached last, so its input gradient (as large as x) is not held
        # through the main branch's backward. Compiled graphs schedule their own backward.
        residual = None if torch.compiler.is_compiling() else convolve(self.skip, x)
        return h, x, residual

    @property
    def upsample_factors(self) -> tuple[int, ...] | None:
        """The factors of an up block's upsampling, None for other blocks."""
        return self.resample.factors if isinstance(self.resample, Upsample) else None

    def _in_conv(self, h: torch.Tensor) -> torch.Tensor:
        """The first convolution, after the upsampling of an up block."""
        if self.upsample_factors:
            return upsample_convolve(self.in_conv, h, self.upsample_factors)
        return convolve(self.in_conv, h)


def film_layers(block: nn.Module) -> list[nn.Linear]:
    """The embedding projections (`emb_proj`) of the accelerated ResBlocks in `block`, in the
    order `AcceleratedEmbedSequential` runs them."""
    return [
        layer.emb_proj
        for layer in block
        if isinstance(layer, AcceleratedResBlock) and layer.emb_proj is not None
    ]


class AcceleratedEmbedSequential(EmbedSequential):
    """`EmbedSequential` that hands a decoder block's `h` and skip to its first ResBlock
    unconcatenated, so a checkpointed block keeps the two tensors, not their concatenation,
    and its ResBlocks the embedding projections the UNet computed for them."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        projections: tuple[torch.Tensor, ...] = (),
    ) -> torch.Tensor:
        """Run every layer in order on `x` (and the decoder's `skip`); `projections` are the
        embedding's projections for `film_layers(self)`, in order, or none."""
        if skip is not None and not isinstance(self[0], AcceleratedResBlock):
            x, skip = torch.cat([x, skip], dim=1), None
        given = iter(projections)
        for layer in self:
            if isinstance(layer, AcceleratedResBlock):
                projection = next(given, None) if layer.emb_proj is not None else None
                x, skip = layer(x, emb, skip, projection), None
            elif isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, CONTEXT_LAYERS):
                x = layer(x, context)  # attention and transformer blocks run as they are
            else:
                x = convolve(layer, x)  # the stem; any other layer is just called
        return x


class AcceleratedUNet(UNet):
    """`UNet` with channels-last activations on a GPU, decoder skips passed unconcatenated,
    and fused output heads."""

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
        """Denoise `x` at `t`, as `UNet.forward`."""
        x, t, cond, context, added_cond = self._prepare_inputs(
            x, t, cond, context, labels, added_cond, time_ids
        )
        pads = self._padding(tuple(x.shape[2:]))
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        x = to_cuda_layout(x, self.config.dims)
        if pads is not None:
            x = F.pad(x, pads, mode="replicate")
        emb = self.embed(t, labels, added_cond, time_ids)
        projections = iter(self._projections(emb))

        skips = []
        h = x
        for block, emits_skip in zip(self.input_blocks, self._emits_skip):
            h = self._run(block, h, emb, context, None, next(projections))
            if emits_skip:
                skips.append(h)
        h = self._run(self.middle_block, h, emb, context, None, next(projections))
        for block in self.output_blocks:
            h = self._run(block, h, emb, context, skips.pop(), next(projections))

        out = self._run_head(self.out, h)
        if self.out_logvar is not None:
            out = torch.cat([out, self._run_head(self.out_logvar, h)], dim=1)
        if pads is not None:
            out = F.pad(out, [-amount for amount in pads])  # crop back; a copy, not a view
        return out

    def _projections(self, emb: torch.Tensor | None) -> list[tuple[torch.Tensor, ...]]:
        """For each block in the order the forward runs them, the embedding's projections by
        its `film_layers`, computed by few GEMMs in graphs that `torch.compile` traces
        (`settings.BATCHED_FILM`, or `settings.BATCHED_FILM_INFERENCE` without gradients);
        empty tuples where the blocks project it themselves. Eager calls keep the blocks' own
        layers, whose weights autocast casts once per region, where the concatenated weight
        would be cast on every call."""
        blocks = [*self.input_blocks, self.middle_block, *self.output_blocks]
        batched = (
            settings.BATCHED_FILM if torch.is_grad_enabled() else settings.BATCHED_FILM_INFERENCE
        )
        if emb is None or not batched or not torch.compiler.is_compiling():
            return [()] * len(blocks)
        layers = [film_layers(block) for block in blocks]
        if not batchable([layer for group in layers for layer in group]):
            return [()] * len(blocks)
        projections: list[tuple[torch.Tensor, ...]] = []
        for group in self._projection_groups(len(blocks)):
            given = iter(project_all(emb, [layer for i in group for layer in layers[i]]))
            projections += [tuple(next(given) for _ in layers[i]) for i in group]
        return projections

    def _projection_groups(self, blocks: int) -> list[range]:
        """Which blocks' projections one GEMM computes. With gradients, all of them (one GEMM
        for their gradients too). Without, one GEMM for the encoder and middle and one per
        decoder level, so each level's projections are freed after it: one output for all would
        live to the last block, through the forward's peak in the last level."""
        if torch.is_grad_enabled():
            return [range(blocks)]
        decoder = len(self.output_blocks)
        per_level = decoder // len(self.config.channel_mult)
        start = blocks - decoder
        return [range(start)] + [
            range(first, first + per_level) for first in range(start, blocks, per_level)
        ]

    @staticmethod
    def _run_head(head: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        norm, _, conv = head  # GroupNorm, SiLU, conv: the norm and SiLU run fused
        return convolve(conv, norm_act(norm, h))
