"""Real runs against the single-node test SLURM (slurm/local, 2 fake GPUs): `ptyinr run
--cluster slurm:local-test` from a shell, with its worker jobs killed mid-training;
`ptyinr submit run` whose driver job is cancelled mid-training and then resubmitted, which
resumes from the checkpoint in the store and ends where an uninterrupted run ends.

Skipped, with the reason, where the SLURM packages are absent (tests/slurm_support.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from slurm_support import queued_job_ids, wait_for_state
from tiny import TINY_MODEL
from typer.testing import CliRunner

from ptyinr import store
from ptyinr.config import load_config
from ptyinr.reconstruct import checkpoint_path, reconstruct_store
from ptyinr.simulate import SimulationConfig, write_simulated_store

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
FAST = [
    *TINY_MODEL,
    "train.batch_size=32",  # several steps per epoch: checkpoints fall inside training
]


def make_store(path: Path) -> Path:
    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, seed=0)
    return write_simulated_store(path, sim)


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def checkpoint_epoch(path: Path) -> int:
    """Epoch of a checkpoint (a Zarr group checkpoints/<run_id>/<part>), 0 when none."""
    from ptyinr.engines.base import checkpoint_epoch as epoch

    return epoch(path)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the run ended first:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def finite(value: object) -> bool:
    try:
        return bool(np.isfinite(float(value)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def running_workers() -> list[str]:
    proc = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-n", "ptyinr-worker", "-o", "%i"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout.split()


def test_cli_run_on_slurm_workers_replaces_killed_workers(tmp_path: Path) -> None:
    """`ptyinr run --cluster slurm:local-test` (a subprocess, as a user runs it) completes a
    run with FRC halves on worker jobs; killing every worker job mid-training (preemption)
    costs a restart from the checkpoints, not the run."""
    data = make_store(tmp_path / "scan.zarr")
    overrides = [*FAST, "train.epochs=150", "train.checkpoint_every=20"]
    cmd = [sys.executable, "-m", "ptyinr.cli.main", "run", str(data),
           "--cluster", "slurm:local-test", "--run-id", "onslurm", "--quiet",
           *set_args(overrides)]  # fmt: skip
    env = {**os.environ, "PTYINR_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        ckpts = data / "checkpoints" / "onslurm"
        wait_for(
            lambda: ckpts.is_dir() and any(checkpoint_epoch(p) > 0 for p in ckpts.iterdir()),
            150,
            "a first checkpoint",
            proc,
        )
        killed = running_workers()
        assert killed, "no running worker job while training"
        subprocess.run(["scancel", *killed], check=True)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    attrs = store.open_run(data, "onslurm").attrs
    assert attrs["status"] == "complete"
    jobs = attrs["slurm_job_ids"]
    assert jobs and all(j.isdigit() for j in jobs)
    assert set(jobs) - set(killed), (jobs, killed)  # replacement workers finished the work
    # the part(s) interrupted with a checkpoint continued from it
    assert attrs["resumed_from_epoch"] and all(e > 0 for e in attrs["resumed_from_epoch"].values())
    assert finite(attrs["resolution"]) or attrs["resolved_to_nyquist"]
    for part in ("half_a", "half_b"):
        assert store.open_run(data, "onslurm", part)["loss"].size == 150
    assert store.open_run(data, "onslurm")["loss"].size == 150
    assert not ckpts.exists()  # removed once the run is complete
    for job in jobs:
        assert (tmp_path / "logs" / f"ptyinr-worker-{job}.log").exists()


def submit(tmp_path: Path, data: Path, overrides: list[str]) -> tuple[str, Path]:
    from ptyinr.cli.main import app

    log_dir = tmp_path / "logs"
    result = CliRunner().invoke(
        app,
        ["submit", "run", "--profile", "local-test", "--log-dir", str(log_dir),
         "--workdir", str(tmp_path), "--job-name", "resume", "--",
         str(data), "--run-id", "resumed", "--no-frc", "--quiet", *set_args(overrides)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    words = result.output.split()
    job_id = words[words.index("job") + 1]
    assert job_id.isdigit()
    log_path = log_dir / f"ptyinr-resume-{job_id}.log"
    assert str(log_path) in result.output.replace("\n", "")
    return job_id, log_path


def test_submitted_run_resumes_after_its_driver_was_cancelled(tmp_path: Path) -> None:
    """`ptyinr submit run` -> scancel of the driver mid-training leaves a checkpoint in the
    store; the same submission again continues from it, completes, and its object equals the
    object of an uninterrupted run of the same configuration."""
    data = make_store(tmp_path / "scan.zarr")
    epochs = 200
    overrides = [*FAST, f"train.epochs={epochs}", "train.checkpoint_every=40"]
    ckpt = checkpoint_path(data, "resumed", "full")

    driver, log1 = submit(tmp_path, data, overrides)
    try:
        wait_for(lambda: checkpoint_epoch(ckpt) > 0, 150, "a checkpoint of the submitted run")
    finally:
        subprocess.run(["scancel", driver], check=False)
    assert wait_for_state(driver, {"CANCELLED"}, 30) == "CANCELLED"
    assert f"ptyinr driver: job {driver}" in log1.read_text()
    # its worker jobs go down with it (tagged with the driver's id)
    tagged = f"ptyinr-driver-{driver}"

    def workers_gone() -> bool:
        proc = subprocess.run(["squeue", "-h", "-o", "%k"], capture_output=True, text=True)
        return tagged not in proc.stdout

    wait_for(workers_gone, 30, "the cancelled driver's workers to leave")
    assert store.open_run(data, "resumed").attrs["status"] == "running"
    stopped_at = checkpoint_epoch(ckpt)
    assert 0 < stopped_at < epochs

    again, log2 = submit(tmp_path, data, overrides)
    state = wait_for_state(again, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    assert state == "COMPLETED", log2.read_text() if log2.exists() else state
    assert f"ptyinr driver: job {again}" in log2.read_text()
    run = store.open_run(data, "resumed").load()
    assert run.attrs["status"] == "complete"
    assert run.attrs["resumed_from_epoch"] == {"full": stopped_at}
    assert run.attrs["epochs"] == epochs and run["loss"].size == epochs
    assert not ckpt.exists()

    threads = torch.get_num_threads()
    try:
        _, reference = reconstruct_store(
            data, load_config(overrides=overrides), run_id="uninterrupted", progress=False
        )
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(run["y"].values, reference.object["y"].values)
    np.testing.assert_array_equal(run["x"].values, reference.object["x"].values)
    np.testing.assert_allclose(run["loss"].values, reference.loss.values, rtol=1e-4)
    np.testing.assert_allclose(run["object"].values, reference.object.values, atol=1e-4)
    assert not queued_job_ids("ptyinr-resume")
