"""Readers, conversions and bad input: every file here is written by the test itself.

The round trip: simulate a tiny scan with numpy -> export to each format in its own
convention (counts/amplitudes, centred/corner DC, metres/um/pixels, (y, x)/(x, y)) ->
ingest -> identical intensities and positions in the store's units and axis order.
(Reconstructing the round-tripped store is the engine's test, not this file's.)
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptyinr import store
from ptyinr.errors import IngestError
from ptyinr.geometry import object_pixel_size_m
from ptyinr.ingest import Conversions, detect_format, ingest_file, load_readers
from ptyinr.ingest import hdf5 as h5reader

WAVELENGTH = 1.5e-10
DISTANCE = 2.0
PIXEL = 75e-6
N = 16  # frame size


def simulate(n_side: int = 4, seed: int = 0) -> dict:
    """A tiny far-field scan: counts (n, N, N) centred, positions in metres (y, x)."""
    rng = np.random.default_rng(seed)
    obj = np.exp(1j * rng.uniform(-1, 1, (48, 48))) * rng.uniform(0.5, 1, (48, 48))
    yy, xx = np.mgrid[:N, :N] - N // 2
    probe = np.exp(-(yy**2 + xx**2) / 12.0)
    step = 5
    ys, xs = np.meshgrid(
        np.arange(n_side) * step + N // 2, np.arange(n_side) * step + 9, indexing="ij"
    )
    pos_px = np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.float64)
    frames = []
    for cy, cx in pos_px.astype(int):
        patch = obj[cy - N // 2 : cy - N // 2 + N, cx - N // 2 : cx - N // 2 + N]
        far = np.fft.fftshift(np.fft.fft2(probe * patch, norm="ortho"))
        frames.append(rng.poisson(50 * np.abs(far) ** 2))
    counts = np.asarray(frames, dtype=np.uint32)
    size = object_pixel_size_m(WAVELENGTH, DISTANCE, PIXEL, (N, N))
    return {"counts": counts, "pos_px": pos_px, "pos_m": pos_px * np.asarray(size)}


@pytest.fixture(scope="module")
def scan():
    return simulate()


# ------------------------------------------------------------------------------ exporters


def export_hdf5(path: Path, s: dict) -> dict[str, str]:
    with h5py.File(path, "w") as f:
        f["/entry/data/data"] = s["counts"]
        f["/entry/sample/positions"] = s["pos_m"]
        f["/entry/instrument/energy_kev"] = np.full(
            len(s["counts"]), 1.239841984e-6 / WAVELENGTH / 1e3
        )
        f.create_group("/entry/instrument/detector")
        f["/entry/instrument/detector"].attrs["distance_mm"] = DISTANCE * 1e3
        f["/entry/instrument/detector"].attrs["pixel_um"] = PIXEL * 1e6
        f.attrs["beamline"] = "test-bl"
    return {
        "intensities": "/entry/data/data",
        "positions": "/entry/sample/positions",
        "energy_kev": "/entry/instrument/energy_kev",
        "detector_distance_mm": "/entry/instrument/detector@distance_mm",
        "detector_pixel_size_um": "/entry/instrument/detector@pixel_um",
    }


def export_cxi(path: Path, s: dict, mask: np.ndarray | None = None) -> None:
    n = len(s["counts"])
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 150
        det = f.create_group("entry_1/instrument_1/detector_1")
        det["data"] = s["counts"]
        det["distance"] = DISTANCE
        det["x_pixel_size"] = PIXEL
        det["y_pixel_size"] = PIXEL
        if mask is not None:
            det["mask"] = mask.astype(np.uint32) * 4  # CXI: nonzero bits mark bad pixels
        f["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        f["entry_1/instrument_1/source_1/energy"] = 1.239841984e-6 / WAVELENGTH * 1.602176634e-19
        trans = np.zeros((n, 3))
        trans[:, 0] = s["pos_m"][:, 1]  # CXI columns are (x, y, z)
        trans[:, 1] = s["pos_m"][:, 0]
        f["entry_1/sample_1/geometry_1/translation"] = trans


def export_npz(path: Path, s: dict) -> None:
    """Corner DC, a leading singleton axis, pixel positions in (x, y) order, stored."""
    np.savez(
        path,
        diffraction=np.fft.ifftshift(s["counts"], axes=(1, 2))[None],
        pos=s["pos_px"][:, ::-1].copy(),
    )


def export_ptyinr(path: Path, s: dict) -> None:
    """The authors' HXN layout: corner-DC amplitudes, points (2, n) in um (rows = axis 0)."""
    with h5py.File(path, "w") as f:
        f["diffamp"] = np.fft.fftshift(np.sqrt(s["counts"].astype(np.float64)), axes=(1, 2))
        f["points"] = (s["pos_m"] * 1e6).T
        f["lambda_nm"] = WAVELENGTH * 1e9
        f["ccd_pixel_um"] = PIXEL * 1e6
        f["z_m"] = DISTANCE
        f["angle"] = 0.0


