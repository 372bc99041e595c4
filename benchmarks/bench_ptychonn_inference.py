"""PtychoNN inference speed on the CPU: the plain eval-mode network against prepared variants
(ptyinr.ptychonn_inference and candidates that were not kept), on one scan's real frames.

Every variant predicts all frames of the scan (blocks of --block frames, as the engine does);
variants are timed in interleaved rounds (each round times every variant once) and the median
per variant is reported, so a machine whose load changes affects all alike. One-off costs
(fusion, tracing, torch.compile's compilation, the first call) are reported separately:
a preview is one process, so they are part of its cost unless cached. Outputs are compared
with the plain network's (max abs difference of amplitude and of phase over all frames).

Also timed: the block size (frames per forward) of the kept variant, the stitching alone
(ptychonn_data.stitch_accumulate / stitch_finish of the scan's patches), and whole previews
through the engine (`reconstruct_store` with model.method = ptychonn; its network replaced by
the prepared one after setup), whose `inference_seconds` (network + stitching) and phase /
amplitude PSNR against the truth show that bfloat16 leaves the preview's quality unchanged.

    python benchmarks/bench_ptychonn_inference.py --data /tmp/nn_bench_quick --threads 2

--data: a folder of the quick PtychoNN benchmark (benchmarks/bench_ptychonn.py --workdir):
SCAN.zarr and MODEL folders. It is copied to a temporary folder first (previews write runs
into their store), never written. --compile adds torch.compile (slow to compile). Markdown
on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptyinr.config import load_config
from ptyinr.engines import ptychonn as ptychonn_engine
from ptyinr.models.ptychonn import PtychoNN, input_scale, load_artifact, network_input
from ptyinr.ptychonn_data import probe_weights, stitch_accumulate, stitch_finish
from ptyinr.ptychonn_inference import bf16_supported, for_inference, fuse_batchnorm
from ptyinr.reconstruct import reconstruct_store
from ptyinr.scandata import load_scan, scan_geometry

Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def log(message: str) -> None:
    print(f"[bench_inference {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scan_inputs(path: Path, network: PtychoNN) -> tuple[torch.Tensor, Any]:
    """The scan's network inputs (n, 1, s, s) as the engine forms them, and its geometry."""
    config = load_config()
    loaded = load_scan(path, config)
    frames = np.asarray(loaded.data.intensities, dtype=np.float32)
    bad = loaded.data.bad_pixels
    valid = None if bad is None else torch.as_tensor(~np.asarray(bad, bool))
    sqrt_counts = torch.as_tensor(np.sqrt(np.clip(frames, 0, None)))
    x = network_input(sqrt_counts, network.spec, input_scale(frames.mean(0)), valid)
    geometry = scan_geometry(loaded.data.positions_px, loaded.data.frame_shape, config)
    return x, geometry


def in_blocks(predict: Predictor, x: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    outs = [predict(x[i : i + block]) for i in range(0, len(x), block)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


# ------------------------------------------------------------------------------ variants


def plain(network: PtychoNN, mode: str) -> Predictor:
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with context():
            return network(x)

    return predict


def eager(network: PtychoNN, *, fuse: bool, channels_last: bool, bf16: str = "") -> Predictor:
    """Fused and/or channels-last eager network; bf16 = "autocast" or "weights" (all bf16)."""
    net = fuse_batchnorm(network) if fuse else copy.deepcopy(network).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    if bf16 == "weights":
        net = net.to(torch.bfloat16)

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous(memory_format=fmt)
        if bf16 == "weights":
            x = x.to(torch.bfloat16)
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 == "autocast"),
        ):
            a, p = net(x)
        return a.float(), p.float()

    return predict


def jit_frozen(network: PtychoNN, example: torch.Tensor, *, bf16: bool) -> Predictor:
    """torch.jit.trace + freeze (folds BatchNorm, fuses conv + ReLU in oneDNN), channels last."""
    net = copy.deepcopy(network).eval().to(memory_format=torch.channels_last)
    example = example.contiguous(memory_format=torch.channels_last)
    if bf16:
        net, example = net.to(torch.bfloat16), example.to(torch.bfloat16)
    with torch.no_grad():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, example)))

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        if bf16:
            x = x.to(torch.bfloat16)
        with torch.no_grad():
            a, p = frozen(x)
        return a.float(), p.float()

    return predict


