"""`ptyinr export`: each format read back with its own reader (h5py, tifffile, numpy), the
CLI's refusals (exit 2, one line naming store, run and what was expected), and nothing left
behind when a write fails."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import xarray as xr
from tiny import TINY_MODEL
from typer.testing import CliRunner

from ptyinr import export, store
from ptyinr.cli.main import app
from ptyinr.config import load_config
from ptyinr.errors import InputError
from ptyinr.reconstruct import reconstruct_store
from ptyinr.simulate import SimulationConfig, write_simulated_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Field names of ptychodus's HDF5 product file, as its reader uses them:
# src/ptychodus/plugins/h5_product_file.py, class H5ProductFileIO, ptychodus v1.2
# (github.com/AdvancedPhotonSource/ptychodus, commit 7ccf5817bf9216929f66e897cd4974553b446299).
PTYCHODUS_NAME = "name"
PTYCHODUS_COMMENTS = "comments"
PTYCHODUS_DETECTOR_OBJECT_DISTANCE = "detector_object_distance_m"
PTYCHODUS_PROBE_ENERGY = "probe_energy_eV"
PTYCHODUS_PROBE_PHOTON_COUNT = "probe_photon_count"
PTYCHODUS_EXPOSURE_TIME = "exposure_time_s"
PTYCHODUS_PROBE_ARRAY = "probe"
PTYCHODUS_PROBE_PIXEL_HEIGHT = "pixel_height_m"
PTYCHODUS_PROBE_PIXEL_WIDTH = "pixel_width_m"
PTYCHODUS_PROBE_POSITION_INDEXES = "probe_position_indexes"
PTYCHODUS_PROBE_POSITION_X = "probe_position_x_m"
PTYCHODUS_PROBE_POSITION_Y = "probe_position_y_m"
PTYCHODUS_OBJECT_ARRAY = "object"
PTYCHODUS_OBJECT_CENTER_X = "center_x_m"
PTYCHODUS_OBJECT_CENTER_Y = "center_y_m"
PTYCHODUS_OBJECT_LAYER_SPACING = "object_layer_spacing_m"
PTYCHODUS_OBJECT_PIXEL_HEIGHT = "pixel_height_m"
PTYCHODUS_OBJECT_PIXEL_WIDTH = "pixel_width_m"
PTYCHODUS_LOSS_EPOCHS = "loss_epochs"
PTYCHODUS_LOSS_VALUES = "loss_values"

ELECTRON_VOLT_J = 1.602176634e-19
HC_J_M = 6.62607015e-34 * 299792458.0

runner = CliRunner()


def _reconstruct(path: Path, run_id: str = "r1") -> None:
    config = load_config(overrides=[*TINY_MODEL, "train.epochs=2", "train.device=cpu"])
    reconstruct_store(path, config, run_id=run_id, progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A simulated store with geometry (positions in metres), the same scan with pixel
    positions and geometry, and the same scan without geometry (pixel units); one
    complete run "r1" in each."""
    root = tmp_path_factory.mktemp("export")
    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3)
    metres = write_simulated_store(root / "scan.zarr", sim)
    ds = store.open_scan_store(metres)
    frames = np.asarray(ds[store.INTENSITIES].values)
    pos_px = store.positions_px(ds, frames.shape[1:])
    geometry = {k: ds.attrs[k] for k in store.GEOMETRY_KEYS}
    px_geom = store.create_scan_store(
        root / "pxpos.zarr",
        frames,
        pos_px,
        attrs={**geometry, "positions_unit": "px", "scan_id": "pxpos"},
    )
    no_geom = store.create_scan_store(
        root / "nogeom.zarr",
        frames,
        pos_px,
        attrs={
            **dict.fromkeys(store.GEOMETRY_KEYS),
            "positions_unit": "px",
            "scan_id": "nogeom",
        },
    )
    for path in (metres, px_geom, no_geom):
        _reconstruct(path)
    return {"m": metres, "pxpos": px_geom, "px": no_geom}


