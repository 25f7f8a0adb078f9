"""Samplers and schedules proven against the exact denoiser of known data (no training).

For data x₀ ~ N(m, Σ) the optimal predictor is affine in x_t:
    E[x₀ | x_t] = m + a Σ (a² Σ + s² I)⁻¹ (x_t − a m),   a = sqrt(ᾱ), s = sqrt(1 − ᾱ),
and for a mixture of Gaussians it is the responsibility-weighted sum of those. Wrapped as a
"model", it turns each sampler into a known stochastic map, so we check two things:

1. the samples' mean and covariance match the *analytic* moments of that sampler's
   discretisation (computed here by propagating means and variances through the update rules, in
   Σ's eigenbasis) within 5 standard errors: this catches a wrong sign, coefficient or an
   off-by-one step, which the coarse match to the data could hide;
2. those analytic moments match the data's within the sampler's discretisation error
   (:data:`ALLOWANCE`, in units of whitened covariance), so the samples match the data within
   5 standard errors + that allowance.

All schedule tables here are computed independently of diffunet, from the papers' formulas.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffunet.diffusion import Diffusion

T = 1000
N = 20000
SIGMAS = 5.0

# Whitened-covariance discretisation error each sampler is allowed on this data (its analytic
# error is 0.016, 0.11, 0.20 and 0.095: first-order DDIM and 50-step ancestral sampling shrink the
# variance of low-dimensional data noticeably; DDPM with all 1000 steps is nearly exact).
ALLOWANCE = {
    ("ddpm", 1000, 0.0): 0.02,
    ("ddim", 50, 0.0): 0.12,
    ("ddim", 50, 1.0): 0.22,
    ("dpm++", 20, 0.0): 0.10,
}


# ---------------------------------------------------------------------- schedules (independent)
def cosine_table(steps: int = T) -> np.ndarray:
    """Improved-DDPM cosine ᾱ_t, t = 0..T−1 (β capped at 0.999)."""
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    u = np.arange(steps + 1) / steps
    return np.cumprod(1 - np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999))


def linear_table(steps: int = T) -> np.ndarray:
    """DDPM linear β from 1e-4 to 0.02 (scaled by 1000 / T)."""
    return np.cumprod(1 - np.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps))


def sigmoid_table(steps: int = T) -> np.ndarray:
    """Chen (2023) sigmoid ᾱ(u) with start −3, end 3, τ = 1, discretised like the cosine."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    f = lambda u: (sig(3.0) - sig(6 * u - 3)) / (sig(3.0) - sig(-3.0))  # noqa: E731
    u = np.arange(steps + 1) / steps
    return np.cumprod(1 - np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999))


