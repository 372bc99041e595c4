"""Reconstruction engines, one module per method, chosen by name (`model.method`).

To add a method: write `engines/<name>.py` with a subclass of `engines.base.Engine`, and add
one line to `ENGINES` below. Modules are imported only when their method is used.
"""

from __future__ import annotations

import importlib

from ptyinr.engines.base import Engine
from ptyinr.errors import ConfigError

#: method name -> "module:class"
ENGINES: dict[str, str] = {
    "ptyinr": "ptyinr.engines.ptyinr:PtyINREngine",
    "pixels": "ptyinr.engines.pixels:PixelEngine",
    "epie": "ptyinr.engines.epie:EpieEngine",
    "ptychonn": "ptyinr.engines.ptychonn:PtychoNNEngine",
}


def get_engine(name: str) -> type[Engine]:
    """The engine class registered under `name` (ConfigError naming the choices if none)."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ConfigError(
            f"model.method = {name!r}: expected one of {', '.join(sorted(ENGINES))}"
        ) from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["ENGINES", "Engine", "get_engine"]
