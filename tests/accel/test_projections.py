"""`settings.BATCHED_FILM` and `settings.BATCHED_QKV`: in compiled graphs, linear layers of one
input computed by one GEMM (every ResBlock's embedding projection; an attention's queries, keys
and values) give what the layers give in eager mode (values and gradients, checkpointed too),
and the traced graph holds one linear layer where it held several."""

import pytest
import torch
from torch import nn

from diffunet.accel import accelerate, projections, settings
from diffunet.accel.blocks import AcceleratedAttention, film_layers
from diffunet.model.introspect import example_inputs, small_config
from diffunet.model.layers.transformer import Attention
from test_blocks import (
    CASES,
    assert_close_to_scale,
    forward_and_grads,
    randomized,
)

# Additive and scale-shift FiLM.
FILM_CASES = [CASES[0], CASES[1]]


def _two_levels(name: str, dims: int = 2):
    """`small_config(name, dims)` cut to two levels of one block each: every kind of block the
    preset has (down, middle, up, attention where it has one) in a quicker Dynamo trace."""
    config = small_config(name, dims=dims)
    return config.replace(channel_mult=config.channel_mult[:2], num_res_blocks=1)


def _traced(model: nn.Module, *args, **kwargs) -> tuple[nn.Module, int]:
    """`model` compiled with a backend that runs Dynamo's graph as it is (no AOT tracing, fast),
    after one call on `args` and `kwargs`, and the count of linear layers in that graph."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(*args, **kwargs)
    return compiled, sum(n.target is torch._C._nn.linear for g in graphs for n in g.graph.nodes)


def _linear_calls(model: nn.Module, x: torch.Tensor, kwargs: dict) -> int:
    """How many linear layers an eager forward of `model` calls."""
    calls = []
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in linears]
    with torch.no_grad():
        model(x, **kwargs)
    for hook in hooks:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize(("name", "dims"), FILM_CASES)
def test_one_gemm_computes_every_blocks_projection_in_compiled_graphs(name, dims):
    config = _two_levels(name, dims)
    model = accelerate(randomized(config))
    x, kwargs = example_inputs(config, batch=2)
    blocks = [*model.input_blocks, model.middle_block, *model.output_blocks]
    projections = sum(len(film_layers(block)) for block in blocks)
    assert projections > 1
    per_block = _linear_calls(model, x, kwargs)  # eager: every block's own layer
    with settings.override(BATCHED_FILM=True):
        compiled, batched = _traced(model, x, **kwargs)
        want = forward_and_grads(model, x, kwargs)  # eager: the blocks' own layers
        got = forward_and_grads(compiled, x, kwargs)
    assert batched == per_block - projections + 1
    for g, w in zip(got, want):
        assert_close_to_scale(g, w, 1e-5)


@pytest.mark.parametrize("inference", [False, True])
def test_graphs_without_gradients_batch_the_projections_per_level_or_not_at_all(inference):
    """`settings.BATCHED_FILM_INFERENCE` decides for no-grad graphs, `BATCHED_FILM` for the
    others. Without gradients one GEMM serves the encoder and middle and one each decoder
    level, so no level's projections outlive it into the last level, where the peak is."""
    config = _two_levels("ddpm-cifar10")
    model = accelerate(randomized(config)).eval()
    x, kwargs = example_inputs(config, batch=2)
    blocks = [*model.input_blocks, model.middle_block, *model.output_blocks]
    projections = sum(len(film_layers(block)) for block in blocks)
    per_block = _linear_calls(model, x, kwargs)
    levels = len(config.channel_mult)
    with settings.override(BATCHED_FILM=True, BATCHED_FILM_INFERENCE=inference):
        with torch.no_grad():
            compiled, without_gradients = _traced(model, x, **kwargs)
            want = model(x, **kwargs)
            got = compiled(x, **kwargs)
        _, with_gradients = _traced(model, x, **kwargs)
    batched = per_block - projections + 1
    assert with_gradients == batched
    assert without_gradients == (batched + levels if inference else per_block)
    assert_close_to_scale(got, want, 1e-5)


