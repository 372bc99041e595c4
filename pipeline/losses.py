"""Data terms of the fit: plain functions of (predicted intensity, measured amplitude, valid
pixels), chosen by name (`train.loss`). Every gradient engine and every engine's reported loss
uses the same function, so loss curves of different methods compare.

A loss takes predicted intensities (B, Ny, Nx) and measured amplitudes sqrt(I / scale) of the
same shape (both in the engines' normalised units: `scale` is the scan's largest intensity, so
counts = scale x amplitude^2), the loss's parameter (SmoothL1's beta; the likelihoods ignore
it) and an optional (Ny, Nx) mask of detector pixels to trust, and returns the mean over the
valid pixels of the batch.

- `smooth_l1`: the paper's SmoothL1(beta) of sqrt intensities (robust, the paper's choice).
- `poisson`: the Poisson negative log-likelihood of the measured intensities, for
  photon-counting data: per pixel p - m log p (p predicted, m measured intensity, both with a
  small background `POISSON_EPS` added, which keeps the gradient bounded) minus its value at
  p = m, i.e. the NLL in counts divided by `scale` with the prediction-independent
  terms dropped. The subtracted constant makes it >= 0 and 0 at a perfect fit (the loss curve
  is drawn on a log axis); the gradient, 1 - m / p, is the NLL's own. A count scale or detector
  gain only multiplies it, so the minimiser is the same whatever the quantum of the data.
- `gaussian`: least squares on amplitudes, the classic amplitude-noise model, written as the
  Gaussian NLL with the amplitude noise of Poisson counts (sigma = 1/2 in sqrt(counts), the
  variance-stabilising transform), 2 (sqrt p - a)^2, in the same units: near a fit it equals
  `poisson` to second order, so the two curves compare.

`train.loss = "auto"` chooses with `choose_loss` from a sample of the frames: quantised,
non-negative data with a dark level of zero (photon counts, possibly times a gain) get
`gaussian` (`COUNTS_LOSS`): the amplitude least squares is the Poisson likelihood after the
variance-stabilising square root, and it optimised better than the `poisson` term itself on
every counts case measured (same setting as below: alpha = 10, 0.26 vs 0.28 object error; alpha
= 1000, 0.094 vs 0.096); `poisson` stays one setting away. Anything else (floating-point data:
clean simulations, additive or mixed noise, preprocessed or background-subtracted frames) gets
the paper's `smooth_l1`. Why SmoothL1 and not `gaussian` there: measured on a 64 x 64 object,
32 x 32 probe, -100 % overlap, pixel engine, 300 epochs (benchmarks/RESULTS.md, "Data
terms"): clean data 0.063
(smooth_l1) vs 0.097 (gaussian) object error, near-clean Gaussian-noise data 0.063 vs 0.096;
its L1 tail, robust to the residuals of model errors (probe, positions) that are not noise,
wins where there is little noise. On photon counts the likelihoods win over SmoothL1 (alpha =
10: 0.38 smooth_l1, 0.28 poisson, 0.26 gaussian).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
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
    return _mean_over_valid(per_pixel, valid)


def _mean_over_valid(per_pixel: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-pixel values (B, Ny, Nx) over the valid pixels of every frame."""
    if valid is None:
        return per_pixel.mean()
    weights = valid.to(per_pixel.dtype)
    return (per_pixel * weights).sum() / (weights.sum() * per_pixel.shape[0])


#: a background added to predicted and measured intensity in the Poisson term, in units of
#: the brightest pixel: keeps log p finite and bounds the gradient 1 - (m + eps) / (p + eps)
#: where the prediction is dark. Without it, a few dark predictions under measured photons
#: give gradients 10^4 x the others, Adam's second moments follow them and every other step
#: shrinks: a pixel-grid fit of alpha = 1000 Poisson data reached an object error of 0.25
#: after 600 epochs with 1e-9, 0.15 with 1e-6, 0.096 with 1e-4 (the Gaussian term: 0.094),
#: 0.11 with 1e-3 (benchmarks/bench_levers.py --poisson-eps; RESULTS.md, "Data terms").
POISSON_EPS = 1e-4


