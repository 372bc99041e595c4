"""Training: convergence on tiny clean scans, reproducibility, batches, resume, failures.

Thresholds were measured on this machine (torch 2.13 CPU, one thread) and set with margin:
known probe (SIREN 1 x 64, 100 epochs): object relative error 0.049-0.060 and a loss 21-27x
lower over seeds 0-2 (limits 0.1 and 10x); unknown probe (300 epochs): 0.037-0.043 and 18-21x
over seeds 0, 2, 3 (limits 0.1 and 10x). Seed 1 of the unknown-probe case stalls at 0.31: the
hash-grid probe's warm start (ProbeField.fit_to) ends at 26 % error for that initialisation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from tiny import TINY_MODEL

from ptyinr import evaluate
from ptyinr.batching import batches
from ptyinr.config import load_config
from ptyinr.engines.base import checkpoint_epoch
from ptyinr.errors import InputError, ReconstructionFailed
from ptyinr.launch import build_engine, fit
from ptyinr.physics import ScanGeometry
from ptyinr.scandata import Reconstruction, ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan

# a constant learning rate: these tests check exact convergence at rates they choose
TINY = [
    *TINY_MODEL,
    "model.probe_init_steps=50",
    "train.device=cpu",
    "train.lr_schedule=constant",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sim() -> dict:
    """48 x 48 object, 16 x 16 probe, 225 positions (sub-pixel), clean."""
    return simulate_scan(
        SimulationConfig(object_size=48, probe_size=16, focus_fwhm_px=3, overlap=0.3)
    )


def config(*extra: str):
    return load_config(overrides=[*TINY, *extra])


def data_of(sim: dict, **kwargs) -> ScanData:
    return ScanData(sim["intensities"], sim["positions_px"], **kwargs)


def object_error(result: Reconstruction, sim: dict, known_probe: bool) -> float:
    """Relative complex error on the scanned interior (ramp removed when the probe was fitted)."""
    n = sim["object"].shape[0]
    truth = xr.DataArray(
        sim["object"],
        dims=("y", "x"),
        coords={"y": np.arange(n, dtype=float), "x": np.arange(n, dtype=float)},
    )
    interior = evaluate.scanned_interior(
        result.geometry.object_shape, result.geometry.window_centres_on_grid()
    )
    scores = evaluate.compare_object(
        result.object, truth, mask=interior, remove_ramp=not known_probe
    )
    return scores["relative_error"]


# ------------------------------------------------------------------------------ convergence


def test_known_probe_reconstruction_converges(sim):
    cfg = config("train.epochs=100", "model.siren_width=64", "train.lr_object=3e-3")
    result = fit(data_of(sim), cfg, known_probe=sim["probe"], progress=False)
    loss = result.loss.values
    assert loss[-1] < loss[0] / 10
    assert object_error(result, sim, known_probe=True) < 0.1
    assert result.info["known_probe"] is True


def test_unknown_probe_reconstruction_converges(sim):
    cfg = config(
        "train.seed=0",
        "train.epochs=300",
        "model.siren_width=64",
        "model.probe_init_steps=200",
        "train.lr_object=3e-3",
        "train.lr_probe=3e-3",
    )
    result = fit(data_of(sim), cfg, progress=False)
    loss = result.loss.values
    assert loss[-1] < loss[0] / 10
    assert object_error(result, sim, known_probe=False) < 0.1
    # the probe is found too (ramp and global phase removed)
    probe = evaluate.compare_probe(result.probe.values, sim["probe"], remove_ramp=True)
    assert probe["probe_relative_error"] < 0.05  # measured 0.010-0.012 (seeds 0, 2)


def test_pixel_object_with_known_probe_fits_exactly(sim):
    """The forward model of training is the simulator's: a free pixel grid reaches ~0 error."""
    cfg = config("model.object=pixels", "train.epochs=150", "train.lr_object=2e-2")
    result = fit(data_of(sim), cfg, known_probe=sim["probe"], progress=False)
    assert result.loss.values[-1] < 1e-4 * result.loss.values[0]  # measured 1e-6
    assert object_error(result, sim, known_probe=True) < 0.01  # measured 0.001


# ------------------------------------------------------------------------------ reproducibility


def _short(sim: dict, *extra: str) -> Reconstruction:
    return fit(
        data_of(sim), config("train.epochs=4", "train.batch_size=64", *extra), progress=False
    )


def test_same_seed_same_result_different_seed_different(sim):
    a = _short(sim, "train.seed=7")
    b = _short(sim, "train.seed=7")
    c = _short(sim, "train.seed=8")
    np.testing.assert_array_equal(a.object.values, b.object.values)
    np.testing.assert_array_equal(a.probe.values, b.probe.values)
    np.testing.assert_array_equal(a.loss.values, b.loss.values)
    assert not np.allclose(a.object.values, c.object.values)
    assert not np.allclose(a.loss.values, c.loss.values)


