"""Live feedback (ptyinr.events): epoch / loss / ETA events from the workers to the driver,
timestamped progress lines where stderr is not a terminal, snapshots of a running fit.

The runs are tiny simulated scans (40 x 40 object, 16 x 16 frames) with a small model on a
2-worker LocalCluster, as in test_graph.py.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from tiny import TINY_MODEL
from typer.testing import CliRunner

from ptyinr import events, graph, store
from ptyinr.config import load_config
from ptyinr.errors import InputError
from ptyinr.reconstruct import open_latest, open_snapshot, reconstruct_store, snapshot_group
from ptyinr.simulate import SimulationConfig, write_simulated_store

EPOCHS = 8
FAST = [*TINY_MODEL, f"train.epochs={EPOCHS}"]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  ")


def make_store(path: Path, seed: int = 0) -> Path:
    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, seed=seed)
    return write_simulated_store(path, sim)


@pytest.fixture(scope="module")
def client():
    from ptyinr.cluster import connect

    with connect("local", n_workers=2, dashboard_address=None, quiet=True, local_tls=False) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("live")
    return [make_store(folder / f"scan{i}.zarr", seed=i) for i in range(2)]


def _log_console() -> tuple[Console, io.StringIO]:
    """A stderr-like console that is not a terminal (a SLURM log, `2> run.log`)."""
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=100), out


def _wired_part(epochs: int):
    """A log display over a board fed by one part's reporter, whose events collect in `sent`
    until the test hands them to the board: (log, board, sent, reporter, display)."""
    console, log = _log_console()
    board = events.Board({("/s.zarr", "r", "tok")})
    sent: list[dict] = []
    reporter = events.Reporter("/s.zarr", "r", "full", epochs=epochs, session="tok", every_s=0)
    reporter.sink = sent.append
    display = graph._LineDisplay(console, [], board, every_s=3600)
    return log, board, sent, reporter, display


def _events_of(client, run_id: str) -> list[dict]:
    """Every progress event the scheduler holds for `run_id` (what a subscriber receives)."""
    return [msg for _, msg in client.get_events(events.TOPIC) if msg.get("run") == run_id]


def test_run_on_two_stores_sends_epoch_loss_events_for_every_part(client, stores, capsys):
    console, log = _log_console()
    cfg = load_config(overrides=[*FAST, "train.snapshot_every=3"])
    specs = [graph.RunSpec(store=s, config=cfg, run_id="live") for s in stores]
    outcomes = graph.run_graph(client, specs, console=console, progress_every_s=0)
    assert [o.status for o in outcomes] == ["complete", "complete"], outcomes

    got = _events_of(client, "live")
    for s in stores:
        for part in graph.PARTS:
            mine = [m for m in got if m["store"] == str(s.resolve()) and m["part"] == part]
            kinds = [m["kind"] for m in mine]
            assert kinds[0] == "start" and kinds[-1] == "done", (s.name, part, kinds)
            epochs = [m for m in mine if m["kind"] == "epoch"]
            # the first and the last epoch always, in order, with a finite loss and an ETA
            assert epochs[0]["epoch"] == 1 and epochs[-1]["epoch"] == EPOCHS
            assert [m["epoch"] for m in epochs] == sorted({m["epoch"] for m in epochs})
            assert all(m["epochs"] == EPOCHS and math.isfinite(m["loss"]) for m in epochs)
            assert epochs[0]["eta_s"] > 0 and epochs[-1]["eta_s"] == 0
            # the loss reported is the loss recorded: the last epoch's is the part's final loss
            sub = None if part == "full" else part
            loss = store.open_run(s, "live", sub)["loss"].values
            assert epochs[-1]["loss"] == pytest.approx(loss[-1], rel=1e-6)
            # snapshots every 3 epochs (not at the last), gone once the run is complete
            snaps = [m["epoch"] for m in mine if m["kind"] == "snapshot"]
            assert snaps == [3, 6], (s.name, part, snaps)
            assert open_snapshot(s, "live", part) is None
        # every event is this driver's: one session token for all runs of one call
    assert len({m["session"] for m in got}) == 1

    lines = log.getvalue().splitlines()
    assert lines and all(STAMP.match(line) for line in lines), lines
    for s in stores:
        for name in ("full", "half A", "half B"):
            assert any(
                f"{s.name} live {name}: epoch" in line and "loss" in line and "ETA" in line
                for line in lines
            ), (s.name, name, lines)
            assert any(f"{s.name} live {name}: done: {EPOCHS} epochs" in line for line in lines)
        assert any(f"complete {s.name} live: resolution" in line for line in lines)
    assert capsys.readouterr().out == ""  # progress never goes to stdout


def test_a_bad_progress_interval_is_refused_naming_it(monkeypatch) -> None:
    monkeypatch.setenv(graph.PROGRESS_ENV, "soon")
    with pytest.raises(InputError, match=f"{graph.PROGRESS_ENV}='soon': expected seconds"):
        graph.progress_every()
    monkeypatch.setenv(graph.PROGRESS_ENV, "5")
    assert graph.progress_every() == 5.0 and graph.progress_every(0) == 0.0
    monkeypatch.delenv(graph.PROGRESS_ENV)
    assert graph.progress_every() == graph.PROGRESS_EVERY_S


def test_snapshot_every_does_not_change_the_run_id() -> None:
    base = load_config(overrides=FAST)
    watched = load_config(overrides=[*FAST, "train.snapshot_every=5"])
    assert graph.config_run_id(base) == graph.config_run_id(watched)
    other = load_config(overrides=[*FAST, "train.seed=1"])
    assert graph.config_run_id(base) != graph.config_run_id(other)


def test_cli_run_writes_timestamped_progress_lines_to_stderr_only(client, stores, monkeypatch):
    """`ptyinr run --json` with stderr not a terminal: plain timestamped progress lines on
    stderr for every part, nothing but the JSON on stdout."""
    from ptyinr.cli.main import app

    monkeypatch.setenv(graph.PROGRESS_ENV, "0")
    sets = [arg for item in FAST for arg in ("--set", item)]
    address = client.scheduler.address
    args = ["run", *map(str, stores), "--cluster", address, "--insecure", "--run-id", "cli"]
    result = CliRunner().invoke(app, [*args, *sets, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = __import__("json").loads(result.stdout)  # stdout is the JSON and nothing else
    assert [r["status"] for r in rows] == ["complete", "complete"]
    progress = [line for line in result.stderr.splitlines() if STAMP.match(line)]
    for s in stores:
        for name in ("full", "half A", "half B"):
            assert any(f"{s.name} cli {name}: epoch" in line for line in progress), progress


def test_line_display_paces_a_part_by_time() -> None:
    """A line as a part enters each phase (loading, epochs, done); in between at most one
    per interval, and only when it moved on: a fast fit with a long interval logs its start,
    its first epoch and its end, nothing between."""
    log, board, sent, reporter, display = _wired_part(epochs=50)
    reporter.start()
    board.handle((0.0, sent.pop()))
    display.refresh(None, ())
    reporter.fit_started()
    for epoch in range(1, 51):
        reporter.epoch(epoch, 1.0 / epoch)
        for msg in sent:
            board.handle((0.0, msg))
        sent.clear()
        display.refresh(None, ())
        display.refresh(None, ())  # nothing new: no line
    reporter.done(50, 0.02)
    board.handle((0.0, sent.pop()))
    display.refresh(None, ())
    lines = log.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert all(STAMP.match(line) for line in lines)
    assert "s.zarr r full: loading data" in lines[0]
    assert "s.zarr r full: epoch 1/50  loss 1.000e+00  ETA" in lines[1]
    assert "done: 50 epochs, loss 2.000e-02" in lines[2]

    console, log = _log_console()
    every = graph._LineDisplay(console, [], board, every_s=0)
    every.refresh(None, ())
    every.refresh(None, ())
    assert len(log.getvalue().splitlines()) == 1  # the latest state, once


def test_line_display_logs_every_phase_of_a_part_that_ends_between_two_refreshes() -> None:
    """A fast part can go from loading through its epochs to done between two refreshes of
    the log display: each phase it entered still gets its line, in order."""
    log, board, sent, reporter, display = _wired_part(epochs=5)
    reporter.start()
    reporter.fit_started()
    for epoch in range(1, 6):
        reporter.epoch(epoch, 1.0 / epoch)
    reporter.done(5, 0.2)
    for msg in sent:
        board.handle((0.0, msg))
    display.refresh(None, ())
    lines = log.getvalue().splitlines()
    assert [line.split(": ", 1)[1].split()[0] for line in lines] == ["loading", "epoch", "done:"]
    assert "epoch 1/5" in lines[1]
    display.refresh(None, ())
    assert len(log.getvalue().splitlines()) == 3  # nothing twice


def test_reporter_throttles_and_estimates_the_time_left() -> None:
    clock = [100.0]
    sent: list[dict] = []
    r = events.Reporter(
        "s", "r", "full", epochs=10, every_s=5.0, sink=sent.append, clock=lambda: clock[0]
    )
    r.fit_started()
    for epoch in range(1, 11):
        clock[0] += 2.0  # 2 s per epoch
        r.epoch(epoch, 0.5)
    # epoch 1 (first), then one per 5 s (epochs 4, 7: 6 s apart), and 10 (last)
    assert [m["epoch"] for m in sent] == [1, 4, 7, 10]
    assert [m["eta_s"] for m in sent] == pytest.approx([18.0, 12.0, 6.0, 0.0])
    assert all(m["seconds_per_epoch"] == pytest.approx(2.0) for m in sent)


def test_board_keeps_its_own_runs_latest_state() -> None:
    board = events.Board({("s", "r", "mine")})
    base = {"store": "s", "run": "r", "part": "full", "session": "mine"}
    board.handle((0, {**base, "kind": "epoch", "epoch": 5, "epochs": 9, "loss": 0.1, "time": 2}))
    board.handle((0, {**base, "kind": "epoch", "epoch": 4, "epochs": 9, "loss": 0.2, "time": 1}))
    board.handle((0, {**base, "session": "other", "kind": "done", "epoch": 9, "time": 3}))
    board.handle((0, {**base, "run": "x", "kind": "done", "epoch": 9, "time": 3}))
    board.handle((0, {"kind": "epoch", "store": "s"}))  # malformed: ignored
    board.handle("not an event")
    (p,) = board.parts().values()
    assert (p.kind, p.epoch, p.loss) == ("epoch", 5, 0.1)
    assert p.text() == "epoch 5/9  loss 1.000e-01  ETA -"
    assert events.format_seconds(41) == "41 s"
    assert events.format_seconds(185) == "3 min 05 s"
    assert events.format_seconds(7800) == "2 h 10 min"


def test_probe_warm_start_reports_through_the_current_reporter() -> None:
    """The engine's probe warm start (ProbeField.fit_to) reports through the same path when
    a reporter is current (a graph task): `events.probe_fit_callback()` is its callback."""
    from ptyinr.models.fields import build_probe_field

    assert events.probe_fit_callback() is None  # outside a task: nothing to report to
    cfg = load_config(overrides=TINY_MODEL)
    yy, xx = np.mgrid[-8:8, -8:8]
    target = np.exp(-(yy**2 + xx**2) / 20.0) * np.exp(0.3j * xx)
    probe = build_probe_field((16, 16), cfg.model, initial_probe=target)
    sent: list[dict] = []
    reporter = events.Reporter(
        "s", "r", "half_a", epochs=3, warm_start_steps=20, every_s=0, sink=sent.append
    )
    with events.reporting(reporter):
        error = probe.fit_to(target, steps=20, callback=events.probe_fit_callback())
    assert events.current() is None  # the task's reporter does not outlive it
    assert sent and all(m["kind"] == "warm_start" and m["part"] == "half_a" for m in sent)
    assert min(m["error"] for m in sent) <= error * (1 + 1e-6)
    board = events.Board({("s", "r", "")})
    for m in sent:
        board.handle((0, m))
    text = board.part("s", "r", "half_a").text()
    assert re.fullmatch(r"probe warm start: attempt [123], step \d+/20, error \S+", text), text


def test_a_running_reconstruction_can_be_looked_at(tmp_path: Path) -> None:
    """`train.snapshot_every`: object and probe so far, readable from the store while the
    fit runs (the run still "running"), replaced every K epochs, gone when complete."""
    path = make_store(tmp_path / "s.zarr")
    cfg = load_config(overrides=[*TINY_MODEL, "train.epochs=7", "train.snapshot_every=3"])
    seen: list[tuple[int, int, str, tuple[int, ...], int]] = []

    def look(msg: dict) -> None:
        if msg["kind"] == "snapshot":
            snap = open_snapshot(path, "watch")
            assert snap is not None and msg["group"] == snapshot_group("full")
            assert open_latest(path, "watch").attrs["snapshot_epoch"] == msg["epoch"]
            obj = snap["object"].values
            assert np.all(np.isfinite(obj)) and np.abs(obj).max() > 0
            seen.append(
                (
                    msg["epoch"],
                    int(snap.attrs["snapshot_epoch"]),
                    snap.attrs["status"],
                    obj.shape,
                    snap.sizes["epoch"],
                )
            )

    reporter = events.Reporter(str(path), "watch", "full", epochs=7, every_s=0, sink=look)
    _, result = reconstruct_store(path, cfg, run_id="watch", progress=False, reporter=reporter)
    shape = result.object.shape
    assert seen == [(3, 3, "running", shape, 3), (6, 6, "running", shape, 6)]
    assert open_snapshot(path, "watch") is None
    assert store.open_run(path, "watch").attrs["status"] == "complete"
    latest = open_latest(path, "watch")  # the result now, not a snapshot
    assert "snapshot_epoch" not in latest.attrs and latest.sizes["epoch"] == 7
    with pytest.raises(InputError, match="no half_a result yet and no snapshot"):
        open_latest(path, "watch", "half_a")


def test_a_reconstruction_reports_its_probe_warm_start_before_its_epochs(tmp_path: Path):
    path = make_store(tmp_path / "s.zarr")
    cfg = load_config(overrides=[*TINY_MODEL, "train.epochs=2"])
    sent: list[dict] = []
    reporter = events.Reporter(
        str(path), "warm", "full", epochs=2, warm_start_steps=20, every_s=0, sink=sent.append
    )
    reconstruct_store(path, cfg, run_id="warm", progress=False, reporter=reporter)
    kinds = [m["kind"] for m in sent]
    assert "warm_start" in kinds, kinds
    assert kinds.index("warm_start") < kinds.index("epoch")
    assert "warm_start" not in kinds[kinds.index("epoch") :]


# ------------------------------------------------------------------------------ refit, ranks


def _board_lines(sent: list[dict], run: str, session: str = "") -> list[str]:
    """What the log display (a SLURM driver log) writes for these events, fed all at once."""
    console, log = _log_console()
    board = events.Board({(sent[0]["store"], run, session)})
    for msg in sent:
        board.handle((0.0, msg))
    graph._LineDisplay(console, [], board, every_s=3600).refresh(None, ())
    return [line.split("  ", 1)[1] for line in log.getvalue().splitlines()]


def test_a_refit_reports_its_own_phase_and_epochs(tmp_path: Path) -> None:
    """train.refit: after the validated epochs a `refit` event (the chosen epochs), then the
    refit's epochs (phase "refit", 1..chosen, the losses it records), then done; the log
    display writes a line as the part enters the refit and its epochs."""
    path = make_store(tmp_path / "s.zarr")
    cfg = load_config(
        overrides=[
            *TINY_MODEL,
            "train.epochs=5",
            "train.validation_fraction=0.2",
            "train.patience=10",
            "train.refit=true",
        ]
    )
    sent: list[dict] = []
    reporter = events.Reporter(str(path), "refit", "full", epochs=5, every_s=0, sink=sent.append)
    reporter.start()
    _, result = reconstruct_store(path, cfg, run_id="refit", progress=False, reporter=reporter)
    chosen = result.info["refit"]["epochs"]
    assert 1 <= chosen <= 5
    kinds = [m["kind"] for m in sent]
    assert kinds.count("refit") == 1 and kinds[0] == "start" and kinds[-1] == "done", kinds
    at = kinds.index("refit")
    fit_epochs = [m for m in sent[:at] if m["kind"] == "epoch"]
    assert [m["epoch"] for m in fit_epochs] == [1, 2, 3, 4, 5]
    assert all("phase" not in m for m in sent[:at])
    assert sent[at]["epochs"] == chosen and sent[at]["validated_epochs"] == 5
    refit_epochs = [m for m in sent[at + 1 :] if m["kind"] == "epoch"]
    assert [m["epoch"] for m in refit_epochs] == list(range(1, chosen + 1))
    assert all(m["phase"] == "refit" and m["epochs"] == chosen for m in refit_epochs)
    assert [m["loss"] for m in refit_epochs] == pytest.approx(
        result.info["refit"]["loss"], rel=1e-6
    )
    assert refit_epochs[-1]["eta_s"] == 0

    # the refit's network fits the probe start again (its warm start is reported too)
    lines = [line.split(": ", 1)[1] for line in _board_lines(sent, "refit")]
    assert [" ".join(line.split()[:2]) for line in lines] == [
        "loading data,",
        "probe warm",
        "epoch 1/5",
        "validation chose",
        "refit: probe",
        "refit: epoch",
        "done: 5",
    ], lines
    assert lines[3].startswith(f"validation chose epoch {chosen} of 5: refit on all positions")
    assert lines[5].startswith(f"refit: epoch 1/{chosen}  loss")


DATA_PARALLEL = [*TINY_MODEL, "train.device=cpu", "train.epochs=3"]


def test_a_data_parallel_fit_in_processes_reports_from_rank_0(tmp_path: Path) -> None:
    """2 spawned ranks (Gloo, CPU): rank 0's probe warm start and epochs come back through
    the launching process to its reporter, as those of a fit in one process do."""
    path = make_store(tmp_path / "s.zarr")
    cfg = load_config(overrides=DATA_PARALLEL)
    sent: list[dict] = []
    reporter = events.Reporter(
        str(path), "ranks", "full", epochs=3, warm_start_steps=20, every_s=0, sink=sent.append
    )
    reporter.start()
    _, result = reconstruct_store(
        path, cfg, run_id="ranks", progress=False, world_size=2, reporter=reporter
    )
    assert result.info["processes"] == 2
    kinds = [m["kind"] for m in sent]
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    assert "warm_start" in kinds and kinds.index("warm_start") < kinds.index("epoch")
    epochs = [m for m in sent if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2, 3]  # one rank reports, each epoch once
    assert [m["loss"] for m in epochs] == pytest.approx(result.loss.values, rel=1e-6)
    assert epochs[0]["eta_s"] > 0 and epochs[-1]["eta_s"] == 0
    assert all(m["run"] == "ranks" and m["part"] == "full" for m in sent)


def test_a_data_parallel_fit_on_dask_workers_reports_from_rank_0(client, tmp_path) -> None:
    """2 ranks as tasks on 2 Dask workers: rank 0 sends its epochs from its worker to the
    scheduler, where a driver's board receives them."""
    import time

    path = make_store(tmp_path / "s.zarr")
    cfg = load_config(overrides=DATA_PARALLEL)
    reporter = events.Reporter(str(path), "dask-ranks", "full", epochs=3, session="tok", every_s=0)
    _, result = reconstruct_store(
        path,
        cfg,
        run_id="dask-ranks",
        progress=False,
        world_size=2,
        client=client,
        reporter=reporter,
    )
    assert result.info["processes"] == 2
    deadline = time.monotonic() + 10
    while True:  # the worker's events reach the scheduler shortly after its result
        epochs = [m for m in _events_of(client, "dask-ranks") if m["kind"] == "epoch"]
        if (epochs and epochs[-1]["epoch"] == 3) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [m["epoch"] for m in epochs] == [1, 2, 3]
    assert [m["loss"] for m in epochs] == pytest.approx(result.loss.values, rel=1e-6)
    assert all(m["session"] == "tok" for m in epochs)
    board = events.Board({(str(path), "dask-ranks", "tok")})
    for m in epochs:
        board.handle((0.0, m))
    assert board.part(str(path), "dask-ranks", "full").text().startswith("epoch 3/3  loss")
