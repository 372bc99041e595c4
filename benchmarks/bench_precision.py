"""Does bfloat16 cost reconstruction quality? fp32 vs bf16 object networks on the paper's cases.

`performance.precision = bf16` runs the SIRENs' width x width layers in bfloat16 (first layer,
head, physics and loss stay float32), `bf16-backward` only their backward GEMMs
(ptyinr.fastpaths, models.siren). This benchmark is the evidence behind `precision = auto`
(bf16 for mini-batch runs, float32 for full batch): for each simulation case it trains PtyINR
from the same seed in each precision and records the quality against the ground truth at the
same epochs (paired: same data, same initial weights, same batches), the data loss, and the
training seconds.

    python benchmarks/bench_precision.py                      # small scale, SIREN 3 x 128
    python benchmarks/bench_precision.py --cases 6 --seeds 0,1,2 --epoch-factor 2
    python benchmarks/bench_precision.py --cases 7 --batch-fraction 31 --epoch-factor 0.4
    python benchmarks/bench_precision.py --report benchmarks/results/precision-small-w128.json

Results: benchmarks/results/precision-<scale>-w<width>[-cases...][-b<F>][-<tag>].json and a
Markdown table.
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

from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan

# bench_quality's seven cases and a dense known-probe one: the high-accuracy regime with
# enough positions for mini-batches (--batch-fraction)
PRECISION_CASES = [*CASES, ("known probe 40%", {"overlap": 0.4, "noise": "clean"}, True)]

VARIANTS: dict[str, list[str]] = {
    "fp32": ["performance.precision=fp32"],
    "bf16-backward": ["performance.precision=bf16-backward"],
    "bf16": ["performance.precision=bf16"],
}


def markdown(rows: list[dict[str, Any]]) -> str:
    """Final and best (lowest over the run: an oracle, only ground truth can pick it) object
    error, the lowest data loss, and training seconds of each variant."""
    names = [v for v in VARIANTS if any(v in r for r in rows)]
    lines = [
        "| case | seed | "
        + " | ".join(f"final {v}" for v in names)
        + " | "
        + " | ".join(f"best {v}" for v in names)
        + " | lowest loss "
        + " / ".join(names)
        + " | train s "
        + " / ".join(names)
        + " |",
        "|---|---|" + "---|" * (2 * len(names) + 2),
    ]
    for r in rows:
        have = [v for v in names if v in r]
        final = " | ".join(f"{r[v][-1]['relative_error']:.4f}" if v in r else "-" for v in names)
        best = " | ".join(
            f"{min(c['relative_error'] for c in r[v]):.4f}" if v in r else "-" for v in names
        )
        loss = " / ".join(f"{min(c['loss'] for c in r[v]):.1e}" for v in have)
        secs = " / ".join(f"{r[v][-1]['seconds']:.0f}" for v in have)
        lines.append(f"| {r['case']} | {r.get('seed', 0)} | {final} | {best} | {loss} | {secs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="all", help="comma-separated case indices, or all")
    parser.add_argument("--width", type=int, default=0, help="SIREN width (0: the scale's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS))
    parser.add_argument("--epoch-factor", type=float, default=1.0, help="scale epochs (smoke)")
    parser.add_argument(
        "--batch-fraction",
        type=int,
        default=0,
        help="mini-batches of 1/F of the positions (0: full batch; the authors': 31)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--report", type=Path, help="only print the table of a results file")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())["rows"]))
        return
    torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    overrides = [*scale["inr"], *args.set]
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
        name, sim_overrides, known = PRECISION_CASES[index]
        s = simulate_scan(SimulationConfig(**{**scale["simulate"], **sim_overrides}))
        data = ScanData(np.asarray(s["intensities"]), np.asarray(s["positions_px"]))
        truth = (np.asarray(s["object"]), np.asarray(s["probe"]))
        known_probe = truth[1] if known else None
        batch = []
        if args.batch_fraction:
            n = data.positions_px.shape[0]
            batch = [f"train.batch_size={max(round(n / args.batch_fraction), 1)}"]
            name = f"{name}, batch n/{args.batch_fraction}"
        for seed in [int(x) for x in args.seeds.split(",")]:
            row: dict[str, Any] = {"case": name, "seed": seed}
            for variant in args.variants.split(","):
                row[variant] = run_method(
                    data,
                    [
                        *overrides,
                        *VARIANTS[variant],
                        *batch,
                        f"train.threads={args.threads}",
                        f"train.seed={seed}",
                    ],
                    epochs,
                    truth,
                    known_probe,
                    args.device,
                )
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.cases == "all" else "-cases" + args.cases.replace(",", "")
    tag += f"-b{args.batch_fraction}" if args.batch_fraction else ""
    tag += f"-{args.tag}" if args.tag else ""
    out = args.out / f"precision-{args.scale}-w{width}{tag}.json"
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
