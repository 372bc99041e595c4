"""`ptyinr run`, `ptyinr scan`, `ptyinr results` end to end on tiny simulated stores.

Most commands attach to one module-wide 2-worker LocalCluster (`--cluster tcp://...
--insecure`: a plain address of a loopback test cluster), which saves a cluster start per
command; one test starts its own (`--cluster local --workers 2`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from ptyinr import store
from ptyinr.simulate import SimulationConfig, write_simulated_store

FAST = [
    "model.siren_width=32",
    "model.siren_hidden_layers=1",
    "model.hash_levels=4",
    "model.hash_log2_table_size=10",
    "model.probe_init_steps=20",
    "train.epochs=8",
    "train.lr_object=1e-3",
    "train.lr_probe=1e-3",
]
SETS = [arg for item in FAST for arg in ("--set", item)]

runner = CliRunner()


def _app():
    from ptyinr.cli.main import app

    return app


def make_store(path: Path, seed: int = 0) -> Path:
    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, seed=seed)
    return write_simulated_store(path, sim)


@pytest.fixture(scope="module")
def address():
    """Scheduler address of a 2-worker LocalCluster shared by this module's commands."""
    from ptyinr.cluster import connect

    # plain TCP on purpose: its address is handed to other clients (with --insecure)
    with connect(
        "local", n_workers=2, dashboard_address=None, quiet=True, local_tls=False
    ) as client:
        client.wait_for_workers(2, timeout=60)
        yield client.scheduler.address


def on(address: str) -> list[str]:
    """Options to attach to the module's test cluster: a plain (tcp://) loopback address,
    which ptyinr refuses without --insecure."""
    return ["--cluster", address, "--insecure"]


