"""Offline quality numbers for generated digits: a digits Fréchet distance and recognisability.

Both use a small convolutional network trained on scikit-learn's 8×8 digits
(`scripts/train_digits_classifier.py`, shipped as `assets/digits_classifier.safetensors`).
This is *not* FID: FID uses Inception-v3 features of natural images; ours are the 64-wide
penultimate features of a digits classifier. Numbers are comparable only with each other.

- **digits Fréchet distance**: the Fréchet distance between Gaussians fitted to the features of
  generated digits and of all 1,797 real digits (taken through the same resize round trip).
  Lower is better; real held-out digits score near 0.
- **recognisability**: for class-conditional samples, the share the classifier assigns to the
  class they were generated for (accuracy); for unconditional samples, the share it classifies
  with probability ≥ 0.9 (confidence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffunet.data.digits import DIGITS_SIZE, digits_arrays, resize_digits
from diffunet.errors import InvalidValueError

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier.safetensors"
CONFIDENT = 0.9


class DigitsNet(nn.Module):
    """A small CNN for 8×8 digits: 64 penultimate features, 10 logits."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 1, 8, 8)` digits in [0, 1] → `(B, 64)` features."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits `(B, 10)`."""
        return self.head(self.features(x))


def load_classifier(path: str | Path = ASSET) -> DigitsNet:
    """The shipped digits network (weights from safetensors, never pickle), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier weights {path} are missing; run "
            "scripts/train_digits_classifier.py to create them"
        )
    net = DigitsNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def to_digit_inputs(images: torch.Tensor) -> torch.Tensor:
    """Generated images `(N, C, H, W)` in [0, 1] → the network's `(N, 1, 8, 8)` input."""
    if images.ndim != 4:
        raise InvalidValueError(
            f"digits metrics need 2D images (N, C, H, W), got shape {tuple(images.shape)}"
        )
    images = images.float().clamp(0.0, 1.0)
    if images.shape[1] != 1:
        images = images.mean(dim=1, keepdim=True)
    if images.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
        images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="area")
    return images


@torch.no_grad()
def classify(
    net: DigitsNet, images: torch.Tensor, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `(N, 64)` and class probabilities `(N, 10)` of images at any size."""
    inputs = to_digit_inputs(images)
    feats, probs = [], []
    for chunk in inputs.split(batch):
        f = net.features(chunk)
        feats.append(f.double())
        probs.append(net.head(f).softmax(dim=1))
    return torch.cat(feats), torch.cat(probs)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of `(N, D)` features, in float64."""
    features = features.double()
    if len(features) < 2:
        raise InvalidValueError("a Fréchet distance needs at least 2 samples")
    return features.mean(dim=0), torch.cov(features.T)


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½), via symmetric eigendecompositions."""
    values, vectors = torch.linalg.eigh(cov1)
    sqrt1 = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = sqrt1 @ cov2 @ sqrt1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return float(value.clamp(min=0))


@dataclass(frozen=True)
class DigitsScores:
    """Evaluation of a set of (generated) digits."""

    frechet_distance: float
    accuracy: float | None  # None without intended labels
    confident: float  # share classified with probability >= CONFIDENT
    num_samples: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        parts = [f"digits Fréchet distance {self.frechet_distance:.3f}"]
        if self.accuracy is not None:
            parts.append(f"recognisability (classifier accuracy) {self.accuracy:.1%}")
        parts.append(f"confident (p >= {CONFIDENT}) {self.confident:.1%}")
        parts.append(f"{self.num_samples} samples")
        return ", ".join(parts)


_REFERENCE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def reference_stats(net: DigitsNet, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature statistics of all real digits, taken through the resize round trip 8 → size → 8."""
    if size not in _REFERENCE:
        images, _ = digits_arrays()
        feats, _ = classify(net, resize_digits(images, size))
        _REFERENCE[size] = gaussian_stats(feats)
    return _REFERENCE[size]


def evaluate_digits(
    images: torch.Tensor, labels: torch.Tensor | None = None, net: DigitsNet | None = None
) -> DigitsScores:
    """Score `(N, C, H, W)` digits in [0, 1] (and, if given, the labels they should show)."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise InvalidValueError(
            f"digits metrics need square 2D images (N, C, H, W), got {tuple(images.shape)}"
        )
    if labels is not None and tuple(labels.shape) != (len(images),):
        raise InvalidValueError(
            f"labels have shape {tuple(labels.shape)}, expected ({len(images)},)"
        )
    net = net or load_classifier()
    feats, probs = classify(net, images)
    mu, cov = gaussian_stats(feats)
    ref_mu, ref_cov = reference_stats(net, images.shape[-1])
    accuracy = None
    if labels is not None:
        accuracy = float((probs.argmax(dim=1) == labels.to(probs.device)).float().mean())
    confident = float((probs.max(dim=1).values >= CONFIDENT).float().mean())
    return DigitsScores(
        frechet_distance(mu, cov, ref_mu, ref_cov), accuracy, confident, len(images)
    )