# ------------------------------------------------------------------------------ round trip


def _check_store(path: Path, s: dict, *, exact: bool = True, unit: str = "m") -> None:
    ds = store.open_scan_store(path)
    got = ds["intensities"].values
    if exact:
        assert got.dtype == s["counts"].dtype
        np.testing.assert_array_equal(got, s["counts"])
    else:
        np.testing.assert_allclose(got, s["counts"], rtol=1e-5, atol=1e-3)
    assert ds.attrs["positions_unit"] == unit
    if unit == "m":
        np.testing.assert_allclose(ds["positions"].values, s["pos_m"], rtol=1e-9, atol=1e-18)
        assert ds.attrs["wavelength_m"] == pytest.approx(WAVELENGTH, rel=1e-9)
        assert ds.attrs["detector_distance_m"] == pytest.approx(DISTANCE)
        assert ds.attrs["detector_pixel_size_m"] == pytest.approx(PIXEL)
    # whatever the file's units, pixel positions come back as simulated
    np.testing.assert_allclose(store.positions_px(ds, (N, N)), s["pos_px"], atol=1e-9)


def test_round_trip_generic_hdf5(tmp_path, scan):
    keys = export_hdf5(tmp_path / "g.h5", scan)
    assert detect_format(tmp_path / "g.h5") == "hdf5"
    path = ingest_file(tmp_path / "g.h5", tmp_path / "g.zarr", keys=keys)
    _check_store(path, scan)
    attrs = store.open_scan_store(path).attrs
    assert attrs["source_attrs"]["@beamline"] == "test-bl"
    assert attrs["source_keys"]["detector_distance_mm"].endswith("@distance_mm")
    assert attrs["source_format"] == "hdf5"
    assert attrs["source_sha256"] == hashlib.sha256((tmp_path / "g.h5").read_bytes()).hexdigest()


def test_round_trip_cxi(tmp_path, scan):
    mask = np.zeros((N, N), bool)
    mask[3, 5] = True
    export_cxi(tmp_path / "c.cxi", scan, mask)
    assert detect_format(tmp_path / "c.cxi") == "cxi"
    path = ingest_file(tmp_path / "c.cxi", tmp_path / "c.zarr")
    _check_store(path, scan)
    np.testing.assert_array_equal(store.open_scan_store(path)["mask"].values, mask)
    assert store.open_scan_store(path).attrs["conversions"]["positions_order"] == "xy"


def test_round_trip_npz(tmp_path, scan):
    export_npz(tmp_path / "s.npz", scan)
    assert detect_format(tmp_path / "s.npz") == "npz"
    conv = Conversions(dc="corner", positions_order="xy", positions_unit="px")
    path = ingest_file(tmp_path / "s.npz", tmp_path / "s.zarr", conversions=conv)
    _check_store(path, scan, unit="px")
    attrs = store.open_scan_store(path).attrs
    assert attrs["conversions"]["frames_reshaped_from"] == [1, 16, N, N]
    assert attrs["wavelength_m"] is None


def test_round_trip_ptyinr_h5(tmp_path, scan):
    export_ptyinr(tmp_path / "p.h5", scan)
    assert detect_format(tmp_path / "p.h5") == "ptyinr_h5"
    path = ingest_file(tmp_path / "p.h5", tmp_path / "p.zarr")
    _check_store(path, scan, exact=False)
    conv = store.open_scan_store(path).attrs["conversions"]
    assert conv["amplitude"] is True and conv["dc_detected"] == "corner"
    assert store.open_scan_store(path).attrs["source_attrs"]["angle"] == 0.0


