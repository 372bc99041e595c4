"""Does bfloat16 cost reconstruction quality? fp32 vs bf16 object networks on the paper's cases.

`performance.precision = bf16` runs the SIRENs' width x width layers in bfloat16 (first layer,
head, physics and loss stay float32; pipeline.fastpaths). `auto`, the default, picks it on
devices that multiply bf16 natively. This benchmark is the evidence for that default: for each
of the seven simulation cases of bench_quality.py it trains PtyINR twice from the same seed,
once per precision, and compares the quality against the ground truth at the same epochs
(paired: same data, same initial weights, same batches) and the training seconds.

    python benchmarks/bench_precision.py                      # small scale, SIREN 3 x 128
    python benchmarks/bench_precision.py --width 512 --cases 0,3   # the paper's width

Results: benchmarks/results/precision-<scale>-w<width>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import CASES, SCALES, run_method

from pipeline.simulate import SimulationConfig, simulate_scan
from pipeline.train import ScanData

PRECISIONS = ("fp32", "bf16")


def paired_gap(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> float:
    """Largest |b - a| of `key` over the epochs both curves scored."""
    at = {c["epoch"]: c[key] for c in a}
    gaps = [abs(c[key] - at[c["epoch"]]) for c in b if c["epoch"] in at]
    return max(gaps) if gaps else float("nan")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | rel. error fp32 | rel. error bf16 | bf16 - fp32 | max paired gap "
        "| phase PSNR fp32 / bf16 | amp PSNR fp32 / bf16 | train s fp32 / bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, b = r["fp32"][-1], r["bf16"][-1]
        lines.append(
            f"| {r['case']} | {f['relative_error']:.4f} | {b['relative_error']:.4f} | "
            f"{b['relative_error'] - f['relative_error']:+.4f} | "
            f"{paired_gap(r['fp32'], r['bf16'], 'relative_error'):.4f} | "
            f"{f['phase_psnr_db']:.1f} / {b['phase_psnr_db']:.1f} | "
            f"{f['amplitude_psnr_db']:.1f} / {b['amplitude_psnr_db']:.1f} | "
            f"{f['seconds']:.0f} / {b['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="all", help="comma-separated case indices, or all")
    parser.add_argument("--width", type=int, default=0, help="SIREN width (0: the scale's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch-factor", type=float, default=1.0, help="scale epochs (smoke)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    overrides = list(scale["inr"])
    if args.width:
        overrides = [o for o in overrides if not o.startswith("model.siren_width=")]
        overrides.append(f"model.siren_width={args.width}")
    width = next(
        (int(o.split("=")[1]) for o in overrides if o.startswith("model.siren_width=")), 512
    )
    chosen = range(len(CASES)) if args.cases == "all" else [int(i) for i in args.cases.split(",")]
    epochs = max(int(scale["inr_epochs"] * args.epoch_factor), 1)
    rows = []
    for index in chosen:
        name, sim_overrides, known = CASES[index]
        s = simulate_scan(SimulationConfig(**{**scale["simulate"], **sim_overrides}))
        data = ScanData(np.asarray(s["intensities"]), np.asarray(s["positions_px"]))
        truth = (np.asarray(s["object"]), np.asarray(s["probe"]))
        known_probe = truth[1] if known else None
        row: dict[str, Any] = {"case": name}
        for precision in PRECISIONS:
            row[precision] = run_method(
                data,
                [*overrides, f"performance.precision={precision}", f"train.threads={args.threads}"],
                epochs,
                truth,
                known_probe,
                args.device,
            )
        rows.append(row)
        f, b = row["fp32"][-1], row["bf16"][-1]
        print(
            f"{name}: rel. error fp32 {f['relative_error']:.4f} ({f['seconds']:.0f} s), "
            f"bf16 {b['relative_error']:.4f} ({b['seconds']:.0f} s)",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"precision-{args.scale}-w{width}.json"
    meta = {
        "scale": args.scale,
        "width": width,
        "epochs": epochs,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:]),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(rows))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
