"""Samplers: exact agreement with diffusers' schedulers, guidance, conditioning, seeds, progress."""

import pytest
import torch

pytest.importorskip("diffusers", reason="the reference implementation (pip install -e '.[dev]')")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffunet.diffusion import Denoiser, Diffusion
from test_diffusion_exact import MIX_COVS, MIX_MEANS, MIX_WEIGHTS, ExactDenoiser

T = 1000


def mixture(diffusion: Diffusion, prediction: str = "eps") -> ExactDenoiser:
    """The exact (nonlinear) denoiser of a two-Gaussian mixture on this diffusion's schedule."""
    table = diffusion.schedule.alphas_cumprod.numpy()
    return ExactDenoiser(MIX_WEIGHTS, MIX_MEANS, MIX_COVS, table, prediction)


def sample(diffusion, model, sampler, steps, eta=0.0, seed=0, n=512):
    return diffusion.sample(
        model,
        (n, 2),
        sampler=sampler,
        steps=steps,
        eta=eta,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )


# ---------------------------------------------------------------------- against diffusers
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_matches_diffusers_ddim_scheduler(spacing, eta, prediction):
    ours = Diffusion(
        "cosine", T, prediction=prediction, clip_denoised=False, timestep_spacing=spacing
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
    )
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), ours.schedule.alphas_cumprod, atol=1e-6, rtol=0
    )
    model = mixture(ours, prediction)
    expected = sample(ours, model, "ddim", 50, eta)
    got = sample(ours, model, scheduler, 50, eta)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_ddpm_matches_diffusers_ddpm_scheduler():
    ours = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    model = mixture(ours)
    for steps in (T, 100):
        scheduler = DDPMScheduler(
            num_train_timesteps=T,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=False,
            timestep_spacing="trailing",
            variance_type="fixed_small",
        )
        expected = sample(ours, model, "ddpm", steps, n=256)
        got = sample(ours, model, scheduler, steps, n=256)
        torch.testing.assert_close(got, expected, atol=5e-4, rtol=0)


@pytest.mark.parametrize("steps", [10, 20, 25])
def test_dpm_solver_pp_matches_diffusers_multistep(steps):
    ours = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    model = mixture(ours)
    got, expected = sample(ours, model, scheduler, steps), sample(ours, model, "dpm++", steps)
    # diffusers works with float32 σ up to 2·10⁴ here, hence the looser elementwise bound.
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    assert (got - expected).abs().mean() < 1e-4


def test_scheduler_with_another_prediction_type_gets_converted_outputs():
    """A v-prediction scheduler driving an eps model: the adapter converts ε̂ to v̂."""
    ours = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    scheduler = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    model = mixture(ours)
    torch.testing.assert_close(
        sample(ours, model, scheduler, 25), sample(ours, model, "ddim", 25), atol=2e-4, rtol=0
    )


def test_scheduler_with_another_schedule_warns():
    ours = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
    with pytest.warns(UserWarning, match="alphas_cumprod differ"):
        sample(ours, mixture(ours), scheduler, 5, n=4)


def test_ddpm_equals_ddim_with_eta_one():
    """DDIM with η = 1 has DDPM's posterior mean and variance: same samples for the same seed."""
    diffusion = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    model = mixture(diffusion)
    for steps in (T, 37):
        torch.testing.assert_close(
            sample(diffusion, model, "ddpm", steps, n=256),
            sample(diffusion, model, "ddim", steps, eta=1.0, n=256),
            atol=1e-4,
            rtol=0,
        )


# ---------------------------------------------------------------------- guidance
class ToyConditional:
    """A conditional "model" whose output depends on labels and context in a known way."""

    null_label = 5

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, *, context=None, labels=None, cond=None):
        self.batches.append(x.shape[0])
        out = 0.5 * x + 0.01 * t.float().reshape(-1, *[1] * (x.ndim - 1)) / 1000
        if labels is not None:
            out = out + 0.1 * labels.float().reshape(-1, *[1] * (x.ndim - 1))
        if context is not None:
            out = out + context.mean(dim=(1, 2)).reshape(-1, *[1] * (x.ndim - 1))
        if cond is not None:
            out = out + 0.2 * cond
        return out


