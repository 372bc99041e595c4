"""Dask pipeline: scan wall time with 1 vs 2 local workers, and the Dask layer's overhead.

Four small simulated stores (default: 48 x 48 object, 16 x 16 frames, 225 positions), one
configuration (a narrow SIREN, `--epochs` full-batch epochs), each run = full + two half
reconstructions + FRC + results + figures, as `ptyinr scan` does. Measured, each on fresh
copies of the stores:

- graph, 1 worker / 2 workers: `ptyinr.graph.run_graph` on a LocalCluster started (and its
  workers warmed up: torch, matplotlib and the pipeline imported) before the clock starts;
  cluster start-up is reported separately;
- in-process: the graph's own stage functions called one after the other in this process
  (same work, same code, no scheduler): the Dask layer's overhead is graph(1) / in-process;
- engine only: `reconstruct_store` three times per store (full, half A, half B on the shared
  grid), nothing else: what FRC, figures and bookkeeping add on top of the engine.

Torch runs one thread per task in every measurement (`train.threads=1`), so the 1 vs 2
worker ratio is the parallelism of the graph alone (see the comment at FAST for why).

The graph runs also report worker utilisation (task compute time / (wall x workers), from
the task stream): whether the scheduler keeps every worker busy, whatever the machine. A CPU
calibration (a fixed numpy load in 1 vs 2 processes) says how much two cores of the machine
really run in parallel at the time: the 1 vs 2 worker ratio cannot beat it.

Each mode runs `--repeats` times, interleaved and rotated; the best (shortest) time is
reported, the ratios are of best times (the machine this ran on was shared).

    python benchmarks/bench_graph.py [--epochs 50] [--stores 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

FAST = [
    "model.siren_width=64",
    "model.siren_hidden_layers=2",
    "model.hash_levels=8",
    "model.hash_log2_table_size=12",
    "model.probe_init_steps=50",
    "train.lr_object=1e-3",
    "train.lr_probe=1e-3",
    # one torch thread per task everywhere: on a shared, loaded 2-core VM two OpenMP threads
    # spin-wait on each other (a 10-epoch run took 37-116 s in-process vs ~15 s single-threaded)
    "train.threads=1",
]


def make_stores(folder: Path, n: int, object_size: int) -> list[Path]:
    from ptyinr.simulate import SimulationConfig, write_simulated_store

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sim = SimulationConfig(
            object_size=object_size,
            probe_size=16,
            focus_fwhm_px=3,
            overlap=0.3,
            noise="poisson",
            alpha=100.0,
            seed=i,
        )
        paths.append(write_simulated_store(folder / f"scan{i}.zarr", sim))
    return paths


def fresh(template: list[Path], folder: Path) -> list[Path]:
    """Copies of the stores without any run (each measurement starts from the same state)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = []
    for p in template:
        shutil.copytree(p, folder / p.name)
        out.append(folder / p.name)
    return out


def specs_for(stores: list[Path], cfg) -> list:
    from ptyinr import graph

    rid = graph.config_run_id(cfg)
    return [graph.RunSpec(store=s, config=cfg, run_id=rid) for s in stores]


def _warm_up() -> None:
    """Import what the tasks import, so that no measurement pays a first import."""
    import importlib

    for name in ("torch", "matplotlib.figure", "ptyinr.reconstruct", "ptyinr.figures"):
        importlib.import_module(name)


def time_graph(stores: list[Path], cfg, workers: int) -> dict:
    from distributed import get_task_stream

    from ptyinr import graph
    from ptyinr.cluster import connect

    t0 = time.perf_counter()
    with connect("local", n_workers=workers, dashboard_address=None, quiet=True) as client:
        client.wait_for_workers(workers)
        client.run(_warm_up)
        started = time.perf_counter()
        with get_task_stream(client) as stream:
            outcomes = graph.run_graph(client, specs_for(stores, cfg))
        seconds = time.perf_counter() - started
    assert all(o.status == "complete" for o in outcomes), [o.reason for o in outcomes]
    busy = sum(
        ss["stop"] - ss["start"]
        for task in stream.data
        for ss in task["startstops"]
        if ss["action"] == "compute"
    )
    return {
        "seconds": seconds,
        "cluster_start_seconds": started - t0,
        "per_run_seconds": [o.wall_seconds for o in outcomes],
        "tasks": len(stream.data),
        # share of the workers' time spent computing tasks: 1.0 = never idle
        "worker_utilisation": busy / (seconds * workers),
    }