def _copy_run(path: Path, src: str, dst: str, extra: xr.Dataset | None = None, **attrs) -> None:
    """Write run `src`'s arrays again as run `dst` (status "running" until marked)."""
    run = _run(path, src)
    data = run if extra is None else xr.merge([run, extra])
    store.write_run(path, dst, data, attrs={**run.attrs, **attrs})


def _run(path: Path, run_id: str = "r1"):
    return store.open_run(path, run_id).load()


def _positions_m(path: Path) -> np.ndarray:
    return np.asarray(store.open_scan_store(path)[store.POSITIONS].values)


def _complex(d: h5py.Dataset) -> np.ndarray:
    return np.asarray(d[()])


# ------------------------------------------------------------------------------------ formats


def test_cxi_layout_round_trip(stores: dict[str, Path], tmp_path: Path) -> None:
    path = stores["m"]
    out = tmp_path / "r.cxi"
    (written,) = export.export_run(path, "r1", "cxi", out)
    assert written == out
    run = _run(path)
    attrs = store.open_scan_store(path).attrs
    obj, probe = run["object"].values, run["probe"].values
    sy = float(run["y"][1] - run["y"][0])
    sx = float(run["x"][1] - run["x"][0])
    pos = _positions_m(path)
    with h5py.File(out, "r") as f:
        assert int(f["cxi_version"][()]) == 160
        e = f["entry_1"]
        np.testing.assert_array_equal(_complex(e["image_1/data"]), obj)
        assert e["image_1/data"].dtype == np.complex64  # HDF5 compound (r, i), CXI's complex
        np.testing.assert_array_equal(_complex(e["image_2/data"]), probe)
        # the probe where the peers look for it
        np.testing.assert_array_equal(e["instrument_1/source_1/illumination"][()], probe)
        np.testing.assert_array_equal(e["image_1/probe"][()], probe)
        np.testing.assert_array_equal(e["data_1/data"][()], obj)
        # object pixel size and extent, metres
        assert e["image_1/x_pixel_size"][()] == pytest.approx(sx, rel=1e-12)
        assert e["image_1/y_pixel_size"][()] == pytest.approx(sy, rel=1e-12)
        ny, nx = obj.shape
        np.testing.assert_allclose(e["image_1/image_size"][()], [nx * sx, ny * sy, 0.0])
        np.testing.assert_allclose(e["image_1/x"][()], run["x"].values)
        np.testing.assert_allclose(e["image_1/y"][()], run["y"].values)
        assert e["image_1/x"].attrs["units"] == "m"
        assert e["image_1/data_space"][()] == b"real"
        # positions: CXI's (x, y, z) column order, metres
        t = e["sample_1/geometry_1/translation"][()]
        assert t.shape == (pos.shape[0], 3)
        np.testing.assert_allclose(t[:, 0], pos[:, 1])
        np.testing.assert_allclose(t[:, 1], pos[:, 0])
        np.testing.assert_array_equal(t[:, 2], 0.0)
        np.testing.assert_array_equal(e["data_1/translation"][()], t)
        # energy in joules, distance and detector pixel in metres
        energy = e["instrument_1/source_1/energy"][()]
        assert energy == pytest.approx(HC_J_M / attrs["wavelength_m"], rel=1e-12)
        assert energy / ELECTRON_VOLT_J == pytest.approx(15000.0, rel=1e-3)  # simulated 15 keV
        det = e["instrument_1/detector_1"]
        assert det["distance"][()] == pytest.approx(attrs["detector_distance_m"])
        assert det["x_pixel_size"][()] == pytest.approx(attrs["detector_pixel_size_m"])
        assert det["y_pixel_size"][()] == pytest.approx(attrs["detector_pixel_size_m"])
        # object pixel = lambda z / (N dx_detector): the file's geometry is self-consistent
        lam = HC_J_M / energy
        assert lam * det["distance"][()] / (probe.shape[1] * det["x_pixel_size"][()]) == (
            pytest.approx(sx, rel=1e-9)
        )
        # provenance: loss per epoch and the run's attrs as JSON
        proc = e["image_1/process_1"]
        np.testing.assert_allclose(proc["loss"][()], run["loss"].values)
        note = json.loads(proc["note_1/data"][()])
        assert note["status"] == "complete"
        assert "config" in note


