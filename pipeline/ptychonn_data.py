"""PtychoNN training pairs from completed runs: each frame with the object patch under its
window, streamed from the scan stores.

Every completed run of a store is a labelled set (`STORE:RUN`). Its object is read once
(small next to the frames), its phase offset and linear ramp removed over the scanned
interior (`evaluate.remove_phase_ramp` without a reference: the object's own ramp, which
centres its spectrum), so labels of different runs agree on what zero phase and zero slope
are. The window of position i on the run's object grid is laid out as the physics does
(`scandata.scan_geometry` with the run's object shape and `origin_px`): the patch is the
whole-pixel window `top_left`; the sub-pixel remainder (< half a pixel, which the physics
applies to the probe) is ignored for the labels.

Which positions train: a spatially spread share (`select_positions`, default 0.2: every
k-th position along a serpentine, `batching.validation_split`), or all (1.0). The
selected positions are split into training and validation by position blocks
(`block_split`: a grid of blocks over the scan, whole blocks held out, so a validation window
has no training window at nearly the same place). Frames are read lazily from the Zarr store
(`scandata.StoreFrames`), a batch at a time (`PairDataset.batch`).

Symmetry pairs (`probe_symmetries`, `augment_pairs`): where the probe is invariant under a
symmetry g of the square about the window's centre, the frame and the object patch turned by
g together are another pair the physics allows; training draws one per pair and step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ptyinr import store
from ptyinr.batching import validation_split
from ptyinr.config import ReconstructionConfig
from ptyinr.errors import InputError
from ptyinr.evaluate import remove_phase_ramp, scanned_interior
from ptyinr.models.ptychonn import PtychoNNSpec, input_scale, network_input, wavelength_to_energy_ev
from ptyinr.scandata import StoreFrames, scan_geometry

#: floor of the probe-intensity loss weights (share of the peak), so no pixel counts for nothing
WEIGHT_FLOOR = 0.01
#: stitching weight of a predicted patch's pixel: (probe intensity / peak) ** STITCH_POWER,
#: floored at STITCH_FLOOR. A frame says most about the object where the beam is strong; away
#: from it the prediction shrinks towards the mean patch, and those shrunk values from many
#: neighbours blur the stitched object (their errors are alike, so averaging does not cancel
#: them). Issue 13, case (a), held-out phase PSNR: 14.8 dB with power 1 (floor 1 %), 16.1 dB
#: with 2, 16.3 dB with 3 or 4; per-pixel inverse-variance weights were worse (13.8 dB).
STITCH_POWER = 3
STITCH_FLOOR = 1e-6
#: frames per read when computing a scan's mean pattern
STATS_BLOCK = 256


def parse_source(text: str) -> tuple[Path, str]:
    """'STORE.zarr:RUN' -> (store path, run id); InputError otherwise."""
    path, sep, run = str(text).rpartition(":")
    if not sep or not path or not run or "/" in run:
        raise InputError(f"{text!r}: expected STORE.zarr:RUN (a completed run of a scan store)")
    return Path(path), run


def mean_pattern(frames: StoreFrames, bad: np.ndarray | None) -> np.ndarray:
    """Mean of the frames (bad pixels as zero), read a block at a time."""
    n = len(frames)
    total = np.zeros(frames.shape[1:], dtype=np.float64)
    for start in range(0, n, STATS_BLOCK):
        block = frames.read(np.arange(start, min(n, start + STATS_BLOCK)))
        if bad is not None:
            block[:, bad] = 0
        total += block.sum(axis=0, dtype=np.float64)
    return (total / max(n, 1)).astype(np.float32)


def probe_weights(probe: np.ndarray) -> np.ndarray:
    """Per-pixel weights of a window: probe intensity / its peak, floored at WEIGHT_FLOOR."""
    power = np.abs(np.asarray(probe, dtype=np.complex64)) ** 2
    peak = float(power.max(initial=0.0))
    if not math.isfinite(peak) or peak <= 0:
        return np.ones(power.shape, dtype=np.float32)
    return np.maximum(power / peak, WEIGHT_FLOOR).astype(np.float32)


def stitch_weights(probe: np.ndarray) -> np.ndarray:
    """Per-pixel stitching weights of a window: (probe intensity / peak) ** STITCH_POWER,
    floored at STITCH_FLOOR (so a pixel only far-off beams see still gets their average)."""
    power = np.abs(np.asarray(probe, dtype=np.complex64)).astype(np.float64) ** 2
    peak = float(power.max(initial=0.0))
    if not math.isfinite(peak) or peak <= 0:
        return np.ones(power.shape, dtype=np.float32)
    return np.maximum((power / peak) ** STITCH_POWER, STITCH_FLOOR).astype(np.float32)


def extract_patches(obj: np.ndarray, top_left: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """The object under each whole-pixel window: (n, Ny, Nx)."""
    ny, nx = window
    tl = np.asarray(top_left, dtype=np.int64)
    rows = tl[:, 0, None] + np.arange(ny)[None, :]
    cols = tl[:, 1, None] + np.arange(nx)[None, :]
    return np.asarray(obj)[rows[:, :, None], cols[:, None, :]]


def stitch_patches(
    patches: np.ndarray | torch.Tensor,
    top_left: np.ndarray,
    object_shape: tuple[int, int],
    weights: np.ndarray | torch.Tensor,
    fill: complex = 1.0,
) -> torch.Tensor:
    """Weighted average of complex patches (n, Ny, Nx) on an object grid: sum w p / sum w
    where a window covers the pixel, `fill` elsewhere (`stitch_finish`)."""
    acc, norm = stitch_accumulate(patches, top_left, object_shape, weights)
    return stitch_finish(acc, norm, fill).reshape(tuple(int(s) for s in object_shape))


def stitch_accumulate(
    patches: np.ndarray | torch.Tensor,
    top_left: np.ndarray,
    object_shape: tuple[int, int],
    weights: np.ndarray | torch.Tensor,
    into: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add sum w p and sum w of some windows into (acc, norm) (created when `into` is None)."""
    p = torch.as_tensor(patches).to(torch.complex64)
    device = p.device
    w = torch.as_tensor(weights, device=device).float()
    ny, nx = p.shape[-2:]
    height, width = (int(s) for s in object_shape)
    if into is None:
        acc = torch.zeros(height * width, dtype=torch.complex64, device=device)
        norm = torch.zeros(height * width, dtype=torch.float32, device=device)
    else:
        acc, norm = into
    tl = torch.as_tensor(np.asarray(top_left, dtype=np.int64), device=device)
    rows = tl[:, 0, None] + torch.arange(ny, device=device)[None, :]
    cols = tl[:, 1, None] + torch.arange(nx, device=device)[None, :]
    flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(-1)
    wb = w.expand(p.shape).reshape(-1)
    acc.index_add_(0, flat, (p * wb.reshape(p.shape)).reshape(-1))
    norm.index_add_(0, flat, wb)
    return acc, norm


