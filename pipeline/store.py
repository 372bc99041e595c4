"""Scan stores: one Zarr v3 store per scan, read and written as xarray Datasets.

Layout (README, "Scan stores"):

```
<scan>.zarr
  intensities   (scan, det_y, det_x)  counts as measured, integer or float32, zero frequency
                centred; chunk = 1 frame, shard = many frames, blosc zstd + bitshuffle
  positions     (scan, axis)          float64, axis = ["y", "x"], metres or pixels
  mask          (det_y, det_x)        bool, optional: True marks a bad / dead pixel
  preprocessed  (scan, pre_y, pre_x)  float32, optional, written by ptyinr.preprocess
  attrs         schema_version, wavelength_m, detector_distance_m, detector_pixel_size_m,
                positions_unit ("m" | "px"), scan_id, source, source_sha256, ...
  reconstructions/<run_id>[/<subgroup>]   results written back by the pipeline
```

While a run is being written, its driver holds a lock file beside the store (not in it:
`run_lock_path`, `acquire_run_lock`). The parts of a run (full, halves, snapshots) are
written by their own tasks meanwhile; every change of the run group's attrs, which they
share, and every consolidation holds the store's lock (`_consolidate_lock`: a thread lock
and a flock on `.<store>.consolidate.lock` beside the store), so none drops another's.

Labelled, self-describing data: every variable and coordinate written here carries
`long_name` and `units` (`VARIABLE_LABELS`, CF-style); the root's zarr.json holds the
consolidated metadata of the hierarchy, rewritten after every write (`consolidate`), so plain
`xarray.open_zarr(store)` and `xarray.open_zarr(store, group="reconstructions/<run_id>")`
open in one read without a warning. The pipeline's own readers never trust that copy (it may
lag a concurrent writer): they read each node's metadata. Attributes keep NaN as NaN, and
paths in or beside the store are stored relative to the store (`relative_paths`).

Why this module exists: every other stage reads and writes through it, so the schema is
checked in one place (`open_scan_store`) and a store is either complete or invisible
(`create_scan_store` writes to a hidden sibling and renames). Raw arrays are written once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import math
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.common import ZARR_JSON
from zarr.core.group import ConsolidatedMetadata

from ptyinr.errors import StoreError
from ptyinr.geometry import object_pixel_size_m

SCHEMA_VERSION = 1

INTENSITIES = "intensities"
POSITIONS = "positions"
MASK = "mask"
PREPROCESSED = "preprocessed"
RECONSTRUCTIONS = "reconstructions"
CHECKPOINTS = "checkpoints"  # scratch of unfinished runs (ptyinr.reconstruct), not consolidated

GEOMETRY_KEYS = ("wavelength_m", "detector_distance_m", "detector_pixel_size_m")
REQUIRED_ATTRS = (*GEOMETRY_KEYS, "positions_unit", "scan_id")
POSITIONS_UNITS = ("m", "px")

# Plausible ranges of the geometry, in SI units. Values outside are almost always a unit slip
# (a wavelength in nm or a pixel size in um written as metres) and are refused, not guessed at.
GEOMETRY_RANGES: dict[str, tuple[float, float]] = {
    "wavelength_m": (1e-13, 1e-5),
    "detector_distance_m": (1e-4, 1e3),
    "detector_pixel_size_m": (1e-8, 1e-2),
}

# Target uncompressed size of one shard when the caller does not choose frames_per_shard.
_SHARD_TARGET_BYTES = 32 * 2**20
_RAW_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64)


# --------------------------------------------------------------------------------------------
# helpers


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy of `value` (numpy scalars/arrays, Paths, tuples, complex).

    NaN and infinities stay floats: Zarr writes them as the JSON tokens NaN / Infinity (as
    Python's json does) and reads them back as floats, so a missing number reads as NaN, not
    as a string. `strict_json` maps them to None instead, for files other tools parse.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, complex):
        return [json_safe(value.real), json_safe(value.imag)]
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if hasattr(value, "model_dump"):  # pydantic models (resolved configs)
        return json_safe(value.model_dump())
    return str(value)


def strict_json(value: Any) -> Any:
    """`json_safe(value)` with NaN and infinities as None: for files that other tools parse
    with a standard JSON parser (NaN / Infinity are not JSON)."""
    value = json_safe(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _hidden_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"


def _default_frames_per_shard(n: int, frame_shape: tuple[int, int], itemsize: int) -> int:
    per_frame = max(1, frame_shape[0] * frame_shape[1] * itemsize)
    return int(max(1, min(n, _SHARD_TARGET_BYTES // per_frame)))


def frame_codecs() -> tuple[BloscCodec, ...]:
    """Compression of frame arrays: blosc zstd + bitshuffle.

    Level 1: on Poisson counts it compresses as well as level 5 (8.8x vs 9.0x on 256 x 256
    uint16 frames) at three times the speed (0.64 vs 0.19 GB/s on 2 cores).
    """
    return (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),)


# --------------------------------------------------------------------------------------------
# labels: long_name and units of every variable (CF conventions where they have one)

#: Stands for the length unit of the store or run: "m" with geometry, "px" without.
LENGTH = "<length>"

#: long_name and units of each variable a store or run group holds. Units are UDUNITS
#: strings as CF asks ("1": dimensionless), except "px" (object pixels: UDUNITS has no pixel)
#: and "sqrt(counts)" (a simulated probe, whose |P|^2 is in counts: UDUNITS has no square
#: root). Flags (bool) and text labels carry a long_name and no units: they are not
#: quantities. Complex arrays: the units are those of the complex value (its modulus); the
#: phase of a complex value is in radians.
VARIABLE_LABELS: dict[str, tuple[str, str | None]] = {
    # scan stores
    INTENSITIES: ("diffraction intensity, zero frequency at the frame centre", "counts"),
    POSITIONS: ("probe position (window centre) in the object plane", LENGTH),
    "axis": ("position component", None),
    MASK: ("bad detector pixel (True: not used)", None),
    PREPROCESSED: ("preprocessed diffraction intensity", "counts"),
    "preprocessed_mask": ("bad pixel of the preprocessed frames (True: not used)", None),
    "true_object": ("ground-truth object transmission (complex, dimensionless)", "1"),
    "true_object_y": ("ground-truth object y coordinate", LENGTH),
    "true_object_x": ("ground-truth object x coordinate", LENGTH),
    "true_probe": (
        "ground-truth probe, complex amplitude (|probe|^2 in counts per pixel)",
        "sqrt(counts)",
    ),
    # run groups
    "object": ("reconstructed object transmission (complex, dimensionless)", "1"),
    "probe": (
        "reconstructed probe, complex amplitude (|probe|^2 x the run's intensity_scale is in "
        "counts per pixel)",
        "1",
    ),
    "loss": ("training loss (of the normalised data)", "1"),
    "epoch": ("training epoch", "1"),
    "y": ("object y coordinate (pixel centre)", LENGTH),
    "x": ("object x coordinate (pixel centre)", LENGTH),
    "probe_y": ("probe y coordinate from the window centre", LENGTH),
    "probe_x": ("probe x coordinate from the window centre", LENGTH),
    "refined_positions": (
        "probe position (window centre) in the object plane after position refinement "
        "(measured + refined offset; measured where not refined)",
        LENGTH,
    ),
    "frc": ("Fourier ring correlation of the half-scan reconstructions", "1"),
    "half_bit_threshold": ("half-bit threshold (van Heel & Schatz 2005)", "1"),
    "n_pixels": ("pixels in the Fourier ring", "1"),
    "spatial_frequency": ("spatial frequency", None),  # units set by evaluate.frc: 1/m or 1/px
}


def variable_label(name: str, length_unit: str | None = None) -> dict[str, str]:
    """{"long_name": ..., "units": ...} of a variable in `VARIABLE_LABELS` (units left out
    where it has none, or where it is a length and `length_unit` is None)."""
    long_name, units = VARIABLE_LABELS[name]
    if units == LENGTH:
        units = length_unit
    return {"long_name": long_name} if units is None else {"long_name": long_name, "units": units}


def label_variables(ds: xr.Dataset, length_unit: str | None) -> xr.Dataset:
    """A copy of `ds` whose variables and coordinates carry `long_name` and `units`.

    Attributes already set win (the writer knows its data). `length_unit` ("m" or "px", the
    store's positions_unit) fills the units of lengths; None leaves them as they are.
    Variables not in `VARIABLE_LABELS` are left alone.
    """
    out = ds.copy()
    for name in list(out.variables):
        if str(name) not in VARIABLE_LABELS:
            continue
        var = out.variables[name]
        var.attrs = {**variable_label(str(name), length_unit), **var.attrs}
    return out


# --------------------------------------------------------------------------------------------
# paths in attributes: relative to the store


def relative_paths(value: Any, store_path: str | os.PathLike) -> Any:
    """`value` with paths that lie in or beside the store made relative to the store.

    A store is moved and copied whole, with its neighbours (figures, source files): an
    absolute path would then point at the old place. Converted: `Path` objects, and strings
    that are absolute paths, whose target lies under the store's parent folder, and the store
    path itself as given (often relative to the working directory, which means nothing to a
    later reader). The result is relative to the store directory: read it back as
    `store_path / value` (`"."` is the store, `"../x.h5"` a file beside it). Other strings
    and paths elsewhere are kept as they are.
    """
    store_abs = os.path.abspath(store_path)
    parent = os.path.dirname(store_abs)
    given = str(store_path)

    def convert(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        is_path = isinstance(v, (Path, os.PathLike))
        if not is_path and not isinstance(v, str):
            return v
        text = os.fspath(v)
        if not isinstance(text, str) or not text:
            return v
        if text == given:
            return "."
        if not is_path and not os.path.isabs(text):
            return v
        target = os.path.abspath(text)
        if target == parent or target.startswith(parent.rstrip(os.sep) + os.sep):
            return os.path.relpath(target, store_abs)
        return text

    return convert(value)


# --------------------------------------------------------------------------------------------
# consolidated metadata

_CONSOLIDATE_THREAD_LOCK = threading.Lock()
_CONSOLIDATE_TRIES = 5


def consolidate_lock_path(path: str | os.PathLike) -> Path:
    """`<store parent>/.<store name>.consolidate.lock`: beside the store (Zarr warns about
    files in it that are not part of the hierarchy)."""
    path = Path(path)
    return path.parent / f".{path.name}.consolidate.lock"


@contextlib.contextmanager
def _consolidate_lock(path: Path):
    """Serialise consolidations of one store: across threads (a lock), processes and hosts
    (flock on a file beside the store; NFS maps it to a POSIX lock). Where the file cannot be
    made (a read-only folder), only the thread lock is held."""
    with _CONSOLIDATE_THREAD_LOCK:
        try:
            fd = os.open(consolidate_lock_path(path), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


def _hierarchy_metadata(group: zarr.Group, prefix: str, out: dict[str, Any]) -> None:
    """Metadata of every node below `group` (flat, keyed by path), read from each node's own
    zarr.json. Skipped: hidden names (a run being deleted, a scratch copy) and the
    `checkpoints` folder (scratch of unfinished runs, rewritten while others write)."""
    for name, node in group.members():
        if name.startswith(".") or (not prefix and name == CHECKPOINTS):
            continue
        key = f"{prefix}{name}"
        meta = node.metadata
        if isinstance(node, zarr.Group):
            meta = dataclasses.replace(meta, consolidated_metadata=None)
            out[key] = meta
            _hierarchy_metadata(node, f"{key}/", out)
        else:
            out[key] = meta


def _write_consolidated(path: Path, attrs: Mapping[str, Any] | None = None) -> None:
    """Rewrite the root zarr.json with the hierarchy's consolidated metadata (and `attrs`
    added to the root's attributes: one write instead of two where a caller has some)."""
    root = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=False)
    flat: dict[str, Any] = {}
    with warnings.catch_warnings():
        # a folder being written or deleted by another process is not yet/no longer a node
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        _hierarchy_metadata(root, "", flat)
    consolidated = ConsolidatedMetadata.from_dict(
        {
            "kind": "inline",
            "must_understand": False,
            "metadata": {k: v.to_dict() for k, v in flat.items()},
        }
    )
    meta = dataclasses.replace(root.metadata, consolidated_metadata=consolidated)
    if attrs:
        meta = dataclasses.replace(meta, attributes={**meta.attributes, **attrs})
    data = meta.to_buffer_dict(default_buffer_prototype())[ZARR_JSON].to_bytes()
    # Replace zarr.json atomically: a reader never sees half of it. The scratch file is
    # beside the store, on the same file system.
    tmp = _hidden_sibling(path, "zarr-json")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path / ZARR_JSON)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def consolidate(path: str | os.PathLike) -> None:
    """Write the store's consolidated metadata (the metadata of every array and group, in
    the root's zarr.json), so that `xarray.open_zarr(store)` and `xarray.open_zarr(store,
    group="reconstructions/<run_id>")` open it in one read and without warnings.

    Call it after every write that changes the hierarchy or its attributes: the pipeline's
    own readers never use the consolidated copy (it may lag a concurrent writer), readers
    elsewhere do. Consolidations of a store are serialised (`_consolidate_lock`), and each
    reads every node afresh, so the last one, which follows the last write, sees everything.
    A node changing under the walk (another writer) is retried.
    """
    path = Path(path)
    _require_store_dir(path)
    with _consolidate_lock(path):
        _consolidate_locked(path)


