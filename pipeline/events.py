"""Live progress of reconstructions: events from the workers, a board in the driver.

A reconstruction running as a Dask task (ptyinr.graph) publishes small events with
`distributed.get_worker().log_event(TOPIC, msg)`; the scheduler forwards them to every
client subscribed to the topic (`subscribe`), where a `Board` keeps the latest state of each
part (store, run, part) for the progress display. Pub/sub through the scheduler, not files:
nothing is written beside the store, and a driver on a login node sees workers on any node.

Events are plain dicts (msgpack-able), one per:

- `start`       the task began (reading the frames, building the engine);
- `warm_start`  a check of the probe warm start (`ProbeField.fit_to`'s callback);
- `epoch`       an epoch ended: epoch, epochs, loss, seconds per epoch, ETA;
- `snapshot`    object and probe were written to the run group (`train.snapshot_every`);
- `refit`       validation chose its epoch; the refit on all positions (`train.refit`) begins:
                its epochs (and its probe warm start, if any) follow with `phase = "refit"`;
- `done`        the part's fit ended.

A data-parallel fit (ptyinr.launch) reports from rank 0: on a Dask worker straight to the
scheduler, from a spawned process through a queue the launching process forwards (`forward`).

A worker sends at most one `epoch` / `warm_start` event per part every `EVENT_EVERY_S`
seconds (plus the first and the last epoch): a fast engine's thousands of epochs must not
flood the scheduler. Publishing never raises: progress must not fail a reconstruction.

Layer: the lowest but one (with ptyinr.errors and ptyinr.progress): it imports only
ptyinr.progress_common, so launch, reconstruct, the engines and the graph can all use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ptyinr.progress_common import dask_worker, format_seconds

TOPIC = "ptyinr-progress"
EVENT_EVERY_S = 1.0  # at most one epoch (or warm start) event per part per second
KINDS = ("start", "warm_start", "epoch", "snapshot", "refit", "done")
REFIT = "refit"  # the phase of a refit's events

Sink = Callable[[dict[str, Any]], None]


def _number(value: Any) -> float | None:
    """A finite float, or None (NaN and infinities are shown as '-')."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------


@dataclass
class Reporter:
    """Publishes the events of one part of one run (a reconstruction task).

    `session` is the driver's token (ptyinr.graph.RunSpec.session): a display takes only the
    events of the runs it submitted, not those of an earlier attempt of the same run id.
    `sink` receives the events instead of the Dask worker (tests, or a process that is not
    a worker); with neither, events are dropped. `phase` marks the events of a later phase
    of the same part (`refit`); empty for the fit itself.
    """

    store: str
    run: str
    part: str
    epochs: int
    session: str = ""
    warm_start_steps: int = 0
    every_s: float = EVENT_EVERY_S
    sink: Sink | None = None
    phase: str = ""
    clock: Callable[[], float] = time.monotonic
    _last_sent: float = field(default=-math.inf, init=False, repr=False)
    _fit_started: float | None = field(default=None, init=False, repr=False)
    _first: tuple[int, float] | None = field(default=None, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._started = self.clock()

    def publish(self, kind: str, **fields: Any) -> None:
        """Send one event (never raises)."""
        msg = {
            "kind": kind,
            "store": self.store,
            "run": self.run,
            "part": self.part,
            "session": self.session,
            "time": time.time(),
            **({"phase": self.phase} if self.phase else {}),
            **fields,
        }
        self.forward(msg)

    def forward(self, msg: dict[str, Any]) -> None:
        """Send an event made elsewhere (a spawned rank's, which has no Dask worker) the way
        this reporter sends its own (never raises)."""
        try:
            if self.sink is not None:
                self.sink(msg)
                return
            worker = dask_worker()
            if worker is not None:
                worker.log_event(TOPIC, msg)
        except Exception:  # a closing worker, an odd value: progress is never worth a failure
            pass

    def start(self) -> None:
        """The task began: frames are read and the engine built (probe warm start included)."""
        self._started = self.clock()
        self.publish("start", epochs=int(self.epochs))

    def fit_started(self) -> None:
        """The engine is built; its epochs start now (the clock of the ETA)."""
        self._fit_started = self.clock()

    def _due(self, now: float, force: bool) -> bool:
        if force or now - self._last_sent >= self.every_s:
            self._last_sent = now
            return True
        return False

    def epoch(self, epoch: int, loss: float) -> None:
        """`Engine.fit`'s on_epoch hook: epoch (1-based, done) and its mean loss."""
        now = self.clock()
        first = self._first is None
        if self._first is None:
            self._first = (int(epoch), now)
        e0, t0 = self._first
        seconds_per_epoch: float | None = None
        if epoch > e0:
            seconds_per_epoch = (now - t0) / (epoch - e0)
        elif self._fit_started is not None:  # the first epoch of this attempt (resumes too)
            seconds_per_epoch = now - self._fit_started
        last = epoch >= self.epochs
        if not self._due(now, force=first or last):
            return
        eta = None if seconds_per_epoch is None else seconds_per_epoch * (self.epochs - epoch)
        self.publish(
            "epoch",
            epoch=int(epoch),
            epochs=int(self.epochs),
            loss=_number(loss),
            seconds_per_epoch=_number(seconds_per_epoch),
            eta_s=_number(eta),
        )

    def probe_fit(self, attempt: int, step: int, error: float) -> None:
        """`ProbeField.fit_to`'s callback(attempt, step, error), throttled like epochs."""
        if not self._due(self.clock(), force=step == 0):
            return
        self.publish(
            "warm_start",
            attempt=int(attempt) + 1,
            step=int(step),
            steps=int(self.warm_start_steps),
            error=_number(error),
        )

    def refit(self, epochs: int, validated_epochs: int) -> Reporter:
        """`train.refit`: validation chose `epochs` of the `validated_epochs` run; a fit on
        all positions for that many epochs begins. Returns the reporter of that refit (its
        events carry `phase = "refit"`; throttled on their own, its first epoch always sent)."""
        self.publish("refit", epoch=0, epochs=int(epochs), validated_epochs=int(validated_epochs))
        return dataclasses.replace(self, epochs=int(epochs), phase=REFIT)

    def for_process(self, sink: Sink | None) -> Reporter:
        """A fresh copy of this reporter for another process (a data-parallel rank 0):
        picklable (`sink` replaces this one's, the clock is time.monotonic); on a Dask worker
        with sink None it sends through that worker."""
        return dataclasses.replace(self, sink=sink, clock=time.monotonic)

    def snapshot(self, epoch: int, group: str) -> None:
        self.publish("snapshot", epoch=int(epoch), epochs=int(self.epochs), group=group)

    def done(self, epochs: int, loss: float) -> None:
        self.publish(
            "done",
            epoch=int(epochs),
            epochs=int(self.epochs),
            loss=_number(loss),
            seconds=self.clock() - self._started,
        )


_current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "ptyinr_reporter", default=None
)


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[Reporter | None]:
    """Make `reporter` the current one in this thread (a Dask task's own), for code that is
    handed no reporter (the engine's probe warm start: `probe_fit_callback`)."""
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        _current.reset(token)


