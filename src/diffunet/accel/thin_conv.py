"""Triton kernels for the thin 3×3×3 convolutions at the two ends of a 3D U-Net.

A 3D U-Net's input convolution turns a few channels into many and its output convolution many
into one. Each moves one full-size activation and does little arithmetic, and cuDNN runs them
far below the memory bandwidth (docs/performance.md).

Every pass here is an implicit matrix product whose reduction axis is the 27 taps × the thin
side's channels: the thin tensor is gathered (a few channels at 27 shifts, cheap), the wide
one is read or written once. The stem's forward gathers its input; its weight gradient gathers
the input again against the streamed output gradient. The head's input gradient gathers its
one-channel output gradient (taps mirrored) into the wide input gradient, and its weight
gradient gathers that output gradient against the streamed input. The head's forward, a
reduction over the wide side, is two passes where its tap products are no wider than its input
(`settings.TAP_PRODUCT_FORWARD`): each position's products with the 27 × COUT tap weights (one
read of x), then each output the sum of its 27 neighbours' products (one read of those); other
heads take cuDNN's (their output padded to `settings.CHANNEL_MULTIPLE` channels). Running each
tap as its own product over the wide side instead would read the wide tensor 27 times.

`conv.convolve` calls them for plain 3×3×3 `nn.Conv3d` layers (stride 1, padding 1) on CUDA
whose narrower side has at most `settings.THIN_CHANNELS` channels, as the custom ops below in
eager and compiled code, while `settings.THIN_CONV` is on (`set_thin_conv_enabled`,
`DIFFUNET_THIN_CONV=0`). On a GPU older than compute capability 8.0 the ops compute with ATen.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.accel import settings
from diffunet.accel.layout import dense_memory_format, pin_layout
from diffunet.accel.library import define_op
from diffunet.accel.operands import autocast_dtype, autocast_operands, pad_output_channels
from diffunet.accel.settings import set_thin_conv_enabled  # noqa: F401  (importable from here too)
from diffunet.accel.triton_runtime import interpreting, sm_count, tl, triton

_TAPS = 27
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def takes(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv.convolve(conv, x)` runs these kernels: `settings.THIN_CONV` on, and
    `fits(conv, x)`."""
    return settings.THIN_CONV and fits(conv, x)


