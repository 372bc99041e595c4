"""What every command module shares: one way to report a user's mistake, the options several
commands take (one spelling per concept), the closed choice sets, and JSON output.

This module is imported when `ptyinr --help` runs, so it imports nothing heavy (no numpy,
torch, xarray, pydantic): Typer needs the option types at import time, so the choice sets are
defined here, and tests/test_cli_conventions.py checks each equals what the pipeline accepts.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

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


# --------------------------------------------------------------------------------------------
# closed choice sets: the values are exactly those the pipeline accepts (tested)
# --------------------------------------------------------------------------------------------


class Noise(StrEnum):
    """`ptyinr.simulate.SimulationConfig.noise`."""

    clean = "clean"
    poisson = "poisson"
    gaussian = "gaussian"
    mixed = "mixed"
    counts = "counts"


class ScanKind(StrEnum):
    """`ptyinr.simulate.SimulationConfig.scan`."""

    raster = "raster"
    spiral = "spiral"
    jitter = "jitter"


class Device(StrEnum):
    """`train.device` of the reconstruction config."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DcPosition(StrEnum):
    """`ptyinr.ingest.Conversions.dc`: where the zero frequency sits in the file's frames."""

    centre = "centre"
    corner = "corner"
    auto = "auto"


class PositionsUnit(StrEnum):
    """`ptyinr.ingest.Conversions.positions_unit`."""

    m = "m"
    mm = "mm"
    um = "um"
    nm = "nm"
    px = "px"


class PositionsOrder(StrEnum):
    """`ptyinr.ingest.Conversions.positions_order`: column order of the file's positions."""

    yx = "yx"
    xy = "xy"


class Negative(StrEnum):
    """`ptyinr.ingest.Conversions.negative`: what to do with negative counts."""

    error = "error"
    clip = "clip"


class Parallel(StrEnum):
    """`ptyinr.ingest.ingest_archive(parallel=...)`."""

    processes = "processes"
    threads = "threads"
    sync = "sync"


class ExportFormat(StrEnum):
    """The writers of `ptyinr.export.EXPORTERS` (a new writer is added here too; tested)."""

    cxi = "cxi"
    ptychodus = "ptychodus"
    tiff = "tiff"
    npz = "npz"


def choice_option(enum: type[StrEnum], *decls: str, help: str, **kwargs: Any) -> Any:
    """A `typer.Option` taking one value of `enum`: the choices shown in --help and offered by
    shell completion. The command checks the value with `parse_choice`, so a wrong one is an
    InputError like any other (one line naming option, value and choices; exit 2)."""

    def complete(incomplete: str) -> list[str]:
        return [c.value for c in enum if c.value.startswith(incomplete.lower())]

    names = "|".join(c.value for c in enum)
    return typer.Option(*decls, metavar=names, autocompletion=complete, help=help, **kwargs)


def parse_choice(enum: type[StrEnum], text: str | None, option: str) -> str | None:
    """`text` as the value of `enum` it names (any case), None kept; InputError otherwise."""
    if text is None:
        return None
    for choice in enum:
        if choice.value == text.strip().casefold():
            return choice.value
    raise InputError(f"{option}={text!r}: expected one of {', '.join(c.value for c in enum)}")


# --------------------------------------------------------------------------------------------
# options shared by several commands: one spelling per concept
# --------------------------------------------------------------------------------------------

ConfigOption = Annotated[
    str | None, typer.Option("--config", help="TOML file or preset name (see configs/)")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config value: section.key=value (repeatable)"),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", help="print JSON on stdout instead of a table (messages stay on stderr)"
    ),
]
# `--overwrite` was the spelling of --force in simulate, ingest and preprocess: still taken.
OverwriteAlias = Annotated[bool, typer.Option("--overwrite", hidden=True, help="= --force")]
# `--run` was the spelling of --run-id in evaluate, show and export: still taken.
RunAlias = Annotated[
    str | None, typer.Option("--run", hidden=True, metavar="RUN_ID", help="= --run-id")
]


def existing_run_id(run_id: str | None, alias: str | None) -> str:
    """The run id of a command that reads a run, given as --run-id or (older) --run."""
    if run_id and alias and run_id != alias:
        raise InputError(f"--run-id {run_id!r} and --run {alias!r}: give one")
    chosen = run_id or alias
    if not chosen:
        raise InputError(
            "--run-id missing: expected the run to read (`ptyinr results STORE` lists them)"
        )
    return chosen


# --------------------------------------------------------------------------------------------
# machine-readable output
# --------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """JSON-ready: NaN/inf as null (JSON has no NaN), numpy scalars and arrays as numbers and
    lists, paths and anything else as text."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return _plain(obj.tolist())
    return str(obj)


def print_json(obj: Any) -> None:
    """Write `obj` as JSON to stdout, alone (messages and progress go to stderr)."""
    sys.stdout.write(json.dumps(_plain(obj), indent=2) + "\n")
    sys.stdout.flush()
