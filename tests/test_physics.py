"""Forward model and scan geometry against independent NumPy computations.

The references here are written from the README's data conventions, not from the engine's code:
exit = P(r - p) * O(r) on the window whose centre pixel (index N // 2) sits at the position,
far field = orthonormal FFT2, intensity = |far|^2 with the zero frequency at the frame centre.
Patches are cut with a Python loop (fine in a test; the engine must not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptyinr.physics import ScanGeometry, far_field_intensity, forward_intensity, fourier_shift


def _random_complex(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def _numpy_intensity(exit_wave: np.ndarray) -> np.ndarray:
    """|FFT2|^2 (orthonormal), zero frequency moved to the centre, in float64."""
    far = np.fft.fft2(exit_wave.astype(np.complex128), norm="ortho")
    return np.fft.fftshift(np.abs(far) ** 2)


def _engine_patches(obj: np.ndarray, geometry: ScanGeometry) -> torch.Tensor:
    index = geometry.window_flat_indices()
    return torch.as_tensor(obj).reshape(-1)[index]


# ------------------------------------------------------------------------------ forward model


@pytest.mark.parametrize("window", [(16, 16), (12, 10), (15, 15)])
def test_forward_model_matches_numpy_loop(window):
    """Integer positions, non-square and odd windows: loop-and-numpy reference."""
    rng = np.random.default_rng(1)
    ny, nx = window
    obj = _random_complex(rng, (40, 44))
    probe = _random_complex(rng, window)
    # window centres (pixel N // 2) chosen so every window lies inside the object
    positions = np.stack(
        [
            rng.integers(ny // 2, 40 - ny + ny // 2 + 1, 9),
            rng.integers(nx // 2, 44 - nx + nx // 2 + 1, 9),
        ],
        axis=1,
    ).astype(np.float64)
    geometry = ScanGeometry.from_positions(
        positions, window, object_shape=obj.shape, origin_px=(0, 0)
    )
    got = forward_intensity(torch.as_tensor(probe), _engine_patches(obj, geometry)).numpy()

    expected = []
    for cy, cx in positions.astype(int):
        top, left = cy - ny // 2, cx - nx // 2
        expected.append(_numpy_intensity(probe * obj[top : top + ny, left : left + nx]))
    expected = np.asarray(expected)
    assert got.shape == (len(positions), ny, nx)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * expected.max())


@pytest.mark.parametrize("n", [16, 15])
def test_zero_frequency_at_frame_centre(n):
    """A flat exit wave puts all its energy on pixel (N // 2, N // 2), for even and odd N."""
    exit_wave = torch.ones((1, n, n), dtype=torch.complex64)
    intensity = far_field_intensity(exit_wave)[0].numpy()
    assert np.unravel_index(np.argmax(intensity), intensity.shape) == (n // 2, n // 2)
    assert intensity[n // 2, n // 2] == pytest.approx(n * n, rel=1e-5)  # orthonormal: |N|^2
    assert intensity.sum() - intensity[n // 2, n // 2] < 1e-3


def test_energy_is_conserved_with_orthonormal_fft():
    rng = np.random.default_rng(2)
    exit_wave = torch.as_tensor(_random_complex(rng, (5, 16, 12)))
    intensity = far_field_intensity(exit_wave)
    np.testing.assert_allclose(
        intensity.sum(dim=(-2, -1)).numpy(),
        exit_wave.abs().square().sum(dim=(-2, -1)).numpy(),
        rtol=1e-5,
    )


def test_hot_path_is_complex64():
    rng = np.random.default_rng(3)
    probe = torch.as_tensor(_random_complex(rng, (8, 8)))
    patches = torch.as_tensor(_random_complex(rng, (3, 8, 8)))
    shifts = torch.tensor([[0.2, -0.3], [0.0, 0.1], [-0.5, 0.4]], dtype=torch.float32)
    shifted = fourier_shift(probe, shifts)
    assert shifted.dtype == torch.complex64
    assert forward_intensity(probe, patches, shifts).dtype == torch.float32
    # float64 shifts must not promote the probe to complex128
    assert fourier_shift(probe, shifts.double()).dtype == torch.complex64


# ------------------------------------------------------------------------------ Fourier shift


def test_fourier_shift_by_integers_is_np_roll():
    rng = np.random.default_rng(4)
    field = _random_complex(rng, (12, 10))
    shifts = torch.tensor([[3.0, 0.0], [0.0, -2.0], [-5.0, 7.0]])
    got = fourier_shift(torch.as_tensor(field), shifts).numpy()
    for b, (sy, sx) in enumerate(shifts.numpy().astype(int)):
        np.testing.assert_allclose(got[b], np.roll(field, (sy, sx), axis=(0, 1)), atol=2e-5)


def _band_limited(ny: int, nx: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A periodic, band-limited complex function (no Nyquist term), evaluated anywhere."""
    terms = [(1.0 + 0.5j, 1, 0), (0.7, 0, 2), (-0.4j, 3, -1), (0.3 - 0.2j, -2, 4), (0.25, 0, 0)]
    return sum(c * np.exp(2j * np.pi * (ky * y / ny + kx * x / nx)) for c, ky, kx in terms)


def test_fourier_shift_subpixel_matches_analytic_function():
    ny, nx = 16, 12
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    field = _band_limited(ny, nx, yy, xx).astype(np.complex64)
    shifts = np.array([[0.3, -0.45], [-0.5, 0.25], [1.7, 0.0]])
    got = fourier_shift(torch.as_tensor(field), torch.as_tensor(shifts, dtype=torch.float32))
    for b, (sy, sx) in enumerate(shifts):
        expected = _band_limited(ny, nx, yy - sy, xx - sx)  # out(r) = field(r - s)
        np.testing.assert_allclose(got[b].numpy(), expected, atol=1e-5)


def test_subpixel_forward_model_matches_continuous_probe():
    """Exit wave = P(r - p) O(r) with P evaluated analytically at the exact offset.

    The probe is band-limited and periodic on the window, so the engine's Fourier shift is
    exact and the only way to disagree is a wrong sign, axis, or window placement.
    """
    n = 16
    rng = np.random.default_rng(5)
    obj = _random_complex(rng, (48, 48))

    def probe_at(t_y: np.ndarray, t_x: np.ndarray) -> np.ndarray:  # t = offset from the centre
        return _band_limited(n, n, t_y, t_x)

    k = np.arange(n)
    probe_array = probe_at(*np.meshgrid(k - n // 2, k - n // 2, indexing="ij")).astype(np.complex64)
    positions = np.array([[20.3, 24.7], [17.5, 30.0], [25.0, 19.49], [22.0, 23.0]])
    geometry = ScanGeometry.from_positions(
        positions, (n, n), object_shape=obj.shape, origin_px=(0, 0)
    )
    got = forward_intensity(
        torch.as_tensor(probe_array),
        _engine_patches(obj, geometry),
        torch.as_tensor(geometry.subpixel, dtype=torch.float32),
    ).numpy()

    for b, (py, px) in enumerate(positions):
        top = int(np.floor(py - n // 2 + 0.5))  # nearest whole-pixel window
        left = int(np.floor(px - n // 2 + 0.5))
        ry, rx = np.meshgrid(top + k, left + k, indexing="ij")  # object pixels under the window
        exit_wave = probe_at(ry - py, rx - px) * obj[ry, rx]
        expected = _numpy_intensity(exit_wave)
        np.testing.assert_allclose(got[b], expected, rtol=1e-3, atol=1e-4 * expected.max())


# ------------------------------------------------------------------------------ geometry


def test_integer_positions_have_no_subpixel_part():
    positions = np.array([[10.0, 12.0], [14.0, 12.0], [10.0, 20.0]])
    g = ScanGeometry.from_positions(positions, (8, 8))
    assert np.all(g.subpixel == 0)
    assert g.origin_px == (6, 8)  # min window corner: (10 - 4, 12 - 4)
    np.testing.assert_array_equal(g.top_left, [[0, 0], [4, 0], [0, 8]])
    assert g.object_shape == (4 + 8, 8 + 8)  # smallest grid holding every window
    assert g.n_positions == 3


def test_subpixel_positions_split_into_whole_and_fraction():
    positions = np.array([[10.3, 12.7], [10.5, 12.49], [9.5, 11.0]])
    g = ScanGeometry.from_positions(positions, (8, 8))
    assert np.all(g.subpixel >= -0.5) and np.all(g.subpixel < 0.5)
    corner_on_store = np.asarray(g.origin_px) + g.top_left + g.subpixel
    np.testing.assert_allclose(corner_on_store, positions - 4, atol=1e-12)
    # nearest whole pixel: 6.3 -> 6 (+0.3), 8.7 -> 9 (-0.3)
    np.testing.assert_allclose(g.subpixel[0], [0.3, -0.3], atol=1e-12)


def test_round_positions_drops_the_fraction():
    positions = np.array([[10.3, 12.7], [11.6, 12.2]])
    g = ScanGeometry.from_positions(positions, (8, 8), round_positions=True)
    assert np.all(g.subpixel == 0)
    corner_on_store = np.asarray(g.origin_px) + g.top_left
    np.testing.assert_array_equal(corner_on_store, np.round(positions) - 4)


@pytest.mark.parametrize("n", [8, 9])
def test_window_centre_pixel_sits_on_the_position(n):
    """README's conventions: a position is the coordinate of the window's pixel (N // 2, N // 2)."""
    positions = np.array([[20.0, 31.0], [25.0, 22.0], [27.25, 30.6]])
    g = ScanGeometry.from_positions(positions, (n, n), padding_px=3)
    ys, xs = g.pixel_coordinates()
    for b in range(2):  # integer positions: the centre pixel's store coordinate is the position
        cy, cx = g.top_left[b] + n // 2
        assert (ys[cy], xs[cx]) == tuple(positions[b])
    np.testing.assert_allclose(g.window_centres_on_grid() + g.origin_px, positions, atol=1e-12)


def test_padding_grows_the_grid_on_every_side():
    positions = np.array([[10.0, 10.0], [14.0, 18.0]])
    plain = ScanGeometry.from_positions(positions, (8, 8))
    padded = ScanGeometry.from_positions(positions, (8, 8), padding_px=2)
    assert padded.object_shape == (plain.object_shape[0] + 4, plain.object_shape[1] + 4)
    assert padded.origin_px == (plain.origin_px[0] - 2, plain.origin_px[1] - 2)
    np.testing.assert_array_equal(padded.top_left, plain.top_left + 2)


def test_shared_grid_for_subsets():
    """Half-split reconstructions share one grid: same origin, same shape, same windows."""
    rng = np.random.default_rng(6)
    positions = rng.uniform(10, 30, size=(20, 2))
    full = ScanGeometry.from_positions(positions, (8, 8), padding_px=1)
    half = ScanGeometry.from_positions(
        positions[::2], (8, 8), object_shape=full.object_shape, origin_px=full.origin_px
    )
    assert half.object_shape == full.object_shape and half.origin_px == full.origin_px
    np.testing.assert_array_equal(half.top_left, full.top_left[::2])
    np.testing.assert_array_equal(half.subpixel, full.subpixel[::2])
    with pytest.raises(ValueError, match="outside"):
        ScanGeometry.from_positions(
            positions + 50, (8, 8), object_shape=full.object_shape, origin_px=full.origin_px
        )


def test_window_flat_indices_cover_each_window():
    positions = np.array([[6.0, 7.0], [9.0, 12.0]])
    g = ScanGeometry.from_positions(positions, (4, 6), padding_px=1)
    index = g.window_flat_indices().numpy()
    height, width = g.object_shape
    assert index.shape == (2, 4, 6)
    for b in range(2):
        rows, cols = np.unravel_index(index[b], (height, width))
        top, left = g.top_left[b]
        np.testing.assert_array_equal(rows, top + np.arange(4)[:, None] + 0 * cols)
        np.testing.assert_array_equal(cols, left + np.arange(6)[None, :] + 0 * rows)
