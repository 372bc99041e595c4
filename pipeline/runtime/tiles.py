"""Object fields evaluated in tiles, so a step's memory stays bounded.

A step evaluates the object networks on the union of the pixels its windows cover.
Autograd keeps every layer's activations of every pixel until the backward pass: about
(2 * hidden_layers + 2) * width floats per pixel and network, 32 KiB per pixel for the paper's
two 512-wide SIRENs, so a union of 10^6 pixels needs 32 GiB. Chunking the forward pass alone
does not help (autograd still holds every chunk's activations); `torch.utils.checkpoint`
does: each tile keeps only its input indices and its complex output, and its activations are
recomputed, one tile at a time, during the backward pass. Memory becomes
O(union * 24 B + tile * activations), for one extra forward pass of the object networks
(+1/3 of their FLOPs) and only when the union is larger than the tile.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

# object pixels per plain forward chunk on CPU (performance.object_chunk_pixels = -1)
CPU_CHUNK = 4096
# without gradients, object pixels evaluated per chunk (bounded transient activations)
NO_GRAD_CHUNK = 1 << 18
# window pixels (positions x frame pixels) the probe-scale start looks at, at most
INIT_WINDOW_PIXELS = 1 << 24
# object pixels whose mean power starts the probe scale, at most (a mean needs no more)
INIT_OBJECT_PIXELS = 1 << 18


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
