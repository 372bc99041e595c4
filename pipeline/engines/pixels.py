"""The automatic-differentiation baseline: object and probe as plain pixel arrays, fitted with
PtyINR's loss, optimiser, batches and forward model. Only the representation differs, so a
comparison with `ptyinr` isolates what the neural fields bring."""

from __future__ import annotations

from ptyinr.config import ReconstructionConfig
from ptyinr.engines.ptyinr import PtyINREngine


class PixelEngine(PtyINREngine):
    """PtyINREngine with model.object = model.probe = "pixels"."""

    name = "pixels"

    @classmethod
    def resolve_config(cls, config: ReconstructionConfig) -> ReconstructionConfig:
        model = config.model.model_copy(update={"object": "pixels", "probe": "pixels"})
        return config.model_copy(update={"model": model})