def test_batches_cover_every_position_once_per_epoch():
    n = 23
    for epoch in range(3):
        steps = list(batches(n, 5, seed=1, epoch=epoch))
        assert [len(s) for s in steps] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.sort(np.concatenate(steps)), np.arange(n))
    first = [s.tolist() for s in batches(n, 5, 1, 0)]
    assert first != [s.tolist() for s in batches(n, 5, 1, 1)]  # reshuffled each epoch
    assert first != [s.tolist() for s in batches(n, 5, 2, 0)]  # and per seed
    assert first == [s.tolist() for s in batches(n, 5, 1, 0)]  # but reproducibly
    assert [s.tolist() for s in batches(n, 0, 1, 0)] == [list(range(n))]  # full batch


def test_mini_batch_mode(sim):
    cfg = config(
        "model.object=pixels",
        "train.epochs=15",
        "train.batch_size=50",
        "train.lr_object=1e-2",
        "train.batches=random",
    )
    result = fit(data_of(sim), cfg, known_probe=sim["probe"], progress=False)
    n = len(sim["positions_px"])
    assert result.info["steps"] == 15 * math.ceil(n / 50)
    assert result.info["epochs"] == 15 and result.loss.sizes["epoch"] == 15
    assert result.loss.values[-1] < result.loss.values[0] / 5


# ------------------------------------------------------------------------------ checkpoints


class Interrupted(Exception):
    pass


def test_resume_from_checkpoint_matches_an_uninterrupted_run(sim, tmp_path):
    cfg = config(
        "train.epochs=10", "train.batch_size=100", "train.checkpoint_every=6"
    )  # 3 steps/epoch
    data = data_of(sim)
    uninterrupted = build_engine(data, cfg).fit(progress=False)

    ckpt = tmp_path / "run"

    def stop_at_7(epoch: int, loss: float) -> None:
        if epoch == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        build_engine(data, cfg).fit(checkpoint_path=ckpt, progress=False, on_epoch=stop_at_7)
    assert ckpt.exists()
    assert checkpoint_epoch(ckpt) == 6  # the last checkpoint before the stop

    seen: list[int] = []
    resumed = build_engine(data, cfg).fit(
        checkpoint_path=ckpt, progress=False, on_epoch=lambda e, _: seen.append(e)
    )
    assert seen == [7, 8, 9, 10]  # only the remaining epochs ran
    assert resumed.info["steps"] == uninterrupted.info["steps"] == 30
    np.testing.assert_allclose(resumed.loss.values, uninterrupted.loss.values, rtol=1e-5)
    np.testing.assert_allclose(
        resumed.object.values, uninterrupted.object.values, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        resumed.probe.values, uninterrupted.probe.values, rtol=1e-4, atol=1e-5
    )


def test_checkpoint_of_another_model_is_refused(sim, tmp_path):
    data = data_of(sim)
    ckpt = tmp_path / "run"
    trainer = build_engine(data, config("train.epochs=1"))
    trainer.fit(progress=False)
    trainer.save_checkpoint(ckpt)
    with pytest.raises(InputError, match="model"):
        build_engine(data, config("train.epochs=2", "model.siren_width=16")).fit(
            checkpoint_path=ckpt, progress=False
        )


# ------------------------------------------------------------------------------ failures


def test_nan_loss_raises_reconstruction_failed(sim):
    trainer = build_engine(data_of(sim), config("model.object=pixels", "train.epochs=5"))

    def diverge(epoch: int, loss: float) -> None:
        if epoch == 2:  # what a blown-up optimiser step leaves behind
            with torch.no_grad():
                trainer.object.real.fill_(float("nan"))

    with pytest.raises(ReconstructionFailed, match=r"step 3 \(epoch 3\)"):
        trainer.fit(progress=False, on_epoch=diverge)


def test_nan_in_data_raises_reconstruction_failed(sim):
    frames = sim["intensities"].copy()
    frames[3, 4, 5] = np.nan
    with pytest.raises(ReconstructionFailed, match="nan"):
        fit(ScanData(frames, sim["positions_px"]), config("train.epochs=2"), progress=False)


def test_bad_input_shapes_are_user_errors(sim):
    with pytest.raises(InputError, match="positions"):
        ScanData(sim["intensities"], sim["positions_px"][:-1])
    with pytest.raises(InputError, match="intensities"):
        ScanData(sim["intensities"][0], sim["positions_px"])
    with pytest.raises(InputError, match=r"\(8, 8\)"):
        build_engine(data_of(sim), config(), known_probe=np.ones((8, 8), np.complex64))
    with pytest.raises(InputError, match="bad-pixel mask"):
        ScanData(sim["intensities"], sim["positions_px"], bad_pixels=np.zeros((8, 8), bool))


