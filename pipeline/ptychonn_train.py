"""Train PtychoNN on completed runs and save it as a versioned artifact.

`train_ptychonn(["a.zarr:RUN", ...], out)` builds the pairs (ptyinr.ptychonn_data: a spread
share `fraction` of each run's positions, split into training and validation by position
blocks), fits the network (ptyinr.models.ptychonn) with Adam and a cosine decay of the
learning rate (`lr` to `lr * lr_final` over the epochs), measures the validation loss after
every epoch, keeps the best weights and stops after `patience` epochs without improvement.
The loss is the L1 distance of amplitude and of phase (wrapped difference), each pixel
weighted by the source run's probe intensity (floored at 1 % of its peak): outside the beam
a single frame says nothing about the object. Progress goes to stderr, one line per epoch.
Seeds: torch and numpy from `seed`; the same inputs give the same model on the same device.

The artifact (`models.ptychonn.save_artifact`) records the architecture, the input
normalisation, frame shape, pixel size, energy, the source runs (store, run, positions used),
and the scores: validation loss of the network and of the mean training patch, and, when
`fraction` < 1, the same on positions the network never saw (held out, up to 4096 of them).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptyinr.errors import InputError
from ptyinr.models.ptychonn import (
    ModelArtifact,
    PtychoNN,
    PtychoNNSpec,
    check_compatible,
    parameter_count,
    save_artifact,
)
from ptyinr.ptychonn_data import (
    PairDataset,
    RunSource,
    block_split,
    items_for,
    open_run_source,
    probe_weights,
    select_positions,
)

#: at most this many never-seen positions are scored after training
MAX_HELD_OUT = 4096


@dataclass
class TrainOptions:
    """What `ptyinr nn train` exposes, with the original PtychoNN's values as defaults."""

    fraction: float = 0.2
    validation_fraction: float = 0.2
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    lr_final: float = 0.1
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    input_size: int | None = None  # None: 64, or the largest that fits the frame
    input_mode: str = "crop"
    channels: int = 32
    depth: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingSet:
    sources: list[RunSource]
    spec: PtychoNNSpec
    train: PairDataset
    validation: PairDataset
    held_out: PairDataset | None
    selected: list[np.ndarray]


def select_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here")
        return torch.device("cuda")
    if name not in ("auto", "cpu"):
        raise InputError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device("cpu")


