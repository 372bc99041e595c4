"""Engine commands: simulate, reconstruct, evaluate, show, demo.

The pipeline (torch, xarray, matplotlib) is imported inside each command, never at module
import: `ptyinr --help` imports this module (see ptyinr.cli.main).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ptyinr.cli.common import (
    ConfigOption,
    Device,
    JsonOption,
    Noise,
    OverwriteAlias,
    ProbeGuessOption,
    RunAlias,
    ScanKind,
    SetOption,
    choice_option,
    console,
    err_console,
    existing_run_id,
    parse_choice,
    print_json,
    probe_guess_overrides,
    user_errors,
)
from ptyinr.errors import ConfigError, InputError, ReconstructionFailed

if TYPE_CHECKING:
    from ptyinr.simulate import SimulationConfig

DEMO_PRESET = "demo"


def _simulation_config(preset: str | None, **given: object) -> SimulationConfig:
    from pydantic import ValidationError

    from ptyinr.config import read_toml
    from ptyinr.simulate import SimulationConfig

    values = dict(read_toml(preset).get("simulate", {})) if preset else {}
    values.update({k: v for k, v in given.items() if v is not None})
    try:
        return SimulationConfig.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"simulate option {key!r} = {first.get('input')!r}: {first['msg']}"
        ) from None


def simulate(
    out: Annotated[
        Path, typer.Argument(metavar="OUT.zarr", help="the scan store to write (OUT.zarr)")
    ],
    preset: Annotated[
        str | None,
        typer.Option(help="take the \\[simulate] table of a preset, e.g. paper-noise-poisson"),
    ] = None,
    overlap: Annotated[float | None, typer.Option(help="1 - step / probe FWHM")] = None,
    noise: Annotated[
        str | None,
        choice_option(
            Noise,
            "--noise",
            help="clean; poisson, gaussian, mixed: the paper's eqs (6)-(8); counts: Poisson "
            "photon counts stored as integers",
        ),
    ] = None,
    scan: Annotated[str | None, choice_option(ScanKind, "--scan", help="scan pattern")] = None,
    probe_size: Annotated[int | None, typer.Option(help="probe/frame pixels (64)")] = None,
    object_size: Annotated[int | None, typer.Option(help="object pixels (241)")] = None,
    alpha: Annotated[float | None, typer.Option(help="Poisson photon scale, eq. (6)")] = None,
    sigma: Annotated[float | None, typer.Option(help="Gaussian sigma, eq. (7)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing store (and --raw file)")
    ] = False,
    overwrite: OverwriteAlias = False,
    raw: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE.h5",
            help="also write the scan as a beamline file holds it (corner DC, pixel "
            "positions, geometry under /entry/instrument), to try `ptyinr ingest` on",
        ),
    ] = None,
) -> None:
    """Simulate a scan into a scan store, with its ground truth.

    The paper's protocol by default, or a preset's \\[simulate] table (e.g. measured-like)."""
    from ptyinr import store
    from ptyinr.simulate import export_raw_hdf5, write_simulated_store

    overwrite = force or overwrite
    with user_errors():
        config = _simulation_config(
            preset,
            overlap=overlap,
            noise=parse_choice(Noise, noise, "--noise"),
            scan=parse_choice(ScanKind, scan, "--scan"),
            probe_size=probe_size,
            object_size=object_size,
            alpha=alpha,
            sigma=sigma,
            seed=seed,
        )
        if out.exists() and not overwrite:
            raise InputError(f"{out}: already exists; pass --force (or --overwrite) to replace it")
        if raw is not None and raw.exists() and not overwrite:
            raise InputError(f"{raw}: already exists; pass --force (or --overwrite) to replace it")
        path = write_simulated_store(out, config, overwrite=overwrite)
        if raw is not None:
            export_raw_hdf5(raw, config)
        ds = store.open_scan_store(path)
    console.print(
        f"wrote [bold]{path}[/]: {ds.sizes['scan']} frames of "
        f"{ds.sizes['det_y']} x {ds.sizes['det_x']}, probe FWHM "
        f"{ds.attrs['probe_fwhm_px']:.2f} px, overlap {config.overlap:g}, noise {config.noise}"
    )
    if raw is not None:
        console.print(
            f"wrote [bold]{raw}[/]: ingest it with `ptyinr ingest {raw} OUT.zarr "
            "--dc auto --positions-unit px --key energy_ev=/entry/instrument/energy_ev "
            "--key detector_distance_m=/entry/instrument/detector_distance_m "
            "--key detector_pixel_size_m=/entry/instrument/detector_pixel_size_m`"
        )


def _quality_table(scores: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in scores.items():
        if key in ("n_pixels",):
            continue
        table.add_row(key, f"{value:.4g}")
    return table


def reconstruct(
    store_path: Annotated[Path, typer.Argument(metavar="STORE.zarr", help="scan store")],
    config: ConfigOption = None,
    set_: SetOption = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="name of the run (default: a timestamp)")
    ] = None,
    probe: Annotated[
        Path | None, typer.Option(help="known probe (.npy, frame shape): probe is not fitted")
    ] = None,
    probe_guess: ProbeGuessOption = None,
    device: Annotated[
        str | None,
        choice_option(
            Device, "--device", help="where to train (default: the config's train.device)"
        ),
    ] = None,
    figures_dir: Annotated[
        Path | None, typer.Option("--figures", help="also write PNG figures here")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    processes: Annotated[
        int, typer.Option(help="train data-parallel in K CPU processes (Gloo)")
    ] = 1,
    gpus: Annotated[
        int, typer.Option(help="train data-parallel on K GPUs, one process each (NCCL)")
    ] = 0,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan", help="print estimated peak memory per device and time per epoch; stop"
        ),
    ] = False,
    plan_for: Annotated[
        str | None,
        typer.Option(
            "--plan-for",
            metavar="DEVICE:MEMORY",
            help="plan for another machine's device, e.g. cuda:80GiB (from a login node "
            "without one): memory only; implies --plan",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Reconstruct object and probe of one scan store into reconstructions/<run_id>.

    With --json: the plan (--plan) or the finished run's summary as JSON on stdout."""
    from ptyinr import store
    from ptyinr.config import load_config
    from ptyinr.launch import choose_ranks
    from ptyinr.reconstruct import load_probe_file, reconstruct_store, resolve_config
    from ptyinr.runtime.plan import check_plan, parse_device_memory
    from ptyinr.scandata import load_scan

    with user_errors():
        if probe is not None and probe_guess:
            raise InputError(
                "--probe and --probe-guess: give one (--probe holds a known probe fixed, "
                "--probe-guess starts a probe that is refined)"
            )
        overrides = list(set_ or []) + probe_guess_overrides(probe_guess)
        if device:
            overrides.append(f"train.device={parse_choice(Device, device, '--device')}")
        cfg = resolve_config(load_config(config, overrides))  # the engine's own settings
        target = parse_device_memory(plan_for) if plan_for else None
        plan = plan or target is not None
        if target is None:
            ranks, cfg = choose_ranks(processes, gpus, cfg)
        else:  # the other machine's ranks cannot be checked from here
            ranks = max(processes, gpus, 1)
        if plan and as_json:
            _print_plan_json(store_path, cfg, ranks, known_probe=probe is not None, target=target)
            return
        check_plan(
            store_path,
            cfg,
            ranks,
            known_probe=probe is not None,
            show=plan,
            echo=lambda line: console.print(line, highlight=False),
            target=target,
        )
        if plan:
            return
        loaded = load_scan(store_path, cfg, lazy=True)
        known = load_probe_file(probe, loaded.data.frame_shape) if probe else None
        if run_id and any(r["run_id"] == run_id for r in store.list_runs(loaded.path)):
            raise InputError(
                f"{store_path}: run {run_id!r} already exists; choose another --run-id"
            )
        try:
            rid, result = reconstruct_store(
                store_path,
                cfg,
                run_id=run_id,
                known_probe=known,
                progress=not quiet,
                loaded=loaded,
                world_size=ranks,
            )
        except ReconstructionFailed as exc:  # the fit diverged: one line, exit 1, nothing written
            err_console.print(f"[bold red]failed:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    if as_json:
        paths = _write_figures(store_path, rid, figures_dir) if figures_dir else []
        print_json(
            {
                "store": str(store_path),
                "run_id": rid,
                "status": "complete",
                **{k: result.info.get(k) for k in ("epochs", "train_seconds", "final_loss")},
                "quality": result.info.get("quality") or None,
                "figures": [str(p) for p in paths],
            }
        )
        return
    console.print(
        f"run [bold]{rid}[/] complete: {result.info['epochs']} epochs in "
        f"{result.info['train_seconds']:.1f} s, final loss {result.info['final_loss']:.3e}"
    )
    if result.info.get("quality"):
        console.print(_quality_table(result.info["quality"], f"quality of {rid}"))
    if figures_dir:
        paths = _write_figures(store_path, rid, figures_dir)
        console.print(f"figures: {', '.join(str(p) for p in paths)}")


def _print_plan_json(
    store_path: Path,
    cfg: Any,
    ranks: int,
    *,
    known_probe: bool,
    target: tuple[str, int] | None,
) -> None:
    """`--plan --json`: the plan `check_plan` prints, as JSON on stdout; then, like it, refuse
    (one line on stderr, exit 2) when the run cannot fit the device."""
    from ptyinr.runtime.plan import plan_for_store, refuse_unless_fits

    device_type, available = target if target else (None, None)
    plan = plan_for_store(
        store_path,
        cfg,
        world_size=ranks,
        known_probe=known_probe,
        with_time=True,
        device_type=device_type,
        available=available,
    )
    mem = plan.memory
    print_json(
        {
            "store": str(store_path),
            "device": plan.device,
            "workload": dataclasses.asdict(plan.workload),
            "memory": {**dataclasses.asdict(mem), "peak": mem.peak, "fits": mem.fits},
            "time_s": plan.time or None,  # None: not estimated (--plan-for)
            "epochs": plan.epochs,
            "run_seconds": plan.run_seconds,
            "precision": plan.precision or None,
            "alternatives_s": plan.alternatives or None,
            "warnings": plan.warnings(),
        }
    )
    refuse_unless_fits(plan, str(store_path))


def _open_run_checked(store_path: Path, run: str):
    from ptyinr import store

    runs = {r["run_id"]: r for r in store.list_runs(store_path)}
    if run not in runs:
        known = ", ".join(runs) or "none"
        raise InputError(f"{store_path}: no run {run!r} (runs: {known})")
    return store.open_run(store_path, run)


RunIdOption = Annotated[
    str | None,
    typer.Option(
        "--run-id",
        show_default=False,
        help="the run to read (required; `ptyinr results STORE` lists them)",
    ),
]


def evaluate(
    store_path: Annotated[Path, typer.Argument(metavar="STORE.zarr", help="scan store")],
    run_id: RunIdOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            show_default=False,
            help="folder for comparison.png (default: <store>.figures/<run_id>/ beside the store)",
        ),
    ] = None,
    as_json: JsonOption = False,
    run_alias: RunAlias = None,
) -> None:
    """Quality of a run against the store's ground truth (simulated stores), and a figure of
    truth, aligned estimate and their difference."""
    from ptyinr import figures
    from ptyinr.graph import default_figures_dir

    with user_errors():
        run = existing_run_id(run_id, run_alias)
        _open_run_checked(store_path, run)
        evaluation, paths = figures.save_run_evaluation(
            store_path, run, out or default_figures_dir(store_path, run)
        )
    if as_json:
        print_json(evaluation.scores)
    else:
        console.print(_quality_table(evaluation.scores, f"{store_path.name}: run {run}"))
    for p in paths:  # stdout holds only the JSON when asked for it
        print(str(p), file=sys.stderr if as_json else sys.stdout)


