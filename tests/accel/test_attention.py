"""`accel.attention`: heads wider than the fused kernels take, attended by GEMMs around a float32
softmax, compute what `scaled_dot_product_attention` does, values and gradients, and only for
such heads over few tokens where a gradient will flow."""

import pytest
import torch
import torch.nn.functional as F

from diffunet.accel import accelerate, settings
from diffunet.accel.attention import attention, explicit_attention, explicit_wanted
from diffunet.accel.blocks import AcceleratedSelfAttention
from diffunet.model.introspect import example_inputs, small_config
from diffunet.model.layers.attention import CrossAttention, SelfAttention
from test_blocks import _compare, _random, assert_close_to_scale, forward_and_grads, randomized


@pytest.fixture
def explicit_for_narrow_heads():
    """Explicit attention on, for heads of more than 8 channels, on the CPU too (the autouse
    `accel_settings` fixture restores the settings)."""
    settings.EXPLICIT_ATTENTION = True
    settings.EXPLICIT_ATTENTION_WIDER_THAN = 8
    settings.EXPLICIT_ATTENTION_DEVICES = frozenset({"cpu", "cuda"})


def _qkv(shape, keys, dtype=torch.float64):
    torch.manual_seed(0)
    *batch, queries, width = shape
    q = torch.randn(*batch, queries, width, dtype=dtype) * 2
    k, v = (torch.randn(*batch, keys, width, dtype=dtype) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def test_only_for_differentiated_wide_heads_over_few_tokens():
    q, k, v = _qkv((2, 1, 16, 512), keys=16)
    assert settings.EXPLICIT_ATTENTION and not explicit_wanted(q, k, v)  # CUDA's only, by default
    settings.EXPLICIT_ATTENTION_DEVICES = frozenset({"cpu"})
    assert explicit_wanted(q, k, v)  # ldm's head: 512 channels
    with torch.no_grad():
        assert not explicit_wanted(q, k, v)  # inference: the fused forward is the faster
    assert not explicit_wanted(*(t.detach() for t in (q, k, v)))
    assert explicit_wanted(q.detach(), k.detach(), v)  # any one operand's gradient will do
    narrow, narrow_keys, narrow_values = _qkv((2, 4, 16, 64), keys=16)
    assert not explicit_wanted(narrow, narrow_keys, narrow_values)  # flash attention's
    settings.EXPLICIT_ATTENTION_MAX_SCORES = 2 * 16 * 16 - 1
    assert not explicit_wanted(q, k, v)  # one score too many
    settings.EXPLICIT_ATTENTION_MAX_SCORES = 2 * 16 * 16
    settings.EXPLICIT_ATTENTION = False
    assert not explicit_wanted(q, k, v)
    with torch.no_grad():  # what the benchmarks time: the GEMMs whatever the settings
        expected = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(explicit_attention(q, k, v), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("explicit_for_narrow_heads")
@pytest.mark.parametrize(("shape", "keys"), [((2, 3, 10, 16), 10), ((2, 2, 7, 12), 5)])
def test_explicit_attention_is_sdpa_with_its_gradients(shape, keys):
    q, k, v = _qkv(shape, keys)
    assert explicit_wanted(q, k, v)
    out = attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = F.scaled_dot_product_attention(q, k, v)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("explicit_for_narrow_heads")
def test_bf16_scores_are_formed_in_float32():
    """In bf16 the scores and softmax run in float32 and only the probabilities meet `v` in
    bf16: within bf16's rounding of the float64 result, in bf16 like SDPA's output."""
    q, k, v = _qkv((2, 2, 24, 32), keys=24)
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    assert explicit_wanted(*bf16)
    out = attention(*bf16)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q, k, v).detach()
    assert_close_to_scale(out.double(), exact, 2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves its dtypes alone
        assert attention(*bf16).dtype == torch.bfloat16


@pytest.mark.usefixtures("explicit_for_narrow_heads")
def test_the_accelerated_attention_blocks_match_the_plain_ones():
    x = torch.randn(2, 16, 5, 6)
    _compare(_random(SelfAttention(16, 1, norm_groups=4, norm_eps=1e-6)), [x])
    context = torch.randn(2, 7, 10)
    cross = _random(CrossAttention(16, 10, 1, norm_groups=4, norm_eps=1e-6))
    _compare(cross, [x, context], lambda m, x, context: m(x, context))


@pytest.mark.usefixtures("explicit_for_narrow_heads")
def test_an_accelerated_unet_attends_its_wide_heads_explicitly(monkeypatch):
    """`ldm`'s topology (one head at its attention level): the accelerated model computes
    what the plain one does, and calls no fused attention for its heads."""
    config = small_config("ldm")
    model = randomized(config).train()
    x, kwargs = example_inputs(config, batch=2)
    expected = forward_and_grads(model, x, kwargs)
    accelerate(model)
    assert any(type(m) is AcceleratedSelfAttention for m in model.modules())
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: calls.append(a) or sdpa(*a))
    for got, want in zip(forward_and_grads(model, x, kwargs), expected, strict=True):
        assert_close_to_scale(got, want, 1e-5)
    assert not calls


@pytest.mark.gpu
def test_ldms_wide_head_in_bf16_on_gpu_is_as_close_to_float64_as_sdpa():
    """`ldm`'s head (512 channels over 16² positions) in bf16 on a GPU, values and gradients:
    the explicit path is within bf16's rounding of the float64 result, as SDPA's kernel is."""
    q, k, v = (t.detach().cuda() for t in _qkv((4, 1, 256, 512), keys=256))
    exact = [t.requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*exact)
    weight = torch.randn_like(out)
    expected = [out.detach(), *torch.autograd.grad((out * weight).sum(), exact)]
    for explicit in (True, False):
        settings.EXPLICIT_ATTENTION = explicit
        bf16 = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        assert explicit_wanted(*bf16) == explicit
        got = attention(*bf16)
        grads = torch.autograd.grad((got.double() * weight).sum(), bf16)
        for value, want in zip([got, *grads], expected, strict=True):
            assert_close_to_scale(value.double(), want, 2e-2)
