"""Export command: write a finished run in a format other programs open (ptyinr.export)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ptyinr.cli.common import console, user_errors
from ptyinr.export import EXPORTERS, export_run

# One choice per registered writer, so `ptyinr export --help` lists exactly what exists.
ExportFormat = Enum(  # type: ignore[misc]
    "ExportFormat", {name: name for name in EXPORTERS}, type=str
)

_FORMATS_HELP = "; ".join(f"{name}: {e.description}" for name, e in EXPORTERS.items())


def export(
    store_path: Annotated[
        Path, typer.Argument(metavar="STORE.zarr", help="scan store holding the run")
    ],
    run: Annotated[str, typer.Option("--run", help="run id (`ptyinr results STORE` lists them)")],
    format: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", case_sensitive=False, help=f"file format ({_FORMATS_HELP})"),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="file to write, or a folder; for tiff a prefix (<out>_amplitude.tif, "
            "<out>_phase.tif, <out>_probe_*.tif). Default: <store stem>-<run> beside the store",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing files")] = False,
) -> None:
    """Export a complete run as CXI, ptychodus, TIFF or npz files that other tools open.

    The object, probe, positions, pixel size and units are written. CXI and ptychodus files
    hold lengths in metres, so a run without geometry (pixel units) is refused for them; tiff
    and npz write it with pixel size 1 px. Existing files are kept unless --force, and a
    failed export leaves nothing behind.
    """
    fmt = format.value if isinstance(format, Enum) else str(format)
    with user_errors():
        paths = export_run(store_path, run, fmt, out, force=force)
    for path in paths:
        console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
