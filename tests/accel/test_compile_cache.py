"""AOTAutograd's on-disk cache for compiled graphs that hold the accelerator's Functions."""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from diffunet.accel import cache_compiled_functions, settings
from diffunet.accel.compile_cache import ALLOW_FUNCTIONS
from diffunet.accel.conv import convolve


def _compile_and_count(conv: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], torch.Tensor]:
    """A fresh `torch.compile` of a training step of the routed `convolve(conv, x)` (which
    traces `conv.py`'s `autograd.Function` into the graph; Dynamo's in-memory caches dropped):
    AOTAutograd's cache counters for it, and the compiled output."""
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(convolve)(conv, x)
    out.square().sum().backward()
    return dict(counters["aot_autograd"]), out.detach()


def test_a_second_compile_loads_the_routed_convolution_from_the_cache():
    settings.ROUTED_DEVICES = frozenset({"cuda", "cpu"})  # the autouse fixture restores it
    conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    with functorch_config.patch(**{ALLOW_FUNCTIONS: False}), fresh_cache():
        default, _ = _compile_and_count(conv, x)
        assert default.get("autograd_cache_bypass") == 1, default  # PyTorch leaves it out
        assert cache_compiled_functions()
        first, _ = _compile_and_count(conv, x)
        assert first.get("autograd_cache_saved") == 1, first
        x.grad = None
        second, out = _compile_and_count(conv, x)
        assert second.get("autograd_cache_hit") == 1, second
    assert not getattr(functorch_config, ALLOW_FUNCTIONS)  # the patch restored it
    x_eager = x.detach().clone().requires_grad_()
    want = nn.functional.conv2d(x_eager, conv.weight.detach(), conv.bias.detach(), padding=1)
    want.square().sum().backward()
    torch.testing.assert_close(out, want.detach())
    torch.testing.assert_close(x.grad, x_eager.grad)  # the cached backward's input gradient
