"""Simulated ptychography scans following the paper's protocol (Methods, Fig. S1).

Object: amplitude from one image and phase from another, both shipped with scikit-image.
Probe: a zone-plate-like focus (annular pupil with central stop, small defocus) so it has
rings and real phase structure, or (`probe = "zone_plate"`) a real zone plate's beam at a
given distance from its focus (ptyinr.optics), as nanoprobe beamlines use it. Scans: raster
with step set by the overlap ratio 1 - step / width (the focus' intensity FWHM, or the diameter
holding 90 % of a defocused beam's intensity), Fermat spiral, or jittered raster. Noise:
equations (6)-(8) with negatives clipped, or `counts`: Poisson photon counts of the given dose,
stored as integers as a photon-counting detector writes them. Ground truth travels with the
data. `export_raw_hdf5` writes a scan the way a beamline file holds it (zero
frequency in the frame corner, positions in pixels) to exercise `ptyinr ingest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field
from skimage import data as skdata
from skimage.transform import resize

from ptyinr.geometry import energy_ev_to_wavelength_m, object_pixel_size_m
from ptyinr.optics import beam_diameter_px, probe_fwhm_px, zone_plate_probe

GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))


class SimulationConfig(BaseModel):
    """Everything that defines a simulated scan; defaults are the paper's setup."""

    model_config = ConfigDict(extra="forbid")

    object_size: int = Field(241, ge=16, description="object pixels per side")
    probe_size: int = Field(64, ge=8, description="probe / detector frame pixels per side")
    overlap: float = Field(0.4, lt=1.0, description="1 - step / probe FWHM (negative: gaps)")
    scan: Literal["raster", "spiral", "jitter"] = "raster"
    jitter: float = Field(0.25, ge=0, le=1, description="jitter, fraction of the step")
    noise: Literal["clean", "poisson", "gaussian", "mixed", "counts"] = Field(
        "clean",
        description="clean; poisson/gaussian/mixed: the paper's eqs (6)-(8); counts: Poisson "
        "photon counts of `photons_per_frame` per clear frame, stored as integers",
    )
    alpha: float = Field(10.0, gt=0, description="Poisson photon-count scale, eq. (6)")
    sigma: float = Field(100.0, ge=0, description="Gaussian noise sigma, eq. (7)")
    photons_per_frame: float = Field(1e9, gt=0, description="total counts of a clear frame")
    probe: Literal["focus", "zone_plate"] = Field(
        "focus",
        description="focus: the paper's annular focus of `focus_fwhm_px`; zone_plate: a zone "
        "plate's beam `defocus_m` from its focus (ptyinr.optics)",
    )
    focus_fwhm_px: float = Field(5.0, gt=1, description="design focal-spot FWHM in pixels")
    defocus_waves: float = Field(0.5, description="defocus phase at the pupil edge, in waves")
    zone_plate_diameter_m: float = Field(160e-6, gt=0)
    outer_zone_width_m: float = Field(50e-9, gt=0)
    central_stop_diameter_m: float = Field(60e-6, ge=0)
    defocus_m: float = Field(0.0, description="sample distance downstream of the focus")
    energy_ev: float = Field(15000.0, gt=0)
    detector_distance_m: float = Field(1.2, gt=0)
    detector_pixel_size_m: float = Field(75e-6, gt=0)
    amplitude_image: str = "camera"
    phase_image: str = "coins"
    amplitude_range: tuple[float, float] = (0.3, 1.0)
    phase_range: tuple[float, float] = (-1.0, 1.0)
    seed: int = 0


