"""Probe guesses from files: read a starting probe and bring it onto the reconstruction's grid.

A reconstruction refines its probe from a starting guess; a good guess (a probe measured or
reconstructed before, at the same beamline set-up) converges faster and more reliably than one
derived from the diffraction patterns. Users hand it in as a file, in one of these forms:

``probe.npy``
    A 2-D complex (or real) array. Loaded with ``allow_pickle=False``.
``probe.npz``
    Key ``probe`` (or the archive's only array); optional ``pixel_size_m``: one number or
    (y, x), in metres. Loaded with ``allow_pickle=False``.
``probe.h5`` / ``.hdf5`` / ``.nxs`` / ``.cxi``
    The first dataset found of `HDF5_PROBE_PATHS`; optional pixel size from the dataset's
    attributes ``pixel_size_m`` (one number or (y, x)) or ``y_pixel_size`` + ``x_pixel_size``.
``probe.h5:/path/to/dataset``
    That dataset of an HDF5 / CXI file (split at the last ``:`` followed by ``/``).
``scan.zarr:RUN_ID``
    The ``probe`` of a complete reconstruction run of a scan store (ptyinr.store); its pixel
    size comes from the probe coordinates when they are in metres.

A probe with a leading mode axis (modes, y, x) gives its first (dominant) mode. When both the
file's pixel size and the target's are known and differ by more than `PIXEL_SIZE_RTOL`, the
complex field is resampled by band-limited (Fourier) interpolation; then it is centre-cropped
or zero-padded to the frame shape. Either way window index N // 2 stays on the optical axis.
Nothing read is ever executed or unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import hdf5plugin  # noqa: F401  (compressed HDF5 probe files, as for detector frames)
import numpy as np

from ptyinr import store
from ptyinr.errors import InputError

HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".cxi")
NPY_SUFFIXES = (".npy", ".npz")
#: Where HDF5 / CXI files keep a probe, tried in this order.
HDF5_PROBE_PATHS = (
    "/entry_1/probe",
    "/entry_1/instrument_1/source_1/illumination",
    "/entry_1/data_1/probe",
    "/probe",
    "/entry/probe",
)
#: Pixel sizes closer than this (relative) are taken as equal: crop / pad only, no resampling.
PIXEL_SIZE_RTOL = 1e-3
#: Plausible object pixel sizes in metres; outside is almost always a unit slip (nm as m).
PIXEL_SIZE_RANGE_M = (1e-13, 1e-2)

_LENGTH_UNITS_M = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "μm": 1e-6, "nm": 1e-9}
_PIXEL_UNITS = ("px", "pixel", "pixels", "pix")


@dataclass(frozen=True, eq=False)
class ProbeGuess:
    """A starting probe on the reconstruction's grid, and where it came from.

    array: complex64 of the frame shape, centred (window index N // 2 is the optical axis).
    source: where it was read, in the syntax `load_probe_guess` accepts (HDF5: with the
    dataset used), so a run's record says exactly what started it.
    pixel_size_m: the file's pixel size (y, x) in metres, None when the file does not say.
    resampled: True when the field was interpolated onto the target pixel size; False when it
    was only cropped / padded (same pixel size, or one of the two unknown).
    """

    array: np.ndarray
    source: str
    pixel_size_m: tuple[float, float] | None
    resampled: bool


def load_probe_guess(
    source: str | Path,
    frame_shape: tuple[int, int],
    pixel_size_m: tuple[float, float] | None,
) -> ProbeGuess:
    """Read a probe guess from `source` and bring it onto the frame grid.

    `pixel_size_m` is the reconstruction's object pixel size (y, x) in metres, or None in
    pixel units (then the file's pixels are taken as the reconstruction's). Every problem
    with the file raises `InputError` with one line naming the file, the key and the value.
    """
    shape = _check_frame_shape(frame_shape)
    target = None if pixel_size_m is None else _pixel_pair(pixel_size_m, "target pixel_size_m")
    raw = _read(str(source))
    where, file_pixel = raw.label, raw.pixel_size_m
    probe = _as_2d(raw.array, where)
    _check_values(probe, where)
    ratio = None
    if target is not None and file_pixel is not None:
        rel = [abs(f - t) / t for f, t in zip(file_pixel, target, strict=True)]
        if max(rel) > PIXEL_SIZE_RTOL:
            # An axis within tolerance keeps its pixels exactly (factor 1).
            ratio = tuple(
                1.0 if r <= PIXEL_SIZE_RTOL else f / t
                for r, f, t in zip(rel, file_pixel, target, strict=True)
            )
    if ratio is None:
        out = centre_crop_or_pad(probe, shape)
    else:
        out = resample_centred(probe, (float(ratio[0]), float(ratio[1])), shape)
    if not np.any(out):
        raise InputError(
            f"{where}: probe of shape {probe.shape} has no intensity inside the {shape} "
            "frame window around its centre; expected a probe centred on its array"
        )
    return ProbeGuess(
        array=np.ascontiguousarray(out, dtype=np.complex64),
        source=raw.source,
        pixel_size_m=file_pixel,
        resampled=ratio is not None,
    )


# --------------------------------------------------------------------------------------------
# grids


def centre_crop_or_pad(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`field` cropped or zero-padded to `shape`, source index N // 2 landing on M // 2."""
    out = np.zeros(shape, dtype=np.complex128)
    src, dst = [], []
    for n, m in zip(field.shape, shape, strict=True):
        shift = m // 2 - n // 2  # destination index = source index + shift
        lo, hi = max(0, -shift), min(n, m - shift)
        src.append(slice(lo, hi))
        dst.append(slice(lo + shift, hi + shift))
    out[tuple(dst)] = field[tuple(src)]
    return out


def _interpolation_matrix(n: int, m: int, ratio: float) -> np.ndarray:
    """(m, n) matrix mapping the DFT coefficients of n samples (pixel 1) to m samples of
    pixel 1 / ratio; centre index n // 2 maps onto m // 2.

    Trigonometric (band-limited) interpolation, with frequencies the coarser grid cannot hold
    removed (an ideal low-pass, so downsampling does not alias) and the Nyquist term of an even
    n split evenly between +/- n/2 (so a real field stays real). Target points outside the
    source pixels' extent are zero, not the periodic copy the DFT would give.
    """
    k = np.fft.fftfreq(n) * n  # integer frequencies, cycles per n source pixels
    t = n // 2 + (np.arange(m) - m // 2) / ratio  # target positions in source pixels
    mat = np.exp(2j * np.pi * np.outer(t, k) / n)
    if n % 2 == 0:
        mat[:, n // 2] = np.cos(np.pi * t)
    target_nyquist = 0.5 * ratio  # cycles per source pixel the target grid can hold
    mat[:, np.abs(k) / n > target_nyquist * (1 + 1e-9)] = 0.0
    inside = (t >= -0.5) & (t < n - 0.5)
    mat[~inside, :] = 0.0
    return mat


def resample_centred(
    field: np.ndarray, ratio: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """Complex `field` interpolated onto `shape` pixels of size (file pixel / ratio), per axis.

    Why Fourier interpolation: a probe is a band-limited coherent field, so trigonometric
    interpolation resamples phase and amplitude together without the smoothing or ringing of
    splines on real and imaginary parts. The optical axis (index N // 2) stays at M // 2;
    amplitudes are kept (intensity scales with the pixel area; the caller normalises).
    """
    ny, nx = field.shape
    coeff = np.fft.fft2(field.astype(np.complex128)) / (ny * nx)
    ay = _interpolation_matrix(ny, shape[0], ratio[0])
    ax = _interpolation_matrix(nx, shape[1], ratio[1])
    # Frequencies removed by the low-pass need no multiplication (halves the work at 2x down).
    ky, kx = np.any(ay, axis=0), np.any(ax, axis=0)
    return ay[:, ky] @ coeff[np.ix_(ky, kx)] @ ax[:, kx].T


# --------------------------------------------------------------------------------------------
# checks


def _check_frame_shape(frame_shape: tuple[int, int]) -> tuple[int, int]:
    try:
        shape = tuple(int(s) for s in frame_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"frame_shape={frame_shape!r}; expected two positive integers (y, x)")
    return shape[0], shape[1]


def _pixel_pair(value: Any, where: str) -> tuple[float, float]:
    """One number or (y, x) as a pair of plausible pixel sizes in metres."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.size not in (1, 2) or arr.ndim > 1:
        raise InputError(f"{where}={_short(value)}; expected one number or (y, x) in metres")
    pair = [float(v) for v in arr.reshape(-1)]
    if len(pair) == 1:
        pair = pair * 2
    lo, hi = PIXEL_SIZE_RANGE_M
    for v in pair:
        if not math.isfinite(v) or v <= 0:
            raise InputError(f"{where}={_short(value)}; expected positive finite metres")
        if not lo <= v <= hi:
            raise InputError(
                f"{where}={_short(value)} is outside [{lo:g}, {hi:g}] (wrong unit?); "
                "expected metres"
            )
    return pair[0], pair[1]


def _as_2d(raw: np.ndarray, where: str) -> np.ndarray:
    """The probe as a 2-D complex128 array: (y, x), or mode 0 of (modes, y, x)."""
    if raw.dtype.kind not in "iufc":
        raise InputError(f"{where}: dtype {raw.dtype}; expected a complex or real numeric array")
    if raw.ndim == 3:
        if raw.shape[0] < 1:
            raise InputError(f"{where}: shape {raw.shape} has no mode; expected (modes, y, x)")
        raw = raw[0]
    elif raw.ndim != 2:
        raise InputError(
            f"{where}: shape {raw.shape} ({raw.ndim}-D); expected 2-D (y, x) or 3-D (modes, y, x)"
        )
    if min(raw.shape) < 1:
        raise InputError(f"{where}: shape {raw.shape} is empty; expected (y, x) pixels")
    return np.asarray(raw, dtype=np.complex128)


def _check_values(probe: np.ndarray, where: str) -> None:
    finite = np.isfinite(probe)
    if not finite.all():
        y, x = (int(i) for i in np.argwhere(~finite)[0])
        raise InputError(
            f"{where}: probe[{y}, {x}]={probe[y, x]} ({int((~finite).sum())} non-finite "
            "values); expected finite values"
        )
    if not np.any(probe):
        raise InputError(f"{where}: probe of shape {probe.shape} is all zero; expected a beam")


def _short(value: Any) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# --------------------------------------------------------------------------------------------
# sources


class _Raw(NamedTuple):
    """What a reader found: the array as stored, the source in `load_probe_guess` syntax, the
    label error messages use (file and key / dataset / run), and the file's pixel size."""

    array: np.ndarray
    source: str
    label: str
    pixel_size_m: tuple[float, float] | None


def split_source(source: str) -> tuple[Path, str, str]:
    """(file or store path, the rest, kind) of a probe source: kind "file" (rest ""),
    "run" (rest ":RUN_ID") or "hdf5" (rest ":/dataset"); "unknown" when the syntax names
    neither (rest ""). One parser for the reader and the command line's early checks."""
    path = Path(source)
    if path.is_file():
        return path, "", "file"
    if ":" in source:
        left, run_id = source.rsplit(":", 1)
        left = left.rstrip("/")
        if run_id and "/" not in run_id and (left.endswith(".zarr") or Path(left).is_dir()):
            return Path(left), f":{run_id}", "run"
        cut = source.rfind(":/")
        if cut > 0 and Path(source[:cut]).suffix.lower() in HDF5_SUFFIXES:
            return Path(source[:cut]), source[cut:], "hdf5"
    return path, "", "unknown"


def _read(source: str) -> _Raw:
    """(raw array, source in canonical syntax, file pixel size or None) for any source."""
    path, rest, kind = split_source(source)
    if kind == "file":
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _read_npy(path)
        if suffix == ".npz":
            return _read_npz(path)
        if suffix in HDF5_SUFFIXES:
            return _read_hdf5(path, None)
        raise InputError(
            f"probe file {source!r}: suffix {path.suffix!r}; expected one of "
            f"{', '.join(NPY_SUFFIXES + HDF5_SUFFIXES)}, or STORE.zarr:RUN_ID"
        )
    if kind == "run":
        return _read_run(path, rest[1:])
    if kind == "hdf5":
        if not path.is_file():
            raise InputError(f"probe file {str(path)!r}: does not exist; expected a file")
        return _read_hdf5(path, rest[1:])
    if path.is_dir():
        hint = ""
        if (path / "zarr.json").is_file():
            try:
                runs = [r["run_id"] for r in store.list_runs(path)]
            except InputError:
                runs = []
            hint = f"; runs there: {', '.join(runs) or 'none'}"
        raise InputError(
            f"probe source {source!r}: is a directory; expected STORE.zarr:RUN_ID{hint}"
        )
    raise InputError(
        f"probe file {source!r}: does not exist; expected a .npy/.npz/.h5/.cxi file, "
        "FILE.h5:/dataset or STORE.zarr:RUN_ID"
    )


def _read_npy(path: Path) -> _Raw:
    where = f"probe file {str(path)!r}"
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # not .npy, truncated, object arrays (pickle refused)
        raise InputError(f"{where}: cannot be read as .npy ({_one_line(exc)})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{where}: holds {type(arr).__name__}; expected one .npy array")
    return _Raw(arr, str(path), where, None)


def _read_npz(path: Path) -> _Raw:
    where = f"probe file {str(path)!r}"
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            candidates = [k for k in keys if k != "pixel_size_m"]
            if "probe" in keys:
                key = "probe"
            elif len(candidates) == 1:
                key = candidates[0]
            else:
                raise InputError(
                    f"{where}: keys {keys}; expected key 'probe' (or exactly one array)"
                )
            arr = npz[key]
            pixel_raw = npz["pixel_size_m"] if "pixel_size_m" in keys else None
    except InputError:
        raise
    except Exception as exc:  # not a zip, corrupt member, object arrays (pickle refused)
        raise InputError(f"{where}: cannot be read as .npz ({_one_line(exc)})") from None
    pixel = None if pixel_raw is None else _pixel_pair(pixel_raw, f"{where} key 'pixel_size_m'")
    return _Raw(arr, str(path), f"{where} key {key!r}", pixel)


def _hdf5_pixel(ds: h5py.Dataset, where: str) -> tuple[float, float] | None:
    attrs = ds.attrs
    try:
        if "pixel_size_m" in attrs:
            return _pixel_pair(attrs["pixel_size_m"], f"{where} attribute 'pixel_size_m'")
        if "x_pixel_size" in attrs and "y_pixel_size" in attrs:
            y = _pixel_pair(attrs["y_pixel_size"], f"{where} attribute 'y_pixel_size'")[0]
            x = _pixel_pair(attrs["x_pixel_size"], f"{where} attribute 'x_pixel_size'")[0]
            return y, x
    except (OSError, TypeError) as exc:  # unreadable attribute types
        raise InputError(f"{where}: pixel size attribute unreadable ({_one_line(exc)})") from None
    return None


def _h5_get(f: h5py.File, name: str) -> Any:
    """The object at `name`, or None (missing, a broken link, a malformed name)."""
    try:
        return f.get(name)
    except (KeyError, OSError, ValueError):
        return None


def _read_hdf5(path: Path, dataset: str | None) -> _Raw:
    file_where = f"probe file {str(path)!r}"
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise InputError(f"{file_where}: cannot be opened as HDF5 ({_one_line(exc)})") from None
    with f:
        if dataset is not None:
            obj = _h5_get(f, dataset)
            if not isinstance(obj, h5py.Dataset):
                found = "a group" if isinstance(obj, h5py.Group) else "missing"
                raise InputError(
                    f"{file_where}: dataset {dataset!r} is {found}; expected a probe dataset"
                )
            name = dataset
        else:
            name = next(
                (p for p in HDF5_PROBE_PATHS if isinstance(_h5_get(f, p), h5py.Dataset)), ""
            )
            if not name:
                raise InputError(
                    f"{file_where}: no probe dataset at {', '.join(HDF5_PROBE_PATHS)}; "
                    "expected one of these, or name it as FILE:/path/to/dataset"
                )
        ds = f[name]
        where = f"{file_where} dataset {name!r}"
        if ds.dtype.kind not in "iufc":
            raise InputError(f"{where}: dtype {ds.dtype}; expected a complex or real array")
        if ds.ndim not in (2, 3):
            raise InputError(
                f"{where}: shape {ds.shape} ({ds.ndim}-D); expected 2-D (y, x) or 3-D (modes, y, x)"
            )
        try:
            arr = np.asarray(ds[0] if ds.ndim == 3 and ds.shape[0] > 0 else ds[()])
        except Exception as exc:
            raise InputError(f"{where}: cannot be read ({_one_line(exc)})") from None
        pixel = _hdf5_pixel(ds, where)
    return _Raw(arr, f"{path}:{name}", where, pixel)


def _coord_pixel(probe: Any, where: str) -> tuple[float, float] | None:
    """Pixel size (y, x) in metres from a run probe's coordinates, None in pixel units."""
    sizes = []
    for dim in probe.dims[-2:]:
        if dim not in probe.coords or probe.sizes[dim] < 2:
            return None
        coord = probe.coords[dim]
        unit = coord.attrs.get("units", probe.attrs.get("units"))
        unit = None if unit is None else str(unit).strip()
        if unit is None or unit in _PIXEL_UNITS:
            return None
        if unit not in _LENGTH_UNITS_M:
            raise InputError(f"{where}: coordinate {dim!r} units={unit!r}; expected 'm' or 'px'")
        c = np.asarray(coord.values, dtype=np.float64)
        d = np.diff(c)
        step = float(np.median(d))
        if not step > 0 or np.max(np.abs(d - step)) > 1e-3 * step:
            raise InputError(
                f"{where}: coordinate {dim!r} is not increasing and uniformly spaced; "
                "expected a regular grid"
            )
        sizes.append(step * _LENGTH_UNITS_M[unit])
    return _pixel_pair(sizes, f"{where} coordinate spacing")


def _read_run(path: Path, run_id: str) -> _Raw:
    where = f"probe store {str(path)!r} run {run_id!r}"
    if not path.exists():
        raise InputError(f"probe store {str(path)!r}: does not exist; expected a scan store")
    runs = {r["run_id"]: r for r in store.list_runs(path)}  # StoreError (an InputError)
    if run_id not in runs:
        listed = ", ".join(f"{r} ({v['status']})" for r, v in runs.items()) or "none"
        raise InputError(f"{where}: no such run; expected one of the runs there: {listed}")
    status = runs[run_id]["status"]
    if status != "complete":
        raise InputError(
            f"{where}: status={status!r}; expected 'complete' (a finished reconstruction)"
        )
    ds = store.open_run(path, run_id)
    if "probe" not in ds:
        subgroups = runs[run_id].get("subgroups") or []
        raise InputError(
            f"{where}: no 'probe' variable (variables: {', '.join(map(str, ds.data_vars))}; "
            f"subgroups: {', '.join(subgroups) or 'none'}); expected a full reconstruction"
        )
    probe = ds["probe"]
    where = f"{where} variable 'probe'"
    pixel = _coord_pixel(probe, where)
    arr = np.asarray(probe.values)
    return _Raw(arr, f"{path}:{run_id}", where, pixel)
