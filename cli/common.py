"""What every command module shares: one way to report a user's mistake."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ptyinr.errors import InputError

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


ProbeGuessOption = Annotated[
    str | None,
    typer.Option(
        "--probe-guess",
        metavar="FILE",
        help="start the probe from a guess that is then refined: .npy, .npz, HDF5/CXI "
        "(FILE:/dataset), or another run's probe (STORE.zarr:RUN); resampled to this scan's "
        "pixel size (--probe instead holds a known probe fixed)",
    ),
]


def probe_guess_overrides(source: str | None) -> list[str]:
    """`--probe-guess SOURCE` as config overrides (model.probe_init = file, probe.guess), with
    the path made absolute (workers may start elsewhere) and checked before any work starts."""
    if not source:
        return []
    import json

    from ptyinr.probe_files import split_source

    path, rest, _ = split_source(str(source))
    path = path.expanduser()
    if not path.exists():
        raise InputError(
            f"--probe-guess {str(source)!r}: {str(path)!r} not found; expected a .npy, .npz, "
            "HDF5/CXI file (FILE:/dataset) or STORE.zarr:RUN"
        )
    resolved = str(path.resolve()) + rest
    return ["model.probe_init=file", f"probe.guess={json.dumps(resolved)}"]