def compiled(network: PtychoNN) -> Predictor:
    net = fuse_batchnorm(network).to(memory_format=torch.channels_last)
    fn = torch.compile(net, dynamic=False)

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return fn(x.contiguous(memory_format=torch.channels_last))

    return predict


def variants(
    network: PtychoNN, x: torch.Tensor, block: int, args: argparse.Namespace
) -> dict[str, Callable[[], Predictor]]:
    example = x[:block]
    out: dict[str, Callable[[], Predictor]] = {
        "plain, no_grad (engine today)": lambda: plain(network, "no_grad"),
        "plain, inference_mode": lambda: plain(network, "inference_mode"),
        "BN fused": lambda: eager(network, fuse=True, channels_last=False),
        "channels_last": lambda: eager(network, fuse=False, channels_last=True),
        "BN fused + channels_last (kept, float32)": lambda: for_inference(network, "cpu", x),
        "BN fused + channels_last + bf16 autocast": lambda: eager(
            network, fuse=True, channels_last=True, bf16="autocast"
        ),
        "BN fused + channels_last, all bf16": lambda: eager(
            network, fuse=True, channels_last=True, bf16="weights"
        ),
        "BN fused + channels_last, all bf16, depthwise last layer (kept, bfloat16)": lambda: (
            for_inference
        )(network, "cpu", x, precision="bfloat16"),
        "jit trace + freeze, channels_last": lambda: jit_frozen(network, example, bf16=False),
        "jit trace + freeze, channels_last, bf16": lambda: jit_frozen(network, example, bf16=True),
    }
    if args.compile:
        out["torch.compile (BN fused, channels_last)"] = lambda: compiled(network)
    return out


def one_pass(predict: Predictor, x: torch.Tensor, block: int, clock: str) -> float:
    """Seconds of one pass over the frames: "wall" (perf_counter, at the set thread count)
    or "cpu" (this thread's CPU time, meant for 1 torch thread: immune to other processes'
    load, which on a shared machine makes wall times swing by several times)."""
    tick = time.perf_counter if clock == "wall" else time.thread_time
    started = tick()
    in_blocks(predict, x, block)
    return tick() - started


def time_variants(
    x: torch.Tensor,
    makers: dict[str, Callable[[], Predictor]],
    block: int,
    rounds: int,
    threads: int,
) -> tuple[dict[str, Predictor], dict[str, float], dict[str, dict[str, list[float]]]]:
    """Prepare every variant (one-off cost: preparation + first pass over the frames), then
    time one pass each per round, interleaved: wall time at `threads` torch threads, and CPU
    time at 1 thread."""
    prepared: dict[str, Predictor] = {}
    one_off: dict[str, float] = {}
    for name, make in makers.items():
        log(f"preparing {name}")
        started = time.perf_counter()
        try:
            predict = make()
            in_blocks(predict, x, block)
        except Exception as exc:  # a candidate that fails here is reported, not fatal
            log(f"{name}: failed ({type(exc).__name__}: {exc}); left out")
            continue
        one_off[name] = time.perf_counter() - started
        prepared[name] = predict
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for clock, count in (("wall", threads), ("cpu", 1)):
        torch.set_num_threads(count)
        for r in range(rounds):
            log(f"{clock} round {r + 1}/{rounds}")
            for name, predict in prepared.items():
                times[clock].setdefault(name, []).append(one_pass(predict, x, block, clock))
    torch.set_num_threads(threads)
    return prepared, one_off, times


def max_difference(
    got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    return tuple(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want, strict=True))


def time_stitching(patches: torch.Tensor, geometry: Any, weights: np.ndarray, block: int) -> float:
    def stitch() -> None:
        acc = None
        for i in range(0, len(patches), block):
            acc = stitch_accumulate(
                patches[i : i + block],
                geometry.top_left[i : i + block],
                geometry.object_shape,
                weights,
                into=acc,
            )
        assert acc is not None
        stitch_finish(*acc)

    stitch()
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        stitch()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


# ------------------------------------------------------------------------- whole previews


