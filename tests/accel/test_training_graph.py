"""`CUDAGraphTraining` and the trainer's `train.cuda_graph`: replayed forward and backward passes
train exactly as eager ones, on CPU (a pass-through) and GPU."""

import warnings

import pytest
import torch
from torch import nn

from diffunet import UNet
from diffunet.accel import accelerate
from diffunet.accel.training_graph import CUDAGraphTraining
from diffunet.cli import main
from diffunet.diffusion import FlowMatching
from diffunet.model.introspect import small_config
from diffunet.training.distributed import DistInfo
from diffunet.training.run_config import RunConfigError, TrainSection
from diffunet.training.state import load_training_state
from diffunet.training.trainer import uses_training_graph


def tiny_unet(device: str = "cpu", **overrides) -> UNet:
    torch.manual_seed(0)
    return accelerate(UNet(small_config("ddpm-cifar10").replace(**overrides)).to(device))


def train_steps(model: nn.Module, net: nn.Module, steps: int, device: str, autocast: bool):
    """`steps` AdamW steps of the flow loss on fixed random batches; the losses."""
    process = FlowMatching()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator(device).manual_seed(1)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # dropout, seeded every step as the trainer does
        x0 = torch.randn(4, 3, 16, 16, device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        times = torch.rand(4, device=device, generator=generator)
        labels = torch.randint(0, 4, (4,), device=device, generator=generator)
        with torch.autocast(device, torch.bfloat16, enabled=autocast, cache_enabled=False):
            loss = process.loss(net, x0, labels=labels, noise=noise, times=times)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    return torch.stack(losses)


def test_cpu_calls_pass_through_and_attributes_are_the_models():
    model = tiny_unet(num_classes=4)
    graphed = CUDAGraphTraining(model)
    assert graphed.config is model.config and graphed.recordings == 0
    assert list(graphed.parameters()) == list(model.parameters())
    reference = tiny_unet(num_classes=4)
    eager = train_steps(reference, reference, 3, "cpu", autocast=False)
    wrapped = train_steps(model, graphed, 3, "cpu", autocast=False)
    assert torch.equal(eager, wrapped) and graphed.recordings == 0
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_the_trainer_records_uncompiled_gpu_runs_whose_communication_allows():
    gpu, cpu = DistInfo(device=torch.device("cuda", 0)), DistInfo()
    torchrun = DistInfo(rank=0, world_size=2, device=torch.device("cuda", 0))
    config = small_config("ddpm-cifar10")
    assert uses_training_graph(TrainSection(), gpu, config)
    assert not uses_training_graph(TrainSection(cuda_graph="off"), gpu, config)
    assert not uses_training_graph(TrainSection(compile=True), gpu, config)
    assert not uses_training_graph(TrainSection(), cpu, config)
    # under torchrun: with gradients all-reduced after the backward, not inside it
    assert uses_training_graph(TrainSection(), torchrun, config)
    assert not uses_training_graph(TrainSection(grad_sync="ddp"), torchrun, config)
    assert not uses_training_graph(TrainSection(parallel="fsdp"), torchrun, config)
    assert not uses_training_graph(TrainSection(), gpu, config.replace(use_checkpoint=True))
    with pytest.raises(RunConfigError, match="cuda_graph"):
        TrainSection(cuda_graph="on").validate()


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_replayed_steps_train_exactly_as_eager_ones(autocast, monkeypatch):
    # cuDNN's fastest backward kernels accumulate in a varying order: eager differs from eager
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    reference, model = tiny_unet("cuda", num_classes=4), tiny_unet("cuda", num_classes=4)
    graphed = CUDAGraphTraining(model)
    eager = train_steps(reference, reference, 6, "cuda", autocast)
    replayed = train_steps(model, graphed, 6, "cuda", autocast)
    assert graphed.recordings == 1
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.gpu
def test_a_forward_that_cannot_be_recorded_trains_eagerly_with_one_warning():
    class Syncing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * float(x.sum())  # a host sync

    model = Syncing().cuda()
    graphed = CUDAGraphTraining(model)
    x = torch.randn(2, 8, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            graphed(x).sum().backward()
    assert graphed.recordings == 0
    assert sum("could not record" in str(w.message) for w in caught) == 1
    twice = model.linear.weight.grad.clone()
    model.linear.weight.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(twice, 2 * model.linear.weight.grad)


@pytest.mark.gpu
def test_a_gpu_run_with_graphs_reaches_the_eager_runs_weights(tmp_path, capsys):
    common = ["--image-size", "8", "--batch-size", "16", "--steps", "6", "--no-eval"]
    common += ["--sample-every", "0", "--checkpoint-every", "0", "--device", "cuda"]
    common += ["model_channels=16", "norm_groups=8", "channel_mult=[1,2]", "num_res_blocks=1"]
    assert main(["train", "--out", str(tmp_path / "graphs"), *common]) == 0
    assert "CUDA graphs" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "eager"), "--no-cuda-graph", *common]) == 0
    assert "CUDA graphs" not in capsys.readouterr().err
    a = load_training_state(tmp_path / "graphs" / "train_state.pt")["model"]
    b = load_training_state(tmp_path / "eager" / "train_state.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
