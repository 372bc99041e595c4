"""Training-step time of this checkout against another revision, measured side by side.

    python benchmarks/bench_ab.py --baseline REV [--threads 2] [--rounds 4] [--steps 15]

For refactors that must not change speed: REV is checked out into a temporary git worktree,
and each round runs one child process per side (alternating which goes first, so load on a
shared machine hits both alike). Each child builds the default engine on the same simulated
scan and times `steps` training steps after two warm-up steps (the probe warm start and other
set-up are excluded). Cases: the paper's 3600 x 64 x 64 scan (object 241 px, 40 % overlap) in
the default mini-batches (spatially local batches of 64) and a 400-position scan fitted in full
batches. Reports per case the median step time of each side over all rounds, the ratio and the
spread of the per-round ratios.

The child speaks both layouts: a revision with `ptyinr.launch.build_engine` (the engine seam)
or an older one with `pipeline.train.Trainer`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "paper 3600 x 64 x 64, mini-batch 64 (default)": {
        "sim": {"object_size": 241, "probe_size": 64, "overlap": 0.4},
        "overrides": ["train.device=cpu"],
    },
    "400 x 32 x 32, full batch": {
        "sim": {"object_size": 128, "probe_size": 32, "overlap": 0.4},
        "overrides": ["train.device=cpu", "train.batch_size=0"],
    },
}


def child(source: str, data_file: str, overrides: list[str], steps: int, threads: int) -> None:
    """Time training steps with the code under `source` (prints JSON)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    loaded = np.load(data_file)
    if (Path(source) / "pipeline" / "train.py").is_file():  # the layout before the engine seam
        sys.path.insert(0, source)
        from pipeline.train import ScanData
        from pipeline.train import Trainer as build_engine

        from pipeline.config import load_config

        origin = "pipeline"
    else:  # `ptyinr` from this source tree, not from wherever it is installed
        link = Path(tempfile.mkdtemp(prefix="ptyinr-ab-src-")) / "ptyinr"
        link.symlink_to(Path(source) / "pipeline")
        sys.path.insert(0, str(link.parent))
        from ptyinr.config import load_config
        from ptyinr.launch import build_engine
        from ptyinr.scandata import ScanData

        origin = "ptyinr"
    module = sys.modules[build_engine.__module__]
    data = ScanData(loaded["intensities"], loaded["positions_px"])
    engine = build_engine(data, load_config(overrides=overrides))
    n = engine.geometry.n_positions
    full = engine.batch_size <= 0
    rng = np.random.default_rng(0)
    batches = [
        np.arange(n) if full else np.sort(rng.choice(n, engine.batch_size, replace=False))
        for _ in range(steps + 2)
    ]
    times = []
    for batch in batches:
        start = time.perf_counter()
        engine.train_step(batch, full)
        times.append(time.perf_counter() - start)
    print(json.dumps({"origin": origin, "module": module.__file__, "step_s": times[2:]}))


def simulate(case: dict, folder: Path) -> Path:
    import numpy as np

    from ptyinr.simulate import SimulationConfig, simulate_scan

    sim = simulate_scan(SimulationConfig(noise="clean", **case["sim"]))
    path = folder / f"scan-{case['sim']['probe_size']}.npz"
    np.savez(path, intensities=sim["intensities"], positions_px=sim["positions_px"])
    return path


def run_side(source: Path, data: Path, case: dict, steps: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        json.dumps([str(source), str(data), case["overrides"], steps, threads]),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=source)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision to compare against")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*json.loads(args.child))
        return
    if not args.baseline:
        parser.error("--baseline REV is required")
    with tempfile.TemporaryDirectory(prefix="ptyinr-ab-") as tmp:
        folder = Path(tmp)
        worktree = folder / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            report = {}
            for name, case in CASES.items():
                data = simulate(case, folder)
                sides: dict[str, list[float]] = {"baseline": [], "this": []}
                ratios = []
                for r in range(args.rounds):
                    order = [("baseline", worktree), ("this", ROOT)]
                    if r % 2:
                        order.reverse()
                    medians = {}
                    for side, source in order:
                        out = run_side(source, data, case, args.steps, args.threads)
                        sides[side] += out["step_s"]
                        medians[side] = statistics.median(out["step_s"])
                        print(
                            f"  {name} round {r + 1} {side} ({out['origin']}): "
                            f"{medians[side] * 1e3:.1f} ms/step",
                            file=sys.stderr,
                        )
                    ratios.append(medians["this"] / medians["baseline"])
                base = statistics.median(sides["baseline"])
                this = statistics.median(sides["this"])
                report[name] = {
                    "baseline_ms": base * 1e3,
                    "this_ms": this * 1e3,
                    "ratio": this / base,
                    "round_ratios": [round(x, 3) for x in ratios],
                }
                print(
                    f"{name}: baseline {base * 1e3:.1f} ms, this {this * 1e3:.1f} ms, "
                    f"ratio {this / base:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})"
                )
            print(json.dumps(report, indent=1))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                check=False,
                capture_output=True,
            )


if __name__ == "__main__":
    main()
