"""evaluate.dose_map: expected photons per object pixel, checked against hand sums."""

from __future__ import annotations

import numpy as np
import pytest

from ptyinr import evaluate
from ptyinr.errors import InputError
from ptyinr.physics import ScanGeometry


def _delta(size: int = 5, at: tuple[int, int] = (2, 2)) -> np.ndarray:
    probe = np.zeros((size, size), dtype=np.complex64)
    probe[at] = 3.0 + 4.0j  # |P|^2 = 25: the normalisation must remove it
    return probe


def test_delta_probe_puts_all_photons_on_one_pixel() -> None:
    dose = evaluate.dose_map(_delta(), np.array([[4, 7]]), (20, 20), np.array([123.0]))
    assert dose[6, 9] == pytest.approx(123.0)
    assert np.count_nonzero(dose) == 1


def test_overlapping_positions_add() -> None:
    probe = np.ones((4, 4))  # each pixel of a window gets 1/16 of the frame's photons
    dose = evaluate.dose_map(probe, np.array([[0, 0], [2, 2]]), (8, 8), np.array([16.0, 32.0]))
    assert dose[0, 0] == pytest.approx(1.0)  # first window only
    assert dose[3, 3] == pytest.approx(1.0 + 2.0)  # both windows
    assert dose[5, 5] == pytest.approx(2.0)  # second window only
    assert dose[6, 6] == 0.0  # neither
    assert dose[0, 4] == 0.0


def test_total_is_the_sum_of_frame_photons_when_windows_are_inside() -> None:
    rng = np.random.default_rng(1)
    probe = rng.normal(size=(6, 6)) + 1j * rng.normal(size=(6, 6))
    corners = rng.integers(0, 30 - 6 + 1, size=(40, 2))
    photons = rng.uniform(0, 500, size=40)
    dose = evaluate.dose_map(probe, corners, (30, 30), photons)
    assert dose.sum() == pytest.approx(photons.sum(), rel=1e-12)
    assert dose.min() >= 0.0


def test_window_partly_outside_is_clipped_by_its_share() -> None:
    probe = np.arange(1.0, 17.0).reshape(4, 4)
    weight = probe**2 / np.sum(probe**2)
    # corner (-1, 6) on an 8 x 8 object: row 0 and columns 2-3 of the window fall outside
    dose = evaluate.dose_map(probe, np.array([[-1, 6]]), (8, 8), np.array([1000.0]))
    inside = weight[1:, :2].sum()
    assert dose.sum() == pytest.approx(1000.0 * inside, rel=1e-12)
    assert dose[0, 6] == pytest.approx(1000.0 * weight[1, 0])
    assert dose[2, 7] == pytest.approx(1000.0 * weight[3, 1])
    # a window wholly outside adds nothing and is no error
    far = evaluate.dose_map(probe, np.array([[20, 20]]), (8, 8), np.array([5.0]))
    assert not far.any()


def test_float_corners_follow_the_physics_windows() -> None:
    """Float corners land where ScanGeometry puts the window (nearest whole pixel)."""
    probe = _delta(size=4, at=(0, 0))
    positions = np.array([[5.4, 5.6], [9.5, 8.49]])  # window centres; corner = centre - 2
    geometry = ScanGeometry.from_positions(
        positions, (4, 4), object_shape=(16, 16), origin_px=(0, 0)
    )
    corners = positions - 2.0
    photons = np.array([1.0, 2.0])
    from_floats = evaluate.dose_map(probe, corners, (16, 16), photons)
    from_geometry = evaluate.dose_map(probe, geometry.top_left, (16, 16), photons)
    np.testing.assert_array_equal(from_floats, from_geometry)
    assert from_floats[3, 4] == 1.0  # (3.4, 3.6) -> (3, 4)
    assert from_floats[8, 6] == 2.0  # (7.5, 6.49) -> (8, 6)


@pytest.mark.parametrize(
    ("probe", "corners", "shape", "photons", "words"),
    [
        (np.ones(4), [[0, 0]], (8, 8), [1.0], "probe of shape"),
        (np.zeros((4, 4)), [[0, 0]], (8, 8), [1.0], "sums to 0"),
        (np.full((4, 4), np.nan), [[0, 0]], (8, 8), [1.0], "probe contains NaN"),
        (np.ones((4, 4)), [[0, 0, 0]], (8, 8), [1.0], "top_left of shape"),
        (np.ones((4, 4)), np.zeros((0, 2)), (8, 8), [], "top_left of shape"),
        (np.ones((4, 4)), [[np.inf, 0]], (8, 8), [1.0], "top_left contains"),
        (np.ones((4, 4)), [[0, 0]], (8,), [1.0], "object_shape"),
        (np.ones((4, 4)), [[0, 0]], (8, 0), [1.0], "object_shape"),
        (np.ones((4, 4)), [[0, 0], [1, 1]], (8, 8), [1.0], "expected (2,)"),
        (np.ones((4, 4)), [[0, 0]], (8, 8), [-1.0], "expected finite values >= 0"),
        (np.ones((4, 4)), [[0, 0]], (8, 8), [np.nan], "expected finite values >= 0"),
    ],
)
def test_bad_input_is_refused(probe, corners, shape, photons, words) -> None:
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        evaluate.dose_map(probe, np.asarray(corners), shape, np.asarray(photons))
