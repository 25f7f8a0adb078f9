"""`accelerate(model)` on Stable Diffusion-class models: transformer blocks run their plain
forward inside the accelerated U-Net (their GroupNorm through the fused norm), the added
conditioning reaches the embedding, and values and gradients equal the plain model's."""

import pytest
import torch

from diffunet.accel import accelerate, is_accelerated
from diffunet.accel.blocks import FusedGroupNorm
from diffunet.model.introspect import example_inputs, small_config
from diffunet.model.layers import SpatialTransformer, TransformerBlock
from diffunet.model.unet import UNet

# SD 1.x (conv projections), SD 2.x (linear projections, upcast attention) in 2D and 3D, and
# SDXL (no attention at level 0, depth per level, added conditioning).
CASES = [("sd15", 2), ("sd21", 2), ("sd21", 3), ("sdxl", 2)]


def randomized(config) -> UNet:
    """A model with random values in every parameter (zero-initialised layers included)."""
    torch.manual_seed(0)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def forward_and_grads(model: UNet, x: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
    model.zero_grad()
    out = model(x, **kwargs)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Every element within `tolerance` times the largest magnitude of `want`."""
    scale = want.abs().max().clamp_min(1e-12)
    assert ((got - want).abs().max() / scale).item() <= tolerance


@pytest.mark.parametrize(("name", "dims"), CASES)
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_accelerated_transformer_model_matches_the_plain_one(name, dims, use_checkpoint):
    config = small_config(name, dims=dims).replace(use_checkpoint=use_checkpoint)
    size = None
    if dims == 3:  # two levels on 4 × 8 × 8 volumes: a fraction of the 16³ positions' cost
        config, size = config.replace(channel_mult=(1, 2), attention_resolutions=(1, 2)), (4, 8, 8)
    model = randomized(config).train()
    x, kwargs = example_inputs(config, batch=2, size=size)
    expected = forward_and_grads(model, x, kwargs)
    keys = list(model.state_dict())
    accelerate(model)
    assert is_accelerated(model) and list(model.state_dict()) == keys
    transformers = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    assert transformers and all(type(m) is SpatialTransformer for m in transformers)
    assert all(isinstance(m.norm, FusedGroupNorm) for m in transformers)
    assert all(
        type(m) is TransformerBlock for m in model.modules() if isinstance(m, TransformerBlock)
    )
    for got, want in zip(forward_and_grads(model, x, kwargs), expected, strict=True):
        assert_close_to_scale(got, want, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "dims"), CASES)
def test_accelerated_transformer_model_matches_the_plain_one_on_gpu(name, dims, monkeypatch):
    """The fused kernels and channels-last activations around the transformer blocks on a GPU,
    in float32 with TF32 off, against the plain model's values and gradients."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = small_config(name, dims=dims)
    model = randomized(config).cuda().train()
    x, kwargs = example_inputs(config, batch=2, device="cuda")
    expected = forward_and_grads(model, x, kwargs)
    accelerate(model)
    for got, want in zip(forward_and_grads(model, x, kwargs), expected, strict=True):
        assert_close_to_scale(got, want, 1e-4)
