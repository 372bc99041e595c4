"""A scan as every engine sees it, and a reconstruction as every engine returns it.

`ScanData` holds a scan's frames (in memory, or read on demand from its store:
`StoreFrames`), window positions in object pixels, the bad-pixel mask and the geometry the
probe start needs. `scan_geometry` lays out the object grid and windows for a configuration,
the one place the scan geometry is derived from config; `load_scan` opens a store for a fit.
`Reconstruction` is what an engine returns: labelled object, probe, loss curve, bookkeeping,
and, from a run that refines positions, the refined positions (one row per store position).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ptyinr import store
from ptyinr.config import ReconstructionConfig
from ptyinr.errors import InputError
from ptyinr.physics import ScanGeometry


@dataclass
class ScanData:
    """Diffraction data as an engine needs it.

    intensities: (n, Ny, Nx) counts, zero frequency centred (numpy, or lazy: StoreFrames,
    dask). positions_px: (n, 2) (y, x) window centres in object pixels of the store's frame.
    bad_pixels: (Ny, Nx) True where the detector is not to be trusted. pixel_size: object
    pixel size (y, x) in metres, or None (pixel units). Wavelength and detector geometry: from
    the store where it has them (the optics probe start needs them). store_rows,
    store_positions_px: where a subset's positions sit among the scan's (`subset` sets them:
    an FRC half), so a result can report one row per store position; None: these positions
    are the whole scan, in order.
    """

    intensities: Any
    positions_px: np.ndarray
    bad_pixels: np.ndarray | None = None
    pixel_size: tuple[float, float] | None = None
    wavelength_m: float | None = None
    detector_distance_m: float | None = None
    detector_pixel_size_m: float | None = None
    store_rows: np.ndarray | None = None
    store_positions_px: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.intensities.ndim != 3:
            raise InputError(
                f"intensities: shape {self.intensities.shape}, expected (frames, det_y, det_x)"
            )
        if self.positions_px.shape != (self.intensities.shape[0], 2):
            raise InputError(
                f"positions: shape {self.positions_px.shape}, expected "
                f"({self.intensities.shape[0]}, 2) to match the frames"
            )
        if self.bad_pixels is not None and np.shape(self.bad_pixels) != self.intensities.shape[1:]:
            raise InputError(
                f"bad-pixel mask: shape {np.shape(self.bad_pixels)}, expected the frame shape "
                f"{tuple(self.intensities.shape[1:])}"
            )
        if (self.store_rows is None) != (self.store_positions_px is None):
            raise InputError(
                "store_rows and store_positions_px: expected both (a subset of a scan) or "
                "neither (the whole scan)"
            )
        if self.store_rows is not None and self.store_positions_px is not None:
            rows, full = np.shape(self.store_rows), np.shape(self.store_positions_px)
            if rows != (self.n_positions,) or len(full) != 2 or full[1] != 2:
                raise InputError(
                    f"store_rows: shape {rows}, store_positions_px: shape {full}; expected "
                    f"({self.n_positions},) rows into (n, 2) positions"
                )
            low, high = (int(f(self.store_rows, initial=0)) for f in (np.min, np.max))
            if low < 0 or (rows[0] and high >= full[0]):
                raise InputError(
                    f"store_rows: values {low}..{high}; expected rows of the scan's "
                    f"{full[0]} positions"
                )

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.intensities.shape[1]), int(self.intensities.shape[2]))

    @property
    def n_positions(self) -> int:
        return int(self.positions_px.shape[0])

    def subset(self, indices: np.ndarray) -> ScanData:
        """The same scan restricted to some positions (e.g. one FRC half); it remembers
        which rows of the scan they are (`store_rows`)."""
        rows = np.arange(self.n_positions)[np.asarray(indices)]
        return ScanData(
            intensities=self.intensities[indices],
            positions_px=self.positions_px[indices],
            bad_pixels=self.bad_pixels,
            pixel_size=self.pixel_size,
            wavelength_m=self.wavelength_m,
            detector_distance_m=self.detector_distance_m,
            detector_pixel_size_m=self.detector_pixel_size_m,
            store_rows=rows if self.store_rows is None else self.store_rows[rows],
            store_positions_px=(
                self.positions_px if self.store_positions_px is None else self.store_positions_px
            ),
        )

    def on_store_rows(self, values_px: np.ndarray) -> np.ndarray:
        """(n_store, 2) positions in px: `values_px` (one row per position of this data) at
        this data's rows of the scan, the scan's measured positions elsewhere (the positions
        a subset did not use)."""
        values = np.asarray(values_px, dtype=np.float64)
        if values.shape != (self.n_positions, 2):
            raise InputError(
                f"positions: shape {values.shape}, expected ({self.n_positions}, 2) to match "
                "the data's positions"
            )
        if self.store_rows is None or self.store_positions_px is None:
            return values.copy()
        out = np.array(self.store_positions_px, dtype=np.float64)
        out[self.store_rows] = values
        return out


@dataclass
class Reconstruction:
    """Result of one reconstruction: labelled object, probe, loss curve, and bookkeeping;
    `refined_positions` (scan, axis) only from a run that refined them."""

    object: xr.DataArray
    probe: xr.DataArray
    loss: xr.DataArray
    geometry: ScanGeometry
    info: dict[str, Any] = field(default_factory=dict)
    refined_positions: xr.DataArray | None = None

    def to_dataset(self) -> xr.Dataset:
        """One xarray Dataset, ready to be written as a run group."""
        variables = {"object": self.object, "probe": self.probe, "loss": self.loss}
        if self.refined_positions is not None:
            variables["refined_positions"] = self.refined_positions
        return xr.Dataset(variables, attrs=dict(self.info))


def labelled_result(
    obj: np.ndarray,
    probe: np.ndarray,
    loss_history: list[float],
    geometry: ScanGeometry,
    pixel_size: tuple[float, float] | None,
    info: dict[str, Any],
    *,
    refined_positions_px: np.ndarray | None = None,
) -> Reconstruction:
    """Object and probe arrays labelled with their coordinates (metres, or px without
    geometry), the loss per epoch, and `info` plus the grid's bookkeeping.

    `refined_positions_px`: (n_store, 2) (y, x) positions in object pixels after position
    refinement, one row per store position (`ScanData.on_store_rows`); labelled like the
    store's `positions` (dims scan, axis = [y, x]) in its unit."""
    ys, xs = geometry.pixel_coordinates()
    ny, nx = geometry.window_shape
    py = np.arange(ny, dtype=np.float64) - ny // 2
    px = np.arange(nx, dtype=np.float64) - nx // 2
    unit = "px" if pixel_size is None else "m"
    sy, sx = (1.0, 1.0) if pixel_size is None else pixel_size

    def label(name: str) -> dict[str, str]:  # long_name and units (store.VARIABLE_LABELS)
        return store.variable_label(name, unit)

    object_da = xr.DataArray(
        np.asarray(obj, dtype=np.complex64),
        dims=("y", "x"),
        coords={"y": ("y", ys * sy, label("y")), "x": ("x", xs * sx, label("x"))},
        name="object",
        attrs=label("object"),
    )
    probe_da = xr.DataArray(
        np.asarray(probe, dtype=np.complex64),
        dims=("probe_y", "probe_x"),
        coords={
            "probe_y": ("probe_y", py * sy, label("probe_y")),
            "probe_x": ("probe_x", px * sx, label("probe_x")),
        },
        name="probe",
        attrs=label("probe"),
    )
    loss_da = xr.DataArray(
        np.asarray(loss_history, dtype=np.float64),
        dims=("epoch",),
        coords={"epoch": ("epoch", np.arange(1, len(loss_history) + 1), label("epoch"))},
        name="loss",
        attrs=label("loss"),
    )
    refined_da = None
    if refined_positions_px is not None:
        refined = np.asarray(refined_positions_px, dtype=np.float64)
        if refined.ndim != 2 or refined.shape[1] != 2 or not np.isfinite(refined).all():
            raise InputError(
                f"refined positions: shape {refined.shape}, finite: "
                f"{bool(np.isfinite(refined).all())}; expected finite (n, 2) (y, x) positions"
            )
        refined_da = xr.DataArray(
            refined * np.asarray((sy, sx), dtype=np.float64),
            dims=("scan", "axis"),
            coords={"axis": ("axis", np.array(["y", "x"], dtype=object), label("axis"))},
            name="refined_positions",
            attrs=label("refined_positions"),
        )
    info = {**info, "origin_px": list(geometry.origin_px), "positions_unit": unit}
    return Reconstruction(object_da, probe_da, loss_da, geometry, info, refined_da)


