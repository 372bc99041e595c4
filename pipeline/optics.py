"""Probes from focusing optics: a zone plate (or any circular aperture) used in or out of focus.

Nanoprobe ptychography mostly runs with the sample some way out of the focus of a Fresnel zone
plate, so the illumination is a ring-structured disk tens of pixels wide, not a focal spot. The
probe at the sample follows from three facts of the optics:

- the pupil: a disk of semi-angle NA = D / (2 f) (a zone plate's f = D * dr / wavelength, with
  dr its outermost zone width), with a central stop of semi-angle d_cs / (2 f);
- the far field of the probe is that pupil, seen on the detector as the bright-field disk of
  radius NA * distance: angle theta maps to spatial frequency q = theta / wavelength, and frame
  pixel k of an N-pixel detector to q = k / (N * dx) with dx the object pixel size;
- out of focus by z (positive: the sample downstream of the focus), the paraxial (Fresnel)
  propagator multiplies the pupil by exp(-i pi wavelength z |q|^2).

In object pixels (q in cycles per pixel) the propagator is exp(-i pi c |q|^2) with the
dimensionless c = wavelength * z / dx^2. A defocused probe's diameter is about the cone's width
2 * NA * z, i.e. 2 * q_edge * c pixels with q_edge the pupil radius in cycles per pixel: that is
how a probe's size is turned into a defocus when no geometry is known (`defocus_for_diameter`).

All functions return the probe centred in its (Ny, Nx) window (the window's N // 2 pixel is
the optical axis), complex64, normalised to a maximum amplitude of one.
"""

from __future__ import annotations

import numpy as np

from ptyinr.errors import InputError

AIRY_FWHM = 1.028993969962188  # intensity FWHM of an Airy disk, in units of wavelength / (2 NA)


def frequency_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (cycles per pixel) of a centred (Ny, Nx) frame, zero at N // 2."""
    fy = np.fft.fftshift(np.fft.fftfreq(shape[0]))
    fx = np.fft.fftshift(np.fft.fftfreq(shape[1]))
    return np.meshgrid(fy, fx, indexing="ij")


def pupil_to_probe(pupil: np.ndarray, defocus: float) -> np.ndarray:
    """Probe at the sample from a centred pupil (far-field amplitude and phase, zero frequency
    at N // 2) after propagating by `defocus` = wavelength * z / dx^2 (dimensionless, the
    sample `z` downstream of the focus; negative upstream). Max amplitude 1, complex64."""
    fy, fx = frequency_grid(pupil.shape)
    propagator = np.exp(-1j * np.pi * defocus * (fy**2 + fx**2))
    field = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil * propagator)))
    peak = float(np.abs(field).max())
    if peak <= 0:
        raise InputError("probe model: the pupil is empty (no transmitted light)")
    return (field / peak).astype(np.complex64)


def defocus_for_diameter(diameter_px: float, pupil_radius: float) -> float:
    """The dimensionless defocus c whose geometric cone is `diameter_px` wide for a pupil of
    radius `pupil_radius` cycles per pixel (diameter ~ 2 * q_edge * c)."""
    return float(diameter_px) / (2.0 * max(float(pupil_radius), 1e-12))


def circular_pupil(
    shape: tuple[int, int],
    radius: tuple[float, float] | float,
    stop_radius: tuple[float, float] | float = 0.0,
) -> np.ndarray:
    """Annular 0/1 pupil on a centred frame; radii in cycles per pixel, per axis (y, x) so an
    anisotropic pixel size keeps the disk circular in angle."""
    ry, rx = (radius, radius) if np.isscalar(radius) else radius  # type: ignore[misc]
    sy, sx = (stop_radius, stop_radius) if np.isscalar(stop_radius) else stop_radius  # type: ignore[misc]
    fy, fx = frequency_grid(shape)
    rho = np.hypot(fy / ry, fx / rx)
    inside = rho <= 1.0
    if sy > 0 and sx > 0:
        inside &= np.hypot(fy / sy, fx / sx) >= 1.0
    return inside.astype(np.float64)


def zone_plate_focal_length_m(diameter_m: float, outer_zone_width_m: float, wavelength_m: float):
    """First-order focal length of a Fresnel zone plate: f = D * dr / wavelength."""
    return diameter_m * outer_zone_width_m / wavelength_m