def _image(name: str) -> np.ndarray:
    loader = getattr(skdata, name, None)
    if loader is None:
        raise ValueError(f"scikit-image has no data image {name!r}")
    img = np.asarray(loader(), dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    return (img - img.min()) / max(img.max() - img.min(), 1e-12)


def make_object(config: SimulationConfig) -> np.ndarray:
    """Complex object: amplitude and phase from two different images, resized and rescaled."""
    n = config.object_size
    amp = resize(_image(config.amplitude_image), (n, n), anti_aliasing=True)
    phase = resize(_image(config.phase_image), (n, n), anti_aliasing=True)
    lo, hi = config.amplitude_range
    plo, phi = config.phase_range
    return ((lo + (hi - lo) * amp) * np.exp(1j * (plo + (phi - plo) * phase))).astype(np.complex64)


def make_probe(config: SimulationConfig) -> np.ndarray:
    """The simulation's probe (max amplitude 1): the paper's focus or a zone plate's beam."""
    if config.probe == "zone_plate":
        wavelength = energy_ev_to_wavelength_m(config.energy_ev)
        pixel = object_pixel_size_m(
            wavelength,
            config.detector_distance_m,
            config.detector_pixel_size_m,
            (config.probe_size, config.probe_size),
        )
        return zone_plate_probe(
            (config.probe_size, config.probe_size),
            wavelength_m=wavelength,
            pixel_size_m=pixel,
            diameter_m=config.zone_plate_diameter_m,
            outer_zone_width_m=config.outer_zone_width_m,
            central_stop_diameter_m=config.central_stop_diameter_m,
            defocus_m=config.defocus_m,
        )
    return annular_focus_probe(config)


def annular_focus_probe(config: SimulationConfig) -> np.ndarray:
    """Zone-plate-like probe: focus of an annular pupil with central stop and small defocus.

    The pupil radius sets the focal spot (an Airy-like core of ~`focus_fwhm_px`), the central
    stop adds the characteristic rings, the defocus a real phase structure. Max amplitude 1.
    """
    n = config.probe_size
    f = np.fft.fftshift(np.fft.fftfreq(n))
    fy, fx = np.meshgrid(f, f, indexing="ij")
    rho = np.hypot(fy, fx)
    outer = 0.514 / config.focus_fwhm_px  # Airy FWHM ~ 1.03 / (2 * NA) in these units
    inner = 0.35 * outer
    pupil = ((rho <= outer) & (rho >= inner)).astype(np.float64)
    defocus = np.exp(1j * 2 * np.pi * config.defocus_waves * (rho / outer) ** 2)
    field = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil * defocus)))
    return (field / np.abs(field).max()).astype(np.complex64)


def scan_positions(
    config: SimulationConfig, fwhm_px: float, rng: np.random.Generator
) -> np.ndarray:
    """Window-centre positions (n, 2) in object pixels, keeping every window inside the object."""
    n_obj, n_probe = config.object_size, config.probe_size
    low = n_probe // 2
    high = n_obj - n_probe + n_probe // 2  # last centre whose window still fits
    span = high - low
    step = max(fwhm_px * (1.0 - config.overlap), 0.5)
    if config.scan == "spiral":
        area = span * span
        count = max(round(area / step**2), 1)
        k = np.arange(count)
        radius = step * np.sqrt(k / np.pi) * 1.0
        theta = k * GOLDEN_ANGLE
        pos = np.stack([radius * np.sin(theta), radius * np.cos(theta)], axis=1)
        pos += (low + high) / 2.0
        inside = np.all((pos >= low) & (pos <= high), axis=1)
        return pos[inside]
    steps = max(int(np.floor(span / step)) + 1, 1)
    used = (steps - 1) * step
    axis = low + (span - used) / 2.0 + step * np.arange(steps)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1)
    if config.scan == "jitter":
        pos = pos + rng.uniform(-0.5, 0.5, size=pos.shape) * config.jitter * step
        pos = np.clip(pos, low, high)
    return pos


def clean_intensities(obj: np.ndarray, probe: np.ndarray, positions_px: np.ndarray) -> np.ndarray:
    """Noise-free centred intensities through the physics forward model (float32)."""
    import torch

    from ptyinr.physics import ScanGeometry, forward_intensity

    geometry = ScanGeometry.from_positions(
        positions_px, probe.shape, object_shape=obj.shape, origin_px=(0, 0)
    )
    index = geometry.window_flat_indices()
    patches = torch.as_tensor(obj).reshape(-1)[index]
    shifts = torch.as_tensor(geometry.subpixel, dtype=torch.float32)
    with torch.no_grad():
        out = forward_intensity(torch.as_tensor(probe), patches, shifts)
    return out.numpy().astype(np.float32)


