"""Triton kernels for the thin 3×3×3 convolutions at the two ends of a 3D U-Net.

A 3D U-Net's input convolution turns a few channels into many (the 3D benchmark: 2 → 64 at
4×64³) and its output convolution many into one. Each moves one full-size activation (134 MB
there) and does little arithmetic, yet cuDNN runs them at about 0.3 TB/s: 0.52 ms for the
stem's forward and 0.90 ms with its weight gradient, 0.43 and 1.58 ms for the (padded) head,
about 2.5 ms of a 54.7 ms training step on an H200 (docs/performance.md, session 12).

Here each is a stencil: a program computes `BLOCK_N` output positions from the 27 shifted
input tiles, one small matrix product per tap (`tl.dot`, float32 accumulation). The input
gradient is the same stencil over the output gradient with the taps mirrored and the weight
transposed; the weight gradient sums, per tap, the product of the output gradient and the
shifted input, one program per (tap, run of positions), the 27 taps of a run launched side
by side so that they share its tiles in L2.

The kernels are **off by default** (`set_thin_conv_enabled`) until `benchmarks/conv_channels.py`
has measured them against cuDNN on a GPU: they were written in a session without device time
and are checked for exactness under Triton's CPU interpreter only. When on, `conv.convolve`
calls them for plain 3×3×3 `nn.Conv3d` layers (stride 1, padding 1) on CUDA whose narrower
side has at most `THIN_CHANNELS` channels, as the custom ops below in eager and compiled code.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .fused import _FIXED_STRIDES, _interpreting, _memory_format, _sm_count

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs never call the kernels.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

#: A convolution is thin when its narrower side has at most this many channels.
THIN_CHANNELS = 8
#: The wider side's limit: one program holds a (positions × channels) float32 accumulator.
MAX_CHANNELS = 128
_TAPS = 27
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ENABLED = os.environ.get("DIFFUNET_THIN_CONV", "0") == "1"


def set_thin_conv_enabled(enabled: bool) -> None:
    """Turn the thin-convolution kernels on or off (off by default; see the module docstring)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def takes(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv.convolve(conv, x)` runs these kernels: switched on, and `fits(conv, x)`."""
    return _ENABLED and fits(conv, x)


def fits(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernels can compute `conv(x)`: Triton on a GPU (or its interpreter), a
    3×3×3 `nn.Conv3d` with stride 1, padding 1 and zero padding mode, a thin side of at most
    `THIN_CHANNELS` and a wide side of at most `MAX_CHANNELS` channels. (Whether the module is
    plain enough to bypass its own call, and not being exported, `conv.convolve` decides.)"""
    if not (triton is not None and (x.is_cuda or _interpreting())):
        return False
    if type(conv) is not nn.Conv3d or x.ndim != 5:
        return False
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and (x.dtype != conv.weight.dtype or x.dtype not in _DTYPES):
        return False  # leave mismatches to `F.conv3d`'s own error
    channels = (conv.in_channels, conv.out_channels)
    return (conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
            and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(channels) <= THIN_CHANNELS and max(channels) <= MAX_CHANNELS)


def _block(channels: int) -> int:
    return max(16, triton.next_power_of_2(channels))  # tl.dot needs 16 or more on every side


def _output_like(x: torch.Tensor, channels: int, layout_of: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """An uninitialized (B, channels, D, H, W) tensor in the layout of `layout_of` (default `x`):
    channels-last where that is, which a one-channel tensor always is, so that the wide output
    of a one-channel stem is channels-last, as the next layers want it."""
    shape = (x.shape[0], channels, *x.shape[2:])
    layout = _memory_format(x if layout_of is None else layout_of)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)


def _taps(weight: torch.Tensor, mirrored: bool) -> torch.Tensor:
    """The weight as (27, in, out) blocks padded to the kernels' channel blocks: tap t is
    (kd, kh, kw) = (t // 9, t // 3 % 3, t % 3). Mirrored and transposed for the input gradient,
    whose stencil runs over the output gradient."""
    out_channels, in_channels = weight.shape[:2]
    taps = weight.reshape(out_channels, in_channels, _TAPS).permute(2, 1, 0)  # (27, in, out)
    if mirrored:
        taps = taps.flip(0).transpose(1, 2)
        in_channels, out_channels = out_channels, in_channels
    packed = weight.new_zeros(_TAPS, _block(in_channels), _block(out_channels))
    packed[:, :in_channels, :out_channels] = taps
    return packed


if triton is not None:

    @triton.jit
    def _load_tap(x_ptr, tap, d_, h_, w_, inside_n, D, H, W, ci, CIN, sxc, sxd, sxh, sxw):
        """The (positions × channels) tile of one sample `x_ptr` shifted by tap `tap`, zero
        outside the volume (the convolution's zero padding) and beyond `CIN` channels."""
        sd = d_ + (tap // 9 - 1)
        sh = h_ + (tap // 3 % 3 - 1)
        sw = w_ + (tap % 3 - 1)
        inside = inside_n & (sd >= 0) & (sd < D) & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
        return tl.load(x_ptr + (sd * sxd + sh * sxh + sw * sxw)[:, None] + ci[None, :] * sxc,
                       mask=inside[:, None] & (ci < CIN)[None, :], other=0.0)

    @triton.jit
    def _stencil_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, H, W, CIN, COUT,
                        sxb, sxc, sxd, sxh, sxw, syb, syc, syd, syh, syw,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside_n = ns < D * H * W
        w_ = ns % W
        h_ = (ns // W) % H
        d_ = ns // (W * H)
        ci = tl.arange(0, BLOCK_CI)
        co = tl.arange(0, BLOCK_CO)
        acc = tl.zeros([BLOCK_N, BLOCK_CO], dtype=tl.float32)
        for tap in tl.static_range(27):
            x = _load_tap(x_ptr + b * sxb, tap, d_, h_, w_, inside_n, D, H, W, ci, CIN,
                          sxc, sxd, sxh, sxw)
            w = tl.load(w_ptr + tap * BLOCK_CI * BLOCK_CO + ci[:, None] * BLOCK_CO + co[None, :])
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + co, mask=co < COUT, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + b * syb + (d_ * syd + h_ * syh + w_ * syw)[:, None] + co[None, :] * syc,
                 acc.to(y_ptr.dtype.element_ty), mask=inside_n[:, None] & (co < COUT)[None, :])

    @triton.jit
    def _weight_grad_kernel(x_ptr, g_ptr, part_ptr, bias_part_ptr, D, H, W, CIN, COUT, rows,
                            chunks, sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgd, sgh, sgw,
                            PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
        tap = tl.program_id(0)  # fastest: the 27 taps of a run share its tiles in L2
        run = tl.program_id(1)
        b = (run // chunks).to(tl.int64)
        start = (run % chunks) * rows
        ci = tl.arange(0, BLOCK_CI)
        co = tl.arange(0, BLOCK_CO)
        acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
        bias_acc = tl.zeros([BLOCK_CO], dtype=tl.float32)
        for offset in range(0, rows, BLOCK_N):
            ns = start + offset + tl.arange(0, BLOCK_N)
            inside_n = ns < D * H * W
            w_ = ns % W
            h_ = (ns // W) % H
            d_ = ns // (W * H)
            g = tl.load(g_ptr + b * sgb + (d_ * sgd + h_ * sgh + w_ * sgw)[:, None]
                        + co[None, :] * sgc, mask=inside_n[:, None] & (co < COUT)[None, :],
                        other=0.0)
            x = _load_tap(x_ptr + b * sxb, tap, d_, h_, w_, inside_n, D, H, W, ci, CIN,
                          sxc, sxd, sxh, sxw)
            acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
        part = (run * 27 + tap) * BLOCK_CO * BLOCK_CI
        tl.store(part_ptr + part + co[:, None] * BLOCK_CI + ci[None, :], acc)
        if tap == 0:
            tl.store(bias_part_ptr + run * BLOCK_CO + co, bias_acc)


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _stencil(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None,
             out_channels: int, layout_of: torch.Tensor | None = None) -> torch.Tensor:
    """The 3×3×3 stencil of `x` (B, C, D, H, W) with packed `taps` (see `_taps`), laid out like
    `layout_of` (default `x`)."""
    batch, in_channels, *spatial = x.shape
    y = _output_like(x, out_channels, layout_of)
    block_ci, block_co = taps.shape[1:]
    block_n = 64 if block_co > 64 or block_ci > 64 else 128
    positions = spatial[0] * spatial[1] * spatial[2]
    grid = (triton.cdiv(positions, block_n), batch)
    _stencil_kernel[grid](x, taps, bias if bias is not None else taps, y, *spatial, in_channels,
                          out_channels, *x.stride(), *y.stride(), HAS_BIAS=bias is not None,
                          PRECISION=_precision(x), BLOCK_N=block_n, BLOCK_CI=block_ci,
                          BLOCK_CO=block_co, num_warps=4)
    return y


def _weight_grad(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight (out, in, 3, 3, 3) and bias (out,) gradients of the stencil, in float32."""
    batch, in_channels, *spatial = x.shape
    out_channels = grad.shape[1]
    block_ci, block_co, block_n = _block(in_channels), _block(out_channels), 64
    positions = spatial[0] * spatial[1] * spatial[2]
    programs = 2 * _sm_count(x.device)
    chunks = max(1, min(triton.cdiv(positions, block_n), triton.cdiv(programs, batch)))
    rows = triton.cdiv(triton.cdiv(positions, chunks), block_n) * block_n
    chunks = triton.cdiv(positions, rows)
    part = x.new_empty(batch * chunks, _TAPS, block_co, block_ci, dtype=torch.float32)
    bias_part = x.new_empty(batch * chunks, block_co, dtype=torch.float32)
    _weight_grad_kernel[(_TAPS, batch * chunks)](
        x, grad, part, bias_part, *spatial, in_channels, out_channels, rows, chunks,
        *x.stride(), *grad.stride(), PRECISION=_precision(x), BLOCK_N=block_n,
        BLOCK_CI=block_ci, BLOCK_CO=block_co, num_warps=4)
    weight_grad = part.sum(0)[:, :out_channels, :in_channels]  # (27, out, in)
    weight_grad = weight_grad.permute(1, 2, 0).reshape(out_channels, in_channels, 3, 3, 3)
    return weight_grad.contiguous(), bias_part.sum(0)[:out_channels]


@torch.library.custom_op("diffunet::thin_conv3d", mutates_args=(), tags=_FIXED_STRIDES)
def thin_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` for a 3×3×3 weight, by the stencil kernel; the
    output has `x`'s layout (channels-last or contiguous). All three share one dtype."""
    return _stencil(x, _taps(weight, mirrored=False), bias, weight.shape[0])


@thin_conv3d.register_fake
def _thin_conv3d_fake(x, weight, bias):
    return _output_like(x, weight.shape[0])


@torch.library.custom_op("diffunet::thin_conv3d_backward", mutates_args=(), tags=_FIXED_STRIDES)
def thin_conv3d_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         input_grad: bool, bias_grad: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `thin_conv3d` for x (if `input_grad`), the weight, and the bias (if
    `bias_grad`); empty tensors stand for those not asked for."""
    grad_x = (_stencil(grad, _taps(weight, mirrored=True), None, x.shape[1], layout_of=x)
              if input_grad else x.new_empty(0))
    grad_weight, grad_bias = _weight_grad(x, grad)
    return (grad_x, grad_weight.to(weight.dtype),
            grad_bias.to(weight.dtype) if bias_grad else weight.new_empty(0))


@thin_conv3d_backward.register_fake
def _thin_conv3d_backward_fake(grad, x, weight, input_grad, bias_grad):
    grad_x = _output_like(grad, x.shape[1], layout_of=x) if input_grad else x.new_empty(0)
    grad_weight = weight.new_empty(weight.shape)  # contiguous, as `_weight_grad` makes it
    return grad_x, grad_weight, weight.new_empty(weight.shape[0] if bias_grad else 0)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    want_x, want_weight, want_bias = ctx.needs_input_grad
    want_bias = want_bias and ctx.has_bias
    grad = grad.contiguous(memory_format=_memory_format(x))
    grad_x, grad_weight, grad_bias = thin_conv3d_backward(grad, x, weight, want_x, want_bias)
    return (grad_x if want_x else None, grad_weight if want_weight else None,
            grad_bias if want_bias else None)


thin_conv3d.register_autograd(_backward, setup_context=_setup_context)


def convolve(conv: nn.Conv3d, x: torch.Tensor, *, with_bias: bool) -> torch.Tensor:
    """`conv(x)` (without its bias unless `with_bias`) by the kernels, in autocast's dtype when
    autocast is on, else in `x`'s; `takes(conv, x)` must hold."""
    weight, bias = conv.weight, conv.bias if with_bias else None
    dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
             else x.dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return thin_conv3d(x, weight, bias)
