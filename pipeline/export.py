"""Export a finished reconstruction to files other programs open (`ptyinr export`).

A run lives in the scan store (`reconstructions/<run_id>`, README "Scan stores"), which only
ptyinr reads. `export_run` writes one run, with its pixel size and units, as

- `cxi`: `<base>.cxi`, for CXI readers (cxidb.org specification 1.6: PyNX, SHARP/COSMIC,
  ptychodus, silx and other NeXus viewers);
- `ptychodus`: `<base>.h5`, ptychodus's HDF5 product file;
- `tiff`: `<base>_amplitude.tif`, `<base>_phase.tif`, `<base>_probe_amplitude.tif`,
  `<base>_probe_phase.tif`, float32, for Fiji / ImageJ and any image viewer;
- `npz`: `<base>.npz`, plain arrays for numpy scripts (`np.load(..., allow_pickle=False)`).

`<base>` is `<store stem>-<run_id>` beside the store unless `out` says otherwise. One writer
function per format, registered in `EXPORTERS`; each docstring gives its layout.

Conventions kept from the store: object and probe arrays are (y, x), rows along y, no flips;
a position is the object-plane coordinate of the probe window's centre pixel (index N // 2),
in the same frame as the object's pixel coordinates. CXI and ptychodus need lengths in metres:
a run without geometry (pixel units) is refused for them and exported by `tiff` and `npz` with
pixel size 1 and unit "px".

Every file is written under a hidden temporary name in the target folder and renamed into
place only when all files of the export are complete: a failure leaves nothing behind (and an
existing file replaced with `force` stays as it was).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptyinr import store
from ptyinr.errors import InputError, StoreError
from ptyinr.version import __version__

# CODATA exact values (SI 2019).
PLANCK_J_S = 6.62607015e-34
LIGHT_SPEED_M_S = 299792458.0
ELECTRON_VOLT_J = 1.602176634e-19

CXI_VERSION = 160  # CXI specification 1.6, stored as version x 100


class ExportError(InputError):
    """A run that cannot be exported as asked (no such run, unfinished, no geometry, ...)."""


@dataclass
class RunData:
    """Everything an exporter writes, read once from the store (numpy, SI units or px)."""

    store: Path
    run_id: str
    scan_id: str
    object: np.ndarray  # (y, x) complex64
    object_y: np.ndarray  # pixel-centre coordinates, `unit`
    object_x: np.ndarray
    probe: np.ndarray  # (probe_y, probe_x) complex64
    probe_y: np.ndarray  # centred on pixel N // 2
    probe_x: np.ndarray
    positions: np.ndarray  # (n, 2) float64, (y, x), `unit`, same frame as object_y / object_x
    pixel_size: tuple[float, float]  # (y, x), `unit`
    unit: str  # "m" or "px"
    loss: np.ndarray  # per epoch
    epochs: np.ndarray
    attrs: dict[str, Any]  # the run's attrs (config, quality, resolution, ...)
    wavelength_m: float | None = None
    detector_distance_m: float | None = None
    detector_pixel_size_m: tuple[float, float] | None = None  # (y, x), of the frames fitted
    detector_pixel_note: str | None = None
    frc: dict[str, np.ndarray] | None = None  # spatial_frequency, frc, half_bit_threshold, ...
    frc_frequency_unit: str | None = None
    units_note: str | None = None  # how lengths were converted, when they were
    positions_note: str = "positions as measured (the store's)"  # or refined by the run

    @property
    def has_geometry(self) -> bool:
        return self.unit == "m" and self.wavelength_m is not None

    @property
    def energy_j(self) -> float | None:
        """Photon energy in joules (CXI's unit), from the wavelength the run used."""
        if self.wavelength_m is None:
            return None
        return PLANCK_J_S * LIGHT_SPEED_M_S / self.wavelength_m

    @property
    def energy_ev(self) -> float | None:
        e = self.energy_j
        return None if e is None else e / ELECTRON_VOLT_J

    @property
    def intensity_scale(self) -> float | None:
        """Counts per unit of the intensities the run fitted (the probe's scale is fitted to
        intensities divided by this; None when the run does not record it)."""
        value = self.attrs.get("intensity_scale")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) and value > 0 else None

    def probe_photons(self) -> float:
        """Photons per exposure the probe carries (sum |P|^2 in counts), 0 if unknown."""
        scale = self.intensity_scale
        if scale is None:
            return 0.0
        return float(np.sum(np.abs(self.probe.astype(np.complex128)) ** 2) * scale)

    @property
    def title(self) -> str:
        return f"{self.scan_id} run {self.run_id}"

    def attrs_json(self) -> str:
        return json.dumps(
            store.strict_json(self.attrs), sort_keys=True, default=str, allow_nan=False
        )


