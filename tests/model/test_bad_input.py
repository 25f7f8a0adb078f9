"""Invalid configs and forward arguments raise ValueError/TypeError saying what was given,
what was expected and how to fix it."""

import pytest
import torch

from diffunet import ConfigError, UNet, UNetConfig
from diffunet.model.introspect import small_config

BAD_CONFIGS = [
    ({"dims": 4}, r"dims=4.*1, 2 or 3"),
    ({"channel_mult": ()}, r"channel_mult=\(\).*non-empty"),
    ({"model_channels": 20, "norm_groups": 8}, r"norm_groups=8.*\[20, 60\].*lower norm_groups"),
    ({"num_heads": 3, "attention_resolutions": (2,)}, r"num_heads=3.*divisor.*width 32"),
    ({"attention_resolutions": (16,)}, r"attention_resolutions=\(16,\).*\[1, 2, 4, 8\]"),
    ({"dropout": -0.1}, r"dropout=-0.1.*\[0, 1\)"),
    ({"num_res_blocks": 0}, r"num_res_blocks=0.*positive integer"),
    ({"attention_type": "sparse"}, r"attention_type='sparse'.*full"),
    ({"resample_axes": ((0,), (1,))}, r"resample_axes.*3 entries"),
    ({"image_size": 30}, r"image_size=30.*divisible by \(8, 8\).*\(24, 24\).*\(32, 32\)"),
    ({"use_timestep": False, "use_scale_shift_norm": True}, r"use_scale_shift_norm.*no time"),
]


@pytest.mark.parametrize(("changes", "pattern"), BAD_CONFIGS)
def test_invalid_config_is_rejected_with_a_useful_message(changes, pattern):
    base = dict(model_channels=16, channel_mult=(1, 2, 2, 2), norm_groups=8)
    with pytest.raises(ConfigError, match=pattern):
        UNetConfig(**{**base, **changes})


def test_unknown_field_lists_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown UNetConfig field\(s\) \['base_channels'\].*model_channels"
    ):
        UNetConfig.from_dict({"base_channels": 64})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.fixture(scope="module")
def model():
    return UNet(small_config("ddpm-cifar10"))


@pytest.fixture(scope="module")
def conditional():
    config = small_config("text-unet").replace(cond_channels=1, num_classes=4)
    return UNet(config)


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match="x has 4 channels but the model expects in_channels=3"):
        model(torch.randn(1, 4, 16, 16), 1)


def test_wrong_number_of_dimensions(model):
    with pytest.raises(ValueError, match=r"dims=2 model expecting \(B, C, H, W\).*dims=3"):
        model(torch.randn(1, 3, 8, 16, 16), 1)


def test_indivisible_size_names_nearest_valid_sizes(model):
    with pytest.raises(
        ValueError, match=r"\(20, 16\).*\(8, 8\).*\(16, 16\) or \(24, 16\).*pad_to_multiple"
    ):
        model(torch.randn(1, 3, 20, 16), 1)


def test_integer_input_is_a_type_error(model):
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long), 1)


def test_timestep_batch_mismatch(model):
    with pytest.raises(ValueError, match=r"t has shape \(3,\) but x has batch 2"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(3))


def test_missing_timestep(model):
    with pytest.raises(ValueError, match="t is required"):
        model(torch.randn(2, 3, 16, 16))


def test_conditioning_given_to_an_unconditional_model(model):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="cond_channels=0"):
        model(x, 1, cond=torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="context_dim=None"):
        model(x, 1, context=torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="num_classes=None"):
        model(x, 1, labels=torch.tensor([0]))


def test_missing_conditioning(conditional):
    x = torch.randn(1, 3, 16, 16)
    cond, context, labels = torch.randn(1, 1, 16, 16), torch.randn(1, 4, 12), torch.tensor([1])
    with pytest.raises(ValueError, match=r"pass cond=Tensor\(1, 1, 16, 16\)"):
        conditional(x, 1, context=context, labels=labels)
    with pytest.raises(ValueError, match=r"context of shape \(B=1, N, 12\)"):
        conditional(x, 1, cond=cond, labels=labels)
    with pytest.raises(ValueError, match="null_label=4"):
        conditional(x, 1, cond=cond, context=context)


def test_malformed_conditioning(conditional):
    x = torch.randn(1, 3, 16, 16)
    cond, context, labels = torch.randn(1, 1, 16, 16), torch.randn(1, 4, 12), torch.tensor([1])
    with pytest.raises(
        ValueError, match=r"cond has shape \(1, 1, 8, 8\), expected \(1, 1, 16, 16\)"
    ):
        conditional(x, 1, cond=torch.randn(1, 1, 8, 8), context=context, labels=labels)
    with pytest.raises(ValueError, match=r"context has shape \(1, 4, 7\), expected \(1, N, 12\)"):
        conditional(x, 1, cond=cond, context=torch.randn(1, 4, 7), labels=labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        conditional(x, 1, cond=cond, context=context, labels=torch.tensor([1.0]))


def test_concatenated_condition_hint(conditional):
    with pytest.raises(ValueError, match="pass the conditioning image as cond="):
        conditional(torch.randn(1, 4, 16, 16), 1)


def test_unet_rejects_a_dict():
    with pytest.raises(TypeError, match="UNet expects a UNetConfig"):
        UNet({"dims": 2})
