"""Export command: write a finished run in a format other programs open (ptyinr.export).

ptyinr.export (xarray, h5py) is imported when the command runs, not for `ptyinr --help`; the
format choices are `ptyinr.cli.common.ExportFormat` (tests check they are the writers of
`ptyinr.export.EXPORTERS`, with the descriptions below).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ptyinr.cli.common import (
    ExportFormat,
    RunAlias,
    choice_option,
    console,
    existing_run_id,
    parse_choice,
    user_errors,
)

# What each writer writes (the `description` of its ptyinr.export.EXPORTERS entry; tested).
FORMAT_DESCRIPTIONS: dict[str, str] = {
    "cxi": "CXI file (HDF5): object, probe, positions",
    "ptychodus": "ptychodus HDF5 product file",
    "tiff": "float32 TIFFs: amplitude, phase, probe",
    "npz": "numpy .npz of plain arrays",
}

_FORMATS_HELP = "; ".join(f"{name}: {text}" for name, text in FORMAT_DESCRIPTIONS.items())


def export(
    store_path: Annotated[
        Path, typer.Argument(metavar="STORE.zarr", help="scan store holding the run")
    ],
    format: Annotated[
        str, choice_option(ExportFormat, "--format", "-f", help=f"file format ({_FORMATS_HELP})")
    ],
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            show_default=False,
            help="the run to read (required; `ptyinr results STORE` lists them)",
        ),
    ] = None,
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
    run_alias: RunAlias = None,
) -> None:
    """Export a complete run as CXI, ptychodus, TIFF or npz files that other tools open.

    The object, probe, positions, pixel size and units are written. CXI and ptychodus files
    hold lengths in metres, so a run without geometry (pixel units) is refused for them; tiff
    and npz write it with pixel size 1 px. Existing files are kept unless --force, and a
    failed export leaves nothing behind.
    """
    from ptyinr.export import export_run

    with user_errors():
        run = existing_run_id(run_id, run_alias)
        fmt = str(parse_choice(ExportFormat, format, "--format"))
        paths = export_run(store_path, run, fmt, out, force=force)
    for path in paths:
        console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Attach the export command to the `ptyinr` application."""
    app.command("export")(export)