# ------------------------------------------------------------------------------------ reading


def _step(coord: np.ndarray, name: str, where: str) -> float:
    c = np.asarray(coord, dtype=np.float64)
    if c.size < 2:
        raise ExportError(f"{where}: coordinate {name!r} has {c.size} value(s); expected >= 2")
    step = float(np.median(np.diff(c)))
    if not math.isfinite(step) or step <= 0:
        raise ExportError(f"{where}: coordinate {name!r} step {step!r}; expected a positive step")
    return step


def load_run(store_path: str | os.PathLike, run_id: str) -> RunData:
    """Read a complete run of a scan store for export (`ExportError` naming store and run)."""
    path = Path(store_path)
    try:
        ds = store.open_scan_store(path)
    except StoreError as exc:  # names the path and what was expected
        raise ExportError(f"{exc}; cannot export run {run_id!r}") from None
    runs = {r["run_id"]: r for r in store.list_runs(path)}
    if run_id not in runs:
        known = ", ".join(sorted(runs)) if runs else "none: the store has no runs yet"
        raise ExportError(f"{path}: no run {run_id!r}; expected one of the store's runs ({known})")
    status = runs[run_id].get("status")
    if status != "complete":
        reason = runs[run_id].get("reason")
        why = f" ({reason})" if reason else ""
        raise ExportError(
            f"{path}: run {run_id!r} has status {status!r}{why}; expected a complete run "
            "(only finished runs are exported)"
        )
    run = store.open_run(path, run_id)
    where = f"{path}: run {run_id!r}"
    missing = [v for v in ("object", "probe") if v not in run]
    if missing:
        raise ExportError(f"{where}: {', '.join(missing)} missing; expected object and probe")
    obj = run["object"]
    probe = run["probe"]
    units = {str(obj[d].attrs.get("units", "px")) for d in obj.dims}
    if len(units) != 1 or not units <= {"m", "px"}:
        raise ExportError(f"{where}: object coordinate units {sorted(units)}; expected m or px")
    unit = units.pop()
    oy, ox = (np.asarray(obj[d].values, dtype=np.float64) for d in obj.dims)
    py_, px_ = (np.asarray(probe[d].values, dtype=np.float64) for d in probe.dims)
    pixel = (_step(oy, str(obj.dims[0]), where), _step(ox, str(obj.dims[1]), where))
    converted = None
    if unit == "px":
        # pixel positions in a store with geometry: the run stays in pixels, the export
        # gives metres (one object pixel = the object pixel size of the frames fitted)
        size = store.object_pixel_size(ds, tuple(int(n) for n in probe.shape))
        if size is not None:
            scale = np.asarray(size, dtype=np.float64) / np.asarray(pixel)
            oy, ox, py_, px_ = oy * scale[0], ox * scale[1], py_ * scale[0], px_ * scale[1]
            pixel, unit = (float(size[0]), float(size[1])), "m"
            converted = "run in pixel units; lengths converted to metres with the store's geometry"

    # the positions the object and probe were fitted at: refined ones when the run refined
    # them (train.refine_positions; same dims and unit as the store's), else the measured
    refined = run.get("refined_positions")
    if refined is not None and refined.shape == ds[store.POSITIONS].shape:
        positions = np.asarray(refined.values, dtype=np.float64)
        positions_note = "positions refined by the run (train.refine_positions)"
    else:
        positions = np.asarray(ds[store.POSITIONS].values, dtype=np.float64)
        positions_note = "positions as measured (the store's)"
    store_unit = ds.attrs.get("positions_unit")
    if store_unit == "px" and unit == "m":  # pixel positions, geometry known: the run's metres
        positions = positions * np.asarray(pixel)
    elif store_unit != unit:
        raise ExportError(
            f"{where}: store positions in {store_unit!r} but the run's object in {unit!r}; "
            "expected matching units"
        )

    a = ds.attrs
    loss = run["loss"] if "loss" in run else None
    data = RunData(
        store=path,
        run_id=run_id,
        scan_id=str(a.get("scan_id") or path.name.removesuffix(".zarr")),
        object=np.asarray(obj.values, dtype=np.complex64),
        object_y=oy,
        object_x=ox,
        probe=np.asarray(probe.values, dtype=np.complex64),
        probe_y=py_,
        probe_x=px_,
        positions=positions,
        pixel_size=pixel,
        unit=unit,
        loss=np.asarray([] if loss is None else loss.values, dtype=np.float64),
        epochs=np.asarray([] if loss is None else loss[loss.dims[0]].values, dtype=np.int64),
        attrs=dict(run.attrs),
        units_note=converted,
        positions_note=positions_note,
    )
    if unit == "m" and a.get("wavelength_m") is not None:
        lam, dist = float(a["wavelength_m"]), float(a["detector_distance_m"])
        ny, nx = data.probe.shape
        # the detector pixel of the frames fitted (binning enlarges it): consistent with the
        # object pixel size, lambda z / (N dx)
        eff = (lam * dist / (ny * pixel[0]), lam * dist / (nx * pixel[1]))
        raw = float(a["detector_pixel_size_m"])
        if all(abs(e - raw) <= 1e-6 * raw for e in eff):
            eff = (raw, raw)
        else:
            data.detector_pixel_note = (
                f"effective pixel of the reconstructed frames (the detector's is {raw:g} m; "
                "the frames were binned or resampled)"
            )
        data.wavelength_m, data.detector_distance_m, data.detector_pixel_size_m = lam, dist, eff
    if "frc" in run and "spatial_frequency" in run["frc"].dims:
        frc = run["frc"]
        data.frc = {"spatial_frequency": np.asarray(frc["spatial_frequency"].values)}
        for name in ("frc", "half_bit_threshold", "n_pixels"):
            if name in run:
                data.frc[name] = np.asarray(run[name].values)
        data.frc_frequency_unit = str(frc["spatial_frequency"].attrs.get("units", ""))
    return data


