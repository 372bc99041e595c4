"""Quality measures: PSNR and relative error against ground truth, and FRC without it.

Why this module exists: a reconstruction is only worth something with a number that says how
good it is. With ground truth (simulations) we follow the paper (PtyINR, equations 9-10): remove
the ambiguities ptychography cannot resolve (global phase, amplitude scale and, for unknown-probe
runs, the linear phase ramp O e^{ikr} / P e^{-ikr}), then compute PSNR of amplitude and phase on
the scanned interior, plus the relative complex error. Without ground truth (measured data) we
estimate resolution by Fourier ring correlation (equation 11) between reconstructions from two
interleaved halves of the scan, against the half-bit threshold (van Heel & Schatz 2005).

Conventions (README, "Data conventions"): arrays are (y, x); a ramp is exp(i (gy * y + gx * x +
c)) with y, x the array indices and gy, gx in radians per pixel. Objects are xarray DataArrays
with dims (y, x) and coordinates in metres (or pixels); the unit of a coordinate is read from
its ``units`` attribute, else from the DataArray's ``positions_unit`` attribute, else guessed
from the spacing (below 1 mm: metres, otherwise pixels). All computations run in
float64/complex128: this is scoring, not the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import xarray as xr
from scipy import fft as sfft
from scipy import ndimage
from scipy.signal.windows import tukey
from skimage.registration import phase_cross_correlation

from ptyinr import store
from ptyinr.errors import InputError

__all__ = [
    "RunEvaluation",
    "align_global_phase",
    "align_object",
    "compare_object",
    "compare_probe",
    "dose_map",
    "evaluate_run",
    "fit_phase_ramp",
    "frc",
    "global_phase_offset",
    "grid_spacing",
    "half_bit_threshold",
    "half_split",
    "psnr",
    "relative_error",
    "remove_phase_ramp",
    "scanned_interior",
]

TWO_PI = 2.0 * math.pi
#: Fraction of the image on each side that the Tukey apodisation window tapers.
TUKEY_ALPHA = 0.25
#: Upsampling factor of the sub-pixel registration (precision 1/100 pixel).
REGISTRATION_UPSAMPLE = 100
#: Largest registration shift applied, as a fraction of the shorter image side.
MAX_REGISTRATION_SHIFT = 0.125

_LENGTH_UNITS_M = {
    "m": 1.0,
    "metre": 1.0,
    "meter": 1.0,
    "metres": 1.0,
    "meters": 1.0,
    "mm": 1e-3,
    "um": 1e-6,
    "µm": 1e-6,
    "μm": 1e-6,
    "micron": 1e-6,
    "nm": 1e-9,
}
_PIXEL_UNITS = {"px", "pixel", "pixels", "pix"}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _wrap(phase: np.ndarray) -> np.ndarray:
    """Wrap angles into [-pi, pi)."""
    return (np.asarray(phase) + math.pi) % TWO_PI - math.pi


def _as_2d(name: str, array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-D (y, x) array, got shape {arr.shape}")
    return arr


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A boolean mask of `shape` (all True when None); refuse an empty one."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise InputError(f"mask for {what}: shape {m.shape}, expected {tuple(shape)}")
    m = m.astype(bool)
    if not m.any():
        raise InputError(f"mask for {what}: selects no pixel, expected at least one True")
    return m


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{what}: estimate shape {a.shape} differs from reference {b.shape}")


# --------------------------------------------------------------------------------------------
# global phase (equation 10)
# --------------------------------------------------------------------------------------------


def global_phase_offset(
    estimate: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    amplitude_weighted: bool = False,
) -> float:
    """theta* of equation (10): argmin_theta sum wrap(angle(O) - angle(Ô) - theta)^2.

    Exact, not the circular-mean approximation: with the wrapped differences d sorted, the
    optimal lifting of the d onto the real line is a cyclic rotation (the first k get +2 pi),
    and for each rotation the optimum is the (weighted) mean; the best of the n rotations is
    the global minimiser. O(n log n). `amplitude_weighted` weights pixels by |O| |Ô| so that
    phases of near-zero amplitude (meaningless) count less.
    """
    est = _as_2d("estimate", estimate)
    ref = _as_2d("reference", reference)
    _same_shape(est, ref, "global phase")
    m = _check_mask(mask, est.shape, "global phase")
    d = _wrap(np.angle(ref[m]) - np.angle(est[m])).astype(np.float64)
    w = (np.abs(ref[m]) * np.abs(est[m])).astype(np.float64) if amplitude_weighted else None
    if w is not None and not np.any(w > 0):
        w = None
    if w is None:
        w = np.ones_like(d)
    order = np.argsort(d, kind="stable")
    d, w = d[order], w[order]
    total_w = w.sum()
    wd, wd2 = w * d, w * d * d
    # k = 0..n-1: the first k sorted values lifted by +2 pi
    cw = np.concatenate(([0.0], np.cumsum(w)[:-1]))
    cwd = np.concatenate(([0.0], np.cumsum(wd)[:-1]))
    mean_k = (wd.sum() + TWO_PI * cw) / total_w
    sq_k = wd2.sum() + 2.0 * TWO_PI * cwd + TWO_PI**2 * cw
    cost_k = sq_k - total_w * mean_k**2
    best = int(np.argmin(cost_k))
    return float(_wrap(mean_k[best]))


def align_global_phase(
    estimate: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    amplitude_weighted: bool = False,
) -> np.ndarray:
    """Return estimate * exp(i theta*) with theta* the exact minimiser of equation (10)."""
    theta = global_phase_offset(estimate, reference, mask, amplitude_weighted=amplitude_weighted)
    return np.asarray(estimate) * np.exp(1j * theta)


# --------------------------------------------------------------------------------------------
# linear phase ramp
# --------------------------------------------------------------------------------------------


def _dft_at(q: np.ndarray, ys: np.ndarray, xs: np.ndarray, gy: np.ndarray, gx: np.ndarray):
    """S[a, b] = sum_{y,x} q[y, x] exp(-i (gy[a] y + gx[b] x)) by two matrix products."""
    ey = np.exp(-1j * np.outer(gy, ys))  # (A, ny)
    ex = np.exp(-1j * np.outer(xs, gx))  # (nx, B)
    return ey @ q @ ex


def fit_phase_ramp(
    estimate: np.ndarray,
    reference: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Fit (gy, gx, c) so that estimate * conj(reference) ~ |.| exp(i (gy y + gx x + c)).

    Robust to wrapping because it never unwraps the ramp itself: the ramp is the peak of the
    spectrum of the complex product (zero-padded FFT, then three zoom levels of a local
    matrix DFT to 1e-5 of a padded bin), which is the complex least-squares fit
    min |p - a exp(i g.r)|^2. With a reference the residual phase is then small and a weighted
    least-squares plane on the (wrapped, centred) residual polishes it. Without a reference
    (an FRC half on its own) only the spectral peak is used: a plane fit would chase the
    object's own phase structure. y, x are array indices; gy, gx in radians per pixel.
    """
    est = _as_2d("estimate", estimate).astype(np.complex128)
    if reference is not None:
        ref = _as_2d("reference", reference).astype(np.complex128)
        _same_shape(est, ref, "phase ramp")
        p = est * np.conj(ref)
    else:
        p = est
    m = _check_mask(mask, est.shape, "phase ramp")
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    q = np.where(m, p, 0)[y0:y1, x0:x1]
    if not np.any(np.abs(q) > 0):
        return 0.0, 0.0, 0.0
    ny, nx = q.shape
    # centred coordinates for conditioning; converted back at the end
    yc, xc = (ny - 1) / 2.0, (nx - 1) / 2.0
    ys, xs = np.arange(ny) - yc, np.arange(nx) - xc

    pad = 2 if max(ny, nx) <= 1024 else 1
    my, mx = sfft.next_fast_len(pad * ny), sfft.next_fast_len(pad * nx)
    spec = np.abs(sfft.fft2(q, s=(my, mx)))
    iy, ix = np.unravel_index(int(np.argmax(spec)), spec.shape)
    gy = TWO_PI * (iy if iy < my // 2 else iy - my) / my
    gx = TWO_PI * (ix if ix < mx // 2 else ix - mx) / mx
    step_y, step_x = TWO_PI / my, TWO_PI / mx
    if ny == 1:  # a single row (column) says nothing about the ramp across it
        gy, step_y = 0.0, 0.0
    if nx == 1:
        gx, step_x = 0.0, 0.0
    for _ in range(5):  # zoom: 21 x 21 points over +-1 current step, then step / 10
        oy = gy + np.linspace(-step_y, step_y, 21)
        ox = gx + np.linspace(-step_x, step_x, 21)
        s = np.abs(_dft_at(q, ys, xs, oy, ox))
        a, b = np.unravel_index(int(np.argmax(s)), s.shape)
        gy, gx = float(oy[a]), float(ox[b])
        step_y, step_x = step_y / 10.0, step_x / 10.0
    c = float(np.angle(_dft_at(q, ys, xs, np.array([gy]), np.array([gx]))[0, 0]))

    if reference is not None:
        # polish: weighted least squares plane through the small wrapped residual
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        mm = m[y0:y1, x0:x1] & (np.abs(q) > 0)
        for _ in range(2):
            resid = _wrap(np.angle(q) - (gy * yy + gx * xx + c))
            use = mm & (np.abs(resid) < math.pi / 2)
            if use.sum() < 3:
                break
            w = np.abs(q[use])  # weighted normal equations (3 x 3): cheap for any size
            design = np.stack([np.ones(use.sum()), yy[use], xx[use]], axis=1)
            gram = design.T @ (design * w[:, None])
            sol = np.linalg.lstsq(gram, design.T @ (w * resid[use]), rcond=None)[0]
            c, gy, gx = c + float(sol[0]), gy + float(sol[1]), gx + float(sol[2])
    # back to array-index coordinates of the full array
    c = float(_wrap(c - gy * (y0 + yc) - gx * (x0 + xc)))
    return float(gy), float(gx), c


def remove_phase_ramp(
    estimate: np.ndarray,
    reference: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Remove the linear phase ramp and offset fitted by `fit_phase_ramp` (on `mask`).

    With a reference, the ramp of estimate * conj(reference) (the O e^{ikr} ambiguity of an
    unknown-probe result); without, the estimate's own ramp (centres its spectrum, for FRC).
    The correction is applied to the whole array, not only the mask.
    """
    est = _as_2d("estimate", estimate)
    gy, gx, c = fit_phase_ramp(est, reference, mask)
    yy, xx = np.meshgrid(np.arange(est.shape[0]), np.arange(est.shape[1]), indexing="ij")
    return est * np.exp(-1j * (gy * yy + gx * xx + c))


# --------------------------------------------------------------------------------------------
# PSNR, relative error, scanned interior
# --------------------------------------------------------------------------------------------


def psnr(
    estimate: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float | None = None,
) -> float:
    """Equation (9): 10 log10(MAX^2 / MSE) over the mask; MAX defaults to the reference's range.

    Returns inf when the images are identical on the mask.
    """
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    _same_shape(est, ref, "psnr")
    m = _check_mask(mask, ref.shape, "psnr")
    r, e = ref[m], est[m]
    if data_range is None:
        data_range = float(r.max() - r.min())
    if not data_range > 0:
        raise InputError(
            f"psnr: data_range = {data_range}, expected > 0 (the reference is constant on the "
            "mask; pass data_range explicitly)"
        )
    mse = float(np.mean((e - r) ** 2))
    if mse == 0.0:
        return math.inf
    return float(10.0 * math.log10(data_range**2 / mse))


def relative_error(
    estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """min over complex gamma of ||gamma Ô - O|| / ||O|| on the mask (scale/phase invariant)."""
    est = np.asarray(estimate).astype(np.complex128)
    ref = np.asarray(reference).astype(np.complex128)
    _same_shape(est, ref, "relative error")
    m = _check_mask(mask, ref.shape, "relative error")
    e, r = est[m], ref[m]
    nr = float(np.vdot(r, r).real)
    if nr == 0.0:
        raise InputError("relative error: the reference is zero on the mask, expected non-zero")
    ne = float(np.vdot(e, e).real)
    if ne == 0.0:
        return 1.0
    gamma = np.vdot(e, r) / ne  # sum conj(e) r / sum |e|^2
    return float(np.linalg.norm(gamma * e - r) / math.sqrt(nr))


def scanned_interior(
    object_shape: tuple[int, int],
    positions_px_of_window_centres: np.ndarray,
    margin: int = 0,
) -> np.ndarray:
    """Boolean mask of the bounding box of the probe-centre positions (object pixels).

    A pixel is inside when its centre lies in [min - margin, max + margin] along both axes
    (positive margin grows the box, negative shrinks it); clipped to the object. For the paper's
    simulation (241 x 241 object, 64 x 64 probe) this is the central 181 x 181 region.
    """
    shape = tuple(int(s) for s in object_shape)
    if len(shape) != 2:
        raise InputError(f"scanned_interior: object_shape {object_shape}, expected (ny, nx)")
    pos = np.asarray(positions_px_of_window_centres, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0 or not np.isfinite(pos).all():
        raise InputError(
            f"scanned_interior: positions of shape {pos.shape}, expected finite (n, 2) (y, x)"
        )
    lo = pos.min(axis=0) - margin
    hi = pos.max(axis=0) + margin
    mask = np.zeros(shape, dtype=bool)
    y0, x0 = (max(0, math.ceil(v - 1e-9)) for v in lo)
    y1 = min(shape[0] - 1, math.floor(hi[0] + 1e-9))
    x1 = min(shape[1] - 1, math.floor(hi[1] + 1e-9))
    if y1 < y0 or x1 < x0:
        raise InputError(
            f"scanned_interior: positions span y {lo[0]:.1f}..{hi[0]:.1f}, x {lo[1]:.1f}.."
            f"{hi[1]:.1f} (margin {margin}), no pixel of the {shape} object inside"
        )
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def dose_map(
    probe: np.ndarray,
    top_left: np.ndarray,
    object_shape: tuple[int, int],
    frame_photons: np.ndarray,
) -> np.ndarray:
    """Expected photons that reached each object pixel, summed over the scan (float64).

    Why: the data constrain an object pixel only through the photons that passed it; where
    (nearly) none did, a reconstruction's error there says nothing about the method. Position
    j spreads its frame's photons over its window as the probe's intensity does:
    |P|^2 / sum |P|^2 * frame_photons[j]. For a transmission |O| ~ 1 this is the photon count
    at the pixel (an absorbing object lowers the frame's photons, not the shape of the
    spread). `top_left` (n, 2) (y, x) are the window corners on the object grid, as
    `ScanGeometry.top_left`; float corners are placed at the nearest whole pixel, as
    `ScanGeometry.from_positions` places the physics windows (the sub-pixel rest, which the
    forward model applies as a probe shift, is ignored: it moves the dose by < 1/2 pixel).
    Windows partly (or wholly) outside the object are clipped: their outside share is lost.
    """
    p = np.asarray(probe)
    if p.ndim != 2 or p.size == 0:
        raise InputError(f"dose_map: probe of shape {p.shape}, expected a 2-D (y, x) array")
    if not np.isfinite(p).all():
        raise InputError("dose_map: probe contains NaN or inf, expected finite values")
    weight = np.abs(p.astype(np.complex128)) ** 2
    total = float(weight.sum())
    if not total > 0:
        raise InputError("dose_map: probe intensity sums to 0, expected a non-zero probe")
    weight /= total
    shape = tuple(int(s) for s in object_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"dose_map: object_shape {object_shape}, expected (ny, nx) >= 1")
    corners = np.asarray(top_left, dtype=np.float64)
    if corners.ndim != 2 or corners.shape[1] != 2 or corners.shape[0] == 0:
        raise InputError(f"dose_map: top_left of shape {corners.shape}, expected (n >= 1, 2)")
    if not np.isfinite(corners).all():
        raise InputError("dose_map: top_left contains NaN or inf, expected finite corners")
    photons = np.asarray(frame_photons, dtype=np.float64)
    if photons.shape != (corners.shape[0],):
        raise InputError(
            f"dose_map: frame_photons of shape {photons.shape}, expected ({corners.shape[0]},) "
            "(one per position)"
        )
    wrong = ~(np.isfinite(photons) & (photons >= 0))
    if wrong.any():
        raise InputError(
            f"dose_map: frame_photons has {int(wrong.sum())} negative or non-finite value(s) "
            f"(first {photons[wrong][0]}), expected finite values >= 0"
        )
    whole = np.floor(corners + 0.5).astype(np.int64)
    ny, nx = weight.shape
    out = np.zeros(shape, dtype=np.float64)
    for (y, x), n_photons in zip(whole, photons, strict=True):
        y0, x0 = max(int(y), 0), max(int(x), 0)
        y1, x1 = min(int(y) + ny, shape[0]), min(int(x) + nx, shape[1])
        if y1 <= y0 or x1 <= x0:
            continue  # wholly outside the object
        out[y0:y1, x0:x1] += n_photons * weight[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


# --------------------------------------------------------------------------------------------
# coordinates and alignment of labelled images
# --------------------------------------------------------------------------------------------


def _coord_unit(da: xr.DataArray, dim: str) -> str | None:
    unit = da[dim].attrs.get("units") if dim in da.coords else None
    if unit is None:
        unit = da.attrs.get("positions_unit")
    return None if unit is None else str(unit).strip()


def grid_spacing(da: xr.DataArray) -> tuple[float, str]:
    """(pixel size, unit) of a 2-D DataArray's grid: ("m" in metres) or ("px").

    The unit comes from the coordinates' ``units`` attribute (m, mm, um/µm, nm, px), else the
    DataArray's ``positions_unit`` attribute, else the spacing (< 1e-3: metres, else pixels).
    Without coordinates the grid is in pixels of size 1.
    """
    if da.ndim != 2:
        raise InputError(f"{da.name or 'image'}: expected 2-D (y, x), got dims {da.dims}")
    spacings, units = [], []
    for dim in da.dims:
        if dim not in da.coords or da.sizes[dim] < 2:
            spacings.append(1.0)
            units.append("px")
            continue
        c = np.asarray(da[dim].values, dtype=np.float64)
        d = np.diff(c)
        step = float(np.median(d))
        if step <= 0 or np.max(np.abs(d - step)) > 1e-3 * abs(step):
            raise InputError(
                f"{da.name or 'image'}: coordinate {dim!r} is not increasing and uniformly "
                "spaced, expected a regular grid"
            )
        unit = _coord_unit(da, str(dim))
        if unit is None:
            unit = "m" if step < 1e-3 else "px"
        if unit in _PIXEL_UNITS:
            units.append("px")
            spacings.append(step)
        elif unit in _LENGTH_UNITS_M:
            units.append("m")
            spacings.append(step * _LENGTH_UNITS_M[unit])
        else:
            raise InputError(
                f"{da.name or 'image'}: coordinate {dim!r} has units {unit!r}, expected one of "
                f"m, mm, um, nm, px"
            )
    if units[0] != units[1]:
        raise InputError(f"{da.name or 'image'}: y in {units[0]} but x in {units[1]}")
    return float(np.mean(spacings)), units[0]


def _as_yx(da: xr.DataArray, name: str) -> tuple[xr.DataArray, float, str]:
    """Rename the two dims to (y, x), add index coords if missing, coordinates in m or px."""
    if not isinstance(da, xr.DataArray):
        da = xr.DataArray(np.asarray(da))
    if da.ndim != 2:
        raise InputError(f"{name}: expected a 2-D (y, x) image, got dims {da.dims}")
    d0, d1 = (str(d) for d in da.dims)
    if d0.endswith("x") and d1.endswith("y"):  # e.g. (x, y) or (obj_x, obj_y): put y first
        da = da.transpose(d1, d0)
    step, unit = grid_spacing(da)
    out = da.rename({da.dims[0]: "y", da.dims[1]: "x"}) if da.dims != ("y", "x") else da
    out = out.copy()
    for old, new in zip(da.dims, ("y", "x"), strict=True):
        if old in da.coords:
            c = np.asarray(da[old].values, dtype=np.float64)
            scale = 1.0
            u = _coord_unit(da, str(old))
            if unit == "m" and u in _LENGTH_UNITS_M:
                scale = _LENGTH_UNITS_M[u]
            out = out.assign_coords({new: c * scale})
        else:
            out = out.assign_coords({new: np.arange(da.sizes[old], dtype=np.float64)})
    return out, step, unit


def _overlap_on_estimate_grid(
    estimate: xr.DataArray, truth: xr.DataArray, name_e: str, name_t: str
) -> tuple[xr.DataArray, xr.DataArray, tuple[slice, slice], float, str]:
    """Put truth on the estimate's grid over their overlap.

    Same spacing and an integer-pixel offset: crop both (no resampling). Otherwise the truth
    is interpolated linearly (real and imaginary parts) at the estimate's pixels inside it.
    Returns (estimate crop, truth on it, index slices of the crop in the estimate, step, unit).
    """
    est, se, ue = _as_yx(estimate, name_e)
    tru, st, ut = _as_yx(truth, name_t)
    if ue != ut:
        raise InputError(
            f"{name_e} coordinates are in {ue} but {name_t} coordinates are in {ut}: give both "
            "in the same unit"
        )
    slices = []
    for dim in ("y", "x"):
        ce, ct = est[dim].values, tru[dim].values
        tol = 1e-6 * min(se, st)
        lo, hi = ct.min() - tol, ct.max() + tol
        inside = np.flatnonzero((ce >= lo) & (ce <= hi))
        if inside.size == 0:
            raise InputError(
                f"{name_e} and {name_t} do not overlap along {dim}: {ce.min():.6g}..{ce.max():.6g}"
                f" vs {ct.min():.6g}..{ct.max():.6g} {ue}"
            )
        slices.append(slice(int(inside[0]), int(inside[-1]) + 1))
    est_c = est.isel(y=slices[0], x=slices[1])
    same_grid = abs(se - st) <= 1e-4 * se
    if same_grid:
        for dim in ("y", "x"):
            off = (est_c[dim].values[0] - tru[dim].values[0]) / st
            same_grid = same_grid and abs(off - round(off)) < 1e-3
    if same_grid:
        tru_c = tru.sel(y=est_c.y.values, x=est_c.x.values, method="nearest")
        tru_c = tru_c.assign_coords(y=est_c.y.values, x=est_c.x.values)
    else:
        coords = {"y": est_c.y.values, "x": est_c.x.values}
        if np.iscomplexobj(tru.values):
            re = tru.real.interp(coords, method="linear")
            im = tru.imag.interp(coords, method="linear")
            tru_c = re + 1j * im
        else:
            tru_c = tru.interp(coords, method="linear")
    return est_c, tru_c, (slices[0], slices[1]), se, ue


def _crop_mask(
    mask: np.ndarray | xr.DataArray | None,
    estimate: xr.DataArray,
    est_crop: xr.DataArray,
    slices: tuple[slice, slice],
) -> np.ndarray:
    if mask is None:
        return np.ones(est_crop.shape, dtype=bool)
    if isinstance(mask, xr.DataArray):
        mk, *_ = _as_yx(mask, "mask")
        mk = mk.sel(y=est_crop.y.values, x=est_crop.x.values, method="nearest")
        m = np.asarray(mk.values, dtype=bool)
    else:
        m = np.asarray(mask, dtype=bool)
        if m.shape != estimate.shape:
            raise InputError(f"mask shape {m.shape}, expected the estimate's {estimate.shape}")
        m = m[slices[0], slices[1]]
    if not m.any():
        raise InputError("mask selects no pixel inside the overlap of estimate and truth")
    return m


def _aligned(
    est: np.ndarray, ref: np.ndarray, mask: np.ndarray, remove_ramp: bool
) -> tuple[np.ndarray, dict[str, float]]:
    """Ramp (optional), eq. (10) phase, least-squares amplitude scale: (aligned, fitted)."""
    est = est.astype(np.complex128)
    ref = ref.astype(np.complex128)
    info: dict[str, float] = {}
    if remove_ramp:
        gy, gx, c = fit_phase_ramp(est, ref, mask)
        yy, xx = np.meshgrid(np.arange(est.shape[0]), np.arange(est.shape[1]), indexing="ij")
        est = est * np.exp(-1j * (gy * yy + gx * xx + c))
        info.update(ramp_gy_rad_per_px=gy, ramp_gx_rad_per_px=gx)
    theta = global_phase_offset(est, ref, mask)
    est = est * np.exp(1j * theta)
    a_e, a_r = np.abs(est[mask]), np.abs(ref[mask])
    denom = float(np.sum(a_e * a_e))
    scale = float(np.sum(a_e * a_r) / denom) if denom > 0 else 1.0
    info.update(global_phase_rad=theta, amplitude_scale=scale)
    return est * scale, info


def _phase_psnr(aligned: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """PSNR of the phase with wrapped differences (a 2 pi jump is no error)."""
    ref_phase = np.angle(ref)
    est_phase = ref_phase + _wrap(np.angle(aligned) - ref_phase)
    try:
        return psnr(est_phase, ref_phase, mask)
    except InputError:  # constant reference phase: PSNR undefined
        return math.nan


def align_object(
    estimate: xr.DataArray,
    truth: xr.DataArray,
    *,
    mask: np.ndarray | xr.DataArray | None = None,
    remove_ramp: bool,
) -> xr.Dataset:
    """Estimate and truth on a common grid, the estimate aligned to the truth.

    Dataset with `estimate` (ramp removed if asked, eq. 10 phase, amplitude scale), `truth`
    and `mask` over (y, x); attrs hold the fitted phase, scale and ramp. `compare_object` and
    the comparison figure use this.
    """
    est_c, tru_c, slices, step, unit = _overlap_on_estimate_grid(
        estimate, truth, "estimate", "truth"
    )
    est_da = estimate if isinstance(estimate, xr.DataArray) else xr.DataArray(estimate)
    m = _crop_mask(mask, est_da, est_c, slices)
    t = np.asarray(tru_c.values)
    valid = np.isfinite(t.real) & np.isfinite(t.imag)
    m = m & valid
    if not m.any():
        raise InputError("no pixel of the mask has a truth value after alignment")
    t = np.where(valid, t, 0)
    aligned, info = _aligned(np.asarray(est_c.values), t, m, remove_ramp)
    coords = {"y": est_c.y.values, "x": est_c.x.values}
    return xr.Dataset(
        {
            "estimate": (("y", "x"), aligned),
            "truth": (("y", "x"), t.astype(np.complex128)),
            "mask": (("y", "x"), m),
        },
        coords=coords,
        attrs={**info, "pixel_size": step, "unit": unit, "ramp_removed": bool(remove_ramp)},
    )


def compare_object(
    estimate: xr.DataArray,
    truth: xr.DataArray,
    *,
    mask: np.ndarray | xr.DataArray | None = None,
    remove_ramp: bool,
) -> dict[str, float]:
    """Object quality against ground truth, as in the paper (equations 9-10).

    Aligns on the coordinates both carry (truth cropped, or interpolated when the grids differ
    by a sub-pixel offset or spacing), removes the ramp if asked (unknown probe), the global
    phase (eq. 10) and the amplitude scale (least squares), then PSNRs on `mask` (on the
    estimate's grid; e.g. `scanned_interior`). Phase PSNR uses wrapped differences and the
    truth's phase range as MAX. Extra keys: global_phase_rad, amplitude_scale, n_pixels.
    """
    ds = align_object(estimate, truth, mask=mask, remove_ramp=remove_ramp)
    est, ref, m = ds.estimate.values, ds.truth.values, ds.mask.values
    return {
        "amplitude_psnr_db": psnr(np.abs(est), np.abs(ref), m),
        "phase_psnr_db": _phase_psnr(est, ref, m),
        "relative_error": relative_error(est, ref, m),
        "global_phase_rad": float(ds.attrs["global_phase_rad"]),
        "amplitude_scale": float(ds.attrs["amplitude_scale"]),
        "n_pixels": int(m.sum()),
    }


def compare_probe(
    estimate: np.ndarray,
    truth: np.ndarray,
    remove_ramp: bool = True,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Probe quality: like `compare_object` on equal-shape arrays (all pixels unless `mask`).

    The ramp is fitted on estimate * conj(truth), weighted by the amplitudes (so the beam, not
    the dark surround, decides): an object with e^{ikr} leaves the probe with e^{-ikr}.
    """
    est = _as_2d("probe estimate", np.asarray(estimate))
    ref = _as_2d("probe truth", np.asarray(truth))
    _same_shape(est, ref, "probe")
    m = _check_mask(mask, ref.shape, "probe")
    aligned, _ = _aligned(est, ref, m, remove_ramp)
    return {
        "probe_amplitude_psnr_db": psnr(np.abs(aligned), np.abs(ref), m),
        "probe_phase_psnr_db": _phase_psnr(aligned, ref, m),
        "probe_relative_error": relative_error(aligned, ref, m),
    }


# --------------------------------------------------------------------------------------------
# a run of a scan store against the store's ground truth
# --------------------------------------------------------------------------------------------


@dataclass
class RunEvaluation:
    """A run scored against its store's ground truth, and what the comparison figure shows:
    the run's object (`estimate`), the truth, the scored region (`mask`, on the estimate's
    grid) and whether the linear phase ramp was removed (unknown-probe runs)."""

    store: Path
    run_id: str
    scores: dict[str, float]
    estimate: xr.DataArray
    truth: xr.DataArray
    mask: np.ndarray
    remove_ramp: bool


def evaluate_run(store_path: str | Path, run_id: str) -> RunEvaluation:
    """Score run `run_id` of a simulated scan store against its `true_object` (and
    `true_probe`) on the scanned interior, as `ptyinr evaluate` reports it.

    InputError naming the store when the run does not exist or the store has no ground
    truth (measured data: use the FRC of `ptyinr run`).
    """
    store_path = Path(store_path)
    ds = store.open_scan_store(store_path)
    runs = {r["run_id"] for r in store.list_runs(store_path)}
    if run_id not in runs:
        raise InputError(
            f"{store_path}: no run {run_id!r} (runs: {', '.join(sorted(runs)) or 'none'})"
        )
    if "true_object" not in ds:
        raise InputError(
            f"{store_path}: no ground truth (true_object); evaluate needs a simulated store. "
            "For measured data use the FRC of `ptyinr run`."
        )
    result = store.open_run(store_path, run_id)
    obj = result["object"].load()
    origin = np.asarray(result.attrs.get("origin_px", [0, 0]), dtype=np.float64)
    frame = (int(result.sizes["probe_y"]), int(result.sizes["probe_x"]))
    centres = store.positions_px(ds, frame) - origin
    if "positions_used" in result.attrs:
        centres = centres[np.asarray(result.attrs["positions_used"], dtype=int)]
    interior = scanned_interior(obj.shape, centres)
    remove_ramp = not bool(result.attrs.get("known_probe"))
    truth = ds["true_object"].load()
    scores: dict[str, float] = dict(
        compare_object(obj, truth, mask=interior, remove_ramp=remove_ramp)
    )
    if "true_probe" in ds:
        scores.update(
            compare_probe(result["probe"].values, ds["true_probe"].values, remove_ramp=remove_ramp)
        )
    return RunEvaluation(
        store=store_path,
        run_id=run_id,
        scores=scores,
        estimate=obj,
        truth=truth,
        mask=interior,
        remove_ramp=remove_ramp,
    )


# --------------------------------------------------------------------------------------------
# Fourier ring correlation
# --------------------------------------------------------------------------------------------


def half_bit_threshold(n_pixels: np.ndarray) -> np.ndarray:
    """Half-bit threshold of van Heel & Schatz (2005) for rings of n pixels."""
    n = np.maximum(np.asarray(n_pixels, dtype=np.float64), 1.0)
    s = np.sqrt(n)
    return (0.2071 + 1.9102 / s) / (1.2071 + 0.9102 / s)


def _image_and_grid(
    image: np.ndarray | xr.DataArray, pixel_size: float | None, name: str
) -> tuple[np.ndarray, float | None]:
    if isinstance(image, xr.DataArray):
        step, unit = grid_spacing(image)
        arr = np.asarray(image.values)
        return arr, (step if (pixel_size is None and unit == "m") else None)
    return _as_2d(name, np.asarray(image)), None


def _fourier_shift(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    out = sfft.ifft2(ndimage.fourier_shift(sfft.fft2(image), shift))
    return out if np.iscomplexobj(image) else out.real


def frc(
    image_a: np.ndarray | xr.DataArray,
    image_b: np.ndarray | xr.DataArray,
    *,
    pixel_size: float | None = None,
    unit: str = "m",
    register: bool = True,
    apodize: bool = True,
    remove_ramp: bool = True,
    tukey_alpha: float = TUKEY_ALPHA,
) -> xr.Dataset:
    """Fourier ring correlation (eq. 11) of two images with the half-bit threshold.

    Steps: (complex images, `remove_ramp`) each image's own ramp is removed (centres its
    spectrum, so that rings are centred on the zero frequency); (`register`) image_b is
    registered to image_a to 1/100 pixel (phase_cross_correlation, plain cross-correlation)
    and shifted by a Fourier shift, and both are cropped by the shift so that no wrapped-around
    edge remains (a shift beyond 1/8 of the field is taken as spurious and not applied: two
    halves of one scan share a grid); (complex, `remove_ramp`) the residual ramp of b
    relative to a is removed; (complex, always) the global phase offset of b relative to a is
    removed; a non-square
    image is cropped to its central square (side = the shorter side, so rings are circles in
    frequency); the mean is subtracted and (`apodize`) a separable Tukey window (alpha 0.25)
    applied. FRC per 1-pixel ring = Re sum F1 conj(F2) / sqrt(sum |F1|^2 sum |F2|^2), rings
    0 .. N//2 (Nyquist). Half-bit threshold from the ring pixel counts (the formula of van
    Heel & Schatz, used unchanged for complex images).

    Resolution: the first ring, after the FRC has been above the threshold, where it falls
    below it (linear interpolation between rings), reported as the half-period 1 / (2 f) (one
    pixel at Nyquist, the convention of X-ray ptychography); `resolution_full_period` is 1 / f.
    Without a crossing the resolution is NaN and `resolution_note` says why;
    `resolved_to_nyquist` is True when the FRC stays above the threshold up to Nyquist.

    DataArray inputs are aligned on their coordinates and give the pixel size when those are
    in metres. `pixel_size` is in `unit` (converted to metres for a length unit); without one,
    frequencies are in 1/px and lengths in px.
    """
    a_da = isinstance(image_a, xr.DataArray)
    b_da = isinstance(image_b, xr.DataArray)
    if a_da and b_da:
        a_c, b_c, _, step, grid_unit = _overlap_on_estimate_grid(
            image_a, image_b, "image_a", "image_b"
        )
        a, b = np.asarray(a_c.values), np.asarray(b_c.values)
        grid_px = step if grid_unit == "m" else None
    else:
        a, grid_px = _image_and_grid(image_a, pixel_size, "image_a")
        b, _ = _image_and_grid(image_b, pixel_size, "image_b")
    _same_shape(a, b, "frc")
    if min(a.shape) < 8:
        raise InputError(f"frc: images of shape {a.shape}, expected at least 8 x 8 pixels")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("frc: images contain NaN or inf, expected finite values")

    # pixel size in metres (or None: pixels)
    if pixel_size is not None:
        if unit in _PIXEL_UNITS:
            px_m = None
        elif unit in _LENGTH_UNITS_M:
            if not pixel_size > 0:
                raise InputError(f"frc: pixel_size = {pixel_size}, expected > 0")
            px_m = float(pixel_size) * _LENGTH_UNITS_M[unit]
        else:
            raise InputError(f"frc: unit {unit!r}, expected one of m, mm, um, nm, px")
    elif a_da and b_da:
        px_m = grid_px
    else:
        px_m = grid_px if a_da else None

    is_complex = np.iscomplexobj(a) or np.iscomplexobj(b)
    if is_complex:
        a = a.astype(np.complex128)
        b = b.astype(np.complex128)
    else:
        a = a.astype(np.float64)
        b = b.astype(np.float64)
    if is_complex and remove_ramp:
        a = remove_phase_ramp(a)
        b = remove_phase_ramp(b)

    shift = np.zeros(2)
    registration_note = "not registered"
    if register:
        shift, _, _ = phase_cross_correlation(
            a - a.mean(), b - b.mean(), upsample_factor=REGISTRATION_UPSAMPLE, normalization=None
        )
        shift = np.asarray(shift, dtype=np.float64)
        max_shift = MAX_REGISTRATION_SHIFT * min(a.shape)
        if np.any(np.abs(shift) > max_shift):
            # halves of one scan share a grid: a large offset is a spurious peak (no common
            # signal, e.g. noise); shifting would only throw field away
            registration_note = (
                f"registration found {shift.tolist()} px, beyond {max_shift:.1f} px: "
                "treated as spurious, not applied"
            )
            shift = np.zeros(2)
        else:
            registration_note = f"registered to 1/{REGISTRATION_UPSAMPLE} px"
        if np.any(shift != 0):
            b = _fourier_shift(b, shift)
            c = math.ceil(float(np.max(np.abs(shift))))
            if c:
                a, b = a[c:-c, c:-c], b[c:-c, c:-c]
    if is_complex:
        if remove_ramp:
            b = remove_phase_ramp(b, reference=a)
        b = b * np.exp(1j * np.angle(np.vdot(b, a)))  # global phase offset, amplitude weighted

    n = min(a.shape)
    oy, ox = (a.shape[0] - n) // 2, (a.shape[1] - n) // 2
    a, b = a[oy : oy + n, ox : ox + n], b[oy : oy + n, ox : ox + n]
    a = a - a.mean()
    b = b - b.mean()
    if apodize:
        w1 = tukey(n, tukey_alpha)
        win = np.outer(w1, w1)
        a, b = a * win, b * win

    fa, fb = sfft.fft2(a), sfft.fft2(b)
    k = sfft.fftfreq(n) * n
    radius = np.hypot(k[:, None], k[None, :])
    ring = np.rint(radius).astype(np.int64).ravel()
    n_rings = n // 2 + 1
    keep = ring < n_rings
    ring = ring[keep]
    cross = (fa * np.conj(fb)).ravel()[keep]
    num = np.bincount(ring, weights=cross.real, minlength=n_rings)
    pa = np.bincount(ring, weights=(np.abs(fa) ** 2).ravel()[keep], minlength=n_rings)
    pb = np.bincount(ring, weights=(np.abs(fb) ** 2).ravel()[keep], minlength=n_rings)
    counts = np.bincount(ring, minlength=n_rings).astype(np.int64)
    denom = np.sqrt(pa * pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), np.nan)
    threshold = half_bit_threshold(counts)

    freq_px = np.arange(n_rings) / n  # cycles per pixel
    if px_m is not None:
        freq, funit, lunit = freq_px / px_m, "1/m", "m"
    else:
        freq, funit, lunit = freq_px, "1/px", "px"
    res_f, resolved_to_nyquist, note = _crossing(freq, curve, threshold)
    length_of_px = px_m if px_m is not None else 1.0
    nyquist_half_period = length_of_px  # 1 / (2 * 0.5 / px)
    if math.isfinite(res_f):
        resolution = 1.0 / (2.0 * res_f)
        full_period = 1.0 / res_f
        note = f"FRC falls below the half-bit threshold at {res_f:.6g} {funit}"
    else:
        resolution = full_period = math.nan
        if resolved_to_nyquist:
            note = (
                "FRC stays above the half-bit threshold up to Nyquist: resolved to the pixel "
                f"size ({nyquist_half_period:.6g} {lunit} half-period) or better"
            )
    ds = xr.Dataset(
        {
            "frc": ("spatial_frequency", curve, {"long_name": "Fourier ring correlation"}),
            "half_bit_threshold": (
                "spatial_frequency",
                threshold,
                {"long_name": "half-bit threshold (van Heel & Schatz 2005)"},
            ),
            "n_pixels": ("spatial_frequency", counts, {"long_name": "pixels in the ring"}),
        },
        coords={
            "spatial_frequency": (
                "spatial_frequency",
                freq,
                {"units": funit, "long_name": "spatial frequency"},
            )
        },
        attrs={
            "resolution": float(resolution),
            "resolution_full_period": float(full_period),
            "resolution_spatial_frequency": float(res_f),
            "resolution_convention": "half-period, 1 / (2 f) at the half-bit crossing",
            "resolution_note": note,
            "resolved_to_nyquist": bool(resolved_to_nyquist),
            "unit": lunit,
            "frequency_unit": funit,
            "pixel_size": float(length_of_px),
            "image_size_px": int(n),
            "registration_shift_px": [float(s) for s in shift],
            "registered": bool(register),
            "registration_note": registration_note,
            "apodized": bool(apodize),
            "ramp_removed": bool(remove_ramp and is_complex),
            "threshold": "half-bit (van Heel & Schatz 2005)",
        },
    )
    return ds


def _crossing(
    freq: np.ndarray, curve: np.ndarray, threshold: np.ndarray
) -> tuple[float, bool, str]:
    """First fall of the FRC below the threshold after it has been above it (ring >= 1)."""
    diff = curve - threshold
    above = np.flatnonzero(np.nan_to_num(diff, nan=-1.0)[1:] >= 0) + 1
    if above.size == 0:
        return (
            math.nan,
            False,
            "FRC never reaches the half-bit threshold: no correlated signal between the halves",
        )
    start = int(above[0])
    for k in range(start + 1, len(curve)):
        if not np.isfinite(diff[k]) or diff[k] < 0:
            d0, d1 = diff[k - 1], diff[k]
            if not np.isfinite(d1):
                return float(freq[k - 1]), False, ""
            t = d0 / (d0 - d1) if d0 != d1 else 0.0
            return float(freq[k - 1] + t * (freq[k] - freq[k - 1])), False, ""
    return math.nan, True, ""


# --------------------------------------------------------------------------------------------
# half split of the scan
# --------------------------------------------------------------------------------------------


def _grid_labels(values: np.ndarray) -> tuple[np.ndarray, int, float, float] | None:
    """Cluster 1-D values into grid lines: (labels, n_lines, step, max spread) or None."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    gaps = np.diff(v)
    if gaps.size == 0 or gaps.max() <= 0:
        return None
    # line-to-line gaps: the big ones; threshold at half their median (robust to jitter)
    big = gaps[gaps > 0.25 * gaps.max()]
    breaks = gaps > 0.5 * float(np.median(big))
    labels_sorted = np.concatenate(([0], np.cumsum(breaks)))
    labels = np.empty_like(labels_sorted)
    labels[order] = labels_sorted
    n_lines = int(labels_sorted[-1]) + 1
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))  # v is sorted: lines contiguous
    centres = np.add.reduceat(v, starts) / np.diff(np.append(starts, v.size))
    spread = float(np.max(np.maximum.reduceat(v, starts) - np.minimum.reduceat(v, starts)))
    step = float(np.median(np.diff(centres))) if n_lines > 1 else 0.0
    return labels, n_lines, step, spread


def _valid_grid(idx: np.ndarray) -> bool:
    """One position per cell, at least 2 x 2 cells, and the grid mostly filled."""
    span = idx.max(axis=0) - idx.min(axis=0) + 1
    if span[0] < 2 or span[1] < 2:
        return False
    if len(np.unique(idx, axis=0)) != len(idx):  # two positions in one grid cell
        return False
    return len(idx) >= 0.75 * span[0] * span[1]  # mostly empty: a scatter, not a raster


def _lattice_period(values: np.ndarray, guess: float) -> tuple[float, float, float]:
    """(period, origin, coherence) of 1-D values on a jittered lattice near period `guess`.

    The period maximises the coherence |mean exp(2 pi i v / s)| (a periodogram over
    0.7-1.4 x guess, then refined), which unlike a median of neighbour distances is not
    biased by the jitter; coherence is exp(-2 pi^2 sigma^2) for Gaussian jitter sigma.
    """
    v = values - values.min()
    v = v[:: max(1, v.size // 4000)]  # 4000 samples: coherence noise ~1.5 %, time bounded
    lo, hi = 0.7 * guess, 1.4 * guess
    for _ in range(3):
        periods = np.linspace(lo, hi, 201)
        coh = np.abs(np.exp(1j * TWO_PI * v[None, :] / periods[:, None]).mean(axis=1))
        best = int(np.argmax(coh))
        width = periods[1] - periods[0]
        lo, hi = periods[best] - width, periods[best] + width
    period = float(periods[best])
    mean = np.exp(1j * TWO_PI * (values - values.min()) / period).mean()
    origin = float(values.min() + np.angle(mean) / TWO_PI * period)
    return period, origin, float(np.abs(mean))


def _lattice_indices(positions: np.ndarray) -> np.ndarray | None:
    """Grid indices by rounding to a fitted rectangular lattice (for strongly jittered rasters).

    Step guesses from nearest-neighbour displacements, refined per axis by `_lattice_period`;
    accepted when the RMS residual is below a fifth of a step (a spiral or random scan leaves
    ~0.29, uniform residuals) and the grid is one position per cell, mostly filled.
    """
    from scipy.spatial import cKDTree

    if len(positions) < 4:
        return None
    # the 4 nearest neighbours of a raster point are its row and column neighbours
    _, nn = cKDTree(positions).query(positions, k=min(5, len(positions)))
    disp = np.abs(positions[nn[:, 1:]] - positions[:, None, :]).reshape(-1, 2)
    step, origin = np.zeros(2), np.zeros(2)
    for axis in (0, 1):
        along = disp[disp[:, axis] > disp[:, 1 - axis], axis]
        if along.size == 0 or not np.median(along) > 0:
            return None
        step[axis], origin[axis], coherence = _lattice_period(
            positions[:, axis], float(np.median(along))
        )
        if coherence < 0.3:  # jitter beyond ~a fifth of a step, or no lattice at all
            return None
    scaled = (positions - origin) / step
    idx = np.rint(scaled).astype(np.int64)
    rms = float(np.sqrt(np.mean((scaled - idx) ** 2)))
    if rms > 0.2 or not _valid_grid(idx):
        return None
    return idx - idx.min(axis=0)


def _raster_indices(positions: np.ndarray) -> np.ndarray | None:
    """Grid indices (n, 2) when the positions lie on a (possibly jittered) raster, else None.

    First by clustering each axis into grid lines (exact for small jitter, any step per axis),
    then by rounding to a fitted lattice (jitter up to about a fifth of a step).
    """
    rows = _grid_labels(positions[:, 0])
    cols = _grid_labels(positions[:, 1])
    if rows is not None and cols is not None:
        (ri, _, sr, pr), (ci, _, sc, pc) = rows, cols
        if pr <= 0.5 * sr and pc <= 0.5 * sc:  # lines well separated
            idx = np.stack([ri, ci], axis=1)
            if _valid_grid(idx):
                return idx
    return _lattice_indices(positions)


def half_split(
    positions: np.ndarray,
    kind: Literal["auto", "checkerboard", "alternate"] = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Split scan positions (n, 2) (y, x) into two interleaved halves covering the whole field.

    "checkerboard": positions on a raster (rows and columns detected by clustering, or by
    rounding to a fitted lattice when jittered; snake order fine) go to half A when
    row + column is even.
    "alternate": even / odd index in acquisition order (spirals, random scans). "auto"
    chooses checkerboard when the positions form a raster. Returns sorted index arrays.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] < 2 or not np.isfinite(pos).all():
        raise InputError(
            f"half_split: positions of shape {pos.shape}, expected finite (n >= 2, 2) (y, x)"
        )
    if kind not in ("auto", "checkerboard", "alternate"):
        raise InputError(f"half_split: kind {kind!r}, expected auto, checkerboard or alternate")
    idx = _raster_indices(pos) if kind in ("auto", "checkerboard") else None
    if kind == "checkerboard" and idx is None:
        raise InputError(
            "half_split: kind 'checkerboard' needs positions on a raster grid; these are not "
            "(use kind='alternate')"
        )
    n = pos.shape[0]
    if idx is not None:
        in_a = (idx.sum(axis=1) % 2) == 0
    else:
        in_a = (np.arange(n) % 2) == 0
    return np.flatnonzero(in_a), np.flatnonzero(~in_a)
