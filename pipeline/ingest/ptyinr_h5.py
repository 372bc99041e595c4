"""The HDF5 layout of the PtyINR authors' code (NSLS-II HXN `save_ptycho_h5` files).

Datasets: `diffamp` (n, N, N) amplitudes, i.e. sqrt(counts - threshold), with the zero
frequency at the corner (the HXN writer applies fftshift before saving); `points` (2, n) in
micrometres; `lambda_nm`; `ccd_pixel_um`; `z_m`; plus scalars such as `angle`, `dr_x`.

Axis order: the authors call `points[0]` "x", but their code pairs it with array axis 0 of
the object and of the (transposed) frames (`obj[points[0]:points[0]+nx, points[1]:...]`),
which is our y (rows). So the default is positions_order="yx" in array terms: the
reconstruction matches the authors' orientation. Pass `--positions-order xy` to swap.
The DC position is detected per file by default (dc="auto", recorded), because the
authors' simulation scripts write the same keys with a centred zero frequency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from ptyinr.ingest.convert import Conversions
from ptyinr.ingest.hdf5 import read_generic
from ptyinr.ingest.registry import SourceScan, register_reader

KEYS = {
    "intensities": "/diffamp",
    "positions": "/points",
    "wavelength_nm": "/lambda_nm",
    "detector_pixel_size_um": "/ccd_pixel_um",
    "detector_distance_m": "/z_m",
}
DEFAULTS = Conversions(amplitude=True, dc="auto", positions_unit="um", positions_order="yx")


class PtyINRH5Reader:
    """`diffamp` / `points` / `lambda_nm` / `ccd_pixel_um` / `z_m` files."""

    name = "ptyinr_h5"
    description = "PtyINR authors' / HXN layout (diffamp, points [um], lambda_nm, ccd_pixel_um)"

    def sniff(self, path: Path) -> bool:
        if not (path.is_file() and h5py.is_hdf5(path)):
            return False
        with h5py.File(path, "r") as f:
            return "diffamp" in f and "points" in f

    def read(self, path: Path, keys: dict[str, str], options: dict[str, Any]) -> SourceScan:
        merged = dict(KEYS)
        if any(k.startswith(("energy", "wavelength")) for k in keys):
            merged.pop("wavelength_nm")
        if any(k.startswith("detector_pixel_size") for k in keys):
            merged.pop("detector_pixel_size_um")
        if any(k.startswith("detector_distance") for k in keys):
            merged.pop("detector_distance_m")
        if any(k.startswith("positions") for k in keys):
            merged.pop("positions")
        merged.update(keys)
        return read_generic(path, merged, str(path), defaults=DEFAULTS)


register_reader(PtyINRH5Reader())
