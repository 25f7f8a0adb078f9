"""`settings.SDPA_BACKEND`: a transformer block's attention runs the named SDPA backend first
(on a GPU: PyTorch's CPU attention ignores the order), falls through to the others where it
cannot take the shape, computes what the plain attention does, and traces into one graph."""

import pytest
import torch
from torch.profiler import profile

from diffunet.accel import settings
from diffunet.accel.blocks import AcceleratedAttention
from diffunet.model.layers.transformer import Attention

#: The ATen op each backend runs.
OPS = {
    "flash": "aten::_scaled_dot_product_flash_attention",
    "efficient": "aten::_scaled_dot_product_efficient_attention",
    "cudnn": "aten::_scaled_dot_product_cudnn_attention",
}


def _attention_and_input(device="cpu", dtype=torch.float32) -> tuple[Attention, torch.Tensor]:
    torch.manual_seed(0)
    attention = Attention(64, num_heads=2).to(device, dtype)
    attention.__class__ = AcceleratedAttention
    return attention, torch.randn(2, 10, 64, device=device, dtype=dtype)


def _ops(run) -> set[str]:
    """The names of the ops `run()` calls."""
    with profile() as prof:
        run()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("backend", [None, "math", "cudnn"])  # no cuDNN attention on a CPU
def test_any_backend_computes_the_plain_attention(backend):
    attention, x = _attention_and_input()
    with torch.no_grad():
        want = Attention.forward(attention, x)
        with settings.override(SDPA_BACKEND=backend):
            got = attention(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_traces_into_one_graph():
    attention, x = _attention_and_input()
    with torch.no_grad(), settings.override(SDPA_BACKEND="math"):
        want = attention(x)
        torch._dynamo.reset()
        got = torch.compile(attention, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", list(OPS))
def test_the_named_backend_runs_first_on_gpu(backend):
    attention, x = _attention_and_input("cuda", torch.bfloat16)
    with torch.no_grad(), settings.override(SDPA_BACKEND=backend):
        ops = _ops(lambda: attention(x))
    assert OPS[backend] in ops and not (set(OPS.values()) - {OPS[backend]}) & ops
