"""`CUDAGraphModel` and `Diffusion.sample(cuda_graph=...)`: same results as eager, on CPU and GPU."""

import warnings

import pytest
import torch
from torch import nn

from diffunet import UNet
from diffunet.accel.cuda_graph import CACHE_ATTRIBUTE, CUDAGraphModel, release_cuda_graphs
from diffunet.diffusion import Diffusion
from diffunet.model.introspect import small_config


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(small_config("ddpm-cifar10").replace(**overrides)).eval()


def test_cpu_calls_pass_through_and_attributes_are_the_models():
    model = tiny_unet()
    graphed = CUDAGraphModel(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(graphed(x, t), model(x, t))
    assert graphed.recordings == 0
    assert graphed.config is model.config
    assert list(graphed.parameters()) == list(model.parameters())


def test_sample_with_graph_auto_on_cpu_is_the_eager_sample():
    model, diffusion = tiny_unet(), Diffusion("linear", 100)
    runs = [
        diffusion.sample(
            model,
            (2, 3, 16, 16),
            steps=3,
            progress=False,
            cuda_graph=mode,
            generator=torch.Generator().manual_seed(1),
        )
        for mode in ("auto", False)
    ]
    assert torch.equal(*runs)
    with pytest.raises(ValueError, match="cuda_graph"):
        diffusion.sample(model, (2, 3, 16, 16), steps=3, progress=False, cuda_graph="yes")


@pytest.mark.gpu
def test_graph_replays_match_eager_for_each_signature():
    model = tiny_unet(num_classes=4).cuda()
    graphed = CUDAGraphModel(model)
    outputs = []
    with torch.no_grad():
        for batch, size in ((2, 16), (3, 32), (2, 16)):
            for _ in range(2):  # a second call replays the recording with new inputs
                x = torch.randn(batch, 3, size, size, device="cuda")
                t = torch.randint(0, 1000, (batch,), device="cuda")
                labels = torch.randint(0, 4, (batch,), device="cuda")
                got = graphed(x, t, labels=labels)
                torch.testing.assert_close(got, model(x, t, labels=labels), rtol=1e-5, atol=1e-5)
                outputs.append((got, got.clone()))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x, t = torch.randn(2, 3, 16, 16, device="cuda"), torch.tensor([5, 9], device="cuda")
            labels = torch.tensor([0, 1], device="cuda")
            torch.testing.assert_close(graphed(x, t, labels=labels), model(x, t, labels=labels))
    assert graphed.recordings == 3  # (2, 16), (3, 32) and the bf16 autocast one
    for got, copy in outputs:  # later replays never overwrite results handed out earlier
        assert torch.equal(got, copy)


@pytest.mark.gpu
def test_sampling_with_and_without_graph_agree():
    model, diffusion = tiny_unet().cuda(), Diffusion("linear", 100)
    keys = set(model.state_dict())
    runs = [
        diffusion.sample(
            model,
            (2, 3, 16, 16),
            steps=5,
            sampler=sampler,
            progress=False,
            cuda_graph=mode,
            generator=torch.Generator().manual_seed(1),
        )
        for sampler in ("ddim", "dpm++")
        for mode in (True, False)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs[2], runs[3], rtol=1e-4, atol=1e-4)
    assert model.__dict__[CACHE_ATTRIBUTE].recordings == 1
    assert set(model.state_dict()) == keys  # the kept recording is no part of the weights
    release_cuda_graphs(model)
    assert CACHE_ATTRIBUTE not in model.__dict__


class HostSync(nn.Module):
    """A forward pass that reads a value back to the host, which a CUDA graph cannot record."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        return x * float(self.scale)


@pytest.mark.gpu
def test_unrecordable_model_falls_back_with_one_warning():
    graphed = CUDAGraphModel(HostSync().cuda())
    x, t = torch.randn(2, 3, device="cuda"), torch.zeros(2, device="cuda")
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="could not record"):
            assert torch.equal(graphed(x, t), x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second attempt, so no second warning
            assert torch.equal(graphed(x + 1, t), x + 1)
    assert graphed.recordings == 0
