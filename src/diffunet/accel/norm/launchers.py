"""The norm kernels' host side: buffers, launch shapes and launches for the forward
(`forward`) and the backward (`backward`) of one call, eager or recorded by a trace."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffunet.accel.norm import kernels
from diffunet.accel.norm.launch import (
    LaunchShape,
    OnePassShape,
    combine_options,
    launch_shape,
    one_pass_shape,
)


def direct(kernel: Callable) -> Callable:
    """A Triton kernel launched as it is: eager calls and the opaque operators. The inline
    operators pass `torch.library.wrap_triton` instead, so tracing records the launches."""
    return kernel


def group_stats(
    x3: torch.Tensor,
    add: torch.Tensor,
    num_groups: int,
    eps: float,
    launch: LaunchShape,
    kernel: Callable = direct,
):
    """Per-(batch, channel) centre and rstd of each channel's group of `x3 + add` (`add` (B, C),
    or empty for none), in float32; the centre is the group's mean minus `add`. `launch` is
    `launch_shape(x3)`; `kernel` wraps each Triton kernel before its launch (`direct`)."""
    b, c, n = x3.shape
    chunks = launch.chunks
    s1 = torch.empty(b, chunks, c, device=x3.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    k = torch.empty(b, c, device=x3.device, dtype=torch.float32)
    kernel(kernels._stats_kernel)[(b, chunks)](
        x3, s1, s2, k, c, n, launch.rows, *x3.stride(), chunks, **launch.kernel_options()
    )
    mean, rstd = torch.empty_like(k), torch.empty_like(k)
    per_group = c // num_groups
    kernel(kernels._stats_combine_kernel)[(b, num_groups)](
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
        **combine_options(chunks, per_group),
    )
    return mean, rstd


def forward(x, weight, bias, scale, shift, add, num_groups, eps, film, act, kernel=direct):
    """(y, centre, rstd) of one `group_norm_act` call: in one kernel where `one_pass_shape`
    allows, else statistics, their combination and the normalization (`group_stats`)."""
    x3 = x.flatten(2)
    one_pass = one_pass_shape(x3, num_groups)
    if one_pass is not None:
        return _forward_in_one_kernel(
            x, x3, weight, bias, scale, shift, add, num_groups, eps, film, act, one_pass, kernel
        )
    launch = launch_shape(x3)
    mean, rstd = group_stats(x3, add, num_groups, eps, launch, kernel)
    y = torch.empty_like(x)
    y3 = y.flatten(2)
    b, c, n = x3.shape
    kernel(kernels._normalize_kernel)[(b, launch.chunks)](
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
    kernel: Callable = direct,
):
    """`forward` as one kernel, `shape` being `one_pass_shape(x3, num_groups)`."""
    b, c, n = x3.shape
    mean = torch.empty(b, c, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    y3 = y.flatten(2)
    kernel(kernels._one_pass_kernel)[(b, shape.slices)](
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


def backward(
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
    kernel: Callable = direct,
):
    """(dx, dparams, dscale, dshift, dadd), dparams being the (2, C) gradients of weight and
    bias (`_parameter_gradients`); the last three None where not used.

    dx is written to `out` where given, which may be `x` itself: every program reads each
    element of x it owns before it writes that element's gradient, and no other program
    reads it.
    """
    x3, g3 = x.flatten(2), grad.flatten(2)
    one_pass = one_pass_shape(x3, num_groups)
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
    launch = launch_shape(x3)
    rows, chunks = launch.rows, launch.chunks
    a_part = torch.empty(b, chunks, c, device=x.device, dtype=torch.float32)
    b_part = torch.empty_like(a_part)
    kernel(kernels._backward_reduce_kernel)[(b, chunks)](
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
    kernel(kernels._backward_combine_kernel)[(b, num_groups)](
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
        **combine_options(chunks, per_group),
    )
    dx = torch.empty_like(x) if out is None else out
    d3 = dx.flatten(2)
    added = add.numel() > 0
    add_part = torch.empty_like(a_part) if added else a_part
    kernel(kernels._backward_dx_kernel)[(b, chunks)](
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
    kernel: Callable = direct,
):
    """`backward` as one kernel, `shape` being `one_pass_shape(x3, num_groups)`."""
    b, c, n = x3.shape
    sums = _per_sample_sums(x, b, c)
    a_full, b_full = sums
    grad_scale, grad_shift = _film_gradient_buffers(scale, shift, film, a_full)
    added = add.numel() > 0
    grad_add = torch.empty(b, c, device=x.device, dtype=add.dtype) if added else a_full
    dx = torch.empty_like(x) if out is None else out
    d3 = dx.flatten(2)
    kernel(kernels._one_pass_backward_kernel)[(b, shape.slices)](
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
    """`backward`'s result from the input gradient and the per-(batch, channel) `sums`: the
    affine parameters' gradients summed over the batch as one (2, C) tensor, weight's then
    bias', in their common dtype (the kernels store the FiLM gradients in their operands'
    dtypes already)."""
    grad_params = sums.sum(1).to(torch.promote_types(weight.dtype, bias.dtype))
    grad_add = None if grad_add is None else grad_add.to(add.dtype)
    if not film:
        return dx, grad_params, None, None, grad_add
    return dx, grad_params, grad_scale, grad_shift, grad_add


def split_parameter_gradients(dparams, weight, bias):
    """(dweight, dbias) from `_parameter_gradients`' (2, C) tensor, each in its parameter's
    dtype: views of its rows where both share it."""
    return dparams[0].to(weight.dtype), dparams[1].to(bias.dtype)
