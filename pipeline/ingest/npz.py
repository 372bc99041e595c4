"""NumPy `.npz` archives with a key map (`--key intensities=diffraction --key positions=pos`).

Values of the key map are member names, a glob over member names for per-frame arrays
(`intensities=frame_*`, stacked in natural order; they must share one shape), or literal
numbers. Geometry members may also be found by their own names (`wavelength_m`,
`energy_kev`, `detector_pixel_size_um`, ...). Leading singleton axes are dropped, and a
(rows, cols, det_y, det_x) grid of frames is flattened in row-major order.

Streaming: members stored uncompressed (`np.savez`) are memory-mapped, so frames are read a
chunk at a time; members of `np.savez_compressed` archives cannot be sliced without
decompressing them, so each such member is decompressed into memory once (a documented limit).
"""

from __future__ import annotations

import fnmatch
import re
import zipfile
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

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
from ptyinr.ingest.registry import SourceScan, register_reader

CANDIDATES = {
    "intensities": ("intensities", "diffraction", "diffraction_patterns", "data", "frames"),
    "positions": ("positions", "pos", "points", "scan_positions"),
}
KNOWN_KEYS = ("intensities", "positions", "positions_y", "positions_x", "mask", *GEOMETRY_ALIASES)
_CHUNK_BYTES = 16 * 2**20


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class NPZArchive:
    """Members of an .npz as arrays: memory-mapped when stored, loaded when compressed."""

    def __init__(self, path: Path) -> None:
        self.path, self.src = path, str(path)
        if not path.exists():
            raise IngestError(f"{path}: does not exist; expected an .npz file")
        try:
            with zipfile.ZipFile(path) as z:
                self.infos = {
                    i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")
                }
        except (zipfile.BadZipFile, OSError) as exc:
            raise IngestError(
                f"{path}: cannot be opened as NPZ ({exc}); expected a complete .npz archive "
                "(truncated or not NPZ?)"
            ) from exc
        if not self.infos:
            raise IngestError(f"{path}: holds no .npy members; expected an .npz archive")

    @property
    def names(self) -> list[str]:
        return sorted(self.infos, key=_natural_key)

    def array(self, name: str, key: str) -> np.ndarray:
        if name not in self.infos:
            raise IngestError(
                f"{self.src}: key {key}={name!r} not found; expected one of {self.names}"
            )
        info = self.infos[name]
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                return self._memmap(info)
            with zipfile.ZipFile(self.path) as z, z.open(info) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise IngestError(
                f"{self.src}: key {key}={name!r} cannot be read ({exc}); expected a numeric "
                "array in a complete archive"
            ) from exc

    def _memmap(self, info: zipfile.ZipInfo) -> np.ndarray:
        with open(self.path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError("bad local header")
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        need = offset + int(np.prod(shape)) * dtype.itemsize
        if need > self.path.stat().st_size:
            raise ValueError(f"member data ends at byte {need} beyond the file end (truncated)")
        return np.memmap(
            self.path,
            dtype=dtype,
            mode="r",
            offset=offset,
            shape=shape,
            order="F" if fortran else "C",
        )

    def match(self, pattern: str) -> list[str]:
        return [n for n in self.names if fnmatch.fnmatchcase(n, pattern)]


def _frames(arc: NPZArchive, spec: str) -> tuple[da.Array, str]:
    names = arc.match(spec) if any(c in spec for c in "*?[") else [spec]
    if not names:
        raise IngestError(
            f"{arc.src}: key intensities={spec!r} matches no member; expected one of {arc.names}"
        )
    parts = []
    first = None
    for name in names:
        a = arc.array(name, "intensities")
        if a.dtype.kind not in "iuf" or a.ndim < 2:
            raise IngestError(
                f"{arc.src}: key intensities={name!r} has shape {a.shape} dtype "
                f"{a.dtype}; expected numeric frames (frames, det_y, det_x)"
            )
        if first is None:
            first = (name, a.shape[-2:], a.dtype)
        elif a.shape[-2:] != first[1] or a.dtype != first[2]:
            raise IngestError(
                f"{arc.src}: key intensities={name!r} has frame shape {a.shape[-2:]} dtype "
                f"{a.dtype}; expected {first[1]} {first[2]} like {first[0]!r} "
                "(frames of inconsistent shape)"
            )
        per = max(1, int(np.prod(a.shape[-2:])) * a.dtype.itemsize)
        lead = [1] * (a.ndim - 3) + (
            [max(1, min(a.shape[-3], _CHUNK_BYTES // per))] if a.ndim >= 3 else []
        )
        d = da.from_array(a, chunks=(*lead, *a.shape[-2:]), asarray=True, lock=False)
        parts.append(d[None] if d.ndim == 2 else d)
    label = spec if len(names) == 1 else f"{spec} ({len(names)} members)"
    return (parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)), label


def _value(arc: NPZArchive, spec: str, key: str) -> np.ndarray:
    try:
        return np.asarray(float(spec))
    except ValueError:
        return np.asarray(arc.array(spec, key))


class NPZReader:
    """NumPy archives of simulations or converted data."""

    name = "npz"
    description = "NumPy .npz with a key map (member names; leading singleton axes dropped)"

    def sniff(self, path: Path) -> bool:
        return path.is_file() and zipfile.is_zipfile(path) and path.suffix.lower() == ".npz"

    def read(self, path: Path, keys: dict[str, str], options: dict[str, Any]) -> SourceScan:
        src = str(path)
        unknown = sorted(set(keys) - set(KNOWN_KEYS))
        if unknown:
            raise IngestError(
                f"{src}: key map names {unknown}; expected keys among {sorted(KNOWN_KEYS)}"
            )
        arc = NPZArchive(path)
        spec = keys.get("intensities") or next(
            (c for c in CANDIDATES["intensities"] if c in arc.infos), None
        )
        if spec is None:
            raise IngestError(
                f"{src}: key intensities missing (tried "
                f"{list(CANDIDATES['intensities'])}; members {arc.names}); "
                "expected --key intensities=NAME"
            )
        frames, frames_label = _frames(arc, spec)
        n = int(np.prod(frames.shape[:-2]))

        grid = None
        named = False
        if "positions_y" in keys or "positions_x" in keys:
            if not ("positions_y" in keys and "positions_x" in keys):
                raise IngestError(f"{src}: expected both positions_y and positions_x keys")
            ys = numeric_positions(
                _value(arc, keys["positions_y"], "positions_y"), src, keys["positions_y"]
            ).ravel()
            xs = numeric_positions(
                _value(arc, keys["positions_x"], "positions_x"), src, keys["positions_x"]
            ).ravel()
            pos_label = f"{keys['positions_y']},{keys['positions_x']}"
            named = True
            if len(ys) == n and len(xs) == n:
                positions = np.stack([ys, xs], axis=1)
            else:
                positions = positions_from_grid(
                    ys, xs, n, src, (keys["positions_y"], keys["positions_x"])
                )
                grid = (ys, xs)
        else:
            pos_label = keys.get("positions") or next(
                (c for c in CANDIDATES["positions"] if c in arc.infos), None
            )
            if pos_label is None:
                raise IngestError(
                    f"{src}: key positions missing (tried "
                    f"{list(CANDIDATES['positions'])}; members {arc.names}); "
                    "expected --key positions=NAME"
                )
            raw = np.asarray(arc.array(pos_label, "positions"))
            positions = as_position_columns(raw, n, src, pos_label)

        values: dict[str, float] = {}
        for alias in GEOMETRY_ALIASES:
            spec_g = keys.get(alias) or (alias if alias in arc.infos else None)
            if spec_g is not None:
                values[alias] = single_value(_value(arc, spec_g, alias), src, alias)
        geometry = geometry_from_values(values, src)
        mask = np.array(arc.array(keys["mask"], "mask")) if "mask" in keys else None
        has_geom = all(v is not None for v in geometry.values())
        scalars = {}
        for name in arc.names:
            info = arc.infos[name]
            if info.file_size < 4096 and name not in (spec, pos_label):
                try:
                    a = arc.array(name, name)
                    if a.size <= 8 and a.dtype.kind in "iufbU":
                        scalars[name] = a.tolist()
                except IngestError:
                    pass
        return SourceScan(
            intensities=frames,
            positions=positions,
            geometry=geometry,
            defaults=Conversions(positions_unit="m" if has_geom else "px"),
            keys={**keys, "intensities": frames_label, "positions": pos_label},
            mask=mask,
            source_attrs=scalars,
            positions_grid=grid,
            positions_named_axes=named,
        )


register_reader(NPZReader())
