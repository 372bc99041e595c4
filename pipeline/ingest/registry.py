"""The reader registry: one module per file format, found by name or by sniffing the file.

Why: facilities add beamlines, each with its own file layout. A new layout is a new module
in `pipeline/ingest/` that defines a `Reader` and calls `register_reader`; nothing else
changes. Every module in this package is imported by `load_readers()`.

Readers from other packages: a distribution declares an entry point in the group
`ptyinr.readers` (pyproject: `[project.entry-points."ptyinr.readers"] NAME =
"pkg.module:ReaderClass"`, or a reader instance, or a module that calls `register_reader`).
Entry points are listed when the registry is first used, and each plugin is imported only
when it is needed (asked for by `--format NAME`, or reached while sniffing a file). A
plugin that fails to import or is not a reader is reported by name (a warning, and in
`plugin_errors()`; `--format NAME` of it is an `IngestError` with the reason) and the
built-in readers go on working. A plugin cannot replace a built-in reader's name.

Importing this module imports `hdf5plugin`, which registers the HDF5 compression filters
of detector files (bitshuffle-LZ4, Blosc, Blosc2, Zstd, LZ4, ... as Eiger and Jungfrau
write) with h5py, so they read without HDF5_PLUGIN_PATH or other set-up.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import dask.array as da
import h5py
import hdf5plugin  # noqa: F401  (registers the detector compression filters with h5py)
import numpy as np

from ptyinr.errors import IngestError
from ptyinr.ingest.convert import Conversions


@dataclass
class SourceScan:
    """What a reader found in a file, lazily, before any conversion.

    `intensities` is a dask array (n, det_y, det_x) or (rows, cols, det_y, det_x) in the
    file's own convention (amplitudes or counts, DC anywhere); `positions` is (n, 2) in the
    file's units and column order. `defaults` are the conversions the layout implies, which
    user options override. `keys` names where each quantity came from (for attrs and errors).
    """

    intensities: da.Array
    positions: np.ndarray
    geometry: dict[str, float | None]
    defaults: Conversions
    keys: dict[str, str]
    mask: np.ndarray | None = None
    source_attrs: dict[str, Any] = field(default_factory=dict)
    positions_grid: tuple[np.ndarray, np.ndarray] | None = None
    # True when positions came from keys that name their axes (positions_y, positions_x):
    # the columns are then (y, x) whatever positions_order says.
    positions_named_axes: bool = False


class Reader(Protocol):
    """A file format: `sniff` says whether a file looks like it, `read` opens it lazily."""

    name: str
    description: str

    def sniff(self, path: Path) -> bool: ...

    def read(self, path: Path, keys: dict[str, str], options: dict[str, Any]) -> SourceScan: ...


READERS: dict[str, Reader] = {}
# Sniffing order: the most specific layouts first, then other readers (plugins included),
# the generic key-map reader last (it accepts any HDF5 file).
_PRIORITY = ("ptyinr_h5", "cxi", "npz")
_GENERIC = "hdf5"
ENTRY_POINT_GROUP = "ptyinr.readers"
_LOADED = False
_LOCK = threading.RLock()
_BUILTIN: set[str] = set()
_PENDING: dict[str, importlib.metadata.EntryPoint] = {}  # plugins listed, not yet imported
_PLUGIN_ERRORS: dict[str, str] = {}


def register_reader(reader: Reader) -> Reader:
    """Add a reader under its `name` (a later registration of the same name replaces it)."""
    READERS[reader.name] = reader
    return reader


def load_readers() -> dict[str, Reader]:
    """Import every module of this package once, so each registers its reader, and list
    the plugins of the `ptyinr.readers` entry-point group (imported when needed)."""
    global _LOADED
    with _LOCK:
        if not _LOADED:
            package = importlib.import_module("ptyinr.ingest")
            for info in pkgutil.iter_modules(package.__path__):
                if info.name not in ("registry", "convert", "core", "catalog"):
                    importlib.import_module(f"ptyinr.ingest.{info.name}")
            _BUILTIN.update(READERS)
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in _BUILTIN:
                    _plugin_failed(ep, "its name is a built-in reader's; expected another name")
                elif ep.name not in _PENDING:
                    _PENDING[ep.name] = ep
            _LOADED = True
    return READERS


def _plugin_failed(ep: importlib.metadata.EntryPoint, reason: str) -> None:
    dist = getattr(ep, "dist", None)
    origin = f" from {dist.name}" if dist is not None else ""
    msg = f"reader plugin {ep.name!r} ({ep.value}{origin}): {reason}"
    _PLUGIN_ERRORS[ep.name] = msg
    warnings.warn(f"{msg}; the other readers are unaffected", RuntimeWarning, stacklevel=3)


def _load_plugin(name: str) -> Reader | None:
    """Import a listed plugin and register its reader; None (and the reason recorded) if it
    is broken. Whatever a plugin raises on import stays with that plugin."""
    with _LOCK:
        ep = _PENDING.pop(name, None)
        if ep is None:
            return READERS.get(name)
        try:
            obj = ep.load()
        except BaseException as exc:  # a plugin's import may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            text = " ".join(str(exc).split())
            _plugin_failed(ep, f"cannot be imported ({type(exc).__name__}: {text})")
            return None
        if inspect.ismodule(obj):  # a module that calls register_reader itself
            if name in READERS:
                return READERS[name]
            _plugin_failed(ep, f"module {obj.__name__} registered no reader named {name!r}")
            return None
        try:
            reader = obj() if isinstance(obj, type) else obj
        except Exception as exc:
            _plugin_failed(ep, f"cannot be constructed ({type(exc).__name__}: {exc})")
            return None
        missing = [
            a
            for a in ("name", "sniff", "read")
            if not (callable(getattr(reader, a, None)) or (a == "name" and hasattr(reader, a)))
        ]
        if missing:
            _plugin_failed(
                ep,
                f"{type(reader).__name__} lacks {missing}; expected a reader with name, "
                "sniff(path) and read(path, keys, options)",
            )
            return None
        if reader.name != name:
            _plugin_failed(
                ep, f"the reader is named {reader.name!r}; expected the entry point's name"
            )
            return None
        READERS[name] = reader
        return reader


def plugin_errors() -> dict[str, str]:
    """Plugins that could not be loaded so far: name -> reason (one line each)."""
    return dict(_PLUGIN_ERRORS)


def reader_names() -> list[str]:
    """Every reader name: built-in, loaded and listed (not yet imported) plugins."""
    load_readers()
    return sorted(set(READERS) | set(_PENDING))


def get_reader(name: str) -> Reader:
    """The reader called `name`; an unknown name is an `IngestError` listing the known ones."""
    readers = load_readers()
    if name in _PENDING:
        _load_plugin(name)
    if name in _PLUGIN_ERRORS and name not in readers:
        raise IngestError(f"format={name!r}: {_PLUGIN_ERRORS[name]}")
    if name not in readers:
        raise IngestError(f"format={name!r} is unknown; expected one of {reader_names()}")
    return readers[name]


def open_h5(path: Path) -> h5py.File:
    """Open read-only; a missing, non-HDF5 or truncated file is one `IngestError` line."""
    if not path.exists():
        raise IngestError(f"{path}: does not exist; expected an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise IngestError(
            f"{path}: cannot be opened as HDF5 ({reason}); expected a complete HDF5 file "
            "(truncated or not HDF5?)"
        ) from exc


def detect_format(path: str | Path) -> str:
    """The name of the first reader whose `sniff` accepts the file."""
    path = Path(path)
    readers = load_readers()
    others = sorted((set(readers) | set(_PENDING)) - set(_PRIORITY) - {_GENERIC})
    order = [n for n in _PRIORITY if n in readers] + others + [_GENERIC]
    for name in order:
        reader = readers.get(name) if name not in _PENDING else _load_plugin(name)
        if reader is None:
            continue
        try:
            if reader.sniff(path):
                return name
        except Exception:  # a sniffer never decides for another reader by crashing
            continue
    if path.suffix.lower() in (".h5", ".hdf5", ".hdf", ".cxi", ".nxs", ".nx5"):
        open_h5(path).close()  # raises the HDF5 library's reason in one line
    raise IngestError(
        f"{path}: format not recognised (not HDF5/CXI/NPZ, or truncated); expected one of "
        f"{sorted(readers)} (pass --format to choose)"
    )
