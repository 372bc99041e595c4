"""Scan stores: schema, atomic creation, validation on open, units, runs written back."""

from __future__ import annotations

import math
import multiprocessing as mp
import shutil
import threading
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from ptyinr import store
from ptyinr.errors import StoreError
from ptyinr.geometry import object_pixel_size_m

GEOM = {
    "wavelength_m": 1.5e-10,
    "detector_distance_m": 2.0,
    "detector_pixel_size_m": 75e-6,
}


def _attrs(**over):
    a = {**GEOM, "positions_unit": "m", "scan_id": "scan_001", "source": "test"}
    a.update(over)
    return a


def _data(n=10, shape=(8, 6), seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.poisson(5.0, size=(n, *shape)).astype(np.uint16)
    pos = np.stack([np.arange(n) * 1e-7, np.arange(n)[::-1] * 2e-7], axis=1)
    return frames, pos


def _make(tmp_path, name="s.zarr", **kw):
    frames, pos = _data()
    kw.setdefault("attrs", _attrs())
    return store.create_scan_store(tmp_path / name, frames, pos, **kw), frames, pos


# ---------------------------------------------------------------------------------- create


def test_round_trip_layout_and_values(tmp_path):
    mask = np.zeros((8, 6), bool)
    mask[2, 3] = True
    path, frames, pos = _make(tmp_path, mask=mask, frames_per_shard=4)
    ds = store.open_scan_store(path)
    assert ds["intensities"].dims == ("scan", "det_y", "det_x")
    assert ds["positions"].dims == ("scan", "axis")
    assert [str(a) for a in ds["axis"].values] == ["y", "x"]
    assert ds["intensities"].dtype == np.uint16
    assert isinstance(ds["intensities"].data, da.Array)  # lazy
    np.testing.assert_array_equal(ds["intensities"].values, frames)
    np.testing.assert_array_equal(ds["positions"].values, pos)
    np.testing.assert_array_equal(ds["mask"].values, mask)
    assert ds.attrs["schema_version"] == store.SCHEMA_VERSION
    assert ds.attrs["wavelength_m"] == GEOM["wavelength_m"]
    # chunk = 1 frame inside shards of many frames, blosc zstd + bitshuffle
    arr = zarr.open_group(str(path), mode="r")["intensities"]
    assert arr.chunks == (1, 8, 6)
    assert arr.shards == (4, 8, 6)
    (codec,) = arr.compressors
    assert codec.cname.value == "zstd" and codec.shuffle.value == "bitshuffle"
    # dask chunks of the opened store follow the shards
    assert ds["intensities"].data.chunks[0] == (4, 4, 2)


def test_dask_input_is_streamed_and_float64_cast_recorded(tmp_path):
    frames, pos = _data(n=7)
    lazy = da.from_array(frames.astype(np.float64), chunks=(2, 8, 6))
    path = store.create_scan_store(
        tmp_path / "f.zarr", lazy, pos, attrs=_attrs(), frames_per_shard=3
    )
    ds = store.open_scan_store(path)
    assert ds["intensities"].dtype == np.float32
    assert ds.attrs["intensities_cast_from"] == "float64"
    np.testing.assert_array_equal(ds["intensities"].values, frames.astype(np.float32))


def test_extra_vars_complex64_with_coords(tmp_path):
    frames, pos = _data()
    obj = (np.arange(12).reshape(3, 4) * (1 + 1j)).astype(np.complex128)
    true_obj = xr.DataArray(
        obj,
        dims=("true_object_y", "true_object_x"),
        coords={"true_object_y": np.arange(3) * 1e-8, "true_object_x": np.arange(4) * 1e-8},
    )
    probe = xr.DataArray(np.ones((5, 5), np.complex64), dims=("probe_y", "probe_x"))
    path = store.create_scan_store(
        tmp_path / "x.zarr",
        frames,
        pos,
        attrs=_attrs(),
        extra_vars={"true_object": true_obj, "true_probe": probe},
    )
    ds = store.open_scan_store(path)
    assert ds["true_object"].dtype == np.complex64
    np.testing.assert_allclose(ds["true_object"].values, obj)
    np.testing.assert_allclose(ds["true_object_x"].values, np.arange(4) * 1e-8)
    assert ds["true_probe"].dims == ("probe_y", "probe_x")


def test_no_geometry_pixel_units_is_valid(tmp_path):
    frames, pos = _data()
    attrs = _attrs(
        positions_unit="px", wavelength_m=None, detector_distance_m=None, detector_pixel_size_m=None
    )
    path = store.create_scan_store(tmp_path / "p.zarr", frames, pos * 1e7, attrs=attrs)
    ds = store.open_scan_store(path)
    assert store.object_pixel_size(ds, (8, 6)) is None
    np.testing.assert_array_equal(store.positions_px(ds, (8, 6)), pos * 1e7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"positions": np.zeros((9, 2))}, "expected \\(10, 2\\)"),
        ({"positions": np.full((10, 2), np.nan)}, "finite"),
        ({"intensities": np.zeros((10, 8))}, "expected \\(scan, det_y, det_x\\)"),
        ({"intensities": np.zeros((10, 8, 6), complex)}, "dtype"),
        ({"mask": np.zeros((3, 3), bool)}, "mask shape"),
        ({"attrs": {"scan_id": "a"}}, "attrs lack"),
        ({"attrs": _attrs(wavelength_m=0.0)}, "wavelength_m=0.0"),
        ({"attrs": _attrs(detector_distance_m=-1.0)}, "detector_distance_m=-1.0"),
        ({"attrs": _attrs(detector_pixel_size_m=75.0)}, "plausible range"),
        ({"attrs": _attrs(positions_unit="um")}, "positions_unit"),
        ({"attrs": _attrs(wavelength_m=None)}, "incomplete"),
    ],
)
def test_create_refuses_bad_input_and_leaves_nothing(tmp_path, kwargs, match):
    frames, pos = _data()
    args = {"intensities": frames, "positions": pos, "attrs": _attrs()}
    args.update(kwargs)
    with pytest.raises(StoreError, match=match):
        store.create_scan_store(
            tmp_path / "bad.zarr", args.pop("intensities"), args.pop("positions"), **args
        )
    assert list(tmp_path.iterdir()) == []


