"""A decoder ResBlock's entry on (h, skip) without a lasting concatenation: the same values and
gradients as normalizing and projecting `cat([h, skip])`, without keeping that concatenation.

On the CPU the Triton kernels are replaced by stand-ins with the same contract (statistics out
of the forward, the input gradient written to `out`, which may be the input itself); through
Triton's interpreter (the `interpreted_*` functions) and on a GPU under `-m gpu` the kernels
themselves run."""

import pytest
import torch
import torch.nn.functional as F

from diffunet import UNet
from diffunet.accel import accelerate, decoder_entry, settings, triton_runtime
from diffunet.accel import norm as fused
from diffunet.accel.blocks import AcceleratedResBlock
from diffunet.model.introspect import example_inputs, small_config
from diffunet.model.layers.ops import conv_nd, normalization
from diffunet.model.layers.resblock import ResBlock

EPS = 1e-5


def reference_forward(x, weight, bias, scale, shift, add, num_groups, eps, film, act):
    """The kernels' forward contract: (output, per-channel centre, per-channel rstd)."""
    y = fused.group_norm_act_reference(x, num_groups, weight, bias, eps, act=act)
    groups = x.float().reshape(x.shape[0], num_groups, -1)
    per_group = x.shape[1] // num_groups
    mean = groups.mean(-1).repeat_interleave(per_group, 1)
    rstd = (groups.var(-1, unbiased=False) + eps).rsqrt().repeat_interleave(per_group, 1)
    return y, mean, rstd


def reference_backward(
    grad, x, weight, bias, scale, shift, add, mean, rstd, num_groups, film, act, out=None
):
    """The kernels' backward contract: dx written to `out` (possibly `x` itself) where given."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
        y = fused.group_norm_act_reference(*leaves[:1], num_groups, *leaves[1:], EPS, act=act)
        dx, dw, db = torch.autograd.grad(y, leaves, grad)
    if out is not None:
        dx = out.copy_(dx)
    return dx, torch.stack([dw, db]), None, None, None


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """Take the (h, skip) path on the CPU, with reference stand-ins for the kernels."""
    monkeypatch.setattr(decoder_entry, "norm_forward", reference_forward)
    monkeypatch.setattr(decoder_entry, "norm_backward", reference_backward)
    monkeypatch.setattr(decoder_entry, "concat_fused_wanted", lambda x, skip: True)


def _layout(t: torch.Tensor) -> torch.Tensor:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.ndim)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _entry_layers(dims: int, channels: int, out_channels: int, groups: int):
    torch.manual_seed(0)
    norm = normalization(channels, groups, EPS)
    projection = conv_nd(dims, channels, out_channels, 1)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm, projection


@pytest.mark.usefixtures("stand_in_kernels")
@pytest.mark.parametrize(
    ("spatial", "h_channels", "skip_channels", "groups"),
    [((11,), 12, 4, 4), ((5, 6), 8, 16, 8), ((3, 4, 5), 24, 8, 8)],
)
def test_the_entry_matches_normalizing_and_projecting_the_concatenation(
    spatial, h_channels, skip_channels, groups
):
    """Output, projection and every gradient (h, skip, norm and projection parameters),
    in 1D (contiguous), 2D and 3D (channels-last), with groups that straddle h and skip."""
    dims = len(spatial)
    norm, projection = _entry_layers(dims, h_channels + skip_channels, 8, groups)
    h = _layout(torch.randn(2, h_channels, *spatial)).requires_grad_(True)
    skip = _layout(torch.randn(2, skip_channels, *spatial) * 3 + 1).requires_grad_(True)
    params = [h, skip, norm.weight, norm.bias, projection.weight, projection.bias]

    y, residual = decoder_entry.norm_act_and_project(norm, projection, h, skip)
    cat = torch.cat([h, skip], dim=1)
    y_ref = fused.group_norm_act_reference(cat, groups, norm.weight, norm.bias, EPS)
    residual_ref = projection(cat)
    gy, gr = torch.randn_like(y_ref), torch.randn_like(residual_ref)
    grads = torch.autograd.grad([y, residual], params, [gy, gr])
    ref_grads = torch.autograd.grad([y_ref, residual_ref], params, [gy, gr])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(residual, residual_ref)
    for got, expected in zip(grads, ref_grads):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("stand_in_kernels")
def test_the_entry_keeps_h_and_skip_but_never_their_concatenation():
    norm, projection = _entry_layers(2, 24, 8, 8)
    h = _layout(torch.randn(2, 16, 6, 6)).requires_grad_(True)
    skip = _layout(torch.randn(2, 8, 6, 6)).requires_grad_(True)
    kept = []

    def keep(t):
        kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        decoder_entry.norm_act_and_project(norm, projection, h, skip)
    assert (2, 16, 6, 6) in kept and (2, 8, 6, 6) in kept
    assert (2, 24, 6, 6) not in kept
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        projection(torch.cat([h, skip], 1))  # what the concatenating path keeps
    assert (2, 24, 6, 6) in kept


@pytest.mark.usefixtures("stand_in_kernels")
@pytest.mark.parametrize("spatial", [(12,), (6, 6)])
def test_the_flop_counter_counts_what_the_concatenating_path_does(spatial):
    """The projection's input gradient, added in place, still counts (the benchmark's MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    norm, projection = _entry_layers(len(spatial), 24, 8, 8)
    h = _layout(torch.randn(2, 16, *spatial)).requires_grad_(True)
    skip = _layout(torch.randn(2, 8, *spatial)).requires_grad_(True)
    counts = []
    for pair in (True, False):
        with FlopCounterMode(display=False) as counter:
            if pair:
                y, residual = decoder_entry.norm_act_and_project(norm, projection, h, skip)
            else:
                cat = torch.cat([h, skip], 1)
                y = fused.group_norm_act_reference(cat, 8, norm.weight, norm.bias, EPS)
                residual = projection(cat)
            (y.sum() + residual.square().sum()).backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_only_a_plain_biased_1x1_convolution_without_hooks_and_an_affine_norm_take_the_pair():
    norm, projection = _entry_layers(2, 24, 8, 8)
    assert decoder_entry.takes_pair(norm, projection)
    assert not decoder_entry.takes_pair(norm, torch.nn.Identity())
    assert not decoder_entry.takes_pair(norm, conv_nd(2, 24, 8, 3, padding=1))
    assert not decoder_entry.takes_pair(norm, conv_nd(2, 24, 8, 1, bias=False))
    assert not decoder_entry.takes_pair(torch.nn.GroupNorm(8, 24, affine=False), projection)
    assert not decoder_entry.takes_pair(norm, conv_nd(2, 24, 8, 1, stride=2))
    projection.register_forward_hook(lambda module, args, out: None)
    assert not decoder_entry.takes_pair(norm, projection)  # a hook must see the call