def _require_metres(run: RunData, fmt: str) -> None:
    if not run.has_geometry:
        raise ExportError(
            f"{run.store}: run {run.run_id!r} has no geometry (object pixel size and positions "
            f"in pixels); the {fmt} format stores lengths in metres, so it is not written. "
            "Expected a store with wavelength_m, detector_distance_m and detector_pixel_size_m; "
            "--format tiff or npz export pixel units (pixel size 1 px)"
        )


# ------------------------------------------------------------------------------------ writers


def _h5_str(group: Any, name: str, value: str) -> None:
    group.create_dataset(name, data=value)


def write_cxi(run: RunData, paths: dict[str, Path]) -> None:
    """CXI file (cxidb.org CXI specification 1.6; HDF5, SI units, complex as (r, i) compound).

    ```
    /cxi_version = 160, /number_of_entries = 1
    /entry_1                          NXentry; title, program_name
      data_1/data                   -> image_1/data (soft link; the entry's main data)
      data_1/translation            -> sample_1/geometry_1/translation (soft link)
      image_1/                        the object (NXdata, signal data, axes [y, x])
        data          (y, x)          complex64 transmission, rows along y, no flips
        title "object", data_space "real", data_type "electron density" (as PyNX and
        ptychodus label a ptychographic object), dimensionality 2, is_fft_shifted 0
        image_size    [width, height, 0] m;  x_pixel_size, y_pixel_size  m (object pixel)
        x, y          pixel-centre coordinates (m), in the frame of the translations
        probe       -> image_2/data (soft link)
        source_1, detector_1  -> instrument_1/... (soft links, as the spec's image class)
        process_1/    program, version, date (of the run), command, comments;
                      loss (epoch) and epoch; note_1 = the run's attrs as JSON
                      (resolved configuration, quality, FRC resolution, timings)
      image_2/                        the probe, same members (title "probe", data_type
                                      "amplitude", i.e. phased), coordinates centred on
                                      pixel N // 2; data attrs intensity_scale and
                                      a note (x sqrt(intensity_scale) gives sqrt(counts))
      instrument_1/source_1/energy    photon energy in J (= h c / wavelength)
      instrument_1/source_1/illumination  -> image_2/data (soft link)
      instrument_1/detector_1/distance    m
      instrument_1/detector_1/x_pixel_size, y_pixel_size   m (of the frames fitted)
      sample_1/name                   the scan id
      sample_1/geometry_1/translation (n, 3) m, columns (x, y, z), z = 0: the object-plane
                                      coordinate of each probe window's centre, as
                                      `ptyinr ingest` reads CXI translations (no sign flip)
    ```
    Which peer reads what: ptychodus 1.2 reads the probe from `source_1/illumination` and
    positions from `data_1/translation`; SHARP/COSMIC readers take images from `image_N/data`
    and the probe from `image_1/probe`; PyNX puts `x_pixel_size` / `y_pixel_size` beside its
    images the same way. ptychodus's newer CXI product reader (after 1.2) takes `image_1`
    as the probe and `image_2` as the object; here the object is `image_1`, the entry's main
    image (`data_1/data`), as SHARP/COSMIC readers expect: use `ptychodus` for ptychodus.
    Pixel units are refused (CXI lengths are metres).
    """
    import h5py

    _require_metres(run, "cxi")
    e = "/entry_1"
    updated = str(run.attrs.get("updated") or run.attrs.get("created") or "")
    with h5py.File(paths[""], "w") as f:
        f.attrs["creator"] = f"ptyinr {__version__}"
        f.attrs["default"] = "entry_1"
        f.create_dataset("cxi_version", data=np.int32(CXI_VERSION))
        f.create_dataset("number_of_entries", data=np.int32(1))
        entry = f.create_group(e)
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data_1"
        _h5_str(entry, "title", run.title)
        _h5_str(entry, "program_name", f"ptyinr {__version__}")

        instrument = entry.create_group("instrument_1")
        instrument.attrs["NX_class"] = "NXinstrument"
        source = instrument.create_group("source_1")
        source.attrs["NX_class"] = "NXsource"
        energy = source.create_dataset("energy", data=float(run.energy_j))  # type: ignore[arg-type]
        energy.attrs["units"] = "J"
        energy.attrs["note"] = "incident photon energy (h c / wavelength)"
        detector = instrument.create_group("detector_1")
        detector.attrs["NX_class"] = "NXdetector"
        dist = detector.create_dataset("distance", data=float(run.detector_distance_m))  # type: ignore[arg-type]
        dist.attrs["units"] = "m"
        det_y, det_x = run.detector_pixel_size_m  # type: ignore[misc]
        for name, value in (("x_pixel_size", det_x), ("y_pixel_size", det_y)):
            d = detector.create_dataset(name, data=float(value))
            d.attrs["units"] = "m"
            if run.detector_pixel_note:
                d.attrs["note"] = run.detector_pixel_note

        sample = entry.create_group("sample_1")
        sample.attrs["NX_class"] = "NXsample"
        _h5_str(sample, "name", run.scan_id)
        geometry = sample.create_group("geometry_1")
        geometry.attrs["NX_class"] = "NXgeometry"
        xyz = np.zeros((run.positions.shape[0], 3), dtype=np.float64)
        xyz[:, 0] = run.positions[:, 1]
        xyz[:, 1] = run.positions[:, 0]
        trans = geometry.create_dataset("translation", data=xyz)
        trans.attrs["units"] = "m"
        trans.attrs["axes"] = "translation:coordinate"
        trans.attrs["note"] = (
            "columns x, y, z: object-plane coordinate of each probe window's centre pixel "
            "(index N // 2), in the frame of image_1/x and image_1/y"
        )

        def image(name: str, title: str, kind: str, arr: np.ndarray, ys: Any, xs: Any) -> Any:
            g = entry.create_group(name)
            g.attrs["NX_class"] = "NXdata"
            g.attrs["signal"] = "data"
            g.attrs["axes"] = np.array(["y", "x"], dtype=h5py.string_dtype())
            _h5_str(g, "title", title)
            d = g.create_dataset("data", data=arr, compression="gzip", shuffle=True)
            d.attrs["interpretation"] = "image"
            _h5_str(g, "data_space", "real")
            _h5_str(g, "data_type", kind)
            g.create_dataset("dimensionality", data=np.int32(2))
            g.create_dataset("is_fft_shifted", data=np.int32(0))
            sy, sx = run.pixel_size
            ny, nx = arr.shape
            size = g.create_dataset("image_size", data=np.array([nx * sx, ny * sy, 0.0]))
            size.attrs["units"] = "m"
            for axis, value in (("x_pixel_size", sx), ("y_pixel_size", sy)):
                g.create_dataset(axis, data=float(value)).attrs["units"] = "m"
            for axis, coords in (("y", ys), ("x", xs)):
                c = g.create_dataset(axis, data=coords)
                c.attrs["units"] = "m"
                c.attrs["long_name"] = f"{axis} (m)"
            g["source_1"] = h5py.SoftLink(f"{e}/instrument_1/source_1")
            g["detector_1"] = h5py.SoftLink(f"{e}/instrument_1/detector_1")
            return g

        obj = image("image_1", "object", "electron density", run.object, run.object_y, run.object_x)
        probe = image("image_2", "probe", "amplitude", run.probe, run.probe_y, run.probe_x)
        if run.intensity_scale is not None:
            probe["data"].attrs["intensity_scale"] = run.intensity_scale
            probe["data"].attrs["note"] = (
                "fitted to intensities divided by intensity_scale: probe x "
                "sqrt(intensity_scale) is in sqrt(counts) per pixel"
            )
        obj["probe"] = h5py.SoftLink(f"{e}/image_2/data")
        source["illumination"] = h5py.SoftLink(f"{e}/image_2/data")

        process = obj.create_group("process_1")
        process.attrs["NX_class"] = "NXprocess"
        versions = run.attrs.get("versions") or {}
        _h5_str(process, "program", "ptyinr")
        _h5_str(process, "version", str(versions.get("ptyinr", __version__)))
        if updated:
            _h5_str(process, "date", updated)
        _h5_str(process, "command", str(run.attrs.get("created_by", "ptyinr reconstruct")))
        _h5_str(
            process,
            "comments",
            f"method {run.attrs.get('method', 'ptyinr')}; run {run.run_id} of {run.store}; "
            f"exported by ptyinr export {__version__}"
            + (f"; {run.units_note}" if run.units_note else "")
            + f"; {run.positions_note}",
        )
        if run.loss.size:
            process.create_dataset("loss", data=run.loss).attrs["note"] = (
                "training loss per epoch (ptyinr extension)"
            )
            process.create_dataset("epoch", data=run.epochs)
        note = process.create_group("note_1")
        note.attrs["NX_class"] = "NXnote"
        _h5_str(note, "description", "ptyinr run attributes: configuration, quality, timings")
        _h5_str(note, "type", "application/json")
        _h5_str(note, "data", run.attrs_json())

        data_1 = entry.create_group("data_1")
        data_1.attrs["NX_class"] = "NXdata"
        data_1.attrs["signal"] = "data"
        data_1["data"] = h5py.SoftLink(f"{e}/image_1/data")
        data_1["translation"] = h5py.SoftLink(f"{e}/sample_1/geometry_1/translation")


