"""What a run executes on, decided once per run by the launcher and handed to the engine.

`resolve_runtime` settles the device, CPU threads, the memory plan's choices (object tiles,
frame chunks, streamed frames, the CPU heap policy), the object networks' precision and the
data-parallel context, and refuses a run whose plan cannot fit the device. Engines read the
resulting `Runtime`; they decide none of it themselves and import nothing above this layer.

Modules: `plan` (memory and time model), `device`, `precision` (bf16 / TF32 / compile),
`tiles` (checkpointed object tiles), `frames` (resident or streamed measurements),
`collectives` (a rank's share of a batch, the all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ptyinr.config import ReconstructionConfig
from ptyinr.physics import ScanGeometry
from ptyinr.runtime import plan
from ptyinr.runtime.collectives import ParallelContext
from ptyinr.runtime.device import bound_cpu_heap, select_device
from ptyinr.runtime.frames import is_lazy
from ptyinr.runtime.precision import prepare_object_field, resolve_precision
from ptyinr.runtime.tiles import CPU_CHUNK
from ptyinr.scandata import ScanData


@dataclass(frozen=True)
class Runtime:
    """How one rank of one reconstruction runs: device, memory choices, precision, ranks."""

    device: torch.device
    tile_pixels: int = 0  # object pixels per checkpointed tile (0: untiled)
    stream: bool = False  # frames read from the store per batch (False: resident)
    chunk_pixels: int = 0  # plain forward chunks of the object networks (0: one chunk)
    frame_chunk: int = 0  # frames per forward-model chunk of a step (0: the whole batch)
    precision: str = "fp32"  # the object networks' arithmetic (performance.precision resolved)
    pin_memory: bool = True
    compile: bool = False
    estimate: plan.MemoryEstimate | None = None
    parallel: ParallelContext | None = None

    @property
    def world_size(self) -> int:
        return 1 if self.parallel is None else self.parallel.world_size

    @property
    def is_root(self) -> bool:
        """The rank that reports progress, writes checkpoints and returns the result."""
        return self.parallel is None or self.parallel.is_root

    def prepare_object_field(self, field: torch.nn.Module) -> torch.dtype | None:
        """Apply precision and compile to an engine's object networks; the autocast dtype
        that `tiles.sample_object` must apply around non-SIREN networks, or None."""
        return prepare_object_field(field, self.precision, self.compile)

    def record(self) -> dict[str, Any]:
        """What the run's attrs say about how it ran."""
        return {
            "device": str(self.device),
            "processes": self.world_size,
            "object_tile_pixels": self.tile_pixels,
            "frame_chunk": self.frame_chunk,
            "object_precision": self.precision,
            "streamed_frames": self.stream,
        }


def resolve_runtime(
    data: ScanData,
    config: ReconstructionConfig,
    geometry: ScanGeometry,
    *,
    known_probe: bool = False,
    device: torch.device | None = None,
    parallel: ParallelContext | None = None,
    refuse: bool = True,
) -> Runtime:
    """Decide how this reconstruction runs here, and apply the process-wide settings.

    Explicit settings are obeyed; `auto` choices come from the memory plan of this scan on
    this device (plan.resolve_memory). Process-wide: torch threads (train.threads > 0), the
    bounded CPU heap when the plan needs it, TF32 on CUDA (performance.tf32). Object chunks:
    performance.object_chunk_pixels, -1 = 4096 px on CPU, none on CUDA. `refuse`: InputError
    when the plan exceeds the device's memory budget (the same refusal for `reconstruct`,
    `run`, `scan` and `submit`). `device`: a rank's own device (default: train.device).
    """
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    device = device or select_device(config.train.device)
    if parallel is not None:
        parallel.bind(geometry)
    performance = config.performance
    chunk = performance.object_chunk_pixels
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
    if refuse:
        plan.refuse_unless_fits(
            plan.Plan(device.type, wl, est, epochs=config.train.epochs), "memory plan"
        )
    if device.type == "cpu" and est.heap == "bounded":
        bound_cpu_heap()
    if performance.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(
        device=device,
        tile_pixels=est.tile_pixels,
        stream=est.stream,
        chunk_pixels=chunk,
        frame_chunk=est.frame_chunk,
        precision=resolve_precision(config, device, geometry.n_positions),
        pin_memory=performance.pin_memory,
        compile=performance.compile,
        estimate=est,
        parallel=parallel,
    )


__all__ = ["ParallelContext", "Runtime", "resolve_runtime", "select_device"]