def test_cpu_tensors_concatenate():
    """Without the kernels (a CPU, no interpreter) the ResBlock concatenates as before."""
    x, skip = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    assert decoder_entry.concat_fused_wanted(x, skip) == triton_runtime.interpreting()


@pytest.mark.usefixtures("stand_in_kernels")
@pytest.mark.parametrize("scale_shift", [False, True])
def test_an_accelerated_resblock_given_the_skip_matches_the_plain_one_given_the_concatenation(
    scale_shift, monkeypatch
):
    """In float64, so that only a wrong result, not the order of the sums, shows."""
    options = {"use_scale_shift_norm": scale_shift, "norm_groups": 8, "zero_init": False}
    plain = ResBlock(2, 24, 8, 16, **options).double()
    block = AcceleratedResBlock(2, 24, 8, 16, **options).double()
    block.load_state_dict(plain.state_dict())
    h = _layout(torch.randn(2, 16, 6, 6, dtype=torch.float64)).requires_grad_(True)
    skip = _layout(torch.randn(2, 8, 6, 6, dtype=torch.float64)).requires_grad_(True)
    emb = torch.randn(2, 16, dtype=torch.float64)
    expected = plain(torch.cat([h, skip], 1), emb)
    ref_grads = torch.autograd.grad(expected.square().sum(), [h, skip, *plain.parameters()])
    taken = []
    monkeypatch.setattr(
        decoder_entry, "concat_fused_wanted", lambda x, s: taken.append(x.shape) or True
    )
    got = block(h, emb, skip)
    grads = torch.autograd.grad(got.square().sum(), [h, skip, *block.parameters()])
    assert taken
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("stand_in_kernels")
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_a_unet_whose_decoder_takes_the_pairs_trains_as_one_that_concatenates(
    use_checkpoint, monkeypatch
):
    config = small_config("ddpm-cifar10").replace(dropout=0.0, use_checkpoint=use_checkpoint)
    torch.manual_seed(0)
    model = accelerate(UNet(config)).train()
    x, kwargs = example_inputs(config, batch=2)
    calls = []
    pair = decoder_entry.norm_act_and_project
    monkeypatch.setattr(
        decoder_entry, "norm_act_and_project", lambda *args: calls.append(1) or pair(*args)
    )
    results = []
    for wanted in (True, False):
        monkeypatch.setattr(decoder_entry, "concat_fused_wanted", lambda x, s, w=wanted: w)
        model.zero_grad()
        out = model(x, **kwargs)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    skips = sum(
        1 for block in model.output_blocks for layer in block[:1] if isinstance(layer, ResBlock)
    )
    assert len(calls) == skips * (2 if use_checkpoint else 1)  # checkpoints recompute
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for g, r in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


# --- the kernels under Triton's interpreter (run by `test_kernels_under_the_interpreter`) -------

