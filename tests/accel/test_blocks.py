"""`accelerate(model)`: the accelerated modules compute what the plain ones do (values and
gradients), keep the same parameters and state-dict keys, and `plain(model)` restores the
reference forwards. On the CPU the accelerated forwards take their reference paths; under
Triton's interpreter and on a GPU the kernels themselves run."""

import copy
import gc
import weakref

import pytest
import torch

from diffunet import UNet
from diffunet.accel import accelerate, blocks, is_accelerated, plain
from diffunet.accel.apply import ACCELERATED
from diffunet.accel.blocks import AcceleratedResBlock, AcceleratedUNet
from diffunet.model.introspect import example_inputs, small_config
from diffunet.model.layers.resample import Downsample, Upsample
from diffunet.model.layers.resblock import ResBlock

# (preset, dims): every kind of block the presets build — scale-shift and additive embeddings,
# ResBlock up/down, strided-conv and pooled downsampling, nearest+conv, nearest and transposed
# upsampling, full, linear and cross attention, patchify, aleatoric head, per-level skips.
CASES = [
    ("ddpm-cifar10", 2),
    ("emdiffuse-aleatoric", 2),
    ("emdiffuse-3d", 3),
    ("efficient-unet", 1),
    ("text-unet", 2),
    ("conditional-unet", 2),
    ("ldm", 2),
]
# Stable Diffusion-class models (test_accel_transformer.py): SD 1.x (conv projections), SD 2.x
# (linear projections, upcast attention) in 2D and 3D, and SDXL (no attention at level 0, depth
# per level, added conditioning).
TRANSFORMER_CASES = [("sd15", 2), ("sd21", 2), ("sd21", 3), ("sdxl", 2)]