def _consolidate_locked(path: Path) -> None:
    """`consolidate` for a caller that holds `_consolidate_lock(path)` already."""
    for attempt in range(_CONSOLIDATE_TRIES):
        try:
            _write_consolidated(path)
            return
        except (FileNotFoundError, KeyError, ValueError) as exc:
            if attempt == _CONSOLIDATE_TRIES - 1:
                raise StoreError(
                    f"{path}: cannot consolidate the metadata ({exc}); expected a store "
                    "whose nodes stay readable"
                ) from exc
            time.sleep(0.05 * (attempt + 1))


def _put_run_attrs(
    path: Path, run_id: str, new_attrs: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """Replace a run group's attrs by `new_attrs(current attrs)`, read afresh from disk.

    Call it holding `_consolidate_lock(path)`: the run group's attrs are shared by every
    part of a run (full, halves, snapshots, the driver's status), each written by its own
    task; an unlocked read-modify-write could write back attrs read before another
    writer's update and so drop it.
    """
    run = zarr.open_group(
        str(path), path=_run_group_path(run_id), mode="r+", zarr_format=3, use_consolidated=False
    )
    attrs = new_attrs(dict(run.attrs))
    run.attrs.put(attrs)
    return attrs


def check_geometry(attrs: Mapping[str, Any], where: str) -> None:
    """Geometry is either absent (all None, pixel units) or complete, finite and plausible."""
    values = {k: attrs.get(k) for k in GEOMETRY_KEYS}
    present = [k for k, v in values.items() if v is not None]
    unit = attrs.get("positions_unit")
    if unit not in POSITIONS_UNITS:
        raise StoreError(
            f"{where}: attribute positions_unit={unit!r}; expected one of {POSITIONS_UNITS}"
        )
    if present and len(present) != len(GEOMETRY_KEYS):
        missing = [k for k in GEOMETRY_KEYS if values[k] is None]
        raise StoreError(
            f"{where}: geometry is incomplete: {', '.join(missing)} missing while "
            f"{', '.join(present)} given; expected all three or none (pixel units)"
        )
    for key in present:
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise StoreError(f"{where}: attribute {key}={v!r}; expected a number in SI units")
        v = float(v)
        lo, hi = GEOMETRY_RANGES[key]
        if not math.isfinite(v) or v <= 0:
            raise StoreError(f"{where}: attribute {key}={v!r}; expected a positive finite number")
        if not lo <= v <= hi:
            raise StoreError(
                f"{where}: attribute {key}={v!r} is outside the plausible range [{lo:g}, {hi:g}] "
                "(wrong unit?); expected SI units (metres)"
            )
    if unit == "m" and not present:
        raise StoreError(
            f"{where}: positions_unit='m' but no geometry (wavelength_m, detector_distance_m, "
            "detector_pixel_size_m); expected geometry, or positions_unit='px'"
        )


# --------------------------------------------------------------------------------------------
# creating and opening scan stores


class StoreExists(StoreError):
    """A store appeared at the target path while a new one was written without overwrite."""


def create_scan_store(
    path: str | os.PathLike,
    intensities: np.ndarray | da.Array,
    positions: np.ndarray,
    *,
    attrs: dict,
    mask: np.ndarray | None = None,
    extra_vars: dict[str, xr.DataArray] | None = None,
    frames_per_shard: int | None = None,
    overwrite: bool = False,
    final_attrs: Callable[[], dict] | None = None,
    tmp: str | os.PathLike | None = None,
) -> Path:
    """Write a new scan store at `path` and return its path.

    `intensities` (n, det_y, det_x) may be a numpy or a dask array: a dask array is streamed
    shard by shard (one task per shard), so memory stays bounded by a few shards. Integer
    counts are kept in their dtype; floating counts are stored as float32 (the cast is recorded
    in attrs `intensities_cast_from`). The store is written to a hidden sibling and renamed
    into place only when complete; with `overwrite`, an existing store is replaced only after
    the new one is complete. `final_attrs`, if given, is called after the arrays are written
    and before the rename; its attrs are added (ingest hashes the source meanwhile).
    `tmp`: the hidden directory (beside `path`, not existing yet) to write in, for a caller
    that names it so it can sweep it after a crash (ingest); default a fresh hidden sibling.
    Without `overwrite`, a store that appeared at `path` during the write is kept and the
    new one removed (StoreError).
    """
    path = Path(path)
    where = str(path)
    if path.exists() and not overwrite:
        raise StoreExists(f"{where}: already exists; expected a new path (or overwrite=True)")

    # ---- intensities
    if not isinstance(intensities, da.Array):
        intensities = np.asarray(intensities)
    if intensities.ndim != 3:
        raise StoreError(
            f"{where}: intensities shape {tuple(intensities.shape)}; expected (scan, det_y, det_x)"
        )
    n, det_y, det_x = (int(s) for s in intensities.shape)
    if n == 0 or det_y == 0 or det_x == 0:
        raise StoreError(f"{where}: intensities shape {(n, det_y, det_x)}; expected no empty axis")
    dtype = np.dtype(intensities.dtype)
    cast_from = None
    if dtype.kind in "iu":
        if dtype.type not in _RAW_DTYPES:
            raise StoreError(f"{where}: intensities dtype {dtype}; expected an integer or float")
    elif dtype.kind == "f":
        if dtype != np.float32:
            cast_from = str(dtype)
            intensities = intensities.astype(np.float32)
    else:
        raise StoreError(f"{where}: intensities dtype {dtype}; expected integer or float counts")
    out_dtype = np.dtype(intensities.dtype)

    fps = frames_per_shard or _default_frames_per_shard(n, (det_y, det_x), out_dtype.itemsize)
    if fps < 1:
        raise StoreError(f"{where}: frames_per_shard={fps}; expected >= 1")
    fps = min(int(fps), n)
    # Dask chunks must line up with shards so exactly one task writes each shard.
    frames = (
        intensities.rechunk((fps, det_y, det_x))
        if isinstance(intensities, da.Array)
        else da.from_array(intensities, chunks=(fps, det_y, det_x))
    )

    # ---- positions
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (n, 2):
        raise StoreError(
            f"{where}: positions shape {pos.shape}; expected ({n}, 2) = (frames, [y, x]) "
            f"to match {n} frames"
        )
    if not np.all(np.isfinite(pos)):
        bad = int(np.flatnonzero(~np.isfinite(pos).all(axis=1))[0])
        raise StoreError(f"{where}: positions[{bad}]={pos[bad].tolist()}; expected finite values")

    # ---- attrs
    attrs = dict(attrs)
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(f"{where}: attrs lack {', '.join(missing)}; expected {REQUIRED_ATTRS}")
    check_geometry(attrs, where)
    attrs.setdefault("source", None)
    attrs["schema_version"] = SCHEMA_VERSION
    attrs.setdefault("created", _now())
    if cast_from is not None:
        attrs["intensities_cast_from"] = cast_from

    data_vars: dict[str, Any] = {
        INTENSITIES: (("scan", "det_y", "det_x"), frames),
        POSITIONS: (("scan", "axis"), pos),
    }
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (det_y, det_x):
            raise StoreError(
                f"{where}: mask shape {m.shape}; expected the frame shape {(det_y, det_x)}"
            )
        data_vars[MASK] = (("det_y", "det_x"), m.astype(bool))
    ds = xr.Dataset(data_vars, coords={"axis": np.array(["y", "x"], dtype=object)})
    for name, var in (extra_vars or {}).items():
        if name in ds:
            raise StoreError(f"{where}: extra variable {name!r} collides with a schema variable")
        if not isinstance(var, xr.DataArray):
            raise StoreError(
                f"{where}: extra variable {name!r} is {type(var).__name__}; "
                "expected an xarray.DataArray"
            )
        if np.dtype(var.dtype) == np.complex128:
            var = var.astype(np.complex64)  # complex64, never complex128 (README)
        ds[name] = var
    ds = label_variables(ds, attrs["positions_unit"])
    ds.attrs = json_safe(relative_paths(attrs, path))

    encoding = {
        INTENSITIES: {
            "chunks": (1, det_y, det_x),
            "shards": (fps, det_y, det_x),
            "compressors": frame_codecs(),
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else _hidden_sibling(path, "tmp")
    try:
        # Encode all chunks of a shard in one batch (less per-chunk overhead in zarr).
        with zarr.config.set({"codec_pipeline.batch_size": max(1, fps)}):
            ds.to_zarr(tmp, mode="w-", consolidated=False, zarr_format=3, encoding=encoding)
        extra = json_safe(relative_paths(final_attrs(), path)) if final_attrs else None
        # The final attrs go into the same root zarr.json write as the consolidated metadata.
        _write_consolidated(tmp, extra)  # nobody else sees `tmp`: no lock needed
        if path.exists() and not overwrite:
            raise StoreExists(
                f"{where}: already exists (created meanwhile); expected a new path "
                "(or overwrite=True)"
            )
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def move_into_place(tmp: Path, path: Path) -> None:
    """Make a completely written directory `tmp` appear at `path`, replacing what was there.

    The old content is moved aside first and deleted only after the new one is in place, so
    at every moment `path` is either the old complete store or the new complete one.
    """
    if path.exists():
        old = _hidden_sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def _zarr_root(path: Path) -> zarr.Group:
    where = str(path)
    if not path.exists():
        raise StoreError(f"{where}: does not exist; expected a scan store (.zarr directory)")
    if not path.is_dir():
        raise StoreError(f"{where}: is a file; expected a scan store (.zarr directory)")
    if not (path / "zarr.json").is_file():
        if (path / ".zgroup").exists() or (path / ".zarray").exists():
            raise StoreError(f"{where}: is a Zarr v2 store; expected Zarr v3 (zarr.json)")
        raise StoreError(f"{where}: no zarr.json; expected a Zarr v3 scan store")
    try:
        # never the consolidated copy: it may lag a writer that has not consolidated yet
        root = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=False)
    except Exception as exc:  # corrupt metadata, an array at the root, ...
        raise StoreError(f"{where}: cannot be opened as a Zarr v3 group ({exc})") from exc
    return root


def _dims(arr: zarr.Array) -> tuple[str, ...] | None:
    names = arr.metadata.dimension_names if hasattr(arr.metadata, "dimension_names") else None
    return tuple(names) if names is not None else None


def open_scan_store(path: str | os.PathLike) -> xr.Dataset:
    """Open a scan store lazily (dask-backed) after checking it against the schema.

    Each way a store can be wrong raises `StoreError` naming the path, the key, the value
    found and what was expected. Intensities are chunked one shard per dask chunk.
    """
    path = Path(path)
    where = str(path)
    root = _zarr_root(path)
    attrs = dict(root.attrs)

    version = attrs.get("schema_version")
    if version is None:
        raise StoreError(
            f"{where}: attribute schema_version missing; expected {SCHEMA_VERSION} "
            "(not a ptyinr scan store?)"
        )
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{where}: attribute schema_version={version!r}; expected {SCHEMA_VERSION}"
        )

    members = dict(root.arrays())
    for key, dims in ((INTENSITIES, ("scan", "det_y", "det_x")), (POSITIONS, ("scan", "axis"))):
        if key not in members:
            raise StoreError(f"{where}: array {key!r} missing; expected {key} {dims}")
        found = _dims(members[key])
        if found != dims:
            raise StoreError(f"{where}: array {key!r} has dims {found}; expected {dims}")
    inten, pos = members[INTENSITIES], members[POSITIONS]
    if pos.shape[1] != 2:
        raise StoreError(f"{where}: array 'positions' shape {pos.shape}; expected (scan, 2)")
    if inten.shape[0] != pos.shape[0]:
        raise StoreError(
            f"{where}: {inten.shape[0]} frames in 'intensities' but {pos.shape[0]} rows in "
            "'positions'; expected equal counts"
        )
    if inten.dtype.kind not in "iuf":
        raise StoreError(
            f"{where}: array 'intensities' dtype {inten.dtype}; expected integer or float"
        )
    if pos.dtype.kind != "f":
        raise StoreError(f"{where}: array 'positions' dtype {pos.dtype}; expected float64")
    if PREPROCESSED in members:
        pre = members[PREPROCESSED]
        if _dims(pre) != ("scan", "pre_y", "pre_x") or pre.shape[0] != inten.shape[0]:
            raise StoreError(
                f"{where}: array 'preprocessed' dims {_dims(pre)} shape {pre.shape}; expected "
                f"(scan, pre_y, pre_x) with {inten.shape[0]} frames"
            )
    if MASK in members:
        m = members[MASK]
        if _dims(m) != ("det_y", "det_x") or m.dtype != np.bool_:
            raise StoreError(
                f"{where}: array 'mask' dims {_dims(m)} dtype {m.dtype}; "
                "expected (det_y, det_x) bool"
            )
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(
            f"{where}: attributes {', '.join(missing)} missing; expected all of {REQUIRED_ATTRS}"
        )
    check_geometry(attrs, where)

    shard = inten.shards or inten.chunks
    try:
        with warnings.catch_warnings():
            # positions are one small chunk; splitting it along scan like the shards is harmless
            warnings.filterwarnings("ignore", message="The specified chunks separate")
            ds = xr.open_zarr(
                str(path), consolidated=False, zarr_format=3, chunks={"scan": int(shard[0])}
            )
    except Exception as exc:
        raise StoreError(f"{where}: cannot be read as an xarray Dataset ({exc})") from exc
    axis = [str(a) for a in ds["axis"].values] if "axis" in ds.coords else None
    if axis != ["y", "x"]:
        raise StoreError(f"{where}: coordinate 'axis'={axis}; expected ['y', 'x']")
    pv = np.asarray(ds[POSITIONS].values)
    if not np.all(np.isfinite(pv)):
        bad = int(np.flatnonzero(~np.isfinite(pv).all(axis=1))[0])
        raise StoreError(f"{where}: positions[{bad}]={pv[bad].tolist()}; expected finite values")
    ds.encoding["source"] = where
    return ds


# --------------------------------------------------------------------------------------------
# units


def object_pixel_size(
    ds: xr.Dataset,
    frame_shape: tuple[int, int],
    *,
    detector_pixel_size_m: float | None = None,
) -> tuple[float, float] | None:
    """Object pixel size (y, x) in metres for frames of `frame_shape`, or None (pixel units).

    The effective detector pixel is `detector_pixel_size_m` when given, else the
    `preprocessed` array's own (binning enlarges it) when `frame_shape` is that array's frame
    shape, else the raw detector's. Cropping changes the pixel size, binning does not.
    """
    a = ds.attrs
    if any(a.get(k) is None for k in GEOMETRY_KEYS):
        return None
    pixel = detector_pixel_size_m
    if pixel is None:
        pixel = float(a["detector_pixel_size_m"])
        if PREPROCESSED in ds:
            pre = ds[PREPROCESSED]
            pre_shape = tuple(int(s) for s in pre.shape[1:])
            raw_shape = tuple(int(s) for s in ds[INTENSITIES].shape[1:])
            eff = pre.attrs.get("detector_pixel_size_m")
            if eff is not None and tuple(frame_shape) == pre_shape and pre_shape != raw_shape:
                pixel = float(eff)
    return object_pixel_size_m(
        float(a["wavelength_m"]),
        float(a["detector_distance_m"]),
        pixel,
        (int(frame_shape[0]), int(frame_shape[1])),
    )


def positions_px(
    ds: xr.Dataset,
    frame_shape: tuple[int, int],
    *,
    detector_pixel_size_m: float | None = None,
) -> np.ndarray:
    """Scan positions (n, 2) float64 in object pixels (y, x) for frames of `frame_shape`."""
    pos = np.asarray(ds[POSITIONS].values, dtype=np.float64)
    unit = ds.attrs.get("positions_unit")
    if unit == "px":
        return pos.copy()
    size = object_pixel_size(ds, frame_shape, detector_pixel_size_m=detector_pixel_size_m)
    if size is None:
        raise StoreError(
            f"{ds.encoding.get('source', '<dataset>')}: positions_unit={unit!r} without "
            "geometry; expected geometry attrs or positions_unit='px'"
        )
    return pos / np.asarray(size, dtype=np.float64)


def resolve_source(ds: xr.Dataset, source: str) -> str:
    """data.source decided for this store ("auto": preprocessed when present), checked to
    exist: the one place a run's choice of frames is validated (StoreError naming the store)."""
    if source == "auto":
        source = PREPROCESSED if PREPROCESSED in ds else INTENSITIES
    if source not in (INTENSITIES, PREPROCESSED):
        raise StoreError(f"data.source = {source!r}; expected intensities, preprocessed or auto")
    if source not in ds:
        raise StoreError(
            f"{ds.encoding.get('source', '<dataset>')}: data.source = {source!r} but the store "
            f"has no {source!r} array; run `ptyinr preprocess` (or pass --preprocess) or set "
            "data.source=intensities"
        )
    return source


def load_frames(
    ds: xr.Dataset, source: str = "auto", indices: np.ndarray | list[int] | slice | None = None
) -> np.ndarray:
    """Frames as a float32 numpy array in memory (for training).

    `source`: "intensities" (raw), "preprocessed", or "auto" (preprocessed when present).
    `indices` selects frames along `scan` (default all).
    """
    source = resolve_source(ds, source)
    arr = ds[source]
    if indices is not None:
        arr = arr.isel(scan=indices)
    data = arr.data
    if isinstance(data, da.Array):
        data = data.astype(np.float32).compute()
    return np.ascontiguousarray(np.asarray(data, dtype=np.float32))


# --------------------------------------------------------------------------------------------
# reconstructions written back into the store


def check_run_id(run_id: str) -> None:
    """StoreError unless `run_id` can name a run group (non-empty, no '/', no leading '.')."""
    _run_group_path(run_id)


def _run_group_path(run_id: str, subgroup: str | None = None) -> str:
    for name, value in (("run_id", run_id), ("subgroup", subgroup)):
        if value is None:
            continue
        if not value or "/" in value or value.startswith(".") or value != value.strip():
            raise StoreError(f"{name}={value!r}; expected a non-empty name without '/'")
    p = f"{RECONSTRUCTIONS}/{run_id}"
    return f"{p}/{subgroup}" if subgroup else p


def _require_store_dir(path: Path) -> None:
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a Zarr v3 store (no zarr.json); expected a scan store")


def _length_unit_of(attrs: Mapping[str, Any]) -> str | None:
    unit = attrs.get("positions_unit")
    return unit if unit in POSITIONS_UNITS else None


# Variables only some results have (train.refine_positions: refined_positions and its axis
# coordinate): a rewritten result (one with an object) without them drops the old ones, so a
# run never shows another fit's positions.
OPTIONAL_RESULT_VARIABLES = ("refined_positions", "axis")


def write_run(
    path: str | os.PathLike,
    run_id: str,
    result: xr.Dataset,
    *,
    attrs: dict,
    subgroup: str | None = None,
) -> None:
    """Write a reconstruction's arrays and attrs to `reconstructions/<run_id>[/<subgroup>]`.

    The run group gets status "running" (and `created` on its first write); only
    `mark_run(..., "complete")`, called last by the caller, makes it look done. Variables of
    the same name are replaced, the `OPTIONAL_RESULT_VARIABLES` a result lacks are removed,
    other variables and subgroups are kept. Different run ids touch disjoint directories, so
    concurrent writers do not interfere. Variables get their labels (`label_variables`),
    attrs their store-relative paths, and the store's consolidated metadata is rewritten last
    (`consolidate`).
    """
    path = Path(path)
    _require_store_dir(path)
    group = _run_group_path(run_id, subgroup)
    out = result.copy()
    for name in list(out.variables):
        if np.dtype(out[name].dtype) == np.complex128:
            out[name] = out[name].astype(np.complex64)
        out[name].encoding = {}
    out = label_variables(out, _length_unit_of({**result.attrs, **attrs}))
    out.attrs = json_safe(relative_paths({**result.attrs, **attrs}, path))

    # Create the run group (and the parents) explicitly, then drop arrays about to be replaced.
    root = zarr.open_group(str(path), mode="r+", zarr_format=3, use_consolidated=False)
    recon = root.require_group(RECONSTRUCTIONS)
    run = recon.require_group(run_id)
    target = run.require_group(subgroup) if subgroup else run
    existing = set(dict(target.arrays()))
    stale = set(OPTIONAL_RESULT_VARIABLES) - set(out.variables) if "object" in out else set()
    for name in existing & (set(out.variables) | stale):
        del target[name]
    # Replace the target group's attrs (a rewrite must not keep stale attrs) without touching
    # its children. The run group's in one write that says "running": at no moment of a
    # rewrite (a driver or worker may be killed at any) is the run without a status, or
    # still "complete" while its arrays are being replaced. Every read-modify-write of the
    # run group's attrs (shared by all parts of the run) holds the store's lock
    # (`_put_run_attrs`), as consolidations do; the arrays are written without it.
    if subgroup:
        target.attrs.put({})
    else:
        with _consolidate_lock(path):
            running = _put_run_attrs(path, run_id, lambda a: _running(a, keep=False))
        out.attrs = {**out.attrs, **running}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        out.to_zarr(str(path), group=group, mode="a", consolidated=False, zarr_format=3)
    with _consolidate_lock(path):
        if subgroup:
            _put_run_attrs(path, run_id, lambda a: _running(a, keep=True))
        else:
            # to_zarr wrote the run's attrs without the lock: a subgroup writer that had read
            # them just before may have written its older copy back. Write them again under
            # the lock, exactly (not merged: the rewrite keeps no stale attrs).
            _put_run_attrs(path, run_id, lambda a: {**out.attrs, "updated": _now()})
        _consolidate_locked(path)


def _running(attrs: dict[str, Any], *, keep: bool) -> dict[str, Any]:
    """A run's attrs saying "running" (now), `created` kept; the others kept if `keep`."""
    now = _now()
    kept = attrs if keep else {}
    return {**kept, "created": attrs.get("created", now), "status": "running", "updated": now}


def mark_run(path: str | os.PathLike, run_id: str, status: str, **attrs: Any) -> None:
    """Set a run's status (e.g. "complete", "failed") and extra attrs; call it last."""
    path = Path(path)
    _require_store_dir(path)
    update = json_safe(relative_paths({**attrs, "status": status, "updated": _now()}, path))
    with _consolidate_lock(path):  # the run group's attrs are shared: see `_put_run_attrs`
        try:
            _put_run_attrs(path, run_id, lambda a: {**a, **update})
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(
                f"{path}: run {run_id!r} does not exist; expected a written run"
            ) from exc
        _consolidate_locked(path)


def list_runs(path: str | os.PathLike) -> list[dict]:
    """All runs in a store: run_id, status, created and the run's attrs, oldest first."""
    path = Path(path)
    _require_store_dir(path)
    root = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=False)
    if RECONSTRUCTIONS not in root:
        return []
    runs = []
    for run_id, group in root[RECONSTRUCTIONS].groups():
        a = dict(group.attrs)
        runs.append(
            {
                **a,
                "run_id": run_id,
                "status": a.get("status", "unknown"),
                "created": a.get("created"),
                "subgroups": sorted(name for name, _ in group.groups()),
            }
        )
    runs.sort(key=lambda r: (r["created"] or "", r["run_id"]))
    return runs


