"""Quality per second: object error against training time, per method, for a fixed time budget,
with held-out validation choosing the state a user gets (issue 14, item 5).

For each simulated case (your own objects and probe via ptyinr.simulate; --scale paper: 241 x
241 object, 64 x 64 probe of FWHM 5 px, raster at -540 % overlap = 49 positions, unknown
probe, the paper's noise models) every method trains for `--minutes` of training time:

- PtyINR with the current defaults (SIREN object, hash-grid probe, cosine schedule);
  `ptyinr-auto` the same with `train.loss = auto` (the data-term lever);
- the pixel baseline (`model.method = pixels`, Adam 1e-2 as bench_quality.py's baseline);
- ePIE/rPIE (`model.method = epie`, its defaults).

The gradient engines' cosine schedule spans `train.epochs`, so the epochs that fit the budget
are measured first (a short calibration fit, not counted) and the run is planned for them; the
run then stops when its training seconds (engine build with the probe start included,
evaluation excluded) reach the budget, whatever the epoch. Validation holds out
`--validation-fraction` of the detector pixels of every frame (`train.validation_on =
pixels`; a held-out position of a -540 % scan is seen by no other position). At checks spaced
geometrically in training time (every `--ratio`, at most `--max-gap` apart) the held-out loss
is measured through the engine's own `validation_loss` and recorded in its `Validation`
(as `fit` does), and the current state is scored against the truth (bench_quality.score:
scanned interior, phase offset, amplitude scale and linear ramp removed). So every run records
the error against training seconds, the held-out loss curve, the oracle-best error over the
run and the error at the validation-chosen state (the checked state of lowest held-out loss up
to that time; with `--patience P` also where a run stopping after P checks without improvement
would have stopped). The machine's load average is recorded at every check, and the process's
CPU seconds (all threads) spent building and training, next to the wall seconds: on a shared
machine the wall budget buys each run the CPU the other jobs leave it.

Where the data constrain the object: at the paper's Poisson noise a -540 % frame holds a few
hundred photons, and most of the scanned interior receives less than one photon over the whole
scan, so the interior error is mostly the error where no data exist. Each case therefore gets
a dose map (`case_dose`: expected photons per object pixel, evaluate.dose_map) and every check
is also scored on the interior pixels that received at least one photon (`measured_*` keys);
the case's record holds the shares of the interior below 0.1, 1 and 10 photons.

    python benchmarks/bench_quality_time.py --scale paper --minutes 10 --threads 2 \\
        --cases poisson-540,gaussian-540
    python benchmarks/bench_quality_time.py --table benchmarks/results/quality-time-paper.json

Results: benchmarks/results/quality-time-<scale>.json (written after every run; `--append`
skips the (case, method) runs already in it) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ptyinr import evaluate
from ptyinr.config import load_config
from ptyinr.engines import Engine
from ptyinr.errors import ReconstructionFailed
from ptyinr.launch import build_engine
from ptyinr.physics import ScanGeometry
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, clean_intensities, simulate_scan

CASES: dict[str, dict[str, Any]] = {
    f"{noise}-{name}": {"overlap": overlap, "noise": noise}
    for noise in ("clean", "poisson", "gaussian", "mixed")
    for name, overlap in (("540", -5.4), ("800", -8.0))
}
SCALES: dict[str, dict[str, Any]] = {
    "paper": {"object_size": 241, "probe_size": 64, "focus_fwhm_px": 4.8},
    "smoke": {"object_size": 64, "probe_size": 32, "focus_fwhm_px": 3.0},
}
METHODS: dict[str, list[str]] = {
    "ptyinr": [],
    "ptyinr-auto": ["train.loss=auto"],
    "pixels": ["model.method=pixels", "train.lr_object=1e-2", "train.lr_probe=1e-2"],
    "epie": ["model.method=epie"],
}
#: methods whose learning-rate schedule spans train.epochs (planned from a calibration)
SCHEDULED = ("ptyinr", "ptyinr-auto", "pixels")
MARKS_MIN = (2, 5, 10, 20)
CPU_MARKS_MIN = (0.5, 1, 2, 5, 10)
#: photons per object pixel below which the dose shares of the scanned interior are reported
DOSE_LEVELS = (0.1, 1.0, 10.0)
#: a pixel counts as measured (scored in `measured_*`) from this many expected photons
MEASURED_PHOTONS = 1.0


def case_dose(made: dict[str, Any], config: SimulationConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Expected photons per truth-object pixel of a simulated case, and its summary.

    The photon quantum is simulate.add_noise's: one photon = peak / alpha intensity units,
    peak = the largest clean intensity of the scan. The clean frames are recomputed from the
    truth (the returned probe is already scaled to `photons_per_frame`, so they are the ones
    the noise was drawn from) and a frame's photons are its expected count, sum(clean) /
    quantum. Clean and Gaussian cases have no photons; they get the quantum the Poisson case
    of the same simulation has (same frames, same alpha), so cases compare at equal dose.
    The summary: shares of the scanned interior below DOSE_LEVELS photons, the mean photons
    per frame, the quantum, and the measured pixels (>= MEASURED_PHOTONS) of the interior.
    """
    obj, probe = np.asarray(made["object"]), np.asarray(made["probe"])
    positions = np.asarray(made["positions_px"])
    clean = clean_intensities(obj, probe, positions).astype(np.float64)
    quantum = float(clean.max()) / config.alpha
    if config.noise == "poisson":  # the recorded frames are whole multiples of the quantum
        counts = np.asarray(made["intensities"], dtype=np.float64) / quantum
        if np.max(np.abs(counts - np.rint(counts))) > 1e-3:
            raise RuntimeError("photon quantum does not reproduce simulate.add_noise's")
    photons = clean.sum(axis=(1, 2)) / quantum
    geometry = ScanGeometry.from_positions(
        positions, probe.shape, object_shape=obj.shape, origin_px=(0, 0)
    )
    dose = evaluate.dose_map(probe, geometry.top_left, obj.shape, photons)
    inside = dose[evaluate.scanned_interior(obj.shape, geometry.window_centres_on_grid())]
    summary: dict[str, Any] = {
        f"interior_share_below_{level:g}": float(np.mean(inside < level)) for level in DOSE_LEVELS
    }
    summary.update(
        photons_per_frame_mean=float(photons.mean()),
        photon_quantum=quantum,
        alpha=config.alpha,
        interior_pixels=int(inside.size),
        measured_pixels=int(np.sum(inside >= MEASURED_PHOTONS)),
    )
    return dose, summary