def invoke(*args: str):
    return runner.invoke(_app(), [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------- run, results


def test_run_on_a_local_cluster_then_results(tmp_path: Path) -> None:
    data = make_store(tmp_path / "scan.zarr")
    figs = tmp_path / "figs"
    result = invoke("run", data, *SETS, "--cluster", "local", "--workers", "2", "--figures", figs)
    assert result.exit_code == 0, result.output
    (run,) = store.list_runs(data)
    assert run["status"] == "complete" and run["subgroups"] == ["half_a", "half_b"]
    ds = store.open_run(data, run["run_id"])
    assert {"object", "probe", "loss", "frc", "half_bit_threshold"} <= set(ds.variables)
    assert run["run_id"] in result.output and "complete" in result.output
    folder = figs / "scan" / run["run_id"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "amplitude.png",
        "frc.png",
        "loss.png",
        "phase.png",
        "probe.png",
    ]

    listed = invoke("results", data, "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert row["run_id"] == run["run_id"] and row["status"] == "complete"
    assert row["resolution_unit"] == "m"
    assert "train.epochs=8" in row["config"] and "model.siren_width=32" in row["config"]
    table = invoke("results", data)
    assert table.exit_code == 0 and "complete" in table.output


def test_run_id_preprocess_skip_and_force(tmp_path: Path, address: str) -> None:
    data = make_store(tmp_path / "scan.zarr")
    common = ["run", data, *SETS, "--no-frc", *on(address), "--run-id", "mine"]
    first = invoke(*common, "--preprocess")
    assert first.exit_code == 0, first.output
    attrs = store.open_run(data, "mine").attrs
    assert "preprocessed" in store.open_scan_store(data)
    assert attrs["data_source"] == "preprocessed" and attrs["preprocess"]["reused"] is False
    created = attrs["created"]
    again = invoke(*common)
    assert again.exit_code == 0 and "1 run(s) already complete: skipped" in again.output
    assert store.open_run(data, "mine").attrs["created"] == created
    forced = invoke(*common, "--force", "--set", "train.epochs=2", "--preprocess")
    assert forced.exit_code == 0, forced.output
    attrs = store.open_run(data, "mine").attrs
    assert attrs["status"] == "complete" and attrs["epochs"] == 2
    assert attrs["preprocess"]["reused"] is True  # same options: the array is kept
    assert [r["run_id"] for r in store.list_runs(data)] == ["mine"]


def test_two_concurrent_runs_on_one_store_give_two_complete_runs(
    tmp_path: Path, address: str
) -> None:
    data = make_store(tmp_path / "scan.zarr")  # no reconstructions group yet: both create it
    cmd = [sys.executable, "-m", "ptyinr.cli.main", "run", str(data), *SETS, *on(address)]
    procs = [
        subprocess.Popen([*cmd, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = store.list_runs(data)
    assert len(runs) == 2 and runs[0]["run_id"] != runs[1]["run_id"]
    for run in runs:
        assert run["status"] == "complete"
        assert run["subgroups"] == ["half_a", "half_b"]
        assert run["n_positions"] == 121
        assert run["run_id"] in run["figures_dir"]
        ds = store.open_run(data, run["run_id"])
        assert np.isfinite(ds["object"].values).all()


# --------------------------------------------------------------------------- scan


def test_scan_summary_failures_and_resume(tmp_path: Path, address: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    make_store(folder / "a.zarr", seed=1)
    make_store(folder / "b.zarr", seed=2)
    broken = folder / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("[]")
    out = tmp_path / "summary"
    args = [
        "scan",
        str(folder / "*.zarr"),
        "--grid",
        "train.lr_object=1e-3,2e-3",
        *SETS,
        *on(address),
        "--out",
        out,
    ]
    result = invoke(*args)
    assert result.exit_code == 1, result.output  # the broken store failed
    assert "broken" in result.output and "★" in result.output

    ds = xr.open_zarr(out / "summary.zarr", consolidated=False, zarr_format=3).load()
    assert dict(ds.sizes) == {"dataset": 3, "train.lr_object": 2}
    assert list(ds["dataset"].values) == ["a", "b", "broken"]
    np.testing.assert_allclose(ds["train.lr_object"].values, [1e-3, 2e-3])
    status = ds["status"].values
    assert (status[:2] == "complete").all() and (status[2] == "failed").all()
    assert "zarr" in ds["reason"].sel(dataset="broken").values[0].lower()
    assert np.isfinite(ds["final_loss"].values[:2]).all()
    assert (ds["wall_seconds"].values[:2] > 0).all()
    assert ds["best"].sum("train.lr_object").values.tolist() == [1, 1, 0]
    # each run is in its store, under the id of its configuration
    for name in ("a", "b"):
        runs = store.list_runs(folder / f"{name}.zarr")
        assert sorted(r["run_id"] for r in runs) == sorted(ds["run_id"].sel(dataset=name).values)
        lrs = sorted(r["config"]["train"]["lr_object"] for r in runs)
        assert lrs == [1e-3, 2e-3]
    csv = (out / "summary.csv").read_text().splitlines()
    assert len(csv) == 7 and "resolution" in csv[0] and "train.lr_object" in csv[0]

    # resumed: the completed runs are found and skipped, the broken store fails again
    created = {r["run_id"]: r["created"] for r in store.list_runs(folder / "a.zarr")}
    again = invoke(*args)
    assert again.exit_code == 1
    ds2 = xr.open_zarr(out / "summary.zarr", consolidated=False, zarr_format=3).load()
    assert (ds2["status"].values[:2] == "skipped").all()
    np.testing.assert_allclose(ds2["final_loss"].values[:2], ds["final_loss"].values[:2])
    assert {r["run_id"]: r["created"] for r in store.list_runs(folder / "a.zarr")} == created


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.zarr"], "not found"),
        (["run", "{data}", "--run-id", "a/b"], "--run-id"),
        (["run", "{data}", "--set", "train.epochs=0"], "train.epochs"),
        (["run", "{data}", "--cluster", "nowhere"], "cluster spec"),
        (["run", "{data}", "--frame-size", "12"], "--preprocess"),
        (["run", "{data}", "--preprocess", "--frame-size", "a,b"], "--frame-size"),
        (["run", "{data}", "--cluster", "tcp://127.0.0.1:1", "--workers", "2"], "--workers"),
        (["scan", "{data}", "--grid", "train.epochs"], "--grid"),
        (["scan", "{data}", "--grid", "train.nope=1,2"], "train.nope"),
        (["scan", "{dir}/nothing-*.zarr"], "matches no path"),
        (["results", "{dir}"], "zarr.json"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    data = tmp_path / "scan.zarr"
    data.mkdir()
    filled = [a.format(data=data, dir=tmp_path) for a in args]
    result = runner.invoke(_app(), filled)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_classical_engine_runs_through_run_with_frc(address, tmp_path: Path) -> None:
    """`model.method = epie` uses the same graph: full + halves, FRC, figures, results; the
    clean 40 % overlap scan converges to the ground truth (unknown probe, ramp removed)."""
    sim = SimulationConfig(object_size=64, probe_size=16, focus_fwhm_px=3, overlap=0.4)
    data = write_simulated_store(tmp_path / "clean.zarr", sim)
    result = invoke(
        "run", data, "--set", "model.method=epie", "--set", "train.epochs=20",
        "--set", "train.threads=1", *on(address), "--run-id", "classical",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (run,) = store.list_runs(data)
    assert run["status"] == "complete" and run["subgroups"] == ["half_a", "half_b"]
    ds = store.open_run(data, "classical")
    assert ds.attrs["method"] == "epie" and ds.attrs["config"]["model"]["method"] == "epie"
    assert ds.attrs["config"]["model"]["object"] == "pixels"  # as the engine ran it
    # clean data: the halves agree up to Nyquist (no crossing of the half-bit threshold)
    assert "frc" in ds.variables and float(np.median(ds["frc"].values)) > 0.9
    assert ds.attrs["resolved_to_nyquist"] or ds.attrs["resolution"] is not None
    assert ds.attrs["quality"]["relative_error"] <= 0.05
