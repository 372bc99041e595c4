"""Data commands: ingest, ingest-archive, catalog, info, preprocess.

The readers, the store (xarray, h5py, numpy, scipy) and matplotlib are imported when a command
runs, not for `ptyinr --help`.
"""

from __future__ import annotations

import contextlib
import csv
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ptyinr.cli.common import (
    DcPosition,
    JsonOption,
    Negative,
    OverwriteAlias,
    Parallel,
    PositionsOrder,
    PositionsUnit,
    choice_option,
    fail,
    parse_choice,
    print_json,
)
from ptyinr.errors import IngestError, InputError

err = Console(stderr=True)
out = Console()


_fail = fail


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM (a batch system's kill, `kill PID`) into an exception in the main thread,
    so an interrupted ingest removes its hidden partial store like any other failure.
    (SIGKILL cannot be caught: a later ingest into the same directory sweeps what it left.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse_keys(items: list[str] | None) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(
                f"--key {item!r}; expected NAME=VALUE, e.g. intensities=/entry/data/data"
            )
        keys[name.strip()] = value.strip()
    return keys


def _conversions(**kw: Any):
    from ptyinr.ingest import Conversions

    choices = {
        "dc": (DcPosition, "--dc"),
        "positions_unit": (PositionsUnit, "--positions-unit"),
        "positions_order": (PositionsOrder, "--positions-order"),
        "negative": (Negative, "--negative"),
    }
    for name, (enum, option) in choices.items():
        kw[name] = parse_choice(enum, kw.get(name), option)
    conv = Conversions(**{k: v for k, v in kw.items() if v is not None})
    conv.validate()
    return conv


# Shared options of ingest and ingest-archive.
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="Reader: auto (sniff the file), or a reader name: ptyinr_h5, cxi, npz, hdf5 "
        "(or one a site added to ptyinr.ingest).",
    ),
]
KeyOpt = Annotated[
    list[str] | None,
    typer.Option("--key", "-k", help="Key map entry NAME=VALUE (HDF5 path, path@attr, number)."),
]
AmpOpt = Annotated[
    bool | None,
    typer.Option(
        "--amplitude/--counts",
        help="Frames hold sqrt(counts) (squared on the way in), or counts. Default: the reader's.",
    ),
]
DcOpt = Annotated[
    str | None,
    choice_option(
        DcPosition,
        "--dc",
        help="Where the zero frequency sits in the file's frames (auto: decide from them).",
    ),
]
UnitOpt = Annotated[
    str | None,
    choice_option(
        PositionsUnit, "--positions-unit", help="Positions unit in the file (px: keep pixel units)."
    ),
]
OrderOpt = Annotated[
    str | None,
    choice_option(PositionsOrder, "--positions-order", help="Positions column order in the file."),
]
TransposeOpt = Annotated[
    bool | None,
    typer.Option("--transpose/--no-transpose", help="Swap the detector's y and x axes."),
]
FlipYOpt = Annotated[
    bool | None,
    typer.Option(
        "--flip-y/--no-flip-y", help="Mirror the detector's y axis (about the DC pixel N // 2)."
    ),
]
FlipXOpt = Annotated[
    bool | None,
    typer.Option(
        "--flip-x/--no-flip-x", help="Mirror the detector's x axis (about the DC pixel N // 2)."
    ),
]
NegOpt = Annotated[
    str | None,
    choice_option(
        Negative, "--negative", help="Negative counts: refuse them (error) or set them to 0."
    ),
]
DupOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-duplicate-positions/--no-duplicate-positions",
        help="Accept repeated positions (e.g. repeated exposures), or refuse them.",
    ),
]
EntryOpt = Annotated[
    str | None,
    typer.Option(
        help="entry group: CXI (default entry_1) or NeXus (default: the NXptycho NXentry)"
    ),
]
ShardOpt = Annotated[int | None, typer.Option(help="Frames per Zarr shard (default ~32 MB).")]


