"""Nearest-neighbour upsampling: the compiled form equals `F.interpolate`, without atomics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from diffunet.accel.upsample import upsample_nearest


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _upsample_then_weight(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    # A weighting that differs per output element, so each input's gradient sums distinct values.
    y = upsample_nearest(x, factors)
    return y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin()


@pytest.mark.parametrize(
    "shape, factors",
    [
        ((2, 3, 5), (2,)),
        ((2, 3, 4, 5), (2, 2)),
        ((1, 2, 3, 4, 5), (1, 2, 2)),  # anisotropic 3D: the first axis is not resampled
        ((1, 2, 3, 4, 2), (2, 2, 2)),
    ],
)
def test_compiled_values_and_gradients_equal_interpolate(shape, factors):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, scale_factor=factors, mode="nearest")
    assert torch.equal(upsample_nearest(x, factors), expected)  # eager is interpolate itself

    compiled = torch.compile(_upsample_then_weight, fullgraph=True)
    out = compiled(x, factors)
    (grad,) = torch.autograd.grad(out.sum(), x)
    reference = _upsample_then_weight(x, factors)
    (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-12, atol=1e-12)


def test_channels_last_stays_channels_last_in_eager():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert upsample_nearest(x, (2, 2)).is_contiguous(memory_format=torch.channels_last)


def test_compiled_backward_has_no_atomic_adds():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    compiled = torch.compile(_upsample_then_weight)
    _, codes = run_and_get_code(lambda: compiled(x, (2, 2)).sum().backward())
    assert codes, "Inductor generated no code"
    assert not any("atomic_add" in code for code in codes), "backward scatters with atomics"