def _object_centre(coords: np.ndarray, step: float) -> float:
    """ptychodus's object centre: pixel j sits at centre + step * (j - width / 2)."""
    return float(coords[0] + step * coords.size / 2.0)


def write_ptychodus(run: RunData, paths: dict[str, Path]) -> None:
    """ptychodus product file (HDF5), as read by ptychodus's `H5ProductFileIO`
    (src/ptychodus/plugins/h5_product_file.py, ptychodus 1.2).

    ```
    attrs  name (scan-run), comments, detector_object_distance_m, probe_energy_eV,
           probe_photon_count (photons per exposure: sum |probe|^2 x the run's
           intensity_scale, as our forward model, an orthonormal FFT, counts them; 0 when
           the run records no intensity_scale), exposure_time_s = 0 (unknown),
           mass_attenuation_m2_kg = 0 (unknown)
    probe_position_indexes (n,) int64;  probe_position_x_m, probe_position_y_m (n,) float64
    probe   (1, 1, probe_y, probe_x) complex64 (OPR modes, coherent modes, y, x);
            attrs pixel_width_m, pixel_height_m
    object  (1, y, x) complex64 (layers, y, x); attrs center_x_m, center_y_m,
            pixel_width_m, pixel_height_m
    object_layer_spacing_m (0,) float64 (one layer)
    loss_epochs (epochs,) int64, loss_values (epochs,) float64
    ```
    ptychodus places object pixel j at centre + pixel_width * (j - width / 2) and a probe
    window centred on a position starts width / 2 pixels before it: the same frame as ours
    for even probe sizes (an odd-sized probe sits half a pixel off in ptychodus). Pixel units
    are refused (ptychodus stores metres).
    """
    import h5py

    _require_metres(run, "ptychodus")
    sy, sx = run.pixel_size
    with h5py.File(paths[""], "w") as f:
        f.attrs["name"] = f"{run.scan_id}-{run.run_id}"
        f.attrs["comments"] = (
            f"ptyinr run {run.run_id} of {run.store} (method {run.attrs.get('method', 'ptyinr')}), "
            f"exported by ptyinr export {__version__}"
            + (f"; {run.units_note}" if run.units_note else "")
            + f"; {run.positions_note}"
        )
        f.attrs["detector_object_distance_m"] = float(run.detector_distance_m)  # type: ignore[arg-type]
        f.attrs["probe_energy_eV"] = float(run.energy_ev)  # type: ignore[arg-type]
        f.attrs["probe_photon_count"] = run.probe_photons()
        f.attrs["exposure_time_s"] = 0.0
        f.attrs["mass_attenuation_m2_kg"] = 0.0
        f.create_dataset("probe_position_indexes", data=np.arange(run.positions.shape[0]))
        f.create_dataset("probe_position_x_m", data=run.positions[:, 1])
        f.create_dataset("probe_position_y_m", data=run.positions[:, 0])
        probe = f.create_dataset("probe", data=run.probe[np.newaxis, np.newaxis])
        probe.attrs["pixel_width_m"] = float(sx)
        probe.attrs["pixel_height_m"] = float(sy)
        obj = f.create_dataset("object", data=run.object[np.newaxis])
        obj.attrs["center_x_m"] = _object_centre(run.object_x, sx)
        obj.attrs["center_y_m"] = _object_centre(run.object_y, sy)
        obj.attrs["pixel_width_m"] = float(sx)
        obj.attrs["pixel_height_m"] = float(sy)
        f.create_dataset("object_layer_spacing_m", data=np.zeros(0, dtype=np.float64))
        f.create_dataset("loss_epochs", data=run.epochs)
        f.create_dataset("loss_values", data=run.loss)