def fits(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernels can compute `conv(x)`: Triton on a GPU (or its interpreter on the
    CPU), a 3×3×3 `nn.Conv3d` with stride 1, padding 1 and zero padding mode, a thin side of at
    most `settings.THIN_CHANNELS` and a wide side of at most `settings.THIN_MAX_CHANNELS`
    channels, whose sample has fewer than 2³¹ elements (the kernels' offsets are 32-bit within a
    sample). (Whether the module is plain enough to bypass its own call, and not being
    exported, `conv.convolve` decides.)"""
    if not (triton is not None and (x.is_cuda or (x.device.type == "cpu" and interpreting()))):
        return False  # e.g. meta tensors: `F.conv3d` computes their shapes
    if type(conv) is not nn.Conv3d or x.ndim != 5 or x.shape[1] != conv.in_channels:
        return False  # a wrong channel count gets `F.conv3d`'s own error
    if autocast_dtype(x.device.type) is None and (
        x.dtype != conv.weight.dtype or x.dtype not in _DTYPES
    ):
        return False  # leave mismatches to `F.conv3d`'s own error
    channels = (conv.in_channels, conv.out_channels)
    return (
        conv.kernel_size == (3, 3, 3)
        and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(channels) <= settings.THIN_CHANNELS
        and max(channels) <= settings.THIN_MAX_CHANNELS
        and math.prod(x.shape[2:]) * max(channels) < 2**31
    )


def _blocks(thin: int, wide: int) -> tuple[int, int, int]:
    """(BLOCK_K, K padded to whole blocks, BLOCK_CW) for a thin side of `thin` channels, whose
    27 taps × channels are the reduction axis, and a wide side of `wide` channels. `tl.dot`
    needs 16 or more on every side."""
    k = _TAPS * thin
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    return block_k, triton.cdiv(k, block_k) * block_k, max(16, triton.next_power_of_2(wide))


def _gathers_input(in_channels: int, out_channels: int) -> bool:
    """Whether the input is the thin side (a stem); else the output is (a head)."""
    return in_channels <= out_channels


def _layout(*tensors: torch.Tensor) -> torch.memory_format:
    """Channels-last if any of `tensors` is (as cuDNN decides); a one-channel tensor is both."""
    layouts = [dense_memory_format(t) for t in tensors]
    return next((f for f in layouts if f != torch.contiguous_format), torch.contiguous_format)


def _output_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """`thin_conv3d`'s output layout: a stem's wide output channels-last if `x` or the weight
    is, a head's thin output in `x`'s layout."""
    if _gathers_input(weight.shape[1], weight.shape[0]):
        return _layout(x, weight)
    return dense_memory_format(x)


def _empty(like: torch.Tensor, channels: int, layout: torch.memory_format) -> torch.Tensor:
    shape = (like.shape[0], channels, *like.shape[2:])
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)


def _packed(weight: torch.Tensor, gathered_input: bool) -> torch.Tensor:
    """The weight as the (K, wide) matrix of the kernels, zero-padded to their blocks: row
    `tap * thin + c` holds thin channel c's weights at tap (kd, kh, kw) = (tap // 9, tap // 3 %
    3, tap % 3). The thin side is the input (a stem's forward) or the output (a head's input
    gradient)."""
    out_channels, in_channels = weight.shape[:2]
    taps = weight.reshape(out_channels, in_channels, _TAPS)
    taps = taps.permute(2, 1, 0) if gathered_input else taps.permute(2, 0, 1)  # (27, thin, wide)
    thin, wide = taps.shape[1:]
    _, k_padded, block_cw = _blocks(thin, wide)
    packed = weight.new_zeros(k_padded, block_cw)
    packed[: _TAPS * thin, :wide] = taps.reshape(_TAPS * thin, wide)
    return packed


if triton is not None:

    @triton.jit
    def _coordinates(ns, H, W):
        return ns // (W * H), ns // W % H, ns % W

    @triton.jit
    def _gathered_tile(
        t_ptr,
        ks,
        d_,
        h_,
        w_,
        inside_n,
        D,
        H,
        W,
        stc,
        std,
        sth,
        stw,
        CT: tl.constexpr,
        MIRRORED: tl.constexpr,
    ):
        """The (positions × ks) tile of one sample `t_ptr` of the thin tensor: element (n, k)
        is channel k % CT at position n shifted by tap k // CT (by the opposite shift when
        MIRRORED), zero outside the volume (the zero padding) and beyond the 27 × CT rows."""
        tap = ks // CT
        od = tap // 9 - 1
        oh = tap // 3 % 3 - 1
        ow = tap % 3 - 1
        if MIRRORED:
            od, oh, ow = -od, -oh, -ow
        sd = d_[:, None] + od[None, :]
        sh = h_[:, None] + oh[None, :]
        sw = w_[:, None] + ow[None, :]
        inside = (
            inside_n[:, None]
            & (ks < 27 * CT)[None, :]
            & (sd >= 0)
            & (sd < D)
            & (sh >= 0)
            & (sh < H)
            & (sw >= 0)
            & (sw < W)
        )
        offsets = (d_ * std + h_ * sth + w_ * stw)[:, None] + (
            od * std + oh * sth + ow * stw + ks % CT * stc
        )[None, :]
        return tl.load(t_ptr + offsets, mask=inside, other=0.0)

    @triton.jit
    def _gather_conv_kernel(
        t_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        D,
        H,
        W,
        stb,
        stc,
        std,
        sth,
        stw,
        syb,
        syc,
        syd,
        syh,
        syw,
        CT: tl.constexpr,
        CW: tl.constexpr,
        MIRRORED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_CW: tl.constexpr,
    ):
        b = tl.program_id(1).to(tl.int64)
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside_n = ns < D * H * W
        d_, h_, w_ = _coordinates(ns, H, W)
        cw = tl.arange(0, BLOCK_CW)
        acc = tl.zeros([BLOCK_N, BLOCK_CW], dtype=tl.float32)
        for k0 in tl.static_range(0, 27 * CT, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = _gathered_tile(
                t_ptr + b * stb, ks, d_, h_, w_, inside_n, D, H, W, stc, std, sth, stw, CT, MIRRORED
            )
            w = tl.load(w_ptr + ks[:, None] * BLOCK_CW + cw[None, :])
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cw, mask=cw < CW, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + b * syb + (d_ * syd + h_ * syh + w_ * syw)[:, None] + cw[None, :] * syc,
            acc.to(y_ptr.dtype.element_ty),
            mask=inside_n[:, None] & (cw < CW)[None, :],
        )

    @triton.jit
    def _gather_weight_grad_kernel(
        t_ptr,
        u_ptr,
        part_ptr,
        wide_sum_ptr,
        D,
        H,
        W,
        rows,
        chunks,
        stb,
        stc,
        std,
        sth,
        stw,
        sub,
        suc,
        sud,
        suh,
        suw,
        CT: tl.constexpr,
        CW: tl.constexpr,
        MIRRORED: tl.constexpr,
        SUM_WIDE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_CW: tl.constexpr,
    ):
        kc = tl.program_id(0)
        run = tl.program_id(1)
        b = (run // chunks).to(tl.int64)
        start = (run % chunks) * rows
        ks = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        cw = tl.arange(0, BLOCK_CW)
        acc = tl.zeros([BLOCK_K, BLOCK_CW], dtype=tl.float32)
        wide_sum = tl.zeros([BLOCK_CW], dtype=tl.float32)
        for offset in range(0, rows, BLOCK_N):
            ns = start + offset + tl.arange(0, BLOCK_N)
            inside_n = ns < D * H * W
            d_, h_, w_ = _coordinates(ns, H, W)
            a = _gathered_tile(
                t_ptr + b * stb, ks, d_, h_, w_, inside_n, D, H, W, stc, std, sth, stw, CT, MIRRORED
            )
            u = tl.load(
                u_ptr + b * sub + (d_ * sud + h_ * suh + w_ * suw)[:, None] + cw[None, :] * suc,
                mask=inside_n[:, None] & (cw < CW)[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(a), u, acc, input_precision=PRECISION)
            if SUM_WIDE:
                wide_sum += tl.sum(u.to(tl.float32), axis=0)
        k_padded = tl.num_programs(0) * BLOCK_K
        tl.store(part_ptr + run * k_padded * BLOCK_CW + ks[:, None] * BLOCK_CW + cw[None, :], acc)
        if SUM_WIDE:  # noqa: SIM102  (a compile-time branch around a run-time one)
            if kc == 0:
                tl.store(wide_sum_ptr + run * BLOCK_CW + cw, wide_sum)

    @triton.jit
    def _tap_products_kernel(
        x_ptr,
        w_ptr,
        z_ptr,
        D,
        H,
        W,
        first,
        sxb,
        sxc,
        sxd,
        sxh,
        sxw,
        CIN: tl.constexpr,
        K: tl.constexpr,
        K_PADDED: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_CI: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """z[s, n, k] = Σ_ci x[first + s, ci, n] · w[ci, k]: each position's products with the
        K = 27 × COUT tap weights (column tap * COUT + co), from one read of x."""
        s = tl.program_id(1).to(tl.int64)
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside_n = ns < D * H * W
        d_, h_, w_ = _coordinates(ns, H, W)
        ci = tl.arange(0, BLOCK_CI)
        x = tl.load(
            x_ptr
            + (first + s) * sxb
            + (d_ * sxd + h_ * sxh + w_ * sxw)[:, None]
            + ci[None, :] * sxc,
            mask=inside_n[:, None] & (ci < CIN)[None, :],
            other=0.0,
        )
        rows = (s * D * H * W + ns)[:, None] * K
        for k0 in tl.static_range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + ci[:, None] * K_PADDED + ks[None, :])
            z = tl.dot(x, w, input_precision=PRECISION)
            tl.store(
                z_ptr + rows + ks[None, :],
                z.to(z_ptr.dtype.element_ty),
                mask=inside_n[:, None] & (ks < K)[None, :],
            )

    @triton.jit
    def _tap_sum_kernel(
        z_ptr,
        b_ptr,
        y_ptr,
        D,
        H,
        W,
        first,
        syb,
        syc,
        syd,
        syh,
        syw,
        COUT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """y[first + s, co, n] = Σ_tap z[s, n + offset(tap), tap * COUT + co] (+ bias[co])."""
        s = tl.program_id(1).to(tl.int64)
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside_n = ns < D * H * W
        d_, h_, w_ = _coordinates(ns, H, W)
        tap = tl.arange(0, 32)
        sd = d_[:, None] + (tap // 9 - 1)[None, :]
        sh = h_[:, None] + (tap // 3 % 3 - 1)[None, :]
        sw = w_[:, None] + (tap % 3 - 1)[None, :]
        inside = (
            inside_n[:, None]
            & (tap < 27)[None, :]
            & (sd >= 0)
            & (sd < D)
            & (sh >= 0)
            & (sh < H)
            & (sw >= 0)
            & (sw < W)
        )
        rows = (s * D * H * W + (sd * H + sh) * W + sw) * (27 * COUT)
        out = y_ptr + (first + s) * syb + d_ * syd + h_ * syh + w_ * syw
        for co in tl.static_range(COUT):
            z = tl.load(z_ptr + rows + (tap * COUT + co)[None, :], mask=inside, other=0.0)
            y = tl.sum(z.to(tl.float32), axis=1)
            if HAS_BIAS:
                y += tl.load(b_ptr + co).to(tl.float32)
            tl.store(out + co * syc, y.to(y_ptr.dtype.element_ty), mask=inside_n)


def _runs_kernels(device: torch.device) -> bool:
    """Whether the kernels run on `device`: Triton's interpreter, or a GPU with bf16 tensor
    cores (compute capability 8.0 or later). Elsewhere the ops compute with ATen, so the
    graphs traced around them stay the same."""
    return _tensor_cores(device) if device.type == "cuda" else interpreting()


@functools.cache
def _tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _precision(x: torch.Tensor) -> str:
    """float32 products as cuDNN's convolutions compute them: TF32 where PyTorch lets cuDNN
    use it (its default), else exact. (Ignored for 16-bit inputs.)"""
    tf32 = x.is_cuda and torch.backends.cudnn.allow_tf32
    return "tf32" if x.dtype != torch.float32 or tf32 else "ieee"


def _gather_conv(
    thin: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    wide_channels: int,
    layout: torch.memory_format,
    mirrored: bool,
) -> torch.Tensor:
    """The 3×3×3 convolution of the thin tensor (B, CT, D, H, W) into `wide_channels`, with
    the `_packed` weight (taps mirrored for an input gradient), in `layout`."""
    batch, thin_channels, *spatial = thin.shape
    block_k, _, block_cw = _blocks(thin_channels, wide_channels)
    y = _empty(thin, wide_channels, layout)
    launch = settings.THIN_CONV_LAUNCH
    block_n = launch.gather_block_n if block_cw <= 64 else launch.gather_block_n // 2
    grid = (triton.cdiv(spatial[0] * spatial[1] * spatial[2], block_n), batch)
    _gather_conv_kernel[grid](
        thin,
        packed,
        packed if bias is None else bias,
        y,
        *spatial,
        *thin.stride(),
        *y.stride(),
        CT=thin_channels,
        CW=wide_channels,
        MIRRORED=mirrored,
        HAS_BIAS=bias is not None,
        PRECISION=_precision(thin),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_CW=block_cw,
        num_warps=launch.num_warps,
    )
    return y


def _gather_weight_grad(
    thin: torch.Tensor, wide: torch.Tensor, mirrored: bool, sum_wide: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over positions of the gathered thin tile times the wide tensor: the (27 × CT, CW)
    float32 matrix of `_packed`'s layout, and the wide tensor's per-channel sums if `sum_wide`."""
    batch, thin_channels, *spatial = thin.shape
    wide_channels = wide.shape[1]
    block_k, k_padded, block_cw = _blocks(thin_channels, wide_channels)
    launch = settings.THIN_CONV_LAUNCH
    block_n = launch.weight_grad_block_n
    positions = spatial[0] * spatial[1] * spatial[2]
    k_chunks = k_padded // block_k
    programs = launch.weight_grad_programs_per_sm * sm_count(thin.device)
    chunks = max(1, min(triton.cdiv(positions, block_n), triton.cdiv(programs, batch * k_chunks)))
    rows = triton.cdiv(triton.cdiv(positions, chunks), block_n) * block_n
    chunks = triton.cdiv(positions, rows)
    part = thin.new_empty(batch * chunks, k_padded, block_cw, dtype=torch.float32)
    wide_sum = thin.new_empty(batch * chunks, block_cw, dtype=torch.float32)
    _gather_weight_grad_kernel[(k_chunks, batch * chunks)](
        thin,
        wide,
        part,
        wide_sum,
        *spatial,
        rows,
        chunks,
        *thin.stride(),
        *wide.stride(),
        CT=thin_channels,
        CW=wide_channels,
        MIRRORED=mirrored,
        SUM_WIDE=sum_wide,
        PRECISION=_precision(thin),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_CW=block_cw,
        num_warps=launch.num_warps,
    )
    matrix = part.sum(0)[: _TAPS * thin_channels, :wide_channels]
    return matrix, wide_sum.sum(0)[:wide_channels] if sum_wide else None


