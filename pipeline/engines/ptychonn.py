"""Previews with PtychoNN: a trained network predicts the object under every window, and the
patches are stitched into one object (`model.method = "ptychonn"`,
`model.ptychonn_model = MODEL`, a folder written by `ptyinr nn train`).

One "epoch" (train.epochs is pinned to 1) predicts every position's patch from its frame,
in batches (`Measurements`: resident or streamed like any engine's frames; the network input
is the frame's sqrt counts, masked, scaled by the scan's own bright-field level,
ptyinr.models.ptychonn), and stitches them on the geometry's object grid, each pixel the
average of the patches over it weighted by the cube of the source run's probe intensity
(ptyinr.ptychonn_data.stitch_weights: a patch is trusted where its beam is strong). Windows
sit at whole pixels; the sub-pixel remainder is ignored for stitching (it is honoured in the
data loss).

The probe is the model's: copied from its source run, scaled by one factor so that the
predicted frame energy matches the measured one over the positions (the object absorbs no
count scale). The epoch's loss, and `validation_loss` at held-out positions, are the data loss
(`train.loss`) of that probe and the stitched object, as every engine reports it, so curves
and FRC compare. The model is checked against the scan (frame shape, pixel size, energy)
before anything is computed: a mismatch is one InputError naming the model and the value.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptyinr import store
from ptyinr.config import ReconstructionConfig
from ptyinr.engines.base import Engine, with_pixel_fields
from ptyinr.errors import ConfigError
from ptyinr.models.ptychonn import (
    check_compatible,
    input_scale,
    load_artifact,
    network_input,
    read_record,
    wavelength_to_energy_ev,
)
from ptyinr.physics import forward_intensity
from ptyinr.ptychonn_data import stitch_accumulate, stitch_finish, stitch_weights
from ptyinr.ptychonn_inference import bf16_supported, for_inference

#: positions per batch of inference and of the data loss
BLOCK = 256


class PtychoNNEngine(Engine):
    """A trained PtychoNN's patches, stitched (see the module docstring)."""

    name = "ptychonn"
    data_parallel = False
    checkpoint_sections = ("model", "data")

    @classmethod
    def resolve_config(cls, config: ReconstructionConfig) -> ReconstructionConfig:
        """One pass (train.epochs = 1), pixel arrays for the record and the memory plan, the
        model path made absolute and its record checked (one line when missing/corrupt)."""
        config = with_pixel_fields(config)
        path = config.model.ptychonn_model
        if not path:
            raise ConfigError(
                "model.method = 'ptychonn' needs model.ptychonn_model = MODEL (a folder "
                "written by `ptyinr nn train`)"
            )
        path = str(Path(path).expanduser().resolve())
        read_record(path)
        model = config.model.model_copy(update={"ptychonn_model": path})
        train = config.train.model_copy(update={"epochs": 1})
        return config.model_copy(update={"model": model, "train": train})

    @classmethod
    def check_store(cls, config: ReconstructionConfig, path: str | Path) -> None:
        """Before any work (for a front end's pre-flight): InputError naming the model and
        the mismatch when it does not fit the store's frames, pixel size or energy. Reads
        metadata only."""
        config = cls.resolve_config(config)
        model = str(config.model.ptychonn_model)
        ds = store.open_scan_store(path)
        source = store.resolve_source(ds, config.data.source)
        frame_shape = (int(ds[source].shape[1]), int(ds[source].shape[2]))
        pixel = store.object_pixel_size(ds, frame_shape)
        if ds.attrs.get("positions_unit") == "px":
            pixel = None
        wavelength = ds.attrs.get("wavelength_m")
        check_compatible(
            read_record(model),
            model,
            frame_shape=frame_shape,
            pixel_size=pixel,
            energy_ev=wavelength_to_energy_ev(float(wavelength)) if wavelength else None,
            what=f"the scan {str(path)!r}",
        )

    def setup(self) -> None:
        """Everything this method builds before its first epoch."""
        data, config, geometry, known_probe = (
            self.data,
            self.config,
            self.geometry,
            self.known_probe,
        )
        path = str(config.model.ptychonn_model)
        self.model_path = path
        self.artifact = load_artifact(path, self.device)
        wavelength = data.wavelength_m
        check_compatible(
            self.artifact.record,
            path,
            frame_shape=data.frame_shape,
            pixel_size=data.pixel_size,
            energy_ev=None if wavelength is None else wavelength_to_energy_ev(wavelength),
        )
        # prepared once (BatchNorm folded, channels-last, bfloat16 on CPUs that have it; checked
        # against the plain network on the first call): benchmarks/bench_ptychonn_inference.py
        self.inference_precision = (
            "bfloat16" if self.device.type == "cpu" and bf16_supported() else "float32"
        )
        self.network = for_inference(
            self.artifact.network, self.device, precision=self.inference_precision
        )
        self.measured = self.measurements()
        self.input_scale = input_scale(self.measured.mean_pattern)
        self._sqrt_scale = math.sqrt(float(self.measured.scale))
        probe = known_probe if known_probe is not None else self.artifact.probe
        self.probe = torch.as_tensor(np.asarray(probe, np.complex64), device=self.device)
        self.weights = torch.as_tensor(stitch_weights(self.artifact.probe), device=self.device)
        self.object = torch.ones(geometry.object_shape, dtype=torch.complex64, device=self.device)
        self.probe_scale = 1.0
        self.inference_seconds = 0.0
        self.subpixel = bool(np.abs(geometry.subpixel).max(initial=0.0) > 1e-6)

    # -- state ----------------------------------------------------------------------------

    def current_object(self) -> np.ndarray:
        return self.object.detach().cpu().numpy().astype(np.complex64, copy=True)

    def current_probe(self) -> np.ndarray:
        probe = self.probe * self.probe_scale
        return probe.detach().cpu().numpy().astype(np.complex64, copy=True)

    def engine_state(self) -> dict[str, Any]:
        return {"object": self.object.detach().clone(), "probe_scale": float(self.probe_scale)}

    def load_engine_state(self, state: dict[str, Any]) -> None:
        obj = torch.as_tensor(state["object"]).to(self.device, torch.complex64)
        if tuple(obj.shape) != tuple(self.object.shape):
            raise ConfigError(
                f"ptychonn state: object {tuple(obj.shape)}, expected {tuple(self.object.shape)}"
            )
        self.object.copy_(obj)
        self.probe_scale = float(state["probe_scale"])

    def info(self) -> dict[str, Any]:
        record = self.artifact.record
        n = len(self.training_positions)
        return {
            "ptychonn": {
                "model": self.model_path,
                "weights_sha256": record.get("weights_sha256"),
                "created": record.get("created"),
                "architecture": record.get("architecture"),
                "sources": record.get("sources"),
                "scores": record.get("scores"),
                "probe_from": record.get("probe_from"),
            },
            "intensity_scale": float(self.measured.scale),
            "input_scale": self.input_scale,
            "probe_scale": self.probe_scale,
            "inference_seconds": self.inference_seconds,
            "inference_precision": self.inference_precision,
            "frames_per_second": n / self.inference_seconds if self.inference_seconds else None,
        }

    # -- prediction -------------------------------------------------------------------------

    def _blocks(self, positions: np.ndarray) -> list[np.ndarray]:
        """At most BLOCK positions each, of (nearly) equal sizes: with `predict` padding the
        smaller ones by a frame, the network sees one batch shape per scan, so oneDNN builds
        one set of kernels (a new shape costs ~15 % of a 441-frame preview on a CPU)."""
        positions = np.asarray(positions, dtype=np.int64)
        count = max(1, math.ceil(len(positions) / BLOCK))
        return [block for block in np.array_split(positions, count) if len(block)]

    @torch.no_grad()
    def predict(self, block: np.ndarray, pad_to: int = 0) -> torch.Tensor:
        """The complex patches (B, Ny, Nx) the network predicts for positions `block`; the
        network's batch is padded to `pad_to` frames (repeats of the last, dropped after)."""
        batch = torch.as_tensor(block, device=self.device)
        amplitude = self.measured.amplitude(batch, block).float()  # sqrt(I / scale)
        x = network_input(
            amplitude * self._sqrt_scale, self.artifact.spec, self.input_scale, self.measured.valid
        )
        n = len(x)
        if pad_to > n:
            x = torch.cat([x, x[-1:].expand(pad_to - n, *x.shape[1:])])
        amp, phase = self.network(x)
        return torch.polar(amp[:n].float(), phase[:n].float())

    def _windows(self, block: np.ndarray) -> torch.Tensor:
        """Flat object indices (B, Ny, Nx) of the windows of `block`."""
        ny, nx = self.geometry.window_shape
        width = self.geometry.object_shape[1]
        tl = torch.as_tensor(self.geometry.top_left[block], device=self.device)
        rows = tl[:, 0, None] + torch.arange(ny, device=self.device)[None, :]
        cols = tl[:, 1, None] + torch.arange(nx, device=self.device)[None, :]
        return rows[:, :, None] * width + cols[:, None, :]

    @torch.no_grad()
    def run_epoch(self) -> float:
        """Predict and stitch every training position; the data loss of the result."""
        positions = self.training_positions
        blocks = self._blocks(positions)
        self.measured.expect(blocks)
        started = time.perf_counter()
        acc = None
        measured_energy = 0.0
        for block in blocks:
            patches = self.predict(block, pad_to=len(blocks[0]))
            acc = stitch_accumulate(
                patches,
                self.geometry.top_left[block],
                self.geometry.object_shape,
                self.weights,
                into=acc,
            )
            self.step += len(block)
        if acc is None:
            return math.nan
        self.object = stitch_finish(*acc).reshape(self.geometry.object_shape)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.inference_seconds += time.perf_counter() - started
        # one probe scale: predicted frame energy = measured, over the positions (the FFT is
        # orthonormal: a frame's energy is sum |P O|^2 over its window)
        flat = self.object.reshape(-1)
        power = self.probe.abs().square()
        predicted = 0.0
        self.measured.expect(blocks)
        for block in blocks:
            predicted += float((flat[self._windows(block)].abs().square() * power).sum())
            batch = torch.as_tensor(block, device=self.device)
            measured_energy += float(self.measured.amplitude(batch, block).float().square().sum())
        self.probe_scale = math.sqrt(measured_energy / predicted) if predicted > 0 else 1.0
        value = self.validation_loss(positions)
        self.check_finite(value)
        return value

    @torch.no_grad()
    def validation_loss(self, positions: np.ndarray) -> float:
        """The data loss (train.loss) of the model's probe and the stitched object."""
        beta = self.config.train.loss_beta
        probe = self.probe * self.probe_scale
        flat = self.object.reshape(-1)
        blocks = self._blocks(positions)
        self.measured.expect(blocks)
        total, count = 0.0, 0
        for block in blocks:
            batch = torch.as_tensor(block, device=self.device)
            amplitude = self.measured.amplitude(batch, block).float()
            patches = flat[self._windows(block)]
            shifts = (
                torch.as_tensor(self.geometry.subpixel[block], device=self.device)
                if self.subpixel
                else None
            )
            intensity = forward_intensity(probe, patches, shifts)
            loss = self.loss_fn(intensity, amplitude, beta, self.measured.valid)
            total += float(loss) * len(block)
            count += len(block)
        return total / max(count, 1)