def zone_plate_probe(
    shape: tuple[int, int],
    *,
    wavelength_m: float,
    pixel_size_m: tuple[float, float],
    diameter_m: float,
    focal_length_m: float | None = None,
    outer_zone_width_m: float | None = None,
    central_stop_diameter_m: float = 0.0,
    defocus_m: float = 0.0,
) -> np.ndarray:
    """Probe of a zone plate (or lens with a circular aperture) at `defocus_m` from its focus,
    sampled on the reconstruction's object grid (`pixel_size_m` per axis).

    Give the focal length or, for a zone plate, its outermost zone width. Raises InputError
    when the pupil does not fit the frame (the bright-field disk would be larger than the
    detector) or the defocused beam is wider than the window.
    """
    if focal_length_m is None:
        if outer_zone_width_m is None:
            raise InputError("probe optics: give focal_length_m or outer_zone_width_m")
        focal_length_m = zone_plate_focal_length_m(diameter_m, outer_zone_width_m, wavelength_m)
    if diameter_m <= 0 or focal_length_m <= 0:
        raise InputError(
            f"probe optics: diameter_m = {diameter_m!r}, focal_length_m = {focal_length_m!r}; "
            "expected both positive"
        )
    if not 0 <= central_stop_diameter_m < diameter_m:
        raise InputError(
            f"probe optics: central_stop_diameter_m = {central_stop_diameter_m!r}; expected "
            f"0 <= stop < diameter_m ({diameter_m!r})"
        )
    na = diameter_m / (2.0 * focal_length_m)
    stop_na = central_stop_diameter_m / (2.0 * focal_length_m)
    dy, dx = pixel_size_m
    radius = (na / wavelength_m * dy, na / wavelength_m * dx)  # cycles per pixel
    if max(radius) >= 0.5:
        raise InputError(
            f"probe optics: convergence semi-angle {na:.3g} rad needs a pupil of radius "
            f"{max(radius):.3g} cycles/pixel, expected < 0.5: the bright-field disk would not "
            "fit the detector frame (check energy, distance, detector pixel size, diameter_m)"
        )
    stop = (stop_na / wavelength_m * dy, stop_na / wavelength_m * dx)
    pupil = circular_pupil(shape, radius, stop)
    if pupil.sum() < 1:
        raise InputError(
            f"probe optics: the pupil (radius {max(radius):.3g} cycles/pixel) covers no "
            "detector pixel; the convergence angle is too small for this geometry"
        )
    # anisotropic pixels: express z per axis in that axis' pixels; use the geometric mean
    defocus = wavelength_m * defocus_m / (dy * dx)
    width_px = 2.0 * na * abs(defocus_m) / min(dy, dx)
    if width_px > max(shape):
        raise InputError(
            f"probe optics: defocus_m = {defocus_m!r} spreads the beam over ~{width_px:.0f} px, "
            f"wider than the {shape[0]} x {shape[1]} window"
        )
    return pupil_to_probe(pupil, defocus)


def airy_fwhm_m(wavelength_m: float, numerical_aperture: float) -> float:
    """Intensity FWHM of the focal spot of a full circular aperture: 1.029 wavelength/(2 NA)."""
    return AIRY_FWHM * wavelength_m / (2.0 * numerical_aperture)


def beam_diameter_px(probe: np.ndarray, fraction: float = 0.9) -> float:
    """Diameter (pixels) of the centred disk holding `fraction` of the probe's intensity: a size
    that means the same for a focal spot and a ring-structured defocused beam."""
    intensity = np.abs(probe) ** 2
    total = float(intensity.sum())
    if total <= 0:
        return 0.0
    yy, xx = np.indices(intensity.shape, dtype=np.float64)
    cy = float((yy * intensity).sum() / total)
    cx = float((xx * intensity).sum() / total)
    radius = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum(intensity.ravel()[order]) / total
    index = int(np.searchsorted(cumulative, fraction))
    return 2.0 * float(radius[order][min(index, len(order) - 1)])


def bright_field_radius(mean_intensity: np.ndarray, level: float = 0.1) -> float:
    """Radius (cycles per pixel) of the bright-field disk of a centred mean diffraction pattern:
    the convergence semi-angle seen on the detector. Pixels above `level` of the pattern's
    robust maximum are counted as the disk (a central stop is filled in: the area inside the
    outermost bright pixel)."""
    pattern = np.clip(np.asarray(mean_intensity, np.float64), 0, None)
    from scipy import ndimage

    smooth = ndimage.uniform_filter(pattern, size=3)
    peak = float(np.percentile(smooth, 99.9))
    if peak <= 0:
        raise InputError("mean diffraction pattern is empty: no bright-field disk to measure")
    bright = smooth > level * peak
    labels, count = ndimage.label(bright)
    if count == 0:
        raise InputError("mean diffraction pattern: no bright-field disk found")
    ny, nx = pattern.shape
    centre = labels[ny // 2, nx // 2]
    # the disk is the brightest connected region; with a central stop the centre may be dark
    if centre == 0:
        sums = ndimage.sum(pattern, labels, index=np.arange(1, count + 1))
        centre = int(np.argmax(sums)) + 1
    region = labels == centre
    fy, fx = frequency_grid(pattern.shape)
    weights = pattern * region
    total = float(weights.sum())
    cy = float((fy * weights).sum() / total)
    cx = float((fx * weights).sum() / total)
    # the radius of a uniform disk of the same second moment: <r^2> = R^2 / 2 for a filled
    # disk; the outermost bright pixels are more robust against a central stop
    rho = np.hypot(fy - cy, fx - cx)[region]
    return float(np.percentile(rho, 99.0))


def probe_fwhm_px(probe: np.ndarray) -> float:
    """FWHM (pixels) of the probe's intensity profile through its peak, mean of y and x."""
    intensity = np.abs(probe) ** 2
    iy, ix = np.unravel_index(np.argmax(intensity), intensity.shape)
    widths = []
    for profile in (intensity[:, ix], intensity[iy, :]):
        peak = int(np.argmax(profile))
        half = profile[peak] / 2.0
        left = peak
        while left > 0 and profile[left - 1] > half:
            left -= 1
        right = peak
        while right < len(profile) - 1 and profile[right + 1] > half:
            right += 1
        # linear interpolation of the half-maximum crossings
        lx = (
            left - (profile[left] - half) / max(profile[left] - profile[left - 1], 1e-30)
            if left > 0
            else left
        )
        rx = (
            right + (profile[right] - half) / max(profile[right] - profile[right + 1], 1e-30)
            if right < len(profile) - 1
            else right
        )
        widths.append(rx - lx)
    return float(np.mean(widths))
