"""PtychoNN previews: the network, training pairs from a completed run, training, the
artifact, the `ptychonn` engine and `ptyinr nn`, on tiny simulated scans (one CPU thread)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from tiny import TINY_MODEL
from typer.testing import CliRunner

from ptyinr import store
from ptyinr.config import load_config
from ptyinr.errors import ConfigError, InputError
from ptyinr.models.ptychonn import (
    PtychoNN,
    PtychoNNSpec,
    check_compatible,
    load_artifact,
    network_input,
    parameter_count,
)
from ptyinr.physics import ScanGeometry
from ptyinr.ptychonn_data import (
    block_split,
    extract_patches,
    open_run_source,
    probe_weights,
    select_positions,
    stitch_patches,
    stitch_weights,
)
from ptyinr.ptychonn_train import TrainOptions, train_ptychonn
from ptyinr.reconstruct import reconstruct_store
from ptyinr.simulate import SimulationConfig, write_simulated_store

#: a tiny network: 16 x 16 frames, 8 channels, 2 levels (23 k parameters)
TINY_NN = dict(channels=8, depth=2, batch_size=16, lr=3e-3, threads=1, patience=0)
#: the trained network's held-out loss must be below this share of the mean patch's
MARGIN = 0.8

runner = CliRunner()


def _app():
    from ptyinr.cli.main import app

    return app


def invoke(*args: object):
    return runner.invoke(_app(), [str(a) for a in args], catch_exceptions=False)


def simulate(path: Path, probe_size: int = 16) -> Path:
    sim = SimulationConfig(object_size=40, probe_size=probe_size, focus_fwhm_px=3, overlap=0.3)
    return write_simulated_store(path, sim)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, object]:
    """A store with a completed PtyINR run `r1` (30 tiny epochs: structure to learn)."""
    torch.set_num_threads(1)
    path = simulate(tmp_path_factory.mktemp("pnn") / "scan.zarr")
    config = load_config(overrides=[*TINY_MODEL, "train.epochs=30", "train.device=cpu"])
    _, result = reconstruct_store(path, config, run_id="r1", progress=False)
    return path, result


@pytest.fixture(scope="module")
def model(source, tmp_path_factory) -> Path:
    path, _ = source
    out = tmp_path_factory.mktemp("models") / "model"
    options = TrainOptions(fraction=0.5, epochs=25, **TINY_NN)
    train_ptychonn([f"{path}:r1"], out, options, progress=False)
    return out


# ----------------------------------------------------------------------------- network


def test_default_network_is_the_original_size_and_outputs_the_full_window() -> None:
    net = PtychoNN(PtychoNNSpec(frame_shape=(64, 64)))
    assert 0.9e6 < parameter_count(net) < 1.5e6  # the original: about 1.2 M at 64 x 64
    for mode in ("crop", "bin"):
        spec = PtychoNNSpec(frame_shape=(128, 128), input_size=32, input_mode=mode, channels=4)
        x = network_input(torch.rand(2, 128, 128), spec, 1.0)
        assert x.shape == (2, 1, 32, 32)
        with torch.no_grad():
            amplitude, phase = PtychoNN(spec)(x)
        assert amplitude.shape == phase.shape == (2, 128, 128)
        assert float(amplitude.min()) >= 0 and float(phase.abs().max()) <= np.pi
    with pytest.raises(InputError, match="multiple of 2"):
        PtychoNNSpec(frame_shape=(64, 64), input_size=20)


def test_network_input_masks_scales_and_crops_around_the_zero_frequency() -> None:
    frames = torch.zeros(1, 8, 8)
    frames[0, 4, 4] = 6.0  # the zero frequency sits at N // 2
    frames[0, 0, 0] = 100.0  # outside the crop
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[4, 5] = False
    frames[0, 4, 5] = 50.0  # a bad pixel: zeroed
    spec = PtychoNNSpec(frame_shape=(8, 8), input_size=4, depth=2)
    x = network_input(frames, spec, 2.0, valid)
    assert x.shape == (1, 1, 4, 4)
    assert float(x[0, 0, 2, 2]) == 3.0 and float(x.sum()) == 3.0
    binned = network_input(frames, PtychoNNSpec((8, 8), 4, "bin", depth=2), 1.0, valid)
    assert float(binned.sum()) == pytest.approx((6.0 + 100.0) / 4)


# ------------------------------------------------------------------------ pairs, stitching


def test_stitching_exact_patches_returns_the_object() -> None:
    rng = np.random.default_rng(0)
    axis = np.arange(8, 33, 3.3)
    positions = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    geometry = ScanGeometry.from_positions(positions, (16, 16))
    shape = geometry.object_shape
    obj = (rng.uniform(0.5, 1, shape) * np.exp(1j * rng.uniform(-2, 2, shape))).astype(np.complex64)
    patches = extract_patches(obj, geometry.top_left, (16, 16))
    assert np.array_equal(patches[3], obj[tuple(slice(t, t + 16) for t in geometry.top_left[3])])
    probe = np.exp(-((np.arange(16) - 8.0) ** 2) / 20)[:, None] * np.ones(16)
    for weights in (probe_weights(probe), stitch_weights(probe)):
        stitched = stitch_patches(patches, geometry.top_left, shape, weights).numpy()
        np.testing.assert_allclose(stitched, obj, rtol=0, atol=1e-5)
    # pixels no window covers are filled with 1 (a transmission function)
    two = stitch_patches(patches[:1], geometry.top_left[:1], shape, probe_weights(probe)).numpy()
    assert two[-1, -1] == 1 and np.allclose(two[:16, :16], obj[:16, :16], atol=1e-6)


def test_beam_core_stitching_weights_keep_what_a_frame_can_tell() -> None:
    """A network's patch is right under its beam and shrinks to the mean patch away from it
    (what a frame does not show, it cannot predict): stitching with the beam-core weights
    (intensity cubed) recovers the object far better than intensity weights floored at 1 %."""
    rng = np.random.default_rng(1)
    axis = np.arange(8, 40, 2.5)
    positions = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    geometry = ScanGeometry.from_positions(positions, (16, 16))
    shape = geometry.object_shape
    obj = np.exp(1j * rng.uniform(-1, 1, shape)).astype(np.complex64)
    patches = extract_patches(obj, geometry.top_left, (16, 16))
    yy, xx = np.mgrid[:16, :16] - 8.0
    probe = np.exp(-(yy**2 + xx**2) / (2 * 1.7**2)).astype(np.complex64)  # 4 px FWHM focus
    trust = np.abs(probe) ** 2  # share of the truth in the prediction: the beam intensity
    predicted = patches * trust + (1 - trust) * patches.mean(axis=0)
    inner = (slice(10, shape[0] - 10), slice(10, shape[1] - 10))

    def error(weights: np.ndarray) -> float:
        out = stitch_patches(predicted, geometry.top_left, shape, weights).numpy()
        return float(np.abs(np.angle(out[inner] * np.conj(obj[inner]))).mean())

    old, new = error(probe_weights(probe)), error(stitch_weights(probe))
    assert new < 0.6 * old, (new, old)
    assert np.isclose(stitch_weights(probe).max(), 1) and stitch_weights(probe).min() > 0


def test_positions_are_spread_and_validation_is_held_out_by_blocks() -> None:
    positions = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0)), -1).reshape(-1, 2)
    chosen = select_positions(positions, 0.2, seed=0)
    assert 70 <= len(chosen) <= 90
    # spread: every quarter of the scan has its share
    quarter = (positions[chosen] >= 10).astype(int) @ [2, 1]
    assert np.bincount(quarter, minlength=4).min() >= 15
    assert len(select_positions(positions, 1.0, 0)) == 400
    train, val = block_split(positions, np.arange(400), 0.25, seed=1)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 400
    assert 0.15 < len(val) / 400 < 0.35
    # whole blocks: a validation position's nearest training position is a block edge away
    # on average, not a neighbour (random splits put one at distance 1 almost everywhere)
    d = np.sqrt(((positions[val][:, None] - positions[train][None]) ** 2).sum(-1)).min(1)
    assert d.mean() >= 1.4


def test_labels_are_the_run_object_under_the_physics_windows(source) -> None:
    path, result = source
    run = open_run_source(f"{path}:r1")
    np.testing.assert_array_equal(run.top_left, result.geometry.top_left)
    assert run.frame_shape == (16, 16) and run.pixel_size is not None and run.energy_ev > 0
    # phase ramp and offset removed: the labels' object equals the run's up to exp(i (g.r + c))
    obj = np.asarray(store.open_run(path, "r1")["object"].values)
    ratio = run.object * np.conj(obj)
    np.testing.assert_allclose(np.abs(run.object), np.abs(obj), rtol=1e-4, atol=1e-5)
    angle = np.angle(ratio / np.abs(ratio))
    yy, xx = np.mgrid[: obj.shape[0], : obj.shape[1]]
    design = np.stack([np.ones(obj.size), yy.ravel(), xx.ravel()], 1)
    coef = np.linalg.lstsq(design, np.unwrap(angle.ravel()), rcond=None)[0]
    residual = np.angle(np.exp(1j * (angle - (design @ coef).reshape(angle.shape))))
    assert np.abs(residual).max() < 1e-3


# ---------------------------------------------------------------------- training, artifact


def test_trained_network_beats_the_mean_training_patch_on_held_out_positions(model) -> None:
    record = json.loads((model / "record.json").read_text())
    held = record["scores"]["held_out"]
    assert held["positions"] >= 50  # the half of the scan it never saw
    assert held["loss"] < MARGIN * held["mean_patch_loss"], held
    validation = record["scores"]["validation"]
    assert validation["loss"] < validation["mean_patch_loss"]
    assert record["training"]["validation_positions"] > 0


def test_artifact_round_trips(model, source) -> None:
    path, _ = source
    artifact = load_artifact(model)
    record = artifact.record
    assert record["format_version"] == 2 and record["frame_shape"] == [16, 16]
    assert record["sources"][0]["run_id"] == "r1" and record["probe_from"].endswith(":r1")
    assert (model / "weights.safetensors").read_bytes()[:8]  # safetensors, no pickle
    np.testing.assert_array_equal(artifact.probe, store.open_run(path, "r1")["probe"].values)
    again = load_artifact(model)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        for a, b in zip(artifact.network(x), again.network(x), strict=True):
            assert torch.equal(a, b)


def test_training_is_seeded_and_refuses_runs_that_are_not_complete(source, tmp_path) -> None:
    path, _ = source
    options = TrainOptions(fraction=0.5, epochs=2, **{**TINY_NN, "channels": 4})
    a = train_ptychonn([f"{path}:r1"], tmp_path / "a", options, progress=False)
    b = train_ptychonn([f"{path}:r1"], tmp_path / "b", options, progress=False)
    assert a.record["weights_sha256"] == b.record["weights_sha256"]
    result = invoke("nn", "train", f"{path}:nope", "--out", tmp_path / "c", "-q")
    assert result.exit_code == 2 and "'reconstructions/nope' does not exist" in result.output
    assert not (tmp_path / "c").exists()


def test_corrupt_or_foreign_model_is_one_line(model, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("weights.safetensors", "record.json"):
        (bad / name).write_bytes((model / name).read_bytes())
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt") as err:
        load_artifact(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    (bad / "record.json").write_text("{not json")
    with pytest.raises(InputError, match=r"record\.json is corrupt"):
        load_artifact(bad)
    result = invoke("nn", "info", bad)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert invoke("nn", "info", tmp_path / "missing").exit_code == 2
    record = json.loads((model / "record.json").read_text())
    # a model of format 1 (no BatchNorm, phase not learned) is refused with what to do
    (bad / "record.json").write_text(json.dumps({**record, "format_version": 1}))
    with pytest.raises(InputError, match=r"format_version 1 \(decoders without BatchNorm.*retrain"):
        load_artifact(bad)
    energy = {"energy_ev": record["energy_ev"]}
    with pytest.raises(InputError, match="pixel size"):
        check_compatible(record, model, frame_shape=(16, 16), pixel_size=(2e-7, 2e-7), **energy)
    pixel, e = tuple(record["pixel_size_m"]), record["energy_ev"]
    with pytest.raises(InputError, match="eV"):
        check_compatible(record, model, frame_shape=(16, 16), pixel_size=pixel, energy_ev=8e3)
    near = tuple(p * 1.005 for p in pixel)  # within 1 %: fits
    check_compatible(record, model, frame_shape=(16, 16), pixel_size=near, energy_ev=1.005 * e)


# ----------------------------------------------------------------------- engine and CLI


def test_method_ptychonn_needs_a_model() -> None:
    from ptyinr.reconstruct import resolve_config

    with pytest.raises(ConfigError, match="ptychonn_model"):
        resolve_config(load_config(overrides=["model.method=ptychonn"]))


def test_incompatible_model_exits_2_and_writes_nothing(model, tmp_path: Path) -> None:
    other = simulate(tmp_path / "other.zarr", probe_size=32)  # frames of 32 x 32
    sets = ["model.method=ptychonn", f"model.ptychonn_model={model}", "train.device=cpu"]
    result = invoke("reconstruct", other, *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 2, result.output
    assert "trained on frames of 16 x 16" in result.output and result.output.count("\n") == 1
    assert not (other / "reconstructions").exists()
    assert store.list_runs(other) == []
    # the same check from metadata alone, for a front end's pre-flight
    from ptyinr.engines.ptychonn import PtychoNNEngine

    with pytest.raises(InputError, match=r"16 x 16, the scan .*other\.zarr.* has 32 x 32"):
        PtychoNNEngine.check_store(load_config(overrides=sets[:2]), other)


def test_train_then_preview_with_run_writes_a_normal_run_group(source, tmp_path: Path) -> None:
    path, _ = source
    out = tmp_path / "nn-model"
    tiny = "--fraction 0.5 --epochs 3 --channels 4 --depth 2 --threads 1 -q".split()
    result = invoke("nn", "train", f"{path}:r1", "--out", out, *tiny)
    assert result.exit_code == 0, result.output
    assert "positions" in invoke("nn", "info", out).output
    again = invoke("nn", "train", f"{path}:r1", "--out", out, "-q")
    assert again.exit_code == 2 and "exists" in again.output  # never replaced silently
    sets = ["model.method=ptychonn", f"model.ptychonn_model={out}", "train.device=cpu"]
    sets = [a for s in [*sets, "train.threads=1"] for a in ("--set", s)]
    local = ["--cluster", "local", "--workers", "1", "--run-id", "preview"]
    result = invoke("run", path, *sets, *local)
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(str(path), group="reconstructions/preview", consolidated=False)
    assert {"object", "probe", "loss", "frc"} <= set(ds.variables)
    assert ds.attrs["method"] == "ptychonn" and ds.attrs["status"] == "complete"
    assert ds.attrs["config"]["train"]["epochs"] == 1
    assert ds.attrs["ptychonn"]["sources"][0]["run_id"] == "r1"
    obj = ds["object"].values
    assert obj.shape == store.open_run(path, "r1")["object"].shape and np.isfinite(obj).all()
    assert np.isfinite(ds["loss"].values).all()


def test_preview_blocks_share_one_batch_shape_and_change_nothing(
    source, model, monkeypatch
) -> None:
    """Blocks of nearly equal size, the smaller padded: the network sees one batch shape (one
    set of oneDNN kernels per scan) and the preview is the one of a single block."""
    import ptyinr.engines.ptychonn as engine_module

    path, _ = source
    config = load_config(
        overrides=["model.method=ptychonn", f"model.ptychonn_model={model}", "train.device=cpu"]
    )
    _, whole = reconstruct_store(path, config, run_id="one-block", progress=False)
    shapes: list[int] = []
    prepare = engine_module.for_inference

    def recording(*args, **kwargs):
        predict = prepare(*args, **kwargs)

        def recorded(x):
            shapes.append(len(x))
            return predict(x)

        return recorded

    monkeypatch.setattr(engine_module, "for_inference", recording)
    monkeypatch.setattr(engine_module, "BLOCK", 7)
    _, blocked = reconstruct_store(path, config, run_id="blocks", progress=False)
    positions = len(whole.geometry.top_left)
    assert positions % 7 and len(shapes) == -(-positions // 7) and len(set(shapes)) == 1
    np.testing.assert_allclose(blocked.object.values, whole.object.values, atol=0.05)


def test_run_refuses_an_unreadable_model_before_anything_runs(source, tmp_path) -> None:
    """`ptyinr run` checks the engine's inputs up front: a model folder that is missing or
    corrupt is one line, exit 2, and the store gets no run group."""
    path, _ = source
    before = [r["run_id"] for r in store.list_runs(path)]
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "record.json").write_text("{ not json")
    for model in (bad, tmp_path / "missing"):
        result = invoke(
            "run", path, "--set", "model.method=ptychonn", "--set", f"model.ptychonn_model={model}"
        )
        assert result.exit_code == 2, result.output
        assert str(model) in result.output and len(result.output.strip().splitlines()) == 1
    assert [r["run_id"] for r in store.list_runs(path)] == before


def test_preview_trains_when_missing_then_previews_each_store_and_reports_bad_ones(
    source, tmp_path: Path
) -> None:
    """`ptyinr preview 'DIR/*.zarr' --train-from A:RUN`: the model is trained once (a second
    call reuses it), every fitting store gets a complete ptychonn run, a store that does not
    fit is reported and skipped (exit 1); a mistake in the command line is exit 2."""
    path, _ = source
    archive = tmp_path / "archive"
    archive.mkdir()
    sim = SimulationConfig(
        object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, amplitude_image="moon"
    )
    good = write_simulated_store(archive / "good.zarr", sim)
    bad = simulate(archive / "bad.zarr", probe_size=32)  # frames of 32 x 32: does not fit
    model = tmp_path / "m"
    common = ["--device", "cpu", "--threads", "1", "--workers", "1", "--no-frc", "-q"]
    common += ["--run-id", "pv"]
    result = invoke(
        "preview", archive / "*.zarr", "--train-from", f"{path}:r1", "--model", model,
        "--epochs", "2", *common,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "bad.zarr" in result.output and "trained on frames of 16 x 16" in result.output
    assert "1 of 2 store(s) not previewed" in result.output
    assert store.list_runs(bad) == []
    ds = xr.open_zarr(str(good), group="reconstructions/pv", consolidated=False)
    assert ds.attrs["method"] == "ptychonn" and ds.attrs["status"] == "complete"
    assert np.isfinite(ds["object"].values).all()
    sha = json.loads((model / "record.json").read_text())["weights_sha256"]
    # the model exists now: reused, not retrained; all stores fit: exit 0
    common[-1] = "pv2"
    result = invoke("preview", good, "--train-from", f"{path}:r1", "--model", model, *common)
    assert result.exit_code == 0, result.output
    assert json.loads((model / "record.json").read_text())["weights_sha256"] == sha
    assert store.open_run(good, "pv2").attrs["status"] == "complete"
    # command-line mistakes: nothing to train on, nothing matched
    assert invoke("preview", good, "--model", tmp_path / "none").exit_code == 2
    assert invoke("preview", good).exit_code == 2
    result = invoke("preview", tmp_path / "nothing*.zarr", "--model", model)
    assert result.exit_code == 2 and "matches no path" in result.output


def test_cli_module_imports_nothing_heavy() -> None:
    """`ptyinr --help` stays fast: cli/nn.py imports no torch, scipy, xarray or matplotlib."""
    import subprocess
    import sys

    code = (
        "import sys, ptyinr.cli.nn; "
        "print(sorted(m for m in ('torch', 'scipy', 'xarray', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_interrupted_training_resumes_from_its_checkpoint_to_the_same_model(
    source, tmp_path: Path
) -> None:
    """Stopped after 2 of 4 epochs and run again, training continues from the checkpoint
    (weights, Adam moments, generator, schedule) and ends with the model of 4 epochs in one go;
    a checkpoint of other options is refused in one line, or discarded with resume=False."""
    from ptyinr.ptychonn_train import checkpoint_dir

    path, _ = source
    runs = [f"{path}:r1"]
    options = TrainOptions(fraction=0.5, epochs=4, **{**TINY_NN, "channels": 4})
    whole = train_ptychonn(runs, tmp_path / "whole", options, progress=False)
    assert not checkpoint_dir(tmp_path / "whole").exists()  # removed with the model saved
    out = tmp_path / "resumed"
    part = train_ptychonn(runs, out, options, progress=False, stop_after=2)
    assert part.path is None and not out.exists() and checkpoint_dir(out).is_dir()
    assert len(part.record["training"]["train_loss"]) == 2
    other = TrainOptions(fraction=0.5, epochs=4, **{**TINY_NN, "channels": 4, "lr": 1e-3})
    with pytest.raises(InputError, match="other options") as err:
        train_ptychonn(runs, out, other, progress=False)
    assert "\n" not in str(err.value)
    resumed = train_ptychonn(runs, out, options, progress=False)
    training = resumed.record["training"]
    assert training["resumed_from_epoch"] == 2 and training["epochs_run"] == 4
    assert training["train_loss"] == whole.record["training"]["train_loss"]
    assert resumed.record["weights_sha256"] == whole.record["weights_sha256"]
    assert training["precision"] == "fp32"  # CPU: no autocast
    # a corrupt checkpoint: one line; resume=False starts over
    train_ptychonn(runs, tmp_path / "c", options, progress=False, stop_after=1)
    (tensors,) = checkpoint_dir(tmp_path / "c").glob("state-*.safetensors")  # the old ones go
    tensors.write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="corrupt"):
        train_ptychonn(runs, tmp_path / "c", options, progress=False)
    again = train_ptychonn(runs, tmp_path / "c", options, progress=False, resume=False)
    assert again.record["weights_sha256"] == whole.record["weights_sha256"]


def test_auto_schedule_gives_small_training_sets_enough_steps() -> None:
    from ptyinr.ptychonn_train import resolve_schedule

    small = resolve_schedule(TrainOptions(), 71)  # a fifth of a 441-position scan, less validation
    assert (small.batch_size, small.epochs, small.patience) == (8, 556, 79)
    assert small.epochs * -(-71 // small.batch_size) >= 5000
    large = resolve_schedule(TrainOptions(), 16000)  # the original's scale: its schedule
    assert (large.batch_size, large.epochs, large.patience) == (64, 60, 10)
    given = resolve_schedule(TrainOptions(batch_size=16, epochs=5, patience=0), 71)
    assert (given.batch_size, given.epochs, given.patience) == (16, 5, 0)
    assert resolve_schedule(TrainOptions(), 3).batch_size == 4  # BatchNorm needs a few frames


def test_refit_trains_on_training_and_validation_for_the_chosen_epochs(source, tmp_path) -> None:
    path, _ = source
    base = dict(TINY_NN, patience=3, min_epochs=0)
    options = TrainOptions(fraction=0.6, epochs=8, checkpoint_every=0, **base)
    plain = train_ptychonn([f"{path}:r1"], tmp_path / "plain", options, progress=False)
    refit = train_ptychonn(
        [f"{path}:r1"], tmp_path / "refit", replace(options, refit=True), progress=False
    )
    training = refit.record["training"]
    chosen = training["best_epoch"]
    assert chosen == plain.record["training"]["best_epoch"]  # the same first fit
    assert training["refit"]["epochs"] == chosen
    assert len(training["refit"]["train_loss"]) == chosen
    assert training["refit"]["positions"] == (
        training["train_positions"] + training["validation_positions"]
    )
    # a different network, scored on the positions neither fit saw
    assert refit.record["weights_sha256"] != plain.record["weights_sha256"]
    assert refit.record["scores"]["held_out"]["loss"] != plain.record["scores"]["held_out"]["loss"]


def test_the_kept_network_is_the_moving_average_of_the_weights(source, tmp_path) -> None:
    from ptyinr.ptychonn_train import build_training_set, fit_network

    path, _ = source
    options = TrainOptions(fraction=0.5, epochs=6, checkpoint_every=0, **TINY_NN)
    training = build_training_set([f"{path}:r1"], options)
    raw, _ = fit_network(training, replace(options, ema=0.0), progress=False)
    averaged, _ = fit_network(training, replace(options, ema=0.9), progress=False)
    # the same steps (same seed); what is kept differs: the average lags the raw weights
    name, weight = next(iter(raw.named_parameters()))
    assert not torch.allclose(weight, dict(averaged.named_parameters())[name])
    with pytest.raises(InputError, match=r"--ema 1\.0: expected a decay in"):
        fit_network(training, replace(options, ema=1.0), progress=False)


def test_augmentation_uses_the_source_probes_symmetries(source, tmp_path) -> None:
    from ptyinr.ptychonn_data import open_run_source, probe_symmetries

    path, _ = source
    options = TrainOptions(fraction=0.5, epochs=2, checkpoint_every=0, **TINY_NN)
    probe = open_run_source(f"{path}:r1").probe
    auto = train_ptychonn(
        [f"{path}:r1"], tmp_path / "auto", replace(options, augment="auto"), progress=False
    )
    expected = [list(g) for g in probe_symmetries([probe])]
    assert auto.record["training"]["symmetries"] == expected
    none = train_ptychonn(
        [f"{path}:r1"], tmp_path / "none", replace(options, augment="none"), progress=False
    )
    assert none.record["training"]["symmetries"] == [[False, False, False]]
    with pytest.raises(InputError, match="--augment 'all': expected auto or none"):
        train_ptychonn(
            [f"{path}:r1"], tmp_path / "bad", replace(options, augment="all"), progress=False
        )


def test_precision_is_fp32_unless_bf16_is_asked_for_on_cuda() -> None:
    from ptyinr.ptychonn_train import exact_fp32, use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_bf16("auto", cpu) and not use_bf16("fp32", cpu)
    with pytest.raises(InputError, match="bf16"):
        use_bf16("bf16", cpu)
    with pytest.raises(InputError, match="expected auto, fp32 or bf16"):
        use_bf16("fp16", cpu)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert not use_bf16("auto", cuda) and use_bf16("bf16", cuda)
    # on CUDA, training in float32 switches TF32 off and restores the flags afterwards
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        with exact_fp32(cuda):
            assert not any(f.allow_tf32 for f in flags)
        assert all(f.allow_tf32 for f in flags)
        with exact_fp32(cpu):
            assert all(f.allow_tf32 for f in flags)
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value


def test_early_stopping_waits_for_min_epochs(source) -> None:
    """With weights that never change (lr 0) the validation loss never improves after epoch
    1: patience 1 would stop at epoch 2, but not before `min_epochs` (default: half the
    epochs), where the phase head of a real training may still be flat."""
    from ptyinr import ptychonn_train

    path, _ = source
    base = {**TINY_NN, "channels": 4, "patience": 1, "lr": 0.0}
    options = TrainOptions(fraction=0.5, epochs=6, checkpoint_every=0, **base)
    training = ptychonn_train.build_training_set([f"{path}:r1"], options)
    _, info = ptychonn_train.fit_network(training, options, progress=False)
    assert info["epochs_run"] == 3 and info["best_epoch"] == 1 and info["stopped_early"]
    eager = TrainOptions(fraction=0.5, epochs=6, checkpoint_every=0, min_epochs=0, **base)
    _, info = ptychonn_train.fit_network(training, eager, progress=False)
    assert info["epochs_run"] == 2


def test_batchnorm_statistics_are_float32_when_training_in_bf16(source, monkeypatch) -> None:
    """The engine infers in float32, so the saved BatchNorm statistics must be those of the
    float32 network even when the training steps ran under bf16 autocast (CPU autocast
    stands in for CUDA's here)."""
    from ptyinr import ptychonn_train

    path, _ = source
    options = TrainOptions(fraction=0.5, epochs=2, checkpoint_every=0, **TINY_NN)
    training = ptychonn_train.build_training_set([f"{path}:r1"], options)
    monkeypatch.setattr(ptychonn_train, "use_bf16", lambda precision, device: True)
    network, info = ptychonn_train.fit_network(training, options, progress=False)
    assert info["precision"] == "bf16 autocast"
    state = network.state_dict()
    saved = {k: v.clone() for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    assert saved
    ptychonn_train.recalibrate_batchnorm(network, training.train, torch.device("cpu"), 16)
    for key, value in saved.items():
        torch.testing.assert_close(network.state_dict()[key], value, rtol=1e-5, atol=1e-7)


def test_nn_train_on_a_cluster_runs_as_one_task(source, tmp_path: Path) -> None:
    """`nn train --cluster local`: the training is one Dask task on a worker (asking for a
    GPU only where workers have one); the model is written as in-process training writes it."""
    path, _ = source
    out = tmp_path / "m"
    tiny = "--fraction 0.5 --epochs 2 --channels 4 --depth 2 --threads 1 --device cpu -q".split()
    result = invoke("nn", "train", f"{path}:r1", "--out", out, "--cluster", "local", *tiny)
    assert result.exit_code == 0, result.output
    artifact = load_artifact(out)
    assert artifact.record["training"]["epochs_run"] == 2
    assert artifact.record["sources"][0]["store"] == str(path.resolve())
    bad = invoke("nn", "train", f"{path}:r1", "--out", out, "--cluster", "local", "-q")
    assert bad.exit_code == 2 and "exists" in bad.output


def test_phase_of_a_phase_only_object_is_learned_at_held_out_positions(tmp_path) -> None:
    """Issue 13: the phase decoder must not collapse to a constant. On a phase-only object
    (amplitude 1, phase over 3 rad) with the true object as labels, a few epochs of a tiny
    network predict held-out positions' phase at least 25 % better (probe-weighted L1) than
    the mean training patch. Without BatchNorm the prediction stayed at the mean patch."""
    from ptyinr.models.ptychonn import input_scale
    from ptyinr.physics import ScanGeometry
    from ptyinr.ptychonn_data import PairDataset, RunSource, items_for, mean_pattern
    from ptyinr.ptychonn_train import TrainingSet, evaluate, fit_network, mean_training_patch
    from ptyinr.scandata import StoreFrames

    torch.set_num_threads(1)
    sim = SimulationConfig(
        object_size=48,
        probe_size=16,
        focus_fwhm_px=3,
        overlap=0.5,
        amplitude_range=(1.0, 1.0),
        phase_range=(-1.5, 1.5),
    )
    path = write_simulated_store(tmp_path / "phase.zarr", sim)
    ds = store.open_scan_store(path)
    obj = np.asarray(ds["true_object"].values, dtype=np.complex64)
    probe = np.asarray(ds["true_probe"].values, dtype=np.complex64)
    positions = store.positions_px(ds, (16, 16))
    geometry = ScanGeometry.from_positions(positions, (16, 16), object_shape=obj.shape)
    frames = StoreFrames(str(path), "intensities")
    source = RunSource(
        store=path,
        run_id="truth",
        frames=frames,
        data_source="intensities",
        positions_px=positions,
        frame_index=np.arange(len(positions)),
        top_left=np.asarray(geometry.top_left, dtype=np.int64),
        object=obj,
        probe=probe,
        bad_pixels=None,
        scale=input_scale(mean_pattern(frames, None)),
        pixel_size=None,
        energy_ev=None,
    )
    spec = PtychoNNSpec(frame_shape=(16, 16), input_size=16, channels=8, depth=2)
    chosen = select_positions(positions, 0.5, seed=0)
    train, val = block_split(positions, chosen, 0.2, seed=0)
    rest = np.setdiff1d(np.arange(len(positions)), chosen)
    training = TrainingSet(
        sources=[source],
        spec=spec,
        train=PairDataset([source], items_for(0, train), spec),
        validation=PairDataset([source], items_for(0, val), spec),
        held_out=PairDataset([source], items_for(0, rest), spec),
        selected=[chosen],
    )
    assert float(np.abs(obj).std()) < 1e-6 and float(np.angle(obj).std()) > 0.5
    options = TrainOptions(epochs=15, checkpoint_every=0, **TINY_NN)
    network, _ = fit_network(training, options, progress=False)
    assert training.held_out is not None and len(training.held_out) >= 40
    baseline = mean_training_patch(training.train)
    held = evaluate(network, training.held_out, torch.device("cpu"), mean_patch=baseline)
    phase, mean = held["phase_l1"], held["mean_patch_phase_l1"]
    assert phase < 0.75 * mean, f"phase L1 {phase:.4f} vs mean patch {mean:.4f}"
