"""Pipeline commands: run (reconstruction + FRC resolution per store), scan (datasets x
hyper-parameter grid, with a summary), results (what a store holds).

All three drive `ptyinr.graph` on the cluster `--cluster` names (`ptyinr.cluster.connect`:
local by default, `slurm:PROFILE`, or a scheduler address). Exit status: 0 when every run is
complete, 1 when any run failed (each failure is printed, recorded in its store when possible
and, for scans, in the summary), 2 for a mistake in the command line or config. With --json,
stdout holds only the JSON; progress and failures stay on stderr.

ptyinr.graph (torch, dask, distributed) is imported when a command runs, not for `--help`.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ptyinr.cli.common import (
    ConfigOption,
    JsonOption,
    ProbeGuessOption,
    SetOption,
    console,
    print_json,
    probe_guess_overrides,
    user_errors,
)
from ptyinr.errors import InputError

if TYPE_CHECKING:
    from ptyinr import graph

progress_console = Console(stderr=True)

# ptyinr.graph.DEFAULT_RETRIES, here so `--help` shows it without importing the graph (tested).
DEFAULT_RETRIES = 2

ClusterOption = Annotated[
    str,
    typer.Option(
        "--cluster",
        help="where to run: local, slurm:PROFILE, or a scheduler address tls://HOST:PORT "
        "(credentials from Dask's config distributed.comm.tls.*)",
    ),
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="allow a plain tcp:// scheduler address: no encryption or authentication, anyone "
        "who reaches it can run code as you; only on a network you trust",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="local: number of workers (default: one per GPU, else up to 4); slurm: max jobs",
    ),
]
NoFrcOption = Annotated[
    bool, typer.Option("--no-frc", help="skip the half-scan reconstructions and the FRC")
]
FiguresOption = Annotated[
    Path | None,
    typer.Option(
        "--figures",
        help="folder for PNGs (DIR/<store>/<run_id>/); default <store parent>/<store>.figures/",
    ),
]
PreprocessOption = Annotated[
    bool,
    typer.Option(
        "--preprocess",
        help="write the store's 'preprocessed' array first (centre of mass, store mask)",
    ),
]
FrameSizeOption = Annotated[
    str | None, typer.Option("--frame-size", help="with --preprocess: crop/pad to N or NY,NX")
]
BinningOption = Annotated[
    int, typer.Option("--binning", min=1, help="with --preprocess: sum b x b pixels")
]
RetriesOption = Annotated[
    int, typer.Option("--retries", min=0, help="retries of a task that raised an unexpected error")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no live progress display")]


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def _preprocess_options(enabled: bool, frame_size: str | None, binning: int) -> Any | None:
    if not enabled:
        if frame_size is not None or binning != 1:
            raise InputError("--frame-size / --binning need --preprocess")
        return None
    from ptyinr.preprocess import PreprocessOptions

    size = None
    if frame_size is not None:
        try:
            values = [int(v) for v in frame_size.lower().replace("x", ",").split(",")]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or min(values, default=0) < 1:
            raise InputError(f"--frame-size {frame_size!r}: expected N or NY,NX (positive)")
        size = (values[0], values[-1])
    return PreprocessOptions(frame_size=size, binning=binning)


def _connect(cluster: str, workers: int | None, insecure: bool = False):
    from ptyinr.cluster import connect, parse_cluster_spec

    kind = parse_cluster_spec(cluster).kind
    if kind == "local":
        return connect(cluster, n_workers=workers, insecure=insecure)
    if kind == "slurm":
        return connect(cluster, maximum_jobs=workers, insecure=insecure)
    if workers is not None:
        raise InputError(f"--workers {workers}: not applicable to an existing cluster ({cluster})")
    return connect(cluster, insecure=insecure)


def _execute(
    cluster: str,
    workers: int | None,
    specs: list[graph.RunSpec],
    retries: int,
    quiet: bool,
    insecure: bool = False,
) -> list[graph.RunOutcome]:
    from ptyinr import graph

    with _connect(cluster, workers, insecure) as client:
        return graph.run_graph(
            client, specs, retries=retries, console=None if quiet else progress_console
        )


def _run_spec(
    store: Path,
    config: Any,
    run_id: str,
    frc: bool,
    figures_dir: Path | None,
    force: bool,
    preprocess: Any | None,
    label: tuple = (),
) -> graph.RunSpec:
    """One node of the graph; figures go to FIGURES/<store stem>/<run id>."""
    from ptyinr import graph

    figures = figures_dir / store.name.removesuffix(".zarr") / run_id if figures_dir else None
    return graph.RunSpec(
        store=store,
        config=config,
        run_id=run_id,
        frc=frc,
        figures_dir=figures,
        force=force,
        label=label,
        preprocess=preprocess,
    )


def _status_text(o: graph.RunOutcome) -> str:
    if o.status == "failed":
        where = "" if o.recorded else " (not recorded in the store)"
        return f"[red]failed[/] at {o.stage}: {escape(o.reason or '')}{where}"
    if o.status == "skipped":
        return "[dim]complete (earlier)"
    note = f"[/] [yellow](figures: {escape(o.reason)})" if o.reason else ""
    return "[green]complete" + note


def _number(value: float, fmt: str = ".3g") -> str:
    return format(value, fmt) if math.isfinite(value) else "-"


def _resolution_text(o: graph.RunOutcome) -> str:
    from ptyinr import graph

    return graph.format_resolution(o)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def outcome_json(o: graph.RunOutcome) -> dict[str, Any]:
    """One run's outcome for --json: what the table shows, numbers as numbers (null: none)."""
    return {
        "store": str(o.store),
        "run_id": o.run_id,
        "status": o.status,
        "reason": o.reason,
        "stage": o.stage,
        "recorded": o.recorded,
        "resolution": _finite(o.resolution),
        "resolution_unit": o.resolution_unit,
        "resolved_to_nyquist": o.resolved_to_nyquist,
        "pixel_size": _finite(o.pixel_size),
        "final_loss": _finite(o.final_loss),
        "wall_seconds": _finite(o.wall_seconds),
        "figures_dir": o.figures_dir,
        "label": dict(o.label),
    }


