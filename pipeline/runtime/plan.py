"""Resource plan of a reconstruction: peak memory per device and time per epoch, before any
allocation, and the memory-driven choices (object tiles, streamed frames) the runtime makes.

Memory model (bytes per device), each term from the code it describes:

- parameters, gradients and Adam's two moments, plus one parameter-sized temporary of the
  foreach Adam step: 20 B per parameter;
- object networks: activations autograd saves for the backward pass, per pixel of the
  batch's union and per SIREN: a sine layer keeps its input and its pre-activation, so
  (2 * hidden + 2) * width values, plus ~3 * width of gradient buffers alive during the
  backward pass (4 bytes each; with bf16 hidden layers those layers keep 2-byte values).
  With tiles (ptyinr.runtime.tiles), the union keeps ~24 B per pixel (indices, complex output)
  and two tiles hold activations (the backward pass recomputes one while the last frees);
- probe networks on the Ny x Nx probe grid (hash-grid gathers: 4 corners x levels x (int64
  row + float32 weight), ReLU MLP activations);
- forward model per frame pixel of the batch: window indices, torch.unique's sort buffers
  and inverse, gathered patches, shifted probes, exit wave, far field (complex64), predicted
  and measured amplitudes, loss terms and their gradients;
- diffraction data: resident frames (4 B per frame pixel on the device; on a CPU device the
  loaded copy and the engine's amplitudes are both in RAM), or a few streamed batches;
- the torch runtime (threads, kernel caches: 80 MiB measured on CPU; 512 MiB assumed on
  CUDA) and, on CPU with the reusing heap, glibc's slack (40 % of the step's tensors,
  measured); the CPU budget is the available RAM or the cgroup's remaining limit.

The CPU constants were measured with peak RSS (VmHWM) of fresh processes; estimates agree
within 20 % on the cases of tests/test_plan.py and benchmarks/bench_scale.py (RESULTS.md).

Time model: FLOPs of the object networks (forward + backward = 3x forward, +1 forward with
tiles), their element-wise passes (sin, cos, scaling), FFTs (5 N log2 N per transform, 2 per
frame per step, 4 with sub-pixel positions) and the forward model's element-wise passes,
each divided by rates measured on this device in a fraction of a second (`calibrate`):
a width x width GEMM, a sine pass, and a batch of frame-sized FFTs.

The union of object pixels a batch touches comes from the scan's actual geometry: coverage
counts (a 2-D difference array) of a few of the first epoch's batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptyinr import store
from ptyinr.batching import epoch_batches
from ptyinr.config import ReconstructionConfig
from ptyinr.errors import InputError
from ptyinr.models.hashgrid import level_resolutions
from ptyinr.runtime import precision as precision_rules
from ptyinr.runtime.collectives import morton_key, split_batch
from ptyinr.runtime.device import select_device
from ptyinr.scandata import store_geometry

GIB = 1024**3
MIB = 1024**2
LONG_RUN_SECONDS = 3600.0  # --plan warns when one reconstruction's epochs take longer

# bytes per parameter: value, gradient, Adam exp_avg and exp_avg_sq, one foreach temporary
PARAMETER_BYTES = 20
# per pixel of the union, besides the networks: coordinates, flat index, complex output,
# softplus / polar inputs, gathered copy
OBJECT_PIXEL_OVERHEAD = 64
# per union pixel kept across a checkpointed tile (index int64, complex64 output, cat copy)
TILED_PIXEL_BYTES = 24
# per union pixel with frame chunks: the union's indices (int64) and the object values with
# their gradient (complex64 leaf) kept between the chunks of a step
CHUNKED_PIXEL_BYTES = 24
# forward model, per frame pixel of the batch, besides the inverse index (8 B): patches,
# shifted probes, far field, amplitudes and their gradients. CPU: measured (64 x 64 frames).
# CUDA keeps more (cuFFT's out-of-place transforms and workspaces, autograd's complex
# buffers): on an H200 the unchunked 40,401 x 220 x 220 sub-pixel step ran out of memory
# asking for 29.2 GiB with 116.7 GiB in use, so it needed more than 73 B per frame pixel
# (benchmarks/RESULTS.md, "GPU"); 96 is that lower bound plus a margin, not a measured peak
FORWARD_BYTES = {
    "cpu": {"subpixel": 50, "whole": 42},
    "cuda": {"subpixel": 96, "whole": 81},
}
# window indices + torch.unique (sort, inverse), per frame pixel; transient before the
# object networks run, the inverse (8 B) stays
UNIQUE_BYTES = 40
# checkpointed tiles whose activations are alive at once during the backward pass
TILES_ALIVE = 2
# smallest useful tile; below it kernels get inefficient
MIN_TILE = 4096
# frames in flight when streaming: read-ahead depth 2, the current batch, a pinned stage
STREAM_BATCHES = 4
# CPU heap kept for reuse (performance.cpu_heap = reuse), as a share of the step's tensors:
# measured peaks 1.02-1.37x of the live estimate on the cases of bench_scale and test_plan
ALLOCATOR_SLACK = 0.40
# what the torch runtime itself adds once training runs: autograd and intra-op threads,
# kernel caches, optimiser bookkeeping (CPU: measured, 80 MiB); on CUDA the caching
# allocator's slack, cuFFT plans and cuBLAS workspaces (not measured here: a GPU estimate)
RUNTIME_OVERHEAD = {"cpu": 80 * MIB, "cuda": 512 * MIB}


# --------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """Sizes that drive memory and time: per device (rank) and per step."""

    n_positions: int
    frame_shape: tuple[int, int]
    object_shape: tuple[int, int]
    world_size: int
    batch_positions: int  # global positions per step
    steps_per_epoch: int
    frames_per_rank: int  # positions of the busiest rank in a step
    union_pixels: int  # object pixels under the busiest rank's windows in a step
    subpixel: bool

    @property
    def frame_pixels(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1]


def union_size(top_left: np.ndarray, window: tuple[int, int], shape: tuple[int, int]) -> int:
    """Object pixels covered by at least one window (2-D difference array, O(n + H W))."""
    if len(top_left) == 0:
        return 0
    ny, nx = window
    diff = np.zeros((shape[0] + 1, shape[1] + 1), dtype=np.int32)
    r, c = top_left[:, 0], top_left[:, 1]
    np.add.at(diff, (r, c), 1)
    np.add.at(diff, (r, c + nx), -1)
    np.add.at(diff, (r + ny, c), -1)
    np.add.at(diff, (r + ny, c + nx), 1)
    cover = diff.cumsum(axis=0).cumsum(axis=1)
    return int(np.count_nonzero(cover[: shape[0], : shape[1]]))


def workload(
    geometry: Any, config: ReconstructionConfig, world_size: int = 1, samples: int = 3
) -> Workload:
    """Per-step sizes of this scan under this configuration (a few batches sampled)."""

    n = geometry.n_positions
    bs = config.train.batch_size_for(n)
    full = bs <= 0
    steps = 1 if full else math.ceil(n / bs)
    key = morton_key(geometry.top_left) if world_size > 1 else None
    frames, union = 0, 0
    centres = geometry.window_centres_on_grid()
    schedule = epoch_batches(centres, bs, config.train.batches, config.train.seed, 0)
    for i, batch in enumerate(schedule):
        if i >= samples:
            break
        parts = [batch] if key is None else split_batch(batch, key, world_size)
        for part in parts:
            frames = max(frames, len(part))
            union = max(
                union,
                union_size(geometry.top_left[part], geometry.window_shape, geometry.object_shape),
            )
    subpixel = bool(np.abs(geometry.subpixel).max(initial=0.0) > 1e-6)
    return Workload(
        n_positions=n,
        frame_shape=tuple(geometry.window_shape),
        object_shape=tuple(geometry.object_shape),
        world_size=world_size,
        batch_positions=n if full else min(bs, n),
        steps_per_epoch=steps,
        frames_per_rank=frames,
        union_pixels=union,
        subpixel=subpixel,
    )


# --------------------------------------------------------------------------------- parameters


def _hash_table_rows(config: Any) -> int:
    table = 2**config.hash_log2_table_size
    res = level_resolutions(
        config.hash_levels, config.hash_base_resolution, config.hash_per_level_scale
    )
    return sum(min((r + 1) ** 2, table) for r in res)


def _mlp_params(fan_in: int, width: int, hidden: int) -> int:
    total, prev = 0, fan_in
    for _ in range(hidden):
        total += prev * width + width
        prev = width
    return total + prev + 1


def siren_params(width: int, hidden: int) -> int:
    return 2 * width + width + hidden * (width * width + width) + width + 1


def parameter_counts(config: ReconstructionConfig, wl: Workload, known_probe: bool) -> dict:
    """Trainable parameters of object and probe, from the configuration alone."""
    m = config.model
    hash_net = _hash_table_rows(m) * m.hash_features + _mlp_params(
        m.hash_levels * m.hash_features, m.mlp_width, m.mlp_hidden_layers
    )
    if m.object == "siren":
        obj = 2 * siren_params(m.siren_width, m.siren_hidden_layers)
    elif m.object == "hashgrid":
        obj = 2 * hash_net
    else:
        obj = 2 * wl.object_shape[0] * wl.object_shape[1]
    if known_probe:
        probe = 1
    elif m.probe == "hashgrid":
        probe = 2 * hash_net + 1
    else:
        probe = 2 * wl.frame_pixels + 1
    return {"object": obj, "probe": probe}


# --------------------------------------------------------------------------------- memory


def object_precision(config: ReconstructionConfig, device_type: str, n_positions: int) -> str:
    """performance.precision resolved for a device kind and scan (ptyinr.runtime.precision)."""
    import torch

    return precision_rules.resolve_precision(config, torch.device(device_type), n_positions)


def object_bytes_per_pixel(config: ReconstructionConfig, precision: str = "fp32") -> int:
    """Activations the object networks keep per union pixel until backward (+ grad buffers).

    Per SIREN and pixel, autograd keeps each sine's input and each linear layer's input:
    float32, 2 values per layer but the first (coordinates: negligible) plus the head's
    input. With bf16 hidden layers (ptyinr.runtime.precision) the hidden layers keep theirs in
    bfloat16, the first sine's input and the head's input stay float32. With bf16-backward
    (models.siren) each layer keeps its input and its sine's cosine in bfloat16, the first
    layer's cosine in float32."""
    m = config.model
    if m.object == "siren":
        w, h = m.siren_width, m.siren_hidden_layers
        if precision == "bf16":
            per_net = (4 + 2 * 2 * h + 4) * w
        elif precision == "bf16-backward":
            per_net = (4 + 2 * h + 2 * (h + 1)) * w
        else:
            per_net = (2 * h + 2) * w * 4
        return 2 * per_net + 3 * w * 4 + OBJECT_PIXEL_OVERHEAD
    if m.object == "hashgrid":
        levels = m.hash_levels
        per_net = 4 * levels * (8 + 4 + 4 * m.hash_features) + (m.mlp_hidden_layers + 1) * (
            m.mlp_width * 4 * 2
        )
        return 2 * per_net + OBJECT_PIXEL_OVERHEAD
    return 16


