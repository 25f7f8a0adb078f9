"""UNet behaviour: attention kernels against naive references, checkpointing, compilation,
config round trips, padding, anisotropic resampling and option combinations in 1D/2D/3D."""

import itertools
import math
import os

import pytest
import torch

from diffunet import UNet, UNetConfig, accelerate, preset, split_aleatoric
from diffunet.model.introspect import count_flops, example_inputs, small_config
from diffunet.model.layers import CrossAttention, LinearAttention, SelfAttention


def randomize(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised ones included) with random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def naive_group_norm(x, norm):
    return torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def naive_softmax_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


@pytest.mark.parametrize("spatial", [(24,), (6, 5), (3, 4, 5)])
def test_self_attention_matches_naive_float64(spatial):
    channels, heads = 16, 4
    attn = randomize(SelfAttention(channels, heads, norm_groups=4, norm_eps=1e-5)).double()
    x = torch.randn(2, channels, *spatial, dtype=torch.float64)
    tokens = naive_group_norm(x, attn.norm).flatten(2).transpose(1, 2)  # (B, N, C)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    bq, bk, bv = attn.qkv.bias.chunk(3)
    outs = []
    for h in range(heads):
        rows = slice(h * 4, (h + 1) * 4)
        q = tokens @ wq[rows].T + bq[rows]
        k = tokens @ wk[rows].T + bk[rows]
        v = tokens @ wv[rows].T + bv[rows]
        outs.append(naive_softmax_attention(q, k, v))
    h = torch.cat(outs, dim=-1) @ attn.proj_out.weight.T + attn.proj_out.bias
    expected = x + h.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_linear_attention_matches_naive_float64():
    channels, heads, d = 12, 3, 4
    attn = randomize(LinearAttention(channels, heads, norm_groups=3, norm_eps=1e-5)).double()
    x = torch.randn(2, channels, 5, 7, dtype=torch.float64)
    tokens = naive_group_norm(x, attn.norm).flatten(2).transpose(1, 2)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    outs = []
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        q = torch.softmax(tokens @ wq[rows].T, dim=-1) / math.sqrt(d)  # over features
        k = torch.softmax(tokens @ wk[rows].T, dim=-2)  # over positions
        v = tokens @ wv[rows].T
        out = torch.zeros_like(q)
        for b in range(x.shape[0]):  # explicit sums: out_n = sum_m (q_n · k_m) v_m
            for n in range(q.shape[1]):
                out[b, n] = sum((q[b, n] @ k[b, m]) * v[b, m] for m in range(k.shape[1]))
        outs.append(out)
    h = torch.cat(outs, dim=-1) @ attn.proj_out.weight.T + attn.proj_out.bias
    expected = x + h.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_cross_attention_matches_naive_float64():
    channels, heads, ctx_dim = 8, 2, 6
    attn = randomize(
        CrossAttention(channels, ctx_dim, heads, norm_groups=2, norm_eps=1e-5)
    ).double()
    x = torch.randn(2, channels, 4, 3, dtype=torch.float64)
    context = torch.randn(2, 5, ctx_dim, dtype=torch.float64)
    tokens = naive_group_norm(x, attn.norm).flatten(2).transpose(1, 2)
    q_all = tokens @ attn.q.weight.T + attn.q.bias
    k_all, v_all = (context @ attn.kv.weight.T + attn.kv.bias).chunk(2, dim=-1)
    outs = [
        naive_softmax_attention(q_all[..., s], k_all[..., s], v_all[..., s])
        for s in (slice(0, 4), slice(4, 8))
    ]
    h = torch.cat(outs, dim=-1) @ attn.proj_out.weight.T + attn.proj_out.bias
    expected = x + h.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x, context), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["ddpm-cifar10", "text-unet", "emdiffuse-aleatoric"])
