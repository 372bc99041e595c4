"""Object and probe fields: what the trainer optimises, whatever represents them.

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

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from pipeline.config import ModelConfig
from pipeline.models.hashgrid import HashGridMLP
from pipeline.models.siren import Siren

AMPLITUDE_OFFSET = math.log(math.e - 1.0)  # softplus(0 + offset) == 1


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
        lr: float = 1e-2,
        attempts: int = 3,
        good_enough: float = 0.02,
    ) -> float:
        """Warm-start the probe's networks on a guess (supervised, on the probe grid only).

        A freshly initialised hash-grid probe is flat; starting the joint fit from there
        stalls on small scans. Fitting the networks to the data-derived guess first costs a
        few hundred cheap steps on Ny x Nx coordinates. About one initialisation in eight
        lands in a poor local fit (phase jumps of pi in the guess), so the fit restarts from
        fresh networks, up to `attempts` times, until its relative error is below
        `good_enough`, keeping the best. Returns the final relative error.
        """
        goal = torch.as_tensor(np.asarray(target, dtype=np.complex64), device=self.coords.device)
        goal = goal / goal.abs().amax().clamp_min(1e-30)
        best_error, best_state = float("inf"), None
        for attempt in range(max(attempts, 1)):
            if attempt:
                self._new_networks()
            error = self._fit_once(goal, steps, lr)
            if error < best_error:
                best_error = error
                best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            if best_error < good_enough:
                break
        if best_state is not None:
            self.load_state_dict(best_state)
        return best_error

    def _fit_once(self, goal: torch.Tensor, steps: int, lr: float) -> float:
        params = [p for n, p in self.named_parameters() if n != "log_scale"]
        optimiser = torch.optim.Adam(params, lr=lr)
        norm = goal.abs().square().sum()
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            error = (self.normalised() - goal).abs().square().sum() / norm
            error.backward()
            optimiser.step()
        with torch.no_grad():
            return float((self.normalised() - goal).abs().square().sum() / norm)

    def _new_networks(self) -> None:
        device = self.coords.device
        self.amplitude_net = _real_net("hashgrid", self.model_config).to(device)
        self.phase_net = _real_net("hashgrid", self.model_config).to(device)

    def unnormalised(self) -> torch.Tensor:
        if self.kind == "hashgrid":
            amplitude = _amplitude(self.amplitude_net(self.coords)[:, 0])
            phase = self.phase_net(self.coords)[:, 0]
            return torch.polar(amplitude, phase).reshape(self.shape)
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


def probe_guess_from_patterns(mean_intensity: np.ndarray) -> np.ndarray:
    """A focused starting probe: inverse FFT of the mean diffraction amplitude, zero phase.

    If the object were transparent, |FFT(P)|^2 would equal the mean pattern; taking its
    amplitude with flat phase gives a compact, centred probe of the right size.
    """
    amplitude = np.sqrt(np.clip(mean_intensity, 0, None)).astype(np.float64)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(amplitude), norm="ortho"))
    return probe.astype(np.complex64)
