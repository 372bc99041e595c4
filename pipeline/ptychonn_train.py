"""Train PtychoNN on completed runs and save it as a versioned artifact.

`train_ptychonn(["a.zarr:RUN", ...], out)` builds the pairs (ptyinr.ptychonn_data: a spread
share `fraction` of each run's positions, split into training and validation by position
blocks), fits the network (ptyinr.models.ptychonn) with Adam and a cosine decay of the
learning rate (`lr` to `lr * lr_final` over the epochs), measures the validation loss after
every epoch, keeps the best weights and stops after `patience` epochs without improvement,
but never before `min_epochs` (default half of `epochs`): the amplitude is learned first, and
the validation loss then stalls for several epochs until the phase head starts to vary (case
(a) of the benchmark, 80 epochs: no improvement from epoch 9 to 15, phase learned from 16 on);
stopping inside that plateau keeps a constant phase (held-out phase PSNR 11.0 dB).
Precision: float32 everywhere by default (`precision = "auto"`; on CUDA with TF32 switched
off for the training, `exact_fp32`). `bf16` (CUDA with native bf16 only, on request) runs the
training steps' forward pass under bf16 autocast; the BatchNorm statistics, validation and
scores are computed in float32 all the same, because the engine infers in float32 (statistics
gathered under bf16 differed by up to 6 % from the float32 network's). bf16 is not the default
as a precaution: the one GPU run of the benchmark (H200, bf16) gave a constant phase (case (a),
held-out phase PSNR 11.0 dB). Emulated on a CPU (bf16 autocast) the same training learned the
phase (15.2 dB against 14.8 dB in float32), so the likelier cause of that run was early stopping
inside the phase plateau (`min_epochs`, above); the network is small (0.3-1.2 M parameters,
32-64 px inputs), so float32 costs a GPU little.
After every epoch the BatchNorm statistics are recomputed over the training set
(`recalibrate_batchnorm`), so validation and the saved model see the current weights' statistics.
The loss is the L1 distance of amplitude and of phase (wrapped difference), each pixel
weighted by the source run's probe intensity (floored at 1 % of its peak): outside the beam
a single frame says nothing about the object. Schedule: batch size, epochs and patience left
unset are chosen for the training set's size (`resolve_schedule`: enough optimiser steps for
a few dozen frames too). Augmentation (`augment = "auto"`): each pair is used turned by a
random symmetry of the square that every source probe has (`ptychonn_data.probe_symmetries`):
a pair the physics could have measured, so the network sees up to 8x more distinct pairs.
What is validated, kept and saved is an exponential moving average of the weights (`ema`,
decay 0.995 with a warm-up; its BatchNorm statistics recomputed for it): batches of 8 make
noisy steps, and the average of the last few hundred generalises better (case (a), seed 0:
held-out phase 19.27 -> 19.67 dB). It is part of the checkpoint.
`refit` (off by default: twice the time for +0.03 dB in the benchmark) trains once more on
training and validation pairs for the epochs validation chose. Progress goes to stderr, one
line per epoch.
Seeds: torch and numpy from `seed`; the same inputs give the same model on the same device.

Checkpoints and resume: after every `checkpoint_every` epochs the state goes to a folder next
to the model (`.<name>.checkpoint/`): `state-<epoch>.safetensors` (the current and best
weights, Adam's moment tensors) and `state.json` (epoch, step, best loss, history, the numpy
generator's state, Adam's hyper-parameters, and a fingerprint of the options and sources). A
later `train_ptychonn` with the same options and sources continues from it (an interrupted job
rerun, or a Dask task retried); on the same device and precision the result equals an
uninterrupted training's. Nothing in it is pickled. It is removed once the model is saved.

`train_task` is the same as one Dask task: `ptyinr nn train --cluster ...` submits it asking
for one GPU where the workers have GPUs (`cluster.task_resources`).

The artifact (`models.ptychonn.save_artifact`) records the architecture, the input
normalisation, frame shape, pixel size, energy, the source runs (store, run, positions used),
and the scores: validation loss of the network and of the mean training patch, and, when
`fraction` < 1, the same on positions the network never saw (held out, up to 4096 of them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
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
    augment_pairs,
    block_split,
    items_for,
    open_run_source,
    probe_symmetries,
    probe_weights,
    select_positions,
)

#: at most this many never-seen positions are scored after training
MAX_HELD_OUT = 4096
CHECKPOINT_FORMAT = "ptyinr-ptychonn-checkpoint"
#: options that do not change the result (so a checkpoint of other values still resumes)
NOT_FINGERPRINTED = ("device", "threads", "extra", "checkpoint_every")


@dataclass
class TrainOptions:
    """What `ptyinr nn train` exposes, with the original PtychoNN's values as defaults."""

    fraction: float = 0.2
    validation_fraction: float = 0.2
    epochs: int | None = None  # None: auto (`resolve_schedule`)
    batch_size: int | None = None  # None: auto
    lr: float = 1e-3
    lr_final: float = 0.1
    patience: int | None = None  # None: auto
    min_epochs: int | None = None  # early stopping not before this epoch; None: epochs // 2
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    input_size: int | None = None  # None: 64, or the largest that fits the frame
    input_mode: str = "crop"
    channels: int = 32
    depth: int = 3
    precision: str = "auto"  # auto = fp32 (see the module docstring) | fp32 | bf16 (CUDA only)
    checkpoint_every: int = 1  # epochs between checkpoints; 0 = none
    augment: str = "auto"  # auto = pairs under the probe's symmetries (probe_symmetries) | none
    refit: bool = False  # then train again on training + validation pairs for the chosen epochs
    ema: float = 0.995  # decay of the evaluated moving average of the weights; 0 = off
    extra: dict[str, Any] = field(default_factory=dict)


