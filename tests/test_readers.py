"""Beamline input (issue 15): compressed detector files, NeXus NXptycho files without a key
map, readers from other packages through the `ptyinr.readers` entry-point group, and the
zarrs write path. Every file here is written by the test itself.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
import zarr

from ptyinr import store
from ptyinr.errors import IngestError
from ptyinr.ingest import core, detect_format, get_reader, ingest_file, registry

N = 16
RNG = np.random.default_rng(7)
FRAMES = RNG.poisson(20, (12, N, N)).astype(np.uint16)
POS = np.stack([np.repeat(np.arange(3), 4) * 1e-7, np.tile(np.arange(4), 3) * 1e-7], axis=1)


def _plain(path: Path, frames: np.ndarray, **create: object) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=frames, chunks=(1, N, N), **create)
        f["/entry/positions"] = np.arange(len(frames) * 2, dtype=float).reshape(-1, 2)
    return path


# ------------------------------------------------------------------------- compressed input

COMPRESSED = {
    "bitshuffle_lz4.h5": hdf5plugin.Bitshuffle(cname="lz4"),  # what Eiger/Jungfrau write
    "blosc_zstd.h5": hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE),
    "zstd.h5": hdf5plugin.Zstd(clevel=3),
}
FILTER_IDS = {"bitshuffle_lz4.h5": 32008, "blosc_zstd.h5": 32001, "zstd.h5": 32015}


def test_compressed_detector_files_ingest_without_plugin_path(tmp_path):
    """Files written with the Bitshuffle-LZ4, Blosc and Zstd HDF5 filters: h5py alone cannot
    read them; `ptyinr.ingest` can, in a fresh process without HDF5_PLUGIN_PATH."""
    srcs = []
    for name, comp in COMPRESSED.items():
        src = _plain(tmp_path / name, FRAMES, **comp)
        with h5py.File(src) as f:
            plist = f["/entry/data/data"].id.get_create_plist()
            assert plist.get_filter(plist.get_nfilters() - 1)[0] == FILTER_IDS[name]
        srcs.append(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HDF5_PLUGIN")}
    bare = subprocess.run(
        [sys.executable, "-c", f"import h5py; h5py.File({str(srcs[0])!r})['/entry/data/data'][0]"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bare.returncode != 0  # the filter is not there without hdf5plugin
    script = textwrap.dedent(
        f"""
        import sys
        from ptyinr.ingest import ingest_file
        for src in {[str(s) for s in srcs]!r}:
            ingest_file(src, src + ".zarr", keys={{"positions": "/entry/positions"}},
                        conversions=None, options=None, progress=False)
        print("hdf5plugin" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for src in srcs:
        ds = store.open_scan_store(f"{src}.zarr")
        np.testing.assert_array_equal(ds["intensities"].values, FRAMES)


def test_unreadable_compressed_chunk_is_one_line(tmp_path, monkeypatch):
    """A filter that fails inside HDF5 (here: a corrupted chunk) names file, key and frames."""
    src = _plain(tmp_path / "c.h5", FRAMES, **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(src, "r+") as f:
        offset = f["/entry/data/data"].id.get_chunk_info(5).byte_offset
    with open(src, "r+b") as fh:
        fh.seek(offset + 12)  # past the bitshuffle header: garbage in the LZ4 stream
        fh.write(b"\xff" * 64)
    with pytest.raises(IngestError, match=r"c\.h5: key /entry/data/data: cannot read frames"):
        ingest_file(src, tmp_path / "c.zarr", keys={"positions": "/entry/positions"})
    assert not (tmp_path / "c.zarr").exists()


# ------------------------------------------------------------------------- NeXus NXptycho

WAVELENGTH = 1.5e-10
ENERGY_KEV = 1.239841984e-6 / WAVELENGTH / 1e3


def _nxptycho(
    path: Path,
    *,
    raster: bool = False,
    pixel_units: tuple[str, str] = ("um", "um"),
    pixel: tuple[float, float] = (75.0, 75.0),
) -> Path:
    """A tiny file laid out as NXptycho: detector data linked into NXdata, sample x/y
    translations in micrometres, beam energy in keV, distance in mm, pixels in um."""
    mask = np.zeros((N, N), np.uint32)
    mask[2, 3] = 1  # NXdetector pixel_mask: nonzero = bad
    with h5py.File(path, "w") as f:
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e["definition"] = "NXptycho"
        inst = e.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        det = inst.create_group("eiger")  # found by its class, not its name
        det.attrs["NX_class"] = "NXdetector"
        det["data"] = FRAMES.reshape(3, 4, N, N) if raster else FRAMES
        det["distance"] = 2000.0
        det["distance"].attrs["units"] = "mm"
        for axis, value, unit in zip("xy", pixel, pixel_units, strict=True):
            det[f"{axis}_pixel_size"] = value
            det[f"{axis}_pixel_size"].attrs["units"] = unit
        det["pixel_mask"] = mask
        beam = inst.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        beam["incident_beam_energy"] = ENERGY_KEV
        beam["incident_beam_energy"].attrs["units"] = "keV"
        source = inst.create_group("source")
        source.attrs["NX_class"] = "NXsource"
        source["energy"] = 3.0  # the ring's GeV: never the photon energy
        source["energy"].attrs["units"] = "GeV"
        sample = e.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        tr = sample.create_group("transformations")
        tr.attrs["NX_class"] = "NXtransformations"
        if raster:
            tr["y"], tr["x"] = np.arange(3) * 0.1, np.arange(4) * 0.1  # grid axes
        else:
            tr["y"], tr["x"] = POS[:, 0] * 1e6, POS[:, 1] * 1e6
        for axis in "xy":
            tr[axis].attrs["units"] = "um"
        data = e.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        data["data"] = h5py.SoftLink(det["data"].name)
        data["x"] = h5py.SoftLink("/entry/sample/transformations/x")
        data["y"] = h5py.SoftLink("/entry/sample/transformations/y")
    return path


@pytest.mark.parametrize("raster", [False, True])
def test_nxptycho_file_ingests_without_keys(tmp_path, raster):
    src = _nxptycho(tmp_path / "scan.nxs", raster=raster)
    assert detect_format(src) == "hdf5"
    out = ingest_file(src, tmp_path / "scan.zarr", progress=False)
    ds = store.open_scan_store(out)
    np.testing.assert_array_equal(ds["intensities"].values, FRAMES)
    np.testing.assert_allclose(ds["positions"].values, POS, rtol=1e-12, atol=1e-20)
    a = ds.attrs
    assert a["positions_unit"] == "m" and a["conversions"]["positions_unit"] == "um"
    assert a["wavelength_m"] == pytest.approx(WAVELENGTH, rel=1e-9)
    assert a["detector_distance_m"] == pytest.approx(2.0)
    assert a["detector_pixel_size_m"] == pytest.approx(75e-6)
    expected_mask = np.zeros((N, N), bool)
    expected_mask[2, 3] = True
    np.testing.assert_array_equal(ds["mask"].values, expected_mask)
    keys = a["source_keys"]
    assert keys["energy_kev"] == "/entry/instrument/beam/incident_beam_energy"
    assert keys["detector_distance_mm"] == "/entry/instrument/eiger/distance"
    assert keys["detector_pixel_size_um"] == "/entry/instrument/eiger/x_pixel_size"
    assert keys["positions"].endswith("y,/entry/data/x")
    assert a["source_attrs"]["nexus_entry"] == "/entry"


def test_plain_hdf5_gets_no_nexus_defaults(tmp_path):
    """The same paths without NX_class attributes are not NeXus: nothing is guessed."""
    src = tmp_path / "plain.h5"
    with h5py.File(src, "w") as f:
        f["/entry/data/data"] = FRAMES
        f["/entry/positions"] = POS
        f["/entry/instrument/detector/distance"] = 2000.0  # mm, but nothing says so
    out = ingest_file(src, tmp_path / "p.zarr", progress=False)
    a = store.open_scan_store(out).attrs
    assert a["detector_distance_m"] is None and a["positions_unit"] == "px"
    assert "nexus_entry" not in a["source_attrs"]


def test_nxptycho_frames_found_by_the_nxdata_signal(tmp_path):
    src = _nxptycho(tmp_path / "scan.nxs")
    with h5py.File(src, "r+") as f:  # frames named neither data/data nor detector/data
        f.move("/entry/instrument/eiger/data", "/entry/instrument/eiger/images")
        del f["/entry/data/data"]
        f["/entry/data/images"] = h5py.SoftLink("/entry/instrument/eiger/images")
        f["/entry/data"].attrs["signal"] = "images"
    out = ingest_file(src, tmp_path / "s.zarr", progress=False)
    ds = store.open_scan_store(out)
    np.testing.assert_array_equal(ds["intensities"].values, FRAMES)
    assert ds.attrs["source_keys"]["intensities"].endswith("images")


def test_nxptycho_user_keys_win(tmp_path):
    src = _nxptycho(tmp_path / "scan.nxs")
    out = ingest_file(
        src,
        tmp_path / "s.zarr",
        keys={"detector_distance_m": "3.0", "wavelength_m": "2e-10"},
        progress=False,
    )
    a = store.open_scan_store(out).attrs
    assert a["detector_distance_m"] == 3.0 and a["wavelength_m"] == 2e-10
    assert "energy_kev" not in a["source_keys"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"pixel_units": ("furlong", "furlong")}, r"x_pixel_size@units='furlong'; expected"),
        (
            {"pixel": (75.0, 55.0)},
            r"x_pixel_size=75 um \(7\.5e-05 m\) but .*y_pixel_size=55 um \(5\.5e-05 m\)",
        ),
    ],
)
def test_nxptycho_bad_units_and_pixels_are_refused(tmp_path, kw, match):
    src = _nxptycho(tmp_path / "scan.nxs", **kw)
    with pytest.raises(IngestError, match=match):
        ingest_file(src, tmp_path / "s.zarr", progress=False)


