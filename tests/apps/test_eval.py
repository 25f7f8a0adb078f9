"""The digits metrics: sane on real digits, much worse on noise; the Fréchet distance itself."""

import json

import torch

from diffunet.apps.metrics import evaluate_digits, frechet_distance, gaussian_stats, load_classifier
from diffunet.cli import main
from diffunet.data import digits_arrays, resize_digits


def test_frechet_distance_of_known_gaussians():
    mu, cov = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    assert frechet_distance(mu, cov, mu, cov) < 1e-9
    # ‖μ₁−μ₂‖² + Tr(I + 4I − 2·2I) = 1·3 + 3 = 6 for μ₂ = 1, Σ₂ = 4I
    assert abs(frechet_distance(mu, cov, mu + 1, 4 * cov) - 6.0) < 1e-9
    feats = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    m, c = gaussian_stats(feats)
    assert frechet_distance(m, c, m, c) < 1e-6


def test_real_digits_score_well_and_noise_badly():
    net = load_classifier()
    images, labels = digits_arrays()
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:500]
    real = evaluate_digits(resize_digits(images[index], 16), labels[index], net)
    noise = evaluate_digits(
        torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(1)),
        torch.arange(500) % 10,
        net,
    )
    assert real.accuracy > 0.95 and noise.accuracy < 0.25
    assert real.frechet_distance < 30 and noise.frechet_distance > 20 * real.frechet_distance
    # all real digits against their own reference: zero up to rounding
    every = evaluate_digits(resize_digits(images, 32), labels, net)
    assert every.frechet_distance < 1e-3


def test_eval_command_on_real_digits(tmp_path, capsys):
    assert main(["eval", "--real", "--num", "300", "--json", str(tmp_path / "e.json")]) == 0
    assert "digits Fréchet distance" in capsys.readouterr().out
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert numbers["num_samples"] == 300 and numbers["accuracy"] > 0.95
