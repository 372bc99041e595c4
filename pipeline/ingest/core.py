"""Ingest: a source file -> a checked, converted scan store; an archive -> stores + catalog.

The copy streams: frames go from the file to the store one chunk (a shard of frames) per
dask task, converted and checked on the way, so memory is bounded by a few chunks whatever
the file size. The store appears under its name only when complete (see ptyinr.store).

Hostile input is refused before anything is copied: frames declared but never written
(HDF5 chunk index / storage size, see `hdf5.check_written`), frames larger than the free
space of the target, scans whose every frame is zero, positions stored as text, dangling
symbolic links. A copy that fails halfway (disk full, SIGTERM) removes its hidden partial
store; one left by a killed process (SIGKILL) is swept by the next ingest into that
directory (its name carries host and process id).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import glob as _glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import numpy as np
import zarr

from ptyinr import store as scan_store
from ptyinr.errors import IngestError, InputError, StoreError
from ptyinr.ingest.catalog import read_catalog, write_catalog
from ptyinr.ingest.convert import (
    Conversions,
    convert_frames,
    convert_mask,
    convert_positions,
    detect_dc,
    output_dtype,
    squeeze_frames,
)
from ptyinr.ingest.hdf5 import human_bytes
from ptyinr.ingest.registry import detect_format, get_reader
from ptyinr.progress import WorkProgress
from ptyinr.version import __version__

_HASH_BLOCK = 8 * 2**20


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in blocks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def fingerprint(
    fmt: str, keys: dict[str, str] | None, conversions: Conversions | None, options: dict | None
) -> str:
    """A short hash of the ingest settings: a store made with other settings is re-made."""
    blob = json.dumps(
        {
            "format": fmt,
            "keys": dict(sorted((keys or {}).items())),
            "conversions": (conversions or Conversions()).as_dict(),
            "options": options or {},
            "schema": scan_store.SCHEMA_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ingest_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "auto",
    keys: dict[str, str] | None = None,
    conversions: Conversions | None = None,
    options: dict[str, Any] | None = None,
    scan_id: str | None = None,
    frames_per_shard: int | None = None,
    overwrite: bool = False,
    scheduler: str | None = "threads",
    sha256: str | None = None,
    extra_attrs: dict[str, Any] | None = None,
    sweep: bool = True,
    zarrs: bool | None = None,
    progress: bool | None = None,
) -> Path:
    """Turn one source file into the scan store `out` and return its path.

    `format` names a reader ("auto" sniffs); `keys` is the key map; `conversions` overrides
    the reader's defaults (all recorded in attrs). Bad input raises `IngestError` (one line:
    file, key, value, expectation) and leaves no store behind. `sweep` removes hidden partial
    stores that dead ingests left next to `out` (an archive sweeps its directory once).
    `zarrs`: encode with the zarrs codec pipeline (None: when installed; see `write_config`).
    `progress`: frames copied, on stderr (a bar on a terminal, timestamped lines otherwise;
    None: unless running as a task on a Dask worker).
    """
    src_path = check_source(src)
    out = Path(out)
    where = str(src_path)
    if out.exists() and not overwrite:
        raise IngestError(f"{out}: already exists; expected a new store path (or --force)")
    keys = dict(keys or {})
    options = dict(options or {})
    fmt = detect_format(src_path) if format == "auto" else format
    reader = get_reader(fmt)
    scan = reader.read(src_path, keys, options)

    conv = (conversions or Conversions()).resolve(scan.defaults)
    if scan.positions_named_axes and conv.positions_order != "yx":
        conv = Conversions(**{**conv.as_dict(), "positions_order": "yx"})
    frames_key = scan.keys.get("intensities", "intensities")
    pos_key = scan.keys.get("positions", "positions")
    frames, reshaped = squeeze_frames(scan.intensities, where, frames_key)
    n = int(frames.shape[0])
    if len(scan.positions) != n:
        raise IngestError(
            f"{where}: key {pos_key}: {len(scan.positions)} positions for {n} frames "
            f"(key {frames_key}); expected equal counts"
        )

    check_free_space(out, frames, conv, where, frames_key)

    has_geometry = all(v is not None for v in scan.geometry.values())
    attrs_geometry = dict(scan.geometry)
    if conv.positions_unit == "px" and not has_geometry:
        attrs_geometry = dict.fromkeys(attrs_geometry)
    try:
        scan_store.check_geometry(
            {**attrs_geometry, "positions_unit": "m" if has_geometry else "px"}, where
        )
    except StoreError as exc:
        raise IngestError(str(exc)) from exc

    dc = conv.dc
    dc_detected = None
    if dc == "auto":
        dc = dc_detected = detect_dc(frames, bool(conv.amplitude))
    positions, unit = convert_positions(scan.positions, conv, where, pos_key, has_geometry)
    frame_shape = tuple(int(s) for s in frames.shape[1:])
    mask = None
    if scan.mask is not None:
        m = np.asarray(scan.mask)
        while m.ndim > 2 and m.shape[0] == 1:
            m = m[0]
        if m.shape != frame_shape:
            raise IngestError(
                f"{where}: key {scan.keys.get('mask', 'mask')}: mask shape {m.shape}; expected "
                f"the frame shape {frame_shape}"
            )
        mask = convert_mask(m, conv, dc)
    check_not_all_zero(frames, where, frames_key)
    converted, _ = convert_frames(frames, conv, dc, where, frames_key)
    shown = WorkProgress(f"ingest {src_path.name}", n, "frames", enabled=progress)
    converted = shown.counted(converted)

    recorded = conv.as_dict()
    if dc_detected is not None:
        recorded["dc_detected"] = dc_detected
    if reshaped is not None:
        recorded["frames_reshaped_from"] = reshaped
    attrs: dict[str, Any] = {
        **attrs_geometry,
        "positions_unit": unit,
        "scan_id": scan_id or src_path.stem,
        "source": where,
        "source_sha256": sha256,
        "source_format": fmt,
        "source_keys": scan.keys,
        "source_dtype": str(frames.dtype),
        "source_attrs": scan.source_attrs,
        "conversions": recorded,
        "ingest_fingerprint": fingerprint(format, keys, conversions, options),
        "ingested_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "software": f"ptyinr {__version__}",
        **(extra_attrs or {}),
    }
    if scan.positions_grid is not None:
        attrs["positions_grid_shape"] = [len(scan.positions_grid[0]), len(scan.positions_grid[1])]
    # Hash the source while the frames are copied (hashlib releases the GIL); the digest is
    # added to the attrs before the store is renamed into place.
    if sweep:
        sweep_partial_stores(out.parent)
    partial = partial_store_path(out)
    hasher = None if sha256 else ThreadPoolExecutor(max_workers=1)
    digest = hasher.submit(sha256_file, src_path) if hasher else None
    # Our own pool for the threaded copy: on failure we wait for every writer before the
    # partial store is removed, so no straggling task re-creates a chunk of it.
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1) if scheduler == "threads" else None
    if pool is not None:
        _LOCAL.pool = pool
        ctx = dask.config.set(scheduler=_threads_get)
    elif scheduler:
        ctx = dask.config.set(scheduler=scheduler)
    else:
        ctx = contextlib.nullcontext()
    try:
        try:
            # Written in `partial` (a name the sweep recognises) and renamed to `out` once.
            with ctx, write_config(zarrs), shown:
                scan_store.create_scan_store(
                    out,
                    converted,
                    positions,
                    attrs=attrs,
                    mask=mask,
                    frames_per_shard=frames_per_shard,
                    overwrite=overwrite,
                    final_attrs=(lambda: {"source_sha256": digest.result()}) if digest else None,
                    tmp=partial,
                )
            return out
        finally:
            if pool is not None:
                _LOCAL.pool = None
                pool.shutdown(wait=True, cancel_futures=True)
    except BaseException as exc:
        remove_partial_store(partial)
        if isinstance(exc, scan_store.StoreExists):
            raise IngestError(
                f"{out}: already exists (created meanwhile); expected a new store path (or --force)"
            ) from exc
        exc = os_error_of(exc)
        if isinstance(exc, StoreError):  # named by the store the user asked for
            raise IngestError(f"{where}: {str(exc).replace(str(partial), str(out))}") from exc
        if isinstance(exc, OSError) and not isinstance(exc, InputError):
            raise write_error(out, where, exc) from exc
        raise exc
    finally:
        if hasher is not None:
            hasher.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- fast writes


def zarrs_available() -> bool:
    """True if the `zarrs` codec pipeline (Rust, a drop-in for zarr-python 3) is installed."""
    return importlib.util.find_spec("zarrs") is not None


def write_config(use_zarrs: bool | None = None) -> contextlib.AbstractContextManager:
    """zarr settings for writing a store: the `zarrs` codec pipeline when installed.

    Why: zarr-python encodes and indexes each one-frame chunk of a shard in Python; zarrs
    does the same work in Rust on all cores: on 256 x 256 uint16 frames an ingest takes 30%
    less CPU (8.2 vs 11.7 s for 2.2 GB, benchmarks/bench_ingest.py) and, on an idle
    machine, half the wall time of the copy. The store it writes is plain Zarr v3 (same
    codecs, same layout): readable with or without zarrs.
    Only the write is switched; reads elsewhere keep zarr's default pipeline.
    (zarr's config is process-wide: a concurrent write elsewhere in the process may use
    either pipeline meanwhile, which changes its speed, not its bytes.)
    """
    if use_zarrs is None:
        use_zarrs = zarrs_available()
    elif use_zarrs and not zarrs_available():
        raise IngestError("zarrs=True but the zarrs package is not installed; pip install zarrs")
    if not use_zarrs:
        return contextlib.nullcontext()
    return _zarrs_pipeline()


_ZARRS_LOCK = threading.Lock()
_ZARRS_USERS = [0, None]  # writers inside, the pipeline path to restore when the last leaves


@contextlib.contextmanager
def _zarrs_pipeline() -> Iterator[None]:
    """Switch zarr to the zarrs pipeline while any ingest of this process writes (archive
    threads overlap: the first in switches, the last out restores what was there)."""
    with _ZARRS_LOCK:
        if _ZARRS_USERS[0] == 0:
            _ZARRS_USERS[1] = zarr.config.get("codec_pipeline.path")
            zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
        _ZARRS_USERS[0] += 1
    try:
        yield
    finally:
        with _ZARRS_LOCK:
            _ZARRS_USERS[0] -= 1
            if _ZARRS_USERS[0] == 0:
                zarr.config.set({"codec_pipeline.path": _ZARRS_USERS[1]})


# ----------------------------------------------------------------------------- hostile input

_LOCAL = threading.local()


def _threads_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """dask's threaded scheduler on the calling thread's own pool, if it set one.

    dask.config is process-wide, so concurrent ingests (archive threads) all install this
    same function; each finds its own pool in a thread-local.
    """
    pool = getattr(_LOCAL, "pool", None)
    if pool is not None and "pool" not in kwargs:
        kwargs["pool"] = pool
    return dask.threaded.get(dsk, keys, **kwargs)


def check_source(src: str | os.PathLike) -> Path:
    """The resolved source path; a missing file, a dangling symbolic link (named by the
    path the user gave, and its target) or a directory is one `IngestError` line."""
    given = Path(src).expanduser()
    if given.is_symlink() and not given.exists():
        target = os.path.realpath(given)
        raise IngestError(
            f"{given}: a symbolic link to {target}, which does not exist; expected a scan file"
        )
    if not given.exists():
        raise IngestError(f"{given}: does not exist; expected a scan file")
    resolved = given.resolve()
    if not resolved.is_file():
        raise IngestError(f"{given}: is not a file; expected a scan file")
    return resolved


def free_space(path: Path) -> tuple[Path, int]:
    """The nearest existing directory at or above `path`, and the bytes free on its file system."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p, int(shutil.disk_usage(p).free)


