"""Object and probe fields: what the gradient engines optimise, whatever represents them.

`ObjectField` answers "complex object at these pixels" for any subset of the object grid, so
a mini-batch evaluates its networks only on the pixels its windows cover. `ProbeField` gives
the whole probe, normalised to a maximum amplitude of one (the paper's P <- P / max A_P) times
a learnable global scale, so the object stays a transmission function (amplitude ~ 1) however
the detector counts were scaled.

Amplitudes come out of the networks through a softplus shifted so that a zero output means
amplitude one: positive by construction, and a fresh network starts from a uniform,
transparent object. Phases are the raw network output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from ptyinr.config import ModelConfig
from ptyinr.models.hashgrid import FixedCoordinates, HashGridEncoding, HashGridMLP
from ptyinr.models.siren import Siren

AMPLITUDE_OFFSET = math.log(math.e - 1.0)  # softplus(0 + offset) == 1

# ProbeField.fit_to (measured in benchmarks/bench_warm_start.py)
FIT_DECAY = 0.98  # learning-rate factor per step
FIT_LR_FLOOR = 0.1  # ... down to lr * FIT_LR_FLOOR
FIT_CHECK_EVERY = 10  # steps between error checks (each check syncs a GPU)
FIT_ERROR_FLOOR = 1e-5  # relative error the clamped ~0 background may add at most
FIT_REFINE_BELOW = 0.05  # below this error, once its progress stalls (an error above
FIT_STALL = 0.7  # FIT_STALL x the previous check's), fit the complex error itself


def _amplitude(raw: torch.Tensor) -> torch.Tensor:
    return functional.softplus(raw + AMPLITUDE_OFFSET)


def _real_net(kind: str, config: ModelConfig) -> nn.Module:
    if kind == "siren":
        return Siren(
            2,
            1,
            width=config.siren_width,
            hidden_layers=config.siren_hidden_layers,
            first_omega=config.first_omega,
            hidden_omega=config.hidden_omega,
        )
    if kind == "hashgrid":
        return HashGridMLP(
            levels=config.hash_levels,
            features=config.hash_features,
            log2_table_size=config.hash_log2_table_size,
            base_resolution=config.hash_base_resolution,
            per_level_scale=config.hash_per_level_scale,
            hidden_layers=config.mlp_hidden_layers,
            width=config.mlp_width,
            use_tinycudann=config.use_tinycudann,
        )
    raise ValueError(f"no network kind {kind!r}")


def _normalised_grid(shape: tuple[int, int], flat_index: torch.Tensor) -> torch.Tensor:
    """Flat pixel indices -> (K, 2) coordinates in [0, 1] (y, x), as the encodings expect."""
    height, width = shape
    rows = torch.div(flat_index, width, rounding_mode="floor")
    cols = flat_index - rows * width
    scale_y = 1.0 / max(height - 1, 1)
    scale_x = 1.0 / max(width - 1, 1)
    return torch.stack([rows * scale_y, cols * scale_x], dim=-1).float()


class ObjectField(nn.Module):
    """Complex object on an (H, W) pixel grid, represented by two networks or by pixels."""

    def __init__(self, shape: tuple[int, int], kind: str, config: ModelConfig) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.kind = kind
        if kind == "pixels":
            self.real = nn.Parameter(torch.ones(self.shape))
            self.imag = nn.Parameter(torch.zeros(self.shape))
        else:
            self.amplitude_net = _real_net(kind, config)
            self.phase_net = _real_net(kind, config)

    def sample(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Complex64 object values at flat pixel indices (K,) -> (K,)."""
        if self.kind == "pixels":
            return torch.complex(
                self.real.reshape(-1)[flat_index], self.imag.reshape(-1)[flat_index]
            )
        coords = _normalised_grid(self.shape, flat_index).to(flat_index.device)
        amplitude = _amplitude(self.amplitude_net(coords)[:, 0])
        phase = self.phase_net(coords)[:, 0]
        return torch.polar(amplitude, phase)

    @torch.no_grad()
    def full(self, tile_pixels: int = 65536) -> torch.Tensor:
        """The whole object (H, W), evaluated in tiles so memory stays bounded."""
        device = next(self.parameters()).device
        total = self.shape[0] * self.shape[1]
        pieces = [
            self.sample(torch.arange(start, min(start + tile_pixels, total), device=device))
            for start in range(0, total, tile_pixels)
        ]
        return torch.cat(pieces).reshape(self.shape)


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused where this torch and device support it (CPU since torch 2.4): one kernel
    per step instead of a dozen per parameter, for the warm start's 1.4 M table entries."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


