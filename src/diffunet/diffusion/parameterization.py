"""What the network predicts: the noise ε, the clean data x₀, or the velocity v.

With `a = sqrt(ᾱ)` and `s = sqrt(1 − ᾱ)` (so a² + s² = 1), `x_t = a x₀ + s ε` and
`v = a ε − s x₀` (Salimans & Ho 2022). Any one of (ε, x₀, v), together with x_t, determines the
other two:

    x₀ = (x_t − s ε) / a        ε = (x_t − a x₀) / s        x₀ = a x_t − s v,  ε = s x_t + a v
"""

from __future__ import annotations

import torch

from diffunet.errors import InvalidValueError

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str) -> str:
    """Return `prediction` if it is one of :data:`PREDICTIONS`, else raise a ValueError."""
    if prediction not in PREDICTIONS:
        raise InvalidValueError(
            f"unknown prediction {prediction!r}; expected one of {PREDICTIONS} ('eps' = noise, "
            "'x0' = clean data, 'v' = velocity)"
        )
    return prediction


def _coefficients(alpha_bar: torch.Tensor | float, like: torch.Tensor):
    """(a, s) broadcastable against `like`: scalars stay scalars, `(B,)` becomes `(B, 1, ...)`."""
    if not isinstance(alpha_bar, torch.Tensor):
        return float(alpha_bar) ** 0.5, (1.0 - float(alpha_bar)) ** 0.5
    alpha_bar = alpha_bar.to(device=like.device, dtype=torch.float64)
    if alpha_bar.ndim == 1:
        alpha_bar = alpha_bar.reshape(-1, *([1] * (like.ndim - 1)))
    return alpha_bar.sqrt().to(like.dtype), (1.0 - alpha_bar).sqrt().to(like.dtype)


def x0_and_eps(
    prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x₀, ε) implied by a model `output` of kind `prediction` at `x_t` with noise level ᾱ.

    `alpha_bar` is a float or a `(B,)` tensor.
    """
    a, s = _coefficients(alpha_bar, x_t)
    if prediction == "eps":
        return (x_t - s * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / s
    if prediction == "v":
        return a * x_t - s * output, s * x_t + a * output
    raise InvalidValueError(check_prediction(prediction))


def from_x0_and_eps(
    prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float
) -> torch.Tensor:
    """The quantity of kind `prediction` for clean data `x0` and noise `eps` at ᾱ.

    This is the regression target of the training loss.
    """
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        a, s = _coefficients(alpha_bar, x0)
        return a * eps - s * x0
    raise InvalidValueError(check_prediction(prediction))


def convert(
    output: torch.Tensor,
    source: str,
    target: str,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor | float,
) -> torch.Tensor:
    """Convert a prediction of kind `source` into the equivalent prediction of kind `target`."""
    check_prediction(source)
    check_prediction(target)
    if source == target:
        return output
    x0, eps = x0_and_eps(source, output, x_t, alpha_bar)
    return from_x0_and_eps(target, x0, eps, alpha_bar)