def open_run(path: str | os.PathLike, run_id: str, subgroup: str | None = None) -> xr.Dataset:
    """Open a run (or one of its subgroups) lazily; its `status` is in `.attrs`."""
    path = Path(path)
    _require_store_dir(path)
    group = _run_group_path(run_id, subgroup)
    if not (path / group / "zarr.json").is_file():
        raise StoreError(f"{path}: group {group!r} does not exist; expected a written run")
    ds = xr.open_zarr(str(path), group=group, consolidated=False, zarr_format=3)
    if subgroup:
        run = zarr.open_group(
            str(path), path=_run_group_path(run_id), mode="r", zarr_format=3, use_consolidated=False
        )
        ds.attrs.setdefault("status", run.attrs.get("status", "unknown"))
    return ds


PART_RECORD = "ptyinr_part_record"


def mark_part(
    path: str | os.PathLike,
    run_id: str,
    record: dict[str, Any],
    *,
    subgroup: str | None = None,
    array: str = "object",
) -> None:
    """Record that one part of a run (its arrays in `reconstructions/<run_id>[/<subgroup>]`)
    is completely written: `record` goes into the attrs of its `array`, written after it.

    On the array, not the group: the array is deleted when the part is written again
    (`write_run` replaces it), so a record never outlives the data it vouches for, and only
    the part's own writer touches it (the run group's attrs are shared by all parts).
    """
    path = Path(path)
    _require_store_dir(path)
    key = f"{_run_group_path(run_id, subgroup)}/{array}"
    arr = zarr.open_array(str(path), path=key, mode="r+", zarr_format=3)
    arr.attrs[PART_RECORD] = json_safe(record)
    consolidate(path)


