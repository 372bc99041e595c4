"""Quality of PtyINR vs the pixel (automatic-differentiation) baseline on the paper's cases.

For each of the seven simulation cases (clean at 40 / -540 / -800 % overlap; Poisson, Gaussian,
mixed noise at -540 %; known probe at -540 %) this runs

- PtyINR (SIREN object + hash-grid probe) for a fixed number of epochs, and
- the pixel baseline (object and probe as free pixel arrays, same loss and optimiser) to
  convergence,

recording object/probe quality against the ground truth (ptyinr.evaluate, scanned interior,
ramp removed for unknown probes) as a function of epochs AND of training seconds (evaluation
time excluded). The table reports each method's final quality, the baseline's best quality
(which a user could not pick without ground truth), and the quality each method had reached
at matched wall time (the other method's total training time).

    python benchmarks/bench_quality.py --scale small          # ~20-30 min on 2 CPU cores
    python benchmarks/bench_quality.py --scale paper --device cuda   # the paper's sizes

Results: benchmarks/results/quality-<scale>.json and a Markdown table on stdout.

Fixed epochs per method; for a fixed wall-time budget per method, with held-out validation
choosing the returned state, and ePIE next to the pixel baseline, see
benchmarks/bench_quality_time.py (issue 14).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ptyinr import evaluate
from ptyinr.config import load_config
from ptyinr.engines import Engine
from ptyinr.launch import build_engine
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan

CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("clean 40%", {"overlap": 0.4, "noise": "clean"}, False),
    ("clean -540%", {"overlap": -5.4, "noise": "clean"}, False),
    ("clean -800%", {"overlap": -8.0, "noise": "clean"}, False),
    ("poisson -540%", {"overlap": -5.4, "noise": "poisson"}, False),
    ("gaussian -540%", {"overlap": -5.4, "noise": "gaussian"}, False),
    ("mixed -540%", {"overlap": -5.4, "noise": "mixed"}, False),
    ("known probe -540%", {"overlap": -5.4, "noise": "clean"}, True),
]

SCALES: dict[str, dict[str, Any]] = {
    # CPU-sized: same physics and method, smaller arrays and narrower SIRENs.
    "small": {
        "simulate": {"object_size": 96, "probe_size": 32, "focus_fwhm_px": 3.0},
        "inr": ["model.siren_width=128", "train.lr_object=1e-3", "train.lr_probe=1e-3"],
        "inr_epochs": 400,
        "pixel_epochs": 3000,
    },
    "paper": {
        "simulate": {"object_size": 241, "probe_size": 64, "focus_fwhm_px": 5.0},
        "inr": ["train.lr_object=1e-4", "train.lr_probe=1e-4"],
        "inr_epochs": 2000,
        "pixel_epochs": 10000,
    },
}
PIXEL_OVERRIDES = [
    "model.object=pixels",
    "model.probe=pixels",
    "train.lr_object=1e-2",
    "train.lr_probe=1e-2",
]


def score(trainer: Engine, truth_object: np.ndarray, truth_probe: np.ndarray) -> dict[str, float]:
    """Quality of the trainer's current state against ground truth (as `ptyinr evaluate`)."""
    result = trainer.result()  # pixel units: object coords are the simulator's pixel frame
    obj = result.object
    truth = xr.DataArray(
        truth_object,
        dims=("ty", "tx"),
        coords={"ty": np.arange(truth_object.shape[0]), "tx": np.arange(truth_object.shape[1])},
    )
    interior = evaluate.scanned_interior(
        result.geometry.object_shape, result.geometry.window_centres_on_grid()
    )
    known = trainer.probe.kind == "fixed"
    out = evaluate.compare_object(obj, truth, mask=interior, remove_ramp=not known)
    out.update(evaluate.compare_probe(result.probe.values, truth_probe, remove_ramp=not known))
    return {k: float(v) for k, v in out.items()}


