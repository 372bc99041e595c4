"""Against the real single-node SLURM (slurm/local): workers are SLURM jobs with a (fake) GPU,
a worker killed with scancel is replaced, driver scripts run under sbatch, status and cancel.

Skipped, with the reason, where the SLURM packages are absent (tests/slurm_support.py).
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from slurm_support import job_state, queued_job_ids, wait_for_state
from typer.testing import CliRunner

from ptyinr.cluster import connect, slurm_job_ids, task_resources
from ptyinr.jobscript import DriverJob, driver_job, render_driver_script, submit_driver

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def wait_for_new_worker(client: object, old: set[str], timeout: float = 120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = slurm_job_ids(client)
        if ids and not set(ids) & old:
            return ids
        time.sleep(0.5)
    raise AssertionError(f"no replacement worker within {timeout} s (old jobs {old})")


def test_gpu_task_on_a_slurm_worker_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    def gpu_task() -> dict[str, str | None]:
        """What a reconstruction task would see on its worker. Defined here, not at module
        level, so it travels by value: worker jobs cannot import tests/."""
        return {
            "job": os.environ.get("SLURM_JOB_ID"),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": os.environ.get("SLURM_JOB_GPUS"),
        }

    logs = tmp_path / "worker logs"
    with connect(
        "slurm:local-test", log_dir=logs, minimum_jobs=1, maximum_jobs=2,
        dashboard_address=":0", quiet=True,
    ) as client:  # fmt: skip
        resources = task_resources(client)
        assert resources == {"GPU": 1}  # known from the profile before any worker is up
        first = client.submit(gpu_task, resources=resources, pure=False).result(timeout=120)
        job = first["job"]
        assert job is not None and job.isdigit()
        assert job in slurm_job_ids(client)
        assert first["gpu"] in {"0", "1"}  # SLURM gave the job one of the node's fake GPUs
        assert first["gpus"] == first["gpu"]
        assert job_state(job) == "RUNNING"
        assert (logs / f"ptyinr-worker-{job}.log").exists()

        # Kill every worker job, as preemption would; adaptive scaling brings a new one.
        old = set(slurm_job_ids(client))
        subprocess.run(["scancel", *old], check=True)
        for old_job in old:
            assert wait_for_state(old_job, {"CANCELLED", "COMPLETED"}, 30) in {
                "CANCELLED",
                "COMPLETED",
            }
        new = wait_for_new_worker(client, old)
        second = client.submit(gpu_task, resources=resources, pure=False).result(timeout=120)
        assert second["job"] in new and second["job"] not in old
    # Closing the cluster cancels its worker jobs.
    deadline = time.monotonic() + 30
    while set(queued_job_ids("ptyinr-worker")) & set(new) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(queued_job_ids("ptyinr-worker")) & set(new)


def test_submitted_driver_script_completes(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    log_dir = tmp_path / f"logs 'q' $(touch {canary}) ; `touch {canary}` #x"
    job = driver_job("run", [], "local-test", log_dir=log_dir, workdir=tmp_path,
                     env={"NOTE": f"$(touch {canary})"})  # fmt: skip
    # A trivial command in place of a real run: list the profiles, then exit 0.
    job = replace(job, args=("profiles",))
    job_id, script_path, log_path = submit_driver(job)
    assert script_path.parent == log_dir and script_path.read_text() == render_driver_script(job)
    assert wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 120) == "COMPLETED"
    # sbatch read the quoted --output: the log landed in the odd folder, with the job id.
    assert log_path == log_dir / f"ptyinr-run-{job_id}.log"
    text = log_path.read_text()
    assert f"ptyinr driver: job {job_id}" in text
    assert "local-test" in text and "gpu-node" in text
    assert not canary.exists()


def _sleeper(tmp_path: Path) -> Path:
    """A stand-in 'python' that just waits, so a job stays RUNNING until cancelled."""
    path = tmp_path / "sleeper"
    path.write_text("#!/bin/sh\nexec sleep 120\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_status_and_cancel_driver_with_its_workers(tmp_path: Path) -> None:
    from ptyinr.cli.main import app

    driver = DriverJob(
        args=("run",), log_dir=tmp_path, workdir=tmp_path, job_name="ptyinr-cancelme",
        time="00:05:00", memory="100M", python=str(_sleeper(tmp_path)),
    )  # fmt: skip
    driver_id, _, _ = submit_driver(driver)
    assert wait_for_state(driver_id, {"RUNNING"}, 60) == "RUNNING"
    # A worker job as the driver's SLURMCluster would tag it.
    worker = subprocess.run(
        ["sbatch", "--parsable", "--job-name=ptyinr-worker", f"--output={tmp_path}/w-%j.log",
         f"--comment=ptyinr-driver-{driver_id}", "--mem=100M", "--wrap", "exec sleep 120"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    unrelated = subprocess.run(
        ["sbatch", "--parsable", "--job-name=other", f"--output={tmp_path}/o-%j.log",
         "--mem=100M", "--wrap", "exec sleep 120"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        runner = CliRunner()
        status = runner.invoke(app, ["status"], terminal_width=200)
        assert status.exit_code == 0, status.output
        assert driver_id in status.output and "ptyinr-cancelme" in status.output
        assert worker in status.output and unrelated not in status.output

        refused = runner.invoke(app, ["cancel", f"{driver_id};id"])
        assert refused.exit_code == 2 and "job id" in refused.output

        cancelled = runner.invoke(app, ["cancel", driver_id])
        assert cancelled.exit_code == 0, cancelled.output
        assert worker in cancelled.output
        assert wait_for_state(driver_id, {"CANCELLED"}, 30) == "CANCELLED"
        assert wait_for_state(worker, {"CANCELLED"}, 30) == "CANCELLED"
        assert job_state(unrelated) in {"RUNNING", "PENDING"}
    finally:
        subprocess.run(["scancel", driver_id, worker, unrelated], check=False)


DRIVER = """\
import time
from ptyinr.cluster import connect, slurm_job_ids

