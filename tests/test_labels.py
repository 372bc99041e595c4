"""Labelled data (issue 15): every array of a scan store and of its run groups carries
`long_name` and `units`; the metadata is consolidated after every write, so plain xarray
opens the store and its runs in one read and without a warning; NaN stays NaN and paths
in attrs are relative to the store.

One tiny simulated store (40 x 40 object, 16 x 16 frames) and a 2-epoch tiny PtyINR run,
plus an FRC half (refining positions, so its `refined_positions` is checked too) and curve
written the way the run graph writes them.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from tiny import TINY_MODEL

from ptyinr import evaluate, store
from ptyinr.config import load_config
from ptyinr.reconstruct import reconstruct_store
from ptyinr.simulate import SimulationConfig, write_simulated_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIM = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated store with run "r": full result, FRC half `half_a`, FRC curve."""
    path = write_simulated_store(tmp_path_factory.mktemp("labels") / "scan.zarr", SIM)
    config = load_config(overrides=[*TINY_MODEL, "train.epochs=2"])
    n = store.open_scan_store(path).sizes["scan"]
    reconstruct_store(path, config, run_id="r", progress=False, mark_complete=False)
    refine = config.model_copy(
        update={
            "train": config.train.model_copy(
                update={"refine_positions": True, "position_start_epoch": 0}
            )
        }
    )
    reconstruct_store(
        path, refine, run_id="r", subgroup="half_a", indices=np.arange(0, n, 2), progress=False
    )
    full = store.open_run(path, "r").load()
    half = store.open_run(path, "r", "half_a").load()
    curve = evaluate.frc(full["object"], half["object"])
    store.write_run(path, "r", curve[["frc", "half_bit_threshold", "n_pixels"]], attrs={})
    store.mark_run(path, "r", "complete")
    return path


def _quantity(dtype: np.dtype) -> bool:
    """Numbers carry units; flags (bool) and text labels do not (CF)."""
    return np.dtype(dtype).kind in "iufc"


def _zarr_arrays(path: Path) -> dict[str, zarr.Array]:
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return {name: node for name, node in root.arrays()} | {
        f"{group}/{name}": node
        for group in ("reconstructions/r", "reconstructions/r/half_a")
        for name, node in zarr.open_group(
            str(path), path=group, mode="r", use_consolidated=False
        ).arrays()
    }


def test_every_array_has_long_name_and_units_in_zarr(scan: Path) -> None:
    arrays = _zarr_arrays(scan)
    expected = {"intensities", "positions", "axis", "true_object", "true_probe", "probe_y",
                "true_object_x", "reconstructions/r/object", "reconstructions/r/probe",
                "reconstructions/r/loss", "reconstructions/r/epoch", "reconstructions/r/y",
                "reconstructions/r/frc", "reconstructions/r/spatial_frequency",
                "reconstructions/r/half_a/object",
                "reconstructions/r/half_a/refined_positions"}  # fmt: skip
    assert expected <= set(arrays)
    for name, arr in arrays.items():
        attrs = dict(arr.attrs)
        assert attrs.get("long_name"), f"{name}: no long_name"
        if _quantity(arr.dtype):
            assert attrs.get("units"), f"{name}: no units"
    units = {name: dict(arr.attrs).get("units") for name, arr in arrays.items()}
    assert units["intensities"] == "counts"
    assert units["positions"] == "m"
    assert units["true_object"] == "1"  # a transmission is dimensionless (was "m")
    assert units["true_object_x"] == "m" and units["probe_y"] == "m"
    assert units["reconstructions/r/object"] == "1"
    assert units["reconstructions/r/y"] == "m" and units["reconstructions/r/probe_x"] == "m"
    assert units["reconstructions/r/epoch"] == "1"
    assert units["reconstructions/r/spatial_frequency"] == "1/m"
    assert units["reconstructions/r/frc"] == "1"
    assert units["reconstructions/r/half_a/refined_positions"] == "m"


def test_every_variable_and_coordinate_is_labelled_in_xarray(scan: Path) -> None:
    for group in (None, "reconstructions/r", "reconstructions/r/half_a"):
        ds = xr.open_zarr(scan, group=group)
        assert ds.variables
        for name, var in ds.variables.items():
            assert var.attrs.get("long_name"), f"{group}:{name}: no long_name"
            if _quantity(var.dtype):
                assert var.attrs.get("units"), f"{group}:{name}: no units"


