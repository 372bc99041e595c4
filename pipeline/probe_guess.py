"""Where an unknown probe starts: estimated from the data, the optics, or a file.

A joint object/probe fit only finds the probe near where it starts. The old start, the inverse
FFT of the mean diffraction amplitude with a flat phase, is a focal spot: right for a focused
beam, but most nanoprobe ptychography puts the sample out of focus, where the beam is a
ring-structured disk tens of pixels wide, and a fit started from a 3-pixel spot collapses.

`model.probe_init` chooses the start (every start is then refined by the reconstruction):

- "data": the pupil is the bright-field disk of the mean pattern (its amplitude, the measured
  one; its radius, the convergence angle). The unknown is the defocus, i.e. the beam's size at
  the sample: candidate sizes from a focal spot to most of the window are each scored by a short
  error-reduction fit of a pixel object with that probe held fixed on a compact patch of the
  scan (a few tenths of a second each); the best one, refined and checked for the sign of the
  defocus, starts the reconstruction. The trial scores go into the run's record. Sparse scans
  (steps above a quarter of the window) cannot tell sizes apart and start focused.
- "optics": a zone plate or lens from the `[probe]` section (ptyinr.optics).
- "file": a guess from a file or another run (ptyinr.probe_files).
- "random": the paper's uniform random start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ptyinr import optics
from ptyinr.config import ProbeConfig, ReconstructionConfig
from ptyinr.errors import InputError
from ptyinr.geometry import energy_ev_to_wavelength_m, object_pixel_size_m
from ptyinr.physics import ScanGeometry, fourier_shift

TRIAL_POSITIONS = 32  # positions of the compact patch the defocus trials fit
TRIAL_ITERATIONS = 12  # error-reduction iterations per trial
SIZE_RATIO = 1.3  # geometric step between candidate beam diameters
BRIGHT_FIELD_LEVEL = 0.1  # share of the mean pattern's peak that counts as bright field
# Trial fits tell beam sizes apart only where windows overlap: without overlap a free object
# explains any probe's data and the score just prefers wider beams (measured on the paper's
# -540 % case). Above this scan step (a share of the window) the focused start is kept.
MAX_SEARCH_STEP = 0.25


@dataclass
class ProbeStart:
    """A starting probe (None: the representation's own random start) and how it was made."""

    probe: np.ndarray | None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialData:
    """What the defocus trials fit: measured amplitudes (B, Ny, Nx, zero frequency centred)
    of a compact patch of positions, their geometry, and the detector's valid pixels."""

    amplitudes: torch.Tensor
    geometry: ScanGeometry
    valid: torch.Tensor | None


def compact_patch(centres: np.ndarray, count: int = TRIAL_POSITIONS) -> np.ndarray:
    """Indices of the `count` positions nearest the scan's centre (sorted): a patch whose
    windows overlap as much as the scan allows."""
    centres = np.asarray(centres, dtype=np.float64)
    middle = np.median(centres, axis=0)
    nearest = np.argsort(np.hypot(*(centres - middle).T), kind="stable")[:count]
    return np.sort(nearest)


def scan_step_px(centres: np.ndarray) -> float:
    """Median distance (pixels) from a position to its nearest neighbour: the scan step."""
    from scipy.spatial import cKDTree

    centres = np.asarray(centres, dtype=np.float64)
    if len(centres) < 2:
        return math.inf
    distances, _ = cKDTree(centres).query(centres, k=2)
    return float(np.median(distances[:, 1]))


def measured_pupil(mean_intensity: np.ndarray) -> tuple[np.ndarray, float]:
    """Pupil amplitude (centred) and its radius in cycles per pixel, from the mean pattern:
    sqrt of the mean intensity over its bright-field disk (grown by a pixel), zero outside,
    where only light scattered by the object falls."""
    pattern = np.asarray(mean_intensity, dtype=np.float64)
    pattern = np.clip(np.nan_to_num(pattern, nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    radius = optics.bright_field_radius(pattern, BRIGHT_FIELD_LEVEL)
    smooth = ndimage.uniform_filter(pattern, size=3)
    bright = smooth > BRIGHT_FIELD_LEVEL * float(np.percentile(smooth, 99.9))
    bright = ndimage.binary_dilation(bright, iterations=1)
    return np.sqrt(pattern) * bright, radius


def error_reduction_loss(probe: np.ndarray, trial: TrialData, iterations: int) -> float:
    """Relative Fourier-amplitude error after `iterations` of error reduction with the probe
    held fixed and a free pixel object: how well this probe can explain the patch's data.
    Scale-free (the object absorbs the probe's scale)."""
    geometry = trial.geometry
    device = trial.amplitudes.device
    base = torch.as_tensor(probe, dtype=torch.complex64, device=device)
    shifts = torch.as_tensor(geometry.subpixel, dtype=torch.float32, device=device)
    probes = fourier_shift(base, shifts) if bool(shifts.abs().max() > 1e-6) else base[None]
    probes = probes.expand(len(trial.amplitudes), -1, -1)
    index = geometry.window_flat_indices(device).reshape(len(probes), -1)
    size = geometry.object_shape[0] * geometry.object_shape[1]
    flat_index = index.reshape(-1)
    weight = torch.zeros(size, device=device).index_add_(
        0, flat_index, probes.abs().square().reshape(-1)
    )
    weight = weight + 1e-3 * weight.max()
    measured = torch.fft.ifftshift(torch.nan_to_num(trial.amplitudes), dim=(-2, -1))
    valid = None if trial.valid is None else torch.fft.ifftshift(trial.valid, dim=(-2, -1))
    obj = torch.ones(size, dtype=torch.complex64, device=device)
    norm = (
        float(measured.square().sum())
        if valid is None
        else float((measured.square() * valid).sum())
    )
    error = math.inf
    for _ in range(iterations + 1):
        exit_wave = probes * obj[index].reshape(probes.shape)
        far = torch.fft.fft2(exit_wave, norm="ortho")
        modulus = far.abs()
        residual = (modulus - measured).square()
        if valid is not None:
            residual = residual * valid
        error = float(residual.sum()) / max(norm, 1e-30)
        corrected = measured * far / modulus.clamp_min(1e-12)
        if valid is not None:
            corrected = torch.where(valid, corrected, far)
        revised = torch.fft.ifft2(corrected, norm="ortho")
        numerator = torch.zeros(size, dtype=torch.complex64, device=device).index_add_(
            0, flat_index, (probes.conj() * revised).reshape(-1)
        )
        obj = numerator / weight
    return error


def probe_from_data(
    mean_intensity: np.ndarray,
    trial: TrialData | None,
    search: bool = True,
    iterations: int = TRIAL_ITERATIONS,
) -> ProbeStart:
    """The data-derived start (see the module docstring). Without `trial` data or with
    `search` off: the focused probe (inverse FFT of the mean amplitude, flat phase)."""
    pupil, radius = measured_pupil(mean_intensity)
    shape = pupil.shape
    record: dict[str, Any] = {
        "method": "data",
        "bright_field_radius_cycles_per_px": radius,
    }
    step = None if trial is None else scan_step_px(trial.geometry.window_centres_on_grid())
    sparse = step is not None and step > MAX_SEARCH_STEP * min(shape)
    if trial is None or not search or sparse:
        probe = optics.pupil_to_probe(np.sqrt(np.clip(np.nan_to_num(mean_intensity), 0, None)), 0)
        record["defocus_search"] = False
        if sparse:
            record["scan_step_px"] = step
            record["focused_because"] = (
                f"scan step {step:.3g} px > {MAX_SEARCH_STEP:g} x the window: too little "
                "overlap to tell beam sizes apart"
            )
        return ProbeStart(probe, record)
    largest = 0.75 * min(shape)
    diameters = [0.0]
    size = 3.0
    while size <= largest:
        diameters.append(size)
        size *= SIZE_RATIO
    scores: dict[float, float] = {}

    def score(diameter: float, sign: float = 1.0) -> float:
        key = sign * diameter
        if key not in scores:
            defocus = sign * optics.defocus_for_diameter(diameter, radius)
            scores[key] = error_reduction_loss(
                optics.pupil_to_probe(pupil, defocus), trial, iterations
            )
        return scores[key]

    best = min(diameters, key=score)
    if best > 0:  # refine between the neighbouring candidates, then the defocus' sign
        half_ratio = math.sqrt(SIZE_RATIO)
        best = min((best / half_ratio, best, best * half_ratio), key=score)
        sign = -1.0 if score(best, -1.0) < score(best, 1.0) else 1.0
    else:
        sign = 1.0
    defocus = sign * optics.defocus_for_diameter(best, radius)
    record.update(
        {
            "defocus_search": True,
            "scan_step_px": step,
            "beam_diameter_px": best,
            "defocus_dimensionless": defocus,
            "trial_positions": len(trial.amplitudes),
            "trial_iterations": iterations,
            "trials": {f"{k:.3g}": v for k, v in sorted(scores.items())},
        }
    )
    return ProbeStart(optics.pupil_to_probe(pupil, defocus), record)


def probe_from_optics(
    probe: ProbeConfig,
    frame_shape: tuple[int, int],
    wavelength_m: float | None,
    pixel_size_m: tuple[float, float] | None,
    detector: tuple[float | None, float | None] = (None, None),
) -> ProbeStart:
    """The `[probe]` section's zone plate or lens at the sample. Energy and detector geometry
    come from the store unless the section overrides them; a store without them (pixel
    positions) needs all three in the section."""
    if probe.diameter_m is None:
        raise InputError(
            "model.probe_init = 'optics': [probe] diameter_m is not set; give the zone plate's "
            "diameter_m and focal_length_m or outer_zone_width_m"
        )
    wavelength = energy_ev_to_wavelength_m(probe.energy_ev) if probe.energy_ev else wavelength_m
    distance = probe.detector_distance_m or detector[0]
    pixel = probe.detector_pixel_size_m or detector[1]
    if probe.detector_distance_m or probe.detector_pixel_size_m or pixel_size_m is None:
        if wavelength is None or distance is None or pixel is None:
            raise InputError(
                "model.probe_init = 'optics': the store has no energy / detector geometry; "
                "set [probe] energy_ev, detector_distance_m and detector_pixel_size_m"
            )
        pixel_size_m = object_pixel_size_m(wavelength, distance, pixel, frame_shape)
    if wavelength is None:
        raise InputError("model.probe_init = 'optics': no wavelength; set [probe] energy_ev")
    array = optics.zone_plate_probe(
        frame_shape,
        wavelength_m=wavelength,
        pixel_size_m=pixel_size_m,
        diameter_m=probe.diameter_m,
        focal_length_m=probe.focal_length_m,
        outer_zone_width_m=probe.outer_zone_width_m,
        central_stop_diameter_m=probe.central_stop_diameter_m,
        defocus_m=probe.defocus_m,
    )
    record = {
        "method": "optics",
        "wavelength_m": wavelength,
        "pixel_size_m": list(pixel_size_m),
        "beam_diameter_px": optics.beam_diameter_px(array),
    }
    return ProbeStart(array, record)


def probe_from_file(
    source: str | None, frame_shape: tuple[int, int], pixel_size_m: tuple[float, float] | None
) -> ProbeStart:
    """A guess from a file or a run (ptyinr.probe_files), on this scan's probe grid."""
    from ptyinr.probe_files import load_probe_guess

    if not source:
        raise InputError(
            "model.probe_init = 'file': no probe.guess given; pass --probe-guess FILE "
            "(.npy, .npz, HDF5/CXI[:/dataset], or STORE.zarr:RUN)"
        )
    guess = load_probe_guess(source, frame_shape, pixel_size_m)
    record = {
        "method": "file",
        "source": guess.source,
        "resampled": bool(guess.resampled),
        "file_pixel_size_m": None if guess.pixel_size_m is None else list(guess.pixel_size_m),
    }
    return ProbeStart(guess.array, record)


def choose_probe_start(
    config: ReconstructionConfig,
    frame_shape: tuple[int, int],
    mean_intensity: Any,
    trial: Any,
    *,
    wavelength_m: float | None = None,
    pixel_size_m: tuple[float, float] | None = None,
    detector: tuple[float | None, float | None] = (None, None),
) -> ProbeStart:
    """The start `model.probe_init` asks for. `mean_intensity` and `trial` are callables, so
    the frames are only touched when the data-derived start needs them."""
    kind = config.model.probe_init
    if kind == "random":
        return ProbeStart(None, {"method": "random"})
    if kind == "optics":
        return probe_from_optics(config.probe, frame_shape, wavelength_m, pixel_size_m, detector)
    if kind == "file":
        return probe_from_file(config.probe.guess, frame_shape, pixel_size_m)
    search = config.probe.search_defocus
    return probe_from_data(mean_intensity(), trial() if search else None, search)