def test_checkpointed_blocks_get_their_projections():
    config = _two_levels("ddpm-cifar10").replace(use_checkpoint=True)
    model = accelerate(randomized(config)).train()
    x, kwargs = example_inputs(config, batch=2)
    with settings.override(BATCHED_FILM=True):
        want = forward_and_grads(model, x, kwargs)
        compiled, _ = _traced(model, x, **kwargs)
        got = forward_and_grads(compiled, x, kwargs)
    for g, w in zip(got, want):
        assert_close_to_scale(g, w, 1e-5)


def test_the_layers_of_each_block_come_in_the_order_the_block_runs_them():
    model = accelerate(randomized(small_config("ddpm-cifar10")))
    middle = film_layers(model.middle_block)
    assert middle == [layer.emb_proj for layer in model.middle_block if hasattr(layer, "emb_proj")]
    assert len(middle) == 2
    assert film_layers(model.input_blocks[0]) == []  # the stem


def test_only_layers_of_one_input_width_dtype_and_bias_kind_are_batched():
    layers = [nn.Linear(4, 3), nn.Linear(4, 5)]
    assert projections.batchable(layers)
    assert not projections.batchable(layers[:1])
    assert not projections.batchable([layers[0], nn.Linear(4, 5, bias=False)])
    assert projections.batchable([nn.Linear(4, 3, bias=False), nn.Linear(4, 5, bias=False)])
    assert not projections.batchable([layers[0], nn.Linear(6, 5)])
    assert not projections.batchable([layers[0], nn.Linear(4, 5).double()])
    emb = torch.randn(2, 4)
    for got, layer in zip(projections.project_all(emb, layers), layers):
        torch.testing.assert_close(got, layer(emb))


@pytest.mark.parametrize("cross", [False, True])
def test_one_gemm_projects_queries_keys_and_values_in_compiled_graphs(cross):
    """Self-attention: queries, keys and values by one GEMM (4 linear layers → 2, the output's
    included); cross-attention: keys and values of the context by one (4 → 3)."""
    model = accelerate(randomized(small_config("sd15")))
    assert any(type(m) is AcceleratedAttention for m in model.modules())  # swapped in
    torch.manual_seed(0)
    attention = Attention(16, num_heads=2, context_dim=12 if cross else None)
    attention.__class__ = AcceleratedAttention
    x = torch.randn(2, 10, 16, requires_grad=True)
    context = torch.randn(2, 7, 12, requires_grad=True) if cross else None
    inputs = [x] + ([context] if cross else [])

    def run(module):
        out = module(x, context)
        grads = torch.autograd.grad(out.square().sum(), [*inputs, *attention.parameters()])
        return [out.detach(), *grads]

    want = run(attention)  # eager: the three layers
    with settings.override(BATCHED_QKV=False):
        _, per_layer = _traced(attention, x, context)
    with settings.override(BATCHED_QKV=True):
        compiled, batched = _traced(attention, x, context)
        got = run(compiled)
    assert (per_layer, batched) == (4, 3 if cross else 2)
    for g, w in zip(got, want):
        assert_close_to_scale(g, w, 1e-5)


@pytest.mark.gpu
def test_inductor_runs_both_batchings_on_gpu_in_bf16():
    """A compiled bf16 training step of a small `sd15` (FiLM and transformer attention) with
    both batchings on: Inductor's values and gradients, within bf16 rounding of the step with
    both off."""
    config = small_config("sd15")
    model = accelerate(randomized(config).cuda())
    x, kwargs = example_inputs(config, batch=2, device="cuda")

    def step(on):
        with settings.override(BATCHED_FILM=on, BATCHED_QKV=on):
            torch._dynamo.reset()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return forward_and_grads(torch.compile(model), x, kwargs)

    for got, want in zip(step(True), step(False)):
        assert_close_to_scale(got.float(), want.float(), 3e-2)