def _exit_for(outcomes: list[graph.RunOutcome]) -> None:
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        progress_console.print(
            f"[bold red]{len(failed)} of {len(outcomes)} run(s) failed[/]", highlight=False
        )
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# ptyinr run
# --------------------------------------------------------------------------------------------


def run(
    stores: Annotated[list[Path], typer.Argument(metavar="STORE...", help="scan stores (.zarr)")],
    config: ConfigOption = None,
    set_: SetOption = None,
    no_frc: NoFrcOption = False,
    cluster: ClusterOption = "local",
    workers: WorkersOption = None,
    insecure: InsecureOption = False,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="name of the run (default: a timestamp)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="redo a --run-id that is already complete")
    ] = False,
    figures_dir: FiguresOption = None,
    preprocess: PreprocessOption = False,
    frame_size: FrameSizeOption = None,
    binning: BinningOption = 1,
    retries: RetriesOption = DEFAULT_RETRIES,
    quiet: QuietOption = False,
    probe_guess: ProbeGuessOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reconstruct each store and estimate its resolution (FRC), as one Dask graph.

    Per store: full reconstruction, two half-scan reconstructions, FRC between the halves,
    figures; results go to STORE/reconstructions/<run_id> (halves under half_a, half_b)."""
    from ptyinr.config import load_config
    from ptyinr.reconstruct import new_run_id, resolve_config

    with user_errors():
        # the engine's own settings and checks (e.g. a PtychoNN model that cannot be read)
        # before anything runs: one line, exit 2
        cfg = resolve_config(
            load_config(config, list(set_ or []) + probe_guess_overrides(probe_guess))
        )
        pre = _preprocess_options(preprocess, frame_size, binning)
        missing = [str(s) for s in stores if not s.exists()]
        if missing:
            raise InputError(f"store(s) not found: {', '.join(missing)}")
        if run_id is not None and (
            not run_id.strip()
            or "/" in run_id
            or run_id.startswith(".")
            or run_id != run_id.strip()
        ):
            raise InputError(f"--run-id {run_id!r}: expected a non-empty name without '/'")
        specs = [
            _run_spec(path, cfg, run_id or new_run_id(), not no_frc, figures_dir, force, pre)
            for path in stores
        ]
        outcomes = _execute(cluster, workers, specs, retries, quiet, insecure)
    if as_json:
        print_json([outcome_json(o) for o in outcomes])
        _exit_for(outcomes)
        return
    console.print(outcome_table("ptyinr run", outcomes))
    for o in outcomes:
        if o.figures_dir and o.status == "complete":
            console.print(f"figures of {o.store.name} {o.run_id}: {o.figures_dir}", highlight=False)
    _exit_for(outcomes)


# --------------------------------------------------------------------------------------------
# ptyinr scan
# --------------------------------------------------------------------------------------------


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """`key=v1,v2,...` items -> [(key, [values...])], values parsed as TOML literals."""
    from ptyinr.config import parse_override

    grid: list[tuple[str, list[Any]]] = []
    seen: set[str] = set()
    for item in items:
        if "=" not in item:
            raise InputError(
                f"--grid {item!r}: expected section.key=v1,v2 (e.g. train.epochs=100,300)"
            )
        key, raw = (s.strip() for s in item.split("=", 1))
        texts = [t.strip() for t in raw.split(",")]
        if not key or any(not t for t in texts):
            raise InputError(f"--grid {item!r}: expected section.key=v1,v2 with no empty value")
        if key in seen:
            raise InputError(
                f"--grid {item!r}: key {key!r} given twice; expected one --grid per key"
            )
        seen.add(key)
        values = [parse_override(f"{key}={t}")[1] for t in texts]
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise InputError(f"--grid {item!r}: repeated value; expected distinct values")
        grid.append((key, values))
    return grid


def _grid_override(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f"{key}={json.dumps(value)}"
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def expand_stores(patterns: list[str]) -> list[Path]:
    """Paths matching the glob patterns (sorted, without duplicates); InputError when none."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise InputError(f"{pattern!r} matches no path; expected scan stores (.zarr)")
        for m in matches:
            found.setdefault(Path(m).resolve(), None)
    return list(found)


