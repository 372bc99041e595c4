"""What the two progress reporters share: a duration in words, and the Dask worker (if any).

ptyinr.progress (long copies: ingest, preprocess) and ptyinr.events (reconstructions) are
independent modules of one layer and may not import each other; both say how long something
took or has left, and both behave differently inside a Dask worker's task (progress stays
silent there, events go to the scheduler through it). One definition of each, here.

Layer: below ptyinr.progress and ptyinr.events; it imports no other ptyinr module.
"""

from __future__ import annotations

import sys
from typing import Any


def format_seconds(seconds: float) -> str:
    """'4.2 s', '41 s', '3 min 05 s', '2 h 10 min' (tenths below 10 s: a short copy or a
    near ETA is not '0 s'); negative durations count as 0."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, s = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


def dask_worker() -> Any:
    """The Dask distributed worker whose task runs this code, or None (a plain process, a
    spawned rank, a thread of the worker that is not a task's)."""
    if "distributed" not in sys.modules:  # never imported: certainly not a worker
        return None
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def in_dask_worker() -> bool:
    """True inside a task on a Dask distributed worker: its stderr is a worker log or the
    driver's terminal, where a driver may draw its own display (ptyinr.graph)."""
    return dask_worker() is not None


__all__ = ["dask_worker", "format_seconds", "in_dask_worker"]
