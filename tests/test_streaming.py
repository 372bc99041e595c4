"""Memory-bounded training: checkpointed object tiles and frames streamed from the store give
the same results as the untiled, in-memory path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY_MODEL

import ptyinr.runtime as runtime_module
from ptyinr.config import load_config
from ptyinr.launch import build_engine
from ptyinr.models.fields import build_object_field
from ptyinr.physics import ScanGeometry
from ptyinr.reconstruct import load_scan
from ptyinr.runtime import frames as memory
from ptyinr.runtime import plan, resolve_runtime
from ptyinr.runtime import precision as fastpaths
from ptyinr.runtime.frames import FrameStream
from ptyinr.runtime.tiles import sample_object
from ptyinr.scandata import ScanData, StoreFrames
from ptyinr.simulate import SimulationConfig, write_simulated_store

TINY = [
    *TINY_MODEL,
    "train.device=cpu",
    "train.epochs=3",
    "train.batch_size=30",
    # tiles, chunks and streams are checked for float32 equality; bf16 rounding would
    # amplify their summation-order differences (bf16 is tested in test_fastpaths.py)
    "performance.precision=fp32",
]
SIM = SimulationConfig(object_size=48, probe_size=16, focus_fwhm_px=3, overlap=0.3)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_simulated_store(tmp_path_factory.mktemp("stream") / "scan.zarr", SIM)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _relative_up_to_phase(a: np.ndarray, b: np.ndarray) -> float:
    """As _relative after removing a global phase: the loss cannot see one, so its
    gradient is rounding noise that Adam turns into a small, arbitrary drift."""
    phase = np.vdot(a, b)  # sum(conj(a) * b)
    return _relative(a * phase / abs(phase), b)


# ------------------------------------------------------------------------------ tiles


@pytest.mark.parametrize("precision", ["fp32", "bf16-backward", "bf16"])
def test_tiled_object_equals_untiled_values_and_gradients(precision: str) -> None:
    torch.manual_seed(0)
    cfg = load_config(
        overrides=[
            "model.siren_width=48",
            "model.siren_hidden_layers=2",
            f"performance.precision={precision}",
        ]
    )
    field = build_object_field((40, 50), cfg.model)
    cpu = torch.device("cpu")
    dtype = fastpaths.prepare_object_field(
        field, fastpaths.resolve_precision(cfg, cpu), cfg.performance.compile
    )
    bf16 = precision == "bf16"
    assert field.amplitude_net.hidden_dtype == (torch.bfloat16 if bf16 else None)
    backward = precision == "bf16-backward"
    assert field.amplitude_net.grad_dtype == (torch.bfloat16 if backward else None)
    index = torch.randperm(2000)[:1500].sort().values
    weights = torch.randn(1500, dtype=torch.complex64)

    def run(tile: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        field.zero_grad(set_to_none=True)
        values = sample_object(field, index, tile, dtype)
        (values * weights).real.sum().backward()
        return values.detach(), [p.grad.clone() for p in field.parameters()]

    whole, whole_grads = run(0)
    tiled, tiled_grads = run(256)  # 6 checkpointed tiles, recomputed in backward
    assert tiled.dtype == torch.complex64
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    # summation order differs; bf16 rounds each tile's weight gradient to 8 bits
    scale = 3e-2 if bf16 or backward else 1e-4
    for a, b in zip(tiled_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=scale * float(b.abs().max()))
    with torch.no_grad():  # inference: plain chunks
        torch.testing.assert_close(sample_object(field, index, 100, dtype), whole)


def test_training_with_tiles_equals_untiled(store_path: Path) -> None:
    data = load_scan(store_path, load_config(overrides=TINY)).data
    untiled = build_engine(data, load_config(overrides=TINY)).fit(progress=False)
    tiled_trainer = build_engine(
        data, load_config(overrides=[*TINY, "performance.object_tile_pixels=300"])
    )
    assert tiled_trainer.runtime.tile_pixels == 300
    tiled = tiled_trainer.fit(progress=False)
    assert tiled.info["object_tile_pixels"] == 300
    np.testing.assert_allclose(tiled.loss.values, untiled.loss.values, rtol=1e-4)
    assert _relative(tiled.object.values, untiled.object.values) < 1e-3


# ------------------------------------------------------------------------- frame chunks


@pytest.mark.parametrize(
    "extra",
    [
        ["train.batch_size=0"],  # full batch: the union is cached across steps
        ["train.batch_size=30"],
        ["train.batch_size=0", "performance.object_tile_pixels=300"],
        ["train.batch_size=0", "model.probe=pixels", "train.positions=round"],
    ],
    ids=["full", "mini-batch", "full+tiles", "pixel-probe+rounded"],
)
def test_forward_model_in_frame_chunks_equals_whole_batch(
    store_path: Path, extra: list[str]
) -> None:
    """Chunked forward model, gradients accumulated through detached leaves: the same
    training as one graph over the batch (summation order aside; global phases drift)."""
    data = load_scan(store_path, load_config(overrides=TINY)).data
    whole = build_engine(data, load_config(overrides=[*TINY, *extra])).fit(progress=False)
    chunked_trainer = build_engine(
        data, load_config(overrides=[*TINY, *extra, "performance.frame_chunk=7"])
    )
    assert chunked_trainer.runtime.frame_chunk == 7
    chunked = chunked_trainer.fit(progress=False)
    np.testing.assert_allclose(chunked.loss.values, whole.loss.values, rtol=1e-4)
    assert _relative_up_to_phase(chunked.object.values, whole.object.values) < 1e-3
    assert _relative_up_to_phase(chunked.probe.values, whole.probe.values) < 1e-3


def test_known_probe_in_frame_chunks_equals_whole_batch(store_path: Path) -> None:
    loaded = load_scan(store_path, load_config(overrides=TINY))
    probe = loaded.dataset["true_probe"].values
    cfg = [*TINY, "train.batch_size=0"]
    whole = build_engine(loaded.data, load_config(overrides=cfg), known_probe=probe)
    chunked = build_engine(
        loaded.data,
        load_config(overrides=[*cfg, "performance.frame_chunk=16"]),
        known_probe=probe,
    )
    a, b = whole.fit(progress=False), chunked.fit(progress=False)
    np.testing.assert_allclose(b.loss.values, a.loss.values, rtol=1e-4)
    assert _relative(b.object.values, a.object.values) < 1e-3


def test_union_merged_chunk_by_chunk_equals_torch_unique(store_path: Path) -> None:
    trainer = build_engine(
        load_scan(store_path, load_config(overrides=TINY)).data, load_config(overrides=TINY)
    )
    batch = torch.as_tensor(np.random.default_rng(0).permutation(trainer.geometry.n_positions))
    expected = torch.unique(trainer._window_indices(batch))
    for chunk in (1, 5, 64, 10_000):
        trainer._full_union = None
        torch.testing.assert_close(trainer._union_of(batch, chunk, full=False), expected)


def test_plan_chunks_the_forward_model_when_the_batch_does_not_fit() -> None:
    """Many frames over a small object, full batch: the forward model, not the object
    networks, sets the peak; auto planning chunks the frames rather than failing."""
    side = np.arange(60) * 2.0 + 8
    positions = np.stack(np.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
    grid = ScanGeometry.from_positions(positions, (64, 64))
    cfg = load_config(overrides=[*TINY, "train.batch_size=0"])
    wl = plan.workload(grid, cfg)
    whole = plan.estimate_memory(wl, cfg, "cuda", tile_pixels=0, stream=False)
    assert whole.parts["forward model"] > 0.5 * whole.peak
    budget_room = whole.peak - whole.parts["forward model"] // 2
    available = int(budget_room / cfg.performance.memory_fraction)
    est = plan.resolve_memory(wl, cfg, "cuda", data_lazy=True, available=available)
    assert est.fits and 0 < est.frame_chunk < wl.frames_per_rank
    assert est.tile_pixels == 0  # the object networks were never the problem
    bigger = plan.estimate_memory(
        wl, cfg, "cuda", tile_pixels=0, stream=False, frame_chunk=2 * est.frame_chunk
    )
    assert not bigger.fits  # the largest chunk that fits was chosen
    explicit = load_config(overrides=[*TINY, "train.batch_size=0", "performance.frame_chunk=64"])
    chosen = plan.resolve_memory(wl, explicit, "cuda", data_lazy=True, available=available)
    assert chosen.frame_chunk == 64


# ------------------------------------------------------------------------------ streaming


def test_store_frames_read_subset_and_pickle(store_path: Path) -> None:
    ds_frames = load_scan(store_path, load_config()).data.intensities
    frames = StoreFrames(str(store_path), "intensities")
    assert frames.shape == ds_frames.shape and memory.is_lazy(frames)
    idx = np.array([7, 2, 2, 40])
    np.testing.assert_array_equal(frames.read(idx), ds_frames[idx])
    half = pickle.loads(pickle.dumps(frames[np.arange(1, 50, 2)]))  # lazy subset, picklable
    assert half.shape == (25, *ds_frames.shape[1:])
    np.testing.assert_array_equal(half.read(np.array([0, 3])), ds_frames[[1, 7]])
    np.testing.assert_array_equal(np.asarray(half), ds_frames[1:50:2])


def test_stream_reads_ahead_and_matches_resident_amplitudes(store_path: Path) -> None:
    resident = load_scan(store_path, load_config()).data.intensities
    bad = np.zeros(resident.shape[1:], bool)
    bad[3, 5] = True
    frames = StoreFrames(str(store_path), "intensities")
    stream = FrameStream(frames, torch.device("cpu"), bad_pixels=bad)
    clean = np.where(bad, 0, resident)
    assert stream.scale == pytest.approx(float(clean.max()))
    np.testing.assert_allclose(stream.mean_pattern, clean.mean(axis=0), rtol=1e-5)
    schedule = [np.array([0, 4, 9]), np.array([1, 2]), np.array([30])]
    stream.expect(schedule)
    for batch in schedule:
        got = stream.amplitude(batch).numpy()
        np.testing.assert_allclose(got, np.sqrt(clean[batch] / stream.scale), rtol=1e-6)
    assert stream.amplitude(np.array([5])).shape == (1, *resident.shape[1:])  # unscheduled
    assert stream.reads == 7
    stream.close()


def test_streamed_training_equals_in_memory(store_path: Path) -> None:
    in_memory = load_scan(store_path, load_config(overrides=TINY))
    lazy = load_scan(store_path, load_config(overrides=TINY), lazy=True)
    assert isinstance(lazy.data.intensities, StoreFrames)
    resident = build_engine(in_memory.data, load_config(overrides=[*TINY, "data.stream=never"]))
    streamed = build_engine(lazy.data, load_config(overrides=[*TINY, "data.stream=always"]))
    assert resident.measured.stream is None and streamed.measured.stream is not None
    assert streamed.measured.resident is None
    a = resident.fit(progress=False)
    b = streamed.fit(progress=False)
    assert b.info["streamed_frames"] and not a.info["streamed_frames"]
    # 3 epochs, plus the compact patch the data-derived probe start's trial fits read once
    trial = b.info["probe_start"]["trial_positions"]
    assert trial == a.info["probe_start"]["trial_positions"] > 0
    assert streamed.measured.stream.reads == 3 * len(in_memory.data.positions_px) + trial
    # identical frames, scale and probe guess; only the mean frame energy (probe-scale start)
    # is summed in another order (float64 per block vs float32 over the scan): ~1e-7
    np.testing.assert_allclose(b.loss.values, a.loss.values, rtol=1e-5)
    assert _relative(b.object.values, a.object.values) < 1e-3


def test_auto_tiles_only_when_the_union_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    side = np.arange(24) * 7.0 + 8
    positions = np.stack(np.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
    data = ScanData(np.ones((len(positions), 16, 16), np.float32), positions)
    cfg = load_config(overrides=[*TINY, "model.siren_width=512", "train.batch_size=0"])
    grid = ScanGeometry.from_positions(positions, (16, 16))
    roomy = plan.estimate_memory(plan.workload(grid, cfg), cfg, "cpu", tile_pixels=0, stream=False)
    assert roomy.parts["object activations"] > 0.5 * roomy.peak
    bounded: list[bool] = []
    monkeypatch.setattr(runtime_module, "bound_cpu_heap", lambda: bounded.append(True))
    monkeypatch.setattr(plan, "available_memory", lambda *a, **k: 2 * roomy.peak)
    plenty = resolve_runtime(data, cfg, grid, device=torch.device("cpu"))
    assert (plenty.tile_pixels, plenty.stream, plenty.estimate.heap) == (0, False, "reuse")
    assert not bounded  # the fast heap when everything fits
    # room for everything but most of the untiled union's activations
    usable = roomy.peak - int(0.7 * roomy.parts["object activations"])
    tight = int(usable / cfg.performance.memory_fraction)
    monkeypatch.setattr(plan, "available_memory", lambda *a, **k: tight)
    short = resolve_runtime(data, cfg, grid, device=torch.device("cpu"))
    assert short.tile_pixels >= plan.MIN_TILE and short.estimate.fits
    assert short.estimate.peak <= usable
    assert short.estimate.heap == "bounded" and bounded == [True]  # RSS must track the plan


def test_auto_streams_a_scan_that_does_not_fit() -> None:
    """The paper's largest case on a 24 GB device: 40,401 frames of 220 x 220 (7.8 GB)."""
    cfg = load_config(overrides=["train.batch_size=1303"])
    wl = plan.Workload(
        n_positions=40401,
        frame_shape=(220, 220),
        object_shape=(1200, 1200),
        world_size=1,
        batch_positions=1303,
        steps_per_epoch=31,
        frames_per_rank=1303,
        union_pixels=1200 * 1200,
        subpixel=True,
    )
    est = plan.resolve_memory(wl, cfg, "cuda", data_lazy=True, available=24 * plan.GIB)
    assert est.fits and est.tile_pixels > 0
    never = cfg.model_copy(update={"data": cfg.data.model_copy(update={"stream": "never"})})
    resident = plan.resolve_memory(wl, never, "cuda", data_lazy=True, available=24 * plan.GIB)
    assert not resident.stream and resident.parts["diffraction data"] == 40401 * 220 * 220 * 4
    big = plan.resolve_memory(wl, cfg, "cuda", data_lazy=True, available=80 * plan.GIB)
    assert not big.stream and big.fits  # an 80 GB device holds the frames
    tiny = plan.resolve_memory(wl, cfg, "cuda", data_lazy=True, available=2 * plan.GIB)
    assert not tiny.fits
