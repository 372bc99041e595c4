"""NeXus `NXptycho` key-map defaults for the generic HDF5 reader (`--format hdf5`).

Why: beamlines that write NeXus put every quantity ingest needs at places the application
definition names, with its unit in a `units` attribute; a user should not have to spell
out five `--key` options (and convert units by hand) for such a file.

Where each quantity is looked for (first match wins; ENTRY is `--entry` if given, else the
first `NXentry` whose `definition` is `NXptycho`, else the first `NXentry`; a file without
an `NX_class=NXentry` group is not NeXus and gets no defaults from here;
INSTRUMENT, DETECTOR, BEAM, MONO, SAMPLE are the first child of that NeXus class, or of
that name: `instrument`, `detector`, `beam`, `monochromator`, `sample`):

- intensities: ENTRY/data's `@signal` dataset (else ENTRY/data/data), else DETECTOR/data;
- positions_x, positions_y: ENTRY/data/x and y (NXdata links to the sample's motors), else
  SAMPLE/transformations/x and y, else SAMPLE/transformations/x_translation and
  y_translation, else SAMPLE/x_translation and y_translation;
- wavelength: BEAM/incident_wavelength; else energy: BEAM/incident_beam_energy (NXptycho),
  BEAM/incident_energy (NXbeam), MONO/energy;
- detector distance: DETECTOR/distance;
- detector pixel size: DETECTOR/x_pixel_size (must equal y_pixel_size where both exist);
- mask: DETECTOR/pixel_mask (nonzero = bad pixel, as NXdetector defines it).

Units: lengths in m, cm, mm, um (µm, micron), nm, Å (angstrom); energies in eV, keV, J.
A field without `@units` is taken in SI (m) or eV; a unit not in these lists is refused
in one line naming the field and the unit. Positions are the recorded translations, their
sign and axes kept as written (as for CXI); `--positions-order` and `--positions-unit`
still apply. Per-frame x and y (n,), raster x and y of the frames' grid
shape, or two 1-D grid axes (rows = y, columns = x) are all accepted. Every default is
replaced by a `--key` of the same quantity, and the keys used are recorded in the store.
The NeXus `source` energy is the storage ring's, never the photon energy: not used.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from ptyinr.errors import IngestError

LENGTH_UNITS: dict[str, str] = {
    "m": "m",
    "metre": "m",
    "meter": "m",
    "cm": "cm",
    "mm": "mm",
    "um": "um",
    "µm": "um",  # micro sign
    "μm": "um",  # greek mu
    "micron": "um",
    "microns": "um",
    "micrometer": "um",
    "micrometre": "um",
    "nm": "nm",
    "a": "a",
    "å": "a",
    "angstrom": "a",
    "angstroms": "a",
}
ENERGY_UNITS: dict[str, str] = {"ev": "ev", "kev": "kev", "j": "j"}
# Positions units the conversions know; other lengths are refused with the field named.
POSITION_UNITS = ("m", "mm", "um", "nm")


def _unit(obj: h5py.Dataset) -> str | None:
    raw = obj.attrs.get("units")
    if raw is None:
        return None
    if isinstance(raw, np.ndarray):
        raw = raw.ravel()[0] if raw.size else ""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    text = str(raw).strip()
    return text or None


def _nx_class(obj: Any) -> str:
    raw = obj.attrs.get("NX_class", "")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return str(raw)


def _text(obj: Any) -> str:
    value = obj[()] if isinstance(obj, h5py.Dataset) else obj
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip()


def _child(group: h5py.Group | None, nx_class: str, name: str) -> h5py.Group | None:
    """The first child group of NeXus class `nx_class`, else the child called `name`."""
    if group is None:
        return None
    for key in group:
        obj = group.get(key)
        if isinstance(obj, h5py.Group) and _nx_class(obj) == nx_class:
            return obj
    obj = group.get(name)
    return obj if isinstance(obj, h5py.Group) else None


def find_entry(f: h5py.File, entry: str | None = None) -> h5py.Group | None:
    """The NeXus entry to read: `entry` if named, else the NXentry whose definition is
    NXptycho, else the first NXentry. None in a file that is not NeXus (no group with
    NX_class=NXentry): its plain /entry/... datasets are not taken for NeXus fields."""
    if entry:
        obj = f.get("/" + entry.strip("/"))
        return obj if isinstance(obj, h5py.Group) else None
    entries = [f[k] for k in f if isinstance(f.get(k), h5py.Group) and _nx_class(f[k]) == "NXentry"]
    for e in entries:
        d = e.get("definition")
        if isinstance(d, h5py.Dataset) and _text(d).lower() == "nxptycho":
            return e
    return entries[0] if entries else None


def _first(group: h5py.Group | None, *names: str) -> h5py.Dataset | None:
    if group is None:
        return None
    for n in names:
        obj = group.get(n)
        if isinstance(obj, h5py.Dataset):
            return obj
    return None


def _length_suffix(d: h5py.Dataset, src: str, allowed: tuple[str, ...]) -> str:
    unit = _unit(d)
    if unit is None:
        return "m"
    key = LENGTH_UNITS.get(unit.lower())
    if key is None or key not in allowed:
        raise IngestError(
            f"{src}: {d.name}@units={unit!r}; expected a length unit among {list(allowed)} "
            "(or give the value with --key)"
        )
    return key


def nxptycho_keys(
    f: h5py.File, given: dict[str, str], src: str, entry: str | None = None
) -> tuple[dict[str, str], str | None]:
    """Key-map defaults found in a NeXus NXptycho-like file, and the positions' unit.

    Only quantities the user did not give (`given`) are looked for. Geometry keys carry
    the file's unit in their name (e.g. `energy_kev`, `detector_distance_mm`), so the
    generic reader converts them like a user's key. The unit is None when no positions
    were found here (or they carry no `@units`).
    """
    e = find_entry(f, entry)
    if e is None:
        return {}, None
    inst = _child(e, "NXinstrument", "instrument")
    det = _child(inst, "NXdetector", "detector")
    beam = _child(inst, "NXbeam", "beam")
    mono = _child(inst, "NXmonochromator", "monochromator")
    sample = _child(e, "NXsample", "sample")
    trans = _child(sample, "NXtransformations", "transformations")
    nxdata = _child(e, "NXdata", "data")
    found: dict[str, str] = {}
    unit: str | None = None

    if "intensities" not in given:
        signal = _text(nxdata.attrs["signal"]) if nxdata and "signal" in nxdata.attrs else ""
        d = _first(nxdata, *([signal] if signal else []), "data") or _first(det, "data")
        if d is not None:
            found["intensities"] = d.name

    if not any(k.startswith("positions") for k in given):
        for group, xs, ys in (
            (nxdata, "x", "y"),
            (trans, "x", "y"),
            (trans, "x_translation", "y_translation"),
            (sample, "x_translation", "y_translation"),
        ):
            dx, dy = _first(group, xs), _first(group, ys)
            if dx is not None and dy is not None:
                ux = _length_suffix(dx, src, POSITION_UNITS) if _unit(dx) else None
                uy = _length_suffix(dy, src, POSITION_UNITS) if _unit(dy) else None
                if ux != uy:
                    raise IngestError(
                        f"{src}: {dx.name}@units={_unit(dx)!r} but {dy.name}@units="
                        f"{_unit(dy)!r}; expected x and y positions in one unit"
                    )
                found["positions_x"], found["positions_y"] = dx.name, dy.name
                unit = ux
                break

    if not any(k.startswith(("energy", "wavelength")) for k in given):
        wl = _first(beam, "incident_wavelength")
        en = _first(beam, "incident_beam_energy", "incident_energy") or _first(mono, "energy")
        if wl is not None:
            found[f"wavelength_{_length_suffix(wl, src, ('m', 'nm', 'a'))}"] = wl.name
        elif en is not None:
            u = _unit(en)
            suffix = "ev" if u is None else ENERGY_UNITS.get(u.lower())
            if suffix is None:
                raise IngestError(
                    f"{src}: {en.name}@units={u!r}; expected an energy unit among "
                    "['eV', 'keV', 'J'] (or give the energy with --key energy_ev=...)"
                )
            found[f"energy_{suffix}"] = en.name

    if not any(k.startswith("detector_distance") for k in given):
        d = _first(det, "distance")
        if d is not None:
            suffix = _length_suffix(d, src, ("m", "cm", "mm"))
            found[f"detector_distance_{suffix}"] = d.name

    if not any(k.startswith("detector_pixel_size") for k in given):
        px, py = _first(det, "x_pixel_size"), _first(det, "y_pixel_size")
        if px is not None:
            suffix = _length_suffix(px, src, ("m", "mm", "um"))
            if py is not None:
                _check_square(px, py, src)
            found[f"detector_pixel_size_{suffix}"] = px.name

    if "mask" not in given:
        m = _first(det, "pixel_mask")
        if m is not None and m.ndim >= 2:
            found["mask"] = m.name
    return found, unit


_SCALE = {"m": 1.0, "cm": 1e-2, "mm": 1e-3, "um": 1e-6, "nm": 1e-9, "a": 1e-10}


def _check_square(px: h5py.Dataset, py: h5py.Dataset, src: str) -> None:
    def metres(d: h5py.Dataset) -> tuple[float, str]:
        unit = _unit(d) or "m"
        raw = float(np.asarray(d[()], dtype=np.float64).ravel()[0])
        value = raw * _SCALE[LENGTH_UNITS.get(unit.lower(), "m")]
        return value, f"{raw:.6g} {unit} ({value:.6g} m)"

    (vx, tx), (vy, ty) = metres(px), metres(py)
    if abs(vx - vy) > 1e-9 * max(abs(vx), abs(vy)):
        raise IngestError(
            f"{src}: {px.name}={tx} but {py.name}={ty}; expected square pixels "
            "(or --key detector_pixel_size_m=...)"
        )