def test_crash_during_write_leaves_no_store_and_keeps_old(tmp_path):
    path, frames, pos = _make(tmp_path)

    def boom(block):
        raise RuntimeError("disk on fire")

    bad = da.from_array(frames, chunks=(2, 8, 6)).map_blocks(boom, dtype=frames.dtype)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.create_scan_store(path, bad, pos, attrs=_attrs(), overwrite=True)
    # the old store is intact and no temporary siblings are left behind
    np.testing.assert_array_equal(store.open_scan_store(path)["intensities"].values, frames)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]
    with pytest.raises(StoreError, match="already exists"):
        store.create_scan_store(path, frames, pos, attrs=_attrs())


def test_overwrite_replaces_complete_store(tmp_path):
    path, frames, pos = _make(tmp_path)
    store.create_scan_store(path, frames[:4] + 1, pos[:4], attrs=_attrs(), overwrite=True)
    ds = store.open_scan_store(path)
    np.testing.assert_array_equal(ds["intensities"].values, frames[:4] + 1)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


# ---------------------------------------------------------------------------------- open


def _break(path: Path, action):
    g = zarr.open_group(str(path), mode="r+")
    action(g)


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (lambda g: g.__delitem__("intensities"), "'intensities' missing"),
        (lambda g: g.__delitem__("positions"), "'positions' missing"),
        (lambda g: g.attrs.__delitem__("schema_version"), "schema_version missing"),
        (lambda g: g.attrs.update({"schema_version": 99}), "schema_version=99"),
        (lambda g: g.attrs.update({"wavelength_m": 0.0}), "wavelength_m=0.0"),
        (lambda g: g.attrs.update({"detector_distance_m": -2.0}), "detector_distance_m=-2.0"),
        (lambda g: g.attrs.update({"positions_unit": "furlong"}), "positions_unit"),
        (lambda g: g.attrs.__delitem__("scan_id"), "scan_id"),
        (
            lambda g: (
                g.__delitem__("positions"),
                g.create_array(
                    "positions", data=np.zeros((4, 2)), dimension_names=("scan", "axis")
                ),
            ),
            "10 frames in 'intensities' but 4 rows",
        ),
        (
            lambda g: (
                g.__delitem__("positions"),
                g.create_array(
                    "positions", data=np.zeros((10, 2)), dimension_names=("frame", "axis")
                ),
            ),
            "dims \\('frame', 'axis'\\)",
        ),
        (
            lambda g: (
                g.__delitem__("positions"),
                g.create_array(
                    "positions", data=np.full((10, 2), np.inf), dimension_names=("scan", "axis")
                ),
            ),
            "finite",
        ),
    ],
)
def test_open_detects_broken_store(tmp_path, action, match):
    path, _, _ = _make(tmp_path)
    _break(path, action)
    with pytest.raises(StoreError, match=match) as info:
        store.open_scan_store(path)
    assert str(path) in str(info.value)


