"""Progress of long copies (ingest, preprocess, archives) on stderr, never on stdout.

Why: an ingest of a 2 TB scan runs for an hour; whoever waits needs to see it move, and a
batch log needs a line now and then that says how far it got. On a terminal the progress
is a rich bar (done / total, rate, time left); anywhere else (a pipe, a file, a SLURM log)
it is one plain, timestamped line when the work starts, one every `PLAIN_EVERY_S` seconds
while it runs (whether or not it moved: a steady pace shows it is alive), and one at the
end. stdout stays for results, so `ptyinr ... > out.txt` or a `--csv -` is never mixed up.

Work is counted by `advance(n)` (thread-safe) or by `counted(array)`, which wraps a dask
array so that each block computed advances the count by its frames. The object pickles
to a silent stand-in, so a graph that carries it can still run on a distributed worker.

Layer: the lowest but one (with ptyinr.errors and ptyinr.events): it imports only
ptyinr.progress_common, so ingest and preprocess (independent modules of one layer) can both
use it.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import threading
import time
import uuid
from typing import Any, TextIO

from ptyinr.progress_common import format_seconds, in_dask_worker

PLAIN_EVERY_S = 10.0  # seconds between plain progress lines when stderr is not a terminal


def stderr_is_terminal() -> bool:
    """Whether progress should be drawn as a live bar (rich's notion of a terminal; rich is
    imported only when stderr is a tty at all, as it costs 50 ms per call otherwise)."""
    isatty = getattr(sys.stderr, "isatty", None)
    forced = "FORCE_TERMINAL" in os.environ or "TTY_COMPATIBLE" in os.environ  # rich's overrides
    if not forced and (isatty is None or not isatty()):
        return False
    from rich.console import Console

    return bool(Console(stderr=True).is_terminal)


class WorkProgress:
    """`done` of `total` units of one piece of work, shown on stderr while it runs.

    Use as a context manager. `enabled=False` shows nothing (counting still works); None
    shows it except inside a Dask worker's task. `terminal` forces the bar (True) or the
    plain lines (False); None asks stderr.
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "frames",
        *,
        enabled: bool | None = None,
        terminal: bool | None = None,
        stream: TextIO | None = None,
        every_s: float | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.enabled = (not in_dask_worker()) if enabled is None else bool(enabled)
        self.done = 0
        self._stream = stream
        self._every = PLAIN_EVERY_S if every_s is None else float(every_s)
        self._terminal = terminal
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.monotonic()
        self._id = uuid.uuid4().hex

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> WorkProgress:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stop(failed=exc_type is not None)

    def start(self) -> None:
        self._t0 = time.monotonic()
        if not self.enabled:
            return
        terminal = stderr_is_terminal() if self._terminal is None else self._terminal
        if terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = Console(file=self._stream, stderr=self._stream is None)
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total or None)
            return
        self._line(f"started: {self.total} {self.unit}")
        self._thread = threading.Thread(target=self._tick, name="ptyinr-progress", daemon=True)
        self._thread.start()

    def stop(self, failed: bool = False) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elapsed = format_seconds(time.monotonic() - self._t0)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            self._bar.stop()
            self._bar = None
            return
        if failed:
            self._line(f"stopped after {self.done}/{self.total} {self.unit}, {elapsed}")
        else:
            self._line(f"done: {self.done} {self.unit} in {elapsed}")

    # ---------------------------------------------------------------- counting

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += int(n)
            done = self.done
        bar = self._bar
        if bar is not None:
            bar.update(self._task, completed=done)

    def note(self, text: str) -> None:
        """One line of context (a dashboard link, a phase) on stderr, above any bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            self._line(text)

    def counted(self, array: Any) -> Any:
        """`array` (a dask array, frames along axis 0) whose blocks advance this count."""
        return array.map_blocks(
            _count_block,
            progress=self,
            dtype=array.dtype,
            meta=array._meta,
        )

    # ---------------------------------------------------------------- plain lines

    def _tick(self) -> None:
        while not self._stop.wait(self._every):
            self._line(self._status())

    def _status(self) -> str:
        elapsed = time.monotonic() - self._t0
        with self._lock:
            done = self.done
        text = f"{done}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100.0 * done / self.total:.0f}%)"
        if done and elapsed > 0:
            rate = done / elapsed
            text += f", {rate:.3g} {self.unit}/s"
            if self.total > done:
                text += f", about {format_seconds((self.total - done) / rate)} left"
        return text + f", {format_seconds(elapsed)} elapsed"

    def _line(self, text: str) -> None:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stream = self._stream or sys.stderr
        try:
            stream.write(f"{stamp} {self.label}: {text}\n")
            stream.flush()
        except (OSError, ValueError):  # a closed stderr never fails the work
            pass

    # ---------------------------------------------------------------- dask / pickling

    def __dask_tokenize__(self) -> str:
        return self._id

    def __reduce__(self) -> tuple:
        return (_silent, (self.label, self.total, self.unit))


def _silent(label: str, total: int, unit: str) -> WorkProgress:
    """What a progress becomes in another process: counts, shows nothing."""
    return WorkProgress(label, total, unit, enabled=False)


def _count_block(block: Any, progress: WorkProgress) -> Any:
    progress.advance(int(block.shape[0]) if getattr(block, "ndim", 0) else 1)
    return block