def check_free_space(out: Path, frames: Any, conv: Conversions, src: str, key: str) -> None:
    """Refuse before copying when the frames' uncompressed size exceeds the free space of the
    target file system (the compressed store is smaller, but nothing bounds it but that)."""
    n, ny, nx = (int(s) for s in frames.shape)
    dtype = output_dtype(np.dtype(frames.dtype), conv)  # float32 for floats, as stored
    need = n * ny * nx * dtype.itemsize
    where, free = free_space(out.parent)
    if need > free:
        raise IngestError(
            f"{src}: key {key}: {n} frames of {ny}x{nx} {dtype} need up to {need} bytes "
            f"({human_bytes(need)}) in {out}, but {where} has {free} bytes "
            f"({human_bytes(free)}) free; expected at least that much free space (free some, "
            "or ingest to another file system)"
        )


def _has_signal(block: np.ndarray) -> bool:
    """True if a block holds something other than zeros (or negatives clipped to zero);
    non-finite values count as content (the copy refuses them with their own message)."""
    block = np.asarray(block)
    if block.dtype.kind == "f":
        return bool(np.any(block > 0) or not np.all(np.isfinite(block)))
    return bool(np.any(block > 0))


def check_not_all_zero(frames: Any, src: str, key: str, n_sample: int = 16) -> None:
    """Refuse a scan whose every frame is zero (a detector that recorded nothing, a dataset
    of fill values). Cheap for real data: frames spread over the scan are read one at a
    time until one holds counts (usually the first). Only when none of them does is the
    whole scan read, block by block, stopping at the first count."""
    n = int(frames.shape[0])
    idx = np.unique(np.linspace(0, n - 1, min(n, n_sample)).astype(int))
    for i in idx:
        if _has_signal(frames[int(i)].compute(scheduler="sync")):
            return
    largest = None
    for block in frames.blocks:
        values = np.asarray(block.compute(scheduler="sync"))
        if _has_signal(values):
            return
        top = values.max().item()
        largest = top if largest is None else max(largest, top)
    what = "zero" if largest == 0 else f"zero or negative (largest value {largest!r})"
    raise IngestError(
        f"{src}: key {key}: all {n} frames are {what} in every pixel; expected diffraction "
        "counts (a detector that recorded nothing, or a dataset of fill values?)"
    )


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_PARTIAL = re.compile(
    r"^\.+.+\.ingest-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+(\.tmp-[0-9a-f]+)?$"
)


