"""Collectives of a data-parallel reconstruction, as an engine sees them: which positions of
a global batch are this rank's, and the all-reduce of gradients and loss.

Each global batch is sorted along a Z-order (Morton) curve of its window positions and cut
into `world_size` contiguous pieces, so a rank's windows are spatial neighbours and the union
of object pixels it evaluates shrinks with the number of ranks. A rank's data loss is its
local mean times (local positions / global positions): the ranks' losses sum to the
single-process loss of the whole batch, so summed gradients equal the single-process gradient.
After backward, all gradients and the loss travel in one flat all-reduce (NCCL on CUDA, Gloo
on CPU); every rank applies the same optimiser step and the parameters stay identical. The
launchers that start the ranks live in ptyinr.launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ptyinr.physics import ScanGeometry


def morton_key(points: np.ndarray) -> np.ndarray:
    """Z-order key of non-negative integer (y, x) points: nearby points get nearby keys."""
    pts = np.asarray(points, dtype=np.int64)
    pts = pts - pts.min(axis=0, initial=0)

    def spread(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.uint64) & np.uint64(0xFFFFFFFF)
        for shift, mask in (
            (16, 0x0000FFFF0000FFFF),
            (8, 0x00FF00FF00FF00FF),
            (4, 0x0F0F0F0F0F0F0F0F),
            (2, 0x3333333333333333),
            (1, 0x5555555555555555),
        ):
            v = (v | (v << np.uint64(shift))) & np.uint64(mask)
        return v

    return (spread(pts[:, 0]) << np.uint64(1)) | spread(pts[:, 1])


def split_batch(batch: np.ndarray, key: np.ndarray, world_size: int) -> list[np.ndarray]:
    """The global batch cut into `world_size` spatially compact, sorted, near-equal pieces."""
    batch = np.asarray(batch)
    ordered = batch[np.argsort(key[batch], kind="stable")]
    return [np.sort(part) for part in np.array_split(ordered, world_size)]


@dataclass
class ParallelContext:
    """What an engine needs to know about its place in a data-parallel group."""

    rank: int
    world_size: int
    group: Any = None
    _key: np.ndarray | None = field(default=None, repr=False)
    _full: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bind(self, geometry: ScanGeometry) -> None:
        """Spatial order of the scan's windows (called once by runtime.resolve_runtime)."""
        self._key = morton_key(geometry.top_left)
        self._full = None

    def shard(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """This rank's positions of a global batch, and its share of the batch's positions."""
        if self._key is None:
            raise RuntimeError("ParallelContext.bind(geometry) must be called first")
        batch = np.asarray(batch)
        if len(batch) == len(self._key):  # full batch: the same split every step
            if self._full is None:
                self._full = (len(batch), split_batch(batch, self._key, self.world_size)[self.rank])
            local = self._full[1]
        else:
            local = split_batch(batch, self._key, self.world_size)[self.rank]
        return local, len(local) / max(len(batch), 1)

    # -- collectives -----------------------------------------------------------------------

    def all_reduce(self, parameters: list[torch.nn.Parameter], loss: torch.Tensor) -> float:
        """Sum gradients (None counts as zero) and the loss over ranks in one flat all-reduce;
        write the summed gradients back and return the global loss."""
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
            for p in parameters
        ]
        flat = torch.cat([*grads, loss.detach().reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for p in parameters:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        return float(flat[offset])

    def broadcast_parameters(self, *modules: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (same seed makes them equal anyway;
        this guards against any rank-dependent initialisation)."""
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_floating_point() or tensor.is_complex():
                    with torch.no_grad():
                        dist.broadcast(tensor.data, src=0, group=self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's Python object on every rank."""
        box = [obj if self.is_root else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
