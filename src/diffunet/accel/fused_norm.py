"""GroupNorm → (scale-shift) → SiLU as one fused GPU operation, with an exact eager fallback.

Every ResBlock normalizes twice and the second norm carries the time embedding's FiLM, so in
eager PyTorch one "norm" is four or five memory-bound kernels plus layout conversions (the
CUDA GroupNorm is not channels_last-native) and float32 intermediates under autocast. The
Triton path reads the activation in whatever layout it has (NCHW or channels_last, 1D/2D/3D),
keeps statistics in float32, and writes the result once in the input dtype: forward = a
statistics pass + a tiny combine + a normalize pass, backward = a reduction pass + a tiny
combine + a gradient pass; small calls run each direction as one kernel.

`group_norm_act` picks the fused path for CUDA tensors when Triton is importable and
`settings.FUSED_NORM` is on, from `settings.FUSED_EAGER_MIN_ELEMENTS` elements; everything
else takes the eager path, which is the reference the fused kernels are tested against.
Compiled graphs reach the same kernels through the operators `diffunet::group_norm_act` and
`diffunet::group_norm_act_backward` (`accel.library`), which Inductor calls as they are, from
the sizes `configure_for_compile_mode` sets for the compile mode.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from diffunet.accel import settings
from diffunet.accel.layout import pin_layout
from diffunet.accel.library import define_op, define_triton_op
from diffunet.accel.settings import (  # noqa: F401  (the setters, importable from here too)
    CUDA_GRAPH_MODES,
    LaunchConfig,
    LaunchPlan,
    configure_for_compile_mode,
    eager_min_elements,
    set_compiled_min_elements,
    set_fused_enabled,
)

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the eager path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _interpreting() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_take(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can normalize `x` at all: switched on, on a GPU (or Triton's
    interpreter) and in a floating dtype they read."""
    return (
        settings.FUSED_NORM
        and triton is not None
        and (x.is_cuda or _interpreting())
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def fused_available(x: torch.Tensor, numel: int | None = None) -> bool:
    """Whether `group_norm_act(x, ...)` would run the fused kernels in eager mode (on a tensor
    like `x` of `numel` elements where given, such as a concatenation not yet made).

    Under `torch.compile` see `compiled_fused_wanted`; `torch.export` always traces the
    reference path.
    """
    numel = x.numel() if numel is None else numel
    return (
        _kernels_take(x)
        and (numel >= settings.FUSED_EAGER_MIN_ELEMENTS or _interpreting())
        and not torch.compiler.is_compiling()
    )


def compiled_fused_wanted(x: torch.Tensor) -> bool:
    """Whether the `group_norm_act(x, ...)` that Dynamo traces calls the fused kernels: as the
    operator `diffunet::group_norm_act` from `settings.COMPILED_MIN_ELEMENTS`, or where the
    graph launches them itself (`_inline_wanted`) from `settings.INLINE_MIN_ELEMENTS` too."""
    if not torch.compiler.is_dynamo_compiling():
        return False
    # Dynamo guards the graph on the grad mode, so each mode traces its own decision.
    threshold = (
        settings.COMPILED_MIN_ELEMENTS
        if torch.is_grad_enabled()
        else settings.COMPILED_MIN_ELEMENTS_INFERENCE
    )
    if threshold is None or not _kernels_take(x):
        return False
    if _inline_wanted(x):
        threshold = min(threshold, settings.INLINE_MIN_ELEMENTS)
    return x.numel() >= threshold


def group_norm_act_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager `x + add`, GroupNorm, then `* (1 + scale) + shift` (all three per batch and
    channel), then SiLU."""
    view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    if add is not None:
        x = x + add.reshape(view).to(x.dtype)
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        h = h * (1 + scale.reshape(view)) + shift.reshape(view)
    return F.silu(h) if act else h


def group_norm_act(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm of `x + add` (`x`: (B, C, *spatial); `add`: an optional (B, C) offset, such as
    a time embedding), optional FiLM `scale`/`shift` (B, C), optional SiLU.

    The fused kernels fold `add` into the statistics and the normalization, so `x + add` is
    never written out.
    """
    if compiled_fused_wanted(x) or fused_available(x):
        film = scale is not None
        scale, shift, add = (per_channel_operand(t, x) for t in (scale, shift, add))
        x = x.contiguous(memory_format=_memory_format(x))
        args = (x, weight, bias, scale, shift, add, num_groups, eps, film, act, _inline_wanted(x))
        return _GroupNormAct.apply(*args)
    return group_norm_act_reference(x, num_groups, weight, bias, eps, scale, shift, act, add)


def per_channel_operand(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A per-(batch, channel) input of the kernels (`scale`, `shift`, `add`) as they read it:
    dense (B, C), since these are usually chunks of one projection, or empty for None."""
    return x.new_zeros(0) if t is None else t.reshape(x.shape[0], x.shape[1]).contiguous()


def norm_act(
    norm: torch.nn.GroupNorm,
    x: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """`group_norm_act` with the groups, affine parameters and eps of the module `norm`."""
    return group_norm_act(
        x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift, act, add
    )


# ---------------------------------------------------------------------------------------------
# Triton kernels. x is viewed as (B, C, N) with arbitrary strides, N = prod(spatial), so one
# kernel serves NCHW and channels_last in 1D, 2D and 3D. Grid: (B, chunks of N).


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter: a large GPU's count
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


class LaunchShape(NamedTuple):
    """How one call's kernels cover a (B, C, N) view: tiles of `block_c` channels × `block_n`
    positions, `chunks` programs per sample of `rows` positions each; the backward's reduce
    kernel in `reduction_warps` warps, the others in `num_warps`."""

    block_c: int
    block_n: int
    rows: int
    chunks: int
    num_warps: int
    loop_stages: int
    reduction_warps: int

    def kernel_options(self, reduction: bool = False) -> dict[str, int]:
        """The streaming kernels' tile and loop constexprs, and their warps (those of the
        backward's reduce kernel where `reduction`)."""
        return {
            "BLOCK_C": self.block_c,
            "BLOCK_N": self.block_n,
            "STAGES": self.loop_stages,
            "num_warps": self.reduction_warps if reduction else self.num_warps,
        }


def _next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, as `triton.next_power_of_2` (the launch shapes are
    computed, and tested, without Triton)."""
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉, as `triton.cdiv`."""
    return -(-a // b)


#: The most per-chunk partials (chunks × channels) a combine kernel loads at once, per buffer.
_COMBINE_TILE_ELEMENTS = 2048


def _combine_options(chunks: int, per_group: int) -> dict[str, int]:
    """The combine kernels' constexprs: a group's channels (`BLOCK_G`) and how many of a
    sample's chunks each of their loads covers (`BLOCK_K`; all of them, up to the tile)."""
    block_g = _next_power_of_2(per_group)
    block_k = min(_next_power_of_2(chunks), max(1, _COMBINE_TILE_ELEMENTS // block_g))
    return {"BLOCK_G": block_g, "BLOCK_K": block_k}


def _launch_shape(x3: torch.Tensor) -> LaunchShape:
    """The `LaunchShape` of a (B, C, N) view under `settings.NORM_LAUNCH`."""
    b, c, n = x3.shape
    launch = settings.NORM_LAUNCH.for_elements(b * c * n)
    block_c = _next_power_of_2(c)
    block_n = max(1, min(launch.tile_elements // block_c, _next_power_of_2(n)))
    target_programs = launch.programs_per_sm * _sm_count(x3.device)
    chunks = max(1, min(_cdiv(n, block_n), _cdiv(target_programs, b)))
    rows = _cdiv(_cdiv(n, chunks), block_n) * block_n
    reduction_warps = launch.reduction_warps or launch.num_warps
    return LaunchShape(
        block_c,
        block_n,
        rows,
        _cdiv(n, rows),
        launch.num_warps,
        launch.loop_stages,
        reduction_warps,
    )


class OnePassShape(NamedTuple):
    """How the one-kernel forward and backward cover a (B, C, N) view: `slices` programs per
    sample, each owning `groups` whole groups (`channels` channels, the last slice possibly
    fewer), in tiles of `block_c` channels × `block_n` positions; `single_tile` where one tile
    holds all positions, which then stay in registers between the kernels' two passes."""

    groups: int
    channels: int
    slices: int
    block_c: int
    block_n: int
    num_warps: int
    loop_stages: int
    single_tile: bool

    def kernel_options(self) -> dict[str, int]:
        """The one-kernel kernels' tile, group and loop constexprs, and their warps."""
        return {
            "BLOCK_C": self.block_c,
            "BLOCK_N": self.block_n,
            "BLOCK_G": _next_power_of_2(self.groups),
            "STAGES": self.loop_stages,
            "SINGLE_TILE": self.single_tile,
            "num_warps": self.num_warps,
        }


def _one_pass_shape(x3: torch.Tensor, num_groups: int) -> OnePassShape | None:
    """The `OnePassShape` of a (B, C, N) view under `settings.NORM_LAUNCH`, or None where its
    programs would own more than the configuration's `one_pass_elements`."""
    b, c, n = x3.shape
    launch = settings.NORM_LAUNCH.for_elements(b * c * n)
    per_group = c // num_groups
    groups = 1  # doubled, so that the kernels' (channel, group) indicator has no idle column
    while groups * 2 <= num_groups and groups * per_group < settings.ONE_PASS_MIN_CHANNELS:
        groups *= 2
    channels = groups * per_group
    if channels * n > launch.one_pass_elements:
        return None
    block_c = _next_power_of_2(channels)
    block_n = max(1, min(launch.tile_elements // block_c, _next_power_of_2(n)))
    return OnePassShape(
        groups,
        channels,
        _cdiv(num_groups, groups),
        block_c,
        block_n,
        launch.num_warps,
        launch.loop_stages,
        single_tile=n <= block_n,
    )


if triton is not None:

    @triton.jit
    def _shifted_sums(
        base,
        k,
        start,
        rows,
        N,
        cs,
        cmask,
        sxc,
        sxn,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Per channel, Σ (x - k) and Σ (x - k)² over positions [start, start + rows) of the
        sample at `base`."""
        acc1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            v = tl.load(base + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0)
            d = tl.where(mask, v.to(tl.float32) - k[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)

    @triton.jit
    def _normalize_rows(
        base,
        y_base,
        start,
        rows,
        N,
        cs,
        cmask,
        sxc,
        sxn,
        syc,
        syn,
        gain,
        offset_c,
        ACT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Writes x * gain + offset (through the SiLU where `ACT`) at positions
        [start, start + rows) of one sample."""
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            v = tl.load(base + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0)
            h = v.to(tl.float32) * gain[None, :] + offset_c[None, :]
            if ACT:
                h = h * tl.sigmoid(h)
            tl.store(
                y_base + ns[:, None] * syn + cs[None, :] * syc,
                h.to(y_base.dtype.element_ty),
                mask=mask,
            )

    @triton.jit
    def _group_indicator(js, per_group, cmask, BLOCK_G: tl.constexpr):
        """Which of a slice's groups each of its channels `js` belongs to: a (channel, group)
        mask, false for channels outside the tensor."""
        return (js[:, None] // per_group == tl.arange(0, BLOCK_G)[None, :]) & cmask[:, None]

    @triton.jit
    def _group_sums(values, member):
        """Per channel, the sum of the per-channel `values` over the channel's group."""
        per_group = tl.sum(tl.where(member, values[:, None], 0.0), axis=0)
        return tl.sum(tl.where(member, per_group[None, :], 0.0), axis=1)

    @triton.jit
    def _stats_kernel(
        x_ptr,
        s1_ptr,
        s2_ptr,
        shift_ptr,
        C,
        N,
        rows,
        sxb,
        sxc,
        sxn,
        num_chunks,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        base = x_ptr + b * sxb
        # Shift by the first position's value per channel: sums of (x - K) stay well conditioned.
        k = tl.load(base + cs * sxc, mask=cmask, other=0.0).to(tl.float32)
        s1, s2 = _shifted_sums(
            base, k, chunk * rows, rows, N, cs, cmask, sxc, sxn, BLOCK_C, BLOCK_N, STAGES
        )
        out = (b * num_chunks + chunk) * C + cs
        tl.store(s1_ptr + out, s1, mask=cmask)
        tl.store(s2_ptr + out, s2, mask=cmask)
        if chunk == 0:
            tl.store(shift_ptr + b * C + cs, k, mask=cmask)

    @triton.jit
    def _chunk_sums(
        first_ptr,
        second_ptr,
        b,
        num_chunks,
        C,
        cs,
        cmask,
        BLOCK_K: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """Sample `b`'s per-chunk partials of two (B, chunks, C) buffers summed over the chunks
        at channels `cs`, `BLOCK_K` chunks per load: one wide load, not one load per chunk."""
        ks = tl.arange(0, BLOCK_K)
        first = tl.zeros([BLOCK_G], dtype=tl.float32)
        second = tl.zeros([BLOCK_G], dtype=tl.float32)
        for k0 in range(0, num_chunks, BLOCK_K):
            rows = b * num_chunks + k0 + ks
            offsets = rows[:, None] * C + cs[None, :]
            mask = ((k0 + ks) < num_chunks)[:, None] & cmask[None, :]
            first += tl.sum(tl.load(first_ptr + offsets, mask=mask, other=0.0), axis=0)
            second += tl.sum(tl.load(second_ptr + offsets, mask=mask, other=0.0), axis=0)
        return first, second

    @triton.jit
    def _stats_combine_kernel(
        s1_ptr,
        s2_ptr,
        shift_ptr,
        add_ptr,
        mean_ptr,
        rstd_ptr,
        C,
        N,
        num_chunks,
        per_group,
        eps,
        ADD: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        cs = g * per_group + tl.arange(0, BLOCK_G)
        cmask = tl.arange(0, BLOCK_G) < per_group
        s1, s2 = _chunk_sums(s1_ptr, s2_ptr, b, num_chunks, C, cs, cmask, BLOCK_K, BLOCK_G)
        k = tl.load(shift_ptr + b * C + cs, mask=cmask, other=0.0)
        channel_mean = k + s1 / N
        if ADD:
            added = tl.load(add_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            channel_mean += added
        channel_m2 = tl.maximum(s2 - s1 * s1 / N, 0.0)
        group_mean = tl.sum(tl.where(cmask, channel_mean, 0.0), axis=0) / per_group
        spread = tl.where(cmask, channel_mean - group_mean, 0.0)
        group_m2 = tl.sum(tl.where(cmask, channel_m2, 0.0), axis=0) + N * tl.sum(
            spread * spread, axis=0
        )
        rstd = 1.0 / tl.sqrt(group_m2 / (N * per_group) + eps)
        # The stored "mean" is the centre of x itself: x - (mean - add) == (x + add) - mean.
        centre = tl.zeros([BLOCK_G], dtype=tl.float32) + group_mean
        if ADD:
            centre -= added
        tl.store(mean_ptr + b * C + cs, centre, mask=cmask)
        tl.store(rstd_ptr + b * C + cs, tl.zeros([BLOCK_G], dtype=tl.float32) + rstd, mask=cmask)

    @triton.jit
    def _store_rounded(ptr, value, mask):
        """Stores float32 `value` in `ptr`'s element type, rounded to nearest even as `Tensor.to`
        rounds (bf16 by hand: Triton's interpreter truncates it)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            value = bits.to(tl.float32, bitcast=True)
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_combine_kernel(
        a_ptr,
        b_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        a_full_ptr,
        b_full_ptr,
        ds_ptr,
        dsh_ptr,
        c1_ptr,
        c2_ptr,
        C,
        N,
        num_chunks,
        per_group,
        FILM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        cs = g * per_group + tl.arange(0, BLOCK_G)
        cmask = tl.arange(0, BLOCK_G) < per_group
        a_sum, b_sum = _chunk_sums(a_ptr, b_ptr, b, num_chunks, C, cs, cmask, BLOCK_K, BLOCK_G)
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        a_full = a_sum
        b_full = b_sum
        if FILM:
            s = 1.0 + tl.load(scale_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            a_full = a_sum * s
            b_full = b_sum * s
            bb = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
            _store_rounded(ds_ptr + b * C + cs, w * a_sum + bb * b_sum, cmask)
            _store_rounded(dsh_ptr + b * C + cs, b_sum, cmask)
        tl.store(a_full_ptr + b * C + cs, a_full, mask=cmask)
        tl.store(b_full_ptr + b * C + cs, b_full, mask=cmask)
        count = N * per_group
        c1 = tl.sum(tl.where(cmask, w * b_full, 0.0), axis=0) / count
        c2 = tl.sum(tl.where(cmask, w * a_full, 0.0), axis=0) / count
        tl.store(c1_ptr + b * C + cs, tl.zeros([BLOCK_G], dtype=tl.float32) + c1, mask=cmask)
        tl.store(c2_ptr + b * C + cs, tl.zeros([BLOCK_G], dtype=tl.float32) + c2, mask=cmask)

    @triton.jit
    def _channel_affine(
        w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, centre, rstd, FILM: tl.constexpr
    ):
        """Per channel, the gain and offset that map x to the normalized, affine (and FiLM)
        output: y = x * gain + offset."""
        gain = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32) * rstd
        offset = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32) - centre * gain
        if FILM:
            s = 1.0 + tl.load(scale_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            gain = gain * s
            offset = offset * s + tl.load(sh_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
        return gain, offset

    @triton.jit
    def _normalize_kernel(
        x_ptr,
        y_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        C,
        N,
        rows,
        sxb,
        sxc,
        sxn,
        syb,
        syc,
        syn,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean = tl.load(mean_ptr + b * C + cs, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + cs, mask=cmask, other=0.0)
        gain, offset_c = _channel_affine(
            w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, mean, rstd, FILM
        )
        _normalize_rows(
            x_ptr + b * sxb,
            y_ptr + b * syb,
            chunk * rows,
            rows,
            N,
            cs,
            cmask,
            sxc,
            sxn,
            syc,
            syn,
            gain,
            offset_c,
            ACT,
            BLOCK_N,
            STAGES,
        )

    @triton.jit
    def _one_pass_kernel(
        x_ptr,
        y_ptr,
        add_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        C,
        N,
        per_group,
        slice_channels,
        eps,
        sxb,
        sxc,
        sxn,
        syb,
        syc,
        syn,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        STAGES: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        # _stats_kernel, _stats_combine_kernel and _normalize_kernel for one sample's slice of
        # whole groups; the second pass reads x back, mostly from L2, unless all its positions
        # fit one tile (SINGLE_TILE), which stays in registers.
        b = tl.program_id(0)
        js = tl.arange(0, BLOCK_C)
        cs = tl.program_id(1) * slice_channels + js
        cmask = (js < slice_channels) & (cs < C)
        base = x_ptr + b * sxb
        k = tl.load(base + cs * sxc, mask=cmask, other=0.0).to(tl.float32)
        if SINGLE_TILE:
            ns = tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            v = tl.load(base + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0).to(
                tl.float32
            )
            d = tl.where(mask, v - k[None, :], 0.0)
            s1 = tl.sum(d, axis=0)
            s2 = tl.sum(d * d, axis=0)
        else:
            s1, s2 = _shifted_sums(base, k, 0, N, N, cs, cmask, sxc, sxn, BLOCK_C, BLOCK_N, STAGES)
        channel_mean = k + s1 / N
        if ADD:
            added = tl.load(add_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            channel_mean += added
        channel_m2 = tl.maximum(s2 - s1 * s1 / N, 0.0)
        member = _group_indicator(js, per_group, cmask, BLOCK_G)
        centre = _group_sums(channel_mean, member) / per_group
        spread = tl.where(cmask, channel_mean - centre, 0.0)
        group_m2 = _group_sums(channel_m2 + N * spread * spread, member)
        rstd = 1.0 / tl.sqrt(group_m2 / (N * per_group) + eps)
        if ADD:  # the stored centre is that of x itself, as _stats_combine_kernel's
            centre -= added
        tl.store(mean_ptr + b * C + cs, centre, mask=cmask)
        tl.store(rstd_ptr + b * C + cs, rstd, mask=cmask)
        gain, offset_c = _channel_affine(
            w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, centre, rstd, FILM
        )
        if SINGLE_TILE:
            h = v * gain[None, :] + offset_c[None, :]
            if ACT:
                h = h * tl.sigmoid(h)
            tl.store(
                y_ptr + b * syb + ns[:, None] * syn + cs[None, :] * syc,
                h.to(y_ptr.dtype.element_ty),
                mask=mask,
            )
        else:
            _normalize_rows(
                base,
                y_ptr + b * syb,
                0,
                N,
                N,
                cs,
                cmask,
                sxc,
                sxn,
                syc,
                syn,
                gain,
                offset_c,
                ACT,
                BLOCK_N,
                STAGES,
            )

    @triton.jit
    def _channel_operands(
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        b,
        C,
        cs,
        cmask,
        BLOCK_C: tl.constexpr,
        FILM: tl.constexpr,
    ):
        """Per channel of sample b, in float32: the forward's centre and rstd, the affine
        weight and bias, and the FiLM factor (1 + scale) and shift (1 and 0 without FiLM)."""
        centre = tl.load(mean_ptr + b * C + cs, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + cs, mask=cmask, other=0.0)
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        s = tl.full([BLOCK_C], 1.0, tl.float32)
        sh = tl.zeros([BLOCK_C], dtype=tl.float32)
        if FILM:
            s += tl.load(scale_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
            sh = tl.load(sh_ptr + b * C + cs, mask=cmask, other=0.0).to(tl.float32)
        return centre, rstd, w, bb, s, sh

    @triton.jit
    def _tile_gradient(
        x_ptr,
        dy_ptr,
        b,
        ns,
        cs,
        mask,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        centre,
        rstd,
        w,
        bb,
        s,
        sh,
        ACT: tl.constexpr,
    ):
        """One tile's normalized input x̂ and the gradient that reaches the norm's affine
        output (through the SiLU where `ACT`), in float32."""
        v = tl.load(
            x_ptr + b * sxb + ns[:, None] * sxn + cs[None, :] * sxc, mask=mask, other=0.0
        ).to(tl.float32)
        g = tl.load(
            dy_ptr + b * sdb + ns[:, None] * sdn + cs[None, :] * sdc, mask=mask, other=0.0
        ).to(tl.float32)
        xhat = (v - centre[None, :]) * rstd[None, :]
        if ACT:
            z = (xhat * w[None, :] + bb[None, :]) * s[None, :] + sh[None, :]
            sig = tl.sigmoid(z)
            g = g * sig * (1.0 + z * (1.0 - sig))
        return xhat, g

    @triton.jit
    def _gradient_sums(
        x_ptr,
        dy_ptr,
        b,
        start,
        rows,
        N,
        cs,
        cmask,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        centre,
        rstd,
        w,
        bb,
        s,
        sh,
        ACT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Per channel, Σ g·x̂ and Σ g over positions [start, start + rows) of one sample, g
        being the gradient at the norm's affine output (`_tile_gradient`)."""
        acc_a = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            xhat, g = _tile_gradient(
                x_ptr,
                dy_ptr,
                b,
                ns,
                cs,
                mask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
            )
            g = tl.where(mask, g, 0.0)
            acc_a += g * xhat
            acc_b += g
        return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)

    @triton.jit
    def _input_gradient(
        x_ptr,
        dy_ptr,
        dx_ptr,
        b,
        start,
        rows,
        N,
        cs,
        cmask,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        sob,
        soc,
        son,
        centre,
        rstd,
        w,
        bb,
        s,
        sh,
        c1,
        c2,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Writes dx at positions [start, start + rows) of one sample, from the group means
        c1 = mean(dx̂) and c2 = mean(dx̂·x̂); returns its sum per channel where `ADD` (the
        gradient of `add`), else zeros."""
        acc_dx = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for offset in tl.range(0, rows, BLOCK_N, num_stages=STAGES):
            ns = start + offset + tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            xhat, g = _tile_gradient(
                x_ptr,
                dy_ptr,
                b,
                ns,
                cs,
                mask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
            )
            dxhat = g * (s * w)[None, :]
            dx = rstd[None, :] * (dxhat - c1[None, :] - xhat * c2[None, :])
            tl.store(
                dx_ptr + b * sob + ns[:, None] * son + cs[None, :] * soc,
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask,
            )
            if ADD:
                acc_dx += tl.where(mask, dx, 0.0)
        return tl.sum(acc_dx, axis=0)

    @triton.jit
    def _backward_reduce_kernel(
        x_ptr,
        dy_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        a_ptr,
        b_ptr,
        C,
        N,
        rows,
        num_chunks,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean, rstd, w, bb, s, sh = _channel_operands(
            mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, BLOCK_C, FILM
        )
        a_sum, b_sum = _gradient_sums(
            x_ptr,
            dy_ptr,
            b,
            chunk * rows,
            rows,
            N,
            cs,
            cmask,
            sxb,
            sxc,
            sxn,
            sdb,
            sdc,
            sdn,
            mean,
            rstd,
            w,
            bb,
            s,
            sh,
            ACT,
            BLOCK_C,
            BLOCK_N,
            STAGES,
        )
        out = (b * num_chunks + chunk) * C + cs
        tl.store(a_ptr + out, a_sum, mask=cmask)
        tl.store(b_ptr + out, b_sum, mask=cmask)

    @triton.jit
    def _backward_dx_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        c1_ptr,
        c2_ptr,
        dadd_ptr,
        C,
        N,
        rows,
        num_chunks,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        sob,
        soc,
        son,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean, rstd, w, bb, s, sh = _channel_operands(
            mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, BLOCK_C, FILM
        )
        c1 = tl.load(c1_ptr + b * C + cs, mask=cmask, other=0.0)
        c2 = tl.load(c2_ptr + b * C + cs, mask=cmask, other=0.0)
        dx_sum = _input_gradient(
            x_ptr,
            dy_ptr,
            dx_ptr,
            b,
            chunk * rows,
            rows,
            N,
            cs,
            cmask,
            sxb,
            sxc,
            sxn,
            sdb,
            sdc,
            sdn,
            sob,
            soc,
            son,
            mean,
            rstd,
            w,
            bb,
            s,
            sh,
            c1,
            c2,
            ACT,
            ADD,
            BLOCK_C,
            BLOCK_N,
            STAGES,
        )
        if ADD:  # the gradient of `add` is the input gradient summed over positions
            tl.store(dadd_ptr + (b * num_chunks + chunk) * C + cs, dx_sum, mask=cmask)

    @triton.jit
    def _one_pass_backward_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        sh_ptr,
        a_full_ptr,
        b_full_ptr,
        ds_ptr,
        dsh_ptr,
        dadd_ptr,
        C,
        N,
        per_group,
        slice_channels,
        sxb,
        sxc,
        sxn,
        sdb,
        sdc,
        sdn,
        sob,
        soc,
        son,
        FILM: tl.constexpr,
        ACT: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        STAGES: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        # _backward_reduce_kernel, _backward_combine_kernel and _backward_dx_kernel for one
        # sample's slice of whole groups; the second pass reads x and dy back, mostly from L2,
        # unless all its positions fit one tile (SINGLE_TILE), which stays in registers.
        b = tl.program_id(0)
        js = tl.arange(0, BLOCK_C)
        cs = tl.program_id(1) * slice_channels + js
        cmask = (js < slice_channels) & (cs < C)
        centre, rstd, w, bb, s, sh = _channel_operands(
            mean_ptr, rstd_ptr, w_ptr, bias_ptr, scale_ptr, sh_ptr, b, C, cs, cmask, BLOCK_C, FILM
        )
        if SINGLE_TILE:
            ns = tl.arange(0, BLOCK_N)
            mask = (ns[:, None] < N) & cmask[None, :]
            xhat, g = _tile_gradient(
                x_ptr,
                dy_ptr,
                b,
                ns,
                cs,
                mask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
            )
            g = tl.where(mask, g, 0.0)
            a_sum = tl.sum(g * xhat, axis=0)
            b_sum = tl.sum(g, axis=0)
        else:
            a_sum, b_sum = _gradient_sums(
                x_ptr,
                dy_ptr,
                b,
                0,
                N,
                N,
                cs,
                cmask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                ACT,
                BLOCK_C,
                BLOCK_N,
                STAGES,
            )
        if FILM:
            _store_rounded(ds_ptr + b * C + cs, w * a_sum + bb * b_sum, cmask)
            _store_rounded(dsh_ptr + b * C + cs, b_sum, cmask)
        a_full = a_sum * s
        b_full = b_sum * s
        tl.store(a_full_ptr + b * C + cs, a_full, mask=cmask)
        tl.store(b_full_ptr + b * C + cs, b_full, mask=cmask)
        member = _group_indicator(js, per_group, cmask, BLOCK_G)
        c1 = _group_sums(w * b_full, member) / (N * per_group)
        c2 = _group_sums(w * a_full, member) / (N * per_group)
        if SINGLE_TILE:
            dx = rstd[None, :] * (g * (s * w)[None, :] - c1[None, :] - xhat * c2[None, :])
            tl.store(
                dx_ptr + b * sob + ns[:, None] * son + cs[None, :] * soc,
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask,
            )
            dx_sum = tl.sum(tl.where(mask, dx, 0.0), axis=0)
        else:
            dx_sum = _input_gradient(
                x_ptr,
                dy_ptr,
                dx_ptr,
                b,
                0,
                N,
                N,
                cs,
                cmask,
                sxb,
                sxc,
                sxn,
                sdb,
                sdc,
                sdn,
                sob,
                soc,
                son,
                centre,
                rstd,
                w,
                bb,
                s,
                sh,
                c1,
                c2,
                ACT,
                ADD,
                BLOCK_C,
                BLOCK_N,
                STAGES,
            )
        if ADD:
            _store_rounded(dadd_ptr + b * C + cs, dx_sum, cmask)


def _direct(kernel: Callable) -> Callable:
    """A Triton kernel launched as it is: eager calls and the opaque operators. The inline
    operators pass `torch.library.wrap_triton` instead, so tracing records the launches."""
    return kernel


def _group_stats(
    x3: torch.Tensor,
    add: torch.Tensor,
    num_groups: int,
    eps: float,
    launch: LaunchShape,
    kernel: Callable = _direct,
):
    """Per-(batch, channel) centre and rstd of each channel's group of `x3 + add` (`add` (B, C),
    or empty for none), in float32; the centre is the group's mean minus `add`. `launch` is
    `_launch_shape(x3)`; `kernel` wraps each Triton kernel before its launch (`_direct`)."""
    b, c, n = x3.shape
    chunks = launch.chunks
    s1 = torch.empty(b, chunks, c, device=x3.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    k = torch.empty(b, c, device=x3.device, dtype=torch.float32)
    kernel(_stats_kernel)[(b, chunks)](
        x3, s1, s2, k, c, n, launch.rows, *x3.stride(), chunks, **launch.kernel_options()
    )
    mean, rstd = torch.empty_like(k), torch.empty_like(k)
    per_group = c // num_groups
    kernel(_stats_combine_kernel)[(b, num_groups)](
        s1,
        s2,
        k,
        add,
        mean,
        rstd,
        c,
        n,
        chunks,
        per_group,
        eps,
        ADD=add.numel() > 0,
        **_combine_options(chunks, per_group),
    )
    return mean, rstd


def _forward(x, weight, bias, scale, shift, add, num_groups, eps, film, act, kernel=_direct):
    x3 = x.flatten(2)
    one_pass = _one_pass_shape(x3, num_groups)
    if one_pass is not None:
        return _forward_in_one_kernel(
            x, x3, weight, bias, scale, shift, add, num_groups, eps, film, act, one_pass, kernel
        )
    launch = _launch_shape(x3)
    mean, rstd = _group_stats(x3, add, num_groups, eps, launch, kernel)
    y = torch.empty_like(x)
    y3 = y.flatten(2)
    b, c, n = x3.shape
    kernel(_normalize_kernel)[(b, launch.chunks)](
        x3,
        y3,
        mean,
        rstd,
        weight,
        bias,
        scale,
        shift,
        c,
        n,
        launch.rows,
        *x3.stride(),
        *y3.stride(),
        FILM=film,
        ACT=act,
        **launch.kernel_options(),
    )
    return y, mean, rstd


def _forward_in_one_kernel(
    x,
    x3,
    weight,
    bias,
    scale,
    shift,
    add,
    num_groups,
    eps,
    film,
    act,
    shape: OnePassShape,
    kernel: Callable = _direct,
):
    """`_forward` as one kernel, `shape` being `_one_pass_shape(x3, num_groups)`."""
    b, c, n = x3.shape
    mean = torch.empty(b, c, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    y3 = y.flatten(2)
    kernel(_one_pass_kernel)[(b, shape.slices)](
        x3,
        y3,
        add,
        mean,
        rstd,
        weight,
        bias,
        scale,
        shift,
        c,
        n,
        c // num_groups,
        shape.channels,
        eps,
        *x3.stride(),
        *y3.stride(),
        FILM=film,
        ACT=act,
        ADD=add.numel() > 0,
        **shape.kernel_options(),
    )
    return y, mean, rstd


def _backward(
    grad,
    x,
    weight,
    bias,
    scale,
    shift,
    add,
    mean,
    rstd,
    num_groups,
    film,
    act,
    out=None,
    kernel: Callable = _direct,
):
    """(dx, dparams, dscale, dshift, dadd), dparams being the (2, C) gradients of weight and
    bias (`_parameter_gradients`); the last three None where not used.

    dx is written to `out` where given, which may be `x` itself: every program reads each
    element of x it owns before it writes that element's gradient, and no other program
    reads it.
    """
    x3, g3 = x.flatten(2), grad.flatten(2)
    one_pass = _one_pass_shape(x3, num_groups)
    if one_pass is not None:
        return _backward_in_one_kernel(
            x,
            x3,
            g3,
            weight,
            bias,
            scale,
            shift,
            add,
            mean,
            rstd,
            num_groups,
            film,
            act,
            one_pass,
            out,
            kernel,
        )
    b, c, n = x3.shape
    launch = _launch_shape(x3)
    rows, chunks = launch.rows, launch.chunks
    a_part = torch.empty(b, chunks, c, device=x.device, dtype=torch.float32)
    b_part = torch.empty_like(a_part)
    kernel(_backward_reduce_kernel)[(b, chunks)](
        x3,
        g3,
        mean,
        rstd,
        weight,
        bias,
        scale,
        shift,
        a_part,
        b_part,
        c,
        n,
        rows,
        chunks,
        *x3.stride(),
        *g3.stride(),
        FILM=film,
        ACT=act,
        **launch.kernel_options(reduction=True),
    )
    # Per (batch, channel): Σ dz·x̂ and Σ dz (a_full, b_full), the FiLM gradients, and the
    # group means c1 = mean(dx̂), c2 = mean(dx̂·x̂) that the input gradient needs.
    sums = _per_sample_sums(x, b, c)
    a_full, b_full = sums
    c1, c2 = (torch.empty(b, c, device=x.device, dtype=torch.float32) for _ in range(2))
    grad_scale, grad_shift = _film_gradient_buffers(scale, shift, film, a_full)
    per_group = c // num_groups
    kernel(_backward_combine_kernel)[(b, num_groups)](
        a_part,
        b_part,
        weight,
        bias,
        scale,
        a_full,
        b_full,
        grad_scale,
        grad_shift,
        c1,
        c2,
        c,
        n,
        chunks,
        per_group,
        FILM=film,
        **_combine_options(chunks, per_group),
    )
    dx = torch.empty_like(x) if out is None else out
    d3 = dx.flatten(2)
    added = add.numel() > 0
    add_part = torch.empty_like(a_part) if added else a_part
    kernel(_backward_dx_kernel)[(b, chunks)](
        x3,
        g3,
        d3,
        mean,
        rstd,
        weight,
        bias,
        scale,
        shift,
        c1,
        c2,
        add_part,
        c,
        n,
        rows,
        chunks,
        *x3.stride(),
        *g3.stride(),
        *d3.stride(),
        FILM=film,
        ACT=act,
        ADD=added,
        **launch.kernel_options(),
    )
    return _parameter_gradients(
        dx,
        sums,
        grad_scale,
        grad_shift,
        add_part.sum(1) if added else None,
        weight,
        bias,
        add,
        film,
    )


def _backward_in_one_kernel(
    x,
    x3,
    g3,
    weight,
    bias,
    scale,
    shift,
    add,
    mean,
    rstd,
    num_groups,
    film,
    act,
    shape: OnePassShape,
    out=None,
    kernel: Callable = _direct,
):
    """`_backward` as one kernel, `shape` being `_one_pass_shape(x3, num_groups)`."""
    b, c, n = x3.shape
    sums = _per_sample_sums(x, b, c)
    a_full, b_full = sums
    grad_scale, grad_shift = _film_gradient_buffers(scale, shift, film, a_full)
    added = add.numel() > 0
    grad_add = torch.empty(b, c, device=x.device, dtype=add.dtype) if added else a_full
    dx = torch.empty_like(x) if out is None else out
    d3 = dx.flatten(2)
    kernel(_one_pass_backward_kernel)[(b, shape.slices)](
        x3,
        g3,
        d3,
        mean,
        rstd,
        weight,
        bias,
        scale,
        shift,
        a_full,
        b_full,
        grad_scale,
        grad_shift,
        grad_add,
        c,
        n,
        c // num_groups,
        shape.channels,
        *x3.stride(),
        *g3.stride(),
        *d3.stride(),
        FILM=film,
        ACT=act,
        ADD=added,
        **shape.kernel_options(),
    )
    return _parameter_gradients(
        dx,
        sums,
        grad_scale,
        grad_shift,
        grad_add if added else None,
        weight,
        bias,
        add,
        film,
    )


def _film_gradient_buffers(scale, shift, film, unused):
    """Contiguous (B, C) buffers for the kernels to write the FiLM gradients into, each in its
    operand's dtype; `unused` for both where there is no FiLM."""
    if not film:
        return unused, unused
    return tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (scale, shift))


def _per_sample_sums(x, b, c):
    """One float32 (2, B, C) buffer for the kernels' per-(batch, channel) Σ dz·x̂ and Σ dz
    (its two rows), so that one reduction sums both over the batch."""
    return torch.empty(2, b, c, device=x.device, dtype=torch.float32)


def _parameter_gradients(dx, sums, grad_scale, grad_shift, grad_add, weight, bias, add, film):
    """`_backward`'s result from the input gradient and the per-(batch, channel) `sums`: the
    affine parameters' gradients summed over the batch as one (2, C) tensor, weight's then
    bias', in their common dtype (the kernels store the FiLM gradients in their operands'
    dtypes already)."""
    grad_params = sums.sum(1).to(torch.promote_types(weight.dtype, bias.dtype))
    grad_add = None if grad_add is None else grad_add.to(add.dtype)
    if not film:
        return dx, grad_params, None, None, grad_add
    return dx, grad_params, grad_scale, grad_shift, grad_add


def _split_parameter_gradients(dparams, weight, bias):
    """(dweight, dbias) from `_parameter_gradients`' (2, C) tensor, each in its parameter's
    dtype: views of its rows where both share it."""
    return dparams[0].to(weight.dtype), dparams[1].to(bias.dtype)


def _group_norm_act_kernel(x, weight, bias, scale, shift, add, num_groups, eps, film, act):
    return _forward(x, weight, bias, scale, shift, add, num_groups, eps, film, act)


def _group_norm_act_fake(x, weight, bias, scale, shift, add, num_groups, eps, film, act):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


#: The fused kernels as an operator `torch.compile` calls as it is: (output, centre, rstd).
#: `scale` and `shift` are (B, C) when `film`, else empty; `add` is (B, C) or empty; centre
#: (the group mean minus `add`) and rstd are (B, C) float32.
group_norm_act_op = define_op(
    "group_norm_act",
    "(Tensor x, Tensor weight, Tensor bias, Tensor scale, Tensor shift, Tensor add, "
    "int num_groups, float eps, bool film, bool act) -> (Tensor, Tensor, Tensor)",
    _group_norm_act_kernel,
    _group_norm_act_fake,
)


def _group_norm_act_backward_kernel(
    grad, x, weight, bias, scale, shift, add, mean, rstd, num_groups, film, act, kernel=_direct
):
    dx, dparams, ds, dsh, dadd = _backward(
        grad, x, weight, bias, scale, shift, add, mean, rstd, num_groups, film, act, kernel=kernel
    )
    # An operator returns tensors, never None.
    ds, dsh, dadd = (
        t.new_empty(0) if g is None else g for t, g in ((scale, ds), (shift, dsh), (add, dadd))
    )
    return dx, dparams, ds, dsh, dadd


def _group_norm_act_backward_fake(
    grad, x, weight, bias, scale, shift, add, mean, rstd, num_groups, film, act
):
    dparams = weight.new_empty(
        (2, *weight.shape), dtype=torch.promote_types(weight.dtype, bias.dtype)
    )
    return (torch.empty_like(x), dparams, *(torch.empty_like(t) for t in (scale, shift, add)))


#: Gradients of `group_norm_act_op` for x, (weight, bias) as one (2, C) tensor, scale, shift
#: and add (each of the last three empty where it is).
group_norm_act_backward_op = define_op(
    "group_norm_act_backward",
    "(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor scale, Tensor shift, "
    "Tensor add, Tensor mean, Tensor rstd, int num_groups, bool film, bool act) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _group_norm_act_backward_kernel,
    _group_norm_act_backward_fake,
)


def _group_norm_act_inline(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    add: torch.Tensor,
    num_groups: int,
    eps: float,
    film: bool,
    act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(
        x, weight, bias, scale, shift, add, num_groups, eps, film, act, torch.library.wrap_triton
    )


def _group_norm_act_backward_inline(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    add: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    film: bool,
    act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _group_norm_act_backward_kernel(
        grad,
        x,
        weight,
        bias,
        scale,
        shift,
        add,
        mean,
        rstd,
        num_groups,
        film,
        act,
        kernel=torch.library.wrap_triton,
    )


#: `group_norm_act_op` and its backward as operators whose kernels Inductor launches itself
#: (`settings.COMPILED_INLINE_NORM_KERNELS`): tracing runs their launch shapes once and records
#: each Triton launch, instead of a call into Python on every step. Only where they can run (a
#: GPU, or Triton's interpreter): defining them imports Inductor, seconds of start-up.
group_norm_act_inline_op = group_norm_act_backward_inline_op = None
if triton is not None and (torch.cuda.is_available() or _interpreting()):
    group_norm_act_inline_op = define_triton_op("group_norm_act_inline", _group_norm_act_inline)
    group_norm_act_backward_inline_op = define_triton_op(
        "group_norm_act_backward_inline", _group_norm_act_backward_inline
    )


def _inline_wanted(x: torch.Tensor) -> bool:
    """Whether a graph being traced records the kernels' launches themselves: switched on for
    its grad mode (Dynamo guards the graph on it), on a GPU (Triton's interpreter runs no traced
    launches) and with static sizes (the launch shapes are computed from them)."""
    switched_on = (
        settings.COMPILED_INLINE_NORM_KERNELS
        if torch.is_grad_enabled()
        else settings.COMPILED_INLINE_NORM_KERNELS_INFERENCE
    )
    return (
        switched_on
        and group_norm_act_inline_op is not None
        and x.is_cuda
        and torch.compiler.is_dynamo_compiling()
        and all(isinstance(size, int) for size in x.shape)
    )


class _GroupNormAct(torch.autograd.Function):
    """`group_norm_act_op` and its derivative: eager, and traced by Dynamo into the graph
    (where `inline`, as the inline operators)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, add, num_groups, eps, film, act, inline):
        op = group_norm_act_inline_op if inline else group_norm_act_op
        y, mean, rstd = op(x, weight, bias, scale, shift, add, num_groups, eps, film, act)
        ctx.save_for_backward(x, weight, bias, scale, shift, add, mean, rstd)
        ctx.num_groups, ctx.film, ctx.act, ctx.inline = num_groups, film, act, inline
        # Read here, not in backward: a traced backward that asks a tensor for its strides gets
        # every incoming gradient copied to NCHW first (Dynamo), a full pass per call.
        ctx.memory_format = _memory_format(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scale, shift, add, mean, rstd = ctx.saved_tensors
        grad = pin_layout(grad, ctx.memory_format)
        op = group_norm_act_backward_inline_op if ctx.inline else group_norm_act_backward_op
        dx, dparams, ds, dsh, dadd = op(
            grad, x, weight, bias, scale, shift, add, mean, rstd, ctx.num_groups, ctx.film, ctx.act
        )
        dw, db = _split_parameter_gradients(dparams, weight, bias)
        if not ctx.film:
            ds = dsh = None
        if add.numel() == 0:
            dadd = None
        return dx, dw, db, ds, dsh, dadd, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
