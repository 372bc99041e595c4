"""Preprocessing of diffraction frames as a lazy Dask graph over the store's chunks.

Steps, in order, all optional: bad-pixel mask (the store's, and/or detected from frame
statistics: dead, hot, saturated), background subtraction (constant or per-pixel), threshold,
centring (centre of mass of the summed pattern, rounded to a whole pixel so no data is
interpolated), crop or pad to a chosen frame size around that centre, binning (sum of b x b
pixels), scaling. Masked and padded pixels are zero in the output and True in its mask.

The result is either computed on the fly (`preprocess`, lazy) or written into the store as
`preprocessed` (scan, pre_y, pre_x) float32 plus `preprocessed_mask` (`write_preprocessed`);
raw `intensities` are never touched. The engine reads either via `store.load_frames`.
Binning keeps the object pixel size (N * pixel is unchanged); cropping enlarges it: the
effective detector pixel size is stored on the output so `store.positions_px` stays right.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from scipy import ndimage

from ptyinr import store as scan_store
from ptyinr.errors import InputError, StoreError
from ptyinr.progress import WorkProgress

PRE_DIMS = ("scan", "pre_y", "pre_x")
PRE_MASK = "preprocessed_mask"


@dataclass(frozen=True)
class PreprocessOptions:
    """What to do to each frame. Defaults change nothing but the dtype (float32).

    frame_size: output (y, x) size before binning (crop or zero-pad around the centre);
      None keeps the raw size. centre: "com" (centre of mass of the summed pattern),
      "none" (the frame's own N // 2), or (y, x) pixel indices. binning: b, sums b x b
      pixels (frame_size must be divisible by b). use_mask: apply the store's mask.
      detect_bad_pixels: add dead / hot / saturated pixels found from the frame statistics.
      background: constant counts subtracted (negative results clipped at 0).
      threshold: values below it after background become 0. scale: factor applied last.
    """

    frame_size: tuple[int, int] | None = None
    centre: str | tuple[float, float] = "com"
    binning: int = 1
    use_mask: bool = True
    detect_bad_pixels: bool = False
    hot_factor: float = 20.0
    background: float = 0.0
    threshold: float = 0.0
    scale: float = 1.0

    def validate(self, raw_shape: tuple[int, int]) -> None:
        """One-line `InputError` for each impossible setting."""
        if self.binning < 1:
            raise InputError(f"binning={self.binning}; expected an integer >= 1")
        size = self.frame_size or raw_shape
        if len(size) != 2 or min(size) < 1:
            raise InputError(f"frame_size={self.frame_size}; expected two positive integers")
        if size[0] % self.binning or size[1] % self.binning:
            raise InputError(
                f"frame_size={tuple(size)} is not divisible by binning={self.binning}; "
                "expected a multiple (choose --frame-size accordingly)"
            )
        if isinstance(self.centre, str) and self.centre not in ("com", "none"):
            raise InputError(f"centre={self.centre!r}; expected 'com', 'none' or (y, x)")
        for name in ("background", "threshold"):
            if getattr(self, name) < 0:
                raise InputError(f"{name}={getattr(self, name)}; expected >= 0")
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise InputError(f"scale={self.scale}; expected a positive number")


def frame_statistics(frames: da.Array) -> dict[str, np.ndarray]:
    """Per-pixel sum, max and count of zero frames, in one pass over the data."""
    f32 = frames.astype(np.float32)
    total, peak, zeros = dask.compute(
        f32.sum(axis=0, dtype=np.float64),
        frames.max(axis=0),
        (frames == 0).sum(axis=0),
    )
    return {"sum": np.asarray(total), "max": np.asarray(peak), "zeros": np.asarray(zeros)}


def detect_bad_pixels(
    stats: dict[str, np.ndarray], n_frames: int, dtype: np.dtype, hot_factor: float = 20.0
) -> dict[str, np.ndarray]:
    """Dead, hot and saturated pixels from frame statistics (True = bad).

    dead: zero in every frame while its 3 x 3 neighbourhood has on average >= 1 count per
    frame; hot: mean above `hot_factor` x the 5 x 5 neighbourhood median (+ 10 counts, so
    a dark region's noise is not hot); saturated: an integer frame reached its dtype's maximum
    (the marker of gaps and saturated pixels on many detectors).
    """
    mean = stats["sum"] / max(n_frames, 1)
    neighbours = ndimage.median_filter(mean, size=3, mode="nearest")
    dead = (stats["zeros"] == n_frames) & (neighbours >= 1.0)
    local = ndimage.median_filter(mean, size=5, mode="nearest")
    hot = mean > hot_factor * local + 10.0
    if np.dtype(dtype).kind in "iu":
        saturated = stats["max"] >= np.iinfo(dtype).max
    else:
        saturated = np.zeros_like(dead)
    return {"dead": dead, "hot": hot, "saturated": saturated}


def centre_of_mass(pattern: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Centre of mass (y, x) of a summed pattern, masked pixels excluded."""
    p = np.asarray(pattern, dtype=np.float64)
    if mask is not None:
        p = np.where(mask, 0.0, p)
    if p.sum() <= 0:
        return ((p.shape[0] // 2), (p.shape[1] // 2))
    cy, cx = ndimage.center_of_mass(p)
    return float(cy), float(cx)


def _window(centre: int, size: int, n: int) -> tuple[int, int, int, int]:
    """Source [s0, s1) and destination [d0, d1) ranges putting `centre` at index size // 2."""
    start = centre - size // 2
    s0, s1 = max(start, 0), min(start + size, n)
    d0 = s0 - start
    return s0, s1, d0, d0 + max(s1 - s0, 0)


def _process_block(
    block: np.ndarray,
    *,
    bad: np.ndarray,
    background: float,
    threshold: float,
    win_y: tuple[int, int, int, int],
    win_x: tuple[int, int, int, int],
    out_shape: tuple[int, int],
    binning: int,
    scale: float,
) -> np.ndarray:
    x = block.astype(np.float32)
    x[:, bad] = 0.0
    if background:
        x = np.maximum(x - np.float32(background), 0.0)
    if threshold:
        x[x < threshold] = 0.0
    out = np.zeros((x.shape[0], *out_shape), np.float32)
    sy0, sy1, dy0, dy1 = win_y
    sx0, sx1, dx0, dx1 = win_x
    out[:, dy0:dy1, dx0:dx1] = x[:, sy0:sy1, sx0:sx1]
    if binning > 1:
        n, h, w = out.shape
        out = out.reshape(n, h // binning, binning, w // binning, binning).sum(axis=(2, 4))
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def preprocess(
    ds: xr.Dataset, options: PreprocessOptions | None = None, *, progress: bool | None = False
) -> tuple[xr.DataArray, xr.DataArray]:
    """The lazy preprocessed frames (scan, pre_y, pre_x) float32 and their mask.

    Computes the frame statistics (one pass) when centring by centre of mass or detecting
    bad pixels; the frames themselves stay lazy, one task per chunk of the raw array.
    `progress`: show that statistics pass on stderr (frames read).
    """
    opts = options or PreprocessOptions()
    raw = ds[scan_store.INTENSITIES]
    frames = raw.data if isinstance(raw.data, da.Array) else da.from_array(raw.data)
    n, ny, nx = (int(s) for s in frames.shape)
    name = _store_name(ds)
    opts.validate((ny, nx))
    size = tuple(int(s) for s in (opts.frame_size or (ny, nx)))

    bad = np.zeros((ny, nx), bool)
    counts: dict[str, int] = {}
    if opts.use_mask and scan_store.MASK in ds:
        given = np.asarray(ds[scan_store.MASK].values, bool)
        bad |= given
        counts["given"] = int(given.sum())
    stats = None
    if opts.detect_bad_pixels or opts.centre == "com":
        shown = WorkProgress(f"preprocess {name}: statistics", n, "frames", enabled=progress)
        with shown:
            stats = frame_statistics(shown.counted(frames))
    if opts.detect_bad_pixels:
        found = detect_bad_pixels(stats, n, np.dtype(frames.dtype), opts.hot_factor)
        for name, m in found.items():
            counts[name] = int(m.sum())
            bad |= m

    com = None
    if opts.centre == "com":
        pattern = np.maximum(stats["sum"] - opts.background * n, 0.0)
        com = centre_of_mass(pattern, bad)
        cy, cx = round(com[0]), round(com[1])
    elif opts.centre == "none":
        cy, cx = ny // 2, nx // 2
    else:
        cy, cx = (round(float(c)) for c in opts.centre)
    win_y, win_x = _window(cy, size[0], ny), _window(cx, size[1], nx)
    b = int(opts.binning)
    out_shape = (size[0] // b, size[1] // b)

    out_mask = np.ones(size, bool)  # padded pixels are unmeasured: bad
    sy0, sy1, dy0, dy1 = win_y
    sx0, sx1, dx0, dx1 = win_x
    out_mask[dy0:dy1, dx0:dx1] = bad[sy0:sy1, sx0:sx1]
    if b > 1:
        out_mask = out_mask.reshape(out_shape[0], b, out_shape[1], b).any(axis=(1, 3))

    processed = frames.map_blocks(
        _process_block,
        bad=bad,
        background=float(opts.background),
        threshold=float(opts.threshold),
        win_y=win_y,
        win_x=win_x,
        out_shape=size,
        binning=b,
        scale=float(opts.scale),
        dtype=np.float32,
        chunks=(frames.chunks[0], (out_shape[0],), (out_shape[1],)),
        meta=np.empty((0, 0, 0), np.float32),
    )
    pixel = ds.attrs.get("detector_pixel_size_m")
    attrs: dict[str, Any] = {
        "options": scan_store.json_safe(asdict(opts)),
        "centre_of_mass": list(com) if com is not None else None,
        "centre_used": [int(cy), int(cx)],
        "crop_window": [[sy0, sy1], [sx0, sx1]],
        "raw_frame_shape": [ny, nx],
        "frame_size_before_binning": list(size),
        "binning": b,
        "bad_pixels": counts,
        "detector_pixel_size_m": None if pixel is None else float(pixel) * b,
    }
    data = xr.DataArray(processed, dims=PRE_DIMS, attrs=attrs)
    mask = xr.DataArray(out_mask, dims=PRE_DIMS[1:])
    return data, mask


def _store_name(ds: xr.Dataset) -> str:
    """The store's file name for progress labels (its scan id when it has no path)."""
    source = ds.encoding.get("source")
    return Path(source).name if source else str(ds.attrs.get("scan_id", "store"))


def write_preprocessed(
    path: str | os.PathLike,
    options: PreprocessOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> xr.Dataset:
    """Compute the preprocessed frames and add them to the store; return the reopened store.

    The arrays are written into a hidden scratch store and moved in when complete, so a crash
    leaves no half-written `preprocessed` array. Raw arrays are not touched. `progress`:
    frames read (statistics) and written, on stderr (a bar on a terminal, else lines;
    None: unless running as a task on a Dask worker, e.g. in `ptyinr run`'s graph).
    """
    path = Path(path)
    ds = scan_store.open_scan_store(path)
    if scan_store.PREPROCESSED in ds and not overwrite:
        raise StoreError(f"{path}: array 'preprocessed' exists; expected --force to replace it")
    data, mask = preprocess(ds, options, progress=progress)
    raw = zarr.open_group(str(path), mode="r")[scan_store.INTENSITIES]
    fps = int((raw.shards or raw.chunks)[0])
    n = int(data.shape[0])
    fps = min(fps, n)
    data = data.chunk({"scan": fps})
    shown = WorkProgress(f"preprocess {path.name}: writing", n, "frames", enabled=progress)
    data = data.copy(data=shown.counted(data.data))
    out = xr.Dataset({scan_store.PREPROCESSED: data, PRE_MASK: mask})
    out[scan_store.PREPROCESSED].attrs = scan_store.json_safe(data.attrs)
    out = scan_store.label_variables(out, None)
    encoding = {
        scan_store.PREPROCESSED: {
            "chunks": (1, *data.shape[1:]),
            "shards": (fps, *data.shape[1:]),
            "compressors": scan_store.frame_codecs(),
        }
    }
    scratch = path.parent / f".{path.name}.pre-{uuid.uuid4().hex[:12]}"
    try:
        with shown:
            out.to_zarr(scratch, mode="w-", consolidated=False, zarr_format=3, encoding=encoding)
        for name in (PRE_MASK, scan_store.PREPROCESSED):
            target = path / name
            if target.exists():
                trash = path.parent / f".{path.name}.{name}-old-{uuid.uuid4().hex[:8]}"
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(scratch / name, target)
        scan_store.consolidate(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return scan_store.open_scan_store(path)
