"""PtyINR: object and probe as neural fields fitted by gradient descent on the measured data.

Forward model (ptyinr.physics): the object field is evaluated on the object pixels the batch's
windows cover, each window's probe is shifted by its sub-pixel fraction, and the predicted
intensity is |FFT2(probe x patch)|^2. Loss (paper eq. 2): the data term the base chose
from `train.loss` (ptyinr.losses: SmoothL1(beta) of sqrt intensities, Poisson or Gaussian
likelihood, or auto) plus lambda * mean normalised probe amplitude during the first k steps.
Adam with separate learning rates for object and probe, warm-up and cosine decay
(`learning_rate_factor`). Full batch or mini-batches over positions (ptyinr.batching); each
epoch's order comes from (seed, epoch) alone, so a run resumed from a checkpoint takes exactly
the steps an uninterrupted run would have taken.

Position refinement (`train.refine_positions`): a learnable (n, 2) offset per position, in
object pixels, enters the probe's exact Fourier shift next to the window's sub-pixel fraction,
so gradients reach it through the physics the fit already runs. After every step each window
is re-placed at the whole pixel nearest its refined position (clamped to the object grid) and
the probe is shifted by the remaining fraction: the model stays the one of the data
conventions, the shift stays within half a pixel (except for windows held at the grid's edge)
and the probe's periodic wrap stays as small as without refinement (the run records the
wrapped share of the probe's intensity). The offsets move from epoch `position_start_epoch`
on (their own Adam group, rate `position_lr` under the same schedule); after every step their
mean over the training positions is removed (a global shift is an object shift: unobservable)
and each axis is clamped to `position_bound_px`. Held-out validation positions keep their
measured positions. The result carries them as `refined_positions` (scan, axis), one row per
store position in the store's unit; the run's attrs keep the offsets in px.

Measured intensities are divided by their global maximum (so beta has one meaning across
datasets); the probe's learnable scale absorbs the detector's count scale. Representations
(model.object = siren | hashgrid | pixels, model.probe = hashgrid | pixels) come from
ptyinr.models; how the step runs (device, tiles, frame chunks, streamed frames, precision,
ranks) comes from the runtime the launcher resolved.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch

from ptyinr import events
from ptyinr.batching import epoch_batches
from ptyinr.config import TrainConfig
from ptyinr.engines.base import Engine
from ptyinr.errors import InputError
from ptyinr.models.fields import ObjectField, ProbeField, build_object_field, build_probe_field
from ptyinr.physics import far_field_intensity, fourier_shift
from ptyinr.runtime.tiles import NO_GRAD_CHUNK, sample_object, spread_subset, thin

SCALE_LR = 1e-3  # learning rate of the probe's global log-scale (one scalar)


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


class PtyINREngine(Engine):
    """Object and probe fields, Adam, and the forward model on the runtime's device."""

    name = "ptyinr"
    data_parallel = True
    pixel_validation = True

    def setup(self) -> None:
        """Everything this method builds before its first epoch."""
        config, geometry, runtime, known_probe = (
            self.config,
            self.geometry,
            self.runtime,
            self.known_probe,
        )
        train = config.train
        torch.manual_seed(train.seed)
        self.parallel = runtime.parallel
        self.measured = self.measurements()
        self.top_left = torch.as_tensor(geometry.top_left, device=self.device)
        self.subpixel = torch.as_tensor(geometry.subpixel, dtype=torch.float32, device=self.device)
        self.use_subpixel = bool(np.abs(geometry.subpixel).max(initial=0.0) > 1e-6)
        # learned offsets from the measured positions (px), zero and frozen unless refined
        self.refine_positions = bool(train.refine_positions)
        self.position_offset = torch.nn.Parameter(
            torch.zeros((geometry.n_positions, 2), dtype=torch.float32, device=self.device),
            requires_grad=False,
        )
        # whole pixels each window moved from its measured corner as the offsets grew
        self._moved = torch.zeros_like(self.subpixel)
        self._measured_top_left = self.top_left.clone()
        self.use_subpixel = self.use_subpixel or self.refine_positions
        # schedules run over the training positions (all of them unless some are held out)
        self.batch_size = train.batch_size_for(len(self.training_positions))
        self._centres = geometry.window_centres_on_grid()[self.training_positions]
        self.probe_start = self.choose_probe_start(self.measured)
        initial_probe = self.probe_start.probe
        self.object: ObjectField
        self.probe: ProbeField
        self.object, self.probe = self.build_fields(known_probe, initial_probe)
        if self.probe.kind == "hashgrid" and initial_probe is not None:
            error = self.probe.fit_to(
                initial_probe,
                steps=config.model.probe_init_steps,
                # a bar where someone watches this process; inside a graph task the driver's
                # display shows it instead (ptyinr.events)
                progress=sys.stderr.isatty() and runtime.is_root and events.current() is None,
                callback=events.probe_fit_callback() if runtime.is_root else None,
            )
            self.probe_start.record["warm_start_error"] = float(error)
        self._initialise_probe_scale()
        self.optimizer, self._parameters = self._optimizer()
        n = len(self.training_positions)
        self.steps_per_epoch = 1 if self.batch_size <= 0 else math.ceil(n / self.batch_size)
        self.autocast_dtype = runtime.prepare_object_field(self.object)
        if self.parallel is not None:
            self.parallel.broadcast_parameters(self.object, self.probe)
        self._full_batch_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._full_union: torch.Tensor | None = None
        self._training_index: torch.Tensor | None = None

    def build_fields(
        self, known_probe: np.ndarray | None, initial_probe: np.ndarray | None
    ) -> tuple[ObjectField, ProbeField]:
        """The object and probe representations model.object / model.probe name."""
        model = self.config.model
        obj = build_object_field(self.geometry.object_shape, model).to(self.device)
        probe = build_probe_field(
            self.data.frame_shape, model, known_probe=known_probe, initial_probe=initial_probe
        ).to(self.device)
        return obj, probe

    def _optimizer(self) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
        """Adam over object, probe shape and the probe's global log-scale (own rates)."""
        train = self.config.train
        object_params = list(self.object.parameters())
        probe_params = [p for n, p in self.probe.named_parameters() if n != "log_scale"]
        groups: list[dict[str, Any]] = [
            {"params": object_params, "lr": train.lr_object},
            {"params": [self.probe.log_scale], "lr": SCALE_LR},
        ]
        if probe_params:
            groups.append({"params": probe_params, "lr": train.lr_probe})
        if self.refine_positions:
            groups.append({"params": [self.position_offset], "lr": train.position_lr})
        for group in groups:
            group["base_lr"] = group["lr"]
        return torch.optim.Adam(groups), [p for group in groups for p in group["params"]]

    # -- forward model -------------------------------------------------------------------------

    def _window_indices(self, batch: torch.Tensor) -> torch.Tensor:
        """Flat object-pixel index of every window pixel of the batch, (B, Ny, Nx)."""
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
        indices = self._window_indices(batch)
        if full and self.refine_positions:  # recomputed whenever a window moves: no sort
            unique, inverse = unique_on_grid(indices, math.prod(self.geometry.object_shape))
        else:
            unique, inverse = torch.unique(indices, return_inverse=True)
        if full:
            self._full_batch_cache = (unique, inverse)
        return unique, inverse

    def _sample_object(self, pixels: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        return sample_object(
            self.object, pixels, runtime.tile_pixels, self.autocast_dtype, runtime.chunk_pixels
        )

    def _probes(self, probe: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """The batch's probes, each shifted by its window's sub-pixel fraction (plus its
        learned offset when positions are refined)."""
        if self.refine_positions:
            shifts = self.subpixel[batch] + self.position_offset[batch] - self._moved[batch]
            return fourier_shift(probe, shifts)
        if self.use_subpixel:
            return fourier_shift(probe, self.subpixel[batch])
        return probe[None]

    def predict(self, batch: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted intensities (B, Ny, Nx) and the mean normalised probe amplitude."""
        unique, inverse = self._pixels_of(batch, full)
        patches = self._sample_object(unique)[inverse]
        probe, mean_amplitude = self.probe()
        return far_field_intensity(self._probes(probe, batch) * patches), mean_amplitude

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

    def _regularising(self) -> bool:
        """Whether this step adds the probe regulariser (on one rank only)."""
        train = self.config.train
        return (
            self.probe.kind != "fixed"
            and self.step <= train.probe_reg_steps
            and self.runtime.is_root
        )

    def _chunked_backward(
        self, batch: torch.Tensor, batch_indices: np.ndarray, full: bool, weight: float
    ) -> torch.Tensor:
        """One step's data loss and gradients with the forward model in chunks of frames
        (runtime.frame_chunk), for batches whose forward model does not fit at once.

        The object networks run once on the batch's pixel union and the probe networks once;
        their outputs enter the chunks as detached leaves, each chunk's loss backpropagates
        into the leaves, and the leaves' gradients then flow through the networks in one
        backward pass: the same gradients as one graph over the whole batch, with the memory
        of one chunk. Returns the (detached) data loss, scaled by `weight`."""
        train = self.config.train
        chunk = self.runtime.frame_chunk
        union = self._union_of(batch, chunk, full)
        values = self._sample_object(union)
        object_leaf = values.detach().requires_grad_(True)
        probe, mean_probe_amplitude = self.probe()
        probe_leaf = probe.detach().requires_grad_(probe.requires_grad)
        measured = self.measured.amplitude(batch, batch_indices)
        n = len(batch)
        total = torch.zeros((), device=self.device)
        for start in range(0, n, chunk):
            part = batch[start : start + chunk]
            inverse = torch.searchsorted(union, self._window_indices(part))
            predicted = far_field_intensity(self._probes(probe_leaf, part) * object_leaf[inverse])
            loss = self.loss_fn(
                predicted, measured[start : start + chunk], train.loss_beta, self.measured.valid
            ) * (weight * len(part) / n)
            loss.backward()
            total += loss.detach()
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        for output, leaf in ((values, object_leaf), (probe, probe_leaf)):
            if output.requires_grad and leaf.grad is not None:
                outputs.append(output)
                grads.append(leaf.grad)
        if self._regularising():
            outputs.append(train.probe_reg_lambda * mean_probe_amplitude)
            grads.append(None)
        if outputs:
            torch.autograd.backward(outputs, grads)
        return total

    @torch.no_grad()
    def _initialise_probe_scale(self) -> None:
        """Start with predicted frame energy equal to measured (object amplitude ~ 1)."""
        measured_energy = self.measured.mean_energy
        probe_energy = float(self.probe.normalised().abs().square().sum())
        positions = spread_subset(self.geometry.n_positions, self.geometry.window_shape)
        sample = thin(torch.unique(self._window_indices(torch.as_tensor(positions))))
        tile = self.runtime.tile_pixels or NO_GRAD_CHUNK
        object_power = float(sample_object(self.object, sample, tile).abs().square().mean())
        ratio = measured_energy / max(probe_energy * object_power, 1e-30)
        self.probe.log_scale.fill_(0.5 * math.log(max(ratio, 1e-30)))

    # -- optimisation --------------------------------------------------------------------------

    def train_step(self, batch_indices: np.ndarray, full: bool) -> float:
        """One optimiser step on a (global) batch of positions; returns its data loss."""
        train = self.config.train
        share = 1.0
        if self.parallel is not None:  # this rank's part of the global batch
            batch_indices, share = self.parallel.shard(batch_indices)
        batch = torch.as_tensor(batch_indices, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        moving = self._positions_moving()
        self.position_offset.requires_grad_(moving)
        if self.parallel is not None and len(batch_indices) == 0:
            # a short last batch left this rank nothing (rank 0 always has positions)
            loss = data_loss = torch.zeros((), device=self.device)
        elif 0 < self.runtime.frame_chunk < len(batch_indices):
            # gradients are accumulated chunk by chunk; the returned loss carries no graph
            loss = data_loss = self._chunked_backward(batch, batch_indices, full, share)
        else:
            predicted, mean_probe_amplitude = self.predict(batch, full)
            data_loss = self.loss_fn(
                predicted,
                self.measured.amplitude(batch, batch_indices),
                train.loss_beta,
                self.measured.valid,
            )
            if self.parallel is not None:  # local mean -> its share of the global mean
                data_loss = data_loss * share
            loss = data_loss
            if self._regularising():
                loss = loss + train.probe_reg_lambda * mean_probe_amplitude
        if self.parallel is None:
            value = float(data_loss.detach())
            self.check_finite(value)
        if loss.requires_grad:
            loss.backward()
        if self.parallel is not None:  # sum gradients and loss over ranks
            value = self.parallel.all_reduce(self._parameters, data_loss)
            self.check_finite(value)
            if not moving:  # frozen offsets get no (zero) gradient: Adam leaves them untouched
                self.position_offset.grad = None
        factor = learning_rate_factor(train, self.step, train.epochs * self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.step()
        if moving:
            self._constrain_offsets()
        return value

    def _positions_moving(self) -> bool:
        """Whether this step learns the position offsets (refining, start epoch reached)."""
        return self.refine_positions and self.epoch >= self.config.train.position_start_epoch

    @torch.no_grad()
    def _constrain_offsets(self) -> None:
        """Remove the offsets' mean over the training positions (a global shift of all
        positions is a shift of the object, which the data cannot see), clamp each axis to
        the bound, and re-place the windows (`_place_windows`)."""
        offset = self.position_offset
        if self._training_index is None:
            self._training_index = torch.as_tensor(self.training_positions, device=self.device)
        trained = self._training_index
        offset[trained] = offset[trained] - offset[trained].mean(dim=0)
        bound = self.config.train.position_bound_px
        offset.clamp_(-bound, bound)
        self._place_windows()

    @torch.no_grad()
    def _place_windows(self) -> None:
        """Each window at the whole pixel nearest its refined position, inside the object
        grid; the probe's shift keeps the rest. Cached pixel unions are dropped when a
        window moved."""
        measured = self._measured_top_left
        low = -measured
        high = (
            torch.as_tensor(self.geometry.object_shape, device=self.device)
            - torch.as_tensor(self.geometry.window_shape, device=self.device)
            - measured
        )
        moved = torch.round(self.subpixel + self.position_offset).to(torch.int64)
        moved = torch.minimum(torch.maximum(moved, low), high)
        top_left = measured + moved
        if not torch.equal(top_left, self.top_left):
            self.top_left = top_left
            self._moved = moved.to(torch.float32)
            self._full_batch_cache = None
            self._full_union = None

    def run_epoch(self) -> float:
        train = self.config.train
        full = self.batch_size <= 0
        losses, weights = [], []
        training = self.training_positions
        schedule = [
            training[batch]
            for batch in epoch_batches(
                self._centres, self.batch_size, train.batches, train.seed, self.epoch
            )
        ]
        if self.measured.stream is not None:  # read the epoch's frames ahead
            self.measured.expect(
                [b if self.parallel is None else self.parallel.shard(b)[0] for b in schedule]
            )
        for batch in schedule:
            losses.append(self.train_step(batch, full))
            weights.append(len(batch))
        return float(np.average(losses, weights=weights))

    @torch.no_grad()
    def validation_loss(self, positions: np.ndarray) -> float:
        """The data loss at held-out positions, in chunks of the step's size (no gradients),
        on the held-out detector pixels where validation_on = "pixels" (validation_valid)."""
        train = self.config.train
        chunk = self.runtime.frame_chunk or max(self.batch_size, 64)
        total, count = 0.0, 0
        for start in range(0, len(positions), chunk):
            part = np.asarray(positions[start : start + chunk])
            batch = torch.as_tensor(part, device=self.device)
            predicted, _ = self.predict(batch)
            measured = self.measured.amplitude(batch, part)
            value = self.loss_fn(
                predicted, measured, train.loss_beta, self.measured.validation_valid
            )
            total += float(value) * len(part)
            count += len(part)
        return total / max(count, 1)

    # -- state and results ---------------------------------------------------------------------

    def engine_state(self) -> dict[str, Any]:
        state = {
            "object": self.object.state_dict(),
            "probe": self.probe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.refine_positions:
            state["position_offset"] = self.position_offset.detach()
        return state

    def load_engine_state(self, state: dict[str, Any]) -> None:
        saved = state.get("position_offset")
        if (saved is not None) != self.refine_positions:
            raise InputError(
                "checkpoint: written with train.refine_positions = "
                f"{str(saved is not None).lower()}, this run has "
                f"{str(self.refine_positions).lower()}; delete the checkpoint or use the same "
                "setting"
            )
        if saved is not None and tuple(saved.shape) != tuple(self.position_offset.shape):
            raise InputError(
                f"checkpoint: position offsets of shape {tuple(saved.shape)}, this run has "
                f"{tuple(self.position_offset.shape)} positions"
            )
        self.object.load_state_dict(state["object"])
        self.probe.load_state_dict(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])
        if saved is not None:
            with torch.no_grad():
                self.position_offset.copy_(saved)
            self._place_windows()

    @torch.no_grad()
    def current_object(self) -> np.ndarray:
        return self.object.full().cpu().numpy().astype(np.complex64)

    @torch.no_grad()
    def current_probe(self) -> np.ndarray:
        return self.probe()[0].cpu().numpy().astype(np.complex64)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "intensity_scale": self.measured.scale,
            "batch_size": int(self.batch_size),
            "probe_start": self.probe_start.record,
        }
        if self.refine_positions:
            out.update(self.position_record())
        return out

    @torch.no_grad()
    def refined_positions_px(self) -> np.ndarray | None:
        """Measured + learned offset, one row per store position (positions this data does
        not hold, e.g. the other FRC half's, keep their measured value; held-out ones have a
        zero offset); None without train.refine_positions."""
        if not self.refine_positions:
            return None
        offsets = self.position_offset.detach().cpu().numpy().astype(np.float64)
        return self.data.on_store_rows(np.asarray(self.data.positions_px, np.float64) + offsets)

    @torch.no_grad()
    def position_record(self) -> dict[str, Any]:
        """Position refinement for the run's attrs: a summary (`position_refinement`) and the
        offsets (`position_offsets_px`, (n, 2) [dy, dx] in object pixels, one row per position
        this fit used (`positions_used` where it used a subset), to add to the measured
        positions: refined = positions + offset x pixel size). The refined positions
        themselves are the result's `refined_positions` variable (`refined_positions_px`)."""
        train = self.config.train
        offsets = self.position_offset.detach().cpu().numpy().astype(np.float64)
        length = np.hypot(offsets[:, 0], offsets[:, 1])
        bound = train.position_bound_px
        moved = self._moved.cpu().numpy().astype(np.float64)
        shifts = np.abs(self.geometry.subpixel + offsets - moved).max(axis=0, initial=0.0)
        summary = {
            "learning_rate": train.position_lr,
            "start_epoch": train.position_start_epoch,
            "bound_px": bound,
            "mean_offset_px": float(length.mean()) if len(length) else 0.0,
            "rms_offset_px": float(np.sqrt(np.mean(length**2))) if len(length) else 0.0,
            "max_offset_px": float(length.max(initial=0.0)),
            "at_bound": int((np.abs(offsets) >= bound - 1e-6).any(axis=1).sum()),
            "windows_moved": int((moved != 0).any(axis=1).sum()),
            "wrapped_probe_intensity": wrapped_share(self.current_probe(), shifts),
        }
        return {
            "position_refinement": summary,
            "position_offsets_px": np.round(offsets, 4).tolist(),
        }


def unique_on_grid(indices: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(indices, return_inverse=True) for indices into a grid of `size` pixels,
    through a mask of the grid instead of a sort (for full batches, whose windows cover most
    of the grid anyway)."""
    mask = torch.zeros(size, dtype=torch.bool, device=indices.device)
    mask[indices.reshape(-1)] = True
    rank = torch.cumsum(mask, 0) - 1
    return torch.nonzero(mask).squeeze(1), rank[indices]


def wrapped_share(probe: np.ndarray, shifts: np.ndarray) -> float:
    """Share of the probe's intensity within `shifts` (y, x) px of its window's edges: what a
    Fourier shift by that much wraps around to the opposite side (~0 where the periodic
    shift is the physical one)."""
    intensity = np.abs(probe) ** 2
    total = float(intensity.sum())
    if total <= 0:
        return 0.0
    by, bx = (math.ceil(s) for s in shifts)
    inner = intensity[by : intensity.shape[0] - by, bx : intensity.shape[1] - bx]
    return float(1.0 - inner.sum() / total)