def zero_terminal(table: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: shift/scale sqrt(ᾱ) so the last step is pure noise."""
    r = np.sqrt(table)
    return ((r - r[-1]) * r[0] / (r[0] - r[-1])) ** 2


def trailing_plan(table: np.ndarray, steps: int) -> list[tuple[float, float]]:
    """(ᾱ_t, ᾱ_prev) pairs of a trailing-spaced sampler: t = round(T − i T/steps) − 1, then clean."""
    total = len(table)
    ts = [round(total - i * total / steps) - 1 for i in range(steps)]
    ab = lambda t: 1.0 if t < 0 else float(table[t])  # noqa: E731
    return [(ab(t), ab(p)) for t, p in zip(ts, [*ts[1:], -1])]


# ---------------------------------------------------------------------- the exact denoiser
class ExactDenoiser:
    """The optimal ε / x₀ / v predictor for a mixture of Gaussians, as a diffunet "model"."""

    def __init__(self, weights, means, covs, table, prediction, noise_level=False):
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.means = torch.tensor(np.array(means), dtype=torch.float64)
        lam, vecs = np.linalg.eigh(np.array(covs))
        self.lam, self.vecs = torch.tensor(lam), torch.tensor(vecs)
        self.table = torch.tensor(table)
        self.prediction = prediction
        if noise_level:
            self.config = SimpleNamespace(time_embed_type="noise_level")
        self.noise_level = noise_level

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Computed on (d, N), transposed: the sums over the few dimensions then add whole rows,
        # which is several times faster than reducing each sample's d values.
        xt = x.double().T
        ab = t.double() if self.noise_level else self.table[t.long()]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        log_p, x0s = [], []
        for k in range(len(self.weights)):
            z = self.vecs[k].T @ (xt - a * self.means[k][:, None])
            var = a**2 * self.lam[k][:, None] + s**2
            log_p.append(self.weights[k].log() - 0.5 * (z**2 / var + var.log()).sum(0))
            x0s.append(self.means[k][:, None] + self.vecs[k] @ (a * self.lam[k][:, None] / var * z))
        resp = torch.softmax(torch.stack(log_p), 0)
        x0 = (resp[:, None] * torch.stack(x0s)).sum(0)
        eps = (xt - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.prediction]
        return out.T.contiguous().to(x.dtype)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the data."""
        covs = self.vecs @ torch.diag_embed(self.lam) @ self.vecs.transpose(1, 2)
        mean = (self.weights[:, None] * self.means).sum(0)
        second = sum(w * (c + torch.outer(m, m)) for w, c, m in zip(self.weights, covs, self.means))
        return mean, second - torch.outer(mean, mean)


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


GAUSS_MEAN = np.array([0.3, -0.2, 0.1])
GAUSS_STDS = np.array([0.5, 0.35, 0.25])
GAUSS_COV = rotation(3, 1) @ np.diag(GAUSS_STDS**2) @ rotation(3, 1).T


def gaussian(table, prediction="eps", noise_level=False) -> ExactDenoiser:
    return ExactDenoiser([1.0], [GAUSS_MEAN], [GAUSS_COV], table, prediction, noise_level)


# ---------------------------------------------------------------------- analytic sampler moments
def analytic_moments(sampler, plan, eta=0.0, mean=GAUSS_MEAN, cov=GAUSS_COV):
    """Exact output mean and covariance of `sampler` on N(mean, cov) data with the exact denoiser.

    Works per eigen-direction (λ, μ), where every update is affine in the state (y, x̂₀ of the
    previous step) plus Gaussian noise; the papers' update rules, written independently.
    """
    lam, vecs = np.linalg.eigh(cov)
    out_mean, out_var = [], []
    for lam_j, mu in zip(lam, vecs.T @ mean):
        m, c = np.zeros(2), np.diag([1.0, 0.0])  # (y, previous x̂₀); y starts as pure noise
        h_prev = None
        for ab, ab_prev in plan:
            a, s, a1, s1 = (
                math.sqrt(ab),
                math.sqrt(1 - ab),
                math.sqrt(ab_prev),
                math.sqrt(1 - ab_prev),
            )
            k = (
                a * lam_j / (a * a * lam_j + s * s)
            )  # x̂₀ = k y + (1 − a k) μ,  ε̂ = (1 − a k)(y − a μ) / s
            x0_lin, x0_const = k, (1 - a * k) * mu
            eps_lin, eps_const = (1 - a * k) / s, -(1 - a * k) * a * mu / s
            noise_var = 0.0
            if sampler == "ddim":
                sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
                d = math.sqrt(max(1 - ab_prev - sigma**2, 0.0))
                lin = np.array([[a1 * x0_lin + d * eps_lin, 0], [x0_lin, 0]])
                const = np.array([a1 * x0_const + d * eps_const, x0_const])
                noise_var = sigma**2
            elif sampler == "ddpm":
                beta = 1 - ab / ab_prev
                c0, ct = a1 * beta / (1 - ab), math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
                lin = np.array([[c0 * x0_lin + ct, 0], [x0_lin, 0]])
                const = np.array([c0 * x0_const, x0_const])
                noise_var = beta * (1 - ab_prev) / (1 - ab)
            elif ab_prev >= 1.0:  # dpm++ last step: x̂₀
                lin, const = np.array([[x0_lin, 0], [x0_lin, 0]]), np.array([x0_const, x0_const])
            else:  # dpm++ (2M)
                lam_now = -math.inf if a == 0 else math.log(a / s)
                h = math.log(a1 / s1) - lam_now
                q = 0.0 if h_prev is None else h / (2 * h_prev)
                g = a1 * (1 - math.exp(-h))
                lin = np.array([[s1 / s + g * (1 + q) * x0_lin, -g * q], [x0_lin, 0]])
                const = np.array([g * (1 + q) * x0_const, x0_const])
                h_prev = h
            m, c = lin @ m + const, lin @ c @ lin.T
            c[0, 0] += noise_var
        out_mean.append(m[0])
        out_var.append(c[0, 0])
    return (torch.tensor(vecs @ np.array(out_mean)), torch.tensor(vecs @ np.diag(out_var) @ vecs.T))


def whitened_errors(samples, mean, cov) -> tuple[float, float]:
    """Largest |mean error| and |covariance error| after whitening by `cov` (in its units)."""
    chol = torch.linalg.cholesky(cov.double())
    x = samples.double()
    mean_err = torch.linalg.solve_triangular(chol, (x.mean(0) - mean)[:, None], upper=False)
    white = torch.linalg.solve_triangular(chol, torch.cov(x.T), upper=False)
    white = torch.linalg.solve_triangular(chol, white.T, upper=False)
    eye = torch.eye(len(mean), dtype=torch.float64)
    return mean_err.abs().max().item(), (white - eye).abs().max().item()


def assert_matches(samples, mean, cov, allowance_mean=0.0, allowance_cov=0.0):
    """Mean within 5/sqrt(N) and covariance within 5·sqrt(2/N) (plus allowances), whitened."""
    n = samples.shape[0]
    mean_err, cov_err = whitened_errors(samples, mean, cov)
    assert mean_err <= SIGMAS / math.sqrt(n) + allowance_mean, (mean_err, cov_err)
    assert cov_err <= SIGMAS * math.sqrt(2 / n) + allowance_cov, (mean_err, cov_err)


def run(diffusion, model, sampler, steps, eta=0.0, n=N, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return diffusion.sample(
        model,
        (n, model.means.shape[1]),
        sampler=sampler,
        steps=steps,
        eta=eta,
        generator=generator,
        progress=False,
    )


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize(("sampler", "steps", "eta"), list(ALLOWANCE))
def test_gaussian_samples_match_data(sampler, steps, eta):
    table = cosine_table()
    diffusion = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    samples = run(diffusion, gaussian(table), sampler, steps, eta)
    mean, cov = analytic_moments(sampler, trailing_plan(table, steps), eta)
    assert_matches(samples, mean, cov)
    data_mean, data_cov = torch.tensor(GAUSS_MEAN), torch.tensor(GAUSS_COV)
    _, discretisation = whitened_errors_of_moments(mean, cov, data_mean, data_cov)
    assert discretisation <= ALLOWANCE[(sampler, steps, eta)]
    assert_matches(samples, data_mean, data_cov, allowance_cov=ALLOWANCE[(sampler, steps, eta)])


def whitened_errors_of_moments(mean, cov, data_mean, data_cov) -> tuple[float, float]:
    chol = torch.linalg.cholesky(data_cov)
    white = torch.linalg.solve_triangular(chol, cov, upper=False)
    white = torch.linalg.solve_triangular(chol, white.T, upper=False)
    mean_err = torch.linalg.solve_triangular(chol, (mean - data_mean)[:, None], upper=False)
    return mean_err.abs().max().item(), (
        white - torch.eye(len(mean), dtype=cov.dtype)
    ).abs().max().item()


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 50), ("dpm++", 20)])
def test_parameterisations_give_the_same_samples(prediction, sampler, steps):
    table = cosine_table()
    reference = run(
        Diffusion("cosine", T, prediction="eps", clip_denoised=False),
        gaussian(table),
        sampler,
        steps,
        n=2000,
    )
    other = run(
        Diffusion("cosine", T, prediction=prediction, clip_denoised=False),
        gaussian(table, prediction),
        sampler,
        steps,
        n=2000,
    )
    torch.testing.assert_close(other, reference, atol=2e-4, rtol=0)


