"""`FlowMatching` and `EDM` proven with the exact denoiser of Gaussian data (no training).

For data x₀ ~ N(μ, s²), independently per dimension, every posterior mean is affine in the noisy
input. Written here from the Gaussian formulas, independently of diffunet:

- flow matching, x_t = (1 − t) x₀ + t ε:  with V = (1 − t)² s² + t² and r = x_t − (1 − t) μ,
  E[x₀ | x_t] = μ + (1 − t) s² r / V,  E[ε | x_t] = t r / V,  v* = E[ε | x_t] − E[x₀ | x_t],
  and the irreducible loss Var(ε − x₀ | x_t) = s² / V (per dimension);
- EDM, x = x₀ + σ ε:  D*(x; σ) = μ + s² (x − μ) / (s² + σ²), with Var(x₀ | x) = s² σ² / (s² + σ²),
  and the network that gives it through Table 1's preconditioning F* = (D* − c_skip x) / c_out.
"""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffunet
from diffunet import UNet, UNetConfig
from diffunet.diffusion import EDM, FlowMatching
from diffunet.errors import InvalidTypeError, InvalidValueError

MU = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
STD = torch.tensor([0.5, 0.35, 0.25], dtype=torch.float64)
N = 4000
SIGMAS = 5.0
SIGMA_DATA = 0.5


# ---------------------------------------------------------------------- exact models (float64)
def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v* = E[ε − x₀ | x_t] for Gaussian data; `t` `(B,)` in [0, 1]."""
    t = t.double()[:, None]
    var = (1 - t) ** 2 * STD**2 + t**2
    r = x.double() - (1 - t) * MU
    return t * r / var - (MU + (1 - t) * STD**2 * r / var)


def flow_model(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """The exact velocity as a network whose time input is t · 1000."""
    return exact_velocity(x, time.double() / 1000).to(x.dtype)


def table1(sigma):
    """Karras et al. 2022, Table 1 (EDM column): c_skip, c_out, c_in, c_noise."""
    var = sigma**2 + SIGMA_DATA**2
    log = sigma.log() if isinstance(sigma, torch.Tensor) else math.log(sigma)
    return SIGMA_DATA**2 / var, sigma * SIGMA_DATA / var**0.5, 1 / var**0.5, log / 4


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.double()[:, None]
    return MU + STD**2 * (x.double() - MU) / (STD**2 + sigma**2)


def edm_network(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    """F* with D* = c_skip x + c_out F*: the network input is c_in x, the time input ¼ ln σ."""
    sigma = torch.exp(4 * c_noise.double())
    c_skip, c_out, c_in, _ = table1(sigma[:, None])
    x = x_in.double() / c_in
    return ((exact_denoiser(x, sigma) - c_skip * x) / c_out).to(x_in.dtype)


# ---------------------------------------------------------------------- float64 reference samplers
# The update rules, written from the papers: a grid, then one step at a time. A step is a
# function of the state x and of the model; with the exact model of Gaussian data it is affine
# in x, which gives the analytic moments of (a).
def flow_grid(steps: int, shift: float) -> list[float]:
    """A uniform t grid from 1 to 0 under SD3's shift t' = shift t / (1 + (shift − 1) t)."""
    u = np.linspace(1.0, 0.0, steps + 1)
    return (shift * u / (1 + (shift - 1) * u)).tolist()


def flow_step(v, x, t, t_next, sampler):
    """Euler, or Heun's trapezoid (on every step: the velocity is defined at t = 0)."""
    x_next = x + (t_next - t) * v(x, t)
    if sampler == "heun":
        x_next = x + (t_next - t) / 2 * (v(x, t) + v(x_next, t_next))
    return x_next


