"""Attention over heads wider than PyTorch's fused kernels take.

`F.scaled_dot_product_attention` gives heads of more than 256 channels to its
memory-efficient kernel alone (flash attention and cuDNN stop there), whose backward pass is
slow for them: `ldm`'s one 512-channel head over 16² positions. Over so few tokens the score
matrix is small, and `attention` computes softmax(q kᵀ / √d) v there as two GEMMs around a
float32 softmax instead, which cuBLAS and Inductor run at their usual speed
(`settings.EXPLICIT_ATTENTION`, `..._WIDER_THAN`, `..._MAX_SCORES`). Only calls that will be
differentiated do so: the fused forward alone is the faster one. The scores are formed in
float32, as the fused kernels accumulate them; the probabilities meet `v` in its own dtype, as
there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffunet.accel import settings


def explicit_wanted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention(q, k, v)` forms the scores itself: switched on for the device, a
    gradient to come, heads wider than the fused kernels' limit, and at most
    `settings.EXPLICIT_ATTENTION_MAX_SCORES` scores."""
    scores = math.prod(q.shape[:-1]) * k.shape[-2]
    return (
        settings.EXPLICIT_ATTENTION
        and q.device.type in settings.EXPLICIT_ATTENTION_DEVICES
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.shape[-1] > settings.EXPLICIT_ATTENTION_WIDER_THAN
        and scores <= settings.EXPLICIT_ATTENTION_MAX_SCORES
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v)` (no mask, no dropout) for (…, N, d) queries
    and (…, M, d) keys and values, by `explicit_attention` where `explicit_wanted(q, k, v)`."""
    if not explicit_wanted(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    return explicit_attention(q, k, v)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v by two GEMMs around a softmax, the scores in at least float32 and
    the probabilities in `v`'s dtype, whatever the settings."""
    scale = q.shape[-1] ** -0.5
    compute = torch.promote_types(q.dtype, torch.float32)  # never below float32
    # Autocast would run float32 GEMMs in bf16 again: the dtypes here are chosen explicitly.
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q.to(compute) * scale, k.to(compute).transpose(-1, -2))
        probabilities = scores.softmax(dim=-1).to(v.dtype)
        return torch.matmul(probabilities, v)