def probe_bytes(config: ReconstructionConfig, wl: Workload, known_probe: bool) -> int:
    """Probe networks evaluated on the whole probe grid once per step."""
    m = config.model
    k = wl.frame_pixels
    if known_probe or m.probe != "hashgrid":
        return 64 * k
    levels = m.hash_levels
    gathers = 4 * levels * (8 + 4 + 4 * m.hash_features) + 6 * levels * 8  # + index temporaries
    mlp = (m.mlp_hidden_layers + 1) * m.mlp_width * 4 * 2
    return k * (2 * (gathers + mlp) + 64)


@dataclass
class MemoryEstimate:
    """Peak bytes per device by part, with the tile and streaming choices they assume."""

    parts: dict[str, int]
    tile_pixels: int  # 0: object evaluated untiled
    stream: bool
    available: int
    budget: int
    loading_peak: int = 0  # while the frames are converted, before training starts
    heap: str = "reuse"  # CPU allocator policy assumed (ptyinr.runtime.device.bound_cpu_heap)
    frame_chunk: int = 0  # frames per forward-model chunk (0: the whole batch at once)

    @property
    def peak(self) -> int:
        return max(sum(self.parts.values()), self.loading_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget


def estimate_memory(
    wl: Workload,
    config: ReconstructionConfig,
    device_type: str,
    *,
    tile_pixels: int,
    stream: bool,
    data_lazy: bool = True,
    known_probe: bool = False,
    available: int = 0,
    heap: str = "reuse",
    frame_chunk: int = 0,
) -> MemoryEstimate:
    """Peak memory of one rank for explicit tile / stream / CPU heap / frame chunk choices.
    `data_lazy`: the frames are read from the store (False: already in this process's RAM
    as well)."""
    counts = parameter_counts(config, wl, known_probe)
    chunked = 0 < frame_chunk < wl.frames_per_rank
    frame_chunk = frame_chunk if chunked else 0
    frame_px = (frame_chunk or wl.frames_per_rank) * wl.frame_pixels
    precision = object_precision(config, device_type, wl.n_positions)
    per_pixel = object_bytes_per_pixel(config, precision)
    u = wl.union_pixels
    if tile_pixels > 0 and u > tile_pixels and config.model.object != "pixels":
        # two tiles' activations: autograd recomputes the next tile before the last one's
        # buffers are gone (measured: 1.43 GB for a 2 x 0.54 GB + 0.33 GB estimate)
        obj = u * TILED_PIXEL_BYTES + TILES_ALIVE * tile_pixels * per_pixel
    else:
        obj = u * per_pixel
    per_frame_pixel = FORWARD_BYTES.get(device_type, FORWARD_BYTES["cuda"])
    forward = frame_px * (per_frame_pixel["subpixel" if wl.subpixel else "whole"] + 8)
    if chunked:
        # the union is merged chunk by chunk (a chunk's unique pixels next to the union)
        obj += u * CHUNKED_PIXEL_BYTES
        step = max(obj + forward + 8 * frame_px, frame_px * UNIQUE_BYTES + 3 * 8 * u)
    else:
        # torch.unique runs before the networks; count whichever phase is larger
        step = max(obj + forward, frame_px * UNIQUE_BYTES)
    frame_bytes = 4 * wl.frame_pixels
    scan_bytes = wl.n_positions * frame_bytes
    loaded = scan_bytes if device_type == "cpu" and not data_lazy else 0  # already in RAM
    if stream:
        data = STREAM_BATCHES * wl.frames_per_rank * frame_bytes + loaded
        loading = data
    else:
        data = scan_bytes + loaded
        # the engine converts loaded (or materialised) frames into amplitudes: both alive
        loading = 2 * scan_bytes if device_type == "cpu" else scan_bytes
    parts = {
        "parameters + Adam": (counts["object"] + counts["probe"]) * PARAMETER_BYTES,
        "object activations": obj,
        "probe networks": probe_bytes(config, wl, known_probe),
        "forward model": step - obj,
        "diffraction data": data,
    }
    if device_type == "cpu" and heap == "reuse":
        # glibc keeps freed blocks for reuse: fragments add up to ~40 % (measured)
        parts["allocator slack"] = int(ALLOCATOR_SLACK * step)
    parts["torch runtime"] = RUNTIME_OVERHEAD.get(device_type, RUNTIME_OVERHEAD["cuda"])
    budget = int(available * config.performance.memory_fraction)
    loading_peak = parts["parameters + Adam"] + max(loading, data)
    return MemoryEstimate(
        parts, tile_pixels, stream, available, budget, loading_peak, heap, frame_chunk
    )


def available_memory(device_type: str, device_index: int | None = None) -> int:
    """Free bytes on the device: torch.cuda.mem_get_info on CUDA; on CPU the available RAM,
    or less where this process's cgroup limit leaves less (a SLURM job's --mem, a
    container): the node's free RAM is not the job's."""
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device_index)
        return int(free)
    import psutil

    free = int(psutil.virtual_memory().available)
    limited = cgroup_free_bytes()
    return free if limited is None else min(free, limited)