def karras_grid(steps, sigma_max=80.0, sigma_min=0.002, rho=7.0) -> list[float]:
    """Karras et al. 2022, eq. (5), then σ_N = 0."""
    i = np.arange(steps)
    ramp = sigma_max ** (1 / rho) + i / (steps - 1) * (
        sigma_min ** (1 / rho) - sigma_max ** (1 / rho)
    )
    return [*(ramp**rho).tolist(), 0.0]


def churned(sigma, steps, s_churn, s_min, s_max):
    """σ̂ of Algorithm 2: γ = min(S_churn / N, √2 − 1) where σ ∈ [S_min, S_max], else 0."""
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_min <= sigma <= s_max else 0.0
    return sigma * (1 + gamma)


def edm_step(denoise, x, sigma_hat, sigma_next, sampler):
    """Algorithm 1 from σ̂ (Euler, plus Heun's correction unless σ_next = 0), or Euler alone."""
    d = (x - denoise(x, sigma_hat)) / sigma_hat
    x_next = x + (sigma_next - sigma_hat) * d
    if sampler == "heun" and sigma_next > 0:
        d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
    return x_next


# ---------------------------------------------------------------------- (a) samples match the data
def affine_moments(steps_of_x, start_var, added_var):
    """Mean and variance per dimension after a chain of steps affine in x, from N(0, start_var);
    `added_var[i]` is the variance of the noise added before step i."""
    mean, var = (
        torch.zeros(3, dtype=torch.float64),
        torch.full((3,), start_var, dtype=torch.float64),
    )
    for step, extra in zip(steps_of_x, added_var):
        var = var + extra
        offset = step(torch.zeros(1, 3, dtype=torch.float64))[0]
        slope = step(torch.ones(1, 3, dtype=torch.float64))[0] - offset
        mean, var = slope * mean + offset, slope**2 * var
    return mean, var


def flow_moments(sampler, steps, shift):
    grid = flow_grid(steps, shift)
    pairs = list(itertools.pairwise(grid))
    chain = [
        lambda x, t=t, u=u: flow_step(
            lambda y, s: exact_velocity(y, torch.full((1,), s)), x, t, u, sampler
        )
        for t, u in pairs
    ]
    return affine_moments(chain, 1.0, [0.0] * len(pairs))


def edm_moments(sampler, steps, s_churn=0.0, s_min=0.0, s_max=math.inf):
    sigmas = karras_grid(steps)
    chain, added = [], []
    for sigma, sigma_next in itertools.pairwise(sigmas):
        sigma_hat = churned(sigma, steps, s_churn, s_min, s_max)
        added.append(sigma_hat**2 - sigma**2)
        chain.append(
            lambda x, a=sigma_hat, b=sigma_next: edm_step(
                lambda y, s: exact_denoiser(y, torch.full((1,), s)), x, a, b, sampler
            )
        )
    return affine_moments(chain, sigmas[0] ** 2, added)


# Analytic discretisation error of each case, |mean − μ| / |std − s| (largest over dimensions):
# flow Euler 200 steps 0.0000 / 0.0037; flow Heun 20 (shift 3) 0.0000 / 0.0023; EDM Heun 50
# 0.0019 / 0.0030; EDM Euler 200 0.0018 / 0.0071; EDM Heun 50 with churn 0.0000 / 0.0084. EDM's
# mean error is its start, N(0, σ_max²) for N(μ, σ_max² + s²); its 18 Heun steps (the paper's
# CIFAR-10 setting) overshoot this data's std by 0.028.
ALLOWANCE = 0.01


