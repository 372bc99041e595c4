"""`ptyinr nn`: PtychoNN models trained on completed runs (ptyinr.ptychonn_train), for fast
previews (`ptyinr run STORE --set model.method=ptychonn --set model.ptychonn_model=MODEL`),
and `ptyinr preview 'archive/*.zarr' --train-from A.zarr:RUN`, the common case in one
command: train the model when it is missing, then preview every matching store.

Nothing heavy is imported here (torch, xarray, the graph): `ptyinr --help` stays fast; the
commands import what they use when they run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ptyinr.cli.common import (
    Device,
    choice_option,
    console,
    err_console,
    parse_choice,
    print_json,
    user_errors,
)

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
        int | None,
        typer.Option(
            min=1,
            help="most epochs (early stopping may end sooner); default: at least 60 and 5000 "
            "optimiser steps",
        ),
    ] = None,
    validation_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="share of position blocks held out")
    ] = 0.2,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="frames per optimisation step; default: 64, fewer on small sets"),
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam's initial learning rate")] = 1e-3,
    patience: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="epochs without improvement before stopping; 0 = never; default: a seventh of "
            "the epochs, at least 10",
        ),
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(
            help="network input (px): frames centre-cropped/binned to it; default 64 or less"
        ),
    ] = None,
    input_mode: Annotated[str, typer.Option(help="crop | bin")] = "crop",
    channels: Annotated[int, typer.Option(min=1, help="feature maps of the first level")] = 32,
    depth: Annotated[int, typer.Option(min=1, max=6, help="encoder/decoder levels")] = 3,
    seed: Annotated[
        int, typer.Option(help="seed of the position split, initial weights and batch order")
    ] = 0,
    device: Annotated[str, choice_option(Device, help="where to train")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads; 0 = default")] = 0,
    precision: Annotated[
        str, typer.Option(help="auto (= fp32) | fp32 | bf16 (CUDA only)")
    ] = "auto",
    augment: Annotated[
        str,
        typer.Option(
            help="auto: also train on pairs turned by the symmetries the source probes have "
            "(a round beam: flips, quarter turns) | none"
        ),
    ] = "auto",
    refit: Annotated[
        bool,
        typer.Option(
            "--refit/--no-refit",
            help="after early stopping, train again on training + validation positions for "
            "the chosen epochs (twice the time; +0.03 dB in issue 13's case (a))",
        ),
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option(min=0, help="epochs between checkpoints (.<out>.checkpoint); 0 = none")
    ] = 1,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="continue an interrupted training of the same options from its checkpoint",
        ),
    ] = True,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            help="train as one Dask task asking for a GPU (where workers have one): local, "
            "slurm:PROFILE or a scheduler address; default: in this process",
        ),
    ] = None,
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
        device = parse_choice(Device, device, "--device")
        if input_mode not in ("crop", "bin"):
            raise InputError(f"--input-mode {input_mode!r}: expected crop or bin")
        if precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"--precision {precision!r}: expected auto, fp32 or bf16")
        if augment not in ("auto", "none"):
            raise InputError(f"--augment {augment!r}: expected auto or none")
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
            precision=precision,
            checkpoint_every=checkpoint_every,
            augment=augment,
            refit=refit,
        )
        if cluster is None:
            record = train_ptychonn(
                sources, out, options, force=force, progress=not quiet, resume=resume
            ).record
        else:
            record = _train_on_cluster(cluster, sources, out, options, force, resume, quiet)
    _print_summary(out, record)


def _train_on_cluster(
    cluster: str,
    sources: list[str],
    out: Path,
    options: object,
    force: bool,
    resume: bool,
    quiet: bool,
) -> dict:
    """Submit `ptychonn_train.train_task` to the cluster as one task, asking for one GPU
    where the workers have GPUs (`cluster.task_resources`, as reconstructions do), one retry
    (which resumes from the checkpoint); the saved model's record."""
    from uuid import uuid4

    from ptyinr.cli.run import _connect
    from ptyinr.cluster import parse_cluster_spec, task_resources
    from ptyinr.errors import InputError
    from ptyinr.ptychonn_data import parse_source
    from ptyinr.ptychonn_train import checkpoint_dir, train_task

    out = out.expanduser().resolve()  # workers may start elsewhere
    if out.exists() and not force:
        raise InputError(f"ptychonn model {str(out)!r}: exists; use --force to replace it")
    absolute = []
    for text in sources:
        path, run = parse_source(text)
        if not path.exists():
            raise InputError(f"{text!r}: store {str(path)!r} not found")
        absolute.append(f"{path.expanduser().resolve()}:{run}")
    if not resume:
        import shutil

        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    # one task: one local worker, or at most one SLURM job; an existing cluster as it is
    workers = None if parse_cluster_spec(cluster).kind == "address" else 1
    with _connect(cluster, workers) as client:
        resources = task_resources(client) or None
        if not quiet:
            err_console.print(
                f"nn train: one task on {cluster}"
                + (f", resources {resources}" if resources else " (no GPU workers)"),
                highlight=False,
            )
        future = client.submit(
            train_task,
            absolute,
            str(out),
            options,
            force,
            resources=resources,
            retries=1,
            pure=False,
            key=f"ptychonn-train-{out.name}-{uuid4().hex[:8]}",
        )
        return future.result()


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
        print_json(artifact.record)
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


def default_model_path(train_from: list[str]) -> Path:
    """Where `preview` keeps the model of its first training run when --model is not given:
    next to that store, `ptychonn-<store>-<run>` (found again by the next preview)."""
    store, _, run = train_from[0].rpartition(":")
    path = Path(store).expanduser()
    return path.parent / f"ptychonn-{path.name.removesuffix('.zarr')}-{run}"