def ingest(
    src: Annotated[Path, typer.Argument(help="Source file (HDF5, CXI, NPZ).")],
    out_store: Annotated[Path, typer.Argument(metavar="OUT.zarr", help="Scan store to create.")],
    format: FormatOpt = "auto",
    key: KeyOpt = None,
    amplitude: AmpOpt = None,
    dc: DcOpt = None,
    positions_unit: UnitOpt = None,
    positions_order: OrderOpt = None,
    transpose: TransposeOpt = None,
    flip_y: FlipYOpt = None,
    flip_x: FlipXOpt = None,
    negative: NegOpt = None,
    allow_duplicate_positions: DupOpt = None,
    entry: EntryOpt = None,
    scan_id: Annotated[str | None, typer.Option(help="Scan id (default: file stem).")] = None,
    frames_per_shard: ShardOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing store.")] = False,
    overwrite: OverwriteAlias = False,
) -> None:
    """Ingest one scan file into a Zarr scan store (streamed, checked, converted)."""
    from ptyinr import store as scan_store
    from ptyinr.ingest import ingest_file

    try:
        conv = _conversions(
            amplitude=amplitude,
            dc=dc,
            positions_unit=positions_unit,
            positions_order=positions_order,
            transpose=transpose,
            flip_y=flip_y,
            flip_x=flip_x,
            negative=negative,
            allow_duplicate_positions=allow_duplicate_positions,
        )
        keys = _parse_keys(key)
        with _terminate_cleanly():
            try:
                path = ingest_file(
                    src,
                    out_store,
                    format=format,
                    keys=keys,
                    conversions=conv,
                    options={"entry": entry} if entry else None,
                    scan_id=scan_id,
                    frames_per_shard=frames_per_shard,
                    overwrite=force or overwrite,
                )
            except InputError:
                raise
            except Exception as exc:  # a file that breaks a library: still one line, exit 2
                from ptyinr.ingest.core import unexpected_error

                raise IngestError(unexpected_error(str(src), exc)) from exc
        _print_summary(scan_store.open_scan_store(path))
    except InputError as exc:
        raise _fail(exc) from None


def ingest_archive(
    pattern: Annotated[str, typer.Argument(metavar="GLOB", help="Quoted glob of source files.")],
    outdir: Annotated[Path, typer.Argument(help="Directory of stores and catalog.zarr.")],
    format: FormatOpt = "auto",
    key: KeyOpt = None,
    amplitude: AmpOpt = None,
    dc: DcOpt = None,
    positions_unit: UnitOpt = None,
    positions_order: OrderOpt = None,
    transpose: TransposeOpt = None,
    flip_y: FlipYOpt = None,
    flip_x: FlipXOpt = None,
    negative: NegOpt = None,
    allow_duplicate_positions: DupOpt = None,
    entry: EntryOpt = None,
    frames_per_shard: ShardOpt = None,
    parallel: Annotated[
        str,
        choice_option(
            Parallel,
            "--parallel",
            help="Run files in processes (Dask LocalCluster), threads, or one by one (sync).",
        ),
    ] = Parallel.processes.value,
    workers: Annotated[int | None, typer.Option(help="Parallel files (default: cores).")] = None,
) -> None:
    """Ingest many files in parallel: one store each plus a catalog; exit 2 if any failed."""
    from ptyinr.ingest import ingest_archive as run_archive

    try:
        conv = _conversions(
            amplitude=amplitude,
            dc=dc,
            positions_unit=positions_unit,
            positions_order=positions_order,
            transpose=transpose,
            flip_y=flip_y,
            flip_x=flip_x,
            negative=negative,
            allow_duplicate_positions=allow_duplicate_positions,
        )
        with _terminate_cleanly():
            report = run_archive(
                pattern,
                outdir,
                format=format,
                keys=_parse_keys(key),
                conversions=conv,
                options={"entry": entry} if entry else None,
                frames_per_shard=frames_per_shard,
                parallel=str(parse_choice(Parallel, parallel, "--parallel")),
                n_workers=workers,
            )
    except InputError as exc:
        raise _fail(exc) from None
    for line in report.lines():
        style = "red" if line.startswith("FAILED") else None
        out.print(line, style=style, highlight=False, soft_wrap=True, markup=False)
    n_fail = len(report.failed)
    n_skip = sum(r.get("action") == "skipped" for r in report.rows)
    out.print(
        f"{len(report.rows)} files: {len(report.rows) - n_fail - n_skip} ingested, "
        f"{n_skip} unchanged, {n_fail} failed; catalog {report.catalog}",
        highlight=False,
    )
    if n_fail:
        raise typer.Exit(2)


