"""Held-out validation against the ground-truth oracle: does `train.validation_fraction`
choose a state close to the best one a method passes through, without ground truth?

    python benchmarks/bench_validation.py [--scan /tmp/measured-like/scan.zarr] [--threads 1]
        [--on positions|pixels] [--block 1] [--fraction 0.05] [--patience 0]
        [--sparse ALPHA]

The scan is the `measured-like` preset (Poisson counts, unknown probe; made if missing). Each
case fits in this process with `train.validation_fraction = 0.05` (patience 0: the whole run,
so the oracle sees every state), scoring the object against the truth after every epoch
(scanned interior, phase ramp removed, as `ptyinr evaluate`). Reported per case: the oracle's
best error and its epoch, the validation-chosen epoch and its error (the state returned),
and the last epoch's error. Results: benchmarks/results/validation.json.

`--on pixels` holds out detector pixels (`train.validation_on`, in `--block` squares) instead
of positions. `--sparse ALPHA` fits a simulated sparse scan instead (64 x 64 object, 32 x 32
frames, -100 % overlap = 36 positions, Poisson counts of dose ALPHA, Gaussian data term):
there a held-out position's object is seen by no other position. With `--patience P` the
returned state is the one a run stopping after P worse validations returns (replayed from
the recorded held-out curve of the whole run, which the oracle needs).
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
    "pixels sparse": [
        "model.method=pixels", "train.lr_object=1e-2", "train.lr_probe=1e-2", "train.epochs=400",
        "train.loss=gaussian",
    ],
    "epie sparse": ["model.method=epie", "train.epochs=100", "train.loss=gaussian"],
}  # fmt: skip


def replay_patience(epochs: list[int], losses: list[float], patience: int) -> int:
    """The best epoch a run stopping after `patience` worse validations would return."""
    best, since, chosen = float("inf"), 0, 0
    for epoch, value in zip(epochs, losses, strict=True):
        if value < best:
            best, since, chosen = value, 0, epoch
        else:
            since += 1
            if patience and since >= patience:
                break
    return chosen


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
    parser.add_argument("--cases", help="default: the non-sparse cases (--sparse: the sparse)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/validation.json")
    parser.add_argument("--on", choices=("positions", "pixels"), default="positions")
    parser.add_argument("--block", type=int, default=1, help="train.validation_block")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--patience", type=int, default=0, help="replayed (see above)")
    parser.add_argument("--sparse", type=float, default=None, metavar="ALPHA")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    sparse = None
    if options.sparse is not None:
        import numpy as np
        import xarray as xr

        from ptyinr.scandata import ScanData
        from ptyinr.simulate import simulate_scan

        sim_config = SimulationConfig(
            object_size=64,
            probe_size=32,
            focus_fwhm_px=3,
            overlap=-1.0,
            noise="poisson",
            alpha=options.sparse,
        )
        made = simulate_scan(sim_config)
        side = np.arange(made["object"].shape[0])
        sparse = (
            ScanData(made["intensities"], made["positions_px"]),
            xr.DataArray(made["object"], dims=("ty", "tx"), coords={"ty": side, "tx": side}),
        )
    elif not options.scan.exists():
        sim = SimulationConfig.model_validate(read_toml("measured-like")["simulate"])
        write_simulated_store(options.scan, sim)
    results = []
    chosen_cases = options.cases or ",".join(
        name for name in CASES if name.endswith("sparse") == (sparse is not None)
    )
    for name in chosen_cases.split(","):
        overrides = [
            *CASES[name],
            "train.device=cpu",
            f"train.validation_fraction={options.fraction}",
            f"train.validation_on={options.on}",
            f"train.validation_block={options.block}",
        ]
        cfg = load_config(overrides=overrides)
        if sparse is None:
            loaded = load_scan(options.scan, cfg)
            data, truth = loaded.data, loaded.dataset["true_object"].load()
        else:
            data, truth = sparse
        engine = build_engine(data, cfg)
        interior = evaluate.scanned_interior(
            engine.geometry.object_shape, engine.geometry.window_centres_on_grid()
        )
        errors: dict[int, float] = {}

        score = scorer(engine, truth, interior, errors)
        started = time.perf_counter()
        result = engine.fit(progress=False, on_epoch=score)
        seconds = time.perf_counter() - started
        record = result.info["validation"]
        chosen = replay_patience(record["epochs"], record["loss"], options.patience)
        oracle_epoch = min(errors, key=errors.get)
        row = {
            "case": name,
            "overrides": overrides,
            "oracle_best_error": errors[oracle_epoch],
            "oracle_best_epoch": oracle_epoch,
            "validation_epoch": chosen,
            "returned_error": errors[chosen],
            "patience": options.patience,
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
