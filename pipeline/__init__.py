"""ptyinr: PtyINR ptychographic reconstruction at facility scale.

The public Python API (what the `ptyinr` command line is built on)::

    import ptyinr

    cfg = ptyinr.load_config("demo", ["train.epochs=50"])   # preset or TOML, then overrides
    ds = ptyinr.open_store("scan.zarr")                      # a scan store as xarray
    run_id, result = ptyinr.reconstruct_store("scan.zarr", cfg)   # fit, write, mark complete
    scores = ptyinr.evaluate.compare_object(result.object, ds["true_object"])
    result = ptyinr.fit(ptyinr.ScanData(frames, positions_px), cfg)   # in-memory data

Names are imported on first use, so `import ptyinr` stays light.

Where things live (imports point down this list; `lint-imports` checks it):
`cli` (the command line) -> `graph`, `jobscript` (Dask graph of run/scan; SLURM driver jobs)
-> `reconstruct`, `cluster` (store -> engine -> store; where the graph runs) -> `launch` (one
process or data-parallel ranks) -> `engines` (one module per method) -> `runtime` (device,
memory plan, precision, streaming, collectives), `probe_guess`, `ptychonn_train` ->
`ptychonn_data` -> `scandata`, `figures`, `export`, `simulate`, `preprocess`, `ingest` ->
`models`, `physics`, `optics`, `probe_files`, `losses`, `evaluate` -> `runlock` -> `store`,
`config` -> `geometry`, `batching`, `errors`, `version`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ptyinr.version import __version__

_API: dict[str, tuple[str, str | None]] = {
    "ReconstructionConfig": ("ptyinr.config", "ReconstructionConfig"),
    "load_config": ("ptyinr.config", "load_config"),
    "open_store": ("ptyinr.store", "open_scan_store"),
    "open_run": ("ptyinr.store", "open_run"),
    "list_runs": ("ptyinr.store", "list_runs"),
    "ScanData": ("ptyinr.scandata", "ScanData"),
    "Reconstruction": ("ptyinr.scandata", "Reconstruction"),
    "load_scan": ("ptyinr.scandata", "load_scan"),
    "fit": ("ptyinr.launch", "fit"),
    "reconstruct_store": ("ptyinr.reconstruct", "reconstruct_store"),
    "ENGINES": ("ptyinr.engines", "ENGINES"),
    "SimulationConfig": ("ptyinr.simulate", "SimulationConfig"),
    "simulate_scan": ("ptyinr.simulate", "simulate_scan"),
    "evaluate": ("ptyinr.evaluate", None),
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'ptyinr' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
    return sorted(__all__)