#: the original PtychoNN's schedule (thousands of frames): batch 64, 60 epochs, patience 10
BATCH, EPOCHS, PATIENCE = 64, 60, 10
#: auto schedules make at least this many optimiser steps and 8 per epoch
MIN_STEPS, MIN_STEPS_PER_EPOCH = 5000, 8


def resolve_schedule(options: TrainOptions, train_positions: int) -> TrainOptions:
    """`options` with the automatic (None) batch size, epochs and patience chosen for a
    training set of `train_positions` pairs; given values are kept.

    Why: the original's 60 epochs of batch 64 were made for thousands of frames; a fifth of
    one scan is tens to hundreds, where they mean a few hundred optimiser steps and the phase
    head stays underfitted. Issue 13's case (a) (71 training positions, held-out phase PSNR,
    mean of 3 seeds): batch 32 for 80 epochs 16.2 dB, batch 8 for 300 epochs (patience 40)
    17.9 dB; with symmetry pairs 18.6 dB, and for 600 epochs (patience 80) 19.2 dB (seed 0;
    18.75 at 300). So: batch = min(64, n // 8) (at least 8 steps per epoch, at least 4
    frames for BatchNorm), epochs = max(60, epochs for MIN_STEPS optimiser steps), patience =
    max(10, epochs // 7); min_epochs stays half the epochs."""
    n = max(1, int(train_positions))
    batch = options.batch_size or max(4, min(BATCH, n // MIN_STEPS_PER_EPOCH))
    steps = math.ceil(n / batch)
    epochs = options.epochs or max(EPOCHS, math.ceil(MIN_STEPS / steps))
    patience = options.patience if options.patience is not None else max(PATIENCE, epochs // 7)
    for name, value in (("--batch-size", batch), ("--epochs", epochs)):
        if value < 1:
            raise InputError(f"{name} {value}: expected >= 1")
    return dataclasses.replace(options, batch_size=batch, epochs=epochs, patience=patience)


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


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether the training steps' forward pass runs under bf16 autocast: only when asked
    (`bf16`), on CUDA with native bf16 (InputError elsewhere); `auto` is float32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"--precision {precision!r}: expected auto, fp32 or bf16")
    native = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not native:
        raise InputError(
            f"--precision bf16: needs a CUDA device with native bf16, training runs on {device}"
        )
    return precision == "bf16"


@contextlib.contextmanager
def exact_fp32(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Float32 convolutions and matrix products on CUDA (TF32, with 11 significant bits, off)
    while inside; the flags are restored on the way out. Nothing to do on a CPU."""
    if not enabled or device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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


def training_symmetries(
    training: TrainingSet, options: TrainOptions
) -> list[tuple[bool, bool, bool]]:
    """The symmetries training pairs are drawn under (identity first): with `augment =
    "auto"` those every source probe has (`ptychonn_data.probe_symmetries`), for inputs
    cropped at the detector's sampling (a binned input is not symmetric about the centre
    pixel); the identity alone otherwise."""
    if options.augment not in ("auto", "none"):
        raise InputError(f"--augment {options.augment!r}: expected auto or none")
    spec = training.spec
    binned = spec.input_mode == "bin" and spec.input_size != min(spec.frame_shape)
    if options.augment == "none" or binned:
        return [(False, False, False)]
    return probe_symmetries([run.probe for run in training.sources])


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
    """Index batches (shuffled with `rng`); a last batch of one joins the one before it, as
    BatchNorm in training mode cannot normalise a single frame's 1 x 1 bottom features."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    out = [order[i : i + size] for i in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2:] = [np.concatenate(out[-2:])]
    return out


@torch.no_grad()
def evaluate(
    network: PtychoNN,
    dataset: PairDataset,
    device: torch.device,
    batch_size: int = 256,
    mean_patch: tuple[torch.Tensor, torch.Tensor] | None = None,
    bf16: bool = False,
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
        with autocast(device, bf16):
            pa, pp = network(x)
        a, p = pair_loss(pa.float(), pp.float(), amp, pha, w)
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


@torch.no_grad()
def recalibrate_batchnorm(
    network: PtychoNN,
    dataset: PairDataset,
    device: torch.device,
    batch_size: int,
    bf16: bool = False,
) -> None:
    """Set every BatchNorm's running statistics to the mean over `dataset` of the current
    weights' batch statistics. With few positions an epoch is a few steps, and the running
    averages (momentum 0.1) still mix statistics of earlier weights: in evaluation mode the
    network then predicts garbage, and early stopping keeps a bad epoch."""
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms or len(dataset) == 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over this pass
    network.train()
    for idx in _batches(len(dataset), batch_size, None):
        x = dataset.batch(idx)[0].to(device)
        with autocast(device, bf16):
            network(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    network.eval()


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
    checkpoint: Path | None = None,
    fingerprint: str = "",
    stop_after: int | None = None,
    keep_best: bool = True,
) -> tuple[PtychoNN, dict[str, Any]]:
    """Train with Adam, cosine decay, early stopping on the validation loss; the best
    network (the last with `keep_best` False) and the training history. With `checkpoint` (a
    folder) the state is saved every `options.checkpoint_every` epochs and, when a checkpoint
    of the same `fingerprint` is there, training continues from it. `stop_after` ends after
    that epoch as an interruption would (the checkpoint stays; for tests and wall-time-limited
    jobs).
    On CUDA it runs in true float32 (`exact_fp32`) unless bf16 was asked for."""
    with exact_fp32(select_device(options.device)):
        return _fit_network(
            training,
            options,
            progress=progress,
            checkpoint=checkpoint,
            fingerprint=fingerprint,
            stop_after=stop_after,
            keep_best=keep_best,
        )


def _fit_network(
    training: TrainingSet,
    options: TrainOptions,
    *,
    progress: bool,
    checkpoint: Path | None,
    fingerprint: str,
    stop_after: int | None,
    keep_best: bool = True,
) -> tuple[PtychoNN, dict[str, Any]]:
    options = resolve_schedule(options, len(training.train))
    if len(training.train) < 2:  # BatchNorm normalises over a batch: one frame is none
        raise InputError(
            f"nn train: {len(training.train)} training position(s); expected at least 2 "
            "(raise --fraction or train on more runs)"
        )
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    device = select_device(options.device)
    bf16 = use_bf16(options.precision, device)
    network = PtychoNN(training.spec).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=options.lr)
    steps_per_epoch = math.ceil(len(training.train) / options.batch_size)
    total_steps = max(1, steps_per_epoch * options.epochs)

    def learning_rate(step: int) -> float:
        """Cosine decay from lr to lr * lr_final over the epochs."""
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return options.lr * (options.lr_final + (1 - options.lr_final) * cosine)

    has_validation = len(training.validation) > 0
    state = TrainState()
    if checkpoint is not None and (checkpoint / CHECKPOINT_JSON).exists():
        state = load_checkpoint(checkpoint, fingerprint, network, optimiser, rng)
        if progress:
            print(
                f"ptychonn: resuming from {checkpoint} after epoch {state.epoch}",
                file=sys.stderr,
                flush=True,
            )
    started = time.perf_counter() - state.elapsed_s
    epoch = state.epoch
    min_epochs = options.epochs // 2 if options.min_epochs is None else options.min_epochs

    def should_stop(epoch: int) -> bool:
        """Patience spent, and not inside the first `min_epochs` (the phase plateau)."""
        return bool(options.patience and state.since_best >= options.patience) and (
            epoch >= min_epochs
        )

    symmetries = training_symmetries(training, options)
    if not 0 <= options.ema < 1:
        raise InputError(f"--ema {options.ema}: expected a decay in [0, 1)")
    # the network that is evaluated and kept: the raw one, or one holding the moving average
    shown = copy.deepcopy(network) if options.ema else network
    if options.ema and state.ema is None:
        state.ema = {k: v.detach().clone() for k, v in network.named_parameters()}
    stopped = should_stop(state.epoch)  # a checkpoint of a finished training
    for epoch in range(state.epoch + 1, 0 if stopped else options.epochs + 1):
        network.train()
        total, count = 0.0, 0
        for idx in _batches(len(training.train), options.batch_size, rng):
            pairs = augment_pairs(training.train.batch(idx), symmetries, rng)
            x, amp, pha, w = (t.to(device) for t in pairs)
            with autocast(device, bf16):
                pa, pp = network(x)
            a, p = pair_loss(pa.float(), pp.float(), amp, pha, w)
            loss = a + p
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(state.step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if state.ema is not None:  # warm-up: a short memory while the steps are few
                decay = min(options.ema, (1 + state.step) / (10 + state.step))
                with torch.no_grad():
                    for name, value in network.named_parameters():
                        state.ema[name].lerp_(value, 1 - decay)
            state.step += 1
            total += loss.item() * len(idx)
            count += len(idx)
        train_loss = total / max(count, 1)
        if not math.isfinite(train_loss):
            raise InputError(f"nn train: the loss became {train_loss} at epoch {epoch}; lower --lr")
        state.history["train_loss"].append(train_loss)
        # float32 whatever the training precision: the engine infers in float32, and the
        # statistics must be those of the network that infers
        if state.ema is not None:
            with torch.no_grad():
                for name, value in shown.named_parameters():
                    value.copy_(state.ema[name])
        recalibrate_batchnorm(shown, training.train, device, options.batch_size)
        if has_validation:
            value = evaluate(shown, training.validation, device)["loss"]
        else:
            value = train_loss
        state.history["validation_loss"].append(value)
        better = value < state.best_loss
        if better:
            state.best_loss, state.best_epoch, state.since_best = value, epoch, 0
            state.best = copy.deepcopy({k: v.detach().cpu() for k, v in shown.state_dict().items()})
        else:
            state.since_best += 1
        state.epoch = epoch
        state.elapsed_s = time.perf_counter() - started
        stopped = should_stop(epoch)
        last = stopped or epoch == options.epochs or epoch == stop_after
        every = options.checkpoint_every
        if checkpoint is not None and every and (epoch % every == 0 or last):
            save_checkpoint(checkpoint, fingerprint, state, network, optimiser, rng)
        if progress:
            print(
                f"ptychonn epoch {epoch}/{options.epochs}: train {train_loss:.4f} "
                f"validation {value:.4f}{' *' if better else ''} "
                f"({state.elapsed_s:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        if stopped or epoch == stop_after:
            break
    if keep_best and state.best is not None:
        network.load_state_dict(state.best)
    elif shown is not network:
        network.load_state_dict(shown.state_dict())
    network.eval()
    info = {
        "epochs_run": epoch,
        "best_epoch": state.best_epoch,
        "stopped_early": epoch < options.epochs,
        "train_seconds": time.perf_counter() - started,
        "device": str(device),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "resumed_from_epoch": state.resumed_from,
        "symmetries": [list(g) for g in symmetries],
        **state.history,
    }
    return network, info


def refit_network(
    training: TrainingSet, options: TrainOptions, info: dict[str, Any], *, progress: bool
) -> tuple[PtychoNN, dict[str, Any]]:
    """Train afresh on the training and validation pairs together for the epochs validation
    chose (`best_epoch`), under the same learning-rate schedule, and keep the last state.

    Why: validation pairs are a fifth of the selected positions and a network trained on 71
    frames is data-starved; once validation has told how long to train, they can teach too.
    The validation score in the record is the first fit's (the refit has seen those pairs);
    the never-seen positions score the refitted network. No checkpoints (a rerun refits
    again)."""
    merged = PairDataset(
        training.sources,
        np.concatenate([training.train.items, training.validation.items]),
        training.spec,
    )
    refit_set = dataclasses.replace(
        training,
        train=merged,
        validation=PairDataset(training.sources, merged.items[:0], training.spec),
    )
    epochs = max(1, int(info["best_epoch"]))
    if progress:
        print(
            f"ptychonn: refit on {len(merged)} positions (training + validation) for "
            f"{epochs} epochs",
            file=sys.stderr,
            flush=True,
        )
    network, refit_info = fit_network(
        refit_set,
        dataclasses.replace(options, patience=0),  # the length is chosen: no early stop
        progress=progress,
        checkpoint=None,
        fingerprint="",
        stop_after=epochs,
        keep_best=False,
    )
    return network, {
        "epochs": epochs,
        "positions": len(merged),
        "train_seconds": refit_info["train_seconds"],
        "train_loss": refit_info["train_loss"],
    }


# ------------------------------------------------------------------------------- checkpoints

CHECKPOINT_JSON = "state.json"


@dataclass
class TrainState:
    """What training needs to continue where it stopped (besides weights and Adam)."""

    epoch: int = 0
    step: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    since_best: int = 0
    elapsed_s: float = 0.0
    resumed_from: int = 0
    best: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None  # moving average of the parameters
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"train_loss": [], "validation_loss": []}
    )


def checkpoint_dir(out: str | Path) -> Path:
    """Where the checkpoint of the model `out` lives: `.<name>.checkpoint` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def fingerprint_of(sources: list[RunSource], options: TrainOptions) -> str:
    """What a checkpoint must have been trained with to be continued: the options that change
    the result, the runs (store, run id, positions)."""
    opts = {k: v for k, v in asdict(options).items() if k not in NOT_FINGERPRINTED}
    runs = [[str(s.store.resolve()), s.run_id, len(s.positions_px)] for s in sources]
    text = json.dumps({"options": opts, "sources": runs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(
    folder: Path,
    fingerprint: str,
    state: TrainState,
    network: PtychoNN,
    optimiser: torch.optim.Optimizer,
    rng: np.random.Generator,
) -> None:
    """Write the state: the tensors under a new name first, then the JSON that names them
    (replaced whole), then the old tensors go. A kill at any point leaves a JSON whose
    tensors file exists and matches its checksum."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"network.{k}": v.detach().cpu() for k, v in network.state_dict().items()}
    for k, v in (state.best or {}).items():
        tensors[f"best.{k}"] = v
    for k, v in (state.ema or {}).items():
        tensors[f"ema.{k}"] = v.detach().cpu()
    saved = optimiser.state_dict()
    for index, entry in saved["state"].items():
        for name, value in entry.items():
            tensors[f"adam.{index}.{name}"] = torch.as_tensor(value).detach().cpu().reshape(-1)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    name = f"state-{state.epoch:06d}.safetensors"
    tmp = folder / f"{name}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "epoch": str(state.epoch)})
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, folder / name)
    record = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "epoch": state.epoch,
        "step": state.step,
        "best_loss": state.best_loss if math.isfinite(state.best_loss) else None,
        "best_epoch": state.best_epoch,
        "since_best": state.since_best,
        "elapsed_s": state.elapsed_s,
        "history": state.history,
        "rng": rng.bit_generator.state,
        "param_groups": saved["param_groups"],
        "tensors": name,
        "tensors_sha256": digest,
    }
    tmp = folder / f"{CHECKPOINT_JSON}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, folder / CHECKPOINT_JSON)
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(
    folder: Path,
    fingerprint: str,
    network: PtychoNN,
    optimiser: torch.optim.Optimizer,
    rng: np.random.Generator,
) -> TrainState:
    """Restore weights, Adam and the generator from `folder`; the training state. InputError
    in one line when it is corrupt or was written with other options or sources."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"ptychonn checkpoint {str(folder)!r}"
    try:
        record = json.loads((folder / CHECKPOINT_JSON).read_text())
        if record.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        if record.get("fingerprint") != fingerprint:
            raise InputError(
                f"{where}: written by a training with other options or sources; remove it "
                "or pass --no-resume to start over"
            )
        name = str(record["tensors"])
        if not re.fullmatch(r"state-\d+\.safetensors", name):  # a name, never a path
            raise ValueError(f"tensors {name!r}")
        raw = (folder / name).read_bytes()
        if hashlib.sha256(raw).hexdigest() != record["tensors_sha256"]:
            raise ValueError(f"{name} checksum differs from {CHECKPOINT_JSON}")
        tensors = load_file(str(folder / name))
        network.load_state_dict(
            {k.removeprefix("network."): v for k, v in tensors.items() if k.startswith("network.")}
        )
        best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
        adam: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                adam.setdefault(int(index), {})[name] = (
                    value.reshape(()) if name == "step" else (value)
                )
        groups = record["param_groups"]
        for group in groups:
            group["betas"] = tuple(group["betas"])
        shapes = [p.shape for p in network.parameters()]
        for index, entry in adam.items():
            for name in ("exp_avg", "exp_avg_sq"):
                entry[name] = entry[name].reshape(shapes[index])
        optimiser.load_state_dict({"state": adam, "param_groups": groups})
        rng.bit_generator.state = record["rng"]
    except InputError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{where}: corrupt or unreadable ({first}); remove it") from None
    best_loss = record["best_loss"]
    return TrainState(
        epoch=int(record["epoch"]),
        step=int(record["step"]),
        best_loss=math.inf if best_loss is None else float(best_loss),
        best_epoch=int(record["best_epoch"]),
        since_best=int(record["since_best"]),
        elapsed_s=float(record["elapsed_s"]),
        resumed_from=int(record["epoch"]),
        best=best or None,
        ema={k: v.to(next(network.parameters()).device) for k, v in ema.items()} or None,
        history=record["history"],
    )


def train_ptychonn(
    sources: list[str],
    out: str | Path,
    options: TrainOptions | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    resume: bool = True,
    stop_after: int | None = None,
) -> ModelArtifact:
    """Build the pairs, train, score, and save the artifact at `out` (a folder). A
    checkpoint of an interrupted training with the same options and sources is continued
    (`resume`; otherwise removed first). `stop_after`: see `fit_network`; the artifact is then
    not written (the returned one has `path` None)."""
    options = options or TrainOptions()
    out = Path(out)
    if out.exists() and not force:  # before any work
        raise InputError(f"ptychonn model {str(out)!r}: exists; use --force to replace it")
    if options.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every {options.checkpoint_every}: expected >= 0")
    training = build_training_set(sources, options)
    options = resolve_schedule(options, len(training.train))
    folder = checkpoint_dir(out) if options.checkpoint_every else None
    if folder is not None and not resume:
        shutil.rmtree(folder, ignore_errors=True)
    network, info = fit_network(
        training,
        options,
        progress=progress,
        checkpoint=folder,
        fingerprint=fingerprint_of(training.sources, options),
        stop_after=stop_after,
    )
    device = next(network.parameters()).device
    baseline = mean_training_patch(training.train)
    scores: dict[str, Any] = {}
    if len(training.validation):
        scores["validation"] = evaluate(network, training.validation, device, mean_patch=baseline)
    if options.refit and len(training.validation) and stop_after is None:
        network, info["refit"] = refit_network(training, options, info, progress=progress)
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
    if stop_after is not None and info["epochs_run"] == stop_after < options.epochs:
        return artifact  # interrupted on purpose: the checkpoint stays, no model
    save_artifact(out, artifact, force=force)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return artifact


def train_task(
    sources: list[str],
    out: str,
    options: TrainOptions,
    force: bool = False,
) -> dict[str, Any]:
    """`train_ptychonn` as one Dask task (on a worker, possibly a GPU node): the record of
    the saved model (the network stays in the folder). Progress goes to the worker's log; a
    retried task resumes from the checkpoint."""
    return train_ptychonn(sources, out, options, force=force, progress=True).record