def test_guidance_scales_one_and_zero_are_conditional_and_unconditional():
    model = ToyConditional()
    x = torch.randn(4, 3, 8)
    t = torch.full((4,), 500)
    ab = torch.full((4,), 0.3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    context = torch.randn(4, 6, 7)
    cond_out = model(x, t, labels=labels, context=context)
    uncond_out = model(x, t, labels=torch.full_like(labels, 5), context=torch.zeros_like(context))
    assert not torch.allclose(cond_out, uncond_out)

    def guided(scale):
        model.batches.clear()
        out = Denoiser(model, "eps", labels=labels, context=context, guidance=scale).output(
            x, t, ab
        )
        return out, list(model.batches)

    out, batches = guided(1.0)
    torch.testing.assert_close(out, cond_out, rtol=0, atol=0)
    assert batches == [4]
    out, batches = guided(0.0)
    torch.testing.assert_close(out, uncond_out, rtol=0, atol=0)
    assert batches == [4]
    out, batches = guided(3.0)
    torch.testing.assert_close(out, uncond_out + 3.0 * (cond_out - uncond_out))
    assert batches == [8]  # both passes in one forward


def test_guided_sampling_uses_one_batched_forward_per_step():
    diffusion = Diffusion("cosine", 100)
    model = ToyConditional()
    labels = torch.tensor([1, 2])
    g = torch.Generator().manual_seed(3)
    conditional = diffusion.sample(
        model, (2, 1, 4), steps=10, labels=labels, generator=g, progress=False
    )
    assert model.batches == [2] * 10
    model.batches.clear()
    g = torch.Generator().manual_seed(3)
    null = diffusion.sample(
        model, (2, 1, 4), steps=10, labels=torch.full((2,), 5), generator=g, progress=False
    )
    g = torch.Generator().manual_seed(3)
    unconditional = diffusion.sample(
        model, (2, 1, 4), steps=10, labels=labels, guidance=0.0, generator=g, progress=False
    )
    torch.testing.assert_close(unconditional, null, rtol=0, atol=0)
    assert not torch.allclose(conditional, unconditional)
    model.batches.clear()
    diffusion.sample(model, (2, 1, 4), steps=10, labels=labels, guidance=4.0, progress=False)
    assert model.batches == [4] * 10


def test_image_cond_is_fixed_and_never_dropped_by_guidance():
    seen = []

    class Recorder(ToyConditional):
        def __call__(self, x, t, **kwargs):
            seen.append((kwargs["cond"].clone(), kwargs["labels"].clone()))
            return super().__call__(x, t, **kwargs)

    cond = torch.randn(2, 1, 6)
    Diffusion("cosine", 50).sample(
        Recorder(),
        (2, 1, 6),
        steps=5,
        cond=cond,
        labels=torch.tensor([0, 1]),
        guidance=2.0,
        progress=False,
    )
    assert len(seen) == 5
    for c, labels in seen:
        torch.testing.assert_close(c, torch.cat([cond, cond]), rtol=0, atol=0)
        assert labels.tolist() == [0, 1, 5, 5]


# ---------------------------------------------------------------------- randomness, progress
def test_same_seed_same_samples_and_cpu_noise():
    diffusion = Diffusion("cosine", 100)
    model = ToyConditional()
    a = diffusion.sample(
        model,
        (3, 2, 5),
        sampler="ddim",
        eta=0.5,
        steps=8,
        generator=torch.Generator().manual_seed(7),
        progress=False,
    )
    b = diffusion.sample(
        model,
        (3, 2, 5),
        sampler="ddim",
        eta=0.5,
        steps=8,
        generator=torch.Generator().manual_seed(7),
        progress=False,
    )
    c = diffusion.sample(
        model,
        (3, 2, 5),
        sampler="ddim",
        eta=0.5,
        steps=8,
        generator=torch.Generator().manual_seed(8),
        progress=False,
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert a.dtype == torch.float32


def test_first_noise_comes_from_the_generator():
    """The first model input is x_T = torch.randn(shape, generator) drawn on the CPU."""
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)

    Diffusion("cosine", 100, prediction="x0").sample(
        model,
        (2, 3, 4),
        sampler="ddim",
        steps=2,
        generator=torch.Generator().manual_seed(11),
        progress=False,
    )
    expected = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_progress_bar_can_be_turned_off(capsys):
    diffusion = Diffusion("cosine", 100)
    diffusion.sample(ToyConditional(), (1, 1, 4), steps=3, progress=True)
    assert "sampling (ddim)" in capsys.readouterr().err
    diffusion.sample(ToyConditional(), (1, 1, 4), steps=3, progress=False)
    assert capsys.readouterr().err == ""


def test_clipping_keeps_x0_in_data_range():
    def wild(x, t):
        return 5.0 * torch.ones_like(x)  # an x₀ prediction far outside [-1, 1]

    clipped = Diffusion("cosine", 100, prediction="x0").sample(
        wild, (2, 3), steps=5, progress=False
    )
    torch.testing.assert_close(clipped, torch.ones(2, 3))
    free = Diffusion("cosine", 100, prediction="x0", clip_denoised=False).sample(
        wild, (2, 3), steps=5, progress=False
    )
    torch.testing.assert_close(free, 5.0 * torch.ones(2, 3))