def add_noise(clean: np.ndarray, config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Equations (6)-(8): Poisson with alpha, Gaussian with sigma, mixed; negatives clipped."""
    if config.noise == "clean":
        return clean
    if config.noise == "counts":
        return rng.poisson(np.clip(clean, 0, None)).astype(np.uint32)
    noisy = clean.astype(np.float64)
    if config.noise in ("poisson", "mixed"):
        peak = float(clean.max())
        noisy = peak / config.alpha * rng.poisson(clean / peak * config.alpha)
    if config.noise in ("gaussian", "mixed"):
        noisy = noisy + rng.normal(0.0, config.sigma, size=clean.shape)
    return np.clip(noisy, 0.0, None).astype(np.float32)


def simulate_scan(config: SimulationConfig) -> dict[str, object]:
    """Arrays and metadata of one simulated scan (no I/O)."""
    rng = np.random.default_rng(config.seed)
    obj = make_object(config)
    probe = make_probe(config)
    fwhm = probe_fwhm_px(probe)
    # overlap is measured against the probe's width: the focal spot's FWHM, or for a
    # ring-structured defocused beam the diameter holding 90 % of its intensity
    width = beam_diameter_px(probe) if config.probe == "zone_plate" else fwhm
    positions = scan_positions(config, width, rng)
    clean = clean_intensities(obj, probe, positions)
    # Scale so that a clear (amplitude-1) frame holds `photons_per_frame` counts.
    scale = config.photons_per_frame / float(np.sum(np.abs(probe) ** 2))
    probe = (probe * np.sqrt(scale)).astype(np.complex64)
    clean = clean * np.float32(scale)
    intensities = add_noise(clean, config, rng)
    wavelength = energy_ev_to_wavelength_m(config.energy_ev)
    pixel = object_pixel_size_m(
        wavelength, config.detector_distance_m, config.detector_pixel_size_m, probe.shape
    )
    return {
        "object": obj,
        "probe": probe,
        "positions_px": positions,
        "intensities": intensities,
        "fwhm_px": fwhm,
        "width_px": width,
        "wavelength_m": wavelength,
        "pixel_size_m": pixel,
    }


def write_simulated_store(
    path: str | Path, config: SimulationConfig, overwrite: bool = False
) -> Path:
    """Simulate and write a scan store with ground truth (`true_object`, `true_probe`)."""
    from ptyinr import store

    sim = simulate_scan(config)
    sy, sx = sim["pixel_size_m"]  # type: ignore[misc]
    positions_m = np.asarray(sim["positions_px"]) * np.array([sy, sx])
    obj = np.asarray(sim["object"])
    probe = np.asarray(sim["probe"])
    n = obj.shape[0]
    ny, nx = probe.shape
    # The transmission is dimensionless and |probe|^2 is in counts (store.VARIABLE_LABELS);
    # the coordinates are in metres.
    true_object = xr.DataArray(
        obj,
        dims=("true_object_y", "true_object_x"),
        coords={
            "true_object_y": ("true_object_y", np.arange(n) * sy, {"units": "m"}),
            "true_object_x": ("true_object_x", np.arange(n) * sx, {"units": "m"}),
        },
        attrs={**store.variable_label("true_object"), "description": "ground truth"},
    )
    true_probe = xr.DataArray(
        probe,
        dims=("probe_y", "probe_x"),
        coords={
            "probe_y": ("probe_y", (np.arange(ny) - ny // 2) * sy, {"units": "m"}),
            "probe_x": ("probe_x", (np.arange(nx) - nx // 2) * sx, {"units": "m"}),
        },
        attrs={**store.variable_label("true_probe"), "description": "ground truth"},
    )
    attrs = {
        "wavelength_m": float(sim["wavelength_m"]),  # type: ignore[arg-type]
        "detector_distance_m": config.detector_distance_m,
        "detector_pixel_size_m": config.detector_pixel_size_m,
        "positions_unit": "m",
        "scan_id": Path(path).name.removesuffix(".zarr"),
        "source": "ptyinr simulate",
        "simulation": config.model_dump_json(),
        "probe_fwhm_px": float(sim["fwhm_px"]),  # type: ignore[arg-type]
        "probe_width_px": float(sim["width_px"]),  # type: ignore[arg-type]
    }
    return store.create_scan_store(
        path,
        np.asarray(sim["intensities"]),
        positions_m,
        attrs=attrs,
        extra_vars={"true_object": true_object, "true_probe": true_probe},
        overwrite=overwrite,
    )


def export_raw_hdf5(path: str | Path, config: SimulationConfig) -> Path:
    """Write a simulated scan as a beamline file holds it, for `ptyinr ingest`: frames with the
    zero frequency in the corner (`/entry/data/data`, detector counts), positions in object
    pixels (`/entry/positions`, (y, x)), energy and detector geometry as scalars under
    `/entry/instrument`. Returns the path."""
    import h5py

    sim = simulate_scan(config)
    frames = np.fft.ifftshift(np.asarray(sim["intensities"]), axes=(-2, -1))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("entry/data/data", data=frames, chunks=(1, *frames.shape[1:]))
        f.create_dataset("entry/positions", data=np.asarray(sim["positions_px"]))
        f["entry/positions"].attrs["units"] = "px"
        f.create_dataset("entry/instrument/energy_ev", data=config.energy_ev)
        f.create_dataset("entry/instrument/detector_distance_m", data=config.detector_distance_m)
        f.create_dataset(
            "entry/instrument/detector_pixel_size_m", data=config.detector_pixel_size_m
        )
    tmp.replace(path)
    return path
