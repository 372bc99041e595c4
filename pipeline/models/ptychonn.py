"""PtychoNN: one diffraction frame in, the object patch under its probe window out.

The network (Cherukara et al., Appl. Phys. Lett. 117, 044103, 2020), written here in plain
torch.nn: a shared convolutional encoder (`depth` levels of two 3 x 3 convolutions + BatchNorm +
ReLU and a 2 x 2 max-pool, `channels` x 2^level feature maps) and two decoders of the same shape
mirrored (two convolution blocks, bilinear x 2 upsampling, per level), one for the amplitude
(sigmoid, scaled to [0, amplitude_max]) and one for the phase (tanh, scaled to [-pi, pi]). The
defaults (64 x 64 input, 32 channels, depth 3) are the original's: about 1.2 M parameters.

BatchNorm is what makes the phase learnable (issue 13): without it the phase decoder's
activations shrank layer by layer to a near-constant output (raw output std 0.01, predicted
phase std 0.02 rad against 0.37 rad in the labels, correlation 0.14 at the beam centre), while
the amplitude decoder, fed the same code, learned; with it, correlation 0.82-0.88 (format
version 2; models of version 1, without BatchNorm, are refused and must be retrained).

Input (`network_input`): sqrt counts of one frame, bad detector pixels zeroed (the store's
mask), divided by the scan's own bright-field level (sqrt of the peak of its mean pattern, so
scans of different fluence look alike), then brought to `input_size` x `input_size`:

- "crop" (default): the central input_size pixels around the zero frequency. The crop keeps
  the low spatial frequencies, i.e. the whole probe window at a coarser sampling (frame /
  input_size times the object pixel): the decoders predict the full window on that coarse
  grid, and it is interpolated (bilinear) up to the frame's shape. Field of view is kept,
  resolution beyond the crop is lost.
- "bin": the frame is centre-cropped to a multiple of input_size and averaged in blocks. The
  output is interpolated to the full window in the same way (the network learns the mapping;
  binned far-field data alias the window, so "crop" is the physically cleaner choice).

Output: amplitude and phase (B, Ny, Nx) at the frame's resolution, which is the object patch
under the window (object pixel size is set by the detector geometry).

The model's artifact is a folder: `weights.safetensors` (network weights, the source run's
probe and the loss weights; never pickle) and `record.json` (format version, architecture,
input normalisation, frame shape, pixel size, energy, source runs, scores, the weights'
sha256). `load_artifact` refuses a corrupt or foreign folder, `check_compatible` a scan it does
not fit, each in one line naming the file and the mismatch (InputError).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from ptyinr.errors import InputError
from ptyinr.geometry import energy_ev_to_wavelength_m

FORMAT = "ptyinr-ptychonn"
FORMAT_VERSION = 2
#: what changed in each version, for the error that refuses an older model
VERSION_CHANGES = {1: "decoders without BatchNorm, whose phase was not learned (issue 13)"}
WEIGHTS = "weights.safetensors"
RECORD = "record.json"
#: relative tolerance of the compatibility checks (pixel size, energy)
PIXEL_TOLERANCE = 0.01
ENERGY_TOLERANCE = 0.01


@dataclass(frozen=True)
class PtychoNNSpec:
    """Architecture and input contract of a PtychoNN model."""

    frame_shape: tuple[int, int]
    input_size: int = 64
    input_mode: Literal["crop", "bin"] = "crop"
    channels: int = 32
    depth: int = 3
    amplitude_max: float = 1.5

    def __post_init__(self) -> None:
        ny, nx = (int(s) for s in self.frame_shape)
        object.__setattr__(self, "frame_shape", (ny, nx))
        if self.input_mode not in ("crop", "bin"):
            raise InputError(f"ptychonn input_mode = {self.input_mode!r}: expected crop or bin")
        if self.depth < 1 or self.channels < 1:
            raise InputError(
                f"ptychonn depth = {self.depth}, channels = {self.channels}: expected >= 1"
            )
        step = 2**self.depth
        if self.input_size < step or self.input_size % step:
            raise InputError(
                f"ptychonn input_size = {self.input_size}: expected a multiple of 2^depth = {step}"
            )
        if self.input_size > min(ny, nx):
            raise InputError(
                f"ptychonn input_size = {self.input_size}: larger than the frame {ny} x {nx}"
            )
        if not self.amplitude_max > 0:
            raise InputError(f"ptychonn amplitude_max = {self.amplitude_max}: expected > 0")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["frame_shape"] = list(self.frame_shape)
        return out

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PtychoNNSpec:
        return cls(**{**value, "frame_shape": tuple(value["frame_shape"])})


def _conv(cin: int, cout: int) -> list[nn.Module]:
    """3 x 3 convolution, BatchNorm (keeps each decoder's signal from vanishing), ReLU."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _Decoder(nn.Sequential):
    def __init__(self, channels: int, depth: int) -> None:
        top = channels * 2 ** (depth - 1)
        layers: list[nn.Module] = [*_conv(top, top), *_conv(top, top)]
        current = top
        for k in range(1, depth):
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            out = channels * 2 ** max(depth - 1 - k, 1)
            layers += [*_conv(current, out), *_conv(out, out)]
            current = out
        layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        layers.append(nn.Conv2d(current, 1, 3, padding=1))
        super().__init__(*layers)


class PtychoNN(nn.Module):
    """Shared encoder, amplitude and phase decoders; input (B, 1, n, n) from
    `network_input`, output amplitude and phase (B, Ny, Nx) at the frame's shape."""

    def __init__(self, spec: PtychoNNSpec) -> None:
        super().__init__()
        self.spec = spec
        c, depth = spec.channels, spec.depth
        layers: list[nn.Module] = []
        cin = 1
        for level in range(depth):
            cout = c * 2**level
            layers += [*_conv(cin, cout), *_conv(cout, cout), nn.MaxPool2d(2)]
            cin = cout
        self.encoder = nn.Sequential(*layers)
        self.amplitude = _Decoder(c, depth)
        self.phase = _Decoder(c, depth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        amplitude = torch.sigmoid(self.amplitude(code)) * self.spec.amplitude_max
        phase = torch.tanh(self.phase(code)) * math.pi
        if tuple(amplitude.shape[-2:]) != self.spec.frame_shape:  # crop/bin: the full window
            amplitude = functional.interpolate(
                amplitude, size=self.spec.frame_shape, mode="bilinear", align_corners=False
            )
            phase = functional.interpolate(
                phase, size=self.spec.frame_shape, mode="bilinear", align_corners=False
            )
        return amplitude[:, 0], phase[:, 0]


def parameter_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def input_scale(mean_pattern: np.ndarray) -> float:
    """The scan's bright-field level: sqrt of the peak of its mean pattern (counts)."""
    peak = float(np.nanmax(np.asarray(mean_pattern, dtype=np.float64), initial=0.0))
    return math.sqrt(max(peak, 1e-30))


def network_input(
    sqrt_counts: torch.Tensor,
    spec: PtychoNNSpec,
    scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Ny, Nx) sqrt counts -> (B, 1, n, n) network input: bad pixels zeroed (`valid`:
    True = trusted), divided by `scale` (`input_scale`), centre-cropped or binned."""
    x = sqrt_counts.float()
    if valid is not None:
        x = x * valid.to(x.dtype)
    x = x / float(scale)
    ny, nx = x.shape[-2:]
    if (ny, nx) != spec.frame_shape:
        raise InputError(
            f"ptychonn input: frames of {ny} x {nx}, the model takes "
            f"{spec.frame_shape[0]} x {spec.frame_shape[1]}"
        )
    n = spec.input_size
    by, bx = (1, 1) if spec.input_mode == "crop" else (ny // n, nx // n)
    hy, hx = n * by, n * bx
    y0, x0 = ny // 2 - hy // 2, nx // 2 - hx // 2  # zero frequency at N // 2 stays centred
    x = x[..., y0 : y0 + hy, x0 : x0 + hx]
    if by > 1 or bx > 1:
        x = functional.avg_pool2d(x[:, None], (by, bx))[:, 0]
    return x[:, None].contiguous()


# --------------------------------------------------------------------------------- artifact


@dataclass
class ModelArtifact:
    """A trained model: the network, its record, the source run's probe, the loss weights."""

    network: PtychoNN
    record: dict[str, Any]
    probe: np.ndarray  # complex64 (Ny, Nx), as the source run's window sees it
    path: Path | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def spec(self) -> PtychoNNSpec:
        return self.network.spec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_artifact(path: str | os.PathLike, artifact: ModelArtifact, *, force: bool = False) -> Path:
    """Write the model folder (under a hidden name, renamed when complete). An existing
    folder is replaced only with `force` (InputError otherwise)."""
    from safetensors.torch import save_file

    from ptyinr.version import __version__

    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"ptychonn model {str(path)!r}: exists; use --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        probe = np.asarray(artifact.probe, dtype=np.complex64)
        tensors = {
            f"network.{k}": v.detach().cpu().contiguous()
            for k, v in artifact.network.state_dict().items()
        }
        tensors["probe.real"] = torch.from_numpy(np.ascontiguousarray(probe.real))
        tensors["probe.imag"] = torch.from_numpy(np.ascontiguousarray(probe.imag))
        for key, value in artifact.extra.items():
            tensors[f"extra.{key}"] = torch.from_numpy(np.ascontiguousarray(value))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        record = {
            **artifact.record,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": artifact.spec.to_dict(),
            "parameters": parameter_count(artifact.network),
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "ptyinr_version": __version__,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    artifact.record = record
    artifact.path = path
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The model's JSON record, checked to be ours and of a known version (InputError)."""
    path = Path(path)
    where = f"ptychonn model {str(path)!r}"
    if not path.is_dir():
        what = "not found" if not path.exists() else "not a model folder"
        raise InputError(f"{where}: {what}; expected a folder written by `ptyinr nn train`")
    try:
        record = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        raise InputError(f"{where}: {RECORD} missing; not a ptyinr PtychoNN model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: {RECORD} is corrupt ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{where}: {RECORD} is not a ptyinr PtychoNN record")
    if record.get("format_version") in VERSION_CHANGES:
        version = record["format_version"]
        raise InputError(
            f"{where}: format_version {version} ({VERSION_CHANGES[version]}), this ptyinr reads "
            f"{FORMAT_VERSION}; retrain it with `ptyinr nn train`"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{where}: format_version {record.get('format_version')!r}, this ptyinr reads "
            f"{FORMAT_VERSION}"
        )
    try:
        PtychoNNSpec.from_dict(record["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: architecture in {RECORD} is invalid ({exc})") from None
    return record


def load_artifact(path: str | os.PathLike, device: torch.device | str = "cpu") -> ModelArtifact:
    """Load a model folder; InputError in one line for anything corrupt or foreign."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    where = f"ptychonn model {str(path)!r}"
    record = read_record(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{where}: {WEIGHTS} missing")
    if _sha256(weights) != record.get("weights_sha256"):
        raise InputError(f"{where}: {WEIGHTS} is corrupt (checksum differs from {RECORD})")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{where}: {WEIGHTS} is corrupt ({exc})") from None
    spec = PtychoNNSpec.from_dict(record["architecture"])
    network = PtychoNN(spec)
    state = {k.removeprefix("network."): v for k, v in tensors.items() if k.startswith("network.")}
    try:
        network.load_state_dict(state, strict=True)
        probe = (tensors["probe.real"].numpy() + 1j * tensors["probe.imag"].numpy()).astype(
            np.complex64
        )
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(
            f"{where}: weights do not match the recorded architecture ({first})"
        ) from None
    if tuple(probe.shape) != spec.frame_shape:
        raise InputError(f"{where}: probe shape {probe.shape}, expected {spec.frame_shape}")
    extra = {
        k.removeprefix("extra."): v.numpy() for k, v in tensors.items() if k.startswith("extra.")
    }
    network.to(device).eval()
    return ModelArtifact(network, record, probe, path, extra)


def wavelength_to_energy_ev(wavelength_m: float) -> float:
    return energy_ev_to_wavelength_m(1.0) / wavelength_m


def check_compatible(
    record: dict[str, Any],
    path: str | os.PathLike,
    *,
    frame_shape: tuple[int, int],
    pixel_size: tuple[float, float] | None,
    energy_ev: float | None,
    what: str = "the scan",
) -> None:
    """InputError naming the model and the mismatch when it does not fit `what`: frame shape
    exactly, pixel size and energy within 1 % (a model of pixel-unit data fits only such)."""
    where = f"ptychonn model {str(path)!r}"
    want = tuple(int(s) for s in record["architecture"]["frame_shape"])
    if tuple(int(s) for s in frame_shape) != want:
        raise InputError(
            f"{where}: trained on frames of {want[0]} x {want[1]}, {what} has "
            f"{frame_shape[0]} x {frame_shape[1]}"
        )
    model_pixel = record.get("pixel_size_m")
    if (model_pixel is None) != (pixel_size is None):
        have = "pixel units" if pixel_size is None else "metres"
        trained = "pixel units" if model_pixel is None else "metres"
        raise InputError(f"{where}: trained on positions in {trained}, {what} has {have}")
    if model_pixel is not None and pixel_size is not None:
        for a, b in zip(model_pixel, pixel_size, strict=True):
            if abs(float(a) - float(b)) > PIXEL_TOLERANCE * abs(float(a)):
                raise InputError(
                    f"{where}: object pixel size {_fmt(model_pixel)} m, {what} has "
                    f"{_fmt(pixel_size)} m (more than {PIXEL_TOLERANCE:.0%} apart)"
                )
    model_energy = record.get("energy_ev")
    if model_energy is not None and energy_ev is not None:
        if abs(float(model_energy) - energy_ev) > ENERGY_TOLERANCE * float(model_energy):
            raise InputError(
                f"{where}: trained at {float(model_energy):.1f} eV, {what} is at "
                f"{energy_ev:.1f} eV (more than {ENERGY_TOLERANCE:.0%} apart)"
            )


def _fmt(values: Any) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)
