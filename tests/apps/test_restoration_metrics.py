"""The metrics of `benchmarks/restoration_quality.py`: PSNR/SSIM and the uncertainty scores."""

import numpy as np
import pytest


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("restoration_quality")


def test_uncertainty_that_is_the_error_scores_perfectly(bench):
    rng = np.random.default_rng(0)
    clean = rng.random((64, 64)) * 0.8  # no clipping at 1: the error stays as given
    error = rng.random((64, 64)) * 0.1
    scores = bench.uncertainty_quality(clean, clean + error, std=error)
    assert scores["spearman"] == pytest.approx(1.0)
    # The 10 % largest errors hold more than 10 % of the total, and the shares grow with the set.
    assert (
        0.1
        < scores["top10_error_share"]
        < scores["top25_error_share"]
        < scores["top50_error_share"]
        < 1.0
    )
    order = np.sort(error.ravel())[::-1]
    assert scores["top50_error_share"] == pytest.approx(order[:2048].sum() / order.sum())


def test_uncertainty_unrelated_to_the_error_scores_chance(bench):
    rng = np.random.default_rng(1)
    clean = rng.random((128, 128)) * 0.8
    estimate = clean + rng.random((128, 128)) * 0.1
    scores = bench.uncertainty_quality(clean, estimate, std=rng.random((128, 128)))
    assert abs(scores["spearman"]) < 0.05
    assert scores["top10_error_share"] == pytest.approx(0.10, abs=0.01)
    assert scores["top50_error_share"] == pytest.approx(0.50, abs=0.02)


def test_psnr_of_a_known_error(bench):
    clean = np.full((32, 32), 0.5)
    assert bench.quality(clean, clean + 0.1)["psnr"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)
