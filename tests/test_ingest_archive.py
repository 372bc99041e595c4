"""Archives: parallel ingest, catalog, idempotent re-runs, bad files, and the CLI commands."""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_ingest import export_cxi, export_npz, export_ptyinr, simulate
from typer.testing import CliRunner

from ptyinr import store
from ptyinr.cli.main import app
from ptyinr.ingest import ingest_archive, read_catalog


@pytest.fixture(scope="module")
def scan():
    return simulate(n_side=3)


def _archive(root: Path, scan: dict) -> Path:
    src = root / "raw"
    src.mkdir()
    export_ptyinr(src / "scan_001.h5", scan)
    export_ptyinr(src / "scan_002.h5", simulate(n_side=3, seed=1))
    export_cxi(src / "scan_003.cxi", scan)
    export_npz(src / "scan_004.npz", scan)
    (src / "scan_005.h5").write_text("garbage, not HDF5")
    with h5py.File(src / "scan_006.h5", "w") as f:  # positions count != frames
        f["diffamp"] = np.ones((4, 8, 8))
        f["points"] = np.zeros((2, 3))
        f["lambda_nm"], f["ccd_pixel_um"], f["z_m"] = 0.15, 75.0, 2.0
    return src


def test_archive_ingest_catalog_and_rerun(tmp_path, scan):
    src = _archive(tmp_path, scan)
    out = tmp_path / "stores"
    seen = []
    report = ingest_archive(
        str(src / "scan_*"), out, parallel="threads", n_workers=2, on_result=seen.append
    )
    assert len(seen) == 6 and not report.ok
    status = {Path(r["source"]).name: r["status"] for r in report.rows}
    assert status == {
        "scan_001.h5": "ok",
        "scan_002.h5": "ok",
        "scan_003.cxi": "ok",
        "scan_004.npz": "ok",
        "scan_005.h5": "failed",
        "scan_006.h5": "failed",
    }
    failed = {Path(r["source"]).name: r["error"] for r in report.failed}
    assert "file signature not found" in failed["scan_005.h5"]
    assert "3 positions) for 4 frames" in failed["scan_006.h5"]
    lines = report.lines()
    assert sum(line.startswith("FAILED") for line in lines) == 2
    assert all("\n" not in line for line in lines)

    rows = {Path(r["source"]).name: r for r in read_catalog(out)}
    assert len(rows) == 6
    ok = rows["scan_001.h5"]
    assert ok["frames"] == 9 and (ok["frame_y"], ok["frame_x"]) == (16, 16)
    assert ok["wavelength_m"] == pytest.approx(1.5e-10) and len(ok["sha256"]) == 64
    assert rows["scan_005.h5"]["status"] == "failed" and rows["scan_005.h5"]["error"]
    assert sorted(p.name for p in out.iterdir()) == [
        "catalog.zarr",
        "scan_001.zarr",
        "scan_002.zarr",
        "scan_003.zarr",
        "scan_004.zarr",
    ]

    # re-run: unchanged files are skipped, the store is not rewritten
    before = os.stat(out / "scan_001.zarr" / "zarr.json").st_mtime_ns
    again = ingest_archive(str(src / "scan_*"), out, parallel="sync")
    actions = {Path(r["source"]).name: r["action"] for r in again.rows}
    assert [actions[f"scan_00{i}.{e}"] for i, e in ((1, "h5"), (3, "cxi"), (4, "npz"))] == [
        "skipped"
    ] * 3
    assert os.stat(out / "scan_001.zarr" / "zarr.json").st_mtime_ns == before

    # a changed source is re-ingested into a fresh store
    export_ptyinr(src / "scan_001.h5", simulate(n_side=2, seed=5))
    third = ingest_archive(str(src / "scan_00[1-4]*"), out, parallel="sync")
    assert {Path(r["source"]).name: r["action"] for r in third.rows}["scan_001.h5"] == "ingested"
    assert store.open_scan_store(out / "scan_001.zarr").sizes["scan"] == 4

    # a source that turns bad keeps the previous complete store, and says so
    data = (src / "scan_002.h5").read_bytes()
    (src / "scan_002.h5").write_bytes(data[: len(data) // 3])
    fourth = ingest_archive(str(src / "scan_002.h5"), out, parallel="sync")
    (row,) = fourth.rows
    assert row["status"] == "failed" and "previous store kept" in row["error"]
    assert store.open_scan_store(out / "scan_002.zarr").sizes["scan"] == 9
    assert len(read_catalog(out)) == 6  # rows of files not in this run are kept


def test_archive_same_stem_in_two_dirs(tmp_path, scan):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        export_ptyinr(tmp_path / d / "scan.h5", scan)
    report = ingest_archive(str(tmp_path / "*" / "scan.h5"), tmp_path / "out", parallel="sync")
    stores = {r["store"] for r in report.rows}
    assert report.ok and len(stores) == 2


def test_archive_on_local_cluster(tmp_path, scan, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(3):
        export_ptyinr(src / f"s{i}.h5", simulate(n_side=2, seed=i))
    report = ingest_archive(str(src / "*.h5"), tmp_path / "out", parallel="processes", n_workers=2)
    assert report.ok and len(report.rows) == 3
    for r in report.rows:
        assert store.open_scan_store(r["store"]).sizes["scan"] == 4
    # progress on stderr, not stdout: the files, and where the Dask dashboard is (loopback)
    captured = capsys.readouterr()
    assert "ingest-archive" not in captured.out
    assert re.search(r"ingest-archive \S+: Dask dashboard: http://127\.0\.0\.1:\d+/", captured.err)
    assert re.search(r"ingest-archive \S+: done: 3 files in ", captured.err)


def test_archive_glob_matching_nothing(tmp_path):
    from ptyinr.errors import IngestError

    with pytest.raises(IngestError, match="matches no files"):
        ingest_archive(str(tmp_path / "*.h5"), tmp_path / "out")


# ------------------------------------------------------------------------------ CLI

runner = CliRunner()


def test_cli_ingest_info_preprocess(tmp_path, scan):
    export_ptyinr(tmp_path / "p.h5", scan)
    res = runner.invoke(app, ["ingest", str(tmp_path / "p.h5"), str(tmp_path / "p.zarr")])
    assert res.exit_code == 0, res.output
    assert "frames" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "p.zarr"), "--plot", str(tmp_path / "pl")])
    assert res.exit_code == 0, res.output
    assert "overlap ratio" in res.output and "object pixel" in res.output
    pngs = sorted(p.name for p in (tmp_path / "pl").iterdir())
    assert pngs == ["p_mean_pattern.png", "p_positions.png"]
    assert all((tmp_path / "pl" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    res = runner.invoke(
        app, ["preprocess", str(tmp_path / "p.zarr"), "--frame-size", "8", "--binning", "2"]
    )
    assert res.exit_code == 0, res.output
    assert store.open_scan_store(tmp_path / "p.zarr")["preprocessed"].shape == (9, 4, 4)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "x.h5").write_text("nope")
    res = runner.invoke(app, ["ingest", str(tmp_path / "x.h5"), str(tmp_path / "x.zarr")])
    assert res.exit_code == 2
    assert "file signature not found" in res.output
    res = runner.invoke(
        app, ["ingest", str(tmp_path / "x.h5"), str(tmp_path / "y.zarr"), "--key", "oops"]
    )
    assert res.exit_code == 2 and "NAME=VALUE" in res.output
    res = runner.invoke(
        app, ["ingest", str(tmp_path / "x.h5"), str(tmp_path / "y.zarr"), "--dc", "middle"]
    )
    assert res.exit_code == 2 and "dc='middle'" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "none.zarr")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["catalog", str(tmp_path)])
    assert res.exit_code == 2


def test_cli_archive_and_catalog(tmp_path, scan):
    src = tmp_path / "raw"
    src.mkdir()
    export_ptyinr(src / "a.h5", scan)
    (src / "b.h5").write_text("bad")
    res = runner.invoke(
        app, ["ingest-archive", str(src / "*.h5"), str(tmp_path / "out"), "--parallel", "threads"]
    )
    assert res.exit_code == 2, res.output
    assert "1 ingested, 0 unchanged, 1 failed" in res.output
    res = runner.invoke(app, ["catalog", str(tmp_path / "out"), "--csv", "-"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("scan_id,source,store,sha256") and len(lines) == 3
    res = runner.invoke(app, ["catalog", str(tmp_path / "out")])
    assert res.exit_code == 0 and "2 scans" in res.output
    (src / "b.h5").unlink()
    res = runner.invoke(
        app, ["ingest-archive", str(src / "*.h5"), str(tmp_path / "out"), "--parallel", "sync"]
    )
    assert res.exit_code == 0, res.output
    assert "0 ingested, 1 unchanged, 0 failed" in res.output
