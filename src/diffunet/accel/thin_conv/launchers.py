"""The thin convolutions' host side: the packed weight, output layouts and the launches of a
gather convolution, a weight gradient and a head's tap-product forward."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from diffunet.accel import settings
from diffunet.accel.layout import dense_memory_format
from diffunet.accel.operands import pad_output_channels
from diffunet.accel.thin_conv import kernels
from diffunet.accel.triton_runtime import interpreting, sm_count, triton

TAPS = 27


def _blocks(thin: int, wide: int) -> tuple[int, int, int]:
    """(BLOCK_K, K padded to whole blocks, BLOCK_CW) for a thin side of `thin` channels, whose
    27 taps × channels are the reduction axis, and a wide side of `wide` channels. `tl.dot`
    needs 16 or more on every side."""
    k = TAPS * thin
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    return block_k, triton.cdiv(k, block_k) * block_k, max(16, triton.next_power_of_2(wide))


def gathers_input(in_channels: int, out_channels: int) -> bool:
    """Whether the input is the thin side (a stem); else the output is (a head)."""
    return in_channels <= out_channels


def _layout(*tensors: torch.Tensor) -> torch.memory_format:
    """Channels-last if any of `tensors` is (as cuDNN decides); a one-channel tensor is both."""
    layouts = [dense_memory_format(t) for t in tensors]
    return next((f for f in layouts if f != torch.contiguous_format), torch.contiguous_format)


def output_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """`thin_conv3d`'s output layout: a stem's wide output channels-last if `x` or the weight
    is, a head's thin output in `x`'s layout."""
    if gathers_input(weight.shape[1], weight.shape[0]):
        return _layout(x, weight)
    return dense_memory_format(x)


def empty_activation(
    like: torch.Tensor, channels: int, layout: torch.memory_format
) -> torch.Tensor:
    """An uninitialized tensor of `like`'s batch, spatial size, dtype and device, with
    `channels` channels, in `layout`."""
    shape = (like.shape[0], channels, *like.shape[2:])
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)


def packed_weight(weight: torch.Tensor, gathered_input: bool) -> torch.Tensor:
    """The weight as the (K, wide) matrix of the kernels, zero-padded to their blocks: row
    `tap * thin + c` holds thin channel c's weights at tap (kd, kh, kw) = (tap // 9, tap // 3 %
    3, tap % 3). The thin side is the input (a stem's forward) or the output (a head's input
    gradient)."""
    out_channels, in_channels = weight.shape[:2]
    taps = weight.reshape(out_channels, in_channels, TAPS)
    taps = taps.permute(2, 1, 0) if gathered_input else taps.permute(2, 0, 1)  # (27, thin, wide)
    thin, wide = taps.shape[1:]
    _, k_padded, block_cw = _blocks(thin, wide)
    packed = weight.new_zeros(k_padded, block_cw)
    packed[: TAPS * thin, :wide] = taps.reshape(TAPS * thin, wide)
    return packed


def runs_kernels(device: torch.device) -> bool:
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


def gather_conv(
    thin: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    wide_channels: int,
    layout: torch.memory_format,
    mirrored: bool,
) -> torch.Tensor:
    """The 3×3×3 convolution of the thin tensor (B, CT, D, H, W) into `wide_channels`, with
    the `packed_weight` weight (taps mirrored for an input gradient), in `layout`."""
    batch, thin_channels, *spatial = thin.shape
    block_k, _, block_cw = _blocks(thin_channels, wide_channels)
    y = empty_activation(thin, wide_channels, layout)
    launch = settings.THIN_CONV_LAUNCH
    block_n = launch.gather_block_n if block_cw <= 64 else launch.gather_block_n // 2
    grid = (triton.cdiv(spatial[0] * spatial[1] * spatial[2], block_n), batch)
    kernels._gather_conv_kernel[grid](
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


def gather_weight_grad(
    thin: torch.Tensor, wide: torch.Tensor, mirrored: bool, sum_wide: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over positions of the gathered thin tile times the wide tensor: the (27 × CT, CW)
    float32 matrix of `packed_weight`'s layout, and the wide tensor's per-channel sums if `sum_wide`."""
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
    kernels._gather_weight_grad_kernel[(k_chunks, batch * chunks)](
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
    matrix = part.sum(0)[: TAPS * thin_channels, :wide_channels]
    return matrix, wide_sum.sum(0)[:wide_channels] if sum_wide else None


def _tap_products_wanted(in_channels: int, out_channels: int) -> bool:
    """Whether a head of these channels computes its forward by tap products
    (`settings.TAP_PRODUCT_FORWARD`)."""
    if settings.TAP_PRODUCT_FORWARD == "auto":
        return TAPS * out_channels <= in_channels
    return settings.TAP_PRODUCT_FORWARD == "always"


def thin_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` for a thin output, in `x`'s layout: by tap
    products where `_tap_products_wanted`, else cuDNN with the output channels zero-padded to
    `settings.CHANNEL_MULTIPLE`, for which it picks a faster kernel (`conv.output_padding`)."""
    out_channels, in_channels = weight.shape[:2]
    if _tap_products_wanted(in_channels, out_channels):
        return tap_product_forward(x, weight, bias)
    extra = -out_channels % settings.CHANNEL_MULTIPLE if x.is_cuda else 0
    if extra:
        weight, bias = pad_output_channels(weight, bias, extra)
        weight = weight.contiguous(memory_format=dense_memory_format(x))
    y = empty_activation(x, out_channels, dense_memory_format(x))
    return y.copy_(F.conv3d(x, weight, bias, padding=1)[:, :out_channels])


def tap_product_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A head's forward: each position's products with the 27 × COUT tap weights (z, in `x`'s
    dtype), then each output the sum of its 27 neighbours' products, for a group of samples
    at a time. Two passes that read x once and z once, where the direct convolution reads
    every x tile 27 times."""
    batch, in_channels, *spatial = x.shape
    out_channels = weight.shape[0]
    y = empty_activation(x, out_channels, dense_memory_format(x))
    block_k, k_padded, block_ci = _blocks(out_channels, in_channels)
    taps = packed_weight(weight, gathered_input=False).t().contiguous()  # (ci, tap * COUT + co)
    positions, k = spatial[0] * spatial[1] * spatial[2], TAPS * out_channels
    launch = settings.THIN_CONV_LAUNCH
    budget = settings.TAP_PRODUCTS_BYTES
    group = max(1, min(batch, budget // (positions * k * x.element_size())))
    z = x.new_empty(group, positions, k)
    for first in range(0, batch, group):
        samples = min(group, batch - first)
        kernels._tap_products_kernel[
            (triton.cdiv(positions, launch.tap_products_block_n), samples)
        ](
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
        kernels._tap_sum_kernel[(triton.cdiv(positions, launch.tap_sum_block_n), samples)](
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