def poisson_intensity(
    predicted_intensity: torch.Tensor,
    measured_amplitude: torch.Tensor,
    beta: float = 0.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Poisson NLL of the measured intensities given the predicted ones, per pixel and in
    units of the scan's largest intensity, both with the background POISSON_EPS:
    p - m log p - (m - m log m), >= 0, zero with a zero gradient at p = m (`beta` unused)."""
    measured = measured_amplitude.square() + POISSON_EPS
    predicted = predicted_intensity + POISSON_EPS
    per_pixel = predicted - measured - measured * torch.log(predicted / measured)
    return _mean_over_valid(per_pixel, valid)


def gaussian_amplitude(
    predicted_intensity: torch.Tensor,
    measured_amplitude: torch.Tensor,
    beta: float = 0.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gaussian NLL of the measured amplitudes, 2 (sqrt p - a)^2 per pixel (least squares on
    amplitudes; the factor makes it match `poisson_intensity` near a fit; `beta` unused)."""
    predicted_amplitude = torch.sqrt(predicted_intensity + 1e-12)
    per_pixel = 2.0 * (predicted_amplitude - measured_amplitude).square()
    return _mean_over_valid(per_pixel, valid)


LOSSES: dict[str, Loss] = {
    "smooth_l1": smooth_l1_amplitude,
    "poisson": poisson_intensity,
    "gaussian": gaussian_amplitude,
}


@dataclass(frozen=True)
class LossChoice:
    """The data term a run uses, and why (recorded in the run's attrs as `data_term`)."""

    name: str
    requested: str
    reason: str

    def record(self) -> dict[str, str]:
        return {"loss": self.name, "requested": self.requested, "reason": self.reason}


def choose_loss(requested: str, sample: Callable[[], np.ndarray]) -> LossChoice:
    """The loss `train.loss` names, or for "auto" the one matched to the noise of the frames
    `sample()` returns (only called for "auto"; bad pixels already dropped, any shape).

    Photon counts are quantised: every value is a whole multiple of one quantum (1 for a
    counting detector, a gain for scaled counts as in the paper's simulations), and dark
    pixels read (close to) zero. Such data get `COUNTS_LOSS` (Gaussian amplitudes: the
    variance-stabilised Poisson likelihood); data with a dark level
    above zero (a pedestal the Poisson model does not have: the darkest pixel above half a
    quantum and above `DARK_SHARE` of the mean), negative values, or values on no quantum
    (floats: clean, additive-noise, preprocessed data) get the paper's SmoothL1 (measured
    better than least squares there: the module docstring)."""
    if requested != "auto":
        get_loss(requested)
        return LossChoice(requested, requested, f"train.loss = {requested!r}")
    frames = np.asarray(sample())
    integers = np.issubdtype(frames.dtype, np.integer)
    values = frames.astype(np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return LossChoice(FLOAT_LOSS, "auto", "no finite intensities sampled")
    lowest = float(values.min())
    if lowest < 0:
        return LossChoice(
            FLOAT_LOSS, "auto", f"negative intensities (min {lowest:.4g}): not photon counts"
        )
    # integers are counts (of photons, or of a gain's units: the minimiser is the same)
    quantum = 1.0 if integers else intensity_quantum(values)
    if quantum is None:
        return LossChoice(
            FLOAT_LOSS,
            "auto",
            "floating-point intensities on no common quantum (or above 2^24 quanta): not "
            "photon counts",
        )
    counts = values / quantum
    dark = lowest / quantum
    if dark > max(0.5, DARK_SHARE * counts.mean()):
        return LossChoice(
            FLOAT_LOSS,
            "auto",
            f"counts of quantum {quantum:.4g} with a dark level of {dark:.4g} (mean "
            f"{counts.mean():.4g}; no pixel reads zero): a pedestal the Poisson model does "
            "not have",
        )
    return LossChoice(
        COUNTS_LOSS,
        "auto",
        f"photon counts: whole multiples of {quantum:.4g}, dark pixels at zero, mean "
        f"{counts.mean():.3g} counts per pixel (max {counts.max():.4g}); amplitude least "
        "squares, the variance-stabilised Poisson likelihood",
    )


#: what `auto` chooses for data that are not photon counts
FLOAT_LOSS = "smooth_l1"

#: what `auto` chooses for photon counts (the module docstring says why not `poisson`)
COUNTS_LOSS = "gaussian"

#: a darkest pixel above this share of the mean count (and above half a quantum) is taken
#: for a pedestal; below it, a high dose that left no pixel dark, which Poisson still models
DARK_SHARE = 1e-3

#: most quanta a count may hold: float32 represents whole numbers exactly up to 2^24
MAX_COUNTS = 2.0**24


def intensity_quantum(values: np.ndarray) -> float | None:
    """The quantum q such that every value is a whole multiple of it (photon counts times a
    gain), or None: q is the smallest gap between distinct values, accepted when every value
    lies within float32 rounding of a multiple and the largest is at most 2^24 quanta."""
    distinct = np.unique(values)
    if len(distinct) < 2:
        return None
    gaps = np.diff(distinct)
    quantum = float(gaps.min())
    if quantum <= 0 or float(distinct[-1]) / quantum > MAX_COUNTS:
        return None
    # the smallest gap itself may be off by float32 rounding: take the mean unit gap
    unit = np.abs(gaps / quantum - 1.0) < 1e-3
    quantum = float(gaps[unit].mean())
    ratio = distinct / quantum
    tolerance = 1e-3 + 4 * np.finfo(np.float32).eps * ratio
    if not np.all(np.abs(ratio - np.round(ratio)) <= tolerance):
        return None
    return quantum


def get_loss(name: str) -> Loss:
    """The loss registered under `name` (train.loss)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(
            f"train.loss = {name!r}: expected one of {', '.join(sorted(LOSSES))}"
        ) from None
