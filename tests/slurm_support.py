"""pytest support for tests marked `slurm`: a real single-node SLURM on localhost.

The session fixture `local_slurm` starts slurm/local/start.sh once (all state under
$PTYINR_SLURM_ROOT, default /tmp/ptyinr-slurm), exports SLURM_CONF for the session and stops
the daemons at the end. Tests marked `slurm` get it automatically and are skipped, with the
reason, where the SLURM packages are absent or the tests do not run as root.

Several pytest sessions may share one test SLURM (engineers running tests at once): each
holds a shared lock on `$ROOT/users.lock` while it runs, and the last one out stops the
daemons, and only when a pytest session started them (`$ROOT/pytest-owned`), so a SLURM
started by hand is left running; the slurm tests themselves run one at a time
(`$ROOT/tests.lock`). PTYINR_SLURM_KEEP=1 keeps the SLURM running after the session.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "slurm" / "local"
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "munge")


@dataclass(frozen=True)
class LocalSlurm:
    """The running test SLURM: its state folder and config file."""

    root: Path
    conf: Path


def slurm_root() -> Path:
    """Folder of the test SLURM's state, logs, sockets and pid files."""
    return Path(os.environ.get("PTYINR_SLURM_ROOT", "/tmp/ptyinr-slurm"))


def slurm_skip_reason() -> str | None:
    """Why the slurm tests cannot run here, or None when they can."""
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        return (
            f"SLURM packages not installed ({', '.join(missing)} missing): "
            "run `bash slurm/local/install-packages.sh` "
            "(Debian packages slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        return "the single-node test SLURM runs its daemons as root; run the slurm tests as root"
    return None


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _running(root: Path) -> bool:
    return all(
        _alive(p)
        for p in (root / "run/slurmctld.pid", root / "run/slurmd.pid", root / "munge/munged.pid")
    )


def _script_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PTYINR_SLURM_ROOT": str(root)}


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[LocalSlurm]:
    """Start (or join) the test SLURM for this session; SLURM_CONF points at it meanwhile."""
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    root = slurm_root()
    root.mkdir(parents=True, exist_ok=True)
    owned = root / "pytest-owned"
    with open(root / "start.lock", "w") as start_lock:
        fcntl.flock(start_lock, fcntl.LOCK_EX)
        users = open(root / "users.lock", "w")  # held (shared) for the whole session
        fcntl.flock(users, fcntl.LOCK_SH)
        if not _running(root):
            proc = subprocess.run(
                ["bash", str(LOCAL / "start.sh")],
                env=_script_env(root),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                users.close()
                pytest.fail(f"the test SLURM did not start:\n{proc.stdout}\n{proc.stderr}")
            owned.touch()
    conf = root / "slurm.conf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        try:
            yield LocalSlurm(root=root, conf=conf)
        finally:
            _leave(root, users, owned)


def _leave(root: Path, users: IO[str], owned: Path) -> None:
    """Release this session's hold; stop the daemons if it was the last pytest user."""
    with open(root / "start.lock", "w") as start_lock:
        fcntl.flock(start_lock, fcntl.LOCK_EX)
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            users.close()
            return  # another session still uses it
        try:
            if owned.exists() and os.environ.get("PTYINR_SLURM_KEEP") != "1":
                subprocess.run(
                    ["bash", str(LOCAL / "stop.sh")],
                    env=_script_env(root),
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                owned.unlink(missing_ok=True)
        finally:
            users.close()


@pytest.fixture(autouse=True)
def _slurm_for_marked_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked `slurm` get the session SLURM (or are skipped with the reason), one test
    at a time across sessions: they count on the node's 2 fake GPUs being theirs."""
    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    slurm: LocalSlurm = request.getfixturevalue("local_slurm")
    with open(slurm.root / "tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------- helpers for tests


def job_state(job_id: str) -> str | None:
    """SLURM state of a job (PENDING, RUNNING, COMPLETED, CANCELLED, ...), None if unknown."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False
    )
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def wait_for_state(job_id: str, states: set[str], timeout: float = 60.0) -> str:
    """Poll until the job reaches one of STATES; the last state seen otherwise (no raise)."""
    deadline = time.monotonic() + timeout
    state = job_state(job_id)
    while state not in states and time.monotonic() < deadline:
        time.sleep(0.25)
        state = job_state(job_id)
    return state or "UNKNOWN"


def queued_job_ids(name_prefix: str = "") -> list[str]:
    """Ids of this user's queued or running jobs whose name starts with NAME_PREFIX."""
    proc = subprocess.run(
        ["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=False
    )
    out = []
    for line in proc.stdout.splitlines():
        job_id, _, name = line.partition(" ")
        if name.startswith(name_prefix):
            out.append(job_id)
    return out
