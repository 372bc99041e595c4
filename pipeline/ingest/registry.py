"""The reader registry: one module per file format, found by name or by sniffing the file.

Why: facilities add beamlines, each with its own file layout. A new layout is a new module
in `pipeline/ingest/` that defines a `Reader` and calls `register_reader`; nothing else
changes. Every module in this package is imported by `load_readers()`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import dask.array as da
import h5py
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
# Sniffing order: the most specific layouts first, the generic key-map reader last.
_PRIORITY = ("ptyinr_h5", "cxi", "npz", "hdf5")
_LOADED = False


def register_reader(reader: Reader) -> Reader:
    """Add a reader under its `name` (a later registration of the same name replaces it)."""
    READERS[reader.name] = reader
    return reader


def load_readers() -> dict[str, Reader]:
    """Import every module of this package once, so each registers its reader."""
    global _LOADED
    if not _LOADED:
        package = importlib.import_module("ptyinr.ingest")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("registry", "convert", "core", "catalog"):
                importlib.import_module(f"ptyinr.ingest.{info.name}")
        _LOADED = True
    return READERS


def get_reader(name: str) -> Reader:
    """The reader called `name`; an unknown name is an `IngestError` listing the known ones."""
    readers = load_readers()
    if name not in readers:
        raise IngestError(f"format={name!r} is unknown; expected one of {sorted(readers)}")
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
    order = [n for n in _PRIORITY if n in readers] + sorted(set(readers) - set(_PRIORITY))
    for name in order:
        try:
            if readers[name].sniff(path):
                return name
        except Exception:  # a sniffer never decides for another reader by crashing
            continue
    if path.suffix.lower() in (".h5", ".hdf5", ".hdf", ".cxi", ".nxs", ".nx5"):
        open_h5(path).close()  # raises the HDF5 library's reason in one line
    raise IngestError(
        f"{path}: format not recognised (not HDF5/CXI/NPZ, or truncated); expected one of "
        f"{sorted(readers)} (pass --format to choose)"
    )
