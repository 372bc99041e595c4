"""Simulate -> export to a beamline-style HDF5 file -> ingest -> reconstruct.

The exported file uses the units a beamline writes (energy in keV, distance in mm, detector
pixel in um, positions in metres, integer counts). After ingest, the reconstruction of the
store must be the reconstruction of the simulated arrays themselves: same positions in
pixels, same frames, same result.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from tiny import TINY_MODEL

from ptyinr import store
from ptyinr.config import load_config
from ptyinr.ingest import ingest_file
from ptyinr.launch import fit
from ptyinr.reconstruct import reconstruct_store
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan

CONFIG = [*TINY_MODEL, "model.siren_width=16", "train.epochs=3", "train.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def export_hdf5(path: Path, sim: dict, config: SimulationConfig) -> dict[str, str]:
    """Write the scan as a beamline would; return the key map for the generic reader."""
    counts = np.round(sim["intensities"]).astype(np.uint32)
    positions_m = sim["positions_px"] * np.asarray(sim["pixel_size_m"])
    with h5py.File(path, "w") as f:
        f["/entry/data/data"] = counts
        f["/entry/sample/positions"] = positions_m
        f["/entry/instrument/energy_kev"] = config.energy_ev / 1e3
        det = f.create_group("/entry/instrument/detector")
        det.attrs["distance_mm"] = config.detector_distance_m * 1e3
        det.attrs["pixel_um"] = config.detector_pixel_size_m * 1e6
    return {
        "intensities": "/entry/data/data",
        "positions": "/entry/sample/positions",
        "energy_kev": "/entry/instrument/energy_kev",
        "detector_distance_mm": "/entry/instrument/detector@distance_mm",
        "detector_pixel_size_um": "/entry/instrument/detector@pixel_um",
    }


def test_simulate_export_ingest_reconstruct(tmp_path):
    sim_config = SimulationConfig(
        object_size=48, probe_size=16, focus_fwhm_px=3.0, overlap=0.0, photons_per_frame=1e7
    )
    sim = simulate_scan(sim_config)
    keys = export_hdf5(tmp_path / "scan.h5", sim, sim_config)
    path = ingest_file(tmp_path / "scan.h5", tmp_path / "scan.zarr", keys=keys)

    ds = store.open_scan_store(path)
    counts = np.round(sim["intensities"]).astype(np.uint32)
    np.testing.assert_array_equal(ds["intensities"].values, counts)
    np.testing.assert_allclose(store.positions_px(ds, (16, 16)), sim["positions_px"], atol=1e-6)
    np.testing.assert_allclose(
        store.object_pixel_size(ds, (16, 16)), sim["pixel_size_m"], rtol=1e-9
    )

    cfg = load_config(overrides=CONFIG)
    run_id, from_store = reconstruct_store(path, cfg, run_id="rt", progress=False)
    runs = {r["run_id"]: r for r in store.list_runs(path)}
    assert runs["rt"]["status"] == "complete"
    written = store.open_run(path, run_id)
    np.testing.assert_array_equal(written["object"].values, from_store.object.values)
    assert written["object"]["x"].attrs["units"] == "m"

    # the same reconstruction straight from the simulated arrays
    direct = fit(
        ScanData(counts.astype(np.float32), sim["positions_px"], pixel_size=sim["pixel_size_m"]),
        cfg,
        progress=False,
    )
    assert from_store.geometry.object_shape == direct.geometry.object_shape
    assert from_store.geometry.origin_px == direct.geometry.origin_px
    np.testing.assert_allclose(from_store.geometry.subpixel, direct.geometry.subpixel, atol=1e-6)
    np.testing.assert_allclose(from_store.loss.values, direct.loss.values, rtol=1e-4)
    np.testing.assert_allclose(from_store.object.values, direct.object.values, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(from_store.object["y"].values, direct.object["y"].values, rtol=1e-9)
