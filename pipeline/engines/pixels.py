"""The automatic-differentiation baseline: object and probe as plain pixel arrays, fitted with
PtyINR's loss, optimiser, batches and forward model. Only the representation differs, so a
comparison with `ptyinr` isolates what the neural fields bring."""

from __future__ import annotations

from ptyinr.config import ReconstructionConfig
from ptyinr.engines.base import with_pixel_fields
from ptyinr.engines.ptyinr import PtyINREngine


class PixelEngine(PtyINREngine):
    """PtyINREngine with model.object = model.probe = "pixels"."""

    name = "pixels"

    @classmethod
    def resolve_config(cls, config: ReconstructionConfig) -> ReconstructionConfig:
        """Pixel arrays for object and probe, whatever the [model] section said."""
        return with_pixel_fields(config)
