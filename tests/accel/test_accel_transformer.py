"""`accelerate(model)` on Stable Diffusion-class models: transformer blocks run their plain
forward inside the accelerated U-Net (their GroupNorm through the fused norm), the added
conditioning reaches the embedding, and values and gradients equal the plain model's (on a GPU:
test_blocks.py's test over TRANSFORMER_CASES)."""

import pytest

from diffunet.accel import accelerate, is_accelerated
from diffunet.accel.blocks import FusedGroupNorm
from diffunet.model.introspect import example_inputs, small_config
from diffunet.model.layers import SpatialTransformer, TransformerBlock
from test_blocks import TRANSFORMER_CASES as CASES
from test_blocks import assert_close_to_scale, forward_and_grads, randomized


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