def scan_geometry(
    positions_px: np.ndarray,
    frame_shape: tuple[int, int],
    config: ReconstructionConfig,
    *,
    object_shape: tuple[int, int] | None = None,
    origin_px: tuple[float, float] | None = None,
) -> ScanGeometry:
    """Object grid and windows of a scan under `config` (padding, position rounding); a
    shared grid (`object_shape`, `origin_px`) lays the FRC halves on the full scan's."""
    return ScanGeometry.from_positions(
        positions_px,
        frame_shape,
        padding_px=config.data.object_padding_px,
        round_positions=config.train.positions == "round",
        object_shape=object_shape,
        origin_px=origin_px,
    )


# --------------------------------------------------------------------------------- stores


class StoreFrames:
    """A scan store's frames (or a subset of them), read on demand with zarr.

    Zarr reads only the inner chunks (one frame each) of the frames asked for, where a dask
    array chunked by shard would decompress a whole shard per scattered frame. Picklable
    (path + name + index): ranks and Dask workers open the store themselves. Indexing along
    the scan axis gives another lazy StoreFrames; `read` returns numpy.
    """

    def __init__(self, path: str, name: str, index: np.ndarray | None = None) -> None:
        self.path = str(path)
        self.name = name
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self._array: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "index": self.index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["name"], state["index"])  # type: ignore[misc]

    @property
    def array(self) -> Any:
        if self._array is None:
            import zarr

            self._array = zarr.open_array(store=self.path, path=self.name, mode="r")
        return self._array

    @property
    def shape(self) -> tuple[int, int, int]:
        n, ny, nx = self.array.shape
        return (len(self.index) if self.index is not None else int(n), int(ny), int(nx))

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> StoreFrames:
        rows = np.arange(self.shape[0])[key]
        if self.index is not None:
            rows = self.index[rows]
        return StoreFrames(self.path, self.name, np.atleast_1d(rows))

    def read(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Frames `indices` (all when None) as float32 numpy, in the order asked."""
        rows = np.arange(self.shape[0]) if indices is None else np.asarray(indices, np.int64)
        if self.index is not None:
            rows = self.index[rows]
        order, back = np.unique(rows, return_inverse=True)
        block = self.array.get_orthogonal_selection((order,))
        return np.asarray(block, dtype=np.float32)[back]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read()
        return out if dtype is None else out.astype(dtype)

    def to_dask(self, frames_per_chunk: int = 256) -> Any:
        import dask.array as da

        arr = da.from_array(self.array, chunks=(frames_per_chunk, -1, -1))
        return arr if self.index is None else arr[self.index]


@dataclass
class LoadedScan:
    """A store's data ready for a fit, plus what evaluation needs from the store."""

    path: Path
    dataset: xr.Dataset
    data: ScanData
    source: str


def store_geometry(
    ds: xr.Dataset, source: str, config: ReconstructionConfig
) -> tuple[np.ndarray, ScanGeometry]:
    """Pixel positions and scan geometry of a store's `source` frames under `config`, from
    metadata alone: no frame is read."""
    frame_shape = (int(ds[source].shape[1]), int(ds[source].shape[2]))
    positions = store.positions_px(ds, frame_shape)
    return positions, scan_geometry(positions, frame_shape, config)


def load_scan(path: str | Path, config: ReconstructionConfig, lazy: bool = False) -> LoadedScan:
    """Open and validate a store, and bring the configured frames into memory (`lazy`: leave
    them in the store, read on demand: the engine streams or loads them)."""
    path = Path(path)
    ds = store.open_scan_store(path)
    source = store.resolve_source(ds, config.data.source)
    if lazy:
        frames: Any = StoreFrames(str(path), source)
    else:
        frames = store.load_frames(ds, source=source)
    frame_shape = (int(frames.shape[1]), int(frames.shape[2]))
    positions = store.positions_px(ds, frame_shape)
    pixel = store.object_pixel_size(ds, frame_shape)
    if ds.attrs.get("positions_unit") == "px":
        pixel = None
    mask_name = "preprocessed_mask" if source == "preprocessed" else "mask"
    bad = np.asarray(ds[mask_name].values, bool) if mask_name in ds else None
    data = ScanData(
        frames,
        positions,
        bad_pixels=bad,
        pixel_size=pixel,
        wavelength_m=_positive_attr(ds, "wavelength_m"),
        detector_distance_m=_positive_attr(ds, "detector_distance_m"),
        detector_pixel_size_m=_positive_attr(ds, "detector_pixel_size_m"),
    )
    return LoadedScan(path=path, dataset=ds, data=data, source=source)


def _positive_attr(ds: xr.Dataset, key: str) -> float | None:
    """A positive, finite number from the store's attrs, else None (not recorded)."""
    try:
        value = float(ds.attrs.get(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None