def _tap_products_wanted(in_channels: int, out_channels: int) -> bool:
    """Whether a head of these channels computes its forward by tap products
    (`settings.TAP_PRODUCT_FORWARD`)."""
    if settings.TAP_PRODUCT_FORWARD == "auto":
        return _TAPS * out_channels <= in_channels
    return settings.TAP_PRODUCT_FORWARD == "always"


def _thin_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` for a thin output, in `x`'s layout: by tap
    products where `_tap_products_wanted`, else cuDNN with the output channels zero-padded to
    `settings.CHANNEL_MULTIPLE`, for which it picks a faster kernel (`conv.output_padding`)."""
    out_channels, in_channels = weight.shape[:2]
    if _tap_products_wanted(in_channels, out_channels):
        return _tap_product_forward(x, weight, bias)
    extra = -out_channels % settings.CHANNEL_MULTIPLE if x.is_cuda else 0
    if extra:
        weight, bias = pad_output_channels(weight, bias, extra)
        weight = weight.contiguous(memory_format=dense_memory_format(x))
    y = _empty(x, out_channels, dense_memory_format(x))
    return y.copy_(F.conv3d(x, weight, bias, padding=1)[:, :out_channels])


def _tap_product_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A head's forward: each position's products with the 27 × COUT tap weights (z, in `x`'s
    dtype), then each output the sum of its 27 neighbours' products, for a group of samples
    at a time. Two passes that read x once and z once, where the direct convolution reads
    every x tile 27 times."""
    batch, in_channels, *spatial = x.shape
    out_channels = weight.shape[0]
    y = _empty(x, out_channels, dense_memory_format(x))
    block_k, k_padded, block_ci = _blocks(out_channels, in_channels)
    taps = _packed(weight, gathered_input=False).t().contiguous()  # (ci, tap * COUT + co)
    positions, k = spatial[0] * spatial[1] * spatial[2], _TAPS * out_channels
    launch = settings.THIN_CONV_LAUNCH
    budget = settings.TAP_PRODUCTS_BYTES
    group = max(1, min(batch, budget // (positions * k * x.element_size())))
    z = x.new_empty(group, positions, k)
    for first in range(0, batch, group):
        samples = min(group, batch - first)
        _tap_products_kernel[(triton.cdiv(positions, launch.tap_products_block_n), samples)](
            x,
            taps,
            z,
            *spatial,
            first,
            *x.stride(),
            CIN=in_channels,
            K=k,
            K_PADDED=k_padded,
            PRECISION=_precision(x),
            BLOCK_N=launch.tap_products_block_n,
            BLOCK_CI=block_ci,
            BLOCK_K=block_k,
            num_warps=launch.num_warps,
        )
        _tap_sum_kernel[(triton.cdiv(positions, launch.tap_sum_block_n), samples)](
            z,
            taps if bias is None else bias,
            y,
            *spatial,
            first,
            *y.stride(),
            COUT=out_channels,
            HAS_BIAS=bias is not None,
            BLOCK_N=launch.tap_sum_block_n,
            num_warps=launch.num_warps,
        )
    return y


def _thin_conv3d_kernel(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` for a 3×3×3 weight with a thin side: a thin input
    by the gather kernel, into channels-last if `x` or the weight is; a thin output by cuDNN
    or the tap-product kernels (`settings.TAP_PRODUCT_FORWARD`), in `x`'s layout. All three
    share one dtype."""
    out_channels, in_channels = weight.shape[:2]
    if not _runs_kernels(x.device):
        return _empty(x, out_channels, _output_layout(x, weight)).copy_(
            F.conv3d(x, weight, bias, padding=1)
        )
    if not _gathers_input(in_channels, out_channels):
        return _thin_output(x, weight, bias)
    return _gather_conv(
        x,
        _packed(weight, gathered_input=True),
        bias,
        out_channels,
        _output_layout(x, weight),
        mirrored=False,
    )


def _thin_conv3d_fake(x, weight, bias):
    return _empty(x, weight.shape[0], _output_layout(x, weight))


#: `_thin_conv3d_kernel` as an operator (`thin_conv3d` is the differentiable call).
thin_conv3d_op = define_op(
    "thin_conv3d",
    "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    _thin_conv3d_kernel,
    _thin_conv3d_fake,
)


def _weight_from(matrix: torch.Tensor, weight: torch.Tensor, gathered_input: bool) -> torch.Tensor:
    """The (out, in, 3, 3, 3) weight gradient from the kernels' (27 × thin, wide) matrix."""
    out_channels, in_channels = weight.shape[:2]
    if gathered_input:
        taps = matrix.view(_TAPS, in_channels, out_channels).permute(2, 1, 0)
    else:
        taps = matrix.view(_TAPS, out_channels, in_channels).permute(1, 2, 0)
    return taps.reshape(weight.shape).to(weight.dtype).contiguous()


