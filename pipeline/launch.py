"""Launch an engine: on this process, or data-parallel on several (one per device).

`build_engine` is the one place an engine is put together: the configuration as the engine
runs it, the scan geometry, the runtime (ptyinr.runtime.resolve_runtime: device, memory plan,
precision, ranks) and the engine class `model.method` names (ptyinr.engines). `fit` runs it
here, or on `world_size` ranks:

- `fit_spawned`: K local processes (torch.multiprocessing spawn), rendezvous through a file
  store in a temporary folder (no ports); `ptyinr reconstruct --processes K` (CPU, Gloo) /
  `--gpus K` (one GPU per process, NCCL).
- `fit_on_workers`: K tasks pinned to K Dask workers (each with resources GPU=1 when the
  workers have GPUs). Rank 0 opens a TCP store on a free port of its host and publishes
  host:port through a `distributed.Variable`; the other ranks read it.

Every rank builds the same engine (same seed; parameters are also broadcast from rank 0) and
walks the same seeded schedule of global batches; how a rank takes its share of a batch and
all-reduces its gradients is in ptyinr.runtime.collectives. Rank 0 reports progress, writes
checkpoints and returns the result.

Live progress (ptyinr.events): the current reporter of the launching task (set by
ptyinr.reconstruct) travels with the job, and rank 0 sends the events a fit in this process
sends (epochs, probe warm start, a refit): a Dask rank straight to the scheduler through its
worker; a spawned rank into a queue that the launching process drains while it waits and
forwards through its reporter (a spawned process is no Dask worker). Snapshots
(train.snapshot_every) are not taken in a data-parallel fit.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import secrets
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist

from ptyinr import events
from ptyinr.config import ReconstructionConfig
from ptyinr.engines import Engine, get_engine
from ptyinr.errors import InputError, ReconstructionFailed
from ptyinr.physics import ScanGeometry
from ptyinr.runtime import ParallelContext, resolve_runtime, select_device
from ptyinr.scandata import Reconstruction, ScanData, labelled_result, scan_geometry

DEFAULT_TIMEOUT_S = 600.0  # a rank waits this long for the others (rendezvous, collectives)


# --------------------------------------------------------------------------------- one process


def engine_config(config: ReconstructionConfig) -> ReconstructionConfig:
    """The configuration as the engine `model.method` names runs it (ConfigError when no
    engine has that name)."""
    return get_engine(config.model.method).resolve_config(config)


def build_engine(
    data: ScanData,
    config: ReconstructionConfig,
    *,
    known_probe: np.ndarray | None = None,
    geometry: ScanGeometry | None = None,
    parallel: ParallelContext | None = None,
    device: torch.device | None = None,
) -> Engine:
    """The engine `model.method` names, with its geometry and runtime resolved here."""
    engine_cls = get_engine(config.model.method)
    config = engine_cls.resolve_config(config)
    geometry = geometry or scan_geometry(data.positions_px, data.frame_shape, config)
    runtime = resolve_runtime(
        data,
        config,
        geometry,
        known_probe=known_probe is not None,
        device=device,
        parallel=parallel,
    )
    return engine_cls(data, config, geometry, runtime, known_probe=known_probe)


def fit(
    data: ScanData,
    config: ReconstructionConfig,
    *,
    known_probe: np.ndarray | None = None,
    geometry: ScanGeometry | None = None,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    description: str = "reconstructing",
    on_epoch: Callable[[int, float], None] | None = None,
    on_start: Callable[[], None] | None = None,
    snapshot_every: int = 0,
    on_snapshot: Callable[[int, Reconstruction], None] | None = None,
    world_size: int = 1,
    client: Any = None,
) -> Reconstruction:
    """Reconstruct object and probe from a scan's data: in this process, or data-parallel on
    `world_size` Dask workers of `client` (when given) or local processes.

    In this process, `on_start()` is called once the engine is built (its epochs start),
    `on_epoch(epoch, loss)` after every epoch, and `on_snapshot(epoch, result)` every
    `snapshot_every` epochs before the last with the current object and probe (a look at a
    running fit; ptyinr.reconstruct writes it into the run group). The data-parallel paths
    do not call these hooks (they are this process's): their rank 0 reports its epochs to
    the current ptyinr.events reporter instead, and takes no snapshots.
    """
    if world_size > 1 or client is not None:
        get_engine(config.model.method).check_ranks(world_size)
        return fit_parallel(
            data,
            config,
            world_size,
            client=client,
            known_probe=known_probe,
            geometry=geometry,
            checkpoint_path=checkpoint_path,
            progress=progress,
            description=description,
            reporter=events.current(),
        )
    engine = build_engine(data, config, known_probe=known_probe, geometry=geometry)
    if on_start is not None:
        on_start()
    hook = on_epoch
    if on_snapshot is not None and snapshot_every > 0:
        hook = _with_snapshots(engine, on_epoch, snapshot_every, on_snapshot)
    return engine.fit(
        checkpoint_path=checkpoint_path,
        progress=progress,
        description=description,
        on_epoch=hook,
    )


def engine_snapshot(engine: Engine) -> Reconstruction:
    """The engine's current object, probe and loss curve, labelled like a result (the
    bookkeeping of `Engine.result` is left out: it is not a result)."""
    with torch.no_grad():
        obj, probe = engine.current_object(), engine.current_probe()
    history = [float(v) for v in engine.loss_history]
    info = {
        "method": engine.name,
        "snapshot_epoch": int(engine.epoch),
        "epochs": int(engine.config.train.epochs),
        "snapshot_loss": history[-1] if history else float("nan"),
    }
    return labelled_result(obj, probe, history, engine.geometry, engine.data.pixel_size, info)


def _with_snapshots(
    engine: Engine,
    on_epoch: Callable[[int, float], None] | None,
    every: int,
    on_snapshot: Callable[[int, Reconstruction], None],
) -> Callable[[int, float], None]:
    """An on_epoch hook that also hands `on_snapshot` a snapshot every `every` epochs (not
    at the last: the result itself follows)."""
    last = engine.config.train.epochs

    def hook(epoch: int, loss: float) -> None:
        if on_epoch is not None:
            on_epoch(epoch, loss)
        if epoch % every == 0 and epoch < last:
            on_snapshot(epoch, engine_snapshot(engine))

    return hook


# --------------------------------------------------------------------------------- one rank


@dataclass
class RankJob:
    """Everything a rank needs to train (picklable: it travels to spawned processes and to
    Dask workers). `frames` replaces data.intensities when given (shared-memory tensor)."""

    data: ScanData
    config: ReconstructionConfig
    world_size: int
    known_probe: np.ndarray | None = None
    geometry: ScanGeometry | None = None
    checkpoint_path: Path | None = None
    progress: bool = False
    description: str = "reconstructing"
    use_cuda: bool = False
    threads: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    frames: torch.Tensor | None = None
    #: rank 0's live progress (ptyinr.events; a copy for its process), None: none
    reporter: events.Reporter | None = None


def backend_for(use_cuda: bool) -> str:
    return "nccl" if use_cuda else "gloo"


def run_rank(job: RankJob, rank: int, store: dist.Store, local_device: int = 0) -> Any:
    """Train as rank `rank` of `job.world_size` (process group from `store`); rank 0 returns
    the Reconstruction, the others None."""
    if job.threads > 0 and job.config.train.threads == 0:
        torch.set_num_threads(job.threads)
    device = None
    if job.use_cuda:
        torch.cuda.set_device(local_device)
        device = torch.device("cuda", local_device)
    data = job.data
    if job.frames is not None:
        data = replace(data, intensities=job.frames.numpy())
    dist.init_process_group(
        backend_for(job.use_cuda),
        store=store,
        rank=rank,
        world_size=job.world_size,
        timeout=dt.timedelta(seconds=job.timeout_s),
        **({"device_id": device} if job.use_cuda else {}),
    )
    reporter = job.reporter if rank == 0 else None
    try:
        with events.reporting(reporter):  # the probe warm start and a refit report to it
            engine = build_engine(
                data,
                job.config,
                known_probe=job.known_probe,
                geometry=job.geometry,
                parallel=ParallelContext(rank, job.world_size),
                device=device,
            )
            if reporter is not None:
                reporter.fit_started()
            result = engine.fit(
                checkpoint_path=job.checkpoint_path,
                progress=job.progress and rank == 0,
                description=job.description,
                on_epoch=None if reporter is None else reporter.epoch,
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


# --------------------------------------------------------------------------------- spawn


def _spawn_entry(rank: int, job: RankJob, folder: str) -> None:
    store = dist.FileStore(os.path.join(folder, "rendezvous"), job.world_size)
    try:
        result = run_rank(job, rank, store, local_device=rank)
    except BaseException as exc:  # hand the error to the parent, then fail this process
        # atomically: the parent terminates the other ranks as soon as one fails
        tmp = os.path.join(folder, f"error-{rank}.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump((type(exc).__name__, str(exc), traceback.format_exc()), fh)
        os.replace(tmp, os.path.join(folder, f"error-{rank}.pkl"))
        raise
    if rank == 0:
        tmp = os.path.join(folder, "result.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(result, fh)
        os.replace(tmp, os.path.join(folder, "result.pkl"))


def _share(data: ScanData) -> tuple[ScanData, torch.Tensor | None]:
    """In-memory frames go to the children through shared memory, not K pickled copies."""
    frames = data.intensities
    if not isinstance(frames, np.ndarray):
        return data, None
    tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).share_memory_()
    light = replace(data, intensities=np.empty((frames.shape[0], 0, 0), np.float32))
    return light, tensor


def fit_spawned(
    data: ScanData,
    config: ReconstructionConfig,
    world_size: int,
    *,
    use_cuda: bool = False,
    known_probe: np.ndarray | None = None,
    geometry: ScanGeometry | None = None,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    description: str = "reconstructing",
    threads_per_process: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    reporter: events.Reporter | None = None,
) -> Reconstruction:
    """Train one reconstruction in `world_size` local processes (Gloo on CPU; NCCL with one
    GPU per process when use_cuda); returns rank 0's Reconstruction. Rank 0's live events
    come back through a queue and go out through `reporter` here."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise InputError(f"processes = {world_size}: expected at least 1")
    if use_cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if world_size > available:
            raise InputError(f"--gpus {world_size}: torch sees {available} CUDA device(s) here")
    if threads_per_process is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        threads_per_process = max(1, cores // world_size)
    light, frames = _share(data)
    sent = None if reporter is None else mp.get_context("spawn").SimpleQueue()
    job = RankJob(
        data=light,
        config=config,
        world_size=world_size,
        known_probe=known_probe,
        geometry=geometry,
        checkpoint_path=checkpoint_path,
        progress=progress,
        description=description,
        use_cuda=use_cuda,
        threads=threads_per_process,
        timeout_s=timeout_s,
        frames=frames,
        reporter=None if reporter is None or sent is None else reporter.for_process(sent.put),
    )
    with tempfile.TemporaryDirectory(prefix="ptyinr-ddp-") as folder:
        try:
            ranks = mp.spawn(_spawn_entry, args=(job, folder), nprocs=world_size, join=False)
            while not ranks.join(timeout=_FORWARD_EVERY_S):
                _forward(sent, reporter)
            _forward(sent, reporter)
        except Exception as exc:
            _raise_rank_error(folder, world_size, exc)
        with open(os.path.join(folder, "result.pkl"), "rb") as fh:
            return pickle.load(fh)


_FORWARD_EVERY_S = 0.25  # how often the launching process passes on a spawned rank's events


def _forward(sent: Any, reporter: events.Reporter | None) -> None:
    """Pass the events a spawned rank 0 queued on through `reporter` (in this process: the
    Dask task's worker, or the reporter's sink)."""
    if sent is None or reporter is None:
        return
    while not sent.empty():
        try:
            msg = sent.get()
        except (EOFError, OSError):  # a rank died mid-message
            return
        if isinstance(msg, dict):
            reporter.forward(msg)


def _raise_rank_error(folder: str, world_size: int, exc: Exception) -> None:
    """Re-raise a rank's user-facing error as itself; anything else as a RuntimeError."""
    for rank in range(world_size):
        path = os.path.join(folder, f"error-{rank}.pkl")
        try:
            with open(path, "rb") as fh:
                name, message, text = pickle.load(fh)
        except (OSError, EOFError, pickle.UnpicklingError):
            continue  # this rank did not fail (or was stopped while reporting)
        for kind in (InputError, ReconstructionFailed):
            if name == kind.__name__ or (
                kind is InputError and name in ("ConfigError", "StoreError")
            ):
                raise kind(message) from None
        raise RuntimeError(f"rank {rank} failed: {name}: {message}\n{text}") from exc
    raise RuntimeError(f"data-parallel training failed: {exc}") from exc


# --------------------------------------------------------------------------------- Dask


def _worker_host() -> str:
    from distributed import get_worker

    return urlparse(get_worker().address).hostname or "127.0.0.1"


def _dask_rank(job: RankJob, rank: int, rendezvous: str) -> Any:
    """A Dask task: rendezvous through the scheduler, then train as `rank`."""
    from distributed import Variable

    variable = Variable(rendezvous)
    timeout = dt.timedelta(seconds=job.timeout_s)
    if rank == 0:
        host = _worker_host()
        store: dist.Store = dist.TCPStore(
            host, 0, job.world_size, True, timeout=timeout, wait_for_workers=False
        )
        variable.set(f"{host}:{store.port}")
    else:
        address = str(variable.get(timeout=job.timeout_s))
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), job.world_size, False, timeout=timeout)
    # a GPU worker sees exactly its own GPU (cluster.WorkerSetup sets CUDA_VISIBLE_DEVICES)
    return run_rank(job, rank, store, local_device=0)


