"""Transformer blocks (Stable Diffusion's SpatialTransformer) and SDXL's added conditioning in
the model: the block against a naive float64 reference in 1D/2D/3D, whole models in 1D and 3D,
config validation and round trips, forward-argument checks and fullgraph compilation."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from diffunet import UNet, UNetConfig, preset
from diffunet.errors import InvalidTypeError, InvalidValueError
from diffunet.model.config import ConfigError
from diffunet.model.introspect import describe, example_inputs, small_config
from diffunet.model.layers import SpatialTransformer


def randomize(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised ones included) with random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def tiny(**changes) -> UNetConfig:
    """A two-level transformer-block model: attention at level 1 and in the middle."""
    fields = dict(
        in_channels=3,
        out_channels=3,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_groups=4,
        attention_resolutions=(2,),
        num_head_channels=4,
        context_dim=6,
        transformer_depth=2,
    )
    return UNetConfig(**{**fields, **changes})


def naive_attention(x, attn, context, heads):
    """Softmax attention written out: per-head q·kᵀ/√d, softmax, ·v, output projection."""
    source = x if context is None else context
    q, k, v = attn.to_q(x), attn.to_k(source), attn.to_v(source)
    b, n, c = q.shape
    d = c // heads

    def split(h):
        return h.reshape(b, h.shape[1], heads, d).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, n, c)
    return attn.to_out(out)


def naive_spatial_transformer(block: SpatialTransformer, x, context, heads):
    """CompVis' SpatialTransformer step by step, on `(B, C, *spatial)` in float64."""
    norm = torch.nn.functional.group_norm(
        x, block.norm.num_groups, block.norm.weight, block.norm.bias, 1e-6
    )
    c = x.shape[1]
    if block.use_linear_projection:
        h = block.proj_in(norm.flatten(2).transpose(1, 2))
    else:
        h = block.proj_in(norm).flatten(2).transpose(1, 2)
    for layer in block.transformer_blocks:
        h = h + naive_attention(layer.norm1(h), layer.attn1, None, heads)
        h = h + naive_attention(layer.norm2(h), layer.attn2, context, heads)
        hidden, gate = layer.ff.proj(layer.norm3(h)).chunk(2, dim=-1)
        h = h + layer.ff.out(hidden * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))))
    if block.use_linear_projection:
        h = block.proj_out(h).transpose(1, 2).reshape(x.shape)
    else:
        h = block.proj_out(h.transpose(1, 2).reshape(x.shape[0], c, *x.shape[2:]))
    return x + h


@pytest.mark.parametrize(
    ("spatial", "linear", "context_dim"),
    [((10,), False, 5), ((4, 5), True, 5), ((2, 3, 4), False, None), ((3, 2, 2), True, 7)],
)
def test_spatial_transformer_matches_a_naive_float64_reference(spatial, linear, context_dim):
    dims, heads = len(spatial), 2
    block = SpatialTransformer(
        dims,
        8,
        heads,
        2,
        context_dim=context_dim,
        norm_groups=4,
        use_linear_projection=linear,
    )
    block = randomize(block, 0.3).double()
    x = torch.randn(2, 8, *spatial, dtype=torch.float64)
    context = None if context_dim is None else torch.randn(2, 3, context_dim).double()
    expected = naive_spatial_transformer(block, x, context, heads)
    torch.testing.assert_close(block(x, context), expected, rtol=1e-10, atol=1e-10)


def test_upcast_attention_computes_float16_attention_in_float32():
    block = randomize(SpatialTransformer(2, 8, 2, 1, context_dim=4, norm_groups=4), 0.3)
    upcast = SpatialTransformer(2, 8, 2, 1, context_dim=4, norm_groups=4, upcast_attention=True)
    upcast.load_state_dict(block.state_dict())
    x, context = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                upcast(x, context)
                block(x, context)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    # attn1 and attn2 of each block: float16 is upcast, bfloat16 (float32's range) is not
    assert seen == [torch.float32] * 2 + [torch.float16] * 2 + [torch.bfloat16] * 4


@pytest.mark.parametrize("dims", [1, 3])
def test_transformer_model_runs_forward_and_backward_in_1d_and_3d(dims):
    config = tiny(
        dims=dims,
        transformer_depth=(0, 2),
        use_linear_projection=dims == 3,
        added_cond_dim=5 + 2 * 4,
        added_time_embed_dim=4,
    )
    model = randomize(UNet(config))
    size = (8,) * dims
    x = torch.randn(2, 3, *size)
    out = model(
        x,
        torch.tensor([3, 700]),
        context=torch.randn(2, 4, 6),
        added_cond=torch.randn(2, 5),
        time_ids=torch.tensor([[8.0, 8.0], [16.0, 4.0]]),
    )
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_transformer_blocks_sit_where_the_config_says():
    model = UNet(tiny(transformer_depth=(0, 3), mid_transformer_depth=1))
    sites = {
        name: len(m.transformer_blocks)
        for name, m in model.named_modules()
        if isinstance(m, SpatialTransformer)
    }
    # level 1: one encoder block and two decoder blocks (num_res_blocks + 1); the middle
    assert sites == {
        "input_blocks.3.1": 3,
        "middle_block.1": 1,
        "output_blocks.0.1": 3,
        "output_blocks.1.1": 3,
    }
    assert "transformer ×3" in describe(model.config, flops=False)


def test_time_ids_and_added_cond_change_the_output():
    config = tiny(added_cond_dim=3 + 2 * 4, added_time_embed_dim=4)
    model = randomize(UNet(config)).eval()
    x, t, context = torch.randn(1, 3, 8, 8), torch.tensor([10]), torch.randn(1, 4, 6)
    pooled, ids = torch.randn(1, 3), torch.tensor([[32.0, 32.0]])
    base = model(x, t, context=context, added_cond=pooled, time_ids=ids)
    assert not torch.allclose(base, model(x, t, context=context, added_cond=-pooled, time_ids=ids))
    other = torch.tensor([[64.0, 32.0]])
    assert not torch.allclose(base, model(x, t, context=context, added_cond=pooled, time_ids=other))


