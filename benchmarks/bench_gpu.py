"""The paper's largest case on one device: 40,401 x 220 x 220, full batch, timed per epoch.

Issue 6's GPU target is 300 epochs of this case in under 10 minutes on one GPU (the authors:
31 minutes on four). This script builds the scan on the device itself (simulated, so the
result can also be scored against the truth), prints the memory / time plan, trains full
batch for `--epochs` epochs or until `--time-limit`, and reports seconds per epoch, the
300-epoch time (measured when the run got there, else extrapolated and said so), the peak
device memory against the plan, and the object error.

    python benchmarks/bench_gpu.py                                # CUDA, auto: fp32 (full batch)
    python benchmarks/bench_gpu.py --tf32                         # float32 with TF32 matmuls
    python benchmarks/bench_gpu.py --precision bf16               # bfloat16 hidden layers
    python benchmarks/bench_gpu.py --side 7 --frame 32 --step 3 --device cpu --epochs 2  # smoke

Results: benchmarks/results/gpu-<device>-<precision>.json and a Markdown block on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import xarray as xr  # noqa: E402
from bench_scale import object_error, trainer_values  # noqa: E402

from ptyinr.config import load_config  # noqa: E402
from ptyinr.launch import build_engine  # noqa: E402
from ptyinr.physics import ScanGeometry, forward_intensity  # noqa: E402
from ptyinr.runtime import plan  # noqa: E402
from ptyinr.scandata import ScanData  # noqa: E402
from ptyinr.simulate import SimulationConfig, make_object, make_probe  # noqa: E402


def simulate_on_device(
    side: int, frame: int, step: float, device: torch.device, block: int = 2048
) -> dict[str, Any]:
    """A side x side raster of frame x frame patterns with `step` px between windows, made
    block by block on `device` (the whole case is 7.8 GB of float32 intensities)."""
    size = int(np.ceil((side - 1) * step)) + frame + 2
    cfg = SimulationConfig(object_size=size, probe_size=frame, focus_fwhm_px=step / 0.6)
    obj = make_object(cfg)
    probe = make_probe(cfg)
    axis = frame / 2 + 1 + step * np.arange(side) + 0.25  # sub-pixel positions
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    positions = np.stack([yy.ravel(), xx.ravel()], axis=1)
    geometry = ScanGeometry.from_positions(
        positions, probe.shape, object_shape=obj.shape, origin_px=(0, 0)
    )
    flat_obj = torch.as_tensor(obj).reshape(-1).to(device)
    probe_t = torch.as_tensor(probe).to(device)
    index = torch.as_tensor(geometry.window_flat_indices())
    shifts = torch.as_tensor(geometry.subpixel, dtype=torch.float32)
    intensities = np.empty((len(positions), frame, frame), np.float32)
    with torch.no_grad():
        for start in range(0, len(positions), block):
            stop = min(start + block, len(positions))
            patches = flat_obj[index[start:stop].to(device)]
            out = forward_intensity(probe_t, patches, shifts[start:stop].to(device))
            intensities[start:stop] = (out * 1e6).cpu().numpy()
    return {"object": obj, "positions": positions, "intensities": intensities}


def truth_array(obj: np.ndarray) -> xr.DataArray:
    """The simulated object on pixel coordinates (the scan data carry no pixel size)."""
    ny, nx = obj.shape
    return xr.DataArray(
        obj, dims=("y", "x"), coords={"y": np.arange(ny) * 1.0, "x": np.arange(nx) * 1.0}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=201, help="raster side (201: 40,401)")
    parser.add_argument("--frame", type=int, default=220)
    parser.add_argument("--step", type=float, default=11.0, help="px between windows")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds of training")
    parser.add_argument("--precision", default="auto", help="performance.precision")
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    sim = simulate_on_device(args.side, args.frame, args.step, device)
    simulate_s = time.perf_counter() - started
    n = len(sim["positions"])
    overrides = [
        "train.batch_size=0",
        f"train.epochs={args.epochs}",
        f"train.device={args.device}",
        f"performance.precision={args.precision}",
        f"performance.tf32={str(args.tf32).lower()}",
        f"performance.compile={str(args.compile).lower()}",
        *args.set,
    ]
    cfg = load_config(overrides=overrides)
    geometry = ScanGeometry.from_positions(sim["positions"], (args.frame, args.frame))
    planned = plan.make_plan(geometry, cfg, device_type=device.type, data_lazy=False)
    print("\n".join(planned.lines()), flush=True)
    data = ScanData(sim["intensities"], sim["positions"])
    del sim["intensities"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer = build_engine(data, cfg)
    init_s = time.perf_counter() - t0
    epoch_s: list[float] = []
    losses: list[float] = []
    train_started = time.perf_counter()
    while trainer.epoch < args.epochs and time.perf_counter() - train_started < args.time_limit:
        t0 = time.perf_counter()
        losses.append(trainer.train_epoch())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_s.append(time.perf_counter() - t0)
        print(f"  epoch {trainer.epoch}: {epoch_s[-1]:.2f} s, loss {losses[-1]:.4g}", flush=True)
    steady = float(np.median(epoch_s[1:] or epoch_s))
    done = len(epoch_s)
    time_300 = sum(epoch_s[:300]) if done >= 300 else epoch_s[0] + steady * 299
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # the process's peak RSS (simulation included: a smoke-test figure only)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "positions": n,
        "frame": args.frame,
        "object_shape": list(trainer.geometry.object_shape),
        "precision": planned.precision,
        "tf32": args.tf32,
        "compile": args.compile,
        "simulate_s": simulate_s,
        "trainer_init_s": init_s,
        "epochs_run": done,
        "first_epoch_s": epoch_s[0],
        "epoch_s_median": steady,
        "time_300_epochs_s": time_300,
        "time_300_measured": done >= 300,
        "peak_device_bytes": int(peak),
        "plan_peak_bytes": int(planned.memory.peak),
        "plan_epoch_s": planned.time.get("epoch"),
        "tile_pixels": trainer.runtime.tile_pixels,
        "frame_chunk": trainer.runtime.frame_chunk,
        "loss": losses,
        "object_error": object_error(trainer_values(trainer), trainer, truth_array(sim["object"])),
        "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{device.type}-{planned.precision}.json"
    path.write_text(json.dumps(result, indent=1))
    how = "measured" if result["time_300_measured"] else "extrapolated from the median epoch"
    print(
        f"\n| device | positions x frame | precision | s / epoch | 300 epochs ({how}) | peak "
        "memory (plan) | object error |\n|---|---|---|---|---|---|---|\n"
        f"| {result['device']} | {n} x {args.frame}² | {result['precision']}"
        f"{' + TF32' if args.tf32 else ''}{' + compile' if args.compile else ''} | "
        f"{steady:.2f} | {time_300 / 60:.1f} min | {peak / 2**30:.1f} GiB "
        f"({planned.memory.peak / 2**30:.1f} GiB) | {result['object_error']:.3f} |\n"
        f"\nwritten {path}"
    )


if __name__ == "__main__":
    main()