def preview_with(scan: Path, model: Path, precision: str | None, threads: int, run_id: str):
    """A preview through the engine; precision None: the engine as it is (plain network)."""
    original = ptychonn_engine.PtychoNNEngine.setup

    def setup(self: Any) -> None:
        original(self)
        if precision is not None:  # the wiring proposed for the engine's setup
            self.network = for_inference(self.network, self.device, precision=precision)

    config = load_config(
        overrides=[
            "model.method=ptychonn",
            f"model.ptychonn_model={model}",
            "train.device=cpu",
            f"train.threads={threads}",
        ]
    )
    ptychonn_engine.PtychoNNEngine.setup = setup  # type: ignore[method-assign]
    try:
        _, result = reconstruct_store(scan, config, run_id=run_id, progress=False)
    finally:
        ptychonn_engine.PtychoNNEngine.setup = original  # type: ignore[method-assign]
    quality = result.info["quality"]
    return {
        "inference_s": float(result.info["inference_seconds"]),
        "wall_s": float(result.info["wall_seconds"]),
        "amplitude_psnr_db": float(quality["amplitude_psnr_db"]),
        "phase_psnr_db": float(quality["phase_psnr_db"]),
        "object": np.asarray(result.object),
    }


def one_shot(scan: Path, model: Path, mode: str, threads: int) -> dict[str, float]:
    """In this (fresh) process: load, prepare (`mode`: plain or a precision) and predict every
    frame once, as a preview does: first pass (preparation, check and oneDNN's kernel
    creation included) and a second pass, wall at `threads` and this thread's CPU time."""
    torch.set_num_threads(threads)
    network = load_artifact(model).network.eval()
    x, _ = scan_inputs(scan, network)
    marks = [(time.perf_counter(), time.thread_time())]
    predict = (
        plain(network, "no_grad")
        if mode == "plain"
        else for_inference(network, "cpu", precision=mode)
    )
    in_blocks(predict, x, ptychonn_engine.BLOCK)
    marks.append((time.perf_counter(), time.thread_time()))
    in_blocks(predict, x, ptychonn_engine.BLOCK)
    marks.append((time.perf_counter(), time.thread_time()))
    (w0, c0), (w1, c1), (w2, c2) = marks
    return {
        "first_wall": w1 - w0,
        "second_wall": w2 - w1,
        "first_cpu": c1 - c0,
        "second_cpu": c2 - c1,
    }


