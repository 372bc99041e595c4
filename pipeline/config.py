"""Reconstruction configuration: one validated, typed tree with the paper's defaults.

A configuration is built from the embedded defaults, then a TOML file (`--config`), then
`section.key=value` overrides (`--set`), in that order. Unknown keys and out-of-range values
are refused with a message that names the key, the value and what was expected; the resolved
tree is stored with every result so a run can always be repeated.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ptyinr.batching import resolve_batch_size
from ptyinr.errors import ConfigError


class _Section(BaseModel):
    """A config section: unknown keys refused, and frozen once built (a run's configuration
    is resolved once, `ptyinr.reconstruct.resolve_config`; changes make a new one with
    `model_copy(update=...)`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Which method reconstructs, and how object and probe are represented (the paper's
    Methods; ablations of Fig. S16)."""

    method: str = Field(
        "ptyinr",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="reconstruction engine (ptyinr.engines): ptyinr (neural fields), pixels "
        "(pixel-grid object and probe, same loss and optimiser), epie (classical rPIE/ePIE "
        "updates, [epie] section)",
    )
    object: Literal["siren", "hashgrid", "pixels"] = "siren"
    probe: Literal["hashgrid", "pixels"] = "hashgrid"
    first_omega: float = Field(30.0, gt=0, description="SIREN first-layer omega_0 (30; 90 dense)")
    hidden_omega: float = Field(30.0, gt=0, description="SIREN omega of the hidden layers")
    siren_hidden_layers: int = Field(3, ge=1, le=16)
    siren_width: int = Field(
        256,
        ge=4,
        le=4096,
        description="hidden units per SIREN layer (the paper: 512; 256 holds objects of a few "
        "hundred pixels across at a quarter of the cost)",
    )
    hash_levels: int = Field(16, ge=1, le=32)
    hash_features: int = Field(2, ge=1, le=8)
    hash_log2_table_size: int = Field(15, ge=8, le=24)
    hash_base_resolution: int = Field(16, ge=2)
    hash_per_level_scale: float = Field(1.5, gt=1.0, le=4.0)
    mlp_hidden_layers: int = Field(2, ge=1, le=8)
    mlp_width: int = Field(64, ge=4, le=1024)
    probe_init: Literal["data", "optics", "file", "random"] = Field(
        "data",
        description="data: a probe estimated from the data (bright-field disk of the mean "
        "pattern, defocus chosen by short trial fits); optics: the [probe] section's zone "
        "plate or lens; file: the guess in probe.guess (--probe-guess); random: as the paper. "
        "All of them are refined (a known, fixed probe is --probe)",
    )
    probe_init_steps: int = Field(300, ge=0, description="warm-start steps of a network probe")
    use_tinycudann: bool = Field(False, description="use tiny-cuda-nn when importable on CUDA")
    ptychonn_model: str | None = Field(
        None,
        description="method = ptychonn: the model folder written by `ptyinr nn train`",
    )


class TrainConfig(_Section):
    """Optimisation: loss of equation (2), Adam, batches, reproducibility, checkpoints."""

    epochs: int = Field(
        30,
        ge=1,
        description="passes over all scan positions (the paper's runs: 300 epochs of "
        "mini-batches, or thousands of full-batch steps)",
    )
    batch_size: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="positions per step; 0 = full batch; auto: full batch up to "
        "`auto_batch_above` positions, beyond that spatially local mini-batches of about "
        "that many positions",
    )
    auto_batch_above: int = Field(
        1024, ge=1, description="batch_size = auto: largest scan fitted in full batches"
    )
    batches: Literal["local", "random"] = Field(
        "local",
        description="mini-batches of neighbouring positions (each step evaluates the object "
        "on a compact patch; the tiling moves every epoch) or a random shuffle",
    )
    lr_object: float = Field(5e-4, gt=0, le=1.0)
    lr_probe: float = Field(5e-4, gt=0, le=1.0)
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine",
        description="cosine: linear warm-up over `lr_warmup` of the steps, then cosine decay "
        "to `lr_final` x the learning rates (coarse features early, noise averaged late); "
        "constant: as the paper",
    )
    lr_warmup: float = Field(0.05, ge=0, lt=1, description="share of the steps warming up")
    lr_final: float = Field(0.1, gt=0, le=1, description="last step's share of the rates")
    loss: Literal["auto", "smooth_l1", "poisson", "gaussian"] = Field(
        "smooth_l1",
        description="data term (ptyinr.losses): smooth_l1 = the paper's SmoothL1 of sqrt "
        "intensities with threshold loss_beta; poisson = Poisson NLL of the intensities "
        "(photon counts); gaussian = least squares on amplitudes; auto = gaussian for "
        "quantised counts with dark pixels at zero, else smooth_l1 (the choice and why: "
        "the run's data_term)",
    )
    loss_beta: float = Field(1e-2, gt=0, description="SmoothL1 threshold on sqrt intensities")
    probe_reg_lambda: float = Field(1e-2, ge=0, description="weight of mean probe amplitude")
    probe_reg_steps: int = Field(100, ge=0, description="steps k during which it applies")
    validation_fraction: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="share of the positions (spread evenly over the scan), or of the detector "
        "pixels (validation_on), held out to measure the fit on data it does not train on; "
        "0 = off. With it, every `validate_every` "
        "epochs the held-out loss is recorded, the state with the lowest one is kept "
        "(keep_best) and the run stops after `patience` validations without improvement",
    )
    validation_on: Literal["positions", "pixels"] = Field(
        "positions",
        description="what validation_fraction holds out: positions = that share of the scan "
        "positions (never trained on); pixels = that share of the detector pixels (the same "
        "ones in every frame, bad pixels excluded, in validation_block squares), dropped from "
        "the training mask of every position while all positions train: for sparse scans, "
        "where a held-out position's object is seen by no other one",
    )
    validation_block: int = Field(
        1,
        ge=1,
        le=16,
        description="side in detector pixels of the squares validation_on = pixels holds out",
    )
    validate_every: int = Field(1, ge=1, description="epochs between held-out evaluations")
    patience: int = Field(
        0, ge=0, description="validations without improvement before stopping; 0 = never stop"
    )
    keep_best: bool = Field(
        True, description="return the state with the lowest held-out loss, not the last one"
    )
    refit: bool = Field(
        False,
        description="after validation chose epoch E (its lowest held-out loss), fit again "
        "from the start on all positions (held-out ones included) for E epochs and return "
        "that (recorded in the run's `refit`); needs validation_fraction > 0",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    positions: Literal["subpixel", "round"] = Field(
        "subpixel", description="subpixel: honour fractional positions; round: whole pixels"
    )
    refine_positions: bool = Field(
        False,
        description="gradient engines (ptyinr, pixels): learn a per-position offset from the "
        "measured position through the probe's exact Fourier shift (windows re-placed at the "
        "nearest whole pixel as offsets grow); the offsets' mean is removed after every step "
        "(a global shift is an object shift) and each axis is clamped to position_bound_px. "
        "The refined positions are the run's `refined_positions` variable (scan, axis), the "
        "offsets its `position_offsets_px` attr",
    )
    position_lr: float = Field(
        0.02,
        gt=0,
        le=1.0,
        description="Adam learning rate of the offsets: about the px an offset moves per step, "
        "scaled by lr_schedule like the other rates",
    )
    position_start_epoch: int = Field(
        5,
        ge=0,
        description="epochs trained before the offsets start moving (0: from the first "
        "step); the object forms first",
    )
    position_bound_px: float = Field(
        3.0, gt=0, description="largest offset per axis from the measured position, px"
    )
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = none")
    snapshot_every: int = Field(
        0,
        ge=0,
        description="epochs between snapshots of object and probe written into the run group "
        "while it runs (reconstructions/<run_id>/snapshot_<part>, for `ptyinr show`; removed "
        "when the run is complete); 0 = none. Not part of a run's identity",
    )
    log_every: int = Field(1, ge=1, description="epochs between loss records")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = leave torch's default")

    def batch_size_for(self, n_positions: int) -> int:
        """Positions per step for a scan of `n_positions` (0 = full batch), auto resolved."""
        return resolve_batch_size(self.batch_size, self.auto_batch_above, n_positions)


class DataConfig(_Section):
    """Which array of the scan store feeds the reconstruction."""

    source: Literal["intensities", "preprocessed", "auto"] = Field(
        "auto", description="auto: 'preprocessed' when the store has it, else 'intensities'"
    )
    object_padding_px: int = Field(0, ge=0, description="extra object pixels around the scan")
    stream: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: read frames from the store per mini-batch when they do not fit the "
        "device (ptyinr.runtime.plan); always; never: whole scan resident on the device",
    )


class PerformanceConfig(_Section):
    """How a run executes (speed, memory), never what it computes; each switch is benchmarked
    in benchmarks/bench_scale.py."""

    object_tile_pixels: int = Field(
        0,
        ge=0,
        description="object pixels per checkpointed tile when a batch's pixel union is larger; "
        "0 = auto (only when the untiled step would not fit the memory budget)",
    )
    object_chunk_pixels: int = Field(
        -1,
        ge=-1,
        description="object pixels per forward chunk (autograd keeps all; CPU caches like "
        "small chunks): -1 = auto (4096 on CPU, one chunk on CUDA), 0 = no chunks",
    )
    frame_chunk: int = Field(
        0,
        ge=0,
        description="frames per forward-model chunk within a step: the object networks run "
        "once on the step's pixel union, the forward model and loss run chunk by chunk and "
        "their gradients accumulate (same result, memory of one chunk); 0 = auto (only when "
        "the whole batch's forward model would not fit the memory budget)",
    )
    memory_fraction: float = Field(
        0.9, gt=0, le=1.0, description="share of free device memory (RAM on CPU) a run may plan"
    )
    tf32: bool = Field(False, description="TF32 tensor-core matmuls on CUDA")
    precision: Literal["fp32", "bf16-backward", "bf16", "auto"] = Field(
        "auto",
        description="object networks' arithmetic. fp32: float32 throughout. bf16: the hidden "
        "width x width layers in bfloat16 (first layer, head, physics and loss stay float32): "
        "~2.5x faster steps, the same quality on sparse or noisy data and in mini-batch runs, "
        "but a higher loss floor when a full-batch fit nears convergence. bf16-backward: "
        "float32 forward pass (the same function), bfloat16 GEMMs in the backward pass only: "
        "~1.9x faster, its gradient noise lifts full-batch floors as well. auto: bf16 for "
        "mini-batch runs of SIRENs >= 256 wide on devices that multiply bf16 natively (CUDA "
        "compute capability >= 8, CPUs with AMX), else fp32 (benchmarks/bench_precision.py)",
    )
    compile: bool = Field(False, description="torch.compile the object networks")
    pin_memory: bool = Field(
        True, description="pinned host buffers and non_blocking copies for streamed frames (CUDA)"
    )
    cpu_heap: Literal["auto", "reuse", "bounded"] = Field(
        "auto",
        description="CPU memory policy. reuse: glibc keeps freed blocks (fast; RSS up to ~40 % "
        "above live tensors, measured); bounded: tensors > 1 MiB are unmapped when freed (RSS "
        "= live tensors; page faults make steps up to 1.6x slower); auto: reuse when the plan "
        "fits with that slack, bounded when it needs tiles or the slack does not fit",
    )


class ProbeConfig(_Section):
    """Where the probe starts (model.probe_init): a guess file, or the focusing optics.

    The optics are a zone plate or lens with a circular aperture: give its diameter and its
    focal length or outermost zone width, the central stop and the sample's distance from the
    focus (positive: downstream). Energy and detector geometry come from the scan store; the
    keys here override them (or supply them for stores with pixel positions only)."""

    guess: str | None = Field(
        None,
        description="probe_init = file: .npy, .npz, HDF5/CXI (FILE:/dataset), or STORE.zarr:RUN",
    )
    diameter_m: float | None = Field(None, gt=0, description="zone plate / lens aperture")
    focal_length_m: float | None = Field(None, gt=0)
    outer_zone_width_m: float | None = Field(None, gt=0, description="zone plate's dr")
    central_stop_diameter_m: float = Field(0.0, ge=0)
    defocus_m: float = Field(0.0, description="sample distance from the focus (+: downstream)")
    energy_ev: float | None = Field(None, gt=0, description="override the store's energy")
    detector_distance_m: float | None = Field(None, gt=0)
    detector_pixel_size_m: float | None = Field(None, gt=0)
    search_defocus: bool = Field(
        True,
        description="probe_init = data: choose the probe's defocus (size) by short trial fits; "
        "false: a focused probe (inverse FFT of the mean pattern)",
    )


class EpieConfig(_Section):
    """The classical engine (model.method = epie, ptyinr.engines.epie): regularised PIE
    (Maiden, Johnson & Li, Optica 4, 736, 2017) or ePIE (Maiden & Rodenburg, Ultramicroscopy
    109, 1256, 2009) on a pixel object and probe, one sweep over the positions in random order
    per epoch (train.epochs sweeps; the order comes from train.seed and the epoch). At each
    position, with dpsi the change the measured modulus asks of the exit wave:
    O += beta_O conj(P) dpsi / ((1 - alpha_O) |P|^2 + alpha_O max |P|^2), and the probe
    likewise with the roles of object and probe swapped (maxima over the window)."""

    variant: Literal["rpie", "epie"] = Field(
        "rpie",
        description="rpie: denominators mix |P|^2 and max |P|^2 (alpha); epie: max |P|^2 "
        "only (the alphas are then unused)",
    )
    object_step: float = Field(
        0.5,
        gt=0,
        le=2.0,
        description="object update step (beta_O). Larger steps converge faster but follow "
        "each frame's noise: on the measured-like preset (Poisson counts, unknown probe) steps "
        "of 1 drift from 0.07 to 0.16 object error in 30 sweeps, 0.5 reach 0.043 in 10 and "
        "0.050 after 50, 0.25 settle at 0.036 but recover slowly from a poor start (a scan "
        "with dead bright-field pixels: 0.34 after 30 sweeps, 0.003 with 0.5)",
    )
    probe_step: float = Field(0.5, gt=0, le=2.0, description="probe update step (beta_P)")
    object_alpha: float = Field(
        0.1,
        ge=0,
        le=1,
        description="rPIE: weight of max |P|^2 in the object denominator (1: ePIE's; small "
        "values take larger steps where the probe is weak, 0 divides by |P|^2 alone and is "
        "unstable where the probe is dark)",
    )
    probe_alpha: float = Field(
        0.1, ge=0, le=1, description="rPIE: weight of max |O|^2 in the probe denominator"
    )
    probe_update_start: int = Field(
        1,
        ge=0,
        description="first epoch (0-based) whose sweep also updates the probe (the first "
        "sweeps shape the object under the starting probe); a known probe is never updated",
    )


class ReconstructionConfig(_Section):
    """The whole resolved configuration of one reconstruction."""

    model: ModelConfig = ModelConfig()
    probe: ProbeConfig = ProbeConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    performance: PerformanceConfig = PerformanceConfig()
    epie: EpieConfig = EpieConfig()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, reporting errors


def _format_validation_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    # a union's member tags (`constrained-int`, `literal['auto']`) are not config keys
    key = ".".join(
        str(p) for p in first["loc"] if not str(p).startswith(("constrained-", "literal["))
    )
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in first["loc"][:-1])
        known = _known_keys(section)
        where = f"keys in [{section}]" if section else "sections"
        return f"{origin}: unknown config key '{key}'" + (
            f"; known {where}: {', '.join(known)}" if known else ""
        )
    return f"{origin}: config key '{key}' = {value!r}: {first['msg']}"


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = ReconstructionConfig
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation  # type: ignore[assignment]
    return sorted(model.model_fields)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'section.key=value' and parse value as a TOML literal (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=100")
    dotted, raw = text.split("=", 1)
    path = [p.strip() for p in dotted.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=100")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(path):
        out = {part: out}
    return out


def preset_path(name: str) -> Path | None:
    """The TOML preset shipped in `configs/` with this name (without .toml), if any."""
    candidate = resources.files("ptyinr.configs").joinpath(f"{name}.toml")
    return Path(str(candidate)) if candidate.is_file() else None


def list_presets() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("ptyinr.configs").iterdir()
        if p.name.endswith(".toml")
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file, or a preset by name; errors name the file."""
    p = Path(path)
    if not p.is_file():  # a folder named like a preset (`--out demo`) does not hide it
        preset = preset_path(str(path))
        if preset is None:
            what = "a folder, not a TOML file" if p.is_dir() else "no such file"
            raise ConfigError(
                f"config {str(path)!r}: {what}, and no preset of that name "
                f"(presets: {', '.join(list_presets())})"
            )
        p = preset
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {str(p)!r}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config {str(p)!r}: cannot be read: {exc}") from exc


def load_config(
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> ReconstructionConfig:
    """Defaults <- base dict <- TOML file <- `section.key=value` overrides, validated."""
    tree: dict[str, Any] = dict(base or {})
    origin = "defaults"
    if config_file is not None:
        file_tree = read_toml(config_file)
        file_tree.pop("simulate", None)  # presets may carry the simulation that goes with them
        tree = _deep_merge(tree, file_tree)
        origin = f"config {str(config_file)!r}"
    try:
        ReconstructionConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None
    for text in overrides:
        path, value = parse_override(text)
        tree = _deep_merge(tree, _nest(path, value))
        try:
            ReconstructionConfig.model_validate(tree)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, f"--set {text!r}")) from None
    return ReconstructionConfig.model_validate(tree)


def simulate_section(config_file: str | Path | None) -> dict[str, Any]:
    """The `[simulate]` table of a preset, which describes the data the preset was made for."""
    if config_file is None:
        return {}
    return dict(read_toml(config_file).get("simulate", {}))
