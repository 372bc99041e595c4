"""One writer per run: the lock a `ptyinr run` / `scan` driver holds on a run of a scan store.

The lock is a file beside the store (`.<store name>.<run_id>.lock`), not inside it: Zarr warns
about every file it does not recognise inside a store, a copied store must not carry a lock,
and `--force` (which deletes the run group) must not remove it. It is created atomically
(O_EXCL) and holds JSON naming its holder (host, pid, the process's start time, user). It is
stale when the holder is gone (same host, pid dead or reused) or it has not been refreshed
for `lock_timeout_s()`; a stale lock is taken over under a short-lived guard file, so racing
takeovers have one winner.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import getpass
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptyinr import store
from ptyinr.errors import StoreError


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


#: A lock not refreshed for this long is stale whoever holds it (the holder's host may be
#: unreachable, so its process cannot be checked). Environment: PTYINR_RUN_LOCK_TIMEOUT (s).
RUN_LOCK_TIMEOUT_S = 24 * 3600.0
_LOCK_WRITE_GRACE_S = 30.0  # an empty / unreadable lock younger than this is being written


class RunLocked(StoreError):
    """The run is being written by another process: `holder` is its lock's content."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def run_lock_path(path: str | os.PathLike, run_id: str) -> Path:
    """`<store parent>/.<store name>.<run_id>.lock`: beside the store, never inside it.

    Inside, Zarr v3 would list the file as a member of its group and warn ("Object at ... is
    not recognized as a component of a Zarr hierarchy") on every open of the store, the
    reconstructions or the run; beside it, Zarr never sees it, `--force` (which deletes the
    run group) cannot remove it, and a copied store does not carry a lock along.
    """
    path = Path(path)
    store.check_run_id(run_id)
    return path.parent / f".{path.name}.{run_id}.lock"


def lock_timeout_s() -> float:
    """`RUN_LOCK_TIMEOUT_S`, or the environment's PTYINR_RUN_LOCK_TIMEOUT (seconds)."""
    raw = os.environ.get("PTYINR_RUN_LOCK_TIMEOUT")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise StoreError(
                f"PTYINR_RUN_LOCK_TIMEOUT={raw!r}; expected a number of seconds"
            ) from None
        if value > 0:
            return value
    return RUN_LOCK_TIMEOUT_S


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux: clock ticks since boot), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name (containers): the uid will do
        return str(os.getuid())


def _read_lock(lock: Path) -> tuple[dict[str, Any] | None, float] | None:
    """(holder or None when unreadable, mtime); None when there is no lock."""
    try:
        mtime = lock.stat().st_mtime
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return (holder if isinstance(holder, dict) else None), mtime


def describe_holder(holder: Mapping[str, Any]) -> str:
    """'pid 123 on host h (user u, since 2026-...)'."""
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    extra = [f"user {holder['user']}" if holder.get("user") else "", holder.get("started", "")]
    extra = [e if i == 0 else f"since {e}" for i, e in enumerate(extra) if e]
    return f"{text} ({', '.join(extra)})" if extra else text


