"""Probe guesses from files: every source format, resampling, crop / pad, and each error."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

from ptyinr import store
from ptyinr.errors import InputError
from ptyinr.probe_files import (
    HDF5_PROBE_PATHS,
    ProbeGuess,
    centre_crop_or_pad,
    load_probe_guess,
)
from ptyinr.simulate import SimulationConfig, write_simulated_store

SHAPE = (16, 16)


def _probe(shape=SHAPE, seed=0) -> np.ndarray:
    """A known complex probe: a Gaussian spot with a phase ramp and some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape, dtype=np.float64)
    y -= shape[0] // 2
    x -= shape[1] // 2
    amp = np.exp(-(y**2 + x**2) / (2 * 3.0**2)) + 0.05 * rng.random(shape)
    return (amp * np.exp(1j * (0.3 * x - 0.2 * y))).astype(np.complex64)


def _gaussian(shape, sigma, centre=None) -> np.ndarray:
    cy, cx = centre if centre is not None else (shape[0] // 2, shape[1] // 2)
    y, x = np.indices(shape, dtype=np.float64)
    r2 = (y - cy) ** 2 + (x - cx) ** 2
    return (np.exp(-r2 / (2 * sigma**2)) * np.exp(0.5j)).astype(np.complex64)


def _moments(field: np.ndarray) -> tuple[float, float, float, float]:
    """Centroid (y, x) and second-moment width (y, x) of |field|^2, in pixels."""
    i = np.abs(field) ** 2
    y, x = np.indices(i.shape, dtype=np.float64)
    total = i.sum()
    cy, cx = (i * y).sum() / total, (i * x).sum() / total
    wy = np.sqrt((i * (y - cy) ** 2).sum() / total)
    wx = np.sqrt((i * (x - cx) ** 2).sum() / total)
    return float(cy), float(cx), float(wy), float(wx)


def _h5(path: Path, dataset: str, data: np.ndarray, **attrs) -> Path:
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(dataset, data=data)
        ds.attrs.update(attrs)
    return path


# ------------------------------------------------------------------------------- formats


def test_npy_round_trip(tmp_path):
    probe = _probe()
    np.save(tmp_path / "p.npy", probe)
    guess = load_probe_guess(tmp_path / "p.npy", SHAPE, (1e-8, 1e-8))
    assert isinstance(guess, ProbeGuess)
    assert guess.array.dtype == np.complex64 and guess.array.shape == SHAPE
    np.testing.assert_array_equal(guess.array, probe)
    assert guess.pixel_size_m is None and guess.resampled is False
    assert guess.source == str(tmp_path / "p.npy")


def test_npy_real_array_becomes_complex(tmp_path):
    probe = np.abs(_probe()).astype(np.float32)
    np.save(tmp_path / "p.npy", probe)
    guess = load_probe_guess(str(tmp_path / "p.npy"), SHAPE, None)
    assert guess.array.dtype == np.complex64
    np.testing.assert_array_equal(guess.array.real, probe)
    assert not np.any(guess.array.imag)


def test_npz_with_pixel_size(tmp_path):
    probe = _probe()
    np.savez(tmp_path / "p.npz", probe=probe, pixel_size_m=np.float64(1e-8), other=np.ones(3))
    guess = load_probe_guess(tmp_path / "p.npz", SHAPE, (1e-8, 1e-8))
    np.testing.assert_array_equal(guess.array, probe)
    assert guess.pixel_size_m == (1e-8, 1e-8) and guess.resampled is False


def test_npz_single_array_any_key_and_pixel_pair(tmp_path):
    probe = _probe()
    np.savez(tmp_path / "p.npz", illum=probe, pixel_size_m=np.array([1e-8, 2e-8]))
    guess = load_probe_guess(tmp_path / "p.npz", SHAPE, None)
    np.testing.assert_array_equal(guess.array, probe)
    assert guess.pixel_size_m == (1e-8, 2e-8)


@pytest.mark.parametrize("dataset", HDF5_PROBE_PATHS)
def test_hdf5_default_paths(tmp_path, dataset):
    probe = _probe()
    path = _h5(tmp_path / "p.h5", dataset, probe, pixel_size_m=2e-8)
    guess = load_probe_guess(path, SHAPE, None)
    np.testing.assert_array_equal(guess.array, probe)
    assert guess.pixel_size_m == (2e-8, 2e-8)
    assert guess.source == f"{path}:{dataset}"


def test_hdf5_first_default_path_wins(tmp_path):
    probe = _probe()
    path = tmp_path / "p.hdf5"
    with h5py.File(path, "w") as f:
        f["/probe"] = np.ones(SHAPE, np.complex64)
        f["/entry_1/probe"] = probe
    np.testing.assert_array_equal(load_probe_guess(path, SHAPE, None).array, probe)


def test_hdf5_explicit_dataset(tmp_path):
    probe = _probe()
    path = tmp_path / "scan.v2.nxs"
    with h5py.File(path, "w") as f:
        f["/probe"] = np.ones(SHAPE, np.complex64)  # a default path, not the one asked for
        f["/results/my:probe"] = probe
    guess = load_probe_guess(f"{path}:/results/my:probe", SHAPE, None)
    np.testing.assert_array_equal(guess.array, probe)
    assert guess.source == f"{path}:/results/my:probe"


def test_cxi_illumination_with_xy_pixel_attrs(tmp_path):
    probe = _probe()
    path = _h5(
        tmp_path / "run.cxi",
        "/entry_1/instrument_1/source_1/illumination",
        probe,
        x_pixel_size=1e-8,
        y_pixel_size=3e-8,
    )
    guess = load_probe_guess(path, SHAPE, None)
    np.testing.assert_array_equal(guess.array, probe)
    assert guess.pixel_size_m == (3e-8, 1e-8)


def test_three_d_modes_take_mode_zero(tmp_path):
    modes = np.stack([_probe(seed=0), _probe(seed=1) * 0.1, _probe(seed=2) * 0.01])
    np.save(tmp_path / "m.npy", modes)
    np.testing.assert_array_equal(load_probe_guess(tmp_path / "m.npy", SHAPE, None).array, modes[0])
    path = _h5(tmp_path / "m.cxi", "/entry_1/probe", modes)
    np.testing.assert_array_equal(load_probe_guess(path, SHAPE, None).array, modes[0])


# ------------------------------------------------------------------------------ scan stores


@pytest.fixture(scope="module")
def scan_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "scan.zarr"
    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3)
    return write_simulated_store(path, sim)