def test_cxi_positions_match_ingest_reader(stores: dict[str, Path], tmp_path: Path) -> None:
    """Our own CXI reader (ingest) takes the translations back in (y, x) metres."""
    from ptyinr.ingest.cxi import CXIReader

    out = tmp_path / "r.cxi"
    export.export_run(stores["m"], "r1", "cxi", out)
    with h5py.File(out, "r") as f:
        t = f["entry_1/sample_1/geometry_1/translation"][()]
    reader = CXIReader()
    assert reader.sniff(out)
    # the reader's column order for CXI is xy: (x, y, z) -> (y, x)
    np.testing.assert_allclose(t[:, [1, 0]], _positions_m(stores["m"]))


def test_pixel_positions_with_geometry_export_in_metres(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    """A store of pixel positions with geometry reconstructs in pixel units; its export is in
    metres (the object pixel size of the store's geometry), like the metre store's."""
    path = stores["pxpos"]
    run = _run(path)
    assert run["x"].attrs["units"] == "px"
    metres = _run(stores["m"])
    (out,) = export.export_run(path, "r1", "npz", tmp_path / "p.npz")
    with np.load(out, allow_pickle=False) as z:
        assert str(z["units"]) == "m"
        assert "converted" in str(z["units_note"])
        np.testing.assert_allclose(z["positions"], _positions_m(stores["m"]), rtol=1e-9)
        np.testing.assert_allclose(z["object_x"], metres["x"].values, rtol=1e-9)
        np.testing.assert_allclose(z["probe_y"], metres["probe_y"].values, rtol=1e-9)
        sy = float(metres["y"][1] - metres["y"][0])
        np.testing.assert_allclose(z["pixel_size"], [sy, sy], rtol=1e-9)
    (cxi,) = export.export_run(path, "r1", "cxi", tmp_path / "p.cxi")
    with h5py.File(cxi, "r") as f:
        t = f["entry_1/sample_1/geometry_1/translation"][()]
        np.testing.assert_allclose(t[:, [1, 0]], _positions_m(stores["m"]), rtol=1e-9)


def test_ptychodus_product_round_trip(stores: dict[str, Path], tmp_path: Path) -> None:
    path = stores["m"]
    (out,) = export.export_run(path, "r1", "ptychodus", tmp_path / "product.h5")
    run = _run(path)
    attrs = store.open_scan_store(path).attrs
    obj, probe = run["object"].values, run["probe"].values
    sy = float(run["y"][1] - run["y"][0])
    sx = float(run["x"][1] - run["x"][0])
    pos = _positions_m(path)
    with h5py.File(out, "r") as f:
        # every attribute ptychodus's reader requires
        assert f.attrs[PTYCHODUS_NAME] == "scan-r1"
        assert "r1" in f.attrs[PTYCHODUS_COMMENTS]
        assert f.attrs[PTYCHODUS_DETECTOR_OBJECT_DISTANCE] == pytest.approx(
            attrs["detector_distance_m"]
        )
        assert f.attrs[PTYCHODUS_PROBE_ENERGY] == pytest.approx(
            HC_J_M / attrs["wavelength_m"] / ELECTRON_VOLT_J, rel=1e-12
        )
        assert f.attrs[PTYCHODUS_EXPOSURE_TIME] == 0.0
        # photons: |probe|^2 in the fitted intensities' units times their scale (counts)
        photons = float(np.sum(np.abs(probe) ** 2)) * run.attrs["intensity_scale"]
        assert f.attrs[PTYCHODUS_PROBE_PHOTON_COUNT] == pytest.approx(photons, rel=1e-5)
        # positions in metres, x and y separately, with their indexes
        np.testing.assert_array_equal(f[PTYCHODUS_PROBE_POSITION_INDEXES][()], np.arange(len(pos)))
        np.testing.assert_allclose(f[PTYCHODUS_PROBE_POSITION_X][()], pos[:, 1])
        np.testing.assert_allclose(f[PTYCHODUS_PROBE_POSITION_Y][()], pos[:, 0])
        # probe (OPR mode, coherent mode, y, x) and its pixel geometry
        h5_probe = f[PTYCHODUS_PROBE_ARRAY]
        assert h5_probe.shape == (1, 1, *probe.shape)
        np.testing.assert_array_equal(h5_probe[0, 0], probe)
        assert h5_probe.attrs[PTYCHODUS_PROBE_PIXEL_WIDTH] == pytest.approx(sx, rel=1e-12)
        assert h5_probe.attrs[PTYCHODUS_PROBE_PIXEL_HEIGHT] == pytest.approx(sy, rel=1e-12)
        # object (layer, y, x), pixel geometry and centre; one layer, no spacing
        h5_obj = f[PTYCHODUS_OBJECT_ARRAY]
        assert h5_obj.shape == (1, *obj.shape)
        assert np.iscomplexobj(h5_obj[()])
        np.testing.assert_array_equal(h5_obj[0], obj)
        assert h5_obj.attrs[PTYCHODUS_OBJECT_PIXEL_WIDTH] == pytest.approx(sx, rel=1e-12)
        assert h5_obj.attrs[PTYCHODUS_OBJECT_PIXEL_HEIGHT] == pytest.approx(sy, rel=1e-12)
        assert f[PTYCHODUS_OBJECT_LAYER_SPACING][()].shape == (0,)
        # ptychodus maps a position to object pixel (x - centre) / width + W / 2: that pixel
        # must be where our forward model puts the probe window's centre
        cx = h5_obj.attrs[PTYCHODUS_OBJECT_CENTER_X]
        cy = h5_obj.attrs[PTYCHODUS_OBJECT_CENTER_Y]
        ny, nx = obj.shape
        col = (f[PTYCHODUS_PROBE_POSITION_X][()] - cx) / sx + nx / 2
        row = (f[PTYCHODUS_PROBE_POSITION_Y][()] - cy) / sy + ny / 2
        np.testing.assert_allclose(col, (pos[:, 1] - run["x"].values[0]) / sx, atol=1e-6)
        np.testing.assert_allclose(row, (pos[:, 0] - run["y"].values[0]) / sy, atol=1e-6)
        # loss per epoch
        np.testing.assert_array_equal(f[PTYCHODUS_LOSS_EPOCHS][()], run["epoch"].values)
        np.testing.assert_allclose(f[PTYCHODUS_LOSS_VALUES][()], run["loss"].values)


def _tiff_scale(path: Path) -> tuple[float, float, int, dict]:
    with tifffile.TiffFile(path) as t:
        page = t.pages[0]
        xr_ = page.tags["XResolution"].value
        yr_ = page.tags["YResolution"].value
        unit = int(page.tags["ResolutionUnit"].value)
        return xr_[0] / xr_[1], yr_[0] / yr_[1], unit, dict(t.imagej_metadata or {})


def test_tiff_amplitude_phase_with_scale(stores: dict[str, Path], tmp_path: Path) -> None:
    path = stores["m"]
    paths = export.export_run(path, "r1", "tiff", tmp_path / "scan")
    names = sorted(p.name for p in paths)
    assert names == [
        "scan_amplitude.tif",
        "scan_phase.tif",
        "scan_probe_amplitude.tif",
        "scan_probe_phase.tif",
    ]
    run = _run(path)
    obj, probe = run["object"].values, run["probe"].values
    sx = float(run["x"][1] - run["x"][0])
    sy = float(run["y"][1] - run["y"][0])
    amp = tifffile.imread(tmp_path / "scan_amplitude.tif")
    phase = tifffile.imread(tmp_path / "scan_phase.tif")
    assert amp.dtype == np.float32 and amp.shape == obj.shape
    np.testing.assert_allclose(amp, np.abs(obj), rtol=1e-6)
    np.testing.assert_allclose(phase, np.angle(obj), atol=1e-6)
    np.testing.assert_allclose(amp * np.exp(1j * phase), obj, atol=1e-5)
    np.testing.assert_allclose(
        tifffile.imread(tmp_path / "scan_probe_amplitude.tif"), np.abs(probe), rtol=1e-6
    )
    for name in ("scan_amplitude.tif", "scan_probe_phase.tif"):
        x_per_cm, y_per_cm, unit, ij = _tiff_scale(tmp_path / name)
        assert unit == 3  # centimetre
        assert 0.01 / x_per_cm == pytest.approx(sx, rel=1e-6)
        assert 0.01 / y_per_cm == pytest.approx(sy, rel=1e-6)
        # Fiji: unit um in the ImageJ description (it converts the cm resolution to um)
        assert ij["unit"] == "um"
        assert ij["spacing"] == pytest.approx(sx * 1e6, rel=1e-9)
        assert "r1" in ij["Info"]


def test_tiff_into_folder_and_pixel_units(stores: dict[str, Path], tmp_path: Path) -> None:
    paths = export.export_run(stores["px"], "r1", "tiff", str(tmp_path) + "/")
    assert {p.parent for p in paths} == {tmp_path}
    assert (tmp_path / "nogeom-r1_phase.tif").is_file()
    x_per, y_per, unit, ij = _tiff_scale(tmp_path / "nogeom-r1_amplitude.tif")
    assert (x_per, y_per, unit) == (1.0, 1.0, 1)  # 1 pixel per pixel, no physical unit
    assert ij["unit"] == "pixel"


def test_npz_round_trip_no_pickle(stores: dict[str, Path], tmp_path: Path) -> None:
    path = stores["m"]
    (out,) = export.export_run(path, "r1", "npz", tmp_path / "r.npz")
    run = _run(path)
    sx = float(run["x"][1] - run["x"][0])
    sy = float(run["y"][1] - run["y"][0])
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["object"], run["object"].values)
        assert z["object"].dtype == np.complex64
        np.testing.assert_array_equal(z["probe"], run["probe"].values)
        np.testing.assert_allclose(z["object_x"], run["x"].values)
        np.testing.assert_allclose(z["probe_y"], run["probe_y"].values)
        np.testing.assert_allclose(z["positions"], _positions_m(path))
        np.testing.assert_allclose(z["pixel_size"], [sy, sx])
        assert str(z["units"]) == "m"
        np.testing.assert_allclose(z["loss"], run["loss"].values)
        assert float(z["energy_ev"]) == pytest.approx(15000.0, rel=1e-3)
        assert str(z["run_id"]) == "r1"
        assert json.loads(str(z["attrs_json"]))["status"] == "complete"
        assert "frc" not in z.files  # reconstruct writes no FRC


