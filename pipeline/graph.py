"""The Dask graph of `ptyinr run` and `ptyinr scan`: reconstruction plus resolution, per store.

Per run (one store x one configuration) the graph is

```
[preprocess (once per store, when asked)]
  -> prepare            open + validate the store, one object grid for all parts, half split,
                        create reconstructions/<run_id> with status "running"
  -> reconstruct_full   all positions           -> reconstructions/<run_id>          (GPU task)
     reconstruct_half_a half A of the positions -> reconstructions/<run_id>/half_a   (GPU task)
     reconstruct_half_b half B                  -> reconstructions/<run_id>/half_b   (GPU task)
  -> frc                FRC of the two half objects (complex, scanned interior)
  -> write_results      frc variables + resolution, config, timings, versions into the run
                        group, figures, and `status = "complete"` LAST
```

Why futures (`client.submit`) rather than dask.delayed: each task gets its own resources
(`task_resources`: one GPU for a reconstruction), retries and readable key, and the driver can
watch every task for the progress display. The reconstructions, FRC and write are submitted
when `prepare` has finished, with its (small) result passed by value: as a future it would pin
all three reconstructions to the worker holding it (see `RunHandle`). Robustness comes from
three rules:

- every task is idempotent: it rewrites only its own part of the run group (a retried or
  rescheduled reconstruction replaces its arrays; with `train.checkpoint_every` it resumes
  from the Zarr group `checkpoints/<run_id>/<part>`), so a worker killed mid-task is harmless: the
  scheduler reruns the task on another (or the restarted) worker;
- errors a user can act on (a bad store: `InputError`; a diverging fit: `ReconstructionFailed`)
  are not retried: the task returns a `Failed` marker that flows down the run's branch, and the
  last task records `status = "failed"` with the reason in the store (when it is a writable scan
  store); other runs go on. Anything else (a bug, an I/O hiccup) is retried `retries` times;
- the run group is created by `prepare` and only `write_results` marks it complete, after
  everything else is written; the run-level attrs are written in full by that task, so the
  concurrent writes of the three reconstructions cannot leave them stale.

One writer per run: the driver (the process calling `submit_runs`, i.e. `ptyinr run` /
`ptyinr scan`) takes the run's lock (`runlock.acquire_run_lock`) before it submits anything, and
releases it when the run's outcome is known (complete or failed) or the driver stops
(`collect` releases every lock it holds on the way out, interrupted or not). The driver is the
owner because it is the one process that lives as long as the run: a worker's lock would be
released by the task that took it and could not cover the run from prepare to the last write,
and workers die and are replaced. A second driver of the same run id finds the lock held and
its run fails at once (stage "lock", not recorded in the store: the store belongs to the
winner) naming the holder's host and pid; the CLI then exits 1. The driver refreshes the lock
while it waits (its mtime is the heartbeat); a lock whose holder is gone (same host, pid dead)
or that was not refreshed for `runlock.lock_timeout_s()` (24 h by default) is stale and taken
over, which the new run records in its attrs (`lock_taken_over`).

A driver killed mid-run leaves its run group "running" (only the write task's last step
marks it complete) and its lock stale; running the same run id again (no `--force` needed)
takes the lock over and finishes the run: prepare keeps the group; a reconstruction that was
completely written (its record on its `object` array, `store.mark_part`, made after its arrays
and deleted with them when the part is rewritten) for the same configuration, grid and
positions (`_part_fingerprint`) is reused, the others run again (resuming from their
checkpoints with `train.checkpoint_every`), and the write marks the run complete.

Live progress: each reconstruction task publishes its epoch, loss and ETA (and its probe warm
start) as Dask events (ptyinr.events, `Worker.log_event`); the driver subscribes to them
(`collect`) and shows them per store and part: a live view on a terminal, plain timestamped
lines at a steady pace where stderr is not one (a SLURM driver log). With
`train.snapshot_every` the tasks also write snapshots of their part into the run group,
removed by the write task once the run is complete.

FRC choice: the complex half objects, cropped to the scanned interior (the bounding box of the
probe centres: outside it the halves are unconstrained), compared with `evaluate.frc` (ramp and
phase offset removed, sub-pixel registration, Tukey apodisation, half-bit threshold). The
halves start from different seeds (seed + 1, seed + 2): shared initial values in poorly
constrained areas would otherwise correlate and flatter the resolution. Resolution is the
half-period at the crossing, in metres (pixels for stores without geometry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ptyinr import evaluate, events, figures, runlock, store
from ptyinr.cluster import current_slurm_job_id, task_resources
from ptyinr.config import ReconstructionConfig
from ptyinr.engines.base import checkpoint_epoch
from ptyinr.errors import InputError, ReconstructionFailed
from ptyinr.preprocess import write_preprocessed
from ptyinr.reconstruct import (
    checkpoint_path,
    reconstruct_store,
    remove_checkpoints,
    remove_snapshots,
    resolve_config,
    run_attrs,
)
from ptyinr.scandata import load_scan, scan_geometry, store_geometry
from ptyinr.version import __version__

__all__ = [
    "DEFAULT_RETRIES",
    "Failed",
    "RunHandle",
    "RunOutcome",
    "RunSpec",
    "best_per_dataset",
    "collect",
    "config_run_id",
    "dataset_names",
    "default_figures_dir",
    "format_resolution",
    "iter_grid",
    "outcome_from_attrs",
    "record_failure",
    "run_graph",
    "save_summary",
    "scan_summary",
    "submit_runs",
]

#: Retries of a task that raised an unexpected exception (a worker dying is handled by the
#: scheduler itself: it reschedules the task, up to `distributed.scheduler.allowed-failures`).
DEFAULT_RETRIES = 2
PARTS = ("full", "half_a", "half_b")
HALF_SEED_OFFSETS = {"half_a": 1, "half_b": 2}
STAGES = ("preprocess", "prepare", *PARTS, "frc", "write")
_STAGE_KEYS = {
    "preprocess": "preprocess",
    "prepare": "prepare",
    "full": "reconstruct_full",
    "half_a": "reconstruct_half_a",
    "half_b": "reconstruct_half_b",
    "frc": "frc",
    "write": "write_results",
}
FRC_IMAGE = "complex object, scanned interior (bounding box of the probe centres)"
OK_STATUSES = ("complete", "skipped")
LOCK_REFRESH_S = 60.0  # the driver's heartbeat on its runs' locks
PROGRESS_EVERY_S = 30.0  # a part's progress lines in a log (stderr not a terminal)
PROGRESS_ENV = "PTYINR_PROGRESS_EVERY_S"


# --------------------------------------------------------------------------------------------
# what flows through the graph
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RunSpec:
    """One run: a store, a resolved configuration, a run id and what to do around it.

    `label` holds the scan's grid coordinates ((key, value), ...); `figures_dir` is this
    run's own folder for PNGs (None: `default_figures_dir`); `preprocess` (a
    `ptyinr.preprocess.PreprocessOptions`) writes the store's `preprocessed` array first.
    """

    store: Path
    config: ReconstructionConfig
    run_id: str
    frc: bool = True
    figures_dir: Path | None = None
    force: bool = False
    label: tuple[tuple[str, Any], ...] = ()
    preprocess: Any | None = None
    lock_note: dict[str, Any] | None = None  # set by the driver: a stale lock it took over
    session: str = ""  # set by the driver: the token its progress events carry (ptyinr.events)

    @property
    def figures(self) -> Path:
        return self.figures_dir or default_figures_dir(self.store, self.run_id)


@dataclass(frozen=True)
class Failed:
    """A stage that could not do its job for a reason the user can act on."""

    stage: str
    reason: str


@dataclass(frozen=True, eq=False)
class Prepared:
    """What `prepare` learnt about a run's store; every later task of the run gets it."""

    config: ReconstructionConfig  # resolved once (reconstruct.resolve_config): source pinned
    part_configs: dict[str, ReconstructionConfig]  # per part: the halves' own seeds
    started: float  # time.time() when prepare started
    seconds: float
    frame_shape: tuple[int, int]
    n_positions: int
    object_shape: tuple[int, int]
    origin_px: tuple[int, int]
    interior: tuple[int, int, int, int]  # y0, y1, x0, x1 on the object grid (FRC crop)
    halves: tuple[np.ndarray, np.ndarray] | None
    split_kind: str | None
    preprocess: dict[str, Any] | None
    fingerprints: dict[str, str] = field(default_factory=dict)  # per part: what it depends on
    reused: dict[str, PartResult] = field(default_factory=dict)  # parts written before


