"""PtyINR training: fit object and probe fields to measured diffraction intensities.

Loss (paper eq. 2): SmoothL1(beta) between sqrt(measured) and sqrt(predicted) intensities,
plus lambda * mean normalised probe amplitude during the first k steps. Adam with separate
learning rates for object and probe. Full batch or shuffled mini-batches over positions; each
epoch's order comes from (seed, epoch) alone, so a run resumed from a checkpoint takes exactly
the steps an uninterrupted run would have taken.

Measured intensities are divided by their global maximum (so beta has one meaning across
datasets); the probe's learnable scale absorbs the detector's count scale.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.nn import functional

from pipeline import __version__, fastpaths, memory
from pipeline.batching import epoch_batches, random_batches
from pipeline.config import ReconstructionConfig, TrainConfig
from pipeline.errors import InputError, ReconstructionFailed
from pipeline.models.fields import (
    ObjectField,
    ProbeField,
    build_object_field,
    build_probe_field,
)
from pipeline.physics import ScanGeometry, far_field_intensity, fourier_shift
from pipeline.probe_guess import ProbeStart, TrialData, choose_probe_start, compact_patch

if TYPE_CHECKING:
    from pipeline.parallel import ParallelContext

SCALE_LR = 1e-3  # learning rate of the probe's global log-scale (one scalar)


@dataclass
class ScanData:
    """Diffraction data as the trainer needs it, in memory.

    intensities: (n, Ny, Nx) counts, zero frequency centred. positions_px: (n, 2) (y, x) window
    centres in object pixels of the store's frame. bad_pixels: (Ny, Nx) True where the detector
    is not to be trusted. pixel_size: object pixel size (y, x) in metres, or None (pixel units).
    wavelength and detector geometry: from the store where it has them (the optics probe start
    needs them).
    """

    intensities: np.ndarray
    positions_px: np.ndarray
    bad_pixels: np.ndarray | None = None
    pixel_size: tuple[float, float] | None = None
    wavelength_m: float | None = None
    detector_distance_m: float | None = None
    detector_pixel_size_m: float | None = None

    def __post_init__(self) -> None:
        if self.intensities.ndim != 3:
            raise InputError(
                f"intensities: shape {self.intensities.shape}, expected (frames, det_y, det_x)"
            )
        if self.positions_px.shape != (self.intensities.shape[0], 2):
            raise InputError(
                f"positions: shape {self.positions_px.shape}, expected "
                f"({self.intensities.shape[0]}, 2) to match the frames"
            )
        if self.bad_pixels is not None and np.shape(self.bad_pixels) != self.intensities.shape[1:]:
            raise InputError(
                f"bad-pixel mask: shape {np.shape(self.bad_pixels)}, expected the frame shape "
                f"{tuple(self.intensities.shape[1:])}"
            )

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.intensities.shape[1]), int(self.intensities.shape[2]))

    def subset(self, indices: np.ndarray) -> ScanData:
        """The same scan restricted to some positions (e.g. one FRC half)."""
        return ScanData(
            intensities=self.intensities[indices],
            positions_px=self.positions_px[indices],
            bad_pixels=self.bad_pixels,
            pixel_size=self.pixel_size,
            wavelength_m=self.wavelength_m,
            detector_distance_m=self.detector_distance_m,
            detector_pixel_size_m=self.detector_pixel_size_m,
        )


@dataclass
class Reconstruction:
    """Result of one reconstruction: labelled object, probe, loss curve, and bookkeeping."""

    object: xr.DataArray
    probe: xr.DataArray
    loss: xr.DataArray
    geometry: ScanGeometry
    info: dict[str, Any] = field(default_factory=dict)

    def to_dataset(self) -> xr.Dataset:
        """One xarray Dataset, ready to be written as a run group."""
        return xr.Dataset(
            {"object": self.object, "probe": self.probe, "loss": self.loss},
            attrs=dict(self.info),
        )


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Position indices of each step of one epoch: full batch, or a seeded shuffle."""
    if batch_size <= 0 or batch_size >= n:
        yield np.arange(n)
        return
    yield from random_batches(n, batch_size, seed, epoch)