def read_part(
    path: str | os.PathLike, run_id: str, *, subgroup: str | None = None, array: str = "object"
) -> dict[str, Any] | None:
    """A part's record (`mark_part`), or None when the part is not completely written."""
    path = Path(path)
    key = f"{_run_group_path(run_id, subgroup)}/{array}"
    if not (path / key / "zarr.json").is_file():
        return None
    try:
        arr = zarr.open_array(str(path), path=key, mode="r", zarr_format=3)
        record = arr.attrs.get(PART_RECORD)
    except Exception:  # unreadable metadata: the part is rewritten
        return None
    return record if isinstance(record, dict) else None


def delete_run(path: str | os.PathLike, run_id: str) -> None:
    """Delete a run and everything under it. Raw data is never touched."""
    path = Path(path)
    _require_store_dir(path)
    target = path / _run_group_path(run_id)
    if not (target / "zarr.json").is_file():
        raise StoreError(f"{path}: run {run_id!r} does not exist; expected a written run")
    # Rename first so a half-deleted run never looks like a run.
    trash = _hidden_sibling(target, "deleted")
    os.rename(target, trash)
    consolidate(path)
    shutil.rmtree(trash, ignore_errors=True)


def store_summary(ds: xr.Dataset) -> dict[str, Any]:
    """Plain-dict facts about a scan store (used by `ptyinr info` and the catalog)."""
    n, dy, dx = (int(s) for s in ds[INTENSITIES].shape)
    a = ds.attrs
    summary: dict[str, Any] = {
        "scan_id": a.get("scan_id"),
        "frames": n,
        "frame_shape": [dy, dx],
        "dtype": str(ds[INTENSITIES].dtype),
        "positions_unit": a.get("positions_unit"),
        **{k: a.get(k) for k in GEOMETRY_KEYS},
        "source": a.get("source"),
        "source_sha256": a.get("source_sha256"),
        "has_mask": MASK in ds,
        "has_preprocessed": PREPROCESSED in ds,
    }
    with contextlib.suppress(StoreError):
        summary["object_pixel_size_m"] = object_pixel_size(ds, (dy, dx))
    return summary