def one_shot_table(scan: Path, model: Path, threads: int, repeats: int) -> None:
    """`one_shot` of each mode in fresh processes (so no kernel is cached), interleaved."""
    import json
    import subprocess

    modes = ("plain", "float32", "bfloat16")
    runs: dict[str, dict[tuple[int, str], list[float]]] = {m: {} for m in modes}
    for _ in range(repeats):
        for mode in modes:
            for count in sorted({threads, 1}):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one-shot",
                        mode,
                        "--threads",
                        str(count),
                        "--data",
                        str(scan.parent),
                        "--scan",
                        scan.name,
                        "--model",
                        model.name,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                for key, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    runs[mode].setdefault((count, key), []).append(value)
    print(
        "\nOne preview's network pass in a fresh process (median of "
        f"{repeats}; first = preparation + check + kernel creation + pass), ms:\n"
    )
    print(
        f"| network | first, wall {threads} thr | second, wall {threads} thr "
        "| first, CPU 1 thr | second, CPU 1 thr |"
    )
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        cells = [
            f"{statistics.median(runs[mode][(count, key)]) * 1e3:.0f}"
            for count, clock in ((threads, "wall"), (1, "cpu"))
            for key in (f"first_{clock}", f"second_{clock}")
        ]
        print(f"| {'plain (engine today)' if mode == 'plain' else mode} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/nn_bench_quick"))
    parser.add_argument("--scan", default="A.zarr")
    parser.add_argument("--model", default="model-a")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=ptychonn_engine.BLOCK)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--blocks", default="32,64,128,256,512", help="block sizes to time")
    parser.add_argument("--previews", type=int, default=3, help="previews per precision")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--one-shot", help=argparse.SUPPRESS)  # child of one_shot_table
    parser.add_argument("--one-shot-repeats", type=int, default=3)
    args = parser.parse_args()
    if args.one_shot:
        import json

        scan, model = args.data / args.scan, args.data / args.model
        print(json.dumps(one_shot(scan, model, args.one_shot, args.threads)))
        return
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_ptychonn_inference.py " + " ".join(sys.argv[1:])

    with tempfile.TemporaryDirectory(prefix="nn_inference_") as tmp:
        work = Path(tmp)
        for name in (args.scan, args.model):
            shutil.copytree(args.data / name, work / name)
        scan, model = work / args.scan, work / args.model
        network = load_artifact(model).network.eval()
        x, geometry = scan_inputs(scan, network)
        n = len(x)
        log(f"{n} frames of {tuple(x.shape[-2:])}, torch threads {torch.get_num_threads()}")

        makers = variants(network, x, args.block, args)
        prepared, one_off, times = time_variants(x, makers, args.block, args.rounds, args.threads)
        baseline_name = next(iter(prepared))
        want = in_blocks(prepared[baseline_name], x, args.block)
        base = {clock: statistics.median(times[clock][baseline_name]) for clock in times}

        print(f"`{command}`\n")
        print(
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
            f", native bf16: {bf16_supported()}; scan {args.scan} ({n} frames), model "
            f"{args.model}, block {args.block}; medians of {args.rounds} interleaved rounds: "
            f"wall time at {args.threads} torch threads, CPU time at 1 thread\n"
        )
        print(
            f"| variant | wall ms / frame ({args.threads} thr) | speedup | CPU ms / frame "
            "(1 thr) | speedup | one-off s | max diff amplitude | max diff phase |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, predict in prepared.items():
            cells = []
            for clock in ("wall", "cpu"):
                t = statistics.median(times[clock][name])
                cells += [f"{t * 1e3 / n:.3f}", f"{base[clock] / t:.2f}"]
            da, dp = max_difference(in_blocks(predict, x, args.block), want)
            print(f"| {name} | {' | '.join(cells)} | {one_off[name]:.2f} | {da:.2e} | {dp:.2e} |")

        print("\nBlock size (frames per forward) of the kept variants, ms / frame:\n")
        print(
            f"| block | float32 wall ({args.threads} thr) | bfloat16 wall ({args.threads} thr) "
            "| float32 CPU (1 thr) | bfloat16 CPU (1 thr) |"
        )
        print("|---:|---:|---:|---:|---:|")
        kept = [for_inference(network, "cpu", x, precision=p) for p in ("float32", "bfloat16")]
        for block in (int(b) for b in args.blocks.split(",")):
            cells = []
            for clock, count in (("wall", args.threads), ("cpu", 1)):
                torch.set_num_threads(count)
                for predict in kept:
                    runs = [one_pass(predict, x, block, clock) for _ in range(args.rounds)]
                    cells.append(f"{statistics.median(runs) * 1e3 / n:.3f}")
            torch.set_num_threads(args.threads)
            print(f"| {block} | {' | '.join(cells)} |")

        weights = probe_weights(load_artifact(model).probe)
        patches = torch.polar(*want)
        stitch_s = time_stitching(patches, geometry, weights, args.block)
        print(
            f"\nStitching alone (stitch_accumulate + stitch_finish, {n} patches): "
            f"{stitch_s * 1e3:.1f} ms ({stitch_s * 1e3 / n:.3f} ms / frame)\n"
        )

        log("whole previews through the engine")
        print("Whole previews (engine `inference_seconds` = frames in, network, stitching):\n")
        print("| network | inference s (median) | wall s | amplitude PSNR dB | phase PSNR dB |")
        print("|---|---:|---:|---:|---:|")
        objects = {}
        for precision in (None, "float32", "bfloat16"):
            runs = [
                preview_with(scan, model, precision, args.threads, f"speed-{precision}-{k}")
                for k in range(args.previews)
            ]
            objects[precision] = runs[0]["object"]
            label = "plain (engine today)" if precision is None else f"for_inference {precision}"
            print(
                f"| {label} | {statistics.median(r['inference_s'] for r in runs):.3f} | "
                f"{statistics.median(r['wall_s'] for r in runs):.2f} | "
                f"{runs[0]['amplitude_psnr_db']:.2f} | {runs[0]['phase_psnr_db']:.2f} |"
            )
        for precision in ("float32", "bfloat16"):
            diff = np.abs(objects[precision] - objects[None]).max()
            print(f"\nmax |object difference| {precision} vs plain: {diff:.2e}", end="")
        print()
        if args.one_shot_repeats:
            log("one-shot passes in fresh processes")
            one_shot_table(scan, model, args.threads, args.one_shot_repeats)


if __name__ == "__main__":
    main()