def test_npz_carries_frc_when_present(stores: dict[str, Path], tmp_path: Path) -> None:
    """A run of `ptyinr run` has an `frc` curve: it is exported too."""
    path = stores["m"]
    freq = np.linspace(0.0, 0.5, 6)
    frc = xr.Dataset(
        {
            "frc": ("spatial_frequency", np.linspace(1.0, 0.1, 6)),
            "half_bit_threshold": ("spatial_frequency", np.full(6, 0.2)),
            "n_pixels": ("spatial_frequency", np.arange(6)),
        },
        coords={"spatial_frequency": ("spatial_frequency", freq, {"units": "1/m"})},
    )
    _copy_run(path, "r1", "withfrc", extra=frc, resolution=3e-8, resolution_unit="m")
    store.mark_run(path, "withfrc", "complete")
    (out,) = export.export_run(path, "withfrc", "npz", tmp_path / "f.npz")
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_allclose(z["frc"], np.linspace(1.0, 0.1, 6))
        np.testing.assert_allclose(z["frc_spatial_frequency"], freq)
        assert str(z["frc_frequency_unit"]) == "1/m"
        assert float(z["resolution"]) == pytest.approx(3e-8)


def test_refined_positions_are_exported_when_the_run_has_them(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    """The object and probe were fitted at the refined positions: products carry those and
    say so; a run without refinement exports the store's measured positions."""
    path = stores["m"]
    measured = _positions_m(path)
    shift = np.random.default_rng(1).normal(0.0, 1e-8, measured.shape)
    refined = xr.Dataset(
        {"refined_positions": (("scan", "axis"), measured + shift)},
        coords={"axis": np.array(["y", "x"], dtype=object)},
    )
    _copy_run(path, "r1", "refined", extra=refined)
    store.mark_run(path, "refined", "complete")
    (out,) = export.export_run(path, "refined", "npz", tmp_path / "refined.npz")
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_allclose(z["positions"], measured + shift)
        assert "refined" in str(z["positions_note"])
    (cxi,) = export.export_run(path, "refined", "cxi", tmp_path / "refined.cxi")
    with h5py.File(cxi, "r") as f:
        xyz = f["entry_1/sample_1/geometry_1/translation"][()]
    np.testing.assert_allclose(xyz[:, 1], (measured + shift)[:, 0])
    (plain,) = export.export_run(path, "r1", "npz", tmp_path / "plain.npz")
    with np.load(plain, allow_pickle=False) as z:
        np.testing.assert_allclose(z["positions"], measured)
        assert "measured" in str(z["positions_note"])


def test_npz_pixel_units(stores: dict[str, Path], tmp_path: Path) -> None:
    (out,) = export.export_run(stores["px"], "r1", "npz", tmp_path / "px.npz")
    with np.load(out, allow_pickle=False) as z:
        assert str(z["units"]) == "px"
        np.testing.assert_array_equal(z["pixel_size"], [1.0, 1.0])
        np.testing.assert_allclose(
            z["positions"], store.open_scan_store(stores["px"])[store.POSITIONS].values
        )
        assert "energy_ev" not in z.files


@pytest.mark.parametrize("fmt", ["cxi", "ptychodus"])
def test_metres_only_formats_refuse_pixel_units(
    stores: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    with pytest.raises(export.ExportError, match=r"nogeom\.zarr: run 'r1' has no geometry"):
        export.export_run(stores["px"], "r1", fmt, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_default_output_beside_the_store(stores: dict[str, Path], tmp_path: Path) -> None:
    paths = export.output_paths(tmp_path / "a" / "s42.zarr", "first", "cxi")
    assert paths == {"": tmp_path / "a" / "s42-first.cxi"}
    tiffs = export.output_paths(tmp_path / "s42.zarr", "r", "tiff", tmp_path / "x.tif")
    assert tiffs["phase"] == tmp_path / "x_phase.tif"
    assert export.output_paths("s.zarr", "r", "npz", tmp_path / "o") == {"": tmp_path / "o.npz"}
    assert export.output_paths("s.zarr", "r", "npz", tmp_path / "o.z") == {"": tmp_path / "o.z"}
    folder = export.output_paths("/d/s.zarr", "r", "ptychodus", tmp_path)
    assert folder == {"": tmp_path / "s-r.h5"}
    assert set(export.EXPORTERS) == {"cxi", "ptychodus", "tiff", "npz"}


# ------------------------------------------------------------------------------------ the CLI


def test_cli_writes_default_path_and_refuses_overwrite(stores: dict[str, Path]) -> None:
    path = stores["m"]
    target = path.parent / "scan-r1.npz"
    target.unlink(missing_ok=True)
    result = runner.invoke(app, ["export", str(path), "--run", "r1", "--format", "npz"])
    assert result.exit_code == 0, result.output
    assert target.is_file()
    assert "scan-r1.npz" in result.output
    before = target.read_bytes()
    again = runner.invoke(app, ["export", str(path), "--run", "r1", "--format", "npz"])
    assert again.exit_code == 2
    assert "exists" in again.output and "--force" in again.output
    forced = runner.invoke(app, ["export", str(path), "--run", "r1", "-f", "npz", "--force"])
    assert forced.exit_code == 0, forced.output
    assert target.read_bytes() != b"" and len(target.read_bytes()) == len(before)
    target.unlink()


def test_cli_errors(stores: dict[str, Path], tmp_path: Path) -> None:
    path = stores["m"]
    out = ["--out", str(tmp_path / "x")]
    missing = runner.invoke(app, ["export", str(path), "--run", "nope", "--format", "cxi", *out])
    assert missing.exit_code == 2
    assert "no run 'nope'" in missing.output and "r1" in missing.output
    assert str(path) in missing.output.replace("\n", "")

    bad = runner.invoke(app, ["export", str(path), "--run", "r1", "--format", "png", *out])
    assert bad.exit_code == 2
    assert "cxi" in bad.output and "npz" in bad.output  # the choices are listed

    not_store = runner.invoke(
        app, ["export", str(tmp_path / "none.zarr"), "--run", "r1", "--format", "npz", *out]
    )
    assert not_store.exit_code == 2
    text = not_store.output.replace("\n", "")
    assert "none.zarr: does not exist; expected a scan store" in text and "'r1'" in text

    px = runner.invoke(app, ["export", str(stores["px"]), "--run", "r1", "-f", "cxi", *out])
    assert px.exit_code == 2
    assert "no geometry" in px.output and "npz" in px.output
    assert list(tmp_path.iterdir()) == []


def test_cli_help_lists_formats() -> None:
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    for fmt in export.EXPORTERS:
        assert fmt in result.output


def test_unfinished_run_is_refused(stores: dict[str, Path], tmp_path: Path) -> None:
    path = stores["m"]
    _copy_run(path, "r1", "unfinished")
    result = runner.invoke(
        app,
        ["export", str(path), "--run", "unfinished", "-f", "npz", "--out", str(tmp_path / "u")],
    )
    assert result.exit_code == 2
    text = result.output.replace("\n", "")
    assert "run 'unfinished' has status 'running'" in text and "complete" in text
    store.mark_run(path, "unfinished", "failed", reason="loss became NaN")
    with pytest.raises(InputError, match="status 'failed' \\(loss became NaN\\)"):
        export.export_run(path, "unfinished", "npz", tmp_path / "u")
    assert list(tmp_path.iterdir()) == []
    store.delete_run(path, "unfinished")


# ---------------------------------------------------------------------- failures leave nothing


def test_failed_tiff_write_leaves_nothing(
    stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tifffile.imwrite
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # two files written, the third fails midway
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", failing)
    with pytest.raises(export.ExportError, match="No space left on device"):
        export.export_run(stores["m"], "r1", "tiff", tmp_path / "new" / "folder" / "t")
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone too


@pytest.mark.parametrize("fmt", ["cxi", "ptychodus", "npz"])
def test_failed_write_leaves_nothing_and_keeps_old_file(
    stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    target = tmp_path / f"out.{fmt}"
    target.write_bytes(b"old export")
    real = export.EXPORTERS[fmt]

    def half_then_fail(run, paths):
        real.write(run, paths)  # the whole file, under its temporary name ...
        raise RuntimeError("killed midway")  # ... then the export dies before the rename

    monkeypatch.setitem(export.EXPORTERS, fmt, dataclasses.replace(real, write=half_then_fail))
    with pytest.raises(RuntimeError, match="killed midway"):
        export.export_run(stores["m"], "r1", fmt, target, force=True)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes() == b"old export"