class _FitReport:
    """Progress of ProbeField.fit_to: an optional transient rich bar on stderr and an
    optional callback(attempt, step, error)."""

    def __init__(
        self,
        steps: int,
        attempts: int,
        progress: bool,
        callback: Callable[[int, int, float], None] | None,
    ) -> None:
        self.steps, self.attempts, self.callback = steps, attempts, callback
        self.attempt = 0
        self.bar: Any = None
        self.task: Any = None
        if progress:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("step {task.completed}/{task.total}  error {task.fields[error]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> _FitReport:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, attempt: int) -> None:
        self.attempt = attempt
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(
                f"probe warm start (attempt {attempt + 1}/{self.attempts})",
                total=self.steps,
                error="-",
            )

    def update(self, step: int, error: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, error=f"{error:.2e}")
        if self.callback is not None:
            self.callback(self.attempt, step, error)


class ProbeField(nn.Module):
    """Complex probe (Ny, Nx): networks, free pixels, or fixed (known probe); max-normalised."""

    def __init__(
        self,
        shape: tuple[int, int],
        kind: str,
        config: ModelConfig,
        initial: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.kind = kind
        self.log_scale = nn.Parameter(torch.zeros(()))
        if kind == "hashgrid":
            self.model_config = config
            self.amplitude_net = _real_net("hashgrid", config)
            self.phase_net = _real_net("hashgrid", config)
            index = torch.arange(self.shape[0] * self.shape[1])
            self.register_buffer("coords", _normalised_grid(self.shape, index), persistent=False)
            # The probe grid never changes: corner rows and weights once (non-persistent
            # buffers, no state-dict keys), shared by both networks (same layout).
            encoding = self.amplitude_net.encoding
            self.grid_encoding: FixedCoordinates | None = (
                encoding.fixed(self.coords) if isinstance(encoding, HashGridEncoding) else None
            )
        elif kind in ("pixels", "fixed"):
            if initial is None:
                raise ValueError(f"a {kind} probe needs an initial probe array")
            # Max-normalised: the forward model ignores the scale, but Adam's step size
            # does not (a probe of magnitude 1e3 would move 1e3 times too slowly).
            init = torch.as_tensor(np.asarray(initial, dtype=np.complex64))
            init = init / init.abs().amax().clamp_min(1e-30)
            if kind == "pixels":
                self.real = nn.Parameter(init.real.clone())
                self.imag = nn.Parameter(init.imag.clone())
            else:
                self.register_buffer("fixed", init.clone())
        else:
            raise ValueError(f"no probe kind {kind!r}")

    def fit_to(
        self,
        target: np.ndarray,
        steps: int = 300,
        lr: float = 5e-2,
        attempts: int = 3,
        good_enough: float = 0.02,
        *,
        tolerance: float = 2e-4,
        progress: bool = False,
        callback: Callable[[int, int, float], None] | None = None,
    ) -> float:
        """Warm-start the probe's networks on a guess (supervised, on the probe grid only).

        A freshly initialised hash-grid probe is flat; starting the joint fit from there
        stalls on small scans. Fitting the networks to the data-derived guess first costs a
        few dozen cheap steps on the Ny x Nx grid (its encoding is precomputed once).

        Fitted directly on the complex error, a fresh network first drives the whole
        background, weak rings included, to amplitude ~0 where softplus has no gradient
        left, and needs 100+ steps to revive the rings. So the fit starts where it is well
        conditioned: the amplitude network's raw output against the raw value of the target
        amplitude (clamped from below where the target is ~0, at a level that adds at most
        FIT_ERROR_FLOOR to the error), the phase network on the amplitude-weighted phase
        error |T|^2 (1 - cos(phi - theta)) (no unwrapping needed), both output biases
        started at the target's mean. Once that stalls below FIT_REFINE_BELOW (capacity-
        limited small networks), the fit goes on on the complex error itself. Adam's step
        size starts at `lr` and decays by FIT_DECAY per step, to lr * FIT_LR_FLOOR.

        The relative error is checked every FIT_CHECK_EVERY steps: an attempt stops once it
        is below `tolerance`, else after `steps` steps. While the best error is not below
        `good_enough` the fit restarts from fresh networks, up to `attempts` times, keeping
        the best. `progress` shows a transient progress bar on stderr; `callback(attempt,
        step, error)` is called at every check and at the end of each attempt. Returns the
        final relative error ||P/max|P| - T/max|T|||^2 / ||T/max|T|||^2.
        """
        if self.kind != "hashgrid":
            raise ValueError(f"only a hashgrid probe has networks to fit, not {self.kind!r}")
        goal = torch.as_tensor(np.asarray(target, dtype=np.complex64), device=self.coords.device)
        goal = (goal / goal.abs().amax().clamp_min(1e-30)).reshape(-1)
        amplitude = goal.abs()
        norm = amplitude.square().sum().clamp_min(1e-30)
        floor = math.sqrt(FIT_ERROR_FLOOR * float(norm) / amplitude.numel())
        raw_goal = torch.log(torch.expm1(amplitude.clamp_min(max(floor, 1e-6)))) - AMPLITUDE_OFFSET
        report = _FitReport(steps, max(attempts, 1), progress, callback)
        best_error, best_state = float("inf"), None
        with report:
            for attempt in range(max(attempts, 1)):
                if attempt:
                    self._new_networks()
                report.start(attempt)
                error = self._fit_once(goal, raw_goal, norm, steps, lr, tolerance, report)
                if error < best_error:
                    best_error = error
                    best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
                if best_error < good_enough:
                    break
        if best_state is not None:
            self.load_state_dict(best_state)
        return best_error

    def _fit_once(
        self,
        goal: torch.Tensor,
        raw_goal: torch.Tensor,
        norm: torch.Tensor,
        steps: int,
        lr: float,
        tolerance: float,
        report: _FitReport,
    ) -> float:
        self._start_near(goal, raw_goal)
        params = [p for n, p in self.named_parameters() if n != "log_scale"]
        optimiser = _adam(params, lr)
        weight, angle = goal.abs().square() / norm, goal.angle()
        refine, previous = False, float("inf")
        for step in range(steps):
            raw, phase = self._network_outputs()
            if step % FIT_CHECK_EVERY == 0:
                error = float(self._relative_error(raw.detach(), phase.detach(), goal, norm))
                report.update(step, error)
                if error < tolerance:
                    return error
                # the well-conditioned loss has done what it can: fit the error itself
                refine = refine or (error < FIT_REFINE_BELOW and error > FIT_STALL * previous)
                previous = error
            for group in optimiser.param_groups:
                group["lr"] = lr * max(FIT_DECAY**step, FIT_LR_FLOOR)
            optimiser.zero_grad(set_to_none=True)
            if refine:
                loss = self._relative_error(raw, phase, goal, norm)
            else:
                loss = (raw - raw_goal).square().mean() + (
                    weight * (1.0 - torch.cos(phase - angle))
                ).sum()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            error = float(self._relative_error(*self._network_outputs(), goal, norm))
        report.update(steps, error)
        return error

    @torch.no_grad()
    def _start_near(self, goal: torch.Tensor, raw_goal: torch.Tensor) -> None:
        """Shift the networks' output biases to the target's mean raw amplitude and its
        amplitude-weighted mean phase: the fit then starts from the right level."""
        raw, phase = self._network_outputs()
        self.amplitude_net.mlp[-1].bias += raw_goal.mean() - raw.mean()
        self.phase_net.mlp[-1].bias += torch.angle(
            (goal * torch.polar(torch.ones_like(phase), -phase)).sum()
        )

    @staticmethod
    def _relative_error(
        raw: torch.Tensor, phase: torch.Tensor, goal: torch.Tensor, norm: torch.Tensor
    ) -> torch.Tensor:
        probe = torch.polar(_amplitude(raw), phase)
        probe = probe / probe.abs().amax().clamp_min(1e-12)
        return (probe - goal).abs().square().sum() / norm

    def _new_networks(self) -> None:
        device = self.coords.device
        self.amplitude_net = _real_net("hashgrid", self.model_config).to(device)
        self.phase_net = _real_net("hashgrid", self.model_config).to(device)

    def _network_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw amplitude, phase) of the hash-grid networks on the probe grid, (Ny * Nx,)."""
        fixed = self.grid_encoding
        if fixed is not None:
            return (
                self.amplitude_net.forward_fixed(fixed)[:, 0],
                self.phase_net.forward_fixed(fixed)[:, 0],
            )
        # tiny-cuda-nn encodings: the generic path
        return self.amplitude_net(self.coords)[:, 0], self.phase_net(self.coords)[:, 0]

    def unnormalised(self) -> torch.Tensor:
        if self.kind == "hashgrid":
            raw, phase = self._network_outputs()
            return torch.polar(_amplitude(raw), phase).reshape(self.shape)
        if self.kind == "pixels":
            return torch.complex(self.real, self.imag)
        return self.fixed

    def normalised(self) -> torch.Tensor:
        """Probe divided by its maximum amplitude (the paper's normalisation)."""
        probe = self.unnormalised()
        return probe / probe.abs().amax().clamp_min(1e-12)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled probe, mean normalised amplitude) — the latter feeds the regulariser."""
        shape = self.normalised()
        return shape * torch.exp(self.log_scale), shape.abs().mean()


def build_object_field(shape: tuple[int, int], config: ModelConfig) -> ObjectField:
    return ObjectField(shape, config.object, config)


def build_probe_field(
    shape: tuple[int, int],
    config: ModelConfig,
    known_probe: np.ndarray | None = None,
    initial_probe: np.ndarray | None = None,
) -> ProbeField:
    """Known probe -> fixed; else the configured representation (pixels start from a guess)."""
    if known_probe is not None:
        return ProbeField(shape, "fixed", config, initial=known_probe)
    if config.probe == "pixels" and initial_probe is None:
        # "random" for a pixel probe: uniform amplitude and phase in [0, 1) (paper Fig. S15a)
        rng = np.random.default_rng(0)
        initial_probe = rng.uniform(0, 1, shape) * np.exp(1j * rng.uniform(0, 1, shape))
    return ProbeField(shape, config.probe, config, initial=initial_probe)