# 3 worker jobs on a node with 2 (fake) GPUs: one of them stays PENDING.
with connect(
    "slurm:local-test", log_dir={log_dir!r}, minimum_jobs=3, maximum_jobs=3,
    dashboard_address=":0",
) as client:
    client.wait_for_workers(1, timeout=120)
    print("workers", slurm_job_ids(client), flush=True)
    time.sleep(600)
"""


def test_cancelled_driver_takes_its_workers_down(tmp_path: Path) -> None:
    """scancel of a driver (or its walltime) closes its SLURMCluster, which cancels its worker
    jobs, pending ones included: none is left to start later and wait for a dead scheduler."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(log_dir=str(tmp_path / "logs")))
    driver = subprocess.run(
        ["sbatch", "--parsable", "--job-name=ptyinr-drivertest", "--mem=500M",
         f"--output={tmp_path}/driver-%j.log", "--export=ALL,PTYINR_DRIVER=1",
         "--wrap", f"exec {shlex.quote(sys.executable)} {shlex.quote(str(script))}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        states: dict[str, str] = {}
        log = tmp_path / f"driver-{driver}.log"
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["squeue", "-h", "-o", "%i %T %k"], capture_output=True, text=True
            )
            states = {
                line.split()[0]: line.split()[1]
                for line in proc.stdout.splitlines()
                if line.endswith(f"ptyinr-driver-{driver}")  # tagged with their driver's id
            }
            running = log.exists() and "workers" in log.read_text()
            if running and sorted(states.values()) == ["PENDING", "RUNNING", "RUNNING"]:
                break
            time.sleep(0.5)
        assert sorted(states.values()) == ["PENDING", "RUNNING", "RUNNING"], states
        subprocess.run(["scancel", driver], check=True)
        for worker in states:  # well before the workers' own death timeout (30 s)
            assert wait_for_state(worker, {"CANCELLED", "COMPLETED"}, 15) in {
                "CANCELLED",
                "COMPLETED",
            }
    finally:
        subprocess.run(["scancel", driver], check=False)
