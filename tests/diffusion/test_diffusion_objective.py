"""Parameterisations and training objectives: exact conversions, the loss at its analytic minimum."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffunet.diffusion import (
    Diffusion,
    convert,
    drop_conditioning,
    from_x0_and_eps,
    min_snr_weight,
    x0_and_eps,
)
from test_diffusion_exact import GAUSS_COV, GAUSS_MEAN, cosine_table, gaussian

PREDICTIONS = ["eps", "x0", "v"]


# ---------------------------------------------------------------------- parameterisations
def test_conversions_round_trip_exactly():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 5, dtype=torch.float64, generator=gen)
    eps = torch.randn(6, 3, 5, dtype=torch.float64, generator=gen)
    alpha_bar = torch.tensor([1e-6, 0.01, 0.3, 0.5, 0.9, 0.9999], dtype=torch.float64)
    a, s = alpha_bar.sqrt()[:, None, None], (1 - alpha_bar).sqrt()[:, None, None]
    x_t = a * x0 + s * eps
    truth = {"eps": eps, "x0": x0, "v": a * eps - s * x0}  # Salimans & Ho's v
    for source in PREDICTIONS:
        target = from_x0_and_eps(source, x0, eps, alpha_bar)
        torch.testing.assert_close(target, truth[source], rtol=0, atol=0)
        got_x0, got_eps = x0_and_eps(source, truth[source], x_t, alpha_bar)
        if source != "eps":  # x₀ from ε divides by sqrt(ᾱ) = 1e-3 at the first entry
            torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
        if source != "x0":
            torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-12)
        for target_kind in PREDICTIONS:
            converted = convert(truth[source], source, target_kind, x_t, alpha_bar)
            back = convert(converted, target_kind, source, x_t, alpha_bar)
            torch.testing.assert_close(back, truth[source], rtol=0, atol=1e-9)
            if {source, target_kind} != {"eps", "x0"}:
                torch.testing.assert_close(converted, truth[target_kind], rtol=0, atol=1e-10)


def test_scalar_noise_level_conversion():
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    x_t = math.sqrt(0.4) * x0 + math.sqrt(0.6) * eps
    v = convert(eps, "eps", "v", x_t, 0.4)
    torch.testing.assert_close(v, math.sqrt(0.4) * eps - math.sqrt(0.6) * x0)


# ---------------------------------------------------------------------- loss at its minimum
def conditional_covariance(prediction: str, alpha_bar: float) -> np.ndarray:
    """Cov[target | x_t] for Gaussian data: the irreducible error of the optimal predictor."""
    d = len(GAUSS_MEAN)
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    joint = np.block([[GAUSS_COV, np.zeros((d, d))], [np.zeros((d, d)), np.eye(d)]])  # (x₀, ε)
    observe = np.hstack([a * np.eye(d), s * np.eye(d)])  # x_t
    pick = {
        "x0": np.hstack([np.eye(d), np.zeros((d, d))]),
        "eps": np.hstack([np.zeros((d, d)), np.eye(d)]),
        "v": np.hstack([-s * np.eye(d), a * np.eye(d)]),
    }[prediction]
    cross = pick @ joint @ observe.T
    return pick @ joint @ pick.T - cross @ np.linalg.solve(observe @ joint @ observe.T, cross.T)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("t", [20, 500, 900])
def test_loss_of_the_exact_denoiser_is_at_its_analytic_minimum(prediction, t):
    n = 40000
    diffusion = Diffusion("cosine", 1000, prediction=prediction)
    model = gaussian(cosine_table(), prediction)
    gen = torch.Generator().manual_seed(t)
    chol = torch.linalg.cholesky(torch.tensor(GAUSS_COV))
    x0 = torch.tensor(GAUSS_MEAN) + torch.randn(n, 3, generator=gen, dtype=torch.float64) @ chol.T
    x0 = x0.float()
    noise = torch.randn(n, 3, generator=gen)
    steps = torch.full((n,), t)
    loss = diffusion.loss(model, x0, timesteps=steps, noise=noise).item()
    cov = conditional_covariance(prediction, float(diffusion.schedule.alphas_cumprod[t]))
    minimum = np.trace(cov) / 3
    stderr = math.sqrt(2 * np.trace(cov @ cov) / n) / 3  # per-sample loss = |e|² / d, e ~ N(0, C)
    assert abs(loss - minimum) <= 5 * stderr, (loss, minimum, stderr)

    # Any other predictor does worse: a constant offset δ adds |δ|² / d in expectation.
    offset = torch.tensor([0.05, -0.03, 0.02])

    def shifted(x, time):
        return model(x, time) + offset

    worse = diffusion.loss(shifted, x0, timesteps=steps, noise=noise).item()
    expected_gap = offset.square().sum().item() / 3
    assert (
        abs((worse - loss) - expected_gap)
        <= 5 * 2 * math.sqrt((offset.numpy() @ cov @ offset.numpy()) / n) / 3 + 1e-6
    )


def test_aleatoric_nll_of_the_exact_model_is_at_its_minimum():
    """Mean at E[ε | x_t], log-variance at log Var[ε_j | x_t]: NLL = ½ mean_j(1 + log C_jj)."""
    n, t = 40000, 300
    diffusion = Diffusion("cosine", 1000, prediction="eps")
    base = gaussian(cosine_table(), "eps")
    cov = conditional_covariance("eps", float(diffusion.schedule.alphas_cumprod[t]))
    log_var = torch.tensor(np.log(np.diag(cov)), dtype=torch.float32)

    class Aleatoric:
        config = SimpleNamespace(aleatoric=True)

        def __init__(self, shift=0.0):
            self.shift = shift

        def __call__(self, x, time):
            return torch.cat([base(x, time), (log_var + self.shift).expand_as(x)], dim=1)

    gen = torch.Generator().manual_seed(1)
    chol = torch.linalg.cholesky(torch.tensor(GAUSS_COV))
    x0 = torch.tensor(GAUSS_MEAN) + torch.randn(n, 3, generator=gen, dtype=torch.float64) @ chol.T
    x0, noise, steps = x0.float(), torch.randn(n, 3, generator=gen), torch.full((n,), t)
    loss = diffusion.loss(Aleatoric(), x0, timesteps=steps, noise=noise).item()
    minimum = 0.5 * np.mean(1 + np.log(np.diag(cov)))
    assert abs(loss - minimum) < 0.01, (loss, minimum)  # 5 standard errors
    # A log-variance 1 too low (over-confident) costs ½(e − 2) per element in expectation.
    worse = diffusion.loss(Aleatoric(-1.0), x0, timesteps=steps, noise=noise).item()
    assert abs((worse - loss) - 0.5 * (math.e - 2)) < 0.03, (worse, loss)


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    gamma = 5.0
    torch.testing.assert_close(
        min_snr_weight(snr, gamma, "x0"), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    )
    torch.testing.assert_close(
        min_snr_weight(snr, gamma, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)
    )
    torch.testing.assert_close(
        min_snr_weight(snr, gamma, "v"),
        torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51], dtype=torch.float64),
    )


def test_min_snr_weighted_loss_equals_weighted_per_sample_errors():
    diffusion = Diffusion("cosine", 1000, prediction="eps", min_snr_gamma=5.0)
    plain = Diffusion("cosine", 1000, prediction="eps")
    x0 = torch.randn(2, 4)
    noise = torch.randn(2, 4)

    def model(x, t):
        return torch.zeros_like(x)

    for t in (10, 800):
        steps = torch.full((2,), t)
        snr = diffusion.schedule.snr[t].item()
        weighted = diffusion.loss(model, x0, timesteps=steps, noise=noise)
        unweighted = plain.loss(model, x0, timesteps=steps, noise=noise)
        torch.testing.assert_close(weighted, unweighted * min(1.0, 5.0 / snr))
        torch.testing.assert_close(unweighted, noise.square().mean())


# ---------------------------------------------------------------------- the loss's inputs
def test_noise_level_model_trains_on_continuous_levels_between_steps():
    diffusion = Diffusion("linear", 100)
    seen = []

    class NoiseLevelModel:
        config = SimpleNamespace(time_embed_type="noise_level")

        def __call__(self, x, level):
            seen.append(level)
            return torch.zeros_like(x)

    steps = torch.tensor([0, 10, 50, 99, 99, 99])
    diffusion.loss(
        NoiseLevelModel(),
        torch.randn(6, 2),
        timesteps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    level = seen[0].double()
    assert seen[0].dtype == torch.float32
    table = diffusion.schedule.alphas_cumprod
    upper = torch.cat([torch.ones(1, dtype=torch.float64), table])[steps]
    assert ((level >= table[steps] - 1e-7) & (level <= upper + 1e-7)).all()
    assert len(set(level[3:].tolist())) == 3  # continuous: three different levels for step 99


def test_timestep_model_receives_integer_steps():
    seen = []

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    Diffusion("cosine", 50).loss(
        model, torch.randn(8, 3), generator=torch.Generator().manual_seed(0)
    )
    assert seen[0].dtype == torch.long and seen[0].shape == (8,)
    assert seen[0].min() >= 0 and seen[0].max() < 50


def test_conditioning_dropout_uses_null_label_and_zero_context_but_keeps_cond():
    seen = {}

    class Model:
        null_label = 10

        def __call__(self, x, t, *, cond, context, labels):
            seen.update(cond=cond, context=context, labels=labels)
            return torch.zeros_like(x)

    n = 4000
    labels = torch.randint(0, 10, (n,))
    context = torch.randn(n, 2, 3) + 5
    cond = torch.randn(n, 1, 4)
    diffusion = Diffusion("cosine", 100, cond_drop_prob=0.25)
    diffusion.loss(
        Model(),
        torch.randn(n, 1, 4),
        cond=cond,
        context=context,
        labels=labels,
        generator=torch.Generator().manual_seed(0),
    )
    dropped = seen["labels"] == 10
    assert abs(dropped.double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    assert torch.equal(seen["labels"][~dropped], labels[~dropped])
    assert (seen["context"][dropped] == 0).all()
    assert torch.equal(seen["context"][~dropped], context[~dropped])
    assert seen["cond"] is cond


def test_drop_conditioning_probability_one_and_zero():
    labels, context = torch.tensor([1, 2, 3]), torch.ones(3, 2, 2)
    ctx, lab = drop_conditioning(context, labels, 1.0, 7)
    assert lab.tolist() == [7, 7, 7] and (ctx == 0).all()
    ctx, lab = drop_conditioning(context, labels, 0.0, 7)
    assert lab is labels and ctx is context


def test_loss_is_float32_for_a_bf16_model_output():
    def model(x, t):
        return (x * 0.5).to(torch.bfloat16)

    loss = Diffusion("cosine", 100).loss(model, torch.randn(4, 3, 8))
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_loss_is_reproducible_with_a_generator():
    def model(x, t):
        return 0.3 * x

    diffusion = Diffusion("sigmoid", 100, prediction="v", min_snr_gamma=5.0)
    x0 = torch.randn(16, 2, 4)
    a = diffusion.loss(model, x0, generator=torch.Generator().manual_seed(5))
    b = diffusion.loss(model, x0, generator=torch.Generator().manual_seed(5))
    c = diffusion.loss(model, x0, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() != c.item()