def test_open_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        store.open_scan_store(tmp_path / "nope.zarr")
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        store.open_scan_store(f)
    d = tmp_path / "dir.zarr"
    d.mkdir()
    with pytest.raises(StoreError, match=r"no zarr\.json"):
        store.open_scan_store(d)
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    with pytest.raises(StoreError, match="Zarr v2"):
        store.open_scan_store(tmp_path / "v2.zarr")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot be opened"):
        store.open_scan_store(tmp_path / "junk.zarr")


# ---------------------------------------------------------------------------------- units


def test_positions_px_uses_frame_shape(tmp_path):
    path, _, pos = _make(tmp_path)
    ds = store.open_scan_store(path)
    size = object_pixel_size_m(1.5e-10, 2.0, 75e-6, (8, 6))
    # independent check of the formula: lambda z / (N p)
    assert size[0] == pytest.approx(1.5e-10 * 2.0 / (8 * 75e-6))
    assert store.object_pixel_size(ds, (8, 6)) == pytest.approx(size)
    np.testing.assert_allclose(store.positions_px(ds, (8, 6)), pos / np.array(size))
    # cropping to 4 x 3 doubles the object pixel, halving the pixel coordinates
    np.testing.assert_allclose(store.positions_px(ds, (4, 3)), store.positions_px(ds, (8, 6)) / 2)


def test_object_pixel_size_follows_binned_preprocessed_array(tmp_path):
    path, _, _ = _make(tmp_path)
    ds = store.open_scan_store(path)
    pre = xr.DataArray(
        np.zeros((10, 4, 3), np.float32),
        dims=("scan", "pre_y", "pre_x"),
        attrs={"detector_pixel_size_m": 150e-6},
    )
    ds = ds.assign(preprocessed=pre)
    # binning by 2 keeps N * p, so the object pixel of binned frames is the raw one
    assert store.object_pixel_size(ds, (4, 3)) == pytest.approx(store.object_pixel_size(ds, (8, 6)))
    assert store.object_pixel_size(ds, (4, 3), detector_pixel_size_m=75e-6) == pytest.approx(
        object_pixel_size_m(1.5e-10, 2.0, 75e-6, (4, 3))
    )


def test_load_frames_sources(tmp_path):
    path, frames, _ = _make(tmp_path)
    ds = store.open_scan_store(path)
    out = store.load_frames(ds, indices=[1, 3])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, frames[[1, 3]].astype(np.float32))
    with pytest.raises(StoreError, match="preprocessed"):
        store.load_frames(ds, "preprocessed")
    ds = ds.assign(preprocessed=(("scan", "pre_y", "pre_x"), np.ones((10, 2, 2), np.float32)))
    np.testing.assert_array_equal(store.load_frames(ds), np.ones((10, 2, 2)))
    np.testing.assert_array_equal(store.load_frames(ds, "intensities"), frames)


# ---------------------------------------------------------------------------------- runs


