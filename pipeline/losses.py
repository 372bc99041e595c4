"""Data terms of the fit: plain functions of (predicted intensity, measured amplitude, valid
pixels), chosen by name (`train.loss`). Every gradient engine and every engine's reported loss
uses the same function, so loss curves of different methods compare.

A loss takes predicted intensities (B, Ny, Nx), measured amplitudes sqrt(I / scale) of the same
shape, the loss's parameter (SmoothL1's beta) and an optional (Ny, Nx) mask of detector pixels
to trust, and returns the mean over the valid pixels of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional

from ptyinr.errors import ConfigError

Loss = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor | None], torch.Tensor]


def smooth_l1_amplitude(
    predicted_intensity: torch.Tensor,
    measured_amplitude: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's data term (eq. 2): SmoothL1(beta) of sqrt intensities, mean over valid
    pixels."""
    predicted_amplitude = torch.sqrt(predicted_intensity + 1e-12)
    per_pixel = functional.smooth_l1_loss(
        predicted_amplitude, measured_amplitude, beta=beta, reduction="none"
    )
    if valid is None:
        return per_pixel.mean()
    weights = valid.to(per_pixel.dtype)
    return (per_pixel * weights).sum() / (weights.sum() * per_pixel.shape[0])


LOSSES: dict[str, Loss] = {"smooth_l1": smooth_l1_amplitude}


def get_loss(name: str) -> Loss:
    """The loss registered under `name` (train.loss)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(
            f"train.loss = {name!r}: expected one of {', '.join(sorted(LOSSES))}"
        ) from None