def test_auto_dc_detects_centred_data(tmp_path, scan):
    with h5py.File(tmp_path / "p.h5", "w") as f:  # the authors' simulations: centred DC
        f["diffamp"] = np.sqrt(scan["counts"].astype(np.float64))
        f["points"] = (scan["pos_m"] * 1e6).T
        f["lambda_nm"], f["ccd_pixel_um"], f["z_m"] = WAVELENGTH * 1e9, PIXEL * 1e6, DISTANCE
    path = ingest_file(tmp_path / "p.h5", tmp_path / "p.zarr")
    assert store.open_scan_store(path).attrs["conversions"]["dc_detected"] == "centre"
    _check_store(path, scan, exact=False)


def test_registry_lists_all_readers():
    assert {"hdf5", "cxi", "npz", "ptyinr_h5"} <= set(load_readers())


# ------------------------------------------------------------------------------ conversions


def _tiny_h5(path: Path, frames: np.ndarray, pos: np.ndarray | None = None, **extra) -> Path:
    n = len(frames)
    if pos is None:
        pos = np.stack([np.arange(n, dtype=float), np.arange(n, dtype=float) * 2], axis=1)
    with h5py.File(path, "w") as f:
        f["data"] = frames
        f["pos"] = pos
        for k, v in extra.items():
            f[k] = v
    return path


KEYS = {"intensities": "/data", "positions": "/pos"}


def test_orientation_flips_about_dc(tmp_path):
    frames = np.zeros((2, 6, 8), np.uint16)
    frames[:, 3 + 1, 4 + 2] = 7  # one pixel at q = (+1, +2) from DC (3, 4)
    frames[:, 3, 4] = 9  # DC
    src = _tiny_h5(tmp_path / "o.h5", frames)
    out = ingest_file(
        src, tmp_path / "a.zarr", keys=KEYS, conversions=Conversions(flip_y=True, flip_x=True)
    )
    got = store.open_scan_store(out)["intensities"].values[0]
    assert got[3, 4] == 9 and got[3 - 1, 4 - 2] == 7  # q -> -q, DC stays at N // 2
    out = ingest_file(src, tmp_path / "t.zarr", keys=KEYS, conversions=Conversions(transpose=True))
    got = store.open_scan_store(out)["intensities"].values[0]
    assert got.shape == (8, 6) and got[4, 3] == 9 and got[4 + 2, 3 + 1] == 7


def test_positions_units_and_named_axes(tmp_path):
    frames = np.ones((6, 4, 4), np.uint16)
    with h5py.File(tmp_path / "u.h5", "w") as f:
        f["data"] = frames
        f["py"] = np.array([0.0, 1, 2])  # grid axes of a 2 x 3 raster, in nm
        f["px"] = np.array([10.0, 20.0])
        f["py"].attrs["unused"] = 1
    keys = {
        "intensities": "/data",
        "positions_y": "/px",
        "positions_x": "/py",
        "wavelength_nm": "0.15",
        "detector_distance_m": "1",
        "detector_pixel_size_um": "75",
    }
    out = ingest_file(
        tmp_path / "u.h5",
        tmp_path / "u.zarr",
        keys=keys,
        conversions=Conversions(positions_unit="nm", positions_order="xy"),
    )
    ds = store.open_scan_store(out)
    expect = np.array([[10, 0], [10, 1], [10, 2], [20, 0], [20, 1], [20, 2]]) * 1e-9
    np.testing.assert_allclose(ds["positions"].values, expect)  # named axes: order ignored
    assert ds.attrs["positions_grid_shape"] == [2, 3]


def test_grid_of_frames_is_flattened_row_major(tmp_path):
    frames = np.arange(2 * 3 * 4 * 4, dtype=np.uint16).reshape(2, 3, 4, 4)
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["data"] = frames
        f["y"] = np.array([0.0, 5.0])
        f["x"] = np.array([0.0, 1.0, 2.0])
    out = ingest_file(
        tmp_path / "g.h5",
        tmp_path / "g.zarr",
        keys={"intensities": "/data", "positions_y": "/y", "positions_x": "/x"},
    )
    ds = store.open_scan_store(out)
    np.testing.assert_array_equal(ds["intensities"].values, frames.reshape(6, 4, 4))
    np.testing.assert_array_equal(ds["positions"].values[4], [5.0, 1.0])
    assert ds.attrs["conversions"]["frames_reshaped_from"] == [2, 3, 4, 4]


def test_group_of_frames_in_natural_order(tmp_path):
    with h5py.File(tmp_path / "g.h5", "w") as f:
        for i in (1, 2, 10):
            f[f"frames/frame_{i}"] = np.full((4, 4), i, np.uint16)
        f["pos"] = np.array([[0.0, 0], [0, 1], [1, 0]])
    out = ingest_file(
        tmp_path / "g.h5", tmp_path / "g.zarr", keys={"intensities": "/frames", "positions": "/pos"}
    )
    got = store.open_scan_store(out)["intensities"].values
    assert [int(f[0, 0]) for f in got] == [1, 2, 10]