def _write_figures(store_path: Path, run: str, out: Path, *, unwrap: bool = False) -> list[Path]:
    """The run's figures; of a running run (train.snapshot_every > 0), its latest snapshot."""
    from ptyinr import figures
    from ptyinr.reconstruct import open_latest

    _open_run_checked(store_path, run)
    result = open_latest(store_path, run).load()
    title = f"run {run}"
    if "snapshot_epoch" in result.attrs:
        title += f" (running: snapshot at epoch {result.attrs['snapshot_epoch']}"
        title += f" of {result.attrs.get('epochs', '?')})"
    out.mkdir(parents=True, exist_ok=True)
    paths = figures.save_object_figures(result["object"], out, title=title, unwrap=unwrap)
    paths += figures.save_probe_figure(result["probe"], out, title=title)
    paths += figures.save_loss_figure(
        result["loss"], out, title=title, validation=result.attrs.get("validation")
    )
    if "frc" in result:
        paths += figures.save_frc_figure(result[["frc", "half_bit_threshold"]], out)
    return paths


def show(
    store_path: Annotated[Path, typer.Argument(metavar="STORE.zarr", help="scan store")],
    run_id: RunIdOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the PNGs")] = Path("figures"),
    unwrap: Annotated[
        bool,
        typer.Option(
            "--unwrap",
            help="also phase_unwrapped.png (scikit-image unwrap_phase), for phases that wrap",
        ),
    ] = False,
    run_alias: RunAlias = None,
) -> None:
    """Write PNGs of a run: amplitude, phase, probe, loss (and FRC when computed); of a run
    still running, its latest snapshot (train.snapshot_every)."""
    with user_errors():
        run = existing_run_id(run_id, run_alias)
        paths = _write_figures(store_path, run, out, unwrap=unwrap)
    for p in paths:
        console.print(str(p))


