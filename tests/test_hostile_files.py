"""Ingest cannot be fooled: files that are declared but never written, zeros, text where
numbers belong, dangling links, a disk that fills up, a process that is killed.

Every refusal is one line naming file, key, value and expectation (exit 2 on the CLI), and
nothing is left behind: no store, no hidden partial store, the source untouched.
(The ordinary malformed-file cases live in test_ingest.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_ingest import KEYS, _fails, _tiny_h5, export_ptyinr, simulate
from typer.testing import CliRunner

from ptyinr import store
from ptyinr.cli.main import app
from ptyinr.errors import IngestError
from ptyinr.ingest import Conversions, core, ingest_archive, ingest_file

runner = CliRunner()
HERE = Path(__file__).parent


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".zarr" in p.name)


def _huge_unwritten(path: Path, n: int = 10**6) -> Path:
    """10^6 frames of 2048 x 2048 float32 = 16.8 TB declared, chunked, no chunk written."""
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(n, 2048, 2048), dtype="f4", chunks=(1, 2048, 2048))
        f["pos"] = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float64)
    return path


# ------------------------------------------------------------------------------ unwritten data


def test_unwritten_16tb_dataset_is_refused_in_seconds(tmp_path):
    src = _huge_unwritten(tmp_path / "huge.h5")
    assert src.stat().st_size < 32 * 2**20  # the file stays tiny
    t0 = time.perf_counter()
    msg = _fails(tmp_path, src, "never written", keys=KEYS)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5, f"refusal took {elapsed:.2f} s"
    assert "key intensities=/data" in msg
    assert "16777216000000 bytes (16.8 TB)" in msg  # declared
    assert "0 of 1000000 chunks written" in msg
    assert "expected a completely written dataset" in msg


def test_partly_written_dataset_says_how_much_is_there(tmp_path):
    with h5py.File(tmp_path / "p.h5", "w") as f:
        d = f.create_dataset("data", shape=(10, 4, 4), dtype="u2", chunks=(1, 4, 4))
        d[:3] = 7  # the acquisition stopped after 3 frames
        f["pos"] = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    msg = _fails(tmp_path, tmp_path / "p.h5", "only partly written", keys=KEYS)
    assert "3 of 10 chunks written (30%)" in msg


def test_contiguous_dataset_never_written(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("data", shape=(5, 4, 4), dtype="f4")  # contiguous, never written
        f["pos"] = np.stack([np.arange(5.0), np.zeros(5)], axis=1)
    msg = _fails(tmp_path, tmp_path / "c.h5", "never written", keys=KEYS)
    assert "0 of 320 bytes allocated" in msg


def test_virtual_dataset_with_missing_source_file(tmp_path):
    layout = h5py.VirtualLayout(shape=(4, 4, 4), dtype="u2")
    layout[:] = h5py.VirtualSource("gone.h5", "data", shape=(4, 4, 4))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_virtual_dataset("data", layout, fillvalue=0)
        f["pos"] = np.stack([np.arange(4.0), np.zeros(4)], axis=1)
    msg = _fails(tmp_path, tmp_path / "v.h5", "'gone.h5'.*which does not exist", keys=KEYS)
    assert "virtual dataset" in msg


def test_frames_larger_than_free_space(tmp_path, monkeypatch):
    src = _tiny_h5(tmp_path / "s.h5", np.ones((3, 4, 4), np.uint16))
    monkeypatch.setattr(core.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(99, 89, 10))
    msg = _fails(tmp_path, src, "free space", keys=KEYS)
    assert "3 frames of 4x4 uint16 need up to 96 bytes" in msg
    assert "has 10 bytes (10 B) free" in msg and "bad.zarr" in msg


# ------------------------------------------------------------------------------ zeros


def test_all_zero_scan_is_refused(tmp_path):
    src = _tiny_h5(tmp_path / "z.h5", np.zeros((40, 4, 4), np.uint16))
    msg = _fails(tmp_path, src, "all 40 frames are zero in every pixel", keys=KEYS)
    assert "key /data" in msg and "expected diffraction counts" in msg


def test_all_negative_clipped_to_zero_is_refused(tmp_path):
    src = _tiny_h5(tmp_path / "n.h5", np.full((5, 4, 4), -2.0, np.float32))
    _fails(
        tmp_path,
        src,
        "zero or negative \\(largest value -2.0\\)",
        keys=KEYS,
        conversions=Conversions(negative="clip"),
    )


def test_one_lit_frame_outside_the_sample_is_enough(tmp_path):
    n = 40
    sampled = set(np.linspace(0, n - 1, 16).astype(int).tolist())
    lit = next(i for i in range(n) if i not in sampled)
    frames = np.zeros((n, 4, 4), np.uint16)
    frames[lit, 1, 1] = 3
    src = _tiny_h5(tmp_path / "one.h5", frames)
    out = ingest_file(src, tmp_path / "one.zarr", keys=KEYS, frames_per_shard=4)
    np.testing.assert_array_equal(store.open_scan_store(out)["intensities"].values, frames)


# ------------------------------------------------------------------------------ positions


def _h5_text_positions(path: Path, kind: str) -> Path:
    with h5py.File(path, "w") as f:
        f["data"] = np.ones((3, 4, 4), np.uint16)
        text = [["0.0", "1.0"], ["1.0", "2.0"], ["2.0", "3.0"]]
        if kind == "bytes":
            f["pos"] = np.array(text, dtype="S8")
        else:
            f.create_dataset("pos", data=text, dtype=h5py.string_dtype())
    return path


@pytest.mark.parametrize(("kind", "dtype"), [("bytes", "|S8"), ("vlen", "object")])
def test_text_positions_in_hdf5(tmp_path, kind, dtype):
    src = _h5_text_positions(tmp_path / f"{kind}.h5", kind)
    msg = _fails(tmp_path, src, f"key /pos: positions of dtype {dtype}", keys=KEYS)
    assert "expected numbers" in msg and "first value" in msg


def test_text_positions_in_npz_and_grid_axes(tmp_path):
    np.savez(
        tmp_path / "u.npz",
        data=np.ones((3, 4, 4)),
        positions=np.array([["0", "1"], ["1", "2"], ["2", "3"]]),
    )
    _fails(tmp_path, tmp_path / "u.npz", "key positions: positions of dtype <U1", format="npz")
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["data"] = np.ones((6, 4, 4), np.uint16)
        f["y"] = np.array([b"0", b"1"])
        f["x"] = np.array([0.0, 1.0, 2.0])
    _fails(
        tmp_path,
        tmp_path / "g.h5",
        "key /y: positions of dtype \\|S1",
        keys={"intensities": "/data", "positions_y": "/y", "positions_x": "/x"},
    )


# ------------------------------------------------------------------------------ symlinks


def test_dangling_symlink_is_named_by_the_users_path(tmp_path):
    link = tmp_path / "scan.h5"
    link.symlink_to(tmp_path / "moved" / "scan_0001.h5")
    with pytest.raises(IngestError) as info:
        ingest_file(link, tmp_path / "s.zarr")
    assert str(info.value) == (
        f"{link}: a symbolic link to {tmp_path / 'moved' / 'scan_0001.h5'}, which does not "
        "exist; expected a scan file"
    )
    res = runner.invoke(app, ["ingest", str(link), str(tmp_path / "s.zarr")])
    assert res.exit_code == 2 and "a symbolic link to" in res.output
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ failing copies


def _mount_tmpfs(directory: Path) -> bool:
    directory.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], capture_output=True
    )
    return res.returncode == 0


@pytest.mark.parametrize("how", ["tmpfs", "patched"])
def test_disk_full_halfway_leaves_nothing(tmp_path, monkeypatch, how):
    frames = np.random.default_rng(1).random((100, 64, 64)).astype(np.float32)  # 1.6 MB
    pos = np.stack([np.arange(100.0), np.zeros(100)], axis=1)
    src = _tiny_h5(tmp_path / "src.h5", frames, pos=pos)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    target = tmp_path / "target"
    mounted = False
    if how == "tmpfs":
        mounted = _mount_tmpfs(target)
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        # the 1 MB file system passes the up-front check only if we pretend it is large
        monkeypatch.setattr(core, "free_space", lambda p: (Path(p), 10**12))
    else:
        target.mkdir()
        # the failure is injected into zarr-python's LocalStore, which zarrs bypasses
        monkeypatch.setattr(core, "zarrs_available", lambda: False)
        import zarr.storage._local as local

        real, calls = local._put, []

        def put(path, value, exclusive=False):
            if "/intensities/c/" in str(path):
                calls.append(path)
                if len(calls) > 3:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, value, exclusive=exclusive)

        monkeypatch.setattr(local, "_put", put)
    try:
        out = target / "s.zarr"
        with pytest.raises(IngestError) as info:
            ingest_file(src, out, keys=KEYS, frames_per_shard=10)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{out}: no space left on device")
        assert str(src) in msg and "partial store was removed" in msg
        assert list(target.iterdir()) == []  # no store, hidden or not
        assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=False)


_SLOW_INGEST = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from ptyinr.ingest import hdf5
    hdf5._CHUNK_BYTES = 1  # one frame per read...
    real = hdf5.H5Frames.__getitem__
    def slow(self, index):
        time.sleep(0.1)  # ...and each read slow: the copy takes seconds on any machine
        return real(self, index)
    hdf5.H5Frames.__getitem__ = slow
    import typer
    from ptyinr.cli.ingest import register
    app = typer.Typer()
    register(app)  # the ingest commands only (the full CLI takes seconds to import)
    app(sys.argv[1:])
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_ingest_leaves_no_store(tmp_path, sig):
    frames = np.random.default_rng(2).poisson(3, (400, 8, 8)).astype(np.uint16)
    src = _tiny_h5(tmp_path / "k.h5", frames)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    out = tmp_path / "out" / "k.zarr"
    out.parent.mkdir()
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_INGEST.format(tests=str(HERE)))
    args = ["ingest", str(src), str(out), "-k", "intensities=/data", "-k", "positions=/pos"]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, "--frames-per-shard", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not [p for p in out.parent.iterdir() if ".ingest-" in p.name]:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.05)
        time.sleep(0.3)  # well into the copy
        proc.send_signal(sig)
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == (128 + sig if sig == signal.SIGTERM else -sig)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert _leftovers(out.parent) == []  # cleaned up on the way out
    else:
        assert _leftovers(out.parent)  # a killed process cannot clean up...
    # ...so the next ingest into the directory sweeps it (its process is gone)
    ingest_file(src, tmp_path / "out" / "other.zarr", keys=KEYS)
    assert _leftovers(out.parent) == ["other.zarr"]
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before


# ------------------------------------------------------------------------------ CLI, archives


def test_cli_hostile_files_are_one_line_exit_2(tmp_path):
    src = _huge_unwritten(tmp_path / "huge.h5", n=10**5)
    text = _h5_text_positions(tmp_path / "text.h5", "bytes")
    zero = _tiny_h5(tmp_path / "zero.h5", np.zeros((4, 4, 4), np.uint16))
    for path, expect in (
        (src, "0 of 100000 chunks written"),
        (text, "positions of dtype |S8"),
        (zero, "all 4 frames are zero"),
    ):
        args = ["ingest", str(path), str(tmp_path / "o.zarr")]
        res = runner.invoke(app, [*args, "-k", "intensities=/data", "-k", "positions=/pos"])
        assert res.exit_code == 2, res.output
        assert expect in " ".join(res.output.split())
        assert res.output.count("error:") == 1
        assert _leftovers(tmp_path) == []


def test_archive_reports_hostile_files_and_carries_on(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    export_ptyinr(raw / "good_1.h5", simulate(n_side=2, seed=1))
    export_ptyinr(raw / "good_2.h5", simulate(n_side=2, seed=2))
    with h5py.File(raw / "unwritten.h5", "w") as f:  # the authors' layout, never written
        f.create_dataset("diffamp", shape=(10**5, 512, 512), dtype="f4", chunks=(1, 512, 512))
        f["points"] = np.zeros((2, 10**5))
        f["lambda_nm"], f["ccd_pixel_um"], f["z_m"] = 0.15, 75.0, 2.0
    with h5py.File(raw / "zeros.h5", "w") as f:
        f["diffamp"] = np.zeros((4, 8, 8))
        f["points"] = np.array([[0.0, 1, 2, 3], [0, 0, 1, 1]])
        f["lambda_nm"], f["ccd_pixel_um"], f["z_m"] = 0.15, 75.0, 2.0
    (raw / "dangling.h5").symlink_to(tmp_path / "nowhere.h5")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    report = ingest_archive(str(raw / "*.h5"), out, parallel="threads", n_workers=2)
    assert time.perf_counter() - t0 < 20
    status = {Path(r["source"]).name: r["status"] for r in report.rows}
    assert status == {
        "dangling.h5": "failed",
        "good_1.h5": "ok",
        "good_2.h5": "ok",
        "unwritten.h5": "failed",
        "zeros.h5": "failed",
    }
    errors = {Path(r["source"]).name: r["error"] for r in report.failed}
    assert errors["dangling.h5"].startswith(f"{raw / 'dangling.h5'}: a symbolic link to")
    assert "0 of 100000 chunks written" in errors["unwritten.h5"]
    assert "all 4 frames are zero" in errors["zeros.h5"]
    assert sum(line.startswith("FAILED") for line in report.lines()) == 3
    assert _leftovers(out) == ["catalog.zarr", "good_1.zarr", "good_2.zarr"]


def test_cli_unforeseen_failure_is_still_one_line_exit_2(tmp_path, monkeypatch):
    from ptyinr.ingest import hdf5

    def broken(*args, **kwargs):
        raise RuntimeError("H5 library says\nsomething odd")

    monkeypatch.setattr(hdf5, "collect_attrs", broken)
    src = _tiny_h5(tmp_path / "a.h5", np.ones((3, 4, 4), np.uint16))
    args = ["ingest", str(src), str(tmp_path / "a.zarr"), "-k", "intensities=/data"]
    res = runner.invoke(app, [*args, "-k", "positions=/pos"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "a.h5: RuntimeError: H5 library says something odd (at test_hostile_files.py" in text
    assert res.output.count("error:") == 1 and _leftovers(tmp_path) == []