def test_gradient_checkpointing_gives_identical_gradients(name):
    config = small_config(name).replace(dropout=0.0)
    plain = randomize(UNet(config)).double()
    checkpointed = UNet(config.replace(use_checkpoint=True)).double()
    checkpointed.load_state_dict(plain.state_dict())
    x, kwargs = example_inputs(config, batch=2, dtype=torch.float64)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model.zero_grad()
        model(x, **kwargs).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # Dynamo's capture and AOTAutograd's forward/backward split
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not os.environ.get("DIFFUNET_SLOW_TESTS"),
                reason="Inductor compiles C++ for about a minute; set DIFFUNET_SLOW_TESTS=1",
            ),
        ),
    ],
)
@pytest.mark.parametrize("accelerated", [True])  # the plain model: tests/model/test_compile.py
def test_compile_fullgraph_matches_eager(backend, accelerated):
    # Small but complete: scale-shift, ResBlock up/down, middle attention, cond, noise level.
    config = small_config("emdiffuse").replace(
        num_res_blocks=1, dropout=0.0, channel_mult=(1, 2), attention_resolutions=(2,)
    )
    model = randomize(UNet(config)).train()
    if accelerated:
        accelerate(model)
    x, kwargs = example_inputs(config, batch=2)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    results = []
    for run in (compiled, model):
        model.zero_grad()
        out = run(x, **kwargs)
        out.square().sum().backward()
        results.append([out.detach(), *(p.grad.clone() for p in model.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["text-unet", "efficient-unet", "emdiffuse-3d"])
def test_config_json_round_trip_rebuilds_the_same_model(name, tmp_path):
    config = preset(name)
    path = tmp_path / "config.json"
    config.to_json(path)
    restored = UNetConfig.from_json(path)
    assert restored == config
    a, b = UNet(small_config(name)), UNet(UNetConfig.from_dict(small_config(name).to_dict()))
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_scalar_and_vector_timesteps_agree():
    config = small_config("ddpm-cifar10")
    model = randomize(UNet(config)).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        a = model(x, 17)
        b = model(x, torch.tensor(17))
        c = model(x, torch.full((3,), 17))
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, c)


def test_pad_to_multiple_pads_and_crops_back():
    config = small_config("ddpm-cifar10").replace(pad_to_multiple=True)
    model = randomize(UNet(config)).eval()
    x = torch.randn(1, 3, 13, 10)
    with torch.no_grad():
        out = model(x, 5)
        manual = model(torch.nn.functional.pad(x, (0, 6, 0, 3), mode="replicate"), 5)
    assert out.shape == x.shape
    torch.testing.assert_close(out, manual[..., :13, :10])


def test_anisotropic_3d_keeps_depth_where_asked():
    config = small_config("emdiffuse-3d").replace(resample_axes=((1, 2), (1, 2), (0, 1, 2)))
    assert config.size_multiple() == (2, 8, 8)
    model = UNet(config)
    x, kwargs = example_inputs(config, batch=1, size=(4, 16, 24))
    assert model(x, **kwargs).shape == (1, 1, 4, 16, 24)
    shapes = []
    hook = model.middle_block.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    model(x, **kwargs)
    hook.remove()
    assert shapes[0][2:] == (2, 2, 3)  # depth halved once, H and W three times


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_patchify_stem_and_head(dims):
    config = small_config("efficient-unet", dims).replace(pool_factor=2, num_res_blocks=1)
    model = UNet(config)
    stem = model.input_blocks[0][0]
    assert stem.kernel_size == (2,) * dims and stem.stride == (2,) * dims
    x, kwargs = example_inputs(config, batch=1, size=(16,) * dims)
    assert model(x, **kwargs).shape == x.shape


def test_aleatoric_output_is_mean_then_log_variance():
    config = small_config("emdiffuse-aleatoric")
    model = randomize(UNet(config)).eval()
    x, kwargs = example_inputs(config, batch=2)
    with torch.no_grad():
        out = model(x, **kwargs)
        mean, log_var = split_aleatoric(out)
        plain = UNet(config.replace(aleatoric=False))
        plain.load_state_dict(
            {k: v for k, v in model.state_dict().items() if not k.startswith("out_logvar")}
        )
        torch.testing.assert_close(mean, plain.eval()(x, **kwargs))
    assert log_var.shape == mean.shape


def test_class_labels_and_null_label_change_the_output():
    config = small_config("ddpm-cifar10").replace(num_classes=10)
    model = randomize(UNet(config)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    with torch.no_grad():
        a = model(x, t, labels=torch.tensor([1, 2]))
        b = model(x, t, labels=torch.full((2,), model.null_label))
    assert not torch.allclose(a, b)


OPTION_GRID = {
    "attention_type": ["full", "linear", "none"],
    "use_scale_shift_norm": [False, True],
    "skip_topology": ["per_block", "per_level"],
    "resblock_updown": [False, True],
    "upsample_type": ["nearest_conv", "nearest", "transposed"],
    "downsample_type": ["conv", "avgpool"],
}


def _option_combinations():
    keys = list(OPTION_GRID)
    combos = list(itertools.product(*OPTION_GRID.values()))
    # every value of every option appears, spread over the three dimensionalities
    picked = combos[::7]
    return [
        (dims, dict(zip(keys, combo))) for i, combo in enumerate(picked) for dims in [(i % 3) + 1]
    ]


@pytest.mark.parametrize(("dims", "options"), _option_combinations())
def test_option_combinations_build_and_run(dims, options):
    config = UNetConfig(
        dims=dims,
        in_channels=2,
        out_channels=2,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_groups=4,
        attention_resolutions=(2,),
        num_heads=2,
        cond_channels=1,
        context_dim=6 if options["attention_type"] != "none" else None,
        num_classes=3,
        mid_attention_type="full",
        **options,
    )
    model = UNet(config)
    x, kwargs = example_inputs(config, batch=2, size=(8,) * dims)
    out = model(x, **kwargs)
    assert out.shape == (2, 2, *(8,) * dims)
    out.mean().backward()


def test_option_grid_covers_every_value():
    seen = {k: set() for k in OPTION_GRID}
    dims_seen = set()
    for dims, options in _option_combinations():
        dims_seen.add(dims)
        for k, v in options.items():
            seen[k].add(v)
    assert dims_seen == {1, 2, 3}
    assert all(seen[k] == set(v) for k, v in OPTION_GRID.items())


def analytic_flops(model: UNet, x: torch.Tensor, t: torch.Tensor) -> int:
    """2·MACs of every conv and linear layer plus the two attention matmuls, from shapes."""
    total = 0

    def conv_or_linear(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Linear):
            total += 2 * output.numel() * module.in_features
        elif isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            total += 2 * inputs[0].numel() * module.out_channels * math.prod(module.kernel_size)
        else:
            total += 2 * output.numel() * module.in_channels * math.prod(module.kernel_size)

    def attention(module, inputs, output):
        nonlocal total
        b, c = inputs[0].shape[:2]
        n = math.prod(inputs[0].shape[2:])
        total += 2 * 2 * b * n * n * c  # QK^T and AV over all heads

    hooks = [
        m.register_forward_hook(conv_or_linear)
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
    ]
    hooks += [
        m.register_forward_hook(attention) for m in model.modules() if isinstance(m, SelfAttention)
    ]
    with torch.no_grad():
        model(x, t)
    for hook in hooks:
        hook.remove()
    return total


@pytest.mark.parametrize("name", ["ddpm-cifar10", "ldm"])
def test_counted_flops_equal_the_analytic_count(name):
    config = preset(name)
    model = UNet(config)
    size = config.spatial_size() if name == "ddpm-cifar10" else (32, 32)  # ldm: 4² at the bottom
    x, t = torch.randn(1, 3, *size), torch.tensor([10])
    assert count_flops(model, 1, size) == analytic_flops(model, x, t)
    assert count_flops(model, 2, size) == 2 * count_flops(model, 1, size)


@pytest.mark.parametrize(("dims", "factors"), [(2, (2, 2)), (3, (1, 2, 2)), (1, (2,))])
def test_asymmetric_downsample_pads_at_the_end_only(dims, factors):
    from diffunet.model.layers import Downsample

    down = randomize(Downsample(dims, 4, factors, use_conv=True, padding="asymmetric"))
    x = torch.randn(2, 4, *[6] * dims)
    pads = []
    for f in reversed(factors):
        pads += [0, 1] if f == 2 else [1, 1]
    conv = getattr(torch.nn.functional, f"conv{dims}d")
    expected = conv(torch.nn.functional.pad(x, pads), down.op.weight, down.op.bias, stride=factors)
    torch.testing.assert_close(down(x), expected)
    assert down(x).shape[2:] == tuple(6 // f for f in factors)


def test_ddpm_and_ldm_presets_pad_like_their_originals():
    assert preset("ddpm-cifar10").downsample_padding == "asymmetric"
    assert preset("ldm").downsample_padding == "asymmetric"
    assert preset("emdiffuse").downsample_padding == "symmetric"
