"""ptyinr.graph: the per-store Dask graph on a real 2-worker LocalCluster (processes).

One cluster serves the whole module. The data are tiny simulated scans (40 x 40 object,
16 x 16 frames, 121 positions) and a small, fast model, so a run takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ptyinr import evaluate, graph, runlock, store
from ptyinr.config import load_config
from ptyinr.simulate import SimulationConfig, write_simulated_store

FAST = [
    "model.siren_width=32",
    "model.siren_hidden_layers=1",
    "model.hash_levels=4",
    "model.hash_log2_table_size=10",
    "model.probe_init_steps=20",
    "train.epochs=10",
    "train.lr_object=1e-3",
    "train.lr_probe=1e-3",
]


def make_store(path: Path, seed: int = 0) -> Path:
    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, seed=seed)
    return write_simulated_store(path, sim)


def make_nan_store(path: Path, like: Path) -> Path:
    """A valid scan store whose frames hold a NaN: the fit diverges at its first step."""
    ds = store.open_scan_store(like)
    frames = np.asarray(ds["intensities"].values).copy()
    frames[3, 2, 2] = np.nan
    keys = ("wavelength_m", "detector_distance_m", "detector_pixel_size_m")
    attrs = {k: ds.attrs[k] for k in (*keys, "positions_unit", "scan_id")}
    return store.create_scan_store(path, frames, np.asarray(ds["positions"].values), attrs=attrs)


def make_corrupt_store(path: Path) -> Path:
    path.mkdir()
    (path / "zarr.json").write_text("{ not json")
    return path


@pytest.fixture(scope="module")
def client():
    from ptyinr.cluster import connect

    with connect("local", n_workers=2, dashboard_address=None, quiet=True) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("graph") / "scan.zarr")


@pytest.fixture(scope="module")
def reference(client, data: Path) -> tuple[graph.RunOutcome, float]:
    """One complete run on `data`, timed."""
    spec = graph.RunSpec(store=data, config=load_config(overrides=FAST), run_id="reference")
    started = time.perf_counter()
    (outcome,) = graph.run_graph(client, [spec])
    return outcome, time.perf_counter() - started


# --------------------------------------------------------------------------- a complete run


def test_run_writes_a_complete_results_group(reference, data: Path) -> None:
    outcome, _ = reference
    assert outcome.status == "complete", outcome.reason
    runs = {r["run_id"]: r for r in store.list_runs(data)}
    assert runs["reference"]["status"] == "complete"
    assert runs["reference"]["subgroups"] == ["half_a", "half_b"]

    run = store.open_run(data, "reference").load()
    for name in ("object", "probe", "loss", "frc", "half_bit_threshold"):
        assert name in run, name
    assert run["object"].dtype == np.complex64
    assert run["frc"].dims == ("spatial_frequency",)
    assert run["spatial_frequency"].attrs["units"] == "1/m"
    assert run.sizes["epoch"] == 10
    a = run.attrs
    assert a["config"]["train"]["epochs"] == 10
    assert a["config"]["data"]["source"] == "intensities"  # "auto" resolved and recorded
    assert a["resolution_unit"] == "m"
    res = graph._float(a["resolution"])
    assert math.isfinite(res) or a["resolution_note"]
    assert set(a["timings"]) >= {"prepare_seconds", "full", "half_a", "half_b", "frc_seconds"}
    assert a["timings"]["total_seconds"] > 0
    assert {"ptyinr", "torch", "dask", "zarr"} <= set(a["versions"])
    assert a["half_split"]["n_half_a"] + a["half_split"]["n_half_b"] == 121
    assert a["half_split"]["seeds"] == {"half_a": 1, "half_b": 2}
    assert "quality" in a  # simulated store: scored against the ground truth
    assert "slurm_job_ids" not in a  # not on SLURM

    # the halves: interleaved subsets on the full run's grid, from their own seeds
    half_a = store.open_run(data, "reference", "half_a")
    half_b = store.open_run(data, "reference", "half_b")
    used_a = set(half_a.attrs["positions_used"])
    used_b = set(half_b.attrs["positions_used"])
    assert not used_a & used_b and len(used_a | used_b) == 121
    for half in (half_a, half_b):
        np.testing.assert_array_equal(half["y"].values, run["y"].values)
        np.testing.assert_array_equal(half["x"].values, run["x"].values)
    assert half_a.attrs["config"]["train"]["seed"] == 1
    assert half_b.attrs["config"]["train"]["seed"] == 2

    # the stored FRC is that of the stored halves over the scanned interior
    y0, y1, x0, x1 = a["frc"]["interior_px"]
    centres = store.positions_px(store.open_scan_store(data), (16, 16))
    centres = centres - np.asarray(a["origin_px"])
    box = evaluate.scanned_interior(run["object"].shape, centres)
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    assert (y0, y1, x0, x1) == (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    crop = {"y": slice(y0, y1), "x": slice(x0, x1)}
    again = evaluate.frc(half_a["object"].load().isel(crop), half_b["object"].load().isel(crop))
    np.testing.assert_allclose(run["frc"].values, again["frc"].values, atol=1e-12)

    figures = Path(outcome.figures_dir)
    assert figures == data.parent / "scan.figures" / "reference"
    for name in ("amplitude.png", "phase.png", "probe.png", "loss.png", "frc.png"):
        assert (figures / name).stat().st_size > 1000, name
    assert not (data / "checkpoints" / "reference").exists()
    assert runlock.read_run_lock(data, "reference") is None  # released when it completed


def test_rerun_skips_a_complete_run(client, reference, data: Path) -> None:
    spec = graph.RunSpec(store=data, config=load_config(overrides=FAST), run_id="reference")
    created = store.open_run(data, "reference").attrs["created"]
    handles = graph.submit_runs(client, [spec])
    assert handles[0].futures == {}  # nothing submitted
    (outcome,) = graph.collect(client, handles)
    assert outcome.status == "skipped"
    assert outcome.final_loss == pytest.approx(reference[0].final_loss)
    assert store.open_run(data, "reference").attrs["created"] == created


# --------------------------------------------------------------------------- robustness


def _kill_first_reconstruction(client, found: dict) -> None:
    """Kill (SIGKILL) the worker process running the first reconstruction it sees."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for address, keys in client.processing().items():
            if any(str(k).startswith("reconstruct_full") for k in keys):
                time.sleep(0.5)  # let it get going
                pid = client.run(os.getpid, workers=[address])[address]
                os.kill(pid, signal.SIGKILL)
                found.update(address=address, pid=pid)
                return
        time.sleep(0.05)