def scan(
    patterns: Annotated[
        list[str], typer.Argument(metavar="'GLOB'...", help="scan stores, e.g. 'data/*.zarr'")
    ],
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", help="section.key=v1,v2,...: values to try (repeatable)"),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    no_frc: NoFrcOption = False,
    cluster: ClusterOption = "local",
    workers: WorkersOption = None,
    insecure: InsecureOption = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="folder for summary.zarr and summary.csv (default: ptyinr-scan-<time>)",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="redo runs already complete")] = False,
    figures_dir: FiguresOption = None,
    preprocess: PreprocessOption = False,
    frame_size: FrameSizeOption = None,
    binning: BinningOption = 1,
    retries: RetriesOption = DEFAULT_RETRIES,
    quiet: QuietOption = False,
    probe_guess: ProbeGuessOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run every store x every grid configuration as one Dask graph, and summarise them.

    The summary (summary.zarr, summary.csv, a table) has the FRC resolution, final loss and
    time of each run, the best configuration of each store marked. Run ids come from the
    configuration (cfg-<hash>): a re-run skips completed runs (unless --force)."""
    from ptyinr import graph
    from ptyinr.config import ReconstructionConfig, load_config
    from ptyinr.reconstruct import resolve_config

    with user_errors():
        parsed = parse_grid(list(grid or []))
        stores = expand_stores(patterns)
        base = list(set_ or []) + probe_guess_overrides(probe_guess)
        pre = _preprocess_options(preprocess, frame_size, binning)
        configs: list[tuple[tuple[tuple[str, Any], ...], ReconstructionConfig]] = []
        for point in graph.iter_grid(parsed):
            overrides = base + [_grid_override(k, v) for k, v in point]
            configs.append((point, resolve_config(load_config(config, overrides))))
        specs = [
            _run_spec(
                path,
                cfg,
                graph.config_run_id(cfg, frc=not no_frc, preprocess=pre),
                not no_frc,
                figures_dir,
                force,
                pre,
                label=point,
            )
            for path in stores
            for point, cfg in configs
        ]
        out_dir = out or Path(f"ptyinr-scan-{dt.datetime.now():%Y%m%d-%H%M%S}")
        progress_console.print(
            f"scan: {len(stores)} store(s) x {len(configs)} configuration(s) = {len(specs)} runs",
            highlight=False,
        )
        outcomes = _execute(cluster, workers, specs, retries, quiet, insecure)
        summary = graph.scan_summary(outcomes, stores, parsed)
        paths = graph.save_summary(summary, out_dir)
    if as_json:
        best = graph.best_per_dataset(outcomes)
        runs = [{**outcome_json(o), "best": i in best} for i, o in enumerate(outcomes)]
        print_json({"summary": {k: str(v) for k, v in paths.items()}, "runs": runs})
        _exit_for(outcomes)
        return
    console.print(_scan_table(outcomes, parsed))
    console.print(f"summary: {paths['zarr']} and {paths['csv']}", highlight=False)
    _exit_for(outcomes)


def _scan_table(outcomes: list[graph.RunOutcome], grid: list[tuple[str, list[Any]]]) -> Table:
    from ptyinr import graph

    best = graph.best_per_dataset(outcomes)
    stores = list(dict.fromkeys(o.store for o in outcomes))
    names = dict(zip(stores, graph.dataset_names(stores), strict=True))
    table = Table(title="ptyinr scan (★ = best configuration of the dataset)")
    table.add_column("dataset")
    for key, _ in grid:
        table.add_column(key, justify="right")
    for col in ("resolution", "final loss", "time (s)", "status", "best"):
        table.add_column(col, justify="right" if col != "status" else "left", overflow="fold")
    for i, o in enumerate(outcomes):
        label = dict(o.label)
        table.add_row(
            names[o.store],
            *[str(label.get(k, "")) for k, _ in grid],
            _resolution_text(o),
            _number(o.final_loss),
            _number(o.wall_seconds, ".1f"),
            _status_text(o),
            "★" if i in best else "",
        )
    return table


# --------------------------------------------------------------------------------------------
# ptyinr results
# --------------------------------------------------------------------------------------------


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_summary(config: dict[str, Any] | None) -> str:
    """The keys of a stored config that differ from the defaults, as key=value."""
    if not isinstance(config, dict):
        return "-"
    from ptyinr.config import ReconstructionConfig

    defaults = _flatten(ReconstructionConfig().model_dump())
    given = _flatten(config)
    diff = [
        f"{k}={v}"
        for k, v in given.items()
        if k in defaults and v != defaults[k] and k != "data.source"
    ]
    return ", ".join(diff) or "defaults"


def results(
    stores: Annotated[list[Path], typer.Argument(metavar="STORE...", help="scan stores")],
    as_json: JsonOption = False,
) -> None:
    """List the runs in each store: status, FRC resolution, final loss, created, config."""
    from ptyinr import graph, store

    with user_errors():
        listing = []
        for path in stores:
            store.open_scan_store(path)  # a clear error for a path that is not a scan store
            for run in store.list_runs(path):
                listing.append((path, run, graph.outcome_from_attrs(path, run)))
    if as_json:
        rows = [
            {
                "store": str(path),
                "run_id": run["run_id"],
                "status": run["status"],
                "resolution": None if not math.isfinite(o.resolution) else o.resolution,
                "resolution_unit": o.resolution_unit,
                "final_loss": None if not math.isfinite(o.final_loss) else o.final_loss,
                "created": run.get("created"),
                "reason": run.get("reason"),
                "config": config_summary(run.get("config")),
            }
            for path, run, o in listing
        ]
        print_json(rows)
        return
    table = Table(title="runs")
    for col in ("store", "run", "status", "resolution", "final loss", "created", "config"):
        table.add_column(col, overflow="fold")
    for path, run, o in listing:
        status = run["status"]
        if status == "failed":
            status = f"[red]failed[/]: {escape(str(run.get('reason', '')))}"
        elif status == "complete":
            status = "[green]complete"
        table.add_row(
            path.name,
            run["run_id"],
            status,
            _resolution_text(o),
            _number(o.final_loss),
            str(run.get("created") or ""),
            config_summary(run.get("config")),
        )
    console.print(table)
    if not listing:
        console.print("no runs yet")


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the `ptyinr` application."""
    app.command("run")(run)
    app.command("scan")(scan)
    app.command("results")(results)


def outcome_table(
    title: str, outcomes: Sequence[Any], skipped: Sequence[tuple[Path, str]] = ()
) -> Table:
    """The table of runs `run` and `preview` print: one row per outcome, and one per store
    `skipped` before it ran (with the reason)."""
    table = Table(title=title)
    for col in ("store", "run", "status", "resolution", "final loss", "time (s)"):
        table.add_column(col, overflow="fold")
    for path, reason in skipped:
        table.add_row(path.name, "-", f"[red]skipped: {escape(reason)}", "-", "-", "-")
    for o in outcomes:
        table.add_row(
            o.store.name,
            o.run_id,
            _status_text(o),
            _resolution_text(o),
            _number(o.final_loss),
            _number(o.wall_seconds, ".1f"),
        )
    return table
