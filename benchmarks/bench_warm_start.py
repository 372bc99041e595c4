"""Probe warm start (ProbeField.fit_to) and the probe's forward pass: old vs new, one process.

Command (CPU, 2 threads, about 10-15 minutes on a busy 2-core box; the old fit dominates):

    python benchmarks/bench_warm_start.py
    python benchmarks/bench_warm_start.py --size 64 --seeds 2 --threads 1   # quicker

Targets, `--size` x `--size` (default 128), max amplitude 1: an annular pupil (outer radius
0.514 / 3 cycles per pixel, a 3 px focus; central stop at 0.35 of it) with a quadratic
phase exp(-i pi c (fy^2 + fx^2)), inverse FFT, fftshift; "defocused" c = 250 (a ~85 px wide
beam whose phase wraps several times), "focused" c = 0 (an Airy-like core with weak rings
and pi phase jumps between them, like a focused start's inverse FFT of the mean pattern).

"old" is the previous code, reproduced here: the generic hash-grid forward (corner indices
and hashes recomputed on every call, gather by advanced indexing), Adam (not fused) at
lr 1e-2 on the complex error for `steps` = 300, up to 3 restarts while the error is not
below good_enough = 0.02. "new" is `ProbeField.fit_to` with its defaults. Both start from
the same network initialisation (same seed); the runs alternate old/new so that load on
the machine hits both alike. The error is the one fit_to returns:
||P/max|P| - T/max|T|||^2 / ||T/max|T|||^2.

It also times one forward and one forward + backward of the probe (what every training
step pays), generic vs fixed-coordinate encoding, and the kernels that could compute the
table gradient at fixed coordinates (index_put_ accumulate, index_add_,
embedding_dense_backward, and the row-sorted embedding_bag that FixedCoordinates uses).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ptyinr.config import load_config
from ptyinr.models.fields import AMPLITUDE_OFFSET, ProbeField


def zone_plate_probe(n: int, c: float, focus_fwhm_px: float = 3.0) -> np.ndarray:
    f = np.fft.fftfreq(n)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    rho = np.hypot(fy, fx)
    outer = 0.514 / focus_fwhm_px
    pupil = ((rho <= outer) & (rho >= 0.35 * outer)).astype(np.float64)
    field = np.fft.fftshift(np.fft.ifft2(pupil * np.exp(-1j * np.pi * c * (fy**2 + fx**2))))
    return (field / np.abs(field).max()).astype(np.complex64)


# ----------------------------------------------------------------------------- old code


def old_unnormalised(probe: ProbeField) -> torch.Tensor:
    """The previous ProbeField.unnormalised: generic encoding on the probe coordinates."""
    amplitude = torch.nn.functional.softplus(
        probe.amplitude_net(probe.coords)[:, 0] + AMPLITUDE_OFFSET
    )
    phase = probe.phase_net(probe.coords)[:, 0]
    return torch.polar(amplitude, phase).reshape(probe.shape)


def old_normalised(probe: ProbeField) -> torch.Tensor:
    p = old_unnormalised(probe)
    return p / p.abs().amax().clamp_min(1e-12)


def old_fit_to(
    probe: ProbeField,
    target: np.ndarray,
    steps: int = 300,
    lr: float = 1e-2,
    attempts: int = 3,
    good_enough: float = 0.02,
) -> tuple[float, int]:
    """The previous ProbeField.fit_to, verbatim but for the generic forward it used.
    Returns (error, steps taken)."""
    goal = torch.as_tensor(np.asarray(target, dtype=np.complex64))
    goal = goal / goal.abs().amax().clamp_min(1e-30)
    norm = goal.abs().square().sum()
    best_error, best_state, taken = float("inf"), None, 0
    for attempt in range(max(attempts, 1)):
        if attempt:
            probe._new_networks()
        params = [p for n, p in probe.named_parameters() if n != "log_scale"]
        optimiser = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            error = (old_normalised(probe) - goal).abs().square().sum() / norm
            error.backward()
            optimiser.step()
        taken += steps
        with torch.no_grad():
            error = float((old_normalised(probe) - goal).abs().square().sum() / norm)
        if error < best_error:
            best_error = error
            best_state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
        if best_error < good_enough:
            break
    if best_state is not None:
        probe.load_state_dict(best_state)
    return best_error, taken


def new_fit_to(probe: ProbeField, target: np.ndarray, **options: float) -> tuple[float, int]:
    taken: list[int] = []
    checks: list[tuple[int, int]] = []

    def record(attempt: int, step: int, error: float) -> None:
        checks.append((attempt, step))

    error = probe.fit_to(target, callback=record, **options)
    for attempt in sorted({a for a, _ in checks}):
        taken.append(max(s for a, s in checks if a == attempt))
    return error, sum(taken)


# ----------------------------------------------------------------------------- timing


def interleaved(candidates: dict, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def forward_timings(size: int, repeats: int) -> None:
    torch.manual_seed(0)
    probe = ProbeField((size, size), "hashgrid", load_config().model)
    for net in (probe.amplitude_net, probe.phase_net):
        with torch.no_grad():
            net.encoding.table.normal_(0, 0.1)
    with torch.no_grad():
        same = torch.equal(old_unnormalised(probe), probe.unnormalised())
        diff = float((old_unnormalised(probe) - probe.unnormalised()).abs().max())
    print(f"probe forward, generic vs fixed: max |difference| {diff:.2e} (identical: {same})")

    def forward(fn):
        def run() -> None:
            with torch.no_grad():
                fn(probe)

        return run

    def step(fn):
        def run() -> None:
            probe.zero_grad(set_to_none=True)
            p = fn(probe)
            (p / p.abs().amax()).abs().square().sum().backward()

        return run

    times = interleaved(
        {
            "forward, generic (old)": forward(old_unnormalised),
            "forward, fixed (new)": forward(ProbeField.unnormalised),
            "forward+backward, generic (old)": step(old_unnormalised),
            "forward+backward, fixed (new)": step(ProbeField.unnormalised),
        },
        repeats,
    )
    for name, values in times.items():
        print(
            f"  {name:34s} median {1e3 * statistics.median(values):7.1f} ms"
            f"  min {1e3 * min(values):7.1f} ms"
        )

    # the table gradient at fixed coordinates, by kernel
    fixed = probe.grid_encoding
    assert fixed is not None
    table = probe.amplitude_net.encoding.table.detach()
    grad = torch.randn(fixed.rows.shape[0], table.shape[1])
    flat = fixed.rows.reshape(-1).long()  # int64: index_add_ is ~4x slower with int32

    def spread() -> torch.Tensor:
        return (fixed.weights[..., None] * grad[:, None, :]).reshape(-1, table.shape[1])

    def transposed_bags() -> torch.Tensor:
        per_row = torch.nn.functional.embedding_bag(
            fixed.row_points,
            grad,
            fixed.row_offsets,
            mode="sum",
            per_sample_weights=fixed.row_weights,
        )
        return torch.zeros_like(table).index_copy_(0, fixed.touched_rows, per_row)

    kernels = interleaved(
        {
            "index_put_ (accumulate)": lambda: torch.zeros_like(table).index_put_(
                (flat,), spread(), accumulate=True
            ),
            "index_add_": lambda: torch.zeros_like(table).index_add_(0, flat, spread()),
            "embedding_dense_backward": lambda: torch.ops.aten.embedding_dense_backward(
                spread(), flat, table.shape[0], -1, False
            ),
            "row-sorted embedding_bag (used)": transposed_bags,
        },
        repeats,
    )
    print("table gradient at fixed coordinates, by kernel:")
    for name, values in kernels.items():
        print(
            f"  {name:34s} median {1e3 * statistics.median(values):7.1f} ms"
            f"  min {1e3 * min(values):7.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="forward-timing repeats")
    parser.add_argument("--skip-old", action="store_true", help="time the new fit only")
    parser.add_argument("--tolerance", type=float, help="fit_to's tolerance (default: its own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the first optimiser a process builds imports ~2.5 s of torch internals: pay it here,
    # not in whichever fit comes first
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px")
    forward_timings(args.size, args.repeats)

    targets = {
        "defocused": zone_plate_probe(args.size, 250.0),
        "focused": zone_plate_probe(args.size, 0.0),
    }
    model = load_config().model
    rows = []
    for seed in range(args.seeds):
        for name, target in targets.items():
            order = ["old", "new"] if seed % 2 == 0 else ["new", "old"]
            for which in order:
                if which == "old" and args.skip_old:
                    continue
                torch.manual_seed(seed)
                probe = ProbeField((args.size, args.size), "hashgrid", model)
                start = time.perf_counter()
                if which == "old":
                    error, steps = old_fit_to(probe, target)
                else:
                    options = {} if args.tolerance is None else {"tolerance": args.tolerance}
                    error, steps = new_fit_to(probe, target, **options)
                seconds = time.perf_counter() - start
                rows.append((name, seed, which, seconds, error, steps))
                print(
                    f"{name:9s} seed {seed} {which}: {seconds:7.1f} s, error {error:.2e}, "
                    f"{steps} steps",
                    flush=True,
                )
    print("\n| target | seed | fit | seconds | final error | steps |")
    print("|---|---|---|---|---|---|")
    for name, seed, which, seconds, error, steps in rows:
        print(f"| {name} | {seed} | {which} | {seconds:.1f} | {error:.1e} | {steps} |")


if __name__ == "__main__":
    main()
