"""Measured diffraction data on the device: resident, or streamed from the store per batch.

`Measurements` is what an engine asks for: the amplitudes sqrt(I / max I) of any batch (bad
pixels zeroed), the mask of pixels to trust, the mean pattern and mean frame energy. Resident
when the scan fits the device next to the model; otherwise `FrameStream` reads each
mini-batch's frames from the store, converts them, stages them in pinned host memory and
copies them to the device with non_blocking=True on a side CUDA stream, while a background
thread already reads the next batch of the epoch's schedule. Global statistics (max, mean
pattern, mean energy) then come from one streamed pass over the data before training.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ptyinr.scandata import ScanData, StoreFrames


def is_lazy(array: Any) -> bool:
    """True for arrays that are read on demand (dask, zarr) rather than held in memory."""
    return not isinstance(array, np.ndarray) and hasattr(array, "shape")


def _blocks(frames: Any, frames_per_block: int) -> Any:
    """Consecutive float32 blocks of frames, the next one read while the caller works."""
    n = int(frames.shape[0])
    starts = list(range(0, n, frames_per_block))

    def read(start: int) -> np.ndarray:
        rows = np.arange(start, min(start + frames_per_block, n))
        if isinstance(frames, StoreFrames):
            return frames.read(rows)
        block = frames[start : start + len(rows)]
        if hasattr(block, "compute"):
            block = block.compute(scheduler="sync")
        return np.array(block, dtype=np.float32)

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(read, starts[0]) if starts else None
        for i in range(len(starts)):
            block = ahead.result()  # type: ignore[union-attr]
            ahead = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
            yield block


def frame_stats(
    frames: Any, bad_pixels: np.ndarray | None = None, frames_per_block: int = 256
) -> dict[str, Any]:
    """One pass over all frames: max, mean pattern and mean frame energy (of the amplitudes
    the engines see). Bad pixels count as zero, as in resident `Measurements`. The mean
    pattern is accumulated frame after frame in float32, exactly as numpy's mean over the
    in-memory scan, so streamed and resident runs start from the same probe guess."""
    n = int(frames.shape[0])
    bad = None if bad_pixels is None else np.asarray(bad_pixels, bool)
    peak = 0.0
    total = np.zeros(frames.shape[1:], dtype=np.float32)
    energy = 0.0
    for block in _blocks(frames, frames_per_block):
        if bad is not None:
            block[:, bad] = 0
        peak = max(peak, float(block.max(initial=0.0)))
        total = np.add.reduce(np.concatenate([total[None], block]), axis=0)
        energy += float(np.clip(block, 0, None).sum(dtype=np.float64))
    return {
        "max": peak,
        "mean_pattern": (total / np.float32(max(n, 1))).astype(np.float32),
        "mean_energy": energy / max(n, 1),
    }


class FrameStream:
    """Measured amplitudes sqrt(clip(I, 0) / scale) of any batch, read from `frames` on demand.

    `frames` is a dask array (a scan store's intensities), a zarr array or a numpy array. With
    `expect(schedule)` the next batches are read ahead in a background thread; `amplitude`
    returns a float32 tensor (B, Ny, Nx) on `device`. `stats`, when given, avoids the pass
    over the data (distributed ranks share rank 0's).
    """

    def __init__(
        self,
        frames: Any,
        device: torch.device,
        *,
        pin_memory: bool = True,
        bad_pixels: np.ndarray | None = None,
        stats: dict[str, Any] | None = None,
        share_stats: Callable[[dict[str, Any] | None], dict[str, Any]] | None = None,
        compute_stats: bool = True,
        held_out: np.ndarray | None = None,
    ) -> None:
        self.frames = frames
        self.device = device
        self.n = int(frames.shape[0])
        self.frame_shape = (int(frames.shape[1]), int(frames.shape[2]))
        self.bad = None if bad_pixels is None else np.asarray(bad_pixels, bool)
        if stats is None:
            # held-out detector pixels (validation) set no statistic, as bad ones
            hidden = self.bad if held_out is None else _union(self.bad, held_out)
            stats = frame_stats(frames, hidden) if compute_stats else None
            if share_stats is not None:
                stats = share_stats(stats)
        assert stats is not None
        self.scale = float(max(stats["max"], 1e-30))
        self.mean_pattern = np.asarray(stats["mean_pattern"], dtype=np.float32)
        # mean of sum(amplitude^2) per frame, as the resident trainer computes it
        self.mean_energy = float(stats["mean_energy"]) / self.scale
        self.pin = bool(pin_memory and device.type == "cuda")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptyinr-frames")
        self._lock = threading.Lock()
        self._schedule: list[np.ndarray] = []
        self._ahead: dict[int, Future] = {}
        self._position = 0
        self._depth = 2
        self.reads = 0  # frames read from the source (for tests and benchmarks)

    # -- reading ---------------------------------------------------------------------------

    def _read(self, indices: np.ndarray) -> torch.Tensor:
        """Host tensor (B, Ny, Nx) float32 of amplitudes, pinned when copying to CUDA."""
        idx = np.asarray(indices, dtype=np.int64)
        raw = self._gather(idx)
        if self.bad is not None:
            raw[:, self.bad] = 0
        amplitude = np.sqrt(np.clip(raw, 0, None) / np.float32(self.scale), dtype=np.float32)
        host = torch.from_numpy(np.ascontiguousarray(amplitude, dtype=np.float32))
        if self.pin:
            host = host.pin_memory()
        with self._lock:
            self.reads += len(idx)
        return host

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        frames = self.frames
        if isinstance(frames, StoreFrames):
            return frames.read(idx)
        if isinstance(frames, np.ndarray):
            return np.array(frames[idx], dtype=np.float32)
        import dask.array as da

        if isinstance(frames, da.Array):
            # sorted unique indices: dask reads each chunk once; "sync" so that a stream
            # running inside a Dask worker never submits work to the cluster
            order, back = np.unique(idx, return_inverse=True)
            block = frames[order].astype(np.float32).compute(scheduler="sync")
            return np.asarray(block)[back]
        return np.asarray(frames.get_orthogonal_selection((idx,)), dtype=np.float32)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return host if self.device.type == "cpu" else host.to(self.device)
        assert self._copy_stream is not None
        with torch.cuda.stream(self._copy_stream):
            out = host.to(self.device, non_blocking=self.pin)
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        out.record_stream(torch.cuda.current_stream(self.device))
        return out

    # -- schedule --------------------------------------------------------------------------

    def expect(self, schedule: Sequence[np.ndarray], depth: int = 2) -> None:
        """The batches the coming steps will ask for, in order; start reading ahead."""
        self._cancel()
        self._schedule = [np.asarray(b) for b in schedule]
        self._position = 0
        self._depth = max(1, depth)
        self._fill()

    def _fill(self) -> None:
        end = min(len(self._schedule), self._position + self._depth)
        for i in range(self._position, end):
            if i not in self._ahead:
                self._ahead[i] = self._pool.submit(self._read, self._schedule[i])

    def _cancel(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()

    def amplitude(self, indices: np.ndarray) -> torch.Tensor:
        """Amplitudes of `indices` on the device (from the read-ahead when it was expected)."""
        i = self._position
        if i < len(self._schedule) and np.array_equal(self._schedule[i], indices):
            future = self._ahead.pop(i, None)
            self._position += 1
            self._fill()
            host = future.result() if future is not None else self._read(indices)
        else:
            host = self._read(indices)
        return self._to_device(host)

    def close(self) -> None:
        self._cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def materialize(frames: Any) -> np.ndarray:
    """Frames as a float32 numpy array (no copy when they already are one). Lazy arrays are
    computed with local threads, never through a distributed client (safe inside a task)."""
    if isinstance(frames, np.ndarray):
        return np.asarray(frames, dtype=np.float32)
    import dask.array as da

    if isinstance(frames, da.Array):
        return np.asarray(frames.astype(np.float32).compute(scheduler="threads"))
    if isinstance(frames, StoreFrames):
        return frames.read()
    return np.asarray(frames[...], dtype=np.float32)


class Measurements:
    """The measured amplitudes sqrt(clip(I, 0) / scale) of any batch on `device`, resident or
    streamed from the store (`stream`), with bad pixels zeroed (they carry no information:
    a hot or dead pixel must not set the intensity scale, the probe-scale start or the
    data-derived probe guess; `valid` masks them out of the loss).

    `held_out` (train.validation_on = "pixels"): detector pixels kept for validation. Their
    amplitudes are read as measured, but they set no statistic (scale, mean pattern, energy)
    and `valid`, the training mask, excludes them; `validation_valid` is the mask of the
    held-out loss: those pixels (not bad), or `valid` when nothing is held out."""

    def __init__(
        self,
        data: ScanData,
        device: torch.device,
        *,
        stream: bool,
        pin_memory: bool = True,
        parallel: Any = None,
        held_out: np.ndarray | None = None,
    ) -> None:
        self.device = device
        bad = None if data.bad_pixels is None else np.asarray(data.bad_pixels, bool)
        self.valid = None if bad is None else torch.as_tensor(~bad, device=device)
        self.validation_valid = self.valid
        hidden = bad
        if held_out is not None:
            held = np.asarray(held_out, bool)
            hidden = _union(bad, held)
            self.valid = torch.as_tensor(~hidden, device=device)
            kept = held if bad is None else held & ~bad
            self.validation_valid = torch.as_tensor(kept, device=device)
        self.stream: FrameStream | None = None
        self.resident: torch.Tensor | None = None
        if stream:
            self.stream = FrameStream(
                data.intensities,
                device,
                pin_memory=pin_memory,
                bad_pixels=bad,
                share_stats=None if parallel is None else parallel.broadcast_object,
                compute_stats=parallel is None or parallel.is_root,
                held_out=held_out,
            )
            self.scale = self.stream.scale
            self.mean_pattern = self.stream.mean_pattern
            self.mean_energy = self.stream.mean_energy
            return
        intensities = materialize(data.intensities)
        if bad is not None:
            intensities = np.where(bad, np.float32(0), intensities)
        seen = intensities if held_out is None else np.where(hidden, np.float32(0), intensities)
        self.scale = float(max(seen.max(), 1e-30))
        self.mean_pattern = seen.mean(axis=0)
        del seen
        amplitude = np.clip(intensities, 0, None)  # in place from here: one temporary
        del intensities
        amplitude /= self.scale
        self.resident = torch.as_tensor(np.sqrt(amplitude, out=amplitude), device=device)
        energy = self.resident.square()
        if held_out is not None:
            energy = energy * self.valid
        self.mean_energy = float(energy.sum(dim=(-2, -1)).mean())
        del energy

    def amplitude(self, batch: torch.Tensor, batch_indices: np.ndarray) -> torch.Tensor:
        """Amplitudes (B, Ny, Nx) of the positions `batch` (a tensor on the device; the same
        indices as `batch_indices`, numpy, which the stream reads)."""
        if self.stream is not None:
            return self.stream.amplitude(batch_indices)
        return self.resident[batch]  # type: ignore[index]

    def expect(self, schedule: Sequence[np.ndarray]) -> None:
        """The batches the coming steps ask for, in order (streamed frames are read ahead)."""
        if self.stream is not None:
            self.stream.expect(schedule)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def _union(bad: np.ndarray | None, held: np.ndarray) -> np.ndarray:
    """Pixels that set no statistic: bad ones and held-out ones."""
    held = np.asarray(held, bool)
    return held if bad is None else np.asarray(bad, bool) | held