def stitch_finish(acc: torch.Tensor, norm: torch.Tensor, fill: complex = 1.0) -> torch.Tensor:
    """The stitched object, flat (the caller reshapes it to the object's shape); `fill` where
    no window's weight reaches (below 1e-9 of the largest sum; weights are >= STITCH_FLOOR)."""
    covered = norm > 1e-9 * float(norm.max()) if norm.numel() else norm > 0
    out = torch.full_like(acc, complex(fill))
    out[covered] = acc[covered] / norm[covered]
    return out


def select_positions(positions_px: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A spatially spread share of the positions (sorted indices): every k-th along a
    serpentine (`batching.validation_split`); all of them for fraction >= 1."""
    n = len(positions_px)
    if fraction >= 1.0:
        return np.arange(n)
    if not 0 < fraction:
        raise InputError(f"--fraction {fraction}: expected a share of the positions in (0, 1]")
    if fraction <= 0.5:
        chosen = validation_split(positions_px, fraction, seed)[1]
    else:  # the complement of a spread share
        chosen = validation_split(positions_px, 1.0 - fraction, seed)[0]
    return chosen if len(chosen) else np.arange(n)


def block_split(
    positions_px: np.ndarray,
    indices: np.ndarray,
    validation_fraction: float,
    seed: int,
    blocks_per_side: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) among `indices`: the scan's bounding box cut into
    blocks_per_side^2 blocks, every k-th block (k = 1 / fraction, serpentine order, start from
    the seed) held out whole. At least one position trains and (fraction > 0) one validates."""
    indices = np.asarray(indices, dtype=np.int64)
    if validation_fraction <= 0 or len(indices) < 2:
        return indices, indices[:0]
    pos = np.asarray(positions_px, dtype=np.float64)[indices]
    low, high = pos.min(axis=0), pos.max(axis=0)
    span = np.maximum(high - low, 1e-9)
    cell = np.minimum(((pos - low) / span * blocks_per_side).astype(np.int64), blocks_per_side - 1)
    by, bx = cell[:, 0], cell[:, 1]
    serp = by * blocks_per_side + np.where(by % 2 == 0, bx, blocks_per_side - 1 - bx)
    step = max(round(1.0 / validation_fraction), 2)
    start = int(np.random.default_rng([seed, 3]).integers(step))
    held_blocks = np.arange(start, blocks_per_side**2, step)
    held = np.isin(serp, held_blocks)
    if not held.any():  # the chosen blocks are empty: hold out the fullest block instead
        counts = np.bincount(serp, minlength=blocks_per_side**2)
        held = serp == int(np.argmax(counts))
    if held.all():
        held[np.argmin(serp)] = False
    return indices[~held], indices[held]


@dataclass
class RunSource:
    """One completed run as a labelled set."""

    store: Path
    run_id: str
    frames: StoreFrames
    data_source: str
    positions_px: np.ndarray  # (n, 2) of the frames the run used (rows of `frames`)
    frame_index: np.ndarray  # (n,) rows of the store's frame array
    top_left: np.ndarray  # (n, 2) whole-pixel windows on the run's object grid
    object: np.ndarray  # complex64, phase offset and ramp removed
    probe: np.ndarray  # complex64 (Ny, Nx)
    bad_pixels: np.ndarray | None
    scale: float  # input_scale of the scan
    pixel_size: tuple[float, float] | None
    energy_ev: float | None

    @property
    def name(self) -> str:
        return f"{self.store}:{self.run_id}"

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.probe.shape[0]), int(self.probe.shape[1]))

    def weights(self) -> np.ndarray:
        return probe_weights(self.probe)