def _result(seed=0):
    rng = np.random.default_rng(seed)
    obj = (rng.normal(size=(6, 7)) + 1j * rng.normal(size=(6, 7))).astype(np.complex128)
    return xr.Dataset(
        {
            "object": (("y", "x"), obj),
            "probe": (("probe_y", "probe_x"), np.ones((3, 3), np.complex64)),
            "loss": (("epoch",), np.linspace(1, 0.1, 5)),
        },
        coords={"y": np.arange(6) * 1e-8, "x": np.arange(7) * 1e-8},
    )


def test_runs_lifecycle(tmp_path):
    path, frames, _ = _make(tmp_path)
    res = _result()
    store.write_run(
        path, "r1", res, attrs={"config": {"lr": 1e-4, "bad": float("nan")}, "path": tmp_path}
    )
    (run,) = store.list_runs(path)
    assert run["run_id"] == "r1" and run["status"] == "running" and run["created"]
    assert run["config"]["lr"] == 1e-4 and math.isnan(run["config"]["bad"])  # NaN stays NaN
    assert run["path"] == ".."  # a path beside the store is stored relative to it
    store.write_run(path, "r1", _result(1), attrs={"half": "a"}, subgroup="half_a")
    store.mark_run(path, "r1", "complete", wall_s=12.5)
    (run,) = store.list_runs(path)
    assert run["status"] == "complete" and run["wall_s"] == 12.5
    assert run["subgroups"] == ["half_a"]
    got = store.open_run(path, "r1")
    assert got["object"].dtype == np.complex64
    np.testing.assert_allclose(got["object"].values, res["object"].values, rtol=1e-6)
    assert got.attrs["status"] == "complete"
    half = store.open_run(path, "r1", "half_a")
    np.testing.assert_allclose(half["object"].values, _result(1)["object"].values, rtol=1e-6)
    # rewriting the main result keeps the subgroup, replaces arrays, and is "running" again
    store.write_run(path, "r1", _result(2).isel(y=slice(0, 3)), attrs={})
    assert store.open_run(path, "r1")["object"].shape == (3, 7)
    assert store.list_runs(path)[0]["status"] == "running"
    assert store.open_run(path, "r1", "half_a")["object"].shape == (6, 7)
    # raw data untouched
    np.testing.assert_array_equal(store.open_scan_store(path)["intensities"].values, frames)
    store.delete_run(path, "r1")
    assert store.list_runs(path) == []
    with pytest.raises(StoreError, match="r1' does not exist"):
        store.open_run(path, "r1")
    with pytest.raises(StoreError, match="does not exist"):
        store.mark_run(path, "r1", "complete")
    with pytest.raises(StoreError, match="run_id"):
        store.write_run(path, "../evil", res, attrs={})


def test_a_part_record_lives_and_dies_with_the_part_arrays(tmp_path):
    path, _, _ = _make(tmp_path)
    assert store.read_part(path, "r1") is None  # no run
    store.write_run(path, "r1", _result(), attrs={})
    store.write_run(path, "r1", _result(1), attrs={}, subgroup="half_a")
    assert store.read_part(path, "r1") is None  # written, not vouched for
    store.mark_part(path, "r1", {"fingerprint": "abc", "result": {"loss": float("nan")}})
    store.mark_part(path, "r1", {"fingerprint": "def"}, subgroup="half_a")
    record = store.read_part(path, "r1")
    assert record["fingerprint"] == "abc" and math.isnan(record["result"]["loss"])
    assert store.read_part(path, "r1", subgroup="half_a") == {"fingerprint": "def"}
    # the run's attrs being rewritten (prepare of a re-run, the final write) keep the records
    store.write_run(path, "r1", xr.Dataset(), attrs={"again": True})
    assert store.read_part(path, "r1")["fingerprint"] == "abc"
    # rewriting the part's arrays drops its record: a rewrite cut short is not vouched for
    store.write_run(path, "r1", _result(2), attrs={})
    assert store.read_part(path, "r1") is None
    assert store.read_part(path, "r1", subgroup="half_a") == {"fingerprint": "def"}
    with pytest.raises(StoreError, match="subgroup"):
        store.read_part(path, "r1", subgroup="../x")