@pytest.mark.parametrize(
    ("process", "model", "sampler", "steps", "moments"),
    [
        (FlowMatching(), flow_model, "euler", 200, lambda: flow_moments("euler", 200, 1.0)),
        (FlowMatching(shift=3.0), flow_model, "heun", 20, lambda: flow_moments("heun", 20, 3.0)),
        (EDM(), edm_network, "heun", 50, lambda: edm_moments("heun", 50)),
        (EDM(), edm_network, "euler", 200, lambda: edm_moments("euler", 200)),
        (
            EDM(S_churn=10.0, S_min=0.05, S_max=50.0),
            edm_network,
            "heun",
            50,
            lambda: edm_moments("heun", 50, 10.0, 0.05, 50.0),
        ),
    ],
    ids=["flow-euler", "flow-heun-shift3", "edm-heun", "edm-euler", "edm-heun-churn"],
)
def test_exact_model_samples_match_the_data(process, model, sampler, steps, moments):
    samples = process.sample(
        model, (N, 3), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0)
    )
    assert samples.dtype == torch.float32 and samples.shape == (N, 3)
    mean, std = samples.double().mean(0), samples.double().std(0)
    # The samples have the moments of the discretised sampler, within 5 standard errors...
    exact_mean, exact_var = moments()
    exact_std = exact_var.sqrt()
    assert ((mean - exact_mean).abs() <= SIGMAS * exact_std / math.sqrt(N)).all(), (
        mean,
        exact_mean,
    )
    assert ((std - exact_std).abs() <= SIGMAS * exact_std / math.sqrt(2 * N)).all(), (
        std,
        exact_std,
    )
    # ...which are the data's within the discretisation error.
    assert ((exact_mean - MU).abs() <= ALLOWANCE).all() and (
        (exact_std - STD).abs() <= ALLOWANCE
    ).all()
    assert ((mean - MU).abs() <= SIGMAS * STD / math.sqrt(N) + ALLOWANCE).all()
    assert ((std - STD).abs() <= SIGMAS * STD / math.sqrt(2 * N) + ALLOWANCE).all()