def pick_workers(client: Any, world_size: int, gpus: bool, timeout_s: float) -> list[str]:
    """`world_size` distinct worker addresses (with a GPU resource when gpus)."""

    def eligible() -> list[str]:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        return sorted(
            addr
            for addr, info in workers.items()
            if not gpus or info.get("resources", {}).get("GPU", 0) >= 1
        )

    found = eligible()
    if len(found) < world_size:
        try:
            client.wait_for_workers(world_size, timeout=timeout_s)
        except TimeoutError:
            pass
        found = eligible()
    if len(found) < world_size:
        what = "GPU workers" if gpus else "workers"
        raise InputError(
            f"a {world_size}-process reconstruction needs {world_size} {what}; the cluster "
            f"has {len(found)}"
        )
    return found[:world_size]


def fit_on_workers(
    client: Any,
    data: ScanData,
    config: ReconstructionConfig,
    world_size: int,
    *,
    known_probe: np.ndarray | None = None,
    geometry: ScanGeometry | None = None,
    checkpoint_path: Path | None = None,
    description: str = "reconstructing",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    reporter: events.Reporter | None = None,
) -> Reconstruction:
    """Train one reconstruction as `world_size` tasks on distinct Dask workers.

    Rank 0 sends `reporter`'s live events from its worker to the scheduler (the topic every
    driver subscribes to); a sink of `reporter` does not travel (it is this process's).

    Workers with a GPU resource get one rank each (NCCL); CPU workers use Gloo. `data` should
    be lazy (dask-backed frames from the store: each rank reads only what it needs, see
    data.stream) or small; it is sent to every rank.
    """
    workers_info = client.scheduler_info(n_workers=-1).get("workers", {})
    gpus = any("GPU" in w.get("resources", {}) for w in workers_info.values())
    resources = {"GPU": 1} if gpus else {}
    workers = pick_workers(client, world_size, gpus, timeout_s)
    token = secrets.token_hex(6)
    rendezvous = f"ptyinr-rendezvous-{token}"
    job = RankJob(
        data=data,
        config=config,
        world_size=world_size,
        known_probe=known_probe,
        geometry=geometry,
        checkpoint_path=checkpoint_path,
        progress=False,
        description=description,
        use_cuda=gpus,
        threads=0,
        timeout_s=timeout_s,
        reporter=None if reporter is None else reporter.for_process(None),
    )
    futures = [
        client.submit(
            _dask_rank,
            job,
            rank,
            rendezvous,
            key=f"ptyinr-rank-{rank}-{token}",
            workers=[address],
            allow_other_workers=False,
            resources=resources or None,
            pure=False,
            retries=0,
        )
        for rank, address in enumerate(workers)
    ]
    try:
        results = client.gather(futures)
    finally:
        try:
            from distributed import Variable

            Variable(rendezvous, client=client).delete()
        except Exception:  # pragma: no cover - cleanup only
            pass
    return results[0]


