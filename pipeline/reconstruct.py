"""One reconstruction of one scan store, from the store back into the store.

This is the unit of work every front end shares (`ptyinr reconstruct`, the Dask graph of
`ptyinr run`/`scan`, SLURM workers): resolve the configuration once (`resolve_config`: the
engine's own settings, the data source), read the frames and positions, fit with the engine
`model.method` names (ptyinr.launch), write `reconstructions/<run_id>` (object, probe, loss,
resolved config, timings, versions, quality against ground truth when the store has it), mark
it complete last.
Checkpoints live in the store too (the Zarr group `checkpoints/<run_id>/<part>`: tensors
and a JSON record, never pickles; ptyinr.engines.checkpoint) so a resubmitted run resumes
where it stopped; they go once the run is complete.
With `train.snapshot_every` = K, the object, probe and loss so far are written every K
epochs into the run group as `snapshot_<part>` (replaced each time, status of the run still
"running"), so a running reconstruction can be looked at (`open_latest`: the part's result
once written, else its latest snapshot); they go once the run is complete. Progress events
(ptyinr.events) go to `reporter` when one is given.
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ptyinr import evaluate, events, store
from ptyinr.config import ReconstructionConfig
from ptyinr.errors import InputError
from ptyinr.launch import engine_config, fit
from ptyinr.physics import ScanGeometry
from ptyinr.scandata import LoadedScan, Reconstruction, load_scan

CHECKPOINTS = "checkpoints"
SNAPSHOT_PREFIX = "snapshot_"


def new_run_id() -> str:
    """Sortable, unique, readable: 20261121-231501-3fa2."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def resolve_config(
    config: ReconstructionConfig, ds: xr.Dataset | None = None
) -> ReconstructionConfig:
    """The configuration a run runs and records, decided once: the engine's own settings
    (e.g. `pixels` pins pixel representations) and, given the store, the data source that
    `data.source = auto` resolves to (a `preprocessed` array added meanwhile must not
    silently replace the raw frames of a run in progress)."""
    config = engine_config(config)
    if ds is not None:
        source = store.resolve_source(ds, config.data.source)
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"source": source})}
        )
    return config


def load_probe_file(path: str | Path, frame_shape: tuple[int, int]) -> np.ndarray:
    """A known probe from .npy (complex array of the frame shape)."""
    p = Path(path)
    try:
        probe = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"probe file {str(p)!r}: cannot be read as .npy ({exc})") from None
    if probe.ndim != 2 or tuple(probe.shape) != tuple(frame_shape):
        raise InputError(
            f"probe file {str(p)!r}: shape {tuple(probe.shape)}, expected {tuple(frame_shape)} "
            "(the diffraction frame shape)"
        )
    if not np.all(np.isfinite(probe)):
        raise InputError(f"probe file {str(p)!r}: contains NaN or infinite values")
    return probe.astype(np.complex64)


def checkpoint_path(store_path: Path, run_id: str, part: str = "full") -> Path:
    """Where a run's part keeps its checkpoint: a Zarr group of the scan store."""
    return Path(store_path) / CHECKPOINTS / run_id / part


def quality(result: Reconstruction, ds: xr.Dataset) -> dict[str, float]:
    """Quality against the store's ground truth (simulations), on the scanned interior."""
    if "true_object" not in ds:
        return {}
    interior = evaluate.scanned_interior(
        result.geometry.object_shape, result.geometry.window_centres_on_grid()
    )
    remove_ramp = not bool(result.info.get("known_probe"))
    out = evaluate.compare_object(
        result.object, ds["true_object"].load(), mask=interior, remove_ramp=remove_ramp
    )
    if "true_probe" in ds:
        out.update(
            evaluate.compare_probe(
                result.probe.values, ds["true_probe"].values, remove_ramp=remove_ramp
            )
        )
    return {k: float(v) for k, v in out.items()}


def run_attrs(config: ReconstructionConfig, loaded: LoadedScan, **extra: Any) -> dict[str, Any]:
    return {
        "config": config.model_dump(),
        "data_source": loaded.source,
        "n_positions": int(loaded.data.positions_px.shape[0]),
        "store": str(loaded.path),
        **extra,
    }


