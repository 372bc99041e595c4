"""First contact with a measured-like scan: object error and FRC against wall time.

The `measured-like` preset simulates what a hard X-ray nanoprobe measures: ~500 frames of
128 x 128 photon counts, a zone plate used ~0.3 mm out of focus (a ring-structured beam
~50 px wide at the sample), ~9 px raster steps, Poisson counts. Each case is one `ptyinr run`
exactly as a user types it (full reconstruction + two half-scan reconstructions + FRC, the
default local Dask cluster), timed from the command's start to its end:

- `data`:     the defaults, unknown probe, data-derived start (size and defocus estimated);
- `optics`:   the defaults with the zone plate given in `[probe]` (`probe_init = "optics"`);
- `file`:     the defaults with `--probe-guess` a beamline's analytic guess that is 20 % off
              in defocus (a .npy file);
- `pixels`:   the baseline: this project's pixel-grid object and probe (automatic
              differentiation, the same forward model and loss), from the same optics start,
              with learning rates of a pixel grid;
- `epie`:     the classical engine in the same pipeline (`model.method = epie`: rPIE, 30
              sweeps), from the same data-derived start as `data`.

Scores: object relative error against the ground truth (global phase, shift and phase ramp
removed, scanned interior) and the FRC half-bit crossing (spatial frequency as a fraction of
Nyquist, and half-period in metres). Results go to benchmarks/results/measured-like.json and a
table on stdout (copied into RESULTS.md).

    python benchmarks/bench_measured_like.py [--work DIR] [--cases data,optics,file,pixels,epie]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptyinr import store  # noqa: E402
from ptyinr.config import read_toml  # noqa: E402
from ptyinr.simulate import (  # noqa: E402
    SimulationConfig,
    make_probe,
    write_simulated_store,
)

PRESET = "measured-like"


def optics_overrides(sim: SimulationConfig, defocus_factor: float = 1.0) -> list[str]:
    return [
        "model.probe_init=optics",
        f"probe.diameter_m={sim.zone_plate_diameter_m}",
        f"probe.outer_zone_width_m={sim.outer_zone_width_m}",
        f"probe.central_stop_diameter_m={sim.central_stop_diameter_m}",
        f"probe.defocus_m={sim.defocus_m * defocus_factor}",
    ]


def analytic_guess(sim: SimulationConfig, path: Path, defocus_factor: float) -> Path:
    """A beamline's analytic zone-plate guess, `defocus_factor` x the true defocus (the
    simulator's own optics model, ptyinr.simulate.make_probe)."""
    probe = make_probe(sim.model_copy(update={"defocus_m": sim.defocus_m * defocus_factor}))
    np.save(path, probe)
    return path


def cases(sim: SimulationConfig, work: Path) -> dict[str, list[str]]:
    guess = analytic_guess(sim, work / "beamline-guess.npy", 1.2)
    return {
        "data": [],
        "optics": [a for o in optics_overrides(sim) for a in ("--set", o)],
        "file": ["--probe-guess", str(guess)],
        "pixels": [
            a
            for o in [
                *optics_overrides(sim),
                "model.method=pixels",
                "train.lr_object=2e-2",
                "train.lr_probe=2e-2",
                "train.epochs=100",
            ]
            for a in ("--set", o)
        ],
        "epie": ["--set", "model.method=epie"],
    }


def run_case(scan: Path, name: str, args: list[str]) -> dict[str, object]:
    command = ["ptyinr", "run", str(scan), "--run-id", name, "--force", "--quiet", *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"case": name, "error": done.stderr[-2000:], "wall_seconds": wall}
    ds = store.open_run(scan, name)
    attrs = dict(ds.attrs)
    quality = attrs.get("quality") or {}
    frequency = attrs.get("resolution_spatial_frequency")
    pixel = attrs.get("pixel_size")
    fraction = (
        float(frequency) * 2.0 * float(pixel)
        if frequency is not None and pixel is not None
        else None
    )
    if attrs.get("resolved_to_nyquist"):
        fraction = 1.0  # above the half-bit threshold up to Nyquist: resolved to the pixel
    return {
        "case": name,
        "command": " ".join(command),
        "wall_seconds": wall,
        "object_relative_error": quality.get("relative_error"),
        "probe_relative_error": quality.get("probe_relative_error"),
        "frc_crossing_fraction_of_nyquist": fraction,
        "frc_half_period": attrs.get("resolution"),
        "frc_unit": attrs.get("resolution_unit"),
        "resolved_to_nyquist": attrs.get("resolved_to_nyquist"),
        "probe_start": attrs.get("probe_start"),
        "epochs": attrs.get("epochs"),
        "train_seconds": attrs.get("train_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/measured-like"))
    parser.add_argument("--cases", default="data,optics,file,pixels,epie")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/measured-like.json")
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    sim = SimulationConfig.model_validate(read_toml(PRESET)["simulate"])
    scan = options.work / "scan.zarr"
    if not scan.exists():
        write_simulated_store(scan, sim)
    table = cases(sim, options.work)
    results = []
    for name in options.cases.split(","):
        result = run_case(scan, name, table[name])
        results.append(result)
        print(json.dumps(result, default=str), flush=True)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(options.out.read_text()) if options.out.exists() else {}
    previous.update({r["case"]: r for r in results})
    options.out.write_text(json.dumps(previous, indent=1, default=str))
    print("\n| case | wall s | object error | FRC crossing (x Nyquist) | half-period |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['case']} | {r['wall_seconds']:.0f} | {_fmt(r.get('object_relative_error'))} | "
            f"{_fmt(r.get('frc_crossing_fraction_of_nyquist'))} | "
            f"{_fmt(r.get('frc_half_period'))} {r.get('frc_unit') or ''} |"
        )


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