def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for the demo store and figures")
    ] = Path("ptyinr-demo"),
    set_: SetOption = None,
) -> None:
    """Simulate a small scan, reconstruct it here with PtyINR, write results and figures."""
    from ptyinr import store
    from ptyinr.config import load_config
    from ptyinr.reconstruct import reconstruct_store
    from ptyinr.simulate import write_simulated_store

    with user_errors():
        started = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        store_path = out / "demo.zarr"
        sim = _simulation_config(DEMO_PRESET)
        write_simulated_store(store_path, sim, overwrite=True)
        ds = store.open_scan_store(store_path)
        console.print(
            f"simulated {ds.sizes['scan']} diffraction patterns of {sim.probe_size} x "
            f"{sim.probe_size} (object {sim.object_size} x {sim.object_size}, overlap "
            f"{sim.overlap:.0%}, {sim.noise}) -> {store_path}"
        )
        cfg = load_config(DEMO_PRESET, list(set_ or []))
        rid, result = reconstruct_store(store_path, cfg, run_id="demo")
        paths = _write_figures(store_path, rid, out / "figures")
    console.print(_quality_table(result.info["quality"], "PtyINR demo: quality vs ground truth"))
    console.print(
        f"run 'demo' written to {store_path}/reconstructions/demo; figures: "
        f"{', '.join(p.name for p in paths)} in {out / 'figures'}; "
        f"total {time.perf_counter() - started:.0f} s"
    )


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the `ptyinr` application."""
    app.command()(simulate)
    app.command()(reconstruct)
    app.command()(evaluate)
    app.command()(show)
    app.command()(demo)