def reconstruct_store(
    path: str | Path,
    config: ReconstructionConfig,
    *,
    run_id: str | None = None,
    indices: np.ndarray | None = None,
    subgroup: str | None = None,
    known_probe: np.ndarray | None = None,
    geometry: ScanGeometry | None = None,
    progress: bool = True,
    mark_complete: bool = True,
    loaded: LoadedScan | None = None,
    world_size: int = 1,
    client: Any = None,
    reporter: events.Reporter | None = None,
) -> tuple[str, Reconstruction]:
    """Reconstruct a store (or a subset of its positions) and write the run group.

    With `subgroup` (e.g. FRC halves) the result goes to `reconstructions/<run_id>/<subgroup>`
    and the caller marks the run complete when all its parts are written. `world_size` > 1
    trains data-parallel (ptyinr.launch): on that many Dask workers of `client` when given,
    else in local processes (one GPU each when train.device is CUDA). `reporter` gets the
    fit's progress (epochs, the probe warm start, snapshots) as ptyinr.events events.
    """
    started = time.perf_counter()
    loaded = loaded or load_scan(path, config, lazy=world_size > 1 or client is not None)
    config = resolve_config(config, loaded.dataset)
    run_id = run_id or new_run_id()
    data = loaded.data if indices is None else loaded.data.subset(np.asarray(indices))
    part = subgroup or "full"
    ckpt = checkpoint_path(loaded.path, run_id, part)

    snapshot_failed: list[str] = []

    def snapshot(epoch: int, current: Reconstruction) -> None:
        try:
            write_snapshot(loaded.path, run_id, part, current, indices=indices)
        except Exception as exc:  # a look at a running fit is not worth the fit
            if not snapshot_failed:
                print(
                    f"warning: {loaded.path}: run {run_id!r} {part}: snapshot at epoch {epoch} "
                    f"not written ({type(exc).__name__}: {exc}); the fit goes on",
                    file=sys.stderr,
                    flush=True,
                )
            snapshot_failed.append(str(exc))
            return
        if reporter is not None:
            reporter.snapshot(epoch, snapshot_group(part))

    with events.reporting(reporter):
        result = fit(
            data,
            config,
            known_probe=known_probe,
            geometry=geometry,
            checkpoint_path=ckpt if config.train.checkpoint_every else None,
            progress=progress,
            description=f"{loaded.path.name} {part}",
            on_epoch=None if reporter is None else reporter.epoch,
            on_start=None if reporter is None else reporter.fit_started,
            snapshot_every=config.train.snapshot_every,
            on_snapshot=snapshot,
            world_size=world_size,
            client=client,
        )
    if reporter is not None:
        reporter.done(int(result.info.get("epochs", 0)), result.info.get("final_loss", np.nan))
    scores = quality(result, loaded.dataset) if subgroup is None else {}
    result.info["quality"] = scores
    result.info["wall_seconds"] = time.perf_counter() - started
    attrs = run_attrs(config, loaded, part=part, **result.info)
    if indices is not None:
        attrs["positions_used"] = np.asarray(indices).tolist()
    store.write_run(loaded.path, run_id, result.to_dataset(), attrs=attrs, subgroup=subgroup)
    if mark_complete and subgroup is None:
        store.mark_run(loaded.path, run_id, "complete", **({"quality": scores} if scores else {}))
        remove_checkpoints(loaded.path, run_id)
        remove_snapshots(loaded.path, run_id)
    return run_id, result


def snapshot_group(part: str = "full") -> str:
    """The run's subgroup holding a part's latest snapshot: snapshot_full, snapshot_half_a."""
    return f"{SNAPSHOT_PREFIX}{part}"


def write_snapshot(
    store_path: Path,
    run_id: str,
    part: str,
    current: Reconstruction,
    *,
    indices: np.ndarray | None = None,
) -> None:
    """Replace the part's snapshot (object, probe, loss so far) in the run group.

    Attrs say what it is (`snapshot_epoch` of `epochs`, `snapshot_of` the part, the time),
    so nobody takes it for the result; the run's status stays "running"."""
    attrs = {
        "snapshot_of": part,
        "snapshot_written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if indices is not None:
        attrs["positions_used"] = np.asarray(indices).tolist()
    store.write_run(
        store_path, run_id, current.to_dataset(), attrs=attrs, subgroup=snapshot_group(part)
    )


def open_snapshot(store_path: str | Path, run_id: str, part: str = "full") -> xr.Dataset | None:
    """A running run's latest snapshot of `part` (loaded), or None when it has none.

    The writer replaces a snapshot in place while the fit goes on, so a read can land between
    its arrays being removed and rewritten: such a read is retried, and after a few tries the
    snapshot counts as absent (the next one is seconds to minutes away)."""
    group = Path(store_path) / store.RECONSTRUCTIONS / run_id / snapshot_group(part)
    for attempt in range(_SNAPSHOT_READ_TRIES):
        if not (group / "zarr.json").is_file():
            return None
        try:
            return store.open_run(store_path, run_id, snapshot_group(part)).load()
        except (KeyError, FileNotFoundError, ValueError, OSError):  # being rewritten
            time.sleep(0.2 * (attempt + 1))
    return None


_SNAPSHOT_READ_TRIES = 5


def open_latest(store_path: str | Path, run_id: str, part: str = "full") -> xr.Dataset:
    """What there is to look at of a run's part: its result once written (lazy), else, while
    it runs, its latest snapshot (attrs `snapshot_epoch` of `epochs`). InputError naming
    the store, run and part when there is neither (`ptyinr show` of a run just started)."""
    subgroup = None if part == "full" else part
    group = Path(store_path) / store.RECONSTRUCTIONS / run_id
    if subgroup is not None:
        group = group / subgroup
    if (group / "object" / "zarr.json").is_file():
        return store.open_run(store_path, run_id, subgroup)
    snapshot = open_snapshot(store_path, run_id, part)
    if snapshot is not None:
        return snapshot
    raise InputError(
        f"{store_path}: run {run_id!r} has no {part} result yet and no snapshot of it; "
        "expected a finished part, or a running one with train.snapshot_every > 0 that has "
        "reached its first snapshot"
    )


def remove_snapshots(store_path: Path, run_id: str) -> None:
    """A complete run needs no snapshots: its result is there. (Zarr v3 keeps no list of a
    group's children, so removing a child group's folder is all it takes.)"""
    run = Path(store_path) / store.RECONSTRUCTIONS / run_id
    if not run.is_dir():
        return
    for child in run.iterdir():
        if child.name.startswith(SNAPSHOT_PREFIX) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    store.consolidate(store_path)  # the consolidated copy must not list the removed groups


def remove_checkpoints(store_path: Path, run_id: str) -> None:
    """Checkpoints of a finished run are no longer needed; the `checkpoints` group goes too
    once no run has any (a store of finished runs holds nothing to resume)."""
    folder = Path(store_path) / CHECKPOINTS
    shutil.rmtree(folder / run_id, ignore_errors=True)
    if folder.is_dir() and not any(p.is_dir() for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
