"""`settings.BATCHED_FILM`: every ResBlock's embedding projection by one GEMM computes what the
blocks' own projections do (values and gradients, checkpointed and compiled too), and the
blocks' `emb_proj` layers are then never called."""

import pytest
import torch
from torch import nn

from diffunet.accel import accelerate, film, settings
from diffunet.accel.blocks import film_layers
from diffunet.model.introspect import example_inputs, small_config
from test_blocks import (
    CASES,
    TRANSFORMER_CASES,
    assert_close_to_scale,
    forward_and_grads,
    randomized,
)


def _projection_calls(model: nn.Module) -> list[int]:
    """A list that counts the calls of every ResBlock's `emb_proj` from now on."""
    calls = []
    for block in model.modules():
        proj = getattr(block, "emb_proj", None)
        if isinstance(proj, nn.Linear):
            proj.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(("name", "dims"), CASES + TRANSFORMER_CASES[:1])
def test_one_gemm_computes_every_blocks_projection(name, dims):
    config = small_config(name, dims=dims)
    model = accelerate(randomized(config))
    x, kwargs = example_inputs(config, batch=2)
    calls = _projection_calls(model)
    with settings.override(BATCHED_FILM=False):
        want = forward_and_grads(model, x, kwargs)
    per_block = len(calls)
    with settings.override(BATCHED_FILM=True):
        got = forward_and_grads(model, x, kwargs)
    assert per_block > 1 and len(calls) == per_block  # none called with the setting on
    for g, w in zip(got, want):
        assert_close_to_scale(g, w, 1e-5)


def test_checkpointed_blocks_get_their_projections():
    config = small_config("ddpm-cifar10").replace(use_checkpoint=True)
    model = accelerate(randomized(config)).train()
    x, kwargs = example_inputs(config, batch=2)
    with settings.override(BATCHED_FILM=False):
        want = forward_and_grads(model, x, kwargs)
    with settings.override(BATCHED_FILM=True):
        got = forward_and_grads(model, x, kwargs)
    for g, w in zip(got, want):
        assert_close_to_scale(g, w, 1e-5)


def test_compiles_into_one_graph_with_the_values_of_eager():
    config = small_config("emdiffuse-aleatoric")  # scale-shift FiLM
    model = accelerate(randomized(config))
    x, kwargs = example_inputs(config, batch=2)
    with settings.override(BATCHED_FILM=True):
        want = forward_and_grads(model, x, kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = forward_and_grads(compiled, x, kwargs)
    for g, w in zip(got, want):
        assert_close_to_scale(g, w, 1e-5)


def test_the_layers_of_each_block_come_in_the_order_the_block_runs_them():
    model = accelerate(randomized(small_config("ddpm-cifar10")))
    middle = film_layers(model.middle_block)
    assert middle == [layer.emb_proj for layer in model.middle_block if hasattr(layer, "emb_proj")]
    assert len(middle) == 2
    assert film_layers(model.input_blocks[0]) == []  # the stem


def test_only_plain_layers_with_biases_of_one_dtype_are_batched():
    layers = [nn.Linear(4, 3), nn.Linear(4, 5)]
    assert film.batchable(layers)
    assert not film.batchable(layers[:1])
    assert not film.batchable([layers[0], nn.Linear(4, 5, bias=False)])
    assert not film.batchable([layers[0], nn.Linear(4, 5).double()])
    emb = torch.randn(2, 4)
    for got, layer in zip(film.project_all(emb, layers), layers):
        torch.testing.assert_close(got, layer(emb))