def test_nxptycho_entry_option(tmp_path):
    src = _nxptycho(tmp_path / "scan.nxs")
    with pytest.raises(IngestError, match=r"entry 'entry_9' not found"):
        ingest_file(src, tmp_path / "s.zarr", options={"entry": "entry_9"}, progress=False)
    out = ingest_file(src, tmp_path / "s.zarr", options={"entry": "entry"}, progress=False)
    assert store.open_scan_store(out).attrs["detector_distance_m"] == pytest.approx(2.0)


# ------------------------------------------------------------------------- reader plugins

PLUGIN = '''
import dask.array as da
import numpy as np
from ptyinr.ingest.convert import Conversions
from ptyinr.ingest.registry import SourceScan


class ToyReader:
    """.toy files: an NPZ of 'frames' and pixel 'pos' (a facility's own layout)."""

    name = "toy"
    description = "toy layout from another package"

    def sniff(self, path):
        return path.suffix == ".toy"

    def read(self, path, keys, options):
        with np.load(path) as z:
            frames, pos = z["frames"], z["pos"]
        return SourceScan(
            intensities=da.from_array(frames, chunks=(4, *frames.shape[1:])),
            positions=pos,
            geometry=dict.fromkeys(
                ("wavelength_m", "detector_distance_m", "detector_pixel_size_m")
            ),
            defaults=Conversions(positions_unit="px"),
            keys={"intensities": "frames", "positions": "pos"},
        )
'''


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """The RuntimeWarning messages raised inside the block."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
    messages.extend(str(r.message) for r in records if r.category is RuntimeWarning)


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    """A distribution `toyplug` on sys.path declaring three `ptyinr.readers` entry points:
    a good one, one whose module fails to import, one that is not a reader."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "toyplug_good.py").write_text(PLUGIN)
    (site / "toyplug_broken.py").write_text("raise ImportError('needs libfoo 2.1')\n")
    (site / "toyplug_odd.py").write_text("NotAReader = 42\n")
    info = site / "toyplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[ptyinr.readers]\n"
        "toy = toyplug_good:ToyReader\n"
        "broken = toyplug_broken:Reader\n"
        "odd = toyplug_odd:NotAReader\n"
        "hdf5 = toyplug_good:ToyReader\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    registry.load_readers()  # built-ins first, as in a normal process
    monkeypatch.setattr(registry, "READERS", dict(registry.READERS))
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_PENDING", {})
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    for mod in ("toyplug_good", "toyplug_broken", "toyplug_odd"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return tmp_path


def test_reader_plugin_is_listed_lazily_and_used(plugin_env):
    src = plugin_env / "scan.toy"
    with open(src, "wb") as fh:  # NPZ content under the plugin's own suffix
        np.savez(fh, frames=FRAMES, pos=POS * 1e7)
    with _warnings() as caught:
        names = registry.reader_names()
    assert {"toy", "broken", "odd", "hdf5", "cxi"} <= set(names)
    assert any("'hdf5'" in m and "built-in" in m for m in caught)
    assert "toyplug_good" not in sys.modules  # listed, not imported
    with _warnings() as caught:
        assert detect_format(src) == "toy"  # sniffing reaches the broken ones too
    assert any("'broken'" in m for m in caught) and "toyplug_good" in sys.modules
    out = ingest_file(src, plugin_env / "toy.zarr", progress=False)
    ds = store.open_scan_store(out)
    np.testing.assert_array_equal(ds["intensities"].values, FRAMES)
    assert ds.attrs["source_format"] == "toy" and ds.attrs["positions_unit"] == "px"
    assert registry.READERS["hdf5"].__class__.__name__ == "HDF5Reader"  # not replaced


def test_broken_reader_plugins_are_reported_by_name(plugin_env):
    with _warnings() as caught:
        with pytest.raises(IngestError, match=r"format='broken': reader plugin 'broken' .*"):
            get_reader("broken")
        with pytest.raises(IngestError, match=r"format='odd'.*expected a reader"):
            get_reader("odd")
    assert any("reader plugin 'broken'" in m and "needs libfoo 2.1" in m for m in caught)
    assert any("reader plugin 'odd'" in m and "lacks" in m for m in caught)
    assert set(registry.plugin_errors()) >= {"broken", "odd", "hdf5"}
    # the built-in readers are untouched, auto-detection included
    src = _plain(plugin_env / "plain.h5", FRAMES)
    assert detect_format(src) == "hdf5"
    out = ingest_file(
        src, plugin_env / "p.zarr", keys={"positions": "/entry/positions"}, progress=False
    )
    np.testing.assert_array_equal(store.open_scan_store(out)["intensities"].values, FRAMES)


# ------------------------------------------------------------------------- zarrs write path


def test_store_written_with_zarrs_reads_the_same_without_it(tmp_path):
    pytest.importorskip("zarrs")
    src = _plain(tmp_path / "s.h5", FRAMES)
    keys = {"positions": "/entry/positions"}
    before = zarr.config.get("codec_pipeline.path")
    fast = ingest_file(src, tmp_path / "fast.zarr", keys=keys, zarrs=True, progress=False)
    assert zarr.config.get("codec_pipeline.path") == before  # only the write was switched
    slow = ingest_file(src, tmp_path / "slow.zarr", keys=keys, zarrs=False, progress=False)
    assert "zarrs" not in before
    for path in (fast, slow):
        arr = zarr.open_array(str(path / "intensities"), mode="r")
        assert arr.chunks == (1, N, N)  # one-frame random reads stay cheap
        np.testing.assert_array_equal(arr[:], FRAMES)
        np.testing.assert_array_equal(arr[7], FRAMES[7])
    meta = [json.loads((p / "intensities" / "zarr.json").read_text()) for p in (fast, slow)]
    assert meta[0]["codecs"] == meta[1]["codecs"]


def test_overlapping_writers_restore_the_pipeline_once_all_are_done():
    """Archive threads overlap their writes: the first in switches, the last out restores."""
    before = zarr.config.get("codec_pipeline.path")
    first, second = core.write_config(True), core.write_config(True)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first one leaves while the second still writes
    assert zarr.config.get("codec_pipeline.path") == "zarrs.ZarrsCodecPipeline"
    second.__exit__(None, None, None)
    assert zarr.config.get("codec_pipeline.path") == before


def test_zarrs_requested_but_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "zarrs_available", lambda: False)
    src = _plain(tmp_path / "s.h5", FRAMES)
    keys = {"positions": "/entry/positions"}
    with pytest.raises(IngestError, match="zarrs=True but the zarrs package is not installed"):
        ingest_file(src, tmp_path / "a.zarr", keys=keys, zarrs=True, progress=False)
    out = ingest_file(src, tmp_path / "b.zarr", keys=keys, progress=False)  # falls back
    np.testing.assert_array_equal(store.open_scan_store(out)["intensities"].values, FRAMES)