def catalog(
    outdir: Annotated[Path, typer.Argument(help="Directory written by ingest-archive.")],
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="Also write the table as CSV ('-': stdout).")
    ] = None,
) -> None:
    """Show the catalog of an archive directory."""
    from ptyinr.ingest import read_catalog
    from ptyinr.ingest.catalog import COLUMNS, catalog_path

    try:
        if not catalog_path(outdir).exists():
            raise InputError(
                f"{catalog_path(outdir)}: does not exist; expected a directory "
                "written by `ptyinr ingest-archive`"
            )
        rows = read_catalog(outdir)
    except InputError as exc:
        raise _fail(exc) from None
    if csv_path is not None:
        fh = sys.stdout if str(csv_path) == "-" else open(csv_path, "w", newline="")
        try:
            writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
        finally:
            if fh is not sys.stdout:
                fh.close()
        if str(csv_path) == "-":
            return
    table = Table(title=f"{len(rows)} scans in {outdir}")
    for col in ("scan_id", "status", "frames", "frame", "wavelength_m", "source", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        frame = f"{r['frame_y']}x{r['frame_x']}" if r["frame_y"] else ""
        table.add_row(
            r["scan_id"] or "",
            r["status"] or "",
            str(r["frames"] or ""),
            frame,
            f"{r['wavelength_m']:.4g}" if r["wavelength_m"] else "-",
            r["source"] or "",
            r["error"] or "",
            style="red" if r["status"] == "failed" else None,
        )
    out.print(table)


def scan_facts(ds) -> dict[str, Any]:
    """Summary plus scan extent and overlap (the paper's ratio: 1 - step / frame width)."""
    import numpy as np
    from scipy.spatial import cKDTree

    from ptyinr import store as scan_store

    facts = scan_store.store_summary(ds)
    shape = tuple(facts["frame_shape"])
    px = scan_store.positions_px(ds, shape)
    facts["extent_px"] = np.ptp(px, axis=0).tolist()
    size = facts.get("object_pixel_size_m")
    if size:
        facts["extent_m"] = (np.ptp(px, axis=0) * np.asarray(size)).tolist()
    if len(px) > 1:
        d, _ = cKDTree(px).query(px, k=2)
        step = float(np.median(d[:, 1]))
        facts["median_step_px"] = step
        facts["overlap_ratio"] = 1.0 - step / float(min(shape))
    facts["runs"] = len(scan_store.list_runs(ds.encoding["source"]))
    return facts


def _print_summary(ds, facts: dict[str, Any] | None = None) -> None:
    f = facts if facts is not None else scan_facts(ds)
    table = Table(title=f"scan {f['scan_id']}", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return " x ".join(fmt(x) for x in v)
        return "-" if v is None else str(v)

    rows = [
        ("frames", f["frames"]),
        ("frame shape (y, x)", f["frame_shape"]),
        ("dtype", f["dtype"]),
        ("wavelength [m]", f["wavelength_m"]),
        ("detector distance [m]", f["detector_distance_m"]),
        ("detector pixel [m]", f["detector_pixel_size_m"]),
        ("object pixel (y, x) [m]", f.get("object_pixel_size_m")),
        ("positions unit", f["positions_unit"]),
        ("scan extent (y, x) [px]", f["extent_px"]),
        ("scan extent (y, x) [m]", f.get("extent_m")),
        ("median step [px]", f.get("median_step_px")),
        ("overlap ratio (1 - step/frame)", f.get("overlap_ratio")),
        ("mask", f["has_mask"]),
        ("preprocessed", f["has_preprocessed"]),
        ("reconstructions", f["runs"]),
        ("source", f["source"]),
        ("source sha256", f["source_sha256"]),
    ]
    for k, v in rows:
        table.add_row(escape(k), escape(fmt(v)))
    out.print(table)


def plot_store(ds, outdir: Path) -> list[Path]:
    """PNG of the scan positions and of the mean diffraction pattern (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ptyinr import store as scan_store

    outdir.mkdir(parents=True, exist_ok=True)
    sid = ds.attrs.get("scan_id") or "scan"
    shape = tuple(int(s) for s in ds[scan_store.INTENSITIES].shape[1:])
    pos = scan_store.positions_px(ds, shape)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(pos[:, 1], pos[:, 0], "-", color="0.8", lw=0.5)
    sc = ax.scatter(pos[:, 1], pos[:, 0], c=np.arange(len(pos)), s=8, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="frame index")
    ax.set_xlabel("x [object px]")
    ax.set_ylabel("y [object px]")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_title(f"{sid}: {len(pos)} positions")
    p = outdir / f"{sid}_positions.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)

    mean = ds[scan_store.INTENSITIES].astype(np.float32).mean("scan").values
    fig, ax = plt.subplots(figsize=(5, 5))
    im = ax.imshow(np.log10(np.maximum(mean, 0) + 1), cmap="magma")
    fig.colorbar(im, ax=ax, label="log10(mean counts + 1)")
    ax.set_title(f"{sid}: mean pattern")
    p = outdir / f"{sid}_mean_pattern.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    return paths


def info(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A scan store.")],
    plot: Annotated[
        Path | None, typer.Option(help="Directory for PNGs of positions and mean pattern.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Summarise a scan store: frames, geometry, pixel size, extent, overlap; --plot PNGs."""
    from ptyinr import store as scan_store

    try:
        ds = scan_store.open_scan_store(store_path)
        facts = scan_facts(ds)
        plots = plot_store(ds, plot) if plot is not None else []
    except InputError as exc:
        raise _fail(exc) from None
    if as_json:
        print_json({**facts, "plots": [str(p) for p in plots]})
        return
    _print_summary(ds, facts)
    for p in plots:
        out.print(f"wrote {p}", highlight=False)


def _pair(text: str | None, name: str) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        vals = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise InputError(f"--{name} {text!r}; expected N or NY,NX") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2:
        raise InputError(f"--{name} {text!r}; expected N or NY,NX")
    return vals[0], vals[1]


def preprocess(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A scan store.")],
    frame_size: Annotated[
        str | None, typer.Option(help="Crop/pad size before binning: N or NY,NX.")
    ] = None,
    centre: Annotated[
        str, typer.Option(help="Recentre on the centre of mass (com), not at all (none), or Y,X.")
    ] = "com",
    binning: Annotated[int, typer.Option(min=1, help="Sum b x b pixels.")] = 1,
    use_mask: Annotated[
        bool, typer.Option("--mask/--no-mask", help="Apply the store's detector mask.")
    ] = True,
    detect_bad_pixels: Annotated[
        bool,
        typer.Option(
            "--detect-bad-pixels",
            help="Also mask dead, hot and saturated pixels found from the frame statistics.",
        ),
    ] = False,
    background: Annotated[float, typer.Option(help="Constant background counts.")] = 0.0,
    threshold: Annotated[float, typer.Option(help="Zero values below this.")] = 0.0,
    scale: Annotated[float, typer.Option(help="Multiply by this last.")] = 1.0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing preprocessed array.")
    ] = False,
    overwrite: OverwriteAlias = False,
) -> None:
    """Write a `preprocessed` array into the store (raw intensities untouched)."""
    from ptyinr import store as scan_store
    from ptyinr.preprocess import PreprocessOptions, write_preprocessed

    try:
        c: str | tuple[float, float] = centre
        if centre not in ("com", "none"):
            try:
                y, x = (float(v) for v in centre.split(","))
            except ValueError:
                raise InputError(f"--centre {centre!r}; expected com, none or Y,X") from None
            c = (y, x)
        opts = PreprocessOptions(
            frame_size=_pair(frame_size, "frame-size"),
            centre=c,
            binning=binning,
            use_mask=use_mask,
            detect_bad_pixels=detect_bad_pixels,
            background=background,
            threshold=threshold,
            scale=scale,
        )
        ds = write_preprocessed(store_path, opts, overwrite=force or overwrite)
    except InputError as exc:
        raise _fail(exc) from None
    a = ds[scan_store.PREPROCESSED].attrs
    out.print(
        f"preprocessed {tuple(ds[scan_store.PREPROCESSED].shape)} centre {a['centre_used']} "
        f"bad pixels {a['bad_pixels']} -> {store_path}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the `ptyinr` application."""
    app.command("ingest")(ingest)
    app.command("ingest-archive")(ingest_archive)
    app.command("catalog")(catalog)
    app.command("info")(info)
    app.command("preprocess")(preprocess)
