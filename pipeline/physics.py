"""Far-field ptychography forward model and the scan geometry it runs on.

Conventions (README, "Data conventions"): exit = probe * object_patch; far field = orthonormal
FFT2 of the exit wave; predicted intensity = |far field|^2 with the zero frequency moved to the
frame centre. Everything in the hot path is complex64 and vectorised over scan positions.

Sub-pixel positions: each window is placed on the object's integer pixel grid at the nearest
whole pixel, and the remaining fraction (in [-0.5, 0.5)) is applied to the probe as an exact
Fourier-domain shift. The object is thus only ever needed at pixel centres (cheap to evaluate
once per pixel, shareable between overlapping windows) while positions keep their precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ptyinr.geometry import window_top_left


def far_field_intensity(exit_wave: torch.Tensor) -> torch.Tensor:
    """|FFT2(exit)|^2 (orthonormal), fftshifted so the zero frequency sits at the centre."""
    far = torch.fft.fft2(exit_wave, norm="ortho")
    intensity = far.real.square() + far.imag.square()
    return torch.fft.fftshift(intensity, dim=(-2, -1))


def fourier_shift(field: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift a (Ny, Nx) complex field by (B, 2) sub-pixel amounts: out[b](r) = field(r - s_b).

    Exact for band-limited, periodic fields; a focused probe is ~0 at the window edge, so the
    periodic wrap is harmless. Returns (B, Ny, Nx).
    """
    ny, nx = field.shape[-2:]
    spectrum = torch.fft.fft2(field)
    ky = torch.fft.fftfreq(ny, device=field.device, dtype=shifts.dtype)
    kx = torch.fft.fftfreq(nx, device=field.device, dtype=shifts.dtype)
    ramp_y = torch.exp(-2j * torch.pi * shifts[:, 0, None] * ky[None, :]).to(field.dtype)
    ramp_x = torch.exp(-2j * torch.pi * shifts[:, 1, None] * kx[None, :]).to(field.dtype)
    shifted = spectrum[None] * ramp_y[:, :, None] * ramp_x[:, None, :]
    return torch.fft.ifft2(shifted)


@dataclass(frozen=True)
class ScanGeometry:
    """Where each diffraction window lies on the reconstructed object's pixel grid.

    `origin_px` is the position (in the store's pixel frame) of object pixel [0, 0], so object
    pixel (i, j) has coordinate (origin + (i, j)) * pixel_size in the store's frame.
    """

    object_shape: tuple[int, int]
    window_shape: tuple[int, int]
    origin_px: tuple[int, int]
    top_left: np.ndarray  # (n, 2) int64, window corners on the object grid
    subpixel: np.ndarray  # (n, 2) float64, remaining fractional shift of the probe

    @classmethod
    def from_positions(
        cls,
        positions_px: np.ndarray,
        window_shape: tuple[int, int],
        padding_px: int = 0,
        round_positions: bool = False,
        object_shape: tuple[int, int] | None = None,
        origin_px: tuple[int, int] | None = None,
    ) -> ScanGeometry:
        """Lay windows out on the smallest object grid that holds them all (plus padding).

        A fixed `object_shape`/`origin_px` can be given so that several reconstructions of the
        same scan (e.g. FRC half-splits) share one grid.
        """
        corners = window_top_left(positions_px, window_shape)
        whole = np.floor(corners + 0.5)
        fraction = np.zeros_like(corners) if round_positions else corners - whole
        whole = whole.astype(np.int64)
        if origin_px is None:
            origin = whole.min(axis=0) - padding_px
        else:
            origin = np.asarray(origin_px, dtype=np.int64)
        top_left = whole - origin
        needed = top_left.max(axis=0) + np.asarray(window_shape) + padding_px
        if object_shape is None:
            shape = (int(needed[0]), int(needed[1]))
        else:
            shape = object_shape
            if (top_left < 0).any() or (needed - padding_px > np.asarray(shape)).any():
                raise ValueError(f"positions fall outside the given object grid {shape}")
        return cls(
            object_shape=shape,
            window_shape=(int(window_shape[0]), int(window_shape[1])),
            origin_px=(int(origin[0]), int(origin[1])),
            top_left=top_left,
            subpixel=fraction,
        )

    @property
    def n_positions(self) -> int:
        return int(self.top_left.shape[0])

    def window_flat_indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, Ny, Nx) flat indices into the object grid of every pixel of every window."""
        ny, nx = self.window_shape
        width = self.object_shape[1]
        tl = torch.as_tensor(self.top_left, device=device)
        rows = tl[:, 0, None] + torch.arange(ny, device=device)[None, :]
        cols = tl[:, 1, None] + torch.arange(nx, device=device)[None, :]
        return rows[:, :, None] * width + cols[:, None, :]

    def pixel_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Object pixel centres (y, x) in the store's pixel frame."""
        return (
            self.origin_px[0] + np.arange(self.object_shape[0], dtype=np.float64),
            self.origin_px[1] + np.arange(self.object_shape[1], dtype=np.float64),
        )

    def window_centres_on_grid(self) -> np.ndarray:
        """Window centres (y, x) in object-grid pixels (for the scanned-interior mask)."""
        half = np.array([self.window_shape[0] // 2, self.window_shape[1] // 2])
        return self.top_left + half + self.subpixel


def forward_intensity(
    probe: torch.Tensor,
    object_patches: torch.Tensor,
    subpixel: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted centred intensities (B, Ny, Nx) for a probe and the object under each window."""
    if subpixel is not None:
        probes = fourier_shift(probe, subpixel)
    else:
        probes = probe[None]
    return far_field_intensity(probes * object_patches)
