"""Entry point of the `ptyinr` console script.

Each command group lives in its own module and exposes `register(app)`; this module only
collects them, so adding a command never means editing another command's code.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="ptyinr",
    help="PtyINR ptychographic reconstruction: simulate, ingest, reconstruct, evaluate, scale out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, in the order their commands appear in `ptyinr --help`.
COMMAND_MODULES: list[str] = [
    "ptyinr.cli.engine",
    "ptyinr.cli.slurm",
    "ptyinr.cli.ingest",
    "ptyinr.cli.run",
    "ptyinr.cli.export",
    "ptyinr.cli.nn",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