def randomized(config) -> UNet:
    """A model with random values in every parameter (zero-initialised layers included)."""
    torch.manual_seed(0)
    model = UNet(config.replace(dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Every element within `tolerance` times the largest magnitude of `want`."""
    scale = want.abs().max().clamp_min(1e-12)
    assert ((got - want).abs().max() / scale).item() <= tolerance


def forward_and_grads(model: UNet, x: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
    model.zero_grad()
    out = model(x, **kwargs)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def _swapped(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` running its accelerated forward."""
    fast = copy.deepcopy(module)
    fast.__class__ = ACCELERATED[type(module)]
    return fast


def _random(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _compare(plain_module, inputs: list[torch.Tensor], call=None) -> None:
    """Values and gradients (inputs and parameters) of the plain and accelerated module."""
    call = call or (lambda module, *args: module(*args))
    results = []
    for module in (plain_module, _swapped(plain_module)):
        leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = call(module, *leaves)
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        grads = [x.grad for x in leaves if x.grad is not None]
        results.append([out.detach(), *grads, *(p.grad for p in module.parameters())])
    plain_results, accelerated_results = results
    for got, want in zip(accelerated_results, plain_results, strict=True):
        assert_close_to_scale(got, want, 1e-5)


RESBLOCKS = {
    "additive": dict(emb_dim=12),
    "scale-shift": dict(emb_dim=12, use_scale_shift_norm=True),
    "no-embedding": dict(emb_dim=None),
    "down": dict(emb_dim=12, resample="down"),
    "up": dict(emb_dim=12, resample="up"),
    "up-anisotropic": dict(emb_dim=12, resample="up", factors=(1, 2, 2)),
}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind", list(RESBLOCKS))
def test_each_resblock_matches_the_plain_one(kind, dims):
    options = dict(RESBLOCKS[kind])
    if "factors" in options and dims != 3:
        pytest.skip("anisotropic factors are 3D")
    emb_dim = options.pop("emb_dim")
    block = _random(ResBlock(dims, 8, 12, emb_dim, norm_groups=4, **options))
    x = torch.randn(2, 8, *(6,) * dims)
    emb = torch.randn(2, 12)
    if emb_dim is None:
        _compare(block, [x], lambda m, x: m(x))
    else:
        _compare(block, [x, emb], lambda m, x, emb: m(x, emb))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_decoder_resblock_given_h_and_skip_matches_the_plain_one_given_their_concatenation(
    dims,
):
    block = _random(ResBlock(dims, 12, 8, 12, norm_groups=4))
    h, skip, emb = (
        torch.randn(2, 8, *(4,) * dims),
        torch.randn(2, 4, *(4,) * dims),
        torch.randn(2, 12),
    )
    plain_out = block(torch.cat([h, skip], 1), emb)
    torch.testing.assert_close(_swapped(block)(h, emb, skip), plain_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("dims", "factors"), [(1, (2,)), (2, (2, 2)), (3, (2, 2, 2)), (3, (1, 2, 2))]
)
@pytest.mark.parametrize("mode", ["nearest_conv", "nearest", "transposed"])
def test_each_upsampling_matches_the_plain_one(mode, dims, factors):
    _compare(_random(Upsample(dims, 4, factors, mode)), [torch.randn(2, 4, *(5,) * dims)])


@pytest.mark.parametrize(("dims", "factors"), [(1, (2,)), (2, (2, 2)), (3, (1, 2, 2))])
@pytest.mark.parametrize(
    ("use_conv", "padding"), [(True, "symmetric"), (True, "asymmetric"), (False, "symmetric")]
)
def test_each_downsampling_matches_the_plain_one(use_conv, padding, dims, factors):
    module = _random(Downsample(dims, 4, factors, use_conv=use_conv, padding=padding))
    _compare(module, [torch.randn(2, 4, *(6,) * dims)])


def test_the_fused_group_norm_matches_group_norm():
    _compare(_random(torch.nn.GroupNorm(4, 8)), [torch.randn(2, 8, 5, 6)])


@pytest.mark.parametrize(("name", "dims"), CASES)
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_accelerated_model_matches_the_plain_one(name, dims, use_checkpoint):
    config = small_config(name, dims=dims).replace(use_checkpoint=use_checkpoint)
    model = randomized(config).train()
    x, kwargs = example_inputs(config, batch=2)
    expected = forward_and_grads(model, x, kwargs)
    keys = list(model.state_dict())
    accelerate(model)
    assert is_accelerated(model) and isinstance(model, AcceleratedUNet)
    assert list(model.state_dict()) == keys
    for got, want in zip(forward_and_grads(model, x, kwargs), expected, strict=True):
        assert_close_to_scale(got, want, 1e-5)


def test_plain_restores_the_reference_forwards_for_a_while():
    model = accelerate(randomized(small_config("emdiffuse")).eval())
    accelerated = {name: type(m) for name, m in model.named_modules()}
    with plain(model):
        assert type(model) is UNet and not is_accelerated(model)
        assert not any(type(m).__module__ == blocks.__name__ for m in model.modules())
    assert {name: type(m) for name, m in model.named_modules()} == accelerated
    assert accelerate(model) is model and is_accelerated(model)  # a second call changes nothing


def test_only_unets_are_accelerated():
    with pytest.raises(TypeError, match="expects a diffunet UNet"):
        accelerate(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)))
    wrapper = torch.nn.ModuleDict({"unet": UNet(small_config("ldm"))})
    assert accelerate(wrapper)["unet"].__class__ is AcceleratedUNet


def test_an_accelerated_checkpoint_loads_into_a_plain_model(tmp_path):
    model = accelerate(randomized(small_config("ddpm-cifar10")).eval())
    model.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path).eval()
    assert type(loaded) is UNet
    x, kwargs = example_inputs(model.config, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **kwargs), model(x, **kwargs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_checkpointed_decoder_keeps_no_concatenation(use_checkpoint, monkeypatch):
    """Each decoder block's first ResBlock concatenates its input and skip itself (here on the
    CPU, where the reference path needs the concatenation): checkpointed, the block keeps the
    two tensors it was given (alive anyway) and frees their concatenation until the
    recompute."""
    config = small_config("ddpm-cifar10").replace(use_checkpoint=use_checkpoint)
    model = accelerate(UNet(config).train())
    entry_norms = {id(block[0].in_norm) for block in model.output_blocks}
    concatenated = []
    norm_act = blocks.norm_act

    def remember(norm, x, **kwargs):
        if id(norm) in entry_norms:
            concatenated.append(weakref.ref(x))
        return norm_act(norm, x, **kwargs)

    monkeypatch.setattr(blocks, "norm_act", remember)
    x, kwargs = example_inputs(config, batch=2)
    out = model(x, **kwargs)
    gc.collect()
    alive = [ref() is not None for ref in concatenated]
    assert len(alive) == len(model.output_blocks)
    assert alive == [not use_checkpoint] * len(alive)  # without checkpointing, autograd keeps them
    out.mean().backward()


@pytest.mark.parametrize(("emb_dim", "scale_shift"), [(None, False), (32, False), (32, True)])
def test_backward_reaches_the_skip_convolution_last(emb_dim, scale_shift):
    """A block whose skip is a 1×1 convolution runs it before its main branch, so that backward
    reaches it last: the gradient it computes for the input is then not held while the main
    branch's backward runs (the peak of checkpointed training is in such a backward)."""
    block = AcceleratedResBlock(
        2, 16, 8, emb_dim, use_scale_shift_norm=scale_shift, norm_groups=4, zero_init=False
    )
    reached = []
    for name in ("skip", "in_conv", "out_conv"):
        conv = getattr(block, name)
        conv.register_forward_pre_hook(lambda *_: None)  # `convolve` then calls the module,
        conv.register_full_backward_hook(  # which runs its backward hooks
            lambda module, grad_input, grad_output, name=name: reached.append(name)
        )
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    emb = None if emb_dim is None else torch.randn(2, emb_dim)
    block(x, emb).square().sum().backward()
    assert reached == ["out_conv", "in_conv", "skip"]


@pytest.mark.parametrize(("name", "dims"), [("emdiffuse", 2), ("ddpm-cifar10", 2)])
def interpreted_a_whole_model_matches_the_plain_one(name, dims):
    """Every fused norm, FiLM and decoder entry of a small U-Net through Triton's interpreter
    (run by tests/accel/test_interpreter.py), against the plain model's values and gradients."""
    config = small_config(name, dims=dims).replace(
        num_res_blocks=1, channel_mult=(1, 2), model_channels=16, norm_groups=4
    )
    model = randomized(config).train()
    x, kwargs = example_inputs(config, batch=2, size=(8,) * dims)
    expected = forward_and_grads(model, x, kwargs)
    accelerate(model)
    for got, want in zip(forward_and_grads(model, x, kwargs), expected, strict=True):
        assert_close_to_scale(got, want, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "dims"), CASES + TRANSFORMER_CASES)
def test_accelerated_model_matches_the_plain_one_on_gpu(name, dims, monkeypatch):
    """The kernels on a GPU (the fused norms and channels-last activations around transformer
    blocks too), in float32 (TF32 off: its rounding depends on the layout and the algorithm
    cuDNN picks), against the plain model's values and gradients."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = small_config(name, dims=dims)
    model = randomized(config).cuda().train()
    x, kwargs = example_inputs(config, batch=2, device="cuda")
    expected = forward_and_grads(model, x, kwargs)
    accelerate(model)
    for got, want in zip(forward_and_grads(model, x, kwargs), expected, strict=True):
        assert_close_to_scale(got, want, 1e-4)
