"""Tests of ptyinr.evaluate: cases with known answers, computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio

from ptyinr import evaluate as ev
from ptyinr.errors import InputError

# ---------------------------------------------------------------------------------------------
# fixtures: small synthetic images
# ---------------------------------------------------------------------------------------------


def _bandlimited(n: int, cutoff: float, rng: np.random.Generator, cplx: bool = False):
    """White noise low-passed to a sharp circular cutoff (cycles/pixel), unit variance."""
    white = rng.normal(size=(n, n)) + (1j * rng.normal(size=(n, n)) if cplx else 0.0)
    spec = np.fft.fft2(white)
    k = np.fft.fftfreq(n)
    spec[np.hypot(k[:, None], k[None, :]) > cutoff] = 0
    img = np.fft.ifft2(spec)
    img = img if cplx else img.real
    return img / img.std()


def _test_object(n: int, rng: np.random.Generator) -> np.ndarray:
    """Complex object: smooth amplitude in [0.5, 1], smooth phase spanning 0..2.5 rad."""
    ph = ndimage.gaussian_filter(rng.normal(size=(n, n)), 3)
    ph = 2.5 * (ph - ph.min()) / np.ptp(ph)
    amp = ndimage.gaussian_filter(rng.uniform(size=(n, n)), 2)
    amp = 0.5 + 0.5 * (amp - amp.min()) / np.ptp(amp)
    return amp * np.exp(1j * ph)


def _ramp(shape, gy, gx, c):
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return np.exp(1j * (gy * yy + gx * xx + c))


def _cnoise(rng, shape, sigma):
    return sigma * (rng.normal(size=shape) + 1j * rng.normal(size=shape))


# ---------------------------------------------------------------------------------------------
# equation (10): global phase
# ---------------------------------------------------------------------------------------------


def _eq10_cost(theta, est, ref):
    d = np.angle(ref) - np.angle(est * np.exp(1j * theta))
    return float(np.sum(((d + np.pi) % (2 * np.pi) - np.pi) ** 2))


@pytest.mark.parametrize("noise", [0.05, 1.2])
def test_global_phase_is_the_brute_force_minimiser(noise):
    rng = np.random.default_rng(3)
    ref = _test_object(24, rng)
    # large phase noise makes the wrapped cost non-convex: circular mean is then not exact
    est = ref * np.exp(1j * (2.9 + noise * rng.standard_normal(ref.shape)))
    theta = ev.global_phase_offset(est, ref)
    grid = np.linspace(-np.pi, np.pi, 20001)
    costs = np.array([_eq10_cost(t, est, ref) for t in grid])
    best_grid = grid[np.argmin(costs)]
    assert _eq10_cost(theta, est, ref) <= costs.min() + 1e-9
    assert abs(((theta - best_grid + np.pi) % (2 * np.pi)) - np.pi) < 1e-3
    # the circular mean is never better than the exact minimiser
    circ = float(np.angle(np.sum(np.exp(1j * (np.angle(ref) - np.angle(est))))))
    assert _eq10_cost(theta, est, ref) <= _eq10_cost(circ, est, ref) + 1e-9
    if noise < 0.1:
        assert abs(theta + 2.9) < 0.02  # est = ref e^{2.9i}: theta* = -2.9


def test_align_global_phase_undoes_offset_across_the_wrap():
    rng = np.random.default_rng(4)
    ref = _test_object(32, rng)
    est = ref * np.exp(-1j * 3.0)  # differences straddle +-pi
    aligned = ev.align_global_phase(est, ref)
    np.testing.assert_allclose(aligned, ref, atol=1e-12)
    mask = np.zeros(ref.shape, bool)
    mask[:8] = True
    est2 = est.copy()
    est2[~mask] *= np.exp(1j * 1.0)  # outside the mask: must not matter
    np.testing.assert_allclose(ev.align_global_phase(est2, ref, mask)[mask], ref[mask], atol=1e-12)
    w = ev.global_phase_offset(est, ref, amplitude_weighted=True)
    assert abs(w - 3.0) < 1e-9


# ---------------------------------------------------------------------------------------------
# phase ramp
# ---------------------------------------------------------------------------------------------


def test_ramp_and_offset_recovered_from_product_with_reference():
    rng = np.random.default_rng(5)
    obj = _test_object(96, rng)
    gy, gx, c = 0.37, -0.81, 1.3  # wraps many times across the field, off the FFT grid
    est = 1.7 * obj * _ramp(obj.shape, gy, gx, c)
    fit = ev.fit_phase_ramp(est, obj)
    np.testing.assert_allclose(fit, (gy, gx, c), atol=1e-9)
    out = ev.remove_phase_ramp(est, obj)
    np.testing.assert_allclose(out, 1.7 * obj, atol=1e-8)
    # only the mask is used for the fit, the correction covers the whole array
    mask = np.zeros(obj.shape, bool)
    mask[10:80, 20:90] = True
    spoiled = est.copy()
    spoiled[~mask] = rng.normal(size=(~mask).sum())
    np.testing.assert_allclose(ev.fit_phase_ramp(spoiled, obj, mask), (gy, gx, c), atol=1e-9)
    # noisy: still close
    noisy = est + _cnoise(rng, obj.shape, 0.1)
    np.testing.assert_allclose(ev.fit_phase_ramp(noisy, obj)[:2], (gy, gx), atol=2e-4)


def test_ramp_from_estimate_alone_centres_its_spectrum():
    rng = np.random.default_rng(6)
    n = 96
    obj = np.exp(1j * 0.8 * _bandlimited(n, 0.05, rng))
    own = ev.fit_phase_ramp(obj)
    gy, gx = -0.52, 1.11
    fit = ev.fit_phase_ramp(obj * _ramp(obj.shape, gy, gx, 0.4))
    np.testing.assert_allclose(np.array(fit[:2]) - np.array(own[:2]), (gy, gx), atol=1e-5)
    out = ev.remove_phase_ramp(obj * _ramp(obj.shape, gy, gx, 0.4))
    spec = np.abs(np.fft.fft2(out))
    assert np.unravel_index(np.argmax(spec), spec.shape) == (0, 0)


# ---------------------------------------------------------------------------------------------
# PSNR, relative error, scanned interior
# ---------------------------------------------------------------------------------------------


def test_psnr_by_hand():
    ref = np.array([[0.0, 1.0], [2.0, 3.0]])
    est = np.array([[0.0, 1.0], [2.0, 4.0]])
    # MSE = 1/4, MAX = 3 -> 10 log10(9 / 0.25) = 10 log10(36)
    assert ev.psnr(est, ref) == pytest.approx(10 * math.log10(36.0))
    mask = np.array([[True, True], [True, False]])
    assert ev.psnr(est, ref, mask) == math.inf
    mask = np.array([[False, True], [False, True]])
    # over {1, 3}: MSE = 1/2, MAX = 2
    assert ev.psnr(est, ref, mask) == pytest.approx(10 * math.log10(4 / 0.5))
    assert ev.psnr(est, ref, data_range=10.0) == pytest.approx(10 * math.log10(100 / 0.25))
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(16, 16)), rng.uniform(size=(16, 16))
    r = float(np.ptp(a))
    assert ev.psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=r))
    with pytest.raises(InputError, match="data_range"):
        ev.psnr(b, np.ones_like(a))


def test_relative_error_invariant_to_global_complex_scale():
    rng = np.random.default_rng(7)
    ref = _test_object(32, rng)
    est = ref + _cnoise(rng, ref.shape, 0.05)
    e0 = ev.relative_error(est, ref)
    assert 0.02 < e0 < 0.2
    gamma = 2.5 * np.exp(1.1j)
    assert ev.relative_error(gamma * est, ref) == pytest.approx(e0, rel=1e-12)
    assert ev.relative_error(gamma * ref, ref) == pytest.approx(0.0, abs=1e-12)
    # independent formula: distance from ref to the line spanned by est
    proj = np.vdot(est, ref) / np.vdot(est, est) * est
    assert e0 == pytest.approx(np.linalg.norm(proj - ref) / np.linalg.norm(ref))


def test_scanned_interior_matches_paper_central_181():
    # 241 x 241 object; 7 x 7 raster of probe centres from 30 to 210 (a 64 px probe fits)
    g = np.arange(30, 211, 30, dtype=float)
    pos = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    m = ev.scanned_interior((241, 241), pos)
    assert m.sum() == 181 * 181
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (30, 210, 30, 210)
    assert ev.scanned_interior((241, 241), pos, margin=-5).sum() == 171 * 171
    assert ev.scanned_interior((241, 241), pos, margin=100).all()  # clipped to the object
    sub = ev.scanned_interior((50, 60), np.array([[10.4, 5.6], [20.5, 30.2]]))
    assert np.flatnonzero(sub.any(1)).tolist() == list(range(11, 21))
    assert np.flatnonzero(sub.any(0)).tolist() == list(range(6, 31))
    with pytest.raises(InputError):
        ev.scanned_interior((10, 10), np.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------
# compare_object / compare_probe
# ---------------------------------------------------------------------------------------------


def _truth_da(obj, pixel_m=10e-9):
    ny, nx = obj.shape
    return xr.DataArray(
        obj,
        dims=("obj_y", "obj_x"),
        coords={
            "obj_y": ("obj_y", np.arange(ny) * pixel_m, {"units": "m"}),
            "obj_x": ("obj_x", np.arange(nx) * pixel_m, {"units": "m"}),
        },
    )


def test_compare_object_crops_on_coordinates_and_removes_ambiguities():
    rng = np.random.default_rng(8)
    px = 10e-9
    obj = _test_object(80, rng)
    truth = _truth_da(obj, px)
    sub = obj[10:70, 5:75]  # the estimate covers part of the truth's field
    est_vals = 0.6 * np.exp(0.7j) * sub * _ramp(sub.shape, 0.21, -0.33, 0.0)
    est = xr.DataArray(
        est_vals.astype(np.complex64),
        dims=("y", "x"),
        coords={"y": 10 * px + np.arange(60) * px, "x": 5 * px + np.arange(70) * px},
    )
    res = ev.compare_object(est, truth, remove_ramp=True)
    assert res["relative_error"] < 1e-5
    assert res["amplitude_psnr_db"] > 80 and res["phase_psnr_db"] > 80
    assert res["n_pixels"] == 60 * 70
    assert res["amplitude_scale"] == pytest.approx(1 / 0.6, rel=1e-5)
    # without ramp removal the ramp is an error
    bad = ev.compare_object(est, truth, remove_ramp=False)
    assert bad["relative_error"] > 0.5 and bad["phase_psnr_db"] < 20
    # a mask on the estimate's grid restricts the pixels
    mask = np.zeros(est.shape, bool)
    mask[5:20, 5:30] = True
    assert ev.compare_object(est, truth, mask=mask, remove_ramp=True)["n_pixels"] == 15 * 25


def test_compare_object_transposed_truth_and_labelled_mask():
    rng = np.random.default_rng(20)
    obj = _test_object(40, rng)
    px = 5e-9
    y = np.arange(40) * px
    est = xr.DataArray(obj, dims=("y", "x"), coords={"y": y, "x": y})
    # truth stored as (x, y) with coordinates in nm: must be transposed and converted
    truth = xr.DataArray(
        obj.T,
        dims=("obj_x", "obj_y"),
        coords={
            "obj_x": ("obj_x", y * 1e9, {"units": "nm"}),
            "obj_y": ("obj_y", y * 1e9, {"units": "nm"}),
        },
    )
    assert ev.compare_object(est, truth, remove_ramp=False)["relative_error"] < 1e-12
    mask = xr.DataArray(np.zeros((40, 40), bool), dims=("y", "x"), coords={"y": y, "x": y})
    mask[10:20, 5:30] = True
    res = ev.compare_object(est + _cnoise(rng, obj.shape, 0.1), truth, mask=mask, remove_ramp=False)
    assert res["n_pixels"] == 10 * 25
    ds = ev.align_object(est, truth, mask=mask, remove_ramp=False)
    assert ds.mask.values.sum() == 250 and ds.attrs["unit"] == "m"


def test_compare_object_psnr_against_hand_computation():
    rng = np.random.default_rng(9)
    obj = _test_object(40, rng)
    noisy = obj + _cnoise(rng, obj.shape, 0.03)
    res = ev.compare_object(
        xr.DataArray(noisy, dims=("y", "x")), xr.DataArray(obj), remove_ramp=False
    )
    theta = ev.global_phase_offset(noisy, obj)
    al = noisy * np.exp(1j * theta)
    s = np.sum(np.abs(al) * np.abs(obj)) / np.sum(np.abs(al) ** 2)
    mse_a = np.mean((s * np.abs(al) - np.abs(obj)) ** 2)
    assert res["amplitude_psnr_db"] == pytest.approx(
        10 * np.log10(np.ptp(np.abs(obj)) ** 2 / mse_a)
    )
    dphi = np.angle(al * np.conj(obj))
    mse_p = np.mean(dphi**2)
    assert res["phase_psnr_db"] == pytest.approx(10 * np.log10(np.ptp(np.angle(obj)) ** 2 / mse_p))


def test_compare_object_interpolates_a_subpixel_offset_grid():
    rng = np.random.default_rng(10)
    x = np.arange(64.0)
    obj = np.exp(1j * 0.5 * _bandlimited(64, 0.04, rng)) * (1 + 0.2 * _bandlimited(64, 0.04, rng))
    truth = xr.DataArray(obj, dims=("y", "x"), coords={"y": x, "x": x})
    # estimate sampled half a pixel off: exact values from the band-limited truth
    from scipy.ndimage import fourier_shift

    shifted = np.fft.ifft2(fourier_shift(np.fft.fft2(obj), (-0.5, -0.5)))
    est = xr.DataArray(
        shifted[4:60, 4:60], dims=("y", "x"), coords={"y": x[4:60] + 0.5, "x": x[4:60] + 0.5}
    )
    res = ev.compare_object(est, truth, remove_ramp=False)
    assert res["relative_error"] < 0.01  # only linear-interpolation error
    assert res["n_pixels"] == 56 * 56


def test_compare_object_errors():
    obj = np.ones((10, 10), complex)
    est_m = xr.DataArray(
        obj, dims=("y", "x"), coords={"y": np.arange(10) * 1e-8, "x": np.arange(10) * 1e-8}
    )
    tru_px = xr.DataArray(
        obj,
        dims=("y", "x"),
        coords={
            "y": ("y", np.arange(10.0), {"units": "px"}),
            "x": ("x", np.arange(10.0), {"units": "px"}),
        },
    )
    with pytest.raises(InputError, match="same unit"):
        ev.compare_object(est_m, tru_px, remove_ramp=False)
    far = est_m.assign_coords(y=est_m.y + 1e-6)
    with pytest.raises(InputError, match="do not overlap"):
        ev.compare_object(far, est_m, remove_ramp=False)
    with pytest.raises(InputError, match="mask shape"):
        ev.compare_object(est_m, est_m, mask=np.ones((3, 3), bool), remove_ramp=False)


def test_compare_probe_removes_opposite_ramp():
    rng = np.random.default_rng(11)
    n = 48
    yy, xx = np.mgrid[:n, :n] - n / 2
    probe = np.exp(-(yy**2 + xx**2) / (2 * 8.0**2)) * np.exp(1j * 0.02 * (yy**2 + xx**2))
    est = 3.0 * probe * _ramp(probe.shape, -0.21, 0.33, 2.0)  # object got e^{+ikr}
    res = ev.compare_probe(est, probe)
    assert res["probe_relative_error"] < 1e-6
    assert res["probe_amplitude_psnr_db"] > 80
    bad = ev.compare_probe(est, probe, remove_ramp=False)
    assert bad["probe_relative_error"] > 0.5
    noisy = ev.compare_probe(est + _cnoise(rng, est.shape, 0.05), probe)
    assert 0.01 < noisy["probe_relative_error"] < 0.2
    with pytest.raises(InputError, match="shape"):
        ev.compare_probe(est[:10], probe)


# ---------------------------------------------------------------------------------------------
# FRC
# ---------------------------------------------------------------------------------------------


def test_frc_identical_images_is_one():
    rng = np.random.default_rng(12)
    img = _bandlimited(64, 0.45, rng) + 3.0
    ds = ev.frc(img, img)
    assert set(ds.data_vars) >= {"frc", "half_bit_threshold", "n_pixels"}
    assert ds.frc.dims == ("spatial_frequency",)
    np.testing.assert_allclose(ds.frc.values, 1.0, atol=1e-9)
    assert ds.attrs["resolved_to_nyquist"] is True
    assert math.isnan(ds.attrs["resolution"])
    assert "Nyquist" in ds.attrs["resolution_note"]
    assert ds.spatial_frequency.values[-1] == pytest.approx(0.5)
    assert ds.attrs["unit"] == "px"


def test_frc_threshold_is_van_heel_half_bit():
    ds = ev.frc(np.eye(32), np.eye(32), register=False)
    n = ds.n_pixels.values.astype(float)
    expected = (0.2071 + 1.9102 / np.sqrt(n)) / (1.2071 + 0.9102 / np.sqrt(n))
    np.testing.assert_allclose(ds.half_bit_threshold.values, expected)
    assert ds.n_pixels.values[0] == 1
    assert ds.n_pixels.values[1] == 8  # ring of radius 1 on the integer grid (rounded radius)
    assert ds.half_bit_threshold.values[0] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("cplx", [False, True])
def test_frc_independent_noise_is_near_zero(cplx):
    rng = np.random.default_rng(13)
    shape = (128, 128)
    a = rng.normal(size=shape) + (1j * rng.normal(size=shape) if cplx else 0)
    b = rng.normal(size=shape) + (1j * rng.normal(size=shape) if cplx else 0)
    ds = ev.frc(a, b)
    f = ds.frc.values[1:]
    thr = ds.half_bit_threshold.values[1:]
    assert abs(f.mean()) < 0.05
    assert np.mean(np.abs(f) < thr) > 0.95
    assert math.isnan(ds.attrs["resolution"])
    assert ds.attrs["resolved_to_nyquist"] is False


@pytest.mark.parametrize("cutoff", [0.15, 0.3])
def test_frc_crossing_at_band_limit(cutoff):
    rng = np.random.default_rng(14)
    signal = _bandlimited(192, cutoff, rng)
    a = signal + 0.5 * rng.normal(size=signal.shape)
    b = signal + 0.5 * rng.normal(size=signal.shape)
    ds = ev.frc(a, b, pixel_size=10.0, unit="nm")
    f_cross_px = ds.attrs["resolution_spatial_frequency"] * 10e-9  # 1/m -> cycles/pixel
    assert f_cross_px == pytest.approx(cutoff, rel=0.15)
    assert ds.attrs["unit"] == "m"
    assert ds.spatial_frequency.attrs["units"] == "1/m"
    assert ds.attrs["resolution"] == pytest.approx(
        1 / (2 * ds.attrs["resolution_spatial_frequency"])
    )
    assert ds.attrs["resolution"] == pytest.approx(10e-9 / (2 * cutoff), rel=0.15)
    # inside the band the curve is high, outside it is low
    inside = ds.frc.values[3 : int(0.8 * cutoff * 192)]
    assert inside.min() > 0.6


def test_frc_registers_subpixel_shift():
    rng = np.random.default_rng(15)
    n = 128
    amp = 1 + 0.3 * _bandlimited(n, 0.35, rng)
    obj = amp * np.exp(1j * 0.7 * _bandlimited(n, 0.35, rng))
    moved = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(obj), (1.37, -2.61)))
    ds = ev.frc(obj, moved)
    assert ds.attrs["registration_shift_px"] == pytest.approx([-1.37, 2.61], abs=0.02)
    inband = ds.frc.values[1 : int(0.33 * ds.attrs["image_size_px"])]
    assert inband.min() > 0.99
    # the same without registration decorrelates: the test can fail
    raw = ev.frc(obj, moved, register=False)
    assert raw.frc.values[1 : int(0.33 * n)].min() < 0.5


def test_frc_removes_relative_ramp_and_offset():
    rng = np.random.default_rng(16)
    n = 96
    obj = (1 + 0.3 * _bandlimited(n, 0.3, rng)) * np.exp(1j * 0.7 * _bandlimited(n, 0.3, rng))
    other = obj * _ramp(obj.shape, 0.123, -0.047, 2.2)
    ds = ev.frc(obj, other)
    assert ds.frc.values[1 : int(0.28 * n)].min() > 0.99
    raw = ev.frc(obj, other, remove_ramp=False, register=False)
    assert raw.frc.values[1 : int(0.28 * n)].mean() < 0.5


def test_frc_non_square_and_dataarray_inputs():
    rng = np.random.default_rng(17)
    signal = _bandlimited(96, 0.2, rng)[:, :80]
    a = signal + 0.3 * rng.normal(size=signal.shape)
    b = signal + 0.3 * rng.normal(size=signal.shape)
    px = 20e-9
    coords = {"y": np.arange(96) * px, "x": np.arange(80) * px}
    da_a = xr.DataArray(a, dims=("y", "x"), coords=coords)
    da_b = xr.DataArray(b, dims=("y", "x"), coords=coords)
    ds = ev.frc(da_a, da_b)
    assert ds.attrs["image_size_px"] == 80  # central square crop
    assert ds.attrs["unit"] == "m" and ds.attrs["pixel_size"] == pytest.approx(px)
    assert ds.spatial_frequency.values[-1] == pytest.approx(0.5 / px)
    assert ds.attrs["resolution"] == pytest.approx(px / (2 * 0.2), rel=0.2)
    with pytest.raises(InputError, match="shape"):
        ev.frc(a, b[:, :70])


# ---------------------------------------------------------------------------------------------
# half split
# ---------------------------------------------------------------------------------------------


def _check_split(pos, a, b):
    assert np.intersect1d(a, b).size == 0
    assert np.array_equal(np.union1d(a, b), np.arange(len(pos)))
    assert abs(len(a) - len(b)) <= 1
    lo, hi = pos.min(0), pos.max(0)
    span = hi - lo
    for half in (a, b):
        assert np.all(pos[half].min(0) - lo <= 0.1 * span)
        assert np.all(hi - pos[half].max(0) <= 0.1 * span)


def test_half_split_raster_is_checkerboard():
    rng = np.random.default_rng(18)
    g = np.arange(9) * 1e-7
    yy, xx = np.meshgrid(g, g[:8], indexing="ij")
    xx[1::2] = xx[1::2, ::-1]  # snake order
    pos = np.stack([yy, xx], -1).reshape(-1, 2) + rng.uniform(-1.5e-8, 1.5e-8, (72, 2))
    a, b = ev.half_split(pos)
    _check_split(pos, a, b)
    in_a = np.zeros(len(pos), bool)
    in_a[a] = True
    # the generating grid indices: row i, column j (the snake reverses odd rows)
    ii, jj = np.meshgrid(np.arange(9), np.arange(8), indexing="ij")
    jj[1::2] = jj[1::2, ::-1]
    parity = ((ii + jj) % 2 == 0).ravel()
    assert np.array_equal(in_a, parity) or np.array_equal(in_a, ~parity)
    assert np.array_equal(ev.half_split(pos, "checkerboard")[0], a)


def test_half_split_strongly_jittered_raster_is_still_checkerboard():
    # Gaussian jitter of 10 % of the step: rows overlap in y, so lines cannot be clustered;
    # the lattice fit still finds the grid. 10 columns (even): alternate would give stripes.
    rng = np.random.default_rng(19)
    ii, jj = np.meshgrid(np.arange(12), np.arange(10), indexing="ij")
    step = np.array([30e-9, 20e-9])
    pos = np.stack([ii, jj], -1).reshape(-1, 2) * step + 1e-3
    pos += rng.normal(0.0, 0.1, pos.shape) * step
    a, b = ev.half_split(pos)
    _check_split(pos, a, b)
    in_a = np.zeros(len(pos), bool)
    in_a[a] = True
    parity = ((ii + jj) % 2 == 0).ravel()
    assert np.array_equal(in_a, parity) or np.array_equal(in_a, ~parity)
    assert not np.array_equal(a, np.arange(0, len(pos), 2))


def test_half_split_spiral_alternates():
    n = 200
    k = np.arange(n)
    r, t = np.sqrt(k), k * np.pi * (3 - np.sqrt(5))
    pos = np.stack([r * np.sin(t), r * np.cos(t)], -1)
    a, b = ev.half_split(pos)
    _check_split(pos, a, b)
    assert np.array_equal(a, np.arange(0, n, 2))
    with pytest.raises(InputError, match="raster"):
        ev.half_split(pos, "checkerboard")
    with pytest.raises(InputError, match="kind"):
        ev.half_split(pos, "random")
    with pytest.raises(InputError):
        ev.half_split(np.zeros((5, 3)))
