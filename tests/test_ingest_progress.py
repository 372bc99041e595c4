"""Progress of ingest and preprocess (issue 15): on stderr only; a rich bar on a terminal,
plain timestamped lines at a steady pace anywhere else."""

from __future__ import annotations

import io
import re
import time

import h5py
import numpy as np

from ptyinr import progress as progress_mod
from ptyinr.ingest import ingest_file
from ptyinr.preprocess import PreprocessOptions, write_preprocessed
from ptyinr.progress import WorkProgress

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
FRAMES = np.random.default_rng(3).poisson(30, (20, 16, 16)).astype(np.uint16)


def _src(tmp_path):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["/entry/data/data"] = FRAMES
        f["/entry/positions"] = np.arange(40, dtype=float).reshape(20, 2)
    return path


def test_plain_lines_come_at_a_steady_pace_even_when_nothing_moves():
    out = io.StringIO()
    with WorkProgress("copy x", 100, "frames", terminal=False, stream=out, every_s=0.05) as p:
        p.advance(30)
        time.sleep(0.4)  # a stall: the lines keep coming, with the same count
    lines = out.getvalue().splitlines()
    assert re.fullmatch(rf"{STAMP} copy x: started: 100 frames", lines[0])
    middle = [line for line in lines[1:-1] if "30/100 frames (30%)" in line]
    assert len(middle) >= 3 and all(re.match(STAMP, line) for line in middle)
    assert "left" in middle[0] and "elapsed" in middle[0]
    assert re.fullmatch(rf"{STAMP} copy x: done: 30 frames in \d\.\d s", lines[-1])


def test_a_failure_says_how_far_it_got():
    out = io.StringIO()
    try:
        with WorkProgress("copy y", 10, terminal=False, stream=out) as p:
            p.advance(4)
            raise RuntimeError("disk gone")
    except RuntimeError:
        pass
    assert "copy y: stopped after 4/10 frames" in out.getvalue().splitlines()[-1]


def test_terminal_gets_a_bar():
    out = io.StringIO()
    with WorkProgress("copy z", 8, "frames", terminal=True, stream=out) as p:
        p.advance(8)
    text = out.getvalue()
    assert "copy z" in text and "8/8" in text and STAMP not in text


def test_ingest_progress_on_stderr_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY_S", 0.01)
    ingest_file(
        _src(tmp_path),
        tmp_path / "s.zarr",
        keys={"positions": "/entry/positions"},
        frames_per_shard=4,
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert re.fullmatch(rf"{STAMP} ingest scan\.h5: started: 20 frames", err[0])
    assert re.fullmatch(rf"{STAMP} ingest scan\.h5: done: 20 frames in .+", err[-1])
    ingest_file(
        _src(tmp_path),
        tmp_path / "q.zarr",
        keys={"positions": "/entry/positions"},
        progress=False,
    )
    assert capsys.readouterr().err == ""


def test_preprocess_progress_on_stderr_only(tmp_path, capsys):
    out = ingest_file(
        _src(tmp_path), tmp_path / "s.zarr", keys={"positions": "/entry/positions"}, progress=False
    )
    write_preprocessed(out, PreprocessOptions(frame_size=(8, 8)))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.search(r"preprocess \S+: statistics: done: 20 frames", captured.err)
    assert re.search(r"preprocess s\.zarr: writing: done: 20 frames", captured.err)


def _enabled() -> bool:
    return WorkProgress("x", 1).enabled


def test_progress_is_silent_inside_a_dask_worker():
    """A preprocess or ingest run as a graph task (ptyinr run) must not draw into the
    driver's display: by default, progress shows only outside Dask workers."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,  # in-process: inproc:// comms, nothing listens on the network
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        assert client.submit(_enabled, pure=False).result() is False
    assert _enabled() is True
