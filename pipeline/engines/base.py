"""The engine protocol: what every reconstruction method provides, and the loop they share.

An engine is built by the launcher (ptyinr.launch) with everything decided: the scan's data,
its geometry (object grid and windows), the frozen configuration and the resolved runtime
(device, memory choices, precision, ranks). `fit` runs the remaining epochs and returns a
`Reconstruction`. Subclasses implement one epoch (`run_epoch`), the current object and probe
(`current_object`, `current_probe`) and their resumable state (`engine_state`,
`load_engine_state`); the epoch loop, progress, checkpoints and the labelled result are here,
the same for every method, and so are the data term (`train.loss`, chosen once, "auto" from a
sample of the frames: ptyinr.losses; recorded as `data_term`), held-out validation (keep the
best state, stop early) and `train.refit` (fit again on all positions for the chosen number of
epochs). Validation holds out positions, or (`train.validation_on = "pixels"`, for methods
with `pixel_validation`) detector pixels: the same share of every frame, taken out of the
training mask (`Measurements.valid`) of all positions, all of which then train; the held-out
loss is the data term on those pixels (`Measurements.validation_valid`) at every position.
On sparse scans a held-out position's object is seen by no other position, so its loss
rises from the start for a pixel grid; held-out pixels do not have that problem
(benchmarks/bench_validation.py --sparse).

Checkpoints are Zarr groups of tensors plus a JSON record (ptyinr.engines.checkpoint): loading
one never runs code. One that is not ours or is truncated is reported in one line and the run
starts over (recorded in the result's `checkpoint_discarded`); one of another method or
configuration is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ptyinr import events
from ptyinr.batching import validation_pixels, validation_split
from ptyinr.config import ReconstructionConfig
from ptyinr.engines import checkpoint
from ptyinr.errors import ConfigError, InputError, ReconstructionFailed
from ptyinr.losses import choose_loss, get_loss
from ptyinr.physics import ScanGeometry
from ptyinr.probe_guess import ProbeStart, TrialData, choose_probe_start, compact_patch
from ptyinr.runtime import Runtime
from ptyinr.runtime.frames import Measurements
from ptyinr.scandata import Reconstruction, ScanData, StoreFrames, labelled_result
from ptyinr.version import __version__


class Engine(ABC):
    """One reconstruction method. Class attributes say what the launcher may ask of it."""

    #: the name `model.method` selects it by (ptyinr.engines.ENGINES)
    name: ClassVar[str]
    #: whether it trains data-parallel (ranks sharing batches through runtime.parallel)
    data_parallel: ClassVar[bool] = False
    #: config sections a checkpoint must agree on to be resumed (what the state depends on)
    checkpoint_sections: ClassVar[tuple[str, ...]] = ("model", "data")
    #: whether its training and `validation_loss` honour `Measurements.validation_valid`
    #: (train.validation_on = "pixels")
    pixel_validation: ClassVar[bool] = False

    def __init__(
        self,
        data: ScanData,
        config: ReconstructionConfig,
        geometry: ScanGeometry,
        runtime: Runtime,
        *,
        known_probe: np.ndarray | None = None,
        probe_start: ProbeStart | None = None,
    ) -> None:
        if known_probe is not None and tuple(known_probe.shape) != data.frame_shape:
            raise InputError(
                f"known probe: shape {tuple(known_probe.shape)}, expected {data.frame_shape} "
                "(the diffraction frame shape)"
            )
        self.check_ranks(runtime.world_size)
        self.data = data
        self.config = config
        self.geometry = geometry
        self.runtime = runtime
        self.device = runtime.device
        self.known_probe = known_probe
        self._given_probe_start = probe_start  # a refit reuses the first fit's (same data)
        self.step = 0
        self.epoch = 0
        self.loss_history: list[float] = []
        self.seconds = 0.0
        self._measured: Measurements | None = None
        self.checkpoint_discarded: str | None = None  # why a checkpoint was not resumed
        # positions the engine trains on, and those held out to choose the state it returns;
        # or (validation_on = "pixels") detector pixels held out of every position's frame
        self.held_out_pixels = self.pixel_split(data, config)
        if self.held_out_pixels is not None:
            everything = np.arange(data.n_positions)
            self.training_positions, self.validation_positions = everything, everything
        else:
            self.training_positions, self.validation_positions = validation_split(
                data.positions_px, config.train.validation_fraction, config.train.seed
            )
        self.validation = Validation()
        # the data term every method trains on and reports, chosen once (train.loss)
        self.loss_choice = choose_loss(config.train.loss, lambda: sample_frames(data))
        self.loss_fn = get_loss(self.loss_choice.name)
        self.setup()

    @classmethod
    def check_ranks(cls, world_size: int) -> None:
        """InputError when `world_size` ranks are asked of an engine that has no
        data-parallel training."""
        if world_size > 1 and not cls.data_parallel:
            raise InputError(
                f"model.method = {cls.name!r} does not train data-parallel; "
                "drop --gpus/--processes (or choose model.method = ptyinr or pixels)"
            )

    @classmethod
    def resolve_config(cls, config: ReconstructionConfig) -> ReconstructionConfig:
        """The configuration as this engine runs it (e.g. pinning its representations), so
        the plan, the record and the checkpoint see what really runs. Default: unchanged."""
        return config

    @classmethod
    def pixel_split(cls, data: ScanData, config: ReconstructionConfig) -> np.ndarray | None:
        """The detector pixels train.validation_on = "pixels" holds out (None otherwise):
        ConfigError for a method that cannot, or when no usable pixel would be left."""
        train = config.train
        if train.validation_on != "pixels" or train.validation_fraction <= 0:
            return None
        if not cls.pixel_validation:
            raise ConfigError(
                f"train.validation_on = 'pixels': model.method = {cls.name!r} holds out "
                "positions only; use validation_on = 'positions' or model.method = ptyinr, "
                "pixels or epie"
            )
        held = validation_pixels(
            data.frame_shape,
            train.validation_fraction,
            train.seed,
            data.bad_pixels,
            train.validation_block,
        )
        bad = data.bad_pixels
        usable = held.size if bad is None else int((~np.asarray(bad, bool)).sum())
        if not held.any() or int(held.sum()) >= usable:
            raise ConfigError(
                f"train.validation_fraction = {train.validation_fraction} with validation_on "
                f"= 'pixels' holds out {int(held.sum())} of the {usable} usable detector "
                "pixels; expected some held out and some left to train on"
            )
        return held

    # -- what each method provides ------------------------------------------------------------

    @abstractmethod
    def setup(self) -> None:
        """Build the method's state (measurements, probe start, object, optimiser, ...) from
        `self.data`, `self.config`, `self.geometry`, `self.runtime`, `self.known_probe`;
        called once at the end of the shared constructor."""

    @abstractmethod
    def run_epoch(self) -> float:
        """One pass over the positions; returns the epoch's mean data loss."""

    @abstractmethod
    def current_object(self) -> np.ndarray:
        """The object on the geometry's grid, complex64 (H, W)."""

    @abstractmethod
    def current_probe(self) -> np.ndarray:
        """The probe (unshifted, as a window sees it at whole-pixel positions), complex64."""

    @abstractmethod
    def engine_state(self) -> dict[str, Any]:
        """The method's resumable state: tensors, numbers, strings, lists and dicts of them."""

    @abstractmethod
    def load_engine_state(self, state: dict[str, Any]) -> None:
        """Restore what `engine_state` returned."""

    @abstractmethod
    def validation_loss(self, positions: np.ndarray) -> float:
        """The data loss of the current state at `positions` (held out: never trained on)."""

    def info(self) -> dict[str, Any]:
        """Method-specific bookkeeping for the run's attrs."""
        return {}

    def refined_positions_px(self) -> np.ndarray | None:
        """(n_store, 2) (y, x) positions in object pixels after position refinement, one row
        per store position (`ScanData.on_store_rows`): the result's `refined_positions`.
        None (the default): the method does not refine positions."""
        return None

    # -- shared by all ------------------------------------------------------------------------

    def measurements(self) -> Measurements:
        """The scan's amplitudes on the device, resident or streamed as the runtime decided
        (closed when `fit` ends: a stream's read-ahead thread stops)."""
        self._measured = Measurements(
            self.data,
            self.device,
            stream=self.runtime.stream,
            pin_memory=self.runtime.pin_memory,
            parallel=self.runtime.parallel,
            held_out=self.held_out_pixels,
        )
        return self._measured

    def choose_probe_start(self, measured: Measurements) -> ProbeStart:
        """Where an unknown probe starts (model.probe_init: data, optics, file, random);
        ptyinr.probe_guess records how it was chosen."""
        if self.known_probe is not None:
            return ProbeStart(None, {"method": "known"})
        if self._given_probe_start is not None:
            # a copy: this engine records into its own start (a refit's must not overwrite
            # the first fit's record)
            given = self._given_probe_start
            return dataclasses.replace(given, record=dict(given.record))
        data = self.data

        def trial() -> TrialData:  # a compact patch of the scan for the trial fits
            patch = compact_patch(data.positions_px)
            geometry = ScanGeometry.from_positions(
                data.positions_px[patch],
                data.frame_shape,
                round_positions=self.config.train.positions == "round",
            )
            amplitudes = measured.amplitude(torch.as_tensor(patch, device=self.device), patch)
            return TrialData(amplitudes.float(), geometry, measured.valid)

        return choose_probe_start(
            self.config,
            data.frame_shape,
            lambda: measured.mean_pattern,
            trial,
            wavelength_m=data.wavelength_m,
            pixel_size_m=data.pixel_size,
            detector=(data.detector_distance_m, data.detector_pixel_size_m),
        )

    def check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise ReconstructionFailed(
                f"loss became {value} at step {self.step} (epoch {self.epoch + 1}) of "
                f"model.method = {self.name!r}; try lower learning rates or step sizes"
            )

    def train_epoch(self) -> float:
        """One epoch, counted, timed and recorded; its mean data loss."""
        started = time.perf_counter()
        value = self.run_epoch()
        self.epoch += 1
        self.seconds += time.perf_counter() - started
        self.loss_history.append(value)
        return value

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
        if checkpoint_path is not None and checkpoint.exists(checkpoint_path):
            try:
                self.load_checkpoint(checkpoint_path)
            except checkpoint.UnreadableCheckpoint as exc:  # start over, and say so
                self.checkpoint_discarded = str(exc)
                print(f"warning: {exc}; starting over", file=sys.stderr, flush=True)
        last_checkpoint_step = self.step
        bar = progress_bar(progress and self.runtime.is_root)
        try:
            with bar:
                task = bar.add_task(
                    description, total=train.epochs, completed=self.epoch, loss=math.nan
                )
                while self.epoch < train.epochs:
                    value = self.train_epoch()
                    bar.update(task, advance=1, loss=value)
                    if on_epoch is not None:
                        on_epoch(self.epoch, value)
                    if self.validate() and self.validation.exhausted(train.patience):
                        self.validation.stopped_early = True
                        break
                    due = (
                        train.checkpoint_every
                        and self.step - last_checkpoint_step >= train.checkpoint_every
                    )
                    if checkpoint_path is not None and due and self.epoch < train.epochs:
                        self.save_checkpoint(checkpoint_path)
                        last_checkpoint_step = self.step
        finally:
            if self._measured is not None:
                self._measured.close()
        if train.refit and len(self.validation_positions) and self.validation.best_epoch > 0:
            return self.refit(progress=progress, description=description)
        if train.keep_best and self.validation.best_state is not None:
            if self.validation.best_epoch != self.epoch:
                self.load_engine_state(self.validation.best_state)
                self.validation.restored_best = True
        return self.result()

    def refit(
        self, *, progress: bool = True, description: str = "reconstructing"
    ) -> Reconstruction:
        """train.refit: a fresh engine of this method fitted from the start on all positions
        for the validation-chosen number of epochs E (its learning-rate schedule spans those E
        epochs, as the validated run's did not: that run was planned for train.epochs).
        From the start rather than on from the chosen state: the chosen state's optimiser has
        already decayed its rates and seen the held-out frames never, and a continuation
        would need its own, unvalidated length (benchmarks/RESULTS.md, "Refit on all"). The
        result is the refit's object and probe, with this run's loss curve and validation
        record (they match the held-out curve on the loss figure) and the refit's in
        `refit`. The refit writes no checkpoints and calls no on_epoch hook (its epochs are
        not this fit's); on the root rank it reports through the current ptyinr.events reporter
        (a `refit` event, then its warm start and epochs in the phase "refit"). After
        validation_on = "pixels" it fits every pixel, and chooses its probe start again (the
        first one never saw the held-out pixels)."""
        chosen = self.validation.best_epoch
        reporter = events.current() if self.runtime.is_root else None
        phase = None if reporter is None else reporter.refit(chosen, int(self.epoch))
        with events.reporting(phase) if phase is not None else contextlib.nullcontext():
            return self._refit(chosen, phase, progress=progress, description=description)

    def _refit(
        self,
        chosen: int,
        phase: events.Reporter | None,
        *,
        progress: bool,
        description: str,
    ) -> Reconstruction:
        train = self.config.train.model_copy(
            update={"epochs": chosen, "validation_fraction": 0.0, "refit": False}
        )
        config = self.config.model_copy(update={"train": train})
        again = type(self)(
            self.data,
            config,
            self.geometry,
            self.runtime,
            known_probe=self.known_probe,
            # the same start, unless held-out pixels were hidden from it
            probe_start=getattr(self, "probe_start", None)
            if self.held_out_pixels is None
            else None,
        )
        if phase is not None:
            phase.fit_started()
        refitted = again.fit(
            progress=progress,
            description=f"{description} (refit on all)",
            on_epoch=None if phase is None else phase.epoch,
        )
        info = dict(refitted.info)
        info.update(
            epochs=int(self.epoch),
            steps=int(self.step + again.step),
            train_seconds=float(self.seconds + again.seconds),
            final_loss=float(self.loss_history[-1]) if self.loss_history else math.nan,
            validation={
                **self.validation_record(),
                "returned": "refit",
            },
            refit={
                "epochs": int(chosen),
                "from": "start",
                "positions": int(self.data.n_positions),
                "loss": [float(v) for v in again.loss_history],
                "final_loss": float(again.loss_history[-1]),
                "train_seconds": float(again.seconds),
            },
        )
        return labelled_result(
            refitted.object.values,
            refitted.probe.values,
            self.loss_history,
            self.geometry,
            self.data.pixel_size,
            info,
            refined_positions_px=again.refined_positions_px(),  # those the object goes with
        )

    def validate(self) -> bool:
        """Measure the held-out loss when it is due (every `validate_every` epochs and at the
        last epoch); keep a copy of the best state. Whether a measurement was made."""
        train = self.config.train
        due = self.epoch % train.validate_every == 0 or self.epoch >= train.epochs
        if len(self.validation_positions) == 0 or not due:
            return False
        value = self.validation_loss(self.validation_positions)
        best = self.validation.record(self.epoch, value)
        if best and train.keep_best:
            self.validation.best_state = _copy_to_cpu(self.engine_state())
        return True

    def validation_record(self) -> dict[str, Any]:
        """The run's `validation` record: what was held out (`on`: positions or detector
        pixels, and how many) and the held-out loss over the epochs."""
        record = self.validation.record_for_attrs(len(self.validation_positions))
        if self.held_out_pixels is None:
            return {"on": "positions", **record}
        return {
            "on": "pixels",
            **record,
            "pixels": int(self.held_out_pixels.sum()),
            "block": int(self.config.train.validation_block),
        }

    def save_checkpoint(self, path: Path) -> None:
        """State and counters (ptyinr.engines.checkpoint), written whole by the root rank."""
        if not self.runtime.is_root:
            return  # ranks hold identical state
        checkpoint.save_state(
            path,
            {
                "engine": self.name,
                "step": self.step,
                "epoch": self.epoch,
                "seconds": self.seconds,
                "loss_history": [float(v) for v in self.loss_history],
                "config": self.config.model_dump(),
                "state": self.engine_state(),
                "validation": self.validation.to_state(),
            },
        )

    def load_checkpoint(self, path: Path) -> None:
        """Resume from a checkpoint of the same method and configuration: InputError naming
        the file otherwise (UnreadableCheckpoint when it is not a ptyinr checkpoint)."""
        state = checkpoint.load_state(path, self.device)
        if not {"engine", "state", "step", "epoch", "config"} <= set(state):
            raise checkpoint.UnreadableCheckpoint(
                f"checkpoint {str(path)!r}: not a ptyinr engine checkpoint"
            )
        if state["engine"] != self.name:
            raise InputError(
                f"checkpoint {str(path)!r}: written by model.method = {state['engine']!r}, "
                f"this run is {self.name!r}; delete the checkpoint or use the same method"
            )
        saved = dict(state["config"])
        current = self.config.model_dump()
        for section in self.checkpoint_sections:
            if saved.get(section) != current.get(section):
                raise InputError(
                    f"checkpoint {str(path)!r}: [{section}] differs from this run's config; "
                    "delete the checkpoint or use the same configuration"
                )
        self.load_engine_state(state["state"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.loss_history = [float(v) for v in state["loss_history"]]
        self.seconds = float(state["seconds"])
        self.validation = Validation.from_state(state.get("validation"))

    @torch.no_grad()
    def result(self) -> Reconstruction:
        """The labelled object, probe and loss curve, with the run's bookkeeping."""
        info = {
            "method": self.name,
            "epochs": int(self.epoch),
            "steps": int(self.step),
            "train_seconds": float(self.seconds),
            "seconds_per_epoch": float(self.seconds / max(self.epoch, 1)),
            "final_loss": float(self.loss_history[-1]) if self.loss_history else math.nan,
            "known_probe": self.known_probe is not None,
            "data_term": self.loss_choice.record(),
            **self.runtime.record(),
            **self.info(),
            **({"validation": self.validation_record()} if len(self.validation_positions) else {}),
            **(
                {"checkpoint_discarded": self.checkpoint_discarded}
                if self.checkpoint_discarded
                else {}
            ),
            "versions": {"ptyinr": __version__, "torch": torch.__version__},
        }
        return labelled_result(
            self.current_object(),
            self.current_probe(),
            self.loss_history,
            self.geometry,
            self.data.pixel_size,
            info,
            refined_positions_px=self.refined_positions_px(),
        )


def with_pixel_fields(config: ReconstructionConfig) -> ReconstructionConfig:
    """`config` with pixel-array object and probe: what the pixel-grid engines run (the
    memory plan, the record and checkpoints then describe them)."""
    model = config.model.model_copy(update={"object": "pixels", "probe": "pixels"})
    return config.model_copy(update={"model": model})


class Validation:
    """The held-out loss over the epochs, and the best state seen (for keep_best)."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.losses: list[float] = []
        self.best_epoch = 0
        self.best_loss = math.inf
        self.best_state: dict[str, Any] | None = None
        self.since_best = 0
        self.stopped_early = False
        self.restored_best = False

    def record(self, epoch: int, value: float) -> bool:
        """Add a measurement; whether it is the best so far."""
        self.epochs.append(int(epoch))
        self.losses.append(float(value))
        if math.isfinite(value) and value < self.best_loss:
            self.best_epoch, self.best_loss, self.since_best = int(epoch), float(value), 0
            return True
        self.since_best += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """Whether `patience` validations in a row brought no improvement (0: never)."""
        return patience > 0 and self.since_best >= patience

    def record_for_attrs(self, positions: int) -> dict[str, Any]:
        return {
            "positions": positions,
            "epochs": list(self.epochs),
            "loss": list(self.losses),
            "best_epoch": self.best_epoch,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "stopped_early": self.stopped_early,
            "returned": "best" if self.restored_best else "last",
        }

    def to_state(self) -> dict[str, Any]:
        return {
            "epochs": list(self.epochs),
            "losses": list(self.losses),
            "best_epoch": self.best_epoch,
            "best_loss": self.best_loss,
            "since_best": self.since_best,
            "best_state": self.best_state,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Validation:
        out = cls()
        if state:
            out.epochs = [int(e) for e in state["epochs"]]
            out.losses = [float(v) for v in state["losses"]]
            out.best_epoch = int(state["best_epoch"])
            out.best_loss = float(state["best_loss"])
            out.since_best = int(state["since_best"])
            out.best_state = state.get("best_state")
        return out


def _copy_to_cpu(state: Any) -> Any:
    """A deep copy of an engine state with its tensors on the CPU (the best state must not
    follow the live parameters, nor hold device memory)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _copy_to_cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_copy_to_cpu(v) for v in state)
    return state


#: frames `sample_frames` reads to choose train.loss = "auto"
SAMPLE_FRAMES = 16


def sample_frames(data: ScanData, count: int = SAMPLE_FRAMES) -> np.ndarray:
    """Up to `count` frames spread over the scan, in their stored dtype (integers stay
    integers) where the source keeps one, with the bad pixels dropped: (frames, pixels)."""
    frames = data.intensities
    n = int(frames.shape[0])
    rows = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    if isinstance(frames, StoreFrames):  # the raw zarr array, not read()'s float32
        stored = rows if frames.index is None else frames.index[rows]
        block = frames.array.get_orthogonal_selection((np.unique(stored),))
    else:
        block = frames[rows]
        if hasattr(block, "compute"):
            block = block.compute(scheduler="sync")
    block = np.asarray(block).reshape(np.shape(block)[0], -1)
    if data.bad_pixels is not None:
        block = block[:, ~np.asarray(data.bad_pixels, bool).ravel()]
    return block


def checkpoint_epoch(path: Path) -> int:
    """Epoch a checkpoint reached (0 when there is none or it cannot be read)."""
    if not checkpoint.exists(path):
        return 0
    try:
        return int(checkpoint.read_counters(path).get("epoch", 0))
    except (InputError, TypeError, ValueError):
        return 0


def progress_bar(enabled: bool) -> Progress | contextlib.AbstractContextManager:
    """Epoch, loss and time left, or nothing."""
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
    """The bits of rich.Progress the loop calls, doing nothing."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None