def current() -> Reporter | None:
    return _current.get()


def probe_fit_callback() -> Callable[[int, int, float], None] | None:
    """The callback for `ProbeField.fit_to` that reports to the current reporter; None
    outside a reporting task (then fit_to reports nothing)."""
    reporter = current()
    return None if reporter is None else reporter.probe_fit


# --------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------


@dataclass
class PartProgress:
    """The latest known state of one part (store, run, part) in the driver."""

    store: str
    run: str
    part: str
    kind: str = "start"
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    eta_s: float | None = None
    seconds_per_epoch: float | None = None
    warm_start: tuple[int, int, int, float | None] | None = None  # attempt, step, steps, error
    seconds: float | None = None
    refit: bool = False  # in the refit on all positions (train.refit)
    validated_epochs: int = 0  # the epochs of the validated fit before a refit
    time: float = 0.0  # worker clock of the last event
    version: int = 0  # bumped on every accepted event

    @property
    def phase(self) -> str:
        """The phase the part is in: start, warm_start, epoch, refit, refit epoch, refit
        warm_start, done (a display writes a line as a part enters each)."""
        base = phase_of(self.kind)
        return f"{REFIT} {base}" if self.refit and base in ("epoch", "warm_start") else base

    def text(self) -> str:
        """'epoch 12/30  loss 1.23e-03  ETA 41 s', 'warm start 20/100 ...', 'done ...';
        'refit: epoch 3/12 ...' in a refit."""
        loss = "-" if self.loss is None else f"{self.loss:.3e}"
        prefix = f"{REFIT}: " if self.refit else ""
        if self.kind == "done":
            took = "" if self.seconds is None else f" in {format_seconds(self.seconds)}"
            return f"done: {self.epoch} epochs, loss {loss}{took}"
        if self.kind == REFIT:
            return (
                f"validation chose epoch {self.epochs} of {self.validated_epochs}: refit on "
                f"all positions for {self.epochs} epochs"
            )
        if self.kind in ("epoch", "snapshot") and self.epoch:
            eta = "-" if self.eta_s is None else format_seconds(self.eta_s)
            return f"{prefix}epoch {self.epoch}/{self.epochs}  loss {loss}  ETA {eta}"
        if self.kind == "warm_start" and self.warm_start is not None:
            attempt, step, steps, error = self.warm_start
            err = "-" if error is None else f"{error:.3g}"
            total = f"/{steps}" if steps else ""
            return f"{prefix}probe warm start: attempt {attempt}, step {step}{total}, error {err}"
        return "loading data, building the model"


