"""Noise schedules: tables against diffusers' and the papers' formulas, step plans, noise levels."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the reference implementation (pip install -e '.[dev]')")
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from diffunet.diffusion import SCHEDULES, Diffusion, NoiseSchedule
from test_diffusion_exact import cosine_table, linear_table, sigmoid_table


@pytest.mark.parametrize(
    ("ours", "theirs"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]
)
def test_tables_match_diffusers(ours, theirs):
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).alphas_cumprod
    # diffusers keeps float32 tables; ours are float64.
    torch.testing.assert_close(
        NoiseSchedule.create(ours).alphas_cumprod, reference.double(), atol=1e-6, rtol=0
    )


def test_scaled_linear_is_stable_diffusions_table():
    """Stable Diffusion's scheduler config (diffusers' "scaled_linear", β from 0.00085 to 0.012)."""
    reference = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).alphas_cumprod
    ours = NoiseSchedule.create("scaled-linear").alphas_cumprod
    torch.testing.assert_close(ours, reference.double(), atol=1e-6, rtol=0)
    # fewer steps: √β's endpoints scaled by 1000 / T, as the linear table's β endpoints are
    half = NoiseSchedule.create("scaled-linear", 500).alphas_cumprod
    betas = np.linspace(math.sqrt(0.0017), math.sqrt(0.024), 500) ** 2
    torch.testing.assert_close(half, torch.tensor(np.cumprod(1 - betas)), atol=1e-12, rtol=1e-9)
    assert "scaled-linear" in SCHEDULES


@pytest.mark.parametrize(
    ("name", "formula"),
    [("linear", linear_table), ("cosine", cosine_table), ("sigmoid", sigmoid_table)],
)
@pytest.mark.parametrize("steps", [50, 1000, 4000])
def test_tables_match_the_papers_formulas(name, formula, steps):
    schedule = NoiseSchedule.create(name, steps)
    torch.testing.assert_close(
        schedule.alphas_cumprod, torch.tensor(formula(steps)), atol=1e-12, rtol=1e-9
    )
    values = schedule.alphas_cumprod
    assert values[0] > 0.99 and values[-1] < 1e-2 and (values[1:] <= values[:-1]).all()


def test_sigmoid_follows_chens_continuous_curve():
    """ᾱ_t is ᾱ((t+1)/T) of σ(end/τ) − σ((u(end−start)+start)/τ), normalised, wherever β < 0.999."""
    schedule = NoiseSchedule.create("sigmoid", 1000)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    v_start, v_end = torch.sigmoid(torch.tensor([-3.0, 3.0], dtype=torch.float64))
    curve = (v_end - torch.sigmoid(6 * u - 3)) / (v_end - v_start)
    torch.testing.assert_close(schedule.alphas_cumprod[:990], curve[:990], rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr_matches_diffusers(name):
    plain = NoiseSchedule.create(name)
    rescaled = NoiseSchedule.create(name, zero_terminal_snr=True)
    betas = diffusers_rescale(plain.betas.clone())
    reference = torch.cumprod(1 - betas, dim=0)
    torch.testing.assert_close(rescaled.alphas_cumprod, reference, atol=1e-12, rtol=0)
    assert rescaled.alphas_cumprod[-1] == 0.0 and rescaled.has_zero_terminal_snr
    assert math.isclose(rescaled.alphas_cumprod[0].item(), plain.alphas_cumprod[0].item())
    assert rescaled.snr[-1] == 0.0


def test_derived_quantities():
    schedule = NoiseSchedule.create("linear", 1000)
    ab = schedule.alphas_cumprod
    torch.testing.assert_close(
        schedule.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    )
    torch.testing.assert_close(schedule.snr, ab / (1 - ab))
    torch.testing.assert_close(schedule.sigmas, ((1 - ab) / ab).sqrt())
    assert schedule.alpha_bar(-1) == 1.0 and schedule.alpha_bar(3) == ab[3].item()


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 999, 1000])
def test_timesteps_match_diffusers_ddim(spacing, steps):
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    ours = NoiseSchedule.create("cosine").timesteps_for(steps, spacing)
    if spacing == "linspace" and steps == 1:
        assert ours == [999]  # diffusers gives [0]: one step from pure noise must start at T−1
    else:
        assert ours == scheduler.timesteps.tolist()
    assert len(set(ours)) == steps


def test_alpha_bar_at_interpolates_between_steps():
    schedule = NoiseSchedule.create("cosine", 100)
    ab = schedule.alphas_cumprod
    got = schedule.alpha_bar_at(torch.tensor([-1.0, 0.0, 10.0, 10.25, 99.0]))
    expected = torch.tensor(
        [1.0, ab[0], ab[10], 0.75 * ab[10] + 0.25 * ab[11], ab[99]], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected)


def test_continuous_noise_levels_are_uniform_between_adjacent_steps():
    schedule = NoiseSchedule.create("linear", 100)
    t = torch.full((20000,), 40)
    levels = schedule.sample_noise_levels(t, torch.Generator().manual_seed(0))
    low, high = schedule.alphas_cumprod[40].item(), schedule.alphas_cumprod[39].item()
    assert levels.min() >= low and levels.max() <= high
    u = (levels - low) / (high - low)
    # Uniform(0, 1): mean ½ and variance 1/12, within 5 standard errors.
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 20000)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / 20000)
    first = schedule.sample_noise_levels(torch.zeros(100, dtype=torch.long))
    assert (first >= schedule.alphas_cumprod[0]).all() and (first <= 1).all()


def test_custom_schedule_and_its_validation():
    table = torch.tensor(np.cumprod(1 - np.full(10, 0.2)))
    diffusion = Diffusion(NoiseSchedule(table))
    assert diffusion.num_timesteps == 10
    with pytest.raises(ValueError, match=r"timesteps=5 disagrees.*10 steps"):
        Diffusion(NoiseSchedule(table), timesteps=5)
    with pytest.raises(ValueError, match=r"non-increasing"):
        NoiseSchedule(table.flip(0))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        NoiseSchedule(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match=r"unknown noise schedule 'quadratic'.*'cosine'"):
        NoiseSchedule.create("quadratic")
    with pytest.raises(ValueError, match=r"timesteps=1 is invalid.*integer >= 2"):
        NoiseSchedule.create("cosine", 1)