def _dose_on_grid(dose: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
    """The truth-grid dose on a result's object grid (its pixel (i, j) is truth pixel
    origin + (i, j), as the result's coordinates say); 0 outside the truth."""
    out = np.zeros(geometry.object_shape, dtype=np.float64)
    oy, ox = geometry.origin_px
    y0, x0 = max(0, -oy), max(0, -ox)
    y1 = min(out.shape[0], dose.shape[0] - oy)
    x1 = min(out.shape[1], dose.shape[1] - ox)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = dose[y0 + oy : y1 + oy, x0 + ox : x1 + ox]
    return out


def score(
    engine: Engine,
    truth_object: np.ndarray,
    truth_probe: np.ndarray,
    dose: np.ndarray | None = None,
) -> dict[str, float]:
    """The current state against the truth, as `ptyinr evaluate` (and bench_quality.score)
    for an unknown probe: scanned interior, ramp, phase offset and amplitude scale removed.
    With a `dose` (truth grid, `case_dose`) also the object's scores on the interior pixels
    that received >= MEASURED_PHOTONS photons, as `measured_*` (NaN when there are none)."""
    result = engine.result()
    side = {d: np.arange(n) for d, n in zip(("ty", "tx"), truth_object.shape, strict=True)}
    truth = xr.DataArray(truth_object, dims=("ty", "tx"), coords=side)
    interior = evaluate.scanned_interior(
        result.geometry.object_shape, result.geometry.window_centres_on_grid()
    )
    out = evaluate.compare_object(result.object, truth, mask=interior, remove_ramp=True)
    out.update(evaluate.compare_probe(result.probe.values, truth_probe, remove_ramp=True))
    if dose is not None:
        measured = interior & (_dose_on_grid(dose, result.geometry) >= MEASURED_PHOTONS)
        keys = ("relative_error", "amplitude_psnr_db", "phase_psnr_db", "n_pixels")
        if measured.any():
            there = evaluate.compare_object(result.object, truth, mask=measured, remove_ramp=True)
            out.update({f"measured_{k}": there[k] for k in keys})
        else:
            out.update({f"measured_{k}": math.nan for k in keys})
    return {k: float(v) for k, v in out.items()}


def calibrate(data: ScanData, overrides: list[str], budget_s: float) -> dict[str, float]:
    """Epochs that fit `budget_s` of training: build time and median epoch time of a short
    fit (at least 3 epochs and 3 s after the first epoch, at most 20 epochs)."""
    started = time.perf_counter()
    engine = build_engine(data, load_config(overrides=[*overrides, "train.epochs=1000000"]))
    setup = time.perf_counter() - started
    times: list[float] = []
    while len(times) < 20 and (len(times) < 4 or sum(times[1:]) < 3.0):
        before = engine.seconds
        engine.train_epoch()
        times.append(engine.seconds - before)
    per_epoch = float(np.median(times[1:]))
    epochs = max(int((budget_s - setup) / per_epoch), 1)
    return {"setup_s": setup, "seconds_per_epoch": per_epoch, "planned_epochs": epochs}


def run_method(
    data: ScanData,
    truth: tuple[np.ndarray, np.ndarray, np.ndarray],
    method: str,
    common: list[str],
    budget_s: float,
    ratio: float,
    max_gap: float,
) -> dict[str, Any]:
    """Train `method` for `budget_s` training seconds, checking (held-out loss and oracle
    score) at geometrically spaced training times; the run's record. `truth`: object, probe
    and dose map (`case_dose`)."""
    overrides = [*METHODS[method], *common]
    plan: dict[str, float] = {}
    if method in SCHEDULED:
        plan = calibrate(data, overrides, budget_s)
        print(f"  {method}: calibrated {plan}", file=sys.stderr, flush=True)
    epochs = int(plan.get("planned_epochs", 1000000))
    config = load_config(overrides=[*overrides, f"train.epochs={epochs}"])
    started, cpu_started = time.perf_counter(), time.process_time()
    engine = build_engine(data, config)
    engine.seconds = time.perf_counter() - started  # the probe start is part of the cost
    cpu = [time.process_time() - cpu_started]  # this process's CPU seconds, all threads
    checks: list[dict[str, Any]] = []
    failure = None

    def check(loss: float) -> None:
        t0 = time.perf_counter()
        value = engine.validation_loss(engine.validation_positions)
        engine.validation.record(engine.epoch, value)
        t1 = time.perf_counter()
        scores = score(engine, *truth)
        checks.append(
            {
                "epoch": engine.epoch,
                "seconds": engine.seconds,
                "cpu_s": cpu[0],
                "loss": loss,
                "validation_loss": value,
                "relative_error": scores["relative_error"],
                "amplitude_psnr_db": scores["amplitude_psnr_db"],
                "phase_psnr_db": scores["phase_psnr_db"],
                "probe_relative_error": scores.get("probe_relative_error", math.nan),
                "measured_relative_error": scores["measured_relative_error"],
                "measured_amplitude_psnr_db": scores["measured_amplitude_psnr_db"],
                "measured_phase_psnr_db": scores["measured_phase_psnr_db"],
                "measured_n_pixels": scores["measured_n_pixels"],
                "validation_s": t1 - t0,
                "score_s": time.perf_counter() - t1,
                "load_1min": os.getloadavg()[0],
            }
        )

    next_check = 0.0
    wall = time.perf_counter()
    while engine.epoch == 0 or engine.seconds < budget_s:  # at least one epoch
        cpu_started = time.process_time()
        try:
            loss = engine.train_epoch()
        except ReconstructionFailed as exc:
            failure = str(exc)
            break
        finally:
            cpu[0] += time.process_time() - cpu_started
        if engine.seconds >= next_check or engine.seconds >= budget_s:
            check(loss)
            gap = min(max(engine.seconds * (ratio - 1.0), 0.05), max_gap)
            next_check = engine.seconds + gap
    if not checks or checks[-1]["epoch"] != engine.epoch:
        if engine.epoch:
            check(engine.loss_history[-1])
    return {
        "method": method,
        "overrides": overrides,
        "plan": plan,
        "budget_s": budget_s,
        "epochs": engine.epoch,
        "train_s": engine.seconds,
        "train_cpu_s": cpu[0],
        "wall_s": time.perf_counter() - wall,
        "data_term": engine.loss_choice.record(),
        "engine_best_epoch": engine.validation.best_epoch,
        "failure": failure,
        "checks": checks,
    }


def chosen_at(
    checks: list[dict[str, Any]], seconds: float, key: str = "seconds"
) -> dict[str, Any] | None:
    """The validation-chosen check by `seconds` (of `key`: wall "seconds" or "cpu_s"):
    lowest held-out loss (the first one of equals, as the engine's Validation)."""
    seen = [c for c in checks if c[key] <= seconds * 1.0001]
    return min(seen, key=lambda c: c["validation_loss"]) if seen else None


def current_at(
    checks: list[dict[str, Any]], seconds: float, key: str = "seconds"
) -> dict[str, Any] | None:
    """The last check made by `seconds` of training (of `key`)."""
    seen = [c for c in checks if c[key] <= seconds * 1.0001]
    return seen[-1] if seen else None


def cpu_marks(checks: list[dict[str, Any]], threads: int) -> dict[str, dict[str, float | None]]:
    """Errors (state at, validation-chosen by) at CPU_MARKS_MIN minutes of CPU time per
    thread (this process's CPU seconds / threads: what a dedicated machine would have spent
    at full parallel efficiency; comparable between runs made under different loads), up to
    what the run reached."""
    reached = checks[-1]["cpu_s"] / threads / 60
    out: dict[str, dict[str, float | None]] = {}
    for minutes in CPU_MARKS_MIN:
        if minutes <= reached:
            limit = minutes * 60 * threads
            now, picked = current_at(checks, limit, "cpu_s"), chosen_at(checks, limit, "cpu_s")
            out[str(minutes)] = {
                "current": now["relative_error"] if now else None,
                "chosen": picked["relative_error"] if picked else None,
            }
    return out


def patience_stop(checks: list[dict[str, Any]], patience: int) -> dict[str, Any] | None:
    """Where a run stopping after `patience` checks without a better held-out loss stops,
    and the state it returns (None: it would not have stopped)."""
    best, since = math.inf, 0
    chosen = None
    for c in checks:
        if c["validation_loss"] < best:
            best, since, chosen = c["validation_loss"], 0, c
        else:
            since += 1
            if since >= patience:
                assert chosen is not None
                return {"stopped_s": c["seconds"], "stopped_epoch": c["epoch"], "chosen": chosen}
    return None


def summarise(run: dict[str, Any], patience: int, threads: int = 2) -> dict[str, Any]:
    """The table's numbers for one run."""
    checks = run["checks"]
    if not checks:
        return {}
    oracle = min(checks, key=lambda c: c["relative_error"])
    chosen = chosen_at(checks, math.inf)
    assert chosen is not None
    marks = {}
    for minutes in MARKS_MIN:
        if minutes * 60 <= run["budget_s"] * 1.0001:
            # the budget's own mark is the run's end (its last epoch overshoots it a little)
            limit = math.inf if minutes * 60 >= run["budget_s"] * 0.9999 else minutes * 60
            now, picked = current_at(checks, limit), chosen_at(checks, limit)
            marks[str(minutes)] = {
                "current": now["relative_error"] if now else None,
                "chosen": picked["relative_error"] if picked else None,
            }
    stop = patience_stop(checks, patience) if patience else None
    loads = [c["load_1min"] for c in checks]
    measured = [c for c in checks if _finite(c.get("measured_relative_error"))]
    best = min(measured, key=lambda c: c["measured_relative_error"], default=None)
    best_error, best_s = (
        (None, None) if best is None else (best["measured_relative_error"], best["seconds"])
    )
    return {
        "marks": marks,
        "cpu_marks": cpu_marks(checks, threads) if "cpu_s" in checks[-1] else {},
        "train_cpu_s": run.get("train_cpu_s"),
        "last": checks[-1]["relative_error"],
        "chosen": chosen["relative_error"],
        "chosen_s": chosen["seconds"],
        "chosen_epoch": chosen["epoch"],
        "oracle": oracle["relative_error"],
        "oracle_s": oracle["seconds"],
        "oracle_epoch": oracle["epoch"],
        "gap": chosen["relative_error"] - oracle["relative_error"],
        "patience": patience,
        "patience_stop": None
        if stop is None
        else {
            "stopped_s": stop["stopped_s"],
            "error": stop["chosen"]["relative_error"],
            "chosen_s": stop["chosen"]["seconds"],
        },
        "load_mean": float(np.mean(loads)),
        "load_max": float(np.max(loads)),
        "seconds_per_epoch": run["train_s"] / max(run["epochs"], 1),
        # the error where data exist (None: a run recorded before it was measured)
        "measured_chosen": chosen.get("measured_relative_error"),
        "measured_oracle": oracle.get("measured_relative_error"),
        "measured_best": best_error,
        "measured_best_s": best_s,
        "measured_pixels": chosen.get("measured_n_pixels"),
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _e(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def dose_line(case: str, dose: dict[str, Any]) -> str:
    """One Markdown line with a case's dose shares of the scanned interior."""
    shares = ", ".join(
        f"{100 * dose[f'interior_share_below_{level:g}']:.1f} % < {level:g}"
        for level in DOSE_LEVELS
        if f"interior_share_below_{level:g}" in dose
    )
    return (
        f"- {case}: expected photons over the scanned interior: {shares} photons; "
        f"{dose.get('photons_per_frame_mean', math.nan):.0f} photons per frame on average "
        f"(quantum = max(clean) / alpha, alpha = {dose.get('alpha', math.nan):g})"
    )


def markdown(doc: dict[str, Any]) -> str:
    """Each method's error (state at t / validation-chosen by t) at 2-20 min, chosen, oracle,
    and the criterion lines."""
    budget_min = doc["meta"]["minutes"]
    shown = [m for m in MARKS_MIN if m <= budget_min + 1e-9]
    head = (
        "| case | method | "
        + " | ".join(f"{m} min" for m in shown)
        + " | validation-chosen (s) | oracle best (s) | chosen - oracle | epochs (s/epoch) "
        + "| patience stop: s, error | train wall s / CPU s | load 1-min mean/max |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    cpu_lines: list[str] = []
    measured_lines: list[str] = []
    threads = int(doc["meta"]["threads"])
    for run in doc["runs"]:
        s = summarise(run, doc["meta"]["patience"], threads)
        if not s:
            continue
        by_case.setdefault(run["case"], {})[run["method"]] = s
        cpu_cells = []
        for m in CPU_MARKS_MIN:
            mark = s["cpu_marks"].get(str(m))
            cpu_cells.append("—" if not mark else f"{_e(mark['current'])} / {_e(mark['chosen'])}")
        cpu_lines.append(f"| {run['case']} | {run['method']} | " + " | ".join(cpu_cells) + " |")
        best_s = s["measured_best_s"]
        measured_lines.append(
            f"| {run['case']} | {run['method']} | {_e(s['measured_chosen'])} | "
            f"{_e(s['measured_oracle'])} | {_e(s['measured_best'])}"
            + ("" if best_s is None else f" ({best_s:.0f})")
            + f" | {'—' if s['measured_pixels'] is None else int(s['measured_pixels'])} |"
        )
        cpu_total = s["train_cpu_s"]
        cells = []
        for m in shown:
            mark = s["marks"].get(str(m))
            cells.append("—" if not mark else f"{_e(mark['current'])} / {_e(mark['chosen'])}")
        stop = s["patience_stop"]
        lines.append(
            f"| {run['case']} | {run['method']} | "
            + " | ".join(cells)
            + f" | {s['chosen']:.3f} ({s['chosen_s']:.0f}) | {s['oracle']:.3f} "
            f"({s['oracle_s']:.0f}) | {s['gap']:+.3f} | {run['epochs']} "
            f"({s['seconds_per_epoch']:.2f}) | "
            + ("no stop" if stop is None else f"{stop['stopped_s']:.0f}, {stop['error']:.3f}")
            + f" | {run['train_s']:.0f} / "
            + ("—" if cpu_total is None else f"{cpu_total:.0f}")
            + f" | {s['load_mean']:.1f}/{s['load_max']:.1f} |"
        )
    if cpu_lines:
        cpu_head = "| case | method | " + " | ".join(f"{m} CPU-min" for m in CPU_MARKS_MIN) + " |"
        lines += [
            "",
            f"The same runs at equal CPU time (this process's CPU seconds / {threads} threads):",
            "",
            cpu_head,
            "|" + "---|" * (cpu_head.count("|") - 1),
            *cpu_lines,
        ]
    if measured_lines:
        lines += [
            "",
            f"Object error where data exist (scanned interior, >= {MEASURED_PHOTONS:g} expected "
            "photon per pixel):",
            "",
            "| case | method | validation-chosen | oracle-best state | lowest (s) | pixels |",
            "|---|---|---|---|---|---|",
            *measured_lines,
        ]
    doses = doc.get("cases", {})
    if doses:
        lines.append("")
        lines += [dose_line(case, rec["dose"]) for case, rec in doses.items() if "dose" in rec]
    lines.append("")
    for case, methods in by_case.items():
        baselines = [methods[m]["oracle"] for m in ("pixels", "epie") if m in methods]
        for name in ("ptyinr", "ptyinr-auto"):
            inr = methods.get(name)
            if inr is None or not baselines or "10" not in inr["marks"]:
                continue
            mine = inr["marks"]["10"]["chosen"]
            bar = 0.75 * min(baselines)
            verdict = "met" if mine is not None and mine <= bar else "NOT met"
            lines.append(
                f"- {case}: {name} validation-chosen after 10 min {_e(mine)} vs 0.75 x "
                f"min(pixels, epie oracle best) = 0.75 x {min(baselines):.3f} = {bar:.3f}: "
                f"**{verdict}**"
            )
        for name, s in methods.items():
            verdict = "met" if abs(s["gap"]) <= 0.03 else "NOT met"
            lines.append(
                f"- {case}: {name} |chosen - oracle| = {abs(s['gap']):.3f} <= 0.03: {verdict}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper")
    parser.add_argument("--cases", default="poisson-540,gaussian-540", help=", ".join(CASES))
    parser.add_argument("--methods", default="ptyinr,pixels,epie", help=", ".join(METHODS))
    parser.add_argument("--minutes", type=float, default=20.0, help="training time per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--validation-on", choices=("pixels", "positions"), default="pixels")
    parser.add_argument("--validation-block", type=int, default=1)
    parser.add_argument("--patience", type=int, default=10, help="checks (replayed); 0: none")
    parser.add_argument("--ratio", type=float, default=1.1, help="check spacing in time")
    parser.add_argument("--max-gap", type=float, default=10.0, help="most seconds between checks")
    parser.add_argument("--set", action="append", default=[], help="extra override, all runs")
    parser.add_argument("--out", type=Path, help="default results/quality-time-<scale>.json")
    parser.add_argument("--append", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--table", type=Path, help="print the table of this JSON and exit")
    parser.add_argument(
        "--dose-only",
        action="store_true",
        help="print where photons reached each case's object (dose shares) and exit: no training",
    )
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    for name, known in ((args.cases, CASES), (args.methods, METHODS)):
        unknown = [n for n in name.split(",") if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; expected some of {', '.join(known)}")
    torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).parent / "results" / f"quality-time-{args.scale}.json"
    common = [
        "train.device=cpu",
        f"train.threads={args.threads}",
        f"train.validation_fraction={args.validation_fraction}",
        f"train.validation_on={args.validation_on}",
        f"train.validation_block={args.validation_block}",
        *args.set,
    ]
    meta = {
        "scale": args.scale,
        "simulate": SCALES[args.scale],
        "minutes": args.minutes,
        "threads": args.threads,
        "common_overrides": common,
        "patience": args.patience,
        "ratio": args.ratio,
        "max_gap": args.max_gap,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    doc: dict[str, Any] = {"meta": meta, "cases": {}, "runs": []}
    if args.append and out.exists():
        old = json.loads(out.read_text())
        doc["runs"], doc["cases"] = old["runs"], old.get("cases", {})
    done = {(r["case"], r["method"]) for r in doc["runs"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        sim = SimulationConfig(**SCALES[args.scale], **CASES[case])
        made = simulate_scan(sim)
        data = ScanData(np.asarray(made["intensities"]), np.asarray(made["positions_px"]))
        dose, dose_summary = case_dose(made, sim)
        doc["cases"][case] = {"dose": dose_summary}
        print(dose_line(case, dose_summary), file=sys.stderr, flush=True)
        if args.dose_only:
            continue
        truth = (np.asarray(made["object"]), np.asarray(made["probe"]), dose)
        for method in args.methods.split(","):
            if (case, method) in done:
                continue
            print(f"{case} / {method}: {data.n_positions} positions", file=sys.stderr, flush=True)
            run = run_method(
                data, truth, method, common, args.minutes * 60, args.ratio, args.max_gap
            )
            run.update(
                case=case,
                positions=int(data.n_positions),
                probe_fwhm_px=float(made["fwhm_px"]),
                finished_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            )
            doc["runs"].append(run)
            out.write_text(json.dumps(doc, indent=1, default=str))
            s = summarise(run, args.patience)
            if not s:
                print(f"  {case} / {method}: no checks ({run['failure']})", file=sys.stderr)
                continue
            print(
                f"  {case} / {method}: {run['epochs']} epochs in {run['train_s']:.0f} s; "
                f"last {s['last']:.3f}, chosen {s['chosen']:.3f}, oracle {s['oracle']:.3f}; "
                f"where measured: chosen {_e(s['measured_chosen'])}, oracle-best state "
                f"{_e(s['measured_oracle'])} (load {s['load_mean']:.1f})",
                file=sys.stderr,
                flush=True,
            )
    if args.dose_only:
        return
    print(markdown(doc))
    print(f"\nwritten {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