def _spin(_: int) -> float:
    """A fixed single-threaded CPU load (numpy matmul, BLAS on one thread)."""
    import numpy as np

    a = np.random.default_rng(0).random((300, 300))
    started = time.perf_counter()
    for _ in range(1000):
        a @ a
    return time.perf_counter() - started


def cpu_calibration() -> dict:
    """Wall time of 2 copies of a CPU load in 2 processes over 1 copy in 1: 1.0 means two
    cores really run two things at once, 2.0 means they do not (shared or busy CPUs)."""
    from multiprocessing import get_context

    with get_context("spawn").Pool(2) as pool:
        pool.map(_spin, range(2))  # start-up
        started = time.perf_counter()
        pool.map(_spin, range(1))
        one = time.perf_counter() - started
        started = time.perf_counter()
        pool.map(_spin, range(2))
        two = time.perf_counter() - started
    return {"one_process_seconds": one, "two_processes_seconds": two, "ratio": two / one}


def time_in_process(stores: list[Path], cfg) -> dict:
    """The graph's stage functions, called in order in this process (no Dask scheduler)."""
    from ptyinr import graph

    started = time.perf_counter()
    for spec in specs_for(stores, cfg):
        prepared = graph.prepare_task(spec, None)
        parts = [graph.reconstruct_task(spec, prepared, p) for p in graph.PARTS]
        frc = graph.frc_task(spec, prepared, parts[1], parts[2])
        outcome = graph.write_task(spec, prepared, *parts, frc)
        assert outcome.status == "complete", outcome.reason
    return {"seconds": time.perf_counter() - started}


def time_engine_only(stores: list[Path], cfg) -> dict:
    """reconstruct_store x 3 per store (full and the two halves on one grid), nothing else."""
    import numpy as np

    from ptyinr import evaluate
    from ptyinr.physics import ScanGeometry
    from ptyinr.reconstruct import load_scan, reconstruct_store

    started = time.perf_counter()
    for path in stores:
        loaded = load_scan(path, cfg)
        pos = loaded.data.positions_px
        shape = loaded.data.frame_shape
        full = ScanGeometry.from_positions(pos, shape)
        reconstruct_store(path, cfg, run_id="engine", progress=False, loaded=loaded)
        for name, idx in zip(("half_a", "half_b"), evaluate.half_split(pos), strict=True):
            geometry = ScanGeometry.from_positions(
                pos[idx], shape, object_shape=full.object_shape, origin_px=full.origin_px
            )
            reconstruct_store(
                path,
                cfg,
                run_id="engine",
                indices=np.asarray(idx),
                subgroup=name,
                geometry=geometry,
                progress=False,
                loaded=loaded,
            )
    return {"seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--object-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved; best is kept")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_graph"))
    args = parser.parse_args()

    import dask

    from ptyinr.config import load_config

    dask.config.set(scheduler="synchronous")  # this process's own store reads
    shutil.rmtree(args.workdir, ignore_errors=True)
    template = make_stores(args.workdir / "template", args.stores, args.object_size)
    cfg = load_config(overrides=[*FAST, f"train.epochs={args.epochs}"])
    _warm_up()  # as the workers are
    results: dict = {
        "stores": args.stores,
        "epochs": args.epochs,
        "object_size": args.object_size,
        "cores": len(os.sched_getaffinity(0)),
        "load_average_before": os.getloadavg(),
    }
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the calibration's BLAS
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    results["cpu_calibration_before"] = cpu_calibration()
    work = args.workdir / "work"
    modes = {
        "engine_only": lambda stores: time_engine_only(stores, cfg),
        "in_process": lambda stores: time_in_process(stores, cfg),
        "graph_1_worker": lambda stores: time_graph(stores, cfg, 1),
        "graph_2_workers": lambda stores: time_graph(stores, cfg, 2),
    }
    names = list(modes)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(args.repeats):  # interleaved, rotated: slow spells hit every mode
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            runs[name].append(modes[name](fresh(template, work)))
    best = {name: min(r["seconds"] for r in runs[name]) for name in names}
    results["runs"] = runs
    results["best_seconds"] = best
    results["load_average_after"] = os.getloadavg()
    results["cpu_calibration_after"] = cpu_calibration()
    results["ratio_1_over_2_workers"] = best["graph_1_worker"] / best["graph_2_workers"]
    results["ratio_graph1_over_in_process"] = best["graph_1_worker"] / best["in_process"]
    results["ratio_graph1_over_engine_only"] = best["graph_1_worker"] / best["engine_only"]
    results["ratio_in_process_over_engine_only"] = best["in_process"] / best["engine_only"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
