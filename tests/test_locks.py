"""One writer per run: the run lock (ptyinr.runlock) as `ptyinr run` takes it, and a run whose
driver is killed mid-write, finished by running it again.

The lock is a file beside the store, `.<store>.<run_id>.lock`, holding {host, pid, user, ...}
of the driver that writes the run; a second driver of the same run fails at once naming the
holder, and a lock whose holder is gone is taken over.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from ptyinr import runlock, store
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
FOREIGN = "elsewhere.example.org"


def make_store(path: Path, seed: int = 0) -> Path:
    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, seed=seed)
    return write_simulated_store(path, sim)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("template") / "scan.zarr")


@pytest.fixture
def data(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a tiny simulated scan store."""
    import shutil

    return Path(shutil.copytree(template, tmp_path / "scan.zarr"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_lock(data: Path, run_id: str, *, host: str, pid: int, age_s: float = 0.0) -> Path:
    lock = runlock.run_lock_path(data, run_id)
    holder = {"host": host, "pid": pid, "user": "someone", "started": "2026-01-01T00:00:00"}
    lock.write_text(json.dumps({**holder, "token": "fake"}))
    if age_s:
        then = time.time() - age_s
        os.utime(lock, (then, then))
    return lock


# --------------------------------------------------------------------------- the lock itself


def test_lock_is_exclusive_and_released_only_by_its_holder(data: Path) -> None:
    lock = runlock.acquire_run_lock(data, "r1")
    assert lock.path == data.parent / ".scan.zarr.r1.lock" and lock.taken_over is None
    holder = runlock.read_run_lock(data, "r1")
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert {"user", "started", "token"} <= set(holder)
    # the same process again (a second driver in it, or the same run twice in one call)
    with pytest.raises(runlock.RunLocked, match=f"pid {os.getpid()} on host"):
        runlock.acquire_run_lock(data, "r1")
    with runlock.acquire_run_lock(data, "r2"):  # another run id: its own lock
        assert runlock.read_run_lock(data, "r2") is not None
    assert runlock.read_run_lock(data, "r2") is None
    lock.release()
    assert runlock.read_run_lock(data, "r1") is None and not lock.path.exists()
    # a release after a takeover leaves the new holder's lock alone
    lock = runlock.acquire_run_lock(data, "r1")
    lock.path.unlink()
    other = fake_lock(data, "r1", host=FOREIGN, pid=1)
    lock.release()
    assert other.exists()
    with pytest.raises(store.StoreError, match="run_id"):
        runlock.run_lock_path(data, "../x")


def test_a_live_holder_keeps_its_lock_a_dead_one_is_taken_over(data: Path) -> None:
    # a live process on this host (the test's parent) and one on another host: held
    live = fake_lock(data, "r", host=socket.gethostname(), pid=os.getppid())
    before = live.read_text()
    with pytest.raises(runlock.RunLocked) as err:
        runlock.acquire_run_lock(data, "r")
    assert f"pid {os.getppid()} on host {socket.gethostname()}" in str(err.value)
    assert err.value.holder["pid"] == os.getppid()
    assert live.read_text() == before  # not stolen
    foreign = fake_lock(data, "r", host=FOREIGN, pid=dead_pid())  # cannot be checked there
    before = foreign.read_text()
    with pytest.raises(runlock.RunLocked, match=f"host {FOREIGN}"):
        runlock.acquire_run_lock(data, "r")
    assert foreign.read_text() == before

    # a dead process on this host: stale, taken over with a note
    gone = dead_pid()
    fake_lock(data, "r", host=socket.gethostname(), pid=gone)
    lock = runlock.acquire_run_lock(data, "r")
    assert lock.taken_over["holder"]["pid"] == gone
    assert f"process {gone} is gone" in lock.taken_over["reason"]
    assert runlock.read_run_lock(data, "r")["pid"] == os.getpid()
    lock.release()

    # a reused pid (same pid, later start) is gone too
    fake_lock(data, "r", host=socket.gethostname(), pid=os.getppid())
    holder = json.loads(runlock.run_lock_path(data, "r").read_text())
    runlock.run_lock_path(data, "r").write_text(json.dumps({**holder, "pid_start": "1"}))
    with runlock.acquire_run_lock(data, "r") as lock:
        assert "another process" in lock.taken_over["reason"]


def test_a_lock_nobody_refreshes_goes_stale_after_the_timeout(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_lock(data, "r", host=FOREIGN, pid=1, age_s=3600)
    with pytest.raises(runlock.RunLocked):
        runlock.acquire_run_lock(data, "r")  # default: 24 h
    with runlock.acquire_run_lock(data, "r", timeout_s=600) as lock:
        assert "not refreshed for" in lock.taken_over["reason"]
        then = time.time() - 3600
        os.utime(lock.path, (then, then))
        lock.refresh()  # the holder's heartbeat
        assert time.time() - lock.path.stat().st_mtime < 60
    fake_lock(data, "r", host=FOREIGN, pid=1, age_s=3600)
    monkeypatch.setenv("PTYINR_RUN_LOCK_TIMEOUT", "1800")
    assert runlock.lock_timeout_s() == 1800
    with runlock.acquire_run_lock(data, "r") as lock:
        assert lock.taken_over is not None
    monkeypatch.setenv("PTYINR_RUN_LOCK_TIMEOUT", "soon")
    with pytest.raises(store.StoreError, match="PTYINR_RUN_LOCK_TIMEOUT"):
        runlock.lock_timeout_s()


def test_an_unreadable_lock_is_held_while_young_then_stale(data: Path) -> None:
    lock = runlock.run_lock_path(data, "r")
    lock.write_text("")  # created, its JSON not written yet
    with pytest.raises(runlock.RunLocked, match="writing its lock"):
        runlock.acquire_run_lock(data, "r")
    then = time.time() - 120
    os.utime(lock, (then, then))
    with runlock.acquire_run_lock(data, "r") as held:
        assert "unreadable" in held.taken_over["reason"]


def _contender(path: str, run_id: str, barrier, results) -> None:
    barrier.wait()
    try:
        lock = runlock.acquire_run_lock(path, run_id)
    except runlock.RunLocked:
        results.put("lost")
        return
    results.put("won" if lock.taken_over is None else "took over")
    time.sleep(1.0)  # hold it while the others try


@pytest.mark.parametrize("stale", [False, True])
def test_racing_processes_one_wins(data: Path, stale: bool) -> None:
    """Four processes at once, on a free lock or on a stale one: exactly one holds it."""
    if stale:
        fake_lock(data, "r", host=socket.gethostname(), pid=dead_pid())
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_contender, args=(str(data), "r", barrier, results)) for _ in "abcd"
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got == ["lost", "lost", "lost", "took over" if stale else "won"]
    assert not runlock.run_lock_path(data, "r").with_name(".scan.zarr.r.lock.takeover").exists()


def test_zarr_and_the_store_functions_never_see_the_lock(data: Path) -> None:
    store.write_run(data, "r", xr.Dataset({"a": ("i", np.arange(3))}), attrs={})
    store.write_run(data, "r", xr.Dataset({"a": ("i", np.arange(3))}), attrs={}, subgroup="half_a")
    with runlock.acquire_run_lock(data, "r"), runlock.acquire_run_lock(data, "other"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "not recognized as a component" would raise
            ds = store.open_scan_store(data)
            assert "intensities" in ds
            xr.open_zarr(data, consolidated=False, zarr_format=3)
            xr.open_zarr(data, group="reconstructions/r", consolidated=False, zarr_format=3)
            root = zarr.open_group(str(data), mode="r")
            names = [name for name, _ in root.members(max_depth=None)]
            assert not [n for n in names if "lock" in n]
            (run,) = store.list_runs(data)
            assert run["run_id"] == "r" and run["subgroups"] == ["half_a"]
            store.open_run(data, "r", "half_a").load()
        assert not [p for p in data.rglob("*") if "lock" in p.name]  # nothing inside the store
        store.delete_run(data, "r")  # --force deletes the run group: the lock stays
        assert runlock.read_run_lock(data, "r") is not None


# --------------------------------------------------------------------------- ptyinr run


runner = CliRunner()


def invoke(*args: str):
    from ptyinr.cli.main import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_run_locked_by_another_driver_fails_then_a_stale_lock_is_taken_over(data: Path) -> None:
    args = ["run", data, *SETS, "--no-frc", "--run-id", "R", "--cluster", "local"]
    args += ["--workers", "1"]
    lock = fake_lock(data, "R", host=FOREIGN, pid=os.getppid())
    held = lock.read_text()
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"pid {os.getppid()} on host {FOREIGN}" in text, result.output
    assert "failed scan.zarr R at lock" in text  # the display's line; the table has it too
    assert store.list_runs(data) == []  # nothing written: the run is the holder's
    assert lock.read_text() == held

    gone = dead_pid()
    fake_lock(data, "R", host=socket.gethostname(), pid=gone)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "took over a stale lock" in result.output
    attrs = store.open_run(data, "R").attrs
    assert attrs["status"] == "complete"
    assert attrs["lock_taken_over"]["holder"]["pid"] == gone
    assert "is gone" in attrs["lock_taken_over"]["reason"]
    assert runlock.read_run_lock(data, "R") is None  # released when the run completed


def _run_attrs(data: Path, run_id: str) -> dict:
    try:
        meta = json.loads((data / "reconstructions" / run_id / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta.get("attributes", {})


def _part_written(data: Path, run_id: str) -> bool:
    """Whether the full reconstruction's record (`store.mark_part`) is there."""
    try:
        meta = json.loads((data / "reconstructions" / run_id / "object" / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return store.PART_RECORD in meta.get("attributes", {})


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its LocalCluster's workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.mark.slow
def test_a_killed_driver_leaves_the_run_running_and_a_rerun_completes_it(data: Path) -> None:
    """SIGKILL of `ptyinr run` (and its local workers) while it writes results: the run stays
    "running"; the same command again takes the stale lock over, reuses the reconstruction
    that was completely written, resumes the others from their checkpoints
    (train.checkpoint_every) and completes the run with every array."""
    cmd = [sys.executable, "-m", "ptyinr", "run", str(data), "--run-id", "R"]
    cmd += ["--cluster", "local", "--workers", "1", "--quiet", *SETS]
    cmd += ["--set", "train.epochs=30", "--set", "train.checkpoint_every=20"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    try:
        # kill mid-run: the full reconstruction is completely written, the rest is not
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if _part_written(data, "R") and _run_attrs(data, "R").get("status") == "running":
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0].decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        _kill_group(proc)
    time.sleep(0.5)
    assert _run_attrs(data, "R").get("status") == "running"
    store.open_scan_store(data)  # the store opens
    (run,) = store.list_runs(data)
    assert run["status"] == "running"
    assert runlock.read_run_lock(data, "R")["pid"] == proc.pid  # left behind, now stale

    again = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    try:
        out = again.communicate(timeout=300)[0].decode()
    finally:
        _kill_group(again)
    assert again.returncode == 0, out
    (run,) = store.list_runs(data)
    assert run["status"] == "complete" and run["subgroups"] == ["half_a", "half_b"]
    assert run["lock_taken_over"]["holder"]["pid"] == proc.pid
    ds = store.open_run(data, "R").load()
    for name in ("object", "probe", "loss", "frc", "half_bit_threshold"):
        assert name in ds, name
    assert ds.sizes["epoch"] == 30 and np.isfinite(ds["object"].values).all()
    assert "full" in run["reused_parts"]  # the finished part was not trained again
    for half in ("half_a", "half_b"):
        assert np.isfinite(store.open_run(data, "R", half)["object"].values).all()
    assert runlock.read_run_lock(data, "R") is None