def test_plain_xarray_opens_store_and_runs_without_a_warning(scan: Path) -> None:
    code = (
        "import sys, xarray\n"
        "s = sys.argv[1]\n"
        "xarray.open_zarr(s)\n"
        "xarray.open_zarr(s, group='reconstructions/r')\n"
        "xarray.open_zarr(s, group='reconstructions/r/half_a')\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, str(scan)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_consolidated_metadata_is_what_zarr_writes(scan: Path, tmp_path: Path) -> None:
    """Our consolidation (atomic, serialised, skips scratch) writes exactly zarr's."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(scan, copy)
    ours = json.loads((copy / "zarr.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not in the v3 spec"
        zarr.consolidate_metadata(str(copy))
    assert ours == json.loads((copy / "zarr.json").read_text())


def _consolidated_groups(path: Path) -> set[str]:
    meta = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    return {k for k, v in meta.items() if v["node_type"] == "group"}


def test_consolidation_follows_every_write(scan: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(scan, path)
    result = store.open_run(path, "r").load()[["object", "probe", "loss"]]
    store.write_run(path, "second", result, attrs={"positions_unit": "m"})
    ds = xr.open_zarr(path, group="reconstructions/second", consolidated=True)
    assert ds.attrs["status"] == "running"
    store.mark_run(path, "second", "complete")
    ds = xr.open_zarr(path, group="reconstructions/second", consolidated=True)
    assert ds.attrs["status"] == "complete"
    store.mark_part(path, "second", {"fingerprint": "abc"})
    ds = xr.open_zarr(path, group="reconstructions/second", consolidated=True)
    assert ds["object"].attrs[store.PART_RECORD] == {"fingerprint": "abc"}
    # scratch is never consolidated: checkpoints of unfinished runs, hidden folders
    zarr.open_group(str(path / "checkpoints" / "second" / "full"), mode="w")
    zarr.open_group(str(path / "reconstructions" / ".trash"), mode="w")
    store.delete_run(path, "second")
    groups = _consolidated_groups(path)
    assert "reconstructions/r" in groups and "reconstructions/second" not in groups
    assert not [g for g in groups if g.startswith("checkpoints") or "/." in g]
    with pytest.raises(KeyError):
        xr.open_zarr(path, group="reconstructions/second", consolidated=True)


def _write_one_run(path: str, run_id: str, barrier) -> None:
    barrier.wait()
    data = xr.Dataset({"loss": ("epoch", np.linspace(1.0, 0.1, 4))})
    for _ in range(3):
        store.write_run(path, run_id, data, attrs={"positions_unit": "m"})
    store.mark_run(path, run_id, "complete")


def test_concurrent_writers_leave_a_complete_consolidation(scan: Path, tmp_path: Path) -> None:
    """Consolidations are serialised and each reads the hierarchy afresh: whatever the
    interleaving, the last one sees every run, complete."""
    path = tmp_path / "s.zarr"
    shutil.copytree(scan, path)
    ctx = mp.get_context("fork")
    ids = [f"w{i}" for i in range(4)]
    barrier = ctx.Barrier(len(ids))
    procs = [ctx.Process(target=_write_one_run, args=(str(path), i, barrier)) for i in ids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for run_id in ids:
        ds = xr.open_zarr(path, group=f"reconstructions/{run_id}", consolidated=True)
        assert ds.attrs["status"] == "complete"
        assert ds["loss"].attrs["long_name"]


def test_nan_stays_nan_and_paths_are_relative_to_the_store(scan: Path, tmp_path: Path) -> None:
    path = tmp_path / "data" / "s.zarr"
    shutil.copytree(scan, path)
    attrs = {
        "final_loss": float("nan"),
        "store": str(path),  # the store itself, as the caller named it
        "figures_dir": str(path.parent / "s.figures" / "x"),  # beside the store
        "checkpoint": path / "checkpoints" / "x",  # inside
        "elsewhere": "/opt/models/model.json",  # not ours: kept
        "label": "a word",
        "nested": {"probe_file": str(path.parent / "probe.npy")},
    }
    store.write_run(path, "x", xr.Dataset(), attrs=attrs)
    store.mark_run(path, "x", "complete", resolution=float("nan"))
    for ds in (store.open_run(path, "x"), xr.open_zarr(path, group="reconstructions/x")):
        a = ds.attrs
        assert isinstance(a["final_loss"], float) and math.isnan(a["final_loss"])
        assert isinstance(a["resolution"], float) and math.isnan(a["resolution"])
        assert a["store"] == "."
        assert a["figures_dir"] == os.path.join("..", "s.figures", "x")
        assert a["checkpoint"] == os.path.join("checkpoints", "x")
        assert a["elsewhere"] == "/opt/models/model.json" and a["label"] == "a word"
        assert a["nested"]["probe_file"] == os.path.join("..", "probe.npy")
        assert (path / a["figures_dir"]).resolve() == (path.parent / "s.figures" / "x").resolve()
    assert store.strict_json({"a": float("nan"), "b": [float("inf"), 1.0]}) == {
        "a": None,
        "b": [None, 1.0],
    }


def test_pixel_unit_store_labels_lengths_in_pixels(tmp_path: Path) -> None:
    frames = np.ones((3, 8, 8), np.uint16)
    pos = np.array([[4.0, 4.0], [4.0, 6.0], [6.0, 4.0]])
    attrs = {
        "wavelength_m": None,
        "detector_distance_m": None,
        "detector_pixel_size_m": None,
        "positions_unit": "px",
        "scan_id": "p",
    }
    path = store.create_scan_store(tmp_path / "p.zarr", frames, pos, attrs=attrs)
    ds = xr.open_zarr(path, consolidated=True)
    assert ds["positions"].attrs["units"] == "px"
    assert ds["intensities"].attrs["units"] == "counts"