def test_negative_clip_is_recorded(tmp_path):
    frames = np.ones((3, 4, 4), np.int32)
    frames[1, 2, 2] = -5
    src = _tiny_h5(tmp_path / "n.h5", frames)
    out = ingest_file(src, tmp_path / "n.zarr", keys=KEYS, conversions=Conversions(negative="clip"))
    ds = store.open_scan_store(out)
    assert ds["intensities"].values[1, 2, 2] == 0 and ds.attrs["conversions"]["negative"] == "clip"


def test_streaming_reads_bounded_slabs(tmp_path, monkeypatch):
    """Frames are read a few at a time, never the whole dataset at once."""
    frames = np.random.default_rng(0).poisson(3, (40, 8, 8)).astype(np.uint16)
    src = _tiny_h5(tmp_path / "big.h5", frames)
    monkeypatch.setattr(h5reader, "_CHUNK_BYTES", 5 * 8 * 8 * 2)  # 5 frames per read
    sizes = []
    real = h5reader.H5Frames.__getitem__

    def spy(self, index):
        block = real(self, index)
        sizes.append(block.shape[0] if block.ndim == 3 else 0)
        return block

    monkeypatch.setattr(h5reader.H5Frames, "__getitem__", spy)
    out = ingest_file(src, tmp_path / "big.zarr", keys=KEYS, frames_per_shard=5)
    np.testing.assert_array_equal(store.open_scan_store(out)["intensities"].values, frames)
    assert max(sizes) <= 16  # a sampled read for nothing else, chunks of 5 frames
    assert sum(s for s in sizes if s == 5) >= 40


@pytest.mark.parametrize(
    ("dtype", "userblock", "chunks", "raw"),
    [
        ("<u2", 0, None, True),
        ("<f4", 1024, None, True),  # offset counts the user block
        (">u2", 0, None, False),  # byte swap needed: h5py reads it
        ("<u2", 0, (2, 8, 8), False),  # chunked: h5py reads it
    ],
)
def test_raw_reads_equal_h5py(tmp_path, dtype, userblock, chunks, raw):
    """The pread fast path returns exactly what h5py returns, and is used only where HDF5
    stores the bytes as they are."""
    frames = np.random.default_rng(1).poisson(5, (7, 8, 8)).astype(dtype)
    src = tmp_path / "r.h5"
    with h5py.File(src, "w", userblock_size=userblock) as f:
        f.create_dataset("data", data=frames, chunks=chunks)
        f["pos"] = np.stack([np.arange(7.0), np.arange(7.0) * 2], axis=1)
    with h5py.File(src, "r") as f:
        offset = h5reader.raw_offset(f["data"])
    assert (offset is not None) == raw
    lazy = h5reader.H5Frames(str(src), "/data", frames.shape, np.dtype(dtype), offset)
    for index in [(slice(2, 6), slice(None), slice(None)), (slice(0, 7), slice(0, 8), slice(0, 8))]:
        np.testing.assert_array_equal(lazy[index], frames[index])
    np.testing.assert_array_equal(lazy[1:3, 2:5, :], frames[1:3, 2:5, :])  # not whole frames
    out = ingest_file(src, tmp_path / "r.zarr", keys=KEYS, frames_per_shard=3)
    np.testing.assert_array_equal(store.open_scan_store(out)["intensities"].values, frames)


def test_raw_read_of_truncated_file_fails(tmp_path):
    """A file cut short after its frames were allocated: a clear error, not short frames."""
    frames = np.arange(6 * 8 * 8, dtype=np.uint16).reshape(6, 8, 8)
    src = _tiny_h5(tmp_path / "t.h5", frames)
    with h5py.File(src, "r") as f:
        offset = h5reader.raw_offset(f["data"])
    assert offset is not None
    lazy = h5reader.H5Frames(str(src), "/data", frames.shape, frames.dtype, offset)
    with open(src, "r+b") as fh:
        fh.truncate(offset + 3 * 8 * 8 * 2 + 5)
    np.testing.assert_array_equal(lazy[0:3, :, :], frames[0:3])
    with pytest.raises(IngestError, match=r"t\.h5: key /data: cannot read frames 2:6"):
        lazy[2:6, :, :]


