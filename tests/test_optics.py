"""The optics probe model against textbook formulas and a hand-built far field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptyinr import optics
from ptyinr.errors import InputError
from ptyinr.physics import far_field_intensity

WAVELENGTH = 1.2398e-10  # 10 keV
PIXEL = (10e-9, 10e-9)


def test_focal_spot_matches_airy_formula() -> None:
    """A full circular aperture in focus: intensity FWHM = 1.029 wavelength / (2 NA)."""
    na = 9e-4
    probe = optics.zone_plate_probe(
        (256, 256),
        wavelength_m=WAVELENGTH,
        pixel_size_m=PIXEL,
        diameter_m=180e-6,
        focal_length_m=180e-6 / (2 * na),
    )
    expected_px = optics.airy_fwhm_m(WAVELENGTH, na) / PIXEL[0]
    assert 5 < expected_px < 10  # sampled well enough to measure
    assert optics.probe_fwhm_px(probe) == pytest.approx(expected_px, rel=0.03)
    assert np.unravel_index(np.argmax(np.abs(probe)), probe.shape) == (128, 128)  # on axis


def test_zone_plate_focus_is_its_outermost_zone_width() -> None:
    """f = D dr / wavelength gives NA = wavelength / (2 dr): the focal spot FWHM is 1.029 dr."""
    dr = 70e-9
    probe = optics.zone_plate_probe(
        (256, 256),
        wavelength_m=WAVELENGTH,
        pixel_size_m=PIXEL,
        diameter_m=150e-6,
        outer_zone_width_m=dr,
    )
    assert optics.probe_fwhm_px(probe) == pytest.approx(1.029 * dr / PIXEL[0], rel=0.03)


def test_central_stop_narrows_the_core_and_adds_rings() -> None:
    """An annular pupil (obstruction e) has a narrower central lobe than the full aperture."""
    kwargs = dict(
        wavelength_m=WAVELENGTH, pixel_size_m=PIXEL, diameter_m=150e-6, outer_zone_width_m=70e-9
    )
    full = optics.zone_plate_probe((256, 256), **kwargs)
    stopped = optics.zone_plate_probe((256, 256), central_stop_diameter_m=75e-6, **kwargs)
    assert optics.probe_fwhm_px(stopped) < 0.95 * optics.probe_fwhm_px(full)
    # more of the intensity outside the core: the first ring is stronger
    assert optics.beam_diameter_px(stopped) > 1.5 * optics.beam_diameter_px(full)


def test_far_field_of_the_probe_is_the_pupil() -> None:
    """Through the project's forward model with a transparent object, |FFT(probe)|^2 is the
    pupil disk (the detector's bright-field disk), whatever the defocus."""
    shape = (64, 64)
    pupil = optics.circular_pupil(shape, 0.2, 0.07)
    for defocus in (0.0, 40.0, -40.0):
        probe = torch.as_tensor(optics.pupil_to_probe(pupil, defocus))
        far = far_field_intensity(probe[None])[0].numpy()
        far /= far.max()
        np.testing.assert_allclose(far, pupil, atol=1e-5)


def test_defocused_beam_has_the_geometric_cone_width() -> None:
    """Out of focus by z the beam fills a disk of diameter ~ 2 NA z."""
    na = 1.5e-3
    z = 150e-6
    probe = optics.zone_plate_probe(
        (192, 192),
        wavelength_m=WAVELENGTH,
        pixel_size_m=(20e-9, 20e-9),
        diameter_m=150e-6,
        focal_length_m=150e-6 / (2 * na),
        defocus_m=z,
    )
    expected = 2 * na * z / 20e-9  # 22.5 px
    assert optics.beam_diameter_px(probe, 0.9) == pytest.approx(expected, rel=0.25)
    # the pixel-unit parametrisation agrees: the same defocus from the beam size
    radius = na / WAVELENGTH * 20e-9
    c = optics.defocus_for_diameter(expected, radius)
    assert c == pytest.approx(WAVELENGTH * z / (20e-9) ** 2, rel=1e-6)


def test_bright_field_radius_of_a_disk_with_stop() -> None:
    pupil = optics.circular_pupil((128, 128), 0.18, 0.06)
    pattern = 1e4 * pupil + np.random.default_rng(0).poisson(2.0, pupil.shape)
    assert optics.bright_field_radius(pattern) == pytest.approx(0.18, abs=0.01)


def test_pupil_larger_than_the_detector_is_refused() -> None:
    with pytest.raises(InputError, match="bright-field disk would not fit"):
        optics.zone_plate_probe(
            (64, 64),
            wavelength_m=WAVELENGTH,
            pixel_size_m=(100e-9, 100e-9),
            diameter_m=200e-6,
            outer_zone_width_m=20e-9,
        )


def test_beam_wider_than_the_window_is_refused() -> None:
    with pytest.raises(InputError, match="wider than"):
        optics.zone_plate_probe(
            (64, 64),
            wavelength_m=WAVELENGTH,
            pixel_size_m=PIXEL,
            diameter_m=150e-6,
            outer_zone_width_m=70e-9,
            defocus_m=5e-3,
        )


def test_missing_focal_length_is_refused() -> None:
    with pytest.raises(InputError, match="focal_length_m or outer_zone_width_m"):
        optics.zone_plate_probe(
            (64, 64), wavelength_m=WAVELENGTH, pixel_size_m=PIXEL, diameter_m=150e-6
        )
