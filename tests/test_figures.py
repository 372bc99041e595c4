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


# --------------------------------------------------------------------------------------------
# layout, ticks, unwrapped phase, the evaluation figure (issue 15)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The Figure objects the module saves, with the saved path: to inspect the layout."""
    seen: list = []
    save = fg._save

    def spy(fig, outdir, name):
        path = save(fig, outdir, name)
        seen.append((fig, path))
        return path

    monkeypatch.setattr(fg, "_save", spy)
    return seen


def _white_border(path: Path) -> bool:
    """True when the outermost pixel rows and columns of a PNG are background: nothing
    drawn runs off the saved image."""
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    edges = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return bool(np.all(edges > 0.98))


@pytest.mark.parametrize(
    "shape, pixel_m, every", [((48, 48), 10e-9, True), ((80, 24), None, False)]
)
def test_image_figures_draw_everything_inside_the_figure(tmp_path, drawn, shape, pixel_m, every):
    """Colour-bar labels, axis labels, titles and tick labels all lie within the figure
    (they ran off the left and right edges of the phase figure before)."""
    rng = np.random.default_rng(2)
    values = np.exp(1j * rng.uniform(-3, 3, size=shape)) * rng.uniform(0.5, 1, size=shape)
    step = pixel_m or 1.0
    obj = xr.DataArray(
        values.astype(np.complex64),
        dims=("y", "x"),
        coords={"y": np.arange(shape[0]) * step, "x": np.arange(shape[1]) * step},
    )
    fg.save_object_figures(obj, tmp_path, title="a long title of a run", unwrap=every)
    if every:
        fg.save_probe_figure(values[:16, :16], tmp_path, pixel_size_m=pixel_m)
        fg.save_comparison_figure(obj, obj * np.exp(0.2j), tmp_path)
    assert len(drawn) == (5 if every else 2)
    for fig, path in drawn:
        renderer = fig.canvas.get_renderer()
        content = fig.get_tightbbox(renderer)  # inches, every drawn artist
        frame = fig.bbox_inches
        assert content.x0 >= frame.x0 and content.y0 >= frame.y0, path.name
        assert content.x1 <= frame.x1 and content.y1 <= frame.y1, path.name
        assert _white_border(path), path.name


@pytest.mark.parametrize("epochs", [2, 7])
def test_loss_figure_epoch_ticks_are_whole_numbers(tmp_path, drawn, epochs):
    loss = xr.DataArray(
        np.linspace(1.0, 0.1, epochs), dims="epoch", coords={"epoch": np.arange(1, epochs + 1)}
    )
    fg.save_loss_figure(loss, tmp_path)
    ((fig, path),) = drawn
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2
    assert all(float(t).is_integer() for t in ticks), ticks
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(s.lstrip("−-").isdigit() for s in labels), labels
    assert _white_border(path)


def test_unwrapped_phase_of_a_wrapped_ramp_is_the_ramp(tmp_path):
    yy, xx = np.mgrid[:40, :64]
    ramp = 0.35 * xx + 0.2 * yy  # 25 rad across: wraps about four times
    values = 0.8 * np.exp(1j * ramp)
    wrapped = np.angle(values)
    assert np.ptp(wrapped) < 2 * math.pi  # what the plain phase figure shows
    got = fg.unwrapped_phase(values)
    np.testing.assert_allclose(got, ramp - ramp.mean(), atol=1e-9)
    # masked pixels come back as NaN, the rest is still the ramp
    mask = np.zeros(ramp.shape, bool)
    mask[10:14, 20:30] = True
    got = fg.unwrapped_phase(values, mask=mask)
    assert np.isnan(got[mask]).all()
    keep = ~mask
    np.testing.assert_allclose(got[keep], ramp[keep] - ramp[keep].mean(), atol=1e-9)
    # asked for, the object figures include it; not asked for, they do not
    plain = fg.save_object_figures(_object(), tmp_path / "plain")
    unwrapped = fg.save_object_figures(_object(), tmp_path / "unwrapped", unwrap=True)
    assert [p.name for p in plain] == ["amplitude.png", "phase.png"]
    assert [p.name for p in unwrapped] == ["amplitude.png", "phase.png", "phase_unwrapped.png"]
    _assert_png(unwrapped[-1])


def test_run_evaluation_writes_the_comparison_figure(tmp_path):
    """The pipeline step behind `ptyinr evaluate`: scores and comparison.png. A "run" whose
    object and probe are the ground truth itself scores perfectly."""
    from ptyinr import store
    from ptyinr.simulate import SimulationConfig, write_simulated_store

    sim = SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3)
    path = write_simulated_store(tmp_path / "scan.zarr", sim)
    ds = store.open_scan_store(path)
    truth = ds["true_object"].load().rename(true_object_y="y", true_object_x="x")
    run = xr.Dataset(
        {"object": truth, "probe": ds["true_probe"].load(), "loss": ("epoch", [1.0, 0.5])},
        coords={"epoch": [1, 2]},
    )
    store.write_run(path, "truth", run, attrs={"origin_px": [0, 0], "known_probe": True})
    store.mark_run(path, "truth", "complete")
    evaluation, paths = fg.save_run_evaluation(path, "truth", tmp_path / "figs")
    assert [p.name for p in paths] == ["comparison.png"]
    _assert_png(paths[0])
    assert evaluation.scores["relative_error"] < 1e-5
    assert evaluation.scores["probe_relative_error"] < 1e-5
    assert evaluation.mask.any() and not evaluation.mask.all()  # the scanned interior
    with pytest.raises(InputError, match="no run 'nope'"):
        fg.save_run_evaluation(path, "nope", tmp_path / "figs")