# a cgroup "limit" at or above this is no limit (v1 writes 2**63 rounded down to pages)
_NO_LIMIT = 1 << 60


def cgroup_free_bytes(
    root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup"
) -> int | None:
    """Bytes this process may still allocate under its memory cgroups (v1 or v2), or None
    when no limit applies or none can be read. Every level from the process's own cgroup up
    to the mount's root counts (a job step inherits its job's limit); reclaimable page cache
    (inactive_file) counts as free."""
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        _id, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":  # v2 unified hierarchy
            base, files, cache = root, ("memory.max", "memory.current"), "inactive_file"
        elif "memory" in controllers.split(","):
            base = root / "memory"
            files, cache = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file"
        else:
            continue
        parts = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(parts), -1, -1):
            free = _cgroup_level_free(base.joinpath(*parts[:depth]), *files, cache)
            if free is not None:
                best = free if best is None else min(best, free)
    return best


def _cgroup_level_free(folder: Path, limit_file: str, usage_file: str, cache: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or int(limit_text) >= _NO_LIMIT:
        return None
    reclaimable = 0
    try:
        for stat in (folder / "memory.stat").read_text().splitlines():
            key, _, value = stat.partition(" ")
            if key == cache:
                reclaimable = int(value)
    except (OSError, ValueError):
        pass
    return max(int(limit_text) - usage + reclaimable, 0)


def resolve_memory(
    wl: Workload,
    config: ReconstructionConfig,
    device_type: str,
    *,
    data_lazy: bool,
    known_probe: bool = False,
    available: int | None = None,
) -> MemoryEstimate:
    """Choose streaming, the CPU heap policy and object tiles so a rank fits its budget.

    Explicit settings are kept (performance.object_tile_pixels > 0, data.stream = always /
    never, performance.cpu_heap = reuse / bounded). Auto, fastest first: resident frames,
    then streamed; the reusing heap, then the bounded one; no tiles, then the largest tile
    that fits (with the bounded heap: checkpointed tiles under heap reuse were measured at
    2.9x their live bytes); then the forward model in chunks of frames, the largest power of
    two that fits (performance.frame_chunk = 0). Returns the chosen estimate, which may still
    not fit (`fits`).
    """
    if available is None:
        available = available_memory(device_type)
    perf = config.performance
    streams = {"always": [True], "never": [False]}.get(config.data.stream, [False, True])
    if device_type != "cpu":
        heaps = ["reuse"]  # no glibc heap on the device; CUDA slack is in the runtime part
    elif perf.cpu_heap != "auto":
        heaps = [perf.cpu_heap]
    elif perf.object_tile_pixels > 0:
        heaps = ["bounded"]  # tiles were asked for: memory first
    else:
        heaps = ["reuse", "bounded"]
    common = dict(data_lazy=data_lazy, known_probe=known_probe, available=available)
    candidates: list[MemoryEstimate] = []
    auto_tiles = perf.object_tile_pixels == 0 and config.model.object != "pixels"
    if perf.frame_chunk > 0:
        chunks = [perf.frame_chunk]
    else:  # whole batch first, then halving chunks of frames
        chunks = [0] + [
            1 << k for k in range(max(wl.frames_per_rank - 1, 1).bit_length() - 1, -1, -1)
        ]
    for chunk in chunks:
        for stream in streams:
            for heap in heaps:
                est = estimate_memory(
                    wl,
                    config,
                    device_type,
                    tile_pixels=perf.object_tile_pixels,
                    stream=stream,
                    heap=heap,
                    frame_chunk=chunk,
                    **common,
                )
                if est.fits:
                    return est
                candidates.append(est)
        if auto_tiles:
            for stream in streams:
                est = _with_largest_tile(
                    wl, config, device_type, stream, heaps[-1], frame_chunk=chunk, **common
                )
                if est.fits:
                    return est
                candidates.append(est)
    return min(candidates, key=lambda e: e.peak)


def _with_largest_tile(
    wl: Workload,
    config: ReconstructionConfig,
    device_type: str,
    stream: bool,
    heap: str,
    *,
    data_lazy: bool,
    known_probe: bool,
    available: int,
    frame_chunk: int = 0,
) -> MemoryEstimate:
    """The largest tile (a power of two >= MIN_TILE) under which the step fits."""
    tile = 1 << max(int(math.log2(max(wl.union_pixels, MIN_TILE))), 12)
    while True:
        est = estimate_memory(
            wl,
            config,
            device_type,
            tile_pixels=tile,
            stream=stream,
            heap=heap,
            data_lazy=data_lazy,
            known_probe=known_probe,
            available=available,
            frame_chunk=frame_chunk,
        )
        if est.fits or tile <= MIN_TILE:
            return est
        tile //= 2


# --------------------------------------------------------------------------------- time


def _timed(dev: Any, fn: Any, repeat: int = 3) -> float:
    """Best of `repeat` timed calls after a warm-up (synchronised on CUDA)."""
    import torch

    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def gemm_rates(
    device: Any = "cpu", width: int = 512, names: tuple[str, ...] = ("gemm_fp32", "gemm_bf16")
) -> dict[str, float]:
    """FLOP/s of a (rows x width) @ (width x width) GEMM in fp32 and/or bf16, measured now
    (rows: 8192 on a CPU, 65536 on a GPU)."""
    import torch

    dev = torch.device(device)
    rows = 8192 if dev.type == "cpu" else 65536
    dtypes = {"gemm_fp32": torch.float32, "gemm_bf16": torch.bfloat16}
    rates: dict[str, float] = {}
    for name in names:
        a = torch.randn(rows, width, device=dev, dtype=dtypes[name])
        b = torch.randn(width, width, device=dev, dtype=dtypes[name])
        out = torch.empty(rows, width, device=dev, dtype=dtypes[name])
        seconds = _timed(dev, lambda a=a, b=b, o=out: torch.mm(a, b, out=o))
        rates[name] = 2.0 * rows * width * width / seconds
    return rates


def calibrate(device: Any, width: int = 512, frame_shape: tuple[int, int] = (64, 64)) -> dict:
    """Rates of this device, measured now: GEMM FLOP/s (fp32 and bf16), sine elements/s,
    FFT FLOP/s for frame-sized complex64 transforms. About a second on a CPU."""
    import torch

    dev = torch.device(device)
    rates = gemm_rates(dev, width)
    rows = 8192 if dev.type == "cpu" else 65536
    x = torch.randn(rows * width // 4, device=dev)
    y = torch.empty_like(x)
    rates["elementwise"] = x.numel() / _timed(dev, lambda: torch.sin(x, out=y))
    ny, nx = frame_shape
    frames = max(1, (1 << 22) // (ny * nx))
    f = torch.randn(frames, ny, nx, dtype=torch.complex64, device=dev)
    g = torch.empty_like(f)
    rates["fft"] = frames * fft_flops(frame_shape) / _timed(dev, lambda: torch.fft.fft2(f, out=g))
    return rates


def fft_flops(frame_shape: tuple[int, int]) -> float:
    n = frame_shape[0] * frame_shape[1]
    return 5.0 * n * math.log2(max(n, 2))


def siren_flops_per_pixel(config: ReconstructionConfig) -> float:
    """Forward FLOPs of both object SIRENs at one pixel (multiply-add = 2)."""
    m = config.model
    if m.object != "siren":
        return 0.0
    w, h = m.siren_width, m.siren_hidden_layers
    return 2 * 2.0 * (2 * w + h * w * w + w)


def estimate_time(
    wl: Workload,
    config: ReconstructionConfig,
    rates: dict,
    tile_pixels: int = 0,
    precision: str = "fp32",
) -> dict[str, float]:
    """Seconds per step by part and per epoch (the busiest rank sets the pace); `precision`
    is the object networks' resolved precision (ptyinr.runtime.precision.resolve_precision)."""
    m = config.model
    u = wl.union_pixels
    tiled = tile_pixels > 0 and u > tile_pixels
    passes = 4.0 if tiled else 3.0  # forward + backward (2x), + recompute
    fp32_passes, bf16_passes = {"bf16": (0.0, passes), "bf16-backward": (passes - 2.0, 2.0)}.get(
        precision, (passes, 0.0)
    )
    out: dict[str, float] = {}
    if m.object == "siren":
        out["object GEMMs"] = (
            u
            * siren_flops_per_pixel(config)
            * (fp32_passes / rates["gemm_fp32"] + bf16_passes / rates["gemm_bf16"])
        )
        # per layer and pixel: scale + sin forward, cos + 2 products backward, bias grad
        layers = m.siren_hidden_layers + 1
        out["object element-wise"] = 2 * u * layers * m.siren_width * 6 / rates["elementwise"]
    else:
        out["object"] = u * 400 * m.hash_levels / rates["elementwise"]
    frame_px = wl.frames_per_rank * wl.frame_pixels
    ffts = 4 if wl.subpixel else 2
    out["FFTs"] = wl.frames_per_rank * ffts * fft_flops(wl.frame_shape) / rates["fft"]
    out["forward model element-wise"] = frame_px * 40 / rates["elementwise"]
    probe_px = wl.frame_pixels
    out["probe"] = probe_px * 60 * m.hash_levels / rates["elementwise"]
    if wl.world_size > 1:
        params = sum(parameter_counts(config, wl, False).values())
        bandwidth = rates.get("allreduce_bytes_per_s", 2e9)
        out["all-reduce"] = 2.0 * 4 * params / bandwidth
    step = sum(out.values())
    out["step"] = step
    out["epoch"] = step * wl.steps_per_epoch
    return out


# --------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Memory and time of a reconstruction on `device` with `world_size` ranks."""

    device: str
    workload: Workload
    memory: MemoryEstimate
    time: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    precision: str = ""  # resolved object-network precision, when the time was estimated
    # seconds per epoch at the other precisions, when the device multiplies bf16 natively
    alternatives: dict[str, float] = field(default_factory=dict)
    epochs: int = 0  # train.epochs, for the whole run's time

    @property
    def run_seconds(self) -> float | None:
        """Estimated training time of all epochs (None when time was not estimated)."""
        if not self.time or not self.epochs:
            return None
        return self.time["epoch"] * self.epochs

    def warnings(self) -> list[str]:
        """What a user should know before starting: a run that will take hours."""
        total = self.run_seconds
        if total is None or total < LONG_RUN_SECONDS:
            return []
        return [
            f"warning: {self.epochs} epochs will take about {total / 3600:.1f} h on this "
            f"{self.device} (one reconstruction; `ptyinr run` adds two half-scan ones for the "
            "FRC); fewer epochs (train.epochs), narrower SIRENs (model.siren_width), "
            "mini-batches (train.batch_size) or a GPU node (--cluster slurm:PROFILE) shorten it"
        ]

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def lines(self) -> list[str]:
        wl, mem = self.workload, self.memory
        out = [
            f"scan: {wl.n_positions} positions of {wl.frame_shape[0]} x {wl.frame_shape[1]}, "
            f"object {wl.object_shape[0]} x {wl.object_shape[1]} px",
            f"ranks: {wl.world_size} on {self.device}; per step {wl.batch_positions} positions "
            f"({wl.frames_per_rank} on the busiest rank, object union {wl.union_pixels} px), "
            f"{wl.steps_per_epoch} steps per epoch",
            f"object tiles: {mem.tile_pixels or 'none'}; frames: "
            f"{'streamed per batch' if mem.stream else 'resident'}"
            + (f"; forward model in chunks of {mem.frame_chunk} frames" if mem.frame_chunk else "")
            + (f"; CPU heap: {mem.heap}" if self.device == "cpu" else "")
            + (f"; object networks: {self.precision}" if self.precision else ""),
            "estimated peak memory per device:",
        ]
        out += [f"  {name:<22} {_size(value):>10}" for name, value in mem.parts.items()]
        out.append(
            f"  {'total':<22} {_size(mem.peak):>10}  of {_size(mem.budget)} usable "
            f"({self.memory_fraction_text()})"
        )
        if self.time:
            parts = ", ".join(
                f"{k} {v:.3g} s" for k, v in self.time.items() if k not in ("step", "epoch")
            )
            out.append(
                f"estimated time: {self.time['step']:.3g} s per step ({parts}); "
                f"{self.time['epoch']:.3g} s per epoch"
                + (
                    f"; {_duration(self.run_seconds)} for {self.epochs} epochs"
                    if self.run_seconds is not None
                    else ""
                )
            )
        if self.alternatives:
            other = ", ".join(f"{k} {v:.3g} s" for k, v in self.alternatives.items())
            out.append(
                f"per epoch with performance.precision = {other} (faster; a higher loss floor "
                "near convergence: README, benchmarks/RESULTS.md)"
            )
        return out

    def memory_fraction_text(self) -> str:
        return f"{_size(self.memory.available)} free"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def make_plan(
    geometry: Any,
    config: ReconstructionConfig,
    *,
    device_type: str = "cpu",
    world_size: int = 1,
    data_lazy: bool = True,
    known_probe: bool = False,
    available: int | None = None,
    rates: dict | None = None,
    with_time: bool = True,
) -> Plan:
    """The plan of one reconstruction (rates measured now unless given)."""
    wl = workload(geometry, config, world_size)
    mem = resolve_memory(
        wl,
        config,
        device_type,
        data_lazy=data_lazy,
        known_probe=known_probe,
        available=available,
    )
    times: dict[str, float] = {}
    alternatives: dict[str, float] = {}
    precision = ""
    if with_time:
        if rates is None:
            rates = calibrate(device_type, config.model.siren_width, wl.frame_shape)
        precision = object_precision(config, device_type, wl.n_positions)
        times = estimate_time(wl, config, rates, mem.tile_pixels, precision)
        if precision == "fp32":
            alternatives = _faster_precisions(wl, config, rates, mem.tile_pixels, device_type)
    return Plan(
        device_type, wl, mem, times, rates or {}, precision, alternatives, config.train.epochs
    )


def _faster_precisions(
    wl: Workload, config: ReconstructionConfig, rates: dict, tile_pixels: int, device_type: str
) -> dict[str, float]:
    """Epoch times of the bfloat16 modes, offered next to a float32 SIREN plan (the caller
    checks the precision) when this device multiplies bf16 natively (a user choosing
    speed should see what it buys)."""
    import torch

    if config.model.object != "siren" or "gemm_bf16" not in rates:
        return {}
    if not precision_rules.native_bf16(torch.device(device_type)):
        return {}
    return {
        p: estimate_time(wl, config, rates, tile_pixels, p)["epoch"]
        for p in ("bf16-backward", "bf16")
    }


def plan_for_store(
    path: str | Path,
    config: ReconstructionConfig,
    *,
    world_size: int = 1,
    device_type: str | None = None,
    known_probe: bool = False,
    with_time: bool = True,
    available: int | None = None,
) -> Plan:
    """Plan a reconstruction of a scan store without reading its frames (on `device_type`
    with `available` bytes when given: another machine's device, no time estimate)."""

    ds = store.open_scan_store(path)
    source = store.resolve_source(ds, config.data.source)
    _positions, geometry = store_geometry(ds, source, config)
    device = device_type or select_device(config.train.device).type
    return make_plan(
        geometry,
        config,
        device_type=device,
        world_size=world_size,
        known_probe=known_probe,
        with_time=with_time and available is None,
        available=available,
    )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})


def parse_device_memory(text: str) -> tuple[str, int]:
    """`cuda:80GiB` -> ("cuda", bytes): the device kind and free memory of a machine other
    than this one (`--plan-for`); units B, KB..TB (10^3) and KiB..TiB (2^10)."""
    kind, _, amount = text.partition(":")
    number = amount.strip().rstrip("bBiIkKmMgGtT")
    unit = amount.strip()[len(number) :].upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if kind not in ("cpu", "cuda") or unit not in _UNITS or value <= 0:
        raise InputError(
            f"--plan-for {text!r}: expected DEVICE:MEMORY with DEVICE cpu or cuda and "
            "MEMORY a positive size such as 80GiB, 40GB or 512MiB"
        )
    return kind, int(value * _UNITS[unit])


def refuse_unless_fits(plan: Plan, where: str) -> None:
    """InputError naming the biggest parts when the plan exceeds the memory budget."""
    if plan.fits:
        return
    mem = plan.memory
    top = sorted(mem.parts.items(), key=lambda kv: -kv[1])[:2]
    biggest = ", ".join(f"{k} {_size(v)}" for k, v in top)
    raise InputError(
        f"{where}: plan needs {_size(mem.peak)} per device but {_size(mem.budget)} is usable "
        f"({biggest}); use more devices (--gpus/--processes), a smaller train.batch_size, "
        "performance.object_tile_pixels, performance.frame_chunk, or data.stream=always"
    )


def check_plan(
    path: str | Path,
    config: ReconstructionConfig,
    world_size: int = 1,
    *,
    known_probe: bool = False,
    show: bool = False,
    echo: Any = print,
    target: tuple[str, int] | None = None,
) -> Plan:
    """What `ptyinr reconstruct` does first: plan from the store's metadata alone, print the
    plan when `show` (`--plan`, with a quick timing calibration), and refuse (InputError)
    when it cannot fit the device. `target` (kind, bytes): plan for another machine's
    device instead (`--plan-for`), memory only."""
    device_type, available = target if target else (None, None)
    plan = plan_for_store(
        path,
        config,
        world_size=world_size,
        known_probe=known_probe,
        with_time=show,
        device_type=device_type,
        available=available,
    )
    if show:
        for line in plan.lines():
            echo(line)
        if target:
            echo("time per epoch: not estimated (it is measured on the device itself)")
        for line in plan.warnings():
            echo(line)
    refuse_unless_fits(plan, str(path))
    return plan


__all__ = [
    "MemoryEstimate",
    "Plan",
    "Workload",
    "available_memory",
    "calibrate",
    "check_plan",
    "estimate_memory",
    "estimate_time",
    "make_plan",
    "parameter_counts",
    "parse_device_memory",
    "plan_for_store",
    "refuse_unless_fits",
    "resolve_memory",
    "union_size",
    "workload",
]
