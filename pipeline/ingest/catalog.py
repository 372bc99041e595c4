"""The archive catalog: one row per source file, as a small xarray/Zarr table.

`OUTDIR/catalog.zarr`, dimension `entry`; columns are 1-D variables. It is rewritten whole
(a hidden sibling, then a rename) after each archive run, so a crash never leaves half a table.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ptyinr.errors import StoreError
from ptyinr.store import move_into_place

CATALOG_NAME = "catalog.zarr"
TEXT_COLUMNS = (
    "scan_id",
    "source",
    "store",
    "sha256",
    "format",
    "status",
    "error",
    "dtype",
    "positions_unit",
    "fingerprint",
    "ingested_at",
)
INT_COLUMNS = ("frames", "frame_y", "frame_x")
FLOAT_COLUMNS = ("wavelength_m", "detector_distance_m", "detector_pixel_size_m", "bytes")
COLUMNS = (*TEXT_COLUMNS, *INT_COLUMNS, *FLOAT_COLUMNS)


def catalog_path(outdir: str | os.PathLike) -> Path:
    return Path(outdir) / CATALOG_NAME


def read_catalog(outdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of the catalog (empty when there is none yet)."""
    path = catalog_path(outdir)
    if not path.exists():
        return []
    try:
        ds = xr.open_zarr(path, consolidated=False, zarr_format=3).load()
    except Exception as exc:
        raise StoreError(
            f"{path}: cannot be read as a catalog ({exc}); expected the "
            "catalog.zarr written by `ptyinr ingest-archive`"
        ) from exc
    rows = []
    for i in range(ds.sizes.get("entry", 0)):
        row: dict[str, Any] = {}
        for col in COLUMNS:
            if col not in ds:
                row[col] = None
                continue
            v = ds[col].values[i]
            if col in TEXT_COLUMNS:
                row[col] = str(v) if v is not None and str(v) != "" else None
            elif col in INT_COLUMNS:
                row[col] = int(v) if int(v) >= 0 else None
            else:
                row[col] = None if math.isnan(float(v)) else float(v)
        rows.append(row)
    return rows


def write_catalog(outdir: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Replace the catalog with `rows` (atomically)."""
    path = catalog_path(outdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    for col in TEXT_COLUMNS:
        data[col] = ("entry", np.array([_text(r.get(col)) for r in rows], dtype=object))
    for col in INT_COLUMNS:
        data[col] = ("entry", np.array([_int(r.get(col)) for r in rows], dtype=np.int64))
    for col in FLOAT_COLUMNS:
        data[col] = ("entry", np.array([_float(r.get(col)) for r in rows], dtype=np.float64))
    ds = xr.Dataset(data, attrs={"description": "ptyinr ingest catalog, one row per source"})
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        ds.to_zarr(tmp, mode="w-", consolidated=False, zarr_format=3)
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def _int(v: Any) -> int:
    return -1 if v is None else int(v)


def _float(v: Any) -> float:
    return float("nan") if v is None else float(v)