TIFF_PARTS = ("amplitude", "phase", "probe_amplitude", "probe_phase")


def write_tiff(run: RunData, paths: dict[str, Path]) -> None:
    """Four float32 ImageJ TIFFs: `<base>_amplitude.tif`, `<base>_phase.tif` (object: |O|,
    arg O in radians) and `<base>_probe_amplitude.tif`, `<base>_probe_phase.tif`.

    Rows along y, no flips. Scale, with geometry: XResolution / YResolution = pixels per
    centimetre (0.01 / pixel size in m), ResolutionUnit = 3 (centimetre), and the ImageJ
    description's `unit=um` and `spacing` (pixel size in um): Fiji converts a centimetre
    resolution to micrometres when the description says um (ImageJ's FileOpener), so it shows
    the scale in um, other readers in cm. Without geometry: resolution 1 pixel per pixel,
    ResolutionUnit = 1 (none), ImageJ unit `pixel`. The description's `Info` names the store,
    run, quantity and pixel size.
    """
    import tifffile

    sy, sx = run.pixel_size
    if run.unit == "m":
        kw: dict[str, Any] = {
            "resolution": (0.01 / sx, 0.01 / sy),
            "resolutionunit": "CENTIMETER",
        }
        meta: dict[str, Any] = {"unit": "um", "spacing": sx * 1e6}
        scale = f"pixel size {sy:.6g} m (y) x {sx:.6g} m (x)"
    else:
        kw = {"resolution": (1.0, 1.0), "resolutionunit": "NONE"}
        meta = {"unit": "pixel", "spacing": 1.0}
        scale = "pixel units (no geometry): pixel size 1 px"
    arrays = {
        "amplitude": ("object amplitude |O|", np.abs(run.object)),
        "phase": ("object phase arg O (rad)", np.angle(run.object)),
        "probe_amplitude": ("probe amplitude |P|", np.abs(run.probe)),
        "probe_phase": ("probe phase arg P (rad)", np.angle(run.probe)),
    }
    for part in TIFF_PARTS:
        what, arr = arrays[part]
        info = f"ptyinr export: {what}; store {run.store}; run {run.run_id}; {scale}"
        tifffile.imwrite(
            paths[part],
            np.ascontiguousarray(arr, dtype=np.float32),
            imagej=True,
            metadata={**meta, "Info": info},
            **kw,
        )


