"""PtychoNN previews vs PtyINR reconstructions of the same scans, one simulated "beamline".

Scans share the probe (the simulator's annular focus), energy, detector and scan geometry;
their objects differ (scikit-image data images for amplitude and phase):

    A  camera / coins       40 % overlap   (case a: a fifth of its positions train)
    B  moon / brick         40 % overlap   (case b: with A, trains the model)
    C  astronaut / chelsea  40 % overlap   (case b: previewed)
    D  astronaut / chelsea  -540 % overlap (case c: previewed by the model of case b)

Every scan is reconstructed with PtyINR (`reconstruct_store`, the paper's method, fixed
epochs). Then

(a) PtychoNN is trained on the PtyINR run of A with `fraction = 0.2` (a spatially spread
    fifth of the positions, `ptyinr nn train --fraction 0.2`), and previews A; the preview of
    the other 80 % alone (never seen by the network, stitched on A's grid) is scored too. Done
    when its phase PSNR (against the truth, scanned interior) is within 3 dB of PtyINR's.
(b) PtychoNN is trained on all positions of the PtyINR runs of A and B and previews C.
(c) The model of (b) previews D, a scan whose windows barely touch (-540 % overlap: the step
    is 6.4 probe FWHMs): a per-frame network needs no overlap, PtyINR has little to work with.

Reported per case: object quality (amplitude / phase PSNR, relative error; ramp, offset and
scale removed: `evaluate.compare_object` on the scanned interior) of the preview against the
truth and against the PtyINR result of the same scan, the PtyINR result against the truth,
the FRC resolution of the preview (two previews from the checkerboard halves of the
positions on one grid, `evaluate.frc` of the complex objects over the scanned interior, as
`ptyinr run` does), inference frames per second, and wall times on this machine in this
process: PtyINR reconstruction (`reconstruct_store`, end to end), preview end to end (the
same call with `model.method = "ptychonn"`: load, predict, stitch, probe scale, data loss,
write), and the preview's inference alone (network + stitching, the engine's
`inference_seconds`). Training time is reported separately. Torch threads are set once
(`--threads`) for everything.

    python benchmarks/bench_ptychonn.py                  # quick (default), 2 CPU threads
    python benchmarks/bench_ptychonn.py --scale full --device cuda   # the paper's sizes

Quick: 4 PtyINR runs of ~50 s each on two idle cores (150 epochs, 441 positions; the sparse
scan's larger object takes longer), PtychoNN training ~1-3 min per case, previews seconds:
~10-15 min idle, far longer on a loaded machine. `--workdir DIR --reuse` keeps and reuses the
PtyINR runs (their recorded times stand for PtyINR's), `--timing-check` then times preview,
PtyINR, preview of scan A back to back so the speedup is measured under one load, and
`--fraction-b 0.25` trains case (b) on a quarter of A's and B's positions (faster).

Results: benchmarks/results/ptychonn-<scale>.json and a Markdown table on stdout; progress on
stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptyinr import evaluate, store
from ptyinr.config import load_config
from ptyinr.ptychonn_data import select_positions
from ptyinr.ptychonn_train import TrainOptions, train_ptychonn
from ptyinr.reconstruct import reconstruct_store
from ptyinr.scandata import Reconstruction, load_scan, scan_geometry
from ptyinr.simulate import SimulationConfig, write_simulated_store

SCANS: dict[str, dict[str, Any]] = {
    "A": {"amplitude_image": "camera", "phase_image": "coins", "overlap": 0.4},
    "B": {"amplitude_image": "moon", "phase_image": "brick", "overlap": 0.4},
    "C": {"amplitude_image": "astronaut", "phase_image": "chelsea", "overlap": 0.4},
    "D": {"amplitude_image": "astronaut", "phase_image": "chelsea", "overlap": -5.4},
}

SCALES: dict[str, dict[str, Any]] = {
    # CPU-sized: 441 positions per dense scan, 32 x 32 frames, a narrower PtychoNN.
    "quick": {
        "simulate": {"object_size": 80, "probe_size": 32, "focus_fwhm_px": 4.0},
        "sparse_object_size": 176,
        "inr": ["model.siren_width=128", "train.lr_object=1e-3", "train.lr_probe=1e-3"],
        "inr_epochs": 150,
        # the product's automatic schedule and augmentation (ptychonn_train.resolve_schedule)
        "nn": {"channels": 16, "depth": 3, "input_size": 32},
    },
    # The paper's sizes (241 px objects, 64 px frames) and the original PtychoNN (64 px input,
    # 32 channels): for a GPU.
    # A check of this script only (seconds of work, meaningless numbers).
    "smoke": {
        "simulate": {"object_size": 40, "probe_size": 16, "focus_fwhm_px": 3.0},
        "sparse_object_size": 96,
        "inr": [
            "model.siren_width=32",
            "model.siren_hidden_layers=1",
            "model.hash_levels=4",
            "model.hash_log2_table_size=10",
            "model.probe_init_steps=20",
        ],
        "inr_epochs": 3,
        "nn": {
            "channels": 4,
            "depth": 2,
            "input_size": 16,
            "epochs": 2,
            "patience": 0,
            "batch_size": 32,
            "lr": 1e-3,
        },
    },
    "full": {
        "simulate": {"object_size": 241, "probe_size": 64, "focus_fwhm_px": 5.0},
        "sparse_object_size": 481,
        "inr": ["train.lr_object=1e-4", "train.lr_probe=1e-4"],
        "inr_epochs": 2000,
        "nn": {"channels": 32, "depth": 3, "input_size": 64},
    },
}

#: case (a) passes when the held-out preview's phase PSNR is at most this far below PtyINR's
PSNR_MARGIN_DB = 3.0
#: the preview (inference) must be at least this much faster than the PtyINR reconstruction
SPEEDUP = 100.0


def log(message: str) -> None:
    print(f"[bench_ptychonn {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def simulate(folder: Path, name: str, scale: dict[str, Any]) -> Path:
    settings = {**scale["simulate"], **SCANS[name]}
    if SCANS[name]["overlap"] < 0:
        settings["object_size"] = scale["sparse_object_size"]
    return write_simulated_store(folder / f"{name}.zarr", SimulationConfig(**settings))


def store_runs(path: Path) -> set[str]:
    return {r["run_id"] for r in store.list_runs(path) if r.get("status") == "complete"}


def stored_run(path: Path, config: Any) -> Reconstruction:
    """A complete run group of an earlier invocation as a Reconstruction (its geometry
    rebuilt from the recorded object shape and origin)."""
    ds = store.open_run(path, "ptyinr")
    loaded = load_scan(path, config, lazy=True)
    geometry = scan_geometry(
        loaded.data.positions_px,
        loaded.data.frame_shape,
        config,
        object_shape=tuple(ds["object"].shape),
        origin_px=tuple(int(v) for v in ds.attrs["origin_px"]),
    )
    return Reconstruction(
        object=ds["object"].load(),
        probe=ds["probe"].load(),
        loss=ds["loss"].load(),
        geometry=geometry,
        info=dict(ds.attrs),
    )


def truth_quality(result: Reconstruction) -> dict[str, float]:
    keys = ("amplitude_psnr_db", "phase_psnr_db", "relative_error")
    return {k: float(result.info["quality"][k]) for k in keys}


def against(preview: Reconstruction, reference: Reconstruction) -> dict[str, float]:
    """The preview against the PtyINR result, as if that were the truth (on the preview's
    scanned interior; ramp, offset and scale removed)."""
    geometry = preview.geometry
    interior = evaluate.scanned_interior(geometry.object_shape, geometry.window_centres_on_grid())
    out = evaluate.compare_object(preview.object, reference.object, mask=interior, remove_ramp=True)
    return {k: float(out[k]) for k in ("amplitude_psnr_db", "phase_psnr_db", "relative_error")}


def on_grid(path: Path, config: Any, grid: Reconstruction, indices: np.ndarray) -> Any:
    """The geometry of the positions `indices` on the grid of the reconstruction `grid`."""
    loaded = load_scan(path, config, lazy=True)
    return scan_geometry(
        loaded.data.positions_px[indices],
        loaded.data.frame_shape,
        config,
        object_shape=grid.geometry.object_shape,
        origin_px=grid.geometry.origin_px,
    )


def preview_frc(path: Path, config: Any, preview: Reconstruction) -> dict[str, Any]:
    """Half-split FRC of the preview: checkerboard halves on the full preview's grid, the
    complex objects over the scanned interior (bounding box of the window centres)."""
    halves = evaluate.half_split(np.asarray(preview.geometry.window_centres_on_grid()))
    images = []
    for k, indices in enumerate(halves):
        geometry = on_grid(path, config, preview, indices)
        _, half = reconstruct_store(
            path,
            config,
            run_id=f"preview-half-{k}",
            indices=indices,
            geometry=geometry,
            progress=False,
        )
        images.append(half.object)
    centres = np.asarray(preview.geometry.window_centres_on_grid())
    lo = np.floor(centres.min(axis=0)).astype(int)
    hi = np.ceil(centres.max(axis=0)).astype(int) + 1
    crop = [im.isel(y=slice(lo[0], hi[0]), x=slice(lo[1], hi[1])) for im in images]
    ds = evaluate.frc(crop[0], crop[1])
    return {
        "resolution_px": float(ds.attrs["resolution"]) / float(ds.attrs["pixel_size"])
        if ds.attrs["unit"] == "m"
        else float(ds.attrs["resolution"]),
        "resolution": float(ds.attrs["resolution"]),
        "unit": str(ds.attrs["unit"]),
        "note": str(ds.attrs["resolution_note"]),
        "resolved_to_nyquist": bool(ds.attrs["resolved_to_nyquist"]),
    }


def preview_config(model: Path, threads: int, device: str) -> Any:
    return load_config(
        overrides=[
            "model.method=ptychonn",
            f"model.ptychonn_model={model}",
            f"train.device={device}",
            f"train.threads={threads}",
        ]
    )


def preview(
    path: Path, model: Path, threads: int, device: str, *, run_id: str = "preview"
) -> tuple[Any, Reconstruction]:
    config = preview_config(model, threads, device)
    _, result = reconstruct_store(path, config, run_id=run_id, progress=False)
    return config, result


def timings(ptyinr: Reconstruction, shown: Reconstruction) -> dict[str, float]:
    inference = float(shown.info["inference_seconds"])
    wall = float(shown.info["wall_seconds"])
    ptyinr_wall = float(ptyinr.info["wall_seconds"])
    return {
        "ptyinr_wall_s": ptyinr_wall,
        "preview_wall_s": wall,
        "preview_inference_s": inference,
        "frames": len(shown.geometry.top_left),
        "frames_per_second": float(shown.info["frames_per_second"]),
        "speedup_inference": ptyinr_wall / inference,
        "speedup_wall": ptyinr_wall / wall,
    }


def timing_check(path: Path, model: Path, inr_config: Any, args: Any) -> dict[str, Any]:
    """Preview, PtyINR, preview of one scan back to back: the speedup under one load."""
    log(f"timing check on {path.name}: preview, PtyINR, preview")
    _, first = preview(path, model, args.threads, args.device, run_id="timing-preview-1")
    _, inr = reconstruct_store(path, inr_config, run_id="timing-ptyinr", progress=False)
    _, second = preview(path, model, args.threads, args.device, run_id="timing-preview-2")
    inference = (first.info["inference_seconds"] + second.info["inference_seconds"]) / 2
    wall = (first.info["wall_seconds"] + second.info["wall_seconds"]) / 2
    out = {
        "scan": path.stem,
        "ptyinr_wall_s": float(inr.info["wall_seconds"]),
        "preview_inference_s": [first.info["inference_seconds"], second.info["inference_seconds"]],
        "preview_wall_s": [first.info["wall_seconds"], second.info["wall_seconds"]],
        "speedup_inference": float(inr.info["wall_seconds"]) / inference,
        "speedup_wall": float(inr.info["wall_seconds"]) / wall,
    }
    log(f"timing check: {out}")
    return out


def case(
    name: str,
    path: Path,
    model: Path,
    ptyinr: Reconstruction,
    args: argparse.Namespace,
    training: dict[str, Any],
) -> dict[str, Any]:
    log(f"case {name}: preview of {path.name}")
    config, shown = preview(path, model, args.threads, args.device)
    out: dict[str, Any] = {
        "scan": path.stem,
        "positions": len(shown.geometry.top_left),
        "training": training,
        "preview_vs_truth": truth_quality(shown),
        "ptyinr_vs_truth": truth_quality(ptyinr),
        "preview_vs_ptyinr": against(shown, ptyinr),
        "timing": timings(ptyinr, shown),
    }
    try:
        out["frc"] = preview_frc(path, config, shown)
    except Exception as exc:  # the FRC needs a raster of >= 4 positions; say why it is absent
        out["frc"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def train(
    sources: list[str], out: Path, fraction: float, args, scale, epochs: int | None = None
) -> dict[str, Any]:
    nn = dict(scale["nn"])
    if epochs is not None:
        nn["epochs"] = epochs
    options = TrainOptions(
        fraction=fraction,
        seed=0,
        device=args.device,
        threads=args.threads,
        **nn,
    )
    started = time.perf_counter()
    artifact = train_ptychonn(sources, out, options, force=True, progress=not args.quiet)
    record = artifact.record
    return {
        "sources": [f"{Path(s['store']).name}:{s['run_id']}" for s in record["sources"]],
        "positions_used": sum(s["positions_used"] for s in record["sources"]),
        "fraction": fraction,
        "wall_s": time.perf_counter() - started,
        "epochs_run": record["training"]["epochs_run"],
        "best_epoch": record["training"]["best_epoch"],
        "schedule": {k: record["options"][k] for k in ("batch_size", "epochs", "patience")},
        "refit_epochs": record["training"].get("refit", {}).get("epochs"),
        "symmetries": len(record["training"].get("symmetries", [])),
        "parameters": record["parameters"],
        "scores": record["scores"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (all stages)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (PtyINR and PtychoNN)")
    parser.add_argument("--inr-epochs", type=int, default=None, help="override the scale's")
    parser.add_argument(
        "--nn-epochs", type=int, default=None, help="override the scale's PtychoNN epochs"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the stores here")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --workdir: reuse complete PtyINR runs of an earlier invocation (their "
        "recorded wall time, measured then on this machine, is the PtyINR time)",
    )
    parser.add_argument(
        "--timing-check",
        action="store_true",
        help="also time, back to back on scan A: preview, PtyINR, preview (the same load "
        "for both; use it with --reuse, whose PtyINR times are from another moment)",
    )
    parser.add_argument(
        "--fraction-b", type=float, default=1.0, help="share of A's and B's positions in (b)"
    )
    parser.add_argument(
        "--epochs-b", type=int, default=None, help="PtychoNN epochs of (b) (default: auto)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    if args.nn_epochs is not None:
        scale = {**scale, "nn": {**scale["nn"], "epochs": args.nn_epochs}}
    epochs = args.inr_epochs or scale["inr_epochs"]
    out_path = args.out or Path(__file__).parent / "results" / f"ptychonn-{args.scale}.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ptychonn-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        inr_config = load_config(
            overrides=[
                *scale["inr"],
                f"train.epochs={epochs}",
                f"train.device={args.device}",
                f"train.threads={args.threads}",
            ]
        )
        stores, ptyinr = {}, {}
        for name in SCANS:
            path = folder / f"{name}.zarr"
            if args.reuse and path.exists() and "ptyinr" in store_runs(path):
                stores[name], ptyinr[name] = path, stored_run(path, inr_config)
                log(f"PtyINR {name}: reused ({ptyinr[name].info['wall_seconds']:.1f} s then)")
                continue
            stores[name] = simulate(folder, name, scale)
            log(f"PtyINR on {name} ({epochs} epochs)")
            _, ptyinr[name] = reconstruct_store(
                stores[name], inr_config, run_id="ptyinr", progress=False
            )
            log(
                f"PtyINR {name}: {ptyinr[name].info['wall_seconds']:.1f} s, phase PSNR "
                f"{ptyinr[name].info['quality']['phase_psnr_db']:.2f} dB"
            )
        results: dict[str, Any] = {}

        # (a) a fifth of A's positions train; the other 80 % are predicted
        log("case a: training on 20 % of A")
        model_a = folder / "model-a"
        training = train([f"{stores['A']}:ptyinr"], model_a, 0.2, args, scale)
        results["a"] = case("a", stores["A"], model_a, ptyinr["A"], args, training)
        config = preview_config(model_a, args.threads, args.device)
        positions = load_scan(stores["A"], config, lazy=True).data.positions_px
        chosen = select_positions(positions, 0.2, 0)  # as train_ptychonn chose (seed 0)
        held = np.setdiff1d(np.arange(len(positions)), chosen)
        _, held_preview = reconstruct_store(
            stores["A"],
            config,
            run_id="preview-held-out",
            indices=held,
            geometry=on_grid(stores["A"], config, ptyinr["A"], held),
            progress=False,
        )
        held_quality = truth_quality(held_preview)
        results["a"]["held_out"] = {
            "positions": len(held),
            "preview_vs_truth": held_quality,
            "preview_vs_ptyinr": against(held_preview, ptyinr["A"]),
            "phase_psnr_gap_db": results["a"]["ptyinr_vs_truth"]["phase_psnr_db"]
            - held_quality["phase_psnr_db"],
        }

        # (b) two scans train, a third is previewed; (c) the same model on a sparse scan
        log("case b: training on A and B")
        model_b = folder / "model-b"
        training = train(
            [f"{stores['A']}:ptyinr", f"{stores['B']}:ptyinr"],
            model_b,
            args.fraction_b,
            args,
            scale,
            epochs=args.epochs_b,
        )
        results["b"] = case("b", stores["C"], model_b, ptyinr["C"], args, training)
        results["c"] = case("c", stores["D"], model_b, ptyinr["D"], args, {"same_model_as": "b"})

        if args.timing_check:
            results_check = timing_check(stores["A"], model_a, inr_config, args)

    gap = results["a"]["held_out"]["phase_psnr_gap_db"]
    speedups = {k: v["timing"]["speedup_inference"] for k, v in results.items()}
    summary = {
        "scale": args.scale,
        "settings": {**scale, "inr_epochs": epochs},
        "threads": args.threads,
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "total_wall_s": time.perf_counter() - started,
        "criteria": {
            "a_phase_within_3db": bool(gap <= PSNR_MARGIN_DB),
            "a_phase_psnr_gap_db": gap,
            "speedup_inference_min": min(speedups.values()),
            "speedup_100x": bool(min(speedups.values()) >= SPEEDUP),
        },
        "cases": results,
    }
    if args.timing_check:
        summary["timing_check"] = results_check
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    log(f"results in {out_path} ({summary['total_wall_s']:.0f} s)")


def _f(value: float, digits: int = 2) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def table(summary: dict[str, Any]) -> str:
    rows = [
        "| case | frames | preview vs truth amp / phase PSNR (dB), rel. err | PtyINR vs truth "
        "| preview vs PtyINR | preview FRC (px) | inference fps | PtyINR s | preview s "
        "(inference s) | speedup inference (wall) | training s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def q(d: dict[str, float]) -> str:
        return (
            f"{_f(d['amplitude_psnr_db'])} / {_f(d['phase_psnr_db'])}, {_f(d['relative_error'], 3)}"
        )

    for name, r in summary["cases"].items():
        t = r["timing"]
        frc = r["frc"].get("resolution_px", math.nan) if "error" not in r["frc"] else math.nan
        train_s = r["training"].get("wall_s")
        rows.append(
            f"| {name} ({r['scan']}) | {t['frames']} | {q(r['preview_vs_truth'])} | "
            f"{q(r['ptyinr_vs_truth'])} | {q(r['preview_vs_ptyinr'])} | {_f(frc)} | "
            f"{_f(t['frames_per_second'], 0)} | {_f(t['ptyinr_wall_s'], 1)} | "
            f"{_f(t['preview_wall_s'], 2)} ({_f(t['preview_inference_s'], 3)}) | "
            f"{_f(t['speedup_inference'], 0)}x ({_f(t['speedup_wall'], 0)}x) | "
            f"{'(b)' if train_s is None else _f(train_s, 1)} |"
        )
    held = summary["cases"]["a"]["held_out"]
    rows.append(
        f"| a, held-out 80 % only | {held['positions']} | {q(held['preview_vs_truth'])} | "
        f"{q(summary['cases']['a']['ptyinr_vs_truth'])} | {q(held['preview_vs_ptyinr'])} | "
        "| | | | | |"
    )
    c = summary["criteria"]
    rows.append("")
    rows.append(
        f"Criteria: (a) held-out phase PSNR {_f(c['a_phase_psnr_gap_db'])} dB below PtyINR's "
        f"(<= {PSNR_MARGIN_DB} dB: {'met' if c['a_phase_within_3db'] else 'NOT met'}); "
        f"smallest inference speedup {_f(c['speedup_inference_min'], 0)}x "
        f"(>= {SPEEDUP:.0f}x: {'met' if c['speedup_100x'] else 'NOT met'})."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
