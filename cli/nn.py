"""`ptyinr nn`: PtychoNN models trained on completed runs (ptyinr.ptychonn_train), for fast
previews (`ptyinr run STORE --set model.method=ptychonn --set model.ptychonn_model=MODEL`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ptyinr.cli.common import console, user_errors

nn_app = typer.Typer(
    help="PtychoNN previews: train a CNN on completed runs, inspect a model.",
    no_args_is_help=True,
)


@nn_app.command("train")
def train(
    sources: Annotated[
        list[str],
        typer.Argument(metavar="STORE:RUN...", help="completed runs to learn from"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="model folder to write")],
    fraction: Annotated[
        float,
        typer.Option(help="share of each run's positions used (spread over the scan); 1 = all"),
    ] = 0.2,
    epochs: Annotated[
        int, typer.Option(min=1, help="most epochs (early stopping may end sooner)")
    ] = 60,
    validation_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="share of position blocks held out")
    ] = 0.2,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam's initial learning rate")] = 1e-3,
    patience: Annotated[
        int, typer.Option(min=0, help="epochs without improvement before stopping; 0 = never")
    ] = 10,
    input_size: Annotated[
        int | None,
        typer.Option(
            help="network input (px): frames centre-cropped/binned to it; default 64 or less"
        ),
    ] = None,
    input_mode: Annotated[str, typer.Option(help="crop | bin")] = "crop",
    channels: Annotated[int, typer.Option(min=1, help="feature maps of the first level")] = 32,
    depth: Annotated[int, typer.Option(min=1, max=6, help="encoder/decoder levels")] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads; 0 = default")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing model folder")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress on stderr")] = False,
) -> None:
    """Train PtychoNN on completed runs (STORE:RUN, one or many) and save it to --out."""
    from ptyinr.errors import InputError
    from ptyinr.ptychonn_train import TrainOptions, train_ptychonn

    with user_errors():
        if not 0 < fraction <= 1:
            raise InputError(f"--fraction {fraction}: expected a share in (0, 1]")
        if input_mode not in ("crop", "bin"):
            raise InputError(f"--input-mode {input_mode!r}: expected crop or bin")
        options = TrainOptions(
            fraction=fraction,
            validation_fraction=validation_fraction,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            seed=seed,
            device=device,
            threads=threads,
            input_size=input_size,
            input_mode=input_mode,
            channels=channels,
            depth=depth,
        )
        artifact = train_ptychonn(sources, out, options, force=force, progress=not quiet)
    _print_summary(out, artifact.record)


@nn_app.command("info")
def info(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="a folder from `nn train`")],
    as_json: Annotated[bool, typer.Option("--json", help="the whole record as JSON")] = False,
) -> None:
    """What a model is: architecture, input, frame shape, pixel size, energy, sources, scores.
    The weights are verified (checksum, loadable)."""
    from ptyinr.models.ptychonn import load_artifact

    with user_errors():
        artifact = load_artifact(model)
    if as_json:
        print(json.dumps(artifact.record, indent=2, sort_keys=True))
        return
    _print_summary(model, artifact.record)


def _print_summary(path: Path, record: dict) -> None:
    arch = record.get("architecture", {})
    pixel = record.get("pixel_size_m")
    energy = record.get("energy_ev")
    lines = [
        f"model         {path}",
        f"architecture  PtychoNN, input {arch.get('input_size')} px ({arch.get('input_mode')}), "
        f"{arch.get('channels')} channels, depth {arch.get('depth')}, "
        f"{record.get('parameters')} parameters",
        f"frames        {' x '.join(str(s) for s in arch.get('frame_shape', []))}",
        "pixel size    "
        + ("px (no geometry)" if pixel is None else " x ".join(f"{p:.4g}" for p in pixel) + " m"),
        "energy        " + ("-" if energy is None else f"{energy:.1f} eV"),
    ]
    for src in record.get("sources", []):
        lines.append(
            f"source        {src['store']}:{src['run_id']} "
            f"({src['positions_used']} of {src['positions']} positions)"
        )
    for name, s in record.get("scores", {}).items():
        lines.append(
            f"{name:<13} loss {s['loss']:.4f} (amplitude {s['amplitude_l1']:.4f}, phase "
            f"{s['phase_l1']:.4f} rad) vs mean patch {s.get('mean_patch_loss', float('nan')):.4f}"
            f" on {int(s['positions'])} positions"
        )
    training = record.get("training", {})
    if training:
        lines.append(
            f"training      {training.get('epochs_run')} epochs "
            f"(best {training.get('best_epoch')}), "
            f"{training.get('train_seconds', 0.0):.1f} s on {training.get('device')}"
        )
    console.print(escape("\n".join(lines)), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(nn_app, name="nn")
