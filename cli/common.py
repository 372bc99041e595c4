"""What every command module shares: one way to report a user's mistake."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import InputError

err_console = Console(stderr=True)
console = Console()


def fail(exc: Exception) -> typer.Exit:
    """Print an input error as one red line; the caller raises the returned Exit(2)."""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn `InputError` raised inside the block into one line on stderr and exit status 2."""
    try:
        yield
    except InputError as exc:
        raise fail(exc) from None