def test_masked_pixels_do_not_influence_the_result(sim):
    """A hot and a dead detector pixel, masked: the result must not see them at all."""
    bad = np.zeros((16, 16), bool)
    bad[3, 5] = bad[12, 2] = True
    frames = sim["intensities"].copy()
    frames[:, 3, 5] = 1e3 * frames.max()
    frames[:, 12, 2] = np.nan
    cfg = config("train.epochs=3")
    clean = fit(data_of(sim, bad_pixels=bad), cfg, progress=False)
    hot = fit(ScanData(frames, sim["positions_px"], bad_pixels=bad), cfg, progress=False)
    np.testing.assert_allclose(hot.loss.values, clean.loss.values, rtol=1e-6)
    np.testing.assert_allclose(hot.object.values, clean.object.values, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ efficiency


def _window_pixel_set(geometry: ScanGeometry, batch: np.ndarray) -> set[tuple[int, int]]:
    ny, nx = geometry.window_shape
    pixels = set()
    for b in batch:
        top, left = geometry.top_left[b]
        pixels |= {(int(top + i), int(left + j)) for i in range(ny) for j in range(nx)}
    return pixels


@pytest.mark.parametrize("kind", ["siren", "hashgrid"])
def test_object_networks_see_only_the_batch_pixels(sim, kind):
    trainer = build_engine(data_of(sim), config(f"model.object={kind}", "train.batch_size=10"))
    seen: list[torch.Tensor] = []
    hooks = [
        net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        for net in (trainer.object.amplitude_net, trainer.object.phase_net)
    ]
    batch = np.array([0, 1, 2, 17, 40, 41, 100, 150, 151, 224])
    trainer.train_step(batch, full=False)
    for hook in hooks:
        hook.remove()

    expected = _window_pixel_set(trainer.geometry, batch)
    height, width = trainer.geometry.object_shape
    assert len(seen) == 2  # one pass per network per step
    for coords in seen:
        assert coords.shape[0] == len(expected) < height * width
        rows = torch.round(coords[:, 0] * (height - 1)).long().tolist()
        cols = torch.round(coords[:, 1] * (width - 1)).long().tolist()
        assert set(zip(rows, cols, strict=True)) == expected


def test_hot_path_runs_in_complex64(sim, monkeypatch):
    import ptyinr.engines.ptyinr as train_module

    dtypes = []
    real = train_module.far_field_intensity

    def spy(exit_wave: torch.Tensor) -> torch.Tensor:
        dtypes.append(exit_wave.dtype)
        return real(exit_wave)

    monkeypatch.setattr(train_module, "far_field_intensity", spy)
    trainer = build_engine(data_of(sim), config())
    trainer.train_step(np.arange(20), full=False)
    assert dtypes == [torch.complex64]
    assert trainer.object.full().dtype == torch.complex64


# ------------------------------------------------------------------------------ representations


@pytest.mark.parametrize("object_kind", ["siren", "hashgrid", "pixels"])
@pytest.mark.parametrize("probe_kind", ["hashgrid", "pixels", "known"])
def test_each_representation_runs(sim, object_kind, probe_kind):
    extra = [f"model.object={object_kind}", "train.epochs=3"]
    if probe_kind != "known":
        extra.append(f"model.probe={probe_kind}")
    known = sim["probe"] if probe_kind == "known" else None
    result = fit(data_of(sim), config(*extra), known_probe=known, progress=False)
    assert result.object.dtype == np.complex64 and result.probe.dtype == np.complex64
    assert np.all(np.isfinite(result.object.values)) and np.all(np.isfinite(result.probe.values))
    assert result.probe.shape == (16, 16) and result.loss.sizes["epoch"] == 3
    assert result.object.shape == result.geometry.object_shape
    assert result.loss.values[-1] < result.loss.values[0]


def test_result_coordinates_and_shared_grid(sim):
    pixel = (2e-8, 3e-8)
    data = data_of(sim, pixel_size=pixel)
    full = ScanGeometry.from_positions(data.positions_px, data.frame_shape, padding_px=2)
    half = data.subset(np.arange(0, len(sim["positions_px"]), 2))
    geometry = ScanGeometry.from_positions(
        half.positions_px,
        half.frame_shape,
        object_shape=full.object_shape,
        origin_px=full.origin_px,
    )
    result = fit(half, config("train.epochs=1"), geometry=geometry, progress=False)
    assert result.object.shape == full.object_shape
    ys, xs = full.pixel_coordinates()
    np.testing.assert_allclose(result.object["y"].values, ys * pixel[0])
    np.testing.assert_allclose(result.object["x"].values, xs * pixel[1])
    assert result.object["y"].attrs["units"] == "m"
    np.testing.assert_allclose(result.probe["probe_x"].values, (np.arange(16) - 8) * pixel[1])
    assert result.info["origin_px"] == list(full.origin_px)
