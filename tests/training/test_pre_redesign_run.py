"""A run folder written before the layered redesign still loads, samples and resumes to the
numbers that version computed (tests/fixtures/pre_redesign/README.md says how it was made)."""

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from diffunet import UNet
from diffunet.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pre_redesign"


def test_its_checkpoint_gives_the_outputs_that_version_computed():
    model = UNet.from_pretrained(FIXTURE / "run" / "checkpoint").eval()
    saved = load_file(FIXTURE / "expected_output.safetensors")
    with torch.no_grad():
        out = model(saved["x"], saved["t"], labels=saved["labels"])
    torch.testing.assert_close(out, saved["output"], rtol=1e-5, atol=1e-6)


def test_it_samples_and_resumes_to_the_weights_that_version_reached(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    grid = tmp_path / "samples.npy"
    assert (
        main(["sample", "--from", str(run), "--num", "4", "--steps", "2", "--out", str(grid)]) == 0
    )
    samples = np.load(grid)
    assert samples.shape == (4, 1, 16, 16) and np.isfinite(samples).all()

    args = ["train", "--resume", "--steps", "9", "--out", str(run), "--no-eval", "--threads", "1"]
    assert main(args) == 0
    resumed = load_file(run / "checkpoint" / "model.safetensors")
    expected = load_file(FIXTURE / "ema_after_resume_to_step_9.safetensors")
    assert resumed.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-5, atol=1e-7, msg=name)
