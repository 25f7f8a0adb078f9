"""torch.compile with dynamic shapes: one compilation serves every batch and spatial size.

The counting backend (`CompileCounter`) runs the captured graph eagerly, so these tests
check what Dynamo traced (no size baked in, no recompilation) without Inductor's cost.
"""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from diffunet import UNet
from diffunet.model.introspect import example_inputs, small_config

# (batch, spatial, context tokens). The first call's sizes differ from each other and from
# every channel count: Dynamo would otherwise unify them ("duck sizing") and specialise.
# Odd and even sizes mix, so pad_to_multiple pads some axes and not others.
CALLS = [(2, (6, 9, 7), 7), (3, (8, 5, 10), 4), (5, (11, 6, 4), 10), (4, (7, 7, 9), 5)]


def tiny_model(name: str, dims: int) -> UNet:
    config = small_config(name, dims=dims).replace(
        num_res_blocks=1,
        dropout=0.0,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        pad_to_multiple=True,
    )
    model = UNet(config).eval()
    with torch.no_grad():  # random weights everywhere, zero-initialised layers included
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def run_all_sizes(compiled, model: UNet, tolerance: float = 1e-5) -> None:
    """Call `compiled` on every size in CALLS; each output must match the eager model's."""
    config = model.config
    with torch.no_grad():
        for batch, spatial, tokens in CALLS:
            x, kwargs = example_inputs(config, batch=batch, size=spatial[: config.dims])
            if "context" in kwargs:
                kwargs["context"] = torch.randn(batch, tokens, config.context_dim)
            out = compiled(x, **kwargs)
            assert out.shape[2:] == x.shape[2:]
            torch.testing.assert_close(out, model(x, **kwargs), rtol=tolerance, atol=tolerance)


# The two families' code paths (scale-shift ResBlocks that resample, cond, noise levels; per-level
# skips, transposed upsampling, cross-attention with any number of tokens); the 3D model has
# every spatial axis symbolic, a superset of 1D and 2D.
@pytest.mark.parametrize(("name", "dims"), [("emdiffuse", 3), ("text-unet", 2)])
def test_dynamic_compile_traces_once_for_all_sizes(name, dims):
    model = tiny_model(name, dims)
    counter = CompileCounter()
    run_all_sizes(torch.compile(model, backend=counter, dynamic=True, fullgraph=True), model)
    assert counter.frame_count == 1, (
        f"{counter.frame_count} compilations for {len(CALLS)} input sizes; run with "
        "TORCH_LOGS=recompiles to see which guard failed"
    )


def test_default_compile_settles_after_one_recompile():
    # Without dynamic=True, Dynamo specialises on the first sizes and, when they change,
    # recompiles once with those sizes symbolic.
    model = tiny_model("ddpm-cifar10", 2)
    counter = CompileCounter()
    run_all_sizes(torch.compile(model, backend=counter, fullgraph=True), model)
    assert counter.frame_count == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DIFFUNET_SLOW_TESTS"),
    reason="Inductor compiles C++ for about 30 s; set DIFFUNET_SLOW_TESTS=1",
)
def test_dynamic_inductor_matches_eager_for_all_sizes():
    # Inductor lowers the symbolic padding arithmetic too (a symbolic `%` once failed here).
    model = tiny_model("emdiffuse", 2)
    torch._dynamo.reset()
    counters.clear()
    run_all_sizes(torch.compile(model, dynamic=True, fullgraph=True), model, tolerance=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