def test_a_killed_worker_is_replaced_and_the_run_is_complete_and_correct(
    client, reference, data: Path
) -> None:
    spec = graph.RunSpec(store=data, config=load_config(overrides=FAST), run_id="killed")
    handles = graph.submit_runs(client, [spec])
    found: dict = {}
    killer = threading.Thread(target=_kill_first_reconstruction, args=(client, found))
    killer.start()
    (outcome,) = graph.collect(client, handles)
    killer.join()
    assert found, "no reconstruction was seen running"
    with pytest.raises(ProcessLookupError):
        os.kill(found["pid"], 0)  # really dead
    assert outcome.status == "complete", outcome.reason
    attrs = store.open_run(data, "killed").attrs
    assert attrs["status"] == "complete"
    assert attrs["workers"]["full"] != found["address"]  # rerun on another worker
    # same data, same config, same seeds: the same result as the undisturbed run
    ref = store.open_run(data, "reference").load()
    got = store.open_run(data, "killed").load()
    np.testing.assert_allclose(got["object"].values, ref["object"].values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["frc"].values, ref["frc"].values, atol=1e-6)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_failures_are_recorded_and_the_other_runs_finish(
    client, data: Path, tmp_path: Path
) -> None:
    corrupt = make_corrupt_store(tmp_path / "corrupt.zarr")
    diverging = make_nan_store(tmp_path / "nan.zarr", like=data)
    cfg = load_config(overrides=[*FAST, "train.epochs=3"])
    # a stale complete run "other": force makes the graph delete and redo it
    store.write_run(data, "other", xr.Dataset(), attrs={"stale": True})
    store.mark_run(data, "other", "complete")
    specs = [
        graph.RunSpec(store=corrupt, config=cfg, run_id="r1"),
        graph.RunSpec(store=diverging, config=cfg, run_id="r1"),
        graph.RunSpec(store=data, config=cfg, run_id="other", frc=False, force=True),
        graph.RunSpec(
            store=data,
            config=load_config(overrides=[*FAST, "performance.memory_fraction=1e-9"]),
            run_id="cannot-fit",
            frc=False,
        ),
    ]
    bad, nan, good, too_big = graph.run_graph(client, specs)

    assert bad.status == "failed" and bad.stage == "prepare"
    assert "zarr" in bad.reason.lower() and not bad.recorded
    assert [p.name for p in corrupt.iterdir()] == ["zarr.json"]  # nothing written into it

    assert nan.status == "failed" and nan.recorded
    assert nan.stage in ("full", "half_a", "half_b")
    assert "ReconstructionFailed" in nan.reason and "nan" in nan.reason
    (run,) = store.list_runs(diverging)
    assert run["status"] == "failed" and run["reason"] == nan.reason

    assert good.status == "complete", good.reason
    attrs = store.open_run(data, "other").attrs
    assert attrs["status"] == "complete" and attrs["frc_requested"] is False
    assert "stale" not in attrs and attrs["epochs"] == 3
    assert "frc" not in store.open_run(data, "other")
    other = next(r for r in store.list_runs(data) if r["run_id"] == "other")
    assert other["subgroups"] == []

    # the memory plan refuses in `run` as in `reconstruct`: before training, with the reason
    assert too_big.status == "failed" and too_big.recorded, too_big
    assert "plan needs" in too_big.reason and "usable" in too_big.reason
    assert store.open_run(data, "cannot-fit").attrs["status"] == "failed"
    # every lock released, failed runs' too
    for path, run_id in ((diverging, "r1"), (data, "other"), (data, "cannot-fit")):
        assert runlock.read_run_lock(path, run_id) is None, (path, run_id)