def _probe_dataset(probe: np.ndarray, pixel: float, unit: str) -> xr.Dataset:
    ny, nx = probe.shape
    da = xr.DataArray(
        probe,
        dims=("probe_y", "probe_x"),
        coords={
            "probe_y": ("probe_y", (np.arange(ny) - ny // 2) * pixel, {"units": unit}),
            "probe_x": ("probe_x", (np.arange(nx) - nx // 2) * pixel, {"units": unit}),
        },
        name="probe",
    )
    return xr.Dataset({"probe": da})


def test_store_run_round_trip(scan_store):
    probe = _probe()
    store.write_run(scan_store, "run-m", _probe_dataset(probe, 1e-8, "m"), attrs={})
    store.mark_run(scan_store, "run-m", "complete")
    guess = load_probe_guess(f"{scan_store}:run-m", SHAPE, (1e-8, 1e-8))
    np.testing.assert_array_equal(guess.array, probe)
    assert guess.pixel_size_m == pytest.approx((1e-8, 1e-8))
    assert guess.resampled is False
    assert guess.source == f"{scan_store}:run-m"


def test_store_run_in_pixels_has_no_pixel_size(scan_store):
    probe = _probe((12, 20))
    store.write_run(scan_store, "run-px", _probe_dataset(probe, 1.0, "px"), attrs={})
    store.mark_run(scan_store, "run-px", "complete")
    guess = load_probe_guess(f"{scan_store}:run-px", SHAPE, (1e-8, 1e-8))
    assert guess.pixel_size_m is None and guess.resampled is False
    np.testing.assert_array_equal(guess.array, centre_crop_or_pad(probe, SHAPE))


def test_store_run_not_complete(scan_store):
    store.write_run(scan_store, "run-busy", _probe_dataset(_probe(), 1e-8, "m"), attrs={})
    with pytest.raises(InputError, match=r"scan\.zarr.*'run-busy'.*status='running'"):
        load_probe_guess(f"{scan_store}:run-busy", SHAPE, None)


def test_store_run_missing_lists_runs(scan_store):
    store.write_run(scan_store, "run-listed", _probe_dataset(_probe(), 1e-8, "m"), attrs={})
    with pytest.raises(InputError, match=r"scan\.zarr.*'nope'.*run-listed") as err:
        load_probe_guess(f"{scan_store}:nope", SHAPE, None)
    assert "\n" not in str(err.value)


def test_store_without_run_id(scan_store):
    with pytest.raises(InputError, match=r"scan\.zarr.*RUN_ID"):
        load_probe_guess(scan_store, SHAPE, None)


# ------------------------------------------------------------------------------ resampling


@pytest.mark.parametrize("shape", [(64, 64), (63, 65)])
def test_resample_finer_file_halves_width(tmp_path, shape):
    """A Gaussian sampled at half the target pixel comes out half as wide, on the axis."""
    src = _gaussian((96, 96), sigma=6.0)
    np.savez(tmp_path / "g.npz", probe=src, pixel_size_m=5e-9)
    guess = load_probe_guess(tmp_path / "g.npz", shape, (1e-8, 1e-8))
    assert guess.resampled is True and guess.array.shape == shape
    _, _, wy_src, wx_src = _moments(src)
    cy, cx, wy, wx = _moments(guess.array)
    assert wy == pytest.approx(wy_src / 2, rel=0.03)
    assert wx == pytest.approx(wx_src / 2, rel=0.03)
    assert (cy, cx) == pytest.approx((shape[0] // 2, shape[1] // 2), abs=0.02)
    peak = np.unravel_index(np.argmax(np.abs(guess.array)), shape)
    assert peak == (shape[0] // 2, shape[1] // 2)
    # the phase travels with the field
    assert np.angle(guess.array[peak]) == pytest.approx(0.5, abs=1e-3)


def test_resample_coarser_file_and_anisotropic(tmp_path):
    """File pixel 1.5x (y) and 1x (x) the target: y widens by 1.5, x is untouched."""
    src = _gaussian((32, 32), sigma=3.0)
    np.savez(tmp_path / "g.npz", probe=src, pixel_size_m=np.array([1.5e-8, 1.0e-8]))
    guess = load_probe_guess(tmp_path / "g.npz", (64, 48), (1e-8, 1e-8))
    assert guess.resampled is True
    _, _, wy_src, wx_src = _moments(src)
    cy, cx, wy, wx = _moments(guess.array)
    assert wy == pytest.approx(1.5 * wy_src, rel=0.03)
    assert wx == pytest.approx(wx_src, rel=1e-3)
    assert (cy, cx) == pytest.approx((32, 24), abs=0.02)


def test_pixel_sizes_within_tolerance_do_not_resample(tmp_path):
    probe = _probe()
    np.savez(tmp_path / "p.npz", probe=probe, pixel_size_m=1.0005e-8)
    guess = load_probe_guess(tmp_path / "p.npz", SHAPE, (1e-8, 1e-8))
    assert guess.resampled is False
    np.testing.assert_array_equal(guess.array, probe)


def test_unknown_target_pixel_only_crops(tmp_path):
    np.savez(tmp_path / "p.npz", probe=_probe((20, 20)), pixel_size_m=5e-9)
    assert load_probe_guess(tmp_path / "p.npz", SHAPE, None).resampled is False


# --------------------------------------------------------------------------- crop and pad


@pytest.mark.parametrize(
    ("src_shape", "dst_shape"),
    [((16, 16), (24, 24)), ((24, 24), (16, 16)), ((15, 17), (16, 16)), ((16, 16), (15, 17))],
)
def test_crop_pad_keeps_centre(tmp_path, src_shape, dst_shape):
    src = np.zeros(src_shape, np.complex64)
    cy, cx = src_shape[0] // 2, src_shape[1] // 2
    src[cy, cx] = 2 + 1j
    src[cy - 1, cx + 1] = 1
    np.save(tmp_path / "p.npy", src)
    guess = load_probe_guess(tmp_path / "p.npy", dst_shape, None)
    out = guess.array
    oy, ox = dst_shape[0] // 2, dst_shape[1] // 2
    assert out.shape == dst_shape and guess.resampled is False
    assert out[oy, ox] == 2 + 1j and out[oy - 1, ox + 1] == 1
    assert np.count_nonzero(out) == 2


def test_large_guess_is_cropped_even_when_it_cuts_intensity(tmp_path):
    np.save(tmp_path / "p.npy", _gaussian((64, 64), sigma=12.0))
    guess = load_probe_guess(tmp_path / "p.npy", SHAPE, None)
    assert guess.array.shape == SHAPE


# --------------------------------------------------------------------------------- errors


def _raises(source, match, shape=SHAPE, pixel=None):
    with pytest.raises(InputError, match=match) as err:
        load_probe_guess(source, shape, pixel)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_file(tmp_path):
    _raises(tmp_path / "absent.npy", r"absent\.npy.*does not exist")
    _raises(f"{tmp_path / 'absent.h5'}:/entry_1/probe", r"absent\.h5.*does not exist")


def test_unreadable_files(tmp_path):
    for name in ("bad.npy", "bad.npz", "bad.h5"):
        (tmp_path / name).write_bytes(b"not a probe\n")
        _raises(tmp_path / name, rf"{name.replace('.', '[.]')}.*cannot be")
    (tmp_path / "p.txt").write_text("1 2 3")
    _raises(tmp_path / "p.txt", r"p\.txt.*suffix")


def test_pickles_are_never_loaded(tmp_path):
    obj = np.array([{"a": 1}, None], dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    _raises(tmp_path / "obj.npy", r"obj\.npy.*cannot be read")
    np.savez(tmp_path / "obj.npz", probe=obj)
    _raises(tmp_path / "obj.npz", r"obj\.npz.*cannot be read")


def test_npz_without_probe_key(tmp_path):
    np.savez(tmp_path / "two.npz", a=_probe(), b=_probe())
    _raises(tmp_path / "two.npz", r"two\.npz.*keys \['a', 'b'\].*'probe'")


def test_npz_bad_pixel_size(tmp_path):
    np.savez(tmp_path / "p.npz", probe=_probe(), pixel_size_m=10.0)
    _raises(tmp_path / "p.npz", r"p\.npz.*'pixel_size_m'.*10\.0.*metres")
    np.savez(tmp_path / "q.npz", probe=_probe(), pixel_size_m=np.array([1e-8, 1e-8, 1e-8]))
    _raises(tmp_path / "q.npz", r"q\.npz.*'pixel_size_m'")


def test_hdf5_no_probe_dataset_lists_paths(tmp_path):
    path = _h5(tmp_path / "empty.h5", "/entry_1/data_1/data", np.ones((2, 4, 4)))
    msg = _raises(path, r"empty\.h5.*no probe dataset")
    for p in HDF5_PROBE_PATHS:
        assert p in msg


def test_hdf5_explicit_dataset_missing_or_group(tmp_path):
    path = _h5(tmp_path / "p.h5", "/entry_1/probe", _probe())
    _raises(f"{path}:/entry_1/nothing", r"p\.h5.*'/entry_1/nothing'.*missing")
    _raises(f"{path}:/entry_1", r"p\.h5.*'/entry_1'.*a group")


@pytest.mark.parametrize("shape", [(16,), (1, 2, 16, 16)])
def test_wrong_dimensions(tmp_path, shape):
    data = np.ones(shape, np.complex64)
    np.save(tmp_path / "p.npy", data)
    _raises(tmp_path / "p.npy", rf"p\.npy.*shape \({shape[0]},.*expected 2-D")
    path = _h5(tmp_path / "p.h5", "/probe", data)
    _raises(path, rf"p\.h5.*'/probe'.*shape \({shape[0]},.*expected 2-D")


def test_non_finite_values(tmp_path):
    probe = _probe()
    probe[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", probe)
    _raises(tmp_path / "nan.npy", r"nan\.npy.*probe\[3, 4\]=.*nan.*finite")
    probe[3, 4] = np.inf
    np.savez(tmp_path / "inf.npz", probe=probe)
    _raises(tmp_path / "inf.npz", r"inf\.npz.*key 'probe'.*probe\[3, 4\]=.*inf.*finite")


def test_all_zero_probe(tmp_path):
    path = _h5(tmp_path / "zero.cxi", "/entry_1/probe", np.zeros(SHAPE, np.complex64))
    _raises(path, r"zero\.cxi.*'/entry_1/probe'.*all zero")


def test_probe_outside_the_window(tmp_path):
    probe = np.zeros((64, 64), np.complex64)
    probe[0, 0] = 1
    np.save(tmp_path / "corner.npy", probe)
    _raises(tmp_path / "corner.npy", r"corner\.npy.*no intensity inside")


def test_non_numeric_dtype(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["/probe"] = np.array([[b"ab", b"cd"]])
    _raises(path, r"s\.h5.*'/probe'.*dtype")
