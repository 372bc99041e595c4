"""The engine seam: the registry by name, what an engine resolves, checkpoints that never run
code, and fixed-seed results unchanged by the move of the trainer behind the protocol.

tests/data/fixed_seed_reference.npz holds the results of the trainer before it became
`engines.ptyinr` (commit 2423331), made by the cases below with one torch thread:
`fit(ScanData(sim["intensities"], sim["positions_px"]), load_config(overrides=CASES[name]))`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from tiny import TINY_MODEL

from ptyinr.batching import validation_split
from ptyinr.config import load_config
from ptyinr.engines import ENGINES, get_engine
from ptyinr.engines.base import checkpoint_epoch
from ptyinr.engines.checkpoint import UnreadableCheckpoint, load_state
from ptyinr.engines.pixels import PixelEngine
from ptyinr.errors import ConfigError, InputError
from ptyinr.launch import build_engine, fit
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFERENCE = Path(__file__).parent / "data" / "fixed_seed_reference.npz"
CASES = {
    "ptyinr": [*TINY_MODEL, "train.epochs=6", "train.device=cpu"],
    "ptyinr_minibatch": [*TINY_MODEL, "train.epochs=3", "train.device=cpu", "train.batch_size=40"],
    "pixels": [
        *TINY_MODEL,
        "train.epochs=6",
        "train.device=cpu",
        "model.object=pixels",
        "model.probe=pixels",
        "train.lr_object=1e-2",
        "train.lr_probe=1e-2",
    ],
}


@pytest.fixture(scope="module")
def sim() -> dict:
    return simulate_scan(
        SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3)
    )


def data_of(sim: dict) -> ScanData:
    return ScanData(sim["intensities"], sim["positions_px"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_seed_results_match_the_trainer_before_the_move(sim, case):
    reference = np.load(REFERENCE)
    result = fit(data_of(sim), load_config(overrides=CASES[case]), progress=False)
    np.testing.assert_allclose(result.loss.values, reference[f"{case}_loss"], rtol=1e-4)
    for part in ("object", "probe"):
        expected = reference[f"{case}_{part}"]
        got = getattr(result, part).values
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected), part


def test_the_pixels_method_is_the_pixel_representations(sim):
    """model.method = pixels runs what model.object = model.probe = pixels ran before."""
    reference = np.load(REFERENCE)
    overrides = [o for o in CASES["pixels"] if not o.startswith(("model.object", "model.probe"))]
    cfg = load_config(overrides=[*overrides, "model.method=pixels"])
    assert cfg.model.object == "siren"  # as written; the engine pins its representations
    engine = build_engine(data_of(sim), cfg)
    assert isinstance(engine, PixelEngine)
    assert (engine.config.model.object, engine.config.model.probe) == ("pixels", "pixels")
    result = engine.fit(progress=False)
    assert result.info["method"] == "pixels"
    np.testing.assert_allclose(result.loss.values, reference["pixels_loss"], rtol=1e-4)


def test_registry_names_each_engine_and_refuses_unknown_methods():
    for name in ENGINES:
        assert get_engine(name).name == name
    with pytest.raises(ConfigError, match=r"model.method = 'nope'.*epie.*pixels.*ptyinr"):
        get_engine("nope")
    with pytest.raises(ConfigError, match=r"model\.method"):
        load_config(overrides=["model.method=Not A Name"])


def test_checkpoints_resume_and_never_unpickle_code(sim, tmp_path, capsys):
    constant = [*CASES["ptyinr"], "train.lr_schedule=constant"]  # the same rates at 2 or 4
    cfg = load_config(overrides=[*constant, "train.epochs=4"])
    whole = fit(data_of(sim), cfg, progress=False)
    engine = build_engine(data_of(sim), load_config(overrides=[*constant, "train.epochs=2"]))
    engine.fit(progress=False)
    path = tmp_path / "ckpt"
    engine.save_checkpoint(path)
    assert checkpoint_epoch(path) == 2
    assert (path / "zarr.json").is_file() and not list(path.rglob("*.pt"))
    resumed = build_engine(data_of(sim), cfg).fit(checkpoint_path=path, progress=False)
    np.testing.assert_allclose(resumed.loss.values, whole.loss.values, rtol=1e-5)
    assert "checkpoint_discarded" not in resumed.info

    # a pickle planted where a checkpoint would be: refused, never run, the run starts over
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = tmp_path / "planted"
    planted.write_bytes(pickle.dumps({"state": Payload(), "epoch": 1}, protocol=2))
    with pytest.raises(UnreadableCheckpoint, match=r"planted.*not a readable ptyinr checkpoint"):
        load_state(planted)
    fresh = build_engine(data_of(sim), cfg).fit(checkpoint_path=planted, progress=False)
    assert not marker.exists()
    assert "planted" in fresh.info["checkpoint_discarded"]
    assert "starting over" in capsys.readouterr().err
    np.testing.assert_allclose(fresh.loss.values, whole.loss.values, rtol=1e-5)  # from scratch
    assert checkpoint_epoch(planted) == 0

    # a truncated one (an array lost): the same
    (path / "t0" / "zarr.json").unlink()
    again = build_engine(data_of(sim), cfg).fit(checkpoint_path=path, progress=False)
    assert "ckpt" in again.info["checkpoint_discarded"]


def test_a_checkpoint_in_a_store_is_a_node_of_the_store(sim, tmp_path, recwarn):
    import warnings

    import zarr

    from ptyinr.reconstruct import checkpoint_path

    root = tmp_path / "scan.zarr"
    zarr.open_group(str(root), mode="w")
    path = checkpoint_path(root, "run1", "half_a")
    engine = build_engine(data_of(sim), load_config(overrides=[*CASES["ptyinr"], "train.epochs=1"]))
    engine.save_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Zarr warns about folders that are not its nodes
        members = dict(zarr.open_group(str(root), mode="r").members(max_depth=None))
    assert "checkpoints/run1/half_a" in members
    assert checkpoint_epoch(path) == 0 and load_state(path)["engine"] == "ptyinr"


def test_a_checkpoint_of_another_method_is_refused(sim, tmp_path):
    path = tmp_path / "ckpt"
    pixels = load_config(overrides=[*CASES["pixels"], "train.epochs=1", "model.method=pixels"])
    build_engine(data_of(sim), pixels).save_checkpoint(path)
    other = load_config(overrides=[*CASES["pixels"], "train.epochs=2"])
    with pytest.raises(InputError, match=r"model\.method = 'pixels'"):
        build_engine(data_of(sim), other).fit(checkpoint_path=path, progress=False)


def test_an_engine_without_data_parallel_training_refuses_ranks(sim):
    cfg = load_config(overrides=[*CASES["pixels"], "model.method=epie", "train.epochs=1"])
    with pytest.raises(InputError, match=r"'epie' does not train data-parallel"):
        fit(data_of(sim), cfg, world_size=2, progress=False)


# ------------------------------------------------------------------ held-out validation


def test_validation_split_spreads_held_out_positions_over_the_scan():
    side = np.arange(20) * 3.0
    positions = np.stack(np.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
    training, held = validation_split(positions, 0.1, seed=0)
    assert len(held) == 40 and len(training) == 360
    assert np.array_equal(np.sort(np.concatenate([training, held])), np.arange(400))
    # spread: every 5 x 5 block of the 20 x 20 raster holds one or two held-out positions
    rows, cols = held // 20, held % 20
    counts = np.zeros((4, 4), int)
    np.add.at(counts, (rows // 5, cols // 5), 1)
    assert counts.min() >= 1 and counts.max() <= 4
    assert np.array_equal(validation_split(positions, 0.1, seed=0)[1], held)  # reproducible
    assert not np.array_equal(validation_split(positions, 0.1, seed=3)[1], held)
    assert len(validation_split(positions, 0.0, seed=0)[1]) == 0


@pytest.mark.parametrize("method", ["ptyinr", "epie"])
def test_held_out_positions_are_never_trained_and_the_best_state_is_returned(
    sim, method, monkeypatch
):
    cfg = load_config(
        overrides=[
            *CASES["ptyinr"],
            f"model.method={method}",
            "train.epochs=8",
            "train.validation_fraction=0.1",
            "train.patience=2",
        ]
    )
    engine = build_engine(data_of(sim), cfg)
    held = set(engine.validation_positions.tolist())
    assert held and not held & set(engine.training_positions.tolist())
    seen: set[int] = set()
    if method == "ptyinr":
        step = engine.train_step
        monkeypatch.setattr(
            engine, "train_step", lambda b, full: (seen.update(b.tolist()), step(b, full))[1]
        )
    else:
        order = engine.sweep_order
        monkeypatch.setattr(engine, "sweep_order", lambda e: (o := order(e), seen.update(o))[0])
    # a held-out loss that improves twice, then worsens: the state of epoch 2 comes back
    scripted = iter([3.0, 1.0, 2.0, 5.0, 6.0, 7.0])
    real = engine.validation_loss
    measured: list[float] = []
    monkeypatch.setattr(
        engine, "validation_loss", lambda p: (measured.append(real(p)), next(scripted))[1]
    )
    states: dict[int, np.ndarray] = {}
    result = engine.fit(
        progress=False, on_epoch=lambda e, _: states.__setitem__(e, engine.current_object())
    )
    assert seen and not seen & held  # trained on the training positions only
    record = result.info["validation"]
    assert record["epochs"] == [1, 2, 3, 4] and record["best_epoch"] == 2
    assert record["stopped_early"] and record["returned"] == "best"
    assert result.info["epochs"] == 4  # patience 2: stopped after two worse validations
    np.testing.assert_array_equal(result.object.values, states[2])
    assert all(np.isfinite(measured)) and len(measured) == 4


def test_validation_is_resumed_from_a_checkpoint(sim, tmp_path):
    overrides = [*CASES["ptyinr"], "train.lr_schedule=constant", "train.validation_fraction=0.1"]
    whole = fit(data_of(sim), load_config(overrides=[*overrides, "train.epochs=4"]), progress=False)
    first = build_engine(data_of(sim), load_config(overrides=[*overrides, "train.epochs=2"]))
    first.fit(progress=False)
    path = tmp_path / "ckpt"
    first.save_checkpoint(path)
    cfg = load_config(overrides=[*overrides, "train.epochs=4"])
    resumed = build_engine(data_of(sim), cfg).fit(checkpoint_path=path, progress=False)
    a, b = whole.info["validation"], resumed.info["validation"]
    assert a["epochs"] == b["epochs"] == [1, 2, 3, 4] and a["best_epoch"] == b["best_epoch"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)


@pytest.mark.parametrize("method", ["ptyinr", "epie"])
def test_refit_fits_all_positions_from_the_start_for_the_chosen_epochs(sim, method, monkeypatch):
    """train.refit: validation chooses epoch 2; the result is then exactly a fit on all
    positions for 2 epochs (same seed, same probe start), with the validated run's record."""
    overrides = [*CASES["ptyinr"], f"model.method={method}", "train.epochs=6"]
    cfg = load_config(
        overrides=[
            *overrides,
            "train.validation_fraction=0.1",
            "train.patience=2",
            "train.refit=true",
        ]
    )
    engine = build_engine(data_of(sim), cfg)
    scripted = iter([3.0, 1.0, 2.0, 5.0, 6.0, 7.0])
    monkeypatch.setattr(engine, "validation_loss", lambda p: next(scripted))
    result = engine.fit(progress=False)
    record = result.info["validation"]
    assert record["best_epoch"] == 2 and record["returned"] == "refit"
    refit = result.info["refit"]
    assert refit["epochs"] == 2 and refit["positions"] == sim["positions_px"].shape[0]
    assert refit["from"] == "start" and len(refit["loss"]) == 2
    assert len(result.loss.values) == result.info["epochs"] == 4  # the validated run's curve
    direct = fit(
        data_of(sim), load_config(overrides=[*overrides, "train.epochs=2"]), progress=False
    )
    np.testing.assert_allclose(refit["loss"], direct.loss.values, rtol=1e-5)
    for part in ("object", "probe"):
        expected = getattr(direct, part).values
        got = getattr(result, part).values
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), part


def test_refit_without_held_out_positions_is_a_plain_fit(sim):
    overrides = [*CASES["ptyinr"], "train.epochs=2"]
    plain = fit(data_of(sim), load_config(overrides=overrides), progress=False)
    refit = fit(
        data_of(sim), load_config(overrides=[*overrides, "train.refit=true"]), progress=False
    )
    assert "refit" not in refit.info
    np.testing.assert_array_equal(plain.object.values, refit.object.values)