def test_a_rerun_of_an_interrupted_run_reuses_the_parts_it_wrote(client, data: Path) -> None:
    """A run left "running" (its driver died after the reconstruction was written) is
    finished by running it again: the written part is reused when nothing it depends on
    changed, and reconstructed again when something did."""
    cfg = load_config(overrides=[*FAST, "train.epochs=3"])
    spec = graph.RunSpec(store=data, config=cfg, run_id="interrupted", frc=False)
    (first,) = graph.run_graph(client, [spec])
    assert first.status == "complete", first.reason
    record = store.read_part(data, "interrupted")
    assert record["result"]["epochs"] == 3 and record["fingerprint"]
    store.mark_run(data, "interrupted", "running")  # as a driver killed mid-write leaves it
    (again,) = graph.run_graph(client, [spec])
    assert again.status == "complete", again.reason
    attrs = store.open_run(data, "interrupted").attrs
    assert attrs["reused_parts"] == ["full"] and attrs["epochs"] == 3
    assert again.final_loss == pytest.approx(first.final_loss)

    # same run id, another configuration: the part is not the one asked for, it is redone
    store.mark_run(data, "interrupted", "running")
    other = dataclasses.replace(spec, config=load_config(overrides=[*FAST, "train.epochs=2"]))
    (redone,) = graph.run_graph(client, [other])
    assert redone.status == "complete", redone.reason
    attrs = store.open_run(data, "interrupted").attrs
    assert "reused_parts" not in attrs and attrs["epochs"] == 2
    assert store.open_run(data, "interrupted").sizes["epoch"] == 2
    assert store.read_part(data, "interrupted")["result"]["epochs"] == 2


# --------------------------------------------------------------------------- one writer per run


def test_a_run_locked_by_another_driver_fails_at_once_unrecorded(client, data: Path) -> None:
    lock = runlock.run_lock_path(data, "locked")
    holder = {"host": "elsewhere.example.org", "pid": os.getppid(), "user": "someone"}
    lock.write_text(json.dumps(holder))
    try:
        spec = graph.RunSpec(store=data, config=load_config(overrides=FAST), run_id="locked")
        handles = graph.submit_runs(client, [spec])
        assert handles[0].futures == {}  # nothing submitted
        (outcome,) = graph.collect(client, handles)
        assert outcome.status == "failed" and outcome.stage == "lock" and not outcome.recorded
        assert f"pid {os.getppid()} on host elsewhere.example.org" in outcome.reason
        assert "locked" not in {r["run_id"] for r in store.list_runs(data)}
        assert json.loads(lock.read_text()) == holder  # not stolen, not released
    finally:
        lock.unlink()


