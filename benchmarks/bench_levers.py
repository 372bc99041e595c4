"""Object error against epochs for settings side by side on one small simulated scan: the data
terms (`train.loss`), the Poisson background floor, the probe's learning rate, any `--set`.

Each setting is an engine built on the same simulated data (same seed), trained in this
process one after the other with one torch thread, and scored every `epochs / points` epochs
against the ground truth (benchmarks/bench_quality.py's `score`: scanned interior, phase
offset and ramp removed). Used for the "Data terms" and "Probe learning rate" tables of
benchmarks/RESULTS.md:

    P="model.method=pixels train.lr_object=1e-2 train.lr_probe=1e-2"
    python benchmarks/bench_levers.py --noise poisson --alpha 10 --epochs 300 \\
        --case "smooth_l1: $P" --case "gaussian: $P train.loss=gaussian" \\
        --case "poisson: $P train.loss=poisson"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import score

from ptyinr import losses
from ptyinr.config import load_config
from ptyinr.launch import build_engine
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan


def parse_case(text: str) -> tuple[str, list[str]]:
    """'name: key=value key=value' -> (name, overrides)."""
    name, _, rest = text.partition(":")
    return name.strip(), rest.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", default="poisson", help="simulate's noise model")
    parser.add_argument("--alpha", type=float, default=10.0, help="Poisson dose factor")
    parser.add_argument("--overlap", type=float, default=-1.0, help="negative: sparse")
    parser.add_argument("--object-size", type=int, default=64)
    parser.add_argument("--probe-size", type=int, default=32)
    parser.add_argument("--focus-fwhm", type=float, default=3.0, help="probe FWHM, px")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--points", type=int, default=5, help="scores per case")
    parser.add_argument(
        "--poisson-eps", type=float, default=None, help="override losses.POISSON_EPS"
    )
    parser.add_argument(
        "--case", action="append", required=True, help="'name: key=value ...' (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if args.poisson_eps is not None:
        losses.POISSON_EPS = args.poisson_eps
    sim = simulate_scan(
        SimulationConfig(
            object_size=args.object_size,
            probe_size=args.probe_size,
            focus_fwhm_px=args.focus_fwhm,
            overlap=args.overlap,
            noise=args.noise,
            alpha=args.alpha,
        )
    )
    data = ScanData(sim["intensities"], sim["positions_px"])
    every = max(args.epochs // args.points, 1)
    rows = []
    for text in args.case:
        name, overrides = parse_case(text)
        cfg = load_config(
            overrides=[
                "train.device=cpu",
                "train.threads=1",
                f"train.epochs={args.epochs}",
                *overrides,
            ]
        )
        started = time.perf_counter()
        engine = build_engine(data, cfg)
        setup = time.perf_counter() - started
        errors = {}
        while engine.epoch < args.epochs:
            engine.train_epoch()
            if engine.epoch % every == 0 or engine.epoch == args.epochs:
                errors[engine.epoch] = round(
                    score(engine, sim["object"], sim["probe"])["relative_error"], 4
                )
        row = {
            "case": name,
            "overrides": overrides,
            "errors": errors,
            "setup_s": round(setup, 1),
            "train_s": round(engine.seconds, 1),
        }
        rows.append(row)
        shown = "  ".join(f"{e}:{v:.3f}" for e, v in errors.items())
        print(f"{name:24s} n={data.n_positions}  {shown}  ({row['train_s']} s)", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