# ---------------------------------------------------------------------- (b) update rules, float64
def flow_test_model(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """A nonlinear velocity field (any model will do for checking the update rule)."""
    t = time.double()[:, None] / 1000
    x64 = x.double()
    return (torch.tanh(x64) * (1 + t) - 0.5 * x64 * t).to(x.dtype)


def edm_test_network(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    c = c_noise.double()[:, None]
    return (torch.tanh(x_in.double()) * (1 + 0.2 * c) + 0.1 * c).to(x_in.dtype)


def noises(shape, seed, count):
    """The noise draws a sampler makes from a CPU generator seeded `seed`, in order."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).double() for _ in range(count)]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_update_rule_matches_a_float64_reference(sampler):
    shift, steps, shape = 3.0, 2, (64, 3)
    grid = flow_grid(steps, shift)
    assert np.allclose(grid, [1.0, 0.75, 0.0])

    def v(x, t):
        return flow_test_model(x, torch.full((x.shape[0],), t * 1000, dtype=torch.float64))

    (x,) = noises(shape, 3, 1)
    for t, t_next in itertools.pairwise(grid):
        x = flow_step(v, x, t, t_next, sampler)
    flow = FlowMatching(shift=shift)
    torch.testing.assert_close(flow.default_grid(steps), torch.tensor(grid, dtype=torch.float64))
    ours = flow.sample(
        flow_test_model,
        shape,
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("sampler", "churn"), [("euler", 0.0), ("heun", 0.0), ("heun", 0.6)])
def test_edm_update_rule_matches_a_float64_reference(sampler, churn):
    # σ_max = 2 (not 80) keeps the states near 1, where float32 resolves 1e-5.
    steps, shape, s_min, s_max, s_noise, sigma_max = 3, (64, 3), 0.01, 1.5, 1.007, 2.0
    sigmas = karras_grid(steps, sigma_max)

    def denoise(x, sigma):
        c_skip, c_out, c_in, c_noise = table1(sigma)
        time = torch.full((x.shape[0],), c_noise, dtype=torch.float64)
        return c_skip * x + c_out * edm_test_network(c_in * x, time)

    # Algorithm 2 draws the start, then one noise per churned step (here only σ_1 ∈ [S_min, S_max]).
    draws = noises(shape, 5, 2 if churn else 1)
    x = sigmas[0] * draws.pop(0)
    for sigma, sigma_next in itertools.pairwise(sigmas):
        sigma_hat = churned(sigma, steps, churn, s_min, s_max)
        if sigma_hat > sigma:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * draws.pop(0)
        x = edm_step(denoise, x, sigma_hat, sigma_next, sampler)
    assert not draws
    edm = EDM(sigma_max=sigma_max, S_churn=churn, S_min=s_min, S_max=s_max, S_noise=s_noise)
    torch.testing.assert_close(
        edm.default_grid(steps), torch.tensor(sigmas, dtype=torch.float64), rtol=1e-12, atol=0
    )
    ours = edm.sample(
        edm_test_network,
        shape,
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- (c) the loss
def gaussian_data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return (MU + STD * torch.randn(n, 3, generator=generator, dtype=torch.float64)).float()


def test_flow_loss_of_the_exact_model_is_the_irreducible_loss():
    flow = FlowMatching()
    x0 = gaussian_data(N, 1)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95]).repeat(N // 5)
    per_element = STD**2 / ((1 - t.double()[:, None]) ** 2 * STD**2 + t.double()[:, None] ** 2)

    def loss(model):
        return flow.loss(model, x0, times=t, generator=torch.Generator().manual_seed(2)).item()

    exact = loss(flow_model)
    # Each squared error is Var·χ²₁: the mean's standard error is sqrt(Σ 2 Var²) / n.
    expected = per_element.mean().item()
    error = math.sqrt(2 * (per_element**2).sum().item()) / per_element.numel()
    assert abs(exact - expected) <= SIGMAS * error, (exact, expected)
    # A velocity off by δ costs δ² more, whatever t (same draws: only 2δ·mean(v* − v) varies).
    delta = 0.1
    excess = loss(lambda x, time: flow_model(x, time) + delta) - exact
    spread = 2 * delta * math.sqrt(per_element.mean().item() / per_element.numel())
    assert abs(excess - delta**2) <= SIGMAS * spread, excess


def test_edm_loss_of_the_exact_network_is_the_irreducible_loss():
    edm = EDM()
    x0 = gaussian_data(N, 1)
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 20.0]).repeat(N // 5)
    s64 = sigma.double()[:, None]
    weight = (s64**2 + SIGMA_DATA**2) / (s64 * SIGMA_DATA) ** 2  # λ(σ)
    per_element = weight * STD**2 * s64**2 / (STD**2 + s64**2)  # λ(σ) Var(x₀ | x)

    def loss(model):
        return edm.loss(model, x0, times=sigma, generator=torch.Generator().manual_seed(2)).item()

    exact = loss(edm_network)
    expected = per_element.mean().item()
    error = math.sqrt(2 * (per_element**2).sum().item()) / per_element.numel()
    assert abs(exact - expected) <= SIGMAS * error, (exact, expected)
    # λ(σ) c_out(σ)² = 1: a network output off by δ costs δ² more at every σ.
    delta = 0.1
    excess = loss(lambda x, c: edm_network(x, c) + delta) - exact
    spread = 2 * delta * math.sqrt(per_element.mean().item() / per_element.numel())
    assert abs(excess - delta**2) <= SIGMAS * spread, excess


def test_losses_match_float64_references_on_the_same_draws():
    generator = torch.Generator().manual_seed(7)
    x0 = torch.rand(5, 3, 4, generator=generator) * 2 - 1
    noise = torch.randn(5, 3, 4, generator=generator)
    x0_, eps = x0.double(), noise.double()
    # Flow matching: mean ‖F(x_t, 1000 t) − (ε − x₀)‖².
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    t_ = t.double()[:, None, None]
    x_t = (1 - t_) * x0_ + t_ * eps
    velocity = flow_test_model(x_t.flatten(1), 1000 * t.double()).reshape(x_t.shape)
    expected = (velocity - (eps - x0_)).square().mean()
    ours = FlowMatching().loss(
        lambda x, time: flow_test_model(x.flatten(1), time).reshape(x.shape),
        x0,
        noise=noise,
        times=t,
    )
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)
    # EDM: mean over samples of λ(σ) mean ‖D(x₀ + σε; σ) − x₀‖².
    sigma = torch.tensor([0.05, 0.3, 1.0, 5.0, 30.0])
    s_ = sigma.double()[:, None, None]
    c_skip, c_out, c_in, c_noise = table1(s_)
    x = x0_ + s_ * eps
    out = edm_test_network((c_in * x).flatten(1), c_noise.flatten()).reshape(x.shape)
    weight = (s_**2 + SIGMA_DATA**2) / (s_ * SIGMA_DATA) ** 2
    expected = (weight * (c_skip * x + c_out * out - x0_).square()).mean()
    ours = EDM().loss(
        lambda x, c: edm_test_network(x.flatten(1), c).reshape(x.shape),
        x0,
        noise=noise,
        times=sigma,
    )
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)


def test_training_time_distributions():
    n = 20000
    generator = torch.Generator().manual_seed(0)
    t = FlowMatching("logit_normal", m=0.5, s=0.8, shift=3.0).sample_training_times(n, generator)
    u = t.double() / (3.0 - 2.0 * t.double())  # the inverse of the shift 3t / (1 + 2t)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean() - 0.5) < SIGMAS * 0.8 / math.sqrt(n)
    assert abs(logit.std() - 0.8) < SIGMAS * 0.8 / math.sqrt(2 * n)
    t = FlowMatching("uniform").sample_training_times(n, generator)
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean() - 0.5) < SIGMAS * math.sqrt(1 / 12 / n)
    log_sigma = EDM().sample_training_times(n, generator).double().log()
    assert abs(log_sigma.mean() + 1.2) < SIGMAS * 1.2 / math.sqrt(n)
    assert abs(log_sigma.std() - 1.2) < SIGMAS * 1.2 / math.sqrt(2 * n)


# ---------------------------------------------------------------------- (d) diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_diffusers_flow_match_euler_gives_our_samples(shift):
    """diffusers' grid is not a uniform t grid: it spaces t from 1 to shift(1/1000) (its last
    training sigma) in `steps` points, shifts them again, then appends 0. `grid=` samples on it."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    steps, shape = 8, (256, 3)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for timestep in scheduler.timesteps:
        x = scheduler.step(flow_model(x, timestep.expand(shape[0])), timestep, x).prev_sample
    grid = scheduler.sigmas
    assert len(grid) == steps + 1
    ours = FlowMatching(shift=shift).sample(
        flow_model, shape, sampler="euler", grid=grid, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- interface
def small_unet(dims: int = 2, num_classes: int | None = 3) -> UNet:
    torch.manual_seed(0)
    return UNet(
        UNetConfig(
            dims=dims,
            in_channels=1,
            out_channels=1,
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            norm_groups=4,
            num_classes=num_classes,
            zero_init=False,
        )
    )


@pytest.mark.parametrize("process", [FlowMatching(cond_drop_prob=0.5), EDM(cond_drop_prob=0.5)])
def test_unet_trains_and_samples(process):
    model = small_unet()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(2):
        optimizer.zero_grad()
        x0 = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
        loss = process.loss(model, x0, labels=labels, generator=generator)
        assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
    model.eval()
    x = process.sample(model, (4, 1, 8, 8), steps=2, guidance=2.0, labels=labels)
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize("process", [FlowMatching(), EDM()])
def test_models_without_time_and_clipping(process):
    class NoTime:  # a plain U-Net: no time input at all
        config = type("Config", (), {"use_timestep": False})()

        def __call__(self, x):
            return 3.0 * x + 2.0

    x = process.sample(NoTime(), (16, 2, 4), steps=3, clip_denoised=True)
    assert x.abs().max() <= 1.0 + 1e-5
    assert torch.isfinite(process.loss(NoTime(), torch.zeros(2, 2, 4)))


def test_unet_1d_and_3d_sample():
    for dims, shape in ((1, (2, 1, 8)), (3, (1, 1, 4, 4, 4))):
        model = small_unet(dims, num_classes=None).eval()
        for process in (FlowMatching(), EDM()):
            assert torch.isfinite(process.sample(model, shape, steps=1)).all()


def test_same_seed_same_samples_and_public_names():
    a = EDM().sample(edm_network, (8, 3), steps=4, generator=torch.Generator().manual_seed(9))
    b = EDM().sample(edm_network, (8, 3), steps=4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert diffunet.FlowMatching is FlowMatching and diffunet.EDM is EDM
    assert {"FlowMatching", "EDM"} <= set(diffunet.__all__) <= set(dir(diffunet))


def identity(x, t, **kwargs):
    return x


@pytest.mark.parametrize(
    ("build", "error", "pattern"),
    [
        (lambda: FlowMatching("normal"), InvalidValueError, r"time_distribution='normal'.*uniform"),
        (lambda: FlowMatching(shift=0), InvalidValueError, r"shift=0 is invalid"),
        (lambda: FlowMatching(s="1"), InvalidTypeError, r"s must be a number"),
        (lambda: FlowMatching(cond_drop_prob=2), InvalidValueError, r"cond_drop_prob=2"),
        (lambda: EDM(sigma_min=1.0, sigma_max=0.5), InvalidValueError, r"sigma_max=0.5.*above"),
        (lambda: EDM(S_churn=-1), InvalidValueError, r"S_churn=-1"),
        (lambda: EDM(P_std=0), InvalidValueError, r"P_std=0"),
    ],
)
def test_constructor_errors_name_the_argument(build, error, pattern):
    with pytest.raises(error, match=pattern):
        build()


class Aleatoric:
    """A model with an aleatoric head (mean and log-variance channels)."""

    config = SimpleNamespace(aleatoric=True)

    def __call__(self, x, t):
        return torch.cat([x, x], dim=1)


ZEROS = torch.zeros(2, 3)


@pytest.mark.parametrize("process", [FlowMatching(), EDM()], ids=["flow", "edm"])
@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda p: p.sample(identity, (2, 3), sampler="ddim"), InvalidValueError, r"'ddim'.*\('"),
        (lambda p: p.sample(identity, (2, 3), steps=0), InvalidValueError, r"steps=0 is invalid"),
        (lambda p: p.sample(identity, (2, 3), grid=[1.0, 0.5]), InvalidValueError, r"grid is"),
        (lambda p: p.sample(identity, (2, 3), guidance=3.0), InvalidValueError, r"guidance=3.0"),
        (lambda p: p.sample(Aleatoric(), (2, 3)), InvalidValueError, r"aleatoric.*Diffusion"),
        (lambda p: p.loss(Aleatoric(), ZEROS), InvalidValueError, r"aleatoric.*Diffusion"),
        (lambda p: p.loss(identity, ZEROS, times=torch.ones(3)), InvalidValueError, r"times must"),
        (lambda p: p.loss(identity, ZEROS, times=[0.5, 0.5]), InvalidTypeError, r"times must"),
        (lambda p: p.loss(identity, ZEROS, noise=torch.zeros(2)), InvalidValueError, r"noise has"),
    ],
)
def test_call_errors_name_the_argument(process, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(process)


def test_out_of_range_times_are_refused():
    with pytest.raises(InvalidValueError, match=r"t in \[0, 1\]"):
        FlowMatching().loss(identity, torch.zeros(2, 3), times=torch.tensor([0.5, 1.5]))
    with pytest.raises(InvalidValueError, match=r"sigma > 0"):
        EDM().loss(identity, torch.zeros(2, 3), times=torch.tensor([0.5, 0.0]))