def test_noise_level_model_receives_alpha_bar():
    table = cosine_table()
    diffusion = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    by_index = run(diffusion, gaussian(table), "ddim", 50, n=2000)
    by_level = run(diffusion, gaussian(table, noise_level=True), "ddim", 50, n=2000)
    torch.testing.assert_close(by_level, by_index, atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    ("schedule", "table"), [("linear", linear_table), ("sigmoid", sigmoid_table)]
)
@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 50), ("dpm++", 20)])
def test_other_schedules(schedule, table, sampler, steps):
    values = table()
    diffusion = Diffusion(schedule, T, prediction="eps", clip_denoised=False)
    torch.testing.assert_close(
        diffusion.schedule.alphas_cumprod, torch.tensor(values), atol=1e-12, rtol=1e-9
    )
    samples = run(diffusion, gaussian(values), sampler, steps)
    assert_matches(samples, *analytic_moments(sampler, trailing_plan(values, steps)))


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"),
    [("ddim", 50, 0.0), ("ddim", 50, 1.0), ("dpm++", 20, 0.0), ("ddpm", 100, 0.0)],
)
def test_zero_terminal_snr_with_v_prediction(sampler, steps, eta):
    values = zero_terminal(cosine_table())
    diffusion = Diffusion("cosine", T, prediction="v", zero_terminal_snr=True, clip_denoised=False)
    assert diffusion.schedule.alphas_cumprod[-1] == 0.0
    torch.testing.assert_close(
        diffusion.schedule.alphas_cumprod, torch.tensor(values), atol=1e-12, rtol=1e-9
    )
    samples = run(diffusion, gaussian(values, "v"), sampler, steps, eta)
    assert torch.isfinite(samples).all()
    assert_matches(samples, *analytic_moments(sampler, trailing_plan(values, steps), eta))