def test_two_drivers_of_one_run_id_at_once_one_wins(client, data: Path) -> None:
    """Two drivers (threads here, with their own lock each) start the same run together."""
    spec = graph.RunSpec(
        store=data, config=load_config(overrides=[*FAST, "train.epochs=3"]), run_id="twice",
        frc=False,
    )  # fmt: skip
    barrier = threading.Barrier(2)
    outcomes: list[graph.RunOutcome] = []

    def drive() -> None:
        barrier.wait()
        outcomes.extend(graph.run_graph(client, [spec]))

    threads = [threading.Thread(target=drive) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winner, loser = sorted(outcomes, key=lambda o: o.status)
    assert (winner.status, loser.status) == ("complete", "failed"), outcomes
    assert loser.stage == "lock" and f"pid {os.getpid()} on host" in loser.reason
    assert not loser.recorded
    assert store.open_run(data, "twice").attrs["status"] == "complete"
    assert runlock.read_run_lock(data, "twice") is None


# --------------------------------------------------------------------------- pure pieces


def test_config_run_id_is_deterministic_and_sensitive() -> None:
    a = load_config(overrides=FAST)
    assert graph.config_run_id(a) == graph.config_run_id(load_config(overrides=FAST))
    assert graph.config_run_id(a).startswith("cfg-")
    b = load_config(overrides=[*FAST, "model.first_omega=90"])
    assert graph.config_run_id(a) != graph.config_run_id(b)
    assert graph.config_run_id(a) != graph.config_run_id(a, frc=False)


def _outcome(store_name: str, res: float, loss: float, status: str = "complete", **kw):
    return graph.RunOutcome(
        store=Path(store_name), run_id="r", status=status, resolution=res, final_loss=loss, **kw
    )


def test_best_is_finest_resolution_then_lowest_loss() -> None:
    nan = math.nan
    outcomes = [
        _outcome("a", 20e-9, 0.1),
        _outcome("a", 10e-9, 0.5),  # best of a: finest resolution
        _outcome("a", 5e-9, 0.01, status="failed"),  # failed runs are never best
        _outcome("b", nan, 0.3),
        _outcome("b", nan, 0.2),  # best of b: no resolution anywhere -> lowest loss
        _outcome("c", 10e-9, 0.3),
        _outcome("c", 10e-9, 0.2),  # tie -> lowest loss
        _outcome("c", nan, 0.01, resolved_to_nyquist=False),
        _outcome("d", 10e-9, 0.1),
        _outcome("d", nan, 0.9, resolved_to_nyquist=True, pixel_size=8e-9),  # <= 8 nm
    ]
    assert graph.best_per_dataset(outcomes) == {1, 4, 6, 9}


def test_scan_summary_has_a_dim_per_grid_key(tmp_path: Path) -> None:
    grid = [("model.first_omega", [30.0, 90.0]), ("train.lr_object", [1e-3])]
    stores = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    outcomes = []
    for s in stores:
        for omega in (30.0, 90.0):
            label = (("model.first_omega", omega), ("train.lr_object", 1e-3))
            outcomes.append(
                graph.RunOutcome(
                    store=s,
                    run_id=f"{s.stem}-{omega}",
                    status="failed" if (s.stem, omega) == ("b", 90.0) else "complete",
                    resolution=omega * 1e-9,
                    resolution_unit="m",
                    final_loss=1 / omega,
                    wall_seconds=1.0,
                    label=label,
                )
            )
    ds = graph.scan_summary(outcomes, stores, grid)
    assert ds["resolution"].dims == ("dataset", "model.first_omega", "train.lr_object")
    assert list(ds["dataset"].values) == ["a", "b"]
    assert ds["resolution"].attrs["units"] == "m"
    sel = {"model.first_omega": 90.0, "train.lr_object": 1e-3}
    assert ds["status"].sel(dataset="b", **sel).item() == "failed"
    assert ds["resolution"].sel(dataset="a", **sel).item() == pytest.approx(90e-9)
    assert ds["best"].sum().item() == 2
    assert bool(ds["best"].sel(dataset="a", **{**sel, "model.first_omega": 30.0}))
    paths = graph.save_summary(ds, tmp_path / "out")
    assert paths["csv"].read_text().count("\n") == 5  # header + 4 runs


# --------------------------------------------------------------------------- SLURM


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_run_on_slurm_gpu_workers_records_their_job_ids(data: Path, tmp_path: Path) -> None:
    """On the single-node test SLURM (2 fake GPUs): reconstructions ask for GPU=1, each
    worker is a SLURM job, and the run records the jobs that ran it."""
    from ptyinr.cluster import connect, task_resources

    spec = graph.RunSpec(store=data, config=load_config(overrides=FAST), run_id="on-slurm")
    with connect(
        "slurm:local-test", log_dir=tmp_path / "logs", minimum_jobs=2, maximum_jobs=2,
        dashboard_address=":0", quiet=True,
    ) as client:  # fmt: skip
        assert task_resources(client) == {"GPU": 1}
        (outcome,) = graph.run_graph(client, [spec])
    assert outcome.status == "complete", outcome.reason
    attrs = store.open_run(data, "on-slurm").attrs
    assert attrs["slurm_job_ids"] and all(j.isdigit() for j in attrs["slurm_job_ids"])
    assert attrs["status"] == "complete"