def partial_store_path(out: Path) -> Path:
    """Hidden sibling a store is written under until complete; its name carries host and
    process id, so a later ingest can remove it if that process died (killed, power cut)."""
    return out.parent / f".{out.name}.ingest-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_partial_store(partial: Path) -> None:
    """Remove a hidden partial store and the hidden directory it was being written in."""
    shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(OSError):
        for p in partial.parent.iterdir():
            if p.name.startswith(f".{partial.name}.tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partial_stores(directory: Path) -> list[Path]:
    """Remove hidden partial stores in `directory` left by ingests on this host whose
    process no longer runs (a killed ingest cannot clean up after itself)."""
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _PARTIAL.match(p.name)
        if not m or m["host"] != _HOST:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(exc: BaseException) -> BaseException:
    """An OSError for a failed system call reported by zarrs (Rust's io::Error arrives as a
    RuntimeError "... (os error 28)"), so a full disk is named as such; else `exc`."""
    if isinstance(exc, RuntimeError) and not isinstance(exc, InputError):
        m = _RUST_OS_ERROR.search(str(exc))
        if m:
            code = int(m.group(1))
            err = OSError(code, os.strerror(code))
            err.__cause__ = exc
            return err
    return exc


def write_error(out: Path, src: str, exc: OSError) -> IngestError:
    """An OS error while writing the store as one line (the partial store is removed)."""
    _, free = free_space(out.parent)
    if exc.errno == errno.ENOSPC:
        return IngestError(
            f"{out}: no space left on device while writing the store from {src} ({free} bytes "
            "free now); the partial store was removed and the source is untouched; expected "
            "enough free space on the target"
        )
    reason = exc.strerror or str(exc) or type(exc).__name__
    return IngestError(
        f"{out}: copying {src} into the store failed ({reason}); the partial store was "
        "removed; expected a readable source and a writable target directory"
    )


def unexpected_error(src: str, exc: BaseException) -> str:
    """An unforeseen failure on a file as one line: type, message and where it happened."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    text = " ".join(str(exc).split())
    return f"{src}: {type(exc).__name__}: {text}{at}; expected a readable scan file"


# ----------------------------------------------------------------------------- archives


@dataclass
class ArchiveReport:
    """Outcome of an archive ingest: one row per source, and whether anything failed."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    catalog: Path | None = None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """One line per file, for the terminal."""
        out = []
        for r in self.rows:
            if r["status"] == "failed":
                msg = str(r["error"])
                out.append(
                    f"FAILED  {msg if msg.startswith(r['source']) else r['source'] + ': ' + msg}"
                )
            elif r.get("action") == "skipped":
                out.append(f"skipped {r['source']} (unchanged, {r['store']})")
            else:
                out.append(
                    f"ok      {r['source']} -> {r['store']} ({r['frames']} frames of "
                    f"{r['frame_y']}x{r['frame_x']})"
                )
        return out


def _row_from_store(path: Path, base: dict[str, Any]) -> dict[str, Any]:
    ds = scan_store.open_scan_store(path)
    s = scan_store.store_summary(ds)
    a = ds.attrs
    return {
        **base,
        "scan_id": a.get("scan_id"),
        "store": str(path),
        "sha256": a.get("source_sha256"),
        "format": a.get("source_format"),
        "frames": s["frames"],
        "frame_y": s["frame_shape"][0],
        "frame_x": s["frame_shape"][1],
        "dtype": s["dtype"],
        "positions_unit": a.get("positions_unit"),
        "wavelength_m": a.get("wavelength_m"),
        "detector_distance_m": a.get("detector_distance_m"),
        "detector_pixel_size_m": a.get("detector_pixel_size_m"),
        "fingerprint": a.get("ingest_fingerprint"),
        "ingested_at": a.get("ingested_at"),
        "status": "ok",
        "error": None,
    }


def ingest_one(src: str, store_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Archive task for one file: skip if unchanged, else (re-)ingest; never raises."""
    path = Path(store_path)
    base = {
        "source": src,
        "store": store_path,
        "scan_id": Path(src).stem,
        "bytes": None,
        "action": "ingested",
    }
    try:
        check_source(src)
        base["bytes"] = float(os.path.getsize(src))
        digest = sha256_file(src)
        base["sha256"] = digest
        fp = fingerprint(
            settings["format"], settings["keys"], settings["conversions"], settings["options"]
        )
        if path.exists():
            try:
                ds = scan_store.open_scan_store(path)
                if (
                    ds.attrs.get("source_sha256") == digest
                    and ds.attrs.get("ingest_fingerprint") == fp
                ):
                    return {**_row_from_store(path, base), "action": "skipped"}
            except StoreError:
                pass  # a broken store is replaced below
        ingest_file(
            src,
            path,
            format=settings["format"],
            keys=settings["keys"],
            conversions=settings["conversions"],
            options=settings["options"],
            frames_per_shard=settings["frames_per_shard"],
            overwrite=True,
            scheduler=settings["scheduler"],
            sha256=digest,
            sweep=False,
            progress=False,  # the archive shows files done, not each file's frames
        )
        return _row_from_store(path, base)
    except InputError as exc:
        return {**base, "status": "failed", "error": str(exc), "action": "failed"}
    except Exception as exc:  # one broken file never stops the archive
        return {**base, "status": "failed", "error": unexpected_error(src, exc), "action": "failed"}


def dashboard_link(client: Any) -> str | None:
    """The Dask dashboard's address of `client`, or None when it runs without one."""
    try:
        link = client.dashboard_link
    except Exception:  # no dashboard (bokeh missing, dashboard_address=None)
        return None
    return str(link) if link else None


def plan_store_names(sources: list[str], outdir: Path, previous: dict[str, dict]) -> dict:
    """Store path per source: kept from the catalog, else `<stem>.zarr`, de-duplicated."""
    taken = {Path(r["store"]).name for r in previous.values() if r.get("store")}
    stems: dict[str, int] = {}
    for s in sources:
        stems[Path(s).stem] = stems.get(Path(s).stem, 0) + 1
    plan = {}
    for s in sources:
        if s in previous and previous[s].get("store"):
            plan[s] = str(outdir / Path(previous[s]["store"]).name)
            continue
        stem = Path(s).stem
        name = f"{stem}.zarr"
        if stems[stem] > 1 or name in taken:
            name = f"{stem}-{hashlib.sha256(s.encode()).hexdigest()[:8]}.zarr"
        taken.add(name)
        plan[s] = str(outdir / name)
    return plan


def ingest_archive(
    pattern: str | list[str],
    outdir: str | os.PathLike,
    *,
    format: str = "auto",
    keys: dict[str, str] | None = None,
    conversions: Conversions | None = None,
    options: dict[str, Any] | None = None,
    frames_per_shard: int | None = None,
    client: Any = None,
    parallel: str = "threads",
    n_workers: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> ArchiveReport:
    """Ingest every file matching `pattern` (a glob, or a list of paths) into OUTDIR.

    One store per file plus `OUTDIR/catalog.zarr`. Files run in parallel: on `client` (a
    `distributed.Client`) when given, else `parallel` = "threads" | "processes" (a local
    dask LocalCluster) | "sync". Unchanged files (same sha256 and settings) are skipped; a
    changed file is re-ingested into a fresh store that replaces the old one only when
    complete. A bad file gives a failed row and the rest carry on.

    `progress`: files done (and failed) on stderr, a bar on a terminal, else timestamped
    lines. On Dask (`client`, or "processes": a local cluster on loopback with TLS and
    its dashboard on a free loopback port) the dashboard's address is shown there too.
    """
    outdir = Path(outdir)
    if isinstance(pattern, str):
        sources = sorted(_glob.glob(os.path.expanduser(pattern), recursive=True))
    else:
        sources = [str(p) for p in pattern]
    # a dangling symbolic link keeps its own path (reported as such by ingest_one)
    sources = [
        str(Path(s).resolve()) if Path(s).exists() else os.path.abspath(s)
        for s in sources
        if not Path(s).is_dir()
    ]
    if not sources:
        raise IngestError(f"{pattern!r} matches no files; expected a glob of scan files")
    outdir.mkdir(parents=True, exist_ok=True)
    sweep_partial_stores(outdir)
    previous = {r["source"]: r for r in read_catalog(outdir)}
    plan = plan_store_names(sources, outdir, previous)
    settings = {
        "format": format,
        "keys": dict(keys or {}),
        "conversions": conversions or Conversions(),
        "options": dict(options or {}),
        "frames_per_shard": frames_per_shard,
        "scheduler": "threads",
    }

    rows: list[dict[str, Any]] = []
    shown = WorkProgress(f"ingest-archive {outdir}", len(sources), "files", enabled=progress)

    def collect(row: dict[str, Any]) -> None:
        rows.append(row)
        shown.advance(1)
        if row["status"] == "failed":
            shown.note(f"FAILED {row['source']}")
        if on_result is not None:
            on_result(row)

    own_client = None
    if client is None and parallel == "processes":
        from distributed import Client, LocalCluster
        from distributed.security import Security

        workers = n_workers or min(len(sources), os.cpu_count() or 1)
        own_client = Client(
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                # loopback and TLS, as ptyinr.cluster's local clusters: no other user of
                # this host can reach the scheduler; the dashboard on a free loopback port
                host="127.0.0.1",
                protocol="tls://",
                security=Security.temporary(),
                dashboard_address="127.0.0.1:0",
            )
        )
        client = own_client
    link = dashboard_link(client) if client is not None else None
    try:
        shown.start()
        if link:
            shown.note(f"Dask dashboard: {link}")
        if client is not None:
            from distributed import as_completed

            futures = [client.submit(ingest_one, s, plan[s], settings, pure=False) for s in sources]
            for fut in as_completed(futures):
                collect(fut.result())
        elif parallel == "sync":
            for s in sources:
                collect(ingest_one(s, plan[s], settings))
        elif parallel == "threads":
            from concurrent.futures import as_completed as done

            with ThreadPoolExecutor(max_workers=n_workers or min(len(sources), 4)) as pool:
                futs = [pool.submit(ingest_one, s, plan[s], settings) for s in sources]
                for fut in done(futs):
                    collect(fut.result())
        else:
            raise IngestError(f"parallel={parallel!r}; expected threads, processes or sync")
    finally:
        shown.stop(failed=len(rows) < len(sources))
        if own_client is not None:
            cluster = own_client.cluster
            own_client.close()
            cluster.close()

    order = {s: i for i, s in enumerate(sources)}
    rows.sort(key=lambda r: order[r["source"]])
    merged = {**previous}
    for r in rows:
        old = previous.get(r["source"])
        if (
            r["status"] == "failed"
            and old
            and old.get("status") == "ok"
            and Path(old["store"]).exists()
        ):
            r["error"] = f"{r['error']} (previous store kept: {old['store']})"
        merged[r["source"]] = {k: v for k, v in r.items() if k != "action"}
    report = ArchiveReport(rows=rows)
    report.catalog = write_catalog(outdir, sorted(merged.values(), key=lambda r: r["source"]))
    return report
