"""train.validation_on = "pixels": a share of the detector pixels held out of every frame.

The training never sees them (perturbing the measured values there leaves a fit unchanged,
for ptyinr, pixels and epie), the held-out loss is the data term on exactly them at every
position (against an independent numpy computation), the run records it, and on a sparse
scan (-100 % overlap: each position's object pixels seen by it alone) it picks a state close
to the best one the fit passes through, where holding out positions cannot.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from tiny import TINY_MODEL

from ptyinr import evaluate
from ptyinr.batching import validation_pixels
from ptyinr.config import load_config
from ptyinr.engines.pixels import PixelEngine
from ptyinr.engines.ptychonn import PtychoNNEngine
from ptyinr.errors import ConfigError
from ptyinr.launch import build_engine
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = [*TINY_MODEL, "train.device=cpu", "train.loss=gaussian", "train.validation_fraction=0.1"]
METHODS = {
    "ptyinr": ["model.method=ptyinr"],
    "pixels": ["model.method=pixels", "train.lr_object=1e-2", "train.lr_probe=1e-2"],
    "epie": ["model.method=epie"],
}


@pytest.fixture(scope="module")
def sim() -> dict:
    return simulate_scan(
        SimulationConfig(object_size=32, probe_size=16, focus_fwhm_px=3, overlap=0.3)
    )


def bad_pixels() -> np.ndarray:
    bad = np.zeros((16, 16), bool)
    bad[2, 3] = bad[9, 9] = bad[15, 0] = True
    return bad


def test_held_out_pixels_are_a_spread_seeded_share_of_the_usable_ones():
    bad = np.zeros((64, 64), bool)
    bad[10:20, 30:34] = True
    held = validation_pixels((64, 64), 0.1, seed=0, bad_pixels=bad)
    usable = int((~bad).sum())
    assert abs(int(held.sum()) - 0.1 * usable) <= 1 and not (held & bad).any()
    # spread: every 16 x 16 quarter-tile of the detector holds some
    tiles = held.reshape(4, 16, 4, 16).sum(axis=(1, 3))
    assert tiles.min() >= 3
    assert np.array_equal(validation_pixels((64, 64), 0.1, 0, bad), held)  # reproducible
    assert not np.array_equal(validation_pixels((64, 64), 0.1, 1, bad), held)
    assert not validation_pixels((64, 64), 0.0, 0).any()
    # blocks: whole aligned 4 x 4 squares (bad pixels inside stay out)
    blocks = validation_pixels((64, 64), 0.1, 0, bad, block=4)
    squares = blocks | (
        bad & blocks.reshape(16, 4, 16, 4).any(axis=(1, 3)).repeat(4, 0).repeat(4, 1)
    )
    per_square = squares.reshape(16, 4, 16, 4).sum(axis=(1, 3))
    assert set(np.unique(per_square).tolist()) <= {0, 16}
    assert abs(int(blocks.sum()) - 0.1 * usable) <= 16


def perturbed(intensities: np.ndarray, where: np.ndarray, seed: int) -> np.ndarray:
    """The frames with the values at `where` (every frame) scaled by random factors."""
    out = np.array(intensities, dtype=np.float32, copy=True)
    factors = np.random.default_rng(seed).uniform(0.3, 3.0, size=(len(out), int(where.sum())))
    out[:, where] *= factors.astype(np.float32)
    return out


def fitted(sim: dict, intensities: np.ndarray, method: str, epochs: int = 2):
    data = ScanData(intensities, sim["positions_px"], bad_pixels=bad_pixels())
    cfg = load_config(
        overrides=[*BASE, *METHODS[method], f"train.epochs={epochs}", "train.validation_on=pixels"]
    )
    engine = build_engine(data, cfg)
    engine.fit(progress=False)
    return engine


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_never_sees_the_held_out_pixels(sim, method):
    reference = fitted(sim, sim["intensities"], method)
    held = reference.held_out_pixels
    assert held is not None and held.any() and not (held & bad_pixels()).any()
    # every position trains (nothing held out by position)
    assert len(reference.training_positions) == len(sim["positions_px"])
    hidden = fitted(sim, perturbed(sim["intensities"], held, 1), method)
    np.testing.assert_array_equal(hidden.current_object(), reference.current_object())
    np.testing.assert_array_equal(hidden.current_probe(), reference.current_probe())
    assert hidden.loss_history == reference.loss_history
    # ... but their held-out loss does see them
    assert hidden.validation.losses != reference.validation.losses
    # the control: the same perturbation on as many trained pixels changes the fit
    trained = np.zeros_like(held)
    trained.flat[np.flatnonzero(~held & ~bad_pixels())[: int(held.sum())]] = True
    seen = fitted(sim, perturbed(sim["intensities"], trained, 1), method)
    assert not np.array_equal(seen.current_object(), reference.current_object())


@pytest.mark.parametrize("method", ["ptyinr", "epie"])
def test_the_held_out_loss_is_the_data_term_on_exactly_the_held_out_pixels(sim, method):
    engine = fitted(sim, sim["intensities"], method, epochs=1)
    held = engine.held_out_pixels
    everything = np.arange(len(sim["positions_px"]))
    value = engine.validation_loss(everything)
    resident = engine.measured.resident.clone()
    # unchanged by the trained pixels' values, changed by the held-out ones'
    for where, changes in ((~held, False), (held, True)):
        frames = perturbed(sim["intensities"], where, 2)
        frames[:, bad_pixels()] = 0
        amplitude = np.sqrt(np.clip(frames, 0, None) / engine.measured.scale)
        engine.measured.resident = torch.as_tensor(amplitude)
        assert (engine.validation_loss(everything) != value) == changes
    engine.measured.resident = resident
    assert engine.validation_loss(everything) == value
    # independently: the Gaussian amplitude term, mean over the held-out pixels of all
    # frames, the amplitudes sqrt(I / max I) with the max over the trained pixels only
    predicted = np.stack([predicted_intensity(engine, i) for i in everything])
    frames = np.asarray(sim["intensities"], np.float64)
    frames[:, bad_pixels()] = 0
    scale = frames[:, ~held & ~bad_pixels()].max()
    amplitude = np.sqrt(np.clip(frames, 0, None) / scale)
    expected = np.mean(2.0 * (np.sqrt(predicted + 1e-12) - amplitude)[:, held] ** 2)
    assert value == pytest.approx(expected, rel=1e-4)


def predicted_intensity(engine, i: int) -> np.ndarray:
    """|FFT(probe shifted to position i x object patch)|^2, centred, in numpy (float64)."""
    ny, nx = engine.geometry.window_shape
    y, x = (int(v) for v in engine.geometry.top_left[i])
    probe = np.asarray(engine.current_probe(), np.complex128)
    dy, dx = engine.geometry.subpixel[i]
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    probe = np.fft.ifft2(np.fft.fft2(probe) * np.exp(-2j * np.pi * (ky * dy + kx * dx)))
    patch = np.asarray(engine.current_object(), np.complex128)[y : y + ny, x : x + nx]
    far = np.fft.fftshift(np.fft.fft2(probe * patch, norm="ortho"))
    return np.abs(far) ** 2


def test_the_run_records_what_was_held_out(sim):
    data = ScanData(sim["intensities"], sim["positions_px"], bad_pixels=bad_pixels())
    overrides = [*BASE, *METHODS["pixels"], "train.epochs=2"]
    result = build_engine(
        data, load_config(overrides=[*overrides, "train.validation_on=pixels"])
    ).fit(progress=False)
    record = result.info["validation"]
    usable = 16 * 16 - 3
    assert record["on"] == "pixels" and abs(record["pixels"] - 0.1 * usable) <= 1
    assert record["positions"] == len(sim["positions_px"]) and record["block"] == 1
    assert record["epochs"] == [1, 2] and len(record["loss"]) == 2
    by_position = build_engine(data, load_config(overrides=overrides)).fit(progress=False)
    assert by_position.info["validation"]["on"] == "positions"
    assert "pixels" not in by_position.info["validation"]


def test_methods_without_pixel_validation_refuse_it(sim):
    data = ScanData(sim["intensities"], sim["positions_px"])
    cfg = load_config(overrides=[*BASE, "train.validation_on=pixels"])
    with pytest.raises(ConfigError, match=r"validation_on = 'pixels'.*'ptychonn'"):
        PtychoNNEngine.pixel_split(data, cfg)
    bad = np.array([[True, True], [True, False]])
    tiny = ScanData(np.ones((4, 2, 2), np.float32), np.zeros((4, 2)), bad_pixels=bad)
    with pytest.raises(ConfigError, match=r"holds out 1 of the 1 usable detector pixels"):
        PixelEngine.pixel_split(tiny, cfg)


def test_on_a_sparse_scan_pixel_validation_picks_a_state_near_the_oracle_best():
    """Pixel engine, 64 x 64 object, 32 x 32 frames, -100 % overlap (36 positions, each
    object pixel under one position's probe only), Poisson counts (alpha 10), unknown probe,
    150 epochs, patience 10. Measured (one torch thread): pixels -> returns 0.268, the
    oracle's best over the whole run 0.267; positions -> 0.473 (stopped at epoch 16, best at
    6: a held-out position's object is trained by no one, so its loss rises from the start).
    Limits: within 0.03 of the oracle; 0.1 better than positions."""
    sim = simulate_scan(
        SimulationConfig(
            object_size=64,
            probe_size=32,
            focus_fwhm_px=3,
            overlap=-1.0,
            noise="poisson",
            alpha=10.0,
        )
    )
    data = ScanData(sim["intensities"], sim["positions_px"])
    truth = xr.DataArray(
        sim["object"], dims=("ty", "tx"), coords={"ty": range(64), "tx": range(64)}
    )
    base = [
        "train.device=cpu",
        "train.threads=1",
        *METHODS["pixels"],
        "train.loss=gaussian",
        "train.epochs=150",
        "train.validation_fraction=0.1",
    ]

    def run(*overrides: str) -> tuple[float, dict[int, float], dict]:
        engine = build_engine(data, load_config(overrides=[*base, *overrides]))
        interior = evaluate.scanned_interior(
            engine.geometry.object_shape, engine.geometry.window_centres_on_grid()
        )
        errors: dict[int, float] = {}

        def score(epoch: int, _loss: float) -> None:
            errors[epoch] = error(engine.result().object)

        def error(obj: xr.DataArray) -> float:
            compared = evaluate.compare_object(obj, truth, mask=interior, remove_ramp=True)
            return float(compared["relative_error"])

        result = engine.fit(progress=False, on_epoch=score)
        return error(result.object), errors, result.info["validation"]

    _, whole, _ = run("train.validation_on=pixels", "train.patience=0")
    oracle = min(whole.values())
    by_pixels, _, record = run("train.validation_on=pixels", "train.patience=10")
    by_positions, _, _ = run("train.validation_on=positions", "train.patience=10")
    print(f"oracle {oracle:.3f} pixels {by_pixels:.3f} positions {by_positions:.3f}")
    assert record["on"] == "pixels" and record["returned"] in ("best", "last")
    assert by_pixels <= oracle + 0.03
    assert by_pixels <= by_positions - 0.1


def test_held_out_pixels_set_no_statistic_streamed_or_resident(sim):
    """The intensity scale, mean pattern and mean energy ignore the held-out pixels (as bad
    ones), read from memory or streamed alike; their amplitudes are read as measured."""
    from ptyinr.runtime.frames import Measurements

    data = ScanData(sim["intensities"], sim["positions_px"], bad_pixels=bad_pixels())
    held = validation_pixels((16, 16), 0.1, 0, bad_pixels())
    frames = np.where(bad_pixels() | held, 0, np.asarray(sim["intensities"], np.float64))
    cpu = torch.device("cpu")
    resident = Measurements(data, cpu, stream=False, held_out=held)
    streamed = Measurements(data, cpu, stream=True, held_out=held)
    everything = np.arange(len(sim["positions_px"]))
    for measured in (resident, streamed):
        assert measured.scale == pytest.approx(frames.max(), rel=1e-6)
        np.testing.assert_allclose(measured.mean_pattern, frames.mean(axis=0), rtol=1e-5)
        assert measured.mean_energy == pytest.approx(
            frames.sum(axis=(1, 2)).mean() / frames.max(), rel=1e-5
        )
        assert torch.equal(measured.valid, torch.as_tensor(~bad_pixels() & ~held))
        assert torch.equal(measured.validation_valid, torch.as_tensor(held))
        amplitude = measured.amplitude(torch.as_tensor(everything), everything).numpy()
        raw = np.asarray(sim["intensities"], np.float64)[:, held]
        np.testing.assert_allclose(amplitude[:, held], np.sqrt(raw / frames.max()), rtol=1e-5)
        measured.close()
    plain = Measurements(data, cpu, stream=False)
    assert torch.equal(plain.validation_valid, plain.valid)


def test_refit_after_pixel_validation_fits_every_pixel(sim, monkeypatch):
    """train.refit with validation_on = pixels: the result is a plain fit of the chosen
    number of epochs on all pixels of all positions."""
    data = ScanData(sim["intensities"], sim["positions_px"])
    overrides = [*BASE, *METHODS["pixels"], "train.validation_fraction=0"]
    cfg = load_config(
        overrides=[
            *overrides,
            "train.epochs=5",
            "train.validation_fraction=0.1",
            "train.validation_on=pixels",
            "train.patience=2",
            "train.refit=true",
        ]
    )
    engine = build_engine(data, cfg)
    scripted = iter([3.0, 1.0, 2.0, 5.0, 6.0])
    monkeypatch.setattr(engine, "validation_loss", lambda p: next(scripted))
    result = engine.fit(progress=False)
    record = result.info["validation"]
    assert record["on"] == "pixels" and record["returned"] == "refit"
    assert result.info["refit"]["epochs"] == 2
    direct = build_engine(data, load_config(overrides=[*overrides, "train.epochs=2"]))
    assert direct.held_out_pixels is None
    expected = direct.fit(progress=False).object.values
    np.testing.assert_allclose(result.object.values, expected, rtol=1e-5, atol=1e-6)