class Board:
    """The driver's view of every part's progress, fed by `handle` (a topic handler).

    Only events of `runs` ((store, run id, session) of this driver's runs) are taken; an
    event older than the part's latest is ignored (a replay, a retried task's late event).
    Thread-safe: handlers run in the client's event loop thread, the display reads in its own.
    """

    def __init__(self, runs: set[tuple[str, str, str]]) -> None:
        self.runs = set(runs)
        self._parts: dict[tuple[str, str, str], PartProgress] = {}
        # each part's state as it entered each phase, until a log display takes them: a fast
        # part can go from its first epoch to done between two refreshes of the display
        self._entered: dict[tuple[str, str, str], list[PartProgress]] = {}
        self._lock = threading.Lock()
        self.received = 0

    def handle(self, event: Any) -> None:
        """A topic event: `(timestamp, msg)` from the scheduler, or the msg itself."""
        msg = event[1] if isinstance(event, tuple | list) and len(event) == 2 else event
        if not isinstance(msg, dict) or msg.get("kind") not in KINDS:
            return
        try:
            key = (str(msg["store"]), str(msg["run"]), str(msg["part"]))
            session = str(msg.get("session", ""))
            stamp = float(msg.get("time", 0.0))
        except (KeyError, TypeError, ValueError):
            return
        if (key[0], key[1], session) not in self.runs:
            return
        with self._lock:
            p = self._parts.setdefault(key, PartProgress(*key))
            if stamp < p.time:
                return
            before = p.phase if p.version else None
            _apply(p, msg)
            p.time = stamp
            p.version += 1
            self.received += 1
            if p.phase != before:
                self._entered.setdefault(key, []).append(dataclasses.replace(p))

    def parts(self) -> dict[tuple[str, str, str], PartProgress]:
        """A copy of every part's latest state."""
        with self._lock:
            return {k: dataclasses.replace(v) for k, v in self._parts.items()}

    def take_entered(self) -> dict[tuple[str, str, str], list[PartProgress]]:
        """Each part's states on entering a phase since the last call (then forgotten)."""
        with self._lock:
            entered, self._entered = self._entered, {}
            return entered

    def part(self, store: str, run: str, part: str) -> PartProgress | None:
        with self._lock:
            p = self._parts.get((store, run, part))
            return None if p is None else dataclasses.replace(p)


def phase_of(kind: str) -> str:
    """The phase an event kind belongs to (a snapshot is taken during the epochs)."""
    return "epoch" if kind == "snapshot" else kind


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _apply(p: PartProgress, msg: dict[str, Any]) -> None:
    kind = str(msg["kind"])
    if kind == "warm_start":
        p.warm_start = (
            _int(msg.get("attempt"), 1),
            _int(msg.get("step")),
            _int(msg.get("steps")),
            _number(msg.get("error")),
        )
        p.kind = kind
        p.refit = msg.get("phase") == REFIT
        return
    p.epochs = _int(msg.get("epochs"), p.epochs)
    if kind in ("start", REFIT):
        p.kind, p.epoch, p.loss, p.eta_s, p.warm_start, p.seconds = kind, 0, None, None, None, None
        p.refit = kind == REFIT
        p.validated_epochs = _int(msg.get("validated_epochs")) if p.refit else 0
        return
    p.epoch = _int(msg.get("epoch"), p.epoch)
    if kind == "snapshot":
        if p.kind != "done":
            p.kind = "snapshot" if p.kind in ("epoch", "snapshot") else p.kind
        return
    p.kind = kind
    p.loss = _number(msg.get("loss"))
    if kind == "epoch":
        p.refit = msg.get("phase") == REFIT
        p.eta_s = _number(msg.get("eta_s"))
        p.seconds_per_epoch = _number(msg.get("seconds_per_epoch"))
    else:  # done
        p.eta_s = 0.0
        p.seconds = _number(msg.get("seconds"))


# one topic handler per client, shared by every board subscribed through it (a client has one
# handler per topic: two drivers in one process must not take each other's events away)
_subscribers: dict[int, tuple[Any, list[Callable[[Any], None]]]] = {}
_subscribers_lock = threading.Lock()


def subscribe(client: Any, handler: Callable[[Any], None]) -> Callable[[], None]:
    """Call `handler(event)` for every progress event the cluster forwards to `client`, and
    for those it logged before (the scheduler keeps recent events); returns the function
    that unsubscribes. Never raises: without events the display shows task states only."""
    key = id(client)
    with _subscribers_lock:
        entry = _subscribers.get(key)
        if entry is None or entry[0] is not client:
            handlers: list[Callable[[Any], None]] = []

            def fan_out(event: Any) -> None:
                for h in list(handlers):
                    try:
                        h(event)
                    except Exception:  # one display's bug must not starve the others
                        pass

            try:
                client.subscribe_topic(TOPIC, fan_out)
            except Exception:
                return lambda: None
            entry = _subscribers[key] = (client, handlers)
        entry[1].append(handler)
    try:  # events logged before the subscription reached the scheduler
        for event in client.get_events(TOPIC):
            handler(event)
    except Exception:
        pass

    def unsubscribe() -> None:
        with _subscribers_lock:
            entry = _subscribers.get(key)
            if entry is None or entry[0] is not client:
                return
            with contextlib.suppress(ValueError):
                entry[1].remove(handler)
            if not entry[1]:
                del _subscribers[key]
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(TOPIC)

    return unsubscribe


__all__ = [
    "EVENT_EVERY_S",
    "REFIT",
    "TOPIC",
    "Board",
    "PartProgress",
    "Reporter",
    "current",
    "format_seconds",
    "probe_fit_callback",
    "reporting",
    "subscribe",
]