def run_method(
    data: ScanData,
    overrides: list[str],
    epochs: int,
    truth: tuple[np.ndarray, np.ndarray],
    known_probe: np.ndarray | None,
    device: str,
    n_checkpoints: int = 25,
) -> list[dict[str, float]]:
    """Train, scoring at ~n_checkpoints evenly spaced epochs; seconds exclude scoring."""
    config = load_config(overrides=[*overrides, f"train.epochs={epochs}", f"train.device={device}"])
    started = time.perf_counter()
    trainer = build_engine(data, config, known_probe=known_probe)
    setup = time.perf_counter() - started
    trainer.seconds = setup  # the probe warm start is part of the method's cost
    every = max(epochs // n_checkpoints, 1)
    curve = []
    while trainer.epoch < epochs:
        loss = trainer.train_epoch()  # adds its own seconds
        if not np.isfinite(loss):
            break
        if trainer.epoch % every == 0 or trainer.epoch == epochs:
            curve.append(
                {
                    "epoch": trainer.epoch,
                    "seconds": trainer.seconds,
                    "loss": loss,
                    **score(trainer, *truth),
                }
            )
    return curve


def at_time(curve: list[dict[str, float]], seconds: float) -> dict[str, float]:
    """The last scored state reached within `seconds` of training (first one if none)."""
    reached = [c for c in curve if c["seconds"] <= seconds * 1.0001]
    return reached[-1] if reached else curve[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="all", help="comma-separated case indices, or all")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--epoch-factor", type=float, default=1.0, help="scale epochs (smoke)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    chosen = range(len(CASES)) if args.cases == "all" else [int(i) for i in args.cases.split(",")]
    rows = []
    for index in chosen:
        name, sim_overrides, known = CASES[index]
        sim = SimulationConfig(**{**scale["simulate"], **sim_overrides})
        s = simulate_scan(sim)
        data = ScanData(np.asarray(s["intensities"]), np.asarray(s["positions_px"]))
        truth = (np.asarray(s["object"]), np.asarray(s["probe"]))
        known_probe = truth[1] if known else None
        inr_epochs = max(int(scale["inr_epochs"] * args.epoch_factor), 1)
        pixel_epochs = max(int(scale["pixel_epochs"] * args.epoch_factor), 1)
        inr = run_method(data, scale["inr"], inr_epochs, truth, known_probe, args.device)
        pix = run_method(data, PIXEL_OVERRIDES, pixel_epochs, truth, known_probe, args.device)
        rows.append(
            {
                "case": name,
                "positions": int(data.positions_px.shape[0]),
                "probe_fwhm_px": float(s["fwhm_px"]),
                "ptyinr": inr,
                "pixels": pix,
            }
        )
        print(
            f"{name}: PtyINR {inr[-1]['relative_error']:.3f} in {inr[-1]['seconds']:.0f} s; "
            f"pixels {pix[-1]['relative_error']:.3f} in {pix[-1]['seconds']:.0f} s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"quality-{args.scale}.json"
    meta = {
        "scale": args.scale,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "scale_settings": scale,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(rows))
    print(f"\nwritten {out}")


def _fmt(c: dict[str, float]) -> str:
    return (
        f"{c['amplitude_psnr_db']:.1f} | {c['phase_psnr_db']:.1f} | "
        f"{c['probe_amplitude_psnr_db']:.1f} | {c['probe_phase_psnr_db']:.1f} | "
        f"{c['relative_error']:.3f} | {c['epoch']:.0f} | {c['seconds']:.0f}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| case | method | obj amp PSNR | obj phase PSNR | probe amp PSNR | probe phase PSNR "
        "| rel. error | epochs | train s |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        inr, pix = r["ptyinr"], r["pixels"]
        best = min(pix, key=lambda c: c["relative_error"])
        t_inr = inr[-1]["seconds"]
        lines += [
            f"| {r['case']} | PtyINR | {_fmt(inr[-1])} |",
            f"| | pixels, final | {_fmt(pix[-1])} |",
            f"| | pixels, best (oracle) | {_fmt(best)} |",
            f"| | pixels at PtyINR's time | {_fmt(at_time(pix, t_inr))} |",
            f"| | PtyINR at pixels' time | {_fmt(at_time(inr, pix[-1]['seconds']))} |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
