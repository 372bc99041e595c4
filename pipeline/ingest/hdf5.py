"""Generic HDF5 reader driven by a key map (`--key intensities=/entry/data/data ...`).

NeXus NXptycho files need no key map: what the map leaves out is taken from the places
the application definition names, units from `@units` (table in `ptyinr.ingest.nexus`):
frames ENTRY/data/data (or the detector's data), positions ENTRY/data/x,y (or the sample's
transformations x,y / x_translation,y_translation), energy instrument/beam/
incident_beam_energy (or incident_energy, incident_wavelength, monochromator/energy),
detector distance, x_pixel_size and pixel_mask from instrument/detector.
Compressed detector data (bitshuffle-LZ4, Blosc, Zstd, LZ4, ... as Eiger and Jungfrau
write it) is decoded through `hdf5plugin`, imported with the registry: no HDF5_PLUGIN_PATH.

A key map value is one of:
  `/path/to/dataset`     an array (frames, positions, mask) or a scalar dataset;
  `/path/to/object@attr` an attribute (`@attr` alone: a root attribute);
  `1.5e-10`              a literal number (for geometry a file does not carry).
Frames may also be a group of per-frame datasets (stacked in natural name order; they
must share one shape). Positions are `positions` ((n, 2) or (2, n)) or `positions_y` and
`positions_x` (per frame, or two grid axes of a raster scan).

Nothing is read eagerly except positions, mask and scalars: frames become a dask array whose
chunks each open the file, read a slab of frames and close it (picklable, so a distributed
worker can run them).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import dask.array as da
import h5py
import numpy as np
from dask.base import tokenize

from ptyinr.errors import IngestError
from ptyinr.ingest.convert import (
    GEOMETRY_ALIASES,
    Conversions,
    as_position_columns,
    geometry_from_values,
    numeric_positions,
    positions_from_grid,
    single_value,
)
from ptyinr.ingest.nexus import find_entry, nxptycho_keys
from ptyinr.ingest.registry import SourceScan, open_h5, register_reader

FRAME_KEYS = ("intensities",)
POSITION_KEYS = ("positions", "positions_y", "positions_x")
KNOWN_KEYS = (*FRAME_KEYS, *POSITION_KEYS, "mask", *GEOMETRY_ALIASES)
DEFAULT_CANDIDATES = {
    "intensities": ("/entry/data/data", "/intensities", "/data", "/diffraction", "/frames"),
    "positions": ("/entry/positions", "/positions", "/pos"),
}
# Frames per dask chunk: the scan store's shard target (32 MiB), so each chunk read from the
# file is one shard written, without a rechunk (a concatenation copy) in between.
_CHUNK_BYTES = 32 * 2**20
# Read plain contiguous frames with os.preadv (see H5Frames); False: always through h5py
# (a switch for benchmarks/bench_ingest.py's before/after and for tests).
RAW_READS = True


class H5Frames:
    """A lazily read HDF5 dataset: opens the file for each slab read (thread/process safe).

    `offset`: where a plain dataset's bytes start in the file (see `raw_offset`); slabs of
    whole frames are then read with `os.preadv` straight into the array. Why: h5py holds
    the GIL for the whole read and copies through a conversion buffer, which serialised the
    copy with the hash and compression threads (ingest ran at the speed of one core); a
    pread releases the GIL and costs a quarter of the CPU. The bytes are the same ones
    HDF5 would return (no filters, no conversion).
    """

    def __init__(
        self,
        path: str,
        key: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        offset: int | None = None,
    ) -> None:
        self.path, self.key = path, key
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.offset = offset

    def _slab(self, index: Any) -> tuple[int, int] | None:
        """(first, stop) along axis 0 if `index` selects whole frames of a 3-d array."""
        if self.offset is None or self.ndim != 3 or not isinstance(index, tuple):
            return None
        if len(index) != 3 or not all(isinstance(i, slice) for i in index):
            return None
        first, stop, step = index[0].indices(self.shape[0])
        if step != 1 or stop < first:
            return None
        for i, n in zip(index[1:], self.shape[1:], strict=True):
            if i.indices(n) != (0, n, 1):
                return None
        return first, stop

    def _pread(self, first: int, stop: int) -> np.ndarray:
        out = np.empty((stop - first, *self.shape[1:]), self.dtype)
        want = out.nbytes
        frame_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        start = int(self.offset or 0) + first * frame_bytes
        view, got = memoryview(out).cast("B"), 0
        with open(self.path, "rb", buffering=0) as fh:
            while got < want:  # one call may return less (2 GiB cap, signals)
                k = os.preadv(fh.fileno(), [view[got:]], start + got)
                if k == 0:
                    break
                got += k
        if got != want:
            raise OSError(errno.EIO, f"short read: {got} of {want} bytes at offset {start}")
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            slab = self._slab(index)
            if slab is not None:
                return self._pread(*slab)
            with h5py.File(self.path, "r") as f:
                return np.asarray(f[self.key][index])
        except (OSError, KeyError, RuntimeError) as exc:
            raise IngestError(
                f"{self.path}: key {self.key}: cannot read frames {_describe(index)} ({exc}); "
                "expected a complete, readable file"
            ) from exc


def _describe(index: Any) -> str:
    first = index[0] if isinstance(index, tuple) and index else index
    if isinstance(first, slice):
        return f"{first.start}:{first.stop}"
    return str(first)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _chunk_frames(shape: tuple[int, ...], itemsize: int) -> int:
    per = max(1, int(np.prod(shape[-2:])) * itemsize)
    return max(1, _CHUNK_BYTES // per)


def resolve_spec(f: h5py.File, spec: str, src: str, name: str) -> Any:
    """A key map value: a literal number, an attribute, or an HDF5 object."""
    spec = str(spec).strip()
    try:
        return float(spec)
    except ValueError:
        pass
    if "@" in spec:
        obj_path, attr = spec.rsplit("@", 1)
        obj_path = obj_path or "/"
        if obj_path not in f:
            raise IngestError(
                f"{src}: key {name}={spec!r}: object {obj_path!r} not found; "
                "expected an existing HDF5 path"
            )
        if attr not in f[obj_path].attrs:
            raise IngestError(
                f"{src}: key {name}={spec!r}: attribute {attr!r} not found on {obj_path!r}; "
                f"expected one of {sorted(f[obj_path].attrs)}"
            )
        return np.asarray(f[obj_path].attrs[attr])
    if spec not in f:
        raise IngestError(f"{src}: key {name}={spec!r} not found; expected an existing HDF5 path")
    return f[spec]


def read_number(f: h5py.File, spec: str, src: str, name: str) -> float:
    value = resolve_spec(f, spec, src, name)
    if isinstance(value, h5py.Group):
        raise IngestError(f"{src}: key {name}={spec!r} is a group; expected a number")
    if isinstance(value, h5py.Dataset):
        value = value[()]
    return single_value(np.asarray(value), src, f"{name}={spec}")


def read_array(f: h5py.File, spec: str, src: str, name: str) -> np.ndarray:
    value = resolve_spec(f, spec, src, name)
    if isinstance(value, h5py.Group):
        raise IngestError(f"{src}: key {name}={spec!r} is a group; expected an array")
    if isinstance(value, float):
        raise IngestError(f"{src}: key {name}={spec!r} is a number; expected an array")
    return np.asarray(value[()] if isinstance(value, h5py.Dataset) else value)


def lazy_frames(f: h5py.File, spec: str, src: str, path: Path) -> da.Array:
    """Frames as a dask array: a dataset (n, y, x) or a group of per-frame datasets."""
    obj = resolve_spec(f, spec, src, "intensities")
    if isinstance(obj, h5py.Dataset):
        return _dataset_frames(obj, path, spec, src)
    if isinstance(obj, h5py.Group):
        names = sorted((k for k, v in obj.items() if isinstance(v, h5py.Dataset)), key=_natural_key)
        if not names:
            raise IngestError(
                f"{src}: key intensities={spec!r} is a group without datasets; expected frames"
            )
        first = obj[names[0]]
        parts = []
        for name in names:
            d = obj[name]
            if d.shape[-2:] != first.shape[-2:] or d.dtype != first.dtype:
                raise IngestError(
                    f"{src}: key intensities={spec}/{name} has frame shape {d.shape[-2:]} "
                    f"dtype {d.dtype}; expected {first.shape[-2:]} {first.dtype} like "
                    f"{names[0]} (frames of inconsistent shape)"
                )
            part = _dataset_frames(d, path, f"{spec.rstrip('/')}/{name}", src)
            parts.append(part if part.ndim == 3 else part[None])
        return da.concatenate(parts, axis=0)
    raise IngestError(f"{src}: key intensities={spec!r} is a number; expected frames")


def _dataset_frames(d: h5py.Dataset, path: Path, key: str, src: str) -> da.Array:
    if d.ndim < 2 or d.dtype.kind not in "iuf":
        raise IngestError(
            f"{src}: key intensities={key} has shape {d.shape} dtype {d.dtype}; expected "
            "numeric frames (frames, det_y, det_x)"
        )
    check_written(d, src, f"intensities={key}")
    lazy = H5Frames(str(path), d.name, d.shape, d.dtype, raw_offset(d) if RAW_READS else None)
    if d.ndim == 2:
        chunks: tuple[int, ...] = d.shape
    else:
        lead = [1] * (d.ndim - 3) + [min(d.shape[-3], _chunk_frames(d.shape, d.dtype.itemsize))]
        chunks = (*lead, *d.shape[-2:])
    token = "h5frames-" + tokenize(str(path), d.name, path.stat().st_mtime_ns)
    return da.from_array(
        lazy,
        chunks=chunks,
        name=token,
        asarray=True,
        lock=False,
        meta=np.empty((0,) * d.ndim, d.dtype),
    )


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as `df -H` prints them)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def raw_offset(d: h5py.Dataset) -> int | None:
    """Where the bytes of `d` start in its file, if HDF5 would return them unchanged: a
    contiguous, allocated, unfiltered, non-external dataset of a native numeric dtype in a
    plain (sec2) file. None otherwise (then h5py reads it)."""
    try:
        plist = d.id.get_create_plist()
        if (
            d.file.driver != "sec2"
            or d.is_virtual
            or d.external
            or plist.get_layout() != h5py.h5d.CONTIGUOUS
            or plist.get_nfilters() != 0
            or d.dtype.kind not in "iuf"
            or not d.dtype.isnative
        ):
            return None
        offset = d.id.get_offset()
    except (RuntimeError, ValueError, OSError):  # pragma: no cover - HDF5 cannot say
        return None
    return None if offset is None else int(offset)


def written_extent(d: h5py.Dataset) -> tuple[int, int, str] | None:
    """(units written, units declared, unit name) of a dataset's storage, from the file's
    index alone (no data read): chunks for a chunked layout, bytes for a contiguous one.

    None where the file cannot say (compact, external or virtual storage, empty datasets).
    A contiguous dataset is allocated at its first write, so storage size 0 = never written.
    """
    if d.size == 0 or d.is_virtual or d.external:
        return None
    layout = d.id.get_create_plist().get_layout()
    if layout == h5py.h5d.CHUNKED:
        total = int(np.prod([-(-s // c) for s, c in zip(d.shape, d.chunks, strict=True)]))
        return int(d.id.get_num_chunks()), total, "chunks"
    if layout == h5py.h5d.CONTIGUOUS:
        nominal = int(d.size) * d.dtype.itemsize
        return min(int(d.id.get_storage_size()), nominal), nominal, "bytes"
    return None


def check_written(d: h5py.Dataset, src: str, key: str) -> None:
    """Refuse frames that were declared but (partly) never written: HDF5 returns the fill
    value for them, so a copy would stream zeros for as long as the declared size says.

    Cheap (the chunk index only): a 16.8 TB dataset without a written chunk is refused in
    milliseconds. Virtual datasets are checked for missing source files instead.
    """
    nominal = int(d.size) * d.dtype.itemsize
    if d.is_virtual:
        _check_virtual_sources(d, src, key)
        return
    extent = written_extent(d)
    if extent is None:
        return
    written, total, unit = extent
    if written >= total:
        return
    if unit == "chunks":
        share = f"{written} of {total} chunks written ({100.0 * written / total:.3g}%)"
    else:
        share = f"{written} of {total} bytes allocated"
    state = "never written" if written == 0 else "only partly written"
    raise IngestError(
        f"{src}: key {key}: dataset of shape {d.shape} {d.dtype} declares "
        f"{nominal} bytes ({human_bytes(nominal)}) but is {state}: {share}; what is missing "
        "would be read as fill values; expected a completely written dataset (an aborted or "
        "still-running acquisition?)"
    )


def _check_virtual_sources(d: h5py.Dataset, src: str, key: str) -> None:
    here = Path(src).parent
    for vs in d.virtual_sources():
        name = vs.file_name
        if name in (".", ""):
            continue
        target = Path(name) if Path(name).is_absolute() else here / name
        if not any(c in name for c in "*?%") and not target.exists():
            raise IngestError(
                f"{src}: key {key}: virtual dataset maps frames to {name!r} "
                f"({vs.dset_name}), which does not exist; those frames would be read as "
                "fill values; expected every source file of the virtual dataset"
            )


def read_positions(
    f: h5py.File, keys: dict[str, str], n_frames: int, src: str
) -> tuple[np.ndarray, str, tuple[np.ndarray, np.ndarray] | None]:
    """Positions (n, k) in file units and file column order, the key used, any grid axes."""
    if "positions" in keys:
        raw = read_array(f, keys["positions"], src, "positions")
        return as_position_columns(raw, n_frames, src, keys["positions"]), keys["positions"], None
    if "positions_y" in keys or "positions_x" in keys:
        missing = [k for k in ("positions_y", "positions_x") if k not in keys]
        if missing:
            raise IngestError(
                f"{src}: key {missing[0]} missing; expected both positions_y and positions_x"
            )
        ys = numeric_positions(
            read_array(f, keys["positions_y"], src, "positions_y"), src, keys["positions_y"]
        ).ravel()
        xs = numeric_positions(
            read_array(f, keys["positions_x"], src, "positions_x"), src, keys["positions_x"]
        ).ravel()
        label = f"{keys['positions_y']},{keys['positions_x']}"
        if len(ys) == n_frames and len(xs) == n_frames:
            return np.stack([ys, xs], axis=1), label, None
        grid = positions_from_grid(
            ys, xs, n_frames, src, (keys["positions_y"], keys["positions_x"])
        )
        # file column order stays (y, x) here; positions_order applies to 'positions' only
        return grid, label, (ys, xs)
    for cand in DEFAULT_CANDIDATES["positions"]:
        if cand in f:
            raw = read_array(f, cand, src, "positions")
            return as_position_columns(raw, n_frames, src, cand), cand, None
    raise IngestError(
        f"{src}: key positions missing (tried {list(DEFAULT_CANDIDATES['positions'])}); "
        "expected --key positions=/path (or positions_y= and positions_x=)"
    )


def collect_attrs(f: h5py.File, limit: int = 200) -> dict[str, Any]:
    """Root attributes and small scalar datasets the file carries (kept in the store attrs)."""
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        out[f"@{k}"] = _plain(v)
    seen = [0]

    def visit(name: str, obj: Any) -> Any:
        seen[0] += 1
        if seen[0] > 5000 or len(out) >= limit:
            return True
        if isinstance(obj, h5py.Dataset) and obj.size <= 8 and obj.dtype.kind in "iufbSUO":
            try:
                out[name] = _plain(obj[()])
            except Exception:  # unreadable small dataset: not worth failing the ingest
                pass
        return None

    f.visititems(visit)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "SO":
            return [_plain(x) for x in v.tolist()]
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_generic(
    path: Path,
    keys: dict[str, str],
    src: str,
    defaults: Conversions | None = None,
    *,
    nexus: bool = False,
    entry: str | None = None,
) -> SourceScan:
    """Read with a key map (shared by the layout-specific HDF5 readers).

    `nexus`: fill what `keys` leaves out from the NeXus NXptycho places (see
    `ptyinr.ingest.nexus`), in entry `entry` if given.
    """
    unknown = sorted(set(keys) - set(KNOWN_KEYS))
    if unknown:
        raise IngestError(
            f"{src}: key map names {unknown}; expected keys among {sorted(KNOWN_KEYS)}"
        )
    nexus_unit = nexus_entry = None
    with open_h5(path) as f:
        if nexus:
            if entry and find_entry(f, entry) is None:
                raise IngestError(
                    f"{src}: entry {entry!r} not found; expected a group (found {sorted(f)})"
                )
            found, nexus_unit = nxptycho_keys(f, keys, src, entry)
            keys = {**found, **keys}
            nexus_entry = find_entry(f, entry) if found else None
        spec = keys.get("intensities")
        if spec is None:
            spec = next((c for c in DEFAULT_CANDIDATES["intensities"] if c in f), None)
            if spec is None:
                raise IngestError(
                    f"{src}: key intensities missing (tried "
                    f"{list(DEFAULT_CANDIDATES['intensities'])}); expected "
                    "--key intensities=/path/to/frames"
                )
        frames = lazy_frames(f, spec, src, path)
        n_frames = int(np.prod(frames.shape[:-2])) if frames.ndim >= 3 else 1
        positions, pos_key, grid = read_positions(f, keys, n_frames, src)
        values = {k: read_number(f, v, src, k) for k, v in keys.items() if k in GEOMETRY_ALIASES}
        geometry = geometry_from_values(values, src)
        mask = read_array(f, keys["mask"], src, "mask") if "mask" in keys else None
        attrs = collect_attrs(f)
        if nexus_entry is not None:
            attrs["nexus_entry"] = nexus_entry.name
    has_geom = all(v is not None for v in geometry.values())
    base = defaults or Conversions()
    if base.positions_unit is None and nexus_unit is not None:
        base = Conversions(**{**base.as_dict(), "positions_unit": nexus_unit})
    if base.positions_unit is None:
        base = Conversions(**{**base.as_dict(), "positions_unit": "m" if has_geom else "px"})
    resolved_keys = {**keys, "intensities": spec, "positions": pos_key}
    return SourceScan(
        intensities=frames,
        positions=positions,
        geometry=geometry,
        defaults=base,
        keys=resolved_keys,
        mask=mask,
        source_attrs=attrs,
        positions_grid=grid,
        positions_named_axes=pos_key.count(",") == 1 and "positions_y" in keys,
    )


class HDF5Reader:
    """Any HDF5 file, with a key map saying where each quantity lives; what the map leaves
    out is looked for where NeXus NXptycho puts it (`ptyinr.ingest.nexus`)."""

    name = "hdf5"
    description = (
        "generic HDF5 with a key map (--key intensities=/entry/data/data ...); "
        "NeXus NXptycho files need no keys"
    )

    def sniff(self, path: Path) -> bool:
        return path.is_file() and h5py.is_hdf5(path)

    def read(self, path: Path, keys: dict[str, str], options: dict[str, Any]) -> SourceScan:
        entry = options.get("entry")
        return read_generic(path, keys, str(path), nexus=True, entry=entry)


register_reader(HDF5Reader())
