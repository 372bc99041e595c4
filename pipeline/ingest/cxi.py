"""CXI files (the NeXus-based Coherent X-ray Imaging layout, cxidb.org).

Defaults (each overridable with `--key`): frames `entry_1/data_1/data` (or the detector's
`data`), positions `entry_1/sample_1/geometry_1/translation` (n, 3) in metres with columns
(x, y, z), source `energy` in joules (CXI's unit) or `wavelength` in metres, detector
`distance`, `x_pixel_size` / `y_pixel_size` in metres, optional `mask` (nonzero = bad pixel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ptyinr.errors import IngestError
from ptyinr.ingest.convert import Conversions
from ptyinr.ingest.hdf5 import read_generic, read_number
from ptyinr.ingest.registry import SourceScan, open_h5, register_reader


def _first(f: h5py.File, *candidates: str) -> str | None:
    return next((c for c in candidates if c in f), None)


class CXIReader:
    """CXI layout: geometry and positions found at their standard places."""

    name = "cxi"
    description = "CXI (entry_1/data_1/data, sample_1/geometry_1/translation, source energy)"

    def sniff(self, path: Path) -> bool:
        if not (path.is_file() and h5py.is_hdf5(path)):
            return False
        with h5py.File(path, "r") as f:
            return "cxi_version" in f or "entry_1/instrument_1" in f or "entry_1/data_1" in f

    def read(self, path: Path, keys: dict[str, str], options: dict[str, Any]) -> SourceScan:
        src = str(path)
        entry = "/" + str(options.get("entry", "entry_1")).strip("/")
        det = f"{entry}/instrument_1/detector_1"
        found: dict[str, str] = {}
        with open_h5(path) as f:
            if entry not in f:
                raise IngestError(
                    f"{src}: group {entry!r} missing; expected a CXI entry (found {sorted(f)})"
                )
            data = _first(f, f"{entry}/data_1/data", f"{det}/data")
            if data:
                found["intensities"] = data
            trans = _first(
                f,
                f"{entry}/sample_1/geometry_1/translation",
                f"{entry}/data_1/translation",
                f"{det}/translation",
            )
            if trans:
                found["positions"] = trans
            energy = _first(f, f"{entry}/instrument_1/source_1/energy")
            wavelength = _first(f, f"{entry}/instrument_1/source_1/wavelength")
            if wavelength:
                found["wavelength_m"] = wavelength
            elif energy:
                found["energy_j"] = energy
            if f"{det}/distance" in f:
                found["detector_distance_m"] = f"{det}/distance"
            px, py = f"{det}/x_pixel_size", f"{det}/y_pixel_size"
            if px in f and "detector_pixel_size_m" not in keys:
                vx = read_number(f, px, src, "x_pixel_size")
                vy = read_number(f, py, src, "y_pixel_size") if py in f else vx
                if abs(vx - vy) > 1e-9 * max(vx, vy):
                    raise IngestError(
                        f"{src}: {px}={vx!r} but {py}={vy!r}; expected square pixels "
                        "(or --key detector_pixel_size_m=...)"
                    )
                found["detector_pixel_size_m"] = px
            if f"{det}/mask" in f:
                found["mask"] = f"{det}/mask"
        # user keys win; a user key for energy/wavelength replaces the file's either one
        if any(k.startswith(("energy", "wavelength")) for k in keys):
            found = {k: v for k, v in found.items() if not k.startswith(("energy", "wavelength"))}
        if any(k.startswith("positions") for k in keys):
            found.pop("positions", None)
        merged = {**found, **keys}
        if "intensities" not in merged:
            raise IngestError(
                f"{src}: key intensities missing ({entry}/data_1/data not "
                "found); expected CXI frames or --key intensities=..."
            )
        scan = read_generic(
            path,
            merged,
            src,
            defaults=Conversions(positions_order="xy" if "positions" in merged else None),
        )
        if scan.mask is not None:
            scan.mask = np.asarray(scan.mask) != 0
        scan.source_attrs["cxi_entry"] = entry
        return scan


register_reader(CXIReader())
