"""Entry point of the `ptyinr` console script.

Each command group lives in its own module and exposes `register(app)`; this module only
collects them, so adding a command never means editing another command's code. It also sets
the conventions every command shares: `-h`/`--help`, `--version`, shell completion, and the
help panel each command is listed under (`PANELS`).

`ptyinr --help` imports this module and the command modules, nothing else: each command
imports the pipeline (torch, xarray, dask, matplotlib) inside its function, so the help and
completion answer at once (tests/test_cli_conventions.py checks the import stays light).
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from ptyinr.version import __version__

app = typer.Typer(
    name="ptyinr",
    help="PtyINR ptychographic reconstruction: simulate, ingest, reconstruct, evaluate, scale out.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(given: bool) -> None:
    if given:
        typer.echo(f"ptyinr {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="print the ptyinr version and exit",
        ),
    ] = False,
) -> None:
    """PtyINR ptychographic reconstruction: simulate, ingest, reconstruct, evaluate, scale out."""


# Command modules, in the order their commands appear in `ptyinr --help`.
COMMAND_MODULES: list[str] = [
    "ptyinr.cli.engine",
    "ptyinr.cli.slurm",
    "ptyinr.cli.ingest",
    "ptyinr.cli.run",
    "ptyinr.cli.export",
    "ptyinr.cli.nn",
]

# The help panel of each command, by what a user wants to do (a new command must be listed:
# tests/test_cli_conventions.py).
PANELS: dict[str, list[str]] = {
    "data": ["simulate", "ingest", "ingest-archive", "catalog", "info", "preprocess"],
    "reconstruct": ["reconstruct", "run", "scan", "demo", "nn", "preview"],
    "cluster": ["profiles", "submit", "status", "cancel"],
    "results": ["results", "evaluate", "show", "export"],
}

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def _command_name(info: typer.models.CommandInfo | typer.models.TyperInfo) -> str | None:
    if info.name:
        return info.name
    callback = info.callback
    if callback is None and isinstance(info, typer.models.TyperInfo):
        return info.typer_instance.info.name if info.typer_instance else None
    return callback.__name__.lower().replace("_", "-") if callback else None


def _assign_panels() -> None:
    """Put each registered command and group under its panel of `PANELS`."""
    panel_of = {name: panel for panel, names in PANELS.items() for name in names}
    for info in [*app.registered_commands, *app.registered_groups]:
        name = _command_name(info)
        if name in panel_of:
            info.rich_help_panel = panel_of[name]


_assign_panels()


if __name__ == "__main__":  # pragma: no cover
    app()
