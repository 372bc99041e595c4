"""Which scan positions each optimisation step sees.

Full batch (every position every step) is the paper's default and the best use of one step's
object evaluation on small scans. On large scans it leaves too few steps per epoch and too much
memory per step, so `train.batch_size = "auto"` switches to mini-batches beyond
`train.auto_batch_above` positions. Mini-batches are spatially local by default: a batch of
neighbouring positions covers a compact patch of the object, so the object networks, which
cost per object pixel, evaluate only that patch instead of nearly the whole field (as a random
batch of wide windows does). The tiling is shifted and the batch order shuffled every epoch, so
no boundary stays fixed, and everything follows from (seed, epoch) alone: a resumed run takes
the same steps as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

AUTO_BATCH_POSITIONS = 64  # positions per local batch when batch_size = "auto" picks batches


def resolve_batch_size(batch_size: int | str, auto_batch_above: int, n_positions: int) -> int:
    """Positions per step (0 = full batch) that `train.batch_size` means for this scan."""
    if batch_size == "auto":
        return 0 if n_positions <= auto_batch_above else AUTO_BATCH_POSITIONS
    size = int(batch_size)
    return 0 if size >= n_positions else size


def is_full_batch(batch_size: int) -> bool:
    return batch_size <= 0


def random_batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """A seeded shuffle cut into batches (sorted indices)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        yield np.sort(order[start : start + batch_size])


def local_batches(
    positions_px: np.ndarray, batch_size: int, seed: int, epoch: int
) -> Iterator[np.ndarray]:
    """Batches of neighbouring positions: the scan is cut into horizontal strips about
    sqrt(batch_size) positions high (offset at random each epoch), positions are ordered along
    a serpentine through the strips, and consecutive runs of `batch_size` form the batches
    (roughly square patches of the scan), yielded in a seeded random order."""
    positions = np.asarray(positions_px, dtype=np.float64)
    n = len(positions)
    rng = np.random.default_rng([seed, epoch, 1])
    low, high = positions.min(axis=0), positions.max(axis=0)
    extent = np.maximum(high - low, 1e-9)
    spacing = math.sqrt(float(extent[0] * extent[1]) / n) if n > 1 else 1.0
    if extent[0] < 1e-6 or extent[1] < 1e-6:  # a line scan: order along it
        spacing = float(max(extent)) / max(n - 1, 1)
    strip = max(math.sqrt(batch_size) * spacing, 1e-9)
    offset = rng.uniform(0, strip)
    row = np.floor((positions[:, 0] - low[0] + offset) / strip).astype(np.int64)
    x = positions[:, 1] - low[1]
    serpentine = np.where(row % 2 == 0, x, -x)
    order = np.lexsort((serpentine, row))
    groups = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    for index in rng.permutation(len(groups)):
        yield np.sort(groups[index])


def epoch_batches(
    positions_px: np.ndarray, batch_size: int, kind: str, seed: int, epoch: int
) -> Iterator[np.ndarray]:
    """Position indices of each step of one epoch (batch_size already resolved)."""
    n = len(positions_px)
    if is_full_batch(batch_size) or batch_size >= n:
        yield np.arange(n)
    elif kind == "local":
        yield from local_batches(positions_px, batch_size, seed, epoch)
    else:
        yield from random_batches(n, batch_size, seed, epoch)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Position indices of each step of one epoch: full batch (batch_size <= 0 or >= n), or
    a shuffle drawn from (seed, epoch)."""
    if batch_size <= 0 or batch_size >= n:
        yield np.arange(n)
        return
    yield from random_batches(n, batch_size, seed, epoch)


def validation_split(
    positions_px: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) position indices, sorted: every k-th position along a serpentine
    through rows of the scan (k = 1 / fraction, the first one drawn from the seed), so the
    held-out positions spread evenly over the field and each sits among training neighbours
    that constrain the object under it. fraction 0: all positions train."""
    positions = np.asarray(positions_px, dtype=np.float64)
    n = len(positions)
    if fraction <= 0 or n < 4:
        return np.arange(n), np.arange(0)
    step = max(round(1.0 / fraction), 2)
    low, high = positions.min(axis=0), positions.max(axis=0)
    extent = np.maximum(high - low, 1e-9)
    spacing = math.sqrt(float(extent[0] * extent[1]) / n) if extent.min() > 1e-6 else 1.0
    row = np.floor((positions[:, 0] - low[0]) / max(spacing, 1e-9)).astype(np.int64)
    x = positions[:, 1] - low[1]
    order = np.lexsort((np.where(row % 2 == 0, x, -x), row))
    start = int(np.random.default_rng([seed, 2]).integers(step))
    held = np.zeros(n, dtype=bool)
    held[order[start::step]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def validation_pixels(
    frame_shape: tuple[int, int],
    fraction: float,
    seed: int,
    bad_pixels: np.ndarray | None = None,
    block: int = 1,
) -> np.ndarray:
    """Detector pixels held out for `train.validation_on = "pixels"`: a bool (Ny, Nx) mask,
    the same for every frame, of `fraction` of the usable (not bad) pixels, drawn from the seed
    as whole `block` x `block` squares of a grid tiling the detector (bad pixels inside a
    chosen square stay bad, not held out). Random squares spread over the whole detector, so
    every spatial frequency band keeps held-out pixels; fraction 0: none."""
    ny, nx = (int(s) for s in frame_shape)
    held = np.zeros((ny, nx), dtype=bool)
    if fraction <= 0:
        return held
    usable = np.ones((ny, nx), bool) if bad_pixels is None else ~np.asarray(bad_pixels, bool)
    block = max(int(block), 1)
    by, bx = -(-ny // block), -(-nx // block)  # grid of squares, the last ones clipped
    counts = np.add.reduceat(
        np.add.reduceat(usable.astype(np.int64), np.arange(0, ny, block), axis=0),
        np.arange(0, nx, block),
        axis=1,
    ).ravel()
    candidates = np.flatnonzero(counts > 0)
    order = np.random.default_rng([seed, 3]).permutation(candidates)
    # squares in random order until their usable pixels reach the share (at least one)
    target = max(fraction * float(counts.sum()), 1.0)
    taken = int(np.searchsorted(np.cumsum(counts[order]), target - 0.5) + 1)
    chosen = np.zeros(by * bx, dtype=bool)
    chosen[order[:taken]] = True
    grid = chosen.reshape(by, bx).repeat(block, axis=0).repeat(block, axis=1)
    return grid[:ny, :nx] & usable