def _input_size(options: TrainOptions, frame_shape: tuple[int, int]) -> int:
    if options.input_size is not None:
        return int(options.input_size)
    step = 2**options.depth
    return max(step, min(64, (min(frame_shape) // step) * step))


def build_training_set(sources: list[str], options: TrainOptions) -> TrainingSet:
    """Open the runs, check they agree (frame shape, pixel size, energy), choose positions."""
    if not sources:
        raise InputError("nn train: expected at least one STORE:RUN")
    runs = [open_run_source(s) for s in sources]
    first = runs[0]
    record = {
        "architecture": {"frame_shape": list(first.frame_shape)},
        "pixel_size_m": None if first.pixel_size is None else list(first.pixel_size),
        "energy_ev": first.energy_ev,
    }
    for run in runs[1:]:
        check_compatible(
            record,
            first.name,
            frame_shape=run.frame_shape,
            pixel_size=run.pixel_size,
            energy_ev=run.energy_ev,
            what=run.name,
        )
    amplitude_peak = max(
        float(np.quantile(np.abs(r.object[np.abs(r.object) > 0]), 0.999, method="nearest"))
        if np.any(np.abs(r.object) > 0)
        else 1.0
        for r in runs
    )
    spec = PtychoNNSpec(
        frame_shape=first.frame_shape,
        input_size=_input_size(options, first.frame_shape),
        input_mode=options.input_mode,  # type: ignore[arg-type]
        channels=options.channels,
        depth=options.depth,
        amplitude_max=float(max(1.0, 1.25 * amplitude_peak)),
    )
    train_items, val_items, held_items, selected = [], [], [], []
    for k, run in enumerate(runs):
        chosen = select_positions(run.positions_px, options.fraction, options.seed)
        selected.append(chosen)
        tr, va = block_split(run.positions_px, chosen, options.validation_fraction, options.seed)
        train_items.append(items_for(k, tr))
        val_items.append(items_for(k, va))
        rest = np.setdiff1d(np.arange(len(run.positions_px)), chosen)
        held_items.append(items_for(k, rest))
    held = np.concatenate(held_items)
    if len(held) > MAX_HELD_OUT:
        held = held[np.linspace(0, len(held) - 1, MAX_HELD_OUT).astype(np.int64)]
    return TrainingSet(
        sources=runs,
        spec=spec,
        train=PairDataset(runs, np.concatenate(train_items), spec),
        validation=PairDataset(runs, np.concatenate(val_items), spec),
        held_out=PairDataset(runs, held, spec) if len(held) else None,
        selected=selected,
    )


def pair_loss(
    amplitude: torch.Tensor,
    phase: torch.Tensor,
    true_amplitude: torch.Tensor,
    true_phase: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean L1 of amplitude and of the wrapped phase difference, per batch."""
    norm = weights.sum()
    amp = (weights * (amplitude - true_amplitude).abs()).sum() / norm
    diff = torch.remainder(phase - true_phase + math.pi, 2 * math.pi) - math.pi
    pha = (weights * diff.abs()).sum() / norm
    return amp, pha


def _batches(n: int, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


@torch.no_grad()
def evaluate(
    network: PtychoNN,
    dataset: PairDataset,
    device: torch.device,
    batch_size: int = 256,
    mean_patch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Weighted L1 of amplitude and phase (and their sum, `loss`) of the network on
    `dataset`, and of the mean training patch when given (`mean_patch_*`)."""
    network.eval()
    sums = {
        "amplitude_l1": 0.0,
        "phase_l1": 0.0,
        "mean_patch_amplitude_l1": 0.0,
        "mean_patch_phase_l1": 0.0,
    }
    total = 0.0
    for idx in _batches(len(dataset), batch_size, None):
        x, amp, pha, w = (t.to(device) for t in dataset.batch(idx))
        pa, pp = network(x)
        a, p = pair_loss(pa, pp, amp, pha, w)
        weight = float(w.sum())
        sums["amplitude_l1"] += float(a) * weight
        sums["phase_l1"] += float(p) * weight
        if mean_patch is not None:
            ma, mp = (t.to(device).expand_as(amp) for t in mean_patch)
            a, p = pair_loss(ma, mp, amp, pha, w)
            sums["mean_patch_amplitude_l1"] += float(a) * weight
            sums["mean_patch_phase_l1"] += float(p) * weight
        total += weight
    out = {k: v / max(total, 1e-30) for k, v in sums.items()}
    out["loss"] = out["amplitude_l1"] + out["phase_l1"]
    if mean_patch is None:
        out = {k: v for k, v in out.items() if not k.startswith("mean_patch")}
    else:
        out["mean_patch_loss"] = out["mean_patch_amplitude_l1"] + out["mean_patch_phase_l1"]
    out["positions"] = float(len(dataset))
    return out


def mean_training_patch(dataset: PairDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: the mean amplitude and the circular mean phase of the training patches."""
    amp_sum, phasor = None, None
    for idx in _batches(len(dataset), 256, None):
        _, amp, pha, _ = dataset.batch(idx)
        a = amp.sum(0)
        z = torch.polar(torch.ones_like(pha), pha).sum(0)
        amp_sum = a if amp_sum is None else amp_sum + a
        phasor = z if phasor is None else phasor + z
    assert amp_sum is not None and phasor is not None
    return amp_sum / len(dataset), torch.angle(phasor)


def fit_network(
    training: TrainingSet,
    options: TrainOptions,
    *,
    progress: bool = True,
) -> tuple[PtychoNN, dict[str, Any]]:
    """Train with Adam, cosine decay, early stopping on the validation loss; the best
    network and the training history."""
    if len(training.train) == 0:
        raise InputError("nn train: no training positions (raise --fraction)")
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    device = select_device(options.device)
    network = PtychoNN(training.spec).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=options.lr)
    steps_per_epoch = math.ceil(len(training.train) / options.batch_size)
    total_steps = max(1, steps_per_epoch * options.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (
            options.lr_final
            + (1 - options.lr_final)
            * 0.5
            * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        ),
    )
    has_validation = len(training.validation) > 0
    best_loss, best_state, best_epoch, since_best = math.inf, None, 0, 0
    history: dict[str, list[float]] = {"train_loss": [], "validation_loss": []}
    started = time.perf_counter()
    epoch = 0
    for epoch in range(1, options.epochs + 1):
        network.train()
        total, count = 0.0, 0
        for idx in _batches(len(training.train), options.batch_size, rng):
            x, amp, pha, w = (t.to(device) for t in training.train.batch(idx))
            pa, pp = network(x)
            a, p = pair_loss(pa, pp, amp, pha, w)
            loss = a + p
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
            count += len(idx)
        train_loss = total / max(count, 1)
        if not math.isfinite(train_loss):
            raise InputError(f"nn train: the loss became {train_loss} at epoch {epoch}; lower --lr")
        history["train_loss"].append(train_loss)
        if has_validation:
            value = evaluate(network, training.validation, device)["loss"]
        else:
            value = train_loss
        history["validation_loss"].append(value)
        better = value < best_loss
        if better:
            best_loss, best_epoch, since_best = value, epoch, 0
            best_state = copy.deepcopy(
                {k: v.detach().cpu() for k, v in network.state_dict().items()}
            )
        else:
            since_best += 1
        if progress:
            print(
                f"ptychonn epoch {epoch}/{options.epochs}: train {train_loss:.4f} "
                f"validation {value:.4f}{' *' if better else ''} "
                f"({time.perf_counter() - started:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        if options.patience and since_best >= options.patience:
            break
    if best_state is not None:
        network.load_state_dict(best_state)
    network.eval()
    info = {
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "stopped_early": epoch < options.epochs,
        "train_seconds": time.perf_counter() - started,
        "device": str(device),
        **history,
    }
    return network, info


def train_ptychonn(
    sources: list[str],
    out: str | Path,
    options: TrainOptions | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> ModelArtifact:
    """Build the pairs, train, score, and save the artifact at `out` (a folder)."""
    options = options or TrainOptions()
    out = Path(out)
    if out.exists() and not force:  # before any work
        raise InputError(f"ptychonn model {str(out)!r}: exists; use --force to replace it")
    training = build_training_set(sources, options)
    network, info = fit_network(training, options, progress=progress)
    device = next(network.parameters()).device
    baseline = mean_training_patch(training.train)
    scores: dict[str, Any] = {}
    if len(training.validation):
        scores["validation"] = evaluate(network, training.validation, device, mean_patch=baseline)
    if training.held_out is not None:
        scores["held_out"] = evaluate(network, training.held_out, device, mean_patch=baseline)
    first = training.sources[0]
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input_normalisation": {
            "transform": "sqrt(clip(counts, 0)), bad pixels zeroed",
            "scale": "sqrt(peak of the scan's mean pattern), per scan",
            "input_size": training.spec.input_size,
            "input_mode": training.spec.input_mode,
        },
        "labels": "object under the whole-pixel window, phase offset and linear ramp removed "
        "(sub-pixel remainder ignored)",
        "frame_shape": list(first.frame_shape),
        "pixel_size_m": None if first.pixel_size is None else list(first.pixel_size),
        "energy_ev": first.energy_ev,
        "data_source": first.data_source,
        "probe_from": first.name,
        "sources": [
            {
                "store": str(run.store.resolve()),
                "run_id": run.run_id,
                "data_source": run.data_source,
                "positions": len(run.positions_px),
                "positions_used": len(chosen),
                "input_scale": run.scale,
            }
            for run, chosen in zip(training.sources, training.selected, strict=True)
        ],
        "options": {k: v for k, v in asdict(options).items() if k != "extra"},
        "training": {
            **info,
            "train_positions": len(training.train),
            "validation_positions": len(training.validation),
        },
        "scores": scores,
        "parameters": parameter_count(network),
    }
    artifact = ModelArtifact(
        network=network,
        record=record,
        probe=first.probe,
        extra={"loss_weights": probe_weights(first.probe)},
    )
    save_artifact(out, artifact, force=force)
    return artifact