def write_npz(run: RunData, paths: dict[str, Path]) -> None:
    """Plain arrays for scripts, `np.savez_compressed`, nothing pickled (read back with
    `np.load(path, allow_pickle=False)`).

    ```
    object (y, x) complex64, object_y, object_x    pixel-centre coordinates (units)
    probe (py, px) complex64, probe_y, probe_x     centred on pixel N // 2 (units)
    positions (n, 2) float64, (y, x), units; same frame as object_y / object_x
                                                   (refined when the run refined them)
    positions_note                                 0-d str: refined or measured
    pixel_size (2,) float64 (y, x), units          "m", or "px" (pixel size 1) without geometry
    units, positions_unit                          0-d str: "m" or "px"
    loss (epochs,), epoch (epochs,)
    intensity_scale                                counts per unit of the fitted intensities:
                                                   probe x sqrt(intensity_scale) is in counts
    wavelength_m, detector_distance_m, energy_ev, detector_pixel_size_m (2,)   with geometry
    frc, frc_spatial_frequency, frc_half_bit_threshold, frc_n_pixels,
    frc_frequency_unit, resolution, resolution_unit                            with an FRC
    store, run_id, scan_id                         0-d str
    units_note                                     0-d str, when a pixel-unit run of a store
                                                   with geometry was converted to metres
    attrs_json                                     0-d str: the run's attrs as JSON
    ```
    """
    arrays: dict[str, np.ndarray] = {
        "object": run.object,
        "object_y": run.object_y,
        "object_x": run.object_x,
        "probe": run.probe,
        "probe_y": run.probe_y,
        "probe_x": run.probe_x,
        "positions": run.positions,
        "pixel_size": np.asarray(run.pixel_size, dtype=np.float64),
        "units": np.array(run.unit),
        "positions_unit": np.array(run.unit),
        "loss": run.loss,
        "epoch": run.epochs,
        "store": np.array(str(run.store)),
        "run_id": np.array(run.run_id),
        "scan_id": np.array(run.scan_id),
        "attrs_json": np.array(run.attrs_json()),
    }
    if run.units_note:
        arrays["units_note"] = np.array(run.units_note)
    arrays["positions_note"] = np.array(run.positions_note)
    if run.intensity_scale is not None:
        arrays["intensity_scale"] = np.float64(run.intensity_scale)
    if run.has_geometry:
        arrays.update(
            wavelength_m=np.float64(run.wavelength_m),
            detector_distance_m=np.float64(run.detector_distance_m),
            energy_ev=np.float64(run.energy_ev),
            detector_pixel_size_m=np.asarray(run.detector_pixel_size_m, dtype=np.float64),
        )
    if run.frc is not None:
        for name, values in run.frc.items():
            arrays["frc" if name == "frc" else f"frc_{name}"] = values
        arrays["frc_frequency_unit"] = np.array(run.frc_frequency_unit or "")
        res = run.attrs.get("resolution")
        if isinstance(res, (int, float)):
            arrays["resolution"] = np.float64(res)
            arrays["resolution_unit"] = np.array(str(run.attrs.get("resolution_unit") or ""))
    with open(paths[""], "wb") as fh:  # a file object: numpy adds no ".npz" to the temp name
        np.savez_compressed(fh, **arrays)