def open_run_source(text: str) -> RunSource:
    """`STORE:RUN` as training material; InputError when the run is missing or not complete."""
    path, run_id = parse_source(text)
    if not path.exists():
        raise InputError(f"{text!r}: store {str(path)!r} not found")
    ds = store.open_scan_store(path)
    run = store.open_run(path, run_id)
    attrs = dict(run.attrs)
    if attrs.get("status") != "complete":
        raise InputError(
            f"{text!r}: run status is {attrs.get('status')!r}; expected a complete run"
        )
    source = str(attrs.get("data_source") or "intensities")
    if source not in ds:
        raise InputError(f"{text!r}: the run's frames ({source!r}) are not in the store")
    frame_shape = (int(ds[source].shape[1]), int(ds[source].shape[2]))
    obj = np.asarray(run["object"].values, dtype=np.complex64)
    probe = np.asarray(run["probe"].values, dtype=np.complex64)
    if tuple(probe.shape) != frame_shape:
        raise InputError(f"{text!r}: probe {probe.shape} does not match frames {frame_shape}")
    rows = np.arange(int(ds[source].shape[0]))
    if attrs.get("positions_used") is not None:
        rows = np.asarray(attrs["positions_used"], dtype=np.int64)
    positions = store.positions_px(ds, frame_shape)[rows]
    origin = attrs.get("origin_px")
    if origin is None:
        raise InputError(f"{text!r}: the run has no origin_px attribute")
    geometry = scan_geometry(
        positions,
        frame_shape,
        ReconstructionConfig(),
        object_shape=(int(obj.shape[0]), int(obj.shape[1])),
        origin_px=(int(origin[0]), int(origin[1])),
    )
    interior = scanned_interior(obj.shape, geometry.window_centres_on_grid())
    corrected = remove_phase_ramp(obj, None, interior).astype(np.complex64)
    mask_name = "preprocessed_mask" if source == "preprocessed" else "mask"
    bad = np.asarray(ds[mask_name].values, bool) if mask_name in ds else None
    frames = StoreFrames(str(path), source)
    pixel = store.object_pixel_size(ds, frame_shape)
    if ds.attrs.get("positions_unit") == "px":
        pixel = None
    wavelength = ds.attrs.get("wavelength_m")
    return RunSource(
        store=path,
        run_id=run_id,
        frames=frames,
        data_source=source,
        positions_px=positions,
        frame_index=rows,
        top_left=np.asarray(geometry.top_left, dtype=np.int64),
        object=corrected,
        probe=probe,
        bad_pixels=bad,
        scale=input_scale(mean_pattern(frames[rows] if len(rows) != len(frames) else frames, bad)),
        pixel_size=None if pixel is None else (float(pixel[0]), float(pixel[1])),
        energy_ev=None if not wavelength else wavelength_to_energy_ev(float(wavelength)),
    )


