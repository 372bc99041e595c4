"""Classical ptychography: regularised PIE (rPIE) and ePIE, one position at a time.

Physics as everywhere else (ptyinr.physics): exit = P_s x O[window], with P_s the probe shifted
by the position's sub-pixel fraction exactly in Fourier space (the ramp exp(-2 pi i s.k) of
`physics.fourier_shift`), far field = orthonormal FFT2, measured data centred. The engine works
in the normalised amplitude units of `Measurements` (sqrt(I / scale)) and in the FFT's own
(uncentred) layout: each block of measured frames and the bad-pixel mask are ifftshifted once.

One epoch (train.epochs of them) is one sweep over all positions in a random order drawn from
(train.seed, epoch) alone, so a resumed run continues exactly. At each position, with psi the
exit wave and dpsi = IFFT(modulus-constrained FFT(psi)) - psi (the measured modulus on valid
pixels, the prediction kept on bad ones), both updates are computed from the old values:

    O[window] += beta_O conj(P_s) dpsi / ((1 - alpha_O) |P_s|^2 + alpha_O max |P_s|^2)
    P_s       += beta_P conj(O)   dpsi / ((1 - alpha_P) |O|^2   + alpha_P max |O|^2)

(rPIE, Maiden, Johnson & Li, Optica 4, 736, 2017; the maxima over the window), the probe one
only from epoch `epie.probe_update_start` on and never for a known probe. `epie.variant =
"epie"` divides by the maxima alone (ePIE, Maiden & Rodenburg, Ultramicroscopy 109, 1256,
2009). The update of the shifted probe is shifted back by -s onto the probe. With sub-pixel
positions the probe is held as its spectrum F = FFT2(P): P_s = IFFT2(F ramp_s) and the update
is F += FFT2(dP_s) conj(ramp_s), four FFTs per position instead of six. Everything runs position
by position on `runtime.device` in complex64, with no host synchronisation per position (one
per block of frames, one per epoch for the loss); windows are views of the object (slices at
precomputed corners). Shifting a whole block's probes in one batched FFT was measured slower on
CPU (the block falls out of cache) and is not done; with a fixed, unshifted probe the
object-update weights are computed once per sweep. Frames are fetched in blocks of the sweep's
order (read ahead when streamed).

Start: object ones (a transmission function), the probe from `choose_probe_start` (data,
optics, file; "random", which a classical method cannot start from, falls back to the focused
probe: the inverse FFT of the sqrt mean pattern), scaled so that the mean predicted frame energy
equals the measured one. A known probe is scaled the same way (its units are the file's, the
data's are sqrt(I / scale); the object absorbs what remains) and then held fixed. The loss
of an epoch is the mean of `train.loss` over the sweep's positions, each predicted just before
its update, so curves compare with the gradient engines'. `self.step` counts position updates
(train.checkpoint_every is in those steps; checkpoints are written between epochs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ptyinr import optics
from ptyinr.config import ReconstructionConfig
from ptyinr.engines.base import Engine, with_pixel_fields
from ptyinr.errors import ConfigError, InputError

#: floor of the far-field modulus in the modulus constraint (normalised amplitude units)
MODULUS_FLOOR = 1e-12
#: added to the update denominators, so an all-dark probe or object divides by no zero
DENOMINATOR_FLOOR = 1e-20
#: device memory (bytes) for one block of measured frames (amplitudes, their uncentred copy,
#: the predictions)
BLOCK_BYTES = 64 * 2**20
MAX_BLOCK = 256


class EpieEngine(Engine):
    """rPIE / ePIE on a pixel object and probe (see the module docstring)."""

    name = "epie"
    data_parallel = False
    pixel_validation = True
    checkpoint_sections = ("model", "data", "epie")

    @classmethod
    def resolve_config(cls, config: ReconstructionConfig) -> ReconstructionConfig:
        """Pixel arrays for object and probe, whatever the [model] section said; position
        refinement is a gradient engines' option (refused here rather than ignored)."""
        if config.train.refine_positions:
            raise ConfigError(
                "train.refine_positions = true: model.method = 'epie' does not refine "
                "positions; use model.method = pixels or ptyinr, or drop the setting"
            )
        return with_pixel_fields(config)

    def setup(self) -> None:
        """Everything this method builds before its first epoch."""
        geometry, known_probe = self.geometry, self.known_probe
        device = self.device
        self.measured = self.measurements()
        self.intensity_scale = float(self.measured.scale)
        ny, nx = geometry.window_shape
        self._corners = [(int(y), int(x)) for y, x in np.asarray(geometry.top_left)]
        frame_bytes = ny * nx * 8
        self._block = int(min(MAX_BLOCK, max(1, BLOCK_BYTES // (4 * frame_bytes))))
        # trusted detector pixels, uncentred: the training mask, and the held-out loss's
        # (train.validation_on = "pixels": the held-out pixels, which the updates keep free)
        self._valid, self._validation_valid = (
            None
            if valid is None
            else torch.fft.ifftshift(torch.as_tensor(valid, dtype=torch.bool, device=device))
            for valid in (self.measured.valid, self.measured.validation_valid)
        )
        # sub-pixel shifts: physics.fourier_shift's ramps, per axis, computed in float64
        self.subpixel = bool(np.abs(geometry.subpixel).max(initial=0.0) > 1e-6)
        self._ramp_y = self._ramp_x = None
        if self.subpixel:
            shifts = torch.as_tensor(geometry.subpixel, dtype=torch.float64, device=device)
            ky = torch.fft.fftfreq(ny, device=device, dtype=torch.float64)
            kx = torch.fft.fftfreq(nx, device=device, dtype=torch.float64)
            self._ramp_y = torch.exp(-2j * math.pi * shifts[:, 0, None] * ky).to(torch.complex64)
            self._ramp_x = torch.exp(-2j * math.pi * shifts[:, 1, None] * kx).to(torch.complex64)

        self.probe_start = self.choose_probe_start(self.measured)
        if known_probe is not None:
            initial = np.asarray(known_probe, dtype=np.complex64)
        elif self.probe_start.probe is not None:
            initial = np.asarray(self.probe_start.probe, dtype=np.complex64)
        else:  # probe_init = random: no classical method starts from noise
            pattern = np.asarray(self.measured.mean_pattern, dtype=np.float64)
            amplitude = np.sqrt(np.clip(np.nan_to_num(pattern), 0, None))
            initial = optics.pupil_to_probe(amplitude, 0.0)
            self.probe_start.record["epie_start"] = (
                "focused probe (inverse FFT of the sqrt mean pattern): rPIE/ePIE has no "
                "random start"
            )
        probe = torch.as_tensor(initial, dtype=torch.complex64, device=device)
        # Mean predicted frame energy = measured, with object amplitude 1: the FFT is
        # orthonormal and the Fourier shift preserves energy, so that is sum |P|^2.
        energy = float(probe.abs().square().sum())
        if not math.isfinite(energy) or energy <= 0:
            raise InputError("epie: the starting probe is zero or not finite")
        factor = math.sqrt(max(self.measured.mean_energy, 1e-30) / energy)
        self.probe_start.record["epie_probe_scale"] = factor
        probe = probe * factor
        self.object = torch.ones(geometry.object_shape, dtype=torch.complex64, device=device)
        # the probe as the updates need it: its spectrum with sub-pixel shifts, else pixels
        self._probe = torch.fft.fft2(probe) if self.subpixel else probe.clone()

    # -- state ----------------------------------------------------------------------------

    def probe_tensor(self) -> torch.Tensor:
        """The (unshifted) probe on the device, complex64 (Ny, Nx)."""
        return torch.fft.ifft2(self._probe) if self.subpixel else self._probe

    def current_object(self) -> np.ndarray:
        return self.object.detach().cpu().numpy().astype(np.complex64, copy=True)

    def current_probe(self) -> np.ndarray:
        return self.probe_tensor().detach().cpu().numpy().astype(np.complex64, copy=True)

    def engine_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "object": self.object.detach().clone(),
            "probe": self.probe_tensor().detach().clone(),
        }
        if self.subpixel:  # the exact internal state (an ifft2/fft2 round trip rounds)
            state["probe_spectrum"] = self._probe.detach().clone()
        return state

    def load_engine_state(self, state: dict[str, Any]) -> None:
        obj = torch.as_tensor(state["object"]).to(self.device, torch.complex64)
        probe = torch.as_tensor(state["probe"]).to(self.device, torch.complex64)
        if tuple(obj.shape) != tuple(self.object.shape) or tuple(probe.shape) != tuple(
            self._probe.shape
        ):
            raise InputError(
                f"epie state: object {tuple(obj.shape)} and probe {tuple(probe.shape)}, "
                f"expected {tuple(self.object.shape)} and {tuple(self._probe.shape)}"
            )
        self.object.copy_(obj)
        if not self.subpixel:
            self._probe.copy_(probe)
        elif "probe_spectrum" in state:
            self._probe.copy_(torch.as_tensor(state["probe_spectrum"]).to(self.device))
        else:
            self._probe.copy_(torch.fft.fft2(probe))

    def info(self) -> dict[str, Any]:
        return {
            "intensity_scale": self.intensity_scale,
            "probe_start": self.probe_start.record,
            "epie": self.config.epie.model_dump(),
        }

    # -- the sweep --------------------------------------------------------------------------

    def sweep_order(self, epoch: int) -> np.ndarray:
        """The training positions in the order epoch `epoch` (0-based) visits them: a
        function of (train.seed, epoch) alone."""
        seed = self.config.train.seed % 2**64
        return np.random.default_rng([seed, epoch]).permutation(self.training_positions)

    @torch.no_grad()
    def validation_loss(self, positions: np.ndarray) -> float:
        """The data loss of the current object and probe at held-out positions (on the
        held-out detector pixels where validation_on = "pixels")."""
        ny, nx = self.geometry.window_shape
        beta = self.config.train.loss_beta
        total, count = 0.0, 0
        for start in range(0, len(positions), self._block):
            block = np.asarray(positions[start : start + self._block])
            batch = torch.as_tensor(block, device=self.device)
            amplitude = torch.fft.ifftshift(
                self.measured.amplitude(batch, block).float(), dim=(-2, -1)
            )
            intensity = torch.empty((len(block), ny, nx), device=self.device)
            for j, i in enumerate(block.tolist()):
                y, x = self._corners[i]
                shifted, _ = self._shifted_probe(i)
                far = torch.fft.fft2(shifted * self.object[y : y + ny, x : x + nx], norm="ortho")
                intensity[j] = far.real.square() + far.imag.square()
            value = self.loss_fn(intensity, amplitude, beta, self._validation_valid)
            total += float(value) * len(block)
            count += len(block)
        return total / max(count, 1)

    def updates_probe(self, epoch: int) -> bool:
        return self.known_probe is None and epoch >= self.config.epie.probe_update_start

    @torch.no_grad()
    def run_epoch(self) -> float:
        """One sweep; the mean data loss of the predictions made before each update."""
        order = self.sweep_order(self.epoch)
        joint = self.updates_probe(self.epoch)
        blocks = [order[i : i + self._block] for i in range(0, len(order), self._block)]
        self.measured.expect(blocks)
        beta = self.config.train.loss_beta
        ny, nx = self.geometry.window_shape
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        # a fixed, unshifted probe: the object-update weights once for the whole sweep
        fixed = None if joint or self.subpixel else self._weights(self._probe, "object")
        for block in blocks:
            batch = torch.as_tensor(block, device=self.device)
            amplitude = self.measured.amplitude(batch, block).float()
            amplitude = torch.fft.ifftshift(amplitude, dim=(-2, -1))
            intensity = torch.empty((len(block), ny, nx), device=self.device)
            self._sweep(block, amplitude, intensity, joint, fixed)
            self.step += len(block)
            total += self.loss_fn(intensity, amplitude, beta, self._valid).double() * len(block)
        value = float(total) / len(order)
        self.check_finite(value)
        return value

    def _shifted_probe(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The probe as position `i` sees it, and the Fourier ramp of its sub-pixel shift
        (None without sub-pixel positions: the probe is held as pixels then)."""
        if self._ramp_y is None or self._ramp_x is None:
            return self._probe, None
        ramp = self._ramp_y[i, :, None] * self._ramp_x[i, None, :]
        return torch.fft.ifft2(self._probe * ramp), ramp

    def _weights(self, field: torch.Tensor, which: str) -> torch.Tensor:
        """conj(f) beta / ((1 - alpha) |f|^2 + alpha max |f|^2) (rPIE), or conj(f) beta /
        max |f|^2 (ePIE): the factor of dpsi in the update of the other factor."""
        epie = self.config.epie
        if which == "object":
            step, alpha = epie.object_step, epie.object_alpha
        else:
            step, alpha = epie.probe_step, epie.probe_alpha
        # contiguous real arithmetic: |f|^2 as re^2 + im^2 (complex abs, and reductions or
        # complex-by-real division over the strided .real view, are many times slower on CPU)
        power = field.real.square().add_(field.imag.square())
        peak = power.amax()
        if epie.variant == "epie":
            scale = (peak + DENOMINATOR_FLOOR).reciprocal_().mul_(step)
        else:
            denominator = power.mul_(1.0 - alpha).add_(peak * alpha + DENOMINATOR_FLOOR)
            scale = denominator.reciprocal_().mul_(step)
        return field.conj_physical().mul_(scale)

    def _sweep(
        self,
        block: np.ndarray,
        amplitude: torch.Tensor,
        intensity: torch.Tensor,
        joint: bool,
        fixed: torch.Tensor | None,
    ) -> None:
        """The updates at the positions of `block`, in order: object, and probe if `joint`.
        `amplitude` (uncentred) and `intensity` (written: the predictions) follow `block`."""
        ny, nx = self.geometry.window_shape
        obj = self.object
        probe = self._probe  # the spectrum with sub-pixel shifts, else the pixels
        valid = self._valid
        if valid is not None:
            keep = (~valid).to(intensity.dtype)  # where the prediction is kept
            use = valid.to(intensity.dtype)
        for j, i in enumerate(block.tolist()):
            y, x = self._corners[i]
            patch = obj[y : y + ny, x : x + nx]
            shifted, ramp = self._shifted_probe(i)
            # modulus constraint on valid pixels: dpsi = IFFT(F a / |F|) - psi
            exit_wave = shifted * patch
            far = torch.fft.fft2(exit_wave, norm="ortho")
            power = torch.square(far.real, out=intensity[j]).addcmul_(far.imag, far.imag)
            factor = torch.div(amplitude[j], power.sqrt().add_(MODULUS_FLOOR))
            if valid is not None:
                factor = torch.addcmul(keep, factor, use)
            dpsi = torch.fft.ifft2(far.mul_(factor), norm="ortho").sub_(exit_wave)
            # both updates from the old values: the probe's is computed before the object moves
            weights = fixed if fixed is not None else self._weights(shifted, "object")
            probe_update = self._weights(patch, "probe").mul_(dpsi) if joint else None
            patch.add_(weights * dpsi)
            if probe_update is None:
                continue
            if ramp is None:
                probe.add_(probe_update)
            else:  # shifted back by -s: F += FFT2(dP_s) conj(ramp_s)
                probe.add_(torch.fft.fft2(probe_update).mul_(ramp.conj_physical()))
