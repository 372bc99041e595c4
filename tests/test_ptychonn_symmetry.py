"""Training pairs under the probe's symmetries (ptychonn_data.apply_symmetry,
probe_symmetries, augment_pairs): checked against the physics with a hand-made FFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptyinr.ptychonn_data import (
    SYMMETRIES,
    apply_symmetry,
    augment_pairs,
    probe_symmetries,
)

N = 16


def gaussian_probe(sigma_y: float, sigma_x: float, shift_x: int = 0) -> np.ndarray:
    """A focused-looking probe with a curved phase, centred on pixel N // 2 (+ shift_x)."""
    y, x = np.mgrid[:N, :N] - N // 2
    x = x - shift_x
    envelope = np.exp(-(y**2) / (2 * sigma_y**2) - x**2 / (2 * sigma_x**2))
    return (envelope * np.exp(0.05j * (y**2 + x**2))).astype(np.complex64)


def measured(probe: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """Far-field intensity by numpy: zero frequency at pixel N // 2."""
    return np.abs(np.fft.fftshift(np.fft.fft2(probe * patch, norm="ortho"))) ** 2


@pytest.mark.parametrize("symmetry", SYMMETRIES)
def test_a_symmetric_probe_turns_a_transformed_patch_into_the_transformed_frame(
    symmetry,
) -> None:
    rng = np.random.default_rng(1)
    probe = gaussian_probe(2.5, 2.5)
    patch = np.exp(0.8j * rng.standard_normal((N, N))) * rng.uniform(0.5, 1, (N, N))
    frame = torch.as_tensor(measured(probe, patch))
    moved_patch = apply_symmetry(torch.as_tensor(patch), symmetry).numpy()
    expected = apply_symmetry(frame, symmetry).numpy()
    np.testing.assert_allclose(measured(probe, moved_patch), expected, rtol=1e-4, atol=1e-6)


def test_the_eight_symmetries_are_distinct_and_the_identity_comes_first() -> None:
    image = torch.arange(N * N, dtype=torch.float32).reshape(N, N)
    moved = {tuple(apply_symmetry(image, g).flatten().tolist()) for g in SYMMETRIES}
    assert len(moved) == 8
    assert torch.equal(apply_symmetry(image, SYMMETRIES[0]), image)


def test_probe_symmetries_are_those_the_probe_has() -> None:
    assert len(probe_symmetries([gaussian_probe(2.5, 2.5)])) == 8
    # elongated along y: the flips and the half turn, no transposes
    elongated = probe_symmetries([gaussian_probe(4.0, 2.0)])
    assert len(elongated) == 4 and not any(t for t, _, _ in elongated)
    # two pixels off the centre along x: only the flip of the rows keeps it
    assert probe_symmetries([gaussian_probe(2.5, 2.5, shift_x=2)]) == [SYMMETRIES[0], SYMMETRIES[2]]
    # every probe must have it: a round one and an elongated one share four
    assert len(probe_symmetries([gaussian_probe(2.5, 2.5), gaussian_probe(4.0, 2.0)])) == 4
    assert probe_symmetries([np.ones((N, N + 2), np.complex64)]) == [SYMMETRIES[0]]


def test_augmented_pairs_move_frame_labels_and_weights_together() -> None:
    rng = np.random.default_rng(0)
    x = torch.rand(64, 1, N, N)
    labels = [torch.rand(64, N, N) for _ in range(3)]
    batch = (x, *labels)
    assert augment_pairs(batch, [SYMMETRIES[0]], rng) is batch
    out = augment_pairs(batch, list(SYMMETRIES), rng)
    changed = 0
    for j in range(64):
        # one symmetry per pair, the same for all four tensors
        g = [s for s in SYMMETRIES if torch.equal(apply_symmetry(x[j, 0], s), out[0][j, 0])]
        assert len(g) == 1
        for before, after in zip(labels, out[1:], strict=True):
            assert torch.equal(apply_symmetry(before[j], g[0]), after[j])
        changed += g[0] != SYMMETRIES[0]
    assert changed > 32  # drawn, not always the identity
    assert torch.equal(batch[0], x)  # the inputs are not modified