def stale_reason(
    holder: Mapping[str, Any] | None, mtime: float, *, timeout_s: float | None = None
) -> str | None:
    """Why a lock is stale, or None while its holder may still be at work.

    Stale: its holder's process is gone (same host, pid not alive or reused by a process
    started later), or the lock was not refreshed for `timeout_s` (the holder refreshes it
    while it runs; a holder on another host cannot be checked otherwise), or it is unreadable
    and older than the few seconds its writing takes.
    """
    timeout = lock_timeout_s() if timeout_s is None else float(timeout_s)
    age = time.time() - mtime
    if holder is None:
        return f"unreadable lock, {age:.0f} s old" if age > _LOCK_WRITE_GRACE_S else None
    if age > timeout:
        return f"not refreshed for {age:.0f} s (timeout {timeout:.0f} s)"
    if holder.get("host") == socket.gethostname():
        try:
            pid = int(holder.get("pid"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return "lock names no process"
        if not _pid_alive(pid):
            return f"its process {pid} is gone"
        started = holder.get("pid_start")
        if started is not None and _process_start(pid) not in (None, started):
            return f"its process {pid} is gone (the pid now belongs to another process)"
    return None


def _create_lock(lock: Path, holder: dict[str, Any]) -> bool:
    """Create `lock` holding `holder` atomically; False when it exists already."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
        f.flush()
        os.fsync(f.fileno())
    return True


@dataclass
class RunLock:
    """A held run lock: `release` it when the run is over (complete or failed).

    `taken_over` is the stale lock it replaced (its holder and why it was stale), or None.
    """

    path: Path
    holder: dict[str, Any]
    taken_over: dict[str, Any] | None = None
    released: bool = False

    def refresh(self) -> None:
        """Show the holder is alive (the lock's mtime is its heartbeat)."""
        if not self.released:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if it is still ours (a takeover may have replaced it)."""
        if self.released:
            return
        self.released = True
        found = _read_lock(self.path)
        if found is not None and found[0] is not None:
            if found[0].get("token") == self.holder["token"]:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_run_lock(path: str | os.PathLike, run_id: str) -> dict[str, Any] | None:
    """The holder of a run's lock ({} when unreadable), or None when the run is not locked."""
    found = _read_lock(run_lock_path(path, run_id))
    return None if found is None else (found[0] or {})


def acquire_run_lock(
    path: str | os.PathLike, run_id: str, *, timeout_s: float | None = None
) -> RunLock:
    """Take the lock of `reconstructions/<run_id>` for this process, or raise `RunLocked`.

    The lock is a file created atomically (O_CREAT | O_EXCL) holding JSON {host, pid,
    pid_start, user, started, token, store, run_id}. A stale lock (`stale_reason`) is taken
    over: under a short-lived `.takeover` guard file, re-read, removed if unchanged, and
    created anew; `RunLock.taken_over` says whose it was and why. The lock is the process's
    that calls this (`ptyinr run`'s driver), released by `RunLock.release`.
    """
    path = Path(path)
    lock = run_lock_path(path, run_id)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "user": _user(),
        "started": _now(),
        "token": uuid.uuid4().hex,
        "store": str(path),
        "run_id": run_id,
    }
    taken_over = None
    for _ in range(5):
        if _create_lock(lock, holder):
            return RunLock(lock, holder, taken_over)
        found = _read_lock(lock)
        if found is None:
            continue  # released meanwhile: try again
        current, mtime = found
        reason = stale_reason(current, mtime, timeout_s=timeout_s)
        if reason is None:
            who = describe_holder(current) if current else "a process writing its lock"
            if current and current.get("host") != socket.gethostname():
                timeout = lock_timeout_s() if timeout_s is None else float(timeout_s)
                hint = (
                    "that host cannot be checked from here: if its process is gone, delete the "
                    f"lock, or it goes stale {timeout / 3600:.3g} h after its last refresh"
                )
            else:
                hint = "it is taken over once that process is gone"
            raise RunLocked(
                f"run {run_id!r} of {path} is being written by {who}; lock {lock} ({hint})",
                current,
            )
        if _take_over(lock, current, mtime):
            taken_over = {"holder": current or {}, "reason": reason}
    raise RunLocked(f"run {run_id!r} of {path}: lock {lock} keeps changing; try again")


def _take_over(lock: Path, seen: dict[str, Any] | None, seen_mtime: float) -> bool:
    """Remove the stale lock `seen`, unless it changed meanwhile; True when removed."""
    guard = lock.with_name(lock.name + ".takeover")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > _LOCK_WRITE_GRACE_S:
                guard.unlink()  # left by a process that died taking over
        time.sleep(0.05)
        return False
    os.close(fd)
    try:
        found = _read_lock(lock)
        if found is None:
            return False
        if found[0] != seen or (seen is None and found[1] != seen_mtime):
            return False  # somebody else's fresh lock: judge it again
        try:
            lock.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            guard.unlink()
