"""Every preset builds with the parameter count of the model it reproduces, and its small
version runs forward + backward in every dimensionality it supports."""

import pytest
import torch

import diffunet
from diffunet import UNet, preset
from diffunet.model.introspect import example_inputs, small_config

# Counts of the original networks, from their public sources (see SPEC.md §1).
ORIGINAL_COUNTS = {
    "ddpm-cifar10": 35_746_307,  # diffusers UNet2DModel, google/ddpm-cifar10-32
    "emdiffuse": 15_677_345,  # EMDiffuse-n
    "emdiffuse-aleatoric": 15_677_345 + 353,  # + GroupNorm → SiLU → 3×3 conv variance head
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_COUNTS))
def test_parameter_count_matches_original(name):
    assert UNet(preset(name)).num_parameters() == ORIGINAL_COUNTS[name]


def test_conditional_unet_matches_seed_count_up_to_its_double_projection():
    # Seed 001's defaults (120² input: attention at 120 and 60 = levels 1 and 2) read
    # shape-faithfully have 19,483,137 parameters, with Q/K/V projected twice (a 1×1 conv,
    # then nn.MultiheadAttention's in_proj and out_proj: 4C² + 4C per block). We keep one.
    config = preset("conditional-unet", image_size=120, attention_resolutions=(1, 2))
    widths = [64, 128, 256, 128, 64]  # enc level 1, enc level 2, middle, dec level 2, dec level 1
    double_projection = sum(4 * c * c + 4 * c for c in widths)
    assert UNet(config).num_parameters() + double_projection == 19_483_137


def test_ldm_preset_is_75_4m():
    assert round(UNet(preset("ldm")).num_parameters() / 1e6, 1) == 75.4


def test_list_presets_has_every_seed_model():
    assert set(diffunet.list_presets()) >= {
        "efficient-unet",
        "conditional-unet",
        "text-unet",
        "emdiffuse",
        "emdiffuse-3d",
        "emdiffuse-aleatoric",
        "ldm",
        "ddpm-cifar10",
    }


def test_preset_overrides_and_unknown_name():
    assert preset("ldm", dims=3).dims == 3
    with pytest.raises(ValueError, match="unknown preset 'nope'.*ddpm-cifar10"):
        preset("nope")


CASES = [
    (name, dims) for name in diffunet.list_presets() for dims in diffunet.preset_info(name).dims
]


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_small_preset_forward_backward(name, dims):
    config = small_config(name, dims)
    model = UNet(config)
    x, kwargs = example_inputs(config, batch=2)
    out = model(x, **kwargs)
    assert out.shape == (2, config.out_channels * (2 if config.aleatoric else 1), *x.shape[2:])
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