def test_a_rewrite_cut_short_leaves_the_run_running(tmp_path, monkeypatch):
    """A process killed while it rewrites a complete run's arrays: the run says "running"
    (never "complete" with arrays missing, never without a status)."""
    path, _, _ = _make(tmp_path)
    store.write_run(path, "r1", _result(), attrs={"a": 1})
    store.mark_run(path, "r1", "complete")
    created = store.list_runs(path)[0]["created"]

    def killed(self, *args, **kwargs):
        assert store.list_runs(path)[0]["status"] == "running"  # already, before any array
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_zarr", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_run(path, "r1", _result(1), attrs={"b": 2})
    (run,) = store.list_runs(path)
    assert run["status"] == "running" and run["created"] == created
    assert "object" not in store.open_run(path, "r1")  # the old arrays are gone already


def _writer(path: str, run_id: str, seed: int) -> None:
    for i in range(4):
        store.write_run(path, run_id, _result(seed + i), attrs={"i": i})
        store.write_run(path, run_id, _result(seed + i), attrs={}, subgroup="half_b")
    store.write_run(path, run_id, _result(seed), attrs={"final": True})
    store.mark_run(path, run_id, "complete")


def test_concurrent_writers_on_different_runs(tmp_path):
    path, _, _ = _make(tmp_path)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), f"run{k}", 10 * k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    runs = {r["run_id"]: r for r in store.list_runs(path)}
    assert set(runs) == {"run0", "run1"}
    for k in range(2):
        assert runs[f"run{k}"]["status"] == "complete" and runs[f"run{k}"]["final"] is True
        got = store.open_run(path, f"run{k}")
        np.testing.assert_allclose(
            got["object"].values, _result(10 * k)["object"].values, rtol=1e-6
        )
    store.open_scan_store(path)


def test_subgroup_write_cannot_drop_the_run_attrs_of_a_concurrent_rewrite(tmp_path, monkeypatch):
    """A half part's write updates the run group's attrs (read, merge, write). Unlocked, it
    wrote back attrs read before the full part's rewrite, dropping that rewrite's attrs;
    under the store's lock the rewrite waits for it and its attrs are the ones left."""
    path, _, _ = _make(tmp_path)
    store.write_run(path, "r", _result(0), attrs={"config": "old", "stale": 1})
    store.mark_run(path, "r", "complete")
    created = store.list_runs(path)[0]["created"]

    half_has_read, full_done = threading.Event(), threading.Event()
    waited_out: list[bool] = []
    open_group = zarr.open_group

    def slow_open(*args, **kwargs):
        # the half's read of the run group's attrs: hold on until the full rewrite is done
        group = open_group(*args, **kwargs)
        if threading.current_thread().name == "half" and kwargs.get("path") == "reconstructions/r":
            half_has_read.set()
            waited_out.append(not full_done.wait(1.0))
        return group

    monkeypatch.setattr(zarr, "open_group", slow_open)
    errors: list[BaseException] = []

    def run(fn):
        try:
            fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    def half():
        store.write_run(path, "r", _result(1), attrs={}, subgroup="half_a")

    def full():
        assert half_has_read.wait(30)
        store.write_run(path, "r", _result(2), attrs={"config": "new"})
        full_done.set()

    threads = [
        threading.Thread(target=run, args=(half,), name="half"),
        threading.Thread(target=run, args=(full,), name="full"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    assert waited_out == [True]  # the rewrite could not go on while the half held the lock
    (runinfo,) = store.list_runs(path)
    assert runinfo["config"] == "new" and "stale" not in runinfo
    assert runinfo["status"] == "running" and runinfo["created"] == created
    assert runinfo["subgroups"] == ["half_a"]
    # the consolidated copy, written last under the same lock, says the same
    root = open_group(str(path), mode="r", zarr_format=3, use_consolidated=True)
    assert root["reconstructions/r"].attrs["config"] == "new"


def test_summary(tmp_path):
    path, _, _ = _make(tmp_path)
    s = store.store_summary(store.open_scan_store(path))
    assert s["frames"] == 10 and s["frame_shape"] == [8, 6] and s["has_mask"] is False
    assert s["object_pixel_size_m"] == pytest.approx(
        object_pixel_size_m(1.5e-10, 2.0, 75e-6, (8, 6))
    )
    shutil.rmtree(path)
