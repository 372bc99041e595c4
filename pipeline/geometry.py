"""Geometry conventions, written once: units, axis order, pixel sizes, window placement.

- SI units; axis order (y, x) everywhere.
- A scan position is the object-plane coordinate of the probe window's centre pixel, i.e.
  window index N // 2 along each axis (the same pixel fftshift puts the zero frequency on).
- Object pixel size (far field) = wavelength * distance / (frame size * detector pixel size),
  per axis. Without geometry, positions are already in object pixels.
"""

from __future__ import annotations

import numpy as np


def object_pixel_size_m(
    wavelength_m: float,
    detector_distance_m: float,
    detector_pixel_size_m: float,
    frame_shape: tuple[int, int],
) -> tuple[float, float]:
    """Real-space pixel size (y, x) in metres of a far-field reconstruction."""
    return tuple(  # type: ignore[return-value]
        wavelength_m * detector_distance_m / (n * detector_pixel_size_m) for n in frame_shape
    )


def energy_ev_to_wavelength_m(energy_ev: float) -> float:
    """Photon wavelength from energy: lambda = h c / E."""
    return 1.239841984e-6 / energy_ev


def window_top_left(positions_px: np.ndarray, window_shape: tuple[int, int]) -> np.ndarray:
    """Top-left pixel coordinate (float) of each window whose centre pixel sits at a position."""
    half = np.array([window_shape[0] // 2, window_shape[1] // 2], dtype=np.float64)
    return np.asarray(positions_px, dtype=np.float64) - half
