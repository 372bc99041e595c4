"""The simulator against the paper's protocol: noise equations (6)-(8), FWHM, scans, store.

Noise statistics are checked against the equations' moments on large constant fields, not
against the implementation: eq. (6) I_P = max(I)/alpha * Poisson(I / max(I) * alpha) has mean
I and variance I * max(I) / alpha, and takes only values k * max(I) / alpha.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from skimage import data as skdata
from skimage.transform import resize

from ptyinr import store
from ptyinr.physics import ScanGeometry, forward_intensity
from ptyinr.simulate import (
    SimulationConfig,
    add_noise,
    make_object,
    make_probe,
    probe_fwhm_px,
    scan_positions,
    simulate_scan,
    write_simulated_store,
)

TINY = dict(object_size=48, probe_size=16, focus_fwhm_px=3.0, overlap=0.3)


def _noisy(field: np.ndarray, **kwargs: object) -> np.ndarray:
    config = SimulationConfig(**kwargs)
    return add_noise(field.astype(np.float32), config, np.random.default_rng(0)).astype(np.float64)


# ------------------------------------------------------------------------------ noise


def test_poisson_noise_moments_equation_6():
    peak, alpha = 5000.0, 10.0
    field = np.full((60, 64, 64), peak)
    field[30:] = peak / 4  # a second level: variance scales with max(I), not with I
    noisy = _noisy(field, noise="poisson", alpha=alpha)
    for level in (peak, peak / 4):
        values = noisy[field == level]
        assert values.mean() == pytest.approx(level, rel=0.01)
        assert values.var() == pytest.approx(level * peak / alpha, rel=0.03)
    quanta = noisy / (peak / alpha)
    np.testing.assert_allclose(quanta, np.round(quanta), atol=1e-3)  # multiples of max/alpha


def test_poisson_noise_strength_follows_alpha():
    field = np.full((40, 64, 64), 100.0)
    low, high = (
        _noisy(field, noise="poisson", alpha=5.0),
        _noisy(field, noise="poisson", alpha=500.0),
    )
    # relative std = 1 / sqrt(alpha) on a constant field
    assert low.std() / 100.0 == pytest.approx(1 / math.sqrt(5.0), rel=0.03)
    assert high.std() / 100.0 == pytest.approx(1 / math.sqrt(500.0), rel=0.03)


def test_gaussian_noise_moments_equation_7():
    level, sigma = 1e5, 100.0  # far above zero: clipping never happens
    noisy = _noisy(np.full((40, 64, 64), level), noise="gaussian", sigma=sigma)
    assert noisy.mean() == pytest.approx(level, abs=3 * sigma / math.sqrt(noisy.size) + 1)
    assert noisy.std() == pytest.approx(sigma, rel=0.01)


def test_mixed_noise_variance_equation_8():
    level, alpha, sigma = 2000.0, 10.0, 100.0
    noisy = _noisy(np.full((40, 64, 64), level), noise="mixed", alpha=alpha, sigma=sigma)
    assert noisy.mean() == pytest.approx(level, rel=0.01)
    assert noisy.var() == pytest.approx(level * level / alpha + sigma**2, rel=0.03)


def test_negative_values_are_clipped_to_zero():
    sigma = 100.0
    noisy = _noisy(np.zeros((40, 64, 64)), noise="gaussian", sigma=sigma)
    assert noisy.min() == 0.0
    assert np.mean(noisy == 0) == pytest.approx(0.5, abs=0.01)
    # mean of max(N(0, s^2), 0) = s / sqrt(2 pi)
    assert noisy.mean() == pytest.approx(sigma / math.sqrt(2 * math.pi), rel=0.02)


def test_clean_data_is_unchanged():
    field = np.random.default_rng(1).uniform(0, 10, (3, 8, 8)).astype(np.float32)
    out = add_noise(field, SimulationConfig(noise="clean"), np.random.default_rng(0))
    np.testing.assert_array_equal(out, field)


def test_noisy_store_differs_from_clean_only_by_noise():
    clean = simulate_scan(SimulationConfig(**TINY))
    noisy = simulate_scan(SimulationConfig(**TINY, noise="poisson", alpha=10.0))
    np.testing.assert_array_equal(clean["positions_px"], noisy["positions_px"])
    assert not np.array_equal(clean["intensities"], noisy["intensities"])
    assert noisy["intensities"].min() >= 0
    # unbiased: total counts agree to a fraction of a percent
    assert noisy["intensities"].sum() == pytest.approx(clean["intensities"].sum(), rel=0.01)


# ------------------------------------------------------------------------------ probe


@pytest.mark.parametrize("fwhm", [4.0, 7.3, 12.5])
def test_fwhm_of_a_gaussian_probe(fwhm):
    n = 64
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    r2 = (yy - 30.4) ** 2 + (xx - 33.0) ** 2  # off-centre, off-grid peak
    intensity = np.exp(-4 * math.log(2) * r2 / fwhm**2)
    probe = np.sqrt(intensity) * np.exp(1j * 0.1 * xx)  # the phase must not matter
    assert probe_fwhm_px(probe) == pytest.approx(fwhm, abs=0.05 * fwhm)


def test_probe_is_focused_with_rings_and_phase():
    config = SimulationConfig(probe_size=64, focus_fwhm_px=5.0)
    probe = make_probe(config)
    assert probe.dtype == np.complex64 and probe.shape == (64, 64)
    assert np.abs(probe).max() == pytest.approx(1.0, rel=1e-6)
    assert np.unravel_index(np.argmax(np.abs(probe)), probe.shape) == (32, 32)
    assert probe_fwhm_px(probe) == pytest.approx(5.0, rel=0.25)
    # rings: the radial amplitude profile has more than one local maximum
    profile = np.abs(probe[32, 32:])
    peaks = np.flatnonzero((profile[1:-1] > profile[:-2]) & (profile[1:-1] > profile[2:]))
    assert len(peaks) >= 1
    # a real phase structure inside the bright region (not flat)
    bright = np.abs(probe) > 0.1
    assert np.ptp(np.angle(probe[bright] / probe[32, 32])) > 0.5


# ------------------------------------------------------------------------------ scans


@pytest.mark.parametrize("overlap", [0.4, -1.0, -5.4])
def test_raster_step_is_fwhm_times_one_minus_overlap(overlap):
    config = SimulationConfig(object_size=241, probe_size=64, overlap=overlap)
    fwhm = 4.7
    pos = scan_positions(config, fwhm, np.random.default_rng(0))
    ys, xs = np.unique(pos[:, 0]), np.unique(pos[:, 1])
    assert len(pos) == len(ys) * len(xs)
    np.testing.assert_allclose(np.diff(ys), fwhm * (1 - overlap), rtol=1e-9)
    np.testing.assert_allclose(np.diff(xs), fwhm * (1 - overlap), rtol=1e-9)


def _windows_inside(pos: np.ndarray, object_size: int, probe_size: int) -> bool:
    top_left = np.floor(pos - probe_size // 2 + 0.5)  # nearest whole-pixel window
    return bool(np.all(top_left >= 0) and np.all(top_left + probe_size <= object_size))


@pytest.mark.parametrize("scan", ["raster", "spiral", "jitter"])
def test_scan_windows_stay_inside_the_object(scan):
    config = SimulationConfig(object_size=100, probe_size=32, overlap=0.2, scan=scan)
    pos = scan_positions(config, 4.0, np.random.default_rng(0))
    assert _windows_inside(pos, 100, 32)


def test_spiral_scan_density_matches_the_step():
    config = SimulationConfig(object_size=100, probe_size=32, overlap=0.2, scan="spiral")
    step = 4.0 * 0.8
    pos = scan_positions(config, 4.0, np.random.default_rng(0))
    raster = scan_positions(config.model_copy(update={"scan": "raster"}), 4.0, None)
    assert 0.6 * len(raster) <= len(pos) <= 1.1 * len(raster)
    distance = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)
    nearest = distance.min(axis=1)
    assert nearest.min() > 0.3 * step  # no two points on top of each other
    assert 0.6 * step < np.median(nearest) < 1.4 * step
    assert len(np.unique(np.round(pos, 6), axis=0)) == len(pos)


def test_jitter_scan_moves_raster_points_by_at_most_half_the_jitter():
    config = SimulationConfig(
        object_size=100, probe_size=32, overlap=0.2, scan="jitter", jitter=0.4
    )
    step = 4.0 * 0.8
    raster = scan_positions(config.model_copy(update={"scan": "raster"}), 4.0, None)
    jittered = scan_positions(config, 4.0, np.random.default_rng(0))
    assert jittered.shape == raster.shape
    moved = np.abs(jittered - raster)
    assert moved.max() <= 0.5 * 0.4 * step + 1e-9
    assert np.mean(moved > 0.05 * step) > 0.5  # most points really moved
    other = scan_positions(config, 4.0, np.random.default_rng(1))
    assert not np.allclose(other, jittered)


# ------------------------------------------------------------------------------ object


def _reference_image(name: str, n: int) -> np.ndarray:
    img = np.asarray(getattr(skdata, name)(), dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    return resize(img, (n, n), anti_aliasing=True)


def test_object_amplitude_and_phase_come_from_two_images():
    config = SimulationConfig(object_size=64, amplitude_image="camera", phase_image="coins")
    obj = make_object(config)
    assert obj.dtype == np.complex64 and obj.shape == (64, 64)
    amplitude, phase = np.abs(obj), np.angle(obj)
    assert amplitude.min() >= 0.3 - 1e-6 and amplitude.max() <= 1.0 + 1e-6
    assert phase.min() >= -1.0 - 1e-6 and phase.max() <= 1.0 + 1e-6
    camera, coins = _reference_image("camera", 64), _reference_image("coins", 64)
    assert pearsonr(amplitude.ravel(), camera.ravel())[0] > 0.99
    assert pearsonr(phase.ravel(), coins.ravel())[0] > 0.99
    assert abs(pearsonr(amplitude.ravel(), phase.ravel())[0]) < 0.5  # two different images
    swapped = make_object(
        config.model_copy(update={"amplitude_image": "coins", "phase_image": "camera"})
    )
    assert pearsonr(np.abs(swapped).ravel(), coins.ravel())[0] > 0.99


def test_unknown_image_is_refused():
    with pytest.raises(ValueError, match="no_such_image"):
        make_object(SimulationConfig(object_size=16, amplitude_image="no_such_image"))


# ------------------------------------------------------------------------------ store


def test_store_holds_ground_truth_and_positions_in_metres(tmp_path):
    config = SimulationConfig(**TINY, seed=3)
    sim = simulate_scan(config)
    path = write_simulated_store(tmp_path / "sim.zarr", config)
    ds = store.open_scan_store(path)

    n = 16
    wavelength = 1.239841984e-6 / config.energy_ev
    pixel = wavelength * config.detector_distance_m / (n * config.detector_pixel_size_m)
    assert ds.attrs["positions_unit"] == "m"
    assert ds.attrs["wavelength_m"] == pytest.approx(wavelength, rel=1e-12)
    np.testing.assert_allclose(ds["positions"].values, sim["positions_px"] * pixel, rtol=1e-12)
    np.testing.assert_allclose(store.positions_px(ds, (n, n)), sim["positions_px"], atol=1e-9)
    np.testing.assert_array_equal(ds["intensities"].values, sim["intensities"])

    true_object, true_probe = ds["true_object"].values, ds["true_probe"].values
    assert true_object.dtype == np.complex64 and true_object.shape == (48, 48)
    assert true_probe.dtype == np.complex64 and true_probe.shape == (n, n)
    np.testing.assert_allclose(np.diff(ds["true_object_y"].values), pixel, rtol=1e-9)
    assert float(ds["probe_x"].values[n // 2]) == 0.0  # probe centre pixel N // 2
    np.testing.assert_allclose(np.diff(ds["probe_y"].values), pixel, rtol=1e-9)
    # a clear (amplitude-1) frame holds photons_per_frame counts (Parseval)
    assert np.sum(np.abs(true_probe) ** 2) == pytest.approx(config.photons_per_frame, rel=1e-4)

    # the stored frames follow from the stored truth at the stored positions
    geometry = ScanGeometry.from_positions(
        store.positions_px(ds, (n, n)), (n, n), object_shape=true_object.shape, origin_px=(0, 0)
    )
    patches = torch.as_tensor(true_object).reshape(-1)[geometry.window_flat_indices()]
    again = forward_intensity(
        torch.as_tensor(true_probe),
        patches,
        torch.as_tensor(geometry.subpixel, dtype=torch.float32),
    ).numpy()
    frames = ds["intensities"].values
    np.testing.assert_allclose(again, frames, rtol=1e-3, atol=1e-4 * frames.max())
