"""Conversions on the way in, and the checks that refuse bad data.

Every conversion is an explicit option (`Conversions`) whose value, after the reader's
defaults are applied, is recorded in the store's attrs, so nobody has to guess later what
happened to the data. Frame checks (NaN, infinities, negative counts) run inside the same
streaming pass that writes the store, so a bad frame costs no extra read of the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import dask.array as da
import numpy as np
from scipy.spatial import cKDTree

from ptyinr.errors import IngestError

PositionsUnit = Literal["m", "mm", "um", "nm", "px"]
POSITION_SCALE = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "nm": 1e-9}

# Geometry keys with a unit suffix, and the factor to SI. Energies convert to a wavelength.
GEOMETRY_ALIASES: dict[str, tuple[str, float]] = {
    "wavelength_m": ("wavelength_m", 1.0),
    "wavelength_nm": ("wavelength_m", 1e-9),
    "wavelength_a": ("wavelength_m", 1e-10),
    "energy_ev": ("energy_ev", 1.0),
    "energy_kev": ("energy_ev", 1e3),
    "energy_j": ("energy_ev", 1.0 / 1.602176634e-19),
    "detector_distance_m": ("detector_distance_m", 1.0),
    "detector_distance_cm": ("detector_distance_m", 1e-2),
    "detector_distance_mm": ("detector_distance_m", 1e-3),
    "detector_pixel_size_m": ("detector_pixel_size_m", 1.0),
    "detector_pixel_size_mm": ("detector_pixel_size_m", 1e-3),
    "detector_pixel_size_um": ("detector_pixel_size_m", 1e-6),
}


@dataclass(frozen=True)
class Conversions:
    """How to turn a file's convention into the store's. None = the reader's default.

    - amplitude: frames hold sqrt(counts); squared on the way in.
    - dc: where the zero frequency sits: "centre" (kept), "corner" (fftshift), "auto"
      (decided from the mean of a few frames; the decision is recorded).
    - positions_unit: unit of the positions in the file; "px" keeps pixel units.
    - positions_order: column order in the file, "yx" or "xy" (array axis 0 = y).
    - transpose / flip_y / flip_x: detector orientation; flips mirror about the zero-frequency
      pixel (index N // 2), so a centred pattern stays centred.
    - negative: "error" refuses negative counts, "clip" sets them to 0 (recorded).
    - allow_duplicate_positions: accept repeated positions (e.g. repeated exposures).
    """

    amplitude: bool | None = None
    dc: Literal["centre", "corner", "auto"] | None = None
    positions_unit: PositionsUnit | None = None
    positions_order: Literal["yx", "xy"] | None = None
    transpose: bool | None = None
    flip_y: bool | None = None
    flip_x: bool | None = None
    negative: Literal["error", "clip"] | None = None
    allow_duplicate_positions: bool | None = None

    def resolve(self, defaults: Conversions) -> Conversions:
        """Fill unset options from `defaults`, then from the global defaults."""
        merged = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = getattr(defaults, f.name)
            if value is None:
                value = getattr(GLOBAL_DEFAULTS, f.name)
            merged[f.name] = value
        out = Conversions(**merged)
        out.validate()
        return out

    def validate(self) -> None:
        """Refuse values outside each option's choices (one line naming the option)."""
        choices = {
            "dc": ("centre", "corner", "auto", None),
            "positions_unit": ("m", "mm", "um", "nm", "px", None),
            "positions_order": ("yx", "xy", None),
            "negative": ("error", "clip", None),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise IngestError(
                    f"conversion {name}={getattr(self, name)!r}; expected one of "
                    f"{[a for a in allowed if a is not None]}"
                )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GLOBAL_DEFAULTS = Conversions(
    amplitude=False,
    dc="centre",
    positions_unit="m",
    positions_order="yx",
    transpose=False,
    flip_y=False,
    flip_x=False,
    negative="error",
    allow_duplicate_positions=False,
)


# ------------------------------------------------------------------------------ geometry


def geometry_from_values(values: dict[str, float], src: str) -> dict[str, float | None]:
    """SI geometry from unit-suffixed values (e.g. energy_kev, detector_pixel_size_um)."""
    out: dict[str, float | None] = {
        "wavelength_m": None,
        "detector_distance_m": None,
        "detector_pixel_size_m": None,
    }
    energy = None
    for key, value in values.items():
        if key not in GEOMETRY_ALIASES:
            raise IngestError(
                f"{src}: geometry key {key!r}; expected one of {sorted(GEOMETRY_ALIASES)}"
            )
        target, scale = GEOMETRY_ALIASES[key]
        v = float(value) * scale
        if target == "energy_ev":
            energy = (key, float(value), v)
        else:
            out[target] = v
    if energy is not None and out["wavelength_m"] is None:
        key, raw, ev = energy
        if not np.isfinite(ev) or ev <= 0:
            raise IngestError(f"{src}: key {key}={raw!r}; expected a positive photon energy")
        out["wavelength_m"] = 1.239841984e-6 / ev
    return out


def single_value(values: np.ndarray, src: str, key: str) -> float:
    """One number from a scalar or an array that holds the same value throughout."""
    arr = np.asarray(values)
    if arr.dtype.kind in "SUO":
        raise IngestError(f"{src}: key {key}={arr.ravel()[:1]!r}; expected a number")
    if arr.size == 0:
        raise IngestError(f"{src}: key {key} is empty; expected a number")
    flat = arr.astype(np.float64).ravel()
    if np.ptp(flat) > 1e-6 * max(abs(flat[0]), 1e-300):
        raise IngestError(
            f"{src}: key {key} varies from {float(flat.min())!r} to {float(flat.max())!r}; "
            "expected one value"
        )
    return float(flat[0])


# ------------------------------------------------------------------------------ positions


def positions_from_grid(
    ys: np.ndarray, xs: np.ndarray, n_frames: int, src: str, keys: tuple[str, str]
) -> np.ndarray:
    """Raster positions (n, 2) from two strictly monotonic axes (rows = y, fastest = x)."""
    for axis, key in zip((ys, xs), keys, strict=True):
        d = np.diff(np.asarray(axis, dtype=np.float64))
        if d.size and not (np.all(d > 0) or np.all(d < 0)):
            i = int(np.flatnonzero(d <= 0)[0] if d[0] > 0 else np.flatnonzero(d >= 0)[0])
            raise IngestError(
                f"{src}: key {key}: grid axis is not strictly monotonic at index {i + 1} "
                f"(value {axis[i + 1]!r} after {axis[i]!r}); expected a monotonic scan axis"
            )
    if len(ys) * len(xs) != n_frames:
        raise IngestError(
            f"{src}: keys {keys[0]}, {keys[1]}: grid of {len(ys)} x {len(xs)} = "
            f"{len(ys) * len(xs)} positions for {n_frames} frames; expected equal counts"
        )
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)


def numeric_positions(raw: Any, src: str, key: str) -> np.ndarray:
    """Positions as float64, refusing text, bytes, objects, booleans or complex numbers.

    (NumPy would parse b"1.5" or "1e-6" silently; a file whose positions are text was written
    by something that did not mean them as numbers, so we say so instead of guessing.)
    """
    arr = np.asarray(raw)
    if arr.dtype.kind not in "iuf":
        sample = arr.ravel()[:1].tolist() if arr.size else []
        raise IngestError(
            f"{src}: key {key}: positions of dtype {arr.dtype} (kind {arr.dtype.kind!r}, first "
            f"value {sample[0] if sample else None!r}); expected numbers (integer or float)"
        )
    return arr.astype(np.float64)


def as_position_columns(raw: np.ndarray, n_frames: int, src: str, key: str) -> np.ndarray:
    """(n, k) from a file's (n, k) or (k, n) positions array, k in {2, 3}."""
    arr = numeric_positions(raw, src, key)
    arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise IngestError(f"{src}: key {key} has shape {arr.shape}; expected (frames, 2)")
    if arr.shape[0] == n_frames and arr.shape[1] in (2, 3):
        return arr
    if arr.shape[1] == n_frames and arr.shape[0] in (2, 3):
        return arr.T
    if arr.shape[0] == 2:
        count = arr.shape[1]
    else:
        count = arr.shape[0] if arr.shape[1] in (2, 3) else arr.shape[1]
    raise IngestError(
        f"{src}: key {key} has shape {arr.shape} ({count} positions) for {n_frames} frames; "
        f"expected ({n_frames}, 2) or (2, {n_frames})"
    )


def convert_positions(
    pos: np.ndarray,
    conv: Conversions,
    src: str,
    key: str,
    has_geometry: bool,
) -> tuple[np.ndarray, str]:
    """Positions (n, 2) in metres or pixels, (y, x) order, checked; and the stored unit."""
    pos = np.asarray(pos, dtype=np.float64)[:, :2]
    if not np.all(np.isfinite(pos)):
        i = int(np.flatnonzero(~np.isfinite(pos).all(axis=1))[0])
        raise IngestError(f"{src}: key {key}: position {i} = {pos[i].tolist()}; expected finite")
    if conv.positions_order == "xy":
        pos = pos[:, ::-1]
    unit = conv.positions_unit
    if unit == "px":
        stored = "px"
    else:
        if not has_geometry:
            raise IngestError(
                f"{src}: positions_unit={unit!r} but the file gives no geometry (wavelength, "
                "detector distance, pixel size); expected geometry keys (--key wavelength_m=...) "
                "or --positions-unit px"
            )
        pos = pos * POSITION_SCALE[unit]
        stored = "m"
    check_duplicates(pos, conv, src, key)
    return np.ascontiguousarray(pos), stored


def check_duplicates(pos: np.ndarray, conv: Conversions, src: str, key: str) -> None:
    """Refuse (unless allowed) positions closer than 1e-6 of the scan extent."""
    if conv.allow_duplicate_positions or len(pos) < 2:
        return
    extent = float(np.max(np.ptp(pos, axis=0)))
    tol = 1e-6 * extent
    pairs = cKDTree(pos).query_pairs(r=tol, output_type="ndarray") if extent > 0 else None
    if extent == 0:
        i, j = 0, 1
    elif len(pairs):
        i, j = (int(v) for v in pairs[np.lexsort(pairs.T[::-1])][0])
    else:
        return
    raise IngestError(
        f"{src}: key {key}: positions {i} and {j} coincide ({pos[i].tolist()}); expected "
        "distinct scan positions (or --allow-duplicate-positions)"
    )


# ------------------------------------------------------------------------------ frames


def squeeze_frames(frames: da.Array, src: str, key: str) -> tuple[da.Array, list[int] | None]:
    """(n, det_y, det_x) from (1, ..., n, det_y, det_x) or a (rows, cols, ...) grid."""
    original = [int(s) for s in frames.shape]
    while frames.ndim > 3 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.ndim == 4:
        frames = frames.reshape((frames.shape[0] * frames.shape[1], *frames.shape[2:]))
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise IngestError(
            f"{src}: key {key} has shape {tuple(original)}; expected (frames, det_y, det_x)"
        )
    if 0 in frames.shape:
        raise IngestError(f"{src}: key {key} has shape {tuple(original)}; expected no empty axis")
    reshaped = original if len(original) != 3 else None
    return frames, reshaped


def detect_dc(frames: da.Array, amplitude: bool, n_sample: int = 16) -> str:
    """'centre' or 'corner': where the mean of a few evenly spread frames has its energy."""
    n = frames.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, n_sample)).astype(int))
    sample = np.asarray(frames[idx].compute(), dtype=np.float64)
    sample = np.where(np.isfinite(sample), sample, 0.0)
    mean = (sample**2 if amplitude else np.abs(sample)).mean(axis=0)
    ny, nx = mean.shape
    yy, xx = np.mgrid[:ny, :nx]
    radius = min(ny, nx) / 4
    centre = (yy - ny // 2) ** 2 + (xx - nx // 2) ** 2 <= radius**2
    corner = np.fft.ifftshift(centre)
    return "corner" if mean[corner].sum() > mean[centre].sum() else "centre"


def _flip_about_dc(block: np.ndarray, axis: int) -> np.ndarray:
    """Mirror q -> -q about index N // 2: reverse, then roll by one for even N."""
    out = np.flip(block, axis=axis)
    return np.roll(out, 1, axis=axis) if block.shape[axis] % 2 == 0 else out


def output_dtype(src_dtype: np.dtype, conv: Conversions) -> np.dtype:
    """Counts keep an integer dtype; amplitudes and floats become float32."""
    if conv.amplitude or src_dtype.kind == "f":
        return np.dtype(np.float32)
    if src_dtype.kind in "iu":
        return np.dtype(src_dtype)
    raise IngestError(f"frames dtype {src_dtype}; expected integer or float counts")


def _convert_block(
    block: np.ndarray,
    block_info: dict | None = None,
    *,
    src: str,
    key: str,
    conv: Conversions,
    dc: str,
    out_dtype: np.dtype,
) -> np.ndarray:
    start = block_info[0]["array-location"][0][0] if block_info else 0
    if block.dtype.kind == "f":
        finite = np.isfinite(block)
        if not finite.all():
            f, y, x = (int(v[0]) for v in np.nonzero(~finite))
            raise IngestError(
                f"{src}: key {key}: frame {start + f} pixel ({y}, {x}) = {block[f, y, x]!r}; "
                "expected finite counts"
            )
    if block.dtype.kind in "if":
        negative = block < 0
        if negative.any():
            if conv.negative == "clip":
                block = np.where(negative, 0, block).astype(block.dtype)
            else:
                f, y, x = (int(v[0]) for v in np.nonzero(negative))
                what = "amplitude" if conv.amplitude else "count"
                raise IngestError(
                    f"{src}: key {key}: frame {start + f} pixel ({y}, {x}) has negative {what} "
                    f"{block[f, y, x]!r}; expected >= 0 (or --negative clip)"
                )
    if conv.amplitude:
        block = np.square(block.astype(np.float32))
    if dc == "corner":
        block = np.fft.fftshift(block, axes=(1, 2))
    if conv.transpose:
        block = np.swapaxes(block, 1, 2)
    if conv.flip_y:
        block = _flip_about_dc(block, 1)
    if conv.flip_x:
        block = _flip_about_dc(block, 2)
    return np.ascontiguousarray(block, dtype=out_dtype)


def convert_frames(
    frames: da.Array, conv: Conversions, dc: str, src: str, key: str
) -> tuple[da.Array, np.dtype]:
    """The lazy, checked, converted frames (n, det_y, det_x), one dask task per chunk."""
    out_dtype = output_dtype(np.dtype(frames.dtype), conv)
    chunks = frames.chunks
    if conv.transpose:
        chunks = (chunks[0], chunks[2], chunks[1])
    out = frames.map_blocks(
        _convert_block,
        src=src,
        key=key,
        conv=conv,
        dc=dc,
        out_dtype=out_dtype,
        dtype=out_dtype,
        chunks=chunks,
        meta=np.empty((0, 0, 0), dtype=out_dtype),
    )
    return out, out_dtype


def convert_mask(mask: np.ndarray, conv: Conversions, dc: str) -> np.ndarray:
    """The detector mask under the same orientation/DC changes as the frames (True = bad)."""
    m = np.asarray(mask).astype(bool)[None]
    if dc == "corner":
        m = np.fft.fftshift(m, axes=(1, 2))
    if conv.transpose:
        m = np.swapaxes(m, 1, 2)
    if conv.flip_y:
        m = _flip_about_dc(m, 1)
    if conv.flip_x:
        m = _flip_about_dc(m, 2)
    return np.ascontiguousarray(m[0])
