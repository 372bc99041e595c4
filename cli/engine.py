"""Engine commands: simulate, reconstruct, evaluate, show, demo."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import ValidationError
from rich.table import Table

from ptyinr import figures, store
from ptyinr.cli.common import (
    ProbeGuessOption,
    console,
    err_console,
    probe_guess_overrides,
    user_errors,
)
from ptyinr.config import load_config, read_toml
from ptyinr.errors import ConfigError, InputError, ReconstructionFailed
from ptyinr.launch import choose_ranks
from ptyinr.reconstruct import load_probe_file, reconstruct_store, resolve_config
from ptyinr.runtime.plan import check_plan, parse_device_memory
from ptyinr.scandata import load_scan
from ptyinr.simulate import SimulationConfig, export_raw_hdf5, write_simulated_store

DEMO_PRESET = "demo"

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config value: section.key=value (repeatable)"),
]
ConfigOption = Annotated[
    str | None, typer.Option("--config", help="TOML file or preset name (see configs/)")
]


def _simulation_config(preset: str | None, **given: object) -> SimulationConfig:
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
    out: Annotated[Path, typer.Argument(help="the scan store to write (OUT.zarr)")],
    preset: Annotated[
        str | None,
        typer.Option(help="take the [simulate] table of a preset, e.g. paper-noise-poisson"),
    ] = None,
    overlap: Annotated[float | None, typer.Option(help="1 - step / probe FWHM")] = None,
    noise: Annotated[str | None, typer.Option(help="clean | poisson | gaussian | mixed")] = None,
    scan: Annotated[str | None, typer.Option(help="raster | spiral | jitter")] = None,
    probe_size: Annotated[int | None, typer.Option(help="probe/frame pixels (64)")] = None,
    object_size: Annotated[int | None, typer.Option(help="object pixels (241)")] = None,
    alpha: Annotated[float | None, typer.Option(help="Poisson photon scale, eq. (6)")] = None,
    sigma: Annotated[float | None, typer.Option(help="Gaussian sigma, eq. (7)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing store")] = False,
    raw: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE.h5",
            help="also write the scan as a beamline file holds it (corner DC, pixel "
            "positions, geometry under /entry/instrument), to try `ptyinr ingest` on",
        ),
    ] = None,
) -> None:
    """Simulate a scan (paper protocol, or a preset such as measured-like) into a scan store
    with its ground truth."""
    with user_errors():
        config = _simulation_config(
            preset,
            overlap=overlap,
            noise=noise,
            scan=scan,
            probe_size=probe_size,
            object_size=object_size,
            alpha=alpha,
            sigma=sigma,
            seed=seed,
        )
        if out.exists() and not overwrite:
            raise InputError(f"{out}: already exists; pass --overwrite to replace it")
        if raw is not None and raw.exists() and not overwrite:
            raise InputError(f"{raw}: already exists; pass --overwrite to replace it")
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
    run_id: Annotated[str | None, typer.Option(help="name of the run (default: timestamp)")] = None,
    probe: Annotated[
        Path | None, typer.Option(help="known probe (.npy, frame shape): probe is not fitted")
    ] = None,
    probe_guess: ProbeGuessOption = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | auto")] = None,
    figures_dir: Annotated[
        Path | None, typer.Option("--figures", help="also write PNG figures here")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
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
) -> None:
    """Reconstruct object and probe of one scan store into reconstructions/<run_id>."""
    with user_errors():
        if probe is not None and probe_guess:
            raise InputError(
                "--probe and --probe-guess: give one (--probe holds a known probe fixed, "
                "--probe-guess starts a probe that is refined)"
            )
        overrides = list(set_ or []) + probe_guess_overrides(probe_guess)
        if device:
            overrides.append(f"train.device={device}")
        cfg = resolve_config(load_config(config, overrides))  # the engine's own settings
        target = parse_device_memory(plan_for) if plan_for else None
        plan = plan or target is not None
        if target is None:
            ranks, cfg = choose_ranks(processes, gpus, cfg)
        else:  # the other machine's ranks cannot be checked from here
            ranks = max(processes, gpus, 1)
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
    console.print(
        f"run [bold]{rid}[/] complete: {result.info['epochs']} epochs in "
        f"{result.info['train_seconds']:.1f} s, final loss {result.info['final_loss']:.3e}"
    )
    if result.info.get("quality"):
        console.print(_quality_table(result.info["quality"], f"quality of {rid}"))
    if figures_dir:
        paths = _write_figures(store_path, rid, figures_dir)
        console.print(f"figures: {', '.join(str(p) for p in paths)}")


def _open_run_checked(store_path: Path, run: str):
    runs = {r["run_id"]: r for r in store.list_runs(store_path)}
    if run not in runs:
        known = ", ".join(runs) or "none"
        raise InputError(f"{store_path}: no run {run!r} (runs: {known})")
    return store.open_run(store_path, run)


def evaluate(
    store_path: Annotated[Path, typer.Argument(metavar="STORE.zarr")],
    run: Annotated[str, typer.Option("--run", help="run id")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Quality of a run against the store's ground truth (simulated stores)."""
    with user_errors():
        from ptyinr import evaluate as ev

        ds = store.open_scan_store(store_path)
        result = _open_run_checked(store_path, run)
        if "true_object" not in ds:
            raise InputError(
                f"{store_path}: no ground truth (true_object); evaluate needs a simulated store. "
                "For measured data use the FRC of `ptyinr run`."
            )
        obj = result["object"].load()
        origin = np.asarray(result.attrs.get("origin_px", [0, 0]), dtype=np.float64)
        frame = (result.sizes["probe_y"], result.sizes["probe_x"])
        centres = store.positions_px(ds, frame) - origin
        if "positions_used" in result.attrs:
            centres = centres[np.asarray(result.attrs["positions_used"], dtype=int)]
        interior = ev.scanned_interior(obj.shape, centres)
        known = bool(result.attrs.get("known_probe"))
        scores = ev.compare_object(
            obj, ds["true_object"].load(), mask=interior, remove_ramp=not known
        )
        if "true_probe" in ds:
            scores.update(
                ev.compare_probe(
                    result["probe"].values, ds["true_probe"].values, remove_ramp=not known
                )
            )
    if as_json:
        print(json.dumps(scores, indent=2))
    else:
        console.print(_quality_table(scores, f"{store_path.name}: run {run}"))


def _write_figures(store_path: Path, run: str, out: Path) -> list[Path]:
    result = _open_run_checked(store_path, run).load()
    out.mkdir(parents=True, exist_ok=True)
    paths = figures.save_object_figures(result["object"], out, title=f"run {run}")
    paths += figures.save_probe_figure(result["probe"], out, title=f"run {run}")
    paths += figures.save_loss_figure(
        result["loss"], out, title=f"run {run}", validation=result.attrs.get("validation")
    )
    if "frc" in result:
        paths += figures.save_frc_figure(result[["frc", "half_bit_threshold"]], out)
    return paths


def show(
    store_path: Annotated[Path, typer.Argument(metavar="STORE.zarr")],
    run: Annotated[str, typer.Option("--run", help="run id")],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNGs")] = Path("figures"),
) -> None:
    """Write PNGs of a run: amplitude, phase, probe, loss (and FRC when computed)."""
    with user_errors():
        paths = _write_figures(store_path, run, out)
    for p in paths:
        console.print(str(p))


def demo(
    out: Annotated[Path, typer.Option(help="folder for the demo store and figures")] = Path(
        "ptyinr-demo"
    ),
    set_: SetOption = None,
) -> None:
    """Simulate a small scan, reconstruct it here with PtyINR, write results and figures."""
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
