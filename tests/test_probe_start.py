"""Probe starts for unknown probes: data-derived size and defocus, optics, files; refinement.

The scans are tiny defocused zone-plate simulations (32 x 32 frames, a ring-structured beam
~14 px wide at the sample), the regime nanoprobe beamlines measure in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ptyinr import evaluate, optics
from ptyinr.config import load_config
from ptyinr.errors import InputError
from ptyinr.launch import build_engine
from ptyinr.probe_guess import (
    TrialData,
    compact_patch,
    error_reduction_loss,
    probe_from_data,
)
from ptyinr.reconstruct import load_scan, quality
from ptyinr.simulate import SimulationConfig, simulate_scan, write_simulated_store

# 10 keV, 32 px of 75 um at 1.3 m: 67 nm object pixels; NA 3.7e-4 (pupil radius ~0.2 cycles
# per pixel); 1.3 mm downstream of the focus the beam is ~14 px wide.
OPTICS = dict(
    zone_plate_diameter_m=160e-6,
    outer_zone_width_m=1.67e-7,
    central_stop_diameter_m=60e-6,
    defocus_m=1.3e-3,
)
TINY = dict(
    probe="zone_plate",
    probe_size=32,
    object_size=72,
    energy_ev=10000.0,
    detector_distance_m=1.3,
    detector_pixel_size_m=75e-6,
    overlap=0.75,
    noise="counts",
    photons_per_frame=1e6,
    amplitude_range=(0.6, 1.0),
    phase_range=(-0.8, 0.8),
    **OPTICS,
)
PROBE_SECTION = [
    "model.probe_init=optics",
    f"probe.diameter_m={OPTICS['zone_plate_diameter_m']}",
    f"probe.outer_zone_width_m={OPTICS['outer_zone_width_m']}",
    f"probe.central_stop_diameter_m={OPTICS['central_stop_diameter_m']}",
    f"probe.defocus_m={OPTICS['defocus_m']}",
]
SMALL_MODEL = [
    "model.siren_width=64",
    "model.hash_levels=6",
    "model.hash_log2_table_size=10",
    "model.mlp_width=32",
    "model.probe_init_steps=150",
    "train.device=cpu",
    "train.threads=2",
    "performance.precision=fp32",
]


@pytest.fixture(scope="module")
def defocused_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("defocus") / "scan.zarr"
    return write_simulated_store(path, SimulationConfig(**TINY))


def _beam_size(probe: np.ndarray) -> float:
    return optics.beam_diameter_px(probe, 0.9)


def test_data_start_finds_the_beam_size_of_a_defocused_probe() -> None:
    sim = simulate_scan(SimulationConfig(**TINY))
    intensities = np.asarray(sim["intensities"], np.float32)
    positions = np.asarray(sim["positions_px"])
    true_probe = np.asarray(sim["probe"])
    from ptyinr.physics import ScanGeometry

    patch = compact_patch(positions, 32)
    scale = intensities.max()
    trial = TrialData(
        torch.as_tensor(np.sqrt(intensities[patch] / scale)),
        ScanGeometry.from_positions(positions[patch], (32, 32)),
        None,
    )
    start = probe_from_data(intensities.mean(axis=0), trial)
    truth = _beam_size(true_probe)
    assert start.record["beam_diameter_px"] == pytest.approx(truth, rel=0.3)
    # closer to the truth than the old focused start (flat-phase inverse FFT of the mean)
    focused = probe_from_data(intensities.mean(axis=0), None).probe
    error = evaluate.compare_probe(start.probe, true_probe)["probe_relative_error"]
    old = evaluate.compare_probe(focused, true_probe)["probe_relative_error"]
    assert error < 0.5 * old
    # the trial score ranks the true probe above a focal spot
    assert error_reduction_loss(true_probe, trial, 12) < error_reduction_loss(focused, trial, 12)


def test_sparse_scan_starts_focused() -> None:
    """Without overlap the trial fits cannot tell beam sizes apart (a free object explains
    any probe): the start stays the focused one and the record says why."""
    sim = simulate_scan(SimulationConfig(object_size=96, probe_size=32, overlap=-5.0))
    intensities = np.asarray(sim["intensities"], np.float32)
    positions = np.asarray(sim["positions_px"])
    from ptyinr.physics import ScanGeometry

    patch = compact_patch(positions, 32)
    trial = TrialData(
        torch.as_tensor(np.sqrt(intensities[patch] / intensities.max())),
        ScanGeometry.from_positions(positions[patch], (32, 32)),
        None,
    )
    start = probe_from_data(intensities.mean(axis=0), trial)
    assert start.record["defocus_search"] is False
    assert "overlap" in start.record["focused_because"]


def test_optics_start_needs_its_geometry(defocused_store: Path) -> None:
    cfg = load_config(None, [*SMALL_MODEL, "model.probe_init=optics"])
    loaded = load_scan(defocused_store, cfg)
    with pytest.raises(InputError, match="diameter_m"):
        build_engine(loaded.data, cfg)


def test_file_start_without_a_file_is_refused(defocused_store: Path) -> None:
    cfg = load_config(None, [*SMALL_MODEL, "model.probe_init=file"])
    loaded = load_scan(defocused_store, cfg)
    with pytest.raises(InputError, match="--probe-guess"):
        build_engine(loaded.data, cfg)


def test_optics_start_is_the_simulated_probe(defocused_store: Path) -> None:
    cfg = load_config(None, [*SMALL_MODEL, *PROBE_SECTION])
    loaded = load_scan(defocused_store, cfg)
    trainer = build_engine(loaded.data, cfg)
    start = trainer.probe_start.probe
    truth = loaded.dataset["true_probe"].values
    assert evaluate.compare_probe(start, truth)["probe_relative_error"] < 0.02
    assert trainer.probe_start.record["method"] == "optics"


def test_beamline_file_ingests_and_starts_from_optics(tmp_path: Path) -> None:
    """The simulator's raw export (corner DC, pixel positions) goes through `ptyinr ingest`
    to the same frames, and the optics start works on a store with pixel positions (energy
    and detector geometry from the file)."""
    from typer.testing import CliRunner

    from ptyinr.cli.main import app

    raw, out = tmp_path / "raw.h5", tmp_path / "ingested.zarr"
    ref = tmp_path / "ref.zarr"
    runner = CliRunner()
    cfg_path = tmp_path / "sim.toml"
    cfg_path.write_text(
        "[simulate]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in TINY.items()) + "\n"
    )
    done = runner.invoke(app, ["simulate", str(ref), "--preset", str(cfg_path), "--raw", str(raw)])
    assert done.exit_code == 0, done.output
    keys = [
        "--key",
        "energy_ev=/entry/instrument/energy_ev",
        "--key",
        "detector_distance_m=/entry/instrument/detector_distance_m",
        "--key",
        "detector_pixel_size_m=/entry/instrument/detector_pixel_size_m",
    ]
    done = runner.invoke(
        app, ["ingest", str(raw), str(out), "--dc", "auto", "--positions-unit", "px", *keys]
    )
    assert done.exit_code == 0, done.output
    from ptyinr import store

    ingested, reference = store.open_scan_store(out), store.open_scan_store(ref)
    np.testing.assert_array_equal(
        ingested["intensities"].values, reference["intensities"].values
    )  # the corner DC was found and moved to the centre
    assert ingested.attrs["positions_unit"] == "px"
    cfg = load_config(None, [*SMALL_MODEL, *PROBE_SECTION, "model.probe=pixels"])
    trainer = build_engine(load_scan(out, cfg).data, cfg)
    truth = reference["true_probe"].values
    assert evaluate.compare_probe(trainer.probe_start.probe, truth)["probe_relative_error"] < 0.02


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value)


@pytest.mark.slow
def test_refined_probe_guess_moves_toward_the_truth(defocused_store: Path, tmp_path: Path) -> None:
    """A guess of the wrong size (the beam at 60 % of its defocus), given as a file, is refined
    by the reconstruction: the final probe is closer to the truth than the guess."""
    loaded = load_scan(defocused_store, load_config(None, []))
    truth = loaded.dataset["true_probe"].values
    wrong = optics.zone_plate_probe(
        (32, 32),
        wavelength_m=loaded.data.wavelength_m,
        pixel_size_m=loaded.data.pixel_size,
        diameter_m=OPTICS["zone_plate_diameter_m"],
        outer_zone_width_m=OPTICS["outer_zone_width_m"],
        central_stop_diameter_m=OPTICS["central_stop_diameter_m"],
        defocus_m=0.6 * OPTICS["defocus_m"],
    )
    guess = tmp_path / "guess.npy"
    np.save(guess, wrong)
    cfg = load_config(
        None,
        [
            *SMALL_MODEL,
            "model.probe=pixels",
            "model.probe_init=file",
            f"probe.guess={guess}",
            "train.epochs=80",
            "train.lr_object=2e-3",
            "train.lr_probe=1e-2",
        ],
    )
    trainer = build_engine(loaded.data, cfg)
    result = trainer.fit(progress=False)
    before = evaluate.compare_probe(wrong, truth)["probe_relative_error"]
    after = evaluate.compare_probe(result.probe.values, truth)["probe_relative_error"]
    assert after < 0.5 * before, (before, after)  # measured 0.44 -> 0.12
    assert result.info["probe_start"]["method"] == "file"


@pytest.mark.slow
def test_defocused_scan_reconstructs_from_the_optics_start(defocused_store: Path) -> None:
    """Unknown probe, optics start, default learning-rate schedule: a recognisable object."""
    cfg = load_config(None, [*SMALL_MODEL, *PROBE_SECTION, "train.epochs=60"])
    loaded = load_scan(defocused_store, cfg)
    result = build_engine(loaded.data, cfg).fit(progress=False)
    scores = quality(result, loaded.dataset)
    assert scores["relative_error"] < 0.35


def test_probe_guess_option_is_checked_and_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defocused_store: Path
) -> None:
    """`--probe-guess` becomes probe_init = file with an absolute source (workers may start
    elsewhere); a missing file is refused before any work starts."""
    from ptyinr.cli.common import probe_guess_overrides

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "guess.npy", np.ones((4, 4), np.complex64))
    cfg = load_config(None, probe_guess_overrides("guess.npy"))
    assert cfg.model.probe_init == "file" and cfg.probe.guess == str(tmp_path / "guess.npy")
    run = load_config(None, probe_guess_overrides(f"{defocused_store}:some-run")).probe.guess
    assert run == f"{defocused_store.resolve()}:some-run"
    with pytest.raises(InputError, match=r"missing\.h5"):
        probe_guess_overrides("missing.h5:/entry/probe")