class PairDataset(Dataset):
    """(network input, amplitude, phase, weights) of (source, position) items, the frames
    read from the stores on demand. `batch(items)` reads a batch with one Zarr read per run."""

    def __init__(
        self,
        sources: Sequence[RunSource],
        items: np.ndarray,
        spec: PtychoNNSpec,
    ) -> None:
        self.sources = list(sources)
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 2)  # (source, position)
        self.spec = spec
        self._valid = [
            None if s.bad_pixels is None else torch.as_tensor(~s.bad_pixels) for s in sources
        ]
        self._weights = [torch.as_tensor(s.weights()) for s in sources]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, amplitude, phase, weights = self.batch(np.array([i]))
        return x[0], amplitude[0], phase[0], weights[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, ...]]:
        x, amplitude, phase, weights = self.batch(np.asarray(indices))
        return [(x[j], amplitude[j], phase[j], weights[j]) for j in range(len(x))]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Inputs (B, 1, n, n), amplitude and phase labels and weights (B, Ny, Nx)."""
        chosen = self.items[np.asarray(indices, dtype=np.int64)]
        ny, nx = self.spec.frame_shape
        b = len(chosen)
        n = self.spec.input_size
        x = torch.empty((b, 1, n, n))
        amplitude = torch.empty((b, ny, nx))
        phase = torch.empty((b, ny, nx))
        weights = torch.empty((b, ny, nx))
        for k in np.unique(chosen[:, 0]):
            src = self.sources[int(k)]
            where = np.flatnonzero(chosen[:, 0] == k)
            pos = chosen[where, 1]
            counts = src.frames.read(src.frame_index[pos])
            sqrt_counts = torch.from_numpy(np.sqrt(np.clip(counts, 0, None)))
            x[where] = network_input(sqrt_counts, self.spec, src.scale, self._valid[int(k)])
            patches = extract_patches(src.object, src.top_left[pos], (ny, nx))
            amplitude[where] = torch.from_numpy(np.abs(patches).astype(np.float32))
            phase[where] = torch.from_numpy(np.angle(patches).astype(np.float32))
            weights[where] = self._weights[int(k)]
        return x, amplitude, phase, weights


# ------------------------------------------------------------------------ symmetry pairs

#: the eight symmetries of the square about a frame's centre pixel (N // 2): (transpose,
#: flip rows, flip columns), applied in that order; index 0 is the identity
SYMMETRIES: tuple[tuple[bool, bool, bool], ...] = tuple(
    (t, fy, fx) for t in (False, True) for fy in (False, True) for fx in (False, True)
)
#: a probe counts as invariant under a symmetry g when ||P o g - P|| <= this * ||P||
SYMMETRY_TOLERANCE = 0.15


def apply_symmetry(array: torch.Tensor, symmetry: tuple[bool, bool, bool]) -> torch.Tensor:
    """`array` (..., N, N) under one symmetry of the square about pixel (N // 2, N // 2):
    r -> -r about that pixel is index k -> (N - k) mod N (a flip, then a roll by one), which
    keeps the zero frequency of a detector frame and the centre of a probe window in place."""
    transpose, flip_y, flip_x = symmetry
    out = array.transpose(-2, -1) if transpose else array
    for flip, dim in ((flip_y, -2), (flip_x, -1)):
        if flip:
            out = torch.roll(torch.flip(out, (dim,)), 1, dims=dim)
    return out


def probe_symmetries(
    probes: Sequence[np.ndarray], tolerance: float = SYMMETRY_TOLERANCE
) -> list[tuple[bool, bool, bool]]:
    """The symmetries of the square under which every probe is (nearly) invariant, identity
    first; none but the identity for non-square frames.

    Why they give training pairs: if P(g r) = P(r) for an orthogonal g about the window's
    centre, the object O(g r) under P has the exit wave psi(g r), and its far-field
    intensity is I(g q): the frame and the object patch transformed alike are a pair the
    physics could have measured. A focused beam of a round aperture has all eight; measured
    probes (aberrations, a square aperture, a reconstruction's errors) have fewer, and an
    operation is only used where every source run's probe passes."""
    return [g for g in SYMMETRIES if all(_invariant(p, g, tolerance) for p in probes)]


def _invariant(probe: np.ndarray, symmetry: tuple[bool, bool, bool], tolerance: float) -> bool:
    """Whether ||P o g - P|| <= tolerance * ||P|| (the identity always; other symmetries of
    the square only for a square window)."""
    if symmetry == SYMMETRIES[0]:
        return True
    p = torch.as_tensor(np.asarray(probe, dtype=np.complex64))
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        return False
    norm = torch.linalg.vector_norm(p)
    moved = torch.linalg.vector_norm(apply_symmetry(p, symmetry) - p)
    return bool(norm > 0 and moved <= tolerance * norm)


def augment_pairs(
    batch: tuple[torch.Tensor, ...],
    symmetries: Sequence[tuple[bool, bool, bool]],
    rng: np.random.Generator,
) -> tuple[torch.Tensor, ...]:
    """(input, amplitude, phase, weights) with each pair under one randomly drawn symmetry
    of `symmetries` (the same for its frame, labels and weights; see `probe_symmetries`)."""
    if len(symmetries) <= 1:
        return batch
    x, amplitude, phase, weights = (t.clone() for t in batch)
    draws = rng.integers(len(symmetries), size=len(x))
    for k in np.unique(draws):
        where = torch.as_tensor(np.flatnonzero(draws == k))
        symmetry = symmetries[int(k)]
        for tensor in (x, amplitude, phase, weights):
            tensor[where] = apply_symmetry(tensor[where], symmetry)
    return x, amplitude, phase, weights


def items_for(source_index: int, positions: np.ndarray) -> np.ndarray:
    """(source, position) items of one run's positions."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.stack([np.full(len(positions), source_index, dtype=np.int64), positions], axis=1)