# ----------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Exporter:
    """One format: its writer, the file suffix, the parts it writes ('' = one file), and
    whether it can only hold lengths in metres (runs without geometry are refused)."""

    write: Callable[[RunData, dict[str, Path]], None]
    suffix: str
    parts: tuple[str, ...] = ("",)
    description: str = ""
    metres_only: bool = False


EXPORTERS: dict[str, Exporter] = {
    "cxi": Exporter(
        write_cxi, ".cxi", description="CXI file (HDF5): object, probe, positions", metres_only=True
    ),
    "ptychodus": Exporter(
        write_ptychodus, ".h5", description="ptychodus HDF5 product file", metres_only=True
    ),
    "tiff": Exporter(
        write_tiff, ".tif", TIFF_PARTS, description="float32 TIFFs: amplitude, phase, probe"
    ),
    "npz": Exporter(write_npz, ".npz", description="numpy .npz of plain arrays"),
}


def output_paths(
    store_path: str | os.PathLike, run_id: str, fmt: str, out: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Where an export goes, part -> path.

    Default: `<store stem>-<run_id><suffix>` beside the store. `out` an existing folder (or
    ending in '/'): that name inside it. Otherwise `out` is the file (cxi, ptychodus, npz; the
    format's extension added when it has none) or the prefix of the files (tiff:
    `<out>_amplitude.tif`, ...; a trailing .tif is dropped).
    """
    exporter = _exporter(fmt)
    store_path = Path(store_path)
    stem = f"{store_path.name.removesuffix('.zarr')}-{run_id}"
    if out is None:
        base, exact = store_path.parent / stem, False
    else:
        text = os.fspath(out)
        out_path = Path(text).expanduser()
        if out_path.is_dir() or text.endswith(("/", os.sep)):
            base, exact = out_path / stem, False
        else:
            base, exact = out_path, True
    if exporter.parts == ("",):
        if exact and base.suffix:  # a file name given with its extension: as given
            return {"": base}
        return {"": base.with_name(base.name + exporter.suffix)}
    if base.suffix.lower() in (".tif", ".tiff"):
        base = base.with_suffix("")
    return {p: base.with_name(f"{base.name}_{p}{exporter.suffix}") for p in exporter.parts}


def _exporter(fmt: str) -> Exporter:
    if fmt not in EXPORTERS:
        raise ExportError(f"format {fmt!r}; expected one of {', '.join(EXPORTERS)}")
    return EXPORTERS[fmt]


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def export_run(
    store_path: str | os.PathLike,
    run_id: str,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> list[Path]:
    """Write run `run_id` of a scan store as `fmt` (a key of `EXPORTERS`); the paths written.

    Refuses (`ExportError`, exit 2 in the CLI) an unknown format, a store that is not a scan
    store, a missing or unfinished run, a run without geometry for a metres-only format, and
    existing files unless `force`. All files are written under temporary names and renamed
    into place at the end; on any failure the temporary files are removed and existing files
    are left as they were.
    """
    exporter = _exporter(fmt)
    run = load_run(store_path, run_id)
    if exporter.metres_only:
        _require_metres(run, fmt)
    targets = output_paths(store_path, run_id, fmt, out)
    existing = [p for p in targets.values() if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise ExportError(f"{names}: exists; expected a new file (--force overwrites)")
    for p in existing:
        if p.is_dir():
            raise ExportError(f"{p}: is a folder; expected a file path to write")
    temps = {part: _temp_name(p) for part, p in targets.items()}
    folder = next(iter(targets.values())).parent
    made = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        exporter.write(run, temps)
        for part, p in targets.items():
            os.replace(temps[part], p)
    except OSError as exc:
        _remove(temps.values(), made)
        raise ExportError(
            f"{store_path}: run {run_id!r}: cannot write {fmt} to {folder} ({exc}); "
            "expected a writable folder"
        ) from exc
    except BaseException:
        _remove(temps.values(), made)
        raise
    return list(targets.values())


def _remove(paths: Any, folders: list[Path]) -> None:
    """Remove temporary files, then the folders this export created (if left empty)."""
    for p in paths:
        with contextlib.suppress(OSError):
            Path(p).unlink()
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()
