"""Held-out validation against the ground-truth oracle: does `train.validation_fraction`
choose a state close to the best one a method passes through, without ground truth?

    python benchmarks/bench_validation.py [--scan /tmp/measured-like/scan.zarr] [--threads 1]

The scan is the `measured-like` preset (Poisson counts, unknown probe; made if missing). Each
case fits in this process with `train.validation_fraction = 0.05` (patience 0: the whole run,
so the oracle sees every state), scoring the object against the truth after every epoch
(scanned interior, phase ramp removed, as `ptyinr evaluate`). Reported per case: the oracle's
best error and its epoch, the validation-chosen epoch and its error (the state returned),
and the last epoch's error. Results: benchmarks/results/validation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CASES: dict[str, list[str]] = {
    "epie step 1.0 (follows the noise)": [
        "model.method=epie", "epie.object_step=1.0", "epie.probe_step=1.0", "train.epochs=30",
    ],
    "epie (default step 0.5)": ["model.method=epie", "train.epochs=30"],
    "pixels (Adam 2e-2)": [
        "model.method=pixels", "train.lr_object=2e-2", "train.lr_probe=2e-2", "train.epochs=60",
    ],
}  # fmt: skip


def scorer(engine, truth, interior, errors: dict[int, float]):
    """on_epoch callback: the object error against the truth after each epoch."""
    from ptyinr import evaluate

    def score(epoch: int, _loss: float) -> None:
        scores = evaluate.compare_object(
            engine.result().object, truth, mask=interior, remove_ramp=True
        )
        errors[epoch] = scores["relative_error"]

    return score


def main() -> None:
    from ptyinr import evaluate
    from ptyinr.config import load_config, read_toml
    from ptyinr.launch import build_engine
    from ptyinr.scandata import load_scan
    from ptyinr.simulate import SimulationConfig, write_simulated_store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, default=Path("/tmp/measured-like/scan.zarr"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/validation.json")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    if not options.scan.exists():
        sim = SimulationConfig.model_validate(read_toml("measured-like")["simulate"])
        write_simulated_store(options.scan, sim)
    results = []
    for name in options.cases.split(","):
        overrides = [*CASES[name], "train.device=cpu", "train.validation_fraction=0.05"]
        cfg = load_config(overrides=overrides)
        loaded = load_scan(options.scan, cfg)
        truth = loaded.dataset["true_object"].load()
        engine = build_engine(loaded.data, cfg)
        interior = evaluate.scanned_interior(
            engine.geometry.object_shape, engine.geometry.window_centres_on_grid()
        )
        errors: dict[int, float] = {}

        score = scorer(engine, truth, interior, errors)
        started = time.perf_counter()
        result = engine.fit(progress=False, on_epoch=score)
        seconds = time.perf_counter() - started
        record = result.info["validation"]
        returned = evaluate.compare_object(result.object, truth, mask=interior, remove_ramp=True)
        oracle_epoch = min(errors, key=errors.get)
        row = {
            "case": name,
            "overrides": overrides,
            "oracle_best_error": errors[oracle_epoch],
            "oracle_best_epoch": oracle_epoch,
            "validation_epoch": record["best_epoch"],
            "returned_error": returned["relative_error"],
            "last_error": errors[max(errors)],
            "epochs": max(errors),
            "seconds_incl_scoring": seconds,
            "errors": errors,
            "validation": record,
        }
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("errors", "validation")}))
        sys.stdout.flush()
    options.out.write_text(json.dumps(results, indent=1))
    print("\n| case | oracle best (epoch) | validation-chosen (epoch) | last (epoch) |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['case']} | {r['oracle_best_error']:.3f} ({r['oracle_best_epoch']}) | "
            f"{r['returned_error']:.3f} ({r['validation_epoch']}) | "
            f"{r['last_error']:.3f} ({r['epochs']}) |"
        )


if __name__ == "__main__":
    main()