#: One kernel each way (loops over several tiles: `test_fused.py`), or three.
LAUNCHES = {
    "one-kernel": settings.LaunchConfig(4096, 2, 4, 3, one_pass_elements=1 << 30),
    "three-kernel": settings.LaunchConfig(4096, 2, 4, 3, one_pass_elements=0),
}


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize(
    ("spatial", "h_channels", "skip_channels", "groups"),
    [((5, 6), 8, 16, 8), ((3, 4, 5), 24, 8, 8), ((13,), 12, 4, 4)],
)
def interpreted_the_entry_matches_float64(spatial, h_channels, skip_channels, groups, launch):
    """Output, projection and every gradient, groups straddling h and skip; and the input
    gradient written over its input equals the one written elsewhere."""
    settings.NORM_LAUNCH = LAUNCHES[launch]
    norm, projection = _entry_layers(len(spatial), h_channels + skip_channels, 8, groups)
    h = _layout(torch.randn(2, h_channels, *spatial)).requires_grad_(True)
    skip = _layout(torch.randn(2, skip_channels, *spatial) * 3 + 1).requires_grad_(True)
    assert decoder_entry.concat_fused_wanted(h, skip)
    params = [h, skip, norm.weight, norm.bias, projection.weight, projection.bias]
    y, residual = decoder_entry.norm_act_and_project(norm, projection, h, skip)
    ref = [p.detach().double().requires_grad_(True) for p in params]
    cat = torch.cat(ref[:2], 1)
    y_ref = fused.group_norm_act_reference(cat, groups, ref[2], ref[3], EPS)
    r_ref = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)](cat, ref[4], ref[5])
    gy, gr = torch.randn_like(y_ref), torch.randn_like(r_ref)
    grads = torch.autograd.grad([y, residual], params, [gy.float(), gr.float()])
    ref_grads = torch.autograd.grad([y_ref, r_ref], ref, [gy, gr])
    for got, expected in zip([y, residual, *grads], [y_ref, r_ref, *ref_grads], strict=True):
        assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5

    x = _layout(torch.cat([h, skip], 1).detach())
    none = x.new_zeros(0)
    stats = fused.launchers.forward(
        x, norm.weight, norm.bias, none, none, none, groups, EPS, False, True
    )
    operands = (x, norm.weight, norm.bias, none, none, none, *stats[1:], groups, False, True)
    g = torch.randn_like(x)
    apart = fused.launchers.backward(g, *operands)[0]
    inside = x.clone()
    fused.launchers.backward(g, inside, *operands[1:], out=inside)
    assert torch.equal(apart, inside)


@pytest.mark.gpu
def test_the_3d_models_first_full_resolution_decoder_block_takes_the_pair_on_gpu():
    """At the defaults: the 3D benchmark model's (4 × (128 + 64) × 64³, bf16) is where the
    checkpointed peak was; a concatenation below 2^24 elements keeps the reference path."""
    h = torch.empty(4, 128, 64, 64, 64, device="cuda", dtype=torch.bfloat16)
    skip = torch.empty(4, 64, 64, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert decoder_entry.concat_fused_wanted(h, skip)
    assert not decoder_entry.concat_fused_wanted(h[:1, :, :16], skip[:1, :, :16])
    assert not decoder_entry.concat_fused_wanted(h, skip.float())


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("spatial", "h_channels", "skip_channels", "groups"),
    [((17, 9), 64, 32, 32), ((7, 6, 5), 40, 24, 8), ((1000,), 24, 24, 8), ((64, 64), 256, 128, 32)],
)
@pytest.mark.parametrize("launch", ["shipped", "three-kernel"])
def test_the_entry_matches_the_concatenation_on_gpu_bf16(
    spatial, h_channels, skip_channels, groups, launch
):
    """Under bf16 autocast, as the model runs it; the in-place input gradient included."""
    if launch == "three-kernel":
        settings.NORM_LAUNCH = settings.LaunchConfig(2048, 4, 4, 3, one_pass_elements=0)
    settings.FUSED_EAGER_MIN_ELEMENTS = 0
    device = torch.device("cuda")
    norm, projection = _entry_layers(len(spatial), h_channels + skip_channels, 32, groups)
    norm, projection = norm.to(device), projection.to(device)
    h = _layout(torch.randn(3, h_channels, *spatial, device=device, dtype=torch.bfloat16))
    skip = _layout(
        torch.randn(3, skip_channels, *spatial, device=device, dtype=torch.bfloat16) * 2 + 1
    )
    h.requires_grad_(True)
    skip.requires_grad_(True)
    assert decoder_entry.concat_fused_wanted(h, skip)
    params = [h, skip, norm.weight, norm.bias, projection.weight, projection.bias]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, residual = decoder_entry.norm_act_and_project(norm, projection, h, skip)
    ref = [p.detach().float().requires_grad_(True) for p in params]
    cat = torch.cat(ref[:2], 1)
    y_ref = fused.group_norm_act_reference(cat, groups, ref[2], ref[3], EPS)
    r_ref = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)](cat, ref[4], ref[5])
    gy, gr = torch.randn_like(y_ref), torch.randn_like(r_ref)
    grads = torch.autograd.grad([y, residual], params, [gy.bfloat16(), gr.bfloat16()])
    ref_grads = torch.autograd.grad([y_ref, r_ref], ref, [gy, gr])
    for got, expected in zip([y, residual, *grads], [y_ref, r_ref, *ref_grads]):
        assert got.shape == expected.shape
        assert (
            got.float() - expected
        ).abs().max().item() <= 3e-2 * expected.abs().max().item() + 1e-3