# A two-component mixture: the denoiser is nonlinear, so this exercises the sampler beyond the
# affine case. Mean/covariance allowances are the discretisation errors measured with 200,000
# samples (DDPM: 0.011 covariance, 0.003 mean; DPM-Solver++ 20 steps: 0.056, 0.005) rounded up.
MIX_WEIGHTS = [0.3, 0.7]
MIX_MEANS = [[0.5, 0.3], [-0.3, -0.2]]
_R = rotation(2, 2)
MIX_COVS = [
    _R @ np.diag([0.25**2, 0.15**2]) @ _R.T,
    1.5 * (_R @ np.diag([0.25**2, 0.15**2]) @ _R.T),
]


@pytest.mark.parametrize(
    ("sampler", "steps", "allow_mean", "allow_cov"),
    [("ddpm", 1000, 0.01, 0.02), ("dpm++", 20, 0.01, 0.07)],
)
def test_mixture_samples_match_data(sampler, steps, allow_mean, allow_cov):
    table = cosine_table()
    model = ExactDenoiser(MIX_WEIGHTS, MIX_MEANS, MIX_COVS, table, "eps")
    diffusion = Diffusion("cosine", T, prediction="eps", clip_denoised=False)
    samples = run(diffusion, model, sampler, steps)
    mean, cov = model.moments()
    assert_matches(samples, mean, cov, allow_mean, allow_cov)
    # Share of samples nearer component 0 than the data's own share, within 5 binomial errors.
    generator = torch.Generator().manual_seed(1)
    data = draw_mixture(200_000, generator)

    def share(x):
        return (x.double() @ (model.means[0] - model.means[1]) > 0.12).double().mean().item()

    expected = share(data)
    assert (
        abs(share(samples) - expected) <= SIGMAS * math.sqrt(expected * (1 - expected) / N) + 0.01
    )


def draw_mixture(n, generator):
    component = torch.rand(n, generator=generator, dtype=torch.float64) < MIX_WEIGHTS[0]
    out = torch.empty(n, 2, dtype=torch.float64)
    for k, mask in enumerate([component, ~component]):
        chol = torch.linalg.cholesky(torch.tensor(MIX_COVS[k]))
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        out[mask] = (torch.tensor(MIX_MEANS[k]) + z @ chol.T)[mask]
    return out
