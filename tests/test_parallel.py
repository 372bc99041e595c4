"""Data-parallel training: the split of a batch, the gradient all-reduce, and K ranks (spawned
processes, Dask workers) against one process on the same global batches."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny import TINY_MODEL

from ptyinr.config import load_config
from ptyinr.errors import InputError
from ptyinr.launch import build_engine, choose_ranks, fit_spawned
from ptyinr.physics import ScanGeometry
from ptyinr.reconstruct import reconstruct_store
from ptyinr.runtime.collectives import ParallelContext, morton_key, split_batch
from ptyinr.runtime.plan import union_size
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan, write_simulated_store

TINY = [
    *TINY_MODEL,
    "train.device=cpu",
    "train.epochs=3",
    # equality of 1 and K ranks is a float32 property: under bf16 each rank rounds its
    # partial activations at other points, which 3 epochs amplify beyond 1e-3
    "performance.precision=fp32",
]
SIM = SimulationConfig(object_size=48, probe_size=16, focus_fwhm_px=3, overlap=0.3)


@pytest.fixture(scope="module")
def scan() -> ScanData:
    sim = simulate_scan(SIM)
    return ScanData(np.asarray(sim["intensities"]), np.asarray(sim["positions_px"]))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------ the split


def test_split_batch_is_a_balanced_partition_of_spatial_neighbours() -> None:
    side = np.arange(12) * 5
    corners = np.stack(np.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
    key = morton_key(corners)
    batch = np.arange(len(corners))
    parts = split_batch(batch, key, 4)
    assert sorted(np.concatenate(parts).tolist()) == batch.tolist()
    assert {len(p) for p in parts} == {36}
    assert all(np.all(np.diff(p) > 0) for p in parts)
    # Z-order pieces cover less object than interleaved ones (what each rank evaluates)
    shape = (71, 71)
    compact = max(union_size(corners[p], (16, 16), shape) for p in parts)
    interleaved = max(union_size(corners[batch[r::4]], (16, 16), shape) for r in range(4))
    assert compact < 0.7 * interleaved
    # a batch shorter than the ranks leaves the last ranks empty, never rank 0
    short = split_batch(np.array([7, 3]), key, 4)
    assert [len(p) for p in short] == [1, 1, 0, 0]


def test_all_reduce_sums_gradients_and_loss(tmp_path: Path) -> None:
    store = dist.FileStore(str(tmp_path / "rendezvous"), 1)
    dist.init_process_group(
        "gloo", store=store, rank=0, world_size=1, timeout=dt.timedelta(seconds=30)
    )
    try:
        a = torch.nn.Parameter(torch.ones(3))
        b = torch.nn.Parameter(torch.ones(2))  # untouched by the loss: its grad stays None
        loss = (a * torch.tensor([1.0, 2.0, 3.0])).sum()
        loss.backward()
        ctx = ParallelContext(0, 1)
        value = ctx.all_reduce([a, b], loss)
        assert value == pytest.approx(6.0)
        assert a.grad.tolist() == [1.0, 2.0, 3.0]
        assert b.grad.tolist() == [0.0, 0.0]
    finally:
        dist.destroy_process_group()


def test_choose_ranks_validates_and_sets_the_device() -> None:
    cfg = load_config()
    assert choose_ranks(1, 0, cfg) == (1, cfg)
    ranks, cpu = choose_ranks(3, 0, cfg)
    assert ranks == 3 and cpu.train.device == "cpu"
    with pytest.raises(InputError, match="choose one"):
        choose_ranks(2, 2, cfg)
    with pytest.raises(InputError, match="CUDA device"):
        choose_ranks(1, 64, cfg)
    with pytest.raises(InputError, match="--gpus K"):
        choose_ranks(2, 0, load_config(overrides=["train.device=cuda"]))


# ------------------------------------------------------------------------------ K ranks = 1


def test_two_gloo_processes_equal_one_process(scan: ScanData) -> None:
    """Same global batches (33 of 100 positions: the last batch of 1 leaves rank 1 empty)."""
    cfg = load_config(overrides=[*TINY, "train.batch_size=33"])
    # a given grid (as FRC halves share the full scan's) must reach every rank
    grid = ScanGeometry.from_positions(scan.positions_px, scan.frame_shape, padding_px=3)
    one = build_engine(scan, cfg, geometry=grid).fit(progress=False)
    two = fit_spawned(scan, cfg, 2, geometry=grid, progress=False, threads_per_process=1)
    assert two.info["processes"] == 2 and one.info["processes"] == 1
    assert two.object.shape == grid.object_shape
    np.testing.assert_allclose(two.loss.values, one.loss.values, rtol=1e-4)
    assert _relative(two.object.values, one.object.values) < 1e-3
    assert _relative(two.probe.values, one.probe.values) < 1e-2
    # and the runs did move: the comparison is not between two untouched initialisations
    assert one.loss.values[-1] < 0.9 * one.loss.values[0]


def test_dask_workers_equal_one_process(tmp_path: Path) -> None:
    """K tasks on K Dask workers, rendezvous through the scheduler, result from rank 0."""
    from distributed import Client, LocalCluster

    path = write_simulated_store(tmp_path / "scan.zarr", SIM)
    cfg = load_config(overrides=[*TINY, "train.epochs=2"])
    _, one = reconstruct_store(path, cfg, run_id="one", progress=False)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        _, two = reconstruct_store(
            path, cfg, world_size=2, client=client, run_id="two", progress=False
        )
    assert two.info["processes"] == 2
    np.testing.assert_allclose(two.loss.values, one.loss.values, rtol=1e-4)
    assert _relative(two.object.values, one.object.values) < 1e-3


def test_spawned_rank_errors_come_back_as_themselves(scan: ScanData) -> None:
    bad_probe = np.ones((3, 3), np.complex64)  # wrong shape: InputError inside each rank
    cfg = load_config(overrides=TINY)
    with pytest.raises(InputError, match="known probe"):
        fit_spawned(scan, cfg, 2, known_probe=bad_probe, progress=False, threads_per_process=1)
