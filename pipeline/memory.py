"""Memory-bounded training: object fields evaluated in tiles, diffraction frames streamed.

Tiles. A step evaluates the object networks on the union of the pixels its windows cover.
Autograd keeps every layer's activations of every pixel until the backward pass: about
(2 * hidden_layers + 2) * width floats per pixel and network, 32 KiB per pixel for the paper's
two 512-wide SIRENs, so a union of 10^6 pixels needs 32 GiB. Chunking the forward pass alone
does not help (autograd still holds every chunk's activations); `torch.utils.checkpoint`
does: each tile keeps only its input indices and its complex output, and its activations are
recomputed, one tile at a time, during the backward pass. Memory becomes
O(union * 24 B + tile * activations), for one extra forward pass of the object networks
(+1/3 of their FLOPs) and only when the union is larger than the tile.

Streaming. When the scan's frames do not fit the device next to the model, `FrameStream`
reads each mini-batch's frames from the (lazy, dask-backed) store array, converts them to the
trainer's amplitudes sqrt(I / max I), stages them in pinned host memory and copies them to the
device with non_blocking=True on a side CUDA stream, while a background thread already reads
the next batch of the epoch's schedule. Global statistics (max, mean pattern, mean energy)
come from one streamed pass over the data before training.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from pipeline.config import ReconstructionConfig

# object pixels per plain forward chunk on CPU (performance.object_chunk_pixels = -1)
CPU_CHUNK = 4096
# without gradients, object pixels evaluated per chunk (bounded transient activations)
NO_GRAD_CHUNK = 1 << 18
# window pixels (positions x frame pixels) the probe-scale start looks at, at most
INIT_WINDOW_PIXELS = 1 << 24
# object pixels whose mean power starts the probe scale, at most (a mean needs no more)
INIT_OBJECT_PIXELS = 1 << 18

# --------------------------------------------------------------------------------- tiles


def sample_object(
    field: torch.nn.Module,
    flat_index: torch.Tensor,
    tile_pixels: int = 0,
    autocast_dtype: torch.dtype | None = None,
    chunk_pixels: int = 0,
) -> torch.Tensor:
    """`field.sample(flat_index)`, in checkpointed tiles when the index set is large.

    tile_pixels <= 0 or a union no larger than one tile: no checkpointing. Without gradients
    the tiles are plain chunks (nothing to recompute). `chunk_pixels` > 0 evaluates each tile
    (or the untiled union) in plain chunks of that many pixels: the same activations are
    kept, but each tensor is small enough for the CPU caches and for the allocator to reuse
    (2048-4096 pixels: ~1.6x the SIREN throughput of one 50,000-pixel chunk on this VM).
    Both 0: exactly `field.sample`. `autocast_dtype` (torch.bfloat16) runs the networks
    under autocast.
    """
    n = int(flat_index.numel())
    if getattr(field, "kind", "siren") == "pixels":
        return field.sample(flat_index)
    if not (tile_pixels > 0 and n > tile_pixels):
        return _sample(field, flat_index, autocast_dtype, chunk_pixels)
    pieces = []
    for start in range(0, n, tile_pixels):
        part = flat_index[start : start + tile_pixels]
        if torch.is_grad_enabled():
            pieces.append(
                checkpoint(_sample, field, part, autocast_dtype, chunk_pixels, use_reentrant=False)
            )
        else:
            pieces.append(_sample(field, part, autocast_dtype, chunk_pixels))
    return torch.cat(pieces)


def _sample(
    field: torch.nn.Module,
    flat_index: torch.Tensor,
    autocast_dtype: torch.dtype | None,
    chunk_pixels: int = 0,
) -> torch.Tensor:
    n = int(flat_index.numel())
    if chunk_pixels > 0 and n > chunk_pixels:
        return torch.cat(
            [
                _sample(field, flat_index[start : start + chunk_pixels], autocast_dtype)
                for start in range(0, n, chunk_pixels)
            ]
        )
    if autocast_dtype is None:
        return field.sample(flat_index)
    with torch.autocast(flat_index.device.type, dtype=autocast_dtype):
        return field.sample(flat_index)


# --------------------------------------------------------------------------------- streaming


class StoreFrames:
    """A scan store's frames (or a subset of them), read on demand with zarr.

    Zarr reads only the inner chunks (one frame each, DESIGN.md) of the frames asked for,
    where a dask array chunked by shard would decompress a whole shard per scattered frame.
    Picklable (path + name + index): ranks and Dask workers open the store themselves.
    Indexing along the scan axis gives another lazy StoreFrames; `read` returns numpy.
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
    the trainer derives). Bad pixels count as zero, as in the resident trainer. The mean
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
    ) -> None:
        self.frames = frames
        self.device = device
        self.n = int(frames.shape[0])
        self.frame_shape = (int(frames.shape[1]), int(frames.shape[2]))
        self.bad = None if bad_pixels is None else np.asarray(bad_pixels, bool)
        if stats is None:
            stats = frame_stats(frames, self.bad) if compute_stats else None
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


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def bound_cpu_heap(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above `threshold_bytes` with mmap, returned to the system on free.

    glibc raises its mmap threshold dynamically (up to 32 MiB) once a large block is freed;
    from then on medium-sized tensors live in heaps that fragment across the autograd and
    main threads and hold up to ~2x the live tensor bytes. A fixed threshold keeps the
    process's RSS at the live bytes the memory plan counts; page faults on the fresh pages
    cost little next to the GEMMs that fill them. No-op (False) without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


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


def spread_subset(n: int, window_shape: tuple[int, int]) -> np.ndarray:
    """All positions, or evenly spread ones when their windows hold too many pixels."""
    limit = max(1, INIT_WINDOW_PIXELS // (int(window_shape[0]) * int(window_shape[1])))
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def thin(pixels: torch.Tensor, limit: int = INIT_OBJECT_PIXELS) -> torch.Tensor:
    """At most about `limit` evenly spaced entries (all of them when there are fewer)."""
    step = -(-int(pixels.numel()) // limit)
    return pixels if step <= 1 else pixels[::step]


@dataclass(frozen=True)
class Runtime:
    """How a trainer runs on its device: object tile (0 = untiled) and streamed frames."""

    tile_pixels: int
    stream: bool
    estimate: Any = None  # pipeline.plan.MemoryEstimate when one was made
    chunk_pixels: int = 0  # plain forward chunks of the object networks (0: one chunk)
    frame_chunk: int = 0  # frames per forward-model chunk of a step (0: the whole batch)


def runtime_for(
    data: Any,
    config: ReconstructionConfig,
    geometry: Any,
    device: torch.device,
    known_probe: bool,
    parallel: Any = None,
) -> Runtime:
    """Resolve object tiles, frame chunks, streamed frames and the CPU heap policy.

    Explicit settings are obeyed; `auto` choices come from the memory plan of this scan on
    this device (pipeline.plan.resolve_memory). A bounded heap is applied to the process
    here (glibc's mallopt). Object chunks: performance.object_chunk_pixels, -1 = 4096 px on
    CPU, none on CUDA."""
    from pipeline import plan

    chunk = config.performance.object_chunk_pixels
    if chunk < 0:
        chunk = CPU_CHUNK if device.type == "cpu" else 0
    world = 1 if parallel is None else parallel.world_size
    wl = plan.workload(geometry, config, world)
    est = plan.resolve_memory(
        wl,
        config,
        device.type,
        data_lazy=is_lazy(data.intensities),
        known_probe=known_probe,
        available=plan.available_memory(device.type, device.index),
    )
    if device.type == "cpu" and est.heap == "bounded":
        bound_cpu_heap()
    return Runtime(
        est.tile_pixels, est.stream, est, chunk_pixels=chunk, frame_chunk=est.frame_chunk
    )


def open_stream(
    data: Any, config: ReconstructionConfig, device: torch.device, parallel: Any = None
) -> FrameStream:
    """A FrameStream over a ScanData's frames; ranks share rank 0's statistics."""
    return FrameStream(
        data.intensities,
        device,
        pin_memory=config.performance.pin_memory,
        bad_pixels=data.bad_pixels,
        share_stats=None if parallel is None else parallel.broadcast_object,
        compute_stats=parallel is None or parallel.is_root,
    )


__all__ = [
    "FrameStream",
    "Runtime",
    "StoreFrames",
    "bound_cpu_heap",
    "frame_stats",
    "is_lazy",
    "materialize",
    "open_stream",
    "runtime_for",
    "sample_object",
    "spread_subset",
    "thin",
]
