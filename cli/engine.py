"""Engine commands: simulate, reconstruct, evaluate, show, demo (filled in by the engine work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the `ptyinr` application."""