@dataclass(frozen=True)
class PartResult:
    """One reconstruction (full or a half), already written to the store."""

    part: str
    attrs: dict[str, Any]
    final_loss: float
    epochs: int
    train_seconds: float
    wall_seconds: float
    worker: str | None
    slurm_job_id: str | None
    resumed_from_epoch: int = 0  # > 0: continued from a checkpoint of an interrupted attempt


@dataclass
class RunOutcome:
    """How a run ended, for the summary, the table and the exit code."""

    store: Path
    run_id: str
    status: str  # complete | skipped (complete before) | failed
    reason: str | None = None
    stage: str | None = None
    resolution: float = math.nan
    resolution_unit: str | None = None
    resolved_to_nyquist: bool = False
    pixel_size: float = math.nan
    final_loss: float = math.nan
    wall_seconds: float = math.nan
    figures_dir: str | None = None
    recorded: bool = True  # the status is in the store
    label: tuple[tuple[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def default_figures_dir(store_path: Path, run_id: str) -> Path:
    """`<store parent>/<store stem>.figures/<run_id>/`: beside the store, never inside it."""
    p = Path(store_path)
    return p.parent / f"{p.name.removesuffix('.zarr')}.figures" / run_id


def config_run_id(
    config: ReconstructionConfig, *, frc: bool = True, preprocess: Any | None = None
) -> str:
    """Deterministic run id of a configuration (scan): `cfg-<12 hex of sha256>`.

    Everything that changes the result is hashed (resolved config, FRC on/off, preprocessing
    options), so a re-run of a scan finds the runs it already completed.
    """
    payload = {
        "config": _identity(config),
        "frc": bool(frc),
        "preprocess": store.json_safe(dataclasses.asdict(preprocess)) if preprocess else None,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"cfg-{digest[:12]}"


def _identity(config: ReconstructionConfig) -> dict[str, Any]:
    """The configuration as it decides a result: settings that only watch a run
    (train.snapshot_every) are left out, so turning them on keeps the run id and reuse."""
    dumped = config.model_dump()
    dumped.get("train", {}).pop("snapshot_every", None)
    return dumped


def _float(value: Any) -> float:
    """A float from an attr (NaN is stored as NaN; stores of earlier versions hold "NaN")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


def _versions(extra: dict[str, Any] | None = None) -> dict[str, str]:
    import dask
    import distributed
    import zarr

    out = {
        "ptyinr": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "xarray": xr.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }
    out.update({k: str(v) for k, v in (extra or {}).items()})
    return out


def _with_seed(config: ReconstructionConfig, offset: int) -> ReconstructionConfig:
    train = config.train.model_copy(update={"seed": config.train.seed + offset})
    return config.model_copy(update={"train": train})


def _in_task_dask() -> contextlib.AbstractContextManager:
    """Dask arrays read inside a task (the store's lazy arrays) are computed right there.

    Inside a worker, `.compute()` would otherwise go to the cluster's scheduler and block the
    worker's thread on tasks that may need that very thread: a deadlock when all are busy.
    """
    import dask

    return dask.config.set(scheduler="synchronous")


def _stage(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Task decorator: pass a `Failed` input straight through, and turn the errors a user can
    act on into a `Failed` result (not retried: they would fail again). `name` "part" means:
    the stage is the task's last argument (full, half_a, half_b)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def task(*args: Any) -> Any:
            for arg in args:
                if isinstance(arg, Failed):
                    return arg
            try:
                with _in_task_dask():
                    return fn(*args)
            except (InputError, ReconstructionFailed) as exc:
                return Failed(str(args[-1]) if name == "part" else name, _reason(exc))

        return task

    return wrap


def _begin_run_group(path: Path, run_id: str, attrs: dict[str, Any]) -> None:
    """Create (or reset the attrs of) reconstructions/<run_id>, status "running".

    Two runs starting at once on a store without a `reconstructions` group may race to create
    it; zarr then refuses the second creation, so it is retried a few times.
    """
    for attempt in range(5):
        try:
            store.write_run(path, run_id, xr.Dataset(), attrs=attrs)
            return
        except (FileExistsError, KeyError, ValueError) as exc:
            if isinstance(exc, InputError) or attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))


def _run_exists(path: Path, run_id: str) -> bool:
    return (path / store.RECONSTRUCTIONS / run_id / "zarr.json").is_file()


# --------------------------------------------------------------------------------------------
# the tasks (run on workers)
# --------------------------------------------------------------------------------------------


@_stage("preprocess")
def preprocess_task(path: Path, options: Any) -> dict[str, Any]:
    """Write the store's `preprocessed` array, or reuse one made with the same options."""
    started = time.perf_counter()
    ds = store.open_scan_store(path)
    wanted = store.json_safe(dataclasses.asdict(options))
    reused = store.PREPROCESSED in ds and ds[store.PREPROCESSED].attrs.get("options") == wanted
    if not reused:
        write_preprocessed(path, options, overwrite=True)
    return {"options": wanted, "reused": bool(reused), "seconds": time.perf_counter() - started}


@_stage("prepare")
def prepare_task(spec: RunSpec, pre: dict[str, Any] | None) -> Prepared:
    """Validate the store, lay out one object grid for all parts, split, open the run group."""
    started_wall = time.time()
    started = time.perf_counter()
    path = spec.store
    if spec.force and _run_exists(path, spec.run_id):
        store.delete_run(path, spec.run_id)
    if spec.force:
        remove_checkpoints(path, spec.run_id)
    ds = store.open_scan_store(path)
    cfg = spec.config
    cfg = resolve_config(cfg, ds)  # engine settings and data source, decided once for all parts
    positions, geometry = store_geometry(ds, cfg.data.source, cfg)
    frame_shape = geometry.window_shape
    centres = geometry.window_centres_on_grid()
    lo = np.maximum(np.ceil(centres.min(axis=0) - 1e-9).astype(int), 0)
    hi = np.minimum(np.floor(centres.max(axis=0) + 1e-9).astype(int) + 1, geometry.object_shape)
    halves = split_kind = None
    if spec.frc:
        halves = evaluate.half_split(positions)
        alternate = np.array_equal(halves[0], np.arange(0, len(positions), 2))
        split_kind = "alternate" if alternate else "checkerboard"
        if min(len(halves[0]), len(halves[1])) < 1:
            raise InputError(f"{path}: {len(positions)} positions cannot be split in halves")
    attrs = {
        "config": cfg.model_dump(),
        "run_id": spec.run_id,
        "store": str(path),
        "label": dict(spec.label),
        "frc_requested": bool(spec.frc),
    }
    part_configs = {
        part: _with_seed(cfg, HALF_SEED_OFFSETS.get(part, 0))
        for part in (PARTS if spec.frc else PARTS[:1])
    }
    interior = (int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]))
    fingerprints = {
        part: _part_fingerprint(
            part_configs[part],
            geometry,
            len(positions),
            None if part == "full" or halves is None else halves[0 if part == "half_a" else 1],
        )
        for part in part_configs
    }
    reused = {} if spec.force else _written_parts(spec, fingerprints)
    _begin_run_group(path, spec.run_id, attrs)
    return Prepared(
        config=cfg,
        part_configs=part_configs,
        started=started_wall,
        seconds=time.perf_counter() - started,
        frame_shape=frame_shape,
        n_positions=len(positions),
        object_shape=geometry.object_shape,
        origin_px=geometry.origin_px,
        interior=interior,
        halves=halves,
        split_kind=split_kind,
        preprocess=pre,
        fingerprints=fingerprints,
        reused=reused,
    )


def _part_fingerprint(
    config: ReconstructionConfig, geometry: Any, n_positions: int, indices: np.ndarray | None
) -> str:
    """What a part's result depends on: its configuration, the grid, the positions used."""
    payload = {
        "config": _identity(config),
        "frame_shape": list(geometry.window_shape),
        "object_shape": list(geometry.object_shape),
        "origin_px": list(geometry.origin_px),
        "n_positions": int(n_positions),
        "indices": None if indices is None else np.asarray(indices).tolist(),
    }
    text = json.dumps(store.json_safe(payload), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _written_parts(spec: RunSpec, fingerprints: dict[str, str]) -> dict[str, PartResult]:
    """Parts an interrupted earlier attempt of this run wrote completely, for this very
    configuration and grid (`store.mark_part`): they are not reconstructed again."""
    found: dict[str, PartResult] = {}
    for part, fingerprint in fingerprints.items():
        record = store.read_part(spec.store, spec.run_id, subgroup=None if part == "full" else part)
        if not record or record.get("fingerprint") != fingerprint:
            continue
        r = record.get("result") or {}
        try:
            found[part] = PartResult(
                part=part,
                attrs=dict(r.get("attrs") or {}),
                final_loss=_float(r.get("final_loss")),
                epochs=int(r.get("epochs", 0)),
                train_seconds=_float(r.get("train_seconds")),
                wall_seconds=_float(r.get("wall_seconds")),
                worker=r.get("worker"),
                slurm_job_id=r.get("slurm_job_id"),
                resumed_from_epoch=int(r.get("resumed_from_epoch", 0)),
            )
        except (TypeError, ValueError):
            continue
    return found


def reused_part(result: PartResult) -> PartResult:
    """The task standing for a part written by an earlier attempt of the run."""
    return result


@_stage("part")
def reconstruct_task(spec: RunSpec, prepared: Prepared, part: str) -> PartResult:
    """One reconstruction on the shared grid, written to its own part of the run group.

    Its progress (epochs, loss, ETA, the probe warm start) goes to the driver as
    ptyinr.events events through the scheduler."""
    started = time.perf_counter()
    cfg = prepared.part_configs[part]
    reporter = events.Reporter(
        store=str(spec.store),
        run=spec.run_id,
        part=part,
        epochs=cfg.train.epochs,
        session=spec.session,
        warm_start_steps=cfg.model.probe_init_steps,
    )
    reporter.start()
    indices = None
    if part != "full":
        if prepared.halves is None:
            raise InputError(f"{spec.store}: no half split prepared for {part}")
        indices = prepared.halves[0 if part == "half_a" else 1]
    loaded = load_scan(spec.store, cfg)
    n = int(loaded.data.positions_px.shape[0])
    if loaded.data.frame_shape != prepared.frame_shape or n != prepared.n_positions:
        raise InputError(
            f"{spec.store}: {n} frames of {loaded.data.frame_shape} now, "
            f"{prepared.n_positions} of {prepared.frame_shape} when the run was prepared; "
            "expected the store not to change during a run"
        )
    ckpt = checkpoint_path(spec.store, spec.run_id, part)
    resumed = checkpoint_epoch(ckpt) if cfg.train.checkpoint_every else 0
    positions = loaded.data.positions_px if indices is None else loaded.data.positions_px[indices]
    geometry = scan_geometry(
        positions,
        prepared.frame_shape,
        cfg,
        object_shape=prepared.object_shape,
        origin_px=prepared.origin_px,
    )
    _, result = reconstruct_store(
        spec.store,
        cfg,
        run_id=spec.run_id,
        indices=indices,
        subgroup=None if part == "full" else part,
        geometry=geometry,
        progress=False,
        mark_complete=False,
        loaded=loaded,
        reporter=reporter,
    )
    info = result.info
    attrs = run_attrs(cfg, loaded, part=part, **info) if part == "full" else {}
    out = PartResult(
        part=part,
        attrs=store.json_safe(attrs),
        final_loss=float(info.get("final_loss", math.nan)),
        epochs=int(info.get("epochs", 0)),
        train_seconds=float(info.get("train_seconds", math.nan)),
        wall_seconds=time.perf_counter() - started,
        worker=_worker_address(),
        slurm_job_id=current_slurm_job_id(),
        resumed_from_epoch=resumed,
    )
    # the part is completely written: a re-run of an interrupted run need not redo it
    record = {"fingerprint": prepared.fingerprints.get(part), "result": dataclasses.asdict(out)}
    store.mark_part(spec.store, spec.run_id, record, subgroup=None if part == "full" else part)
    return out


@_stage("frc")
def frc_task(spec: RunSpec, prepared: Prepared, a: PartResult, b: PartResult) -> xr.Dataset:
    """FRC of the two half objects (complex) over the scanned interior."""
    started = time.perf_counter()
    y0, y1, x0, x1 = prepared.interior
    images = []
    for part in ("half_a", "half_b"):
        obj = store.open_run(spec.store, spec.run_id, part)["object"].load()
        images.append(obj.isel(y=slice(y0, y1), x=slice(x0, x1)))
    out = evaluate.frc(images[0], images[1])
    out.attrs.update(
        {
            "image": FRC_IMAGE,
            "interior_px": [y0, y1, x0, x1],
            "seconds": time.perf_counter() - started,
        }
    )
    return out


def write_task(
    spec: RunSpec,
    prepared: Prepared | Failed,
    full: PartResult | Failed,
    half_a: PartResult | Failed | None,
    half_b: PartResult | Failed | None,
    frc_ds: xr.Dataset | Failed | None,
) -> RunOutcome:
    """Write the run's results and figures, then mark it complete (or record its failure)."""
    for item in (prepared, full, half_a, half_b, frc_ds):
        if isinstance(item, Failed):
            recorded = record_failure(spec, item.stage, item.reason)
            return RunOutcome(
                store=spec.store,
                run_id=spec.run_id,
                status="failed",
                reason=item.reason,
                stage=item.stage,
                recorded=recorded,
                label=spec.label,
            )
    assert isinstance(prepared, Prepared) and isinstance(full, PartResult)
    try:
        with _in_task_dask():
            return _write_results(spec, prepared, full, half_a, half_b, frc_ds)
    except InputError as exc:
        recorded = record_failure(spec, "write", _reason(exc))
        return RunOutcome(
            spec.store,
            spec.run_id,
            "failed",
            reason=_reason(exc),
            stage="write",
            recorded=recorded,
            label=spec.label,
        )


def _write_results(
    spec: RunSpec,
    prepared: Prepared,
    full: PartResult,
    half_a: PartResult | None,
    half_b: PartResult | None,
    frc_ds: xr.Dataset | None,
) -> RunOutcome:
    started = time.perf_counter()
    parts = [p for p in (full, half_a, half_b) if isinstance(p, PartResult)]
    attrs: dict[str, Any] = dict(full.attrs)
    attrs.update(
        {
            "run_id": spec.run_id,
            "created_by": "ptyinr run/scan (ptyinr.graph)",
            "label": dict(spec.label),
            "frc_requested": bool(spec.frc),
            "versions": _versions(full.attrs.get("versions")),
            "workers": {p.part: p.worker for p in parts},
        }
    )
    resumed = {p.part: p.resumed_from_epoch for p in parts if p.resumed_from_epoch}
    if prepared.reused:
        attrs["reused_parts"] = sorted(prepared.reused)  # written by an interrupted attempt
    if resumed:
        attrs["resumed_from_epoch"] = resumed  # part -> epoch its checkpoint had reached
    job_ids = sorted({p.slurm_job_id for p in parts if p.slurm_job_id})
    if job_ids:
        attrs["slurm_job_ids"] = job_ids
    if prepared.preprocess is not None:
        attrs["preprocess"] = prepared.preprocess
    if spec.lock_note:
        attrs["lock_taken_over"] = spec.lock_note  # whose stale lock this run replaced, why
    resolution = math.nan
    unit = None
    resolved = False
    pixel = math.nan
    if frc_ds is not None:
        fa = frc_ds.attrs
        resolution = _float(fa.get("resolution"))
        unit = fa.get("unit")
        resolved = bool(fa.get("resolved_to_nyquist", False))
        pixel = _float(fa.get("pixel_size"))
        halves = prepared.halves or (np.array([]), np.array([]))
        attrs.update(
            {
                # names as evaluate.frc gives them, so `ptyinr show` reads them too
                "resolution": resolution,
                "resolution_unit": unit,
                "resolution_full_period": _float(fa.get("resolution_full_period")),
                "resolution_spatial_frequency": _float(fa.get("resolution_spatial_frequency")),
                "resolution_convention": fa.get("resolution_convention"),
                "resolution_note": fa.get("resolution_note"),
                "resolved_to_nyquist": resolved,
                "frequency_unit": fa.get("frequency_unit"),
                "pixel_size": pixel,
                "frc": dict(fa),
                "half_split": {
                    "kind": prepared.split_kind,
                    "n_half_a": len(halves[0]),
                    "n_half_b": len(halves[1]),
                    "seeds": {
                        k: prepared.config.train.seed + v for k, v in HALF_SEED_OFFSETS.items()
                    },
                },
            }
        )
    timings: dict[str, Any] = {"prepare_seconds": prepared.seconds}
    if prepared.preprocess is not None:
        timings["preprocess_seconds"] = prepared.preprocess.get("seconds")
    for p in parts:
        timings[p.part] = {"wall_seconds": p.wall_seconds, "train_seconds": p.train_seconds}
    if frc_ds is not None:
        timings["frc_seconds"] = frc_ds.attrs.get("seconds")
    attrs["timings"] = timings

    results = xr.Dataset()
    if frc_ds is not None:
        results = frc_ds[["frc", "half_bit_threshold", "n_pixels"]].copy()
        results.attrs = {}
    store.write_run(spec.store, spec.run_id, results, attrs=attrs)

    outdir = spec.figures
    written: list[str] = []
    figure_error = None
    try:
        run = store.open_run(spec.store, spec.run_id).load()
        title = spec.store.name.removesuffix(".zarr")  # the run id is the folder's name
        paths = figures.save_object_figures(run["object"], outdir, title=title)
        paths += figures.save_probe_figure(run["probe"], outdir, title=title)
        paths += figures.save_loss_figure(
            run["loss"], outdir, title=title, validation=run.attrs.get("validation")
        )
        if frc_ds is not None:
            paths += figures.save_frc_figure(frc_ds, outdir, title=title)
        written = [p.name for p in paths]
    except (InputError, OSError, ValueError) as exc:  # the results stand without pictures
        figure_error = _reason(exc)
    timings["write_seconds"] = time.perf_counter() - started
    total = time.time() - prepared.started
    timings["total_seconds"] = total
    final = {
        "timings": timings,
        "figures_dir": outdir,  # a Path: stored relative to the store
        "figures": written,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if figure_error:
        final["figures_error"] = figure_error
    store.mark_run(spec.store, spec.run_id, "complete", **final)  # LAST
    remove_checkpoints(spec.store, spec.run_id)
    remove_snapshots(spec.store, spec.run_id)
    return RunOutcome(
        store=spec.store,
        run_id=spec.run_id,
        status="complete",
        reason=figure_error,
        resolution=resolution,
        resolution_unit=unit,
        resolved_to_nyquist=resolved,
        pixel_size=pixel,
        final_loss=full.final_loss,
        wall_seconds=total,
        figures_dir=str(outdir),
        label=spec.label,
    )


def record_failure(spec: RunSpec, stage: str, reason: str) -> bool:
    """Record `status = "failed"` and the reason in a writable scan store; False otherwise.

    Nothing is written into a path that is not a valid scan store (it may be somebody else's).
    """
    try:
        with _in_task_dask():
            store.open_scan_store(spec.store)
        if not _run_exists(spec.store, spec.run_id):
            attrs = {"config": spec.config.model_dump(), "run_id": spec.run_id}
            _begin_run_group(spec.store, spec.run_id, attrs)
        store.mark_run(
            spec.store,
            spec.run_id,
            "failed",
            reason=reason,
            failed_stage=stage,
            label=dict(spec.label),
        )
        return True
    except Exception:  # read-only, corrupt, vanished: the summary still has the reason
        return False


def _stored_path(store_path: Path, value: Any) -> str | None:
    """A path read from a run's attrs: those are stored relative to the store."""
    if not isinstance(value, str) or not value:
        return None
    return os.path.normpath(Path(store_path) / value)


def outcome_from_attrs(path: Path, attrs: dict[str, Any], status: str | None = None) -> RunOutcome:
    """A `RunOutcome` from a run's stored attrs (runs completed earlier, `ptyinr results`)."""
    timings = attrs.get("timings") or {}
    label = attrs.get("label") or {}
    return RunOutcome(
        store=Path(path),
        run_id=str(attrs.get("run_id")),
        status=status or str(attrs.get("status", "unknown")),
        reason=attrs.get("reason"),
        stage=attrs.get("failed_stage"),
        resolution=_float(attrs.get("resolution")),
        resolution_unit=attrs.get("resolution_unit"),
        resolved_to_nyquist=bool(attrs.get("resolved_to_nyquist", False)),
        pixel_size=_float(attrs.get("pixel_size")),
        final_loss=_float(attrs.get("final_loss")),
        wall_seconds=_float(timings.get("total_seconds") if isinstance(timings, dict) else None),
        figures_dir=_stored_path(path, attrs.get("figures_dir")),
        label=tuple(label.items()) if isinstance(label, dict) else (),
    )


# --------------------------------------------------------------------------------------------
# the driver (runs in the client process)
# --------------------------------------------------------------------------------------------


@dataclass
class RunHandle:
    """One run in the driver: its futures by stage, and its outcome once known.

    The graph is submitted in two steps: (preprocess ->) prepare at once; the three
    reconstructions, FRC and write when prepare has finished (`advance`), with the prepared
    value as a plain argument. A future argument would pin all three reconstructions to the
    worker holding it (Dask schedules for data locality, and work stealing corrects that
    only after a while); plain arguments let the scheduler spread them over idle workers.
    """

    spec: RunSpec
    client: Any = None
    retries: int = DEFAULT_RETRIES
    resources: dict[str, float] | None = None
    futures: dict[str, Any] = field(default_factory=dict)
    skipped: RunOutcome | None = None
    outcome: RunOutcome | None = None
    lock: runlock.RunLock | None = None  # held from submit_runs until the outcome is known

    def release(self) -> None:
        """Release the run's lock (once the run is over, or the driver stops)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def expected_tasks(self) -> int:
        """Tasks of this run when fully submitted (a shared preprocess counts in each run)."""
        if self.skipped is not None:
            return 0
        parts = 3 if self.spec.frc else 1
        return 1 + parts + (1 if self.spec.frc else 0) + 1 + (1 if self.spec.preprocess else 0)

    def submit(self, stage: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        key = f"{_STAGE_KEYS[stage]}-{uuid.uuid4().hex}"
        future = self.client.submit(fn, *args, key=key, retries=self.retries, **kw)
        self.futures[stage] = future
        return future

    def advance(self) -> None:
        """Submit what can be submitted, and settle the outcome when the run is over."""
        if self.outcome is not None:
            self.release()
            return
        prepare = self.futures["prepare"]
        if "write" in self.futures:
            if self.futures["write"].done():
                self.outcome = _outcome_of(self)
                self.release()
            return
        if not prepare.done():
            return
        if prepare.status != "finished":
            self.outcome = _outcome_of(self)
            self.release()
            return
        prepared = prepare.result()
        spec = self.spec
        if isinstance(prepared, Failed):
            self.submit("write", write_task, spec, prepared, prepared, None, None, None)
            return
        for part in PARTS if spec.frc else ("full",):
            if part in prepared.reused:
                self.submit(part, reused_part, prepared.reused[part])
            else:
                self.submit(part, reconstruct_task, spec, prepared, part, resources=self.resources)
        frc = None
        if spec.frc:
            frc = self.submit(
                "frc", frc_task, spec, prepared, self.futures["half_a"], self.futures["half_b"]
            )
        self.submit(
            "write",
            write_task,
            spec,
            prepared,
            self.futures["full"],
            self.futures.get("half_a"),
            self.futures.get("half_b"),
            frc,
        )


def _completed_before(spec: RunSpec) -> RunOutcome | None:
    """The stored outcome when this run id is already complete in the store."""
    try:
        runs = store.list_runs(spec.store)
    except Exception:
        return None
    for run in runs:
        if run["run_id"] == spec.run_id and run["status"] == "complete":
            out = outcome_from_attrs(spec.store, run, status="skipped")
            out.label = spec.label or out.label
            return out
    return None


def _lock_run(spec: RunSpec, timeout_s: float | None) -> runlock.RunLock | RunOutcome | None:
    """The run's lock for this driver, or the failed outcome of a run somebody else holds.

    None (no lock) for a path that is not a directory: prepare will refuse it, and nothing is
    written beside a path that may not be a store. A lock that cannot be created for another
    reason (a read-only folder) is warned about, and the run goes on unlocked.
    """
    if not spec.store.is_dir():
        return None
    try:
        return runlock.acquire_run_lock(spec.store, spec.run_id, timeout_s=timeout_s)
    except runlock.RunLocked as exc:
        return RunOutcome(
            spec.store,
            spec.run_id,
            "failed",
            reason=str(exc),
            stage="lock",
            recorded=False,
            label=spec.label,
        )
    except OSError as exc:
        import warnings

        warnings.warn(
            f"{spec.store}: run {spec.run_id!r} goes on without a lock ({_reason(exc)})",
            stacklevel=3,
        )
        return None


def submit_runs(
    client: Any,
    specs: Sequence[RunSpec],
    *,
    retries: int = DEFAULT_RETRIES,
    lock_timeout_s: float | None = None,
) -> list[RunHandle]:
    """Start every run (preprocess and prepare tasks); `collect` submits the rest and waits.

    Runs already complete in their store are skipped unless `force`. Every other run is
    locked for this driver first (see the module's docstring; `lock_timeout_s`: when a lock
    nobody refreshes is stale, default `runlock.lock_timeout_s()`); a run locked by another
    driver fails at once (stage "lock"). Reconstructions will
    ask for `task_resources(client)` (one GPU when workers have GPUs); one preprocess task
    per store serves all runs on it. Store paths are made absolute, so workers started
    elsewhere find them.
    """
    resources = task_resources(client) or None
    handles: list[RunHandle] = []
    try:
        _submit_each(client, specs, handles, retries, resources, lock_timeout_s)
    except BaseException:
        for h in handles:
            h.release()
        raise
    return handles


def _submit_each(
    client: Any,
    specs: Sequence[RunSpec],
    handles: list[RunHandle],
    retries: int,
    resources: dict[str, float] | None,
    lock_timeout_s: float | None,
) -> None:
    preprocessed: dict[tuple[Path, str], Any] = {}
    session = uuid.uuid4().hex[:12]  # this driver's runs: whose progress events are whose
    for spec in specs:
        spec = dataclasses.replace(
            spec, store=Path(spec.store).expanduser().resolve(), session=session
        )
        if spec.figures_dir is not None:
            spec = dataclasses.replace(spec, figures_dir=Path(spec.figures_dir).resolve())
        handle = RunHandle(spec, client=client, retries=retries, resources=resources)
        handles.append(handle)
        if not spec.force:
            handle.skipped = _completed_before(spec)
            if handle.skipped is not None:
                handle.outcome = handle.skipped
                continue
        locked = _lock_run(spec, lock_timeout_s)
        if isinstance(locked, RunOutcome):
            handle.outcome = locked
            continue
        handle.lock = locked
        if not spec.force:  # completed by the previous holder while we waited for the lock
            handle.skipped = _completed_before(spec)
            if handle.skipped is not None:
                handle.outcome = handle.skipped
                handle.release()
                continue
        if locked is not None and locked.taken_over is not None:
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            note = {**locked.taken_over, "at": now}
            spec = handle.spec = dataclasses.replace(spec, lock_note=store.json_safe(note))
        pre = None
        if spec.preprocess is not None:
            token = (spec.store, repr(spec.preprocess))
            if token not in preprocessed:
                preprocessed[token] = handle.submit(
                    "preprocess", preprocess_task, spec.store, spec.preprocess
                )
            pre = handle.futures["preprocess"] = preprocessed[token]
        handle.submit("prepare", prepare_task, spec, pre)


def _outcome_of(handle: RunHandle) -> RunOutcome:
    """The outcome of a finished run; an erred task becomes a failure, recorded if possible."""
    fut = handle.futures.get("write")
    if fut is not None and fut.status == "finished":
        return fut.result()
    spec = handle.spec
    stage, reason = "write", "task did not finish"
    for name in STAGES:
        f = handle.futures.get(name)
        if f is not None and f.status in ("error", "cancelled", "lost"):
            stage = name
            exc = f.exception() if f.status == "error" else None
            reason = _reason(exc) if exc is not None else f"task {f.status}"
            if type(exc).__name__ == "KilledWorker":
                reason += " (workers died repeatedly running it: out of memory?)"
            break
    recorded = record_failure(spec, stage, reason)
    return RunOutcome(
        spec.store,
        spec.run_id,
        "failed",
        reason=reason,
        stage=stage,
        recorded=recorded,
        label=spec.label,
    )


def _all_futures(handles: Sequence[RunHandle]) -> list[Any]:
    return list({f.key: f for h in handles for f in h.futures.values()}.values())


def progress_every(seconds: float | None = None) -> float:
    """Seconds between a part's progress lines where stderr is not a terminal: `seconds`,
    else $PTYINR_PROGRESS_EVERY_S, else PROGRESS_EVERY_S."""
    if seconds is None:
        text = os.environ.get(PROGRESS_ENV)
        if text is None or not text.strip():
            return PROGRESS_EVERY_S
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            raise InputError(
                f"environment variable {PROGRESS_ENV}={text!r}: expected seconds >= 0 between "
                "progress lines"
            )
    if not math.isfinite(seconds) or seconds < 0:
        raise InputError(f"progress every {seconds!r} s: expected seconds >= 0")
    return float(seconds)


def collect(
    client: Any,
    handles: Sequence[RunHandle],
    *,
    console: Any | None = None,
    poll_seconds: float = 0.2,
    progress_every_s: float | None = None,
) -> list[RunOutcome]:
    """Drive every run to its end, showing its progress when `console` (a rich Console, on
    stderr) is given: on a terminal one live view, with epoch, loss and ETA per running part;
    elsewhere (a SLURM log, a file) plain timestamped lines, a part's at most every
    `progress_every` seconds. Progress comes from the workers as ptyinr.events events.
    Returns the outcomes in the order of `handles`. On KeyboardInterrupt the remaining tasks
    are cancelled (their runs stay visibly "running" in the stores). The runs' locks are
    refreshed while they run and released when each ends, or when this returns or raises."""
    total = sum(h.expected_tasks for h in handles)
    display: _Display | _LineDisplay | None = None
    unsubscribe: Callable[[], None] = lambda: None  # noqa: E731
    if console is not None:
        every = progress_every(progress_every_s)
        board = events.Board({(str(h.spec.store), h.spec.run_id, h.spec.session) for h in handles})
        unsubscribe = events.subscribe(client, board.handle)
        if console.is_terminal:
            display = _Display(console, handles, total, board)
        else:
            display = _LineDisplay(console, handles, board, every)
    refreshed = time.monotonic()
    try:
        with display if display is not None else contextlib.nullcontext():
            while True:
                for h in handles:
                    before = h.outcome
                    h.advance()
                    if before is None and h.outcome is not None and display is not None:
                        display.finished(h)
                if all(h.outcome is not None for h in handles):
                    break
                if display is not None:
                    display.refresh(client, _all_futures(handles))
                if time.monotonic() - refreshed > LOCK_REFRESH_S:
                    refreshed = time.monotonic()
                    for h in handles:
                        if h.lock is not None and h.outcome is None:
                            h.lock.refresh()
                time.sleep(poll_seconds)
            if display is not None:
                display.refresh(client, _all_futures(handles))
    except KeyboardInterrupt:
        client.cancel(_all_futures(handles))
        raise
    finally:
        unsubscribe()
        for h in handles:
            h.release()
    return [h.outcome for h in handles if h.outcome is not None]


def run_graph(
    client: Any,
    specs: Sequence[RunSpec],
    *,
    retries: int = DEFAULT_RETRIES,
    console: Any | None = None,
    lock_timeout_s: float | None = None,
    progress_every_s: float | None = None,
) -> list[RunOutcome]:
    """Submit every run and wait for them: `collect(client, submit_runs(client, specs))`."""
    if console is not None:
        progress_every_s = progress_every(progress_every_s)  # a bad value stops before submit
    handles = submit_runs(client, specs, retries=retries, lock_timeout_s=lock_timeout_s)
    return collect(client, handles, console=console, progress_every_s=progress_every_s)


# --------------------------------------------------------------------------------------------
# progress display
# --------------------------------------------------------------------------------------------


_PART_NAMES = {"full": "full", "half_a": "half A", "half_b": "half B"}


def _timestamp() -> str:
    """UTC, to the second: lines of runs on different machines sort together."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run_name(h: RunHandle) -> str:
    label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in h.spec.label)
    return f"{h.spec.store.name} {h.spec.run_id} {label}".strip()


def _finished_text(h: RunHandle) -> str | None:
    """'complete NAME: resolution ..., final loss ..., N s' / 'failed NAME at STAGE: why'
    (rich markup), None for a skipped run."""
    from rich.markup import escape

    o = h.outcome
    if o is None or o.status == "skipped":
        return None
    name = escape(f"{h.spec.store.name} {h.spec.run_id}")
    if o.status == "failed":
        return f"[red]failed[/] {name} at {o.stage}: {escape(o.reason or '')}"
    return (
        f"[green]complete[/] {name}: resolution {escape(format_resolution(o))}, "
        f"final loss {o.final_loss:.3g}, {o.wall_seconds:.1f} s"
    )


def _opening_notes(console: Any, handles: Sequence[RunHandle], prefix: str = "") -> None:
    """Skipped runs and stale locks taken over, said once at the start."""
    from rich.markup import escape

    skipped = sum(h.skipped is not None for h in handles)
    if skipped:
        console.print(
            f"{prefix}{skipped} run(s) already complete: skipped (--force reruns them)",
            highlight=False,
        )
    for h in handles:
        note = h.spec.lock_note
        if note:
            text = f"{runlock.describe_holder(note.get('holder') or {})}: {note.get('reason')}"
            console.print(
                f"{prefix}[yellow]{escape(h.spec.store.name)} {escape(h.spec.run_id)}: took "
                f"over a stale lock[/] of {escape(text)}",
                highlight=False,
            )


class _Display:
    """One rich live view (stderr is a terminal): tasks done / total, the state of each run,
    and for each running reconstruction its epoch, loss and ETA (from the workers' events)."""

    MAX_ROWS = 16

    def __init__(
        self,
        console: Any,
        handles: Sequence[RunHandle],
        n_tasks: int,
        board: events.Board | None = None,
    ) -> None:
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.handles = handles
        self.board = board or events.Board(set())
        self.progress = Progress(
            TextColumn("[bold]tasks"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[runs]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("tasks", total=max(n_tasks, 1), runs="")
        self.live = Live(self._render({}), console=console, refresh_per_second=4, transient=False)
        _opening_notes(console, handles)
        for h in handles:
            if h.outcome is not None and h.skipped is None:
                self.finished(h)  # refused at once: locked by another driver

    def __enter__(self) -> _Display:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)
        if not self.console.is_terminal:
            self.console.line()  # the last render of a non-terminal Live ends mid-line

    def _state(self, h: RunHandle, running: set[str]) -> tuple[str, list[str]]:
        """The run's state, and the parts it is reconstructing now."""
        if h.outcome is not None:
            o = h.outcome
            if o.status == "failed":
                return f"[red]failed[/] at {o.stage}", []
            done = "[green]complete[/]" if o.status == "complete" else "[dim]skipped (complete)"
            return done, []
        active = [s for s, f in h.futures.items() if f.key in running]
        parts = [s for s in active if s in PARTS]
        if parts:
            return "reconstructing", parts
        if active:
            return {"preprocess": "preprocessing", "prepare": "preparing", "frc": "FRC"}.get(
                active[0], "writing results"
            ), []
        done = sum(f.done() for f in h.futures.values())
        return ("waiting" if done else "queued"), []

    def _part_text(self, h: RunHandle, part: str) -> str:
        from rich.markup import escape

        p = self.board.part(str(h.spec.store), h.spec.run_id, part)
        text = "waiting for a worker thread" if p is None else p.text()
        return f"{_PART_NAMES[part]}: {escape(text)}"

    def _render(self, states: dict[int, tuple[str, list[str]]]) -> Any:
        from rich.console import Group
        from rich.markup import escape
        from rich.table import Table

        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        table.add_column("store")
        table.add_column("run")
        table.add_column("state")
        order = sorted(
            range(len(self.handles)),
            key=lambda i: (
                0 if states.get(i, ("", []))[1] else 1,
                0 if "failed" in states.get(i, ("", []))[0] else 1,
                i,
            ),
        )
        rows = shown = 0
        for i in order:
            if rows >= self.MAX_ROWS:
                break
            h = self.handles[i]
            state, parts = states.get(i, ("", []))
            run = escape(_run_name(h).removeprefix(h.spec.store.name).strip())
            lines = [self._part_text(h, part) for part in parts] or [state]
            table.add_row(escape(h.spec.store.name), run, lines[0])
            for line in lines[1:]:
                table.add_row("", "", line)
            rows += len(lines)
            shown += 1
        if len(self.handles) > shown:
            table.add_row("...", f"{len(self.handles) - shown} more runs", "")
        return Group(self.progress, table)

    def refresh(self, client: Any, futures: Sequence[Any]) -> None:
        try:
            running = {k for keys in client.processing().values() for k in keys}
        except Exception:  # the display must never stop the run
            running = set()
        states = {i: self._state(h, running) for i, h in enumerate(self.handles)}
        done = sum(
            h.expected_tasks if h.outcome else sum(f.done() for f in h.futures.values())
            for h in self.handles
        )
        finished = [h.outcome for h in self.handles if h.outcome is not None]
        failed = sum(o.status == "failed" for o in finished)
        runs = f"runs {len(finished)}/{len(self.handles)} done" + (
            f", {failed} failed" if failed else ""
        )
        self.progress.update(self.task, completed=done, runs=runs)
        self.live.update(self._render(states))

    def finished(self, h: RunHandle) -> None:
        text = _finished_text(h)
        if text is not None:
            self.console.print(text, highlight=False)


class _LineDisplay:
    """Plain timestamped lines, for a stderr that is not a terminal (a SLURM driver log,
    `2> run.log`), where a live view would show nothing until the end: one line per part as
    it enters each phase (loading, probe warm start, epochs: the first ETA, a refit and its
    epochs, done), in between at most one every `every_s` seconds (epoch, loss, ETA) and only
    when it moved on; one line per run when it ends."""

    def __init__(
        self, console: Any, handles: Sequence[RunHandle], board: events.Board, every_s: float
    ) -> None:
        self.console = console
        self.handles = handles
        self.board = board
        self.every_s = every_s
        self._seen: dict[tuple[str, str, str], int] = {}
        self._printed: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._names = {(str(h.spec.store), h.spec.run_id): h for h in handles}

    def line(self, text: str, markup: bool = False) -> None:
        """One timestamped line, never wrapped (a log is read with grep)."""
        from rich.markup import escape

        body = text if markup else escape(text)
        self.console.print(f"{_timestamp()}  {body}", highlight=False, soft_wrap=True)

    def __enter__(self) -> _LineDisplay:
        running = [h for h in self.handles if h.outcome is None]
        self.line(
            f"{len(running)} run(s) submitted; progress of each part at most every "
            f"{self.every_s:g} s"
        )
        _opening_notes(self.console, self.handles, prefix=f"{_timestamp()}  ")
        for h in self.handles:
            if h.outcome is not None and h.skipped is None:
                self.finished(h)  # refused at once: locked by another driver
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def refresh(self, client: Any, futures: Sequence[Any]) -> None:
        now = time.monotonic()
        for key, entries in sorted(self.board.take_entered().items()):
            for p in entries:  # every phase a part entered, even between two refreshes
                if self._seen.get(key, 0) < p.version:
                    self._print(key, p, now)
        for key, p in sorted(self.board.parts().items()):
            if self._seen.get(key) == p.version:
                continue
            at, last_phase = self._printed.get(key, (-math.inf, ""))
            if p.phase == last_phase and now - at < self.every_s:
                continue
            self._print(key, p, now)

    def _print(self, key: tuple[str, str, str], p: events.PartProgress, now: float) -> None:
        self._seen[key] = p.version
        self._printed[key] = (now, p.phase)
        h = self._names.get(key[:2])
        name = _run_name(h) if h is not None else f"{Path(key[0]).name} {key[1]}"
        self.line(f"{name} {_PART_NAMES.get(p.part, p.part)}: {p.text()}")

    def finished(self, h: RunHandle) -> None:
        self.refresh(None, ())  # the parts' last lines first
        text = _finished_text(h)
        if text is not None:
            self.line(text, markup=True)


def format_resolution(o: RunOutcome) -> str:
    """'12.3 nm', '2.1 px', '<= 8.3 nm (Nyquist)', or '-'."""
    if math.isfinite(o.resolution):
        return _format_length(o.resolution, o.resolution_unit)
    if o.resolved_to_nyquist and math.isfinite(o.pixel_size):
        return f"<= {_format_length(o.pixel_size, o.resolution_unit)} (Nyquist)"
    return "-"


def _format_length(value: float, unit: str | None) -> str:
    if unit != "m":
        return f"{value:.3g} px"
    for name, factor in (("nm", 1e9), ("µm", 1e6), ("mm", 1e3)):
        if value * factor < 2000 or name == "mm":
            return f"{value * factor:.3g} {name}"
    return f"{value:.3g} m"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# scans: summary over datasets x grid
# --------------------------------------------------------------------------------------------


def dataset_names(stores: Sequence[Path]) -> list[str]:
    """Short unique names: the store stems, or the full paths when stems collide."""
    stems = [Path(s).name.removesuffix(".zarr") for s in stores]
    if len(set(stems)) == len(stems):
        return stems
    return [str(s) for s in stores]


def _effective_resolution(o: RunOutcome) -> float:
    """Resolution for ranking: resolved to Nyquist counts as the pixel size."""
    if not o.ok:
        return math.nan
    if math.isfinite(o.resolution):
        return o.resolution
    if o.resolved_to_nyquist:
        return o.pixel_size
    return math.nan


def best_per_dataset(outcomes: Sequence[RunOutcome]) -> set[int]:
    """Indices of the best run of each store: finest FRC resolution; ties / no resolution ->
    lowest final loss. Failed runs are never best."""
    by_store: dict[Path, list[int]] = {}
    for i, o in enumerate(outcomes):
        by_store.setdefault(Path(o.store), []).append(i)
    best: set[int] = set()
    for indices in by_store.values():
        ok = [i for i in indices if outcomes[i].ok]
        res = {i: _effective_resolution(outcomes[i]) for i in ok}
        finite = [i for i in ok if math.isfinite(res[i])]
        if finite:
            top = min(res[i] for i in finite)
            pool = [i for i in finite if math.isclose(res[i], top, rel_tol=1e-6)]
        else:
            pool = ok
        if not pool:
            continue

        def loss_key(i: int) -> tuple[bool, float]:
            loss = outcomes[i].final_loss
            return (not math.isfinite(loss), loss if math.isfinite(loss) else 0.0)

        best.add(min(pool, key=loss_key))
    return best


def scan_summary(
    outcomes: Sequence[RunOutcome],
    stores: Sequence[Path],
    grid: Sequence[tuple[str, Sequence[Any]]],
) -> xr.Dataset:
    """The scan as an xarray Dataset over (dataset, one dim per grid key).

    Variables: resolution (half-period, metres or px, see resolution_unit), resolved_to_nyquist,
    final_loss, wall_seconds, status (complete | skipped | failed), reason, run_id, best (the
    best configuration of each dataset, see `best_per_dataset`).
    """
    stores = [Path(s).expanduser().resolve() for s in stores]
    names = dataset_names(stores)
    keys = [k for k, _ in grid]
    shape = (len(stores), *[len(v) for _, v in grid])
    dims = ("dataset", *keys)
    num = {k: np.full(shape, np.nan) for k in ("resolution", "final_loss", "wall_seconds")}
    text = {k: np.full(shape, "", dtype=object) for k in ("status", "reason", "run_id", "unit")}
    text["status"][...] = "missing"
    flags = {k: np.zeros(shape, bool) for k in ("resolved_to_nyquist", "best")}
    best = best_per_dataset(outcomes)
    for i, o in enumerate(outcomes):
        label = dict(o.label)
        try:
            index = (
                stores.index(Path(o.store).resolve()),
                *[list(values).index(label[k]) for k, values in grid],
            )
        except (ValueError, KeyError):
            continue  # not part of this scan's grid
        num["resolution"][index] = o.resolution
        num["final_loss"][index] = o.final_loss
        num["wall_seconds"][index] = o.wall_seconds
        text["status"][index] = o.status
        text["reason"][index] = o.reason or ""
        text["run_id"][index] = o.run_id
        text["unit"][index] = o.resolution_unit or ""
        flags["resolved_to_nyquist"][index] = o.resolved_to_nyquist
        flags["best"][index] = i in best
    units = {u for u in text["unit"].ravel() if u}
    res_unit = units.pop() if len(units) == 1 else "see resolution_unit"
    coords: dict[str, Any] = {
        "dataset": ("dataset", np.array(names, dtype=object)),
        "store": ("dataset", np.array([str(s) for s in stores], dtype=object)),
    }
    for k, values in grid:
        arr = np.asarray(list(values))
        coords[k] = (k, arr.astype(object) if arr.dtype.kind in "USO" else arr)
    ds = xr.Dataset(
        {
            "resolution": (
                dims,
                num["resolution"],
                {"units": res_unit, "long_name": "FRC resolution (half-period, half-bit)"},
            ),
            "resolution_unit": (dims, text["unit"]),
            "resolved_to_nyquist": (dims, flags["resolved_to_nyquist"]),
            "final_loss": (dims, num["final_loss"], {"long_name": "final training loss"}),
            "wall_seconds": (dims, num["wall_seconds"], {"units": "s", "long_name": "run time"}),
            "status": (dims, text["status"]),
            "reason": (dims, text["reason"]),
            "run_id": (dims, text["run_id"]),
            "best": (dims, flags["best"], {"long_name": "best configuration of the dataset"}),
        },
        coords=coords,
        attrs={
            "grid": json.dumps({k: store.json_safe(list(v)) for k, v in grid}),
            "best_rule": "finest FRC resolution; ties or no resolution: lowest final loss",
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    return ds


def save_summary(summary: xr.Dataset, out_dir: Path) -> dict[str, Path]:
    """Write summary.zarr (Zarr v3) and summary.csv (one row per run) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    zarr_path = out_dir / "summary.zarr"
    summary.to_zarr(zarr_path, mode="w", consolidated=False, zarr_format=3)
    csv_path = out_dir / "summary.csv"
    frame = summary.to_dataframe().reset_index()
    frame.to_csv(csv_path, index=False)
    return {"zarr": zarr_path, "csv": csv_path}


def iter_grid(grid: Sequence[tuple[str, Sequence[Any]]]) -> Iterator[tuple[tuple[str, Any], ...]]:
    """Every point of the cartesian product of the grid, as ((key, value), ...)."""
    import itertools

    keys = [k for k, _ in grid]
    for values in itertools.product(*[list(v) for _, v in grid]):
        yield tuple(zip(keys, values, strict=True))
