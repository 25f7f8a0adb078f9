"""Widening a trained model's inputs keeps its outputs exactly."""

import pytest
import torch

from diffunet import UNet
from diffunet.model.introspect import small_config
from diffunet.model.surgery import widen_input_channels


def test_widened_model_ignores_the_new_channels_until_trained():
    model = UNet(small_config("emdiffuse")).eval()  # in 1 + cond 1
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    wide = widen_input_channels(model, in_channels=2, cond_channels=3).eval()
    assert wide.config.in_channels == 2 and wide.config.cond_channels == 3
    x, cond, t = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), torch.rand(2)
    extra_x, extra_cond = torch.randn(2, 1, 16, 16), torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        expected = model(x, t, cond=cond)
        got = wide(torch.cat([x, extra_x], 1), t, cond=torch.cat([cond, extra_cond], 1))
    torch.testing.assert_close(got, expected)


def test_an_unconditional_model_gains_a_condition():
    model = UNet(small_config("ddpm-cifar10")).eval()  # no dropout
    wide = widen_input_channels(model, cond_channels=1).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(wide(x, 5, cond=torch.randn(1, 1, 16, 16)), model(x, 5))


def test_narrowing_is_refused():
    with pytest.raises(ValueError, match="only adds channels"):
        widen_input_channels(UNet(small_config("ddpm-cifar10")), in_channels=1)
