"""The diffusion layer driving real (small) diffunet U-Nets: loss, backward, sampling, guidance."""

import pytest
import torch

pytest.importorskip("diffusers", reason="the reference implementation (pip install -e '.[dev]')")
from diffusers import DDIMScheduler

from diffunet import UNet
from diffunet.diffusion import Diffusion
from diffunet.model.introspect import small_config


def finite_gradients(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return all(g is not None and torch.isfinite(g).all() for g in grads) and any(
        g.abs().sum() > 0 for g in grads
    )


@pytest.fixture(scope="module")
def cifar():
    torch.manual_seed(0)
    return UNet(small_config("ddpm-cifar10"))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_backward_and_sampling_with_a_unet(cifar, prediction):
    diffusion = Diffusion("cosine", 100, prediction=prediction, min_snr_gamma=5.0)
    cifar.train()
    cifar.zero_grad()
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    loss = diffusion.loss(cifar, x0, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert finite_gradients(cifar)
    cifar.eval()
    for sampler in ("ddpm", "ddim", "dpm++"):
        x = diffusion.sample(
            cifar,
            (2, 3, 8, 8),
            sampler=sampler,
            steps=3,
            progress=False,
            generator=torch.Generator().manual_seed(1),
        )
        assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.abs().max() <= 1.0 + 1e-6


def test_loss_is_float32_under_bf16_autocast(cifar):
    diffusion = Diffusion("cosine", 100)
    cifar.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion.loss(cifar, torch.rand(2, 3, 8, 8) * 2 - 1)
    assert loss.dtype == torch.float32
    loss.backward()


def test_diffusers_ddim_gives_the_same_samples_as_ours_on_a_unet(cifar):
    cifar.eval()
    diffusion = Diffusion("linear", 1000, clip_denoised=False)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    ours = diffusion.sample(
        cifar, (2, 3, 8, 8), steps=10, progress=False, generator=torch.Generator().manual_seed(4)
    )
    theirs = diffusion.sample(
        cifar,
        (2, 3, 8, 8),
        sampler=scheduler,
        steps=10,
        progress=False,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(
        theirs, ours, atol=1e-5, rtol=1e-5
    )  # untrained: values in the hundreds


def test_aleatoric_noise_level_model_with_image_cond():
    torch.manual_seed(0)
    model = UNet(small_config("emdiffuse-aleatoric"))
    assert model.config.time_embed_type == "noise_level" and model.config.aleatoric
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[1]), with_kwargs=True)
    diffusion = Diffusion("linear", 200, prediction="eps")
    target, cond = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    loss = diffusion.loss(model, target, cond=cond, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert finite_gradients(model)
    assert seen[0].dtype == torch.float32 and seen[0].min() > 0 and seen[0].max() < 1
    model.eval()
    seen.clear()
    x = diffusion.sample(model, (2, 1, 16, 16), cond=cond, steps=4, sampler="dpm++", progress=False)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    table = diffusion.schedule.alphas_cumprod
    steps = diffusion.schedule.timesteps_for(4)
    torch.testing.assert_close(
        torch.stack([s[0] for s in seen]).double(), table[steps].float().double()
    )


def test_class_and_context_guidance_with_unets():
    torch.manual_seed(0)
    labelled = UNet(small_config("ddpm-cifar10").replace(num_classes=4)).eval()
    diffusion = Diffusion("cosine", 100, cond_drop_prob=0.2)
    labels = torch.tensor([0, 3])
    labelled.train()
    diffusion.loss(labelled, torch.rand(2, 3, 8, 8), labels=labels).backward()
    labelled.eval()
    x = diffusion.sample(
        labelled, (2, 3, 8, 8), labels=labels, guidance=3.0, steps=3, progress=False
    )
    assert x.shape == (2, 3, 8, 8)

    text = UNet(small_config("text-unet")).eval()
    context = torch.randn(2, 5, text.config.context_dim)
    x = diffusion.sample(
        text, (2, 3, 8, 8), context=context, guidance=2.0, steps=2, sampler="dpm++", progress=False
    )
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


@pytest.mark.gpu
def test_one_seed_gives_the_same_samples_on_cpu_and_cuda():
    from diffunet.apps.restoration import restore

    torch.manual_seed(0)
    model = UNet(small_config("ddpm-cifar10")).eval()
    diffusion = Diffusion("cosine", 100, prediction="v")
    kwargs = dict(steps=5, eta=1.0, progress=False)
    on_cpu = diffusion.sample(
        model, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0), **kwargs
    )
    model.cuda()
    on_gpu = diffusion.sample(
        model, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)  # TF32 / kernels differ
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = diffusion.loss(model, torch.rand(4, 3, 8, 8, device="cuda") * 2 - 1)
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    loss.backward()

    torch.manual_seed(0)
    restorer = UNet(small_config("emdiffuse-aleatoric")).cuda().eval()
    image = torch.rand(1, 1, 20, 28)
    result = restore(
        restorer,
        Diffusion("linear", 100),
        image,
        num_samples=2,
        tile_size=16,
        overlap=4,
        steps=2,
        progress=False,
    )
    assert result.mean.device.type == "cpu" and result.mean.shape == image.shape
