"""The GPU hot paths never wait for the device: the accelerated UNet's forward and backward, a
training loss, a sampler step.

`torch.cuda.set_sync_debug_mode("error")` turns every synchronising call (`.item()`, a blocking
host → device copy, `nonzero`, ...) into an error, so these tests fail on the first one.
"""

import contextlib

import pytest
import torch

from diffunet import UNet
from diffunet.accel import accelerate
from diffunet.diffusion import Diffusion
from diffunet.model.introspect import small_config

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def model_and_inputs():
    torch.manual_seed(0)
    model = accelerate(UNet(small_config("ddpm-cifar10").replace(num_classes=4)).cuda())
    x = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    labels = torch.randint(0, 4, (4,), device="cuda")
    return model, x, t, labels


def test_forward_and_backward_do_not_sync():
    model, x, t, labels = model_and_inputs()
    model(x, t, labels=labels).sum().backward()  # warm-up: cuDNN / Triton choose their kernels
    with no_sync(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, labels=labels).float().square().mean().backward()


def test_training_loss_does_not_sync():
    model, x, t, labels = model_and_inputs()
    diffusion = Diffusion("cosine", 1000, "v", min_snr_gamma=5.0, cond_drop_prob=0.1)
    noise = torch.randn_like(x)
    generator = torch.Generator("cuda").manual_seed(0)
    diffusion.loss(
        model, x, labels=labels, timesteps=t, noise=noise, generator=generator
    ).backward()
    with no_sync():
        diffusion.loss(
            model, x, labels=labels, timesteps=t, noise=noise, generator=generator
        ).backward()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_sampling_does_not_sync(sampler):
    model, _, _, labels = model_and_inputs()
    model.eval()
    diffusion = Diffusion("linear", 1000, "eps")
    kwargs = dict(
        sampler=sampler, steps=4, guidance=2.0, labels=labels, progress=False, cuda_graph=False
    )
    diffusion.sample(
        model, (4, 3, 16, 16), generator=torch.Generator("cuda").manual_seed(0), **kwargs
    )
    with no_sync():
        diffusion.sample(
            model, (4, 3, 16, 16), generator=torch.Generator("cuda").manual_seed(0), **kwargs
        )


def test_noise_level_loss_with_a_cpu_generator_does_not_sync():
    """EMDiffuse's continuous noise levels, drawn on the host as the Trainer does."""
    torch.manual_seed(0)
    model = accelerate(UNet(small_config("emdiffuse")).cuda())
    x = torch.randn(4, 1, 16, 16, device="cuda")
    cond = torch.randn(4, 1, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    diffusion = Diffusion("linear", 1000, "x0")

    def loss():
        generator = torch.Generator().manual_seed(0)
        return diffusion.loss(
            model, x, cond=cond, timesteps=t, noise=torch.randn_like(x), generator=generator
        )

    loss().backward()
    with no_sync():
        loss().backward()