BAD_CONFIGS = [
    (dict(transformer_depth=(1, 2, 3)), r"transformer_depth=\(1, 2, 3\).*2 entries"),
    (dict(transformer_depth=0), r"transformer_depth=0.*positive integer"),
    (dict(transformer_depth=(1, 0)), r"at least 1 at level 1, which has attention"),
    (dict(attention_type="linear"), r"attention_type='linear'.*transformer blocks"),
    (dict(transformer_depth=(2, 0), attention_resolutions=()), r"middle block's transformer"),
    (dict(mid_transformer_depth=2, mid_attention_type="none"), r"mid_attention_type='none'"),
    (dict(transformer_depth=None, use_linear_projection=True), r"use_linear_projection=True"),
    (dict(transformer_depth=None, upcast_attention=True), r"upcast_attention=True"),
    (dict(mid_attention_norm=False), r"mid_attention_norm=False.*transformer blocks"),
    (dict(transformer_depth=None, mid_attention_type="none", mid_attention_norm=False), "no att"),
    (dict(added_time_embed_dim=8), r"added_time_embed_dim=8.*added_cond_dim"),
    (dict(added_cond_dim=20, added_time_embed_dim=7), r"an even integer"),
    (dict(added_cond_dim=0), r"added_cond_dim=0"),
    (dict(transformer_depth="1"), r"transformer_depth must be .*e\.g\. 1 or \[0, 2, 10\]"),
]


@pytest.mark.parametrize(("changes", "pattern"), BAD_CONFIGS)
def test_invalid_transformer_and_added_conditioning_configs_are_named(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(**changes)


def test_config_json_round_trip_keeps_the_new_fields(tmp_path):
    for name in ("sd15", "sd21", "sdxl"):
        config = preset(name)
        config.to_json(tmp_path / f"{name}.json")
        assert UNetConfig.from_json(tmp_path / f"{name}.json") == config
    data = preset("sdxl").to_dict()
    assert data["transformer_depth"] == [0, 2, 10]
    assert data["added_cond_dim"] == 2816 and data["added_time_embed_dim"] == 256
    restored = UNetConfig.from_dict(data)
    assert restored.transformer_depth == (0, 2, 10)


def test_save_and_load_pretrained_round_trip(tmp_path):
    config = small_config("sdxl")
    model = randomize(UNet(config)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = UNet.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == config
    x, kwargs = example_inputs(config, batch=2)
    torch.testing.assert_close(loaded(x, **kwargs), model(x, **kwargs), rtol=0, atol=0)


@pytest.fixture(scope="module")
def sdxl_like():
    return randomize(UNet(tiny(added_cond_dim=4 + 6 * 2, added_time_embed_dim=2))).eval()


def _call(model, **changes):
    inputs = dict(
        context=torch.randn(2, 4, 6),
        added_cond=torch.randn(2, 4),
        time_ids=torch.ones(2, 6),
    )
    inputs.update(changes)
    return model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), **inputs)


BAD_INPUTS = [
    (dict(added_cond=None), InvalidValueError, r"added_cond is missing.*\(B=2, D\).*D \+ n × 2"),
    (dict(time_ids=None), InvalidValueError, r"time_ids is missing"),
    (dict(added_cond=torch.randn(2, 5)), InvalidValueError, r"make 17 features.*is 16"),
    (dict(added_cond=torch.randn(3, 4)), InvalidValueError, r"added_cond has shape \(3, 4\)"),
    (dict(time_ids=torch.ones(2, 6, 1)), InvalidValueError, r"time_ids has shape \(2, 6, 1\)"),
    (dict(added_cond=torch.ones(2, 4, dtype=torch.long)), InvalidTypeError, r"floating-point"),
    (dict(added_cond=[1.0] * 4), InvalidTypeError, r"added_cond must be a torch.Tensor"),
]


@pytest.mark.parametrize(("changes", "error", "pattern"), BAD_INPUTS)
def test_bad_added_conditioning_inputs_name_what_is_expected(sdxl_like, changes, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(sdxl_like, **changes)


def test_added_conditioning_given_to_a_model_without_it_is_refused():
    model = UNet(tiny())
    with pytest.raises(InvalidValueError, match="added_cond was given.*added_cond_dim=None"):
        _call(model, time_ids=None)
    with_vector = UNet(tiny(added_cond_dim=4))
    with pytest.raises(InvalidValueError, match="time_ids were given.*added_time_embed_dim=None"):
        _call(with_vector)
    assert _call(with_vector, time_ids=None).shape == (2, 3, 8, 8)


@pytest.mark.slow
def test_transformer_model_compiles_fullgraph_once_for_all_sizes():
    config = small_config("sdxl", dims=2).replace(
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        transformer_depth=(0, 1),
        num_res_blocks=1,
        upcast_attention=True,
        pad_to_multiple=True,
    )
    model = randomize(UNet(config)).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        # No first-call size equals another or a fixed width (6 time ids, 10 pooled features):
        # Dynamo would unify them ("duck sizing") and recompile for the next sizes.
        for batch, spatial, tokens in [(2, (5, 7), 3), (3, (4, 9), 5)]:
            x, kwargs = example_inputs(config, batch=batch, size=spatial)
            kwargs["context"] = torch.randn(batch, tokens, config.context_dim)
            torch.testing.assert_close(compiled(x, **kwargs), model(x, **kwargs))
    assert counter.frame_count == 1
