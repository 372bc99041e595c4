"""Which positions each step sees: full batch, random and spatially local mini-batches."""

from __future__ import annotations

import numpy as np
import pytest

from ptyinr.batching import epoch_batches, local_batches, random_batches, resolve_batch_size


def _raster(n: int, step: float = 9.0) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(n) * step, np.arange(n) * step, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def _extent(positions: np.ndarray) -> float:
    """Area of a batch's bounding box: what the object networks must evaluate."""
    span = positions.max(axis=0) - positions.min(axis=0)
    return float(np.prod(span + 1.0))


def test_auto_batch_size() -> None:
    assert resolve_batch_size("auto", 1024, 484) == 0
    assert resolve_batch_size("auto", 1024, 40401) == 64
    assert resolve_batch_size(32, 1024, 484) == 32
    assert resolve_batch_size(600, 1024, 484) == 0  # larger than the scan: full batch
    assert resolve_batch_size(0, 1024, 40401) == 0


@pytest.mark.parametrize("kind", ["local", "random"])
def test_every_position_once_per_epoch_and_reproducible(kind: str) -> None:
    positions = _raster(22)
    for epoch in range(3):
        steps = list(epoch_batches(positions, 64, kind, seed=5, epoch=epoch))
        assert all(len(b) <= 64 for b in steps)
        np.testing.assert_array_equal(np.sort(np.concatenate(steps)), np.arange(len(positions)))
        again = list(epoch_batches(positions, 64, kind, seed=5, epoch=epoch))
        assert all(np.array_equal(a, b) for a, b in zip(steps, again, strict=True))
    first = [b.tolist() for b in epoch_batches(positions, 64, kind, 5, 0)]
    assert first != [b.tolist() for b in epoch_batches(positions, 64, kind, 5, 1)]


def test_local_batches_are_compact() -> None:
    """A local batch covers a fraction of the area a random one does (the object networks'
    cost per step), and the tiling moves from epoch to epoch."""
    positions = _raster(22)
    local = [_extent(positions[b]) for b in local_batches(positions, 64, 0, 0)]
    shuffled = [_extent(positions[b]) for b in random_batches(len(positions), 64, 0, 0)]
    assert np.median(local) < 0.25 * np.median(shuffled)
    groups = {tuple(b) for b in local_batches(positions, 64, 0, 0)}
    assert groups != {tuple(b) for b in local_batches(positions, 64, 0, 1)}


def test_full_batch() -> None:
    positions = _raster(4)
    (only,) = list(epoch_batches(positions, 0, "local", 0, 0))
    np.testing.assert_array_equal(only, np.arange(16))