def choose_ranks(
    processes: int, gpus: int, config: ReconstructionConfig
) -> tuple[int, ReconstructionConfig]:
    """`--processes K` (CPU, Gloo) or `--gpus K` (CUDA, NCCL) -> (ranks, config with the
    matching train.device). InputError for both at once, or a device that contradicts."""
    if processes < 1 or gpus < 0:
        raise InputError(f"--processes {processes} / --gpus {gpus}: expected K >= 1")
    if gpus and processes > 1:
        raise InputError("--gpus and --processes: choose one (--gpus K runs K processes)")
    if not gpus:
        if processes > 1 and config.train.device == "cuda":
            raise InputError("--processes K trains on CPU; use --gpus K for CUDA devices")
        if processes == 1:
            return 1, config
        return processes, config.model_copy(
            update={"train": config.train.model_copy(update={"device": "cpu"})}
        )
    if config.train.device == "cpu":
        raise InputError("--gpus K with train.device = cpu: drop --device cpu or use --processes")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > available:
        raise InputError(f"--gpus {gpus}: torch sees {available} CUDA device(s) on this machine")
    cuda = config.model_copy(update={"train": config.train.model_copy(update={"device": "cuda"})})
    return gpus, cuda


def fit_parallel(
    data: ScanData,
    config: ReconstructionConfig,
    world_size: int,
    *,
    client: Any = None,
    known_probe: np.ndarray | None = None,
    geometry: ScanGeometry | None = None,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    description: str = "reconstructing",
    reporter: events.Reporter | None = None,
) -> Reconstruction:
    """Data-parallel fit: on `world_size` Dask workers of `client`, else in local processes
    (one CUDA device per process when train.device resolves to CUDA, else Gloo on CPU).
    Rank 0 reports its epochs to `reporter` (ptyinr.events)."""
    if client is not None:
        return fit_on_workers(
            client,
            data,
            config,
            world_size,
            known_probe=known_probe,
            geometry=geometry,
            checkpoint_path=checkpoint_path,
            description=description,
            reporter=reporter,
        )
    use_cuda = select_device(config.train.device).type == "cuda"
    return fit_spawned(
        data,
        config,
        world_size,
        use_cuda=use_cuda,
        known_probe=known_probe,
        geometry=geometry,
        checkpoint_path=checkpoint_path,
        progress=progress,
        description=description,
        reporter=reporter,
    )


__all__ = [
    "RankJob",
    "build_engine",
    "choose_ranks",
    "engine_config",
    "engine_snapshot",
    "fit",
    "fit_on_workers",
    "fit_parallel",
    "fit_spawned",
    "pick_workers",
    "run_rank",
]
