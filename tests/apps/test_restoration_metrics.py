"""The restoration metrics (diffunet.apps.restoration_quality): PSNR/SSIM and the uncertainty
scores, as `diffunet restore --target` and `benchmarks/restoration_quality.py` report them."""

import json
import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from diffunet.apps.restoration_quality import (
    json_ready,
    quality,
    restoration_metrics,
    uncertainty_quality,
)


def test_uncertainty_that_is_the_error_scores_perfectly():
    rng = np.random.default_rng(0)
    clean = rng.random((64, 64)) * 0.8  # no clipping at 1: the error stays as given
    error = rng.random((64, 64)) * 0.1
    scores = uncertainty_quality(clean, clean + error, std=error)
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


def test_uncertainty_unrelated_to_the_error_scores_chance():
    rng = np.random.default_rng(1)
    clean = rng.random((128, 128)) * 0.8
    estimate = clean + rng.random((128, 128)) * 0.1
    scores = uncertainty_quality(clean, estimate, std=rng.random((128, 128)))
    assert abs(scores["spearman"]) < 0.05
    assert scores["top10_error_share"] == pytest.approx(0.10, abs=0.01)
    assert scores["top50_error_share"] == pytest.approx(0.50, abs=0.02)


def test_a_constant_uncertainty_ranks_nothing():
    clean = np.full((16, 16), 0.5)
    scores = uncertainty_quality(clean, clean + 0.1, std=np.zeros((16, 16)))  # one sample: std 0
    assert math.isnan(scores["spearman"]) and math.isnan(scores["top10_error_share"])
    assert scores["rmse"] == pytest.approx(0.1)


def test_psnr_of_a_known_error_and_of_an_exact_estimate():
    clean = np.full((32, 32), 0.5)
    assert quality(clean, clean + 0.1)["psnr"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert quality(clean, clean) == {"psnr": math.inf, "ssim": 1.0}


def test_ssim_of_images_smaller_than_its_window():
    rng = np.random.default_rng(2)
    clean, estimate = rng.random((5, 9)), rng.random((5, 9))
    expected = structural_similarity(clean, estimate, data_range=1.0, win_size=5)
    assert quality(clean, estimate)["ssim"] == pytest.approx(expected)
    assert math.isnan(quality(clean[:2], estimate[:2])["ssim"])


def test_restoration_metrics_are_strict_json():
    clean = np.random.default_rng(3).random((8, 8))
    scores = restoration_metrics(clean, clean, clean, np.zeros((8, 8)))
    assert scores["restored"]["psnr"] == math.inf
    ready = json_ready(scores)
    assert ready["restored"]["psnr"] is None and ready["uncertainty"]["spearman"] is None
    json.dumps(ready, allow_nan=False)


def test_the_benchmark_reports_the_library_metrics(benchmark_script):
    bench = benchmark_script("restoration_quality")
    assert bench.quality is quality and bench.uncertainty_quality is uncertainty_quality
