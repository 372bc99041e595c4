"""Tests of ptyinr.figures: each figure is written as a real, non-trivial PNG."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ptyinr import evaluate as ev
from ptyinr import figures as fg
from ptyinr.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the file is a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.is_file()
    width, height = _png_size(path)
    assert width >= 300 and height >= 300
    assert path.stat().st_size >= min_bytes  # a blank canvas compresses to far less


def _object(n: int = 48, pixel_m: float | None = 10e-9) -> xr.DataArray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n] / n
    amp = 0.7 + 0.3 * np.sin(6 * yy) * np.cos(4 * xx) + 0.02 * rng.normal(size=(n, n))
    obj = (amp * np.exp(1j * (2.0 * yy + np.sin(9 * xx)))).astype(np.complex64)
    step = pixel_m if pixel_m is not None else 1.0
    return xr.DataArray(
        obj, dims=("y", "x"), coords={"y": np.arange(n) * step, "x": np.arange(n) * step}
    )


def test_object_figures(tmp_path):
    paths = fg.save_object_figures(_object(), tmp_path / "figs", prefix="run1_", title="run1")
    assert [p.name for p in paths] == ["run1_amplitude.png", "run1_phase.png"]
    for p in paths:
        _assert_png(p)
    # pixel units (no geometry) and a plain array work too
    paths = fg.save_object_figures(_object(pixel_m=None), tmp_path / "px")
    assert [p.name for p in paths] == ["amplitude.png", "phase.png"]
    for p in paths:
        _assert_png(p)
    fg.save_object_figures(np.asarray(_object().values), tmp_path / "arr")
    _assert_png(tmp_path / "arr" / "phase.png")


def test_object_figure_rejects_nan(tmp_path):
    obj = _object()
    obj[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fg.save_object_figures(obj, tmp_path)
    assert not (tmp_path / "amplitude.png").exists()


def test_probe_figure(tmp_path):
    n = 32
    yy, xx = np.mgrid[:n, :n] - n / 2
    probe = np.exp(-(yy**2 + xx**2) / 40.0) * np.exp(1j * 0.05 * (yy**2 + xx**2))
    (path,) = fg.save_probe_figure(probe, tmp_path, pixel_size_m=10e-9)
    assert path.name == "probe.png"
    _assert_png(path)
    da = xr.DataArray(probe, dims=("probe_y", "probe_x"))
    (path,) = fg.save_probe_figure(da, tmp_path / "da")
    _assert_png(path)


def test_loss_figure(tmp_path):
    epochs = np.arange(50)
    loss = xr.DataArray(np.exp(-epochs / 10) + 1e-3, dims="epoch", coords={"epoch": epochs})
    (path,) = fg.save_loss_figure(loss, tmp_path)
    assert path.name == "loss.png"
    _assert_png(path, min_bytes=5_000)
    with pytest.raises(InputError):
        fg.save_loss_figure(np.zeros((2, 2)), tmp_path)
    # with the held-out loss of a validated run: more drawn, same file name
    validation = {"epochs": [10, 20, 30], "loss": [0.5, 0.3, None], "best_epoch": 20,
                  "returned": "best"}  # fmt: skip
    (with_validation,) = fg.save_loss_figure(loss, tmp_path / "v", validation=validation)
    assert with_validation.name == "loss.png"
    assert with_validation.stat().st_size > path.stat().st_size


def test_frc_figure_with_and_without_crossing(tmp_path):
    rng = np.random.default_rng(1)
    n = 64
    spec = np.fft.fft2(rng.normal(size=(n, n)))
    k = np.fft.fftfreq(n)
    spec[np.hypot(k[:, None], k[None, :]) > 0.2] = 0
    signal = np.fft.ifft2(spec).real
    signal /= signal.std()
    a = signal + 0.3 * rng.normal(size=signal.shape)
    b = signal + 0.3 * rng.normal(size=signal.shape)
    ds = ev.frc(a, b, pixel_size=10e-9)
    assert math.isfinite(ds.attrs["resolution"])
    (path,) = fg.save_frc_figure(ds, tmp_path)
    assert path.name == "frc.png"
    _assert_png(path, min_bytes=5_000)
    (path,) = fg.save_frc_figure(ev.frc(signal, signal), tmp_path, prefix="same_")
    _assert_png(path, min_bytes=5_000)
    with pytest.raises(InputError, match="missing"):
        fg.save_frc_figure(ds.drop_vars("frc"), tmp_path)


def test_comparison_figure(tmp_path):
    truth = _object(56)
    est = truth.isel(y=slice(4, 52), x=slice(4, 52)) * np.exp(0.3j)
    mask = np.zeros(est.shape, bool)
    mask[8:40, 8:40] = True
    (path,) = fg.save_comparison_figure(est, truth, tmp_path, mask=mask)
    assert path.name == "comparison.png"
    _assert_png(path)