# ------------------------------------------------------------------------------ bad input


def _fails(tmp_path, src, match, **kw):
    out = tmp_path / "bad.zarr"
    with pytest.raises(IngestError, match=match) as info:
        ingest_file(src, out, **kw)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad.zarr")]
    msg = str(info.value)
    assert "\n" not in msg and str(Path(src).name) in msg
    return msg


def test_bad_truncated_hdf5(tmp_path, scan):
    export_ptyinr(tmp_path / "t.h5", scan)
    data = (tmp_path / "t.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 2])
    _fails(tmp_path, tmp_path / "t.h5", "truncated")


def test_bad_not_hdf5(tmp_path):
    (tmp_path / "x.h5").write_text("this is not HDF5\n")
    _fails(tmp_path, tmp_path / "x.h5", "file signature not found")
    (tmp_path / "x.dat").write_text("nor this")
    _fails(tmp_path, tmp_path / "x.dat", "format not recognised")


def test_bad_truncated_npz(tmp_path, scan):
    export_npz(tmp_path / "s.npz", scan)
    data = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "s.npz").write_bytes(data[: len(data) // 2])
    _fails(tmp_path, tmp_path / "s.npz", "NPZ|truncated", format="npz")


def test_bad_missing_key(tmp_path):
    src = _tiny_h5(tmp_path / "m.h5", np.ones((3, 4, 4), np.uint16))
    msg = _fails(tmp_path, src, "not found", keys={"intensities": "/nope", "positions": "/pos"})
    assert "/nope" in msg
    _fails(
        tmp_path,
        src,
        "attribute 'dist' not found",
        keys={**KEYS, "detector_distance_m": "/data@dist"},
    )
    with h5py.File(tmp_path / "np.h5", "w") as f:
        f["data"] = np.ones((3, 4, 4), np.uint16)
        f["scan/p"] = np.zeros((3, 2))
    _fails(tmp_path, tmp_path / "np.h5", "key positions missing", keys={"intensities": "/data"})
    _fails(tmp_path, src, "key map names", keys={**KEYS, "wavelenght_m": "1e-10"})


def test_bad_positions_count(tmp_path):
    src = _tiny_h5(tmp_path / "c.h5", np.ones((3, 4, 4), np.uint16), pos=np.zeros((5, 2)))
    _fails(tmp_path, src, "5 positions\\) for 3 frames", keys=KEYS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bad_non_finite_frames(tmp_path, bad):
    frames = np.ones((6, 4, 4), np.float32)
    frames[4, 1, 2] = bad
    src = _tiny_h5(tmp_path / "f.h5", frames)
    msg = _fails(tmp_path, src, "frame 4 pixel \\(1, 2\\)", keys=KEYS, frames_per_shard=2)
    assert "finite" in msg


def test_bad_negative_counts(tmp_path):
    frames = np.ones((3, 4, 4), np.int16)
    frames[2, 0, 3] = -1
    src = _tiny_h5(tmp_path / "n.h5", frames)
    _fails(tmp_path, src, "frame 2 pixel \\(0, 3\\) has negative count", keys=KEYS)


def test_bad_duplicate_positions(tmp_path):
    pos = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
    src = _tiny_h5(tmp_path / "d.h5", np.ones((4, 4, 4), np.uint16), pos=pos)
    _fails(tmp_path, src, "positions 0 and 2 coincide", keys=KEYS)
    out = ingest_file(
        src,
        tmp_path / "ok.zarr",
        keys=KEYS,
        conversions=Conversions(allow_duplicate_positions=True),
    )
    assert store.open_scan_store(out).attrs["conversions"]["allow_duplicate_positions"] is True


def test_bad_non_monotonic_grid(tmp_path):
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["data"] = np.ones((6, 4, 4), np.uint16)
        f["y"] = np.array([0.0, 2.0, 1.0])
        f["x"] = np.array([0.0, 1.0])
    _fails(
        tmp_path,
        tmp_path / "g.h5",
        "not strictly monotonic at index 2",
        keys={"intensities": "/data", "positions_y": "/y", "positions_x": "/x"},
    )


def test_bad_inconsistent_frame_shapes(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["frames/f0"] = np.ones((4, 4), np.uint16)
        f["frames/f1"] = np.ones((4, 5), np.uint16)
        f["pos"] = np.array([[0.0, 0], [0, 1]])
    _fails(
        tmp_path,
        tmp_path / "s.h5",
        "inconsistent shape",
        keys={"intensities": "/frames", "positions": "/pos"},
    )
    np.savez(
        tmp_path / "s.npz",
        frame_0=np.ones((4, 4)),
        frame_1=np.ones((3, 4)),
        pos=np.array([[0.0, 0], [0, 1]]),
    )
    _fails(
        tmp_path,
        tmp_path / "s.npz",
        "inconsistent shape",
        keys={"intensities": "frame_*", "positions": "pos"},
    )


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("wavelength_m", "0", "wavelength_m=0.0"),
        ("detector_distance_m", "-2", "detector_distance_m=-2.0"),
        ("detector_pixel_size_m", "75", "plausible range"),
    ],
)
def test_bad_absurd_geometry(tmp_path, key, value, match):
    src = _tiny_h5(tmp_path / "a.h5", np.ones((3, 4, 4), np.uint16))
    geom = {"wavelength_m": "1.5e-10", "detector_distance_m": "2", "detector_pixel_size_m": "7e-5"}
    geom[key] = value
    _fails(tmp_path, src, match, keys={**KEYS, **geom})


def test_bad_positions_in_metres_without_geometry(tmp_path):
    src = _tiny_h5(tmp_path / "a.h5", np.ones((3, 4, 4), np.uint16))
    _fails(tmp_path, src, "no geometry", keys=KEYS, conversions=Conversions(positions_unit="um"))
    # the default without geometry is pixel units
    out = ingest_file(src, tmp_path / "px.zarr", keys=KEYS)
    assert store.open_scan_store(out).attrs["positions_unit"] == "px"


def test_bad_mask_shape_and_varying_energy(tmp_path):
    src = _tiny_h5(
        tmp_path / "a.h5",
        np.ones((3, 4, 4), np.uint16),
        mask=np.zeros((5, 5)),
        energy=np.array([8000.0, 8000.0, 9000.0]),
    )
    _fails(tmp_path, src, "mask shape \\(5, 5\\)", keys={**KEYS, "mask": "/mask"})
    _fails(tmp_path, src, "varies from 8000.0 to 9000.0", keys={**KEYS, "energy_ev": "/energy"})


def test_bad_store_exists(tmp_path):
    src = _tiny_h5(tmp_path / "a.h5", np.ones((3, 4, 4), np.uint16))
    ingest_file(src, tmp_path / "a.zarr", keys=KEYS)
    with pytest.raises(IngestError, match="already exists"):
        ingest_file(src, tmp_path / "a.zarr", keys=KEYS)


def test_store_created_during_the_ingest_is_kept(tmp_path, monkeypatch):
    """Without --force, a store that appears at the target while the store is written is
    left alone, the new one removed (nothing hidden left behind), the error says so; the
    store is renamed into place once, straight from its hidden partial directory."""
    src = _tiny_h5(tmp_path / "a.h5", np.ones((3, 4, 4), np.uint16))
    out = tmp_path / "a.zarr"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    finish = store._write_consolidated

    def racing_finish(path, attrs=None):  # the last step before the rename
        if not out.exists():
            out.mkdir()
            (out / "theirs").write_text("another writer's store")
        finish(path, attrs)

    monkeypatch.setattr(store, "_write_consolidated", racing_finish)
    with pytest.raises(IngestError, match=r"already exists \(created meanwhile\).*--force"):
        ingest_file(src, out, keys=KEYS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "a.zarr"]
    assert (out / "theirs").read_text() == "another writer's store"

    monkeypatch.setattr(store, "_write_consolidated", finish)
    renames = []
    real_rename = store.os.rename

    def rename(a, b):
        renames.append(Path(b).name)
        real_rename(a, b)

    monkeypatch.setattr(store.os, "rename", rename)
    ingest_file(src, tmp_path / "b.zarr", keys=KEYS)
    assert renames == ["b.zarr"]
    ds = store.open_scan_store(tmp_path / "b.zarr")
    assert ds.attrs["source_sha256"] == digest  # hashed meanwhile, added before the rename
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_npz_compressed_members_are_read(tmp_path, scan):
    np.savez_compressed(tmp_path / "z.npz", data=scan["counts"], positions=scan["pos_px"])
    with zipfile.ZipFile(tmp_path / "z.npz") as z:
        assert z.infolist()[0].compress_type == zipfile.ZIP_DEFLATED
    out = ingest_file(tmp_path / "z.npz", tmp_path / "z.zarr")
    _check_store(out, scan, unit="px")