def smooth_l1_amplitude_loss(
    predicted_intensity: torch.Tensor,
    measured_amplitude: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Paper eq. (2) data term: SmoothL1(beta) of sqrt intensities, mean over valid pixels."""
    predicted_amplitude = torch.sqrt(predicted_intensity + 1e-12)
    per_pixel = functional.smooth_l1_loss(
        predicted_amplitude, measured_amplitude, beta=beta, reduction="none"
    )
    if valid is None:
        return per_pixel.mean()
    weights = valid.to(per_pixel.dtype)
    return (per_pixel * weights).sum() / (weights.sum() * per_pixel.shape[0])


def learning_rate_factor(train: TrainConfig, step: int, total_steps: int) -> float:
    """Share of the configured learning rates at `step` (1-based) of `total_steps`: linear
    warm-up, then cosine decay to `train.lr_final` (train.lr_schedule = "cosine"), or 1.
    A function of the step alone, so a resumed run continues the same schedule."""
    if train.lr_schedule == "constant":
        return 1.0
    warmup = train.lr_warmup * total_steps
    if step <= warmup:
        return max(step / warmup, 1e-3)
    progress = min((step - warmup) / max(total_steps - warmup, 1.0), 1.0)
    return train.lr_final + (1.0 - train.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Owns models, optimiser and data on one device; `fit` runs the epochs."""

    def __init__(
        self,
        data: ScanData,
        config: ReconstructionConfig,
        *,
        known_probe: np.ndarray | None = None,
        geometry: ScanGeometry | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.parallel = parallel  # data-parallel rank (pipeline.parallel); None: one process
        train = config.train
        if train.threads > 0:
            torch.set_num_threads(train.threads)
        self.device = select_device(train.device)
        self.geometry = geometry or ScanGeometry.from_positions(
            data.positions_px,
            data.frame_shape,
            padding_px=config.data.object_padding_px,
            round_positions=train.positions == "round",
        )
        if known_probe is not None and tuple(known_probe.shape) != data.frame_shape:
            raise InputError(
                f"known probe: shape {tuple(known_probe.shape)}, expected {data.frame_shape} "
                "(the diffraction frame shape)"
            )
        torch.manual_seed(train.seed)
        if parallel is not None:
            parallel.bind(self.geometry)
        # object tiles and streamed frames, chosen to fit the device (pipeline.plan)
        self.runtime = memory.runtime_for(
            data, config, self.geometry, self.device, known_probe is not None, parallel
        )
        self.stream: memory.FrameStream | None = None
        intensities: np.ndarray | None = None
        if self.runtime.stream:  # bad pixels are zeroed by the stream as below
            self.stream = memory.open_stream(data, config, self.device, parallel)
            self.intensity_scale = self.stream.scale
            self.measured_amplitude = None
        else:
            intensities = memory.materialize(data.intensities)
            if data.bad_pixels is not None:
                # Bad pixels carry no information: keep a hot or dead pixel out of the intensity
                # scale, the probe-scale start and the data-derived probe guess (the loss masks
                # them).
                bad = np.asarray(data.bad_pixels, bool)
                intensities = np.where(bad, np.float32(0), intensities)
            self.intensity_scale = float(max(intensities.max(), 1e-30))
            amplitude = np.clip(intensities, 0, None)  # in place from here: one temporary
            amplitude /= self.intensity_scale
            self.measured_amplitude = torch.as_tensor(
                np.sqrt(amplitude, out=amplitude), device=self.device
            )
        self.valid = (
            None
            if data.bad_pixels is None
            else torch.as_tensor(~np.asarray(data.bad_pixels, bool), device=self.device)
        )
        self.top_left = torch.as_tensor(self.geometry.top_left, device=self.device)
        self.subpixel = torch.as_tensor(
            self.geometry.subpixel, dtype=torch.float32, device=self.device
        )
        self.use_subpixel = bool(np.abs(self.geometry.subpixel).max(initial=0.0) > 1e-6)

        self.batch_size = train.batch_size_for(self.geometry.n_positions)
        self._centres = self.geometry.window_centres_on_grid()
        self.probe_start = ProbeStart(None, {"method": "known"})
        if known_probe is None:
            self.probe_start = choose_probe_start(
                config,
                data.frame_shape,
                lambda: intensities.mean(axis=0)
                if intensities is not None
                else self.stream.mean_pattern,  # type: ignore[union-attr]
                self._trial_data,
                wavelength_m=data.wavelength_m,
                pixel_size_m=data.pixel_size,
                detector=(data.detector_distance_m, data.detector_pixel_size_m),
            )
        initial_probe = self.probe_start.probe
        self.object: ObjectField = build_object_field(self.geometry.object_shape, config.model).to(
            self.device
        )
        self.probe: ProbeField = build_probe_field(
            data.frame_shape, config.model, known_probe=known_probe, initial_probe=initial_probe
        ).to(self.device)
        if self.probe.kind == "hashgrid" and initial_probe is not None:
            error = self.probe.fit_to(
                initial_probe,
                steps=config.model.probe_init_steps,
                progress=sys.stderr.isatty(),  # a transient bar where someone watches
            )
            self.probe_start.record["warm_start_error"] = float(error)
        self._initialise_probe_scale()
        object_params = list(self.object.parameters())
        probe_params = [p for n, p in self.probe.named_parameters() if n != "log_scale"]
        groups: list[dict[str, Any]] = [
            {"params": object_params, "lr": train.lr_object},
            {"params": [self.probe.log_scale], "lr": SCALE_LR},
        ]
        if probe_params:
            groups.append({"params": probe_params, "lr": train.lr_probe})
        for group in groups:
            group["base_lr"] = group["lr"]
        self.optimizer = torch.optim.Adam(groups)
        n = self.geometry.n_positions
        self.steps_per_epoch = 1 if self.batch_size <= 0 else math.ceil(n / self.batch_size)
        self._parameters = [p for group in groups for p in group["params"]]
        # what performance.precision = auto becomes here, also for the run's record
        self.precision = fastpaths.resolve_precision(config, self.device, self.geometry.n_positions)
        self.autocast_dtype = fastpaths.prepare_object_field(
            self.object, config.performance, self.device, self.precision
        )
        if parallel is not None:
            parallel.broadcast_parameters(self.object, self.probe)
        self.step = 0
        self.epoch = 0
        self.loss_history: list[float] = []
        self.seconds = 0.0
        self._full_batch_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._full_union: torch.Tensor | None = None

    # -- model pieces --------------------------------------------------------------------------

    def _trial_data(self) -> TrialData:
        """A compact patch of the scan for the data-derived probe start's trial fits."""
        patch = compact_patch(self.data.positions_px)
        geometry = ScanGeometry.from_positions(
            self.data.positions_px[patch],
            self.data.frame_shape,
            round_positions=self.config.train.positions == "round",
        )
        amplitudes = self._measured(torch.as_tensor(patch, device=self.device), patch)
        return TrialData(amplitudes.float(), geometry, self.valid)

    def _window_indices(self, batch: torch.Tensor) -> torch.Tensor:
        ny, nx = self.geometry.window_shape
        width = self.geometry.object_shape[1]
        tl = self.top_left[batch]
        rows = tl[:, 0, None] + torch.arange(ny, device=self.device)[None, :]
        cols = tl[:, 1, None] + torch.arange(nx, device=self.device)[None, :]
        return rows[:, :, None] * width + cols[:, None, :]

    def _pixels_of(self, batch: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique object pixels under the batch's windows, and how to spread them back."""
        if full and self._full_batch_cache is not None:
            return self._full_batch_cache
        unique, inverse = torch.unique(self._window_indices(batch), return_inverse=True)
        if full:
            self._full_batch_cache = (unique, inverse)
        return unique, inverse

    def predict(self, batch: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted intensities (B, Ny, Nx) and the mean normalised probe amplitude."""
        unique, inverse = self._pixels_of(batch, full)
        patches = memory.sample_object(
            self.object,
            unique,
            self.runtime.tile_pixels,
            self.autocast_dtype,
            self.runtime.chunk_pixels,
        )[inverse]
        probe, mean_amplitude = self.probe()
        if self.use_subpixel:
            probes = fourier_shift(probe, self.subpixel[batch])
        else:
            probes = probe[None]
        return far_field_intensity(probes * patches), mean_amplitude

    def _union_of(self, batch: torch.Tensor, chunk: int, full: bool) -> torch.Tensor:
        """Sorted unique object pixels under the batch's windows, merged chunk by chunk so
        the window indices of the whole batch are never held at once."""
        if full and self._full_union is not None:
            return self._full_union
        union: torch.Tensor | None = None
        for start in range(0, len(batch), chunk):
            part = torch.unique(self._window_indices(batch[start : start + chunk]))
            union = part if union is None else torch.unique(torch.cat([union, part]))
        assert union is not None
        if full:
            self._full_union = union
        return union

    def _chunked_backward(
        self, batch: torch.Tensor, batch_indices: np.ndarray, full: bool, weight: float
    ) -> torch.Tensor:
        """One step's data loss and gradients with the forward model in chunks of frames
        (performance.frame_chunk), for batches whose forward model does not fit at once.

        The object networks run once on the batch's pixel union and the probe networks once;
        their outputs enter the chunks as detached leaves, each chunk's loss backpropagates
        into the leaves, and the leaves' gradients then flow through the networks in one
        backward pass: the same gradients as one graph over the whole batch, with the memory
        of one chunk. Returns the (detached) data loss, scaled by `weight`."""
        train = self.config.train
        chunk = self.runtime.frame_chunk
        union = self._union_of(batch, chunk, full)
        values = memory.sample_object(
            self.object,
            union,
            self.runtime.tile_pixels,
            self.autocast_dtype,
            self.runtime.chunk_pixels,
        )
        object_leaf = values.detach().requires_grad_(True)
        probe, mean_probe_amplitude = self.probe()
        probe_leaf = probe.detach().requires_grad_(probe.requires_grad)
        measured = self._measured(batch, batch_indices)
        n = len(batch)
        total = torch.zeros((), device=self.device)
        for start in range(0, n, chunk):
            part = batch[start : start + chunk]
            inverse = torch.searchsorted(union, self._window_indices(part))
            if self.use_subpixel:
                probes = fourier_shift(probe_leaf, self.subpixel[part])
            else:
                probes = probe_leaf[None]
            predicted = far_field_intensity(probes * object_leaf[inverse])
            loss = smooth_l1_amplitude_loss(
                predicted, measured[start : start + chunk], train.loss_beta, self.valid
            ) * (weight * len(part) / n)
            loss.backward()
            total += loss.detach()
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        for output, leaf in ((values, object_leaf), (probe, probe_leaf)):
            if output.requires_grad and leaf.grad is not None:
                outputs.append(output)
                grads.append(leaf.grad)
        regularise = self.probe.kind != "fixed" and self.step <= train.probe_reg_steps
        if regularise and (self.parallel is None or self.parallel.is_root):
            outputs.append(train.probe_reg_lambda * mean_probe_amplitude)
            grads.append(None)
        if outputs:
            torch.autograd.backward(outputs, grads)
        return total

    @torch.no_grad()
    def _initialise_probe_scale(self) -> None:
        """Start with predicted frame energy equal to measured (object amplitude ~ 1)."""
        if self.measured_amplitude is None:
            measured_energy = self.stream.mean_energy  # type: ignore[union-attr]
        else:
            measured_energy = float(self.measured_amplitude.square().sum(dim=(-2, -1)).mean())
        probe_energy = float(self.probe.normalised().abs().square().sum())
        positions = memory.spread_subset(self.geometry.n_positions, self.geometry.window_shape)
        sample = memory.thin(torch.unique(self._window_indices(torch.as_tensor(positions))))
        tile = self.runtime.tile_pixels or memory.NO_GRAD_CHUNK
        object_power = float(memory.sample_object(self.object, sample, tile).abs().square().mean())
        ratio = measured_energy / max(probe_energy * object_power, 1e-30)
        self.probe.log_scale.fill_(0.5 * math.log(max(ratio, 1e-30)))

    # -- optimisation --------------------------------------------------------------------------

    def _measured(self, batch: torch.Tensor, batch_indices: np.ndarray) -> torch.Tensor:
        if self.stream is not None:
            return self.stream.amplitude(batch_indices)
        return self.measured_amplitude[batch]  # type: ignore[index]

    def train_step(self, batch_indices: np.ndarray, full: bool) -> float:
        train = self.config.train
        share = 1.0
        if self.parallel is not None:  # this rank's part of the global batch
            batch_indices, share = self.parallel.shard(batch_indices)
        batch = torch.as_tensor(batch_indices, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        regularise = self.probe.kind != "fixed" and self.step <= train.probe_reg_steps
        if self.parallel is not None and len(batch_indices) == 0:
            # a short last batch left this rank nothing (rank 0 always has positions)
            loss = data_loss = torch.zeros((), device=self.device)
        elif 0 < self.runtime.frame_chunk < len(batch_indices):
            # gradients are accumulated chunk by chunk; the returned loss carries no graph
            loss = data_loss = self._chunked_backward(batch, batch_indices, full, share)
        else:
            predicted, mean_probe_amplitude = self.predict(batch, full)
            data_loss = smooth_l1_amplitude_loss(
                predicted, self._measured(batch, batch_indices), train.loss_beta, self.valid
            )
            if self.parallel is not None:  # local mean -> its share of the global mean
                data_loss = data_loss * share
            loss = data_loss
            if regularise and (self.parallel is None or self.parallel.is_root):
                loss = loss + train.probe_reg_lambda * mean_probe_amplitude
        if self.parallel is None:
            value = float(data_loss.detach())
            self._check_finite(value)
        if loss.requires_grad:
            loss.backward()
        if self.parallel is not None:  # sum gradients and loss over ranks
            value = self.parallel.all_reduce(self._parameters, data_loss)
            self._check_finite(value)
        factor = learning_rate_factor(
            train, self.step, train.epochs * self.steps_per_epoch
        )
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.step()
        return value

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise ReconstructionFailed(
                f"loss became {value} at step {self.step} (epoch {self.epoch + 1}); "
                "try lower learning rates (train.lr_object / train.lr_probe)"
            )

    def run_epoch(self) -> float:
        train = self.config.train
        full = self.batch_size <= 0
        losses, weights = [], []
        schedule = list(
            epoch_batches(self._centres, self.batch_size, train.batches, train.seed, self.epoch)
        )
        if self.stream is not None:  # read the epoch's frames ahead
            self.stream.expect(
                [b if self.parallel is None else self.parallel.shard(b)[0] for b in schedule]
            )
        for batch in schedule:
            losses.append(self.train_step(batch, full))
            weights.append(len(batch))
        self.epoch += 1
        return float(np.average(losses, weights=weights))

    def fit(
        self,
        *,
        checkpoint_path: Path | None = None,
        progress: bool = True,
        description: str = "reconstructing",
        on_epoch: Callable[[int, float], None] | None = None,
    ) -> Reconstruction:
        """Run the remaining epochs (resuming from `checkpoint_path` when it exists)."""
        train = self.config.train
        if checkpoint_path is not None and Path(checkpoint_path).exists():
            self.load_checkpoint(checkpoint_path)
        last_checkpoint_step = self.step
        bar = _progress(progress)
        with bar:
            task = bar.add_task(
                description, total=train.epochs, completed=self.epoch, loss=math.nan
            )
            while self.epoch < train.epochs:
                started = time.perf_counter()
                value = self.run_epoch()
                self.seconds += time.perf_counter() - started
                self.loss_history.append(value)
                bar.update(task, advance=1, loss=value)
                if on_epoch is not None:
                    on_epoch(self.epoch, value)
                due = (
                    train.checkpoint_every
                    and self.step - last_checkpoint_step >= train.checkpoint_every
                )
                if checkpoint_path is not None and due and self.epoch < train.epochs:
                    self.save_checkpoint(checkpoint_path)
                    last_checkpoint_step = self.step
        return self.result()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> None:
        """Models, optimiser and counters, written atomically (tmp file then rename)."""
        if self.parallel is not None and not self.parallel.is_root:
            return  # ranks hold identical state; rank 0 writes it
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "object": self.object.state_dict(),
            "probe": self.probe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "loss_history": self.loss_history,
            "seconds": self.seconds,
            "config": self.config.model_dump(),
        }
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(Path(path), map_location=self.device, weights_only=False)
        saved = dict(state["config"])
        current = self.config.model_dump()
        for section in ("model", "data"):
            if saved.get(section) != current.get(section):
                raise InputError(
                    f"checkpoint {str(path)!r}: [{section}] differs from this run's config; "
                    "delete the checkpoint or use the same configuration"
                )
        self.object.load_state_dict(state["object"])
        self.probe.load_state_dict(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.loss_history = list(state["loss_history"])
        self.seconds = float(state["seconds"])

    # -- results -------------------------------------------------------------------------------

    @torch.no_grad()
    def result(self) -> Reconstruction:
        obj = self.object.full().cpu().numpy().astype(np.complex64)
        probe = (self.probe()[0]).cpu().numpy().astype(np.complex64)
        ys, xs = self.geometry.pixel_coordinates()
        ny, nx = self.geometry.window_shape
        py = np.arange(ny, dtype=np.float64) - ny // 2
        px = np.arange(nx, dtype=np.float64) - nx // 2
        size = self.data.pixel_size
        unit = "px" if size is None else "m"
        sy, sx = (1.0, 1.0) if size is None else size
        object_da = xr.DataArray(
            obj,
            dims=("y", "x"),
            coords={"y": ("y", ys * sy, {"units": unit}), "x": ("x", xs * sx, {"units": unit})},
            name="object",
        )
        probe_da = xr.DataArray(
            probe,
            dims=("probe_y", "probe_x"),
            coords={
                "probe_y": ("probe_y", py * sy, {"units": unit}),
                "probe_x": ("probe_x", px * sx, {"units": unit}),
            },
            name="probe",
        )
        epochs = np.arange(1, len(self.loss_history) + 1)
        loss_da = xr.DataArray(
            np.asarray(self.loss_history, dtype=np.float64),
            dims=("epoch",),
            coords={"epoch": epochs},
            name="loss",
        )
        info = {
            "epochs": int(self.epoch),
            "steps": int(self.step),
            "train_seconds": float(self.seconds),
            "seconds_per_epoch": float(self.seconds / max(self.epoch, 1)),
            "final_loss": float(self.loss_history[-1]) if self.loss_history else math.nan,
            "intensity_scale": self.intensity_scale,
            "origin_px": list(self.geometry.origin_px),
            "positions_unit": unit,
            "known_probe": self.probe.kind == "fixed",
            "device": str(self.device),
            "processes": 1 if self.parallel is None else self.parallel.world_size,
            "object_tile_pixels": self.runtime.tile_pixels,
            "frame_chunk": self.runtime.frame_chunk,
            "object_precision": self.precision,
            "streamed_frames": self.stream is not None,
            "batch_size": int(self.batch_size),
            "probe_start": self.probe_start.record,
            "versions": {"ptyinr": __version__, "torch": torch.__version__},
        }
        return Reconstruction(object_da, probe_da, loss_da, self.geometry, info)


def _progress(enabled: bool) -> Progress | contextlib.AbstractContextManager:
    if not enabled:
        return _SilentProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:.3e}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


class _SilentProgress(contextlib.nullcontext):
    """The bits of rich.Progress the trainer calls, doing nothing."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def reconstruct(
    data: ScanData,
    config: ReconstructionConfig,
    *,
    known_probe: np.ndarray | None = None,
    geometry: ScanGeometry | None = None,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    description: str = "reconstructing",
    on_epoch: Callable[[int, float], None] | None = None,
) -> Reconstruction:
    """Reconstruct object and probe from in-memory data (the engine's one entry point)."""
    trainer = Trainer(data, config, known_probe=known_probe, geometry=geometry)
    return trainer.fit(
        checkpoint_path=checkpoint_path,
        progress=progress,
        description=description,
        on_epoch=on_epoch,
    )