def preview(
    patterns: Annotated[
        list[str],
        typer.Argument(metavar="STORE...", help="scan stores or glob patterns ('archive/*.zarr')"),
    ],
    train_from: Annotated[
        list[str] | None,
        typer.Option(
            "--train-from",
            metavar="STORE:RUN",
            help="completed run(s) to train on when the model does not exist yet (repeatable)",
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="model folder: used when it exists, else trained into; default "
            "ptychonn-<store>-<run> next to the first --train-from store",
        ),
    ] = None,
    fraction: Annotated[
        float, typer.Option(help="when training: share of each run's positions used")
    ] = 0.2,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="when training: most epochs (default: auto)")
    ] = None,
    device: Annotated[str, choice_option(Device, help="where training and previews run")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads; 0 = default")] = 0,
    run_id: Annotated[
        str | None,
        typer.Option("--run-id", help="name of the preview runs (default: preview-<timestamp>)"),
    ] = None,
    no_frc: Annotated[
        bool, typer.Option("--no-frc", help="skip the half-scan previews and the FRC")
    ] = False,
    cluster: Annotated[
        str, typer.Option("--cluster", help="where previews run: local, slurm:PROFILE, address")
    ] = "local",
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="local: workers; slurm: max jobs")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress on stderr")] = False,
) -> None:
    """Preview every matching store with PtychoNN: train the model first when it is missing
    (--train-from), then one `ptychonn` run per store (object, probe, FRC resolution).

    A store that does not fit the model (frames, pixel size, energy) or cannot be read is
    reported and skipped; the others are previewed. Exit status 1 when any store failed, 2
    for a mistake in the command line (nothing matched, no model and nothing to train on)."""
    from ptyinr.cli.run import expand_stores

    with user_errors():
        device = parse_choice(Device, device, "--device")
        stores = expand_stores(patterns)
        path = _preview_model(model, train_from, fraction, epochs, device, threads, quiet)
    bad, specs = _preview_specs(stores, path, device, threads, run_id, no_frc)
    outcomes = []
    if specs:
        from ptyinr.cli.run import _execute

        with user_errors():
            outcomes = _execute(cluster, workers, specs, retries=0, quiet=quiet)
    _preview_table(bad, outcomes)
    failed = len(bad) + sum(o.status == "failed" for o in outcomes)
    if failed:
        err_console.print(
            f"[bold red]{failed} of {len(stores)} store(s) not previewed[/]", highlight=False
        )
        raise typer.Exit(1)


def _preview_model(
    model: Path | None,
    train_from: list[str] | None,
    fraction: float,
    epochs: int | None,
    device: str,
    threads: int,
    quiet: bool,
) -> Path:
    """The model folder: the existing one (checked readable), or trained from --train-from."""
    from ptyinr.errors import InputError

    train_from = list(train_from or [])
    if model is None and not train_from:
        raise InputError("preview: expected --model MODEL (existing) or --train-from STORE:RUN")
    path = (model or default_model_path(train_from)).expanduser().resolve()
    if path.exists():
        from ptyinr.models.ptychonn import read_record

        read_record(path)  # one line when it is not a model
        if not quiet:
            err_console.print(f"preview: model {path}", highlight=False)
        return path
    if not train_from:
        raise InputError(f"--model {str(path)!r}: not found, and no --train-from to train it")
    if not 0 < fraction <= 1:
        raise InputError(f"--fraction {fraction}: expected a share in (0, 1]")
    from ptyinr.ptychonn_train import TrainOptions, train_ptychonn

    if not quiet:
        err_console.print(f"preview: training {path} on {', '.join(train_from)}", highlight=False)
    options = TrainOptions(fraction=fraction, epochs=epochs, device=device, threads=threads)
    train_ptychonn(train_from, path, options, progress=not quiet)
    return path


def _preview_specs(
    stores: list[Path],
    model: Path,
    device: str,
    threads: int,
    run_id: str | None,
    no_frc: bool,
) -> tuple[list[tuple[Path, str]], list]:
    """The graph's run specs of the stores that fit the model, and (store, reason) of those
    that do not (checked from metadata, before anything runs)."""
    from ptyinr import graph
    from ptyinr.config import load_config
    from ptyinr.engines.ptychonn import PtychoNNEngine
    from ptyinr.errors import ConfigError, InputError
    from ptyinr.reconstruct import new_run_id, resolve_config

    with user_errors():
        overrides = [
            "model.method=ptychonn",
            f"model.ptychonn_model={json.dumps(str(model))}",
            f"train.device={device}",
            f"train.threads={threads}",
        ]
        config = resolve_config(load_config(overrides=overrides))
        rid = run_id or f"preview-{new_run_id()}"
        if not rid.strip() or "/" in rid or rid.startswith(".") or rid != rid.strip():
            raise InputError(f"--run-id {rid!r}: expected a non-empty name without '/'")
    bad, specs = [], []
    for path in stores:
        try:
            PtychoNNEngine.check_store(config, path)
        except (InputError, ConfigError) as exc:
            bad.append((path, str(exc)))
            err_console.print(
                f"[bold red]error:[/] {escape(str(path))}: {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            continue
        specs.append(graph.RunSpec(store=path, config=config, run_id=rid, frc=not no_frc))
    return bad, specs


def _preview_table(bad: list[tuple[Path, str]], outcomes: list) -> None:
    from ptyinr.cli.run import outcome_table

    console.print(outcome_table("ptyinr preview", outcomes, skipped=bad))


def register(app: typer.Typer) -> None:
    app.add_typer(nn_app, name="nn")
    app.command("preview")(preview)