def _thin_conv3d_backward_kernel(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `thin_conv3d_op` for x (if `input_grad`), the weight, and the bias (if
    `bias_grad`); empty tensors stand for those not asked for. The thin side is gathered and
    the wide one read once: a stem's weight gradient reads the output gradient, a head's reads
    x, and a head's input gradient is the gather kernel over its thin output gradient. (A stem's
    input gradient, which a U-Net never needs, is ATen's.)"""
    out_channels, in_channels = weight.shape[:2]
    gathered_input = _gathers_input(in_channels, out_channels)
    if not _runs_kernels(x.device):
        return _aten_backward(grad, x, weight, input_grad, True, bias_grad)
    grad_x = x.new_empty(0)
    if gathered_input:
        matrix, grad_bias = _gather_weight_grad(x, grad, mirrored=False, sum_wide=bias_grad)
        if input_grad:
            grad_x = _aten_backward(grad, x, weight, True, False, False)[0]
    else:
        matrix, _ = _gather_weight_grad(grad, x, mirrored=True, sum_wide=False)
        grad_bias = grad.sum((0, 2, 3, 4), dtype=torch.float32) if bias_grad else None
        if input_grad:
            grad_x = _gather_conv(
                grad,
                _packed(weight, gathered_input=False),
                None,
                in_channels,
                dense_memory_format(x),
                mirrored=True,
            )
    return (
        grad_x,
        _weight_from(matrix, weight, gathered_input),
        grad_bias.to(weight.dtype) if bias_grad else weight.new_empty(0),
    )


def _aten_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's gradients (empty where not asked for), laid out as `thin_conv3d_backward_op`
    says."""
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        [weight.shape[0]],
        [1] * 3,
        [1] * 3,
        [1] * 3,
        False,
        [0] * 3,
        1,
        [input_grad, weight_grad, bias_grad],
    )
    return (
        _empty(x, x.shape[1], dense_memory_format(x)).copy_(grad_x)
        if input_grad
        else x.new_empty(0),
        grad_weight.contiguous() if weight_grad else weight.new_empty(0),
        grad_bias if bias_grad else weight.new_empty(0),
    )


def _thin_conv3d_backward_fake(grad, x, weight, input_grad, bias_grad):
    grad_x = _empty(x, x.shape[1], dense_memory_format(x)) if input_grad else x.new_empty(0)
    grad_weight = weight.new_empty(weight.shape)  # contiguous, as `_weight_from` makes it
    return grad_x, grad_weight, weight.new_empty(weight.shape[0] if bias_grad else 0)


thin_conv3d_backward_op = define_op(
    "thin_conv3d_backward",
    "(Tensor grad, Tensor x, Tensor weight, bool input_grad, bool bias_grad) "
    "-> (Tensor, Tensor, Tensor)",
    _thin_conv3d_backward_kernel,
    _thin_conv3d_backward_fake,
)


class _ThinConv3d(torch.autograd.Function):
    """`thin_conv3d_op` and its derivative (eager, and traced into compiled graphs)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out = thin_conv3d_op(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.layout = dense_memory_format(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        want_x, want_weight, want_bias = ctx.needs_input_grad
        want_bias = want_bias and ctx.has_bias
        grad = pin_layout(grad, ctx.layout)
        grad_x, grad_weight, grad_bias = thin_conv3d_backward_op(grad, x, weight, want_x, want_bias)
        return (
            grad_x if want_x else None,
            grad_weight if want_weight else None,
            grad_bias if want_bias else None,
        )


def thin_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` by the kernels (see `_thin_conv3d_kernel`),
    differentiable."""
    return _ThinConv3d.apply(x, weight, bias)


def convolve(conv: nn.Conv3d, x: torch.Tensor, *, with_bias: bool) -> torch.Tensor:
    """`conv(x)` (without its bias unless `with_bias`) by the kernels, in autocast's dtype when
    autocast is on, else in the one dtype `fits` requires; `takes(conv, x)` must hold."""
    x, weight, bias = autocast_operands(x, conv.weight, conv.bias if with_bias else None)
    with torch.autocast(x.device.type, enabled=False):
        return thin_conv3d(x, weight, bias)
